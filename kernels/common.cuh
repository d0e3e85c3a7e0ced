// Shared prelude of every kernel module (prepended by the Rust side before NVRTC compiles a .cu file).
//
// The storage type T is chosen per module with one define: LORAX_DTYPE_BF16, LORAX_DTYPE_F16 or
// LORAX_DTYPE_F32. Arithmetic is always f32: values are loaded with to_f and stored with from_f
// (round to nearest even). No CUDA header is included, so the module compiles without an include path.

typedef unsigned int u32;
typedef unsigned long long u64;

#if defined(LORAX_DTYPE_BF16)
typedef unsigned short T;
__device__ __forceinline__ float to_f(T v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ T from_f(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
}
#elif defined(LORAX_DTYPE_F16)
typedef unsigned short T;
__device__ __forceinline__ float to_f(T v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ T from_f(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#elif defined(LORAX_DTYPE_F32)
typedef float T;
__device__ __forceinline__ float to_f(T v) { return v; }
__device__ __forceinline__ T from_f(float f) { return f; }
#else
#error "define one of LORAX_DTYPE_BF16, LORAX_DTYPE_F16, LORAX_DTYPE_F32"
#endif

// log2(n) for a power of two n (the host checks n > 0), else -1: paged kernels find a position's cache block
// and offset by shift and mask where the block size allows (much of their index arithmetic), by division
// otherwise.
__device__ __forceinline__ int pow2_log(int n) { return (n & (n - 1)) != 0 ? -1 : __ffs(n) - 1; }

// Elements of T in one 16-byte access.
#define VEC (16 / (int)sizeof(T))

#define NEG_INF (__int_as_float(0xff800000))

struct alignas(16) u32x4 { u32 x, y, z, w; };
struct alignas(8) u32x2 { u32 x, y; };
struct alignas(16) f32x4 { float x, y, z, w; };

// 16 bytes of a weight (read-only for the kernel's life), not kept in the L1 (gemv, the decode LoRA).
__device__ __forceinline__ u32x4 load_stream(const T* p) {
#ifdef LORAX_EMU
    return *reinterpret_cast<const u32x4*>(p);
#else
    u32x4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#endif
}

// Loads N consecutive elements (N * sizeof(T) bytes, aligned to that size) as f32.
template <int N>
__device__ __forceinline__ void load_n(const T* __restrict__ p, float* out) {
    constexpr int BYTES = N * (int)sizeof(T);
    if constexpr (BYTES == 16) {
        u32x4 r = *reinterpret_cast<const u32x4*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
    } else if constexpr (BYTES == 8) {
        u32x2 r = *reinterpret_cast<const u32x2*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
    } else if constexpr (BYTES == 4 && N == 2) {
        u32 r = *reinterpret_cast<const u32*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(p[i]);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (every thread gets the result). Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float buf[32];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = lane < nw ? buf[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) buf[0] = v;
    }
    __syncthreads();
    const float r = buf[0];
    __syncthreads();
    return r;
}

// Maximum over the whole block (every thread gets the result). Every thread of the block must call it.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float buf[32];
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = lane < nw ? buf[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) buf[0] = v;
    }
    __syncthreads();
    const float r = buf[0];
    __syncthreads();
    return r;
}

// Programmatic dependent launch (sm_90 and later; nothing before that, nor under the CPU emulation). The
// backend can launch every kernel allowed to start before the kernel ahead of it in the stream has finished
// (LORAX_CUDA_PDL, docs/gpu.md), so every kernel must call pdl_wait() in every block before it reads what
// an earlier kernel wrote or writes what an earlier kernel reads: it returns once the grids this one
// depends on have completed and their writes are visible. Only reads of what no kernel writes (weights)
// may come before it. pdl_launch() then lets the next kernel's blocks be scheduled while this one runs;
// they wait in their own pdl_wait(). A kernel launched without the attribute returns from both at once.
// The test `every_kernel_waits_for_its_predecessor` (crates/engine) checks each entry point calls
// pdl_enter() or pdl_wait().
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
// The usual entry: wait for the kernels ahead, then let the next one be scheduled.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_launch();
}

