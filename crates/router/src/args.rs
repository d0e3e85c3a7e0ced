//! Command-line configuration of the router. Every flag is `--long` and can also be set through the
//! environment variable of the same name in upper snake case (`--max-input-length` = `MAX_INPUT_LENGTH`).
//! The launcher passes these flags; their names are part of the launcher ↔ router contract.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser};

use crate::adapters::AdapterSource;
use crate::auth::ApiKey;

/// The router: HTTP API, validation, tokenization, queueing, continuous batching and KV block allocation
/// in front of the shard processes.
#[derive(Parser, Debug, Clone)]
#[command(name = "lorax-router", version, about)]
pub struct Args {
    /// HTTP server settings.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Where the model, the tokenizer and the shards are.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Per-request limits enforced by validation.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Continuous-batching policy.
    #[command(flatten)]
    pub batching: BatchingArgs,
    /// LoRA adapter scheduling.
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Cross-origin (CORS) rules for browser clients.
    #[command(flatten)]
    pub cors: CorsArgs,
    /// Trace export.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// API keys guarding the routes.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Where chat templates render (not a flag): `lorax-router` renders in worker processes of bounded
    /// memory (`template_worker`); a router built in-process (tests) renders on its own threads unless
    /// given workers.
    #[arg(skip)]
    pub renderer: crate::template_worker::Renderer,
}

/// HTTP server settings.
#[derive(ClapArgs, Debug, Clone)]
pub struct ServerArgs {
    /// TCP port of the HTTP server.
    #[arg(long, env, default_value_t = 3000)]
    pub port: u16,
    /// Address the HTTP server (and the gRPC server) binds to.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,
    /// TCP port of the public gRPC API (`lorax.generate.v1.LoraxService`), served next to HTTP on
    /// `--hostname`. Unset: no gRPC server. 0: a free port, logged at startup.
    #[arg(long, env)]
    pub grpc_port: Option<u16>,
    /// Requests in flight (queued or generating) beyond this many are refused at once with 429.
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Largest number of prompts one /v1/completions request may hold (a list of prompts); at least 1.
    /// Reported by /info.
    #[arg(long, env, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_client_batch_size: usize,
    /// Largest accepted request body in bytes; larger bodies get 413.
    #[arg(long, env, default_value_t = 2 * 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Number of requests tokenized concurrently (on blocking threads); at least 1.
    #[arg(long, env, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub validation_workers: usize,
    /// Log as JSON lines instead of human-readable text (the variable takes true/false, 1/0, yes/no).
    #[arg(long, env, value_parser = clap::builder::BoolishValueParser::new())]
    pub json_output: bool,
}

/// Where the model, the tokenizer and the shards are.
#[derive(ClapArgs, Debug, Clone)]
pub struct ModelArgs {
    /// Unix socket of shard rank 0; the router asks it (ServiceDiscovery) for every shard's socket and
    /// connects to all of them.
    #[arg(long, env)]
    pub master_shard_uds_path: PathBuf,
    /// Directory containing `tokenizer.json` (or the file itself).
    #[arg(long, env)]
    pub tokenizer_path: PathBuf,
    /// Model id shown by /info.
    #[arg(long, env)]
    pub model_id: String,
}

/// Per-request limits enforced by validation.
#[derive(ClapArgs, Debug, Clone)]
pub struct LimitArgs {
    /// Longest prompt in tokens (after `truncate`).
    #[arg(long, env, default_value_t = 1024)]
    pub max_input_length: u32,
    /// Longest sequence in tokens: prompt + `max_new_tokens`.
    #[arg(long, env, default_value_t = 2048)]
    pub max_total_tokens: u32,
    /// Most stop sequences one request may give.
    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// `max_new_tokens` of a request that does not set it is min(this, max_total_tokens - prompt tokens).
    #[arg(long, env, default_value_t = 100)]
    pub max_new_tokens_default: u32,
}

