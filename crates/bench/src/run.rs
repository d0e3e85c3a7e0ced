//! Sending a workload and timing every request.
//!
//! Requests are streamed (`/generate_stream` with `ignore_eos_token`, so each produces exactly its output
//! length), and each message's arrival is timed: the first gives the time to first token (TTFT), the
//! gaps between the others the inter-token latencies (ITL). Prompts are cut from one long text at token
//! boundaries that the server's own `/tokenize` reports, so a prompt of N tokens is N tokens long (give
//! or take a merge at the cut), and each request starts at a different place in the text.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lorax_client::{Client, Parameters};

use crate::workload::Request;
use crate::Rng;

/// How requests are released.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// A closed loop: this many requests in flight, the next sent when one finishes.
    Closed {
        /// Requests in flight.
        concurrency: usize,
    },
    /// Open loop: Poisson arrivals at this many requests per second, however many are in flight.
    Poisson {
        /// Mean arrival rate.
        rate: f64,
    },
}

/// Everything one run needs besides the requests.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The server's base URL.
    pub url: String,
    /// Release of the requests.
    pub mode: Mode,
    /// Adapter ids by index (the workload's adapter numbers index this list).
    pub adapter_ids: Vec<String>,
    /// `adapter_source` sent with adapter requests (`None`: the server's default).
    pub adapter_source: Option<String>,
    /// Per-request deadline.
    pub timeout: Duration,
    /// Seed of the arrival times and prompt offsets.
    pub seed: u64,
}

/// What happened to one request.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// Adapter index, `None` for the base model.
    pub adapter: Option<usize>,
    /// Prompt tokens asked for.
    pub prompt_tokens: u32,
    /// Tokens asked for.
    pub output_tokens: u32,
    /// Tokens received.
    pub received: u32,
    /// Seconds from the start of the run to the request's send.
    pub sent_at: f64,
    /// Seconds to the first token.
    pub ttft: Option<f64>,
    /// Seconds between consecutive tokens.
    pub itl: Vec<f64>,
    /// Seconds from send to the last message.
    pub e2e: f64,
    /// The error, when the request failed (`error_type` or transport error).
    pub error: Option<String>,
}

/// A long text and its token boundaries (byte offsets from the server's tokenizer).
pub struct PromptSource {
    text: String,
    /// (start, stop) byte offsets of each token.
    spans: Vec<(usize, usize)>,
}

/// Deterministic filler: pseudo-words from syllables, so prompts tokenize like ordinary text.
fn filler(words: usize, rng: &mut Rng) -> String {
    const SYLLABLES: [&str; 24] = [
        "ka", "lo", "ren", "ti", "sol", "mar", "en", "vi", "do", "ra", "qui", "ne", "tor", "la", "mi", "sen", "pa",
        "ro", "ve", "lin", "cor", "da", "ul", "fe",
    ];
    let mut s = String::with_capacity(words * 7);
    for w in 0..words {
        if w > 0 {
            s.push(if rng.below(12) == 0 { '\n' } else { ' ' });
        }
        for _ in 0..1 + rng.below(3) {
            s.push_str(SYLLABLES[rng.below(SYLLABLES.len())]);
        }
        if rng.below(9) == 0 {
            s.push(',');
        }
    }
    s
}

impl PromptSource {
    /// A text of at least `min_tokens` tokens as the server tokenizes it.
    pub async fn new(client: &Client, min_tokens: usize, seed: u64) -> anyhow::Result<Self> {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let mut words = min_tokens.max(64);
        loop {
            let text = filler(words, &mut rng);
            let tokens = client.tokenize(&text, false).await?;
            if tokens.len() >= min_tokens {
                let spans = tokens.iter().map(|t| (t.start, t.stop)).collect();
                return Ok(Self { text, spans });
            }
            words *= 2;
        }
    }

