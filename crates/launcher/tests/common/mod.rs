//! Shared harness of the process tests: start the real launcher on a free port (embedded model),
//! wait for health with a deadline, read golden fixtures and metrics.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../../src/hub_test_server.rs"]
pub mod hub_test_server;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub uds_dir: PathBuf,
    pub tmp: tempfile::TempDir,
    /// The launcher's stderr (its own and its children's logs).
    pub log: PathBuf,
}

impl Server {
    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("---- last server log lines ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start the launcher on the embedded model and wait (with a deadline, polling) until /health is 200.
pub async fn start(extra: &[&str]) -> Server {
    start_with_env(extra, &[]).await
}

/// [`start`] with extra environment variables for the launcher (and so its children).
pub async fn start_with_env(extra: &[&str], envs: &[(&str, String)]) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let uds_dir = tmp.path().join("uds");
    let log = tmp.path().join("server.log");
    let log_file = std::fs::File::create(&log).unwrap();
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
        .args(["--num-blocks", "256", "--block-size", "16"])
        .args(if extra.contains(&"--shutdown-grace-s") {
            &[][..]
        } else {
            &["--shutdown-grace-s", "5"][..]
        })
        .args(extra)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        // The router logs to stdout, the launcher and shards to stderr: one file gets both.
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        uds_dir,
        tmp,
        log,
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

pub struct Golden {
    pub prompts: Vec<String>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub greedy: Vec<Vec<u32>>,
}

pub fn golden() -> Golden {
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

pub async fn generate(client: &reqwest::Client, base: &str, inputs: &str, n: usize) -> Vec<u32> {
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

/// Starts a 400-token stream of `inputs` and waits for its first event, so its batch is running when
/// this returns; dropping the stream disconnects it.
pub async fn running_stream(client: &reqwest::Client, base: &str, inputs: &str) -> impl futures::Stream {
    let r = client
        .post(format!("{base}/generate_stream"))
        .json(&json!({"inputs": inputs, "parameters": {"max_new_tokens": 400, "ignore_eos_token": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    futures::StreamExt::next(&mut stream).await.unwrap().unwrap();
    stream
}

pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
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

/// A histogram's cumulative count at bound `le`, summed over the series of every label set.
pub fn bucket(text: &str, name: &str, le: &str) -> f64 {
    let bound = format!("le=\"{le}\"}} ");
    let found: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.split_once(&bound))
        .map(|(_, v)| v.trim().parse().unwrap())
        .collect();
    assert!(!found.is_empty(), "{name} with {bound:?} missing from /metrics");
    found.iter().sum()
}

pub fn pid_of_shard(uds_dir: &Path) -> Option<i32> {
    pid_of("lorax-shard", &uds_dir.display().to_string())
}

/// The router of the server listening on `base` (`http://127.0.0.1:PORT`).
pub fn pid_of_router(base: &str) -> Option<i32> {
    let port = base.rsplit(':').next()?;
    pid_of("lorax-router", &format!("--port={port}"))
}

/// A process whose command line names `binary` and contains `needle`.
pub fn pid_of(binary: &str, needle: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains(binary) && cmd.contains(needle) {
            return Some(pid);
        }
    }
    None
}

/// Resident memory of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// peft's greedy tokens of fixture adapter `adapter` on golden prompt `p`.
pub fn peft_greedy(adapter: &str, p: usize) -> Vec<u32> {
    let bytes = std::fs::read(fixtures().join("adapters/golden_lora.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{adapter}.p{p}.greedy")).unwrap();
    t.data()
        .chunks_exact(8)
        .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
        .collect()
}
