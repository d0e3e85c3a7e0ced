// Row-wise and element-wise kernels of the decoder: embedding lookup, RMSNorm (plain and fused with the
// residual add), rotary embedding with the paged KV-cache write, SiLU-and-multiply, additions and row gathers.
// Rows are one block each (grid.x = rows); element-wise kernels use a grid-stride loop.
// Rounding follows transformers in reduced precision where it is cheap to do so (noted per kernel).

// Whether 16-byte accesses fit: every pointer 16-byte aligned and rows of whole vectors.
__device__ __forceinline__ bool vec_ok(const void* a, const void* b, const void* c, const void* d, u64 n) {
    return n % VEC == 0 && (((u64)a | (u64)b | (u64)c | (u64)d) & 15) == 0;
}

// Copies n elements (a multiple of VEC, both 16-byte aligned) with the block's threads, 16 bytes at a time.
__device__ __forceinline__ void copy_row_vec(T* __restrict__ dst, const T* __restrict__ src, int n) {
    for (int v = threadIdx.x; v < n / VEC; v += blockDim.x)
        reinterpret_cast<u32x4*>(dst)[v] = reinterpret_cast<const u32x4*>(src)[v];
}

// out[r, :] = table[ids[r], :]. The ids were checked against the vocabulary on the host.
extern "C" __global__ void embedding(T* __restrict__ out, const T* __restrict__ table, const u32* __restrict__ ids,
                                     int hidden) {
    pdl_enter();
    const u64 r = blockIdx.x;
    const T* src = table + (u64)ids[r] * hidden;
    T* dst = out + r * hidden;
    if (vec_ok(src, dst, src, dst, hidden)) {
        copy_row_vec(dst, src, hidden);
        return;
    }
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
}

// transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in f32, rounded to the storage type, then
// times the weight.
__device__ __forceinline__ void rms_norm_row(T* __restrict__ dst, const T* __restrict__ src, const T* __restrict__ w,
                                             int h, float eps) {
    float ss = 0.f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        const float v = to_f(src[c]);
        ss += v * v;
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        const float n = to_f(from_f(to_f(src[c]) * r));
        dst[c] = from_f(to_f(w[c]) * n);
    }
}

// Vectors of VEC elements a thread holds of one row in the 16-byte paths of the row kernels below (rows of up
// to ROW_NV * blockDim.x vectors: 16384 bf16 or 8192 f32 elements with 512 threads).
#define ROW_NV 4

// The same as rms_norm_row for a row whose ROW_NV * blockDim.x vectors or fewer are in `a` (thread t holds
// vectors t, t + blockDim.x, ...; `a` holds the storage-type values as f32) and 16-byte aligned: every load of
// the row was issued before the reduction, and the weight's before the sum is used (one memory latency each
// instead of one per loop turn).
__device__ __forceinline__ void rms_norm_vec(T* __restrict__ dst, const float (&a)[ROW_NV][VEC], const T* __restrict__ w,
                                             int h, float eps) {
    const int nv = h / VEC;
    float ss = 0.f;
    u32x4 wv[ROW_NV];
#pragma unroll
    for (int j = 0; j < ROW_NV; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v < nv) {
            wv[j] = reinterpret_cast<const u32x4*>(w)[v];
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss += a[j][e] * a[j][e];
        }
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
#pragma unroll
    for (int j = 0; j < ROW_NV; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v < nv) {
            const T* we = reinterpret_cast<const T*>(&wv[j]);
            float n[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) n[e] = a[j][e] * r;
            round_vec(n);
#pragma unroll
            for (int e = 0; e < VEC; ++e) n[e] *= to_f(we[e]);
            reinterpret_cast<u32x4*>(dst)[v] = to_vec(n);
        }
    }
}

// Loads the vectors of row `src` that this thread holds (see rms_norm_vec) as f32.
__device__ __forceinline__ void load_row_vec(float (&a)[ROW_NV][VEC], const T* __restrict__ src, int h) {
    u32x4 raw[ROW_NV];
#pragma unroll
    for (int j = 0; j < ROW_NV; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v < h / VEC) raw[j] = reinterpret_cast<const u32x4*>(src)[v];
    }
