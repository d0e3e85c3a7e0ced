//! The CUDA backend: tensors in device memory in bf16, f16 or f32 (f32 accumulation everywhere),
//! cuBLAS for the GEMMs of `linear`, and NVRTC-compiled kernels from `kernels/*.cu` for the rest
//! (RMSNorm fused with the residual add, rotary embedding, SiLU-and-multiply, the paged KV write,
//! paged attention with GQA and split contexts, SGMV LoRA shrink/expand, gathers, and sampling).
//!
//! cudarc loads the CUDA libraries at run time, so this compiles and links with no CUDA installed;
//! [`CudaBackend::probe`] looks for the driver and a device without panicking (cudarc panics on first use
//! of a missing library), and [`CudaBackend::new`] reports what is missing as an error.
//!
//! One stream per backend; all work is issued on it in order, so no event tracking is needed (cudarc's is
//! turned off: it would create events per allocation and launch). The one exception is
//! [`Backend::upload_many`] (adapters, from the shard's loading threads): it copies on a second stream
//! and waits for the copy before returning its tensors. Metadata (ids, positions, slots, block
//! tables, LoRA segment tables) is validated on the host, then uploaded with each call.
//!
//! Switches (environment): `LORAX_CUDA_POISON=1` fills every new tensor with NaN bytes so unwritten
//! outputs show; `LORAX_CUDA_SYNC=1` synchronises after every launch so a fault names its kernel;
//! `LORAX_CUDA_PREFILL=simple` keeps prefill off the tensor-core kernel; `LORAX_CUDA_GRAPHS=0` turns
//! decode-step CUDA graphs off (graph.rs); `LORAX_CUDA_ATTN` picks the GQA attention kernels at head size
//! 128 (`tc`, default: on the tensor cores; `l8`; `l16`).

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    result as drv_result, sys as drv_sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{AttnMeta, Backend, LoraSegment};
use crate::error::{EngineError, Result};
use crate::weights::{DType, HostTensor};
use compile::{Compiler, Source, HOPPER_SOURCES, SOURCES};

/// Tokens per attention chunk, the unit contexts are split in (ATTN_CHUNK in kernels/attention.cu).
const ATTN_CHUNK: usize = 64;
/// Threads of an attention block (ATTN_THREADS in kernels/attention.cu).
const ATTN_THREADS: u32 = 128;
/// Attention kernels: (head size, query heads per block) as instantiated in kernels/attention.cu.
pub const ATTN_KERNELS: [(usize, usize); 21] = [
    (8, 2),
    (8, 4),
    (8, 8),
    (16, 2),
    (16, 4),
    (16, 8),
    (32, 8),
    (64, 1),
    (64, 2),
    (64, 4),
    (64, 8),
    (80, 8),
    (96, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 8),
    (256, 1),
    (256, 2),
    (256, 4),
    (256, 8),
];
/// Paged-attention kernels for GQA at head size 128 (every other shape has one kernel per head count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Keys and values straight into registers, 16 lanes per token (`LORAX_CUDA_ATTN=l16`).
    Lanes16,
    /// The same with 8 lanes per token (`l8`; f32 backends use it in place of [`AttnKernel::Tensor`]).
    Lanes8,
    /// The group's query heads as the rows of tensor-core (mma.sync) tiles, keys and values straight into
    /// operand registers (`tc`, the default; bf16/f16 only: an f32 backend uses [`AttnKernel::Lanes8`]).
    Tensor,
}

impl AttnKernel {
    /// All of them, for tests and benchmarks.
    pub const ALL: [AttnKernel; 3] = [Self::Lanes16, Self::Lanes8, Self::Tensor];

    /// `LORAX_CUDA_ATTN` (unset: [`AttnKernel::Tensor`]); an unknown value is an error naming the choices.
    fn from_env() -> Result<Self> {
        match std::env::var("LORAX_CUDA_ATTN").as_deref() {
            Err(_) | Ok("tc") => Ok(Self::Tensor),
            Ok("l8") => Ok(Self::Lanes8),
            Ok("l16") => Ok(Self::Lanes16),
            Ok(other) => Err(EngineError::Backend(format!(
                "LORAX_CUDA_ATTN={other:?}: expected tc, l8 or l16"
            ))),
        }
    }

    /// The kernel-name suffix of this family (`paged_attention_128_<heads><suffix>`).
    fn suffix(self) -> &'static str {
        match self {
            Self::Lanes16 => "",
            Self::Lanes8 => "_l8",
            Self::Tensor => "_tc",
        }
    }
}

/// Tile shapes of the tensor-core prefill kernel (kernels/prefill.cu): warps per block, row groups of 16 query
/// rows a warp (one, Q in registers, or two, Q in shared memory), and keys per step
/// (`LORAX_CUDA_PREFILL_TILE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillShape {
    /// 4 warps (64 rows), 32 keys a step (`w4n32`).
    W4N32,
    /// 4 warps, 64 keys a step (`w4n64`).
    W4N64,
    /// 8 warps (128 rows), 32 keys a step (`w8n32`).
    W8N32,
    /// 8 warps, 64 keys a step (`w8n64`).
    W8N64,
    /// 4 warps of 32 rows (128 rows), 32 keys a step (`w4r2n32`).
    W4R2N32,
    /// 2 warps of 32 rows (64 rows), 32 keys a step (`w2r2n32`).
    W2R2N32,
}

impl PrefillShape {
    /// All of them, for tests and benchmarks.
    pub const ALL: [PrefillShape; 6] = [
        Self::W4N32,
        Self::W4N64,
        Self::W8N32,
        Self::W8N64,
        Self::W4R2N32,
        Self::W2R2N32,
    ];

    /// `LORAX_CUDA_PREFILL_TILE` (unset or `auto`: none, the choice by the launch's prompt tiles of
    /// [`PrefillShape::auto`]); an unknown value is an error naming the choices.
    fn from_env() -> Result<Option<Self>> {
        match std::env::var("LORAX_CUDA_PREFILL_TILE").as_deref() {
            Err(_) | Ok("auto") => Ok(None),
            Ok(v) => Self::ALL.into_iter().find(|s| s.label() == v).map(Some).ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|s| s.label()).collect();
                EngineError::Backend(format!(
                    "LORAX_CUDA_PREFILL_TILE={v:?}: expected auto or one of {}",
                    names.join(", ")
                ))
            }),
        }
    }

    /// The shape for a launch of `tiles128` prefill tiles of 128 rows (over all its prompts): 4 warps of 32
    /// rows and 32 keys a step from 16 such tiles, else 8 warps of 16 rows and 64 keys a step. On the H200
    /// (`cuda_bench prefill_benchmarks`, session 20 call 5, blocks every head's longest tile first) w4r2n32
    /// ran four 512-token prompts in 0.058 ms (w8n64: 0.063), eight in 0.110 (0.123), 4096 tokens in 0.532
    /// (0.567) and 16384 in 8.02 (8.49); one 1000-token prompt (8 tiles) took 0.064 on it against 0.049 on
    /// w8n64, whose blocks of 8 warps fit one a multiprocessor.
    pub fn auto(tiles128: usize) -> Self {
        if tiles128 >= 16 {
            Self::W4R2N32
        } else {
            Self::W8N64
        }
    }

    /// The name `LORAX_CUDA_PREFILL_TILE` takes.
    pub fn label(self) -> &'static str {
        match self {
            Self::W4N32 => "w4n32",
            Self::W4N64 => "w4n64",
            Self::W8N32 => "w8n32",
            Self::W8N64 => "w8n64",
            Self::W4R2N32 => "w4r2n32",
            Self::W2R2N32 => "w2r2n32",
        }
    }

    /// Warps per block.
    pub(crate) fn warps(self) -> usize {
        match self {
            Self::W2R2N32 => 2,
            Self::W4N32 | Self::W4N64 | Self::W4R2N32 => 4,
            Self::W8N32 | Self::W8N64 => 8,
        }
    }

    /// Row groups of 16 query rows a warp: 1 (Q in registers) or 2 (`r2`: Q in shared memory).
    fn row_groups(self) -> usize {
        match self {
            Self::W4R2N32 | Self::W2R2N32 => 2,
            _ => 1,
        }
    }

    /// Query rows per tile (a block's).
    pub(crate) fn rows(self) -> usize {
        16 * self.row_groups() * self.warps()
    }

    /// Keys per step.
    fn keys(self) -> usize {
        match self {
            Self::W4N64 | Self::W8N64 => 64,
            _ => 32,
        }
    }

    /// The kernel at head size `hd` (`prefill_attention_<hd><suffix>`).
    pub(crate) fn kernel(self, hd: usize) -> String {
        match self {
            Self::W4N32 => format!("prefill_attention_{hd}"),
            s => format!("prefill_attention_{hd}_{}", s.label()),
        }
    }

    /// A shape within the default 48 KiB of shared memory a block (for a device that cannot give more).
    pub(crate) fn narrow(self) -> Self {
        match self {
            Self::W8N32 | Self::W8N64 => Self::W8N32,
            _ => Self::W4N32,
        }
    }

    /// Dynamic shared memory of a block: two stages of keys and values, rows of hd + 8 elements, then with
    /// two row groups a warp the tile's queries.
    pub(crate) fn smem_bytes(self, hd: usize, elem: usize) -> usize {
        let q = if self.row_groups() > 1 { self.rows() } else { 0 };
        (2 * 2 * self.keys() + q) * (hd + 8) * elem
    }
}

/// Split counters of attention (rows x KV heads x head chunks of one launch at most; a larger split launch
/// merges its splits with `attn_reduce` instead).
pub(crate) const ATTN_COUNTERS: usize = 1 << 16;

/// Shared memory a LoRA block may use without opting in to more.
const SMEM_LIMIT: usize = 48 * 1024;
/// Rows of a LoRA row tile.
const LORA_ROWS: usize = 16;

/// The skinny-GEMM kernels by rows (kernels/gemv.cu), and their block shape (GEMV_WARPS, GEMV_COLS).
const GEMV_KERNELS: [&str; 4] = ["gemv_1", "gemv_2", "gemv_3", "gemv_4"];
const GEMV_MAX_ROWS: usize = GEMV_KERNELS.len();
/// On the H200 (bench/NOTES.md, session 7) the Mistral-7B shape's linears took 3.75 ms per step on gemv_1
/// against 4.03 on cuBLAS, 3.93 on gemv_2, but 4.46 on gemv_4 against 4.06 on cuBLAS.
const GEMV_DEFAULT_ROWS: usize = 2;
const GEMV_WARPS: usize = 4;
const GEMV_COLS: usize = 2;

/// The wgmma skinny-GEMM kernels (kernels/skinny.cu, Hopper only) and the batch rows each takes
/// (`SKINNY_ROWS`), smallest first: a product of m rows runs on the first whose size is at least m.
const SKINNY_KERNELS: [&str; 7] = [
    "skinny_8",
    "skinny_16",
    "skinny_32",
    "skinny_64",
    "skinny_128",
    "skinny_192",
    "skinny_256",
];
const SKINNY_ROWS: [usize; 7] = [8, 16, 32, 64, 128, 192, 256];
/// kernels/skinny.cu's tile: output features per tile, k per stage, consumer threads (two warpgroups) and
/// threads per block (the consumers and one producer warp).
const SKINNY_BM: usize = 128;
const SKINNY_BK: usize = 64;
const SKINNY_CONSUMERS: usize = 256;
const SKINNY_THREADS: usize = SKINNY_CONSUMERS + 32;
/// Output tiles one skinny product may have (its counters; a vocabulary of 262144 rows in one product).
const SKINNY_MAX_TILES: usize = 2048;

/// The Hopper prompt GEMMs (kernels/gemm_sm90.cu): by [`GemmEpilogue`] a plain product, the gate/up product with
/// silu-mul in its epilogue and a product added into its output (the residual stream), then the silu-mul product
/// with the tokens on the MMA's N side.
const GEMM_SM90_KERNELS: [&str; 4] = ["gemm_sm90", "gemm_sm90_silu", "gemm_sm90_add", "gemm_sm90_silu_t"];
/// Their block (a producer warpgroup and two consumers) and the first three's dynamic shared memory
/// (kernels/gemm_sm90.cu: four stages of 128 rows of x and 256 of w, 64 of k each, and 1 KiB of alignment slack).
const GEMM_SM90_THREADS: u32 = 384;
const GEMM_SM90_SMEM: usize = 4 * (128 + 256) * 64 * 2 + 1024;
/// `gemm_sm90_silu_t`'s tile: tokens (x's rows) by features, and its dynamic shared memory (four stages of 256 rows
/// of w and 144 of x, 64 of k each, and 1 KiB of alignment slack).
const GEMM_SM90_T_TOKENS: usize = 144;
const GEMM_SM90_T_FEATURES: usize = 128;
const GEMM_SM90_T_SMEM: usize = 4 * (256 + 144) * 64 * 2 + 1024;
/// Products of fewer rows stay on cuBLAS (or the decode kernels) by default (`LORAX_CUDA_GEMM_SM90_ROWS`).
const GEMM_SM90_MIN_ROWS: usize = 256;
/// The default's test of a silu product's size: `gemm_sm90_silu_t` runs it only where its tiles fill at least this
/// share of the work they are launched for ([`silu_t_fill`]). Session 45 on H100s, against cuBLAS's gate/up product +
/// `silu_mul` on Mistral-7B's shapes (`bench/results/2026-12-07-s45-1` and `-4`, fill in brackets): faster or equal
/// at 1000 rows (0.982: 0.84-0.89x), 2016 (0.990: 1.00x), 3024 (0.990: 0.97x), 4160 (0.980: 0.86-0.93x); slower at
/// 1152 (0.970: 1.04x), 2160 (0.979: 1.12x), 1440 (0.943), 2048 (0.926), 512 (0.754), and 968 (0.951) faster (0.87x)
/// but left out. The fill does not see cuBLAS's own good sizes (1152, 2160), so the cut sits where no measured size
/// was slower; timing both forms per size at run time would fit better.
const GEMM_SM90_T_MIN_FILL: f64 = 0.98;
/// Rows of x a tile; output columns a tile of the plain product (the silu product's tiles take half as many).
const GEMM_SM90_BM: usize = 128;
const GEMM_SM90_TILE_COLS: usize = 256;

/// The share of `gemm_sm90_silu_t`'s work that is wanted for the silu product of m rows and f features on `sms`
/// multiprocessors: tiles of 144 tokens by 128 features, one block a multiprocessor, so the rows and features past
/// the last whole tile and the idle blocks of the last round are waste.
#[allow(clippy::cast_precision_loss)]
fn silu_t_fill(m: usize, f: usize, sms: usize) -> f64 {
    let (tt, ft) = (m.div_ceil(GEMM_SM90_T_TOKENS), f.div_ceil(GEMM_SM90_T_FEATURES));
    let (units, sms) = (tt * ft, sms.max(1));
    if units == 0 {
        return 0.0;
    }
    let rounds = units.div_ceil(sms);
    (m * f) as f64 / (tt * GEMM_SM90_T_TOKENS * ft * GEMM_SM90_T_FEATURES) as f64 * units as f64 / (rounds * sms) as f64
}

/// Which products run on the Hopper prompt GEMM rather than cuBLAS (`LORAX_CUDA_GEMM_SM90`), for steps of at least
/// its row threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GemmSm90 {
    /// None (the default off Hopper and with f32 storage).
    Off,
    /// The default on Hopper with 16-bit storage (`auto`): the gate/up product with silu-mul in its epilogue on
    /// `gemm_sm90_silu_t`, where the layer's gate/up has no LoRA term in the step and no bias, and only where the
    /// kernel's tiles fill at least [`GEMM_SM90_T_MIN_FILL`] of their work ([`silu_t_fill`]).
    Auto,
    /// The gate/up product with silu-mul in its epilogue at every size from the row threshold, on
    /// `gemm_sm90_silu` or, with [`CudaBackend::set_gemm_sm90_swap`], `gemm_sm90_silu_t` (`silu`).
    Silu,
    /// That, and the o and down products added into the residual stream in their epilogue (then the norm runs
    /// alone), where they have no LoRA term, no bias and one device (`fused`).
    Fused,
    /// Those, and every other linear layer (`all`; for comparisons with cuBLAS).
    All,
}

/// The Hopper prompt GEMM's epilogues, in [`GEMM_SM90_KERNELS`]' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GemmEpilogue {
    Store,
    Silu,
    Add,
}

/// Stages a skinny kernel of `tn` rows keeps in flight (kernels/skinny.cu `SK_STAGES`).
fn skinny_stages(tn: usize) -> usize {
    (196_608 / (SKINNY_BM * SKINNY_BK * 2 + tn * SKINNY_BK * 2)).min(8)
}

/// Dynamic shared memory of a skinny kernel of `tn` rows: its stages and 1 KiB of alignment slack.
fn skinny_smem(tn: usize) -> usize {
    skinny_stages(tn) * (SKINNY_BM * SKINNY_BK * 2 + tn * SKINNY_BK * 2) + 1024
}

/// A TMA tensor map (`CUtensorMap`: 128 opaque bytes), passed to a kernel by value. Aligned as cudarc's
/// `CUtensorMap` (128 bytes, more than the driver's 64), whose size it has.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
pub(crate) struct TmaMap([u64; 16]);

const _: () = assert!(std::mem::size_of::<TmaMap>() == std::mem::size_of::<drv_sys::CUtensorMap>());
const _: () = assert!(std::mem::align_of::<TmaMap>() >= std::mem::align_of::<drv_sys::CUtensorMap>());

// SAFETY: `repr(C)`, 128 bytes of plain words without padding, as the kernels' `const __grid_constant__
// TmaMap` (`__align__(64)`, 128 bytes) takes it by value; only maps `tma_map_2d` encoded are passed, and
// the addresses they hold are of tensors the calling op keeps alive past the launch.
unsafe impl cudarc::driver::DeviceRepr for TmaMap {}

