// Next-token choice on the device: the twin of crates/engine/src/sampling.rs (Sampler::choose), so the
// logits never leave the GPU; a few words per row come back.
//
// One block of SAMPLE_THREADS per row. The host has already taken every decision (which warpers apply,
// the clamped top-k, top-p's threshold 1 - top_p as f32, the draw's uniform from the sequence's own
// ChaCha stream), so the kernel follows Sampler's arithmetic step by step:
//   1. the row is loaded as f32 into a scratch row (the only read of the logits);
//   2. penalties at the history's tokens: repetition (s < 0 ? s*p : min(s/p, FLT_MAX)), then
//      (s - f*count) - presence, each step rounded in f32 (no fused multiply-add);
//   3. when drawing: temperature (s / t; a t so small that the maximum leaves f32's range keeps the
//      maxima as 0 and sends the rest to -inf), top-k (the k-th largest value by a radix select on the
//      value's total-order key; values below it are dropped, ties kept), top-p (see below);
//   4. the token: argmax (first maximum; NaN counts as the maximum) or inverse-CDF sampling in index
//      order with f64 weights exp(x - max), found by a hierarchical search (block sums of 16 warp
//      segments, then one warp's scan); the log-probability x - logsumexp with f64 sums;
//   5. the top-n alternatives: the n largest by (value, lower index first), from a radix select and a
//      rank search among ties.
// Filters are never written: an entry is alive when it is not below top-k's value and not in top-p's
// removed prefix, and dead entries count as -inf everywhere.
//
// Top-p without a sort. Sampler sorts ascending (stable: ties by index), takes the f32 softmax
// (e = f32(exp(x - max)) correctly rounded, sum in f64 rounded to f32, p = e * (1/sum)), the cumulative
// sums in f64 rounded to f32, and removes every position (but the last) whose cumulative sum is at most
// the threshold: an ascending prefix. Here the masses p are summed as exact 2^-62 fixed-point integers
// per digit of the key in four 8-bit radix passes, which finds the first value group whose cumulative
// mass exceeds the threshold; within that tie group the number of removed members follows from
// base + m * p (all members share p), and which members (the lowest indices) from a rank search.
// Sums in another order than the host's differ by ~1e-16 relative; a decision can flip only when a
// cumulative sum lies that close to a rounding boundary of the threshold or of the uniform's target.

#define SAMPLE_THREADS 512
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define MAX_TOP_N 32
#define FULL_MASK 0xffffffffu
#define FLT_MAX_ 3.402823466e+38f

// SampleRow.flags
#define SAMPLE_DRAW 1u
#define SAMPLE_FORCED 2u
#define SAMPLE_TEMPERATURE 4u
#define SAMPLE_TOP_P 8u

// Fixed point of the top-p masses: 2^62 per unit probability (the masses of a row sum to about 1).
#define FIXED_SCALE 4611686018427387904.0
#define FIXED_INV (1.0 / 4611686018427387904.0)

// One row's parameters (12 words, written by crates/engine/src/backend/cuda/sampling.rs).
struct SampleRow {
    u32 row;          // the logits row to read
    u32 flags;        // SAMPLE_*
    u32 forced;       // SAMPLE_FORCED: the token whose log-probability is asked (raw logits)
    u32 top_k;        // 0: off
    float temperature;
    float top_p_thr;  // SAMPLE_TOP_P: 1 - top_p as f32
    float rep;        // repetition penalty (1: off)
    float freq;       // frequency penalty (0: off)
    float pres;       // presence penalty (0: off)
    u32 pen_start;    // this row's history: pen_tok/pen_cnt[pen_start .. pen_end)
    u32 pen_end;
    u32 top_n;        // alternatives (<= MAX_TOP_N)
};

struct SampleSmem {
    u32 mass_lo[256];  // top-p masses (fixed point) as two 32-bit halves: see mass_add
    u32 mass_hi[256];
    u32 cnt[256];
    u64 red_u[SAMPLE_WARPS];
    double red_d[SAMPLE_WARPS];
    float red_f[SAMPLE_WARPS];
    double seg_d[SAMPLE_WARPS];
    u32 seg_u[SAMPLE_WARPS];
    int range[3];
    double base_d;
    u32 base_u;
    u32 pick[4];
    u64 below;
    int found;
    int top_count;
    u32 top_idx[MAX_TOP_N];
    u32 top_key[MAX_TOP_N];
};

