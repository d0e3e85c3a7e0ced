// Skinny GEMM on Hopper's warpgroup MMA (wgmma; compiled for sm_90a only, and only for 16-bit storage):
// y[m, n] = x[m, k] . w[n, k]^T for decode-sized m (up to 256 rows), where the time is reading w once.
// cuBLAS leaves 20-45% of the copy bandwidth unused on the q/k/v, o and down shapes at 128 rows
// (bench/NOTES.md, sessions 10-14): too few output tiles for 132 multiprocessors, and split-K as a second
// launch. Here:
//   - the product is transposed for the MMA: y^T = w . x^T, so the weights' rows (output features) fill
//     wgmma's 64-row M side and the batch's rows its N side (TN = m rounded up to a supported size);
//   - a tile is SK_BM = 128 output features (two consumer warpgroups of 64) by TN rows, walked along k in
//     stages of SK_BK = 64 (one 128-byte row per feature and per batch row, in the 128-byte swizzle that
//     the wgmma descriptors name);
//   - one producer warp copies the stages with the tensor memory accelerator (TMA: one instruction per
//     operand per stage; the copy engine swizzles, and zero-fills rows past n or m), up to STAGES ahead,
//     each stage guarded by two mbarriers: "full" (the copies' bytes arrived) and "empty" (every consumer
//     warp's MMAs that read it retired). The consumers only wait, issue wgmma (m64nTNk16, one
//     instruction per 16 of k) and wait for it;
//   - stream-K: the grid is one block per multiprocessor (at most), and block c takes the k-stages
//     [total * c / G, total * (c + 1) / G) of all tiles' stages laid end to end, so every block streams the
//     same number of weight bytes whatever the shape. A tile split between blocks is summed by the block
//     that finishes its share last (a per-tile counter of stages done): the others leave f32 partial sums
//     in a workspace (two slots per block: its first and its last tile can be partial), as does the
//     last, which then adds all the slots in block order (the same result whichever block is last) and
//     stores y; no block waits for another.
// Status (bench/NOTES.md, sessions 15-16): correct, but slower than cuBLAS at every size on the H200, so
// off by default (LORAX_CUDA_SKINNY=1). The first form (cp.async by every thread, a __syncthreads per
// stage) was issue-bound. This form pays about 12 us per decode-sized product against cuBLAS's 5
// (session 16 call 4: q/k/v at 8 rows 23.5 us against 16.3; at 128 rows 29.6 against 17.4). Call 6
// (cuda_bench skinny_fixed_cost) splits it: the start and one stage 3-6 us; summing split tiles 2.6-3.2 us
// at 8 rows, 5.5-7.7 at 128; and a steady rate of 82% of the copy bandwidth with nothing to sum against
// cuBLAS's 90% (74% against 81% at 128 rows). ncu shows the multiprocessors without a block for 8-35% of
// the kernel (call 2). One block per tile (no split) is worse: one multiprocessor streams at most about
// 46 GB/s here, so saturating the DRAM takes ~90 of them.
// Sums are f32 in the MMA, partials added in block order; y is rounded once to T. The host checks
// k % SK_BK == 0, m <= TN, 16-byte aligned x and w, builds the two tensor maps (x: k by m, box 64 by TN;
// w: k by n, box 64 by 128; both 128-byte swizzled), and sizes the workspace and counters.
#define SK_BM 128
#define SK_BK 64
#define SK_CONSUMERS 256
#define SK_THREADS (SK_CONSUMERS + 32)

// Adds v to a split tile's counter (acquire-release at GPU scope: after the consumers' named barrier it publishes
// the block's partial sums, and the last adder sees everyone's) and returns the old value.
__device__ __forceinline__ u32 sk_arrive(u32* p, u32 v) {
    u32 old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

// Synchronises the consumer warpgroups only (the producer warp takes no part after the split).
__device__ __forceinline__ void sk_consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(SK_CONSUMERS) : "memory"); }

// One 64-feature x TN-row MMA step of k = 16 for this warpgroup.
template <int TN>
__device__ __forceinline__ void sk_mma(float* acc, u32 sa, u32 sb, int accumulate) {
    const u64 da = sk_desc(sa), db = sk_desc(sb);
    if constexpr (TN == 8) wgmma_n8(acc, da, db, accumulate);
    else if constexpr (TN == 16) wgmma_n16(acc, da, db, accumulate);
    else if constexpr (TN == 32) wgmma_n32(acc, da, db, accumulate);
    else if constexpr (TN == 64) wgmma_n64(acc, da, db, accumulate);
    else if constexpr (TN == 128) wgmma_n128(acc, da, db, accumulate);
    else if constexpr (TN == 192) wgmma_n192(acc, da, db, accumulate);
    else wgmma_n256(acc, da, db, accumulate);
}

