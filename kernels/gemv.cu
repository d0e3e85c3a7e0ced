// Skinny GEMM for decode: y[m, n] = x[m, k] . w[n, k]^T for m <= 4 rows, where the time is reading w once.
// cuBLAS reaches 29-58% of the copy bandwidth on the q/k/v/o shapes at one row (bench/NOTES.md); this
// keeps every lane's loads of w in flight together instead:
//   - a warp owns GEMV_COLS consecutive outputs (rows of w) and walks k with 16-byte loads, GEMV_UNROLL
//     vectors per row of w per lane issued before any is used;
//   - w is read with non-caching loads (each element is used once); x comes through the L1, where every
//     warp of the SM finds it;
//   - sums are f32 in a fixed order (lane-strided, then a shuffle tree), rounded once to T.
// The host checks k % VEC == 0 and 16-byte aligned rows; m = 1..4 pick gemv_1..gemv_4. Grid: one block
// of GEMV_WARPS warps per GEMV_WARPS * GEMV_COLS outputs.
#define GEMV_WARPS 4
#define GEMV_COLS 2
#define GEMV_UNROLL 4

// acc += dot(the VEC elements in w, xs[0 .. VEC)).
__device__ __forceinline__ float dot_vec(const u32x4& w, const float* xs, float acc) {
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc += to_f(e[i]) * xs[i];
    return acc;
}

template <int M>
__device__ __forceinline__ void gemv_rows(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int n,
                                          int k) {
    const int lane = threadIdx.x % 32;
    const int n0 = (blockIdx.x * GEMV_WARPS + threadIdx.x / 32) * GEMV_COLS;
    const bool live = n0 < n;
    const T* wr[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) wr[c] = w + (u64)min(n0 + c, n - 1) * k;  // past n: a repeat, not stored
    float acc[M][GEMV_COLS];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) acc[m][c] = 0.f;
    constexpr int STEP = 32 * VEC;
    int kk = lane * VEC;
    // The first vectors of w are loaded before waiting for the kernel ahead (no kernel writes weights): under
    // programmatic dependent launch they stream in while that kernel finishes.
    u32x4 wv[GEMV_UNROLL][GEMV_COLS];
    bool have = live && kk + (GEMV_UNROLL - 1) * STEP < k;
    if (have) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) wv[u][c] = load_stream(wr[c] + kk + u * STEP);
    }
    pdl_enter();
    if (!live) return;
    for (; kk + (GEMV_UNROLL - 1) * STEP < k; kk += GEMV_UNROLL * STEP) {
        if (!have) {
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
                for (int c = 0; c < GEMV_COLS; ++c) wv[u][c] = load_stream(wr[c] + kk + u * STEP);
        }
        have = false;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xs[VEC];
                load_n<VEC>(x + (u64)m * k + kk + u * STEP, xs);
#pragma unroll
                for (int c = 0; c < GEMV_COLS; ++c) acc[m][c] = dot_vec(wv[u][c], xs, acc[m][c]);
            }
        }
    }
    for (; kk < k; kk += STEP) {
        u32x4 wt[GEMV_COLS];
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) wt[c] = load_stream(wr[c] + kk);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xs[VEC];
            load_n<VEC>(x + (u64)m * k + kk, xs);
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) acc[m][c] = dot_vec(wt[c], xs, acc[m][c]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            const float v = warp_sum(acc[m][c]);
            if (lane == 0 && n0 + c < n) y[(u64)m * n + n0 + c] = from_f(v);
        }
}

// gemv_1 .. gemv_4: one entry point per row count.
#define GEMV_ENTRY(M)                                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                            \
        gemv_##M(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int n, int k) {       \
        gemv_rows<M>(y, x, w, n, k);                                                                          \
    }
GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(3)
GEMV_ENTRY(4)
