//! The adapter scheduler over real HTTP against fake shards that enforce the adapter contract: many
//! adapters through few device slots, failures confined to one adapter, slow downloads that block
//! nobody else, base and adapter requests in one Prefill, cycle time, preloading, tokens kept out of
//! logs and errors, and the adapter named in answers. Metrics are checked in `adapter_metrics.rs`.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_generated_by, error_of, Deployment, FakeHub, Setup, SseReader, HELLO_LAST};
use serde_json::{json, Value};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(20);

fn flags(flags: &[&str]) -> Vec<String> {
    flags.iter().map(ToString::to_string).collect()
}

/// A deployment of `shards` shards with 3 device slots, after 50 requests over 20 adapters, each
/// answered by its adapter.
async fn fifty_requests_over_twenty_adapters(shards: u32) -> Deployment {
    fifty_requests_on(Setup {
        shards,
        adapter_capacity: 3,
        flags: flags(&["--max-active-adapters", "3"]),
        ..Setup::default()
    })
    .await
}

/// A deployment of `setup`, after 50 requests over 20 adapters, each answered by its adapter.
async fn fifty_requests_on(setup: Setup) -> Deployment {
    let d = Deployment::start(setup).await;
    let requests = (0..50).map(|i| {
        let adapter = format!("org/adapter-{}", i % 20);
        let d = &d;
        async move {
            let (status, body) = d.generate_with(&adapter, 4).await;
            assert_eq!(status, 200, "{adapter}: {body}");
            assert_generated_by(&body, &adapter, 4);
        }
    });
    futures::future::join_all(requests).await;
    d
}

#[tokio::test]
async fn many_adapters_share_three_device_slots() {
    let d = fifty_requests_over_twenty_adapters(Setup::default().shards).await;

    for (rank, shard) in d.shards.iter().enumerate() {
        let most = shard.max_loaded.load(Ordering::SeqCst);
        assert!(most <= 3, "rank {rank} held {most} adapters at once");
        assert!(shard.loads.load(Ordering::SeqCst) >= 20, "every adapter was loaded");
        assert!(
            shard.offloads.load(Ordering::SeqCst) >= 17,
            "adapters were offloaded to make room"
        );
    }
    for i in 0..20 {
        assert_eq!(
            d.hub.downloads(&format!("org/adapter-{i}")),
            1,
            "reloads need no download"
        );
    }
    d.assert_no_violations();
}

/// With one shard, an adapter whose first request finds a slot free is loaded by its download (one shard
/// call, the upload beside the read); the others wait for slots and are loaded by LoadAdapter. Every
/// adapter is downloaded once, the device tier never holds more than its slots, and the fakes see no
/// breach of the contract (a download that loads on a full tier would be one).
#[tokio::test]
async fn one_shard_downloads_load_adapters_into_free_slots() {
    let d = fifty_requests_over_twenty_adapters(1).await;
    let shard = &d.shards[0];
    let (by_download, by_load) = (
        shard.download_loads.load(Ordering::SeqCst),
        shard.loads.load(Ordering::SeqCst),
    );
    assert!(
        by_download >= 3,
        "the first adapters' downloads loaded them: {by_download}"
    );
    assert!(
        by_download + by_load >= 20,
        "every adapter was loaded: {by_download} + {by_load}"
    );
    assert!(shard.max_loaded.load(Ordering::SeqCst) <= 3);
    for i in 0..20 {
        assert_eq!(d.hub.downloads(&format!("org/adapter-{i}")), 1);
    }
    d.assert_no_violations();
}

/// Shards whose device memory holds 3 adapters, behind 8 slots: loads beyond 3 are refused as out of
/// device memory, and the router makes room by offloading idle adapters instead of failing requests.
/// Every request is answered by its adapter, and the fakes see no breach of the contract.
#[tokio::test]
async fn loads_refused_for_device_memory_wait_for_room() {
    for shards in [1, 2] {
        let d = fifty_requests_on(Setup {
            shards,
            memory_capacity: 3,
            flags: flags(&["--max-active-adapters", "8"]),
            ..Setup::default()
        })
        .await;
        let refusals: usize = d.shards.iter().map(|s| s.memory_refusals.load(Ordering::SeqCst)).sum();
        assert!(
            refusals > 0,
            "{shards} shards: the device memory never ran out, nothing tested"
        );
        for shard in &d.shards {
            assert!(shard.max_loaded.load(Ordering::SeqCst) <= 3);
        }
        d.assert_no_violations();
    }
}