__device__ __forceinline__ bool finite_f(float f) { return (__float_as_uint(f) & 0x7fffffffu) < 0x7f800000u; }

// The order-preserving key of Rust's f32::total_cmp: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
__device__ __forceinline__ u32 fkey(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// argmax order (sampling.rs argmax): NaN above everything, -0 equal to +0, then the lower index.
__device__ __forceinline__ u64 amax_key(float f, int i) {
    const u32 k = (f != f) ? 0xffffffffu : fkey(f == 0.f ? 0.f : f);
    return ((u64)k << 32) | (u64)(~(u32)i);
}

__device__ __forceinline__ u64 to_fixed(float p) { return __double2ull_rn((double)p * FIXED_SCALE); }
__device__ __forceinline__ float fixed_f32(u64 v) { return (float)((double)v * FIXED_INV); }

// f32(exp(d)) correctly rounded (as the host's f32::exp), through f64.
__device__ __forceinline__ float exp_f32(float d) { return (float)exp((double)d); }

template <typename V>
__device__ __forceinline__ V warp_add(V v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

template <typename V>
__device__ __forceinline__ V warp_incl_scan(V v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const V t = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

// mass[d] += w, kept as two 32-bit halves: a 64-bit add on shared memory compiles to a compare-and-swap
// loop (ATOMS.CAST.SPIN.64), which spins when lanes contend for one bin. Each wrap of the low half adds
// its carry to the high half, so hi * 2^32 + lo is the exact sum.
__device__ __forceinline__ void mass_add(SampleSmem& sm, int d, u64 w) {
    const u32 lo = (u32)w;
    const u32 old = atomicAdd(&sm.mass_lo[d], lo);
    const u32 hi = (u32)(w >> 32) + (old + lo < old ? 1u : 0u);
    if (hi) atomicAdd(&sm.mass_hi[d], hi);
}

__device__ __forceinline__ u64 mass_get(const SampleSmem& sm, int d) {
    return ((u64)sm.mass_hi[d] << 32) + sm.mass_lo[d];
}

// Block-wide reductions in a fixed order (deterministic); every thread gets the result.
__device__ double block_add_d(double v, SampleSmem& sm) {
    v = warp_add(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sm.red_d[threadIdx.x >> 5] = v;
    __syncthreads();
    double r = sm.red_d[0];
#pragma unroll
    for (int w = 1; w < SAMPLE_WARPS; ++w) r += sm.red_d[w];
    return r;
}

__device__ float block_max_f(float v, SampleSmem& sm) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sm.red_f[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = sm.red_f[0];
#pragma unroll
    for (int w = 1; w < SAMPLE_WARPS; ++w) r = fmaxf(r, sm.red_f[w]);
    return r;
}

__device__ u64 block_max_u(u64 v, SampleSmem& sm) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 t = __shfl_xor_sync(FULL_MASK, v, o);
        v = t > v ? t : v;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sm.red_u[threadIdx.x >> 5] = v;
    __syncthreads();
    u64 r = sm.red_u[0];
#pragma unroll
    for (int w = 1; w < SAMPLE_WARPS; ++w) r = sm.red_u[w] > r ? sm.red_u[w] : r;
    return r;
}

// Calls f(i, x[i]) for every index of the row. Thread t always takes t, t + SAMPLE_THREADS, ... in that
// order (so every pass sees the same elements per thread); eight loads are issued before their uses, so
// enough are in flight to stream the row from L2.
#define ROW_UNROLL 8
template <typename F>
__device__ __forceinline__ void row_pass(const float* x, int n, F f) {
    int i = threadIdx.x;
    for (; i + (ROW_UNROLL - 1) * SAMPLE_THREADS < n; i += ROW_UNROLL * SAMPLE_THREADS) {
        float v[ROW_UNROLL];
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) v[u] = x[i + u * SAMPLE_THREADS];
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) f(i + u * SAMPLE_THREADS, v[u]);
    }
    for (; i < n; i += SAMPLE_THREADS) f(i, x[i]);
}

// row_pass over two rows at once: f(i, x[i], y[i]).
template <typename F>
__device__ __forceinline__ void row_pass2(const float* x, const float* y, int n, F f) {
    int i = threadIdx.x;
    for (; i + (ROW_UNROLL - 1) * SAMPLE_THREADS < n; i += ROW_UNROLL * SAMPLE_THREADS) {
        float v[ROW_UNROLL], w[ROW_UNROLL];
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) {
            v[u] = x[i + u * SAMPLE_THREADS];
            w[u] = y[i + u * SAMPLE_THREADS];
        }
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) f(i + u * SAMPLE_THREADS, v[u], w[u]);
    }
    for (; i < n; i += SAMPLE_THREADS) f(i, x[i], y[i]);
}