#pragma unroll
    for (int j = 0; j < ROW_NV; ++j) {
        const T* e = reinterpret_cast<const T*>(&raw[j]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[j][i] = threadIdx.x + j * blockDim.x < h / VEC ? to_f(e[i]) : 0.f;
    }
}

// Whether a row of h elements fits the 16-byte path of the row kernels.
__device__ __forceinline__ bool row_vec_fits(int h) { return h / VEC <= ROW_NV * (int)blockDim.x; }

extern "C" __global__ void rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w, int h,
                                    float eps) {
    pdl_enter();
    const u64 r = blockIdx.x;
    if (row_vec_fits(h) && vec_ok(out + r * h, x + r * h, w, w, h)) {
        float a[ROW_NV][VEC];
        load_row_vec(a, x + r * h, h);
        rms_norm_vec(out + r * h, a, w, h, eps);
        return;
    }
    rms_norm_row(out + r * h, x + r * h, w, h, eps);
}

// residual += x (rounded to the storage type, as the residual stream is stored), then out = RMSNorm(residual).
// Each thread re-reads only the residual elements it wrote itself, so no barrier is needed between the
// passes besides the reduction's. x's rows are `xpitch` elements apart (h, or more where the projection's GEMM
// appended a LoRA shrink's columns, lora.rs `LoraGemm`).
extern "C" __global__ void add_rms_norm(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                                        const T* __restrict__ w, int h, float eps, int xpitch) {
    pdl_enter();
    const u64 r = blockIdx.x;
    T* res = residual + r * h;
    const T* xr = x + r * (u64)xpitch;
    if (row_vec_fits(h) && vec_ok(out + r * h, res, xr, w, h)) {
        float a[ROW_NV][VEC], b[ROW_NV][VEC];
        load_row_vec(a, res, h);
        load_row_vec(b, xr, h);
#pragma unroll
        for (int j = 0; j < ROW_NV; ++j) {
            const int v = threadIdx.x + j * blockDim.x;
            if (v < h / VEC) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) a[j][e] += b[j][e];
                reinterpret_cast<u32x4*>(res)[v] = to_vec(a[j]);
                round_vec(a[j]);
            }
        }
        rms_norm_vec(out + r * h, a, w, h, eps);
        return;
    }
    for (int c = threadIdx.x; c < h; c += blockDim.x) res[c] = from_f(to_f(res[c]) + to_f(xr[c]));
    rms_norm_row(out + r * h, res, w, h, eps);
}