// 16-byte copies from global to shared memory that bypass registers (cp.async, sm_80 and later; a plain
// copy before that, and under the CPU emulation): a block queues the next stage's keys and values while
// it computes on the current one.
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    u32 d;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(d) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
    *reinterpret_cast<u32x4*>(dst) = *reinterpret_cast<const u32x4*>(src);
#endif
}
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// 2^x on the special-function unit (ex2.approx, flush-to-zero: about 2 ulp; exp2(-inf) = 0).
__device__ __forceinline__ float exp2_fast(float x) {
#if defined(LORAX_EMU)
    return std::exp2(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// silu(g) = g / (1 + e^-g) on the special-function unit (ex2.approx and a fast reciprocal, a few ulp of f32: its
// bf16/f16 rounding differs from the IEEE form's only where the value lies that close to a rounding boundary, rarely
// against bf16's 2^-8 spacing; an estimate, not a measurement). silu_mul and the Hopper
// GEMM's silu epilogues (gemm_sm90.cu) both take it, so that they stay bit for bit equal; the IEEE expf and
// division ran while the tensor cores idled (bench/NOTES.md, session 45: the 128-row silu form went from 11 us over
// the plain product at 1000 rows to 6 us under it).
// f32 storage (no such epilogue) keeps the IEEE form.
__device__ __forceinline__ float silu_f(float g) {
#if defined(LORAX_EMU)
    return g / (1.0f + std::exp(-g));
#elif defined(LORAX_DTYPE_F32)
    return g / (1.0f + expf(-g));
#else
    return __fdividef(g, 1.0f + exp2_fast(-1.4426950408889634f * g));
#endif
}

#if defined(LORAX_DTYPE_BF16) || defined(LORAX_DTYPE_F16)
// Tensor cores (prefill.cu, the `_tc` decode attention of attention.cu): c += a.b for a 16x16 (row) by
// 16x8 (col) tile pair of the storage type, f32 accumulators, as mma.sync m16n8k16 lays its fragments out:
// lane l = 4g + t holds a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]} (two elements each,
// the lower k in the low half), b = {B[2t..][g], B[2t+8..][g]}, c = {C[g][2t], C[g][2t+1], C[g+8][2t],
// C[g+8][2t+1]}. Under the CPU emulation (LORAX_EMU, tests/emu/cuemu.h) the warp gathers every lane's
// fragments and each lane computes its own four sums.
__device__ __forceinline__ void mma_16816(float* c, const u32* a, const u32* b) {
#if defined(LORAX_EMU)
    uint64_t A[4][32], B[2][32];
    for (int r = 0; r < 4; ++r) gather(a[r], A[r]);
    for (int r = 0; r < 2; ++r) gather(b[r], B[r]);
    auto half = [](uint64_t w, int k) { return to_f((T)(k % 2 ? (w >> 16) & 0xffffu : w & 0xffffu)); };
    const int lane = threadIdx.x & 31, g = lane / 4, t2 = (lane % 4) * 2;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = t2 + (i & 1);
        float s = 0.f;
        for (int k = 0; k < 16; ++k)
            s += half(A[(row >= 8) + 2 * (k >= 8)][(row % 8) * 4 + (k % 8) / 2], k) *
                 half(B[k >= 8][col * 4 + (k % 8) / 2], k);
        c[i] += s;
    }
#elif defined(LORAX_DTYPE_BF16)
    // Not volatile: a pure function of its registers, so the compiler may interleave independent products
    // (ldmatrix and cp.async stay volatile: they touch shared memory).
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two elements as one 32-bit operand register (the lower k index in the low half).
__device__ __forceinline__ u32 pack(T lo, T hi) { return (u32)lo | ((u32)hi << 16); }
// Two f32 values rounded to the storage type (nearest even) as one 32-bit register, lo in the low half: one
// cvt on sm_80 and later instead of from_f's integer rounding twice (bf16), bit for bit the same for every
// value but NaN (whose payload the cvt makes canonical). LORAX_NO_CVT_PAIRS (a define for comparisons) keeps
// the integer rounding.
__device__ __forceinline__ u32 pack_f(float lo, float hi) {
#if defined(LORAX_EMU) || defined(LORAX_NO_CVT_PAIRS) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
    return pack(from_f(lo), from_f(hi));
#elif defined(LORAX_DTYPE_BF16)
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}
// A shared-memory address as ldmatrix and cp.async take it.
__device__ __forceinline__ u32 smem_addr(const void* p) {
#if defined(LORAX_EMU)
    return 0;
#else
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#endif
}

// ldmatrix.x4: four 8x8 tiles of 16-bit elements from shared memory; lane 8m + r passes the address of row r
// of tile m (16 bytes, 16-byte aligned). Lane l = 4g + t gets, in r[m], tile m's elements (g, 2t) and
// (g, 2t + 1), or with TRANS (2t, g) and (2t + 1, g): an mma B fragment from rows (keys) of a row-major
// tile (TRANS: from a tile stored the other way round).
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(u32* r, const T* row) {
#if defined(LORAX_EMU)
    uint64_t rows[32];
    gather((uint64_t)(uintptr_t)row, rows);
    const int lane = threadIdx.x & 31, g = lane / 4, t2 = (lane % 4) * 2;
    for (int m = 0; m < 4; ++m) {
        if (TRANS) {
            const T* a = (const T*)(uintptr_t)rows[m * 8 + t2];
            const T* b = (const T*)(uintptr_t)rows[m * 8 + t2 + 1];
            r[m] = pack(a[g], b[g]);
        } else {
            const T* a = (const T*)(uintptr_t)rows[m * 8 + g];
            r[m] = pack(a[t2], a[t2 + 1]);
        }
    }
#else
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row)));
#endif
}
#endif

