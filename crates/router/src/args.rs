//! Command-line configuration of the router. Every flag is `--long` and can also be set through the
//! environment variable of the same name in upper snake case (`--max-input-length` = `MAX_INPUT_LENGTH`).
//! The launcher passes these flags; their names are part of the launcher ↔ router contract.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser};

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
}

/// HTTP server settings.
#[derive(ClapArgs, Debug, Clone)]
pub struct ServerArgs {
    /// TCP port of the HTTP server.
    #[arg(long, env, default_value_t = 3000)]
    pub port: u16,
    /// Address the HTTP server binds to.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,
    /// Requests in flight (queued or generating) beyond this many are refused at once with 429.
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Largest number of inputs a client may send in one batched request. Reported by /info; no endpoint
    /// takes batched inputs yet.
    #[arg(long, env, default_value_t = 4)]
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
    /// Most prompt tokens prefilled in one Prefill call.
    #[arg(long, env, default_value_t = 4096)]
    pub max_batch_prefill_tokens: u32,
    /// Most tokens (prompt + max_new_tokens, rounded up to whole KV blocks) the running batch may hold.
    /// Defaults to, and is capped at, the shard's KV cache capacity (num_blocks * block_size).
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<u32>,
    /// Decode steps after which waiting requests are prefilled even if `--waiting-served-ratio` says wait.
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: u32,
    /// While a batch runs, new requests are prefilled only when at least this ratio times the running
    /// requests can join at once (or `--max-waiting-tokens` steps have passed).
    #[arg(long, env, default_value_t = 1.2)]
    pub waiting_served_ratio: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_names() {
        let args = Args::try_parse_from([
            "lorax-router",
            "--master-shard-uds-path",
            "/tmp/s0",
            "--tokenizer-path",
            "/tmp/tok",
            "--model-id",
            "m",
        ])
        .expect("parse");
        assert_eq!(args.server.port, 3000);
        assert_eq!(args.server.hostname, "0.0.0.0");
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
        assert_eq!(args.batching.max_waiting_tokens, 20);
        assert!((args.batching.waiting_served_ratio - 1.2).abs() < 1e-6);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