// The first index i (in index order) with w(i) > 0 whose running sum of w over 0..=i exceeds `target`,
// as Sampler's draw walks its row; when rounding leaves no such index, the last index with w > 0; -1
// when every w is 0. Ranges longer than 1024 are cut into one segment per warp, the segment holding
// the crossing is kept (block sums, one thread picks), until one warp scans what is left.
// V is double (weights) or u32 (counts: the target-th (0-based) index where w is 1).
template <typename V, typename W>
__device__ int first_crossing(int n, V target, W w, V* seg, V* base_slot, SampleSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int lo = 0, hi = n;
    V base = 0;
    while (hi - lo > 1024) {
        const int len = (((hi - lo) + SAMPLE_WARPS - 1) / SAMPLE_WARPS + 31) & ~31;
        const int s = lo + warp * len, e = min(s + len, hi);
        V acc = 0;
        int i = s + lane;
        for (; i + 96 < e; i += 128) {
            const V a = w(i), b = w(i + 32), c = w(i + 64), d = w(i + 96);
            acc += (a + b) + (c + d);
        }
        for (; i < e; i += 32) acc += w(i);
        acc = warp_add(acc);
        __syncthreads();
        if (lane == 0) seg[warp] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            V a = base, last_base = base;
            int pick = -1, last = -1;
            for (int k = 0; k < SAMPLE_WARPS; ++k) {
                if (seg[k] > 0) {
                    if (a + seg[k] > target) {
                        pick = k;
                        break;
                    }
                    last = k;
                    last_base = a;
                }
                a += seg[k];
            }
            if (pick < 0) {
                // Rounding left the target at or past the end: the last segment with weight.
                pick = last;
                a = last_base;
            }
            if (pick < 0) {
                sm.range[0] = lo;
                sm.range[1] = lo;
            } else {
                sm.range[0] = lo + pick * len;
                sm.range[1] = min(lo + (pick + 1) * len, hi);
            }
            *base_slot = a;
        }
        __syncthreads();
        lo = sm.range[0];
        hi = sm.range[1];
        base = *base_slot;
        __syncthreads();
    }
    if (warp == 0) {
        V run = base;
        int found = -1, last_pos = -1;
        for (int s = lo; s < hi && found < 0; s += 32) {
            const int i = s + lane;
            const V v = i < hi ? w(i) : (V)0;
            const V incl = warp_incl_scan(v);
            const unsigned hit = __ballot_sync(FULL_MASK, v > 0 && run + incl > target);
            const unsigned pos = __ballot_sync(FULL_MASK, v > 0);
            if (pos) last_pos = s + 31 - __clz((int)pos);
            if (hit) found = s + __ffs((int)hit) - 1;
            run += __shfl_sync(FULL_MASK, incl, 31);
        }
        if (lane == 0) sm.range[2] = found >= 0 ? found : last_pos;
    }
    __syncthreads();
    const int r = sm.range[2];
    __syncthreads();
    return r;
}

