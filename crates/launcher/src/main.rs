//! `lorax-launcher`: the one command. Resolves the model (embedded default, local directory or hub),
//! spawns the shard processes, waits until each answers Health, spawns the router, and supervises them:
//! SIGINT/SIGTERM stop everything gracefully; any child dying ends the deployment with a non-zero code.

mod embedded;
#[cfg(test)]
mod hub_test_server;
mod model;
mod supervisor;

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser};

/// Serve a Llama, Mistral or Qwen2 model and its LoRA adapters (loaded on demand, decoded together in one
/// batch) over HTTP: a router process and one shard process per tensor-parallel rank.
#[derive(Parser, Debug, Clone)]
#[command(name = "lorax-launcher", version)]
pub struct Args {
    /// Hugging Face Hub repo id or local directory of the model. Without it, an embedded tiny random
    /// model is served (no network, no GPU).
    #[arg(long, env = "MODEL_ID")]
    pub model_id: Option<String>,
    /// Hub revision (branch, tag or commit) of the model.
    #[arg(long, env = "REVISION")]
    pub revision: Option<String>,
    /// Number of shard processes (tensor-parallel ranks), at least 1.
    #[arg(long, env = "NUM_SHARD", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..))]
    pub num_shard: u32,
    /// Host of shard rank 0 for the tensor-parallel all-reduce over TCP, for ranks on several hosts
    /// (start the other ranks' `lorax-shard` processes there with the same flags). Without it the
    /// shards of this host meet on a Unix socket.
    #[arg(long, env = "MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// TCP port of rank 0's all-reduce listener with `--master-addr`.
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Device for the shards: `auto` (a GPU per rank when CUDA is present, else the CPU), `cpu`, `cuda`
    /// or `cuda:N`.
    #[arg(long, env = "DEVICE", default_value = "auto")]
    pub device: String,
    /// Storage type on CUDA: `bfloat16` or `float16` (`float32` for checks); the CPU computes in float32.
    #[arg(long, env = "DTYPE", default_value = "bfloat16")]
    pub dtype: String,
    /// Where the shards take the weights from: `auto`/`safetensors` (the checkpoint), or `dummy`
    /// (deterministic random weights from config.json alone, made on each shard's device; for
    /// benchmarks: a hub model's checkpoint is then not downloaded).
    #[arg(long, env = "LOAD_FORMAT", default_value = "auto")]
    pub load_format: String,
    /// HTTP port of the router.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Address the router listens on.
    #[arg(long, env = "HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: String,
    /// Directory for the shards' Unix sockets (default: a fresh one under the temp dir).
    #[arg(long, env = "SHARD_UDS_DIR")]
    pub shard_uds_dir: Option<PathBuf>,
    /// Where the embedded default model is written on first use.
    #[arg(long, env = "LORAX_EMBEDDED_DIR")]
    pub embedded_dir: Option<PathBuf>,
    /// KV-cache blocks per shard.
    #[arg(long, env = "NUM_BLOCKS", default_value_t = 2048)]
    pub num_blocks: u32,
    /// Token slots per KV-cache block.
    #[arg(long, env = "BLOCK_SIZE", default_value_t = 16)]
    pub block_size: u32,
    /// Seconds to wait for every shard to load and answer Health.
    #[arg(long, env = "SHARD_STARTUP_TIMEOUT_S", default_value_t = 600)]
    pub shard_startup_timeout_s: u64,
    /// Seconds the whole shutdown may take: the router gets SIGTERM and finishes its open requests, then
    /// the shards get SIGTERM and what is left (at least a second); whatever still runs is killed.
    #[arg(long, env = "SHUTDOWN_GRACE_S", default_value_t = 10)]
    pub shutdown_grace_s: u64,
    /// Log as JSON lines (launcher, shards and router); the variable takes true/false, 1/0, yes/no, as the
    /// router's does.
    #[arg(long, env = "JSON_OUTPUT", value_parser = clap::builder::BoolishValueParser::new())]
    pub json_output: bool,
    /// Limits passed to the router.
    #[command(flatten)]
    pub limits: RouterLimits,
    /// LoRA adapter settings.
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// API keys the router requires.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Browser access (CORS) and trace export of the router.
    #[command(flatten)]
    pub router_http: RouterHttpArgs,
}

