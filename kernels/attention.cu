// Paged attention over the KV cache, for decode rows and prefill rows alike (flash-decoding style).
//
// One block handles one query row, one KV head (all of its query heads, up to MAXG at a time: GQA reads
// each key and value once for the whole group) and one split of the row's context [first, pos], in
// units of ATTN_CHUNK tokens. Lane groups walk the tokens with an online softmax of their own and are
// combined at the end, so any context length works with fixed registers and shared memory. When the batch
// alone cannot fill the GPU (decode of few, long sequences) the host gives each row several splits; they
// write unnormalised partial results and attn_reduce combines them. A row that needs a single split
// writes its output directly.
//
// Grid: x = rows, y = KV heads x head chunks, z = splits. 128 threads. Keys and values are read with
// 16-byte loads where the head size allows: G lanes share one token (each lane owns NPL elements of the
// head), so a warp works on 32/G tokens at once, with U tokens' keys and values per lane group in flight.

#define ATTN_THREADS 128
#define ATTN_CHUNK 64
// 1: the tensor-core decode kernels read one block-table entry a 16-token step where they can (0: one a
// token, for comparison; see paged_attention_tc).
#ifndef ATTN_TC_STEP_PAGES
#define ATTN_TC_STEP_PAGES 1
#endif

// Per query row: its position (-1: the row belongs to no sequence; -2: prefill_attention handles it) and
// the offset of its sequence's block table in the flattened tables.
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

// The widest load (at most 16 bytes) that keeps a lane's share of the head at 8 elements or fewer (4 for
// heads of 32 or fewer, which otherwise leave most lanes of a warp idle and the registers to one lane).
__host__ __device__ constexpr int pick_vw(int hd) {
    const int most = hd <= 32 ? 4 : 8;
    int vw = VEC;
    while (vw > 1 && lane_elems(hd, vw) > most) vw /= 2;
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

// Loads n (a multiple of 4 when aligned) floats from shared memory, 16 bytes at a time when n % 4 == 0.
template <int N>
__device__ __forceinline__ void load_smem(const float* p, float* out) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            const f32x4 v = *reinterpret_cast<const f32x4*>(p + i);
            out[i] = v.x;
            out[i + 1] = v.y;
            out[i + 2] = v.z;
            out[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = p[i];
    }
}

// The block's share of the work (see the grid above): its row, KV head, query heads [h0, h0 + nh) and
// token range [t_begin, t_end) of the row's context, which starts at position `first`; the KV head's keys
// and values (kb, vb: position p's row at slot(p) * kv_stride) and the row's block table.
struct AttnWork {
    u64 row, kv_stride;
    int kvh, h0, nh, split, splits_row, pos, first, t_begin, t_end;
    int ys;  // blocks per row and split (KV heads x head chunks)
    const T* kb;
    const T* vb;
    const u32* table;
};

// Fills `w` and stages the block's scaled queries in q_s unless it is null (the caller synchronises); false when the block
// has nothing to do (after writing zeros for a row of no sequence).
template <int HD, int MAXG>
__device__ __forceinline__ bool attn_work(AttnWork& w, float* q_s, T* __restrict__ out, const T* __restrict__ q,
                                          const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                          const RowInfo* __restrict__ rows, const u32* __restrict__ tables,
                                          int num_heads, int num_kv_heads, int window, float scale,
                                          int chunks_per_split) {
    const int tid = threadIdx.x;
    w.row = blockIdx.x;
    const int group = num_heads / num_kv_heads;
    const int hchunks = (group + MAXG - 1) / MAXG;
    w.kvh = blockIdx.y / hchunks;
    w.ys = num_kv_heads * hchunks;
    const int hc = blockIdx.y % hchunks;
    w.h0 = w.kvh * group + hc * MAXG;
    w.nh = min(MAXG, group - hc * MAXG);
    w.split = blockIdx.z;
    const u64 qw = (u64)num_heads * HD;
    const RowInfo ri = rows[w.row];
    if (ri.pos < 0) {
        // -1: a row of no sequence (zeros); -2: a row another kernel (prefill_attention) writes.
        if (ri.pos == -1 && w.split == 0)
            for (int i = tid; i < w.nh * HD; i += ATTN_THREADS) out[w.row * qw + w.h0 * HD + i] = from_f(0.f);
        return false;
    }
    w.pos = ri.pos;
    w.first = ctx_first(ri.pos, window);
    const int len = ri.pos + 1 - w.first;
    const int nchunks = (len + ATTN_CHUNK - 1) / ATTN_CHUNK;
    w.splits_row = (nchunks + chunks_per_split - 1) / chunks_per_split;
    if (w.split >= w.splits_row) return false;
    w.t_begin = w.split * chunks_per_split * ATTN_CHUNK;
    w.t_end = min(len, w.t_begin + chunks_per_split * ATTN_CHUNK);
    w.kv_stride = (u64)num_kv_heads * HD;
    w.kb = k_cache + w.kvh * HD;
    w.vb = v_cache + w.kvh * HD;
    w.table = tables + ri.table;
    if (q_s)
        for (int i = tid; i < w.nh * HD; i += ATTN_THREADS) q_s[i] = to_f(q[w.row * qw + w.h0 * HD + i]) * scale;
    return true;
}

