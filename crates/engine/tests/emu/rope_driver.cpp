// Driver for crates/engine/tests/attention_emulated.rs: prompt queries rotated inside the tensor-core prefill
// kernel (LORAX_CUDA_PREFILL_ROPE=1) end to end under the CPU emulation, bf16. rope_kv_write (kernels/
// elementwise.cu) runs twice on one batch laid out as the engine lays out a mixed step (three decode rows,
// then prompts, one after a cached prefix, one ending mid-tile): once writing every query, once leaving
// the prompt rows' queries to the prefill kernel and writing their (cos, sin) table instead, both with
// its 16-byte path and its scalar one (inv_freq off 16-byte alignment). The second must write the same keys,
// values and decode rows' queries, no prompt query and no table row of a decode row (both stay at their
// poison); the prefill kernel (kernels/prefill.cu), given the first run's queries or the unrotated q/k/v
// rows with the table, must give the same output bit for bit, and every prompt row's output.
#include "cuemu.h"
#define LORAX_DTYPE_BF16
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include "common.cuh"
#include "elementwise.cu"
#include "prefill.cu"

typedef void (*Kern)(PREFILL_PARAMS);

template <int HD>
int run(const char* name, Kern kern, int warps, int rg, bool scalar, unsigned seed) {
    const int heads = 8, kvh = 2, bs = 16, bm = 16 * rg * warps, decode_rows = 3;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    // (cached tokens before, new tokens): three decode rows, then prompts of 20, 45 after 37 cached keys and 16.
    const std::vector<std::pair<int, int>> seqs = {{40, 1}, {7, 1}, {30, 1}, {0, 20}, {37, 45}, {5, 16}};
    int nblocks = 0, n = 0;
    for (auto [before, len] : seqs) nblocks += (before + len + bs - 1) / bs, n += len;
    const size_t qw = (size_t)heads * HD, kvw = (size_t)kvh * HD, width = qw + 2 * kvw;
    std::vector<T> qkv(n * width), K((size_t)nblocks * bs * kvw), V(K.size());
    for (auto& x : qkv) x = from_f(U(rng));
    for (auto& x : K) x = from_f(U(rng));
    for (auto& x : V) x = from_f(U(rng));
    std::vector<u32> tables, positions, slots;
    std::vector<PrefillTile> tiles;
    int row = 0, next_block = 0;
    for (size_t si = 0; si < seqs.size(); ++si) {
        auto [before, len] = seqs[si];
        const int off = tables.size();
        for (int b = 0; b < (before + len + bs - 1) / bs; ++b) tables.push_back(next_block++);
        for (int i = 0; i < len; ++i) {
            const int p = before + i;
            positions.push_back(p);
            slots.push_back(tables[off + p / bs] * bs + p % bs);
        }
        if ((int)si >= decode_rows)
            for (int t = 0; t < len; t += bm) tiles.push_back({row + t, std::min(bm, len - t), before + t, off});
        row += len;
    }
    // 16-byte aligned frequencies take rope_kv_write's vector path; one float off, its scalar path.
    alignas(16) static float freq_buf[HD / 2 + 4];
    float* inv_freq = freq_buf + (scalar ? 1 : 0);
    for (int i = 0; i < HD / 2; ++i) inv_freq[i] = std::pow(10000.f, -2.f * i / HD);
    const T poison = (T)0x7fc1;
    std::vector<T> q1(n * qw, poison), q2(n * qw, poison), K1 = K, V1 = V, K2 = K, V2 = V;
    std::vector<float> tab((size_t)n * HD, NAN);
    emu_launch(n, 128, [&] {
        rope_kv_write(q1.data(), K1.data(), V1.data(), qkv.data(), positions.data(), inv_freq, slots.data(), qw,
                      kvw, HD, n, nullptr);
    });
    emu_launch(n, 128, [&] {
        rope_kv_write(q2.data(), K2.data(), V2.data(), qkv.data(), positions.data(), inv_freq, slots.data(), qw,
                      kvw, HD, decode_rows, tab.data());
    });
    int bad = 0;
    if (memcmp(K1.data(), K2.data(), K1.size() * sizeof(T)) || memcmp(V1.data(), V2.data(), V1.size() * sizeof(T)))
        printf("%s: keys or values differ\n", name), ++bad;
    if (memcmp(q1.data(), q2.data(), decode_rows * qw * sizeof(T)))
        printf("%s: decode rows' queries differ\n", name), ++bad;
    size_t written = 0, tab_wrong = 0;
    for (size_t e = decode_rows * qw; e < q2.size(); ++e) written += q2[e] != poison;
    for (int r = 0; r < n; ++r)
        for (int e = 0; e < HD; ++e) tab_wrong += (r < decode_rows) != std::isnan(tab[(size_t)r * HD + e]);
    if (written || tab_wrong)
        printf("%s: %zu prompt query elements written, %zu table entries wrong\n", name, written, tab_wrong), ++bad;
    const float scale = 1.f / std::sqrt((float)HD);
    std::vector<T> o1(n * qw, poison), o2(n * qw, poison);
    emu_launch(tiles.size() * heads, 32 * warps, [&] {
        kern(o1.data(), q1.data(), K1.data(), V1.data(), tiles.data(), tables.data(), heads, kvh, bs, scale, qw,
             nullptr);
    });
    emu_launch(tiles.size() * heads, 32 * warps, [&] {
        kern(o2.data(), qkv.data(), K2.data(), V2.data(), tiles.data(), tables.data(), heads, kvh, bs, scale,
             width, tab.data());
    });
    size_t differ = 0, unwritten = 0;
    for (size_t e = decode_rows * qw; e < o1.size(); ++e) differ += o1[e] != o2[e], unwritten += o2[e] == poison;
    printf("%s%s: %zu of %zu prompt outputs differ, %zu unwritten\n", name, scalar ? " (scalar rope_kv_write)" : "",
           differ, o1.size() - decode_rows * qw, unwritten);
    return bad + (differ != 0) + (unwritten != 0);
}

int main() {
    int bad = 0;
    for (bool scalar : {false, true}) {
        bad += run<128>("prefill_attention_128_w8n64", prefill_attention_128_w8n64, 8, 1, scalar, 1);
        bad += run<128>("prefill_attention_128_w2r2n32", prefill_attention_128_w2r2n32, 2, 2, scalar, 2);
        bad += run<64>("prefill_attention_64", prefill_attention_64, 4, 1, scalar, 3);
        bad += run<64>("prefill_attention_64_w4r2n32", prefill_attention_64_w4r2n32, 4, 2, scalar, 4);
    }
    printf(bad ? "FAIL %d\n" : "OK\n", bad);
    return bad != 0;
}