// The attention inputs of a fused q/k/v projection row [q_dim | kv_dim | kv_dim]: rotary embedding of the
// query and key heads (Hugging Face's rotate-half layout: element i of a head pairs with i + head_dim/2;
// the angle is inv_freq[i] * position formed in f32, as transformers does; any rope scaling is already
// folded into inv_freq), queries to q, keys and values to their cache slot (checked on the host; a padding
// row's slot is 0xffffffff: no write). Rows are `pitch` elements apart: at least q_dim + 2 * kv_dim (more where
// the projection's GEMM appended a LoRA shrink's columns, lora.rs `LoraGemm`).
extern "C" __global__ void rope_kv_write(T* __restrict__ q, T* __restrict__ k_cache, T* __restrict__ v_cache,
                                         const T* __restrict__ qkv, const u32* __restrict__ positions,
                                         const float* __restrict__ inv_freq, const u32* __restrict__ slots, int q_dim,
                                         int kv_dim, int head_dim, int pitch) {
    pdl_enter();
    const u64 r = blockIdx.x;
    const int half = head_dim / 2;
    const int heads = (q_dim + kv_dim) / head_dim;
    const float pos = (float)positions[r];
    const u64 s = slots[r];
    const T* row = qkv + r * (u64)pitch;
    const bool nowhere = s == 0xffffffffull;
    T* kd = k_cache + (nowhere ? 0 : s * kv_dim);
    T* vd = v_cache + (nowhere ? 0 : s * kv_dim);
    if (half % VEC == 0 && vec_ok(row, q + r * q_dim, kd, vd, q_dim + kv_dim) && ((u64)inv_freq & 15) == 0) {
        // 16 bytes at a time: item (head, i0) rotates elements i0 .. i0 + VEC - 1 with i0 + half ...
        const int per = half / VEC;
        for (int idx = threadIdx.x; idx < heads * per; idx += blockDim.x) {
            const int head = idx / per, i0 = (idx % per) * VEC;
            const int c = head * head_dim + i0;
            if (c >= q_dim && nowhere) continue;
            float a[VEC], b[VEC], f[VEC];
            load_n<VEC>(row + c, a);
            load_n<VEC>(row + c + half, b);
#pragma unroll
            for (int e = 0; e < VEC; e += 4) {
                const f32x4 fv = *reinterpret_cast<const f32x4*>(inv_freq + i0 + e);
                f[e] = fv.x;
                f[e + 1] = fv.y;
                f[e + 2] = fv.z;
                f[e + 3] = fv.w;
            }
            float lo[VEC], hi[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                float sn, cs;
                sincosf(f[e] * pos, &sn, &cs);
                lo[e] = a[e] * cs - b[e] * sn;
                hi[e] = b[e] * cs + a[e] * sn;
            }
            T* dst = c < q_dim ? q + r * q_dim + c : kd + (c - q_dim);
            *reinterpret_cast<u32x4*>(dst) = to_vec(lo);
            *reinterpret_cast<u32x4*>(dst + half) = to_vec(hi);
        }
        if (!nowhere) copy_row_vec(vd, row + q_dim + kv_dim, kv_dim);
        return;
    }
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int head = idx / half, i = idx % half;
        float sn, cs;
        sincosf(inv_freq[i] * pos, &sn, &cs);
        const int c = head * head_dim + i;
        if (c >= q_dim && s == 0xffffffffull) continue;
        T* dst = c < q_dim ? q + r * q_dim + c : k_cache + s * kv_dim + (c - q_dim);
        const float a = to_f(row[c]), b = to_f(row[c + half]);
        dst[0] = from_f(a * cs - b * sn);
        dst[half] = from_f(b * cs + a * sn);
    }
    const T* v = row + q_dim + kv_dim;
    if (s == 0xffffffffull) return;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) v_cache[s * kv_dim + c] = v[c];
}

// out[r, c] = silu(x[r, c]) * x[r, f + c] for the fused gate/up output x [rows, 2f]; silu's result is rounded
// to the storage type first, as transformers computes act_fn(gate_proj(x)) * up_proj(x) in that type.
// Grid: rows along y (in turns past gridDim.y), each row's columns along x (16 bytes a thread where the
// row and pointers allow it: the host sizes grid.x by vectors then).
extern "C" __global__ void silu_mul(T* __restrict__ out, const T* __restrict__ x, u64 rows, u64 f) {
    pdl_enter();
    const bool vec = vec_ok(out, x, x, x, f);
    const u64 first = ((u64)blockIdx.x * blockDim.x + threadIdx.x), stride = (u64)gridDim.x * blockDim.x;
    for (u64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* row = x + r * 2 * f;
        T* o = out + r * f;
        if (vec) {
            for (u64 c = first * VEC; c < f; c += stride * VEC) {
                float g[VEC], u[VEC];
                load_n<VEC>(row + c, g);
                load_n<VEC>(row + f + c, u);
#pragma unroll
                for (int e = 0; e < VEC; ++e) g[e] = silu_f(g[e]);
                round_vec(g);
#pragma unroll
                for (int e = 0; e < VEC; ++e) g[e] *= u[e];
                *reinterpret_cast<u32x4*>(o + c) = to_vec(g);
            }
            continue;
        }
        for (u64 c = first; c < f; c += stride) {
            const float g = to_f(row[c]);
            const float sg = to_f(from_f(silu_f(g)));
            o[c] = from_f(sg * to_f(row[f + c]));
        }
    }
}