impl graph::SigArg for TmaMap {
    fn sign_into(&self, graphs: &graph::Graphs) {
        graphs.sign(plain_bytes(&self.0));
    }
}

/// The tensor map of a row-major matrix of 16-bit elements at `ptr`, `rows` by `cols` (`cols * 2` bytes a
/// row, a multiple of 16; `ptr` 16-byte aligned), copied in boxes of 64 columns (128 bytes) by `box_rows`
/// rows in the 128-byte swizzle; rows past the end read as zeros.
fn tma_map_2d(dtype: DType, ptr: u64, rows: usize, cols: usize, box_rows: usize) -> Result<TmaMap> {
    let data_type = match dtype {
        DType::BF16 => drv_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => drv_sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => return Err(EngineError::Backend("TMA maps are for 16-bit storage".into())),
    };
    let mut map = TmaMap([0; 16]);
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * 2) as u64];
    #[allow(clippy::cast_possible_truncation)]
    let boxes = [SKINNY_BK as u32, box_rows as u32];
    let element_strides = [1_u32, 1];
    // SAFETY: `map` is an out-record of `CUtensorMap`'s size and alignment (asserted above); the arrays hold
    // rank (2) entries, strides rank - 1; the driver only writes the address into the map (kernels read
    // through it later).
    unsafe {
        drv_sys::cuTensorMapEncodeTiled(
            (&raw mut map).cast::<drv_sys::CUtensorMap>(),
            data_type,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            drv_sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            drv_sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            drv_sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv_sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| drv(&format!("tensor map of {rows} x {cols}"), e))?;
    Ok(map)
}

/// The wgmma skinny GEMM's state: the stream-K partial sums (two slots per block) and the per-tile counters
/// (zero between launches), both owned by the backend and used by one launch at a time (the stream's
/// order; under programmatic dependent launch each kernel waits for the one ahead before touching them).
struct Skinny {
    on: bool,
    _ws: CudaSlice<u8>,
    ws_ptr: u64,
    _counters: CudaSlice<u32>,
    counters_ptr: u64,
}

/// Kernel names of each module, loaded once per backend.
pub const KERNELS: [(&str, &[&str]); 9] = [
    (
        "elementwise",
        &[
            "embedding",
            "rms_norm",
            "add_rms_norm",
            "rope_kv_write",
            "silu_mul",
            "add_assign",
            "add_bias",
            "gather_rows",
            "fill_uniform",
            "fill_dummy",
            "convert_in",
        ],
    ),
    (
        "attention",
        &[
            "paged_attention_8_2",
            "paged_attention_8_4",
            "paged_attention_8_8",
            "paged_attention_16_2",
            "paged_attention_16_4",
            "paged_attention_16_8",
            "paged_attention_32_8",
            "paged_attention_64_1",
            "paged_attention_64_2",
            "paged_attention_64_4",
            "paged_attention_64_8",
            "paged_attention_80_8",
            "paged_attention_96_8",
            "paged_attention_128_1",
            "paged_attention_128_2",
            "paged_attention_128_4",
            "paged_attention_128_8",
            "paged_attention_256_1",
            "paged_attention_256_2",
            "paged_attention_256_4",
            "paged_attention_256_8",
            "paged_attention_128_2_l8",
            "paged_attention_128_4_l8",
            "paged_attention_128_8_l8",
            "paged_attention_128_2_tc",
            "paged_attention_128_4_tc",
            "paged_attention_128_8_tc",
            "paged_attention_128_2_tcr",
            "paged_attention_128_4_tcr",
            "paged_attention_128_8_tcr",
            "attn_reduce",
        ],
    ),
    ("gemv", &GEMV_KERNELS),
    (
        "lora",
        &[
            "sgmv_shrink",
            "sgmv_expand",
            "bgmv_shrink",
            "bgmv_expand",
            "bgmv_shrink_ix",
            "bgmv_shrink_tc1",
            "bgmv_shrink_tc2",
            "bgmv_shrink_tc4",
            "bgmv_expand_ix",
            "bgmv_expand_iy",
            "lora_gemm_rows",
            "bgmv_expand_vx",
            "bgmv_shrink_ix0",
            "bgmv_expand_ix0",
            "lora_shrink_pf2",
            "lora_shrink_pf4",
            "lora_shrink_pf8",
            "lora_expand_pf",
        ],
    ),
    (
        "prefill",
        &[
            "prefill_attention_64",
            "prefill_attention_128",
            "prefill_attention_64_w4n64",
            "prefill_attention_128_w4n64",
            "prefill_attention_64_w8n32",
            "prefill_attention_128_w8n32",
            "prefill_attention_64_w8n64",
            "prefill_attention_128_w8n64",
            "prefill_attention_64_w4r2n32",
            "prefill_attention_128_w4r2n32",
            "prefill_attention_64_w2r2n32",
            "prefill_attention_128_w2r2n32",
        ],
    ),
    ("sampling", &["sample_rows", "feed_tokens"]),
    ("skinny", &SKINNY_KERNELS),
    ("prefill_sm90", &PREFILL_SM90_KERNELS),
    ("gemm_sm90", &GEMM_SM90_KERNELS),
];

/// A form of the Hopper prefill attention (kernels/prefill_sm90.cu; head size 128, 16-bit storage, blocks of
/// [`PREFILL_SM90_ROWS`] query rows, a producer warpgroup that copies the keys and values for two consumer
/// warpgroups): its label (`LORAX_CUDA_PREFILL_SM90`), kernel, keys a step and shared-memory stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrefillSm90 {
    pub label: &'static str,
    pub kernel: &'static str,
    keys: usize,
    stages: usize,
}

impl PrefillSm90 {
    /// Threads a block: the producer warpgroup and two consumers.
    pub fn threads(self) -> u32 {
        384
    }

    /// Dynamic shared memory: two query tiles of 16 KiB, the stages of keys and values (`keys` x 256 bytes
    /// each), 1 KiB of alignment slack, and two mbarriers a stage.
    pub fn smem(self) -> usize {
        2 * 16384 + self.stages * 2 * self.keys * 256 + 1024 + 16 * self.stages
    }

    /// The form labelled `label`.
    pub fn by_label(label: &str) -> Option<Self> {
        PREFILL_SM90_FORMS.into_iter().find(|f| f.label == label)
    }
}

/// The Hopper prefill attention's forms, in the module's kernel order ([`PREFILL_SM90_KERNELS`]). Session 41's
/// forms without a producer warpgroup (labels "64" and "128") were slower in every case and were removed in
/// session 43 (bench/NOTES.md).
pub(crate) const PREFILL_SM90_FORMS: [PrefillSm90; 2] = [
    PrefillSm90 {
        label: "ws64",
        kernel: "prefill_attention_128_sm90_ws",
        keys: 64,
        stages: 4,
    },
    PrefillSm90 {
        label: "ws128",
        kernel: "prefill_attention_128_sm90_ws_n128",
        keys: 128,
        stages: 3,
    },
];
const PREFILL_SM90_KERNELS: [&str; 2] = [PREFILL_SM90_FORMS[0].kernel, PREFILL_SM90_FORMS[1].kernel];
/// The labels of [`PREFILL_SM90_FORMS`], for tests and benchmarks.
pub const PREFILL_SM90_LABELS: [&str; 2] = [PREFILL_SM90_FORMS[0].label, PREFILL_SM90_FORMS[1].label];
pub(crate) const PREFILL_SM90_ROWS: usize = 128;
/// The choice on by default on compute capability 9.0 with 16-bit storage: `ws64`, and `ws128` for launches whose
/// longest prompt reaches [`PREFILL_SM90_LONG_KEYS`] keys.
pub const PREFILL_SM90_DEFAULT: &str = "auto";
/// Keys (cached and new) of a launch's longest prompt from which `auto` runs `ws128`. Session 43 call 2 (an H100,
/// one prompt, µs ws64 / ws128): 1000 tokens 40 / 45, 4096 432 / 435, 8192 1606 / 1583, 16384 6360 / 5612.
pub(crate) const PREFILL_SM90_LONG_KEYS: usize = 8192;

/// The Hopper prefill attention's form for a launch: one form, or (`auto`) one below [`PREFILL_SM90_LONG_KEYS`]
/// and another from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrefillSm90Choice {
    short: PrefillSm90,
    long: PrefillSm90,
}

impl PrefillSm90Choice {
    /// The choice labelled `label`: a form's label ([`PREFILL_SM90_LABELS`]), or `auto`.
    pub fn by_label(label: &str) -> Option<Self> {
        match label {
            "auto" => Some(Self {
                short: PREFILL_SM90_FORMS[0],
                long: PREFILL_SM90_FORMS[1],
            }),
            _ => PrefillSm90::by_label(label).map(|f| Self { short: f, long: f }),
        }
    }

    /// The form for a launch whose longest prompt attends `keys` keys.
    pub fn form(self, keys: usize) -> PrefillSm90 {
        if keys >= PREFILL_SM90_LONG_KEYS {
            self.long
        } else {
            self.short
        }
    }
}

/// Device memory: an allocation of its own, or a range of one shared with others (an adapter's weights
/// live in one allocation; a captured decode step's tensors live in the graph arena).
pub enum DevBuf {
    /// Its own allocation, freed (stream-ordered) when dropped.
    Own(CudaSlice<u8>),
    /// `len` bytes at `ptr` inside `owner`, which the range keeps alive.
    Part {
        /// The allocation the range is in (`None`: a placeholder while recording a graph step, never
        /// launched).
        owner: Option<Arc<CudaSlice<u8>>>,
        /// Device address of the first byte.
        ptr: u64,
        /// Bytes.
        len: usize,
    },
}