/// The router's CORS rules and OpenTelemetry trace export (LoRAX's flag names), forwarded unchanged.
/// List flags take comma-separated values.
#[derive(ClapArgs, Debug, Clone)]
pub struct RouterHttpArgs {
    /// Origins allowed to call the API from a browser, or `*`. CORS is off (no CORS headers) without it.
    #[arg(long, env = "CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Methods allowed in cross-origin calls, or `*` (router default: GET, POST).
    #[arg(long, env = "CORS_ALLOW_METHOD", value_delimiter = ',')]
    pub cors_allow_method: Vec<String>,
    /// Request headers allowed in cross-origin calls, or `*` (router default: content-type,
    /// authorization, x-api-key).
    #[arg(long, env = "CORS_ALLOW_HEADER", value_delimiter = ',')]
    pub cors_allow_header: Vec<String>,
    /// Response headers a browser page may read (e.g. x-generated-tokens), or `*`.
    #[arg(long, env = "CORS_EXPOSE_HEADER", value_delimiter = ',')]
    pub cors_expose_header: Vec<String>,
    /// Allow credentials in cross-origin calls (`--cors-allow-credentials` alone means true).
    #[arg(long, env = "CORS_ALLOW_CREDENTIALS", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub cors_allow_credentials: bool,
    /// Seconds a browser may cache a preflight answer.
    #[arg(long, env = "CORS_MAX_AGE")]
    pub cors_max_age: Option<u64>,
    /// OpenTelemetry collector receiving the router's traces over OTLP/gRPC, e.g. `http://127.0.0.1:4317`.
    #[arg(long, env = "OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the router's traces.
    #[arg(long, env = "OTLP_SERVICE_NAME", default_value = "lorax-router")]
    pub otlp_service_name: String,
    /// TCP port of the public gRPC API (`lorax.generate.v1.LoraxService`, on `--hostname`); off without
    /// it; 0 picks a free port (logged).
    #[arg(long, env = "GRPC_PORT")]
    pub grpc_port: Option<u16>,
}

impl RouterHttpArgs {
    fn to_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, values) in [
            ("cors-allow-origin", &self.cors_allow_origin),
            ("cors-allow-method", &self.cors_allow_method),
            ("cors-allow-header", &self.cors_allow_header),
            ("cors-expose-header", &self.cors_expose_header),
        ] {
            if !values.is_empty() {
                v.push(format!("--{flag}={}", values.join(",")));
            }
        }
        if self.cors_allow_credentials {
            v.push("--cors-allow-credentials=true".into());
        }
        if let Some(seconds) = self.cors_max_age {
            v.push(format!("--cors-max-age={seconds}"));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            v.push(format!("--otlp-endpoint={endpoint}"));
        }
        v.push(format!("--otlp-service-name={}", self.otlp_service_name));
        if let Some(port) = self.grpc_port {
            v.push(format!("--grpc-port={port}"));
        }
        v
    }
}

/// Optional API keys the router requires on every route but /health, /metrics and /docs (sent as
/// `Authorization: Bearer <key>` or `X-API-Key: <key>`; see docs/reliability.md).
#[derive(ClapArgs, Clone, Default)]
pub struct AuthArgs {
    /// An API key clients must send. It reaches the router through its environment (`API_KEY`), never
    /// its command line; prefer setting `API_KEY` or `--api-key-file` here too.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file of API keys, one per line (blank lines and `#` comments skipped), any of them accepted.
    #[arg(long, env = "API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthArgs")
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("api_key_file", &self.api_key_file)
            .finish()
    }
}

