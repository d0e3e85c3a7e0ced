// SGMV (segmented gather matrix-vector, Punica's design) for batched LoRA:
//   y[rows of segment s, col_s .. col_s + cols_s] += scale_s * (x[rows] . A_s^T) . B_s^T
// (y's rows are out_dim wide; a fused projection's parts, such as q, k and v, are segments with their own
// column ranges in one launch).
// A segment is a run of consecutive rows sharing an adapter; each has its own A/B pointers, rank and
// scale, so one launch serves a batch of many adapters of mixed ranks. Rows in no segment (base-model
// rows) are never touched.
//
// shrink: tmp[row, :r] += x[row, k-chunk] . A[:, k-chunk]^T, with f32 atomics across k-chunks (tmp is zeroed
//         first). Grid: x = segment, y = k-chunk, z = row tile. The A chunk and the x tile are staged in
//         shared memory (rows padded by one float against bank conflicts), so A is read from memory once
//         per (segment, chunk, row tile), which is once per segment for decode.
// expand: y[row, c] += scale * sum_j tmp[row, j] * B[c, j]. Grid: x = segment, y = column tile, z = row tile;
//         the B tile is staged in shared memory.
// Both read weights with 16-byte loads when the layout allows it.

struct LoraSeg {
    u64 a;      // lora_A [rank, in], storage type
    u64 b;      // lora_B [out, rank], storage type
    int start;  // first row
    int len;    // rows
    int rank;
    float scale;
    int col;    // first column of y this segment adds into
    int cols;   // its columns (B's rows)
    int trow;   // row of tmp that holds its first row's shrink (segments of a fused projection's parts
                // share rows of x, so each part has its own rows of tmp)
    int pad;
};

// Stages rows x n elements from src (global, rows `stride` elements apart) into dst (shared, f32, rows
// `ld` apart), 16 bytes at a time when `vec` (every row starts on a 16-byte boundary and n is whole
// vectors). One flat loop over the block, so all threads have loads in flight.
__device__ __forceinline__ void stage(float* __restrict__ dst, int ld, const T* __restrict__ src, u64 stride,
                                      int rows, int n, bool vec) {
    if (vec) {
        const int nv = n / VEC;
        for (int i = threadIdx.x; i < rows * nv; i += blockDim.x) {
            const int rr = i / nv, c = (i % nv) * VEC;
            float v[VEC];
            load_n<VEC>(src + rr * stride + c, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) dst[rr * ld + c + e] = v[e];
        }
    } else {
        for (int i = threadIdx.x; i < rows * n; i += blockDim.x) {
            const int rr = i / n, c = i % n;
            dst[rr * ld + c] = to_f(src[rr * stride + c]);
        }
    }
}

// Dynamic shared memory: (rank + rows_per_tile) * (kc + 1) floats. ksub lanes (a power of two <= 32)
// cooperate on each output.
extern "C" __global__ void sgmv_shrink(float* __restrict__ tmp, const T* __restrict__ x,
                                       const LoraSeg* __restrict__ segs, int in_dim, int rmax, int kc, int rt,
                                       int ksub) {
    pdl_enter();
    extern __shared__ float sm[];
    const LoraSeg sg = segs[blockIdx.x];
    const int row0 = blockIdx.z * rt;
    const int k0 = blockIdx.y * kc;
    if (row0 >= sg.len || k0 >= in_dim) return;
    const int rows = min(rt, sg.len - row0);
    const int kl = min(kc, in_dim - k0);
    const int r = sg.rank;
    const int ld = kc + 1;
    float* a_s = sm;
    float* x_s = sm + r * ld;
    const T* A = reinterpret_cast<const T*>(sg.a);
    // 16-byte loads need every staged row to start on a 16-byte boundary and to be whole vectors.
    const bool vec = (in_dim % VEC == 0) && (k0 % VEC == 0) && (kl % VEC == 0);
    stage(a_s, ld, A + k0, in_dim, r, kl, vec);
    stage(x_s, ld, x + (u64)(sg.start + row0) * in_dim + k0, in_dim, rows, kl, vec);
    __syncthreads();

    const int per_pass = blockDim.x / ksub;
    const int sub = threadIdx.x % ksub;
    const int outs = rows * r;
    for (int base = 0; base < outs; base += per_pass) {
        const int o = base + threadIdx.x / ksub;
        float acc = 0.f;
        if (o < outs) {
            const int i = o / r, j = o % r;
            const float* xs = x_s + i * ld;
            const float* as = a_s + j * ld;
            for (int k = sub; k < kl; k += ksub) acc += xs[k] * as[k];
        }
        for (int off = ksub / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (o < outs && sub == 0) atomicAdd(&tmp[(u64)(sg.trow + row0 + o / r) * rmax + o % r], acc);
    }
}

// Dynamic shared memory: ot * (rmax + 1) + rt * rmax floats.
extern "C" __global__ void sgmv_expand(T* __restrict__ y, const float* __restrict__ tmp,
                                       const LoraSeg* __restrict__ segs, int out_dim, int rmax, int ot, int rt) {
    pdl_enter();
    extern __shared__ float sm[];
    const LoraSeg sg = segs[blockIdx.x];
    const int row0 = blockIdx.z * rt;
    const int c0 = blockIdx.y * ot;
    if (row0 >= sg.len || c0 >= sg.cols) return;
    const int rows = min(rt, sg.len - row0);
    const int cl = min(ot, sg.cols - c0);
    const int r = sg.rank;
    const int ld = r + 1;
    float* b_s = sm;
    float* t_s = sm + ot * (rmax + 1);
    const T* B = reinterpret_cast<const T*>(sg.b) + (u64)c0 * r;
    // The tile B[c0 .. c0 + cl, :] is contiguous: stage it with 16-byte loads when aligned.
    const int n = cl * r;
    if (((u64)c0 * r) % VEC == 0 && n % VEC == 0) {
        for (int i = threadIdx.x; i < n / VEC; i += blockDim.x) {
            float v[VEC];
            load_n<VEC>(B + i * VEC, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const int f = i * VEC + e;
                b_s[(f / r) * ld + f % r] = v[e];
            }
        }
    } else {
        for (int f = threadIdx.x; f < n; f += blockDim.x) b_s[(f / r) * ld + f % r] = to_f(B[f]);
    }
    for (int f = threadIdx.x; f < rows * r; f += blockDim.x)
        t_s[f] = tmp[(u64)(sg.trow + row0 + f / r) * rmax + f % r];
    __syncthreads();

    for (int o = threadIdx.x; o < rows * cl; o += blockDim.x) {
        const int i = o / cl, c = o % cl;
        const float* ts = t_s + i * r;
        const float* bs = b_s + c * ld;
        float acc = 0.f;
        for (int j = 0; j < r; ++j) acc += ts[j] * bs[j];
        T* yp = y + (u64)(sg.start + row0 + i) * out_dim + sg.col + c0 + c;
        *yp = from_f(to_f(*yp) + sg.scale * acc);
    }
}

// BGMV: the decode shape (every record at most BG_ROWS rows, rank at most BG_RANK; the host cuts segments of
// up to 64 rows into such records and pads their count with empty ones). Each record's A and B are read
// once, with every thread's loads of a block issued together, and no atomics or zeroing:
// bgmv_shrink: grid (segment, j < rmax), 128 threads: tmp[row, j] = x[row] . A[j, :] for the segment's
//   rows (each (row, j) written by exactly one block; j >= the segment's rank is left unwritten and never
//   read).
// bgmv_expand: grid (segment, column tile of 256), thread per column c: y[row, col + c] += scale *
//   tmp[row, :r] . B[c, :r].
// Sums run in a fixed order, so results do not depend on scheduling.
#define BG_ROWS 4
#define BG_RANK 64
#define BG_SHRINK_THREADS 128

// The shrink of one record: tmp[trow + i, j] = x[start + i] . A[j, :] for its rows i < rows.
__device__ __forceinline__ void bgmv_shrink_rec(float* __restrict__ tmp, const T* __restrict__ x,
                                                const T* __restrict__ A, int start, int rows, int trow, int j,
                                                int in_dim, int rmax) {
    const T* a = A + (u64)j * in_dim;
    const T* xs = x + (u64)start * in_dim;
    float acc[BG_ROWS];
#pragma unroll
    for (int i = 0; i < BG_ROWS; ++i) acc[i] = 0.f;
    if (in_dim % VEC == 0) {
#pragma unroll 4
        for (int k = threadIdx.x * VEC; k < in_dim; k += BG_SHRINK_THREADS * VEC) {
            float av[VEC];
            load_n<VEC>(a + k, av);
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i) {
                if (i < rows) {
                    float xv[VEC];
                    load_n<VEC>(xs + (u64)i * in_dim + k, xv);
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[i] += av[e] * xv[e];
                }
            }
        }
    } else {
        for (int k = threadIdx.x; k < in_dim; k += BG_SHRINK_THREADS) {
            const float av = to_f(a[k]);
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i)
                if (i < rows) acc[i] += av * to_f(xs[(u64)i * in_dim + k]);
        }
    }
    __shared__ float red[BG_ROWS][BG_SHRINK_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < BG_ROWS; ++i) {
        float v = acc[i];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) red[i][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < BG_SHRINK_THREADS / 32; ++w) s += red[threadIdx.x][w];
        tmp[(u64)(trow + threadIdx.x) * rmax + j] = s;
    }
}