impl DevBuf {
    /// Bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Own(s) => s.len(),
            Self::Part { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` bytes at `offset` of a shared allocation.
    pub(crate) fn part(owner: &Arc<CudaSlice<u8>>, base: u64, offset: usize, len: usize) -> Self {
        Self::Part {
            owner: Some(Arc::clone(owner)),
            ptr: base + offset as u64,
            len,
        }
    }
}

/// A row-major tensor in device memory, in the backend's storage type.
pub struct CudaTensor {
    shape: Vec<usize>,
    buf: DevBuf,
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTensor")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl CudaTensor {
    /// The device memory (storage-type elements, row-major), when the tensor has an allocation of its
    /// own (`None` for a range of a shared one): for benchmarks and interop.
    pub fn device_slice(&self) -> Option<&CudaSlice<u8>> {
        match &self.buf {
            DevBuf::Own(s) => Some(s),
            DevBuf::Part { .. } => None,
        }
    }

    /// The device memory, writable (see [`CudaTensor::device_slice`]).
    pub fn device_slice_mut(&mut self) -> Option<&mut CudaSlice<u8>> {
        match &mut self.buf {
            DevBuf::Own(s) => Some(s),
            DevBuf::Part { .. } => None,
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [c] => (1, *c),
            [r @ .., c] => (r.iter().product(), *c),
        }
    }
}

/// Blocks per multiprocessor that decode attention aims at when the rows alone leave the GPU short of
/// blocks and it splits their contexts: one wave of the tensor-core kernel, which keeps 3 blocks resident
/// per multiprocessor (`ATTN_TC_MINB`, kernels/attention.cu). On the H200 (bench/NOTES.md session 17) it
/// was as fast as the earlier 8 or faster at every shape measured, alone (1 x 131072 tokens: 69 -> 89% of
/// the copy bandwidth) and in 32-layer steps (16-64 rows of 512-token prompts: 2-4.5% faster; 1 and 8
/// rows unchanged).
pub const ATTN_SPLIT_TARGET: usize = 3;

/// A choice between two kernels from the environment: `var` set to `on` (true) or `off` (false), `default`
/// when unset; any other value is a start-up error naming the variable.
fn env_switch(var: &str, [on, off]: [&str; 2], default: bool) -> Result<bool> {
    match std::env::var(var).as_deref() {
        Err(_) => Ok(default),
        Ok(v) if v == on => Ok(true),
        Ok(v) if v == off => Ok(false),
        Ok(other) => Err(EngineError::Backend(format!("{var}={other:?}: expected {on} or {off}"))),
    }
}

/// A whole-number setting from the environment: `default` when unset, an error naming the variable when
/// it is not a number in `range` (a typo is reported at start-up, not silently replaced).
fn env_count(name: &str, default: usize, range: std::ops::RangeInclusive<usize>) -> Result<usize> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(EngineError::Backend(format!(
                "{name}={v:?}: expected a whole number from {} to {}",
                range.start(),
                range.end()
            ))),
        },
    }
}

/// Bytes of pinned adapter staging kept between uploads, all buffers together: a larger buffer (an
/// adapter of high rank on many targets) is unpinned after its upload. 512 MiB holds a rank-64 q/k/v/o
/// adapter of a 7B model in f16 (about 110 MB) with its conversion scratch twice over.
const KEPT_STAGING_BYTES: usize = 512 << 20;
/// Pinned staging buffers: at most this many uploads stage at once (the shard parses 4 adapters at a time;
/// more uploads wait for a buffer, so a burst of loads cannot pin one buffer each), and as many are kept
/// between uploads.
const STAGING_BUFFERS: usize = 4;

/// A staging buffer taken by `upload_many`: given back by hand once its copies have ended. Dropped while
/// still holding it (a panic, or copies that could not be waited for), it leaks the buffer, which copies
/// may still read, but gives its turn back, so the pool's count of buffers out stays right.
struct StagingLease<'a> {
    backend: &'a CudaBackend,
    buf: Option<PinnedHostSlice<u8>>,
}

impl Drop for StagingLease<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            std::mem::forget(buf);
            self.backend.give_back_staging(None);
        }
    }
}

/// The adapter uploads' pinned staging buffers ([`CudaBackend::take_staging`]).
#[derive(Default)]
struct StagingPool {
    /// Buffers kept for the next uploads.
    free: Vec<PinnedHostSlice<u8>>,
    /// Buffers taken by uploads in progress.
    out: usize,
}

/// The CUDA backend (one device, one stream).
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    dtype: DType,
    name: String,
    num_sms: usize,
    poison: bool,
    sync_each: bool,
    /// The device's compute capability (major, minor).
    compute_capability: (i32, i32),
    /// Kernels launched with programmatic dependent launch ([`launch_pdl`]; `LORAX_CUDA_PDL=0` turns it off).
    pdl: bool,
    tc_prefill: bool,
    /// The tensor-core prefill kernel's tile shape (`LORAX_CUDA_PREFILL_TILE`; none: by the launch's prompt
    /// rows, [`PrefillShape::auto`]).
    prefill_shape: Option<PrefillShape>,
    /// Whether the device gives the prefill shapes past 48 KiB of shared memory (the 64-key and two-row-group
    /// ones) theirs (else [`PrefillShape::narrow`] picks a 32-key shape of 16 rows a warp).
    prefill_wide: bool,
    /// The form of the Hopper prefill attention (kernels/prefill_sm90.cu), or its choice by a launch's longest
    /// prompt, that runs in place of the tensor-core prefill kernel's shapes at head size 128
    /// ([`PREFILL_SM90_DEFAULT`] on compute capability 9.0 with 16-bit storage), or `None`: off, or not built
    /// (`LORAX_CUDA_PREFILL_SM90`, [`CudaBackend::set_prefill_sm90`]).
    prefill_sm90: Option<PrefillSm90Choice>,
    /// `LORAX_CUDA_SAMPLING=host`: every row sampled on the host (read once, at construction).
    host_sampling: bool,
    /// Pinned host memory a feeding sampling launch's output words come back to, and the event after their copy
    /// ([`CudaBackend::sample_feeding_on_device`]).
    fetch: Mutex<Option<sampling::Fetch>>,
    attn_max_heads: usize,
    /// The paged-attention kernel family for GQA at head size 128 (`LORAX_CUDA_ATTN`).
    attn_kernel: AttnKernel,
    /// Blocks per multiprocessor that attention aims at when it splits contexts
    /// (`LORAX_CUDA_ATTN_SPLIT_TARGET`, default [`ATTN_SPLIT_TARGET`]).
    attn_split_target: usize,
    /// Fewest chunks in a split of a batch whose attention blocks fill a wave
    /// (`LORAX_CUDA_ATTN_SPLIT_MIN_CHUNKS`, default [`attention::SPLIT_MIN_CHUNKS`]).
    attn_split_min_chunks: usize,
    /// Split attention rows merged by their last block rather than by `attn_reduce`
    /// (`LORAX_CUDA_ATTN_MERGE=1`; off by default: the one serving run with it on had a slower step at
    /// 1 stream, bench/NOTES.md session 10).
    attn_merge: bool,
    /// Decode steps of at most this many rows run their rotary embedding and cache writes inside the
    /// tensor-core attention kernel (`paged_attention_128_*_tcr`), larger ones `rope_kv_write` then `_tc`
    /// (`LORAX_CUDA_ATTN_ROPE=N`; 0: never). `None` (the default, `auto`): steps whose attention blocks
    /// fit in one wave (`attn_split_target` per multiprocessor).
    attn_rope_rows: Option<usize>,
    /// Decode-shaped LoRA on the BGMV kernels (`LORAX_CUDA_BGMV=0`: SGMV for every shape).
    lora_bgmv: bool,
    /// LoRA segments longer than BGMV's limit (prompt chunks) as cuBLAS GEMMs, a shrink and an expand each,
    /// those of one shape in one batched call (`LORAX_CUDA_LORA_GEMM=0`: on SGMV with the rest).
    lora_gemm: bool,
    /// A pass's prompt chunks (segments of more than 64 rows in a pass of more than 256) on the tensor-core
    /// prompt pair `lora_shrink_pf*` + `lora_expand_pf` with the rest of its plan, for 16-bit storage (the
    /// default, `LORAX_CUDA_LORA_PROMPT=tc`; `gemm`: layer by layer, as cuBLAS GEMMs, as f32 always runs).
    lora_prompt_tc: bool,
    /// Passes of more than this many rows take the prompt pair for their segments of more than
    /// `lora_prompt_segment` rows (256 and 64; tests lower them to run every segment on it).
    lora_prompt_rows: usize,
    lora_prompt_segment: usize,
    /// Passes whose plan put prompt records on the prompt pair (tests check the pair did run).
    lora_prompt_plans: std::sync::atomic::AtomicU64,
    /// The LoRA plan of the pass being recorded: its padded records (high 32 bits) and rows with an adapter
    /// (low), 0 without one (reset when a record pass begins), for the graph module's debug lines on new
    /// signatures.
    pub(crate) last_lora_plan: std::sync::atomic::AtomicU64,
    /// A step's LoRA layers on the k-split `bgmv_*_ix` pair (`LORAX_CUDA_LORA_KSPLIT=0`: the earlier
    /// `_ix0` pair, for comparisons).
    lora_ksplit: bool,
    /// The k-split shrink of 16-bit storage on the tensor cores, `bgmv_shrink_tc*` (the default;
    /// `LORAX_CUDA_LORA_SHRINK=simt`: `bgmv_shrink_ix` on the CUDA cores, as f32 storage always runs).
    lora_shrink_tc: bool,
    /// Column tiles each block of `bgmv_expand_ix` walks (`LORAX_CUDA_LORA_EXPAND_TILES`, 1-8); `None` (the
    /// default): as many as keep one wave of blocks ([`lora::expand_tiles`]).
    lora_expand_tiles: Option<usize>,
    /// A step's LoRA expand on `bgmv_expand_vx` (`LORAX_CUDA_LORA_EXPAND=vx`) rather than `bgmv_expand_ix`
    /// (the default, `ix`: vx measured slower on an H100, bench/NOTES.md session 33; ix also runs wherever
    /// columns are not whole 8-byte accesses of y).
    lora_expand_vx: bool,
    /// Rows of one record of `bgmv_expand_vx` (`LORAX_CUDA_LORA_EXPAND_ROWS`, 4-16, default 16).
    lora_expand_rows: usize,
    /// A step whose adapter rows all take one adapter whose q/k/v (o) pairs have at most this rank computes
    /// their LoRA shrink in the projection's GEMM, from that adapter's `lora_A` rows copied past the weight's
    /// (`LORAX_CUDA_LORA_IN_GEMM`, the rank slot of each part: default 32, a multiple of 8 up to 64, 0 turns
    /// it off; see [`lora::LoraGemm`]).
    lora_in_gemm: usize,
    /// The weights with rows reserved for it, and whose rows they hold.
    lora_gemm_rows: Mutex<lora::LoraGemm>,
    /// Linear layers of at most this many rows on the skinny-GEMM kernels (kernels/gemv.cu) rather than
    /// cuBLAS (`LORAX_CUDA_GEMV_ROWS`, default 2, at most 4; 0 turns them off).
    gemv_rows: usize,
    /// Linear layers of more rows than `gemv_rows` and at most 256 on the wgmma skinny GEMM
    /// (kernels/skinny.cu) rather than cuBLAS: Hopper and 16-bit storage only, off by default (on the H200 it
    /// measured slower than cuBLAS at every size, bench/NOTES.md session 15); built when turned on
    /// (`LORAX_CUDA_SKINNY=1` or [`CudaBackend::set_skinny_gemm`]), `None` until then.
    skinny: Option<Skinny>,
    /// Which products run on the Hopper prompt GEMM (kernels/gemm_sm90.cu) (`LORAX_CUDA_GEMM_SM90`,
    /// [`CudaBackend::set_gemm_sm90`]), and for products of how many rows (`LORAX_CUDA_GEMM_SM90_ROWS`, `_MAX_ROWS`).
    gemm_sm90: GemmSm90,
    gemm_sm90_rows: std::ops::RangeInclusive<usize>,
    /// The Hopper prompt GEMM's cluster size and how many clusters the device runs at once (its grid); 0 clusters
    /// until its module is built.
    gemm_sm90_clusters: (usize, usize),
    /// In the explicit forms (`silu`, `fused`, `all`), the silu-mul product on `gemm_sm90_silu_t` (tokens on the
    /// MMA's N side, tiles of 144 tokens) rather than `gemm_sm90_silu` (`LORAX_CUDA_GEMM_SM90_SWAP=1`,
    /// [`CudaBackend::set_gemm_sm90_swap`]); [`GemmSm90::Auto`] always takes `gemm_sm90_silu_t`.
    gemm_sm90_swap: bool,
    /// Launches of the Hopper prompt GEMM so far (tests check that a product ran on it).
    gemm_sm90_launches: std::sync::atomic::AtomicU64,
    /// The tensor-parallel group on the device, once [`CudaBackend::attach_nccl`] joined it.
    nccl: Option<nccl::NcclComm>,
    /// Decode-step CUDA graphs (graph.rs).
    graphs: graph::Graphs,
    /// cuBLAS's workspace, set explicitly so that GEMMs allocate nothing under stream capture.
    _blas_workspace: CudaSlice<u8>,
    /// Zeroed counters with which a split attention row's last block merges the splits (kernels/attention.cu
    /// `merge_if_last`; each launch leaves them zero again), and their address.
    _attn_counters: CudaSlice<u32>,
    attn_counters_ptr: u64,
    /// The stream of [`Backend::upload_many`]: never `stream`, which a decode step may be capturing into
    /// a graph on the engine's thread. Its allocations are freed on it too (cudarc frees on the
    /// allocating stream), which is safe because adapters are only dropped between engine calls, and
    /// every engine call ends by waiting for `stream` (sampling reads the logits back).
    upload_stream: Arc<CudaStream>,
    /// Pinned host memory the adapter uploads stage in, kept between them (pinning is slow): each upload
    /// takes a buffer ([`CudaBackend::take_staging`]) and gives it back, so uploads on several threads
    /// run at once.
    staging: Mutex<StagingPool>,
    /// Signalled when a staging buffer is given back.
    staging_back: std::sync::Condvar,
    /// Pinned host memory that eager steps' metadata uploads stage through (made on first use).
    eager_staging: Mutex<Option<EagerStaging>>,
    /// What the layers of the forward pass in progress share ([`Backend::forward_scope`]).
    pass: Mutex<PassCache>,
    /// Timed points of the eager passes ([`Backend::mark`]), when `LORAX_CUDA_MARKS=1`: each with its
    /// event on the stream and the host's time when it was recorded; the first is the pass's start.
    marks: Option<Mutex<Vec<Mark>>>,
}

/// A timed point of a pass ([`Backend::mark`]): what, its event, and the host's time when it was recorded.
type Mark = (&'static str, cudarc::driver::CudaEvent, std::time::Instant);

/// What the layers of one forward pass share, made by the first layer and kept to the end of the pass:
/// the uploads of `rope_kv_write`'s positions, frequencies and slots, and the attention metadata, each
/// under the key of the inputs it came from (a later layer with other inputs makes its own).
#[derive(Default)]
struct PassCache {
    /// The thread running the forward pass in progress (none outside one: nothing is kept then, as the
    /// slices' addresses say nothing). Only that thread's calls use or fill the cache; another thread
    /// using the backend meanwhile (an adapter upload) computes its own.
    owner: Option<std::thread::ThreadId>,
    rope: Option<([usize; 6], Arc<[DevBuf; 3]>)>,
    attn: Option<(attention::AttnKey, Arc<attention::AttnShared>)>,
}

/// Bytes of each half of [`EagerStaging`]; larger uploads copy from pageable memory.
const EAGER_STAGING_HALF: usize = 4 << 20;

/// Pinned staging for the small uploads of eager steps (positions, slots, attention plans, LoRA tables).
/// A copy from pageable memory may first wait for the stream's earlier work: the host then stalls behind
/// the device at every upload of a prefill's layers, and the device idles while the host prepares the
/// next launches. From pinned memory the copies are asynchronous. Two halves are used in turn; before a
/// half is written again, the event recorded when the host left it is waited for (its copies ran long
/// ago, in practice).
struct EagerStaging {
    buf: PinnedHostSlice<u8>,
    half: usize,
    used: usize,
    left: [Option<cudarc::driver::CudaEvent>; 2],
}

// SAFETY: the pinned buffer is only touched under the backend's `eager_staging` lock.
unsafe impl Send for EagerStaging {}

pub(crate) fn drv(what: &str, e: drv_result::DriverError) -> EngineError {
    if e.0 == drv_sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        return EngineError::DeviceMemory(format!("CUDA {what}"));
    }
    EngineError::Backend(format!("CUDA {what}: {e:?}"))
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn shape_err(what: &str, a: &[usize], b: &[usize]) -> EngineError {
    EngineError::Backend(format!("{what}: incompatible shapes {a:?} and {b:?}"))
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| EngineError::Backend(format!("{what} {v} does not fit a 32-bit kernel argument")))
}

fn uint(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| EngineError::Backend(format!("{what} {v} does not fit a 32-bit launch dimension")))
}

/// Threads for a row kernel over `cols` columns: whole warps, at most 512.
fn row_threads(cols: usize) -> u32 {
    #[allow(clippy::cast_possible_truncation)]
    let t = cols.div_ceil(32).clamp(1, 16) as u32;
    t * 32
}

/// Vectors of 16 bytes a thread of a row kernel holds at most in its 16-byte path (ROW_NV in
/// kernels/elementwise.cu).
const ROW_NV: usize = 4;

/// Rows from which a row kernel gets narrower blocks ([`CudaBackend::row_threads_for`]), per multiprocessor.
const ROW_BATCH_PER_SM: usize = 4;

impl CudaBackend {
    /// Bytes of pinned host memory the adapter uploads' staging buffers kept hold now (0: none pinned).
    pub fn upload_staging_bytes(&self) -> usize {
        self.staging
            .lock()
            .map(|s| s.free.iter().map(PinnedHostSlice::len).sum())
            .unwrap_or(0)
    }

    /// A pinned staging buffer of at least `len` bytes: the smallest kept one that is large enough, or a
    /// new one; waits while [`STAGING_BUFFERS`] are out. Every buffer taken goes back through
    /// [`CudaBackend::give_back_staging`] (`None` for one that cannot be reused).
    fn take_staging(&self, len: usize) -> Result<PinnedHostSlice<u8>> {
        let poisoned = || EngineError::Backend("the upload staging buffers were poisoned by a panic".into());
        {
            let mut pool = self.staging.lock().map_err(|_| poisoned())?;
            while pool.out >= STAGING_BUFFERS {
                pool = self.staging_back.wait(pool).map_err(|_| poisoned())?;
            }
            pool.out += 1;
            let fitting = pool
                .free
                .iter()
                .enumerate()
                .filter(|(_, s)| s.len() >= len)
                .min_by_key(|(_, s)| s.len())
                .map(|(i, _)| i);
            if let Some(i) = fitting {
                return Ok(pool.free.swap_remove(i));
            }
        }
        let bytes = len.max(1).next_multiple_of(8 << 20);
        // SAFETY: plain bytes, uninitialised; what is copied beyond the bytes an upload writes is alignment
        // padding or header, which no kernel reads.
        unsafe { self.ctx.alloc_pinned::<u8>(bytes) }.map_err(|e| {
            self.give_back_staging(None);
            // Host memory, not the device's: not EngineError::DeviceMemory (offloading adapters from the
            // device would not help).
            EngineError::Backend(format!("CUDA pinning {bytes} bytes of host memory: {e:?}"))
        })
    }

    /// [`Backend::upload_many`] through `staging`, which holds `total + raw_total` bytes: the tensors'
    /// bytes copied to their `offsets` (in the result, and in the conversion scratch for those of another
    /// type), sent on the upload stream and waited for.
    fn upload_staged(
        &self,
        tensors: &[HostTensor<'_>],
        offsets: &[(usize, Option<usize>)],
        (total, raw_total): (usize, usize),
        staging: &mut PinnedHostSlice<u8>,
    ) -> Result<Vec<CudaTensor>> {
        let es = self.dtype.size();
        let staged = total + raw_total;
        let host = staging.as_mut_slice().map_err(|e| drv("staging buffer", e))?;
        // Each tensor's bytes to its place, in parallel (a rank-16 adapter of a 7B model is ~27 MB: one
        // thread's copy was most of an upload). The places are disjoint and in ascending order within
        // each part, so they are cut off the staging buffer one after another.
        let (converted, raw_part) = host.split_at_mut(total);
        let (mut rest_c, mut rest_r) = (converted, raw_part);
        let (mut at_c, mut at_r) = (0usize, 0usize);
        let mut jobs: Vec<(&mut [u8], &[u8])> = Vec::with_capacity(tensors.len());
        for (t, &(off, raw)) in tensors.iter().zip(offsets) {
            let (rest, at, start) = match raw {
                None => (&mut rest_c, &mut at_c, off),
                Some(r) => (&mut rest_r, &mut at_r, r),
            };
            let (_, tail) = std::mem::take(rest).split_at_mut(start - *at);
            let (place, after) = tail.split_at_mut(t.data.len());
            *rest = after;
            *at = start + t.data.len();
            jobs.push((place, &t.data));
        }
        {
            use rayon::prelude::*;
            jobs.into_par_iter()
                .for_each(|(place, data)| place.copy_from_slice(data));
        }
        // SAFETY: uninitialised; the copy below (or a conversion) writes every byte a tensor covers
        // (alignment padding is never read).
        let dev = unsafe { self.upload_stream.alloc::<u8>(total) }
            .map_err(|e| drv(&format!("allocating {total} bytes"), e))?;
        let base = {
            let (p, _sync) = dev.device_ptr(&self.upload_stream);
            p
        };
        if offsets.iter().any(|(_, raw)| raw.is_none()) {
            // Some tensors are already in the backend's type (all of them are converted otherwise, and this
            // part of the staging buffer holds nothing).
            // SAFETY: `dev` holds `total` bytes; `host[..staged]` is pinned and is not touched (the staging
            // lock is held) until the copies have finished, below.
            unsafe { drv_result::memcpy_htod_async(base, &host[..total], self.upload_stream.cu_stream()) }
                .map_err(|e| drv("adapter upload", e))?;
        }
        let scratch = if raw_total > 0 {
            // SAFETY: written by the copy right after, before the conversions read it.
            let scratch = unsafe { self.upload_stream.alloc::<u8>(raw_total) }
                .map_err(|e| drv(&format!("allocating {raw_total} bytes"), e))?;
            let sp = {
                let (p, _sync) = scratch.device_ptr(&self.upload_stream);
                p
            };
            // SAFETY: as above; the scratch holds raw_total bytes.
            unsafe { drv_result::memcpy_htod_async(sp, &host[total..staged], self.upload_stream.cu_stream()) }
                .map_err(|e| drv("adapter upload", e))?;
            for (t, &(off, raw)) in tensors.iter().zip(offsets) {
                let Some(r) = raw else { continue };
                self.convert_upload(base + off as u64, sp + r as u64, t.dtype, t.numel())?;
            }
            Some(scratch)
        } else {
            None
        };
        self.upload_stream.synchronize().map_err(|e| drv("adapter upload", e))?;
        drop(scratch);
        let owner = Arc::new(dev);
        Ok(tensors
            .iter()
            .zip(offsets)
            .map(|(t, &(off, _))| CudaTensor {
                shape: t.shape.clone(),
                buf: DevBuf::part(&owner, base, off, t.numel() * es),
            })
            .collect())
    }

    /// `n` elements of type `from` at device address `inp` converted to the backend's type at `out`, on the
    /// upload stream (`convert_in`: exact to f32, round to nearest even, as the host converts).
    fn convert_upload(&self, out: u64, inp: u64, from: DType, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let func = self.func("convert_in")?;
        let kind: i32 = match from {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        };
        let count = n as u64;
        let mut b = self.upload_stream.launch_builder(func);
        b.arg(&out);
        b.arg(&inp);
        b.arg(&kind);
        b.arg(&count);
        // SAFETY: convert_in(T* out, const void* in, int kind, u64 n): the caller passes `out` holding n
        // elements of the backend's type and `in` n elements of `from`, both written (or copied) on the
        // upload stream before this launch.
        unsafe { b.launch(cfg((flat_grid(n), 1, 1), 256, 0)) }.map_err(|e| drv("launch of convert_in", e))?;
        Ok(())
    }

    /// Gives back a buffer of [`CudaBackend::take_staging`] once no copy reads it any more, keeping it for
    /// later uploads: the largest [`STAGING_BUFFERS`] buffers within [`KEPT_STAGING_BYTES`] are kept, the
    /// others unpinned (so that one unusually large adapter does not hold that much page-locked memory for
    /// the server's life). `None`: the buffer was not kept (copies might still read it).
    fn give_back_staging(&self, buf: Option<PinnedHostSlice<u8>>) {
        let Ok(mut pool) = self.staging.lock() else { return };
        pool.out = pool.out.saturating_sub(1);
        if let Some(buf) = buf.filter(|b| b.len() <= KEPT_STAGING_BYTES) {
            pool.free.push(buf);
            pool.free.sort_unstable_by_key(|s| std::cmp::Reverse(s.len()));
            let mut total = 0;
            let mut kept = 0;
            pool.free.retain(|s| {
                total += s.len();
                kept += 1;
                kept <= STAGING_BUFFERS && total <= KEPT_STAGING_BYTES
            });
        }
        drop(pool);
        self.staging_back.notify_one();
    }

    /// Threads of a row kernel's block (one block per row) for `rows` rows of `cols` elements: as
    /// [`row_threads`] for a few rows (a decode step's: the row's latency matters), a quarter of that for
    /// a prompt's thousands (at least enough threads for [`ROW_NV`] vectors each, the kernels' 16-byte
    /// path): smaller blocks, each thread with several loads in flight, and one row's reduction overlapping
    /// other rows' loads. On the H200 a 4096-wide `add_rms_norm` of 2184 rows took 48 µs with 512 threads a
    /// row (1.5 TB/s; bench/NOTES.md, session 12).
    fn row_threads_for(&self, rows: usize, cols: usize) -> u32 {
        let t = row_threads(cols);
        if rows < ROW_BATCH_PER_SM * self.num_sms {
            return t;
        }
        let vec = 16 / self.dtype.size();
        #[allow(clippy::cast_possible_truncation)]
        let need = cols.div_ceil(vec).div_ceil(ROW_NV).next_multiple_of(32).min(512) as u32;
        (t / 4).max(need).max(32)
    }

    /// Grid of an element-wise kernel over `n` elements with 256 threads: one thread per 16 bytes where the
    /// kernel takes its 16-byte path (rows of `row` elements, a multiple of the vector, and every pointer
    /// 16-byte aligned: the kernels' `vec_ok`), else one per element.
    fn vec_grid(&self, n: usize, row: usize, ptrs: &[u64]) -> u32 {
        let vec = 16 / self.dtype.size();
        if row.is_multiple_of(vec) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
            flat_grid(n.div_ceil(vec))
        } else {
            flat_grid(n)
        }
    }
}

/// Lets the prefill kernels whose shared memory passes the default 48 KiB (the 64-key shapes, and the
/// two-row-group shapes at head size 128) use theirs; false when the device cannot give a block that much
/// (32-key shapes of 16 rows a warp then run in their place: `prefill_wide`, [`PrefillShape::narrow`]).
/// The f32 prefill kernels are empty.
fn grant_prefill_smem(funcs: &HashMap<&'static str, CudaFunction>, dtype: DType) -> bool {
    if dtype == DType::F32 {
        return true;
    }
    let mut granted = true;
    for hd in [64, 128] {
        for shape in PrefillShape::ALL {
            let bytes = shape.smem_bytes(hd, dtype.size());
            let Some(f) = funcs.get(shape.kernel(hd).as_str()).filter(|_| bytes > SMEM_LIMIT) else {
                continue;
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
            let set = f.set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            );
            if let Err(e) = set {
                tracing::info!(
                    hd,
                    bytes,
                    "prefill tiles past 48 KiB of shared memory unavailable: {e:?}"
                );
                granted = false;
            }
        }
    }
    granted
}

/// Grid for a grid-stride element-wise kernel over `n` elements with 256 threads.
fn flat_grid(n: usize) -> u32 {
    #[allow(clippy::cast_possible_truncation)]
    let b = n.div_ceil(256).clamp(1, 65_536) as u32;
    b
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: usize) -> LaunchConfig {
    #[allow(clippy::cast_possible_truncation)]
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// Tensors come from the device's default memory pool (stream-ordered allocation). By default the pool
/// hands freed memory back to the driver at every synchronisation, so each forward pass would map its
/// temporaries again; keeping it (release threshold: unlimited) makes allocation after warm-up cheap.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: valid out-pointer and device handle; the attribute takes a u64.
    unsafe {
        drv_sys::cuDeviceGetDefaultMemPool(&raw mut pool, ctx.cu_device())
            .result()
            .map_err(|e| drv("default memory pool", e))?;
        drv_sys::cuMemPoolSetAttribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast::<c_void>(),
        )
        .result()
        .map_err(|e| drv("memory pool threshold", e))?;
    }
    Ok(())
}

/// Plain numbers (and `#[repr(C)]` records of them without padding) that uploads copy as bytes.
trait Plain: Copy {}

/// The bytes of a slice of plain numbers (uploads, the graph metadata mirror).
fn plain_bytes<T: Plain>(data: &[T]) -> &[u8] {
    // SAFETY: `Plain` types are plain numbers without padding; any byte pattern of them is valid to read.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}
impl Plain for u8 {}
impl Plain for u32 {}
impl Plain for i32 {}
impl Plain for f32 {}
impl Plain for u64 {}

/// Launches `func` on `stream` allowed to start before the kernel ahead of it has finished (programmatic
/// dependent launch, sm_90 and later): its blocks are scheduled once every block of that kernel has called
/// `pdl_launch()` (kernels/common.cuh), and wait in `pdl_wait()` until it has completed. Within a graph
/// capture this records a programmatic edge.
///
/// # Safety
/// `params` must hold one pointer per kernel parameter, each to a live value of the parameter's type, and
/// the kernel must call `pdl_wait()` before it reads or writes memory an earlier kernel touches.
pub(crate) unsafe fn launch_pdl(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: &LaunchConfig,
    params: &mut [*mut c_void],
) -> std::result::Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let mut attr = drv_sys::CUlaunchAttribute {
        id: drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: drv_sys::CUlaunchAttributeValue {
            programmaticStreamSerializationAllowed: 1,
        },
    };
    let config = drv_sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &raw mut attr,
        numAttrs: 1,
    };
    // SAFETY: the config and its one attribute live across the call; the caller vouches for `params`.
    unsafe { drv_sys::cuLaunchKernelEx(&raw const config, func.cu_function(), params.as_mut_ptr(), null_mut()) }
        .result()
}

/// Whether kernels can be launched with programmatic dependent launch (`launch_pdl`): on devices of
/// compute capability 9.0 and later with a driver of CUDA 12.3 or later (which records it in graph
/// captures).
fn pdl_supported(cc: (i32, i32)) -> bool {
    let mut version = 0;
    // SAFETY: one valid out-pointer.
    let ok = unsafe { drv_sys::cuDriverGetVersion(&raw mut version) }
        .result()
        .is_ok();
    cc.0 >= 9 && ok && version >= 12030
}

/// Launches kernel `$name` with the given arguments (each a reference to a live local) and checks it.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $self.func($name)?;
        let mode = $crate::backend::cuda::graph::mode();
        if mode != $crate::backend::cuda::graph::Mode::Eager {
            let c: &cudarc::driver::LaunchConfig = &$cfg;
            $self.graphs.sign(AsRef::<str>::as_ref($name).as_bytes());
            for d in [c.grid_dim.0, c.grid_dim.1, c.grid_dim.2, c.block_dim.0, c.shared_mem_bytes] {
                $self.graphs.sign(&d.to_le_bytes());
            }
            $( $crate::backend::cuda::graph::SigArg::sign_into($arg, &$self.graphs); )+
        }
        if mode != $crate::backend::cuda::graph::Mode::Record {
            if $self.pdl {
                let mut params = [$( ($arg as *const _ as *mut ::std::ffi::c_void), )+];
                // SAFETY: as below; each parameter points at a live local of the kind the kernel takes, and
                // every kernel waits in pdl_wait() before it touches what the kernels ahead of it write.
                unsafe { $crate::backend::cuda::launch_pdl(&$self.stream, func, &$cfg, &mut params) }
                    .map_err(|e| $crate::backend::cuda::drv(&format!("launch of {}", $name), e))?;
            } else {
                let mut builder = $self.stream.launch_builder(func);
                $( builder.arg($arg); )+
                // SAFETY: every argument matches the kernel's parameter list in kernels/*.cu (device pointers
                // as u64, ints as i32/u32/u64, floats as f32, TMA tensor maps as 128-byte `TmaMap`s whose
                // addresses are of live tensors), and every buffer the kernel touches was
                // allocated with the sizes the host-side checks of the calling op established.
                unsafe { builder.launch($cfg) }
                    .map_err(|e| $crate::backend::cuda::drv(&format!("launch of {}", $name), e))?;
            }
            $self.after_launch($name)?;
        }
    }};
}

