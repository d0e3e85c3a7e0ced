//! Mixed steps and chunked prefill on the CPU engine: the cases of `chunked_cases` (the same tokens as
//! whole-prompt prefill then decode for prompt budgets of 1 to 64 tokens, logprobs within 1e-4; `decode`
//! skips prefilling sequences; a failed step adds nothing). `cuda_chunked.rs` runs them on CUDA.
#![allow(clippy::unwrap_used)]

mod chunked_cases;
mod common;

use chunked_cases::Setup;
use lorax_engine::backend::{AttnMeta, LoraSegment};
use lorax_engine::comm::Communicator;
use lorax_engine::weights::HostTensor;
use lorax_engine::{Backend, CpuBackend, CpuTensor, Engine, Result};

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
fn steps_launched_ahead_match_prefill_then_decode() {
    chunked_cases::steps_launched_ahead_match_prefill_then_decode(&setup(), &setup(), true);
}

#[test]
fn prompts_mid_prefill_wait_for_the_step_after_one_launched_ahead() {
    chunked_cases::prompts_mid_prefill_wait_for_the_step_after_one_launched_ahead(&setup(), &setup());
}

#[test]
fn decode_skips_prefilling_sequences() {
    chunked_cases::decode_skips_prefilling_sequences(&setup());
}

#[test]
fn failed_step_adds_nothing() {
    chunked_cases::failed_step_adds_nothing(&setup());
}

/// The CPU backend, except that decode steps run padded to a multiple of 8 rows (as CUDA graph steps are
/// padded to their row counts).
struct Padded;

impl Backend for Padded {
    type Tensor = CpuTensor;
    type LoraIndex = ();
    type LoraStep = ();

    fn name(&self) -> String {
        "padded cpu".into()
    }
    fn decode_rows(&self, rows: usize) -> usize {
        rows.next_multiple_of(8)
    }
    fn weight(&self, t: &HostTensor<'_>) -> Result<CpuTensor> {
        CpuBackend.weight(t)
    }
    fn tensor_from_f32(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
        CpuBackend.tensor_from_f32(shape, data)
    }
    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        CpuBackend.to_f32(t)
    }
    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        CpuBackend.zeros(shape)
    }
    fn shape<'a>(&self, t: &'a CpuTensor) -> &'a [usize] {
        &t.shape
    }
    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        CpuBackend.embedding(table, ids)
    }
    fn linear(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        CpuBackend.linear(x, w, bias)
    }
    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        CpuBackend.rms_norm(x, w, eps)
    }
    fn add_rms_norm(&self, residual: &mut CpuTensor, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        CpuBackend.add_rms_norm(residual, x, w, eps)
    }
    fn add_assign(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
        CpuBackend.add_assign(dst, src)
    }
    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        CpuBackend.silu_mul(gate_up)
    }
    fn rope_kv_write(
        &self,
        qkv: &CpuTensor,
        k_cache: &mut CpuTensor,
        v_cache: &mut CpuTensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
    ) -> Result<CpuTensor> {
        CpuBackend.rope_kv_write(qkv, k_cache, v_cache, head_dim, positions, inv_freq, slots)
    }
    fn concat_rows(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        CpuBackend.concat_rows(parts)
    }
    fn attention(&self, q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, meta: &AttnMeta<'_>) -> Result<CpuTensor> {
        CpuBackend.attention(q, k, v, meta)
    }
    fn lora(&self, y: &mut CpuTensor, x: &CpuTensor, segments: &[LoraSegment<'_, CpuTensor>]) -> Result<()> {
        CpuBackend.lora(y, x, segments)
    }
    fn all_reduce_sum(&self, t: &mut CpuTensor, comm: &dyn Communicator) -> Result<()> {
        CpuBackend.all_reduce_sum(t, comm)
    }
    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        CpuBackend.gather_rows(x, rows)
    }
}

#[test]
fn padded_decode_steps_match_unpadded() {
    let padded = Setup {
        engine: &|| chunked_cases::engine(Padded, &common::fixtures()),
        fixtures: common::fixtures(),
    };
    chunked_cases::padded_decode_matches_unpadded(&setup(), &padded);
}