/// A device with no memory for any adapter: the first adapter is refused with nothing else loaded and
/// fails at once (424, "out of device memory"); an adapter as large then fails as soon as its download
/// says its size, without a load that would clear the device for nothing. The base model is served
/// throughout.
#[tokio::test]
async fn adapters_too_large_for_the_device_fail_without_clearing_it() {
    let d = Deployment::start(Setup {
        shards: 1,
        memory_capacity: 0,
        ..Setup::default()
    })
    .await;
    for adapter in ["org/big-1", "org/big-2"] {
        let (status, body) = d.generate_with(adapter, 4).await;
        assert_eq!(status, 424, "{adapter}: {body}");
        assert!(body.to_string().contains("out of device memory"), "{adapter}: {body}");
    }
    assert_eq!(
        d.shards[0].memory_refusals.load(Ordering::SeqCst),
        1,
        "big-1: its download-with-load; big-2: none"
    );
    let (status, body) = d.generate_with("", 4).await;
    assert_eq!(status, 200, "{body}");
    d.assert_no_violations();
}

#[tokio::test]
async fn a_failing_adapter_fails_only_its_requests_and_is_retried() {
    let hub = Arc::new(FakeHub::default());
    hub.fail("org/missing", Code::NotFound, "repository org/missing does not exist");
    let d = Deployment::start(Setup {
        hub,
        step_delay: Duration::from_millis(2),
        ..Setup::default()
    })
    .await;
    let adapters = [
        "org/missing",
        "",
        "org/fine",
        "org/missing",
        "",
        "org/fine",
        "org/missing",
    ];
    let handles: Vec<_> = adapters.iter().map(|a| d.spawn_generate(a, 5)).collect();
    for (adapter, handle) in adapters.iter().zip(handles) {
        let (status, body) = handle.await.expect("request task");
        if *adapter == "org/missing" {
            assert_eq!(status, 404, "{body}");
            assert_eq!(body["error_type"], "adapter_not_found");
            let message = body["error"].as_str().expect("message");
            assert!(message.contains("repository org/missing does not exist"), "{message}");
            assert!(message.contains("`org/missing` (hub) was not found"), "{message}");
        } else {
            assert_eq!(status, 200, "{adapter:?}: {body}");
            assert_generated_by(&body, adapter, 5);
        }
    }

    // The failure was forgotten: the next request downloads again, and now it works.
    let before = d.hub.downloads("org/missing");
    assert!(before >= 1);
    d.hub.clear_failure("org/missing");
    let (status, body) = d.generate_with("org/missing", 3).await;
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "org/missing", 3);
    assert_eq!(d.hub.downloads("org/missing"), before + 1);
    d.assert_no_violations();
}

/// The message of a 422 `adapter_invalid` answer (asserting it is one).
fn invalid_adapter_message(status: u16, body: &serde_json::Value) -> &str {
    assert_eq!(
        (status, body["error_type"].as_str()),
        (422, Some("adapter_invalid")),
        "{body}"
    );
    body["error"].as_str().expect("message")
}

/// An adapter whose logits come back NaN (its lora_alpha overflows: the fake shard's "overflow" adapters,
/// whose chosen tokens' logprob is -inf, as the samplers give it) fails its requests with 422
/// `adapter_invalid`, not a 200 of meaningless tokens; the base model's requests, sent beside it, are served.
#[tokio::test]
async fn an_adapter_with_nan_logits_fails_its_requests_alone() {
    let d = Deployment::start(Setup::default()).await;
    let bad = d.spawn_generate("org/overflow", 4);
    let (status, body) = d.generate_with("", 4).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = bad.await.expect("request task");
    let message = invalid_adapter_message(status, &body);
    assert!(
        message.contains("`org/overflow` (hub) cannot be used") && message.contains("NaN"),
        "{message}"
    );
    let (status, body) = d.generate_with("org/fine", 4).await;
    assert_eq!(status, 200, "{body}");
    d.assert_no_violations();
}