// The expand of one record for the column tile of this block: y[start + i, col + c] += scale *
// tmp[trow + i, :r] . B[c, :r] (every thread of the block must call it: it stages tmp and syncs).
__device__ __forceinline__ void bgmv_expand_rec(T* __restrict__ y, const float* __restrict__ tmp,
                                                const T* __restrict__ B, int r, float scale, int start, int rows,
                                                int trow, int col, int cols, int out_dim, int rmax) {
    __shared__ float t_s[BG_ROWS * BG_RANK];
    for (int f = threadIdx.x; f < rows * r; f += blockDim.x) t_s[f] = tmp[(u64)(trow + f / r) * rmax + f % r];
    __syncthreads();
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const T* b = B + (u64)c * r;
    float acc[BG_ROWS];
#pragma unroll
    for (int i = 0; i < BG_ROWS; ++i) acc[i] = 0.f;
    if (r % VEC == 0) {
        for (int j0 = 0; j0 < r; j0 += VEC) {
            float bv[VEC];
            load_n<VEC>(b + j0, bv);
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i) {
                if (i < rows) {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[i] += t_s[i * r + j0 + e] * bv[e];
                }
            }
        }
    } else {
        for (int jj = 0; jj < r; ++jj) {
            const float bv = to_f(b[jj]);
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i)
                if (i < rows) acc[i] += t_s[i * r + jj] * bv;
        }
    }
#pragma unroll
    for (int i = 0; i < BG_ROWS; ++i) {
        if (i < rows) {
            T* yp = y + (u64)(start + i) * out_dim + col + c;
            *yp = from_f(to_f(*yp) + scale * acc[i]);
        }
    }
}

extern "C" __global__ void bgmv_shrink(float* __restrict__ tmp, const T* __restrict__ x,
                                       const LoraSeg* __restrict__ segs, int in_dim, int rmax) {
    pdl_enter();
    const LoraSeg sg = segs[blockIdx.x];
    const int j = blockIdx.y;
    if (j >= sg.rank || sg.len <= 0) return;
    bgmv_shrink_rec(tmp, x, reinterpret_cast<const T*>(sg.a), sg.start, min(sg.len, BG_ROWS), sg.trow, j, in_dim,
                    rmax);
}

extern "C" __global__ void bgmv_expand(T* __restrict__ y, const float* __restrict__ tmp,
                                       const LoraSeg* __restrict__ segs, int out_dim, int rmax) {
    pdl_enter();
    const LoraSeg sg = segs[blockIdx.x];
    if (sg.len <= 0) return;
    bgmv_expand_rec(y, tmp, reinterpret_cast<const T*>(sg.b), sg.rank, sg.scale, sg.start, min(sg.len, BG_ROWS),
                    sg.trow, sg.col, sg.cols, out_dim, rmax);
}

// BGMV by adapter index (a forward pass's LoRA plan, made once for all its layers): each record names
// an adapter's index, a table of LoraRef per (layer, target) written when the adapter was uploaded, and
// at most BG_ROWS rows; a layer's launch says which layer and which parts (up to 3 (target, first column
// of y) pairs, a fused projection's), and the kernels look the pairs up. Grid z is the part; part p's
// intermediate rows are p * n + row (the `_ix0` pair) or one set of those per k-chunk (the `_ix` pair, below).
// A pair the adapter does not have (a null A) is skipped.
#define LORA_TARGETS 7

struct LoraRef {
    u64 a;      // lora_A [rank, in], or 0: no pair for this (layer, target)
    u64 b;      // lora_B [cols, rank]
    int rank;
    float scale;
    int cols;
    int pad;
};

struct LoraRec {
    u64 index;  // the adapter's LoraRef[layers][LORA_TARGETS], or 0 for an empty (padding) record
    int start;
    int len;    // at most BG_ROWS (PF_ROWS for the prompt pair)
};

__device__ __forceinline__ int part_of(int p, int v0, int v1, int v2) { return p == 0 ? v0 : (p == 1 ? v1 : v2); }

// The first decode pair by index, kept for comparisons (LORAX_CUDA_LORA_KSPLIT=0, docs/gpu.md): the shrink
// is bgmv_shrink's block of 128 threads per (record, rank row j, part), grid (record, j < rmax, part), each
// reading the record's whole rows of x (so x comes from L2 once per rank row) and A[j]; the expand a thread
// per column, grid (record, column tile of 256, part). Intermediate row p * n + row.
extern "C" __global__ void bgmv_shrink_ix0(float* __restrict__ tmp, const T* __restrict__ x,
                                          const LoraRec* __restrict__ recs, int layer, int t0, int t1, int t2,
                                          int n, int in_dim, int rmax) {
    pdl_enter();
    const LoraRec rc = recs[blockIdx.x];
    if (rc.len <= 0 || rc.index == 0) return;
    const int p = blockIdx.z;
    const LoraRef ref = reinterpret_cast<const LoraRef*>(rc.index)[layer * LORA_TARGETS + part_of(p, t0, t1, t2)];
    const int j = blockIdx.y;
    if (ref.a == 0 || j >= ref.rank) return;
    bgmv_shrink_rec(tmp, x, reinterpret_cast<const T*>(ref.a), rc.start, min(rc.len, BG_ROWS), p * n + rc.start, j,
                    in_dim, rmax);
}

extern "C" __global__ void bgmv_expand_ix0(T* __restrict__ y, const float* __restrict__ tmp,
                                          const LoraRec* __restrict__ recs, int layer, int t0, int t1, int t2,
                                          int c0, int c1, int c2, int n, int out_dim, int rmax) {
    pdl_enter();
    const LoraRec rc = recs[blockIdx.x];
    if (rc.len <= 0 || rc.index == 0) return;
    const int p = blockIdx.z;
    const LoraRef ref = reinterpret_cast<const LoraRef*>(rc.index)[layer * LORA_TARGETS + part_of(p, t0, t1, t2)];
    if (ref.a == 0 || (int)(blockIdx.y * blockDim.x) >= ref.cols) return;
    bgmv_expand_rec(y, tmp, reinterpret_cast<const T*>(ref.b), ref.rank, ref.scale, rc.start, min(rc.len, BG_ROWS),
                    p * n + rc.start, part_of(p, c0, c1, c2), ref.cols, out_dim, rmax);
}

// The decode pair by index (the default): the shrink cuts in_dim into k-chunks, so that many blocks with short
// load chains stay in flight while each block reads its record's x once, through shared memory, for every
// rank row.
// bgmv_shrink_ix: grid (record, k-chunk c, part p), BG_KWARPS warps. The block copies its record's rows of x
//   for its chunk (kc elements, at most BG_KC) into shared memory once (16-byte cp.async copies when the rows
//   and the chunk are whole vectors), then warp w computes rank rows j = w, w + BG_KWARPS, ... < rank for all
//   the record's rows: a lane takes BG_KV 16-byte vectors of A[j] per group of 32 * BG_KV vectors of the
//   chunk, all issued before their use, and the next (rank row, group)'s vectors are in flight while it
//   computes (the first ones before pdl_wait: no kernel writes weights, records or indexes). Sums run
//   lane-strided, then through a shuffle tree that also transposes the rows (warp_sum4: 6 shuffles, not
//   4 x 5). Every (chunk, part, row, j) is written by exactly one warp into its chunk's partial,
//     tmp[((c * parts + p) * n + row) * rmax + j]   (pstride = parts * n rows between chunks),
//   with no atomics and no zeroing; j >= the pair's rank is neither written nor read. Static shared memory:
//   BG_ROWS * BG_KC_BYTES = 16 KiB.
// bgmv_expand_ix: grid (record, column group, 1), BG_EXPAND_THREADS threads; a group is up to ct tiles of
//   2 * BG_EXPAND_THREADS columns of one part (the parts' groups end to end along y). The block stages
//   t[row, j] = the sum of the ks partials in chunk order c = 0, 1, ..., then for each tile of its group each
//   thread adds scale * t[row, :r] . B[c, :r] into two columns of the tile (c and c + BG_EXPAND_THREADS, or
//   with LORA_EXPAND_RED=1 c and c + 1 by one pair reduction, no load of y); B's vectors are loaded BG_BV at
//   a time per column (the first tile's before pdl_wait, each next tile's before this tile's stores).
// The host (lora.rs `shrink_chunk`) takes chunks of whole groups (1024 elements of bf16/f16, 512 of f32), about
// in_dim / 8 each and at most BG_KC: in_dim 4096 in bf16 is 4 chunks of 1024, 14336 is 7 of 2048; an in_dim
// of at most one group is one chunk. In_dim or chunks that are not whole vectors take scalar loads.
// Sums run in a fixed order, so results do not depend on scheduling.
#define BG_KWARPS 8
#define BG_KV 4
#define BG_KC_BYTES 4096
#define BG_KC (BG_KC_BYTES / (int)sizeof(T))
#define BG_EXPAND_THREADS 256
#define BG_BV 4
#if BG_ROWS != 4
#error "warp_sum4 transposes exactly BG_ROWS = 4 rows"
#endif

