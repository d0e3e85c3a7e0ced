//! The LoRAX router: the HTTP front of a deployment. It validates and tokenizes requests, queues them,
//! runs the continuous-batching loop against the shard processes over gRPC (Unix sockets), allocates
//! KV-cache blocks, detokenizes incrementally, applies stop sequences, and serves LoRAX's REST API,
//! Prometheus metrics and the public gRPC API. No GPU code lives here.
//!
//! Modules by concern: [`args`] (CLI), [`client`] (shard gRPC), [`validation`] and [`schema`] (requests),
//! [`infer`] (handle + queue entries), [`scheduler`] (the batching task), [`policy`] (batching rules),
//! [`adapters`] (adapter states, queues and shard calls), [`blocks`] (KV blocks), [`detokenize`],
//! [`stopping`], [`server`] (routes), [`errors`] (HTTP mapping), [`grpc`] (the public gRPC service),
//! [`metrics`] and [`metrics_json`] (`/metrics?format=json`), [`api_doc`] (OpenAPI document, Swagger UI,
//! the route table), [`cors`], [`telemetry`] (logs, OpenTelemetry traces), [`auth`] (optional API keys).

pub mod adapters;
pub mod api_doc;
pub mod args;
pub mod auth;
pub mod blocks;
pub mod chat;
pub mod client;
pub mod cors;
pub mod detokenize;
pub mod errors;
pub mod gguf_tokenizer;
pub mod grpc;
pub mod infer;
pub mod metrics;
pub mod metrics_json;
pub mod openai;
pub mod pieces;
pub mod policy;
pub mod scheduler;
pub mod schema;
pub mod server;
pub mod stopping;
pub mod telemetry;
pub mod template_worker;
pub mod validation;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use args::Args;

/// This router's version (`/info`, OpenAI `system_fingerprint`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
use tokenizers::Tokenizer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::adapters::{AdapterError, AdapterKey};
use crate::args::AdapterArgs;
use crate::blocks::blocks_for;
use crate::client::{ClientError, ShardClients};
use crate::infer::Infer;
use crate::policy::BatchingPolicy;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::schema::Info;
use crate::validation::{Validation, ValidationLimits};

/// Why the router could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Inconsistent flags or shard facts.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The tokenizer could not be loaded.
    #[error("cannot load tokenizer from {path}: {message}")]
    Tokenizer {
        /// The file tried.
        path: PathBuf,
        /// The loader's error.
        message: String,
    },
    /// A shard call failed during start-up.
    #[error("shard: {0}")]
    Shard(#[from] ClientError),
    /// A `--preloaded-adapter-ids` adapter could not be downloaded or loaded.
    #[error("cannot preload adapters (--preloaded-adapter-ids): {0}")]
    Preload(#[from] AdapterError),
    /// Binding or serving the HTTP port failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    /// A port could not be bound (in use, or not allowed).
    #[error("cannot listen on {host}:{port} ({flag}): {source}")]
    Bind {
        /// The flag that names the port.
        flag: &'static str,
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// Serving the gRPC port failed.
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// The router's two front ends over one shared state (one batching task, one validation, one set of
/// metrics), not yet bound to ports.
pub struct App {
    /// The REST API, `/health`, `/info` and `/metrics`.
    pub http: axum::Router,
    /// The public gRPC API (`lorax.generate.v1.LoraxService`).
    pub grpc: lorax_proto::generate::v1::lorax_service_server::LoraxServiceServer<grpc::GrpcService>,
}

/// Binds `--hostname:--port` (and `--grpc-port` when given), builds the application and serves until
/// SIGINT or SIGTERM; both servers then finish their calls in flight.
pub async fn run(args: Args) -> Result<(), RouterError> {
    let app = build(&args).await?;
    let hostname = args.server.hostname.as_str();
    let bind = |flag: &'static str, port: u16| async move {
        TcpListener::bind((hostname, port))
            .await
            .map_err(|source| RouterError::Bind {
                flag,
                host: hostname.to_string(),
                port,
                source,
            })
    };
    let listener = bind("--port", args.server.port).await?;
    let grpc_listener = match args.server.grpc_port {
        Some(port) => Some(bind("--grpc-port", port).await?),
        None => None,
    };
    // Dropping the sender (on a signal) tells both servers to stop.
    let (stop, stopped) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        shutdown_signal().await;
        drop(stop);
    });
    let on_stop = move || {
        let mut stopped = stopped.clone();
        async move {
            // Err: the sender is gone, which is the signal (nothing is ever sent).
            let _ = stopped.changed().await;
        }
    };
    tracing::info!(address = %listener.local_addr()?, "router ready");
    // TCP_NODELAY on every connection: a streamed token is a small write after the headers, and with
    // Nagle's algorithm it waits for the client's delayed ACK (40 ms on Linux). Measured before this:
    // every time to first token took 44 ms, even on the tiny embedded model.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY could not be set on a connection: {e}");
        }
    });
    let http = async {
        axum::serve(listener, app.http)
            .with_graceful_shutdown(on_stop())
            .await
            .map_err(RouterError::from)
    };
    match grpc_listener {
        Some(grpc_listener) => {
            tracing::info!(address = %grpc_listener.local_addr()?, "grpc ready");
            let grpc = async {
                grpc::serve(app.grpc, grpc_listener, on_stop())
                    .await
                    .map_err(RouterError::from)
            };
            // Either server failing stops the router (the launcher then stops the deployment).
            tokio::try_join!(http, grpc)?;
        }
        None => http.await?,
    }
    Ok(())
}