// dst += src.
extern "C" __global__ void add_assign(T* __restrict__ dst, const T* __restrict__ src, u64 n) {
    pdl_enter();
    if (vec_ok(dst, src, dst, src, n)) {
        for (u64 v = (u64)blockIdx.x * blockDim.x + threadIdx.x; v < n / VEC; v += (u64)gridDim.x * blockDim.x) {
            float a[VEC], b[VEC];
            load_n<VEC>(dst + v * VEC, a);
            load_n<VEC>(src + v * VEC, b);
            u32x4 o;
            T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
            for (int e = 0; e < VEC; ++e) oe[e] = from_f(a[e] + b[e]);
            *reinterpret_cast<u32x4*>(dst + v * VEC) = o;
        }
        return;
    }
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[i] = from_f(to_f(dst[i]) + to_f(src[i]));
}

// y[r, c] += bias[c] for a [rows, cols] y.
extern "C" __global__ void add_bias(T* __restrict__ y, const T* __restrict__ bias, int cols) {
    pdl_enter();
    const u64 r = blockIdx.x;
    T* row = y + r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = from_f(to_f(row[c]) + to_f(bias[c]));
}

// out[i, :] = x[rows[i], :].
extern "C" __global__ void gather_rows(T* __restrict__ out, const T* __restrict__ x, const u32* __restrict__ rows,
                                       int cols) {
    pdl_enter();
    const u64 i = blockIdx.x;
    const T* src = x + (u64)rows[i] * cols;
    if (vec_ok(src, out + i * cols, src, src, cols)) {
        copy_row_vec(out + i * cols, src, cols);
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

// A 32-bit hash of (index, key): the index's halves and the key mixed, then an integer finaliser.
// crates/engine/src/dummy.rs has the same function on the host.
__device__ __forceinline__ u32 index_hash(u64 i, u32 key) {
    u32 h = ((u32)i * 0x9E3779B1u) ^ ((u32)(i >> 32) * 0x85EBCA77u) ^ (key * 0xC2B2AE3Du);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

// Fills out with values uniform in [lo, hi) from a hash of (seed, index): random data made on the device,
// for benchmarks (never zeros, which hide unwritten outputs and can run faster than real data).
extern "C" __global__ void fill_uniform(T* __restrict__ out, u64 n, u32 seed, float lo, float hi) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 h = index_hash(i, seed);
        out[i] = from_f(lo + (hi - lo) * (float)(h >> 8) * (1.0f / 16777216.0f));
    }
}

// Dummy weights (`--load-format dummy`, crates/engine/src/dummy.rs computes the same f32 values): element
// (r, c) of this rank's [n / cols, cols] slice is element (row_off + r, col_off + c) of the whole
// [*, full_cols] tensor, hashed with the tensor's key to a multiple of 2^-23 in [-1, 1) (exact), times scale.
extern "C" __global__ void fill_dummy(T* __restrict__ out, u64 n, u64 cols, u64 full_cols, u64 row_off, u64 col_off,
                                      u32 key, float scale) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cols;
        const u32 h = index_hash((row_off + r) * full_cols + col_off + (i - r * cols), key);
        const float t = (float)((int)(h >> 8) - 8388608) * (1.0f / 8388608.0f);
        out[i] = from_f(scale * t);
    }
}


// Adapter weights arrive in their file's type and are converted on the device (the host only copies
// bytes): `in` holds n values of kind 0 (f32), 1 (f16) or 2 (bf16); each is widened to f32 exactly and
// stored as T (round to nearest even, as the host's conversion).
extern "C" __global__ void convert_in(T* __restrict__ out, const void* __restrict__ in, int kind, u64 n) {
    pdl_enter();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v;
        if (kind == 0) {
            v = reinterpret_cast<const float*>(in)[i];
        } else {
            const unsigned short h = reinterpret_cast<const unsigned short*>(in)[i];
            if (kind == 1) {
                asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
            } else {
                v = __uint_as_float(((u32)h) << 16);
            }
        }
        out[i] = from_f(v);
    }
}