// The warp's sums of v[0 .. 4): lanes 8i .. 8i + 7 get the sum of v[i]. Each step halves what a lane keeps:
// lanes with bit 16 keep v[2], v[3] and send v[0], v[1] (the others the reverse), then bit 8 splits those two,
// then 4, 2, 1 finish the sum. Every lane of the warp must call it.
__device__ __forceinline__ float warp_sum4(const float* v) {
    const int lane = threadIdx.x & 31;
    const bool hi = (lane & 16) != 0, b8 = (lane & 8) != 0;
    float k0 = hi ? v[2] : v[0], k1 = hi ? v[3] : v[1];
    const float s0 = hi ? v[0] : v[2], s1 = hi ? v[1] : v[3];
    k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
    k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
    float s = b8 ? k1 : k0;
    s += __shfl_xor_sync(0xffffffffu, b8 ? k0 : k1, 8);
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// The rank of target t's pair for record rc in `layer`, with *a = its A's address at column k0; 0 when the
// block has nothing to do (a padding record, a missing pair, a chunk past in_dim). Reads only what no
// kernel writes (records, indexes), so it may run before pdl_wait.
__device__ __forceinline__ int lora_rec_a(const LoraRec& rc, int layer, int t, int k0, int in_dim, u64* a) {
    if (rc.len <= 0 || rc.index == 0 || k0 >= in_dim) return 0;
    const LoraRef ref = reinterpret_cast<const LoraRef*>(rc.index)[layer * LORA_TARGETS + t];
    if (ref.a == 0) return 0;
    *a = ref.a + (u64)k0 * sizeof(T);
    return ref.rank;
}

// This lane's vectors of group g of one row of A's chunk (nv vectors): v = g * 32 * BG_KV + lane + 32 * u.
__device__ __forceinline__ void lora_ld_group(u32x4* dst, const T* row, int g, int nv, int lane) {
#pragma unroll
    for (int u = 0; u < BG_KV; ++u) {
        const int v = g * 32 * BG_KV + lane + 32 * u;
        if (v < nv) dst[u] = load_stream(row + (u64)v * VEC);
    }
}

extern "C" __global__ void __launch_bounds__(BG_KWARPS * 32)
    bgmv_shrink_ix(float* __restrict__ tmp, const T* __restrict__ x, const LoraRec* __restrict__ recs, int layer,
                   int t0, int t1, int t2, int n, int pstride, int in_dim, int rmax, int kc) {
    __shared__ u32x4 x_v[BG_ROWS * BG_KC_BYTES / 16];
    T* x_s = reinterpret_cast<T*>(x_v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int p = blockIdx.z, k0 = blockIdx.y * kc;
    const LoraRec rc = recs[blockIdx.x];
    u64 a_addr = 0;
    const int r = lora_rec_a(rc, layer, part_of(p, t0, t1, t2), k0, in_dim, &a_addr);
    const T* A = reinterpret_cast<const T*>(a_addr);  // A[:, k0 ..]
    const int rows = min(rc.len, BG_ROWS), kl = min(kc, in_dim - k0);
    const bool vec = in_dim % VEC == 0 && kc % VEC == 0;
    const int nv = kl / VEC;
    constexpr int GV = 32 * BG_KV;
    const int ng = (nv + GV - 1) / GV;
    // (rank row, group) pairs of this warp, rank rows outer.
    const int items = vec && warp < r ? (r - warp + BG_KWARPS - 1) / BG_KWARPS * ng : 0;
    u32x4 cur[BG_KV];
    if (items > 0) lora_ld_group(cur, A + (u64)warp * in_dim, 0, nv, lane);
    pdl_enter();
    if (r == 0) return;

    const T* xr = x + (u64)rc.start * in_dim + k0;
    if (vec) {
        for (int i = threadIdx.x; i < rows * nv; i += blockDim.x) {
            const int rr = i / nv, v = i - rr * nv;
            copy16_async(x_s + rr * kc + v * VEC, xr + (u64)rr * in_dim + v * VEC);
        }
        copy_commit();
        copy_wait<0>();
    } else {
        for (int i = threadIdx.x; i < rows * kl; i += blockDim.x) {
            const int rr = i / kl, c = i - rr * kl;
            x_s[rr * kc + c] = xr[(u64)rr * in_dim + c];
        }
    }
    __syncthreads();

    float* out = tmp + ((u64)blockIdx.y * pstride + p * n + rc.start) * rmax;
    const bool writer = (lane & 7) == 0 && (lane >> 3) < rows;
    float acc[BG_ROWS];
    if (vec) {
        for (int it = 0; it < items; ++it) {
            const int jr = it / ng, g = it - jr * ng;
            u32x4 nxt[BG_KV];
            if (it + 1 < items) {
                const int jn = (it + 1) / ng;
                lora_ld_group(nxt, A + (u64)(warp + BG_KWARPS * jn) * in_dim, it + 1 - jn * ng, nv, lane);
            }
            if (g == 0) {
#pragma unroll
                for (int i = 0; i < BG_ROWS; ++i) acc[i] = 0.f;
            }
#pragma unroll
            for (int u = 0; u < BG_KV; ++u) {
                const int v = g * GV + lane + 32 * u;
                if (v < nv) {
                    const T* ae = reinterpret_cast<const T*>(&cur[u]);
                    float av[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) av[e] = to_f(ae[e]);
#pragma unroll
                    for (int i = 0; i < BG_ROWS; ++i) {
                        if (i < rows) {
                            const u32x4 xv = *reinterpret_cast<const u32x4*>(x_s + i * kc + v * VEC);
                            const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                            for (int e = 0; e < VEC; ++e) acc[i] += av[e] * to_f(xe[e]);
                        }
                    }
                }
            }
            if (g == ng - 1) {
                const float s = warp_sum4(acc);
                if (writer) out[(u64)(lane >> 3) * rmax + warp + BG_KWARPS * jr] = s;
            }
#pragma unroll
            for (int u = 0; u < BG_KV; ++u) cur[u] = nxt[u];
        }
    } else {
        for (int j = warp; j < r; j += BG_KWARPS) {
            const T* a = A + (u64)j * in_dim;
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i) acc[i] = 0.f;
            for (int k = lane; k < kl; k += 32) {
                const float av = to_f(a[k]);
#pragma unroll
                for (int i = 0; i < BG_ROWS; ++i)
                    if (i < rows) acc[i] += av * to_f(x_s[i * kc + k]);
            }
            const float s = warp_sum4(acc);
            if (writer) out[(u64)(lane >> 3) * rmax + j] = s;
        }
    }
}

#if defined(LORAX_DTYPE_BF16) || defined(LORAX_DTYPE_F16)
// bgmv_shrink_tc1/2/4 (16-bit storage; the default there, LORAX_CUDA_LORA_SHRINK=simt: bgmv_shrink_ix): the
// k-split shrink on the tensor cores, for ranks up to 16, 32 and 64 (MT = 1, 2, 4 tiles of 16 rank rows).
// The same grid (record, k-chunk c, part p), BG_KWARPS warps, and the same partials in tmp as bgmv_shrink_ix,
// so bgmv_expand_ix reads them unchanged; only the chunk differs: BG_TC_KC elements (lora.rs `shrink_chunk_tc`).
// Each product is one mma.sync m16n8k16 of D[j][n] += A[j][k] . x[n][k] over 16 k: A's rank rows as the
// 16 rows of the first operand (row-major, as A is stored), the record's rows (at most BG_ROWS of the 8
// columns) as the second (each column a row of x, contiguous in k). A sum over k does not care which k
// goes in which slot, as long as both operands agree: lane (g, t) loads 8 consecutive elements, one 16-byte
// vector, of A's rows g and g + 8 and of x's row g, and its words 0-1 feed one product, words 2-3 the next,
// with no shuffling or conversion. Warp w takes the 64-element stretches w and w + BG_KWARPS of the chunk
// (BG_TC_SLICES vectors a lane: its quarter t, 16 elements, of each stretch), issuing all of their loads before the
// first product (A's before pdl_wait: no kernel writes weights, records or indexes; for MT > 1 in batches
// of 4 / MT vectors); then the warps' sums meet in shared memory and are added in warp order, so results do
// not depend on scheduling. Lanes of rows past the record's (and elements past the chunk) load zeros.
#define BG_TC_SLICES 4
#define BG_TC_KC (BG_KWARPS * BG_TC_SLICES * 32)
#if BG_TC_SLICES != 4
#error "TC_OFF lays out two 64-element stretches a warp"
#endif

// 8 consecutive elements from p (16 bytes when vec and all 8 are before the chunk's end, `left` elements
// away; else one at a time), zeros past it. `weight`: a weight's 16 bytes, read around the L1 (load_stream).
__device__ __forceinline__ u32x4 lora_ld8(const T* p, int left, bool vec, bool weight) {
    if (left <= 0) return u32x4{0u, 0u, 0u, 0u};
    if (vec && left >= 8) return weight ? load_stream(p) : *reinterpret_cast<const u32x4*>(p);
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 8; i += 2) w[i / 2] = pack(i < left ? p[i] : (T)0, i + 1 < left ? p[i + 1] : (T)0);
    return u32x4{w[0], w[1], w[2], w[3]};
}