// a and b rounded to the storage type and back (an intermediate rounding that transformers makes by computing
// in that type): one pack_f for 16-bit types, nothing for f32.
__device__ __forceinline__ void round2(float& a, float& b) {
#if !defined(LORAX_DTYPE_F32)
    const u32 p = pack_f(a, b);
    a = to_f((T)(p & 0xffffu));
    b = to_f((T)(p >> 16));
#endif
}
// VEC values rounded to the storage type and back, in place (round2 on each pair).
__device__ __forceinline__ void round_vec(float* v) {
#pragma unroll
    for (int e = 0; e < VEC; e += 2) round2(v[e], v[e + 1]);
}
// VEC values rounded to the storage type as one 16-byte vector (pairs by pack_f for 16-bit types).
__device__ __forceinline__ u32x4 to_vec(const float* v) {
#if defined(LORAX_DTYPE_F32)
    return {__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])};
#else
    return {pack_f(v[0], v[1]), pack_f(v[2], v[3]), pack_f(v[4], v[5]), pack_f(v[6], v[7])};
#endif
}

// The prefill attention kernels' launch contract (kernels/prefill.cu, kernels/prefill_sm90.cu).
// A tile of query rows: first row in the flattened batch, rows (at most the kernel's tile), position of the
// first row, offset of the sequence's block table.
struct PrefillTile {
    int row0;
    int rows;
    int pos0;
    int table;
};

// The parameters of prefill_attention and its entry points.
#define PREFILL_PARAMS                                                                                          \
    T *__restrict__ out, const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache, \
        const PrefillTile *__restrict__ tiles, const u32 *__restrict__ tables, int num_heads, int num_kv_heads, \
        int block_size, float scale
// The same parameters as arguments, for the entry points that pass them on.
#define PREFILL_ARGS out, q, k_cache, v_cache, tiles, tables, num_heads, num_kv_heads, block_size, scale
