//! Mixed steps and chunked prefill on the CUDA engine (f32 storage, the golden tests' bar): the cases of
//! `chunked_cases`, which `chunked_prefill.rs` runs on the CPU. The plain path's decode steps go through
//! CUDA graphs; mixed steps run eagerly, with decode rows next to prompt chunks (tensor-core prefill
//! attention for chunks of 16 tokens or more, the paged kernel for the rest). Skipped, visibly, without a
//! GPU.
#![allow(clippy::unwrap_used)]

mod chunked_cases;
mod common;
mod cuda_common;

use chunked_cases::Setup;
use cuda_common::backend;
use lorax_engine::weights::DType;
use lorax_engine::{CudaBackend, Engine};

fn cuda() -> Engine<CudaBackend> {
    chunked_cases::engine(backend(DType::F32).unwrap(), &cuda_common::fixtures())
}

/// The cases on CUDA, or `None` (after saying so) without a device.
fn setup() -> Option<Setup<'static, CudaBackend>> {
    backend(DType::F32)?;
    Some(Setup {
        engine: &cuda,
        fixtures: cuda_common::fixtures(),
    })
}

#[test]
fn chunked_mixed_steps_match_prefill_then_decode() {
    if let Some(s) = setup() {
        chunked_cases::mixed_steps_match_prefill_then_decode(&s);
    }
}

#[test]
fn decode_skips_prefilling_sequences() {
    if let Some(s) = setup() {
        chunked_cases::decode_skips_prefilling_sequences(&s);
    }
}

#[test]
fn failed_step_adds_nothing() {
    if let Some(s) = setup() {
        chunked_cases::failed_step_adds_nothing(&s);
    }
}