template <int MT>
__device__ __forceinline__ void bgmv_shrink_tc(float* __restrict__ tmp, const T* __restrict__ x,
                                               const LoraRec* __restrict__ recs, int layer, int t0, int t1, int t2,
                                               int n, int pstride, int in_dim, int rmax, int kc) {
    constexpr int SIF = 4 / MT;  // vectors whose loads are in flight together
    static_assert(MT * 16 <= BG_RANK && BG_TC_SLICES % SIF == 0, "tiles of rank rows");
    __shared__ float red[BG_KWARPS][BG_ROWS][BG_RANK];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int p = blockIdx.z, k0 = blockIdx.y * kc;
    const LoraRec rc = recs[blockIdx.x];
    u64 a_addr = 0;
    // The host picks MT for the step's largest rank; the bound only keeps a wrong pick inside `red`.
    const int r = min(lora_rec_a(rc, layer, part_of(p, t0, t1, t2), k0, in_dim, &a_addr), MT * 16);
    const T* A = reinterpret_cast<const T*>(a_addr);  // A[:, k0 ..]
    const int rows = min(rc.len, BG_ROWS), kl = min(kc, in_dim - k0);
    const bool vec = in_dim % VEC == 0 && kc % VEC == 0;
    // This lane's vector s of the chunk (kl - TC_OFF(s) elements left from there): vectors 2i and 2i + 1
    // are the lane's 16 elements of the warp's 64-element stretch i, so that each load of a row's four lanes
    // touches all four sectors of a 128-byte line (half of each), and the next load the other halves.
#define TC_OFF(s) ((warp + BG_KWARPS * ((s) / 2)) * 64 + t * 16 + ((s) % 2) * 8)
    u32x4 av[SIF][MT][2];
    auto load_a = [&](int s0) {
#pragma unroll
        for (int s = 0; s < SIF; ++s)
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int j = m * 16 + g + 8 * h;
                    av[s][m][h] = j < r ? lora_ld8(A + (u64)j * in_dim + TC_OFF(s0 + s), kl - TC_OFF(s0 + s), vec, true)
                                        : u32x4{0u, 0u, 0u, 0u};
                }
    };
    if (r > 0) load_a(0);
    pdl_enter();
    if (r == 0) return;

    u32x4 xv[BG_TC_SLICES];
    const T* xr = x + (u64)(rc.start + g) * in_dim + k0;
#pragma unroll
    for (int s = 0; s < BG_TC_SLICES; ++s)
        xv[s] = g < rows ? lora_ld8(xr + TC_OFF(s), kl - TC_OFF(s), vec, false) : u32x4{0u, 0u, 0u, 0u};
    float c[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) c[m][i] = 0.f;
#pragma unroll
    for (int s0 = 0; s0 < BG_TC_SLICES; s0 += SIF) {
        if (s0 > 0) load_a(s0);
#pragma unroll
        for (int s = 0; s < SIF; ++s)
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                const u32x4 &lo = av[s][m][0], &hi = av[s][m][1], &xs = xv[s0 + s];
                const u32 a0[4] = {lo.x, hi.x, lo.y, hi.y}, b0[2] = {xs.x, xs.y};
                mma_16816(c[m], a0, b0);
                const u32 a1[4] = {lo.z, hi.z, lo.w, hi.w}, b1[2] = {xs.z, xs.w};
                mma_16816(c[m], a1, b1);
            }
    }
    // c[m] = {D[16m + g][2t], D[16m + g][2t + 1], D[16m + g + 8][2t], D[16m + g + 8][2t + 1]}: rank row j,
    // record row n (the rows past BG_ROWS, t >= 2, are the zero columns).
    if (2 * t < BG_ROWS) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            red[warp][2 * t][16 * m + g] = c[m][0];
            red[warp][2 * t + 1][16 * m + g] = c[m][1];
            red[warp][2 * t][16 * m + g + 8] = c[m][2];
            red[warp][2 * t + 1][16 * m + g + 8] = c[m][3];
        }
    }
    __syncthreads();
    float* out = tmp + ((u64)blockIdx.y * pstride + p * n + rc.start) * rmax;
    for (int f = threadIdx.x; f < rows * r; f += blockDim.x) {
        const int i = f / r, j = f - i * r;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < BG_KWARPS; ++w) s += red[w][i][j];
        out[(u64)i * rmax + j] = s;
    }
#undef TC_OFF
}

#define BGMV_SHRINK_TC(MT, NAME)                                                                               \
    extern "C" __global__ void __launch_bounds__(BG_KWARPS * 32)                                              \
        NAME(float* __restrict__ tmp, const T* __restrict__ x, const LoraRec* __restrict__ recs, int layer, int t0, \
             int t1, int t2, int n, int pstride, int in_dim, int rmax, int kc) {                             \
        bgmv_shrink_tc<MT>(tmp, x, recs, layer, t0, t1, t2, n, pstride, in_dim, rmax, kc);                   \
    }
#else
// f32 storage has no tensor-core path: the host never launches these.
#define BGMV_SHRINK_TC(MT, NAME)                                                                            \
    extern "C" __global__ void NAME(float* tmp, const T* x, const LoraRec* recs, int layer, int t0, int t1, int t2, \
                                    int n, int pstride, int in_dim, int rmax, int kc) {}
#endif
BGMV_SHRINK_TC(1, bgmv_shrink_tc1)
BGMV_SHRINK_TC(2, bgmv_shrink_tc2)
BGMV_SHRINK_TC(4, bgmv_shrink_tc4)

// This thread's BG_BV vectors of B from rank index j0 for its two columns (c < cols only).
__device__ __forceinline__ void lora_ld_b(u32x4 (*dst)[BG_BV], const T* B, const int* col, int cols, int r, int j0) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int u = 0; u < BG_BV; ++u) {
            const int j = j0 + u * VEC;
            if (col[q] < cols && j < r) dst[q][u] = load_stream(B + (u64)col[q] * r + j);
        }
}

// y[i, col[q]] of a record's rows i < rows for a thread's two columns (those < cols), as f32.
__device__ __forceinline__ void lora_ld_y(float (*yv)[BG_ROWS], const T* yr, const int* col, int cols, int rows,
                                          int out_dim) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int i = 0; i < BG_ROWS; ++i)
            if (i < rows && col[q] < cols) yv[q][i] = to_f(yr[(u64)i * out_dim + col[q]]);
}

// acc[q][i] = t[i, :r] . B[col[q], :r] for a thread's two columns (0 past cols) and the record's rows
// i < rows, t in shared memory (rows of r floats). bv holds B's first BG_BV vectors of each column (loaded
// ahead); the rest are loaded here (r > BG_BV * VEC). Scalar loads when r is not whole vectors.
__device__ __forceinline__ void lora_tile_acc(float (*acc)[BG_ROWS], u32x4 (*bv)[BG_BV], const T* B, const float* t_s,
                                              const int* col, int cols, int r, int rows) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int i = 0; i < BG_ROWS; ++i) acc[q][i] = 0.f;
    if (r % VEC != 0) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            if (col[q] >= cols) continue;
            const T* b = B + (u64)col[q] * r;
            for (int j = 0; j < r; ++j) {
                const float bj = to_f(b[j]);
#pragma unroll
                for (int i = 0; i < BG_ROWS; ++i)
                    if (i < rows) acc[q][i] += t_s[i * r + j] * bj;
            }
        }
        return;
    }
    for (int j0 = 0; j0 < r; j0 += BG_BV * VEC) {
        if (j0 > 0) lora_ld_b(bv, B, col, cols, r, j0);
#pragma unroll
        for (int u = 0; u < BG_BV; ++u) {
            const int j = j0 + u * VEC;
            if (j >= r) continue;
            // Both columns' B[c, j .. j + VEC) (zeros past cols: never stored), then each t value of the rows
            // (16-byte broadcasts from shared memory) is used for both as soon as it is read.
            float b[2][VEC];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const T* be = reinterpret_cast<const T*>(&bv[q][u]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) b[q][e] = col[q] < cols ? to_f(be[e]) : 0.f;
            }
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i) {
                if (i >= rows) continue;
#pragma unroll
                for (int e4 = 0; e4 < VEC; e4 += 4) {
                    const f32x4 t4 = *reinterpret_cast<const f32x4*>(t_s + i * r + j + e4);
                    const float t[4] = {t4.x, t4.y, t4.z, t4.w};
#pragma unroll
                    for (int e = 0; e < 4; ++e)
#pragma unroll
                        for (int q = 0; q < 2; ++q) acc[q][i] += t[e] * b[q][e4 + e];
                }
            }
        }
    }
}