impl AuthArgs {
    /// The router's flags (the file's path) and environment (the key).
    fn router_flags_and_env(&self) -> (Vec<String>, Vec<(&'static str, String)>) {
        let flags = self
            .api_key_file
            .iter()
            .map(|f| format!("--api-key-file={}", f.display()))
            .collect();
        let env = self.api_key.iter().map(|k| ("API_KEY", k.clone())).collect();
        (flags, env)
    }
}

/// LoRA adapters: sources, how many are active, and the shards' caches.
#[derive(ClapArgs, Debug, Clone)]
pub struct AdapterArgs {
    /// Source of requests that name an adapter without `adapter_source`: `hub` or `local`.
    #[arg(long, env = "ADAPTER_SOURCE", default_value = "hub")]
    pub adapter_source: String,
    /// Directories `local` adapters must be under, comma-separated. Empty (the default) disables the
    /// local source; paths leading outside (`..`, symlinks, absolute paths) are refused.
    #[arg(long, env = "ADAPTER_LOCAL_ROOTS", value_delimiter = ',')]
    pub adapter_local_roots: Vec<PathBuf>,
    /// Most adapters loaded on the shards at once (at least 1); others wait in their queue for a slot.
    #[arg(long, env = "MAX_ACTIVE_ADAPTERS", default_value_t = 128,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_active_adapters: usize,
    /// Seconds an adapter stays active while others wait before it stops taking new requests and is
    /// offloaded once its running requests finish.
    #[arg(long, env = "ADAPTER_CYCLE_TIME_S", default_value_t = 2.0)]
    pub adapter_cycle_time_s: f64,
    /// Adapters downloaded and loaded at startup, comma-separated.
    #[arg(long, env = "PRELOADED_ADAPTER_IDS", value_delimiter = ',')]
    pub preloaded_adapter_ids: Vec<String>,
    /// Source of the preloaded adapters (default: `--adapter-source`).
    #[arg(long, env = "PRELOADED_ADAPTER_SOURCE")]
    pub preloaded_adapter_source: Option<String>,
    /// Largest LoRA rank accepted.
    #[arg(long, env = "MAX_LORA_RANK", default_value_t = 128)]
    pub max_lora_rank: usize,
    /// Megabytes of parsed adapters each shard keeps in host memory (least recently used evicted).
    #[arg(long, env = "ADAPTER_HOST_CACHE_MB", default_value_t = 1024)]
    pub adapter_host_cache_mb: usize,
    /// Seconds a hub download may take before the adapter's requests fail.
    #[arg(long, env = "ADAPTER_DOWNLOAD_TIMEOUT_S", default_value_t = 300)]
    pub adapter_download_timeout_s: u64,
}

impl AdapterArgs {
    fn shard_flags(&self) -> Vec<String> {
        let roots: Vec<String> = self
            .adapter_local_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        let mut v = vec![
            format!("--max-lora-rank={}", self.max_lora_rank),
            format!("--adapter-host-cache-mb={}", self.adapter_host_cache_mb),
            format!("--max-active-adapters={}", self.max_active_adapters),
            format!("--adapter-download-timeout-s={}", self.adapter_download_timeout_s),
        ];
        if !roots.is_empty() {
            v.push(format!("--adapter-local-roots={}", roots.join(",")));
        }
        v
    }