/// Continuous-batching policy.
#[derive(ClapArgs, Debug, Clone)]
pub struct BatchingArgs {
    /// Most prompt tokens prefilled in one Prefill call; with mixed steps, most prompt tokens of admitted
    /// requests whose prompts are still running (requests wait in the queue beyond it).
    #[arg(long, env, default_value_t = 4096)]
    pub max_batch_prefill_tokens: u32,
    /// Most prompt tokens run in one step while requests decode. While requests run, each step decodes
    /// them and runs up to this many prompt tokens of new requests in the same forward pass (a mixed
    /// step); longer prompts run in chunks over several steps (chunked prefill), so a new request delays
    /// the running streams by one chunk, not a whole prompt. While at least `--max-batch-prefill-tokens`
    /// more prompt tokens wait in the queue behind the admitted prompts (a backlog), a step runs all
    /// admitted prompts instead. 0 turns both off: new requests are prefilled whole in separate Prefill
    /// calls that pause decoding (TGI's scheduling, with `--waiting-served-ratio` and
    /// `--max-waiting-tokens`).
    #[arg(long, env, default_value_t = 2048)]
    pub max_batch_prefill_chunk_tokens: u32,
    /// Most tokens (prompt + max_new_tokens, rounded up to whole KV blocks) the running batch may hold.
    /// Defaults to, and is capped at, the shard's KV cache capacity (num_blocks * block_size).
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<u32>,
    /// Decode steps after which waiting requests are prefilled even if `--waiting-served-ratio` says wait
    /// (without mixed steps only).
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: u32,
    /// While a batch runs, new requests are prefilled only when at least this ratio times the running
    /// requests can join at once (or `--max-waiting-tokens` steps have passed); without mixed steps only.
    #[arg(long, env, default_value_t = 1.2)]
    pub waiting_served_ratio: f32,
}

/// LoRA adapter scheduling: which adapters sit on the shards' device tier, and for how long.
#[derive(ClapArgs, Debug, Clone)]
pub struct AdapterArgs {
    /// Most adapters loaded on the shards' device at once (counting those being loaded or offloaded).
    /// When requests wait for an adapter and no slot is free, an idle adapter (no running or queued
    /// request) is offloaded, least recently used first. At least 1.
    #[arg(long, env, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_active_adapters: usize,
    /// Seconds an adapter may stay loaded while requests for other adapters wait for a slot. Past it the
    /// adapter takes no new prefills, and it is offloaded once its running requests have finished, so
    /// busy adapters take turns instead of starving the others.
    #[arg(long, env, default_value_t = 2.0)]
    pub adapter_cycle_time_s: f64,
    /// Adapters downloaded and loaded at startup, comma-separated; the router does not start if one of
    /// them cannot be loaded. They count against `--max-active-adapters`.
    #[arg(long, env, value_delimiter = ',')]
    pub preloaded_adapter_ids: Vec<String>,
    /// Source of `--preloaded-adapter-ids` (default: `--default-adapter-source`).
    #[arg(long, env, value_enum)]
    pub preloaded_adapter_source: Option<AdapterSource>,
    /// Source of a request's adapter when the request gives no `adapter_source`.
    #[arg(long, env, value_enum, default_value_t = AdapterSource::Hub)]
    pub default_adapter_source: AdapterSource,
}