#[tokio::test]
async fn shard_codes_map_to_http_statuses() {
    let hub = Arc::new(FakeHub::default());
    let cases = [
        ("org/private", Code::PermissionDenied, 403, "adapter_forbidden"),
        ("org/pickle", Code::InvalidArgument, 422, "adapter_invalid"),
        ("org/offline", Code::Unavailable, 424, "adapter_unavailable"),
        ("org/slowhub", Code::DeadlineExceeded, 424, "adapter_unavailable"),
        ("org/weird", Code::Internal, 424, "adapter_unavailable"),
    ];
    for (id, code, _, _) in cases {
        hub.fail(id, code, &format!("shard says no to {id}"));
    }
    let d = Deployment::start(Setup {
        hub,
        ..Setup::default()
    })
    .await;
    for (id, _, status, error_type) in cases {
        let (got, body) = d.generate_with(id, 2).await;
        assert_eq!(
            (got, body["error_type"].as_str()),
            (status, Some(error_type)),
            "{id}: {body}"
        );
        assert!(
            body["error"]
                .as_str()
                .expect("message")
                .contains(&format!("shard says no to {id}")),
            "{body}"
        );
    }

    // A load that fails on one rank: the adapter's requests get the mapped status, and the rank that
    // did load it releases it again.
    d.shards[1].fail_load("org/wide", Code::InvalidArgument, "rank 18 is above the maximum of 16");
    let (status, body) = d.generate_with("org/wide", 2).await;
    let message = invalid_adapter_message(status, &body);
    assert!(
        message.contains("cannot be used: rank 18 is above the maximum"),
        "{message}"
    );
    common::eventually("rank 0 released the half-loaded adapter", DEADLINE, || async {
        d.shards[0].loaded().is_empty()
    })
    .await;
    let (status, _) = d.generate_with("", 2).await;
    assert_eq!(status, 200, "the base model is unaffected");
    d.assert_no_violations();
}

/// A stream's headers wait for its adapter's download, so an adapter failure is an HTTP error on every
/// streaming route (not a 200 whose one event is the error), and a stream held by a slow download starts
/// with the adapter's tokens once it is released.
#[tokio::test]
async fn stream_adapter_failures_are_http_errors() {
    let hub = Arc::new(FakeHub::default());
    hub.fail("org/missing", Code::NotFound, "no such repository");
    hub.fail("org/pickle", Code::InvalidArgument, "not a LoRA adapter");
    let d = Deployment::start(Setup {
        hub,
        ..Setup::default()
    })
    .await;
    for (id, status, error_type) in [
        ("org/missing", 404, "adapter_not_found"),
        ("org/pickle", 422, "adapter_invalid"),
    ] {
        let parameters = json!({"adapter_id": id, "max_new_tokens": 2});
        for (path, body) in [
            ("/generate_stream", json!({"inputs": "Hello", "parameters": parameters})),
            (
                "/",
                json!({"inputs": "Hello", "parameters": parameters, "stream": true}),
            ),
        ] {
            let (got, body) = error_of(d.post(path, body).await).await;
            assert_eq!(
                (got, body["error_type"].as_str()),
                (status, Some(error_type)),
                "{path} {id}: {body}"
            );
        }
        let body = json!({"model": id, "prompt": "Hello", "max_tokens": 2, "stream": true});
        let (got, body) = error_of(d.post("/v1/completions", body).await).await;
        assert_eq!(
            (got, body["error"]["type"].as_str()),
            (status, Some(error_type)),
            "/v1/completions {id}: {body}"
        );
    }

    d.hub.hold("org/slow");
    let body = json!({"inputs": "Hello", "parameters": {"adapter_id": "org/slow", "max_new_tokens": 2}});
    let (response, ()) = tokio::join!(d.post("/generate_stream", body), async {
        common::eventually("the slow download started", DEADLINE, || async {
            d.hub.downloads("org/slow") == 1
        })
        .await;
        d.hub.release("org/slow");
    });
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    let ids: Vec<u64> = events.iter().map(|e| e["token"]["id"].as_u64().expect("id")).collect();
    let expected = common::fake_tokens_for("org/slow", HELLO_LAST, 2);
    assert_eq!(ids, expected.iter().map(|&t| u64::from(t)).collect::<Vec<_>>());
    d.assert_no_violations();
}

#[tokio::test]
async fn a_slow_download_blocks_nobody_else() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(1),
        ..Setup::default()
    })
    .await;
    d.hub.hold("org/slow");
    let slow = d.spawn_generate("org/slow", 3);
    common::eventually("the slow download started", DEADLINE, || async {
        d.hub.downloads("org/slow") == 1
    })
    .await;

    let (status, body) = d.generate_with("", 4).await;
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "", 4);
    let (status, body) = d.generate_with("org/quick", 4).await;
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "org/quick", 4);
    assert!(
        !slow.is_finished(),
        "the slow adapter's request still waits for its download"
    );

    d.hub.release("org/slow");
    let (status, body) = slow.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "org/slow", 3);
    assert_eq!(d.hub.downloads("org/slow"), 1);
    d.assert_no_violations();
}

