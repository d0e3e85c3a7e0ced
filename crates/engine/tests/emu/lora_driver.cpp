// Driver for crates/engine/tests/lora_emulated.rs: the decode LoRA pairs by adapter index of kernels/lora.cu
// (and, first, the prompt pair lora_shrink_pf2/4/8 + lora_expand_pf: see pf_cases)
// (bf16) under the CPU emulation of cuemu.h, against a double-precision reference: the k-split pair
// bgmv_shrink_ix + bgmv_expand_ix (the default) at the host's chunk size (lora.rs `shrink_chunk`, copied below)
// and at other chunk sizes, its expand's blocks walking 1, 3 or 8 column tiles, the shrink on the tensor cores
// (bgmv_shrink_tc1/2/4, the default for 16-bit storage) at its chunk and others, with the default expand
// bgmv_expand_vx on records merged to 16 rows and to 4 (LORA_EMU_VX_ONLY: only those), and the earlier bgmv_shrink_ix0
// + bgmv_expand_ix0 (up to 9 rows). Cases: 1, 4, 9
// and 128 rows; segments cut into records of 1-4 rows as the host cuts them, rows in no record, a record with an index but
// no rows, padding records (index 0); adapters of ranks 4, 8, 16, 32 and 64 (step rmax 64 or less) in one step; a
// fused q/k/v projection (3 parts, columns 4096 / 1024 / 1024) and o (1 part, 4096); an adapter without a k
// pair (its rows' k columns are skipped); in_dim 4096, 2600 (a partial group of vectors), 1000 (one chunk)
// and 4100 (not whole 16-byte vectors: the scalar paths). The intermediate starts as NaN, so an entry read
// but never written shows; layer 0 of every index holds the pairs with another scale, so a wrong layer
// shows. Every y entry of a row and part with a pair must be within bf16 rounding of the reference; every
// other entry must keep its bits. Prints each run's largest error relative to the bound; exits non-zero
// on any failure.
#include "cuemu.h"
#define LORAX_DTYPE_BF16
#include <cstdio>
#include <random>
#include "common.cuh"
#include "lora.cu"

