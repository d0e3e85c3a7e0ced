//! `lorax-bench`: load generator against a running server, and a generator of random PEFT adapters.
//!
//!   lorax-bench run --url http://127.0.0.1:3000 --requests 512 --concurrency 128 \
//!       --prompt-tokens 512 --output-tokens 256 --popularity zipf:1 --num-adapters 1000 \
//!       --adapter-id-template 'adapter-{i}' --adapter-source local --out zipf.json
//!   lorax-bench make-adapters --config config.json --count 1000 --rank 16 \
//!       --targets q_proj,k_proj,v_proj,o_proj --out adapters/

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lorax_bench::report::{markdown, Report};
use lorax_bench::run::{run, Mode, PromptSource, RunConfig};
use lorax_bench::workload::{requests, AdapterPicker, Lengths, Popularity};

#[derive(Parser)]
#[command(version, about = "Benchmarks a lorax server; makes random PEFT adapters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send a workload and report throughput and latency (markdown on stdout, JSON with --out).
    Run(RunArgs),
    /// Write random PEFT LoRA adapters for a base model's config.json.
    MakeAdapters(MakeArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Requests to send (after the warm-up).
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// Closed loop: requests in flight at once.
    #[arg(long, default_value_t = 32, conflicts_with = "rate")]
    concurrency: usize,
    /// Open loop: Poisson arrivals, requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Prompt length: N, uniform:A:B, normal:MEAN:SD or exp:MEAN tokens.
    #[arg(long, default_value = "512")]
    prompt_tokens: Lengths,
    /// Output length (EOS ignored), same forms.
    #[arg(long, default_value = "256")]
    output_tokens: Lengths,
    /// Adapter popularity: none, identical, uniform, zipf:ALPHA or distinct.
    #[arg(long, default_value = "none")]
    popularity: Popularity,
    /// Number of adapters the popularity spreads over.
    #[arg(long, default_value_t = 0)]
    num_adapters: usize,
    /// Adapter id of number i ({i} is replaced).
    #[arg(long, default_value = "adapter-{i}")]
    adapter_id_template: String,
    /// adapter_source of adapter requests (hub or local); the server's default when absent.
    #[arg(long)]
    adapter_source: Option<String>,
    /// Requests sent first and not counted (closed loop, same concurrency), numbered after the measured
    /// ones (an all-distinct warm-up uses adapters the measured requests do not).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Number of the first request (`--popularity distinct` gives request i adapter i mod N): a separate
    /// warm-up run can take adapters a later run does not use.
    #[arg(long, default_value_t = 0)]
    first_request: usize,
    /// Seed of lengths, adapters, prompts and arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// Name of the run in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// Write the report (with every request's timings) as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct MakeArgs {
    /// The base model's config.json.
    #[arg(long)]
    config: PathBuf,
    /// How many adapters.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// lora_alpha (default: twice the rank).
    #[arg(long)]
    alpha: Option<f64>,
    /// Target projections, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj")]
    targets: Vec<String>,
    /// Storage type: float16, bfloat16 or float32.
    #[arg(long, default_value = "float16")]
    dtype: String,
    /// Folder name of adapter i ({i} is replaced).
    #[arg(long, default_value = "adapter-{i}")]
    name_template: String,
    /// Where the folders go.
    #[arg(long)]
    out: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Writer threads (default: the CPUs).
    #[arg(long)]
    threads: Option<usize>,
}

async fn bench(a: RunArgs) -> anyhow::Result<()> {
    let client = lorax_client::Client::new(a.url.clone())?;
    let picker = AdapterPicker::new(a.popularity.clone(), a.num_adapters);
    if a.popularity != Popularity::Base && a.num_adapters == 0 {
        anyhow::bail!("--popularity {:?} needs --num-adapters", a.popularity);
    }
    let (first, lengths) = (a.first_request, (&a.prompt_tokens, &a.output_tokens));
    let warm = requests(a.warmup, first + a.requests, lengths.0, lengths.1, &picker, a.seed ^ 1);
    let work = requests(a.requests, first, lengths.0, lengths.1, &picker, a.seed);
    let longest = work
        .iter()
        .chain(&warm)
        .map(|r| r.prompt_tokens as usize)
        .max()
        .unwrap_or(1);
    let prompts = PromptSource::new(&client, longest * 4, a.seed).await?;
    let mode = match a.rate {
        Some(rate) if rate > 0.0 => Mode::Poisson { rate },
        Some(rate) => anyhow::bail!("--rate {rate} must be positive"),
        None => Mode::Closed {
            concurrency: a.concurrency,
        },
    };
    let cfg = RunConfig {
        url: a.url.clone(),
        mode,
        adapter_ids: (0..a.num_adapters)
            .map(|i| a.adapter_id_template.replace("{i}", &i.to_string()))
            .collect(),
        adapter_source: a.adapter_source.clone(),
        timeout: Duration::from_secs_f64(a.timeout_s),
        seed: a.seed,
    };
    if !warm.is_empty() {
        let warm_cfg = RunConfig {
            mode: Mode::Closed {
                concurrency: a.concurrency,
            },
            ..cfg.clone()
        };
        run(&client, &warm_cfg, &prompts, &warm).await;
    }
    let (outcomes, secs) = run(&client, &cfg, &prompts, &work).await;
    let settings: BTreeMap<String, String> = [
        ("url", a.url.clone()),
        ("mode", format!("{mode:?}")),
        ("prompt_tokens", format!("{:?}", a.prompt_tokens)),
        ("output_tokens", format!("{:?}", a.output_tokens)),
        ("popularity", format!("{:?}", a.popularity)),
        ("num_adapters", a.num_adapters.to_string()),
        ("seed", a.seed.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let report = Report::new(&a.label, &outcomes, secs, settings);
    print!("{}", markdown(std::slice::from_ref(&report)));
    if let Some(path) = a.out {
        let doc = serde_json::json!({"report": report, "requests": outcomes});
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

fn make(a: MakeArgs) -> anyhow::Result<()> {
    let cfg = lorax_engine::config::ModelConfig::from_file(&a.config)?;
    let spec = lorax_bench::adapters::AdapterSpec {
        rank: a.rank,
        alpha: a.alpha.unwrap_or(2.0 * a.rank as f64),
        targets: a.targets,
        dtype: a.dtype,
        base_model: a.config.parent().map(|p| p.display().to_string()).unwrap_or_default(),
    };
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let t = std::time::Instant::now();
    let dirs = lorax_bench::adapters::write_adapters(&a.out, &cfg, &spec, a.count, &a.name_template, a.seed, threads)?;
    eprintln!(
        "wrote {} adapters under {} in {:.1} s",
        dirs.len(),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(a) => bench(a).await,
        Command::MakeAdapters(a) => make(a),
    }
}