// A lane group's running maximum, sum and output per query head, before its first token.
template <int MAXG, int NPL>
__device__ __forceinline__ void clear_state(float (&m)[MAXG], float (&l)[MAXG], float (&acc)[MAXG][NPL]) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < NPL; ++e) acc[g][e] = 0.f;
    }
}

// A lane group's online-softmax update with U tokens' keys and values (lane gl holds elements
// (gl + j * G) * VW .. + VW of each, j < NPV): per query head, the running maximum is rescaled once.
template <int HD, int MAXG, int G, int VW, int NPV, int U>
__device__ __forceinline__ void attend(const float (&kr)[U][NPV * VW], const float (&vr)[U][NPV * VW],
                                       const bool (&valid)[U], const float* q_s, int nh, int gl, float (&m)[MAXG],
                                       float (&l)[MAXG], float (&acc)[MAXG][NPV * VW]) {
    constexpr int NPL = NPV * VW;
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        if (g < nh) {
            float qv[NPL];
#pragma unroll
            for (int j = 0; j < NPV; ++j) load_smem<VW>(q_s + g * HD + (gl + j * G) * VW, qv + j * VW);
            float sc[U];
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < NPL; ++e) d += kr[u][e] * qv[e];
#pragma unroll
                for (int o = G / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                sc[u] = valid[u] ? d : NEG_INF;
                mx = fmaxf(mx, sc[u]);
            }
            // mx is -inf only while this group has seen no valid token: nothing to add yet.
            const float a = mx == NEG_INF ? 1.f : __expf(m[g] - mx);
            float ls = l[g] * a;
#pragma unroll
            for (int e = 0; e < NPL; ++e) acc[g][e] *= a;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const float p = valid[u] ? __expf(sc[u] - mx) : 0.f;
                ls += p;
#pragma unroll
                for (int e = 0; e < NPL; ++e) acc[g][e] += p * vr[u][e];
            }
            l[g] = ls;
            m[g] = mx;
        }
    }
}

// Combines the lane groups: rescales each group's sums to the block's maximum and adds them through shared
// memory (red_s: GROUPS * HD floats), then writes the output (one split) or the split's partial result.
template <int HD, int MAXG, int G, int VW, int NPV>
__device__ __forceinline__ void combine_groups(const AttnWork& w, float* red_s, float (*ml_s)[MAXG][2],
                                               const float (&m)[MAXG], const float (&l)[MAXG],
                                               const float (&acc)[MAXG][NPV * VW], T* __restrict__ out,
                                               float* __restrict__ part_o, float* __restrict__ part_ml,
                                               int num_heads, int num_splits) {
    constexpr int GROUPS = ATTN_THREADS / G;
    const int tid = threadIdx.x;
    const int gid = tid / G, gl = tid % G;
    const u64 qw = (u64)num_heads * HD;
    if (gl == 0) {
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            ml_s[gid][g][0] = m[g];
            ml_s[gid][g][1] = l[g];
        }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        if (g < w.nh) {
            float mb = NEG_INF;
            for (int x = 0; x < GROUPS; ++x) mb = fmaxf(mb, ml_s[x][g][0]);
            const float f = m[g] == NEG_INF ? 0.f : __expf(m[g] - mb);
#pragma unroll
            for (int j = 0; j < NPV; ++j)
#pragma unroll
                for (int e = 0; e < VW; ++e) red_s[gid * HD + (gl + j * G) * VW + e] = acc[g][j * VW + e] * f;
            __syncthreads();
            float lb = 0.f;
            if (tid < HD) {
                for (int x = 0; x < GROUPS; ++x) {
                    const float mx = ml_s[x][g][0];
                    if (mx != NEG_INF) lb += __expf(mx - mb) * ml_s[x][g][1];
                }
            }
            const int h = w.h0 + g;
            const u64 pidx = (w.row * num_heads + h) * num_splits + w.split;
            for (int d = tid; d < HD; d += ATTN_THREADS) {
                float o = 0.f;
                for (int x = 0; x < GROUPS; ++x) o += red_s[x * HD + d];
                if (w.splits_row == 1)
                    out[w.row * qw + h * HD + d] = from_f(o / lb);
                else
                    part_o[pidx * HD + d] = o;
            }
            if (tid == 0 && w.splits_row > 1) {
                part_ml[2 * pidx] = mb;
                part_ml[2 * pidx + 1] = lb;
            }
            __syncthreads();
        }
    }
}