pub mod attention;
pub mod compile;
mod file_upload;
pub mod graph;
pub mod lora;
pub mod nccl;
pub mod sampling;

impl CudaBackend {
    /// Number of CUDA devices, or why CUDA cannot be used here (no driver library, no device, driver
    /// error). Never panics.
    pub fn probe() -> std::result::Result<usize, String> {
        // SAFETY: only tries to open the library; no symbol is called.
        if !unsafe { drv_sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) is not installed".into());
        }
        drv_result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let n = drv_result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
        if n <= 0 {
            return Err("the CUDA driver reports no device".into());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// A backend on device `ordinal` storing tensors as `dtype`: checks the driver, NVRTC and cuBLAS
    /// libraries, creates the stream and cuBLAS handle, and compiles (or loads from the cache) the kernels
    /// for the device's architecture.
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        let count = Self::probe().map_err(EngineError::Backend)?;
        if ordinal >= count {
            return Err(EngineError::Backend(format!(
                "CUDA device {ordinal} does not exist ({count} found)"
            )));
        }
        if !compile::nvrtc_present() {
            return Err(EngineError::Backend(
                "the NVRTC library (libnvrtc.so) is not installed: add the CUDA toolkit's lib64 to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        // SAFETY: only tries to open the library.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(EngineError::Backend(
                "the cuBLAS library (libcublas.so) is not installed: add the CUDA toolkit's lib64 to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("context", e))?;
        // SAFETY: this backend issues everything on one stream, in order; no tensor is used on another.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| drv("stream", e))?;
        let upload_stream = ctx.new_stream().map_err(|e| drv("upload stream", e))?;
        keep_pool_memory(&ctx)?;
        let cc = ctx.compute_capability().map_err(|e| drv("compute capability", e))?;
        let device_name = ctx.name().map_err(|e| drv("device name", e))?;
        let num_sms = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| drv("attribute", e))?;
        let compiler = Compiler::new(cc, dtype)?;
        let mut funcs = HashMap::new();
        for src in SOURCES {
            let compiled = compiler.compile(&src)?;
            let module = ctx
                .load_module(Ptx::from_binary(compiled.cubin))
                .map_err(|e| drv(&format!("loading module {}", src.name), e))?;
            let names = KERNELS
                .iter()
                .find(|(m, _)| *m == src.name)
                .map(|(_, n)| *n)
                .unwrap_or_default();
            for &name in names {
                let f = module
                    .load_function(name)
                    .map_err(|e| drv(&format!("kernel {name} of {}", src.name), e))?;
                funcs.insert(name, f);
            }
            tracing::debug!(module = src.name, cached = compiled.cached, arch = %compiler.arch, "kernels loaded");
        }
        let prefill_wide = grant_prefill_smem(&funcs, dtype);
        let blas =
            CudaBlas::new(Arc::clone(&stream)).map_err(|e| EngineError::Backend(format!("cuBLAS handle: {e:?}")))?;
        let ws_bytes = 32usize << 20;
        let workspace = stream
            .alloc_zeros::<u8>(ws_bytes)
            .map_err(|e| drv("allocating the cuBLAS workspace", e))?;
        let ws_ptr = {
            let (p, _sync) = workspace.device_ptr(&stream);
            p
        };
        let attn_counters = stream
            .alloc_zeros::<u32>(ATTN_COUNTERS)
            .map_err(|e| drv("allocating the attention split counters", e))?;
        let attn_counters_ptr = {
            let (p, _sync) = attn_counters.device_ptr(&stream);
            p
        };
        // SAFETY: the workspace lives as long as the handle (both in the backend) and holds ws_bytes bytes.
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws_ptr as *mut c_void, ws_bytes) }
            .result()
            .map_err(|e| EngineError::Backend(format!("cuBLAS workspace: {e:?}")))?;
        let dt = match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        };
        let mut backend = Self {
            name: format!("cuda:{ordinal} {device_name} ({}, {dt})", compiler.arch),
            ctx,
            stream,
            blas,
            funcs,
            dtype,
            num_sms: usize::try_from(num_sms).unwrap_or(1).max(1),
            poison: env_flag("LORAX_CUDA_POISON"),
            sync_each: env_flag("LORAX_CUDA_SYNC"),
            // On by default (`LORAX_CUDA_PDL=0` turns it off): on the H200 the serving decode step at 1 stream
            // fell 1.5-3%, at 128 it moved by 0 to -2.5% (bench/NOTES.md, session 9).
            pdl: std::env::var("LORAX_CUDA_PDL").map_or(true, |v| v != "0") && pdl_supported(cc),
            compute_capability: cc,
            tc_prefill: std::env::var("LORAX_CUDA_PREFILL").map_or(true, |v| v != "simple"),
            prefill_shape: PrefillShape::from_env()?,
            prefill_wide,
            prefill_sm90: None,
            host_sampling: std::env::var_os("LORAX_CUDA_SAMPLING").is_some_and(|v| v == "host"),
            fetch: Mutex::new(None),
            attn_max_heads: 8,
            attn_kernel: AttnKernel::from_env()?,
            attn_split_target: env_count("LORAX_CUDA_ATTN_SPLIT_TARGET", ATTN_SPLIT_TARGET, 1..=64)?,
            attn_split_min_chunks: env_count(
                "LORAX_CUDA_ATTN_SPLIT_MIN_CHUNKS",
                attention::SPLIT_MIN_CHUNKS,
                1..=1 << 20,
            )?,
            attn_merge: std::env::var("LORAX_CUDA_ATTN_MERGE").is_ok_and(|v| v == "1"),
            attn_rope_rows: match std::env::var("LORAX_CUDA_ATTN_ROPE").as_deref() {
                Err(_) | Ok("auto") => None,
                Ok(_) => Some(env_count("LORAX_CUDA_ATTN_ROPE", 0, 0..=1 << 20)?),
            },
            lora_bgmv: std::env::var("LORAX_CUDA_BGMV").map_or(true, |v| v != "0"),
            lora_gemm: std::env::var("LORAX_CUDA_LORA_GEMM").map_or(true, |v| v != "0"),
            lora_ksplit: std::env::var("LORAX_CUDA_LORA_KSPLIT").map_or(true, |v| v != "0"),
            lora_prompt_rows: lora::STEP_MAX_ROWS,
            lora_prompt_segment: lora::GEMM_MIN_ROWS,
            lora_prompt_plans: std::sync::atomic::AtomicU64::new(0),
            last_lora_plan: std::sync::atomic::AtomicU64::new(0),
            lora_prompt_tc: env_switch("LORAX_CUDA_LORA_PROMPT", ["tc", "gemm"], true)?,
            lora_shrink_tc: env_switch("LORAX_CUDA_LORA_SHRINK", ["tc", "simt"], true)?,
            lora_expand_tiles: match std::env::var("LORAX_CUDA_LORA_EXPAND_TILES").as_deref() {
                Err(_) | Ok("auto") => None,
                Ok(_) => Some(env_count("LORAX_CUDA_LORA_EXPAND_TILES", 1, 1..=8)?),
            },
            lora_expand_vx: env_switch("LORAX_CUDA_LORA_EXPAND", ["vx", "ix"], false)?,
            lora_expand_rows: env_count(
                "LORAX_CUDA_LORA_EXPAND_ROWS",
                lora::EXPAND_VX_ROWS,
                4..=lora::EXPAND_VX_ROWS,
            )?,
            lora_in_gemm: match env_count("LORAX_CUDA_LORA_IN_GEMM", lora::IN_GEMM_RANK, 0..=lora::BG_RANK)? {
                n if n.is_multiple_of(lora::IN_GEMM_ALIGN) => n,
                n => {
                    return Err(EngineError::Backend(format!(
                        "LORAX_CUDA_LORA_IN_GEMM={n}: the rank slot must be a multiple of {} (0 turns it off)",
                        lora::IN_GEMM_ALIGN
                    )))
                }
            },
            lora_gemm_rows: Mutex::new(lora::LoraGemm::default()),
            gemv_rows: env_count("LORAX_CUDA_GEMV_ROWS", GEMV_DEFAULT_ROWS, 0..=GEMV_MAX_ROWS)?,
            skinny: None,
            gemm_sm90: GemmSm90::Off,
            gemm_sm90_rows: env_count("LORAX_CUDA_GEMM_SM90_ROWS", GEMM_SM90_MIN_ROWS, 1..=usize::MAX)?
                ..=env_count("LORAX_CUDA_GEMM_SM90_MAX_ROWS", usize::MAX, 1..=usize::MAX)?,
            gemm_sm90_clusters: (1, 0),
            gemm_sm90_swap: env_switch("LORAX_CUDA_GEMM_SM90_SWAP", ["1", "0"], false)?,
            gemm_sm90_launches: std::sync::atomic::AtomicU64::new(0),
            nccl: None,
            graphs: graph::Graphs::from_env()?,
            _blas_workspace: workspace,
            _attn_counters: attn_counters,
            attn_counters_ptr,
            upload_stream,
            staging: Mutex::new(StagingPool::default()),
            staging_back: std::sync::Condvar::new(),
            eager_staging: Mutex::new(None),
            pass: Mutex::new(PassCache::default()),
            marks: std::env::var("LORAX_CUDA_MARKS")
                .is_ok_and(|v| v == "1")
                .then(|| Mutex::new(Vec::new())),
        };
        if std::env::var("LORAX_CUDA_SKINNY").is_ok_and(|v| v == "1") {
            backend.set_skinny_gemm(true);
        }
        let which = match std::env::var("LORAX_CUDA_GEMM_SM90").as_deref() {
            // The default on Hopper with 16-bit storage (session 45); elsewhere it would not build.
            Err(_) | Ok("auto") if backend.compute_capability == (9, 0) && backend.dtype != DType::F32 => {
                GemmSm90::Auto
            }
            Err(_) | Ok("auto" | "0") => GemmSm90::Off,
            Ok("silu") => GemmSm90::Silu,
            Ok("fused") => GemmSm90::Fused,
            Ok("all") => GemmSm90::All,
            Ok(v) => {
                return Err(EngineError::Backend(format!(
                    "LORAX_CUDA_GEMM_SM90={v:?}: expected auto (the default), 0, silu, fused or all"
                )))
            }
        };
        // The swap chooses between two kernels of the explicit forms; the default has one (a typo or a stale setting
        // would otherwise be ignored silently).
        if which <= GemmSm90::Auto && std::env::var_os("LORAX_CUDA_GEMM_SM90_SWAP").is_some() {
            return Err(EngineError::Backend(
                "LORAX_CUDA_GEMM_SM90_SWAP applies to LORAX_CUDA_GEMM_SM90=silu, fused or all".into(),
            ));
        }
        if which != GemmSm90::Off {
            let min_rows = *backend.gemm_sm90_rows.start();
            backend.set_gemm_sm90(which, min_rows);
        }
        match std::env::var("LORAX_CUDA_PREFILL_SM90").as_deref() {
            // The default on Hopper with 16-bit storage: ws64, ws128 for prompts of 8192 keys or more (session 42:
            // ws64 35 us against the tensor-core kernel's 50 at 1000 tokens on an H100, 86 against 112 at 8 x
            // 512; session 43: ws128 12% faster than ws64 at 16384).
            Err(_) => {
                if backend.compute_capability == (9, 0) && backend.dtype != DType::F32 {
                    _ = backend.set_prefill_sm90(Some(PREFILL_SM90_DEFAULT));
                }
            }
            Ok("0") => {}
            Ok("1") => _ = backend.set_prefill_sm90(Some(PREFILL_SM90_DEFAULT)),
            Ok(v) if PrefillSm90Choice::by_label(v).is_some() => _ = backend.set_prefill_sm90(Some(v)),
            Ok(v) => {
                return Err(EngineError::Backend(format!(
                    "LORAX_CUDA_PREFILL_SM90={v:?}: expected 0, 1 or {PREFILL_SM90_DEFAULT} (the default), or one of {PREFILL_SM90_LABELS:?}"
                )))
            }
        }
        Ok(backend)
    }

    /// Launch kernels with programmatic dependent launch (the default; sm_90 and a CUDA 12.3 driver or later,
    /// else this stays off) or without. Takes effect for graphs captured afterwards.
    pub fn set_programmatic_launch(&mut self, on: bool) {
        self.pdl = on && pdl_supported(self.compute_capability);
    }

    /// Whether kernels are launched with programmatic dependent launch.
    pub fn programmatic_launch(&self) -> bool {
        self.pdl
    }

    /// Fill every new tensor with NaN bytes (as `LORAX_CUDA_POISON=1` does), so outputs a kernel leaves
    /// unwritten show up as NaN.
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    /// Run prefill sequences (16 or more new tokens, head size 64 or 128, bf16/f16) on the tensor-core
    /// kernel (default; `LORAX_CUDA_PREFILL=simple` turns it off) rather than the paged kernel.
    pub fn set_tensor_core_prefill(&mut self, on: bool) {
        self.tc_prefill = on;
    }

    /// The tensor-core prefill kernel's tile shape: one for every launch, or (`None`, the default) the one
    /// [`PrefillShape::auto`] picks by the launch's prompt rows (`LORAX_CUDA_PREFILL_TILE`).
    pub fn set_prefill_shape(&mut self, shape: Option<PrefillShape>) {
        self.prefill_shape = shape;
    }

    /// Prefill sequences of head size 128 on the Hopper kernel (kernels/prefill_sm90.cu: warpgroup MMA) in the
    /// form labelled `form` ([`PREFILL_SM90_LABELS`]: "ws64" and "ws128", 64 and 128 keys a step; "auto" picks
    /// one a launch by its longest prompt, [`PREFILL_SM90_LONG_KEYS`]) in place of the tensor-core prefill
    /// kernel's shapes, or (`None`) not
    /// (`LORAX_CUDA_PREFILL_SM90`; by default [`PREFILL_SM90_DEFAULT`] on compute capability 9.0 with 16-bit
    /// storage, where it builds). Turning it on builds it the first time. Returns whether it is on: false
    /// where it cannot be built (not compute capability 9.0, f32 storage, or a build failure, logged) or `form`
    /// names none.
    pub fn set_prefill_sm90(&mut self, form: Option<&str>) -> bool {
        self.prefill_sm90 = form.and_then(PrefillSm90Choice::by_label);
        if self.prefill_sm90.is_some() && !self.funcs.contains_key(PREFILL_SM90_KERNELS[0]) {
            let built = self.hopper_module("prefill_sm90", |i| PREFILL_SM90_FORMS[i].smem());
            if let Err(e) = built {
                tracing::warn!(error = %e, "the Hopper prefill attention is unavailable");
                self.prefill_sm90 = None;
            }
        }
        self.prefill_sm90.is_some()
    }

    /// Compiles the Hopper module `name` ([`HOPPER_SOURCES`]) for `sm_90a` (compute capability 9.0 and 16-bit
    /// storage only), loads its kernels ([`KERNELS`]), and grants each the dynamic shared memory `smem(i)`
    /// says (i: its index in the module's list).
    fn hopper_module(&mut self, name: &str, smem: impl Fn(usize) -> usize) -> std::result::Result<(), String> {
        if self.compute_capability != (9, 0) || self.dtype == DType::F32 {
            return Err(format!(
                "compute capability {:?} with {:?} storage (needs 9.0 and 16-bit storage)",
                self.compute_capability, self.dtype
            ));
        }
        let compiler = Compiler::new(self.compute_capability, self.dtype)
            .map_err(|e| e.to_string())?
            .arch_specific();
        let find = || -> Option<(&Source, &[&'static str])> {
            let src = HOPPER_SOURCES.iter().find(|s| s.name == name)?;
            Some((src, KERNELS.iter().find(|(m, _)| *m == name)?.1))
        };
        let (src, names) = find().ok_or_else(|| format!("no Hopper module {name}"))?;
        let compiled = compiler.compile(src).map_err(|e| e.to_string())?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin))
            .map_err(|e| format!("loading module {}: {e:?}", src.name))?;
        for (i, &name) in names.iter().enumerate() {
            let f = module
                .load_function(name)
                .map_err(|e| format!("kernel {name}: {e:?}"))?;
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
            f.set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem(i) as i32,
            )
            .map_err(|e| format!("{} bytes of shared memory for {name}: {e:?}", smem(i)))?;
            self.funcs.insert(name, f);
        }
        Ok(())
    }

    /// At most this many query heads per attention block (1, 2, 4 or 8; default 8). Fewer heads per block
    /// means less arithmetic per key and value read, at the price of reading them once per block of heads
    /// (mostly from L2, as those blocks run side by side). For benchmarks.
    pub fn set_attention_max_heads(&mut self, heads: usize) {
        self.attn_max_heads = heads.clamp(1, 8);
    }

    /// The kernel family of GQA attention at head size 128 (for benchmarks and tests).
    pub fn set_attention_kernel(&mut self, kernel: AttnKernel) {
        self.attn_kernel = kernel;
    }

    /// Blocks per multiprocessor that attention aims at when it splits long contexts (default
    /// [`ATTN_SPLIT_TARGET`]; for benchmarks).
    pub fn set_attention_split_target(&mut self, blocks_per_sm: usize) {
        self.attn_split_target = blocks_per_sm.clamp(1, 64);
    }

    /// Fewest chunks of a split when a batch's attention blocks already fill a wave (default
    /// [`attention::SPLIT_MIN_CHUNKS`]; for benchmarks).
    pub fn set_attention_split_min_chunks(&mut self, chunks: usize) {
        self.attn_split_min_chunks = chunks.max(1);
    }

    /// Split attention rows merged by their last block or by a separate `attn_reduce` launch (the default; for
    /// tests and comparisons).
    pub fn set_attention_merge(&mut self, on: bool) {
        self.attn_merge = on;
    }

    /// Decode steps of at most `rows` rows run their rotary embedding and cache writes inside the
    /// tensor-core attention kernel, larger ones in `rope_kv_write` before it (`Some(0)`: never; `None`,
    /// the default: steps whose attention blocks fit in one wave; for tests and comparisons).
    pub fn set_attention_rope_rows(&mut self, rows: Option<usize>) {
        self.attn_rope_rows = rows;
    }

    /// Decode-shaped LoRA products on the BGMV kernels (default) or on SGMV like every other shape (for
    /// tests and comparisons).
    pub fn set_lora_bgmv(&mut self, on: bool) {
        self.lora_bgmv = on;
    }

    /// The rank slot of the LoRA shrinks inside the q/k/v and o GEMMs (`LORAX_CUDA_LORA_IN_GEMM`; 0: off),
    /// rounded up to a multiple of 8 (so that rows stay whole 16-byte vectors). It applies to weights loaded
    /// after; those loaded before keep the rows they reserved, and their own slot.
    pub fn set_lora_in_gemm(&mut self, rank: usize) {
        self.lora_in_gemm = rank.next_multiple_of(lora::IN_GEMM_ALIGN).min(lora::BG_RANK);
    }

    /// Passes planned so far with a LoRA shrink in a projection's GEMM, and copies of an adapter's `lora_A`
    /// rows into the reserved rows (tests check both).
    pub fn lora_in_gemm_counts(&self) -> (u64, u64) {
        self.lora_gemm_rows.lock().map_or((0, 0), |g| (g.steps, g.copies))
    }

    /// A step's LoRA expand on `bgmv_expand_vx` where it fits (as `LORAX_CUDA_LORA_EXPAND=vx`) or on
    /// `bgmv_expand_ix` (for tests and comparisons).
    pub fn set_lora_expand_vx(&mut self, on: bool) {
        self.lora_expand_vx = on;
    }

    /// A pass's prompt chunks on the tensor-core prompt pair (default, 16-bit storage) or layer by layer as
    /// cuBLAS GEMMs (as `LORAX_CUDA_LORA_PROMPT=gemm`; for tests and comparisons).
    pub fn set_lora_prompt_tc(&mut self, on: bool) {
        self.lora_prompt_tc = on;
    }

    /// Passes of more than `rows` rows run their segments of more than `segment` rows on the prompt pair
    /// (defaults 256 and 64; `(0, 0)`: every segment of every pass, for tests against peft).
    pub fn set_lora_prompt_limits(&mut self, rows: usize, segment: usize) {
        self.lora_prompt_rows = rows;
        self.lora_prompt_segment = segment;
    }

    /// How many passes have had a plan with prompt records for the prompt pair (`lora_shrink_pf*` +
    /// `lora_expand_pf`) since start-up.
    pub fn lora_prompt_plans(&self) -> u64 {
        self.lora_prompt_plans.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The points [`Backend::mark`]ed in the last eager pass (with `LORAX_CUDA_MARKS=1`; else none), each
    /// as (what, ms on the device since the pass's start, ms on the host since it), the start first;
    /// waits for the device to reach them. Where the device's time is close to the host's, the device was
    /// waiting for the host's launches.
    pub fn take_marks(&self) -> Result<Vec<(&'static str, f64, f64)>> {
        let Some(marks) = &self.marks else {
            return Ok(Vec::new());
        };
        let marks = std::mem::take(&mut *marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let Some((_, start, host0)) = marks.first() else {
            return Ok(Vec::new());
        };
        marks
            .iter()
            .map(|(what, e, host)| {
                let device = start.elapsed_ms(e).map_err(|e| drv("timing a mark", e))?;
                Ok((*what, f64::from(device), (*host - *host0).as_secs_f64() * 1e3))
            })
            .collect()
    }

    /// Records a timed point on the stream (with marks on, outside graph capture).
    fn record_mark(&self, what: &'static str, first: bool) {
        let Some(marks) = &self.marks else {
            return;
        };
        let mut status = cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a query of the backend's own live stream into a local.
        let queried = unsafe { cudarc::driver::sys::cuStreamIsCapturing(self.stream.cu_stream(), &mut status) };
        if queried != cudarc::driver::sys::CUresult::CUDA_SUCCESS
            || status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        {
            return;
        }
        let Ok(event) = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        else {
            return;
        };
        let mut marks = marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if first {
            marks.clear();
        }
        if first || !marks.is_empty() {
            marks.push((what, event, std::time::Instant::now()));
        }
    }

    /// LoRA segments of more than 64 rows as cuBLAS GEMMs (default) or with the other segments on
    /// BGMV/SGMV (for tests and comparisons).
    pub fn set_lora_gemm(&mut self, on: bool) {
        self.lora_gemm = on;
    }

    /// Linear layers of at most `rows` rows (0..=4) on the skinny-GEMM kernels, the rest on cuBLAS (for
    /// tests and comparisons; default 2).
    pub fn set_gemv_rows(&mut self, rows: usize) {
        self.gemv_rows = rows.min(GEMV_MAX_ROWS);
    }

    /// Linear layers of 3-256 rows (more than the gemv kernels take) on the wgmma skinny GEMM or on cuBLAS
    /// (the default; for tests and comparisons). Turning it on builds it the first time. Returns whether it
    /// is on: false where it cannot be built (not Hopper, f32 storage, or a build failure, logged).
    pub fn set_skinny_gemm(&mut self, on: bool) -> bool {
        if on && self.skinny.is_none() {
            self.skinny = self.build_skinny();
        }
        if let Some(s) = &mut self.skinny {
            s.on = on;
            return on;
        }
        false
    }

    /// Which products run on the Hopper prompt GEMM (kernels/gemm_sm90.cu) rather than cuBLAS, for products of
    /// at least `min_rows` rows (`LORAX_CUDA_GEMM_SM90`; tests and comparisons). Turning it on builds it the first
    /// time. Returns whether it is on: false for [`GemmSm90::Off`] and where it cannot be built (not Hopper, f32
    /// storage, or a build failure, logged).
    pub fn set_gemm_sm90(&mut self, which: GemmSm90, min_rows: usize) -> bool {
        if which != GemmSm90::Off && self.gemm_sm90_clusters.1 == 0 {
            match self
                .hopper_module("gemm_sm90", |i| if i == 3 { GEMM_SM90_T_SMEM } else { GEMM_SM90_SMEM })
                .and_then(|()| self.gemm_sm90_max_clusters())
            {
                Ok(grid) => self.gemm_sm90_clusters = grid,
                Err(e) => tracing::warn!(error = %e, "the Hopper prompt GEMM is unavailable; cuBLAS runs its products"),
            }
        }
        let on = which != GemmSm90::Off && self.gemm_sm90_clusters.1 > 0;
        self.gemm_sm90 = if on { which } else { GemmSm90::Off };
        self.gemm_sm90_rows = min_rows.max(1)..=*self.gemm_sm90_rows.end();
        on
    }

    /// In the explicit forms, the silu-mul product on `gemm_sm90_silu_t` (tokens on the MMA's N side) or on
    /// `gemm_sm90_silu` (for tests and comparisons; `LORAX_CUDA_GEMM_SM90_SWAP`).
    pub fn set_gemm_sm90_swap(&mut self, on: bool) {
        self.gemm_sm90_swap = on;
    }

    /// Launches of the Hopper prompt GEMM so far.
    pub fn gemm_sm90_launches(&self) -> u64 {
        self.gemm_sm90_launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The Hopper prompt GEMM's cluster size and grid in clusters (0 until it is built).
    pub fn gemm_sm90_clusters(&self) -> (usize, usize) {
        self.gemm_sm90_clusters
    }

    /// The Hopper prompt GEMM's cluster size as compiled (kernels/gemm_sm90.cu `GM_CLUSTER`: 2, or 1 for
    /// comparisons), and how many clusters the device runs at once: its persistent grid, since a cluster's blocks
    /// must share a GPC and a GPC with an odd count of free multiprocessors leaves one idle.
    fn gemm_sm90_max_clusters(&self) -> std::result::Result<(usize, usize), String> {
        let func = self.func(GEMM_SM90_KERNELS[1]).map_err(|e| e.to_string())?;
        let mut width: c_int = 0;
        // SAFETY: `width` is an out-parameter; the function is loaded in this context.
        unsafe {
            drv_sys::cuFuncGetAttribute(
                &raw mut width,
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH,
                func.cu_function(),
            )
        }
        .result()
        .map_err(|e| format!("the kernel's cluster size: {e:?}"))?;
        if width <= 1 {
            return Ok((1, self.num_sms));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let config = drv_sys::CUlaunchConfig {
            gridDimX: width as u32 * (self.num_sms as u32 / width as u32),
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: GEMM_SM90_THREADS,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: GEMM_SM90_SMEM as u32,
            hStream: self.stream.cu_stream(),
            attrs: null_mut(),
            numAttrs: 0,
        };
        let mut n: c_int = 0;
        // SAFETY: `config` lives across the call and names no attributes (the kernel's cluster size is
        // compiled in); `n` is an out-parameter.
        unsafe { drv_sys::cuOccupancyMaxActiveClusters(&raw mut n, func.cu_function(), &raw const config) }
            .result()
            .map_err(|e| format!("clusters the device runs at once: {e:?}"))?;
        tracing::debug!(clusters = n, width, "the Hopper prompt GEMM's persistent grid");
        match (usize::try_from(width), usize::try_from(n)) {
            (Ok(w), Ok(n)) if n > 0 => Ok((w, n)),
            _ => Err(format!(
                "the device runs {n} clusters of {width} of the Hopper prompt GEMM at once"
            )),
        }
    }

    /// Whether the Hopper prompt GEMM is on for epilogue `epi` at `m` rows of `n` output columns.
    fn gemm_sm90_wants(&self, epi: GemmEpilogue, m: usize, n: usize) -> bool {
        let on = match epi {
            GemmEpilogue::Silu if self.gemm_sm90 == GemmSm90::Auto => {
                silu_t_fill(m, n, self.num_sms) >= GEMM_SM90_T_MIN_FILL
            }
            GemmEpilogue::Silu => self.gemm_sm90 >= GemmSm90::Silu,
            GemmEpilogue::Add => self.gemm_sm90 >= GemmSm90::Fused,
            GemmEpilogue::Store => self.gemm_sm90 == GemmSm90::All,
        };
        on && self.gemm_sm90_rows.contains(&m)
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` (rows of y `ldy` apart) on the Hopper prompt GEMM, with epilogue `epi`
    /// (`Silu`: `y[m, n] = silu(x · w[..n]ᵀ) · (x · w[n..2n]ᵀ)`, w `[2n, k]`; `Add`: `y += x · wᵀ`), when it is on
    /// for this epilogue and this many rows and the shape suits it (k a multiple of 64, n of 8, 16-byte aligned x
    /// and w, an even ldy). Returns whether it ran.
    fn gemm_sm90_product(
        &self,
        epi: GemmEpilogue,
        (m, n, k): (usize, usize, usize),
        (yp, xp, wp): (u64, u64, u64),
        ldy: usize,
    ) -> Result<bool> {
        if !self.gemm_sm90_wants(epi, m, n)
            || n == 0
            || k == 0
            || !k.is_multiple_of(SKINNY_BK)
            || !n.is_multiple_of(8)
            || !ldy.is_multiple_of(2)
            || !xp.is_multiple_of(16)
            || !wp.is_multiple_of(16)
            || !yp.is_multiple_of(4)
        {
            return Ok(false);
        }
        let silu = epi == GemmEpilogue::Silu;
        let w_rows = if silu { 2 * n } else { n };
        // The kernel, its shared memory, grid, and the tensor maps' rows a box (x's, w's).
        let (kernel, smem, blocks, boxes) = if silu && (self.gemm_sm90 == GemmSm90::Auto || self.gemm_sm90_swap) {
            // Tokens on the MMA's N side (kernels/gemm_sm90.cu `gemm_sm90_silu_t`), one block a tile.
            let units = m.div_ceil(GEMM_SM90_T_TOKENS) * n.div_ceil(GEMM_SM90_T_FEATURES);
            (
                GEMM_SM90_KERNELS[3],
                GEMM_SM90_T_SMEM,
                self.num_sms.min(units),
                (GEMM_SM90_T_TOKENS, GEMM_SM90_T_FEATURES),
            )
        } else {
            // Clusters of `width` blocks, each cluster on `width` row tiles of one column tile at a time.
            let cols = if silu {
                GEMM_SM90_TILE_COLS / 2
            } else {
                GEMM_SM90_TILE_COLS
            };
            let (width, clusters) = self.gemm_sm90_clusters;
            let units = m.div_ceil(width * GEMM_SM90_BM) * n.div_ceil(cols);
            (
                GEMM_SM90_KERNELS[epi as usize],
                GEMM_SM90_SMEM,
                width * clusters.min(units),
                (GEMM_SM90_BM, GEMM_SM90_TILE_COLS / 2),
            )
        };
        let blocks = uint("GEMM blocks", blocks)?;
        let (mi, ni, ki, ldi) = (
            int("rows", m)?,
            int("out features", n)?,
            int("in features", k)?,
            int("row stride", ldy)?,
        );
        let xmap = tma_map_2d(self.dtype, xp, m, k, boxes.0)?;
        let wmap = tma_map_2d(self.dtype, wp, w_rows, k, boxes.1)?;
        launch!(
            self,
            kernel,
            cfg((blocks, 1, 1), GEMM_SM90_THREADS, smem),
            &yp,
            &xmap,
            &wmap,
            &mi,
            &ni,
            &ki,
            &ldi
        );
        self.gemm_sm90_launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Builds the wgmma skinny GEMM where it can run (compute capability 9.0, 16-bit storage): compiles
    /// kernels/skinny.cu for `sm_90a`, grants each kernel its shared memory, allocates the partial sums
    /// for one block per multiprocessor and the tile counters. `None`, with a warning, when any step fails.
    fn build_skinny(&mut self) -> Option<Skinny> {
        let built = (|| -> std::result::Result<Skinny, String> {
            self.hopper_module("skinny", |i| skinny_smem(SKINNY_ROWS[i]))?;
            let ws_bytes = self.num_sms * 2 * SKINNY_CONSUMERS * (SKINNY_ROWS[SKINNY_ROWS.len() - 1] / 2) * 4;
            let ws = self
                .stream
                .alloc_zeros::<u8>(ws_bytes)
                .map_err(|e| format!("{ws_bytes} bytes of partial sums: {e:?}"))?;
            let counters = self
                .stream
                .alloc_zeros::<u32>(SKINNY_MAX_TILES)
                .map_err(|e| format!("the tile counters: {e:?}"))?;
            let ws_ptr = ws.device_ptr(&self.stream).0;
            let counters_ptr = counters.device_ptr(&self.stream).0;
            Ok(Skinny {
                on: false,
                _ws: ws,
                ws_ptr,
                _counters: counters,
                counters_ptr,
            })
        })();
        built
            .inspect_err(
                |e| tracing::warn!(error = %e, "the wgmma skinny GEMM is unavailable; cuBLAS runs its products"),
            )
            .ok()
    }

    /// The storage type of tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The stream all work runs on (for timing with events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Multiprocessors of the device.
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// Waits for all issued work; reports asynchronous faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| drv("synchronize", e))
    }

    /// A tensor of values uniform in `[lo, hi)`, made on the device from `seed` (benchmark data).
    pub fn random_uniform(&self, shape: &[usize], seed: u32, lo: f32, hi: f32) -> Result<CudaTensor> {
        let t = self.alloc(shape)?;
        let n = t.numel() as u64;
        if n > 0 {
            let p = self.ptr(&t.buf);
            launch!(
                self,
                "fill_uniform",
                cfg((flat_grid(t.numel()), 1, 1), 256, 0),
                &p,
                &n,
                &seed,
                &lo,
                &hi
            );
        }
        Ok(t)
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| EngineError::Backend(format!("kernel {name} is not loaded")))
    }

    fn after_launch(&self, name: &str) -> Result<()> {
        if self.sync_each {
            self.stream
                .synchronize()
                .map_err(|e| drv(&format!("kernel {name} (LORAX_CUDA_SYNC)"), e))?;
        }
        Ok(())
    }

    fn slice_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn ptr(&self, b: &DevBuf) -> u64 {
        match b {
            DevBuf::Own(s) => self.slice_ptr(s),
            DevBuf::Part { ptr, .. } => *ptr,
        }
    }

    /// The value of a [`PassCache`] slot for `key`: kept from earlier in this forward pass, else made by
    /// `make` (and kept while a pass is open).
    fn per_pass<K: PartialEq + Copy, V: Clone>(
        &self,
        slot: fn(&mut PassCache) -> &mut Option<(K, V)>,
        key: K,
        make: impl FnOnce() -> Result<V>,
    ) -> Result<V> {
        // The cache holds plain uploads, valid whatever a panicking holder left: a poisoned lock is used.
        let lock = || self.pass.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = lock().owner == Some(std::thread::current().id());
        if mine {
            if let Some((k, v)) = slot(&mut lock()) {
                if *k == key {
                    return Ok(v.clone());
                }
            }
        }
        // Made without the lock held (its uploads take other locks).
        let v = make()?;
        if mine {
            *slot(&mut lock()) = Some((key, v.clone()));
        }
        Ok(v)
    }

    /// A pass's positions, rotary frequencies and cache slots on the device (uploaded once per pass).
    fn rope_uploads(&self, positions: &[u32], inv_freq: &[f32], slots: &[u32]) -> Result<Arc<[DevBuf; 3]>> {
        let key = [
            positions.as_ptr() as usize,
            positions.len(),
            inv_freq.as_ptr() as usize,
            inv_freq.len(),
            slots.as_ptr() as usize,
            slots.len(),
        ];
        self.per_pass(
            |c| &mut c.rope,
            key,
            || {
                Ok(Arc::new([
                    self.upload(positions)?,
                    self.upload(inv_freq)?,
                    self.upload(slots)?,
                ]))
            },
        )
    }

    /// Whether [`crate::Backend::rope_attention`] runs `meta`'s batch (rotary frequencies `inv_freq` of
    /// heads of `head_dim`) as one `_tcr` launch: few enough rows (`attn_rope_rows`), a GQA group that the
    /// tensor-core family runs in one block (`attn_rope_heads`: head size 128, 16-bit storage, 2 to 8 heads
    /// per KV head) and decode rows only.
    pub fn rope_fused(&self, meta: &AttnMeta<'_>, head_dim: usize, inv_freq: &[f32]) -> bool {
        let group = meta.num_heads.checked_div(meta.num_kv_heads).unwrap_or(0);
        // One wave: at 8 and 32 rows (256 blocks) the fused step was 2-4% faster, at 64 and 128 rows (2 or
        // more waves) the same or up to 2% slower (bench/NOTES.md, session 18).
        let rows = self
            .attn_rope_rows
            .unwrap_or(self.attn_split_target * self.num_sms / meta.num_kv_heads.max(1));
        meta.seqs.len() <= rows
            && head_dim == meta.head_dim
            && inv_freq.len() == head_dim / 2
            && meta.num_heads == group * meta.num_kv_heads
            && self.attn_rope_heads(meta.head_dim, group).is_some()
            && meta.seqs.iter().all(|s| s.q_len <= 1)
            && meta.seqs.iter().any(|s| s.q_len == 1)
    }

    /// [`Backend::rope_kv_write`], the queries' width given (`q_dim`: rows may be wider; see
    /// [`super::check_rope_kv_write`]) or what the rows leave (`None`).
    fn rope_kv_write_q(
        &self,
        qkv: &CudaTensor,
        [k_cache, v_cache]: [&mut CudaTensor; 2],
        head_dim: usize,
        q_dim: Option<usize>,
        (positions, inv_freq, slots): (&[u32], &[f32], &[u32]),
    ) -> Result<CudaTensor> {
        let (n, q_dim, kv_dim) = super::check_rope_kv_write(
            &qkv.shape,
            &k_cache.shape,
            &v_cache.shape,
            head_dim,
            q_dim,
            (positions, inv_freq, slots),
        )?;
        let q = self.alloc(&[n, q_dim])?;

        if n == 0 {
            return Ok(q);
        }
        let meta = self.rope_uploads(positions, inv_freq, slots)?;
        let [d_pos, d_freq, d_slots] = &*meta;
        let (qp, kc, vc, xp) = (
            self.ptr(&q.buf),
            self.ptr(&k_cache.buf),
            self.ptr(&v_cache.buf),
            self.ptr(&qkv.buf),
        );
        let (pp, fp, sp) = (self.ptr(d_pos), self.ptr(d_freq), self.ptr(d_slots));
        let (qi, ki, hi, pi) = (
            int("q width", q_dim)?,
            int("kv width", kv_dim)?,
            int("head_dim", head_dim)?,
            int("row pitch", qkv.rows_cols().1)?,
        );
        launch!(
            self,
            "rope_kv_write",
            cfg(
                (uint("rows", n)?, 1, 1),
                self.row_threads_for(n, (q_dim + kv_dim) / 2),
                0
            ),
            &qp,
            &kc,
            &vc,
            &xp,
            &pp,
            &fp,
            &sp,
            &qi,
            &ki,
            &hi,
            &pi
        );
        Ok(q)
    }

    fn bytes(&self, n: usize) -> Result<DevBuf> {
        // At least one byte: a zero-sized allocation is not a valid pointer to hand a kernel.
        let n = n.max(1);
        if graph::mode() != graph::Mode::Eager {
            return self.graphs.alloc(n);
        }
        // SAFETY: the memory is uninitialised; every op writes what it reads (checked by the tests with
        // LORAX_CUDA_POISON, which fills it with NaN bytes here).
        let buf = unsafe { self.stream.alloc::<u8>(n) }.map_err(|e| drv(&format!("allocating {n} bytes"), e))?;
        if self.poison {
            let p = self.slice_ptr(&buf);
            // SAFETY: `buf` holds n bytes.
            unsafe { drv_result::memset_d8_async(p, 0xff, n, self.stream.cu_stream()) }
                .map_err(|e| drv("memset", e))?;
        }
        Ok(DevBuf::Own(buf))
    }

    fn alloc(&self, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        Ok(CudaTensor {
            shape: shape.to_vec(),
            buf: self.bytes(n * self.dtype.size())?,
        })
    }

    /// Zeroes `n` bytes at `p` on the stream (signed, and skipped while recording, in graph steps).
    fn memset_zero(&self, p: u64, n: usize) -> Result<()> {
        let m = graph::mode();
        if m != graph::Mode::Eager {
            self.graphs.sign(b"memset");
            self.graphs.sign(&p.to_le_bytes());
            self.graphs.sign(&(n as u64).to_le_bytes());
            if m == graph::Mode::Record {
                return Ok(());
            }
        }
        // SAFETY: the caller's buffer holds n bytes at p.
        unsafe { drv_result::memset_d8_async(p, 0, n, self.stream.cu_stream()) }.map_err(|e| drv("memset", e))
    }

    /// Bytes to an allocation of their own (weights; never the graph arena).
    fn upload_own(&self, bytes: &[u8]) -> Result<DevBuf> {
        let bytes = if bytes.is_empty() { &[0u8][..] } else { bytes };
        Ok(DevBuf::Own(
            self.stream.clone_htod(bytes).map_err(|e| drv("upload", e))?,
        ))
    }

    /// Small host arrays (metadata) to the device: their own allocation, or the graph's metadata arena.
    fn upload<T: Plain>(&self, data: &[T]) -> Result<DevBuf> {
        let bytes = plain_bytes(data);
        if graph::mode() != graph::Mode::Eager {
            return self.graphs.upload(bytes);
        }
        if bytes.is_empty() || bytes.len() > EAGER_STAGING_HALF {
            let bytes = if bytes.is_empty() { &[0u8][..] } else { bytes };
            return Ok(DevBuf::Own(
                self.stream.clone_htod(bytes).map_err(|e| drv("upload", e))?,
            ));
        }
        self.staged_upload(bytes)
    }

    /// `bytes` (at most [`EAGER_STAGING_HALF`]) to a new device allocation through [`EagerStaging`].
    fn staged_upload(&self, bytes: &[u8]) -> Result<DevBuf> {
        let mut guard = self
            .eager_staging
            .lock()
            .map_err(|_| EngineError::Backend("the eager staging buffer was poisoned by a panic".into()))?;
        if guard.is_none() {
            // SAFETY: plain bytes, uninitialised; only the bytes written below are copied.
            let buf = unsafe { self.ctx.alloc_pinned::<u8>(2 * EAGER_STAGING_HALF) }
                .map_err(|e| drv("pinning the eager staging buffer", e))?;
            *guard = Some(EagerStaging {
                buf,
                half: 0,
                used: 0,
                left: [None, None],
            });
        }
        let st = guard
            .as_mut()
            .ok_or_else(|| EngineError::Backend("no eager staging buffer".into()))?;
        let len = bytes.len().next_multiple_of(16);
        if st.used + len > EAGER_STAGING_HALF {
            let ev = self
                .stream
                .record_event(None)
                .map_err(|e| drv("recording a staging event", e))?;
            st.left[st.half] = Some(ev);
            st.half ^= 1;
            st.used = 0;
            if let Some(ev) = st.left[st.half].take() {
                ev.synchronize().map_err(|e| drv("waiting for staged copies", e))?;
            }
        }
        let off = st.half * EAGER_STAGING_HALF + st.used;
        st.used += len;
        // The buffer's own event is never recorded (copies go through the driver API), so this returns at
        // once; the halves' events above order the reuse.
        let host = st.buf.as_mut_slice().map_err(|e| drv("eager staging buffer", e))?;
        let staged = &mut host[off..off + bytes.len()];
        staged.copy_from_slice(bytes);
        // SAFETY: uninitialised; the copy right after writes all of it.
        let dev = unsafe { self.stream.alloc::<u8>(bytes.len()) }
            .map_err(|e| drv(&format!("allocating {} bytes", bytes.len()), e))?;
        let dp = self.slice_ptr(&dev);
        // SAFETY: `dev` holds bytes.len() bytes; the staged bytes are pinned and are not written again before
        // the event recorded after this copy has completed (above).
        unsafe { drv_result::memcpy_htod_async(dp, &*staged, self.stream.cu_stream()) }
            .map_err(|e| drv("upload", e))?;
        Ok(DevBuf::Own(dev))
    }

    fn check_dtype_bytes(&self, t: &CudaTensor) -> Result<()> {
        if t.buf.len() < t.numel() * self.dtype.size() {
            return Err(EngineError::Backend(format!(
                "tensor {:?} is smaller than its shape",
                t.shape
            )));
        }
        Ok(())
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` on the wgmma skinny GEMM when it is built and on and the shape suits
    /// it (m up to 256, k a multiple of 64, 16-byte aligned operands, at most [`SKINNY_MAX_TILES`] tiles);
    /// false (nothing launched) otherwise.
    fn skinny_linear(&self, (m, n, k): (usize, usize, usize), (yp, xp, wp): (u64, u64, u64)) -> Result<bool> {
        let Some(sk) = self.skinny.as_ref().filter(|s| s.on) else {
            return Ok(false);
        };
        let tiles = n.div_ceil(SKINNY_BM);
        let Some((&tn, &name)) = SKINNY_ROWS.iter().zip(&SKINNY_KERNELS).find(|(tn, _)| **tn >= m) else {
            return Ok(false);
        };
        if k % SKINNY_BK != 0 || tiles > SKINNY_MAX_TILES || xp % 16 != 0 || wp % 16 != 0 {
            return Ok(false);
        }
        // One block per multiprocessor at most, and at least one stage per block.
        let blocks = uint("skinny blocks", self.num_sms.min(tiles * (k / SKINNY_BK)))?;
        let (mi, ni, ki) = (int("rows", m)?, int("out features", n)?, int("in features", k)?);
        let (ws, counters) = (sk.ws_ptr, sk.counters_ptr);
        let xmap = tma_map_2d(self.dtype, xp, m, k, tn)?;
        let wmap = tma_map_2d(self.dtype, wp, n, k, SKINNY_BM)?;
        launch!(
            self,
            name,
            cfg((blocks, 1, 1), SKINNY_THREADS as u32, skinny_smem(tn)),
            &yp,
            &xmap,
            &wmap,
            &ws,
            &counters,
            &mi,
            &ni,
            &ki
        );
        Ok(true)
    }

    /// The cuBLAS element type of this backend's storage.
    fn blas_dtype(&self) -> blas_sys::cudaDataType {
        match self.dtype {
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }

    /// A GEMM call's shape `[m, n, k, ldy]` as cuBLAS's ints, and (inside a graph step) its part of the
    /// step's signature: `tag`, the shape, the matrices' pointers, alpha and beta.
    fn gemm_prologue(&self, tag: &[u8], dims: [usize; 4], ptrs: &[u64], (alpha, beta): (f32, f32)) -> Result<[i32; 4]> {
        if graph::mode() != graph::Mode::Eager {
            self.graphs.sign(tag);
            let scalars = [u64::from(alpha.to_bits()), u64::from(beta.to_bits())];
            for v in dims
                .iter()
                .map(|&d| d as u64)
                .chain(ptrs.iter().copied())
                .chain(scalars)
            {
                self.graphs.sign(&v.to_le_bytes());
            }
        }
        self.ctx.bind_to_thread().map_err(|e| drv("bind context", e))?;
        let [m, n, k, ldy] = dims;
        Ok([
            int("rows", m)?,
            int("columns", n)?,
            int("inner", k)?,
            int("row stride", ldy)?,
        ])
    }

    /// `y = alpha · x · wᵀ + beta · y` through cuBLAS, `y`'s rows `ldy` elements apart (a block of columns of
    /// a wider matrix); x `[m, k]` and w `[n, k]` dense. The caller checks pointers and sizes.
    fn gemm_into(
        &self,
        (m, n, k): (usize, usize, usize),
        (yp, xp, wp): (u64, u64, u64),
        ldy: usize,
        (alpha, beta): (f32, f32),
    ) -> Result<()> {
        let dt = self.blas_dtype();
        let [mi, ni, ki, ldy] = self.gemm_prologue(b"gemm", [m, n, k, ldy], &[yp, xp, wp], (alpha, beta))?;
        let mode = graph::mode();
        // Row-major y[m, n] = x[m, k] · w[n, k]ᵀ is column-major yᵀ[n, m] = (w as col-major [k, n])ᵀ · (x as
        // col-major [k, m]): transa = T, transb = N.
        // SAFETY: the pointers cover w (n·k), x (m·k) and y ((m - 1)·ldy + n) elements of `dt`, as the caller
        // checked; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
        if mode != graph::Mode::Record {
            unsafe {
                blas_result::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    ni,
                    mi,
                    ki,
                    (&raw const alpha).cast::<c_void>(),
                    wp as *const c_void,
                    dt,
                    ki,
                    xp as *const c_void,
                    dt,
                    ki,
                    (&raw const beta).cast::<c_void>(),
                    yp as *mut c_void,
                    dt,
                    ldy,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| EngineError::Backend(format!("cuBLAS GEMM {m}x{k} · ({n}x{k})ᵀ: {e:?}")))?;
            self.after_launch("gemm")?;
        }
        Ok(())
    }

    /// [`CudaBackend::gemm_into`] for several products of one shape in one cuBLAS call
    /// (`cublasGemmBatchedEx`): `ys[i][m, n] = alpha · xs[i][m, k] · ws[i][n, k]ᵀ + beta · ys[i]`, rows of
    /// y `ldy` apart. The pointer arrays go to the device as metadata. The caller checks the pointers.
    fn gemm_batched(
        &self,
        (m, n, k): (usize, usize, usize),
        ptrs: &[[u64; 3]],
        ldy: usize,
        (alpha, beta): (f32, f32),
    ) -> Result<()> {
        if ptrs.is_empty() || m == 0 || n == 0 {
            return Ok(());
        }
        let dt = self.blas_dtype();
        // cuBLAS's column-major view, as in gemm_into: A = the weights, B = x, C = y.
        let arrays: Vec<u64> = [2usize, 1, 0]
            .iter()
            .flat_map(|&j| ptrs.iter().map(move |p| p[j]))
            .collect();
        let [mi, ni, ki, ldi] = self.gemm_prologue(b"gemm_batched", [m, n, k, ldy], &arrays, (alpha, beta))?;
        let d_arrays = self.upload(&arrays)?;
        let base = self.ptr(&d_arrays);
        let count = ptrs.len() as u64;
        let ci = int("batch", ptrs.len())?;
        let mode = graph::mode();
        if mode != graph::Mode::Record {
            // SAFETY: the three device arrays hold `count` pointers each, to w (n·k), x (m·k) and y
            // ((m - 1)·ldy + n) elements of `dt` (the caller checked them); alpha and beta are f32 as
            // CUBLAS_COMPUTE_32F requires; the arrays' allocation outlives the call's work (freed
            // stream-ordered, or the graph's metadata arena).
            let status = unsafe {
                blas_sys::cublasGemmBatchedEx(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    ni,
                    mi,
                    ki,
                    (&raw const alpha).cast::<c_void>(),
                    base as *const *const c_void,
                    dt,
                    ki,
                    (base + 8 * count) as *const *const c_void,
                    dt,
                    ki,
                    (&raw const beta).cast::<c_void>(),
                    (base + 16 * count) as *const *mut c_void,
                    dt,
                    ldi,
                    ci,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            status.result().map_err(|e| {
                EngineError::Backend(format!("cuBLAS batched GEMM {count} x {m}x{k} · ({n}x{k})ᵀ: {e:?}"))
            })?;
            self.after_launch("gemm_batched")?;
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type LoraIndex = lora::CudaLoraIndex;
    type LoraStep = lora::CudaLoraStep;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn weight(&self, t: &HostTensor<'_>) -> Result<CudaTensor> {
        let bytes = if t.dtype == self.dtype {
            t.data.to_vec()
        } else {
            self.dtype.encode(&t.to_f32())
        };
        if bytes.len() != t.numel() * self.dtype.size() {
            return Err(EngineError::Backend(format!(
                "tensor {} has {} bytes for shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        Ok(CudaTensor {
            shape: t.shape.clone(),
            buf: self.upload_own(&bytes)?,
        })
    }

    /// All tensors in one device allocation (each at a 256-byte aligned offset), staged as they are in a
    /// pinned buffer and copied on the upload stream, which is waited for: the compute stream can never see
    /// the memory before the copy ends, and never waits on it. Tensors of another type than the backend's
    /// are copied as they are into a scratch allocation and converted there by `convert_in` (exactly the
    /// host's conversion: exact to f32, round to nearest even), so the host only copies bytes.
    fn upload_many(&self, tensors: &[HostTensor<'_>]) -> Result<Vec<CudaTensor>> {
        const ALIGN: usize = 256;
        let es = self.dtype.size();
        // Per tensor: offset in the result, and (for a conversion) offset of its raw bytes in the scratch.
        let mut offsets = Vec::with_capacity(tensors.len());
        let (mut total, mut raw_total) = (0usize, 0usize);
        for t in tensors {
            if t.data.len() != t.numel() * t.dtype.size() {
                return Err(EngineError::Backend(format!(
                    "tensor {} has {} bytes for shape {:?}",
                    t.name,
                    t.data.len(),
                    t.shape
                )));
            }
            let raw = (t.dtype != self.dtype).then_some(raw_total);
            if raw.is_some() {
                raw_total += t.data.len().max(1).next_multiple_of(ALIGN);
            }
            offsets.push((total, raw));
            total += (t.numel() * es).max(1).next_multiple_of(ALIGN);
        }
        if tensors.is_empty() {
            return Ok(Vec::new());
        }
        self.ctx.bind_to_thread().map_err(|e| drv("binding the context", e))?;
        // Staged: the result's layout (tensors already in the backend's type), then the raw scratch.
        let mut lease = StagingLease {
            backend: self,
            buf: Some(self.take_staging(total + raw_total)?),
        };
        let staging = lease
            .buf
            .as_mut()
            .ok_or_else(|| EngineError::Backend("no upload staging buffer".into()))?;
        let result = self.upload_staged(tensors, &offsets, (total, raw_total), staging);
        if result.is_err() && self.upload_stream.synchronize().is_err() {
            tracing::error!(
                "an adapter upload failed and its copies could not be waited for: its staging buffer is leaked"
            );
            return result; // (dropping the lease leaks the buffer)
        }
        if let Some(buf) = lease.buf.take() {
            self.give_back_staging(Some(buf));
        }
        result
    }

    fn begin_file_upload(&self) -> Option<Box<dyn super::FileUpload<CudaTensor> + '_>> {
        Some(Box::new(file_upload::CudaFileUpload::new(self)))
    }

    fn tensor_from_f32(&self, shape: &[usize], data: &[f32]) -> Result<CudaTensor> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(EngineError::Backend(format!(
                "{} values for shape {shape:?}",
                data.len()
            )));
        }
        Ok(CudaTensor {
            shape: shape.to_vec(),
            buf: self.upload_own(&self.dtype.encode(data))?,
        })
    }

    fn to_f32(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.check_dtype_bytes(t)?;
        let n = t.numel() * self.dtype.size();
        if n == 0 {
            return Ok(vec![]);
        }
        let mut bytes = vec![0u8; n];
        let src = self.ptr(&t.buf);
        // SAFETY: the tensor holds at least n bytes at src (checked above); `bytes` holds n.
        unsafe { drv_result::memcpy_dtoh_async(&mut bytes, src, self.stream.cu_stream()) }
            .map_err(|e| drv("download", e))?;
        self.synchronize()?;
        Ok(self.dtype.decode(&bytes))
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        if graph::mode() != graph::Mode::Eager {
            let buf = self.bytes(n * self.dtype.size())?;
            self.memset_zero(self.ptr(&buf), buf.len())?;
            return Ok(CudaTensor {
                shape: shape.to_vec(),
                buf,
            });
        }
        let buf = DevBuf::Own(
            self.stream
                .alloc_zeros::<u8>((n * self.dtype.size()).max(1))
                .map_err(|e| drv("allocating zeros", e))?,
        );
        Ok(CudaTensor {
            shape: shape.to_vec(),
            buf,
        })
    }

    fn shape<'a>(&self, t: &'a CudaTensor) -> &'a [usize] {
        &t.shape
    }

    fn embedding(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        let (vocab, hidden) = table.rows_cols();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::InvalidBatch(format!(
                "token id {id} is outside the vocabulary ({vocab})"
            )));
        }
        let out = self.alloc(&[ids.len(), hidden])?;
        if ids.is_empty() || hidden == 0 {
            return Ok(out);
        }
        let d_ids = if graph::mode() == graph::Mode::Eager {
            self.upload(ids)?
        } else {
            // A step recorded ahead is replayed with other token ids, written where these went.
            self.graphs.upload_tokens(plain_bytes(ids))?
        };
        let (o, t, i, h) = (
            self.ptr(&out.buf),
            self.ptr(&table.buf),
            self.ptr(&d_ids),
            int("hidden", hidden)?,
        );
        let grid = (uint("rows", ids.len())?, 1, 1);
        launch!(self, "embedding", cfg(grid, row_threads(hidden), 0), &o, &t, &i, &h);
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaTensor, bias: Option<&CudaTensor>) -> Result<CudaTensor> {
        let (m, k) = x.rows_cols();
        let (n, k2) = w.rows_cols();
        if k != k2 {
            return Err(shape_err("linear", &x.shape, &w.shape));
        }
        if let Some(b) = bias {
            if b.numel() != n {
                return Err(shape_err("linear bias", &w.shape, &b.shape));
            }
        }
        if m == 0 || n == 0 {
            return self.alloc(&[m, n]);
        }
        if k == 0 {
            return self.zeros(&[m, n]);
        }
        let y = self.alloc(&[m, n])?;
        let (ni, ki) = (int("out features", n)?, int("in features", k)?);
        let (yp, xp, wp) = (self.ptr(&y.buf), self.ptr(&x.buf), self.ptr(&w.buf));
        // Skinny products (decode at small batches) on gemv_{m}: 16-byte loads need k whole vectors and
        // 16-byte aligned rows (allocations are 256-byte aligned).
        let row_bytes = k * self.dtype.size();
        if m <= self.gemv_rows && row_bytes.is_multiple_of(16) && xp.is_multiple_of(16) && wp.is_multiple_of(16) {
            let blocks = uint("output blocks", n.div_ceil(GEMV_WARPS * GEMV_COLS))?;
            launch!(
                self,
                GEMV_KERNELS[m - 1],
                cfg((blocks, 1, 1), GEMV_WARPS as u32 * 32, 0),
                &yp,
                &xp,
                &wp,
                &ni,
                &ki
            );
        } else if !self.skinny_linear((m, n, k), (yp, xp, wp))?
            && !self.gemm_sm90_product(GemmEpilogue::Store, (m, n, k), (yp, xp, wp), n)?
        {
            self.gemm_into((m, n, k), (yp, xp, wp), n, (1.0, 0.0))?;
        }
        if let Some(b) = bias {
            let bp = self.ptr(&b.buf);
            launch!(
                self,
                "add_bias",
                cfg((uint("rows", m)?, 1, 1), row_threads(n), 0),
                &yp,
                &bp,
                &ni
            );
        }
        Ok(y)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let (m, h) = x.rows_cols();
        if w.numel() != h {
            return Err(shape_err("rms_norm", &x.shape, &w.shape));
        }
        let out = self.alloc(&[m, h])?;
        if m == 0 || h == 0 {
            return Ok(out);
        }
        let (o, xp, wp, hi) = (
            self.ptr(&out.buf),
            self.ptr(&x.buf),
            self.ptr(&w.buf),
            int("hidden", h)?,
        );
        launch!(
            self,
            "rms_norm",
            cfg((uint("rows", m)?, 1, 1), self.row_threads_for(m, h), 0),
            &o,
            &xp,
            &wp,
            &hi,
            &eps
        );
        Ok(out)
    }

    fn add_rms_norm(&self, residual: &mut CudaTensor, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let (m, h) = residual.rows_cols();
        // x may be wider: a projection's output with the LoRA shrink's columns past its own (`lora_project`).
        let (xm, xw) = x.rows_cols();
        let wider = residual.shape.len() == 2 && x.shape.len() == 2 && xm == m && xw > h;
        if (x.shape != residual.shape && !wider) || w.numel() != h {
            return Err(shape_err("add_rms_norm", &residual.shape, &x.shape));
        }
        let out = self.alloc(&[m, h])?;
        if m == 0 || h == 0 {
            return Ok(out);
        }
        let (o, r, xp, wp, hi) = (
            self.ptr(&out.buf),
            self.ptr(&residual.buf),
            self.ptr(&x.buf),
            self.ptr(&w.buf),
            int("hidden", h)?,
        );
        let xpi = int("row pitch", if wider { xw } else { h })?;
        launch!(
            self,
            "add_rms_norm",
            cfg((uint("rows", m)?, 1, 1), self.row_threads_for(m, h), 0),
            &o,
            &r,
            &xp,
            &wp,
            &hi,
            &eps,
            &xpi
        );
        Ok(out)
    }

    fn add_assign(&self, dst: &mut CudaTensor, src: &CudaTensor) -> Result<()> {
        if dst.numel() != src.numel() {
            return Err(shape_err("add", &dst.shape, &src.shape));
        }
        let n = dst.numel();
        if n == 0 {
            return Ok(());
        }
        let (d, s, nn) = (self.ptr(&dst.buf), self.ptr(&src.buf), n as u64);
        let grid = self.vec_grid(n, n, &[d, s]);
        launch!(self, "add_assign", cfg((grid, 1, 1), 256, 0), &d, &s, &nn);
        Ok(())
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let (n, w) = gate_up.rows_cols();
        if w % 2 != 0 {
            return Err(EngineError::Backend(format!("silu_mul: odd width {w}")));
        }
        let f = w / 2;
        let out = self.alloc(&[n, f])?;
        if n * f == 0 {
            return Ok(out);
        }
        let (o, x, nn, ff) = (self.ptr(&out.buf), self.ptr(&gate_up.buf), n as u64, f as u64);
        // A row per grid row (the rows past 65535 in turns), its columns across grid.x.
        let cols = self.vec_grid(f, f, &[o, x]);
        let grid = (cols.min(65_535), uint("rows", n.min(65_535))?, 1);
        launch!(self, "silu_mul", cfg(grid, 256, 0), &o, &x, &nn, &ff);
        Ok(out)
    }

    fn linear_silu_mul(&self, x: &CudaTensor, w: &CudaTensor, f: usize) -> Result<Option<CudaTensor>> {
        let (m, k) = x.rows_cols();
        let (rows, k2) = w.rows_cols();
        if k != k2 || rows < 2 * f {
            return Err(shape_err("linear_silu_mul", &x.shape, &w.shape));
        }
        // Nothing allocated where the product will not run on it (the checks of the shape follow in the call).
        if !self.gemm_sm90_wants(GemmEpilogue::Silu, m, f) {
            return Ok(None);
        }
        let y = self.alloc(&[m, f])?;
        let (yp, xp, wp) = (self.ptr(&y.buf), self.ptr(&x.buf), self.ptr(&w.buf));
        Ok(self
            .gemm_sm90_product(GemmEpilogue::Silu, (m, f, k), (yp, xp, wp), f)?
            .then_some(y))
    }

    fn linear_add(&self, x: &CudaTensor, w: &CudaTensor, y: &mut CudaTensor) -> Result<bool> {
        let (m, k) = x.rows_cols();
        let (n, k2) = w.rows_cols();
        let (ym, yn) = y.rows_cols();
        if k != k2 || ym != m || n < yn {
            return Err(shape_err("linear_add", &x.shape, &w.shape));
        }
        let (yp, xp, wp) = (self.ptr(&y.buf), self.ptr(&x.buf), self.ptr(&w.buf));
        self.gemm_sm90_product(GemmEpilogue::Add, (m, yn, k), (yp, xp, wp), yn)
    }

    fn rope_kv_write(
        &self,
        qkv: &CudaTensor,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
    ) -> Result<CudaTensor> {
        self.rope_kv_write_q(qkv, [k_cache, v_cache], head_dim, None, (positions, inv_freq, slots))
    }

    fn rope_attention(
        &self,
        qkv: &CudaTensor,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
        slots: &[u32],
        meta: &AttnMeta<'_>,
    ) -> Result<CudaTensor> {
        // The queries' width from the heads: the projection's rows may hold a LoRA shrink's columns past the
        // values (`lora_project`), which both kernels skip (each reads rows by their width).
        let q_width = meta.num_heads * head_dim;
        let (_, q_dim, _) = super::check_rope_kv_write(
            &qkv.shape,
            &k_cache.shape,
            &v_cache.shape,
            head_dim,
            Some(q_width),
            (positions, inv_freq, slots),
        )?;
        if !self.rope_fused(meta, head_dim, inv_freq) {
            let q = self.rope_kv_write_q(
                qkv,
                [k_cache, v_cache],
                head_dim,
                Some(q_width),
                (positions, inv_freq, slots),
            )?;
            return self.attention(&q, k_cache, v_cache, meta);
        }
        let planning = std::time::Instant::now();
        let uploads = self.rope_uploads(positions, inv_freq, slots)?;
        let plan = self.attention_plan_rope(qkv, q_dim, k_cache, v_cache, meta, (positions, slots), &uploads)?;
        self.graphs.clock.plan(false, planning);
        self.attention_run(&plan)?;
        Ok(plan.output())
    }

    fn concat_rows(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        let shape = super::concat_shape(parts.iter().map(|p| p.shape.as_slice()))?;
        for p in parts {
            self.check_dtype_bytes(p)?;
        }
        if graph::mode() != graph::Mode::Eager {
            return Err(EngineError::Backend("concat_rows inside a graph step".into()));
        }
        let out = self.alloc(&shape)?;
        let mut dst = self.ptr(&out.buf);
        for p in parts {
            let n = p.numel() * self.dtype.size();
            if n > 0 {
                // SAFETY: `out` holds the parts' bytes one after another; each part holds n bytes (checked
                // above); both are device memory of this context, ordered on this stream.
                unsafe { drv_result::memcpy_dtod_async(dst, self.ptr(&p.buf), n, self.stream.cu_stream()) }
                    .map_err(|e| drv("copy", e))?;
            }
            dst += n as u64;
        }
        Ok(out)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k_cache: &CudaTensor,
        v_cache: &CudaTensor,
        meta: &AttnMeta<'_>,
    ) -> Result<CudaTensor> {
        let planning = std::time::Instant::now();
        let plan = self.attention_plan(q, k_cache, v_cache, meta)?;
        self.graphs.clock.plan(false, planning);
        self.attention_run(&plan)?;
        Ok(plan.output())
    }

    fn forward_scope(&self, begin: bool) {
        if begin {
            self.record_mark("start", true);
        }
        // Dropping the kept uploads frees them stream-ordered, after the kernels that read them.
        *self.pass.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = PassCache {
            owner: begin.then(|| std::thread::current().id()),
            ..PassCache::default()
        };
    }

    fn mark(&self, what: &'static str) {
        self.record_mark(what, false);
    }

    fn lora_index(
        &self,
        layers: &[[Option<crate::lora::LoraWeights<Self>>; crate::lora::NUM_TARGETS]],
    ) -> Result<Option<lora::CudaLoraIndex>> {
        self.make_lora_index(layers)
    }

    fn lora_step(
        &self,
        rows: usize,
        segments: &[crate::backend::LoraRows<'_, Self>],
    ) -> Result<Option<lora::CudaLoraStep>> {
        let planning = std::time::Instant::now();
        let step = self.make_lora_step(rows, segments);
        self.graphs.clock.plan(true, planning);
        step
    }

    fn lora_gemm_weight(&self, w: CudaTensor, layer: usize, targets: &[crate::lora::Target]) -> Result<CudaTensor> {
        self.lora_gemm_register(w, layer, targets)
    }

    fn lora_project(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        step: &lora::CudaLoraStep,
        layer: usize,
        parts: &[(crate::lora::Target, usize)],
    ) -> Result<CudaTensor> {
        if bias.is_none() && step.in_gemm != 0 {
            if let Some(y) = self.lora_project_in_gemm(x, w, step, layer, parts)? {
                return Ok(y);
            }
        }
        let mut y = self.linear(x, w, bias)?;
        self.lora_layer(&mut y, x, step, layer, parts)?;
        Ok(y)
    }

    fn lora_layer(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        step: &lora::CudaLoraStep,
        layer: usize,
        parts: &[(crate::lora::Target, usize)],
    ) -> Result<()> {
        let planning = std::time::Instant::now();
        let done = self.lora_step_layer(y, x, step, layer, parts);
        self.graphs.clock.plan(true, planning);
        done
    }

    /// Segments of more than 64 rows (prompt chunks) as cuBLAS GEMMs (`lora_gemm`; one batched call per
    /// shape, `lora_gemm_segments`), the rest
    /// through one BGMV or SGMV plan.
    fn lora(&self, y: &mut CudaTensor, x: &CudaTensor, segments: &[LoraSegment<'_, CudaTensor>]) -> Result<()> {
        let planning = std::time::Instant::now();
        let (long, rest): (Vec<LoraSegment<'_, CudaTensor>>, Vec<_>) = segments
            .iter()
            .partition(|s| self.lora_gemm && s.len > lora::GEMM_MIN_ROWS);
        let plan = self.lora_plan(y, x, &rest)?;
        self.graphs.clock.plan(true, planning);
        if let Some(plan) = plan {
            self.lora_run(&plan)?;
        }
        self.lora_gemm_segments(y, x, &long)
    }

    /// On the device (kernels/sampling.cu); typical-p rows and rows asking for more than 32
    /// alternatives take the host path.
    fn sample(
        &self,
        logits: &CudaTensor,
        tasks: &mut [(usize, crate::sampling::SampleTask<'_>)],
    ) -> Result<Vec<crate::sampling::Sampled>> {
        self.sample_on_device(logits, tasks)
    }

    /// On the device, launching the step recorded ahead with the chosen tokens where it can (sampling.rs).
    fn sample_feeding(
        &self,
        logits: &CudaTensor,
        tasks: &mut [(usize, crate::sampling::SampleTask<'_>)],
        feed: Option<&[u32]>,
    ) -> Result<(Vec<crate::sampling::Sampled>, Option<CudaTensor>)> {
        self.sample_feeding_on_device(logits, tasks, feed)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let (m, c) = x.rows_cols();
        if let Some(&r) = rows.iter().find(|&&r| r >= m) {
            return Err(EngineError::Backend(format!("row {r} of {m}")));
        }
        let out = self.alloc(&[rows.len(), c])?;
        if rows.is_empty() || c == 0 {
            return Ok(out);
        }
        let idx = rows
            .iter()
            .map(|&r| u32::try_from(r).map_err(|_| EngineError::Backend(format!("row {r} overflows u32"))))
            .collect::<Result<Vec<u32>>>()?;
        let d_idx = self.upload(&idx)?;
        let (o, xp, ip, ci) = (
            self.ptr(&out.buf),
            self.ptr(&x.buf),
            self.ptr(&d_idx),
            int("columns", c)?,
        );
        launch!(
            self,
            "gather_rows",
            cfg((uint("rows", rows.len())?, 1, 1), row_threads(c), 0),
            &o,
            &xp,
            &ip,
            &ci
        );
        Ok(out)
    }

    fn wait_idle(&self) -> Result<()> {
        self.synchronize()
    }

    /// Through a CUDA graph when it can (graph.rs).
    fn decode_step(&self, rows: usize, f: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<CudaTensor> {
        self.graph_step(rows, f)
    }

    /// Recorded while the step before runs (graph.rs: `graph_prepare`).
    fn decode_prepare(&self, rows: usize, f: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<bool> {
        self.graph_prepare(rows, f)
    }

    fn decode_prepared(&self, tokens: &[u32]) -> Result<Option<CudaTensor>> {
        self.graph_prepared(tokens)
    }

    /// Every padded row count of a graph step (graph.rs: `graph_rows`), largest first.
    fn decode_warmup_rows(&self) -> Vec<usize> {
        self.graph_warmup_rows()
    }

    fn step_counts(&self) -> crate::backend::StepCounts {
        self.graph_step_counts()
    }

    /// Counted for the graph replays' timing (graph.rs: `ReplayTiming`).
    fn step_started(&self) {
        self.graphs.count_step();
    }

    /// Graph steps run with a few row counts (graph.rs: `graph_rows`).
    fn decode_rows(&self, rows: usize) -> usize {
        self.graph_rows(rows)
    }

    /// Over NCCL on the device once the group is attached; otherwise through the host (the trait's way).
    fn all_reduce_sum(&self, t: &mut CudaTensor, comm: &dyn crate::comm::Communicator) -> Result<()> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        if let Some(group) = &self.nccl {
            return self.nccl_all_reduce(group, t, comm);
        }
        let mut host = self.to_f32(t)?;
        comm.all_reduce_sum(&mut host)?;
        *t = self.tensor_from_f32(&t.shape, &host)?;
        Ok(())
    }

    fn dummy_weight(&self, spec: &crate::dummy::DummySpec) -> Result<CudaTensor> {
        let crate::dummy::Fill::Uniform { key, scale } = spec.fill else {
            // Constants are norms and biases: one row each.
            return self.tensor_from_f32(&spec.shape, &spec.host_values());
        };
        let t = self.alloc(&spec.shape)?;
        let n = spec.numel();
        if n == 0 {
            return Ok(t);
        }
        let (p, nn, cols, full, r0, c0) = (
            self.ptr(&t.buf),
            n as u64,
            spec.cols().max(1) as u64,
            spec.full_cols as u64,
            spec.row_off as u64,
            spec.col_off as u64,
        );
        launch!(
            self,
            "fill_dummy",
            cfg((flat_grid(n), 1, 1), 256, 0),
            &p,
            &nn,
            &cols,
            &full,
            &r0,
            &c0,
            &key,
            &scale
        );
        Ok(t)
    }
}

#[cfg(test)]
mod env_tests {
    use super::{env_count, env_switch};

    #[test]
    fn env_count_takes_a_number_in_range_and_reports_anything_else() {
        // A variable no other test reads (the environment is shared by the test threads).
        const VAR: &str = "LORAX_TEST_ENV_COUNT_ONLY_HERE";
        std::env::remove_var(VAR);
        assert_eq!(env_count(VAR, 3, 1..=64).ok(), Some(3));
        std::env::set_var(VAR, "64");
        assert_eq!(env_count(VAR, 3, 1..=64).ok(), Some(64));
        for bad in ["0", "65", "-1", "three", ""] {
            std::env::set_var(VAR, bad);
            let err = env_count(VAR, 3, 1..=64)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(VAR) && err.contains("1 to 64"), "{bad:?}: {err:?}");
        }
        std::env::remove_var(VAR);
    }

    /// The graph switches (`LORAX_CUDA_GRAPHS`, `_AHEAD`, `_FEED`, `_TIMING`) are on unless `0`; a value that is
    /// neither `1` nor `0` (say `false`, which would otherwise leave a switch on) stops the start.
    #[test]
    fn env_switch_takes_its_two_values_and_reports_anything_else() {
        const VAR: &str = "LORAX_TEST_ENV_SWITCH_ONLY_HERE";
        std::env::remove_var(VAR);
        assert_eq!(env_switch(VAR, ["1", "0"], true).ok(), Some(true));
        assert_eq!(env_switch(VAR, ["1", "0"], false).ok(), Some(false));
        for (v, want) in [("1", true), ("0", false)] {
            std::env::set_var(VAR, v);
            assert_eq!(env_switch(VAR, ["1", "0"], !want).ok(), Some(want), "{v}");
        }
        for bad in ["false", "off", "", "2"] {
            std::env::set_var(VAR, bad);
            let err = env_switch(VAR, ["1", "0"], true)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(VAR) && err.contains("expected 1 or 0"), "{bad:?}: {err:?}");
        }
        std::env::remove_var(VAR);
    }
}

#[cfg(test)]
mod gemm_sm90_tests {
    use super::{silu_t_fill, GEMM_SM90_T_MIN_FILL, GEMM_SM90_T_SMEM};

    /// The default's size test on Mistral-7B's gate/up (14336 features) and an H100's 132 multiprocessors picks the
    /// silu product's kernel where session 45 measured it faster than cuBLAS + silu_mul or equal (1000, 2016, 3024
    /// and 4160 rows) and not where it was slower (512, 1152, 1440, 2048, 2160); the tile's shared memory fits the
    /// 227 KiB a block may opt in to.
    #[test]
    fn silu_t_fill_picks_the_sizes_measured_faster() {
        let fill = |m| silu_t_fill(m, 14336, 132);
        // 1000 rows: 7 tiles of 144 tokens (1008), 784 tiles in 6 rounds of 132.
        let want = 1000.0 / 1008.0 * 784.0 / 792.0;
        assert!((fill(1000) - want).abs() < 1e-12, "{}", fill(1000));
        for m in [1000, 2016, 3024, 4160] {
            assert!(fill(m) >= GEMM_SM90_T_MIN_FILL, "{m}: {}", fill(m));
        }
        for m in [1, 144, 512, 1152, 1440, 2048, 2160] {
            assert!(fill(m) < GEMM_SM90_T_MIN_FILL, "{m}: {}", fill(m));
        }
        assert!(silu_t_fill(0, 14336, 132) == 0.0 && silu_t_fill(1000, 0, 132) == 0.0);
        // Features past the last whole tile count as waste: half a tile of features halves the fill.
        assert!((silu_t_fill(1008, 64, 1) - 0.5).abs() < 1e-12);
        const { assert!(GEMM_SM90_T_SMEM <= 227 * 1024) };
    }
}

#[cfg(test)]
mod prefill_shape_tests {
    use super::{PrefillShape, KERNELS, SMEM_LIMIT};

    /// The host's view of each shape (warps, rows, keys a step, shared memory) agrees with its kernel's
    /// name, which kernels/prefill.cu instantiates as `_w<W>[r2]n<BN>` from the same numbers; every shape's
    /// kernels are in the module's name list; the fallback shapes fit the default shared memory.
    #[test]
    fn shapes_agree_with_their_kernel_names() {
        for shape in PrefillShape::ALL {
            // w4n32 is the unsuffixed kernel.
            let label = shape.label();
            let (w, rest) = label[1..].split_once(['r', 'n']).unwrap_or_default();
            let groups = if label.contains("r2") { 2 } else { 1 };
            let keys: usize = rest.rsplit('n').next().unwrap_or_default().parse().unwrap_or_default();
            assert_eq!(w.parse::<usize>().ok(), Some(shape.warps()), "{label}");
            assert_eq!(shape.rows(), 16 * groups * shape.warps(), "{label}");
            assert_eq!(shape.keys(), keys, "{label}");
            let q_rows = if groups == 2 { shape.rows() } else { 0 };
            assert_eq!(shape.smem_bytes(128, 2), (4 * keys + q_rows) * 136 * 2, "{label}");
            for hd in [64, 128] {
                let name = shape.kernel(hd);
                assert!(
                    KERNELS.iter().any(|(_, names)| names.contains(&name.as_str())),
                    "{name}"
                );
            }
            assert!(shape.narrow().smem_bytes(128, 2) <= SMEM_LIMIT, "{label}");
        }
        // docs/gpu.md's sizes at head size 128 in bf16.
        assert_eq!(PrefillShape::W4R2N32.smem_bytes(128, 2), 69_632);
        assert_eq!(PrefillShape::W2R2N32.smem_bytes(128, 2), 52_224);
        // The default: one 1000-token prompt (8 tiles of 128 rows) on w8n64, 2048 rows and up on w4r2n32.
        assert_eq!(PrefillShape::auto(8), PrefillShape::W8N64);
        assert_eq!(PrefillShape::auto(15), PrefillShape::W8N64);
        assert_eq!(PrefillShape::auto(16), PrefillShape::W4R2N32);
    }

    /// The Hopper prefill kernels: each form names its kernel (in the module's list, in order), and the shared
    /// memory asked for fits the 227 KiB a Hopper block may opt in to; other labels name none.
    #[test]
    fn hopper_prefill_kernels_fit_a_block() {
        let module = KERNELS.iter().find(|(m, _)| *m == "prefill_sm90").map(|k| k.1);
        assert_eq!(module, Some(&super::PREFILL_SM90_KERNELS[..]));
        for (i, label) in super::PREFILL_SM90_LABELS.into_iter().enumerate() {
            let form = super::PrefillSm90::by_label(label).expect("every label names a form");
            assert_eq!(form.kernel, super::PREFILL_SM90_KERNELS[i]);
            let smem = form.smem();
            assert!(smem > 0 && smem <= 227 * 1024, "{label}: {smem} bytes");
        }
        let smem = |l| super::PrefillSm90::by_label(l).map(super::PrefillSm90::smem);
        assert_eq!(smem("ws64"), Some(164_928));
        assert_eq!(smem("ws128"), Some(230_448));
        assert!(smem("64").is_none() && smem("128").is_none());
        // The default picks by the launch's longest prompt; a form's label keeps that form.
        let choice = |l| super::PrefillSm90Choice::by_label(l).expect("a choice");
        let label = |l, keys| choice(l).form(keys).label;
        assert_eq!(label(super::PREFILL_SM90_DEFAULT, 1000), "ws64");
        assert_eq!(
            label(super::PREFILL_SM90_DEFAULT, super::PREFILL_SM90_LONG_KEYS - 1),
            "ws64"
        );
        assert_eq!(
            label(super::PREFILL_SM90_DEFAULT, super::PREFILL_SM90_LONG_KEYS),
            "ws128"
        );
        assert_eq!(label("ws64", 16384), "ws64");
        assert_eq!(label("ws128", 1000), "ws128");
        assert!(super::PrefillSm90Choice::by_label("64").is_none());
    }
}
