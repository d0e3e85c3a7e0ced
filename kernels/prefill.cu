// Causal prefill attention on the tensor cores (FlashAttention-2 style), for bf16/f16 storage and head
// sizes 64 and 128. Reads keys and values through the paged cache, so a sequence's already-cached prefix
// (ctx_before > 0) is attended too; sequences of any length share one launch through a tile list.
//
// Block: W warps, a tile of up to 16 RG W query rows of one sequence (RG row groups of 16 a warp: 1, with Q
// in registers, or 2, with Q in shared memory and each key or value fragment used by both groups) and one
// query head.
// The block walks the keys [0, last row's position] BN at a time, copying them and their values into two
// shared-memory stages with cp.async (the next step's copies run while this step computes); B fragments
// come from shared memory by ldmatrix (values transposed on the way), S = Q.K^T and O += P.V run on
// mma.sync m16n8k16 (f32 accumulation), with an online softmax in registers (base-2 exponentials, the
// scale folded in). A warp skips a step whose keys all lie past its rows' positions, and masks only in
// steps that reach its rows' diagonal. P is rounded to the storage type for the second product, as
// FlashAttention does. Decode rows and other shapes use paged_attention (attention.cu).
//
// Entry points: prefill_attention_HD (4 warps, 32 keys a step) and prefill_attention_HD_wW[r2]nBN for the
// other tile shapes; the host picks one per launch by its prompt rows (LORAX_CUDA_PREFILL_TILE forces one).
// Grid: one dimension of tiles x num_heads blocks. The host sorts the tiles longest first, and block b is
// tile b / num_heads of head b % num_heads, so the blocks start in that order across all heads (every head's
// longest tile first: longest-processing-time-first over the whole launch; one head's tiles after another's
// left the last heads' long tiles trailing the launch, 10-30% slower in session 20).
// Shared memory is dynamic: 2 stages x (keys + values) x BN x (HD + 8) elements, then (two row groups) the
// tile's 32 W query rows x (HD + 8), passed at launch.

// Blocks per multiprocessor the register allocation aims at (launch bounds), by warps per block.
#ifndef PF_MINB4
#define PF_MINB4 2
#endif
#ifndef PF_MINB8
#define PF_MINB8 1
#endif
#ifndef PF_MINB2
#define PF_MINB2 4
#endif

#if defined(LORAX_DTYPE_BF16) || defined(LORAX_DTYPE_F16)