// How bgmv_expand_ix adds its products to a 16-bit y: LORA_EXPAND_RED 0 (the default) by loading y and
// storing the sum, a thread's two columns c and c + BG_EXPAND_THREADS of a tile; 1 (a define, not yet
// measured on a GPU: bench/NOTES.md session 22) by reductions, a thread's two columns adjacent. Reductions
// need sm_90 for bf16 (sm_70 for f16); older targets, and f32 (whose red.add flushes subnormals to zero),
// load and store whatever the define.
#ifndef LORA_EXPAND_RED
#define LORA_EXPAND_RED 0
#endif
#if LORA_EXPAND_RED && !defined(LORAX_DTYPE_F32) &&                                                          \
    (defined(LORAX_EMU) ||                                                                                    \
     (defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900 || (__CUDA_ARCH__ >= 700 && defined(LORAX_DTYPE_F16)))))
#define LORA_RED 1
#else
#define LORA_RED 0
#endif
#if LORA_RED
// p[0] += d0 and, when `both`, p[1] += d1, by reductions with no load of y (each entry has this one writer,
// so the result does not depend on the order of anything): d is rounded to T, then added to y with one
// rounding, as PEFT adds its 16-bit LoRA output to the base output; a 4-byte aligned pair takes one
// bf16x2/f16x2 reduction (a lone or unaligned entry a 16-bit one, which ptxas makes a compare-and-swap
// loop). Under the CPU emulation: a load, the same two roundings, a store.
__device__ __forceinline__ void lora_red2(T* p, float d0, float d1, bool both) {
#if defined(LORAX_EMU)
    p[0] = from_f(to_f(p[0]) + to_f(from_f(d0)));
    if (both) p[1] = from_f(to_f(p[1]) + to_f(from_f(d1)));
#else
#if defined(LORAX_DTYPE_BF16)
#define LORA_RED_T "bf16"
#else
#define LORA_RED_T "f16"
#endif
    if (both && ((u64)p & 3) == 0) {
        asm volatile("red.global.add.noftz." LORA_RED_T "x2 [%0], %1;" ::"l"(p), "r"(pack_f(d0, d1)) : "memory");
    } else {
        asm volatile("red.global.add.noftz." LORA_RED_T " [%0], %1;" ::"l"(p), "h"(from_f(d0)) : "memory");
        if (both)
            asm volatile("red.global.add.noftz." LORA_RED_T " [%0], %1;" ::"l"(p + 1), "h"(from_f(d1)) : "memory");
    }
#undef LORA_RED_T
#endif
}
#endif

// The expand's intermediate rows t[i, :r] (i < rows) into t_s (rows of r floats): each entry the sum of the
// ks k-chunk partials in chunk order (the first 8 loads issued together), from intermediate row trow + i of
// chunk 0 (chunk c's are pstride rows further on). Ends with the block's barrier.
__device__ __forceinline__ void lora_stage_t(float* t_s, const float* __restrict__ tmp, int trow, int rows, int r,
                                             int rmax, int pstride, int ks) {
    const float* tp = tmp + (u64)trow * rmax;
    const u64 cstride = (u64)pstride * rmax;
    for (int f = threadIdx.x; f < rows * r; f += blockDim.x) {
        const float* e = tp + (u64)(f / r) * rmax + f % r;
        float part[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) part[c] = c < ks ? e[c * cstride] : 0.f;
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c)
            if (c < ks) s += part[c];
        for (int c = 8; c < ks; ++c) s += e[c * cstride];
        t_s[f] = s;
    }
    __syncthreads();
}

// As lora_stage_t, from columns of y in the storage type (`bgmv_expand_iy`): t[i, :r] = ty[i * out_dim ..], in f32.
__device__ __forceinline__ void lora_stage_ty(float* t_s, const T* __restrict__ ty, int rows, int r, int out_dim) {
    for (int f = threadIdx.x; f < rows * r; f += blockDim.x) t_s[f] = to_f(ty[(u64)(f / r) * out_dim + f % r]);
    __syncthreads();
}

// The expand block's record (grid x), part p and column group within the part (grid y: the parts' groups
// end to end, part 0's y < e1, part 1's e1 <= y < e2, part 2's the rest), and the part's pair in the
// record's adapter (all zero for a padding or empty record). Reads only what no kernel writes, so it may run
// before pdl_wait.
__device__ __forceinline__ LoraRef lora_expand_block(const LoraRec* __restrict__ recs, int layer, int t0, int t1,
                                                     int t2, int e1, int e2, LoraRec* rc, int* p, int* group) {
    *rc = recs[blockIdx.x];
    const int gy = blockIdx.y;
    *p = gy >= e2 ? 2 : (gy >= e1 ? 1 : 0);
    *group = gy - part_of(*p, 0, e1, e2);
    LoraRef ref = {};
    if (rc->len > 0 && rc->index != 0)
        ref = reinterpret_cast<const LoraRef*>(rc->index)[layer * LORA_TARGETS + part_of(*p, t0, t1, t2)];
    return ref;
}

// Three blocks per multiprocessor: ptxas took 114 registers a thread (2 blocks) when left free.
// Grid (record, column group, 1): the parts' groups laid end to end along y (part 0's are y < e1, part 1's
// e1 <= y < e2, part 2's the rest), so no block has a part narrower than the widest to skip; a group is `ct`
// tiles of 2 * BG_EXPAND_THREADS columns, walked in order, the next tile's B loaded before this one's stores,
// so the record's lookups and its intermediate rows are paid once for ct tiles.
// TY (`bgmv_expand_iy`): the intermediate is not `tmp`'s partials but columns of y itself, written by the
// projection's GEMM from lora_A rows appended to its weight (lora.rs `LoraGemm`): part p's t[row, :r] is
// y[row, pstride + p * rmax ..] (pstride is then the first such column, rmax the columns each part has, ks
// unused), never a column the expand writes.
template <bool TY>
__device__ __forceinline__ void bgmv_expand_body(T* __restrict__ y, const float* __restrict__ tmp,
                                                 const LoraRec* __restrict__ recs, int layer, int t0, int t1, int t2,
                                                 int c0, int c1, int c2, int e1, int e2, int ct, int n, int pstride,
                                                 int out_dim, int rmax, int ks) {
    __shared__ f32x4 t_v[BG_ROWS * BG_RANK / 4];
    float* t_s = reinterpret_cast<float*>(t_v);  // rows of r floats: 16-byte aligned when r % VEC == 0
    LoraRec rc;
    int p, group;
    const LoraRef ref = lora_expand_block(recs, layer, t0, t1, t2, e1, e2, &rc, &p, &group);
    constexpr int TW = 2 * BG_EXPAND_THREADS;
    int tile = group * ct * TW;
    const int r = ref.rank, cols = ref.cols;
    const int tend = min(cols, tile + ct * TW);
    const bool live = ref.a != 0 && tile < cols;
    const bool vec = r % VEC == 0;
    // A thread's two columns of a tile: adjacent for the pair reductions, else c and c + BG_EXPAND_THREADS.
    constexpr int C0 = LORA_RED ? 2 : 1, C1 = LORA_RED ? 1 : BG_EXPAND_THREADS;
    int col[2] = {tile + C0 * (int)threadIdx.x, tile + C0 * (int)threadIdx.x + C1};
    const T* B = reinterpret_cast<const T*>(ref.b);
    u32x4 bv[2][BG_BV];
    if (live && vec) lora_ld_b(bv, B, col, cols, r, 0);
    pdl_enter();
    if (!live) return;

    const int rows = min(rc.len, BG_ROWS);
    T* yr = y + (u64)rc.start * out_dim + part_of(p, c0, c1, c2);
#if !LORA_RED
    // The first tile's y, loaded while the partials below are (each next tile's after this one's stores).
    float yv[2][BG_ROWS];
    lora_ld_y(yv, yr, col, cols, rows, out_dim);
#endif
    if (TY)
        lora_stage_ty(t_s, y + (u64)rc.start * out_dim + pstride + p * rmax, rows, r, out_dim);
    else
        lora_stage_t(t_s, tmp, p * n + rc.start, rows, r, rmax, pstride, ks);

    for (;;) {
        float acc[2][BG_ROWS];
        lora_tile_acc(acc, bv, B, t_s, col, cols, r, rows);
        // The next tile's first B vectors go out before this tile's stores.
        const int cur[2] = {col[0], col[1]};
        tile += TW;
        const bool more = tile < tend;
        col[0] = tile + C0 * (int)threadIdx.x;
        col[1] = col[0] + C1;
        if (more && vec) lora_ld_b(bv, B, col, cols, r, 0);
#if LORA_RED
#pragma unroll
        for (int i = 0; i < BG_ROWS; ++i)
            if (i < rows && cur[0] < cols)
                lora_red2(yr + (u64)i * out_dim + cur[0], ref.scale * acc[0][i], ref.scale * acc[1][i], cur[1] < cols);
#else
#pragma unroll
        for (int q = 0; q < 2; ++q)
#pragma unroll
            for (int i = 0; i < BG_ROWS; ++i)
                if (i < rows && cur[q] < cols) yr[(u64)i * out_dim + cur[q]] = from_f(yv[q][i] + ref.scale * acc[q][i]);
        if (more) lora_ld_y(yv, yr, col, cols, rows, out_dim);
#endif
        if (!more) break;
    }
}

