// Causal prefill attention on the tensor cores (FlashAttention-2 style), for bf16/f16 storage and head
// sizes 64 and 128. Reads keys and values through the paged cache, so a sequence's already-cached prefix
// (ctx_before > 0) is attended too; sequences of any length share one launch through a tile list.
//
// Block: 4 warps, a tile of up to 64 query rows of one sequence (16 rows per warp) and one query head.
// The block walks the keys [0, last row's position] 32 at a time, copying them and their values into two
// shared-memory stages with cp.async (the next step's copies run while this step computes); B fragments
// come from shared memory by ldmatrix (values transposed on the way), S = Q.K^T and O += P.V run on
// mma.sync m16n8k16 (f32 accumulation), with an online softmax in registers. P is rounded to the storage
// type for the second product, as FlashAttention does. Decode rows and other shapes use paged_attention
// (attention.cu).

#define PF_BM 64
#define PF_BN 32
#define PF_THREADS 128

// A tile of query rows: first row in the flattened batch, rows (<= PF_BM), position of the first row,
// offset of the sequence's block table.
struct PrefillTile {
    int row0;
    int rows;
    int pos0;
    int table;
};

#if defined(LORAX_DTYPE_BF16) || defined(LORAX_DTYPE_F16)

template <int HD>
__device__ __forceinline__ void prefill_attention(T* __restrict__ out, const T* __restrict__ q,
                                                  const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                                  const PrefillTile* __restrict__ tiles,
                                                  const u32* __restrict__ tables, int num_heads, int num_kv_heads,
                                                  int block_size, float scale) {
    constexpr int LD = HD + 8;  // shared row stride in elements: 16 bytes of padding against bank conflicts
    constexpr int KS = HD / 16;  // k-steps of Q.K^T
    constexpr int DT = HD / 8;   // n-tiles of O
    constexpr int NT = PF_BN / 8;
    constexpr int CPR = HD / 8;               // 16-byte pieces per head row
    constexpr int PIECES = 2 * PF_BN * CPR;   // per stage: keys, then values
    static_assert(PIECES % PF_THREADS == 0 && KS % 2 == 0 && DT % 2 == 0, "staging layout");
    // Two stages of keys and values: the copies of step s + 1 run while step s computes.
    __shared__ alignas(16) T kv_s[2][2][PF_BN * LD];

    const PrefillTile tile = tiles[blockIdx.x];
    const int h = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t2 = (lane % 4) * 2;
    const int r8 = lane % 8, m4 = lane / 8;  // the row and tile this lane addresses for ldmatrix
    const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
    const u64 qw = (u64)num_heads * HD;
    const u64 kv_stride = (u64)num_kv_heads * HD;
    const u32* table = tables + tile.table;

    // Q as A fragments, straight from global memory (rows past the tile read as zeros).
    u32 qf[KS][4];
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

    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.f, l_hi = 0.f;
    const int pos_lo = tile.pos0 + r_lo, pos_hi = tile.pos0 + r_hi;
    const int kv_end = tile.pos0 + tile.rows;  // keys 0 .. last row's position
    const int nsteps = (kv_end + PF_BN - 1) / PF_BN;

    // Queues the keys and values of step s into stage s % 2 (cp.async, all threads) and commits a copy group
    // (an empty one past the last step). Keys past the context read the last key instead: finite values
    // that the causal mask gives no weight (cache memory past the context may hold anything, NaN too).
    auto issue = [&](int s) {
        if (s < nsteps) {
#pragma unroll
            for (int i = 0; i < PIECES / PF_THREADS; ++i) {
                const int c = threadIdx.x + i * PF_THREADS;
                const int half = c / (PF_BN * CPR);
                const int key = (c / CPR) % PF_BN;
                const int piece = c % CPR;
                const int p = min(s * PF_BN + key, kv_end - 1);
                const u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
                const T* src = (half ? v_cache : k_cache) + slot * kv_stride + kvh * HD + piece * 8;
                copy16_async(&kv_s[s % 2][half][key * LD + piece * 8], src);
            }
        }
        copy_commit();
    };

    issue(0);
    for (int st = 0; st < nsteps; ++st) {
        const int kb = st * PF_BN;
        issue(st + 1);  // into the stage every warp finished reading at the end of step st - 1
        copy_wait<1>();
        __syncthreads();  // step st's keys and values have landed, for every thread's copies
        const T* k_s = kv_s[st % 2][0];
        const T* v_s = kv_s[st % 2][1];

        // S = Q.K^T for this warp's 16 rows and the step's keys; one ldmatrix gives two k-steps of B.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS / 2; ++kk) {
                u32 b[4];
                ldsm_x4<false>(b, k_s + (nt * 8 + r8) * LD + kk * 32 + m4 * 8);
                mma_16816(s[nt], qf[2 * kk], b);
                mma_16816(s[nt], qf[2 * kk + 1], b + 2);
            }
        }
        // Scale and causal mask; rows past the tile see nothing.
        float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kb + nt * 8 + t2 + (e & 1);
                const bool lo = e < 2;
                const bool ok = lo ? (r_lo < tile.rows && key <= pos_lo) : (r_hi < tile.rows && key <= pos_hi);
                s[nt][e] = ok ? s[nt][e] * scale : NEG_INF;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
        }
        // The four lanes of a quad hold one row's columns.
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
        }
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float a_lo = mn_lo == NEG_INF ? 1.f : __expf(m_lo - mn_lo);
        const float a_hi = mn_hi == NEG_INF ? 1.f : __expf(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= a_lo;
        l_hi *= a_hi;
#pragma unroll
        for (int d = 0; d < DT; ++d) {
            o[d][0] *= a_lo;
            o[d][1] *= a_lo;
            o[d][2] *= a_hi;
            o[d][3] *= a_hi;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float mn = e < 2 ? mn_lo : mn_hi;
                const float p = s[nt][e] == NEG_INF ? 0.f : __expf(s[nt][e] - mn);
                s[nt][e] = p;
                if (e < 2)
                    l_lo += p;
                else
                    l_hi += p;
            }
        }
        // O += P.V: two S tiles of 8 keys make one A fragment of 16 keys; one transposing ldmatrix gives the
        // B fragments of two output tiles (tiles 0/1: keys 0-7/8-15 of dims 8d..; tiles 2/3: of dims 8d + 8..).
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            const u32 a[4] = {pack(from_f(s[2 * j][0]), from_f(s[2 * j][1])),
                              pack(from_f(s[2 * j][2]), from_f(s[2 * j][3])),
                              pack(from_f(s[2 * j + 1][0]), from_f(s[2 * j + 1][1])),
                              pack(from_f(s[2 * j + 1][2]), from_f(s[2 * j + 1][3]))};
