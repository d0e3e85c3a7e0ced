// Paged attention over the KV cache, for decode rows and prefill rows alike (flash-decoding style).
//
// One block handles one query row, one KV head (all of its query heads, up to ATTN_MAXG at a time: GQA
// reads each key and value once for the whole group) and one split of the row's context. The context
// [first, pos] of a row is cut into chunks of ATTN_CHUNK tokens; a block walks its chunks with an online
// softmax (scores of a chunk in shared memory, then a rescale of the running sums), so any context length
// works with fixed shared memory. When the batch alone cannot fill the GPU (decode of few, long
// sequences) the host gives each row several splits; they write unnormalised partial results and
// attn_reduce combines them. A row that needs a single split writes its output directly.
//
// Grid: x = rows, y = KV heads x head chunks, z = splits. 128 threads. Keys and values are read with
// 16-byte loads where the head size allows: G lanes share one token (each lane owns NPL elements of the
// head), so a warp works on 32/G tokens at once, two tokens per lane group in flight.

#define ATTN_THREADS 128
#define ATTN_CHUNK 256
#define ATTN_MAXG 8

// Per query row: its position (pos < 0: the row belongs to no sequence) and the offset of its sequence's
// block table in the flattened tables.
struct RowInfo {
    int pos;
    int table;
};

// Largest power of two <= 32 that divides n.
__host__ __device__ constexpr int pow2_divisor(int n) {
    int g = 1;
    while (g < 32 && n % (g * 2) == 0) g *= 2;
    return g;
}

// Elements per lane for a head of hd elements read vw at a time (huge when vw does not divide hd).
__host__ __device__ constexpr int lane_elems(int hd, int vw) {
    return hd % vw != 0 ? (1 << 30) : (hd / vw / pow2_divisor(hd / vw)) * vw;
}

// The widest load (at most 16 bytes) that keeps a lane's share of the head at 8 elements or fewer.
__host__ __device__ constexpr int pick_vw(int hd) {
    int vw = VEC;
    while (vw > 1 && lane_elems(hd, vw) > 8) vw /= 2;
    return vw;
}