/// Resolves when the process gets SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// Loads `tokenizer.json` from `path` (a directory, or the file itself; or the tokenizer in a `.gguf`
/// file's metadata), with truncation and padding off (the router truncates itself).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, RouterError> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let error = |message: String| RouterError::Tokenizer {
        path: file.clone(),
        message,
    };
    let mut tokenizer = if lorax_gguf::is_gguf_file(&file) {
        let g = lorax_gguf::GgufFile::open(&file).map_err(|e| error(e.to_string()))?;
        gguf_tokenizer::tokenizer(&g).map_err(error)?
    } else {
        Tokenizer::from_file(&file).map_err(|e| error(e.to_string()))?
    };
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| RouterError::Tokenizer {
        path: file,
        message: e.to_string(),
    })?;
    Ok(tokenizer)
}

/// [`build`]'s HTTP application alone.
pub async fn build_app(args: &Args) -> Result<axum::Router, RouterError> {
    Ok(build(args).await?.http)
}

/// Connects to the shards, checks the configuration against them, warms them up, starts the batching
/// task and returns the HTTP and gRPC applications (not yet bound to ports).
pub async fn build(args: &Args) -> Result<App, RouterError> {
    let limits = &args.limits;
    let batching = &args.batching;
    if limits.max_input_length >= limits.max_total_tokens {
        return Err(RouterError::Config(format!(
            "--max-input-length ({}) must be < --max-total-tokens ({})",
            limits.max_input_length, limits.max_total_tokens
        )));
    }
    if batching.max_batch_prefill_tokens < limits.max_input_length {
        return Err(RouterError::Config(format!(
            "--max-batch-prefill-tokens ({}) must be >= --max-input-length ({})",
            batching.max_batch_prefill_tokens, limits.max_input_length
        )));
    }
    if args.server.max_concurrent_requests == 0 {
        return Err(RouterError::Config("--max-concurrent-requests must be > 0".into()));
    }
    if !(batching.waiting_served_ratio >= 0.0 && batching.waiting_served_ratio.is_finite()) {
        return Err(RouterError::Config(
            "--waiting-served-ratio must be a finite number >= 0".into(),
        ));
    }
    let adapter_cycle_time = Duration::try_from_secs_f64(args.adapters.adapter_cycle_time_s)
        .map_err(|_| RouterError::Config("--adapter-cycle-time-s must be a finite number >= 0".into()))?;
    let preloaded = preloaded_adapters(&args.adapters)?;
    let cors = cors::layer(&args.cors).map_err(RouterError::Config)?;
    let api_keys = auth::ApiKeys::from_flags(args.auth.api_key.as_ref(), args.auth.api_key_file.as_deref())
        .map_err(RouterError::Config)?;

    let tokenizer = Arc::new(load_tokenizer(&args.model.tokenizer_path)?);
    let clients = ShardClients::connect(&args.model.master_shard_uds_path).await?;
    let shard = clients.info().await?;
    if shard.block_size == 0 {
        return Err(RouterError::Config("the shard reports a KV block size of 0".into()));
    }
    // Positions past the model's would be ones it was never trained on: every token of a long request
    // would quietly be garbage.
    if shard.max_position_embeddings > 0 && limits.max_total_tokens > shard.max_position_embeddings {
        return Err(RouterError::Config(format!(
            "--max-total-tokens ({}) exceeds the positions the model serves (max_position_embeddings, times a \
             linear rope scaling's factor: {}): lower it (and --max-input-length) to at most that",
            limits.max_total_tokens, shard.max_position_embeddings
        )));
    }
    let capacity = shard.num_blocks.saturating_mul(shard.block_size);
    let max_batch_total_tokens = match batching.max_batch_total_tokens {
        Some(requested) if requested > capacity => {
            tracing::warn!(
                requested,
                capacity,
                "--max-batch-total-tokens exceeds the shard's KV cache; using the cache capacity"
            );
            capacity
        }
        Some(requested) => requested,
        None => capacity,
    };
    let total_blocks = max_batch_total_tokens / shard.block_size;
    let largest_request = blocks_for(limits.max_total_tokens, shard.block_size);
    if largest_request > total_blocks {
        return Err(RouterError::Config(format!(
            "--max-total-tokens ({}) needs {largest_request} KV blocks of {} tokens but only {total_blocks} are \
             available (--max-batch-total-tokens {max_batch_total_tokens}, shard cache {} blocks)",
            limits.max_total_tokens, shard.block_size, shard.num_blocks
        )));
    }

    clients.clear_cache().await?;
    // The largest forward pass the scheduler sends: whole prompts (up to --max-batch-prefill-tokens) when
    // nothing is decoding, and with mixed steps, under a backlog, those plus one decode row per running
    // request.
    let rows = u32::try_from(args.server.max_concurrent_requests).unwrap_or(u32::MAX);
    let largest_step = if batching.max_batch_prefill_chunk_tokens > 0 {
        batching.max_batch_prefill_tokens.saturating_add(rows)
    } else {
        batching.max_batch_prefill_tokens
    };
    let warmed = clients.warmup(largest_step, limits.max_total_tokens, rows).await?;
    tracing::info!(
        model = %shard.model_id,
        device = %shard.device,
        dtype = %shard.dtype,
        shards = clients.len(),
        block_size = shard.block_size,
        total_blocks,
        warmup_prefill_tokens = warmed,
        "shards ready"
    );
    if !preloaded.is_empty() && !shard.supports_adapters {
        return Err(RouterError::Config(
            "--preloaded-adapter-ids was given but the shards do not support adapters".into(),
        ));
    }
    let preloaded = adapters::tasks::preload(&clients, &preloaded).await?;

    let metrics = metrics::install(limits.max_total_tokens);
    let (entries_tx, entries_rx) = mpsc::unbounded_channel();
    let policy = BatchingPolicy {
        max_batch_prefill_tokens: batching.max_batch_prefill_tokens,
        max_waiting_tokens: batching.max_waiting_tokens,
        waiting_served_ratio: batching.waiting_served_ratio,
        block_size: shard.block_size,
        max_batch_prefill_chunk_tokens: batching.max_batch_prefill_chunk_tokens,
    };
    let catalog = adapters::catalog::AdapterCatalog::default();
    let chat_template = if lorax_gguf::is_gguf_file(&args.model.tokenizer_path) {
        let g =
            lorax_gguf::GgufFile::open(&args.model.tokenizer_path).map_err(|e| RouterError::Config(e.to_string()))?;
        match gguf_tokenizer::tokenizer_config(&g) {
            Some(config) => chat::ChatTemplate::from_tokenizer_config(&config),
            None => Ok(None),
        }
    } else {
        chat::ChatTemplate::from_dir(&args.model.tokenizer_path)
    }
    .map_err(|e| RouterError::Config(format!("the model's chat template cannot be used: {e}")))?;
    if chat_template.is_none() {
        tracing::info!("the model has no chat template: /v1/chat/completions will answer 422");
    }
    let validation = Validation::new(
        tokenizer,
        args.server.validation_workers,
        ValidationLimits {
            max_input_length: limits.max_input_length,
            max_total_tokens: limits.max_total_tokens,
            max_stop_sequences: limits.max_stop_sequences,
            max_new_tokens_default: limits.max_new_tokens_default,
            default_adapter_source: args.adapters.default_adapter_source,
            adapters_supported: shard.supports_adapters,
            vocab_size: shard.vocab_size,
            base_model_id: args.model.model_id.clone(),
        },
    );
    let scheduler = Scheduler::new(
        clients.clone(),
        validation.token_decoder(),
        SchedulerConfig {
            policy,
            eos_token_ids: shard.eos_token_ids.clone(),
            total_blocks,
            max_active_adapters: args.adapters.max_active_adapters,
            adapter_cycle_time,
            preloaded_adapters: preloaded,
            catalog: catalog.clone(),
        },
        entries_rx,
    );
    tokio::spawn(scheduler.run());

    let info = Info {
        model_id: args.model.model_id.clone(),
        model_sha: None,
        model_dtype: shard.dtype.clone(),
        model_device_type: device_type(&shard.device).to_string(),
        model_pipeline_tag: None,
        architecture: shard.architecture.clone(),
        num_shards: u32::try_from(clients.len()).unwrap_or(u32::MAX),
        supports_adapters: shard.supports_adapters,
        max_active_adapters: args.adapters.max_active_adapters,
        max_concurrent_requests: args.server.max_concurrent_requests,
        max_best_of: 1,
        max_stop_sequences: limits.max_stop_sequences,
        max_input_length: limits.max_input_length,
        max_total_tokens: limits.max_total_tokens,
        waiting_served_ratio: batching.waiting_served_ratio,
        max_batch_total_tokens: total_blocks * shard.block_size,
        max_batch_prefill_tokens: batching.max_batch_prefill_tokens,
        max_waiting_tokens: batching.max_waiting_tokens,
        max_batch_prefill_chunk_tokens: batching.max_batch_prefill_chunk_tokens,
        max_client_batch_size: args.server.max_client_batch_size,
        validation_workers: args.server.validation_workers,
        block_size: shard.block_size,
        num_blocks: shard.num_blocks,
        eos_token_ids: shard.eos_token_ids.clone(),
        version: env!("CARGO_PKG_VERSION"),
        sha: option_env!("LORAX_GIT_SHA"),
        docker_label: option_env!("LORAX_DOCKER_LABEL"),
        request_logger_url: None,
    };
    let state = server::AppState {
        catalog,
        adapter_templates: adapters::templates::AdapterTemplates::default(),
        chat_template,
        renderer: args.renderer.clone(),
        infer: Infer::new(entries_tx, args.server.max_concurrent_requests),
        validation,
        clients,
        info: Arc::new(info),
        metrics,
    };
    let mut http = server::router(state.clone(), args.server.body_limit_bytes);
    if let Some(keys) = api_keys.clone() {
        tracing::info!(
            keys = keys.len(),
            "API keys required (except /health, /metrics, /docs, gRPC Health)"
        );
        // Inside CORS, so browsers' preflight requests (which carry no key) are answered.
        http = http.layer(axum::middleware::from_fn_with_state(keys, auth::guard));
    }
    Ok(App {
        grpc: grpc::service(state, args.server.body_limit_bytes, api_keys),
        http: match cors {
            Some(cors) => http.layer(cors),
            None => http,
        },
    })
}

