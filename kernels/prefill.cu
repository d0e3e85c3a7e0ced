// Causal prefill attention on the tensor cores (FlashAttention-2 style), for bf16/f16 storage and head
// sizes 64 and 128. Reads keys and values through the paged cache, so a sequence's already-cached prefix
// (ctx_before > 0) is attended too; sequences of any length share one launch through a tile list.
//
// Block: 4 warps, a tile of up to 64 query rows of one sequence (16 rows per warp) and one query head.
// The block walks the keys [0, last row's position] 64 at a time: keys and values are staged in shared
// memory, S = Q.K^T and O += P.V run on mma.sync m16n8k16 (f32 accumulation), with an online softmax in
// registers. P is rounded to the storage type for the second product, as FlashAttention does.
// Decode rows and other shapes use paged_attention (attention.cu).

#define PF_BM 64
#define PF_BN 64
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
    __shared__ alignas(16) T k_s[PF_BN * LD];
    __shared__ alignas(16) T v_s[PF_BN * LD];

    const PrefillTile tile = tiles[blockIdx.x];
    const int h = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t2 = (lane % 4) * 2;
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

    for (int kb = 0; kb < kv_end; kb += PF_BN) {
        __syncthreads();  // the previous step is done with k_s and v_s
        for (int i = threadIdx.x; i < PF_BN * (HD / 8); i += PF_THREADS) {
            const int key = i / (HD / 8), c = (i % (HD / 8)) * 8;
            const int p = kb + key;
            u32x4 kv = {0u, 0u, 0u, 0u}, vv = {0u, 0u, 0u, 0u};
            if (p < kv_end) {
                const u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
                kv = *reinterpret_cast<const u32x4*>(k_cache + slot * kv_stride + kvh * HD + c);
                vv = *reinterpret_cast<const u32x4*>(v_cache + slot * kv_stride + kvh * HD + c);
            }
            *reinterpret_cast<u32x4*>(k_s + key * LD + c) = kv;
            *reinterpret_cast<u32x4*>(v_s + key * LD + c) = vv;
        }
        __syncthreads();

        // S = Q.K^T for this warp's 16 rows and the step's 64 keys.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                const T* kr = k_s + (nt * 8 + g) * LD + ks * 16 + t2;
                const u32 b[2] = {*reinterpret_cast<const u32*>(kr), *reinterpret_cast<const u32*>(kr + 8)};
                mma_16816(s[nt], qf[ks], b);
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
        // O += P.V: two S tiles of 8 keys make one A fragment of 16 keys.
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            const u32 a[4] = {pack(from_f(s[2 * j][0]), from_f(s[2 * j][1])),
                              pack(from_f(s[2 * j][2]), from_f(s[2 * j][3])),
                              pack(from_f(s[2 * j + 1][0]), from_f(s[2 * j + 1][1])),
                              pack(from_f(s[2 * j + 1][2]), from_f(s[2 * j + 1][3]))};
            const T* v0 = v_s + (j * 16 + t2) * LD + g;
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                const T* vp = v0 + d * 8;
                const u32 b[2] = {pack(vp[0], vp[LD]), pack(vp[8 * LD], vp[9 * LD])};
                mma_16816(o[d], a, b);
            }
        }
    }

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