static std::mt19937 rng(11);
static float uni(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

// lora.rs `shrink_chunk` for 2-byte elements.
static int shrink_chunk(int k) {
    const int group = 32 * 4 * 8;
    if (k <= group) return k;
    const int c = ((k + 7) / 8 + group - 1) / group * group;
    return std::min(c, 4096 / 2);
}

struct Adapter {
    int rank;
    float scale;
    unsigned has;  // bit t: has a pair for target t
    std::vector<T> A[LORA_TARGETS], B[LORA_TARGETS];
    std::vector<LoraRef> table;  // [2 layers][LORA_TARGETS]
};

struct Parts {
    const char* name;
    int count;
    int target[3];
    int width[3];
};

struct Seg { int start, len, adapter; };

static const int LAYER = 1;

// Adapters for in_dim k and the widths of every target (q 4096, k/v 1024, o 4096).
// Columns of each target's pairs (q, k, v, o; the prompt pair's odd-width case changes them).
static int width[LORA_TARGETS] = {4096, 1024, 1024, 4096, 0, 0, 0};

static std::vector<Adapter> make_adapters(int k, const std::vector<std::pair<int, unsigned>>& specs) {
    std::vector<Adapter> ads(specs.size());
    for (size_t a = 0; a < specs.size(); ++a) {
        Adapter& ad = ads[a];
        ad.rank = specs[a].first;
        ad.has = specs[a].second;
        ad.scale = 0.5f + a;
        ad.table.assign(2 * LORA_TARGETS, LoraRef{});
        const float ra = 1.f / std::sqrt((float)k), rb = 1.f / std::sqrt((float)ad.rank);
        for (int t = 0; t < LORA_TARGETS; ++t) {
            if (!(ad.has >> t & 1) || width[t] == 0) continue;
            ad.A[t].resize((size_t)ad.rank * k);
            ad.B[t].resize((size_t)width[t] * ad.rank);
            for (auto& v : ad.A[t]) v = from_f(uni(-ra, ra));
            for (auto& v : ad.B[t]) v = from_f(uni(-rb, rb));
            LoraRef ref{(u64)(uintptr_t)ad.A[t].data(), (u64)(uintptr_t)ad.B[t].data(), ad.rank, ad.scale, width[t], 0};
            ad.table[LAYER * LORA_TARGETS + t] = ref;
            ref.scale = 7.f * ad.scale;  // layer 0: the same pair, another scale
            ad.table[t] = ref;
        }
    }
    return ads;
}

static int bad = 0;

// lora.rs `shrink_chunk_tc`: the tensor-core shrink's chunk.
static int shrink_chunk_tc(int k) { return std::min(k, BG_TC_KC); }

// lora.rs `merge_records`: the expand records of bgmv_expand_vx (consecutive records of one index whose rows
// continue each other, merged while within max_rows), padded with empty records to `pad`.
static std::vector<LoraRec> merge_records(const std::vector<LoraRec>& recs, int max_rows, size_t pad) {
    std::vector<LoraRec> out;
    for (const LoraRec& r : recs) {
        if (r.index == 0) continue;  // padding
        if (!out.empty() && out.back().index == r.index && out.back().start + out.back().len == r.start &&
            out.back().len + r.len <= max_rows)
            out.back().len += r.len;
        else
            out.push_back(r);
    }
    out.resize(pad, LoraRec{0, 0, 0});
    return out;
}

static void check(const char* what, const char* pair, int kc, const char* form, int n, int k, const Parts& P,
                  const std::vector<Adapter>& ads, const std::vector<Seg>& segs, const std::vector<T>& x,
                  const std::vector<T>& y0, const std::vector<T>& y);

// Whether the run's intermediate was rounded to bf16 (the shrink inside the GEMM, run_iy): each t[row, j] then
// carries up to 2^-9 of itself, so the bound takes 2^-8 of sum_j |t_j B[c, j]| more.
static bool g_t_rounded = false;

// A step's records as make_lora_step cuts them: each segment in records of at most BG_ROWS rows, then (when
// `empty_one`) a record with an index but no rows, padded with empty records (index 0) to a power of two.
static std::vector<LoraRec> cut_records(const std::vector<Seg>& segs, const std::vector<Adapter>& ads, bool empty_one) {
    std::vector<LoraRec> recs;
    for (const Seg& s : segs)
        for (int c = 0; c < s.len; c += BG_ROWS)
            recs.push_back({(u64)(uintptr_t)ads[s.adapter].table.data(), s.start + c, std::min(BG_ROWS, s.len - c)});
    if (empty_one) recs.push_back({(u64)(uintptr_t)ads[segs[0].adapter].table.data(), 0, 0});
    size_t pad = 1;
    while (pad < recs.size()) pad *= 2;
    recs.resize(pad, LoraRec{0, 0, 0});
    return recs;
}

// The parts' groups of ct column tiles of bgmv_expand_ix/_iy end to end along y, as lora.rs `expand_groups` lays
// them out (its unit test walks them as the kernel does): part 1's start at e1, part 2's at e2, total in all.
static void ix_groups(const Parts& P, int ct, int* e1, int* e2, int* total) {
    int groups[3] = {0, 0, 0};
    for (int p = 0; p < P.count; ++p) {
        const int tiles = (P.width[p] + 2 * BG_EXPAND_THREADS - 1) / (2 * BG_EXPAND_THREADS);
        groups[p] = (tiles + ct - 1) / ct;
    }
    *e1 = groups[0];
    *e2 = groups[0] + groups[1];
    *total = *e2 + groups[2];
}

// Runs one case with the k-split pair at chunk kc (0: the old pair; `tc`: the shrink on the tensor cores,
// bgmv_shrink_tc1/2/4 by the step's largest rank) and checks y. `vx` > 0: the expand is bgmv_expand_vx on
// records merged to at most vx rows (ct unused).
static void run_case(const char* what, int n, int k, const Parts& P, const std::vector<Adapter>& ads,
                     const std::vector<Seg>& segs, int kc, int ct, const std::vector<T>& x, const std::vector<T>& y0,
                     bool tc = false, int vx = 0) {
    int out = 0, col[3] = {0, 0, 0}, rmax = 0, max_cols = 0;
    for (int p = 0; p < P.count; ++p) { col[p] = out; out += P.width[p]; max_cols = std::max(max_cols, P.width[p]); }
    // Records as make_lora_step cuts them, one with an index but no rows, padding to a power of two.
    for (const Seg& s : segs) rmax = std::max(rmax, ads[s.adapter].rank);
    const std::vector<LoraRec> recs = cut_records(segs, ads, true);
    const int nrec = recs.size();
    std::vector<T> y = y0;
    const int t0 = P.target[0], t1 = P.target[1], t2 = P.target[2];
    if (kc > 0) {
        const int ks = (k + kc - 1) / kc, pstride = P.count * n;
        std::vector<float> tmp((size_t)ks * pstride * rmax, NAN);
        for (int c = 0; c < ks; ++c)
            for (int p = 0; p < P.count; ++p)
                emu_launch(nrec, BG_KWARPS * 32, [&] {
                    blockIdx.y = c; blockIdx.z = p;
                    if (!tc)
                        bgmv_shrink_ix(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
                    else if (rmax <= 16)
                        bgmv_shrink_tc1(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
                    else if (rmax <= 32)
                        bgmv_shrink_tc2(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
                    else
                        bgmv_shrink_tc4(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
                });
        if (vx > 0) {
            // One tile of BE_V * BG_EXPAND_THREADS columns a block, the parts' tiles end to end along y.
            const std::vector<LoraRec> erecs = merge_records(recs, vx, recs.size());
            const int TW = BE_V * BG_EXPAND_THREADS;
            int tiles[3] = {0, 0, 0};
            for (int p = 0; p < P.count; ++p) tiles[p] = (P.width[p] + TW - 1) / TW;
            const int e1 = tiles[0], e2 = tiles[0] + tiles[1], total = e2 + tiles[2];
            for (int gy = 0; gy < total; ++gy)
                emu_launch(nrec, BG_EXPAND_THREADS, [&] {
                    blockIdx.y = gy; blockIdx.z = 0;
                    bgmv_expand_vx(y.data(), tmp.data(), erecs.data(), LAYER, t0, t1, t2, col[0], col[1], col[2], e1,
                                   e2, n, pstride, out, rmax, ks);
                });
        }
        // The parts' groups of ct column tiles end to end along y, as lora.rs `expand_groups` lays them out
        // (its unit test walks them as the kernel does).
        int e1, e2, total;
        ix_groups(P, ct, &e1, &e2, &total);
        if (vx > 0) total = 0;
        for (int gy = 0; gy < total; ++gy)
            emu_launch(nrec, BG_EXPAND_THREADS, [&] {
                blockIdx.y = gy; blockIdx.z = 0;
                bgmv_expand_ix(y.data(), tmp.data(), recs.data(), LAYER, t0, t1, t2, col[0], col[1], col[2], e1, e2,
                               ct, n, pstride, out, rmax, ks);
            });
    } else {
        std::vector<float> tmp((size_t)P.count * n * rmax, NAN);
        for (int j = 0; j < rmax; ++j)
            for (int p = 0; p < P.count; ++p)
                emu_launch(nrec, 128, [&] {
                    blockIdx.y = j; blockIdx.z = p;
                    bgmv_shrink_ix0(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, k, rmax);
                });
        const int tiles = (max_cols + 255) / 256;
        for (int tl = 0; tl < tiles; ++tl)
            for (int p = 0; p < P.count; ++p)
                emu_launch(nrec, 256, [&] {
                    blockIdx.y = tl; blockIdx.z = p;
                    bgmv_expand_ix0(y.data(), tmp.data(), recs.data(), LAYER, t0, t1, t2, col[0], col[1], col[2], n,
                                    out, rmax);
                });
    }
    char form[32];
    if (vx > 0)
        snprintf(form, sizeof form, "vx rows %d", vx);
    else
        snprintf(form, sizeof form, "tiles %d", ct);
    check(what, tc ? "tc  " : "simt", kc, form, n, k, P, ads, segs, x, y0, y);
}

// The shrink inside the projection's GEMM (lora.rs `LoraGemm`): lora_gemm_rows copies the one adapter's A rows
// (of layer LAYER) into P.count * S reserved rows (NaN before: every entry must be written, zeros past a pair's
// rank and for a part without a pair), the GEMM is emulated (f32 sums rounded to bf16, every row, into the
// columns past y's own), then bgmv_expand_iy reads them, its blocks walking ct column tiles. Checks y's own
// columns as check() does, and that the GEMM's columns were left alone.
static void run_iy(const char* what, int n, int k, const Parts& P, const std::vector<Adapter>& ads,
                   const std::vector<Seg>& segs, int S, int ct, const std::vector<T>& x, const std::vector<T>& y0) {
    int out = 0, col[3] = {0, 0, 0};
    for (int p = 0; p < P.count; ++p) { col[p] = out; out += P.width[p]; }
    const Adapter& ad = ads[segs[0].adapter];
    const std::vector<LoraRec> recs = cut_records(segs, ads, false);
    const int nrec = recs.size(), t0 = P.target[0], t1 = P.target[1], t2 = P.target[2];
    const int reserved = P.count * S, W = out + reserved;
    std::vector<T> rows_buf((size_t)reserved * k, from_f(NAN));
    std::vector<u64> dst(LAYER + 1, 0);
    dst[LAYER] = (u64)(uintptr_t)rows_buf.data();
    for (int row = 0; row < reserved; ++row)
        emu_launch(1, 256, [&] {
            blockIdx.x = LAYER; blockIdx.y = row; blockIdx.z = 0;
            lora_gemm_rows(dst.data(), ad.table.data(), t0, t1, t2, S, k);
        });
    int unwritten = 0;
    for (const T& v : rows_buf) unwritten += std::isnan(to_f(v));
    std::vector<T> yw((size_t)n * W);
    for (int row = 0; row < n; ++row) {
        std::copy(y0.begin() + (size_t)row * out, y0.begin() + (size_t)(row + 1) * out, yw.begin() + (size_t)row * W);
        for (int j = 0; j < reserved; ++j) {
            float acc = 0.f;
            for (int kk = 0; kk < k; ++kk) acc += to_f(x[(size_t)row * k + kk]) * to_f(rows_buf[(size_t)j * k + kk]);
            yw[(size_t)row * W + out + j] = from_f(acc);
        }
    }
    const std::vector<T> before = yw;
    int e1, e2, total;
    ix_groups(P, ct, &e1, &e2, &total);
    for (int gy = 0; gy < total; ++gy)
        emu_launch(nrec, BG_EXPAND_THREADS, [&] {
            blockIdx.y = gy; blockIdx.z = 0;
            bgmv_expand_iy(yw.data(), recs.data(), LAYER, t0, t1, t2, col[0], col[1], col[2], e1, e2, ct, n, out, W, S);
        });
    std::vector<T> y((size_t)n * out);
    int gemm_cols_changed = 0;
    for (int row = 0; row < n; ++row) {
        std::copy(yw.begin() + (size_t)row * W, yw.begin() + (size_t)row * W + out, y.begin() + (size_t)row * out);
        for (int j = out; j < W; ++j) gemm_cols_changed += yw[(size_t)row * W + j] != before[(size_t)row * W + j];
    }
    if (unwritten || gemm_cols_changed) {
        printf("FAIL   %s: %d reserved entries unwritten, %d GEMM columns changed\n", what, unwritten, gemm_cols_changed);
        bad++;
    }
    char form[32];
    snprintf(form, sizeof form, "slot %d tiles %d", S, ct);
    g_t_rounded = true;
    check(what, "gemm", 0, form, n, k, P, ads, segs, x, y0, y);
    g_t_rounded = false;
}

static void make_inputs(int n, int k, const Parts& P, std::vector<T>& x, std::vector<T>& y0);

static void iy_all(const char* name, int n, int k, const Parts& P, const std::vector<std::pair<int, unsigned>>& specs,
                   const std::vector<Seg>& segs, int S) {
    const std::vector<Adapter> ads = make_adapters(k, specs);
    std::vector<T> x, y0;
    make_inputs(n, k, P, x, y0);
    char what[160];
    snprintf(what, sizeof what, "iy, %d rows, in_dim %d, %s", n, k, name);
    for (int ct : {1, 3}) run_iy(what, n, k, P, ads, segs, S, ct, x, y0);
}

// Checks y after a run against the double reference: within bf16 rounding where a row's adapter has the
// part's pair, every other entry's bits kept; prints the run's line and counts a failure.
static void check(const char* what, const char* pair, int kc, const char* form, int n, int k, const Parts& P,
                  const std::vector<Adapter>& ads, const std::vector<Seg>& segs, const std::vector<T>& x,
                  const std::vector<T>& y0, const std::vector<T>& y) {
    int out = 0, col[3] = {0, 0, 0};
    for (int p = 0; p < P.count; ++p) { col[p] = out; out += P.width[p]; }
    std::vector<int> owner(n, -1);
    for (const Seg& s : segs)
        for (int i = 0; i < s.len; ++i) owner[s.start + i] = s.adapter;
    double worst = 0;  // largest |err| / bound
    int untouched_bad = 0;
    for (int row = 0; row < n; ++row) {
        for (int p = 0; p < P.count; ++p) {
            const int t = P.target[p];
            const Adapter* ad = owner[row] >= 0 ? &ads[owner[row]] : nullptr;
            const bool has = ad && (ad->has >> t & 1);
            const int r = has ? ad->rank : 0;
            std::vector<double> xa(r, 0.0);  // x[row] . A[j]
            for (int j = 0; j < r; ++j)
                for (int kk = 0; kk < k; ++kk)
                    xa[j] += (double)to_f(x[(size_t)row * k + kk]) * to_f(ad->A[t][(size_t)j * k + kk]);
            for (int c = 0; c < P.width[p]; ++c) {
                const size_t at = (size_t)row * out + col[p] + c;
                if (!has) {
                    if (y[at] != y0[at]) untouched_bad++;
                    continue;
                }
                double acc = 0, aabs = 0;
                for (int j = 0; j < r; ++j) {
                    acc += xa[j] * to_f(ad->B[t][(size_t)c * r + j]);
                    aabs += std::fabs(xa[j] * to_f(ad->B[t][(size_t)c * r + j]));
                }
                const double d = (double)ad->scale * acc, ref = to_f(y0[at]) + d;
                // bf16 rounds to 8 significant bits (half an ulp: at most 2^-8 of |ref|); the f32 sums add
                // ~1e-6 (a rounding just across a tie), a bug far more. The expand of LORA_EXPAND_RED=1
                // rounds the product d to bf16 before adding it (as PEFT adds its bf16 LoRA output): another
                // 2^-8 of |d|, for that form only.
                const double bound = std::fabs(ref) / 256.0 + (LORA_RED ? std::fabs(d) / 256.0 : 0.0) +
                                     (g_t_rounded ? std::fabs(ad->scale) * aabs / 256.0 : 0.0) + 2e-4;
                const double err = std::fabs(to_f(y[at]) - ref);
                worst = std::isnan(err) ? INFINITY : std::max(worst, err / bound);
            }
        }
    }
    const bool ok = worst <= 1.0 && untouched_bad == 0;
    printf("%-6s %-58s %s chunk %-5d %-10s err/bound %.3f, %d entries outside the pairs changed\n", ok ? "ok" : "FAIL",
           what, pair, kc, form, worst, untouched_bad);
    if (!ok) bad++;
}

// lora.rs `prompt_chunk` (8 to 16 chunks of whole 64-element pieces, two blocks a multiprocessor) for a chunk
// of `blocks` blocks on 132 multiprocessors.
static int prompt_chunk(int k, int blocks) {
    const int chunks = std::clamp((2 * 132 + blocks - 1) / blocks, 8, 16);
    return std::max(64, ((k + chunks - 1) / chunks + 63) / 64 * 64);
}

// The prompt pair (lora_shrink_pf2/4/8 + lora_expand_pf) on records of at most PF_ROWS rows cut from the
// segments as make_lora_step cuts a prompt chunk's, at chunk kc (0: the host's, `prompt_chunk`); y checked as
// run_case checks it. The intermediate starts as NaN.
static void run_pf(const char* what, int n, int k, const Parts& P, const std::vector<Adapter>& ads,
                   const std::vector<Seg>& segs, int kc, const std::vector<T>& x, const std::vector<T>& y0) {
    int out = 0, col[3] = {0, 0, 0}, rmax = 0;
    for (int p = 0; p < P.count; ++p) { col[p] = out; out += P.width[p]; }
    std::vector<LoraRec> recs;
    for (const Seg& s : segs) {
        rmax = std::max(rmax, ads[s.adapter].rank);
        for (int c = 0; c < s.len; c += PF_ROWS)
            recs.push_back({(u64)(uintptr_t)ads[s.adapter].table.data(), s.start + c, std::min(PF_ROWS, s.len - c)});
    }
    if (kc == 0) kc = prompt_chunk(k, (int)recs.size() * P.count);
    const int nrec = recs.size(), ks = (k + kc - 1) / kc, pstride = P.count * n;
    const int t0 = P.target[0], t1 = P.target[1], t2 = P.target[2];
    std::vector<T> y = y0;
    std::vector<float> tmp((size_t)ks * pstride * rmax, NAN);
    for (int c = 0; c < ks; ++c)
        for (int p = 0; p < P.count; ++p)
            emu_launch(nrec, PF_WARPS * 32, [&] {
                blockIdx.y = c; blockIdx.z = p;
                if (rmax <= 16)
                    lora_shrink_pf2(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
                else if (rmax <= 32)
                    lora_shrink_pf4(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
                else
                    lora_shrink_pf8(tmp.data(), x.data(), recs.data(), LAYER, t0, t1, t2, n, pstride, k, rmax, kc);
            });
    int groups[3] = {0, 0, 0};
    for (int p = 0; p < P.count; ++p) groups[p] = (P.width[p] + PF_COLS - 1) / PF_COLS;
    const int e1 = groups[0], e2 = groups[0] + groups[1], total = e2 + groups[2];
    for (int gy = 0; gy < total; ++gy)
        emu_launch(nrec, PF_WARPS * 32, [&] {
            blockIdx.y = gy; blockIdx.z = 0;
            lora_expand_pf(y.data(), tmp.data(), recs.data(), LAYER, t0, t1, t2, col[0], col[1], col[2], e1, e2, n,
                           pstride, out, rmax, ks);
        });
    check(what, "pf  ", kc, "", n, k, P, ads, segs, x, y0, y);
}



// Random x [n, k] and y [n, the parts' columns].
static void make_inputs(int n, int k, const Parts& P, std::vector<T>& x, std::vector<T>& y0) {
    int out = 0;
    for (int p = 0; p < P.count; ++p) out += P.width[p];
    x.resize((size_t)n * k);
    y0.resize((size_t)n * out);
    for (auto& v : x) v = from_f(uni(-1.f, 1.f));
    for (auto& v : y0) v = from_f(uni(-0.5f, 0.5f));
}

static void run_all(const char* name, int n, int k, const Parts& P, const std::vector<std::pair<int, unsigned>>& specs,
                    const std::vector<Seg>& segs, const std::vector<int>& chunks) {
    const std::vector<Adapter> ads = make_adapters(k, specs);
    std::vector<T> x, y0;
    make_inputs(n, k, P, x, y0);
    char what[160];
    // The expand bgmv_expand_vx (the default) on records merged to at most 16 rows (the host's limit) and 4
    // (the shrink's records as they are), after the tensor-core shrink at its own chunk.
    snprintf(what, sizeof what, "ix, %d rows, in_dim %d, %s", n, k, name);
#ifdef LORA_EMU_PF_ONLY  // a quicker build for work on the prompt pair: only the prompt cases
    return;
#endif
    for (int vx : {16, 4}) run_case(what, n, k, P, ads, segs, shrink_chunk_tc(k), 1, x, y0, true, vx);
#ifdef LORA_EMU_VX_ONLY  // a quicker build for work on bgmv_expand_vx: only its runs above
    return;
#endif
#ifndef LORA_EMU_TC_ONLY  // a quicker build for work on the tensor-core shrink: only its runs below
    for (int kc : chunks) {
        snprintf(what, sizeof what, "%s, %d rows, in_dim %d, %s", kc ? "ix" : "ix0", n, k, name);
        // The expand's blocks walk 1 column tile (each part's last group short when its tiles are odd), 3
        // (q's 8 tiles: groups of 3, 3, 2) and 8 (more than any part has).
        if (kc > 0)
            for (int ct : {1, 3, 8}) run_case(what, n, k, P, ads, segs, kc, ct, x, y0);
        else
            run_case(what, n, k, P, ads, segs, kc, 1, x, y0);
    }
#endif
    // The shrink on the tensor cores: its own chunk (the host's), a chunk that leaves some warps idle (256),
    // and one that is not whole 64-element stretches (1000: the last stretch partial; scalar loads when
    // in_dim is not whole vectors).
    snprintf(what, sizeof what, "ix, %d rows, in_dim %d, %s", n, k, name);
    for (int kc : {shrink_chunk_tc(k), 256, 1000})
        if (kc <= k) run_case(what, n, k, P, ads, segs, kc, 3, x, y0, true);
}

// The prompt pair on one case: the host's chunk (lora.rs `prompt_chunk`) and, where that has more than one
// stretch a half, 64 (one stretch a half; more partials than the host makes, each thread's loads in batches).
static void pf_all(const char* name, int n, int k, const Parts& P, const std::vector<std::pair<int, unsigned>>& specs,
                   const std::vector<Seg>& segs) {
    const std::vector<Adapter> ads = make_adapters(k, specs);
    std::vector<T> x, y0;
    make_inputs(n, k, P, x, y0);
    char what[160];
    snprintf(what, sizeof what, "pf, %d rows, in_dim %d, %s", n, k, name);
    run_pf(what, n, k, P, ads, segs, 0, x, y0);
    if (k > 16 * 64) run_pf(what, n, k, P, ads, segs, 64, x, y0);  // more partials than the host makes
}

// The prompt pair's cases (run by the first build only: its kernels do not depend on LORA_EXPAND_RED).
static void pf_cases(unsigned ALL, unsigned NO_K, const Parts& QKV, const Parts& O) {
    // 150 rows: a 130-row segment (records of 64, 64, 2; rank 16), rows in none, a 15-row segment (rank 8, no
    // k pair: its rows' k columns are kept).
    pf_all("q/k/v, ranks 16 + 8 (no k), rows in none", 150, 4096, QKV, {{16, ALL}, {8, NO_K}}, {{0, 130, 0}, {135, 15, 1}});
    // Largest rank 64 (pf8) and rank 4; in_dim 4100: x and A not whole 16-byte vectors (their scalar loads).
    pf_all("o, ranks 64 + 4, in_dim not whole vectors", 80, 4100, O, {{64, ALL}, {4, ALL}}, {{0, 70, 0}, {72, 5, 1}});
    // Largest rank 32 (pf4) with in_dim 1000 (16 chunks of 64, the last one partial).
    pf_all("q/k/v, ranks 32 + 8, in_dim 1000", 66, 1000, QKV, {{32, ALL}, {8, ALL}}, {{0, 66, 0}});
    // Parts of 600 and 100 columns (groups that end inside a warp's and a lane's columns; y rows of 700: its
    // scalar loads and stores), rank 6 (not a multiple of 4: B's scalar loads).
    const int keep[LORA_TARGETS] = {width[0], width[1], width[2], width[3], width[4], width[5], width[6]};
    width[0] = 600;
    width[1] = 100;
    const Parts ODD{"q/k", 2, {0, 1, 0}, {600, 100, 0}};
    pf_all("q/k of 600/100 columns, ranks 6 + 16", 100, 512, ODD, {{6, ALL}, {16, ALL}}, {{0, 40, 0}, {40, 60, 1}});
    std::copy(keep, keep + LORA_TARGETS, width);
}

int main() {
    printf("LORA_RED %d\n", LORA_RED);  // which expand form this build runs (lora_emulated.rs checks it)
    const unsigned ALL = 0x7f, NO_K = 0x7f & ~2u;
    const Parts QKV{"q/k/v", 3, {0, 1, 2}, {4096, 1024, 1024}}, O{"o", 1, {3, 0, 0}, {4096, 0, 0}};
#ifndef LORA_EMU_IY_ONLY  // a quicker build for work on the shrink inside the GEMM: only its cases, at the end
    if (!LORA_RED) pf_cases(ALL, NO_K, QKV, O);
#ifdef LORA_EMU_PF_ONLY
    printf(bad ? "FAIL %d\n" : "OK\n", bad);
    return bad != 0;
#endif
    // One row, rank 16, q/k/v at in_dim 4096: the host's chunk (1024: 4 chunks), two groups per chunk
    // (2048), a chunk that is not whole groups (1000: 5 chunks, the last of 96), the old pair.
    run_all("q/k/v, rank 16", 1, 4096, QKV, {{16, ALL}}, {{0, 1, 0}}, {shrink_chunk(4096), 2048, 1000, 0});
    // Four rows: a 2-row record (rank 8, no k pair), a row in no record, a 1-row record (rank 64).
    run_all("q/k/v, ranks 8 (no k) + 64, a row in none", 4, 4096, QKV, {{8, NO_K}, {64, ALL}},
            {{0, 2, 0}, {3, 1, 1}}, {shrink_chunk(4096), 0});
    // Nine rows, o: records of 1, 3, 4 rows and a row in none; ranks 16, 8, 64, 4 (4: the expand's scalar path).
    run_all("o, ranks 16/8/64/4, records of 1-4 rows", 9, 4096, O, {{16, ALL}, {8, ALL}, {64, ALL}, {4, ALL}},
            {{0, 1, 0}, {1, 3, 1}, {5, 4, 2}}, {shrink_chunk(4096), 2048, 0});
    // Rank 4 (scalar loads of B) for 6 rows: two groups of 4 rows in bgmv_expand_vx's merged record.
    run_all("o, rank 4", 8, 4096, O, {{4, ALL}}, {{1, 6, 0}}, {shrink_chunk(4096), 0});
    // Largest rank 32 (the tensor-core shrink's bgmv_shrink_tc2): records of 4 and 2 rows, ranks 32 and 8.
    run_all("q/k/v, ranks 32 + 8", 6, 4096, QKV, {{32, ALL}, {8, ALL}}, {{0, 4, 0}, {4, 2, 1}}, {shrink_chunk(4096)});
    // in_dim 2600 (3 chunks of 1024, the last a partial group), 1000 (one chunk), 4100 (scalar: 5 chunks,
    // the last of 4 elements), with q/k/v and 9 rows.
    for (int k : {2600, 1000, 4100})
        run_all("q/k/v, ranks 16 (no k) + 64 + 8", 9, k, QKV, {{16, NO_K}, {64, ALL}, {8, ALL}},
                {{0, 5, 0}, {5, 1, 1}, {7, 2, 2}}, {shrink_chunk(k), 0});
    run_all("o, rank 64, scalar", 3, 4100, O, {{64, ALL}}, {{0, 3, 0}}, {shrink_chunk(4100), 2048, 0});
    // 128 rows: one rank-16 adapter for every row (32 records), then a mix of four adapters with rows in none
    // (37 records, padded to 64). The old pair only at the smaller sizes: emulated, its 16-64 blocks per record
    // take minutes here.
    run_all("q/k/v, one rank-16 adapter", 128, 4096, QKV, {{16, ALL}}, {{0, 128, 0}}, {shrink_chunk(4096)});
    run_all("o, four adapters, rows in none", 128, 4096, O, {{16, ALL}, {8, ALL}, {64, ALL}, {16, NO_K}},
            {{0, 40, 0}, {40, 1, 1}, {41, 7, 2}, {50, 77, 3}}, {shrink_chunk(4096)});
#endif
    // The shrink inside the GEMM: one rank-16 adapter for 128 rows at the default slot (32); rank 16 without
    // k pairs at a slot of its rank, rows in none; o at rank 4 (B's scalar loads) and in_dim 4100.
    iy_all("q/k/v, one rank-16 adapter", 128, 4096, QKV, {{16, ALL}}, {{0, 128, 0}}, 32);
    iy_all("q/k/v, rank 16 (no k), rows in none", 9, 4096, QKV, {{16, NO_K}}, {{0, 5, 0}, {7, 2, 0}}, 16);
    iy_all("o, rank 4, in_dim not whole vectors", 6, 4100, O, {{4, ALL}}, {{1, 5, 0}}, 32);
    printf(bad ? "FAIL %d\n" : "OK\n", bad);
    return bad != 0;
}
