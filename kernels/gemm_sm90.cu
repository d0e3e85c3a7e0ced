// Prompt-sized GEMMs on Hopper's warpgroup MMA (wgmma; sm_90a, 16-bit storage) whose epilogues do the work that
// otherwise takes a kernel of its own after cuBLAS's product (bench/NOTES.md, session 44):
//   - `gemm_sm90_silu`: out[m, f] = silu(x . Wg^T) * (x . Wu^T) for the fused gate/up weight w [2f, k] (gate rows
//     0..f, up rows f..2f), rounded as the separate kernels round: each product to the storage type (cuBLAS's
//     output), silu's result to it (elementwise.cu silu_mul), then the product. The [m, 2f] gate/up output is
//     never written and silu_mul never runs;
//   - `gemm_sm90_add`: y[m, n] += x . w^T, the product rounded to the storage type first, as add_rms_norm adds
//     cuBLAS's output: the o and down products add into the residual stream, and the norm after runs alone;
//   - `gemm_sm90`: y[m, n] = x . w^T, rows of y `ldy` apart (the same main loop, a plain store: to compare the
//     main loop with cuBLAS's on any shape);
//   - `gemm_sm90_silu_t`: the silu-mul product with the tokens on the MMA's N side (at the end of this file).
// The shape of the kernel (CUTLASS's warp-specialized "cooperative" persistent kernel):
//   - a block is three warpgroups (384 threads): warpgroup 0's first thread, the producer, copies stages of
//     GM_BK = 64 of k by TMA (x: 128 rows; w: two boxes of 128 rows, the gate's and the up's for silu, two
//     neighbours otherwise; rows past m or past w's rows read as zeros), up to GM_STAGES ahead, each stage
//     guarded by a "full" mbarrier (the copies' bytes arrived) and an "empty" one (each consumer warp's
//     products that read it retired);
//   - consumer warpgroup w (1 or 2) takes the tile's rows 64 (w - 1).. of 64 by all 256 of w's rows, one
//     m64n256k16 product per 16 of k, keeping one stage's products in flight while it issues the next;
//   - clusters of two blocks (see GM_CLUSTER): the two take two row tiles of one column tile, and w's boxes are
//     multicast to both;
//   - persistent: one block per multiprocessor (at most), cluster q takes pairs of row tiles q, q + clusters,
//     ...; pair p is row tiles 2 (p % mp) and the next of column tile p / mp, so clusters running side by side
//     share a column tile's weights (read from memory once, the rest from L2) while x stays in L2. The producer
//     runs into the next tile's stages while the consumers store the last one's.
// Sums are f32 in the MMA; the host checks k % 64 == 0, n % 8 == 0 (f for silu), 16-byte aligned x and w and
// 4-byte aligned y with an even ldy, and builds the two tensor maps (x: k by m, box 64 by 128; w: k by its
// rows, box 64 by 128; both 128-byte swizzled).

#define GM_BM 128
#define GM_BK 64
#define GM_STAGES 4
#define GM_THREADS 384
#define GM_A_BYTES (GM_BM * GM_BK * 2)         // 16 KiB: 128 rows of x
#define GM_B_BYTES (256 * GM_BK * 2)           // 32 KiB: 256 rows of w
#define GM_STAGE (GM_A_BYTES + GM_B_BYTES)      // a multiple of 1024: swizzle atoms stay aligned
#define GM_CONSUMERS 256

// A cluster of GM_CLUSTER = 2 blocks takes two row tiles of one column tile at a time: each block copies its own
// 128 rows of x and one of the two boxes of w, which TMA multicasts to both blocks (a third less L2 traffic a
// stage). So a stage's buffers in both blocks are written by both producers: each block's "empty" barrier counts
// the consumer warps of both blocks, and each block's "full" barrier the bytes of both. GM_CLUSTER = 1 (a define
// for comparisons: LORAX_CUDA_DEFINES=-DGM_CLUSTER=1) is one block a tile copying both boxes itself; the host
// reads the size from the compiled kernel.
#ifndef GM_CLUSTER
#define GM_CLUSTER 2
#endif
#if GM_CLUSTER == 2
#define GM_CLUSTER_DIMS __cluster_dims__(2, 1, 1)
#elif GM_CLUSTER == 1
#define GM_CLUSTER_DIMS
#else
#error "GM_CLUSTER is 1 or 2"
#endif

