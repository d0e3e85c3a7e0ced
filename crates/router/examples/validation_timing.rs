//! How long validating a 1000-token prompt takes on this machine, and its parts: the repo's Mistral
//! tokenizer in one pass (`encode`, `encode_fast`), word by word in pieces on a pool of 2 threads
//! (`PieceEncoder`, with and without the model's cache of words), and `Validation::validate` on a 2-worker
//! runtime (bench/NOTES.md, sessions 23 and 43).
//!
//! `cargo run --release -p lorax-router --example validation_timing`

use std::sync::Arc;
use std::time::Instant;

use lorax_router::adapters::AdapterSource;
use lorax_router::pieces::PieceEncoder;
use lorax_router::schema::GenerateRequest;
use lorax_router::validation::{Validation, ValidationLimits};

const REPS: u32 = 300;

/// Mean milliseconds of `f` over [`REPS`] runs.
fn mean_ms(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..REPS {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / f64::from(REPS)
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tokenizer/tokenizer.json"
    );
    let tok = Arc::new(tokenizers::Tokenizer::from_file(path)?);
    // English-like filler of at least 1000 tokens (lorax-bench's prompts are of this kind).
    let words = [
        "the",
        "model",
        "serves",
        "adapters,",
        "quickly",
        "and",
        "batches",
        "requests",
        "of",
        "many",
        "kinds.",
    ];
    let (mut text, mut state) = (String::new(), 1_u64);
    while tok.encode(text.as_str(), true)?.len() < 1000 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        text.push_str(words[usize::try_from(state >> 33)? % words.len()]);
        text.push(' ');
    }
    let tokens = tok.encode(text.as_str(), true)?.len();
    println!("prompt: {} bytes, {tokens} tokens; means of {REPS} runs", text.len());
    let one = mean_ms(|| drop(std::hint::black_box(tok.encode(text.as_str(), true))));
    println!("encode, one pass: {one:.3} ms");
    let fast = mean_ms(|| drop(std::hint::black_box(tok.encode_fast(text.as_str(), true))));
    println!("encode_fast, one pass: {fast:.3} ms");
    let pieces =
        PieceEncoder::for_tokenizer(Arc::clone(&tok), 2).ok_or("the tokenizer is not one PieceEncoder takes")?;
    let cut = mean_ms(|| drop(std::hint::black_box(pieces.encode(&text, true))));
    println!("PieceEncoder, 2 threads: {cut:.3} ms");
    // The same with the BPE model's cache of words off: every word merged anew, as for text of words not seen
    // before (the filler repeats eleven).
    let mut uncached = (*tok).clone();
    if let tokenizers::ModelWrapper::BPE(bpe) = uncached.get_model() {
        let mut bpe = bpe.clone();
        bpe.resize_cache(0);
        uncached.with_model(bpe);
    }
    let uncached = PieceEncoder::for_tokenizer(Arc::new(uncached), 2).ok_or("uncached")?;
    let cold = mean_ms(|| drop(std::hint::black_box(uncached.encode(&text, true))));
    println!("PieceEncoder, 2 threads, no cache of words: {cold:.3} ms");

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
    let request: GenerateRequest =
        serde_json::from_value(serde_json::json!({"inputs": text, "parameters": {"max_new_tokens": 1}}))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for _ in 0..20 {
            validation.validate(request.clone(), false).await?;
        }
        let mut total = 0.0;
        for _ in 0..REPS {
            let r = request.clone();
            let t = Instant::now();
            std::hint::black_box(validation.validate(r, false).await?);
            total += t.elapsed().as_secs_f64();
        }
        println!(
            "Validation::validate, 2 workers: {:.3} ms",
            total * 1e3 / f64::from(REPS)
        );
        Ok::<_, Error>(())
    })
}