// How a block's lanes share a head of HD elements: VW-element loads; G lanes per token (at most GCAP: each
// token's dot product costs log2(G) shuffles per query head and its softmax weights are computed G times
// over, so fewer lanes per token, with more elements per lane, are cheaper); NPV loads (NPL elements) per
// lane; GROUPS lane groups per block.
template <int HD, int GCAP>
struct AttnLanes {
    static constexpr int VW = pick_vw(HD);
    static constexpr int G = pow2_divisor(HD / VW) > GCAP ? GCAP : pow2_divisor(HD / VW);
    static constexpr int NPV = HD / VW / G;
    static constexpr int NPL = NPV * VW;
    static constexpr int GROUPS = ATTN_THREADS / G;
};

// Loads a float another block of this grid wrote (from L2, past this multiprocessor's L1), and orders this
// block's writes before its later ones device-wide (under the CPU emulation: plain load, a full fence).
__device__ __forceinline__ float load_cg(const float* p) {
#if defined(LORAX_EMU)
    return *p;
#else
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
#endif
}
__device__ __forceinline__ void fence_gpu() {
#if defined(LORAX_EMU)
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#else
    asm volatile("membar.gl;" ::: "memory");
#endif
}

// One head's merge of its row's splits, the block's threads over its dims: out[d] = sum_s e^(m_s - M) o_s[d] /
// sum_s e^(m_s - M) l_s (base: the head's first split). CG: the partials were written by other blocks of this
// grid (read past L1), else by an earlier kernel.
template <bool CG>
__device__ __forceinline__ void merge_head(T* __restrict__ out, const float* part_o, const float* part_ml, u64 base,
                                           int splits, int hd) {
    const auto ld = [](const float* p) { return CG ? load_cg(p) : *p; };
    float m = NEG_INF;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, ld(part_ml + 2 * (base + s)));
    float l = 0.f;
    for (int s = 0; s < splits; ++s) l += __expf(ld(part_ml + 2 * (base + s)) - m) * ld(part_ml + 2 * (base + s) + 1);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < splits; ++s) o += __expf(ld(part_ml + 2 * (base + s)) - m) * ld(part_o + (base + s) * hd + d);
        out[d] = from_f(o / l);
    }
}

// A split row's blocks (per KV head and head chunk) count themselves done in `counters` (zero before the
// launch); the last one merges every split's partial result as attn_reduce would, and sets the counter back
// to zero for the next launch, so no second kernel runs after the splits (nothing happens without counters:
// the host then launches attn_reduce). Every thread of the block calls it after writing its partials.
template <int HD>
__device__ __forceinline__ void merge_if_last(const AttnWork& w, T* __restrict__ out, const float* part_o,
                                              const float* part_ml, u32* counters, int num_heads, int num_splits) {
    if (counters == nullptr || w.splits_row == 1) return;
    __shared__ u32 last_s;
    fence_gpu();
    __syncthreads();
    u32* ctr = counters + w.row * w.ys + blockIdx.y;
    if (threadIdx.x == 0) last_s = atomicAdd(ctr, 1u) == (u32)w.splits_row - 1 ? 1u : 0u;
    __syncthreads();
    if (!last_s) return;
    fence_gpu();
    for (int r = 0; r < w.nh; ++r)
        merge_head<true>(out + (w.row * num_heads + w.h0 + r) * HD, part_o, part_ml,
                         (w.row * num_heads + w.h0 + r) * num_splits, w.splits_row, HD);
    if (threadIdx.x == 0) *ctr = 0u;
}

#define ATTN_PARAMS                                                                                               \
    T *__restrict__ out, float *__restrict__ part_o, float *__restrict__ part_ml, const T *__restrict__ q,        \
        const T *__restrict__ k_cache, const T *__restrict__ v_cache, const RowInfo *__restrict__ rows,           \
        const u32 *__restrict__ tables, int num_heads, int num_kv_heads, int block_size, int window, float scale, \
        int chunks_per_split, int num_splits, u32 *__restrict__ counters