extern "C" __global__ void __launch_bounds__(BG_EXPAND_THREADS, 3)
    bgmv_expand_ix(T* __restrict__ y, const float* __restrict__ tmp, const LoraRec* __restrict__ recs, int layer,
                   int t0, int t1, int t2, int c0, int c1, int c2, int e1, int e2, int ct, int n, int pstride,
                   int out_dim, int rmax, int ks) {
    bgmv_expand_body<false>(y, tmp, recs, layer, t0, t1, t2, c0, c1, c2, e1, e2, ct, n, pstride, out_dim, rmax, ks);
}

extern "C" __global__ void __launch_bounds__(BG_EXPAND_THREADS, 3)
    bgmv_expand_iy(T* __restrict__ y, const LoraRec* __restrict__ recs, int layer, int t0, int t1, int t2, int c0,
                   int c1, int c2, int e1, int e2, int ct, int n, int tcol, int out_dim, int rslot) {
    bgmv_expand_body<true>(y, nullptr, recs, layer, t0, t1, t2, c0, c1, c2, e1, e2, ct, n, tcol, out_dim, rslot, 1);
}

// lora_gemm_rows: an adapter's lora_A rows into the rows reserved past each layer's projection weight (lora.rs
// `LoraGemm`), so that the projection's GEMM also computes the shrink. Grid (layer, part * rslot + j, 1): row
// j of part p is row j of the layer's (target t_p) pair's A, or zeros past its rank and where the layer has no
// such pair. dst[layer] is the layer's first reserved row; rows of k elements.
extern "C" __global__ void lora_gemm_rows(const u64* __restrict__ dst, const LoraRef* __restrict__ index, int t0,
                                          int t1, int t2, int rslot, int k) {
    pdl_enter();
    const int layer = blockIdx.x, row = blockIdx.y, p = row / rslot, j = row % rslot;
    const LoraRef ref = index[layer * LORA_TARGETS + part_of(p, t0, t1, t2)];
    T* d = reinterpret_cast<T*>(dst[layer]) + (u64)row * k;
    const T* a = ref.a != 0 && j < ref.rank ? reinterpret_cast<const T*>(ref.a) + (u64)j * k : nullptr;
    for (int c = threadIdx.x; c < k; c += blockDim.x) d[c] = a ? a[c] : from_f(0.f);
}

// bgmv_expand_vx: the decode expand with wider accesses and longer records (LORAX_CUDA_LORA_EXPAND; lora.rs
// `lora_step_layer` decides where it fits). Grid (expand record, column tile, 1), BG_EXPAND_THREADS threads.
// An expand record is up to BE_ROWS consecutive rows of one adapter (the host merges the shrink's records of a segment, to at
// most BE_ROWS rows, padding records after them), so B is read once for up to 16 rows where bgmv_expand_ix
// reads it once per 4. A thread takes BE_V = 8 / sizeof(T) adjacent columns (one 8-byte load and store of
// y per row, its columns' B rows one contiguous run), a tile is BE_V * BG_EXPAND_THREADS columns of one
// part (the parts' tiles end to end along y: part 0's y < e1, part 1's e1 <= y < e2, part 2's the rest).
// The host launches it only where every part's first column, its columns and out_dim are whole multiples
// of BE_V and y is 8-byte aligned. The block loads its columns' first BE_J rank entries of B before
// pdl_wait, then all its rows of y at once, stages t[row, j] (the ks partials summed in chunk order, as
// bgmv_expand_ix does), and adds scale * t[row, :r] . B[c, :r] in f32 to each entry, rounded once. Ranks
// above BE_J load B's later entries per group of 4 rows; a rank that is not whole 16-byte vectors takes
// scalar loads of B.
#define BE_ROWS 16
#define BE_V (8 / (int)sizeof(T))
#define BE_J 16
#define BE_BV (BE_J / VEC)

// This thread's B[c + v, j0 .. j0 + BE_J) for v < BE_V (entries past r not loaded).
__device__ __forceinline__ void lora_ld_bv(u32x4 (*dst)[BE_BV], const T* b, int r, int j0) {
#pragma unroll
    for (int v = 0; v < BE_V; ++v)
#pragma unroll
        for (int u = 0; u < BE_BV; ++u)
            if (j0 + u * VEC < r) dst[v][u] = load_stream(b + (u64)v * r + j0 + u * VEC);
}

extern "C" __global__ void __launch_bounds__(BG_EXPAND_THREADS, 2)
    bgmv_expand_vx(T* __restrict__ y, const float* __restrict__ tmp, const LoraRec* __restrict__ recs, int layer,
                   int t0, int t1, int t2, int c0, int c1, int c2, int e1, int e2, int n, int pstride, int out_dim,
                   int rmax, int ks) {
    __shared__ f32x4 t_v[BE_ROWS * BG_RANK / 4];
    float* t_s = reinterpret_cast<float*>(t_v);  // rows of r floats: 16-byte aligned when r % VEC == 0
    LoraRec rc;
    int p, tile;  // a group is one tile
    const LoraRef ref = lora_expand_block(recs, layer, t0, t1, t2, e1, e2, &rc, &p, &tile);
    constexpr int TW = BE_V * BG_EXPAND_THREADS;
    const int r = ref.rank, cols = ref.cols;
    const bool live = ref.a != 0 && tile * TW < cols;
    const int c = tile * TW + BE_V * (int)threadIdx.x;  // this thread's first column (of BE_V, all < cols or none)
    const bool mine = live && c < cols;
    const bool vec = r % VEC == 0;
    const T* b = reinterpret_cast<const T*>(ref.b) + (u64)c * r;
    u32x4 bv[BE_V][BE_BV];
    if (mine && vec) lora_ld_bv(bv, b, r, 0);
    pdl_enter();
    if (!live) return;

    const int rows = min(rc.len, BE_ROWS);
    T* yr = y + (u64)rc.start * out_dim + part_of(p, c0, c1, c2) + c;
    u32x2 yv[BE_ROWS];
    if (mine) {
#pragma unroll
        for (int i = 0; i < BE_ROWS; ++i)
            if (i < rows) yv[i] = *reinterpret_cast<const u32x2*>(yr + (u64)i * out_dim);
    }
    lora_stage_t(t_s, tmp, p * n + rc.start, rows, r, rmax, pstride, ks);
    if (!mine) return;

    // Unrolled, so that yv's rows are registers (BE_ROWS / 4 groups).
#pragma unroll
    for (int q = 0; q < BE_ROWS; q += 4) {
        if (q >= rows) break;
        float acc[4][BE_V];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int v = 0; v < BE_V; ++v) acc[i][v] = 0.f;
        if (vec) {
#pragma unroll 1
            for (int j0 = 0; j0 < r; j0 += BE_J) {
                // Rank entries past the first BE_J: loaded for each group of rows (the first group's first
                // entries were loaded before pdl_wait and stay).
                if (j0 > 0 || (q > 0 && r > BE_J)) lora_ld_bv(bv, b, r, j0);
#pragma unroll
                for (int u = 0; u < BE_BV; ++u) {
                    const int j = j0 + u * VEC;
                    if (j >= r) continue;
                    float bf[BE_V][VEC];
#pragma unroll
                    for (int v = 0; v < BE_V; ++v) {
                        const T* be = reinterpret_cast<const T*>(&bv[v][u]);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) bf[v][e] = to_f(be[e]);
                    }
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        if (q + i >= rows) continue;
#pragma unroll
                        for (int e4 = 0; e4 < VEC; e4 += 4) {
                            const f32x4 t4 = *reinterpret_cast<const f32x4*>(t_s + (q + i) * r + j + e4);
                            const float t[4] = {t4.x, t4.y, t4.z, t4.w};
#pragma unroll
                            for (int e = 0; e < 4; ++e)
#pragma unroll
                                for (int v = 0; v < BE_V; ++v) acc[i][v] += t[e] * bf[v][e4 + e];
                        }
                    }
                }
            }
        } else {
            for (int j = 0; j < r; ++j) {
                float bf[BE_V];
#pragma unroll
                for (int v = 0; v < BE_V; ++v) bf[v] = to_f(b[(u64)v * r + j]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    if (q + i >= rows) continue;
                    const float t = t_s[(q + i) * r + j];
#pragma unroll
                    for (int v = 0; v < BE_V; ++v) acc[i][v] += t * bf[v];
                }
            }
        }
        // Rows q .. q + 3 of y: the f32 sum rounded once, one 8-byte store a row.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (q + i >= rows) continue;
            u32x2 w = yv[q + i];
            T* we = reinterpret_cast<T*>(&w);
