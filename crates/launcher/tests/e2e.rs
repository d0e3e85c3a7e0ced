//! Process-level tests: the real launcher spawns real shard and router processes on a free port and
//! the tests speak HTTP to them. Outputs are checked against the transformers golden fixtures (the
//! embedded model is the llama fixture), not against our own earlier output.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

struct Server {
    child: Child,
    base: String,
    uds_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start the launcher on the embedded model and wait (with a deadline, polling) until /health is 200.
async fn start(extra: &[&str]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let uds_dir = tmp.path().join("uds");
    let child = Command::new(env!("CARGO_BIN_EXE_lorax-launcher"))
        .args(["--port", &port.to_string(), "--hostname", "127.0.0.1"])
        .arg(format!("--shard-uds-dir={}", uds_dir.display()))
        .arg(format!("--embedded-dir={}", tmp.path().display()))
        .args([
            "--max-input-length",
            "256",
            "--max-total-tokens",
            "512",
            "--max-batch-prefill-tokens",
            "512",
        ])
        .args(["--num-blocks", "256", "--block-size", "16", "--shutdown-grace-s", "5"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        uds_dir,
        _tmp: tmp,
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{}/health", server.base)).send().await {
            if r.status() == 200 {
                return server;
            }
        }
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("launcher exited during startup: {status}");
        }
        assert!(Instant::now() < deadline, "server did not become healthy in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Golden {
    prompts: Vec<String>,
    prompt_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn golden() -> Golden {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(manifest["prompts"].clone()).unwrap();
    let prompt_ids: Vec<Vec<u32>> = serde_json::from_value(manifest["prompt_ids"].clone()).unwrap();
    let bytes = std::fs::read(fixtures().join("models/llama/golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let greedy = (0..prompts.len())
        .map(|i| {
            let t = st.tensor(&format!("p{i}.greedy")).unwrap();
            t.data()
                .chunks_exact(8)
                .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
                .collect()
        })
        .collect();
    Golden {
        prompts,
        prompt_ids,
        greedy,
    }
}

async fn generate(client: &reqwest::Client, base: &str, inputs: &str, n: usize) -> Vec<u32> {
    let r = client
        .post(format!("{base}/generate"))
        .json(
            &json!({"inputs": inputs, "parameters": {"max_new_tokens": n, "details": true, "ignore_eos_token": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect()
}

async fn metric(client: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The count of a histogram bucket (`le` as rendered) in Prometheus text.
fn bucket(text: &str, name: &str, le: &str) -> f64 {
    let prefix = format!("{name}{{le=\"{le}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} missing from /metrics"))
        .trim()
        .parse()
        .unwrap()
}

fn pid_of_shard(uds_dir: &Path) -> Option<i32> {
    let needle = uds_dir.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("lorax-shard") && cmd.contains(&needle) {
            return Some(pid);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_transformers_tokens_batches_validates_and_stops_on_sigterm() {
    let g = golden();
    let mut server = start(&[]).await;
    let base = server.base.clone();
    let client = reqwest::Client::new();

    // The router's tokenizer agrees with the fixture's prompt ids (Python tokenizers).
    for (p, ids) in g.prompts.iter().zip(&g.prompt_ids) {
        let v: Value = client
            .post(format!("{base}/tokenize"))
            .json(&json!({"inputs": p}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got: Vec<u32> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&got, ids, "tokenization of {p:?}");
    }

    // Alone: 32 greedy tokens identical to transformers'.
    for (p, want) in g.prompts.iter().zip(&g.greedy) {
        assert_eq!(&generate(&client, &base, p, 32).await, want, "{p:?} alone");
    }

    // Continuous batching: a long stream is running; the four prompts (different lengths) arrive
    // concurrently, join its batch, and still give transformers' tokens.
    let long = client
        .post(format!("{base}/generate_stream"))
        .json(&json!({"inputs": g.prompts[2], "parameters": {"max_new_tokens": 400, "ignore_eos_token": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    let mut long = long.bytes_stream();
    long.next().await.unwrap().unwrap();
    let futs = g.prompts.iter().map(|p| generate(&client, &base, p, 32));
    let all = futures::future::join_all(futs).await;
    for ((p, want), got) in g.prompts.iter().zip(&g.greedy).zip(&all) {
        assert_eq!(got, want, "{p:?} joining a running batch");
    }
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let single = bucket(&text, "lorax_batch_decode_size_bucket", "1");
    let total = bucket(&text, "lorax_batch_decode_size_bucket", "+Inf");
    assert!(
        total - single >= 31.0,
        "decode steps shared by 2+ requests: {} of {total}",
        total - single
    );

    // The long stream's client disconnects: its KV blocks are freed (visible in /metrics).
    assert!(metric(&client, &base, "lorax_kv_blocks_used").await.unwrap() > 0.0);
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&client, &base, "lorax_kv_blocks_used").await != Some(0.0) {
        assert!(Instant::now() < deadline, "blocks were not freed after the disconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Streaming gives the same tokens, one event each, the last carrying generated_text.
    let r = client
        .post(format!("{base}/generate_stream"))
        .json(&json!({"inputs": g.prompts[1], "parameters": {"max_new_tokens": 32, "ignore_eos_token": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let ids: Vec<u32> = events
        .iter()
        .map(|e| e["token"]["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, g.greedy[1]);
    assert!(events.last().unwrap()["generated_text"].is_string());
    assert_eq!(events.last().unwrap()["details"]["finish_reason"], "length");

    // Bad parameters: 422 with error_type validation, and the server keeps serving.
    for params in [
        json!({"temperature": 0.0}),
        json!({"top_p": 1.5}),
        json!({"top_k": -1}),
        json!({"max_new_tokens": 100000}),
        json!({"repetition_penalty": 0}),
        json!({"typical_p": 0}),
        json!({"stop": ["a", "b", "c", "d", "e"]}),
        json!({"no_such_parameter": 1}),
        json!({"adapter_id": "some/adapter"}),
    ] {
        let r = client
            .post(format!("{base}/generate"))
            .json(&json!({"inputs": "Hello", "parameters": params}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{params}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error_type"], "validation", "{params}: {v}");
    }
    let r = client
        .post(format!("{base}/generate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());

    assert_eq!(generate(&client, &base, &g.prompts[0], 32).await, g.greedy[0]);

    // SIGTERM: everything stops, exit code 0, shard gone.
    let shard = pid_of_shard(&server.uds_dir).expect("shard process not found");
    nix_kill(server.child.id() as i32, "TERM");
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(status.success(), "launcher exit after SIGTERM: {status}");
    assert!(
        !Path::new(&format!("/proc/{shard}")).exists() || is_zombie(shard),
        "shard {shard} still running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_ends_the_launcher_with_failure() {
    let mut server = start(&[]).await;
    let shard = pid_of_shard(&server.uds_dir).expect("shard process not found");
    nix_kill(shard, "KILL");
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(
        !status.success(),
        "launcher should fail when a shard dies, got {status}"
    );
}

fn nix_kill(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "process did not exit in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}
