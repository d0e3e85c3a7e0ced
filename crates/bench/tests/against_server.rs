//! lorax-bench against a real server: the launcher with the embedded model on the CPU, and adapters that
//! `make-adapters` wrote, loaded from a local root. Needs the workspace binaries
//! (`cargo build --workspace --bins`, as .ci/test.sh does first).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lorax_bench::adapters::{write_adapters, AdapterSpec};
use lorax_bench::report::Report;
use lorax_bench::run::{run, Mode, PromptSource, RunConfig};
use lorax_bench::workload::{requests, AdapterPicker, Lengths, Popularity};

/// A binary of the workspace, next to this test's deps folder.
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(tmp: &Path, adapters: &Path) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(tmp.join("server.log")).unwrap();
    let child = Command::new(bin("lorax-launcher"))
        .args([
            "--port",
            &port.to_string(),
            "--hostname",
            "127.0.0.1",
            "--device",
            "cpu",
        ])
        .arg(format!("--shard-uds-dir={}", tmp.join("uds").display()))
        .arg(format!("--embedded-dir={}", tmp.display()))
        .arg(format!("--adapter-local-roots={}", adapters.display()))
        .args([
            "--max-input-length",
            "256",
            "--max-total-tokens",
            "512",
            "--max-batch-prefill-tokens",
            "512",
        ])
        .args(["--num-blocks", "256", "--max-active-adapters", "4"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let server = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = lorax_client::Client::new(base.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while client.health().await.is_err() {
        assert!(Instant::now() < deadline, "server did not become healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, base)
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_loop_and_poisson_runs_over_distinct_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    let cfg = lorax_engine::config::ModelConfig::from_file(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/llama/config.json"
    )))
    .unwrap();
    let spec = AdapterSpec {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        dtype: "float16".into(),
        base_model: "embedded".into(),
    };
    write_adapters(&adapters, &cfg, &spec, 6, "a-{i}", 3, 2).unwrap();
    let (_server, base) = start(tmp.path(), &adapters).await;
    let client = lorax_client::Client::new(base.clone()).unwrap();

    // Prompts have the asked number of tokens (give or take a merge at the cut).
    let prompts = PromptSource::new(&client, 400, 1).await.unwrap();
    for start in [0, 17, 250] {
        let n = client.tokenize(prompts.prompt(20, start), false).await.unwrap().len();
        assert!((19..=21).contains(&n), "a 20-token prompt has {n} tokens");
    }

    // Closed loop, every request on its own adapter in turn.
    let picker = AdapterPicker::new(Popularity::Distinct, 6);
    let work = requests(24, 0, &Lengths::Fixed(20), &Lengths::Fixed(6), &picker, 5);
    let cfg = RunConfig {
        url: base.clone(),
        mode: Mode::Closed { concurrency: 6 },
        adapter_ids: (0..6).map(|i| format!("a-{i}")).collect(),
        adapter_source: Some("local".into()),
        timeout: Duration::from_secs(120),
        seed: 9,
    };
    let (outcomes, secs) = run(&client, &cfg, &prompts, &work).await;
    for o in &outcomes {
        assert_eq!(o.error, None);
        assert_eq!(o.received, 6);
        assert_eq!(o.itl.len(), 5);
        assert!(o.ttft.unwrap() <= o.e2e);
    }
    let r = Report::new("distinct", &outcomes, secs, Default::default());
    assert_eq!((r.completed, r.output_tokens, r.distinct_adapters), (24, 144, 6));
    assert!(r.ttft_ms.p50 > 0.0 && r.tpot_ms.p50 > 0.0 && r.output_tok_s > 0.0);

    // Open loop: Poisson arrivals on the base model; a missing adapter is counted as its error.
    let mut work = requests(
        10,
        0,
        &Lengths::Fixed(8),
        &Lengths::Fixed(3),
        &AdapterPicker::new(Popularity::Base, 0),
        6,
    );
    work[4].adapter = Some(0);
    let cfg = RunConfig {
        mode: Mode::Poisson { rate: 40.0 },
        adapter_ids: vec!["no-such-adapter".into()],
        ..cfg
    };
    let (outcomes, secs) = run(&client, &cfg, &prompts, &work).await;
    let r = Report::new("poisson", &outcomes, secs, Default::default());
    assert_eq!(r.completed, 9);
    assert_eq!(r.errors.get("adapter_not_found"), Some(&1), "{:?}", r.errors);
    let sent: Vec<f64> = outcomes.iter().map(|o| o.sent_at).collect();
    assert!(
        sent.windows(2).all(|w| w[0] <= w[1] + 0.05),
        "arrivals in order: {sent:?}"
    );

    // The binary: markdown on stdout, JSON report.
    let json = tmp.path().join("r.json");
    let out = Command::new(bin("lorax-bench"))
        .args([
            "run",
            "--url",
            &base,
            "--requests",
            "8",
            "--concurrency",
            "4",
            "--prompt-tokens",
            "uniform:8:16",
        ])
        .args([
            "--output-tokens",
            "4",
            "--popularity",
            "uniform",
            "--num-adapters",
            "6",
            "--adapter-id-template",
        ])
        .args(["a-{i}", "--adapter-source", "local", "--label", "cli", "--out"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| cli | 8/8 | 0 |"), "{stdout}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["report"]["completed"], 8);
    assert_eq!(doc["requests"].as_array().unwrap().len(), 8);
}
