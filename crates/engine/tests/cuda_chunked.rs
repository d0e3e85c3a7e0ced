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

/// An engine whose decode steps are not launched by the step before's sampling.
fn cuda_unfed() -> Engine<CudaBackend> {
    let e = cuda();
    e.backend.set_graph_feed(false);
    e
}

/// An engine whose decode steps are launched by the step before's sampling (`LORAX_CUDA_GRAPH_FEED`, on by default).
fn cuda_fed() -> Engine<CudaBackend> {
    let e = cuda();
    e.backend.set_graph_feed(true);
    // Graphs captured at their second step (the default, pinned): steps are launched ahead by the joins at steps 4
    // and 9 of the case, whose prompts then wait (`FeedCounts::deferred`).
    e.backend.set_graph_capture_after(2);
    e
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

/// Decode steps launched on the device by the step before's sampling, their token ids gathered there, serve the
/// next steps' decode rows (all, or some as sequences leave and join) with the generations of steps that are not.
#[test]
fn steps_launched_ahead_match_prefill_then_decode() {
    if setup().is_some() {
        let (plain, fed) = (
            Setup {
                engine: &cuda_unfed,
                fixtures: cuda_common::fixtures(),
            },
            Setup {
                engine: &cuda_fed,
                fixtures: cuda_common::fixtures(),
            },
        );
        chunked_cases::steps_launched_ahead_match_prefill_then_decode(&plain, &fed, false);
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