// One pass over the keys and values of the block's token range, read straight into registers: each lane
// group keeps its own running maximum, sum and output for every query head (online softmax, rescaled once
// per U tokens), so the loop needs no barrier; the groups are combined once at the end.
template <int HD, int MAXG, int GCAP>
__device__ __forceinline__ void paged_attention(ATTN_PARAMS) {
    using L = AttnLanes<HD, GCAP>;
    constexpr int VW = L::VW, G = L::G, NPV = L::NPV, NPL = L::NPL, GROUPS = L::GROUPS;
    constexpr int U = 2;  // tokens per lane group and step: keys and values of all of them in flight

    __shared__ alignas(16) float q_s[MAXG * HD];
    __shared__ alignas(16) float red_s[GROUPS * HD];
    __shared__ float ml_s[GROUPS][MAXG][2];

    AttnWork w;
    if (!attn_work<HD, MAXG>(w, q_s, out, q, k_cache, v_cache, rows, tables, num_heads, num_kv_heads, window,
                             scale, chunks_per_split))
        return;
    __syncthreads();

    const int tid = threadIdx.x;
    const int gid = tid / G, gl = tid % G;

    float m[MAXG], l[MAXG], acc[MAXG][NPL];
    clear_state(m, l, acc);

    // The step bound is the same for the whole block, so every lane reaches the shuffles.
    for (int base = w.t_begin; base < w.t_end; base += GROUPS * U) {
        float kr[U][NPL], vr[U][NPL];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + gid * U + u;
            valid[u] = t < w.t_end;
            if (valid[u]) {
                load_lane<VW, G, NPV>(w.kb, w.table, w.first + t, block_size, w.kv_stride, gl, kr[u]);
                load_lane<VW, G, NPV>(w.vb, w.table, w.first + t, block_size, w.kv_stride, gl, vr[u]);
            } else {
#pragma unroll
                for (int e = 0; e < NPL; ++e) kr[u][e] = vr[u][e] = 0.f;
            }
        }
        attend<HD, MAXG, G, VW, NPV, U>(kr, vr, valid, q_s, w.nh, gl, m, l, acc);
    }
    combine_groups<HD, MAXG, G, VW, NPV>(w, red_s, ml_s, m, l, acc, out, part_o, part_ml, num_heads, num_splits);
    merge_if_last<HD>(w, out, part_o, part_ml, counters, num_heads, num_splits);
}

#if defined(LORAX_DTYPE_BF16) || defined(LORAX_DTYPE_F16)

