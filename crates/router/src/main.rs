//! `lorax-router`: parses the flags, sets up logging and trace export ([`lorax_router::telemetry`]:
//! `--json-output` for JSON lines, `RUST_LOG` filters (default `info`), `--otlp-endpoint` exports traces)
//! and runs the router until SIGINT/SIGTERM.

use clap::Parser;
use lorax_router::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let telemetry = match lorax_router::telemetry::init(args.server.json_output, &args.telemetry) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("lorax-router: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match lorax_router::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