/// Cross-origin resource sharing (LoRAX's flag names): which browser origins may call the API. Off
/// unless `--cors-allow-origin` is given: the router then sends no CORS headers, so browsers refuse
/// cross-origin calls (LoRAX allows every origin by default; `--cors-allow-origin '*'` does that here).
/// List flags take comma-separated values and may be repeated.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct CorsArgs {
    /// Origins allowed to call the API from a browser (`https://app.example.com`), or `*` for any.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Methods allowed in cross-origin calls, or `*` (default: GET, POST).
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_method: Vec<String>,
    /// Request headers allowed in cross-origin calls, or `*` (default: content-type, authorization,
    /// x-api-key).
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_header: Vec<String>,
    /// Response headers a browser page may read besides the CORS-safelisted ones (e.g. x-generated-tokens),
    /// or `*` (default: none).
    #[arg(long, env, value_delimiter = ',')]
    pub cors_expose_header: Vec<String>,
    /// Allow credentials (cookies, HTTP authentication) in cross-origin calls; `*` is then refused for
    /// origins, methods and headers. `--cors-allow-credentials` alone means true.
    #[arg(long, env, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub cors_allow_credentials: bool,
    /// Seconds a browser may cache a preflight answer (`Access-Control-Max-Age`); absent: not sent.
    #[arg(long, env)]
    pub cors_max_age: Option<u64>,
}

/// Optional API keys. With at least one, every route except `/health`, `/metrics` and the API
/// documentation (`/docs`, `/api-doc/openapi.json`) needs a key, sent as `Authorization: Bearer <key>` or
/// `X-API-Key: <key>`; others get 401 (`unauthorized`). See docs/reliability.md.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct AuthArgs {
    /// An API key clients must send. Prefer the `API_KEY` variable or `--api-key-file`: a command-line
    /// value is visible to every local user in the process list.
    #[arg(long, env, hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// A file of API keys, one per line (blank lines and lines starting with `#` are skipped); any of
    /// them is accepted (key rotation). Combined with `--api-key`.
    #[arg(long, env)]
    pub api_key_file: Option<PathBuf>,
}

