// Shared prelude of every kernel module (prepended by the Rust side before NVRTC compiles a .cu file).
//
// The storage type T is chosen per module with one define: LORAX_DTYPE_BF16, LORAX_DTYPE_F16 or
// LORAX_DTYPE_F32. Arithmetic is always f32: values are loaded with to_f and stored with from_f
// (round to nearest even). No CUDA header is included, so the module compiles without an include path.

typedef unsigned int u32;
typedef unsigned long long u64;

#if defined(LORAX_DTYPE_BF16)
typedef unsigned short T;
__device__ __forceinline__ float to_f(T v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ T from_f(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
}
#elif defined(LORAX_DTYPE_F16)
typedef unsigned short T;
__device__ __forceinline__ float to_f(T v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ T from_f(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#elif defined(LORAX_DTYPE_F32)
typedef float T;
__device__ __forceinline__ float to_f(T v) { return v; }
__device__ __forceinline__ T from_f(float f) { return f; }
#else
#error "define one of LORAX_DTYPE_BF16, LORAX_DTYPE_F16, LORAX_DTYPE_F32"
#endif

// Elements of T in one 16-byte access.
#define VEC (16 / (int)sizeof(T))

#define NEG_INF (__int_as_float(0xff800000))

struct alignas(16) u32x4 { u32 x, y, z, w; };
struct alignas(8) u32x2 { u32 x, y; };
struct alignas(16) f32x4 { float x, y, z, w; };

// Loads N consecutive elements (N * sizeof(T) bytes, aligned to that size) as f32.
template <int N>
__device__ __forceinline__ void load_n(const T* __restrict__ p, float* out) {
    constexpr int BYTES = N * (int)sizeof(T);
    if constexpr (BYTES == 16) {
        u32x4 r = *reinterpret_cast<const u32x4*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
    } else if constexpr (BYTES == 8) {
        u32x2 r = *reinterpret_cast<const u32x2*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
    } else if constexpr (BYTES == 4 && N == 2) {
        u32 r = *reinterpret_cast<const u32*>(p);
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_f(p[i]);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (every thread gets the result). Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float buf[32];
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = lane < nw ? buf[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) buf[0] = v;
    }
    __syncthreads();
    const float r = buf[0];
    __syncthreads();
    return r;
}

// Maximum over the whole block (every thread gets the result). Every thread of the block must call it.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float buf[32];
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        v = lane < nw ? buf[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) buf[0] = v;
    }
    __syncthreads();
    const float r = buf[0];
    __syncthreads();
    return r;
}