/// Preloaded adapters are on every shard before the first request; base and adapter requests waiting
/// together go to the shards in one Prefill call.
#[tokio::test]
async fn preloaded_adapters_and_mixed_prefill() {
    let d = Deployment::start(Setup {
        step_delay: Duration::from_millis(5),
        flags: flags(&[
            "--preloaded-adapter-ids",
            "org/p,org/q",
            // While one request runs, new ones join only three at a time: the three below wait for each
            // other, so they are prefilled together (the ratio rule: without mixed steps).
            "--max-batch-prefill-chunk-tokens",
            "0",
            "--waiting-served-ratio",
            "3",
            "--max-waiting-tokens",
            "100000",
        ]),
        ..Setup::default()
    })
    .await;
    for shard in &d.shards {
        assert_eq!(shard.loaded(), ["org/p", "org/q"], "loaded before any request");
    }
    assert_eq!((d.hub.downloads("org/p"), d.hub.downloads("org/q")), (1, 1));
    let info: Value = d.get("/info").await.json().await.expect("info");
    assert_eq!(info["max_active_adapters"], 128);
    assert_eq!(info["supports_adapters"], true);

    let mut long = SseReader::new(
        d.post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1000}}),
        )
        .await,
    );
    assert!(long.next().await.is_some(), "the long request is running");
    let handles: Vec<_> = ["", "org/p", "org/q"].iter().map(|a| d.spawn_generate(a, 3)).collect();
    for (adapter, handle) in ["", "org/p", "org/q"].iter().zip(handles) {
        let (status, body) = handle.await.expect("request task");
        assert_eq!(status, 200, "{body}");
        assert_generated_by(&body, adapter, 3);
    }
    drop(long);
    let calls = d.shards[0].prefill_adapters();
    let mixed = calls.iter().any(|call| {
        let mut ids = call.clone();
        ids.sort();
        ids == ["", "org/p", "org/q"]
    });
    assert!(mixed, "no Prefill call held base + both adapters: {calls:?}");
    assert_eq!(
        (d.hub.downloads("org/p"), d.hub.downloads("org/q")),
        (1, 1),
        "no download needed"
    );
    d.assert_no_violations();
}

#[tokio::test]
async fn preloading_failures_stop_the_router() {
    let hub = Arc::new(FakeHub::default());
    hub.fail("org/broken", Code::NotFound, "no adapter_config.json in org/broken");
    let error = Deployment::try_start(Setup {
        hub,
        flags: flags(&["--preloaded-adapter-ids", "org/fine,org/broken"]),
        ..Setup::default()
    })
    .await
    .err()
    .expect("the router must not start");
    let message = error.to_string();
    assert!(message.contains("--preloaded-adapter-ids"), "{message}");
    assert!(message.contains("`org/broken` (hub)"), "{message}");
    assert!(message.contains("no adapter_config.json in org/broken"), "{message}");

    let error = Deployment::try_start(Setup {
        supports_adapters: false,
        flags: flags(&["--preloaded-adapter-ids", "org/fine"]),
        ..Setup::default()
    })
    .await
    .err()
    .expect("the router must not start");
    assert!(error.to_string().contains("do not support adapters"), "{error}");
}

#[tokio::test]
async fn local_source_is_part_of_the_adapter_name() {
    let d = Deployment::start(Setup {
        flags: flags(&[
            "--preloaded-adapter-ids",
            "/adapters/a",
            "--preloaded-adapter-source",
            "local",
        ]),
        ..Setup::default()
    })
    .await;
    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {
                "adapter_id": "/adapters/a", "adapter_source": "local", "max_new_tokens": 2, "details": true
            }}),
        )
        .await;
    assert_eq!(response.headers()["x-adapter-source"], "local");
    let body: Value = response.json().await.expect("json");
    assert_generated_by(&body, "/adapters/a", 2);
    assert_eq!(d.hub.downloads("/adapters/a"), 1, "the preloaded one served it");

    // The same id from the hub is another adapter: it is downloaded on its own.
    let (status, body) = d.generate_with("/adapters/a", 2).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(d.hub.downloads("/adapters/a"), 2);
    d.assert_no_violations();
}

