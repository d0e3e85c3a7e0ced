//! The launcher forwards the router's CORS and trace-export flags: a preflight from an allowed origin is
//! answered with the configured rules, and the router connects to the `--otlp-endpoint` it was given.

mod common;

use std::time::Duration;

use common::start;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_and_otlp_flags_reach_the_router() {
    // Stands in for an OpenTelemetry collector: it only has to see the router connect.
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", collector.local_addr().expect("addr"));
    let server = start(&[
        "--cors-allow-origin",
        "https://app.example",
        "--cors-max-age",
        "60",
        "--otlp-endpoint",
        &endpoint,
    ])
    .await;
    let client = reqwest::Client::new();
    let preflight = client
        .request(reqwest::Method::OPTIONS, format!("{}/generate", server.base))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), 200);
    let header = |name: &str| {
        preflight
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_string())
    };
    assert_eq!(
        header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(header("access-control-max-age").as_deref(), Some("60"));

    let response = client
        .post(format!("{}/generate", server.base))
        .json(&serde_json::json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
        .send()
        .await
        .expect("generate");
    assert_eq!(response.status(), 200);
    // The batch exporter sends within its 5 s schedule; the deadline leaves room for a slow machine.
    let accepted = tokio::time::timeout(Duration::from_secs(60), collector.accept()).await;
    assert!(
        matches!(accepted, Ok(Ok(_))),
        "the router never connected to --otlp-endpoint {endpoint}"
    );
}

/// A `--grpc-port` that another process holds stops the deployment with a message that names the flag and
/// the port (it used to read "http server: Address already in use").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_grpc_port_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lorax-launcher"))
            .args(["--hostname", "127.0.0.1", "--port", &common::free_port().to_string()])
            .args(["--grpc-port", &port.to_string()])
            .arg(format!("--shard-uds-dir={}", tmp.path().join("uds").display()))
            .arg(format!("--embedded-dir={}", tmp.path().display()))
            .args(["--max-input-length", "256", "--max-total-tokens", "512"])
            .args(["--max-batch-prefill-tokens", "512", "--num-blocks", "256"])
            .output(),
    )
    .await
    .expect("the launcher stopped")
    .expect("ran");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port} (--grpc-port)")),
        "{log}"
    );
    drop(taken);
}
