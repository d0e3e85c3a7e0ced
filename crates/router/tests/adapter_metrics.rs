//! Adapter metrics and queue accounting: one download however many requests wait for it, the
//! per-adapter counters, the active-adapters gauge, failures by error_type, and cancelled requests
//! leaving an adapter's queue; then an OpenAI request of several choices counted once. Its own test binary
//! with a single test, so the process-wide metrics (and `lorax_queue_size` in particular) belong to this
//! router alone.

mod common;

use std::time::Duration;

use common::{assert_generated_by, Deployment, Setup};
use serde_json::json;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn one_download_and_adapter_metrics() {
    let d = Deployment::start(Setup::default()).await;

    // 1. Ten requests waiting for a new adapter cause exactly one download.
    d.hub.hold("org/x");
    let handles: Vec<_> = (0..10).map(|_| d.spawn_generate("org/x", 3)).collect();
    common::eventually("the ten requests are queued", DEADLINE, || async {
        d.metric("lorax_queue_size").await == Some(10.0)
    })
    .await;
    assert_eq!(d.hub.downloads("org/x"), 1);
    d.hub.release("org/x");
    for handle in handles {
        let (status, body) = handle.await.expect("request task");
        assert_eq!(status, 200, "{body}");
        assert_generated_by(&body, "org/x", 3);
    }
    assert_eq!(d.hub.downloads("org/x"), 1);
    let (status, _) = d.generate_with("", 2).await;
    assert_eq!(status, 200);

    // 2. Per-adapter counters, the gauge and the load time.
    for (name, value) in [
        ("lorax_active_adapters", 1.0),
        ("lorax_adapter_request_count{adapter=\"org/x\"}", 10.0),
        ("lorax_adapter_generated_tokens{adapter=\"org/x\"}", 30.0),
        ("lorax_adapter_request_count{adapter=\"__base__\"}", 1.0),
        ("lorax_adapter_generated_tokens{adapter=\"__base__\"}", 2.0),
        ("lorax_adapter_load_duration_count", 1.0),
        ("lorax_queue_size", 0.0),
    ] {
        assert_eq!(d.metric(name).await, Some(value), "{name}");
    }

    // 3. Failures are counted by error_type, and a failing id gets no per-adapter series.
    d.hub.fail("org/gone", Code::NotFound, "gone");
    let (status, _) = d.generate_with("org/gone", 2).await;
    assert_eq!(status, 404);
    assert_eq!(
        d.metric("lorax_adapter_load_failures{err=\"adapter_not_found\"}").await,
        Some(1.0)
    );
    let text = d.get("/metrics").await.text().await.expect("metrics");
    assert!(!text.contains("org/gone"), "{text}");

    // 4. A request whose client leaves while its adapter downloads leaves the queue, and the adapter,
    //    with nobody waiting for it, is not loaded.
    d.hub.hold("org/y");
    let gone = d
        .http
        .post(format!("{}/generate", d.base))
        .json(&json!({"inputs": "Hello", "parameters": {"adapter_id": "org/y"}}))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("the download is held");
    assert!(gone.is_timeout(), "{gone}");
    assert_eq!(d.hub.downloads("org/y"), 1);
    // Any activity turns the batching loop, which drops the cancelled request.
    common::eventually("the cancelled request left the queue", DEADLINE, || async {
        let (status, _) = d.generate_with("", 1).await;
        status == 200 && d.metric("lorax_queue_size").await == Some(0.0)
    })
    .await;
    d.hub.release("org/y");
    let (status, _) = d.generate_with("", 1).await;
    assert_eq!(status, 200);
    assert_eq!(d.shards[0].loaded(), ["org/x"], "org/y was not loaded for nobody");
    assert_eq!(d.metric("lorax_active_adapters").await, Some(1.0));

    // An OpenAI request of three choices is one request received and one answered, whole or streamed.
    let count = d.metric("lorax_request_count").await.unwrap_or(0.0);
    let success = d.metric("lorax_request_success").await.unwrap_or(0.0);
    let validated = d.metric("lorax_request_validation_duration_count").await.unwrap_or(0.0);
    for stream in [false, true] {
        let r = d
            .post(
                "/v1/completions",
                json!({"prompt": "Hello", "max_tokens": 2, "n": 3, "stream": stream}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let body = r.text().await.expect("body");
        assert!(body.contains("\"index\":2"), "three choices: {body}");
    }
    assert_eq!(d.metric("lorax_request_count").await, Some(count + 2.0));
    assert_eq!(d.metric("lorax_request_success").await, Some(success + 2.0));
    // Its validation time is recorded once, as a native request's is.
    assert_eq!(
        d.metric("lorax_request_validation_duration_count").await,
        Some(validated + 2.0)
    );
    d.assert_no_violations();
}