// Two 16-bit elements of two rows as one operand register (a's in the low half): both low halves
// (pair_lo) or both high halves (pair_hi) of a and b.
__device__ __forceinline__ u32 pair_lo(u32 a, u32 b) { return (a & 0xffffu) | (b << 16); }
__device__ __forceinline__ u32 pair_hi(u32 a, u32 b) { return (a >> 16) | (b & 0xffff0000u); }
__device__ __forceinline__ u32 word(const u32x4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// GQA decode attention on the tensor cores (head size 128, bf16/f16): the block's query heads (up to 8)
// are the rows of mma.sync m16n8k16 tiles, so the group's dot products and its P.V cost a few tensor-core
// instructions per 16 tokens instead of one shuffle tree per token and head (the `_l8` kernel is bound by
// those instructions, not by memory, at GQA 4). Each of the 4 warps walks its own 16-token steps of the
// block's range (tokens tb + 16 * (4 s + warp)), reading keys and values straight from the paged cache into
// operand registers with 16-byte loads, and keeps its own online softmax; the warps are combined at the end.
//
// The order of the head dimension inside a product does not matter, so each operand is loaded as it lies
// in memory: for S = Q.K^T, lane (g, t) (lane = 4g + t) holds dims 32t .. 32t + 31 of query head g and of
// key token g of each 8-token tile, and k-step (c, half) takes 4 of them per lane. The output is computed
// transposed, O^T = V^T.P^T, so that the query heads are the 8 columns of the tiles rather than 4-8 of the 16
// rows (half the accumulator registers: 194 registers a thread at first, 2 blocks per multiprocessor): lane
// (g, t) holds dims 16g .. 16g + 15 of the values of tokens 2t, 2t + 1, 2t + 8, 2t + 9 (the keys its P
// fragment covers), which are the A fragments of tiles whose row g is dim 16g + mt and row g + 8 is dim
// 16g + 8 + mt (mt = 0..7); P^T's column g is query head g, which lane group g holds as S's row g.
//
// ROPE (the `_tcr` kernels, decode steps only): the block also does rope_kv_write's work for its row, so that
// kernel is not launched. q is then the fused q/k/v projection's output (rows q_stride elements wide:
// queries, keys, values); each warp makes the rotation's cosines and sines and rotates its query heads in
// registers (rope_kv_write's formula, so the same values). In the block of the row's last split (the one
// whose range holds the new token), the warp whose 16-token steps hold the new token rotates its key of
// the block's KV head, copies it and the value into shared memory and writes both to the row's cache slot
// (kw, vw: the cache again; slots[row] = 0xffffffff writes nothing), and its walk reads the new token
// from shared memory, never from the cache it wrote in this launch. Only warp barriers: no warp waits for
// another before its walk starts. The host launches it only
// when every row is a decode row and one block covers a KV head's whole query group (so exactly one block
// writes each slot).
template <int HD, int MAXG, bool ROPE>
__device__ __forceinline__ void paged_attention_tc(ATTN_PARAMS, int q_stride, const float* __restrict__ inv_freq,
                                                   const u32* __restrict__ slots, T* kw, T* vw) {
    static_assert(HD == 128 && MAXG <= 8, "one m16 tile of query heads, head size 128");
    static_assert(HD % 64 == 0, "two angles of the rotation a lane");
    constexpr int WARPS = ATTN_THREADS / 32;
    constexpr int STEP = 16;     // tokens per warp step
    constexpr int MT = 8;        // output tiles (16 dims each, see above)
    __shared__ alignas(16) float o_s[WARPS][MAXG][HD];
    __shared__ float ml_s[WARPS][MAXG][2];
    // ROPE: each warp's cosines and sines of the rotation, and the new token's rotated key and its value.
    __shared__ float rope_s[WARPS][2][HD / 2];
    __shared__ alignas(16) T new_s[2][HD];

    AttnWork w;
    if (!attn_work<HD, MAXG>(w, nullptr, out, q, k_cache, v_cache, rows, tables, num_heads, num_kv_heads, window,
                             scale, chunks_per_split))
        return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4, t2 = t * 2;
    const u64 qw = (u64)num_heads * HD;
    const u32x4 zero = {0u, 0u, 0u, 0u};

    // Query head g (rows 8..15 of the tile are zero): dims 32t .. 32t + 31.
    u32x4 qf[4];
    const T* qrow = q + w.row * (u64)q_stride + (u64)(w.h0 + g) * HD + t * 32;
#pragma unroll
    for (int c = 0; c < 4; ++c) qf[c] = g < w.nh ? *reinterpret_cast<const u32x4*>(qrow + c * 8) : zero;
    int tnew = -1;  // ROPE: the new token's index in the range, in the last split (read from new_s)
    if (ROPE) {
        // Each warp makes its own cosines and sines (two angles a lane), so no block barrier holds the walk.
        float(*rs)[HD / 2] = rope_s[warp];
        const float fpos = (float)w.pos;
#pragma unroll
        for (int u = 0; u < HD / 64; ++u) {
            const int i = lane + 32 * u;
            float sn, cs;
            sincosf(inv_freq[i] * fpos, &sn, &cs);
            rs[0][i] = cs;
            rs[1][i] = sn;
        }
        __syncwarp();
        // Element i < HD/2 of a head pairs with i + HD/2: lane t's dims 32t .. with lane (t ^ 2)'s.
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32x4 o4 = {__shfl_xor_sync(0xffffffffu, qf[c].x, 2), __shfl_xor_sync(0xffffffffu, qf[c].y, 2),
                              __shfl_xor_sync(0xffffffffu, qf[c].z, 2), __shfl_xor_sync(0xffffffffu, qf[c].w, 2)};
            T* own = reinterpret_cast<T*>(&qf[c]);
            const T* oth = reinterpret_cast<const T*>(&o4);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int i = (t % 2) * 32 + c * 8 + e;
                const float cs = rs[0][i], sn = rs[1][i];
                const float a = to_f(own[e]), b = to_f(oth[e]);
                own[e] = t < 2 ? from_f(a * cs - b * sn) : from_f(a * cs + b * sn);
            }
        }
        // The new token: rotated and written by the warp whose steps hold it, the only one that reads it.
        if (w.split == w.splits_row - 1) {
            tnew = w.t_end - 1;
            if (((tnew - w.t_begin) / STEP) % WARPS == warp) {
                const T* krow = q + w.row * (u64)q_stride + qw + (u64)w.kvh * HD;
#pragma unroll
                for (int u = 0; u < HD / 64; ++u) {
                    const int i = lane + 32 * u;
                    const float a = to_f(krow[i]), b = to_f(krow[i + HD / 2]);
                    const float cs = rs[0][i], sn = rs[1][i];
                    new_s[0][i] = from_f(a * cs - b * sn);
                    new_s[0][i + HD / 2] = from_f(b * cs + a * sn);
                }
#pragma unroll
                for (int u = 0; u < HD / 32; ++u) new_s[1][lane + 32 * u] = krow[(u64)num_kv_heads * HD + lane + 32 * u];
                __syncwarp();
                const u32 s = slots[w.row];
                if (s != 0xffffffffu) {
                    const u64 at = (u64)s * w.kv_stride + (u64)w.kvh * HD;
#pragma unroll
                    for (int u = 0; u < HD / 32; ++u) {
                        kw[at + lane + 32 * u] = new_s[0][lane + 32 * u];
                        vw[at + lane + 32 * u] = new_s[1][lane + 32 * u];
                    }
                }
            }
        }
    }

    // o[mt]: heads 2t, 2t + 1 (columns) of dims 16g + mt and 16g + 8 + mt (rows g, g + 8).
    float o[MT][4];