#pragma unroll
            for (int v = 0; v < BE_V; ++v) we[v] = from_f(to_f(we[v]) + ref.scale * acc[i][v]);
            *reinterpret_cast<u32x2*>(yr + (u64)(q + i) * out_dim) = w;
        }
    }
}

// The prompt pair by index on the tensor cores (16-bit storage; a forward pass of more than lora.rs
// STEP_MAX_ROWS rows whose plan cuts its long segments, prompt chunks, into records of at most PF_ROWS rows;
// the host keeps the cuBLAS path of `lora_gemm_segments` with LORAX_CUDA_LORA_PROMPT=gemm). Records, indexes
// and the partials' layout are those of the `_ix` pair above.
// lora_shrink_pf2/4/8 (NT = 2, 4, 8 tiles of 8 rank rows: ranks up to 16, 32, 64): grid (record, k-chunk c,
//   part p), PF_WARPS warps. Warp w takes the record's rows 16 (w % 4) .. + 15 and half w / 4 of the chunk, in
//   stretches of 32 elements: lane (g, t) loads 8 consecutive elements (one 16-byte vector) at 8 t of x's rows g
//   and g + 8 and of A's rank rows 8 m + g, and words 0-1 feed one mma.sync m16n8k16 (D[row][j] += x[row][k] .
//   A[j][k]), words 2-3 the next: any assignment of k to a product's slots sums the same k, as long as both
//   operands agree (bgmv_shrink_tc does the same with the operands the other way round). A's first vectors
//   are loaded before pdl_wait (no kernel writes weights, records or indexes). The two halves'
//   sums meet in shared memory, added in half order, and each (chunk, part, row, j < rank) is written once:
//     tmp[((c * parts + p) * n + row) * rmax + j].
// lora_expand_pf: grid (record, column group), PF_WARPS warps; a group is PF_COLS columns of one part (the
//   parts' groups end to end along y, lora.rs `expand_groups` with tiles of PF_COLS and ct 1). The block sums
//   its rows' partials in chunk order into shared memory as t = hi + lo, two values of the storage type (t's
//   precision near f32's, as the `_ix` pair keeps it; rounding t to bf16 alone, as cuBLAS's prompt path did,
//   failed golden's rsLoRA adapter, whose scales reach 16), and each k-step runs one product with each.
//   Warp w then takes rows 16 (w % 4) .. + 15 and columns 128 (w / 4) .. + 127 of the group, in two passes of
//   64 columns as 8 n-tiles: tile nt's column n is 16 (n / 2) + 2 nt + n % 2 of the pass, so that lane t's
//   outputs are the 16 consecutive columns 16 t .. 16 t + 15 of its two rows, two 16-byte loads and stores of
//   y each (call 3 of session 35: one pass of 128 columns took 180 registers, one block a multiprocessor, and
//   was bound by its instructions' latency). Per k-step of 16 rank indices, lane t's slots 2t, 2t + 1 / 2t + 8, 2t + 9 hold rank
//   indices 4t, 4t + 1 / 4t + 2, 4t + 3: one 8-byte load of B[col][16 ks + 4t ..] and two of each t row.
//   y = y + scale * D, rounded once. Rank indices past the pair's rank are zeros in both operands.
// Sums run in a fixed order, so results do not depend on scheduling.
#define PF_ROWS 64
#define PF_WARPS 8
#define PF_COLS 256
#define PF_LDT 72  // t's shared row stride in elements (64 rank indices + 8)
#define PF_SQ 4  // entries of t each thread of lora_expand_pf sums at a time
#define PF_SC 8  // partials of each it loads before adding
#ifndef PF_EXPAND_MINB
#define PF_EXPAND_MINB 1  // lora_expand_pf's blocks per multiprocessor (launch bounds)
#endif

#if defined(LORAX_DTYPE_BF16) || defined(LORAX_DTYPE_F16)
template <int NT>
__device__ __forceinline__ void lora_shrink_pf(float* __restrict__ tmp, const T* __restrict__ x,
                                               const LoraRec* __restrict__ recs, int layer, int t0, int t1, int t2,
                                               int n, int pstride, int in_dim, int rmax, int kc) {
    constexpr int SIF = NT == 2 ? 4 : (NT == 4 ? 2 : 1);  // stretches whose loads are in flight together
    __shared__ float red[4][16][NT * 8];                   // the second half's sums
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int rg = warp % 4, half = warp / 4;
    const int p = blockIdx.z, k0 = blockIdx.y * kc;
    const LoraRec rc = recs[blockIdx.x];
    u64 a_addr = 0;
    // The host picks NT for the step's largest rank; the bound only keeps a wrong pick inside `red`.
    const int r = min(lora_rec_a(rc, layer, part_of(p, t0, t1, t2), k0, in_dim, &a_addr), NT * 8);
    const int rows = min(rc.len, PF_ROWS) - 16 * rg;  // this warp's rows (none when <= 0)
    const int kh = kc / 2;  // a half (the host's chunks are whole 64-element pairs of stretches)
    const int kl = min(kc, in_dim - k0) - half * kh;  // elements of the chunk from this half's first
    const int hl = min(kh, kl);
    const bool vec = in_dim % VEC == 0 && kc % (2 * VEC) == 0;
    const T* A = reinterpret_cast<const T*>(a_addr) + half * kh;
    const u32x4 zero{0u, 0u, 0u, 0u};
    // A's vectors of the SIF stretches from s0 (zeros past the rank and the half).
    u32x4 av[SIF][NT];
    auto load_a = [&](int s0) {
#pragma unroll
        for (int s = 0; s < SIF; ++s)
#pragma unroll
            for (int m = 0; m < NT; ++m) {
                const int j = 8 * m + g, off = s0 + 32 * s + 8 * t;
                av[s][m] = j < r ? lora_ld8(A + (u64)j * in_dim + off, hl - off, vec, true) : zero;
            }
    };
    if (r > 0 && rows > 0) load_a(0);  // weights: before waiting for the kernels ahead
    pdl_enter();
    if (r == 0) return;  // the whole block
    const T* x0 = x + (u64)(rc.start + 16 * rg + g) * in_dim + k0 + half * kh;
    const T* x8 = x0 + (u64)8 * in_dim;
    float c[NT][4];
#pragma unroll
    for (int m = 0; m < NT; ++m) c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.f;
    if (rows > 0) {
        for (int s0 = 0; s0 < hl; s0 += 32 * SIF) {
            if (s0 > 0) load_a(s0);
            u32x4 xa[SIF], xb[SIF];
#pragma unroll
            for (int s = 0; s < SIF; ++s) {
                const int off = s0 + 32 * s + 8 * t, left = hl - off;
                xa[s] = g < rows ? lora_ld8(x0 + off, left, vec, false) : zero;
                xb[s] = g + 8 < rows ? lora_ld8(x8 + off, left, vec, false) : zero;
            }
#pragma unroll
            for (int s = 0; s < SIF; ++s)
#pragma unroll
                for (int m = 0; m < NT; ++m) {
                    const u32x4 &lo = xa[s], &hi = xb[s], &a = av[s][m];
                    const u32 a0[4] = {lo.x, hi.x, lo.y, hi.y}, b0[2] = {a.x, a.y};
                    mma_16816(c[m], a0, b0);
                    const u32 a1[4] = {lo.z, hi.z, lo.w, hi.w}, b1[2] = {a.z, a.w};
                    mma_16816(c[m], a1, b1);
                }
        }
    }
    // c[m] = {D[g][8m + 2t], D[g][8m + 2t + 1], D[g + 8][8m + 2t], D[g + 8][8m + 2t + 1]}.
    if (half == 1) {
#pragma unroll
        for (int m = 0; m < NT; ++m) {
            red[rg][g][8 * m + 2 * t] = c[m][0];
            red[rg][g][8 * m + 2 * t + 1] = c[m][1];
            red[rg][g + 8][8 * m + 2 * t] = c[m][2];
            red[rg][g + 8][8 * m + 2 * t + 1] = c[m][3];
        }
    }
    __syncthreads();
    if (half == 1 || rows <= 0) return;
    float* out = tmp + ((u64)blockIdx.y * pstride + (u64)p * n + rc.start + 16 * rg) * rmax;
#pragma unroll
    for (int m = 0; m < NT; ++m) {
        const int j = 8 * m + 2 * t;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = g + 8 * (e / 2), jj = j + e % 2;
            if (i < rows && jj < r) out[(u64)i * rmax + jj] = c[m][e] + red[rg][i][jj];
        }
    }
}

// Stores the first `left` (at most 8) of the 8 elements in v at p: one 16-byte store when vec and all 8 fit.
__device__ __forceinline__ void lora_st8(T* p, const u32x4& v, int left, bool vec) {
    if (left <= 0) return;
    if (vec && left >= 8) {
        *reinterpret_cast<u32x4*>(p) = v;
        return;
    }
    const T* e = reinterpret_cast<const T*>(&v);
    for (int i = 0; i < 8 && i < left; ++i) p[i] = e[i];
}