template <int HD, int W, int BN, int RG>
__device__ __forceinline__ void prefill_attention(PREFILL_PARAMS) {
    constexpr int THREADS = 32 * W;
    constexpr int ROWS = 16 * RG * W;  // query rows of a tile: RG row groups of 16 a warp
    constexpr int LD = HD + 8;  // shared row stride in elements: 16 bytes of padding against bank conflicts
    constexpr int KS = HD / 16;  // k-steps of Q.K^T
    constexpr int DT = HD / 8;   // n-tiles of O
    constexpr int NT = BN / 8;
    constexpr int CPR = HD / 8;                 // 16-byte pieces per head row
    constexpr int KEYS = BN * CPR / THREADS;    // keys (each with its value) a thread copies per step
    constexpr int KSTRIDE = THREADS / CPR;      // between a thread's keys
    constexpr int STAGE = BN * LD;              // elements of one stage's keys (or values)
    // One row group a warp keeps its Q fragments in registers; two keep Q in shared memory (the registers go
    // to the second group's accumulators) and load each k-step's fragments by ldmatrix.
    constexpr bool Q_SMEM = RG > 1;
#if defined(LORAX_EMU)
    constexpr int QS = Q_SMEM ? ROWS * LD : 0;  // elements of the shared Q tile
#endif
    static_assert(THREADS % CPR == 0 && KEYS >= 1 && KS % 2 == 0 && DT % 2 == 0 && NT % 2 == 0, "staging layout");
    static_assert(RG == 1 || RG == 2, "one or two row groups a warp");
    // Two stages of keys and values ([stage][keys, values][BN x LD]): the copies of step s + 1 run while step
    // s computes. Then, with Q_SMEM, the tile's queries.
#if defined(LORAX_EMU)
    __shared__ alignas(16) T kv_s[4 * STAGE + QS];
#else
    extern __shared__ __align__(16) unsigned char pf_smem[];
    T* kv_s = reinterpret_cast<T*>(pf_smem);
#endif
    T* q_s = kv_s + 4 * STAGE;

    const int b = blockIdx.x;
    const PrefillTile tile = tiles[b / num_heads];
    const int h = b % num_heads;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t2 = (lane % 4) * 2;
    const int r8 = lane % 8, m4 = lane / 8;  // the row and tile this lane addresses for ldmatrix
    const int wrow = warp * 16 * RG;         // the warp's first row in the tile
    const u64 qw = (u64)num_heads * HD;
    const u64 kv_stride = (u64)num_kv_heads * HD;
    const u32* table = tables + tile.table;
    const float sl2 = scale * 1.4426950408889634f;  // scores to base-2 exponents
    const int bs_shift = pow2_log(block_size);  // -1: not a power of two (the copies divide)

    // Q as A fragments, straight from global memory (rows past the tile read as zeros); or, with Q_SMEM, the
    // tile's rows copied into shared memory with the first step's keys (rows past the tile zeroed).
    u32 qf[Q_SMEM ? 1 : KS][4];
    if constexpr (Q_SMEM) {
        for (int i = threadIdx.x; i < ROWS * CPR; i += THREADS) {
            const int r = i / CPR, c = (i % CPR) * 8;
            if (r < tile.rows)
                copy16_async(q_s + r * LD + c, q + (u64)(tile.row0 + r) * qw + h * HD + c);
            else
                *reinterpret_cast<u32x4*>(q_s + r * LD + c) = u32x4{0u, 0u, 0u, 0u};
        }
    } else {
        const int r_lo = wrow + g, r_hi = r_lo + 8;
        const T* q_lo = q + (u64)(tile.row0 + r_lo) * qw + h * HD;
        const T* q_hi = q + (u64)(tile.row0 + r_hi) * qw + h * HD;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const int c = ks * 16 + t2;
            qf[ks][0] = r_lo < tile.rows ? *reinterpret_cast<const u32*>(q_lo + c) : 0u;
            qf[ks][1] = r_hi < tile.rows ? *reinterpret_cast<const u32*>(q_hi + c) : 0u;
            qf[ks][2] = r_lo < tile.rows ? *reinterpret_cast<const u32*>(q_lo + c + 8) : 0u;
            qf[ks][3] = r_hi < tile.rows ? *reinterpret_cast<const u32*>(q_hi + c + 8) : 0u;
        }
    }

    float o[RG][DT][4];
    float m_lo[RG], m_hi[RG], l_lo[RG], l_hi[RG];