/// Trace export. Logs always go to stderr (`--json-output` for JSON lines, `RUST_LOG` filters them); with
/// `--otlp-endpoint` the same spans are also exported as OpenTelemetry traces.
#[derive(ClapArgs, Debug, Clone)]
pub struct TelemetryArgs {
    /// OpenTelemetry collector receiving traces over OTLP/gRPC, e.g. `http://127.0.0.1:4317`. No export
    /// when absent. Incoming W3C `traceparent` headers make the request's spans part of the caller's trace.
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported traces.
    #[arg(long, env, default_value = "lorax-router")]
    pub otlp_service_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: [&str; 7] = [
        "lorax-router",
        "--master-shard-uds-path",
        "/tmp/s0",
        "--tokenizer-path",
        "/tmp/tok",
        "--model-id",
        "m",
    ];

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(REQUIRED.iter().chain(extra))
    }

    #[test]
    fn defaults_and_names() {
        let args = parse(&[]).expect("parse");
        assert_eq!(args.server.port, 3000);
        assert_eq!(args.server.hostname, "0.0.0.0");
        assert_eq!(args.server.grpc_port, None, "gRPC is off unless asked for");
        assert_eq!(
            parse(&["--grpc-port", "50051"]).expect("parse").server.grpc_port,
            Some(50051)
        );
        assert_eq!(args.server.max_concurrent_requests, 128);
        assert_eq!(args.server.max_client_batch_size, 4);
        assert_eq!(args.server.body_limit_bytes, 2 * 1024 * 1024);
        assert!(!args.server.json_output);
        assert_eq!(args.limits.max_input_length, 1024);
        assert_eq!(args.limits.max_total_tokens, 2048);
        assert_eq!(args.limits.max_stop_sequences, 4);
        assert_eq!(args.limits.max_new_tokens_default, 100);
        assert_eq!(args.batching.max_batch_prefill_tokens, 4096);
        assert_eq!(args.batching.max_batch_total_tokens, None);
        assert_eq!(args.batching.max_batch_prefill_chunk_tokens, 2048);
        assert_eq!(args.batching.max_waiting_tokens, 20);
        assert!((args.batching.waiting_served_ratio - 1.2).abs() < 1e-6);
        assert_eq!(args.adapters.max_active_adapters, 128);
        assert!((args.adapters.adapter_cycle_time_s - 2.0).abs() < 1e-9);
        assert!(args.adapters.preloaded_adapter_ids.is_empty());
        assert_eq!(args.adapters.preloaded_adapter_source, None);
        assert_eq!(args.adapters.default_adapter_source, AdapterSource::Hub);
        assert!(args.cors.cors_allow_origin.is_empty());
        assert!(!args.cors.cors_allow_credentials);
        assert_eq!(args.cors.cors_max_age, None);
        assert_eq!(args.telemetry.otlp_endpoint, None);
        assert_eq!(args.telemetry.otlp_service_name, "lorax-router");
        assert_eq!(args.auth.api_key, None, "no key needed unless one is given");
        assert_eq!(args.auth.api_key_file, None);
    }

    #[test]
    fn api_key_flags() {
        let args = parse(&["--api-key", "k-1", "--api-key-file", "/etc/lorax/keys"]).expect("parse");
        assert_eq!(args.auth.api_key, Some("k-1".parse().expect("key")));
        assert_eq!(args.auth.api_key_file, Some(PathBuf::from("/etc/lorax/keys")));
        assert!(!format!("{args:?}").contains("k-1"), "the key is redacted in Debug");
        assert!(parse(&["--api-key", "two words"]).is_err());
    }

    #[test]
    fn cors_and_telemetry_flags() {
        let args = parse(&[
            "--cors-allow-origin",
            "https://a.example,https://b.example",
            "--cors-allow-origin",
            "https://c.example",
            "--cors-allow-method",
            "GET,POST,OPTIONS",
            "--cors-allow-header",
            "content-type",
            "--cors-expose-header",
            "x-generated-tokens",
            "--cors-allow-credentials",
            "--cors-max-age",
            "600",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-service-name",
            "svc",
        ])
        .expect("parse");
        assert_eq!(
            args.cors.cors_allow_origin,
            ["https://a.example", "https://b.example", "https://c.example"]
        );
        assert_eq!(args.cors.cors_allow_method, ["GET", "POST", "OPTIONS"]);
        assert_eq!(args.cors.cors_allow_header, ["content-type"]);
        assert_eq!(args.cors.cors_expose_header, ["x-generated-tokens"]);
        assert!(args.cors.cors_allow_credentials, "the bare flag means true");
        assert_eq!(args.cors.cors_max_age, Some(600));
        assert_eq!(args.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(args.telemetry.otlp_service_name, "svc");
        // LoRAX's form with an explicit value.
        let args = parse(&["--cors-allow-credentials", "false"]).expect("parse");
        assert!(!args.cors.cors_allow_credentials);
        let args = parse(&["--cors-allow-credentials=true"]).expect("parse");
        assert!(args.cors.cors_allow_credentials);
    }

    #[test]
    fn adapter_flags() {
        let args = parse(&[
            "--max-active-adapters",
            "3",
            "--adapter-cycle-time-s",
            "0.5",
            "--preloaded-adapter-ids",
            "org/a,org/b",
            "--preloaded-adapter-ids",
            "org/c",
            "--preloaded-adapter-source",
            "local",
            "--default-adapter-source",
            "local",
        ])
        .expect("parse");
        assert_eq!(args.adapters.max_active_adapters, 3);
        assert!((args.adapters.adapter_cycle_time_s - 0.5).abs() < 1e-9);
        assert_eq!(args.adapters.preloaded_adapter_ids, ["org/a", "org/b", "org/c"]);
        assert_eq!(args.adapters.preloaded_adapter_source, Some(AdapterSource::Local));
        assert_eq!(args.adapters.default_adapter_source, AdapterSource::Local);

        assert!(parse(&["--max-active-adapters", "0"]).is_err(), "at least one slot");
        let error = parse(&["--default-adapter-source", "s3"]).expect_err("unknown source");
        assert!(error.to_string().contains("hub"), "{error}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
