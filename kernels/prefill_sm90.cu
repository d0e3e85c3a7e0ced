// Causal prefill attention on Hopper's warpgroup MMA (wgmma; sm_90a, 16-bit storage, head size 128), with the
// launch contract of kernels/prefill.cu (PREFILL_PARAMS: tiles of up to 128 query rows of one sequence and one
// head, blocks ordered by the host longest first, keys and values read through the paged cache's block tables,
// a cached prefix attended too):
//   - a block is three warpgroups (384 threads) on one tile of up to 128 query rows of one head: warpgroup 0, the
//     producer, copies the keys and values; consumer warpgroup w (1 or 2) takes the tile's rows 64(w-1).. of the
//     64 after, both share the key and value tiles;
//   - keys 64 a step (`prefill_attention_128_sm90_ws`, four shared-memory stages) or 128 (`_ws_n128`, three):
//     the producer copies each step's keys and values by cp.async through the block table into the 128-byte
//     swizzle and completes them on the stage's "full" mbarrier; it refills a stage once each consumer warp has
//     arrived on the stage's "empty" one (after the P.V product that read its values), so that no block barrier
//     ties the two consumer warpgroups together step by step, and each stops at its own last row's keys;
//   - S = Q.K^T on m64n64k16 or m64n128k16 (Q's rows and K's keys both K-major in shared memory); the online
//     softmax on S's fragment in registers (base-2 exponentials, the scale folded in; masks only where a step
//     reaches the warpgroup's diagonal); O += P.V on m64n128k16 with P in registers (rounded to the storage
//     type, as FlashAttention does) and V an MN-major operand (wgmma.cuh's wgmma_desc_mn);
//   - within a warpgroup, step j's S product and step j - 1's P.V product are issued together and step j's
//     softmax runs while P.V is still on the tensor cores (FlashAttention-3's intra-warpgroup overlap).
// Rows are rounded to the storage type once, at the end. bench/NOTES.md, sessions 41-43: session 41's forms, in
// which every thread copied keys and values between block barriers, took 18-23% (64 keys) and 7-16% (128) longer
// than these warp-specialized ones on an H100 and were removed in session 43.

#define PH_HD 128
#define PH_QTILE 16384  // 64 query rows x 128 values x 2 bytes: two halves of 64 rows x 128 bytes, 8 KiB apart
#define PH_THREADS 384  // a producer warpgroup before the two consumers