/// With one slot, a busy adapter (one request running, the next queued) hands the slot over after the
/// cycle time: it takes no new prefills (the queued request would otherwise join the batch after
/// `--max-waiting-tokens` steps) and is offloaded when its running request ends. Without a cycle time
/// it serves its own queue first. The order of the Prefill calls tells which happened.
#[tokio::test]
async fn cycle_time_makes_busy_adapters_take_turns() {
    for (cycle_time, expected) in [
        ("0", ["org/a", "org/b", "org/a"]),
        ("100000", ["org/a", "org/a", "org/b"]),
    ] {
        let d = Deployment::start(Setup {
            step_delay: Duration::from_millis(10),
            flags: flags(&[
                "--max-active-adapters",
                "1",
                "--adapter-cycle-time-s",
                cycle_time,
                // The second request of org/a may join the first only after 50 decode steps (0.5 s): the
                // ratio rule, so without mixed steps (which admit at once).
                "--max-batch-prefill-chunk-tokens",
                "0",
                "--waiting-served-ratio",
                "10",
                "--max-waiting-tokens",
                "50",
            ]),
            ..Setup::default()
        })
        .await;
        let first = d.spawn_generate("org/a", 100);
        common::eventually("org/a is running", DEADLINE, || async {
            d.shards[0].prefill_adapters().len() == 1
        })
        .await;
        let b = d.spawn_generate("org/b", 3);
        let second = d.spawn_generate("org/a", 3);
        for handle in [first, b, second] {
            let (status, body) = handle.await.expect("request task");
            assert_eq!(status, 200, "{body}");
        }
        let order: Vec<String> = d.shards[0].prefill_adapters().into_iter().flatten().collect();
        assert_eq!(order, expected, "--adapter-cycle-time-s {cycle_time}");
        assert_eq!(d.shards[0].max_loaded.load(Ordering::SeqCst), 1);
        d.assert_no_violations();
    }
}

#[tokio::test]
async fn answers_name_the_adapter() {
    let d = Deployment::start(Setup::default()).await;
    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/named", "max_new_tokens": 2, "details": true}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-adapter-id"], "org/named");
    assert_eq!(response.headers()["x-adapter-source"], "hub");
    let body: Value = response.json().await.expect("json");
    assert_generated_by(&body, "org/named", 2);

    let response = d
        .post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/named", "max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-adapter-id"], "org/named");
    let events = SseReader::new(response).collect().await;
    let last = events.last().expect("events");
    assert_eq!(last["details"]["adapter_id"], "org/named", "{last}");
    let ids: Vec<u64> = events.iter().map(|e| e["token"]["id"].as_u64().expect("id")).collect();
    let expected = common::fake_tokens_for("org/named", HELLO_LAST, 2);
    assert_eq!(ids, expected.iter().map(|&t| u64::from(t)).collect::<Vec<_>>());

    let response = d
        .post(
            "/",
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/named", "max_new_tokens": 1}}),
        )
        .await;
    assert_eq!(response.headers()["x-adapter-id"], "org/named");

    // The base model: no adapter headers, `adapter_id: null`.
    let response = d
        .post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": true}}),
        )
        .await;
    assert!(response.headers().get("x-adapter-id").is_none());
    assert!(response.headers().get("x-adapter-source").is_none());
    let body: Value = response.json().await.expect("json");
    assert_generated_by(&body, "", 2);
}

#[tokio::test]
async fn adapter_validation_errors() {
    let d = Deployment::start(Setup::default()).await;
    let (status, body) = error_of(
        d.post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/a", "adapter_source": "s3"}}),
        )
        .await,
    )
    .await;
    assert_eq!((status, body["error_type"].as_str()), (422, Some("validation")));
    assert_eq!(
        body["error"],
        "`adapter_source` must be one of \"hub\", \"local\". Given: \"s3\""
    );
    assert_eq!(
        d.hub.total_downloads(),
        0,
        "nothing was downloaded for an invalid request"
    );

    let d = Deployment::start(Setup {
        supports_adapters: false,
        ..Setup::default()
    })
    .await;
    let (status, body) = d.generate_with("org/a", 2).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]
        .as_str()
        .expect("message")
        .contains("do not support adapters"));
    let (status, _) = d.generate_with("", 2).await;
    assert_eq!(status, 200);
}

