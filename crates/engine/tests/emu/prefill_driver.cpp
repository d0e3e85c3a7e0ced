// Driver for crates/engine/tests/attention_emulated.rs: the tensor-core prefill kernels of kernels/prefill.cu
// (bf16, head sizes 64 and 128; mma.sync, ldmatrix and cp.async emulated by common.cuh and cuemu.h) against
// a double-precision causal reference: several sequences in one launch through the tile list, prompts
// shorter and longer than a 64-row tile, cached prefixes (ctx_before > 0) and scattered block tables.
// Prints each case's largest error; exits non-zero on any over 2e-2 (bf16 output rounding is about 2e-3).
#include "cuemu.h"
#define LORAX_DTYPE_BF16
#include <cstdio>
#include <random>
#include "common.cuh"
#include "prefill.cu"

typedef void (*Kern)(PREFILL_PARAMS);

template <int HD>
int check(const char* name, Kern kern, int warps, int rg, int heads, int kvh, int bs,
          std::vector<std::pair<int, int>> seqs, unsigned seed) {
    const int bm = 16 * rg * warps;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    int nblocks = 0, nrows = 0;
    for (auto [before, len] : seqs) nblocks += (before + len + bs - 1) / bs, nrows += len;
    std::vector<int> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    const size_t kvw = (size_t)kvh * HD, qw = (size_t)heads * HD;
    // Slots past the sequences' keys hold NaN: a kernel that reads them leaks NaN into the output.
    std::vector<T> K((size_t)nblocks * bs * kvw, (T)0x7fc1), V((size_t)nblocks * bs * kvw, (T)0x7fc1);
    std::vector<T> Q(nrows * qw);
    for (auto& x : Q) x = from_f(2.f * U(rng));
    std::vector<u32> tables;
    std::vector<PrefillTile> tiles;
    std::vector<int> table_of, row0_of;
    int row = 0, next = 0;
    for (auto [before, len] : seqs) {
        const int off = tables.size(), ctx = before + len;
        for (int b = 0; b < (ctx + bs - 1) / bs; ++b) tables.push_back(perm[next++]);
        for (int p = 0; p < ctx; ++p) {
            const size_t slot = (size_t)tables[off + p / bs] * bs + p % bs;
            for (size_t e = 0; e < kvw; ++e) K[slot * kvw + e] = from_f(U(rng)), V[slot * kvw + e] = from_f(U(rng));
        }
        for (int t = 0; t < len; t += bm) tiles.push_back({row + t, std::min(bm, len - t), before + t, off});
        table_of.push_back(off);
        row0_of.push_back(row);
        row += len;
    }
    const float scale = 1.f / std::sqrt((float)HD);
    std::vector<T> out(nrows * qw, (T)0x7fc1);
    // One launch of tiles x heads blocks (a block that computed the wrong tile or head would leave another's
    // output at its NaN poison).
    emu_launch((int)tiles.size() * heads, 32 * warps, [&] {
        kern(out.data(), Q.data(), K.data(), V.data(), tiles.data(), tables.data(), heads, kvh, bs, scale);
    });
    double worst = 0;
    for (size_t si = 0; si < seqs.size(); ++si) {
        auto [before, len] = seqs[si];
        for (int i = 0; i < len; ++i) {
            const int r = row0_of[si] + i, pos = before + i;
            for (int h = 0; h < heads; ++h) {
                const int kh = h / (heads / kvh);
                std::vector<double> s(pos + 1);
                double mx = -1e300, sum = 0;
                for (int t = 0; t <= pos; ++t) {
                    const size_t slot = (size_t)tables[table_of[si] + t / bs] * bs + t % bs;
                    double d = 0;
                    for (int e = 0; e < HD; ++e) d += (double)to_f(Q[r * qw + h * HD + e]) * to_f(K[slot * kvw + kh * HD + e]);
                    s[t] = d * scale;
                    mx = std::max(mx, s[t]);
                }
                for (int t = 0; t <= pos; ++t) sum += (s[t] = std::exp(s[t] - mx));
                for (int e = 0; e < HD; ++e) {
                    double o = 0;
                    for (int t = 0; t <= pos; ++t) {
                        const size_t slot = (size_t)tables[table_of[si] + t / bs] * bs + t % bs;
                        o += s[t] / sum * to_f(V[slot * kvw + kh * HD + e]);
                    }
                    const double err = std::fabs(to_f(out[r * qw + h * HD + e]) - o);
                    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
                }
            }
        }
    }
    printf("%s heads %d/%d block %d: max abs err %.3g\n", name, heads, kvh, bs, worst);
    return worst < 2e-2 ? 0 : 1;
}

int main() {
    int bad = 0;
    // One launch: a short prompt, one of several tiles, a cached prefix of 37 keys, one of 200 behind 33 rows.
    std::vector<std::pair<int, int>> seqs = {{0, 16}, {0, 130}, {37, 70}, {200, 33}};
    // Every tile shape (warps per block, row groups a warp, keys per step) the host can pick.
    const struct {
        const char* name;
        Kern k128, k64;
        int warps, rg;
    } shapes[] = {{"", prefill_attention_128, prefill_attention_64, 4, 1},
                  {"_w4n64", prefill_attention_128_w4n64, prefill_attention_64_w4n64, 4, 1},
                  {"_w8n32", prefill_attention_128_w8n32, prefill_attention_64_w8n32, 8, 1},
                  {"_w8n64", prefill_attention_128_w8n64, prefill_attention_64_w8n64, 8, 1},
                  {"_w4r2n32", prefill_attention_128_w4r2n32, prefill_attention_64_w4r2n32, 4, 2},
                  {"_w2r2n32", prefill_attention_128_w2r2n32, prefill_attention_64_w2r2n32, 2, 2}};
    for (auto& sh : shapes) {
        printf("tile%s:\n", sh.name);
        bad += check<128>("prefill_attention_128", sh.k128, sh.warps, sh.rg, 8, 2, 16, seqs, 1);
        bad += check<64>("prefill_attention_64", sh.k64, sh.warps, sh.rg, 4, 4, 16, seqs, 2);
        // Block size 4 and 12 (not a power of two: the copies' division path), a prefix of 5 and 3 keys.
        bad += check<128>("prefill_attention_128", sh.k128, sh.warps, sh.rg, 4, 1, 4, {{5, 100}, {0, 64}, {3, 200}}, 3);
        bad += check<64>("prefill_attention_64", sh.k64, sh.warps, sh.rg, 2, 1, 12, {{5, 40}, {0, 150}}, 4);
    }
    printf(bad ? "FAIL %d\n" : "OK\n", bad);
    return bad != 0;
}