#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
#pragma unroll
        for (int d = 0; d < DT; ++d) o[rg][d][0] = o[rg][d][1] = o[rg][d][2] = o[rg][d][3] = 0.f;
        m_lo[rg] = m_hi[rg] = NEG_INF;
        l_lo[rg] = l_hi[rg] = 0.f;
    }
    const int kv_end = tile.pos0 + tile.rows;  // keys 0 .. last row's position
    const int nsteps = (kv_end + BN - 1) / BN;
    // This warp's rows: how many lie in the tile, the first one's position and the last one's.
    const int wrows = min(16 * RG, tile.rows - wrow);
    const int wfirst = tile.pos0 + wrow, wlast = wfirst + wrows - 1;

    // Queues the keys and values of step s into stage s % 2 (cp.async, all threads) and commits a copy group
    // (an empty one past the last step). Keys past the context read the last key instead: finite values
    // that the causal mask gives no weight (cache memory past the context may hold anything, NaN too).
    const int piece = threadIdx.x % CPR, key0 = threadIdx.x / CPR;
    const T* k_src = k_cache + kvh * HD + piece * 8;
    const T* v_src = v_cache + kvh * HD + piece * 8;
    // Two copies of the loop, so the choice between shift and division is made once outside it (a generic
    // lambda taking the slot rule does not compile under NVRTC).
    auto issue = [&](int s) {
        if (s < nsteps) {
            T* k_dst = kv_s + (s % 2) * 2 * STAGE + key0 * LD + piece * 8;
            if (bs_shift >= 0) {
#pragma unroll
                for (int i = 0; i < KEYS; ++i) {
                    const int p = min(s * BN + key0 + i * KSTRIDE, kv_end - 1);
                    const u64 slot = ((u64)table[p >> bs_shift] << bs_shift) | (u32)(p & (block_size - 1));
                    copy16_async(k_dst + i * KSTRIDE * LD, k_src + slot * kv_stride);
                    copy16_async(k_dst + STAGE + i * KSTRIDE * LD, v_src + slot * kv_stride);
                }
            } else {
#pragma unroll
                for (int i = 0; i < KEYS; ++i) {
                    const int p = min(s * BN + key0 + i * KSTRIDE, kv_end - 1);
                    const u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
                    copy16_async(k_dst + i * KSTRIDE * LD, k_src + slot * kv_stride);
                    copy16_async(k_dst + STAGE + i * KSTRIDE * LD, v_src + slot * kv_stride);
                }
            }
        }
        copy_commit();
    };

    issue(0);
    for (int st = 0; st < nsteps; ++st) {
        const int kb = st * BN;
        issue(st + 1);  // into the stage every warp finished reading at the end of step st - 1
        copy_wait<1>();
        __syncthreads();  // step st's keys and values (and at step 0 the shared Q) have landed, for every thread
        // A warp whose rows all come before the step's first key (or that has no rows) has nothing to add.
        if (wrows > 0 && kb <= wlast) {
            const T* k_s = kv_s + (st % 2) * 2 * STAGE;
            const T* v_s = k_s + STAGE;

            // S = Q.K^T for this warp's rows and the step's keys; one ldmatrix gives two k-steps of B.
            float s[RG][NT][4];
#pragma unroll
            for (int rg = 0; rg < RG; ++rg)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) s[rg][nt][0] = s[rg][nt][1] = s[rg][nt][2] = s[rg][nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS / 2; ++kk) {
                if constexpr (Q_SMEM) {
                    // Each row group's A fragments of k-steps 2kk and 2kk + 1, then each key tile's B fragments,
                    // each used by every row group (half the B loads a product of one group a warp needs).
                    u32 a[RG][2][4];
#pragma unroll
                    for (int rg = 0; rg < RG; ++rg)
#pragma unroll
                        for (int k2 = 0; k2 < 2; ++k2)
                            ldsm_x4<false>(a[rg][k2], q_s + (wrow + rg * 16 + (m4 % 2) * 8 + r8) * LD + kk * 32 +
                                                          k2 * 16 + (m4 / 2) * 8);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        u32 bk[4];
                        ldsm_x4<false>(bk, k_s + (nt * 8 + r8) * LD + kk * 32 + m4 * 8);
#pragma unroll
                        for (int rg = 0; rg < RG; ++rg) {
                            mma_16816(s[rg][nt], a[rg][0], bk);
                            mma_16816(s[rg][nt], a[rg][1], bk + 2);
                        }
                    }
                } else {
                    // Each k-step's fragments of every key tile are loaded first, then its products run over the
                    // key tiles: NT independent accumulators between two products into the same one.
                    u32 bk[NT][4];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) ldsm_x4<false>(bk[nt], k_s + (nt * 8 + r8) * LD + kk * 32 + m4 * 8);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mma_16816(s[0][nt], qf[2 * kk], bk[nt]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mma_16816(s[0][nt], qf[2 * kk + 1], bk[nt] + 2);
                }
            }