#pragma unroll
    for (int d = 0; d < MT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m = NEG_INF, l = 0.f;

    // When a step's 16 tokens lie in one cache block (the block size a multiple of STEP and the context's
    // first position STEP-aligned: always without a sliding window), the step reads one block-table entry,
    // requested a step ahead, and its tokens' slots follow from it; otherwise each token looks up its own
    // (a division and a table read that its key or value load waits for, six a lane a step).
    const bool step_pages = ATTN_TC_STEP_PAGES && block_size % STEP == 0 && w.first % STEP == 0;
    const int bs_shift = pow2_log(block_size);
    const auto page_of = [&](int p) -> u32 { return w.table[bs_shift >= 0 ? p >> bs_shift : p / block_size]; };
    const auto in_page = [&](int p) -> int { return bs_shift >= 0 ? p & (block_size - 1) : p % block_size; };
    int tb = w.t_begin + warp * STEP;
    u32 page = step_pages && tb < w.t_end ? page_of(w.first + tb) : 0u;
    for (; tb < w.t_end; tb += WARPS * STEP) {
        const int p0 = w.first + tb;
        const u64 base = (u64)page * block_size + in_page(p0);  // step_pages: token tb's slot
        if (step_pages && tb + WARPS * STEP < w.t_end) page = page_of(p0 + WARPS * STEP);
        const auto slot_of = [&](int tk) -> u64 {
            if (step_pages) return base + (u64)(tk - tb);
            const int p = w.first + tk;
            return (u64)page_of(p) * block_size + in_page(p);
        };
        // Keys of tokens tb + 8j + g, dims 32t ..; values of tokens tb + 8(i / 2) + 2t + i % 2, dims 16g ...
        u32x4 kf[2][4], vf[4][2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int tk = tb + j * 8 + g;
            if (ROPE && tk == tnew) {
#pragma unroll
                for (int c = 0; c < 4; ++c) kf[j][c] = *reinterpret_cast<const u32x4*>(&new_s[0][t * 32 + c * 8]);
            } else if (tk < w.t_end) {
                const T* kr = w.kb + slot_of(tk) * w.kv_stride + t * 32;
#pragma unroll
                for (int c = 0; c < 4; ++c) kf[j][c] = *reinterpret_cast<const u32x4*>(kr + c * 8);
            } else {
#pragma unroll
                for (int c = 0; c < 4; ++c) kf[j][c] = zero;
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int tk = tb + (i / 2) * 8 + t2 + (i % 2);
            if (ROPE && tk == tnew) {
                vf[i][0] = *reinterpret_cast<const u32x4*>(&new_s[1][g * 16]);
                vf[i][1] = *reinterpret_cast<const u32x4*>(&new_s[1][g * 16 + 8]);
            } else if (tk < w.t_end) {
                const T* vr = w.vb + slot_of(tk) * w.kv_stride + g * 16;
                vf[i][0] = *reinterpret_cast<const u32x4*>(vr);
                vf[i][1] = *reinterpret_cast<const u32x4*>(vr + 8);
            } else {
                vf[i][0] = vf[i][1] = zero;  // cache memory past the context may hold anything, NaN too
            }
        }

        // S = Q.K^T: tile j, column n = key token tb + 8j + n.
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const u32 a0[4] = {qf[c].x, 0u, qf[c].y, 0u};
                const u32 b0[2] = {kf[j][c].x, kf[j][c].y};
                mma_16816(s[j], a0, b0);
                const u32 a1[4] = {qf[c].z, 0u, qf[c].w, 0u};
                const u32 b1[2] = {kf[j][c].z, kf[j][c].w};
                mma_16816(s[j], a1, b1);
            }
        }
        // Scale and mask (this lane's columns are tokens tb + 8j + 2t + e), then the online softmax of
        // row g; the four lanes of a quad hold one row's columns.
        float mx = NEG_INF;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool ok = tb + j * 8 + t2 + e < w.t_end;
                s[j][e] = ok ? s[j][e] * scale : NEG_INF;
                mx = fmaxf(mx, s[j][e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);
        const float a = mn == NEG_INF ? 1.f : __expf(m - mn);
        m = mn;
        l *= a;
        // This lane's output columns are heads 2t and 2t + 1, whose factors lane groups 2t and 2t + 1 hold.
        const float a0 = __shfl_sync(0xffffffffu, a, 8 * t), a1 = __shfl_sync(0xffffffffu, a, 8 * t + 4);
#pragma unroll
        for (int d = 0; d < MT; ++d) {
            o[d][0] *= a0;
            o[d][1] *= a1;
            o[d][2] *= a0;
            o[d][3] *= a1;
        }
        float p[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                p[j][e] = s[j][e] == NEG_INF ? 0.f : __expf(s[j][e] - mn);
                l += p[j][e];
            }
        // O^T += V^T.P^T: P^T's rows are keys 2t, 2t + 1 (tile 0) and 2t + 8, 2t + 9 (tile 1) of column
        // (head) g, rounded to T; V^T's row g of tile mt is dim 16g + mt, row g + 8 dim 16g + 8 + mt.
        const u32 pb[2] = {pack_f(p[0][0], p[0][1]), pack_f(p[1][0], p[1][1])};
#pragma unroll
        for (int d = 0; d < MT; ++d) {
            const int wd = d / 2;
            const auto pair = [&](const u32x4& x, const u32x4& y) {
                return d % 2 ? pair_hi(word(x, wd), word(y, wd)) : pair_lo(word(x, wd), word(y, wd));
            };
            const u32 a[4] = {pair(vf[0][0], vf[1][0]), pair(vf[0][1], vf[1][1]), pair(vf[2][0], vf[3][0]),
                              pair(vf[2][1], vf[3][1])};
            mma_16816(o[d], a, pb);
        }
    }

    // Combine the warps: each rescales its output to the block's maximum of its row, then the block sums.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t == 0 && g < MAXG) {
        ml_s[warp][g][0] = m;
        ml_s[warp][g][1] = l;
    }
    __syncthreads();
    {
        float f = 0.f;
        if (g < MAXG) {
            float mb = NEG_INF;
#pragma unroll
            for (int x = 0; x < WARPS; ++x) mb = fmaxf(mb, ml_s[x][g][0]);
            f = m == NEG_INF ? 0.f : __expf(m - mb);
        }
        // Heads 2t and 2t + 1: lane groups 2t and 2t + 1 hold their factors.
        const float f0 = __shfl_sync(0xffffffffu, f, 8 * t), f1 = __shfl_sync(0xffffffffu, f, 8 * t + 4);
        if (2 * t < MAXG) {
#pragma unroll
            for (int d = 0; d < MT; ++d) {
                o_s[warp][t2][16 * g + d] = o[d][0] * f0;
                o_s[warp][t2 + 1][16 * g + d] = o[d][1] * f1;
                o_s[warp][t2][16 * g + 8 + d] = o[d][2] * f0;
                o_s[warp][t2 + 1][16 * g + 8 + d] = o[d][3] * f1;
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < w.nh * HD; i += ATTN_THREADS) {
        const int r = i / HD, d = i % HD;
        float mr = NEG_INF;
#pragma unroll
        for (int x = 0; x < WARPS; ++x) mr = fmaxf(mr, ml_s[x][r][0]);
        float lb = 0.f, ov = 0.f;
#pragma unroll
        for (int x = 0; x < WARPS; ++x) {
            const float mx = ml_s[x][r][0];
            if (mx != NEG_INF) lb += __expf(mx - mr) * ml_s[x][r][1];
            ov += o_s[x][r][d];
        }
        const int h = w.h0 + r;
        const u64 pidx = (w.row * num_heads + h) * num_splits + w.split;
        if (w.splits_row == 1) {
            out[w.row * qw + h * HD + d] = from_f(ov / lb);
        } else {
            part_o[pidx * HD + d] = ov;
            if (d == 0) {
                part_ml[2 * pidx] = mr;
                part_ml[2 * pidx + 1] = lb;
            }
        }
    }
    merge_if_last<HD>(w, out, part_o, part_ml, counters, num_heads, num_splits);
}

#define PAGED_ATTENTION_TC(HD, MAXG, NAME, MINB)                                                              \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, MINB) NAME(ATTN_PARAMS) {                    \
        pdl_enter();                                                                                          \
        paged_attention_tc<HD, MAXG, false>(out, part_o, part_ml, q, k_cache, v_cache, rows, tables, num_heads, \
                                            num_kv_heads, block_size, window, scale, chunks_per_split,       \
                                            num_splits, counters, num_heads * HD, nullptr, nullptr, nullptr, \
                                            nullptr);                                                        \
    }
