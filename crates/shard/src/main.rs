//! `lorax-shard`: one shard process. Loads the model onto its device and serves the internal gRPC
//! service (proto/lorax/shard/v1) on a Unix socket until SIGINT/SIGTERM.

mod adapters;
mod comm;
mod service;
mod slow;

use std::path::PathBuf;

use clap::Parser;
use lorax_engine::backend::cuda::nccl;
use lorax_engine::weights::DType;
use lorax_engine::{Backend, CpuBackend, CudaBackend, LoadFormat};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// Serve one shard of a model over the internal gRPC service.
#[derive(Parser, Debug)]
#[command(name = "lorax-shard", version)]
struct Args {
    /// Local directory with config.json and safetensors weights.
    #[arg(long, env = "LORAX_MODEL_DIR")]
    model_dir: PathBuf,
    /// Model id shown in Info (hub id or path as the user gave it).
    #[arg(long, env = "LORAX_MODEL_ID")]
    model_id: Option<String>,
    /// Socket paths are `<prefix>-<rank>`; this shard listens on its own.
    #[arg(long, env = "LORAX_UDS_PREFIX", default_value = "/tmp/lorax-shard")]
    uds_prefix: String,
    /// This shard's tensor-parallel rank.
    #[arg(long, env = "LORAX_RANK", default_value_t = 0)]
    rank: u32,
    /// Number of shards.
    #[arg(long, env = "LORAX_WORLD_SIZE", default_value_t = 1)]
    world_size: u32,
    /// Device: `cpu`, `cuda` (device 0) or `cuda:N`. Default: CUDA when a device is present, else the
    /// CPU (the choice and the reason are logged).
    #[arg(long, env = "LORAX_DEVICE")]
    device: Option<String>,
    /// Storage type of weights, activations and the KV cache on CUDA: `bfloat16` or `float16`
    /// (`float32` for checks). The CPU backend always computes in float32.
    #[arg(long, env = "LORAX_DTYPE", default_value = "bfloat16")]
    dtype: String,
    /// Number of KV-cache blocks.
    #[arg(long, env = "LORAX_NUM_BLOCKS", default_value_t = 2048)]
    num_blocks: u32,
    /// Token slots per KV-cache block.
    #[arg(long, env = "LORAX_BLOCK_SIZE", default_value_t = 16)]
    block_size: u32,
    /// Directories local adapters (`adapter_source: "local"`) must be under, comma-separated; empty
    /// disables the local source. Paths leading outside (`..`, symlinks, absolute paths) are refused.
    #[arg(long, env = "LORAX_ADAPTER_LOCAL_ROOTS", value_delimiter = ',')]
    adapter_local_roots: Vec<PathBuf>,
    /// Host of rank 0 for the tensor-parallel all-reduce over TCP (ranks on several hosts); without it
    /// the ranks meet on the Unix socket `<uds-prefix>-comm` (one host).
    #[arg(long, env = "LORAX_MASTER_ADDR")]
    master_addr: Option<String>,
    /// TCP port rank 0 listens on with `--master-addr`.
    #[arg(long, env = "LORAX_MASTER_PORT", default_value_t = 29500)]
    master_port: u16,
    /// Largest LoRA rank accepted; adapters above it are refused.
    #[arg(long, env = "LORAX_MAX_LORA_RANK", default_value_t = 128)]
    max_lora_rank: usize,
    /// Megabytes of parsed adapters kept in host memory (least recently used evicted first).
    #[arg(long, env = "LORAX_ADAPTER_HOST_CACHE_MB", default_value_t = 1024)]
    adapter_host_cache_mb: usize,
    /// Most adapters loaded on the device at once (the router keeps within it).
    #[arg(long, env = "LORAX_MAX_ACTIVE_ADAPTERS", default_value_t = 128)]
    max_active_adapters: usize,
    /// Seconds a hub download may take before its requests fail.
    #[arg(long, env = "LORAX_ADAPTER_DOWNLOAD_TIMEOUT_S", default_value_t = 300)]
    adapter_download_timeout_s: u64,
    /// Log as JSON lines.
    #[arg(long, env = "LORAX_JSON_OUTPUT")]
    json_output: bool,
    /// Where the weights come from: `auto` or `safetensors` (the model directory's checkpoint), or
    /// `dummy` (deterministic random weights from config.json alone, made on the device; benchmarks).
    #[arg(long, env = "LORAX_LOAD_FORMAT", default_value = "auto")]
    load_format: String,
    /// Tensor-parallel all-reduce: `auto` (NCCL on the device when this shard runs on CUDA and there are
    /// several shards, else the socket group), `nccl` or `socket` (through the host). Rank 0 decides
    /// for the group.
    #[arg(long, env = "LORAX_COMM", default_value = "auto")]
    comm: String,
}

