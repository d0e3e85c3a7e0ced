//! `lorax-router`: parses the flags, sets up logging and trace export ([`lorax_router::telemetry`]:
//! `--json-output` for JSON lines, `RUST_LOG` filters (default `info`), `--otlp-endpoint` exports traces)
//! and runs the router until SIGINT/SIGTERM. Chat templates render in worker processes of this same binary
//! (`lorax-router --chat-template-worker`, started by the router: [`lorax_router::template_worker`]).

use std::process::ExitCode;

use clap::Parser;
use lorax_router::template_worker::{self, Renderer};
use lorax_router::Args;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == template_worker::WORKER_FLAG)
    {
        return template_worker::worker_main();
    }
    let mut args = Args::parse();
    match std::env::current_exe() {
        Ok(exe) => args.renderer = Renderer::workers(exe, args.server.validation_workers),
        Err(e) => {
            eprintln!("lorax-router: cannot find its own binary for the chat template workers: {e}");
            return ExitCode::FAILURE;
        }
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(serve(args)),
        Err(e) => {
            eprintln!("lorax-router: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> ExitCode {
    let telemetry = match lorax_router::telemetry::init(args.server.json_output, &args.telemetry) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("lorax-router: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match lorax_router::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