__device__ __forceinline__ u32 gm_cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// The shared::cluster address of the variable at shared::cta address `a` in the cluster's block `rank`.
__device__ __forceinline__ u32 gm_mapa(u32 a, u32 rank) {
    u32 d;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
    return d;
}
// An arrival on another block's mbarrier (its shared::cluster address), at the default (CTA) scope as CUTLASS's
// ClusterBarrier::arrive: a cluster-scope release fenced each consumer warp's every stage (session 44 call 3:
// 44% of the warps' cycles stalled on that memory barrier, the kernel 40% slower than with one block a tile).
__device__ __forceinline__ void gm_arrive_cluster(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void gm_cluster_sync() {
#if GM_CLUSTER == 2
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
#else
    __syncthreads();
#endif
}
// The box of `map` at (c0, c1) into shared memory at dst in every block of the cluster (mask 0b11), its bytes
// completing on each block's barrier at `bar`.
__device__ __forceinline__ void gm_tma_multicast(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(bar), "h"((unsigned short)((1 << GM_CLUSTER) - 1))
        : "memory");
}

// The epilogues: GM_STORE (y = the product), GM_SILU (silu-mul: tiles of 128 output columns, w's rows c0.. and
// f + c0..; the others take 256) and GM_ADD (y += the product rounded to the storage type, y rounded again: the
// residual add of add_rms_norm, whose norm then runs alone).
#define GM_STORE 0
#define GM_SILU 1
#define GM_ADD 2

// silu(g) * u for two pairs of storage-type values packed low half first, rounded as silu_mul rounds them (silu's
// result to the storage type, then the product): pairs by pack_f's one cvt, silu by silu_f (common.cuh).
__device__ __forceinline__ u32 gm_silu_mul2(u32 g, u32 u) {
    const u32 s = pack_f(silu_f(to_f((T)(g & 0xffffu))), silu_f(to_f((T)(g >> 16))));
    return pack_f(to_f((T)(s & 0xffffu)) * to_f((T)(u & 0xffffu)), to_f((T)(s >> 16)) * to_f((T)(u >> 16)));
}

