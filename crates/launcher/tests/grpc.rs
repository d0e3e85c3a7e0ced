//! The public gRPC API of a real deployment (launcher, shard and router processes on the embedded
//! model), spoken to with the `lorax-client` crate: unary and streamed generations give the
//! transformers golden tokens and the REST answer, and SIGTERM still stops everything cleanly with the
//! gRPC server running.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, golden, start_with_env};
use futures::StreamExt;
use lorax_client::{Client, FinishReason, GrpcClient, Parameters};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_generations_equal_the_golden_tokens_and_rest() {
    let g = golden();
    let grpc_port = free_port();
    let port = grpc_port.to_string();
    let mut server = start_with_env(&["--grpc-port", &port], &[]).await;
    let rest = Client::new(server.base.clone()).expect("REST client");
    let mut grpc = GrpcClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .expect("the router serves gRPC once healthy");
    grpc.health().await.expect("healthy");

    let parameters = Parameters {
        max_new_tokens: Some(32),
        details: Some(true),
        ignore_eos_token: Some(true),
        ..Parameters::default()
    };
    for (prompt, want) in g.prompts.iter().zip(&g.greedy) {
        let answer = grpc.generate(prompt, &parameters).await.expect("gRPC generate");
        let details = answer.details.as_ref().expect("details");
        let ids: Vec<u32> = details.tokens.iter().map(|t| t.id).collect();
        assert_eq!(&ids, want, "{prompt:?} over gRPC");
        assert_eq!(details.finish_reason, FinishReason::Length);
        assert_eq!(
            answer,
            rest.generate(prompt, &parameters).await.expect("REST generate"),
            "{prompt:?}: gRPC and REST answers"
        );

        let stream = grpc.generate_stream(prompt, &parameters).await.expect("gRPC stream");
        let messages: Vec<_> = stream.map(|m| m.expect("stream message")).collect().await;
        let ids: Vec<u32> = messages.iter().map(|m| m.token.id).collect();
        assert_eq!(&ids, want, "{prompt:?} streamed over gRPC");
        let last = messages.last().expect("messages");
        assert_eq!(last.generated_text.as_deref(), Some(answer.generated_text.as_str()));
    }

    // SIGTERM: the router stops both servers, and the launcher exits with success.
    let pid = i32::try_from(server.child.id()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the launcher did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "launcher exit after SIGTERM: {status}");
}