    /// A prompt of `n` tokens starting at token `start` (wrapped so it fits).
    pub fn prompt(&self, n: usize, start: usize) -> &str {
        let n = n.clamp(1, self.spans.len());
        let start = start % (self.spans.len() - n + 1);
        &self.text[self.spans[start].0..self.spans[start + n - 1].1]
    }

    /// Tokens in the text.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

async fn one(client: &Client, cfg: &RunConfig, req: &Request, prompt: &str, t0: Instant) -> Outcome {
    let params = Parameters {
        adapter_id: req.adapter.map(|a| cfg.adapter_ids[a].clone()),
        adapter_source: req.adapter.and(cfg.adapter_source.clone()),
        max_new_tokens: Some(req.output_tokens),
        ignore_eos_token: Some(true),
        ..Parameters::default()
    };
    let sent = Instant::now();
    let mut out = Outcome {
        adapter: req.adapter,
        prompt_tokens: req.prompt_tokens,
        output_tokens: req.output_tokens,
        received: 0,
        sent_at: sent.duration_since(t0).as_secs_f64(),
        ttft: None,
        itl: Vec::with_capacity(req.output_tokens as usize),
        e2e: 0.0,
        error: None,
    };
    let result = tokio::time::timeout(cfg.timeout, async {
        let mut stream = client.generate_stream(prompt, &params).await?;
        let mut last = sent;
        while let Some(msg) = stream.next().await {
            msg?;
            let now = Instant::now();
            if out.ttft.is_none() {
                out.ttft = Some(now.duration_since(sent).as_secs_f64());
            } else {
                out.itl.push(now.duration_since(last).as_secs_f64());
            }
            last = now;
            out.received += 1;
        }
        Ok::<(), lorax_client::Error>(())
    })
    .await;
    out.e2e = sent.elapsed().as_secs_f64();
    match result {
        Err(_) => out.error = Some(format!("timeout after {:?}", cfg.timeout)),
        Ok(Err(lorax_client::Error::Api(e))) => {
            out.error = Some(e.error_type.unwrap_or_else(|| format!("HTTP {:?}", e.http_status)));
        }
        Ok(Err(e)) => out.error = Some(format!("transport: {e}")),
        Ok(Ok(())) if out.received < req.output_tokens => {
            out.error = Some(format!(
                "short stream: {} of {} tokens",
                out.received, req.output_tokens
            ));
        }
        Ok(Ok(())) => {}
    }
    out
}

/// Sends `requests` as `cfg` says; returns the outcomes in request order and the run's wall time.
pub async fn run(
    client: &Client,
    cfg: &RunConfig,
    prompts: &PromptSource,
    requests: &[Request],
) -> (Vec<Outcome>, f64) {
    let t0 = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let starts: Vec<usize> = requests.iter().map(|_| rng.below(prompts.len().max(1))).collect();
    let results: Vec<Outcome> = match cfg.mode {
        Mode::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let workers = (0..concurrency.max(1)).map(|_| {
                let next = Arc::clone(&next);
                let starts = &starts;
                async move {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(req) = requests.get(i) else { break };
                        let prompt = prompts.prompt(req.prompt_tokens as usize, starts[i]);
                        done.push((i, one(client, cfg, req, prompt, t0).await));
                    }
                    done
                }
            });
            let mut all: Vec<(usize, Outcome)> =
                futures::future::join_all(workers).await.into_iter().flatten().collect();
            all.sort_by_key(|(i, _)| *i);
            all.into_iter().map(|(_, o)| o).collect()
        }
        Mode::Poisson { rate } => {
            let mut at = 0.0;
            let tasks = requests.iter().enumerate().map(|(i, req)| {
                at += rng.exponential(1.0 / rate);
                let when = t0 + Duration::from_secs_f64(at);
                let prompt = prompts.prompt(req.prompt_tokens as usize, starts[i]);
                async move {
                    tokio::time::sleep_until(when.into()).await;
                    one(client, cfg, req, prompt, t0).await
                }
            });
            futures::future::join_all(tasks.collect::<Vec<_>>()).await
        }
    };
    (results, t0.elapsed().as_secs_f64())
}
