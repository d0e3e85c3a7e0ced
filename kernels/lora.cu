// SGMV (segmented gather matrix-vector, Punica's design) for batched LoRA:
//   y[rows of segment s] += scale_s * (x[rows] . A_s^T) . B_s^T
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
        if (o < outs && sub == 0) atomicAdd(&tmp[(u64)(sg.start + row0 + o / r) * rmax + o % r], acc);
    }
}

// Dynamic shared memory: ot * (rmax + 1) + rt * rmax floats.
extern "C" __global__ void sgmv_expand(T* __restrict__ y, const float* __restrict__ tmp,
                                       const LoraSeg* __restrict__ segs, int out_dim, int rmax, int ot, int rt) {
    extern __shared__ float sm[];
    const LoraSeg sg = segs[blockIdx.x];
    const int row0 = blockIdx.z * rt;
    const int c0 = blockIdx.y * ot;
    if (row0 >= sg.len || c0 >= out_dim) return;
    const int rows = min(rt, sg.len - row0);
    const int cl = min(ot, out_dim - c0);
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
        t_s[f] = tmp[(u64)(sg.start + row0 + f / r) * rmax + f % r];
    __syncthreads();

    for (int o = threadIdx.x; o < rows * cl; o += blockDim.x) {
        const int i = o / cl, c = o % cl;
        const float* ts = t_s + i * r;
        const float* bs = b_s + c * ld;
        float acc = 0.f;
        for (int j = 0; j < r; ++j) acc += ts[j] * bs[j];
        T* yp = y + (u64)(sg.start + row0 + i) * out_dim + c0 + c;
        *yp = from_f(to_f(*yp) + sg.scale * acc);
    }
}