// 16 bytes of another block's partial sums, through L2 (not a stale L1 line).
__device__ __forceinline__ f32x4 load_cg(const float* p) {
    f32x4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

// The first stage index of block c: blocks split `total` stages as evenly as integers allow.
__device__ __forceinline__ int sk_start(int total, int c, int g) { return (int)((long long)total * c / g); }

// The block whose stages include stage i.
__device__ __forceinline__ int sk_owner(int total, int i, int g) {
    int c = (int)((long long)i * g / total);
    while (c + 1 < g && sk_start(total, c + 1, g) <= i) ++c;
    while (c > 0 && sk_start(total, c, g) > i) --c;
    return c;
}

// ws: gridDim.x * 2 slots of SK_CONSUMERS * TN / 2 floats; counters: one u32 per tile, zero between launches
// (the summing block sets its tile's back to zero).
template <int TN, int STAGES>
__device__ __forceinline__ void skinny(T* __restrict__ y, const TmaMap* xmap, const TmaMap* wmap, float* __restrict__ ws,
                                       u32* __restrict__ counters, int m, int n, int k) {
    constexpr int W_BYTES = SK_BM * SK_BK * 2;  // 16 KiB
    constexpr int X_BYTES = TN * SK_BK * 2;
    constexpr int STAGE = W_BYTES + X_BYTES;  // a multiple of 1024: swizzle atoms stay aligned
    constexpr int ACC = TN / 2;               // f32 accumulators per thread
    extern __shared__ unsigned char sk_raw[];
    __shared__ __align__(8) u64 bars[2 * STAGES];  // full[s], then empty[s]
    __shared__ int sk_last;
    const u32 base = (sk_smem(sk_raw) + 1023u) & ~1023u;
    const u32 full0 = sk_smem(bars), empty0 = full0 + STAGES * 8;
    const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, warp = (tid % 128) / 32;
    // The warp's role from a value the compiler knows is the same across the warp (a per-thread test
    // would make every wgmma "divergent", and ptxas would serialise them).
    const int role_warp = __shfl_sync(0xffffffffu, tid / 32, 0);
    const int kbs = k / SK_BK;
    const int tiles = (n + SK_BM - 1) / SK_BM;
    const int total = tiles * kbs;
    const int g = gridDim.x, c = blockIdx.x;
    const int start = sk_start(total, c, g), end = sk_start(total, c + 1, g);

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mb_init(full0 + s * 8, 1);                    // the producer's arrival, then the copies' bytes
            mb_init(empty0 + s * 8, SK_CONSUMERS / 32);  // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (tid == SK_CONSUMERS) {
        asm volatile("prefetch.tensormap [%0];" ::"l"(wmap) : "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"(xmap) : "memory");
        // The first stages' weights into L2 before waiting for the kernel ahead (no kernel writes weights).
        for (int i = start; i < end && i < start + STAGES; ++i) tma_prefetch_l2(wmap, (i % kbs) * SK_BK, (i / kbs) * SK_BM);
    }
    __syncthreads();
    pdl_enter();

    if (role_warp >= SK_CONSUMERS / 32) {
        // The producer: stage i of this block's walk into buffer (i - start) % STAGES once the consumers
        // have released that buffer's previous stage.
        if (tid == SK_CONSUMERS) {
            for (int i = start; i < end; ++i) {
                const int j = i - start, s = j % STAGES;
                mb_wait(empty0 + s * 8, ((j / STAGES) & 1) ^ 1);
                const u32 full = full0 + s * 8, sw = base + s * STAGE;
                mb_expect(full, STAGE);
                tma_load(sw, wmap, (i % kbs) * SK_BK, (i / kbs) * SK_BM, full);
                tma_load(sw + W_BYTES, xmap, (i % kbs) * SK_BK, 0, full);
            }
        }
        return;
    }

    float acc[ACC];
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
    // Hands buffer s back to the producer: this warp's MMAs that read it have retired.
    auto release = [&](int s) {
        __syncwarp();
        if (lane == 0) mb_arrive(empty0 + s * 8);
    };

    for (int i = start; i < end; ++i) {
        const int j = i - start, s = j % STAGES;
        mb_wait(full0 + s * 8, (j / STAGES) & 1);
        const int tile = i / kbs, kb = i % kbs;
        const bool first = kb == 0 || i == start;
        const u32 sa = base + s * STAGE + wg * 64 * 128, sb = base + s * STAGE + W_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < SK_BK / 16; ++kk) sk_mma<TN>(acc, sa + kk * 32, sb + kk * 32, (first && kk == 0) ? 0 : 1);
        wgmma_commit();
        // Each stage's MMAs are waited for before its buffer goes back to the producer (keeping one stage's
        // MMAs in flight into the next turn measured the same or slower: ptxas serialises the wgmmas then,
        // bench/NOTES.md session 16).
        wgmma_wait<0>();
        release(s);
        if (kb != kbs - 1 && i != end - 1) continue;

        // The end of this block's share of `tile`: stages [p0, i] of the tile's [t0, t0 + kbs).
        const int t0 = tile * kbs;
        const int p0 = start > t0 ? start : t0;
        if (p0 != t0 || kb != kbs - 1) {
            // Partial: leave the sums in this block's slot (0: its first tile, 1: its last), count the
            // stages, and sum the tile if they complete it.
            float* mine = ws + ((u64)c * 2 + (p0 == start ? 0 : 1)) * (SK_CONSUMERS * ACC);
#pragma unroll
            for (int r = 0; r < ACC; r += 4)
                *reinterpret_cast<f32x4*>(mine + (u64)(r / 4) * SK_CONSUMERS * 4 + tid * 4) =
                    f32x4{acc[r], acc[r + 1], acc[r + 2], acc[r + 3]};
            sk_consumers_sync();
            if (tid == 0) {
                const u32 done = (u32)(i - p0 + 1);
                sk_last = sk_arrive(&counters[tile], done) + done == (u32)kbs;
            }
            sk_consumers_sync();
            if (!sk_last) continue;
            const int c0 = sk_owner(total, t0, g), c1 = sk_owner(total, t0 + kbs - 1, g);
            // Every share in block order, this block's own from its slot too: the same sum whichever
            // block finishes last.
#pragma unroll
            for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
            for (int o = c0; o <= c1; ++o) {
                const float* part =
                    ws + ((u64)o * 2 + (sk_start(total, o, g) >= t0 ? 0 : 1)) * (SK_CONSUMERS * ACC);
#pragma unroll
                for (int r = 0; r < ACC; r += 4) {
                    const f32x4 v = load_cg(part + (u64)(r / 4) * SK_CONSUMERS * 4 + tid * 4);
                    acc[r] += v.x;
                    acc[r + 1] += v.y;
                    acc[r + 2] += v.z;
                    acc[r + 3] += v.w;
                }
            }
            if (tid == 0) counters[tile] = 0;
        }
        // Store: accumulator r of this thread is feature (warp * 16 + lane / 4 + 8 * ((r / 2) % 2)) of the
        // warpgroup's 64 and batch row 8 * (r / 4) + 2 * (lane % 4) + r % 2.
        // (n and m made opaque per turn: otherwise the compiler keeps every turn's address and test in
        // registers through the main loop, and the 256-row kernel spills.)
        const int f0 = tile * SK_BM + wg * 64 + warp * 16 + lane / 4;
#pragma unroll
        for (int r = 0; r < ACC; ++r) {
            int nn = n, mm = m;
            asm volatile("" : "+r"(nn), "+r"(mm));
            const int f = f0 + 8 * ((r / 2) % 2);
            const int row = 8 * (r / 4) + 2 * (lane % 4) + r % 2;
            if (f < nn && row < mm) y[(u64)row * nn + f] = from_f(acc[r]);
        }
    }
}

// Stages in flight: as many as about 192 KiB of shared memory holds (8 at most). The host asks for
// STAGES * (16 KiB + TN * 128) + 1024 bytes (alignment slack) of dynamic shared memory.
#define SK_STAGES(TN) ((196608 / (SK_BM * SK_BK * 2 + TN * SK_BK * 2)) < 8 ? (196608 / (SK_BM * SK_BK * 2 + TN * SK_BK * 2)) : 8)

#define SK_KERNEL(TN)                                                                                         \
    extern "C" __global__ void __launch_bounds__(SK_THREADS, 1)                                             \
        skinny_##TN(T* __restrict__ y, const __grid_constant__ TmaMap xmap, const __grid_constant__ TmaMap wmap, \
                    float* __restrict__ ws, u32* __restrict__ counters, int m, int n, int k) {              \
        skinny<TN, SK_STAGES(TN)>(y, &xmap, &wmap, ws, counters, m, n, k);                                   \
    }

SK_KERNEL(8)
SK_KERNEL(16)
SK_KERNEL(32)
SK_KERNEL(64)
SK_KERNEL(128)
SK_KERNEL(192)
SK_KERNEL(256)
