// Runs kernels/sampling.cu's sample_rows under cuemu.h on inputs written by sampling_emulated.rs.
// in:  u32 vocab, logit_rows, rows, stride, 0, pen_len; f32 logits[logit_rows * vocab] (bf16 values);
//      u32 records[rows * 12]; u32 pen_tok[pen_len]; u32 pen_cnt[pen_len]; f64 uniforms[rows]
// out: u32 words[rows * stride]
#include "cuemu.h"
#include <cstdio>
#define LORAX_DTYPE_BF16
#include "common.cuh"
#include "sampling.cu"

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* f = fopen(argv[1], "rb");
    uint32_t h[6];
    if (!f || fread(h, 4, 6, f) != 6) return 2;
    const uint32_t n = h[0], lrows = h[1], rows = h[2], stride = h[3], pen_len = h[5];
    std::vector<float> lf((size_t)lrows * n);
    std::vector<uint32_t> rw((size_t)rows * 12), pt(pen_len + 1), pc(pen_len + 1);
    std::vector<double> un(rows);
    bool ok = fread(lf.data(), 4, lf.size(), f) == lf.size() && fread(rw.data(), 4, rw.size(), f) == rw.size() &&
              fread(pt.data(), 4, pen_len, f) == pen_len && fread(pc.data(), 4, pen_len, f) == pen_len &&
              fread(un.data(), 8, rows, f) == rows;
    fclose(f);
    if (!ok) return 3;
    std::vector<T> logits(lf.size());
    for (size_t i = 0; i < lf.size(); ++i) logits[i] = (T)(__float_as_uint(lf[i]) >> 16);
    std::vector<uint32_t> out((size_t)rows * stride, 0xdeadbeefu);
    std::vector<float> xs((size_t)rows * n, NAN), es((size_t)rows * n, NAN);
    emu_launch(rows, SAMPLE_THREADS, [&] {
        sample_rows(out.data(), xs.data(), es.data(), logits.data(), reinterpret_cast<const SampleRow*>(rw.data()),
                    pt.data(), pc.data(), un.data(), (int)n, (int)stride);
    });
    FILE* o = fopen(argv[2], "wb");
    if (!o || fwrite(out.data(), 4, out.size(), o) != out.size()) return 4;
    fclose(o);
    return 0;
}