#define ATTN_ROPE_PARAMS int q_stride, const float *__restrict__ inv_freq, const u32 *__restrict__ slots, T *kw, T *vw
#define PAGED_ATTENTION_TCR(HD, MAXG, NAME, MINB)                                                             \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, MINB) NAME(ATTN_PARAMS, ATTN_ROPE_PARAMS) {  \
        pdl_enter();                                                                                          \
        paged_attention_tc<HD, MAXG, true>(out, part_o, part_ml, q, k_cache, v_cache, rows, tables, num_heads, \
                                           num_kv_heads, block_size, window, scale, chunks_per_split,        \
                                           num_splits, counters, q_stride, inv_freq, slots, kw, vw);          \
    }

#else

// f32 storage has no tensor-core path: the host never launches these.
#define PAGED_ATTENTION_TC(HD, MAXG, NAME, MINB) \
    extern "C" __global__ void NAME(ATTN_PARAMS) {}
#define PAGED_ATTENTION_TCR(HD, MAXG, NAME, MINB) \
    extern "C" __global__ void NAME(ATTN_PARAMS, int q_stride, const float* inv_freq, const u32* slots, T* kw, T* vw) {}

#endif

#define PAGED_ATTENTION_G(HD, MAXG, GCAP, NAME, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, MINB) NAME(ATTN_PARAMS) {                \
        pdl_enter();                                                                                    \
        paged_attention<HD, MAXG, GCAP>(out, part_o, part_ml, q, k_cache, v_cache, rows, tables, num_heads, \
                                        num_kv_heads, block_size, window, scale, chunks_per_split, num_splits, \
                                        counters);                                                      \
    }