// Where piece c (16 bytes, 0..15) of row r of a tile of ROWS rows x 128 values at `tile` lies in the 128-byte
// swizzle: half c / 8 (ROWS x 128 bytes each), row r's 128 bytes, piece (c % 8) ^ (r % 8).
template <int ROWS>
__device__ __forceinline__ u32 ph_at(u32 tile, int r, int c) {
    return tile + (c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// 16 bytes from `src` to shared `dst`, or 16 zero bytes when !ok.
__device__ __forceinline__ void ph_copy(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}

// BN keys a step (64 or 128), in STAGES shared-memory stages (4 or 3). Grid: one block per (tile, head), block
// b = tile b / num_heads of head b % num_heads; PH_THREADS threads; 2 x PH_QTILE (queries) + STAGES x 2 x BN x
// 256 (keys, values) + 1024 (alignment) + 16 x STAGES (mbarriers) bytes of dynamic shared memory.
template <int BN, int STAGES>
__device__ __forceinline__ void prefill_sm90(PREFILL_PARAMS) {
    constexpr int KT = BN * PH_HD * 2;  // bytes of a step's keys (or values): two halves of BN rows x 128 bytes
    constexpr int NS = BN / 8;          // n-tiles of 8 keys in S
    extern __shared__ __align__(1024) unsigned char ph_raw[];
    const u32 base = (sk_smem(ph_raw) + 1023u) & ~1023u;  // the swizzle's pattern repeats every 1024 bytes
    const PrefillTile tile = tiles[blockIdx.x / num_heads];
    const int h = blockIdx.x % num_heads, kvh = h / (num_heads / num_kv_heads);
    // wg: the consumer warpgroup (its 64 rows); warpgroup 0 is the producer (wg -1).
    const int wg = (int)threadIdx.x / 128 - 1, wt = threadIdx.x % 128;
    const int warp = wt / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const u64 qw = (u64)num_heads * PH_HD, kv_stride = (u64)num_kv_heads * PH_HD;
    const u32* table = tables + tile.table;
    const float sl2 = scale * 1.4426950408889634f;  // scores to base-2 exponents
    const int bs_shift = pow2_log(block_size);       // -1: not a power of two
    const u32 qs = base + wg * PH_QTILE;
    const u32 stages = base + 2 * PH_QTILE;  // stage s: keys at stages + 2 s KT, its values KT on
    // Stage s's mbarriers, "full" (the producer's copies landed) and "empty" (every consumer warp is done
    // with it), after the stages.
    const u32 full = stages + STAGES * 2 * KT, empty = full + 8 * STAGES;
    const int kv_end = tile.pos0 + tile.rows;  // keys 0 .. the last row's position
    const int nsteps = (kv_end + BN - 1) / BN;
    // This warpgroup's rows in the tile (none when the tile has 64 rows or fewer and wg = 1) and the first one's
    // position.
    const int wrows = min(64, tile.rows - 64 * wg);
    const int wfirst = tile.pos0 + 64 * wg;

    // The cache slot of key position p, through the block table.
    auto slot_of = [&](int p) -> u64 {
        return bs_shift >= 0 ? (((u64)table[p >> bs_shift] << bs_shift) | (u32)(p & (block_size - 1)))
                             : (u64)table[p / block_size] * block_size + p % block_size;
    };
    if (threadIdx.x == 0) {
        for (int st = 0; st < STAGES; ++st) {
            mb_init(full + 8 * st, 128);  // each producer thread's copies (cp.async.mbarrier.arrive.noinc)
            mb_init(empty + 8 * st, 8);   // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (wg < 0) {
        // The producer warpgroup: step s's keys and values into stage s % STAGES once every consumer warp
        // is done with its previous use (step s - STAGES; a fresh barrier counts as done), through the
        // block table; thread wt copies piece wt % 16 of keys wt / 16 + 8 i. Its registers go to the
        // consumers (40 + 2 x 232 = 3 x 168).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
        const int key0 = wt / 16, pc = wt % 16;
        const T* k_src = k_cache + kvh * PH_HD + pc * 8;
        const T* v_src = v_cache + kvh * PH_HD + pc * 8;
        for (int s = 0; s < nsteps; ++s) {
            const int st = s % STAGES;
            mb_wait(empty + 8 * st, ((s / STAGES) & 1) ^ 1);
            const u32 ks = stages + st * 2 * KT;
#pragma unroll 4
            for (int i = 0; i < BN / 8; ++i) {
                const int key = key0 + 8 * i;
                const u64 slot = slot_of(min(s * BN + key, kv_end - 1));
                ph_copy(ph_at<BN>(ks, key, pc), k_src + slot * kv_stride, true);
                ph_copy(ph_at<BN>(ks + KT, key, pc), v_src + slot * kv_stride, true);
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(full + 8 * st) : "memory");
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
    // Q: each warpgroup copies its 64 rows (rows past the tile zeroed), waited for here, then the warpgroup's
    // named barrier.
    {
        const T* qsrc = q + (u64)tile.row0 * qw + h * PH_HD;  // rows past the tile are not even addressed
        for (int i = wt; i < 64 * 16; i += 128) {
            const int r = i / 16, c = i % 16;
            const bool ok = r < wrows;
            ph_copy(ph_at<64>(qs, r, c), qsrc + (ok ? (u64)(64 * wg + r) * qw : 0) + c * 8, ok);
        }
        copy_commit();
        copy_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        asm volatile("bar.sync %0, 128;" ::"r"(1 + wg) : "memory");
    }
    // The accumulator fragments (mma.sync's layout per 8 columns): o[4j + 2hh + e] and s[4j + 2hh + e] are row
    // 16 warp + g + 8 hh of the warpgroup's, column 8j + 2t + e. pa: the previous step's P as A fragments.
    float o[64], s[4 * NS];
    u32 pa[2 * NS];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 2 * NS; ++i) pa[i] = 0u;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const int pos_lo = wfirst + 16 * warp + g;  // this thread's rows' positions: pos_lo and pos_lo + 8

    // Waits for the producer's copies of step j, then makes them visible to the async proxy.
    auto arrive = [&](int j) {
        mb_wait(full + 8 * (j % STAGES), (j / STAGES) & 1);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    };
    // This warp is done with step j's stage (its P.V waited for).
    auto release = [&](int j) {
        __syncwarp();
        if (lane == 0) mb_arrive(empty + 8 * (j % STAGES));
    };
    // S = Q.K^T of step j (queued, committed as one group).
    auto qk = [&](int j) {
        const u32 ks = stages + (j % STAGES) * 2 * KT;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u64 da = sk_desc(qs + hf * 8192 + kk * 32), db = sk_desc(ks + hf * (BN * 128) + kk * 32);
                if constexpr (BN == 64)
                    wgmma_n64(s, da, db, hf + kk);
                else
                    wgmma_n128(s, da, db, hf + kk);
            }
        wgmma_commit();
    };
    // O += P.V of step j, P from pa (queued, committed as one group).
    auto pv = [&](int j) {
        const u32 vs = stages + (j % STAGES) * 2 * KT + KT;
#pragma unroll
        for (int k2 = 0; k2 < BN / 16; ++k2)
            wgmma_rs_n128_tb(o, pa + 4 * k2, wgmma_desc_mn(vs + k2 * 2048, BN * 128, 1024));
        wgmma_commit();
    };
    // The online softmax of step j's S (complete), in place: P's values in s, the running maxima and sums, each
    // row's correction of O in corr. Only steps that reach the warpgroup's first row's position mask; a step
    // past all of its rows' keys (the first warpgroup's last, at most) masks every key: P 0, correction 1.
    float corr[2];
    auto softmax = [&](int j) {
#pragma unroll
        for (int i = 0; i < 4 * NS; ++i) wgmma_fence_operand(s[i]);
        const int kb = j * BN;
        const bool mask = kb + BN - 1 > wfirst;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int pos = pos_lo + 8 * hh;
            float mx = m[hh];
#pragma unroll
            for (int jj = 0; jj < NS; ++jj)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = s[4 * jj + 2 * hh + e] * sl2;
                    if (mask && kb + 8 * jj + 2 * t + e > pos) x = NEG_INF;
                    s[4 * jj + 2 * hh + e] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mb = mx == NEG_INF ? 0.f : mx;  // a row with no key yet: exponents of -inf give 0
            corr[hh] = exp2_fast(m[hh] - mb);
            m[hh] = mx;
            float sum = 0.f;
#pragma unroll
            for (int jj = 0; jj < NS; ++jj)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2_fast(s[4 * jj + 2 * hh + e] - mb);
                    s[4 * jj + 2 * hh + e] = p;
                    sum += p;
                }
            l[hh] = l[hh] * corr[hh] + sum;
        }
    };
    // P's A fragments from s, once the previous step's P.V no longer reads pa (packing into pa while it may
    // would serialize the products): keys 16 k2..: rows g and g + 8, keys 2t and 2t + 8 of the 16.
    auto pack_p = [&]() {
#pragma unroll
        for (int k2 = 0; k2 < BN / 16; ++k2) {
            pa[4 * k2 + 0] = pack_f(s[8 * k2 + 0], s[8 * k2 + 1]);
            pa[4 * k2 + 1] = pack_f(s[8 * k2 + 2], s[8 * k2 + 3]);
            pa[4 * k2 + 2] = pack_f(s[8 * k2 + 4], s[8 * k2 + 5]);
            pa[4 * k2 + 3] = pack_f(s[8 * k2 + 6], s[8 * k2 + 7]);
        }
    };

    // Pins the registers the products read (O, S, P) before the fence that starts their stage, so that the
    // compiler moves no write of them past it (which would serialize the products).
    auto fence = [&]() {
#pragma unroll
        for (int i = 0; i < 64; ++i) wgmma_fence_operand(o[i]);
#pragma unroll
        for (int i = 0; i < 4 * NS; ++i) wgmma_fence_operand(s[i]);
#pragma unroll
        for (int i = 0; i < 2 * NS; ++i) wgmma_fence_operand(pa[i]);
        wgmma_fence();
    };

    // Each warpgroup walks the steps up to its last row (at least one), then hands the rest back unread.
    const int own = wrows > 0 ? min(nsteps, (wfirst + wrows + BN - 1) / BN) : 1;
    arrive(0);
    fence();
    qk(0);
    wgmma_wait<0>();
    softmax(0);
    pack_p();
    for (int j = 1; j < own; ++j) {
        arrive(j);
        fence();
        qk(j);
        pv(j - 1);
        wgmma_wait<1>();  // S; the previous step's P.V may still run while the softmax does
        softmax(j);
        wgmma_wait<0>();  // P.V: O and pa free again
        release(j - 1);
#pragma unroll
        for (int i = 0; i < 64; ++i) wgmma_fence_operand(o[i]);
#pragma unroll
        for (int i = 0; i < 4 * NS; ++i) wgmma_fence_operand(s[i]);  // P packed after the wait, not before
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
            o[4 * jj + 0] *= corr[0];
            o[4 * jj + 1] *= corr[0];
            o[4 * jj + 2] *= corr[1];
            o[4 * jj + 3] *= corr[1];
        }
        pack_p();
    }
    fence();
    pv(own - 1);
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) wgmma_fence_operand(o[i]);
    // Stages the producer still fills: the last step read, and those past this warpgroup's rows.
    release(own - 1);
    for (int j = own; j + STAGES < nsteps; ++j) {
        mb_wait(full + 8 * (j % STAGES), (j / STAGES) & 1);
        release(j);
    }

    // The row sums over the quad of threads that share a row; rows past the tile are not written.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float sum = l[hh];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int r = 16 * warp + g + 8 * hh;  // in the warpgroup's rows
        if (r >= wrows) continue;
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        T* dst = out + (u64)(tile.row0 + 64 * wg + r) * qw + h * PH_HD + 2 * t;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj)
            *reinterpret_cast<u32*>(dst + 8 * jj) = pack_f(o[4 * jj + 2 * hh] * inv, o[4 * jj + 2 * hh + 1] * inv);
    }
}

// 64 keys a step in four stages (`ws64`) and 128 in three (`ws128`); by default the host picks ws128 for launches
// whose longest prompt reaches 8192 keys (PREFILL_SM90_LONG_KEYS), ws64 below.
extern "C" __global__ void __launch_bounds__(PH_THREADS, 1) prefill_attention_128_sm90_ws(PREFILL_PARAMS) {
    pdl_enter();
    prefill_sm90<64, 4>(PREFILL_ARGS);
}

extern "C" __global__ void __launch_bounds__(PH_THREADS, 1) prefill_attention_128_sm90_ws_n128(PREFILL_PARAMS) {
    pdl_enter();
    prefill_sm90<128, 3>(PREFILL_ARGS);
}