#pragma unroll
            for (int dd = 0; dd < DT / 2; ++dd) {
                u32 b[4];
                ldsm_x4<true>(b, v_s + (j * 16 + (m4 % 2) * 8 + r8) * LD + (2 * dd + m4 / 2) * 8);
                mma_16816(o[2 * dd], a, b);
                mma_16816(o[2 * dd + 1], a, b + 2);
            }
        }
        __syncthreads();  // every warp is done with this stage before step st + 1 refills it
    }
    copy_wait<0>();

#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    T* o_lo = out + (u64)(tile.row0 + r_lo) * qw + h * HD;
    T* o_hi = out + (u64)(tile.row0 + r_hi) * qw + h * HD;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
        const int c = d * 8 + t2;
        if (r_lo < tile.rows) {
            o_lo[c] = from_f(o[d][0] / l_lo);
            o_lo[c + 1] = from_f(o[d][1] / l_lo);
        }
        if (r_hi < tile.rows) {
            o_hi[c] = from_f(o[d][2] / l_hi);
            o_hi[c + 1] = from_f(o[d][3] / l_hi);
        }
    }
}

#define PREFILL_ATTENTION(HD)                                                                                     \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attention_##HD(                            \
        T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache, \
        const PrefillTile* __restrict__ tiles, const u32* __restrict__ tables, int num_heads, int num_kv_heads,    \
        int block_size, float scale) {                                                                            \
        pdl_enter();                                                                                              \
        prefill_attention<HD>(out, q, k_cache, v_cache, tiles, tables, num_heads, num_kv_heads, block_size,       \
                              scale);                                                                             \
    }

#else

// f32 storage has no tensor-core path: the host never launches these.
#define PREFILL_ATTENTION(HD)                                                                                     \
    extern "C" __global__ void prefill_attention_##HD(T* out, const T* q, const T* k_cache, const T* v_cache,     \
                                                      const PrefillTile* tiles, const u32* tables, int num_heads, \
                                                      int num_kv_heads, int block_size, float scale) {}

#endif

PREFILL_ATTENTION(64)
PREFILL_ATTENTION(128)