/// The adapters of `--preloaded-adapter-ids` (blank entries and repeats left out), checked against
/// `--max-active-adapters`.
fn preloaded_adapters(args: &AdapterArgs) -> Result<Vec<AdapterKey>, RouterError> {
    let source = args.preloaded_adapter_source.unwrap_or(args.default_adapter_source);
    let mut adapters: Vec<AdapterKey> = Vec::new();
    for id in args
        .preloaded_adapter_ids
        .iter()
        .map(|id| id.trim())
        .filter(|id| !id.is_empty())
    {
        let adapter = AdapterKey::new(source, id);
        if !adapters.contains(&adapter) {
            adapters.push(adapter);
        }
    }
    if adapters.len() > args.max_active_adapters {
        return Err(RouterError::Config(format!(
            "--preloaded-adapter-ids names {} adapters but --max-active-adapters is {}",
            adapters.len(),
            args.max_active_adapters
        )));
    }
    Ok(adapters)
}

/// "cuda" or "cpu" from the shard's device description ("cuda:0 NVIDIA H200", "cpu (2 threads)").
fn device_type(device: &str) -> &str {
    device.split([':', ' ']).next().unwrap_or(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preloaded_adapter_list() {
        use crate::adapters::AdapterSource;
        use clap::Parser;
        let args = |extra: &[&str]| {
            let base = [
                "r",
                "--master-shard-uds-path",
                "s",
                "--tokenizer-path",
                "t",
                "--model-id",
                "m",
            ];
            Args::try_parse_from(base.iter().chain(extra)).expect("flags").adapters
        };
        let list = preloaded_adapters(&args(&["--preloaded-adapter-ids", "org/a, org/b,,org/a"])).expect("valid");
        assert_eq!(
            list,
            [
                AdapterKey::new(AdapterSource::Hub, "org/a"),
                AdapterKey::new(AdapterSource::Hub, "org/b")
            ]
        );
        let list = preloaded_adapters(&args(&[
            "--preloaded-adapter-ids",
            "/data/a",
            "--default-adapter-source",
            "local",
        ]))
        .expect("valid");
        assert_eq!(list, [AdapterKey::new(AdapterSource::Local, "/data/a")]);
        let error = preloaded_adapters(&args(&["--preloaded-adapter-ids", "a,b", "--max-active-adapters", "1"]))
            .expect_err("too many");
        assert!(error.to_string().contains("--max-active-adapters is 1"), "{error}");
    }

    #[test]
    fn device_types() {
        assert_eq!(device_type("cuda:0 NVIDIA H200"), "cuda");
        assert_eq!(device_type("cpu (2 threads)"), "cpu");
        assert_eq!(device_type("metal:0"), "metal");
    }

    #[test]
    fn tokenizer_from_dir_or_file() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tokenizer"));
        assert!(load_tokenizer(dir).is_ok());
        assert!(load_tokenizer(&dir.join("tokenizer.json")).is_ok());
        assert!(matches!(
            load_tokenizer(&dir.join("missing")),
            Err(RouterError::Tokenizer { .. })
        ));
    }
}
