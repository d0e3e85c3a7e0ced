//! Process tests of reliability and security against the real launcher, shard and router: extreme but
//! valid parameters through the real engine, bodies that cannot be read, adapter downloads that fail,
//! time out or arrive corrupt (only that adapter's requests fail, and a retry succeeds once the hub is
//! fixed), and the API key of a launched server. Overload and the soak are in `load.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::hub_test_server::{self, Fault};
use common::{fixtures, golden, peft_greedy, pid_of_router, start, start_with_env};
use serde_json::{json, Value};

/// POST `path` with a JSON body and extra headers: (status, JSON body or Null).
async fn post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = client.post(format!("{base}{path}")).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn token_ids(v: &Value) -> Vec<u32> {
    v["details"]["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no details.tokens in {v}"))
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect()
}

/// Parameters at the edges of what validation accepts go through the real engine: every answer is a
/// 200 whose log-probabilities are all finite numbers (a NaN would show as `null`), or a 422. Bodies
/// that cannot be read get their 4xx, and the server then still gives transformers' tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_parameters_through_the_engine() {
    let server = start_with_env(&[], &[("BODY_LIMIT_BYTES", "65536".to_string())]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let base = &server.base;
    let long_prompt = "hello ".repeat(1000);
    let cases = [
        json!({"temperature": 1e-40}),
        json!({"temperature": 1e-45, "top_p": 0.99999994}),
        json!({"temperature": 3e38}),
        json!({"top_k": i64::MAX}),
        json!({"top_k": 1, "do_sample": true}),
        json!({"top_p": 1e-40}),
        json!({"typical_p": 1e-30}),
        json!({"typical_p": 0.99999994, "seed": u64::MAX}),
        json!({"repetition_penalty": 1e-38}),
        json!({"repetition_penalty": 1e-38, "temperature": 1e-30}),
        json!({"repetition_penalty": 3e38, "do_sample": true}),
        json!({"frequency_penalty": 2, "presence_penalty": -2}),
        json!({"frequency_penalty": -2, "presence_penalty": 2, "temperature": 0.01}),
        json!({"return_k_alternatives": 10, "decoder_input_details": true}),
        json!({"stop": ["x".repeat(1024), "\u{0}", "<s>", "</s>"]}),
        json!({"truncate": 1}),
    ];
    for parameters in cases {
        let mut p = parameters.clone();
        p["max_new_tokens"] = json!(8);
        p["details"] = json!(true);
        let (status, v) = post(
            &client,
            base,
            "/generate",
            &json!({"inputs": "Hello", "parameters": p}),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{parameters}: {v}");
        let tokens = v["details"]["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty(), "{parameters}: {v}");
        for t in tokens {
            assert!(
                t["logprob"].as_f64().is_some(),
                "{parameters}: a token without a finite logprob: {v}"
            );
            for a in t["alternative_tokens"].as_array().into_iter().flatten() {
                assert!(a["logprob"].is_number(), "{parameters}: {v}");
            }
        }
        for t in v["details"]["prefill"].as_array().unwrap().iter().skip(1) {
            assert!(t["logprob"].is_number(), "{parameters}: {v}");
        }
    }
    // The whole context: a truncated prompt of --max-input-length tokens plus the rest as new tokens.
    let (status, v) = post(
        &client,
        base,
        "/generate",
        &json!({"inputs": long_prompt, "parameters": {"truncate": 256, "max_new_tokens": 256, "details": true, "ignore_eos_token": true}}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["details"]["prompt_tokens"], 256);
    assert_eq!(v["details"]["generated_tokens"], 256);

    // Unreadable bodies.
    for (what, body, status) in [
        ("non-UTF-8", b"{\"inputs\": \"\xff\xfe\"}".to_vec(), 400),
        (
            "over BODY_LIMIT_BYTES",
            format!("{{\"inputs\": \"{}\"}}", "x".repeat(70_000)).into_bytes(),
            413,
        ),
        (
            "deep nesting",
            format!(
                "{{\"inputs\": \"Hi\", \"parameters\": {{\"grammar\": {}{}}}}}",
                "[".repeat(20_000),
                "]".repeat(20_000)
            )
            .into_bytes(),
            400,
        ),
    ] {
        let r = client
            .post(format!("{base}/generate"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error_type"], "validation", "{what}: {v}");
    }

    let g = golden();
    assert_eq!(common::generate(&client, base, &g.prompts[0], 32).await, g.greedy[0]);
    assert_eq!(client.get(format!("{base}/health")).send().await.unwrap().status(), 200);
}

/// A server whose shards download from `hub` into the cache at `hf_home` (no HF_TOKEN), with a client
/// that waits up to a minute.
async fn start_on_hub(
    hub: &hub_test_server::HubServer,
    hf_home: &std::path::Path,
    extra: &[&str],
) -> (common::Server, reqwest::Client) {
    let server = start_with_env(
        extra,
        &[
            ("HF_ENDPOINT", hub.endpoint.clone()),
            ("HF_HOME", hf_home.display().to_string()),
            ("HF_TOKEN", String::new()),
        ],
    )
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    (server, client)
}

/// A hub that stops sending in the middle of a file: the download times out, and once the hub is fixed
/// the next request downloads the adapter, although the stalled connection is still open on the hub's
/// side (a download that kept its thread kept hf-hub's lock on the file too, and every later try failed
/// on it). The timed-out download has let go of its connection: hf-hub's chunk tasks stop with it
/// (they once went on downloading in the background).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stalled_mid_file_times_out_and_a_later_one_succeeds() {
    let adapters = fixtures().join("adapters");
    let hub = hub_test_server::start(vec![("org/stall".to_string(), adapters.join("lora-r8"))], None).unwrap();
    hub.faults.set("org/stall", Fault::StallBody);
    let hf_home = tempfile::tempdir().unwrap();
    let (server, client) = start_on_hub(&hub, hf_home.path(), &["--adapter-download-timeout-s", "2"]).await;
    let g = golden();
    let body = json!({"inputs": g.prompts[1], "parameters": {"max_new_tokens": 16, "details": true,
        "ignore_eos_token": true, "adapter_id": "org/stall", "adapter_source": "hub"}});
    let (status, v) = post(&client, &server.base, "/generate", &body, &[]).await;
    assert_eq!(
        (status, v["error_type"].as_str()),
        (424, Some("adapter_unavailable")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("timed out after 2 s"), "{v}");
    assert_eq!(hub.faults.stalled(), 1, "the stalled connection is still open");

    hub.faults.clear("org/stall");
    let started = Instant::now();
    let (status, v) = post(&client, &server.base, "/generate", &body, &[]).await;
    assert_eq!(status, 200, "after the fix, with the stalled download still open: {v}");
    assert_eq!(token_ids(&v), peft_greedy("lora-r8", 1)[..16].to_vec());
    println!("download after a stalled one: {:?}", started.elapsed());
    hub.faults.end_stalls();
    let deadline = Instant::now() + Duration::from_secs(30);
    while hub.faults.abandoned() == 0 && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        hub.faults.abandoned(),
        1,
        "the timed-out download still held its connection to the hub"
    );
}

/// A hub adapter whose weights file is larger than any adapter of the served model within
/// `--max-lora-rank` (64 GiB, sparse here) is refused before any of it is downloaded: the request gets
/// 422 `adapter_invalid` at once, the hub cache stays empty, and the base model is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_adapter_larger_than_any_adapter_is_not_downloaded() {
    let repo = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("adapters/lora-r8/adapter_config.json"),
        repo.path().join("adapter_config.json"),
    )
    .unwrap();
    std::fs::File::create(repo.path().join("adapter_model.safetensors"))
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let hub = hub_test_server::start(vec![("org/huge".to_string(), repo.path().to_path_buf())], None).unwrap();
    let hf_home = tempfile::tempdir().unwrap();
    let (server, client) = start_on_hub(&hub, hf_home.path(), &[]).await;
    let g = golden();
    let body = |adapter: Option<&str>| {
        let mut p = json!({"max_new_tokens": 4});
        if let Some(id) = adapter {
            p["adapter_id"] = json!(id);
            p["adapter_source"] = json!("hub");
        }
        json!({"inputs": g.prompts[1], "parameters": p})
    };
    let (huge, base) = (body(Some("org/huge")), body(None));
    let started = Instant::now();
    let ((status, v), (base_status, base_v)) = tokio::join!(
        post(&client, &server.base, "/generate", &huge, &[]),
        post(&client, &server.base, "/generate", &base, &[])
    );
    assert_eq!(
        (status, v["error_type"].as_str()),
        (422, Some("adapter_invalid")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("was not downloaded"), "{v}");
    assert_eq!(base_status, 200, "{base_v}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    fn bytes_under(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => bytes_under(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
    }
    let cached = bytes_under(hf_home.path());
    assert!(cached < 1 << 20, "{cached} bytes in the hub cache");
}

/// Hub adapters whose download fails (HTTP 500), hangs past `--adapter-download-timeout-s`, or
/// delivers a corrupt file: each fails only its own requests, with its error type, while the base
/// model and a good adapter requested at the same time are served; once the hub is fixed, the next
/// request for each downloads it again and gets peft's tokens (a corrupt file is not reused from the
/// hub cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_download_faults_fail_alone_and_recover() {
    let adapters = fixtures().join("adapters");
    let repos = [
        ("org/flaky", "lora-r8"),
        ("org/corrupt", "lora-r16-all"),
        ("org/hang", "rslora-r16-patterns"),
        ("org/good", "lora-r64-regex"),
    ];
    let hub = hub_test_server::start_gated(
        repos
            .iter()
            .map(|(id, dir)| (id.to_string(), adapters.join(dir)))
            .collect(),
        None,
        vec!["org/hang".to_string()],
    )
    .unwrap();
    hub.faults.set("org/flaky", Fault::Status(500));
    hub.faults.set("org/corrupt", Fault::Corrupt);
    let hf_home = tempfile::tempdir().unwrap();
    let (server, client) = start_on_hub(
        &hub,
        hf_home.path(),
        &["--adapter-download-timeout-s", "2", "--max-active-adapters", "2"],
    )
    .await;
    let g = golden();
    let body = |adapter: Option<&str>| {
        let mut p = json!({"max_new_tokens": 16, "details": true, "ignore_eos_token": true});
        if let Some(id) = adapter {
            p["adapter_id"] = json!(id);
            p["adapter_source"] = json!("hub");
        }
        json!({"inputs": g.prompts[1], "parameters": p})
    };
    let expected = |adapter: Option<&str>| -> Vec<u32> {
        match adapter {
            Some(id) => {
                let dir = repos.iter().find(|(r, _)| *r == id).unwrap().1;
                peft_greedy(dir, 1)[..16].to_vec()
            }
            None => g.greedy[1][..16].to_vec(),
        }
    };

    let started = Instant::now();
    let faulty = [
        ("org/flaky", 424, "adapter_unavailable", "HTTP 500"),
        ("org/corrupt", 422, "adapter_invalid", "safetensors"),
        ("org/hang", 424, "adapter_unavailable", "timed out after 2 s"),
    ];
    let mut handles = Vec::new();
    for id in [
        Some("org/flaky"),
        Some("org/corrupt"),
        Some("org/hang"),
        Some("org/good"),
        None,
    ] {
        let (client, base, b) = (client.clone(), server.base.clone(), body(id));
        handles.push(tokio::spawn(async move {
            let answer = post(&client, &base, "/generate", &b, &[]).await;
            (id, answer, started.elapsed())
        }));
    }
    let mut hang_took = Duration::ZERO;
    let mut healthy_took = Duration::ZERO;
    for h in handles {
        let (id, (status, v), took) = h.await.unwrap();
        match faulty.iter().find(|(f, ..)| Some(*f) == id) {
            Some((_, want_status, error_type, needle)) => {
                assert_eq!(
                    (status, v["error_type"].as_str()),
                    (*want_status, Some(*error_type)),
                    "{id:?}: {v}"
                );
                let message = v["error"].as_str().unwrap();
                assert!(message.contains(needle), "{id:?}: {message}");
                assert!(
                    !message.contains(&hf_home.path().display().to_string()),
                    "{id:?} leaks a path: {message}"
                );
                if id == Some("org/hang") {
                    hang_took = took;
                }
            }
            None => {
                assert_eq!(status, 200, "{id:?}: {v}");
                assert_eq!(token_ids(&v), expected(id), "{id:?}");
                healthy_took = healthy_took.max(took);
            }
        }
    }
    assert!(
        hang_took >= Duration::from_secs(2),
        "the hanging download failed after {hang_took:?}"
    );
    println!(
        "download faults: base and good adapter answered within {healthy_took:?}; the hanging hub timed out after {hang_took:?}"
    );

    // Still broken: a retry downloads again and fails again (nothing cached from the failures).
    let requests_before = hub.requests.load(std::sync::atomic::Ordering::SeqCst);
    let (status, v) = post(&client, &server.base, "/generate", &body(Some("org/corrupt")), &[]).await;
    assert_eq!(
        (status, v["error_type"].as_str()),
        (422, Some("adapter_invalid")),
        "{v}"
    );
    assert!(
        hub.requests.load(std::sync::atomic::Ordering::SeqCst) > requests_before,
        "the retry went to the hub"
    );

    // Fixed: every adapter downloads again and serves peft's tokens.
    hub.faults.clear("org/flaky");
    hub.faults.clear("org/corrupt");
    hub.gate.open();
    for (id, ..) in faulty {
        let (status, v) = post(&client, &server.base, "/generate", &body(Some(id)), &[]).await;
        assert_eq!(status, 200, "{id} after the fix: {v}");
        assert_eq!(token_ids(&v), expected(Some(id)), "{id}");
    }
    let text = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (error_type, at_least) in [("adapter_unavailable", 2.0), ("adapter_invalid", 2.0)] {
        let line = format!("lorax_adapter_load_failures{{err=\"{error_type}\"}} ");
        let n: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} missing"))
            .trim()
            .parse()
            .unwrap();
        assert!(n >= at_least, "{error_type}: {n}");
    }
}

/// `--api-key` and `--api-key-file` on the launcher guard the launched router (401 without a key,
/// /health and /metrics open); the key reaches the router through its environment, so it is on no
/// process's command line and in no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launched_server_requires_the_api_key() {
    const KEY: &str = "launcher-flag-key-6f1c2e";
    const FILE_KEY: &str = "launcher-file-key-9d8b7a";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, format!("# one key\n{FILE_KEY}\n")).unwrap();
    let server = start(&["--api-key", KEY, &format!("--api-key-file={}", file.display())]).await;
    let client = reqwest::Client::new();
    let base = &server.base;
    let body = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4}});

    let (status, v) = post(&client, base, "/generate", &body, &[]).await;
    assert_eq!((status, v["error_type"].as_str()), (401, Some("unauthorized")), "{v}");
    let bearer = format!("Bearer {KEY}");
    let (status, v) = post(&client, base, "/generate", &body, &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post(&client, base, "/generate", &body, &[("x-api-key", FILE_KEY)]).await;
    assert_eq!(status, 200, "{v}");
    for open in ["/health", "/metrics"] {
        assert_eq!(
            client.get(format!("{base}{open}")).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }
    assert_eq!(client.get(format!("{base}/info")).send().await.unwrap().status(), 401);

    let router = pid_of_router(base).expect("router process");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{router}/cmdline")).unwrap()).into_owned();
    assert!(cmdline.contains("--api-key-file="), "{cmdline}");
    assert!(!cmdline.contains(KEY), "the key is on the router's command line");
    // The router's log lines may reach the file a moment after the requests were answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("API keys required") {
        assert!(Instant::now() < deadline, "the router never logged its key count");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = server.log_text();
    assert!(!log.contains(KEY) && !log.contains(FILE_KEY), "a key was logged");
}
