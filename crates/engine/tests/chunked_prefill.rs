//! Mixed steps and chunked prefill on the CPU engine: the cases of `chunked_cases` (the same tokens as
//! whole-prompt prefill then decode for prompt budgets of 1 to 64 tokens, logprobs within 1e-4; `decode`
//! skips prefilling sequences; a failed step adds nothing). `cuda_chunked.rs` runs them on CUDA.
#![allow(clippy::unwrap_used)]

mod chunked_cases;
mod common;

use chunked_cases::Setup;
use lorax_engine::{CpuBackend, Engine};

fn cpu() -> Engine<CpuBackend> {
    chunked_cases::engine(CpuBackend, &common::fixtures())
}

fn setup() -> Setup<'static, CpuBackend> {
    Setup {
        engine: &cpu,
        fixtures: common::fixtures(),
    }
}

#[test]
fn chunked_mixed_steps_match_prefill_then_decode() {
    chunked_cases::mixed_steps_match_prefill_then_decode(&setup());
}

#[test]
fn decode_skips_prefilling_sequences() {
    chunked_cases::decode_skips_prefilling_sequences(&setup());
}

#[test]
fn failed_step_adds_nothing() {
    chunked_cases::failed_step_adds_nothing(&setup());
}