#pragma unroll
            for (int rg = 0; rg < RG; ++rg) {
                const int r_lo = wrow + rg * 16 + g, r_hi = r_lo + 8;
                const int pos_lo = tile.pos0 + r_lo, pos_hi = tile.pos0 + r_hi;
                // Causal mask, where the step reaches past the warp's first row or the warp has rows past the
                // tile (rows past the tile see nothing).
                if (kb + BN - 1 > wfirst || wrows < 16 * RG) {
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int key = kb + nt * 8 + t2 + (e & 1);
                            const bool ok =
                                e < 2 ? (r_lo < tile.rows && key <= pos_lo) : (r_hi < tile.rows && key <= pos_hi);
                            s[rg][nt][e] = ok ? s[rg][nt][e] : NEG_INF;
                        }
                    }
                }
                float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mx_lo = fmaxf(mx_lo, fmaxf(s[rg][nt][0], s[rg][nt][1]));
                    mx_hi = fmaxf(mx_hi, fmaxf(s[rg][nt][2], s[rg][nt][3]));
                }
                // The four lanes of a quad hold one row's columns.
#pragma unroll
                for (int off = 1; off < 4; off <<= 1) {
                    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
                    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
                }
                // Scores stay unscaled; the maxima too. A row with nothing unmasked yet keeps a zero offset, so
                // its exponentials are exp2(-inf) = 0 instead of NaN.
                const float mn_lo = fmaxf(m_lo[rg], mx_lo), mn_hi = fmaxf(m_hi[rg], mx_hi);
                const float a_lo = mn_lo == NEG_INF ? 1.f : exp2_fast((m_lo[rg] - mn_lo) * sl2);
                const float a_hi = mn_hi == NEG_INF ? 1.f : exp2_fast((m_hi[rg] - mn_hi) * sl2);
                const float off_lo = mn_lo == NEG_INF ? 0.f : mn_lo * sl2;
                const float off_hi = mn_hi == NEG_INF ? 0.f : mn_hi * sl2;
                m_lo[rg] = mn_lo;
                m_hi[rg] = mn_hi;
                l_lo[rg] *= a_lo;
                l_hi[rg] *= a_hi;
#pragma unroll
                for (int d = 0; d < DT; ++d) {
                    o[rg][d][0] *= a_lo;
                    o[rg][d][1] *= a_lo;
                    o[rg][d][2] *= a_hi;
                    o[rg][d][3] *= a_hi;
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    s[rg][nt][0] = exp2_fast(fmaf(s[rg][nt][0], sl2, -off_lo));
                    s[rg][nt][1] = exp2_fast(fmaf(s[rg][nt][1], sl2, -off_lo));
                    s[rg][nt][2] = exp2_fast(fmaf(s[rg][nt][2], sl2, -off_hi));
                    s[rg][nt][3] = exp2_fast(fmaf(s[rg][nt][3], sl2, -off_hi));
                    l_lo[rg] += s[rg][nt][0] + s[rg][nt][1];
                    l_hi[rg] += s[rg][nt][2] + s[rg][nt][3];
                }
            }
            // O += P.V: two S tiles of 8 keys make one A fragment of 16 keys; one transposing ldmatrix gives
            // the B fragments of two output tiles (tiles 0/1: keys 0-7/8-15 of dims 8d..; tiles 2/3: of dims
            // 8d + 8..), used by every row group.
