//! How long validating a 1000-token prompt takes on this machine, and its parts: the repo's Mistral
//! tokenizer in one pass (`encode`, `encode_fast`), word by word in pieces on a pool of 2 threads
//! (`PieceEncoder`, with and without the model's cache of words), and `Validation::validate` on a 2-worker
//! runtime (bench/NOTES.md, sessions 23 and 43). The prompts are lorax-bench's kind of filler (pseudo-words
//! of one to three syllables, about 14,000 of them), a different one each run, as a server sees them: the
//! model's cache of words fills over a first round of the prompts and answers more in a second (both timed;
//! the figure with no cache at all is the uncached one). Then the one pass and `PieceEncoder` after 20 ms of sleep
//! and after 20 ms of spinning before each prompt, and `Validation::validate` after 20 ms of sleep, as the TTFT test
//! sends them one at a time (session 49, the 2-core development machine: 1.6 to 5 times the back-to-back
//! figures after sleep, the one pass on a single thread too, so not the pool's threads waking; bench/NOTES.md).
//!
//! `cargo run --release -p lorax-router --example validation_timing [TOKENIZER_JSON]` (default: the repo's
//! tests/fixtures/tokenizer/tokenizer.json; scripts/gpu/build.sh packs the binary, whose built-in path is gone
//! on the GPU machine, so runs there name it: next_call.sh `validation`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lorax_router::adapters::AdapterSource;
use lorax_router::pieces::PieceEncoder;
use lorax_router::schema::GenerateRequest;
use lorax_router::validation::{Validation, ValidationLimits};

/// Prompts, each timed once a method.
const PROMPTS: usize = 300;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the thread does before each timed call.
#[derive(Clone, Copy)]
enum Rest {
    /// Nothing: the calls run back to back.
    None,
    /// Sleeps for [`REST`] (as the TTFT test's requests come, one at a time).
    Sleep,
    /// Spins for [`REST`]: the core kept busy, nothing else touching its caches.
    Spin,
}

/// The rest before each call of the rounds that take one, and the prompts they time.
const REST: Duration = Duration::from_millis(20);
const RESTED: usize = 100;

