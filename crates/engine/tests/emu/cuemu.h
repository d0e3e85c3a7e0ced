// A small CPU emulation of the CUDA features kernels/sampling.cu uses, so its logic can be checked on a
// machine without a GPU (crates/engine/tests/sampling_emulated.rs): one std::thread per CUDA thread,
// blocks one after another, __syncthreads as a block barrier, warp shuffles, ballots and match_any
// through a per-warp exchange behind a 32-thread barrier, atomics as GCC atomics. Build with
// -std=c++20 -fno-strict-aliasing -ffp-contract=off (the kernels reinterpret loads, and CUDA's
// intrinsics round every step).
#pragma once
// Kernels check this to take their emulated paths (common.cuh: the tensor-core mma).
#define LORAX_EMU
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <strings.h>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __host__
#define __shared__ static

struct dim3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3_ threadIdx;
inline dim3_ blockIdx, blockDim;

struct WarpX { std::barrier<> bar{32}; uint64_t slot[32]; };
inline std::barrier<>* g_block;
inline WarpX* g_warps;

inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_warps[threadIdx.x >> 5].bar.arrive_and_wait(); }

template <typename V> inline uint64_t to_bits(V v) { uint64_t b = 0; memcpy(&b, &v, sizeof(V)); return b; }
template <typename V> inline V from_bits(uint64_t b) { V v; memcpy(&v, &b, sizeof(V)); return v; }
inline uint64_t exch(uint64_t mine, int src) {
    const int lane = threadIdx.x & 31;
    WarpX& w = g_warps[threadIdx.x >> 5];
    w.slot[lane] = mine;
    w.bar.arrive_and_wait();
    const uint64_t r = w.slot[src];
    w.bar.arrive_and_wait();
    return r;
}
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int o) { return from_bits<V>(exch(to_bits(v), (threadIdx.x & 31) ^ o)); }
template <typename V> inline V __shfl_up_sync(unsigned, V v, int o) {
    const int lane = threadIdx.x & 31;
    return from_bits<V>(exch(to_bits(v), lane >= o ? lane - o : lane));
}
template <typename V> inline V __shfl_sync(unsigned, V v, int src) { return from_bits<V>(exch(to_bits(v), src)); }
// Every lane's value (all 32 lanes of the warp take part).
inline void gather(uint64_t mine, uint64_t all[32]) {
    WarpX& w = g_warps[threadIdx.x >> 5];
    w.slot[threadIdx.x & 31] = mine;
    w.bar.arrive_and_wait();
    memcpy(all, w.slot, sizeof(w.slot));
    w.bar.arrive_and_wait();
}
// The lanes whose value satisfies `pred`, as a mask.
template <typename P> inline unsigned lanes_where(uint64_t mine, P pred) {
    uint64_t all[32];
    gather(mine, all);
    unsigned m = 0;
    for (int i = 0; i < 32; ++i) m |= (pred(all[i]) ? 1u : 0u) << i;
    return m;
}
inline unsigned __ballot_sync(unsigned, bool p) { return lanes_where(p, [](uint64_t v) { return v != 0; }); }
inline unsigned __match_any_sync(unsigned, unsigned v) { return lanes_where(v, [v](uint64_t o) { return o == v; }); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline float __uint_as_float(unsigned u) { return from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return (unsigned)to_bits(f); }
inline float __int_as_float(int i) { return from_bits<float>((uint32_t)i); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned long long __double2ull_rn(double x) { return (unsigned long long)std::nearbyint(x); }
inline int __ffs(int x) { return ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
    uint32_t* u = reinterpret_cast<uint32_t*>(p);
    uint32_t old = __atomic_load_n(u, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(u, &old, (uint32_t)to_bits(from_bits<float>(old) + v), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return from_bits<float>(old);
}
using std::exp;
using std::log;
using std::fmaxf;
inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }

inline void emu_launch(unsigned grid, unsigned threads, const std::function<void()>& body) {
    blockDim.x = threads;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::barrier<> block(threads);
        std::unique_ptr<WarpX[]> warps(new WarpX[threads / 32]);
        g_block = &block;
        g_warps = warps.get();
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([t, &body] { threadIdx.x = t; body(); });
        for (auto& t : ts) t.join();
    }
}
