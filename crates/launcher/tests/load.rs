//! Load against the real launcher, shard and router: overload beyond `--max-concurrent-requests`, and a
//! soak with random disconnects and mixed adapters cycling through two adapter slots. Both print their
//! numbers (run with `--nocapture`). The soak lasts `LORAX_SOAK_SECS` seconds (default 30; CI uses the
//! default, longer runs on demand: `LORAX_SOAK_SECS=600 cargo test -p lorax-launcher --test load --
//! --nocapture soak`). The two tests take turns (a lock), so neither's timings include the other's load.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fixtures, metric, pid_of_router, pid_of_shard, rss_kib, start};
use futures::StreamExt;
use serde_json::{json, Value};

/// The tests take turns: timings of one must not include the other's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADAPTERS: [&str; 4] = ["lora-r8", "lora-r16-all", "lora-r64-regex", "rslora-r16-patterns"];

/// A streaming request read to its end: (events, the last event).
async fn stream_to_end(response: reqwest::Response) -> (usize, Value) {
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = body.next().await {
        buffer.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(buffer).unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data:")).collect();
    let last = events
        .last()
        .map_or(Value::Null, |e| serde_json::from_str(e.trim()).unwrap());
    (events.len(), last)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// With `--max-concurrent-requests 4` and four long requests admitted, a burst of 40 more (plain,
/// streaming and compat) is refused with 429 `overloaded` at once, every refusal arriving before any
/// admitted request finishes; the admitted ones all complete, and their latency stays within a bound
/// of their latency without the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_admitted_requests_finish() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const LIMIT: usize = 4;
    const TOKENS: u64 = 400;
    let server = start(&["--max-concurrent-requests", &LIMIT.to_string()]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let base = server.base.clone();
    let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": TOKENS, "ignore_eos_token": true}});

    // Baseline: the admitted load alone.
    let run_admitted = || {
        let (client, base, long) = (client.clone(), base.clone(), long.clone());
        async move {
            let started = Instant::now();
            let mut streams = Vec::new();
            for _ in 0..LIMIT {
                let response = client
                    .post(format!("{base}/generate_stream"))
                    .json(&long)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                streams.push(response);
            }
            (started, streams)
        }
    };
    let (started, streams) = run_admitted().await;
    let mut baseline = Vec::new();
    for s in streams {
        let (events, last) = stream_to_end(s).await;
        assert_eq!(events as u64, TOKENS, "{last}");
        baseline.push(started.elapsed());
    }
    let baseline_max = baseline.iter().copied().max().unwrap();

    // The same admitted load, then a burst of excess requests while it runs.
    let (started, streams) = run_admitted().await;
    let mut admitted = Vec::new();
    for s in streams {
        admitted.push(tokio::spawn(async move {
            let (events, last) = stream_to_end(s).await;
            (events, last, Instant::now())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&client, &base, "lorax_batch_current_size").await != Some(LIMIT as f64) {
        assert!(Instant::now() < deadline, "the admitted requests never all ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let burst_started = Instant::now();
    let mut burst = Vec::new();
    for i in 0..40 {
        let (client, base, long) = (client.clone(), base.clone(), long.clone());
        burst.push(tokio::spawn(async move {
            let sent = Instant::now();
            let (path, body) = match i % 3 {
                0 => ("/generate", long),
                1 => ("/generate_stream", long),
                _ => (
                    "/",
                    json!({"inputs": "Hello", "parameters": long["parameters"], "stream": i % 2 == 0}),
                ),
            };
            let response = client.post(format!("{base}{path}")).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (path, status, body, sent.elapsed(), Instant::now())
        }));
    }
    let mut refusals = Vec::new();
    let mut last_refusal = burst_started;
    for h in burst {
        let (path, status, body, took, at) = h.await.unwrap();
        assert_eq!(
            (status, body["error_type"].as_str()),
            (429, Some("overloaded")),
            "{path}: {body}"
        );
        refusals.push(took);
        last_refusal = last_refusal.max(at);
    }
    let mut finished = Vec::new();
    let mut first_finish: Option<Instant> = None;
    for h in admitted {
        let (events, last, at) = h.await.unwrap();
        assert_eq!(events as u64, TOKENS, "an admitted request did not complete: {last}");
        assert_eq!(last["details"]["finish_reason"], "length", "{last}");
        finished.push(at - started);
        first_finish = Some(first_finish.map_or(at, |f: Instant| f.min(at)));
    }
    let first_finish = first_finish.unwrap();
    refusals.sort();
    let loaded_max = finished.iter().copied().max().unwrap();
    println!(
        "overload: {} refusals (429) in {:?} after the burst began, each in p50 {:?} / p99 {:?} / max {:?}; \
         first admitted request finished {:?} after the last refusal; admitted latency {:?} max with the burst \
         vs {:?} without",
        refusals.len(),
        last_refusal - burst_started,
        percentile(&refusals, 0.5),
        percentile(&refusals, 0.99),
        refusals.last().unwrap(),
        first_finish.saturating_duration_since(last_refusal),
        loaded_max,
        baseline_max
    );
    assert!(
        last_refusal < first_finish,
        "a refusal came after an admitted request finished: the excess waited instead of being refused"
    );
    assert!(
        loaded_max <= baseline_max * 3 + Duration::from_secs(2),
        "admitted latency {loaded_max:?} under overload vs {baseline_max:?} without"
    );
    // Capacity is back once they finished.
    let r = client
        .post(format!("{base}/generate"))
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Counts of the soak's outcomes.
#[derive(Default)]
struct Outcomes {
    completed: AtomicU64,
    cancelled: AtomicU64,
    refused: AtomicU64,
}

/// A small deterministic generator (xorshift), so each worker's choices repeat from run to run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One soak worker: until `until`, requests for random adapters (or the base model), each completed,
/// disconnected mid-generation (streaming or plain) or deliberately invalid. Anything else fails.
async fn worker(id: u64, client: reqwest::Client, base: String, until: Instant, outcomes: Arc<Outcomes>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    while Instant::now() < until {
        let pick = rng.below(ADAPTERS.len() as u64 + 1) as usize;
        let mut parameters = json!({"ignore_eos_token": true, "details": true});
        if let Some(adapter) = ADAPTERS.get(pick) {
            parameters["adapter_id"] = json!(adapter);
            parameters["adapter_source"] = json!("local");
        }
        match rng.below(5) {
            0 => {
                let n = 1 + rng.below(40);
                parameters["max_new_tokens"] = json!(n);
                let r = client
                    .post(format!("{base}/generate"))
                    .json(&json!({"inputs": "Hello", "parameters": parameters}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                assert_eq!(status, 200, "worker {id}: {v}");
                assert_eq!(v["details"]["generated_tokens"].as_u64(), Some(n), "{v}");
                outcomes.completed.fetch_add(1, Ordering::SeqCst);
            }
            1 => {
                let n = 1 + rng.below(40);
                parameters["max_new_tokens"] = json!(n);
                parameters.as_object_mut().unwrap().remove("details");
                let r = client
                    .post(format!("{base}/generate_stream"))
                    .json(&json!({"inputs": "Hello", "parameters": parameters}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "worker {id}");
                let (events, last) = stream_to_end(r).await;
                assert_eq!(events as u64, n, "worker {id}: {last}");
                assert_eq!(last["details"]["finish_reason"], "length", "worker {id}: {last}");
                outcomes.completed.fetch_add(1, Ordering::SeqCst);
            }
            2 => {
                // A stream read for a few events, then dropped.
                parameters["max_new_tokens"] = json!(400);
                parameters.as_object_mut().unwrap().remove("details");
                let r = client
                    .post(format!("{base}/generate_stream"))
                    .json(&json!({"inputs": "Hello", "parameters": parameters}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "worker {id}");
                let mut body = r.bytes_stream();
                for _ in 0..=rng.below(4) {
                    if body.next().await.is_none() {
                        break;
                    }
                }
                drop(body);
                outcomes.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            3 => {
                // A plain request whose client gives up after a random short time.
                parameters["max_new_tokens"] = json!(400);
                let wait = Duration::from_millis(50 + rng.below(400));
                let sent = client
                    .post(format!("{base}/generate"))
                    .json(&json!({"inputs": "Hello", "parameters": parameters}))
                    .timeout(wait)
                    .send()
                    .await;
                match sent {
                    Err(e) if e.is_timeout() => outcomes.cancelled.fetch_add(1, Ordering::SeqCst),
                    Err(e) => panic!("worker {id}: {e}"),
                    Ok(r) => {
                        // Finished (or its headers came) within the wait.
                        assert_eq!(r.status(), 200, "worker {id}");
                        match r.bytes().await {
                            Ok(_) => outcomes.completed.fetch_add(1, Ordering::SeqCst),
                            Err(e) if e.is_timeout() => outcomes.cancelled.fetch_add(1, Ordering::SeqCst),
                            Err(e) => panic!("worker {id}: {e}"),
                        }
                    }
                };
            }
            _ => {
                parameters["temperature"] = json!(-1.0);
                let r = client
                    .post(format!("{base}/generate"))
                    .json(&json!({"inputs": "Hello", "parameters": parameters}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 422, "worker {id}");
                outcomes.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Polls until the deployment is idle: no KV block in use, no running or queued request (so no adapter
/// lease, which only running requests hold).
async fn wait_idle(client: &reqwest::Client, base: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let used = metric(client, base, "lorax_kv_blocks_used").await;
        let running = metric(client, base, "lorax_batch_current_size").await;
        let queued = metric(client, base, "lorax_queue_size").await;
        if used == Some(0.0) && running == Some(0.0) && queued == Some(0.0) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not idle after {within:?}: blocks {used:?}, running {running:?}, queued {queued:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Twelve clients for `LORAX_SOAK_SECS` seconds: plain and streaming requests for the base model and
/// four adapters through two adapter slots, a third of them abandoned mid-generation, some invalid.
/// Every request completes, is cancelled by its client or is refused on purpose; afterwards no KV block
/// is in use and nothing runs or waits, and the resident memory of the shard and the router after the
/// first third equals (within a bound) their memory at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_disconnects_and_adapter_cycling() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let seconds: u64 = std::env::var("LORAX_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let roots = format!("--adapter-local-roots={}", fixtures().join("adapters").display());
    let server = start(&[
        &roots,
        "--max-active-adapters",
        "2",
        "--adapter-cycle-time-s",
        "0.5",
        "--max-concurrent-requests",
        "64",
    ])
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let base = server.base.clone();
    let shard = pid_of_shard(&server.uds_dir).unwrap();
    let router = pid_of_router(&base).unwrap();
    let total_blocks = metric(&client, &base, "lorax_kv_blocks_total").await.unwrap();

    // Cancellation frees within a step or two: one stream alone, dropped after three events.
    let r = client
        .post(format!("{base}/generate_stream"))
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 500, "ignore_eos_token": true}}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    let decodes = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("lorax_batch_inference_count{method=\"decode\"} "))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    let metrics_text = || async {
        client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(metric(&client, &base, "lorax_kv_blocks_used").await.unwrap() > 0.0);
    let before = decodes(&metrics_text().await);
    drop(body);
    let freed_in = wait_idle(&client, &base, Duration::from_secs(10)).await;
    let steps = decodes(&metrics_text().await) - before;
    println!("cancellation: blocks freed {freed_in:?} after the disconnect, {steps} decode steps later (decode count {before} at the drop)");
    assert!(steps < 20.0, "{steps} decode steps ran after the client left");

    let outcomes = Arc::new(Outcomes::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for id in 0..12 {
        workers.push(tokio::spawn(worker(
            id,
            client.clone(),
            base.clone(),
            until,
            Arc::clone(&outcomes),
        )));
    }
    // Watch the gauges meanwhile; memory is sampled once the first third has warmed everything up.
    let mut max_blocks = 0f64;
    let mut max_active = 0f64;
    let mut warm: Option<(u64, u64)> = None;
    while !workers.iter().all(tokio::task::JoinHandle::is_finished) {
        if let Some(b) = metric(&client, &base, "lorax_kv_blocks_used").await {
            max_blocks = max_blocks.max(b);
        }
        if let Some(a) = metric(&client, &base, "lorax_active_adapters").await {
            max_active = max_active.max(a);
        }
        if warm.is_none() && started.elapsed() >= Duration::from_secs(seconds / 3) {
            warm = Some((rss_kib(shard), rss_kib(router)));
        }
        assert!(
            started.elapsed() < Duration::from_secs(seconds + 120),
            "the soak's clients did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let idle_in = wait_idle(&client, &base, Duration::from_secs(30)).await;
    let (shard_warm, router_warm) = warm.unwrap();
    let (shard_end, router_end) = (rss_kib(shard), rss_kib(router));
    let text = metrics_text().await;
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("lorax_request_failure{"))
        .collect();
    let mib = |k: u64| k as f64 / 1024.0;
    let c = |a: &AtomicU64| a.load(Ordering::SeqCst);
    println!(
        "soak {seconds} s, 12 clients, 4 adapters + base through 2 slots: {} completed, {} cancelled by their \
         client, {} refused on purpose (422); KV blocks used max {max_blocks} of {total_blocks}, 0 at the end \
         ({idle_in:?} after the last client); active adapters max {max_active}; shard RSS {:.1} -> {:.1} MiB, \
         router RSS {:.1} -> {:.1} MiB (after the first third -> end); failures by type: {failures:?}",
        c(&outcomes.completed),
        c(&outcomes.cancelled),
        c(&outcomes.refused),
        mib(shard_warm),
        mib(shard_end),
        mib(router_warm),
        mib(router_end),
    );
    assert!(c(&outcomes.completed) > 0 && c(&outcomes.cancelled) > 0 && c(&outcomes.refused) > 0);
    assert!(max_active <= 2.0, "{max_active} adapters active with 2 slots");
    for line in &failures {
        assert!(
            line.starts_with("lorax_request_failure{err=\"validation\"}"),
            "an unplanned failure: {line}"
        );
    }
    let growth = |warm: u64, end: u64| mib(end.saturating_sub(warm));
    assert!(growth(shard_warm, shard_end) < 32.0, "shard memory grew");
    assert!(growth(router_warm, router_end) < 32.0, "router memory grew");
    // Every adapter still loads and serves after the churn.
    for adapter in ADAPTERS {
        let r = client
            .post(format!("{base}/generate"))
            .json(&json!({"inputs": "Hello", "parameters": {"adapter_id": adapter, "adapter_source": "local", "max_new_tokens": 4}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{adapter}");
    }
}