#define PAGED_ATTENTION(HD, MAXG) \
    PAGED_ATTENTION_G(HD, MAXG, 32, paged_attention_##HD##_##MAXG, MAXG >= 8 ? 3 : 4)

// GQA variants for head size 128 with at most 8 lanes per token (16 elements per lane): a third of the
// shuffles and half the softmax exponentials per token of the 16-lane split; more registers, so fewer blocks.
PAGED_ATTENTION_G(128, 2, 8, paged_attention_128_2_l8, 4)
PAGED_ATTENTION_G(128, 4, 8, paged_attention_128_4_l8, 3)
PAGED_ATTENTION_G(128, 8, 8, paged_attention_128_8_l8, 2)

// The GQA kernels on the tensor cores (bf16/f16 only; f32 servers use _l8).
// Blocks per multiprocessor the tensor-core kernels are compiled for (registers permitting); LORAX_CUDA_DEFINES
// can set it for an experiment (docs/gpu.md).
#ifndef ATTN_TC_MINB
#define ATTN_TC_MINB 3
#endif
PAGED_ATTENTION_TC(128, 2, paged_attention_128_2_tc, ATTN_TC_MINB)
PAGED_ATTENTION_TC(128, 4, paged_attention_128_4_tc, ATTN_TC_MINB)
PAGED_ATTENTION_TC(128, 8, paged_attention_128_8_tc, ATTN_TC_MINB)
// The same with rope_kv_write's work done inside (decode steps; see paged_attention_tc).
PAGED_ATTENTION_TCR(128, 2, paged_attention_128_2_tcr, ATTN_TC_MINB)
PAGED_ATTENTION_TCR(128, 4, paged_attention_128_4_tcr, ATTN_TC_MINB)
PAGED_ATTENTION_TCR(128, 8, paged_attention_128_8_tcr, ATTN_TC_MINB)

// Kernels per head size for 1, 2, 4 or 8 query heads per block (the host picks the smallest that holds
// the GQA group: fewer registers; larger groups go 8 heads at a time). Blocks of 8 heads get more registers
// (3 blocks per multiprocessor instead of 4) so their running sums stay out of local memory.
PAGED_ATTENTION(8, 2)
PAGED_ATTENTION(8, 4)
PAGED_ATTENTION(8, 8)
PAGED_ATTENTION(16, 2)
PAGED_ATTENTION(16, 4)
PAGED_ATTENTION(16, 8)
PAGED_ATTENTION(32, 8)
PAGED_ATTENTION(64, 1)
PAGED_ATTENTION(64, 2)
PAGED_ATTENTION(64, 4)
PAGED_ATTENTION(64, 8)
PAGED_ATTENTION(80, 8)
PAGED_ATTENTION(96, 8)
PAGED_ATTENTION(128, 1)
PAGED_ATTENTION(128, 2)
PAGED_ATTENTION(128, 4)
PAGED_ATTENTION(128, 8)
PAGED_ATTENTION(256, 1)
PAGED_ATTENTION(256, 2)
PAGED_ATTENTION(256, 4)
PAGED_ATTENTION(256, 8)

// Combines the splits of rows that had more than one: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
// Grid: x = rows, y = query heads.
extern "C" __global__ void attn_reduce(T* __restrict__ out, const float* __restrict__ part_o,
                                       const float* __restrict__ part_ml, const RowInfo* __restrict__ rows,
                                       int num_heads, int head_dim, int window, int chunks_per_split,
                                       int num_splits) {
    pdl_enter();
    const u64 row = blockIdx.x;
    const int h = blockIdx.y;
    const RowInfo ri = rows[row];
    if (ri.pos < 0) return;
    const int len = ri.pos + 1 - ctx_first(ri.pos, window);
    const int nchunks = (len + ATTN_CHUNK - 1) / ATTN_CHUNK;
    const int splits_row = (nchunks + chunks_per_split - 1) / chunks_per_split;
    if (splits_row <= 1) return;
    merge_head<false>(out + (row * num_heads + h) * head_dim, part_o, part_ml, (row * num_heads + h) * num_splits,
                      splits_row, head_dim);
}