extern "C" __global__ void __launch_bounds__(PF_WARPS * 32, PF_EXPAND_MINB)
    lora_expand_pf(T* __restrict__ y, const float* __restrict__ tmp, const LoraRec* __restrict__ recs, int layer,
                   int t0, int t1, int t2, int c0, int c1, int c2, int e1, int e2, int n, int pstride, int out_dim,
                   int rmax, int ks) {
    // t's high and low parts, as words, so that their rows are read a word at a time.
    __shared__ u32 ts_w[2][PF_ROWS * PF_LDT / 2];
    T(*ts)[PF_LDT] = reinterpret_cast<T(*)[PF_LDT]>(ts_w[0]);
    T(*tl)[PF_LDT] = reinterpret_cast<T(*)[PF_LDT]>(ts_w[1]);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int rg = warp % 4, ch = warp / 4;
    const int gy = blockIdx.y;
    const int p = gy >= e2 ? 2 : (gy >= e1 ? 1 : 0);
    const int first = (gy - (p == 0 ? 0 : (p == 1 ? e1 : e2))) * PF_COLS;  // the group's first column in the part
    const LoraRec rc = recs[blockIdx.x];
    LoraRef ref{};
    if (rc.len > 0 && rc.index != 0)
        ref = reinterpret_cast<const LoraRef*>(rc.index)[layer * LORA_TARGETS + part_of(p, t0, t1, t2)];
    pdl_enter();
    if (ref.a == 0 || first >= ref.cols) return;  // the whole block
    const int r = min(ref.rank, 64), rk = (r + 15) / 16 * 16, rows = min(rc.len, PF_ROWS);
    // t[i][j] = the partials' sum in chunk order, as two values of the storage type, hi = t rounded and lo =
    // t - hi rounded (about 16 significant bits: t keeps nearly f32's precision, as the `_ix` pair keeps it);
    // zeros past the rank (to rk) and the rows. Each thread takes PF_SQ entries and loads PF_SC partials of
    // each before adding any, so that its loads are in flight together.
    const u64 cstride = (u64)pstride * rmax;
    for (int f0 = threadIdx.x; f0 < PF_ROWS * rk; f0 += PF_SQ * PF_WARPS * 32) {
        const float* src[PF_SQ];
        float sum[PF_SQ];
#pragma unroll
        for (int q = 0; q < PF_SQ; ++q) {
            const int f = f0 + q * PF_WARPS * 32, i = f / rk, j = f - i * rk;
            src[q] = f < PF_ROWS * rk && i < rows && j < r ? tmp + ((u64)p * n + rc.start + i) * rmax + j : nullptr;
            sum[q] = 0.f;
        }
        for (int cc = 0; cc < ks; cc += PF_SC) {
            float v[PF_SQ][PF_SC];
#pragma unroll
            for (int q = 0; q < PF_SQ; ++q)
#pragma unroll
                for (int c = 0; c < PF_SC; ++c) v[q][c] = src[q] && cc + c < ks ? src[q][(cc + c) * cstride] : 0.f;
#pragma unroll
            for (int q = 0; q < PF_SQ; ++q)
#pragma unroll
                for (int c = 0; c < PF_SC; ++c) sum[q] += v[q][c];
        }
#pragma unroll
        for (int q = 0; q < PF_SQ; ++q) {
            const int f = f0 + q * PF_WARPS * 32, i = f / rk, j = f - i * rk;
            if (f < PF_ROWS * rk) {
                const T hi = from_f(sum[q]);
                ts[i][j] = hi;
                tl[i][j] = from_f(sum[q] - to_f(hi));
            }
        }
    }
    __syncthreads();
    const int wrows = rows - 16 * rg;
    if (wrows <= 0) return;
    const int cp = part_of(p, c0, c1, c2);
    const T* B = reinterpret_cast<const T*>(ref.b);
    const bool bvec = r % 4 == 0 && ref.b % 8 == 0;  // 8-byte loads of B's rows (16-bit elements)
    const u32x4 zero{0u, 0u, 0u, 0u};
    // The warp's 128 columns in two passes of 64 (a loop, so that one pass's registers serve both and more
    // blocks fit on a multiprocessor).
#pragma unroll 1
    for (int pass = 0; pass < 2; ++pass) {
        const int cw = first + 128 * ch + 64 * pass;  // the pass's first column in the part
        if (cw >= ref.cols) return;
        const int left = ref.cols - cw - 16 * t;  // this lane's columns left in the part from its first
        const bool yvec = out_dim % VEC == 0 && (cp + cw) % VEC == 0 && (u64)y % 16 == 0;
        T* y0 = y + (u64)(rc.start + 16 * rg + g) * out_dim + cp + cw + 16 * t;
        T* y8 = y0 + (u64)8 * out_dim;
        u32x4 ya[2], yb[2];
#pragma unroll
        for (int v = 0; v < 2; ++v) {
            ya[v] = g < wrows ? lora_ld8(y0 + 8 * v, left - 8 * v, yvec, false) : zero;
            yb[v] = g + 8 < wrows ? lora_ld8(y8 + 8 * v, left - 8 * v, yvec, false) : zero;
        }
        float acc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
        for (int k = 0; k < rk; k += 16) {
            const int j = k + 4 * t;
            u32 a[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const T* tr = h == 0 ? &ts[16 * rg + g][j] : &tl[16 * rg + g][j];
                const T* tr8 = tr + 8 * PF_LDT;
                a[h][0] = *reinterpret_cast<const u32*>(tr);
                a[h][1] = *reinterpret_cast<const u32*>(tr8);
                a[h][2] = *reinterpret_cast<const u32*>(tr + 2);
                a[h][3] = *reinterpret_cast<const u32*>(tr8 + 2);
            }
            u32 b[8][2];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int col = cw + 16 * (g / 2) + 2 * nt + g % 2;  // n-tile nt's column g, in the part
                b[nt][0] = b[nt][1] = 0u;
                if (col < ref.cols && j < r) {
                    const T* br = B + (u64)col * r + j;
                    if (bvec) {
                        const u32x2 w = *reinterpret_cast<const u32x2*>(br);
                        b[nt][0] = w.x;
                        b[nt][1] = w.y;
                    } else {
                        b[nt][0] = pack(br[0], j + 1 < r ? br[1] : (T)0);
                        b[nt][1] = pack(j + 2 < r ? br[2] : (T)0, j + 3 < r ? br[3] : (T)0);
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                mma_16816(acc[nt], a[0], b[nt]);
                mma_16816(acc[nt], a[1], b[nt]);
            }
        }
        // acc[nt] = {D[g][16t + 2nt], D[g][16t + 2nt + 1], D[g + 8][same two]}: lane t's elements 2nt and
        // 2nt + 1 of its vector nt / 4; each vector rounded by to_vec (one pack_f a pair).
#pragma unroll
        for (int v = 0; v < 2; ++v) {
            const T* ea = reinterpret_cast<const T*>(&ya[v]);
            const T* eb = reinterpret_cast<const T*>(&yb[v]);
            float fa[8], fb[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float* d = acc[4 * v + e / 2];
                fa[e] = to_f(ea[e]) + ref.scale * d[e % 2];
                fb[e] = to_f(eb[e]) + ref.scale * d[2 + e % 2];
            }
            ya[v] = to_vec(fa);
            yb[v] = to_vec(fb);
            if (g < wrows) lora_st8(y0 + 8 * v, ya[v], left - 8 * v, yvec);
            if (g + 8 < wrows) lora_st8(y8 + 8 * v, yb[v], left - 8 * v, yvec);
        }
    }
}

#define LORA_SHRINK_PF(NT, NAME)                                                                                 \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)                                                 \
        NAME(float* __restrict__ tmp, const T* __restrict__ x, const LoraRec* __restrict__ recs, int layer, int t0, \
             int t1, int t2, int n, int pstride, int in_dim, int rmax, int kc) {                               \
        lora_shrink_pf<NT>(tmp, x, recs, layer, t0, t1, t2, n, pstride, in_dim, rmax, kc);                     \
    }
#else
// f32 storage has no tensor-core path: the host never launches these.
#define LORA_SHRINK_PF(NT, NAME)                                                                                \
    extern "C" __global__ void NAME(float* tmp, const T* x, const LoraRec* recs, int layer, int t0, int t1, int t2, \
                                    int n, int pstride, int in_dim, int rmax, int kc) {}
extern "C" __global__ void lora_expand_pf(T* y, const float* tmp, const LoraRec* recs, int layer, int t0, int t1,
                                          int t2, int c0, int c1, int c2, int e1, int e2, int n, int pstride,
                                          int out_dim, int rmax, int ks) {}
#endif
LORA_SHRINK_PF(2, lora_shrink_pf2)
LORA_SHRINK_PF(4, lora_shrink_pf4)
LORA_SHRINK_PF(8, lora_shrink_pf8)