    fn router_flags(&self) -> Vec<String> {
        let mut v = vec![
            format!("--default-adapter-source={}", self.adapter_source),
            format!("--max-active-adapters={}", self.max_active_adapters),
            format!("--adapter-cycle-time-s={}", self.adapter_cycle_time_s),
        ];
        if !self.preloaded_adapter_ids.is_empty() {
            v.push(format!(
                "--preloaded-adapter-ids={}",
                self.preloaded_adapter_ids.join(",")
            ));
        }
        if let Some(s) = &self.preloaded_adapter_source {
            v.push(format!("--preloaded-adapter-source={s}"));
        }
        v
    }
}

/// Router limits, forwarded flag for flag.
#[derive(ClapArgs, Debug, Clone)]
pub struct RouterLimits {
    /// Requests in flight beyond this are refused with 429.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Longest prompt, in tokens.
    #[arg(long, env = "MAX_INPUT_LENGTH", default_value_t = 1024)]
    pub max_input_length: usize,
    /// Longest prompt + generation, in tokens.
    #[arg(long, env = "MAX_TOTAL_TOKENS", default_value_t = 2048)]
    pub max_total_tokens: usize,
    /// Most prompt tokens in one prefill (with mixed steps: of admitted requests whose prompts still run).
    #[arg(long, env = "MAX_BATCH_PREFILL_TOKENS", default_value_t = 4096)]
    pub max_batch_prefill_tokens: usize,
    /// Most prompt tokens per step: new prompts run in chunks of this many tokens in the same forward
    /// pass as the running requests' decode rows (mixed steps, chunked prefill); 0 turns both off.
    #[arg(long, env = "MAX_BATCH_PREFILL_CHUNK_TOKENS", default_value_t = 2048)]
    pub max_batch_prefill_chunk_tokens: usize,
    /// Most tokens (prompt + generation) in the running batch; default: the KV cache's capacity.
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<usize>,
    /// Decode steps after which waiting requests are prefilled even if few are waiting.
    #[arg(long, env = "MAX_WAITING_TOKENS", default_value_t = 20)]
    pub max_waiting_tokens: usize,
    /// Prefill new requests when waiting ≥ this ratio × running.
    #[arg(long, env = "WAITING_SERVED_RATIO", default_value_t = 1.2)]
    pub waiting_served_ratio: f32,
    /// Most stop sequences per request.
    #[arg(long, env = "MAX_STOP_SEQUENCES", default_value_t = 4)]
    pub max_stop_sequences: usize,
}

impl RouterLimits {
    fn to_flags(&self) -> Vec<String> {
        let mut v = vec![
            format!("--max-concurrent-requests={}", self.max_concurrent_requests),
            format!("--max-input-length={}", self.max_input_length),
            format!("--max-total-tokens={}", self.max_total_tokens),
            format!("--max-batch-prefill-tokens={}", self.max_batch_prefill_tokens),
            format!(
                "--max-batch-prefill-chunk-tokens={}",
                self.max_batch_prefill_chunk_tokens
            ),
            format!("--max-waiting-tokens={}", self.max_waiting_tokens),
            format!("--waiting-served-ratio={}", self.waiting_served_ratio),
            format!("--max-stop-sequences={}", self.max_stop_sequences),
        ];
        if let Some(t) = self.max_batch_total_tokens {
            v.push(format!("--max-batch-total-tokens={t}"));
        }
        v
    }
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

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.json_output);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervisor::run(args)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_http_flags_are_forwarded() {
        let args = Args::try_parse_from(["lorax-launcher"]).expect("defaults");
        assert_eq!(args.router_http.to_flags(), ["--otlp-service-name=lorax-router"]);
        let args = Args::try_parse_from([
            "lorax-launcher",
            "--cors-allow-origin",
            "https://a.example,https://b.example",
            "--cors-allow-method",
            "GET",
            "--cors-allow-header",
            "content-type",
            "--cors-expose-header",
            "x-generated-tokens",
            "--cors-allow-credentials",
            "--cors-max-age",
            "60",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
        ])
        .expect("flags");
        assert_eq!(
            args.router_http.to_flags(),
            [
                "--cors-allow-origin=https://a.example,https://b.example",
                "--cors-allow-method=GET",
                "--cors-allow-header=content-type",
                "--cors-expose-header=x-generated-tokens",
                "--cors-allow-credentials=true",
                "--cors-max-age=60",
                "--otlp-endpoint=http://127.0.0.1:4317",
                "--otlp-service-name=lorax-router",
            ]
        );
    }

    #[test]
    fn zero_active_adapters_is_refused_at_parse() {
        let e = Args::try_parse_from(["lorax-launcher", "--max-active-adapters", "0"]).expect_err("refused");
        assert!(e.to_string().contains("--max-active-adapters"), "{e}");
        let args = Args::try_parse_from(["lorax-launcher", "--max-active-adapters", "1"]).expect("one slot");
        assert_eq!(args.adapters.max_active_adapters, 1);
    }

    #[test]
    fn zero_shards_is_refused_at_parse() {
        let e = Args::try_parse_from(["lorax-launcher", "--num-shard", "0"]).expect_err("refused");
        assert!(e.to_string().contains("--num-shard"), "{e}");
        let args = Args::try_parse_from(["lorax-launcher", "--num-shard", "2"]).expect("two shards");
        assert_eq!(args.num_shard, 2);
    }

    #[test]
    fn api_key_reaches_the_router_by_environment_only() {
        let args = Args::try_parse_from(["lorax-launcher"]).expect("defaults");
        assert_eq!(args.auth.router_flags_and_env(), (vec![], vec![]));
        let args = Args::try_parse_from([
            "lorax-launcher",
            "--api-key",
            "k-secret",
            "--api-key-file",
            "/etc/lorax/keys",
        ])
        .expect("flags");
        let (flags, env) = args.auth.router_flags_and_env();
        assert_eq!(flags, ["--api-key-file=/etc/lorax/keys"]);
        assert_eq!(env, [("API_KEY", "k-secret".to_string())]);
        assert!(!format!("{args:?}").contains("k-secret"), "redacted in Debug");
    }
}
