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
// intermediate rows are p * n + row. A pair the adapter does not have (a null A) is skipped.
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
    int len;    // at most BG_ROWS
};

__device__ __forceinline__ int part_of(int p, int v0, int v1, int v2) { return p == 0 ? v0 : (p == 1 ? v1 : v2); }

extern "C" __global__ void bgmv_shrink_ix(float* __restrict__ tmp, const T* __restrict__ x,
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

extern "C" __global__ void bgmv_expand_ix(T* __restrict__ y, const float* __restrict__ tmp,
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