// Context range of a row: [first, pos] (Mistral's sliding window keeps the last `window` positions).
__device__ __forceinline__ int ctx_first(int pos, int window) {
    return (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// A lane's share of one cached head row (keys or values) of position p: NPV loads of VW elements, lane
// gl of its G-lane group taking vectors gl, gl + G, ... so the group's loads are coalesced.
template <int VW, int G, int NPV>
__device__ __forceinline__ void load_lane(const T* __restrict__ base, const u32* __restrict__ table, int p,
                                          int block_size, u64 kv_stride, int gl, float* out) {
    const u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
    const T* row = base + slot * kv_stride;
#pragma unroll
    for (int j = 0; j < NPV; ++j) load_n<VW>(row + (gl + j * G) * VW, out + j * VW);
}

template <int HD>
__device__ __forceinline__ void paged_attention(T* __restrict__ out, float* __restrict__ part_o,
                                                float* __restrict__ part_ml, const T* __restrict__ q,
                                                const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                                const RowInfo* __restrict__ rows, const u32* __restrict__ tables,
                                                int num_heads, int num_kv_heads, int block_size, int window,
                                                float scale, int chunks_per_split, int num_splits) {
    constexpr int VW = pick_vw(HD);
    constexpr int NV = HD / VW;
    constexpr int G = pow2_divisor(NV);
    constexpr int NPV = NV / G;
    constexpr int NPL = NPV * VW;
    constexpr int GROUPS = ATTN_THREADS / G;

    __shared__ float q_s[ATTN_MAXG * HD];
    __shared__ float s_s[ATTN_MAXG * ATTN_CHUNK];
    __shared__ float red_s[GROUPS * HD];
    __shared__ float m_s[ATTN_MAXG];
    __shared__ float l_s[ATTN_MAXG];
    __shared__ float a_s[ATTN_MAXG];

    const int tid = threadIdx.x;
    const u64 row = blockIdx.x;
    const int group = num_heads / num_kv_heads;
    const int hchunks = (group + ATTN_MAXG - 1) / ATTN_MAXG;
    const int kvh = blockIdx.y / hchunks;
    const int hc = blockIdx.y % hchunks;
    const int h0 = kvh * group + hc * ATTN_MAXG;
    const int nh = min(ATTN_MAXG, group - hc * ATTN_MAXG);
    const int split = blockIdx.z;
    const u64 qw = (u64)num_heads * HD;
    const RowInfo ri = rows[row];
    if (ri.pos < 0) {
        if (split == 0)
            for (int i = tid; i < nh * HD; i += ATTN_THREADS) out[row * qw + h0 * HD + i] = from_f(0.f);
        return;
    }
    const int first = ctx_first(ri.pos, window);
    const int len = ri.pos + 1 - first;
    const int nchunks = (len + ATTN_CHUNK - 1) / ATTN_CHUNK;
    const int splits_row = (nchunks + chunks_per_split - 1) / chunks_per_split;
    if (split >= splits_row) return;
    const int c_end = min(nchunks, (split + 1) * chunks_per_split);

    for (int i = tid; i < nh * HD; i += ATTN_THREADS) q_s[i] = to_f(q[row * qw + h0 * HD + i]) * scale;
    if (tid < ATTN_MAXG) {
        m_s[tid] = NEG_INF;
        l_s[tid] = 0.f;
    }
    __syncthreads();

    const int gid = tid / G, gl = tid % G;
    const u64 kv_stride = (u64)num_kv_heads * HD;
    const T* kb = k_cache + kvh * HD;
    const T* vb = v_cache + kvh * HD;
    const u32* table = tables + ri.table;

    float acc[ATTN_MAXG][NPL];
#pragma unroll
    for (int g = 0; g < ATTN_MAXG; ++g)
#pragma unroll
        for (int e = 0; e < NPL; ++e) acc[g][e] = 0.f;

    for (int c = split * chunks_per_split; c < c_end; ++c) {
        const int t0 = first + c * ATTN_CHUNK;
        const int clen = min(ATTN_CHUNK, len - c * ATTN_CHUNK);

        // Phase 1: scores of the chunk's tokens for every query head of the group. The loop bound is the
        // same for all threads, so every lane reaches the shuffles.
        for (int base = 0; base < clen; base += 2 * GROUPS) {
            float kr[2][NPL];
            bool valid[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int tl = base + u * GROUPS + gid;
                valid[u] = tl < clen;
                if (valid[u]) {
                    load_lane<VW, G, NPV>(kb, table, t0 + tl, block_size, kv_stride, gl, kr[u]);
                } else {
#pragma unroll
                    for (int e = 0; e < NPL; ++e) kr[u][e] = 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int tl = base + u * GROUPS + gid;
#pragma unroll
                for (int g = 0; g < ATTN_MAXG; ++g) {
                    if (g < nh) {
                        float d = 0.f;
#pragma unroll
                        for (int j = 0; j < NPV; ++j)
#pragma unroll
                            for (int e = 0; e < VW; ++e) d += kr[u][j * VW + e] * q_s[g * HD + (gl + j * G) * VW + e];
#pragma unroll
                        for (int o = G / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                        if (gl == 0 && valid[u]) s_s[g * ATTN_CHUNK + tl] = d;
                    }
                }
            }
        }
        __syncthreads();

        // Online softmax: the chunk's maximum joins the running one; scores become weights.
        for (int g = 0; g < nh; ++g) {
            float mx = NEG_INF;
            for (int i = tid; i < clen; i += ATTN_THREADS) mx = fmaxf(mx, s_s[g * ATTN_CHUNK + i]);
            mx = block_max(mx);
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
            for (int i = tid; i < clen; i += ATTN_THREADS) {
                const float e = __expf(s_s[g * ATTN_CHUNK + i] - m_new);
                s_s[g * ATTN_CHUNK + i] = e;
                sum += e;
            }
            sum = block_sum(sum);
            if (tid == 0) {
                const float a = __expf(m_old - m_new);
                a_s[g] = a;
                l_s[g] = l_s[g] * a + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();

        // Phase 2: rescale the running outputs, then add the chunk's weighted values.
#pragma unroll
        for (int g = 0; g < ATTN_MAXG; ++g) {
            if (g < nh) {
                const float a = a_s[g];
#pragma unroll
                for (int e = 0; e < NPL; ++e) acc[g][e] *= a;
            }
        }
        for (int base = 0; base < clen; base += 2 * GROUPS) {
            float vr[2][NPL];
            bool valid[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int tl = base + u * GROUPS + gid;
                valid[u] = tl < clen;
                if (valid[u]) load_lane<VW, G, NPV>(vb, table, t0 + tl, block_size, kv_stride, gl, vr[u]);
            }
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                if (valid[u]) {
                    const int tl = base + u * GROUPS + gid;
#pragma unroll
                    for (int g = 0; g < ATTN_MAXG; ++g) {
                        if (g < nh) {
                            const float w = s_s[g * ATTN_CHUNK + tl];
#pragma unroll
                            for (int e = 0; e < NPL; ++e) acc[g][e] += w * vr[u][e];
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

    // Each lane group holds a partial output over its tokens: sum the groups through shared memory.
#pragma unroll
    for (int g = 0; g < ATTN_MAXG; ++g) {
        if (g < nh) {
#pragma unroll
            for (int j = 0; j < NPV; ++j)
#pragma unroll
                for (int e = 0; e < VW; ++e) red_s[gid * HD + (gl + j * G) * VW + e] = acc[g][j * VW + e];
            __syncthreads();
            const int h = h0 + g;
            const u64 pidx = (row * num_heads + h) * num_splits + split;
            for (int d = tid; d < HD; d += ATTN_THREADS) {
                float o = 0.f;
                for (int x = 0; x < GROUPS; ++x) o += red_s[x * HD + d];
                if (splits_row == 1)
                    out[row * qw + h * HD + d] = from_f(o / l_s[g]);
                else
                    part_o[pidx * HD + d] = o;
            }
            if (tid == 0 && splits_row > 1) {
                part_ml[2 * pidx] = m_s[g];
                part_ml[2 * pidx + 1] = l_s[g];
            }
            __syncthreads();
        }
    }
}

#define PAGED_ATTENTION(HD)                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_##HD(                             \
        T* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml, const T* __restrict__ q,     \
        const T* __restrict__ k_cache, const T* __restrict__ v_cache, const RowInfo* __restrict__ rows,           \
        const u32* __restrict__ tables, int num_heads, int num_kv_heads, int block_size, int window, float scale, \
        int chunks_per_split, int num_splits) {                                                                    \
        paged_attention<HD>(out, part_o, part_ml, q, k_cache, v_cache, rows, tables, num_heads, num_kv_heads,     \
                            block_size, window, scale, chunks_per_split, num_splits);                             \
    }

PAGED_ATTENTION(8)
PAGED_ATTENTION(16)
PAGED_ATTENTION(32)
PAGED_ATTENTION(64)
PAGED_ATTENTION(80)
PAGED_ATTENTION(96)
PAGED_ATTENTION(128)
PAGED_ATTENTION(256)

// Combines the splits of rows that had more than one: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
// Grid: x = rows, y = query heads.
extern "C" __global__ void attn_reduce(T* __restrict__ out, const float* __restrict__ part_o,
                                       const float* __restrict__ part_ml, const RowInfo* __restrict__ rows,
                                       int num_heads, int head_dim, int window, int chunks_per_split,
                                       int num_splits) {
    const u64 row = blockIdx.x;
    const int h = blockIdx.y;
    const RowInfo ri = rows[row];
    if (ri.pos < 0) return;
    const int len = ri.pos + 1 - ctx_first(ri.pos, window);
    const int nchunks = (len + ATTN_CHUNK - 1) / ATTN_CHUNK;
    const int splits_row = (nchunks + chunks_per_split - 1) / chunks_per_split;
    if (splits_row <= 1) return;
    const u64 base = (row * num_heads + h) * num_splits;
    float m = NEG_INF;
    for (int s = 0; s < splits_row; ++s) m = fmaxf(m, part_ml[2 * (base + s)]);
    float l = 0.f;
    for (int s = 0; s < splits_row; ++s) l += __expf(part_ml[2 * (base + s)] - m) * part_ml[2 * (base + s) + 1];
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < splits_row; ++s) o += __expf(part_ml[2 * (base + s)] - m) * part_o[(base + s) * head_dim + d];
        out[(row * num_heads + h) * head_dim + d] = from_f(o / l);
    }
}
