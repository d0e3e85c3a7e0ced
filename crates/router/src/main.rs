//! `lorax-router`: parses the flags, sets up logging (`--json-output` for JSON lines; `RUST_LOG` filters,
//! default `info`) and runs the router until SIGINT/SIGTERM.

use clap::Parser;
use lorax_router::Args;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if args.server.json_output {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    match lorax_router::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