/// `--load-format`.
fn parse_load_format(arg: &str) -> anyhow::Result<LoadFormat> {
    match arg.trim().to_ascii_lowercase().as_str() {
        "" | "auto" | "safetensors" => Ok(LoadFormat::Safetensors),
        "dummy" => Ok(LoadFormat::Dummy {
            seed: lorax_engine::dummy::DEFAULT_SEED,
        }),
        other => anyhow::bail!("--load-format {other:?}: expected auto, safetensors or dummy"),
    }
}

/// `--comm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommMode {
    Auto,
    Nccl,
    Socket,
}

fn parse_comm(arg: &str) -> anyhow::Result<CommMode> {
    match arg.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(CommMode::Auto),
        "nccl" => Ok(CommMode::Nccl),
        "socket" => Ok(CommMode::Socket),
        other => anyhow::bail!("--comm {other:?}: expected auto, nccl or socket"),
    }
}

/// What a CUDA shard needs to join the group's NCCL communicator.
struct NcclJoin {
    id: [u8; nccl::ID_BYTES],
    rank: usize,
    world: usize,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

/// The device a shard runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda(usize),
}

/// `--device`: an explicit choice, or, when CUDA is present (probed without panicking), the device of
/// this rank (`cuda:<rank mod devices>`, one GPU per tensor-parallel rank).
fn resolve_device(arg: Option<&str>, rank: usize) -> anyhow::Result<Device> {
    match arg.map(str::trim) {
        None | Some("" | "auto") => match CudaBackend::probe() {
            Ok(n) => {
                let ordinal = rank % n.max(1);
                tracing::info!(
                    devices = n,
                    "CUDA is present: using cuda:{ordinal} (--device cpu to override)"
                );
                Ok(Device::Cuda(ordinal))
            }
            Err(why) => {
                tracing::info!(reason = %why, "no CUDA device: using the CPU backend");
                Ok(Device::Cpu)
            }
        },
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Ok(Device::Cuda(0)),
        Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => anyhow::bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// `--dtype`: the storage type (reported in Info as `service::dtype_name` says).
fn parse_dtype(arg: &str) -> anyhow::Result<DType> {
    match arg.trim().to_ascii_lowercase().as_str() {
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "fp16" | "f16" | "half" => Ok(DType::F16),
        "float32" | "fp32" | "f32" => Ok(DType::F32),
        other => anyhow::bail!("--dtype {other:?}: expected bfloat16 or float16 (or float32)"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.json_output);
    anyhow::ensure!(
        args.world_size >= 1 && args.rank < args.world_size,
        "--rank {} must be below --world-size {}",
        args.rank,
        args.world_size
    );
    let dtype = parse_dtype(&args.dtype)?;
    parse_load_format(&args.load_format)?;
    parse_comm(&args.comm)?;
    match resolve_device(args.device.as_deref(), args.rank as usize)? {
        Device::Cpu => serve(args, |_| Ok(CpuBackend), DType::F32, false).await,
        Device::Cuda(ordinal) => {
            tracing::info!(ordinal, dtype = service::dtype_name(dtype), "starting the CUDA backend");
            let make = move |group: Option<NcclJoin>| {
                let mut backend = CudaBackend::new(ordinal, dtype)?;
                if let Some(g) = group {
                    backend.attach_nccl(&g.id, g.rank, g.world)?;
                }
                Ok(backend)
            };
            serve(args, make, dtype, true).await
        }
    }
}

/// Rank 0's choice of all-reduce, sent to every rank: `[0]` socket, `[1] + id` NCCL, `[2] + message`
/// rank 0 could not set up the group (so the others fail with its reason instead of a closed socket).
fn nccl_offer(mode: CommMode, cuda: bool) -> Vec<u8> {
    let wants = match mode {
        CommMode::Socket => false,
        CommMode::Auto => cuda,
        CommMode::Nccl => true,
    };
    if !wants {
        return vec![0];
    }
    let fail = |why: String| {
        tracing::error!("{why}");
        let mut m = vec![2];
        m.extend_from_slice(why.as_bytes());
        m
    };
    if !cuda {
        return fail("--comm nccl needs the CUDA backend (this shard runs on the CPU)".into());
    }
    if !nccl::nccl_present() {
        if mode == CommMode::Auto {
            tracing::warn!("NCCL (libnccl.so) was not found: the GPU shards sum through the host over sockets");
            return vec![0];
        }
        return fail("--comm nccl: the NCCL library (libnccl.so) is not installed or not on LD_LIBRARY_PATH".into());
    }
    match nccl::unique_id() {
        Ok(id) => {
            let mut m = vec![1];
            m.extend_from_slice(&id);
            m
        }
        Err(e) => fail(format!("creating the NCCL unique id: {e}")),
    }
}

/// The tensor-parallel group of this shard: itself alone, or every rank of `--world-size` over the
/// socket group (rank 0 listens at `<uds-prefix>-comm`, or on TCP with `--master-addr`), plus, when
/// rank 0 chose NCCL, the unique id every rank joins the device group with.
async fn join_group(
    args: &Args,
    cuda: bool,
) -> anyhow::Result<(std::sync::Arc<dyn lorax_engine::comm::Communicator>, Option<NcclJoin>)> {
    if args.world_size == 1 {
        return Ok((std::sync::Arc::new(lorax_engine::comm::SingleRank), None));
    }
    let mode = parse_comm(&args.comm)?;
    let at = match &args.master_addr {
        Some(addr) => comm::Rendezvous::Tcp(format!("{addr}:{}", args.master_port)),
        None => comm::Rendezvous::Unix(comm::socket_path(&args.uds_prefix)),
    };
    let (rank, world) = (args.rank as usize, args.world_size as usize);
    tracing::info!(rank, world, ?at, "joining the tensor-parallel group");
    let (group, offer) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let group = comm::SocketComm::join(&at, rank, world, std::time::Duration::from_secs(600))?;
        let mut offer = if rank == 0 { nccl_offer(mode, cuda) } else { Vec::new() };
        group.broadcast(&mut offer)?;
        Ok((group, offer))
    })
    .await??;
    let join = match offer.split_first() {
        Some((0, _)) => {
            anyhow::ensure!(
                mode != CommMode::Nccl,
                "--comm nccl on rank {rank}, but rank 0 chose the socket all-reduce"
            );
            tracing::info!(
                rank,
                world,
                "tensor-parallel sums go through the host (socket all-reduce)"
            );
            None
        }
        Some((1, id)) => {
            anyhow::ensure!(
                cuda,
                "rank 0 chose NCCL, but rank {rank} runs on the CPU (give every rank a GPU, or --comm socket)"
            );
            anyhow::ensure!(
                nccl::nccl_present(),
                "rank 0 chose NCCL, but the NCCL library (libnccl.so) is not found on rank {rank}"
            );
            let id = <[u8; nccl::ID_BYTES]>::try_from(id)
                .map_err(|_| anyhow::anyhow!("rank 0 sent an NCCL id of {} bytes", id.len()))?;
            tracing::info!(rank, world, "tensor-parallel sums go over NCCL on the device");
            Some(NcclJoin { id, rank, world })
        }
        Some((2, why)) if rank == 0 => anyhow::bail!("{}", String::from_utf8_lossy(why)),
        Some((2, why)) => anyhow::bail!("rank 0 could not set up the group: {}", String::from_utf8_lossy(why)),
        _ => anyhow::bail!("rank 0 sent an unknown group setup"),
    };
    Ok((std::sync::Arc::new(group), join))
}

/// Loads the model on the backend `make` creates and serves until SIGINT/SIGTERM.
async fn serve<B: Backend>(
    args: Args,
    make: impl FnOnce(Option<NcclJoin>) -> lorax_engine::Result<B> + Send + 'static,
    dtype: DType,
    cuda: bool,
) -> anyhow::Result<()> {
    let (group, nccl_join) = join_group(&args, cuda).await?;
    let model_id = args
        .model_id
        .clone()
        .unwrap_or_else(|| args.model_dir.display().to_string());
    tracing::info!(rank = args.rank, model = %model_id, "loading model");
    let svc = service::ShardServer::load(
        service::ShardConfig {
            model_dir: args.model_dir.clone(),
            model_id,
            rank: args.rank,
            world_size: args.world_size,
            num_blocks: args.num_blocks,
            block_size: args.block_size,
            urls: (0..args.world_size)
                .map(|r| format!("{}-{r}", args.uds_prefix))
                .collect(),
            adapters: adapters::AdapterSettings {
                local_roots: adapters::canonical_roots(&args.adapter_local_roots)?,
                max_rank: args.max_lora_rank,
                host_cache_bytes: args.adapter_host_cache_mb.saturating_mul(1 << 20),
                device_slots: args.max_active_adapters.max(1),
            },
            download_timeout: std::time::Duration::from_secs(args.adapter_download_timeout_s),
            dtype,
            comm: group,
            load_format: parse_load_format(&args.load_format)?,
        },
        move || make(nccl_join),
    )
    .await?;
    let path = PathBuf::from(format!("{}-{}", args.uds_prefix, args.rank));
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    tracing::info!(socket = %path.display(), "shard ready");
    let result = tonic::transport::Server::builder()
        .add_service(lorax_proto::shard::v1::shard_service_server::ShardServiceServer::new(
            svc,
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&path);
    tracing::info!("shard stopped");
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_flags_parse() {
        assert_eq!(resolve_device(Some("cpu"), 0).ok(), Some(Device::Cpu));
        assert_eq!(resolve_device(Some("cuda"), 0).ok(), Some(Device::Cuda(0)));
        assert_eq!(resolve_device(Some("cuda:3"), 0).ok(), Some(Device::Cuda(3)));
        assert!(resolve_device(Some("tpu"), 0).is_err());
        assert!(resolve_device(Some("cuda:x"), 0).is_err());
        // Auto never panics: CUDA when present, else the CPU.
        let auto = resolve_device(None, 0).ok();
        assert_eq!(auto.is_some_and(|d| d == Device::Cpu), CudaBackend::probe().is_err());
        assert_eq!(parse_dtype("bfloat16").ok(), Some(DType::BF16));
        assert_eq!(parse_dtype("float16").ok(), Some(DType::F16));
        assert!(parse_dtype("int8").is_err());
    }

    #[test]
    fn load_format_and_comm_flags_parse_and_rank_zero_offers_a_group() {
        assert_eq!(parse_load_format("auto").ok(), Some(LoadFormat::Safetensors));
        assert!(matches!(parse_load_format("dummy"), Ok(LoadFormat::Dummy { .. })));
        assert!(parse_load_format("pt").is_err());
        assert_eq!(parse_comm("NCCL").ok(), Some(CommMode::Nccl));
        assert!(parse_comm("mpi").is_err());
        // CPU shards use the socket group; asking for NCCL on the CPU is an error the peers are told.
        assert_eq!(nccl_offer(CommMode::Auto, false), vec![0]);
        assert_eq!(nccl_offer(CommMode::Socket, true), vec![0]);
        let refused = nccl_offer(CommMode::Nccl, false);
        assert_eq!(refused[0], 2);
        assert!(String::from_utf8_lossy(&refused[1..]).contains("CUDA backend"));
        // Without libnccl.so, auto falls back to sockets and an explicit nccl is refused: never a panic.
        if !nccl::nccl_present() {
            assert_eq!(nccl_offer(CommMode::Auto, true), vec![0]);
            assert_eq!(nccl_offer(CommMode::Nccl, true)[0], 2);
        }
    }
}