/// Log lines written by the router, captured for one test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tokens reach the hub (from the body, or from `Authorization: Bearer`), but never the router's logs,
/// at any level, nor error answers, even when the shard's message repeats them.
#[tokio::test]
async fn api_tokens_reach_the_hub_but_not_logs_or_errors() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("lorax_router=trace"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test runtime has one thread, so every task of the router logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let hub = Arc::new(FakeHub::default());
    hub.fail(
        "org/private",
        Code::PermissionDenied,
        "401 Unauthorized (token {token})",
    );
    let d = Deployment::start(Setup {
        hub,
        ..Setup::default()
    })
    .await;
    let (status, body) = error_of(
        d.post(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"adapter_id": "org/private", "api_token": "hf_BODYSECRET"}}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (403, Some("adapter_forbidden")),
        "{body}"
    );
    let message = body["error"].as_str().expect("message");
    assert!(message.contains("401 Unauthorized (token ***)"), "{message}");

    d.hub.clear_failure("org/private");
    let response = d
        .http
        .post(format!("{}/generate", d.base))
        .header("authorization", "Bearer hf_HEADERSECRET")
        .json(&json!({"inputs": "Hello", "parameters": {"adapter_id": "org/private", "max_new_tokens": 2}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(
        d.hub.tokens("org/private"),
        [Some("hf_BODYSECRET".to_string()), Some("hf_HEADERSECRET".to_string())],
        "each download carried its request's token"
    );

    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8 logs");
    assert!(text.contains("org/private"), "the logs were captured:\n{text}");
    for secret in ["hf_BODYSECRET", "hf_HEADERSECRET"] {
        assert!(!text.contains(secret), "{secret} was logged:\n{text}");
    }
}

/// With one shard and no stream decoding, an adapter's download streams: the shard places the adapter
/// once its header is checked, and the request's Prefill comes while the weights are still being read
/// (the shard's step waits for them); the request is answered by its adapter once they have arrived. A
/// download asked while another stream decodes does not stream (its stream's steps must not wait for a
/// disk). The fake shard counts a step with running sequences that names an adapter still being read as
/// a violation.
#[tokio::test]
async fn idle_downloads_stream_and_their_prompt_runs_beside_the_read() {
    let d = Deployment::start(Setup {
        shards: 1,
        ..Setup::default()
    })
    .await;
    let shard = &d.shards[0];
    shard.hold_stream("org/cold");
    let ((status, body), ()) = tokio::join!(d.generate_with("org/cold", 4), async {
        common::eventually("the prompt's step waits for the streamed read", DEADLINE, || async {
            shard.prefills_while_streaming.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(shard.end_stream("org/cold", Ok(())), "no streamed read under way");
    });
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "org/cold", 4);
    assert_eq!(*shard.stream_asked.lock().expect("lock"), vec![true]);
    assert_eq!(shard.streamed.load(Ordering::SeqCst), 1);

    // A long base-model stream decodes while a new adapter is asked for: its download does not stream. (A
    // decode step after it started, not only its prefill on the shard, says the router holds it as running.)
    let decodes = shard.decodes.load(Ordering::SeqCst);
    let long = d.spawn_generate("", 400);
    common::eventually("the base stream decodes", DEADLINE, || async {
        !shard.live().is_empty() && shard.decodes.load(Ordering::SeqCst) > decodes
    })
    .await;
    let (status, body) = d.generate_with("org/warm", 4).await;
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "org/warm", 4);
    let (status, body) = long.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(*shard.stream_asked.lock().expect("lock"), vec![true, false]);
    d.assert_no_violations();
}

/// A streamed read that fails (the weights' values, or the disk) fails the step waiting for it, so the
/// request gets an error naming the cause; the shard unloads the adapter and the router forgets it: the
/// next request for it downloads it again and is served.
#[tokio::test]
async fn a_failed_streamed_read_fails_its_request_and_the_adapter_is_fetched_again() {
    let d = Deployment::start(Setup {
        shards: 1,
        ..Setup::default()
    })
    .await;
    let shard = &d.shards[0];
    shard.hold_stream("org/bad");
    let ((status, body), ()) = tokio::join!(d.generate_with("org/bad", 4), async {
        common::eventually("the prompt's step waits for the streamed read", DEADLINE, || async {
            shard.prefills_while_streaming.load(Ordering::SeqCst) == 1
        })
        .await;
        let ended = shard.end_stream("org/bad", Err("a weight holds values that are NaN or infinite".into()));
        assert!(ended, "no streamed read under way");
    });
    assert_ne!(status, 200, "{body}");
    assert!(body.to_string().contains("NaN"), "{body}");
    assert!(shard.loaded().is_empty(), "the failed adapter stayed loaded");
    let (status, body) = d.generate_with("org/bad", 4).await;
    assert_eq!(status, 200, "{body}");
    assert_generated_by(&body, "org/bad", 4);
    assert_eq!(d.hub.downloads("org/bad"), 2, "the adapter was not fetched again");
    d.assert_no_violations();
}