impl Rest {
    fn take(self) {
        match self {
            Rest::None => {}
            Rest::Sleep => std::thread::sleep(REST),
            Rest::Spin => {
                let t = Instant::now();
                while t.elapsed() < REST {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// The prompts a round with this rest times (all of them back to back, [`RESTED`] otherwise).
    fn of<T>(self, all: &[T]) -> &[T] {
        match self {
            Rest::None => all,
            _ => &all[..RESTED],
        }
    }
}

/// Mean milliseconds of `f` over the prompts, with `rest` before each call (not timed).
fn mean_ms(prompts: &[String], rest: Rest, mut f: impl FnMut(&str)) -> f64 {
    let prompts = rest.of(prompts);
    let mut total = Duration::ZERO;
    for p in prompts {
        rest.take();
        let t = Instant::now();
        f(p);
        total += t.elapsed();
    }
    total.as_secs_f64() * 1e3 / prompts.len() as f64
}

/// lorax-bench's filler (crates/bench/src/run.rs): pseudo-words of 1-3 syllables, a comma after one in nine, a
/// newline before one in twelve; about 420 words make 1000 tokens.
fn filler(words: usize, state: &mut u64) -> String {
    const SYLLABLES: [&str; 24] = [
        "ka", "lo", "ren", "ti", "sol", "mar", "en", "vi", "do", "ra", "qui", "ne", "tor", "la", "mi", "sen", "pa",
        "ro", "ve", "lin", "cor", "da", "ul", "fe",
    ];
    let mut below = |n: usize| {
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (*state >> 33) as usize % n
    };
    let mut s = String::new();
    for w in 0..words {
        if w > 0 {
            s.push(if below(12) == 0 { '\n' } else { ' ' });
        }
        for _ in 0..1 + below(3) {
            s.push_str(SYLLABLES[below(SYLLABLES.len())]);
        }
        if below(9) == 0 {
            s.push(',');
        }
    }
    s
}

fn main() -> Result<(), Error> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer/tokenizer.json"
        )
        .to_string()
    });
    let tok = Arc::new(tokenizers::Tokenizer::from_file(&path)?);
    let mut state = 1_u64;
    let prompts: Vec<String> = (0..PROMPTS).map(|_| filler(440, &mut state)).collect();
    let tokens: usize = prompts
        .iter()
        .map(|p| tok.encode(p.as_str(), true).map_or(0, |e| e.len()))
        .sum();
    let bytes: usize = prompts.iter().map(String::len).sum();
    println!(
        "{PROMPTS} prompts of {} bytes and {} tokens on average, each timed once a method",
        bytes / PROMPTS,
        tokens / PROMPTS
    );
    let one = mean_ms(&prompts, Rest::None, |p| {
        drop(std::hint::black_box(tok.encode(p, true)))
    });
    println!("encode, one pass: {one:.3} ms");
    let fast = mean_ms(&prompts, Rest::None, |p| {
        drop(std::hint::black_box(tok.encode_fast(p, true)))
    });
    println!("encode_fast, one pass: {fast:.3} ms");
    let pieces =
        PieceEncoder::for_tokenizer(Arc::clone(&tok), 2).ok_or("the tokenizer is not one PieceEncoder takes")?;
    let first = mean_ms(&prompts, Rest::None, |p| {
        drop(std::hint::black_box(pieces.encode(p, true)))
    });
    println!("PieceEncoder, 2 threads, first round (the cache of words filling): {first:.3} ms");
    let warm = mean_ms(&prompts, Rest::None, |p| {
        drop(std::hint::black_box(pieces.encode(p, true)))
    });
    println!("PieceEncoder, 2 threads, second round: {warm:.3} ms");
    // The same with the BPE model's cache of words off: every word merged anew.
    let mut uncached = (*tok).clone();
    if let tokenizers::ModelWrapper::BPE(bpe) = uncached.get_model() {
        let mut bpe = bpe.clone();
        bpe.resize_cache(0);
        uncached.with_model(bpe);
    }
    let uncached = PieceEncoder::for_tokenizer(Arc::new(uncached), 2).ok_or("uncached")?;
    let cold = mean_ms(&prompts, Rest::None, |p| {
        drop(std::hint::black_box(uncached.encode(p, true)))
    });
    println!("PieceEncoder, 2 threads, no cache of words: {cold:.3} ms");

    // The one pass and the pieces with 20 ms of rest before each prompt, slept and spun.
    for (rest, how) in [(Rest::Sleep, "20 ms of sleep"), (Rest::Spin, "20 ms of spinning")] {
        let one = mean_ms(&prompts, rest, |p| drop(std::hint::black_box(tok.encode(p, true))));
        println!("encode, one pass, after {how}: {one:.3} ms");
        let piece = mean_ms(&prompts, rest, |p| drop(std::hint::black_box(pieces.encode(p, true))));
        println!("PieceEncoder, 2 threads, after {how}: {piece:.3} ms");
    }
    let limits = ValidationLimits {
        max_input_length: 1100,
        max_total_tokens: 1400,
        max_stop_sequences: 4,
        max_new_tokens_default: 100,
        default_adapter_source: AdapterSource::Hub,
        adapters_supported: true,
        vocab_size: 32000,
        base_model_id: "base".into(),
    };
    let validation = Validation::new(Arc::clone(&tok), 2, limits);
    let requests = prompts
        .iter()
        .map(|p| serde_json::from_value(serde_json::json!({"inputs": p, "parameters": {"max_new_tokens": 1}})))
        .collect::<Result<Vec<GenerateRequest>, _>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Two rounds back to back, then one as the TTFT test sends them: one request at a time, after 20 ms of rest
        // on the runtime's timer.
        for (round, rest) in [
            ("first round", Rest::None),
            ("second round", Rest::None),
            ("after 20 ms of sleep", Rest::Sleep),
        ] {
            let rounds = rest.of(&requests);
            let mut total = Duration::ZERO;
            for r in rounds {
                if !matches!(rest, Rest::None) {
                    tokio::time::sleep(REST).await;
                }
                let t = Instant::now();
                std::hint::black_box(validation.validate(r.clone(), false).await?);
                total += t.elapsed();
            }
            println!(
                "Validation::validate, 2 workers, {round}: {:.3} ms",
                total.as_secs_f64() * 1e3 / rounds.len() as f64
            );
        }
        Ok::<_, Error>(())
    })
}