#pragma unroll
            for (int j = 0; j < NT / 2; ++j) {
                u32 a[RG][4];
#pragma unroll
                for (int rg = 0; rg < RG; ++rg) {
                    a[rg][0] = pack_f(s[rg][2 * j][0], s[rg][2 * j][1]);
                    a[rg][1] = pack_f(s[rg][2 * j][2], s[rg][2 * j][3]);
                    a[rg][2] = pack_f(s[rg][2 * j + 1][0], s[rg][2 * j + 1][1]);
                    a[rg][3] = pack_f(s[rg][2 * j + 1][2], s[rg][2 * j + 1][3]);
                }
                // The next fragments are loaded before this pair of products runs.
                const T* v_row = v_s + (j * 16 + (m4 % 2) * 8 + r8) * LD + (m4 / 2) * 8;
                u32 bv[2][4];
                ldsm_x4<true>(bv[0], v_row);
#pragma unroll
                for (int dd = 0; dd < DT / 2; ++dd) {
                    if (dd + 1 < DT / 2) ldsm_x4<true>(bv[(dd + 1) % 2], v_row + (dd + 1) * 16);
#pragma unroll
                    for (int rg = 0; rg < RG; ++rg) {
                        mma_16816(o[rg][2 * dd], a[rg], bv[dd % 2]);
                        mma_16816(o[rg][2 * dd + 1], a[rg], bv[dd % 2] + 2);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before step st + 1 refills it
    }
    copy_wait<0>();

#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
        float ll = l_lo[rg], lh = l_hi[rg];
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            ll += __shfl_xor_sync(0xffffffffu, ll, off);
            lh += __shfl_xor_sync(0xffffffffu, lh, off);
        }
        const int r_lo = wrow + rg * 16 + g, r_hi = r_lo + 8;
        T* o_lo = out + (u64)(tile.row0 + r_lo) * qw + h * HD;
        T* o_hi = out + (u64)(tile.row0 + r_hi) * qw + h * HD;
        // One division a row, then products; two adjacent columns a store.
        const float il = 1.f / ll, ih = 1.f / lh;
#pragma unroll
        for (int d = 0; d < DT; ++d) {
            const int c = d * 8 + t2;
            if (r_lo < tile.rows) *reinterpret_cast<u32*>(o_lo + c) = pack_f(o[rg][d][0] * il, o[rg][d][1] * il);
            if (r_hi < tile.rows) *reinterpret_cast<u32*>(o_hi + c) = pack_f(o[rg][d][2] * ih, o[rg][d][3] * ih);
        }
    }
}

#define PREFILL_ATTENTION(NAME, HD, W, BN, RG, MINB)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * W, MINB) NAME(PREFILL_PARAMS) {                      \
        pdl_enter();                                                                                       \
        prefill_attention<HD, W, BN, RG>(PREFILL_ARGS);                                                    \
    }

#else

// f32 storage has no tensor-core path: the host never launches these.
#define PREFILL_ATTENTION(NAME, HD, W, BN, RG, MINB) extern "C" __global__ void NAME(PREFILL_PARAMS) {}

#endif

PREFILL_ATTENTION(prefill_attention_64, 64, 4, 32, 1, PF_MINB4)
PREFILL_ATTENTION(prefill_attention_128, 128, 4, 32, 1, PF_MINB4)
PREFILL_ATTENTION(prefill_attention_64_w4n64, 64, 4, 64, 1, PF_MINB4)
PREFILL_ATTENTION(prefill_attention_128_w4n64, 128, 4, 64, 1, PF_MINB4)
PREFILL_ATTENTION(prefill_attention_64_w8n32, 64, 8, 32, 1, PF_MINB8)
PREFILL_ATTENTION(prefill_attention_128_w8n32, 128, 8, 32, 1, PF_MINB8)
PREFILL_ATTENTION(prefill_attention_64_w8n64, 64, 8, 64, 1, PF_MINB8)
PREFILL_ATTENTION(prefill_attention_128_w8n64, 128, 8, 64, 1, PF_MINB8)
// Two row groups (32 query rows) a warp, Q in shared memory; 32 keys a step (at 64, head size 128 takes more
// than 255 registers).
PREFILL_ATTENTION(prefill_attention_64_w4r2n32, 64, 4, 32, 2, PF_MINB4)
PREFILL_ATTENTION(prefill_attention_128_w4r2n32, 128, 4, 32, 2, PF_MINB4)
PREFILL_ATTENTION(prefill_attention_64_w2r2n32, 64, 2, 32, 2, PF_MINB2)
PREFILL_ATTENTION(prefill_attention_128_w2r2n32, 128, 2, 32, 2, PF_MINB2)
