// Driver for crates/engine/tests/attention_emulated.rs: the paged decode-attention kernels of
// kernels/attention.cu (bf16; the tensor-core `_tc` kernels through common.cuh's emulated mma) under the
// CPU emulation of cuemu.h, against a double-precision reference, on
// scattered block tables, rows of no sequence (-1) and of another kernel (-2), unsplit and split contexts
// (attn_reduce merging the splits). Prints each kernel's largest error; exits non-zero on any over 2e-2
// (bf16 output rounding is about 2e-3 here). The test writes attention.cu with `alignas(16) __shared__`
// (GCC wants the alignment first once __shared__ is `static`).
#include "cuemu.h"
#define LORAX_DTYPE_BF16
#include <cstdio>
#include <cstring>
#include <random>
#include "common.cuh"
#include "attention.cu"

typedef void (*Kern)(T*, float*, float*, const T*, const T*, const T*, const RowInfo*, const u32*, int, int, int, int, float, int, int, u32*);
typedef void (*RopeKern)(T*, float*, float*, const T*, const T*, const T*, const RowInfo*, const u32*, int, int, int, int, float, int, int, u32*,
                         int, const float*, const u32*, T*, T*);

// Every kernel and split on one cache of `bs`-token blocks; the number of failed checks.
static int run_block_size(const int bs) {
    printf("block size %d\n", bs);
    const int HD = 128, heads = 8, kvh = 2;
    std::vector<int> ctx = {1, 15, 16, 17, 33, 64, 65, 100, 200, 513, -1, -2};
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    int nblocks = 0;
    for (int c : ctx) if (c > 0) nblocks += (c + bs - 1) / bs;
    nblocks += 3;
    std::vector<int> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    const size_t slots = (size_t)nblocks * bs, kvw = kvh * HD;
    std::vector<T> K(slots * kvw), V(slots * kvw), Q(ctx.size() * heads * HD);
    for (auto& x : K) x = from_f(U(rng));
    for (auto& x : V) x = from_f(U(rng));
    for (auto& x : Q) x = from_f(2.f * U(rng));
    std::vector<RowInfo> rows;
    std::vector<u32> tables;
    int next = 0;
    for (int c : ctx) {
        if (c <= 0) { rows.push_back({c, 0}); continue; }
        rows.push_back({c - 1, (int)tables.size()});
        for (int b = 0; b < (c + bs - 1) / bs; ++b) tables.push_back(perm[next++]);
    }
    const int n = rows.size();
    // Slots no context reaches (the spare blocks, the tails of last blocks) hold NaN: a kernel that reads
    // past a context leaks NaN into its output.
    std::vector<bool> used(slots, false);
    for (const RowInfo& ri : rows)
        for (int t = 0; t <= ri.pos; ++t) used[(size_t)tables[ri.table + t / bs] * bs + t % bs] = true;
    for (size_t sl = 0; sl < slots; ++sl)
        if (!used[sl])
            for (size_t e = 0; e < kvw; ++e) K[sl * kvw + e] = V[sl * kvw + e] = (T)0x7fc1;
    const float scale = 1.f / std::sqrt((float)HD);
    // Reference (double) of queries Qx over the caches Kx, Vx.
    auto reference = [&](const std::vector<T>& Qx, const std::vector<T>& Kx, const std::vector<T>& Vx) {
        std::vector<double> ref(n * heads * HD, 0.0);
        for (int r = 0; r < n; ++r) {
            if (rows[r].pos < 0) continue;
            const int len = rows[r].pos + 1;
            for (int h = 0; h < heads; ++h) {
                const int kh = h / (heads / kvh);
                std::vector<double> s(len);
                double mx = -1e300;
                for (int t = 0; t < len; ++t) {
                    const size_t slot = (size_t)tables[rows[r].table + t / bs] * bs + t % bs;
                    double d = 0;
                    for (int e = 0; e < HD; ++e) d += (double)to_f(Qx[(r * heads + h) * HD + e]) * to_f(Kx[slot * kvw + kh * HD + e]);
                    s[t] = d * scale; mx = std::max(mx, s[t]);
                }
                double sum = 0;
                for (int t = 0; t < len; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
                for (int t = 0; t < len; ++t) {
                    const size_t slot = (size_t)tables[rows[r].table + t / bs] * bs + t % bs;
                    for (int e = 0; e < HD; ++e) ref[(r * heads + h) * HD + e] += s[t] / sum * to_f(Vx[slot * kvw + kh * HD + e]);
                }
            }
        }
        return ref;
    };
    const std::vector<double> ref = reference(Q, K, V);
    // fused: the splits count themselves done and the last merges them (no attn_reduce); the counters must
    // be zero again afterwards, ready for the next launch.
    auto run = [&](Kern k, int maxg, int cps, int splits, bool fused) {
        std::vector<T> out(n * heads * HD, (T)0x7fc1);
        std::vector<float> po((size_t)n * heads * splits * HD, NAN), pml((size_t)n * heads * splits * 2, NAN);
        const int hchunks = (heads / kvh + maxg - 1) / maxg;
        std::vector<u32> counters((size_t)n * kvh * hchunks, 0u);
        for (int z = 0; z < splits; ++z)
            for (int y = 0; y < kvh * hchunks; ++y) {
                emu_launch(n, 128, [&] {
                    blockIdx.y = y; blockIdx.z = z;
                    k(out.data(), po.data(), pml.data(), Q.data(), K.data(), V.data(), rows.data(), tables.data(), heads, kvh, bs, 0, scale, cps, splits, fused ? counters.data() : nullptr);
                });
            }
        if (splits > 1 && !fused)
            for (int h = 0; h < heads; ++h) {
                blockIdx.y = h;
                emu_launch(n, 128, [&] { blockIdx.y = h; attn_reduce(out.data(), po.data(), pml.data(), rows.data(), heads, HD, 0, cps, splits); });
            }
        for (u32 c : counters)
            if (c != 0) {
                printf("a split counter was left at %u\n", c);
                out.assign(out.size(), (T)0x7fc1);  // fails the check
                break;
            }
        return out;
    };
    int bad = 0;
    auto check = [&](const char* name, const std::vector<T>& o) {
        double worst = 0;
        for (int r = 0; r < n; ++r) {
            if (rows[r].pos == -2) continue;
            for (int i = 0; i < heads * HD; ++i) {
                const double err = std::fabs(to_f(o[r * heads * HD + i]) - ref[r * heads * HD + i]);
                worst = std::isnan(err) ? INFINITY : std::max(worst, err);
            }
        }
        printf("%-40s max abs err %.3g\n", name, worst);
        if (!(worst < 2e-2)) bad++;
    };
    // GQA 4 as one block of 4 heads, two blocks of 2, and a block of up to 8 holding 4.
    struct { const char* name; Kern k; int maxg; } ks[] = {
        {"paged_attention_128_4_l8", paged_attention_128_4_l8, 4},
        {"paged_attention_128_2_l8", paged_attention_128_2_l8, 2},
        {"paged_attention_128_8_l8", paged_attention_128_8_l8, 8},
        {"paged_attention_128_4_tc", paged_attention_128_4_tc, 4}, {"paged_attention_128_2_tc", paged_attention_128_2_tc, 2},
        {"paged_attention_128_8_tc", paged_attention_128_8_tc, 8},
    };
    // Unsplit (the fixed chunk count of graph-captured steps), 2 chunks per split, 1 chunk per split, and
    // more splits than any row needs (split_plan gives a small batch a wave's worth whatever its contexts:
    // the splits past a row's own return at once).
    for (auto [cps, splits] : {std::pair{1 << 24, 1}, std::pair{2, 5}, std::pair{1, 9}, std::pair{1, 16}}) {
        for (auto& k : ks) {
            char nm[96];
            for (bool fused : {false, true}) {
                if (fused && splits == 1) continue;
                snprintf(nm, sizeof nm, "%s, %d split(s)%s", k.name, splits, fused ? ", merged in-kernel" : "");
                check(nm, run(k.k, k.maxg, cps, splits, fused));
            }
        }
    }

    // The `_tcr` kernels (rope_kv_write inside): q is the fused q/k/v projection; each row's new token's key
    // is rotated and written with its value to the row's slot (one row's slot is 0xffffffff: nothing
    // written), and the walk takes the new token from shared memory: its cache slot holds NaN before the
    // launch, so reading it there would show. Reference: the rotation in float as rope_kv_write computes
    // it, rounded to T, then the double attention above over the cache with the new token in place.
    {
        const int qkvw = (heads + 2 * kvh) * HD;
        std::vector<float> inv_freq(HD / 2);
        for (int i = 0; i < HD / 2; ++i) inv_freq[i] = 1.f / std::pow(10000.f, 2.f * i / HD);
        std::vector<T> QKV((size_t)n * qkvw);
        for (auto& x : QKV) x = from_f(U(rng));
        std::vector<u32> slot_of(n, 0xffffffffu);
        std::vector<T> Kr = K, Vr = V, Qr(Q.size(), from_f(0.f));
        std::vector<T> K0 = K, V0 = V;  // the cache before the launch (new tokens' slots NaN)
        int skipped = -1;
        for (int r = 0; r < n; ++r) {
            if (rows[r].pos < 0) continue;
            const int pos = rows[r].pos;
            const size_t sl = (size_t)tables[rows[r].table + pos / bs] * bs + pos % bs;
            if (skipped < 0 && pos == 16) skipped = r;  // the row of context 17 writes nowhere
            slot_of[r] = r == skipped ? 0xffffffffu : (u32)sl;
            const T* row = &QKV[(size_t)r * qkvw];
            auto rot = [&](const T* head, T* dst) {
                for (int i = 0; i < HD / 2; ++i) {
                    float sn, cs;
                    sincosf(inv_freq[i] * (float)pos, &sn, &cs);
                    const float a = to_f(head[i]), b = to_f(head[i + HD / 2]);
                    dst[i] = from_f(a * cs - b * sn);
                    dst[i + HD / 2] = from_f(b * cs + a * sn);
                }
            };
            for (int h = 0; h < heads; ++h) rot(row + h * HD, &Qr[((size_t)r * heads + h) * HD]);
            for (int kh = 0; kh < kvh; ++kh) {
                rot(row + (heads + kh) * HD, &Kr[sl * kvw + kh * HD]);
                for (int e = 0; e < HD; ++e) {
                    Vr[sl * kvw + kh * HD + e] = row[(heads + kvh + kh) * HD + e];
                    K0[sl * kvw + kh * HD + e] = V0[sl * kvw + kh * HD + e] = (T)0x7fc1;
                }
            }
        }
        const std::vector<double> rref = reference(Qr, Kr, Vr);
        struct { const char* name; RopeKern k; int maxg; } rks[] = {
            {"paged_attention_128_4_tcr", paged_attention_128_4_tcr, 4},
            {"paged_attention_128_8_tcr", paged_attention_128_8_tcr, 8},
        };
        for (auto [cps, splits] : {std::pair{1 << 24, 1}, std::pair{2, 5}, std::pair{1, 9}, std::pair{1, 16}}) {
            for (auto& k : rks) {
                std::vector<T> Kc = K0, Vc = V0, out(n * heads * HD, (T)0x7fc1);
                std::vector<float> po((size_t)n * heads * splits * HD, NAN), pml((size_t)n * heads * splits * 2, NAN);
                for (int z = 0; z < splits; ++z)
                    for (int y = 0; y < kvh; ++y)
                        emu_launch(n, 128, [&] {
                            blockIdx.y = y; blockIdx.z = z;
                            k.k(out.data(), po.data(), pml.data(), QKV.data(), Kc.data(), Vc.data(), rows.data(), tables.data(), heads, kvh, bs, 0,
                                scale, cps, splits, nullptr, qkvw, inv_freq.data(), slot_of.data(), Kc.data(), Vc.data());
                        });
                if (splits > 1)
                    for (int h = 0; h < heads; ++h)
                        emu_launch(n, 128, [&] { blockIdx.y = h; attn_reduce(out.data(), po.data(), pml.data(), rows.data(), heads, HD, 0, cps, splits); });
                double worst = 0;
                for (int r = 0; r < n; ++r) {
                    if (rows[r].pos == -2) continue;
                    for (int i = 0; i < heads * HD; ++i) {
                        const double err = std::fabs(to_f(out[r * heads * HD + i]) - rref[r * heads * HD + i]);
                        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
                    }
                }
                // The cache: written slots hold the rotated key and the value exactly; every other slot,
                // the skipped row's included, is as it was.
                int wrong = 0;
                for (size_t sl = 0; sl < slots; ++sl) {
                    bool written = false;
                    for (int r = 0; r < n; ++r) written = written || slot_of[r] == sl;
                    for (size_t e = 0; e < kvw; ++e) {
                        const size_t i = sl * kvw + e;
                        const T wk = written ? Kr[i] : K0[i], wv = written ? Vr[i] : V0[i];
                        if (memcmp(&Kc[i], &wk, sizeof(T)) != 0 || memcmp(&Vc[i], &wv, sizeof(T)) != 0) wrong++;
                    }
                }
                char nm[96];
                snprintf(nm, sizeof nm, "%s, %d split(s)", k.name, splits);
                printf("%-40s max abs err %.3g, %d cache elements wrong\n", nm, worst, wrong);
                if (!(worst < 2e-2) || wrong != 0 || skipped < 0) bad++;
            }
        }
    }
    return bad;
}

// Block sizes 16 (a decode step's 16 tokens in one block: one table read a step, shift and mask), 48 (the
// same by division, steps starting inside a block) and 12 (each token its own table read).
int main() {
    int bad = 0;
    for (int bs : {16, 48, 12}) bad += run_block_size(bs);
    printf(bad ? "FAIL %d\n" : "OK\n", bad);
    return bad != 0;
}