template <int EPI>
__device__ __forceinline__ void gemm_sm90_body(T* __restrict__ y, const TmaMap* xmap, const TmaMap* wmap, int m, int n,
                                               int k, int ldy) {
    constexpr bool SILU = EPI == GM_SILU;
    constexpr int TW = SILU ? 128 : 256;  // output columns a tile
    extern __shared__ unsigned char gm_raw[];
    __shared__ __align__(8) u64 bars[2 * GM_STAGES];  // full[s], then empty[s]
    const u32 base = (sk_smem(gm_raw) + 1023u) & ~1023u;
    const u32 full0 = sk_smem(bars), empty0 = full0 + GM_STAGES * 8;
    const u32 rank = GM_CLUSTER == 2 ? gm_cluster_rank() : 0;
    const u32 peer_empty0 = GM_CLUSTER == 2 ? gm_mapa(empty0, rank ^ 1) : 0;
    const int tid = threadIdx.x, lane = tid % 32, warp = (tid % 128) / 32;
    // The warpgroup from a value the compiler knows is the same across the warp (a per-thread test would
    // make every wgmma "divergent", and ptxas would serialise them).
    const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    const int kbs = k / GM_BK;
    // Pairs of row tiles (the second of the last pair may lie past m: its block copies zeros of x, still
    // multicasts its box of w, and stores nothing) by column tiles; cluster q of nq takes pairs q, q + nq, ...
    const int mp = (m + GM_CLUSTER * GM_BM - 1) / (GM_CLUSTER * GM_BM), nt = (n + TW - 1) / TW;
    const int pairs = mp * nt;
    const int q0 = blockIdx.x / GM_CLUSTER, nq = gridDim.x / GM_CLUSTER;

    if (tid == 0) {
        for (int s = 0; s < GM_STAGES; ++s) {
            mb_init(full0 + s * 8, 1);  // the producer's arrival, then both blocks' copies' bytes
            mb_init(empty0 + s * 8, GM_CLUSTER * GM_CONSUMERS / 32);  // each consumer warp of the cluster
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(wmap) : "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(xmap) : "memory");
        // This block's first stages of w into L2 before waiting for the kernel ahead (no kernel writes the rows read
        // here: a LoRA scratch block lies past them).
        if (q0 < pairs) {
            const int c0 = (q0 / mp) * TW;
            for (int kb = 0; kb < GM_STAGES && kb < kbs; ++kb)
                for (int h = 0; h < 2; ++h)
                    if (GM_CLUSTER == 1 || h == (int)rank) tma_prefetch_l2(wmap, kb * GM_BK, h == 0 ? c0 : (SILU ? n + c0 : c0 + 128));
        }
    }
    // Both blocks' barriers are initialised before either block's copies or arrivals reach them.
    gm_cluster_sync();
    pdl_enter();

    if (wg == 0) {
        // The producer. Its warpgroup's registers go to the consumers (40 + 2 x 232 = 3 x 168).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
        if (tid == 0) {
            int it = 0;
            for (int p = q0; p < pairs; p += nq) {
                const int r0 = (GM_CLUSTER * (p % mp) + (int)rank) * GM_BM, c0 = (p / mp) * TW;
                // w's boxes: the gate's (or the first 128 rows), then the up's (or the next 128). In a cluster of
                // two, block `rank` copies box `rank` into the same place of both blocks' stage.
                const int b0 = c0, b1 = SILU ? n + c0 : c0 + 128;
                for (int kb = 0; kb < kbs; ++kb, ++it) {
                    const int s = it % GM_STAGES;
                    mb_wait(empty0 + s * 8, ((it / GM_STAGES) & 1) ^ 1);
                    const u32 full = full0 + s * 8, sa = base + s * GM_STAGE, sb = sa + GM_A_BYTES;
                    mb_expect(full, GM_STAGE);
                    tma_load(sa, xmap, kb * GM_BK, r0, full);
                    if constexpr (GM_CLUSTER == 2) {
                        gm_tma_multicast(sb + rank * (GM_B_BYTES / 2), wmap, kb * GM_BK, rank == 0 ? b0 : b1, full);
                    } else {
                        tma_load(sb, wmap, kb * GM_BK, b0, full);
                        tma_load(sb + GM_B_BYTES / 2, wmap, kb * GM_BK, b1, full);
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
        const int cw = wg - 1;  // the consumer warpgroup: the tile's rows 64 cw..
        // Accumulator r of this thread: row 16 warp + lane / 4 + 8 ((r / 2) % 2) of the warpgroup's 64, column
        // 8 (r / 4) + 2 (lane % 4) + r % 2 of the tile's 256 (for silu: gate columns 0..127, up columns 128..255,
        // so gate r pairs with up r + 64).
        float acc[128];
        auto pin = [&]() {
#pragma unroll
            for (int r = 0; r < 128; ++r) wgmma_fence_operand(acc[r]);
        };
        // Hands stage s back to both blocks' producers: this warp's products that read it have retired.
        auto release = [&](int s) {
            __syncwarp();
            if (lane == 0) {
                mb_arrive(empty0 + s * 8);
                if constexpr (GM_CLUSTER == 2) gm_arrive_cluster(peer_empty0 + s * 8);
            }
        };
        const int g = lane / 4, q = lane % 4;
        int it = 0;
        for (int p = q0; p < pairs; p += nq) {
            const int r0 = (GM_CLUSTER * (p % mp) + (int)rank) * GM_BM, c0 = (p / mp) * TW;
            for (int kb = 0; kb < kbs; ++kb, ++it) {
                const int s = it % GM_STAGES;
                mb_wait(full0 + s * 8, (it / GM_STAGES) & 1);
                const u32 sa = base + s * GM_STAGE + cw * 64 * 128, sb = base + s * GM_STAGE + GM_A_BYTES;
                pin();
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < GM_BK / 16; ++kk)
                    wgmma_n256(acc, sk_desc(sa + kk * 32), sk_desc(sb + kk * 32), (kb | kk) != 0);
                wgmma_commit();
                // The previous stage's products have retired once at most this stage's are in flight.
                wgmma_wait<1>();
                pin();
                if (kb > 0) release((it - 1) % GM_STAGES);
            }
            wgmma_wait<0>();
            pin();
            release((it - 1) % GM_STAGES);

            // The store: value pair j of row half hh (columns c0 + 8 j + 2 q and the next) as one 32-bit word;
            // rows past m and columns past n are not written (n made opaque: otherwise the compiler keeps every
            // column's test in registers through the main loop).
            auto store = [&](int hh, int j, u32 v) {
                const int row = r0 + cw * 64 + warp * 16 + g + 8 * hh, col = c0 + 8 * j + 2 * q;
                int nn = n;
                asm volatile("" : "+r"(nn));
                if (row >= m || col >= nn) return;
                u32* dst = reinterpret_cast<u32*>(y + (u64)row * ldy + col);
                if constexpr (EPI == GM_ADD) {
                    const u32 r = *dst;
                    v = pack_f(to_f((T)r) + to_f((T)v), to_f((T)(r >> 16)) + to_f((T)(v >> 16)));
                }
                *dst = v;
            };
            if constexpr (SILU) {
                // Gate and up rounded to the storage type first (as cuBLAS's output is), two a register: half
                // the registers of the sums, which the silu's arithmetic then has room beside.
                u32 gp[32], up[32];
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    gp[i] = pack_f(acc[2 * i], acc[2 * i + 1]);
                    up[i] = pack_f(acc[64 + 2 * i], acc[64 + 2 * i + 1]);
                }
#pragma unroll
                for (int i = 0; i < 32; ++i) store(i % 2, i / 2, gm_silu_mul2(gp[i], up[i]));
            } else {
#pragma unroll
                for (int i = 0; i < 64; ++i) store(i % 2, i / 2, pack_f(acc[2 * i], acc[2 * i + 1]));
            }
        }
    }
    // Neither block leaves while the other may still arrive on its barriers.
    gm_cluster_sync();
}

// The host asks for GM_STAGES * GM_STAGE + 1024 bytes (alignment slack) of dynamic shared memory and launches
// GM_CLUSTER x min(units of GM_CLUSTER row tiles x column tiles, clusters the device runs at once) blocks of
// GM_THREADS.
extern "C" __global__ void GM_CLUSTER_DIMS __launch_bounds__(GM_THREADS, 1)
    gemm_sm90(T* __restrict__ y, const __grid_constant__ TmaMap xmap, const __grid_constant__ TmaMap wmap, int m, int n,
              int k, int ldy) {
    gemm_sm90_body<GM_STORE>(y, &xmap, &wmap, m, n, k, ldy);
}

// n = f, the output's columns (w has 2f rows); ldy = f for a dense output.
extern "C" __global__ void GM_CLUSTER_DIMS __launch_bounds__(GM_THREADS, 1)
    gemm_sm90_silu(T* __restrict__ y, const __grid_constant__ TmaMap xmap, const __grid_constant__ TmaMap wmap, int m,
                   int n, int k, int ldy) {
    gemm_sm90_body<GM_SILU>(y, &xmap, &wmap, m, n, k, ldy);
}

// y += x . w^T: y (the residual stream) read and written in place.
extern "C" __global__ void GM_CLUSTER_DIMS __launch_bounds__(GM_THREADS, 1)
    gemm_sm90_add(T* __restrict__ y, const __grid_constant__ TmaMap xmap, const __grid_constant__ TmaMap wmap, int m,
                  int n, int k, int ldy) {
    gemm_sm90_body<GM_ADD>(y, &xmap, &wmap, m, n, k, ldy);
}

// The silu-mul product with the roles of x and w swapped, as cuBLAS's kernels take them (`gemm_sm90_silu_t`; session
// 44): a tile is GT_TN = 144 tokens (the MMA's N side) by 128 features, whose gate and up rows of w (256) are the
// MMA's M side. Consumer warpgroup c takes the features 64 c.. of the tile with two m64n144k16 products a 16 of k,
// one on their gate rows and one on their up rows, so a thread holds a feature's gate and up sums for the same
// tokens. 144 tokens a tile make 1000 tokens 7 tiles (1008 rows computed) where 128 make 8 (1024): with 112
// feature tiles, 784 tiles on 132 multiprocessors in 6 rounds against 896 in 7. One block a tile, no cluster.
// The host asks for GT_STAGES * GT_STAGE + 1024 bytes of dynamic shared memory; x's map has boxes of 144 rows.
#define GT_TN 144
#define GT_A_BYTES (256 * GM_BK * 2)          // 32 KiB: 128 gate rows, then 128 up rows of w
#define GT_B_BYTES (GT_TN * GM_BK * 2)        // 18 KiB: 144 rows of x
#define GT_STAGE (GT_A_BYTES + GT_B_BYTES)    // 50 KiB, a multiple of 1024
#define GT_STAGES 4

extern "C" __global__ void __launch_bounds__(GM_THREADS, 1)
    gemm_sm90_silu_t(T* __restrict__ y, const __grid_constant__ TmaMap xmap, const __grid_constant__ TmaMap wmap,
                     int m, int f, int k, int ldy) {
    extern __shared__ unsigned char gt_raw[];
    __shared__ __align__(8) u64 bars[2 * GT_STAGES];  // full[s], then empty[s]
    const u32 base = (sk_smem(gt_raw) + 1023u) & ~1023u;
    const u32 full0 = sk_smem(bars), empty0 = full0 + GT_STAGES * 8;
    const int tid = threadIdx.x, lane = tid % 32, warp = (tid % 128) / 32;
    const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    const int kbs = k / GM_BK;
    const int tt = (m + GT_TN - 1) / GT_TN, ft = (f + 127) / 128;
    const int units = tt * ft;  // unit u: token tile u % tt of feature tile u / tt
    if (tid == 0) {
        for (int s = 0; s < GT_STAGES; ++s) {
            mb_init(full0 + s * 8, 1);
            mb_init(empty0 + s * 8, GM_CONSUMERS / 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(&wmap) : "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(&xmap) : "memory");
        if (blockIdx.x < units) {
            const int c0 = (blockIdx.x / tt) * 128;
            for (int kb = 0; kb < GT_STAGES && kb < kbs; ++kb) {
                tma_prefetch_l2(&wmap, kb * GM_BK, c0);
                tma_prefetch_l2(&wmap, kb * GM_BK, f + c0);
            }
        }
    }
    __syncthreads();
    pdl_enter();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
        if (tid == 0) {
            int it = 0;
            for (int u = blockIdx.x; u < units; u += gridDim.x) {
                const int t0 = (u % tt) * GT_TN, c0 = (u / tt) * 128;
                for (int kb = 0; kb < kbs; ++kb, ++it) {
                    const int s = it % GT_STAGES;
                    mb_wait(empty0 + s * 8, ((it / GT_STAGES) & 1) ^ 1);
                    const u32 full = full0 + s * 8, sa = base + s * GT_STAGE;
                    mb_expect(full, GT_STAGE);
                    tma_load(sa, &wmap, kb * GM_BK, c0, full);
                    tma_load(sa + GT_A_BYTES / 2, &wmap, kb * GM_BK, f + c0, full);
                    tma_load(sa + GT_A_BYTES, &xmap, kb * GM_BK, t0, full);
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
    const int cw = wg - 1;
    // Sums r of this thread: feature 16 warp + lane / 4 + 8 ((r / 2) % 2) of the warpgroup's 64, token
    // 8 (r / 4) + 2 (lane % 4) + r % 2 of the tile's 144; ag the gate's, au the up's.
    float ag[72], au[72];
    auto pin = [&]() {
#pragma unroll
        for (int r = 0; r < 72; ++r) {
            wgmma_fence_operand(ag[r]);
            wgmma_fence_operand(au[r]);
        }
    };
    auto release = [&](int s) {
        __syncwarp();
        if (lane == 0) mb_arrive(empty0 + s * 8);
    };
    const int g = lane / 4, q = lane % 4;
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const int t0 = (u % tt) * GT_TN, c0 = (u / tt) * 128;
        for (int kb = 0; kb < kbs; ++kb, ++it) {
            const int s = it % GT_STAGES;
            mb_wait(full0 + s * 8, (it / GT_STAGES) & 1);
            const u32 sg = base + s * GT_STAGE + cw * 64 * 128, su = sg + GT_A_BYTES / 2;
            const u32 sb = base + s * GT_STAGE + GT_A_BYTES;
            pin();
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < GM_BK / 16; ++kk) {
                const u64 db = sk_desc(sb + kk * 32);
                wgmma_n144(ag, sk_desc(sg + kk * 32), db, (kb | kk) != 0);
                wgmma_n144(au, sk_desc(su + kk * 32), db, (kb | kk) != 0);
            }
            wgmma_commit();
            wgmma_wait<1>();
            pin();
            if (kb > 0) release((it - 1) % GT_STAGES);
        }
        wgmma_wait<0>();
        pin();
        release((it - 1) % GT_STAGES);

        // out[token][feature]: a thread holds two tokens of one feature (o, packed, the first in the low half); the
        // neighbouring feature's thread (lane ^ 4) swaps one, so that each stores two features of one token as one
        // 32-bit word (even g: its token 2q, sending its second; odd: 2q + 1, sending its first).
        const bool even = (g & 1) == 0;
#pragma unroll
        for (int r = 0; r < 72; r += 2) {
            const u32 o = gm_silu_mul2(pack_f(ag[r], ag[r + 1]), pack_f(au[r], au[r + 1]));
            const u32 other = __shfl_xor_sync(0xffffffffu, even ? o >> 16 : o & 0xffffu, 4);
            const int j = r / 4, hh = (r / 2) % 2;
            const int feat = c0 + cw * 64 + warp * 16 + g + 8 * hh - (even ? 0 : 1);
            const int tok = t0 + 8 * j + 2 * q + (even ? 0 : 1);
            int mm = m;
            asm volatile("" : "+r"(mm));
            if (tok < mm && feat < f)
                *reinterpret_cast<u32*>(y + (u64)tok * ldy + feat) =
                    even ? (o & 0xffffu) | (other << 16) : other | (o & 0xffff0000u);
        }
    }
}