// cnt[d] = how many elements accepted by item(i, x[i], key) have (key & mask) == prefix and digit d at
// `shift`. Each thread adds runs of equal digits at once (the top digits of a row's values are few).
template <typename F>
__device__ void count_hist(const float* x, int n, u32 prefix, u32 mask, int shift, F item,
                           SampleSmem& sm) {
    for (int b = threadIdx.x; b < 256; b += SAMPLE_THREADS) sm.cnt[b] = 0;
    __syncthreads();
    int cur = -1;
    u32 acc = 0;
    row_pass(x, n, [&](int i, float v) {
        u32 key;
        if (!item(i, v, key) || (key & mask) != prefix) return;
        const int d = (key >> shift) & 255;
        if (d != cur) {
            if (acc) atomicAdd(&sm.cnt[cur], acc);
            cur = d;
            acc = 0;
        }
        ++acc;
    });
    if (acc) atomicAdd(&sm.cnt[cur], acc);
    __syncthreads();
}

// The k-th largest key (k >= 1) among the elements item(i, x[i], key) accepts, by radix descent on
// 8-bit digits. *rank: k's rank among the elements equal to that key (1-based); *total: how many were
// accepted. Returns 0 with *rank = 0 when fewer than k were accepted.
template <typename F>
__device__ u32 select_desc(const float* x, int n, u32 k, F item, SampleSmem& sm, u32* rank, u32* total) {
    u32 prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        count_hist(x, n, prefix, mask, shift, item, sm);
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x;
            const int top = 255 - 8 * lane;  // lane 0 holds the highest digits
            u32 own = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) own += sm.cnt[top - j];
            const u32 incl = warp_incl_scan(own);
            const u32 excl = incl - own;
            if (shift == 24 && lane == 31) sm.pick[3] = incl;
            const unsigned hit = __ballot_sync(FULL_MASK, excl < k && k <= incl);
            if (hit == 0) {
                if (lane == 0) sm.pick[0] = 0xffffffffu;
            } else if (lane == __ffs((int)hit) - 1) {
                u32 acc = excl;
                for (int j = 0; j < 8; ++j) {
                    const u32 c = sm.cnt[top - j];
                    if (k <= acc + c) {
                        sm.pick[0] = (u32)(top - j);
                        sm.pick[1] = k - acc;
                        break;
                    }
                    acc += c;
                }
            }
        }
        __syncthreads();
        const u32 d = sm.pick[0];
        if (shift == 24) *total = sm.pick[3];
        if (d == 0xffffffffu) {
            *rank = 0;
            __syncthreads();
            return 0;
        }
        k = sm.pick[1];
        prefix |= d << shift;
        mask |= 0xffu << shift;
        __syncthreads();
    }
    *rank = k;
    return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(u32* __restrict__ out, float* __restrict__ xs, float* __restrict__ es, const T* __restrict__ logits,
                const SampleRow* __restrict__ rows, const u32* __restrict__ pen_tok, const u32* __restrict__ pen_cnt,
                const double* __restrict__ uniforms, int n, int stride) {
    pdl_enter();
    __shared__ SampleSmem sm;
    const SampleRow p = rows[blockIdx.x];
    const int tid = threadIdx.x;
    float* x = xs + (u64)blockIdx.x * n;
    const T* src = logits + (u64)p.row * n;
    u32* o = out + (u64)blockIdx.x * stride;
    const bool draw = (p.flags & SAMPLE_DRAW) != 0;
    const bool pen = p.pen_end > p.pen_start && (p.rep != 1.f || p.freq != 0.f || p.pres != 0.f);

    // 1. The row as f32 (and its maximum, when no penalty changes it afterwards).
    float m = NEG_INF;
    if (n % VEC == 0) {
        const int nv = n / VEC;
        for (int j0 = tid; j0 < nv; j0 += 4 * SAMPLE_THREADS) {
            float v[4][VEC];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int j = j0 + u * SAMPLE_THREADS;
                if (j < nv) load_n<VEC>(src + (u64)j * VEC, v[u]);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int j = j0 + u * SAMPLE_THREADS;
                if (j >= nv) continue;
#pragma unroll
                for (int q = 0; q < VEC; q += 4) {
                    *reinterpret_cast<f32x4*>(x + (u64)j * VEC + q) = f32x4{v[u][q], v[u][q + 1], v[u][q + 2], v[u][q + 3]};
                    m = fmaxf(fmaxf(m, fmaxf(v[u][q], v[u][q + 1])), fmaxf(v[u][q + 2], v[u][q + 3]));
                }
            }
        }
    } else {
        for (int i = tid; i < n; i += SAMPLE_THREADS) {
            const float v = to_f(src[i]);
            x[i] = v;
            m = fmaxf(m, v);
        }
    }

    // 2. Penalties at the history's tokens (distinct tokens: no two threads touch one entry).
    if (pen) {
        __syncthreads();
        for (u32 j = p.pen_start + tid; j < p.pen_end; j += SAMPLE_THREADS) {
            const u32 t = pen_tok[j];
            if (t >= (u32)n) continue;
            float s = x[t];
            if (p.rep != 1.f) s = s < 0.f ? __fmul_rn(s, p.rep) : fminf(__fdiv_rn(s, p.rep), FLT_MAX_);
            if (p.freq != 0.f || p.pres != 0.f) {
                const u32 c = pen_cnt[j];
                const float presence = c > 0 ? p.pres : 0.f;
                s = __fsub_rn(__fsub_rn(s, __fmul_rn(p.freq, (float)c)), presence);
            }
            x[t] = s;
        }
        __syncthreads();
        m = NEG_INF;
        row_pass(x, n, [&](int, float v) { m = fmaxf(m, v); });
    }
    m = block_max_f(m, sm);

    // 3a. Temperature. Division by t > 0 is monotone, so the new maximum is m / t.
    if (draw && (p.flags & SAMPLE_TEMPERATURE)) {
        const float t = p.temperature;
        if (finite_f(m) && !finite_f(__fdiv_rn(m, t))) {
            row_pass(x, n, [&](int i, float v) { x[i] = v == m ? 0.f : NEG_INF; });
            m = 0.f;
        } else {
            row_pass(x, n, [&](int i, float v) { x[i] = __fdiv_rn(v, t); });
            m = __fdiv_rn(m, t);
        }
    }
    __syncthreads();

    // 3b. Top-k: the k-th largest value over the whole row (total order, as select_nth_unstable_by with
    // total_cmp); entries below it are dead.
    float kth = NEG_INF;
    if (draw && p.top_k > 0) {
        u32 rank, total;
        const u32 key = select_desc(
            x, n, p.top_k, [](int, float v, u32& k) { k = fkey(v); return true; }, sm, &rank, &total);
        kth = key_float(key);
    }
    auto alive_k = [&](float v) { return !(v < kth); };

    // 3c. Top-p: the removed prefix is every key below pkey, and the members of pkey's tie group below
    // index pcut. Off: pkey = 0 and pcut = 0 remove nothing.
    u32 pkey = 0;
    int pcut = 0;
    if (draw && (p.flags & SAMPLE_TOP_P) && finite_f(m)) {
        float* e = es + (u64)blockIdx.x * n;
        double s = 0.0;
        row_pass(x, n, [&](int i, float v) {
            const float ei = alive_k(v) ? exp_f32(__fsub_rn(v, m)) : 0.f;
            e[i] = ei;
            s += (double)ei;
        });
        const float sum = (float)block_add_d(s, sm);
        if (finite_f(sum)) {  // a NaN logit makes the host's probabilities NaN: nothing is removed
            const float inv = __fdiv_rn(1.f, sum);
            const float thr = p.top_p_thr;
            u32 prefix = 0, mask = 0;
            u64 below = 0;
            bool found = true;
            u32 group = 0;
            for (int shift = 24; shift >= 0; shift -= 8) {
                for (int b = tid; b < 256; b += SAMPLE_THREADS) {
                    sm.mass_lo[b] = 0;
                    sm.mass_hi[b] = 0;
                    sm.cnt[b] = 0;
                }
                __syncthreads();
                int cur = -1;
                u64 acc = 0;
                u32 cacc = 0;
                row_pass2(x, e, n, [&](int, float v, float ev) {
                    const bool a = alive_k(v);
                    const u32 key = fkey(a ? v : NEG_INF);
                    if ((key & mask) != prefix) return;
                    const int d = (key >> shift) & 255;
                    if (d != cur) {
                        if (cacc) {
                            mass_add(sm, cur, acc);
                            atomicAdd(&sm.cnt[cur], cacc);
                        }
                        cur = d;
                        acc = 0;
                        cacc = 0;
                    }
                    acc += a ? to_fixed(__fmul_rn(ev, inv)) : 0ull;
                    ++cacc;
                });
                if (cacc) {
                    mass_add(sm, cur, acc);
                    atomicAdd(&sm.cnt[cur], cacc);
                }
                __syncthreads();
                // The first digit (ascending) whose cumulative mass, rounded to f32, exceeds the threshold.
                if (tid < 32) {
                    const int lane = tid;
                    u64 own = 0;
#pragma unroll
                    for (int j = 0; j < 8; ++j) own += mass_get(sm, 8 * lane + j);
                    const u64 incl = warp_incl_scan(own);
                    const u64 excl = incl - own;
                    const unsigned hit = __ballot_sync(FULL_MASK, fixed_f32(below + incl) > thr);
                    if (hit == 0) {
                        if (lane == 0) sm.found = 0;
                    } else if (lane == __ffs((int)hit) - 1) {
                        u64 a = below + excl;
                        for (int j = 0; j < 8; ++j) {
                            const u64 h = mass_get(sm, 8 * lane + j);
                            if (fixed_f32(a + h) > thr) {
                                sm.pick[0] = (u32)(8 * lane + j);
                                sm.pick[1] = sm.cnt[8 * lane + j];
                                break;
                            }
                            a += h;
                        }
                        sm.below = a;
                        sm.found = 1;
                    }
                }
                __syncthreads();
                found = sm.found != 0;
                if (!found) break;
                prefix |= sm.pick[0] << shift;
                mask |= 0xffu << shift;
                group = sm.pick[1];
                below = sm.below;
                __syncthreads();
            }
            __syncthreads();
            if (found) {
                // The crossing is inside pkey's tie group: its members share p, and the host's
                // cumulative sum at member j is below + (j + 1) * p. Count the removed members.
                pkey = prefix;
                const float pk = __fmul_rn(exp_f32(__fsub_rn(key_float(pkey), m)), inv);
                const double base = (double)below * FIXED_INV;
                int lo = 0, hi = (int)group;  // the first member whose cumulative sum exceeds thr
                while (lo < hi) {
                    const int mid = (lo + hi) / 2;
                    if ((float)(base + (double)(mid + 1) * (double)pk) > thr)
                        hi = mid;
                    else
                        lo = mid + 1;
                }
                const u32 removed = (u32)min(lo, (int)group - 1);
                if (removed > 0) {
                    pcut = first_crossing<u32>(
                        n, removed,
                        [&](int i) -> u32 {
                            const float v = x[i];
                            return fkey(alive_k(v) ? v : NEG_INF) == pkey ? 1u : 0u;
                        },
                        sm.seg_u, &sm.base_u, sm);
                }
            } else {
                // Every cumulative sum is at most the threshold: only the last sorted entry stays (the
                // largest key, and among its ties the highest index).
                u64 best = 0;
                row_pass(x, n, [&](int i, float v) {
                    const u64 c = ((u64)fkey(alive_k(v) ? v : NEG_INF) << 32) | (u64)(u32)i;
                    best = c > best ? c : best;
                });
                best = block_max_u(best, sm);
                pkey = (u32)(best >> 32);
                pcut = (int)(u32)best;
            }
        }
    }
    auto alive = [&](int i, float v) {
        if (!alive_k(v)) return false;
        const u32 k = fkey(v);
        return k > pkey || (k == pkey && i >= pcut);
    };

    // 4. Sum of exp(x - max) over the live entries (f64) and the argmax of the filtered row.
    double tot = 0.0;
    u64 am = 0;
    const double m64 = (double)m;
    row_pass(x, n, [&](int i, float v) {
        const bool a = alive(i, v);
        const u64 c = amax_key(a ? v : NEG_INF, i);
        am = c > am ? c : am;
        if (a) tot += exp((double)v - m64);
    });
    tot = block_add_d(tot, sm);
    am = block_max_u(am, sm);
    const double lse = (m == NEG_INF) ? -(double)__int_as_float(0x7f800000) : m64 + log(tot);
    const bool lse_finite = lse - lse == 0.0;

    u32 token;
    float lp;
    if (p.flags & SAMPLE_FORCED) {
        token = p.forced;
        lp = (float)((double)x[token] - lse);
    } else {
        token = ~(u32)am;
        if (draw && finite_f(m)) {
            const double target = uniforms[blockIdx.x] * tot;
            const int t = first_crossing<double>(
                n, target,
                [&](int i) -> double {
                    const float v = x[i];
                    return alive(i, v) ? exp((double)v - m64) : 0.0;
                },
                sm.seg_d, &sm.base_d, sm);
            if (t >= 0) token = (u32)t;
        }
        const float v = x[token];
        lp = lse_finite ? (float)((double)(alive((int)token, v) ? v : NEG_INF) - lse) : NEG_INF;
    }

    // 5. Alternatives: the top_n largest live finite entries, ties by lower index.
    int count = 0;
    if (p.top_n > 0) {
        auto cand = [&](int i, float v, u32& k) {
            k = fkey(v);
            return v > NEG_INF && alive(i, v);
        };
        u32 rank, total;
        const u32 nkey = select_desc(x, n, p.top_n, cand, sm, &rank, &total);
        int ncut = n;  // members of nkey's group up to this index are taken
        const bool all = rank == 0;  // fewer candidates than top_n: take them all
        if (!all) {
            ncut = first_crossing<u32>(
                n, rank - 1,
                [&](int i) -> u32 {
                    u32 k;
                    return cand(i, x[i], k) && k == nkey ? 1u : 0u;
                },
                sm.seg_u, &sm.base_u, sm);
        }
        if (tid == 0) sm.top_count = 0;
        __syncthreads();
        row_pass(x, n, [&](int i, float v) {
            u32 k;
            if (!cand(i, v, k)) return;
            if (all || k > nkey || (k == nkey && i <= ncut)) {
                const int slot = atomicAdd(&sm.top_count, 1);
                if (slot < MAX_TOP_N) {
                    sm.top_idx[slot] = (u32)i;
                    sm.top_key[slot] = k;
                }
            }
        });
        __syncthreads();
        count = min(sm.top_count, (int)min(p.top_n, (u32)MAX_TOP_N));
    }

    if (tid == 0) {
        // Insertion sort: larger key first, then lower index.
        for (int a = 1; a < count; ++a) {
            const u32 ki = sm.top_key[a], ii = sm.top_idx[a];
            int b = a - 1;
            while (b >= 0 && (sm.top_key[b] < ki || (sm.top_key[b] == ki && sm.top_idx[b] > ii))) {
                sm.top_key[b + 1] = sm.top_key[b];
                sm.top_idx[b + 1] = sm.top_idx[b];
                --b;
            }
            sm.top_key[b + 1] = ki;
            sm.top_idx[b + 1] = ii;
        }
        o[0] = token;
        o[1] = __float_as_uint(lp);
        o[2] = (u32)count;
        for (int a = 0; a < count; ++a) {
            const u32 i = sm.top_idx[a];
            o[3 + 2 * a] = i;
            o[4 + 2 * a] = __float_as_uint((float)((double)x[i] - lse));
        }
    }
}

// dst[slots[i]] = src[i * stride] for i < n: the tokens one sampling launch chose (its output rows, `stride`
// words each, the token first), written over the token ids of the decode step launched right after it (its
// rows grouped by adapter: sequence i's row is slots[i]), so that the step needs no round trip through the
// host (crates/engine/src/backend/cuda/graph.rs: graph_feed).
extern "C" __global__ void feed_tokens(u32* __restrict__ dst, const u32* __restrict__ src,
                                       const u32* __restrict__ slots, int n, int stride) {
    pdl_enter();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[slots[i]] = src[(u64)i * stride];
}
