#!/usr/bin/env bash
# The next device round for issue 10, written while no GPU was lent (sessions 23 and 26; bench/NOTES.md), so
# that the session that gets one spends its time on the device rather than on the script. Calls, each under
# the device tool's 600 s limit, from the repository root, with the binaries of scripts/gpu/build.sh repacked
# into .gpu-bin-serve (bench/NOTES.md "Device workflow"):
#
#   bash scripts/gpu/next_call.sh uploads  # ~200 s: uploads beside the read (session 26), checked and timed
#   bash scripts/gpu/next_call.sh bench    # ~330 s: the disk's read figures, then bench.sh
#   bash scripts/gpu/next_call.sh expand   # ~450 s: the expand's reduction form (run in session 24: stays off)
#   bash scripts/gpu/next_call.sh profile  # ~250 s: what a prompt chunk's LoRA costs, kernel by kernel (session 27)
#   bash scripts/gpu/next_call.sh graphs-bench  # ~340 s: graphs, golden and e2e, then `bench` (session 27)
#   bash scripts/gpu/next_call.sh round    # ~450 s: graphs and e2e, then bench.sh (session 28)
#   bash scripts/gpu/next_call.sh detail-bench  # ~480 s: ncu detail of the 128-row one-adapter step's LoRA
#                                               # kernels and of a 1000-token prompt, then bench.sh (session 30)
#   bash scripts/gpu/next_call.sh tc       # ~440 s: the decode LoRA shrink on the tensor cores checked (and on the
#                                          # CUDA cores), golden included, steps timed with each, then bench.sh
#   bash scripts/gpu/next_call.sh mlp      # ~60 s: adapters of every linear layer (the MLP's too): steps and
#                                          # kernel times with the tensor-core and the CUDA-core shrink (session 31)
#   bash scripts/gpu/next_call.sh expand-tiles  # ~120 s: the LoRA expand's column tiles a block (1, 2 and
#                                               # the default) on adapters of every linear layer (session 31)
#   bash scripts/gpu/next_call.sh vx       # ~330 s: the LoRA expand bgmv_expand_vx (session 32) checked against
#                                          # the CPU, golden and e2e, then timed against bgmv_expand_ix
#                                          # (VX_NCU=0: without the ncu kernel times, ~200 s)
#   bash scripts/gpu/next_call.sh prompt   # ~300 s: the prompt LoRA pair on the tensor cores (session 35) checked
#                                          # against the CPU and transformers + peft, then timed against cuBLAS
#   bash scripts/gpu/next_call.sh attn     # ~60 s: PyTorch's prefill attention backends (cuDNN, FlashAttention-2)
#                                          # beside ours (prefill_benchmarks), in one call (session 43; session
#                                          # 41's `wgmma` ran the probes too, since removed: `git show
#                                          # 1897750:scripts/gpu/next_call.sh`)
#   bash scripts/gpu/next_call.sh sm90     # ~300 s: kernels/prefill_sm90.cu's forms (sessions 41-43) against the
#                                          # CPU, timed, p1000 steps with each that passed and off
#   FORM=ws64 bash scripts/gpu/next_call.sh sm90-bench  # ~400 s: bench.sh with that Hopper prefill form on
#   bash scripts/gpu/next_call.sh long     # ~250 s: 32-layer p8192 and p16384 steps with the default (auto: ws128
#                                          # from 8192 keys) and with ws64, two rounds (session 43)
#   bash scripts/gpu/next_call.sh gemm     # ~400 s: the Hopper prompt GEMM (kernels/gemm_sm90.cu, session 44) against
#                                          # the CPU and cuBLAS, timed against cuBLAS, golden with it on for every
#                                          # product, 32-layer p1000 and m64x8 steps off / silu / fused, two
#                                          # rounds (GEMM_NCU=1: ncu's detail of p1000's kernels first)
#   bash scripts/gpu/next_call.sh gemm-ab  # ~150 s: its test, its times at 1000 and 4160 rows, p1000 steps off and
#                                          # with the silu product on gemm_sm90_silu_t (GEMM_AB_GOLDEN=1: golden
#                                          # with it on every gate/up product, ~80 s more)
#   bash scripts/gpu/next_call.sh bench-only   # ~300 s: bench.sh alone with the defaults
#   bash scripts/gpu/next_call.sh gemm-sweep   # ~120 s: the silu epilogues bit for bit, the default's sizes,
#                                              # silu_mul against the CPU, GEMM times at 768-4160 rows
#   bash scripts/gpu/next_call.sh sweep-bench  # ~450 s: gemm-sweep, then bench.sh with the defaults
#   bash scripts/gpu/next_call.sh decode-steps # ~150 s (at most 360): the graphs test, then the base step at 128
#                                              # streams and the four regimes with the shard's timing reports
#   bash scripts/gpu/next_call.sh feed         # ~450 s: graphs, chunked, golden and e2e, then the base step at 128
#                                              # streams and the regimes fed, not fed, fed (session 47)
#   bash scripts/gpu/next_call.sh feed-bench   # ~370 s: graphs and chunked, then bench.sh with fed steps (session 48)
#   bash scripts/gpu/next_call.sh stable-sigs  # ~230 s (at most 540): graphs, the LoRA step and golden, then the
#                                              # regimes with the graph module's debug lines (session 46)
#   bash scripts/gpu/next_call.sh golden-bench  # ~530 s: `validation`, graphs, golden and e2e against transformers +
#                                               # peft, then bench.sh, with the defaults (`round` without golden)
#   bash scripts/gpu/next_call.sh validation    # ~15 s: validation_timing (a 1000-token prompt's validation back to
#                                               # back and after 20 ms of rest, session 49) on this host's CPU
#   Session 48 removed `buckets` (power-of-two row buckets, measured no faster, with the switch itself; the round
#   is at 288a7c9: `git show 288a7c9:scripts/gpu/next_call.sh`).
#   Session 34 removed `lora-rope` (the q/k/v LoRA expand inside the rotary kernel, measured slower in both
#   forms; the code and the round are at 9ee9c5d: `git show 9ee9c5d:scripts/gpu/next_call.sh`).
#   Session 31 removed `rope` and `rope-ncu` (prompt queries rotated inside the prefill kernel, measured no
#   faster; the code and the rounds are at 38837cf: `git show 38837cf:scripts/gpu/next_call.sh`).
#   Session 29 removed two rounds: `overlap` (the LoRA shrink beside the base GEMM, measured slower:
#   `git show b555703:scripts/gpu/next_call.sh`) and `timeline` (Nsight Systems timelines; the GPU machine
#   has no nsys: `git show e4c5606:scripts/gpu/timeline.sh`).
#
# Record in the call's bench/results/<date>-<session>-<n>/call.sh the commit of this script (`git show
# COMMIT:scripts/gpu/next_call.sh` gives it back), the command and the binaries' commit, beside what it printed.
#
# `uploads`: cuda_adapters (upload_many against weight, the staging pool, an adapter uploaded beside its read
# against the same adapter uploaded after it, bit for bit, and both ways' times on a cold and a cached 27 MB
# file), then golden, graphs and e2e (the served adapters, now loaded by their download beside the read,
# against transformers + peft). Run it before `bench`: if it fails, the bench's cold loads are not worth timing.
# `expand`: the LoRA GPU tests with the default expand and with -DLORA_EXPAND_RED=1 (pair reductions, off by
# default: 932034b); golden, graphs, adapters and e2e against transformers + peft with the reduction form; then
# 32-layer eager steps of b128-a8 and b128-distinct with each form, twice, interleaved (session 22 call 1: 8.75
# and 9.45 ms before the mend). Turn the reductions on by default only if both steps are faster in both rounds
# and the e2e test passes with them.
# `profile`: ncu kernel times (2 layers) of the peft workload's mixed step without and with 8 adapters
# round-robin (64 decode rows and eight 512-token prompts: m64x8, m64x8-a8) and of a 1000-token prompt, the
# adapters' step in detail, then the same mixed steps with all 32 layers, eager.
# `graphs-bench`: run.sh's graphs (graphs against eager steps, bit for bit; step times; a shrinking batch with
# graphs captured at the first and at the second step of their signature), golden and e2e steps, then as
# `bench`. Its summary prints the shard's start-up decode warm-up line and the slow decode steps by how
# they ran (session 27: the warm-up should leave no "eager, a new shape" step at the ends of runs).
# `mlp`: the benchmark's adapters are q/k/v/o; users often adapt every linear layer. With in_dim 14336
# (down_proj) the tensor-core shrink's 1024-element chunks make 14 partials where the CUDA-core shrink's make 7
# (bench/NOTES.md session 30, "Left" 3). ncu kernel times (2 layers) of b128-identical-all and
# b128-a32-all with each shrink, then 32-layer steps through graphs with each, two rounds interleaved.
# `expand-tiles`: call 3 of session 31 found gate/up's expand (28672 columns) at 32-35 us a layer with
# adapters of every linear layer, where its bytes take about 5 us: its blocks walk 4 tiles of 512 columns each
# (lora::expand_tiles keeps one wave). ncu kernel times (2 layers) and 32-layer steps through graphs of
# b128-identical-all and b128-a32-all with LORAX_CUDA_LORA_EXPAND_TILES=1, 2 and the default.
# `vx`: bgmv_expand_vx (session 32, LORAX_CUDA_LORA_EXPAND=vx, set for the whole round: 8-byte accesses of
# y, records of up to 16 rows) against bgmv_expand_ix (the default until then, LORAX_CUDA_LORA_EXPAND=ix): the
# LoRA kernel tests (lora_step_matches_cpu runs each plan with both); 32-layer steps through graphs of
# b128-identical, b128-distinct, b128-identical-all and b128-a32-all with vx and ix (and vx at records of 4
# rows, LORAX_CUDA_LORA_EXPAND_ROWS=4, for the one-adapter pair); ncu kernel times (2 layers) of those with
# each; graphs, golden and e2e with vx; a second round of steps in the other order. Make vx the default
# only if the tests pass and its steps are not slower. (Session 33 call 1 ran it: all passed, every step
# slower, vx stays opt-in.)
# `prompt`: the prompt chunks' LoRA on `lora_shrink_pf*` + `lora_expand_pf` (session 35, the default for 16-bit
# storage) against cuBLAS's per-layer GEMMs (LORAX_CUDA_LORA_PROMPT=gemm): the LoRA kernel tests
# (lora_step_matches_cpu's prompt case), golden's LoRA tests (bf16_lora_prompt_pair_matches_peft runs every
# segment on the pair), 32-layer eager steps of a 512- and a 1000-token prompt with one adapter and of the peft
# workload's mixed step (m64x8-a8) with each, two rounds interleaved, the base prompt's step for reference, and
# ncu kernel times (2 layers) of p512-identical with each.
# `bench`: scripts/gpu/disk_read.py (what the local disk gives a cold 27 MB adapter file, by read pattern:
# the baseline of the cold adapter load), then bench.sh's whole benchmark; its summary prints the measured
# GEMM rates and both TTFT ratios.
set -u
part=${1:?usage: next_call.sh uploads|bench|bench-only|gemm-sweep|sweep-bench|decode-steps|feed|feed-bench|stable-sigs|graphs-bench|expand|profile|round|detail-bench|tc|prompt|mlp|expand-tiles|vx|attn|sm90|sm90-bench|golden-bench|validation|long|gemm|gemm-ab}
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
red=-DLORA_EXPAND_RED=1
# Golden against transformers + peft with the silu product on gemm_sm90_silu_t for every gate/up product of any size
# (session 45; the default runs it only where its tiles fill their work, which golden's small models never do).
golden_silu_t() {
    LORAX_CUDA_GEMM_SM90=silu LORAX_CUDA_GEMM_SM90_SWAP=1 LORAX_CUDA_GEMM_SM90_ROWS=1 timeout 150 \
        "$bin/cuda_golden" --test-threads=2 >"$R/golden-silu-t.txt" 2>&1
    echo "rc $?" >>"$R/golden-silu-t.txt"
    lap golden-silu-t
}
# The Hopper silu epilogues against silu_mul bit for bit, the default's choice of sizes, silu_mul against the CPU
# (`gemm-sweep`, `sweep-bench`, `decode-steps` with DECODE_STEPS_KERNELS=1).
gemm_kernel_tests() {
    timeout 200 "$bin/cuda_kernels" gemm_sm90_silu_is_silu_mul_bit_for_bit gemm_sm90_auto_runs_where_its_tiles_fill \
        elementwise_ops_match_cpu --nocapture >"$R/kernels.txt" 2>&1
    echo "rc $?" >>"$R/kernels.txt"
    lap kernels
}
# bench.sh with the defaults (`bench`, `bench-only`, `sweep-bench`).
bench_defaults() {
    BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=135 timeout 400 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
    echo "rc $?" >>"$R/bench.txt"
    lap bench
}
# The fed steps' GPU tests (`feed`, `feed-bench`): cuda_graphs (fed_steps_equal_steps_launched_by_the_host) and
# cuda_chunked (steps_launched_ahead_match_prefill_then_decode), which set feeding themselves.
feed_tests() {
    timeout 150 "$bin/cuda_graphs" --test-threads=1 --nocapture >"$R/graphs.txt" 2>&1
    echo "rc $?" >>"$R/graphs.txt"
    lap graphs
    timeout 100 "$bin/cuda_chunked" --test-threads=1 --nocapture >"$R/chunked.txt" 2>&1
    echo "rc $?" >>"$R/chunked.txt"
    lap chunked
}
# `validation` (and the start of `golden-bench`): router/examples/validation_timing on this host (session 49: on
# the 2-core development machine a 1000-token prompt's validation took 0.18-0.24 ms back to back and 0.62-1.08 ms
# after 20 ms of rest; the server's TTFT test read 0.40-0.67 ms on GPU hosts).
validation_timing() {
    timeout 60 "$bin/validation_timing" tests/fixtures/tokenizer/tokenizer.json >"$R/validation.txt" 2>&1
    echo "rc $?" >>"$R/validation.txt"
    lap validation
}
# `decode-steps` (and the end of `stable-sigs`).
decode_steps() {
    # Session 46: the base step at 128 streams and the four regimes (no TTFT, cold loads or peft), with the shard's
    # host-time and graph timing reports; first the graphs test, whose replays are timed on the device
    # (graph_device_time). DECODE_STEPS_KERNELS=1: gemm-sweep's kernel tests first (not its GEMM times);
    # DECODE_STEPS_GRAPHS=0: no graphs test; DECODE_STEPS_LOG=1: the graph module's debug lines (each capture and each step
    # run eagerly for a new signature, with its rows and LoRA records) in the log and in graph-log.txt.
    [ "${DECODE_STEPS_KERNELS:-0}" = 1 ] && gemm_kernel_tests
    if [ "${DECODE_STEPS_GRAPHS:-1}" = 1 ]; then
        timeout 150 "$bin/cuda_graphs" decode_steps_through_graphs_equal_eager_steps --nocapture >"$R/graphs.txt" 2>&1
        echo "rc $?" >>"$R/graphs.txt"
        lap graphs
    fi
    envs=(BENCH_PARTS=sweep,regimes BENCH_SWEEP=128 BENCH_PEFT=0 BENCH_TIMEOUT=200 BENCH_PEFT_BUDGET=0)
    [ "${DECODE_STEPS_LOG:-0}" = 1 ] && envs+=(RUST_LOG=info,lorax_engine::backend::cuda::graph=debug)
    env "${envs[@]}" timeout 210 scripts/gpu/bench.sh "$R/regimes" "$bin" >"$R/regimes.txt" 2>&1
    echo "rc $?" >>"$R/regimes.txt"
    if [ "${DECODE_STEPS_LOG:-0}" = 1 ]; then
        sed 's/\x1b\[[0-9;]*m//g' "$R/regimes/bench-server.log" |
            grep "run eagerly\|CUDA graph capture\|graph steps: host\|decode steps: host" >"$R/graph-log.txt"
    fi
    lap regimes
}
case $part in
uploads)
    timeout 150 "$bin/cuda_adapters" --test-threads=1 --nocapture >"$R/adapters.txt" 2>&1
    echo "rc $?" >>"$R/adapters.txt"
    lap adapters
    RUN_SKIP="nvrtc kernels adapters sampling bench chunked" timeout 300 scripts/gpu/run.sh "$R/run" "$bin" \
        >"$R/run.txt" 2>&1
    echo "rc $?" >>"$R/run.txt"
    lap run
    ;;
expand)
    timeout 200 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora.txt"
    lap lora
    LORAX_CUDA_DEFINES=$red timeout 200 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora-red.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora-red.txt"
    lap lora-red
    for round in 1 2; do
        for x in b128-a8 b128-distinct; do
            profile_step "$x" "load-$round"
            profile_step "$x" "red-$round" LORAX_CUDA_DEFINES=$red
        done
    done
    lap steps
    LORAX_CUDA_DEFINES=$red RUN_SKIP="nvrtc kernels sampling bench chunked" timeout 150 scripts/gpu/run.sh "$R/run-red" "$bin" \
        >"$R/run-red.txt" 2>&1
    echo "rc $?" >>"$R/run-red.txt"
    lap run-red
    ;;
profile)
    LORAX_PROFILE_DETAIL=m64x8-a8 timeout 330 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" m64x8 m64x8-a8 p1000 \
        >"$R/ncu.txt" 2>&1
    echo "rc $?" >>"$R/ncu.txt"
    lap ncu
    for x in m64x8 m64x8-a8; do
        profile_step "$x" eager
    done
    lap steps
    ;;
validation)
    validation_timing
    ;;
round | golden-bench)
    [ "$part" = golden-bench ] && validation_timing
    # One call for a session with little device time left (session 28): graphs and e2e, then the whole bench;
    # `golden-bench` (session 43, the first call with the Hopper prefill attention the default) runs golden's
    # checks against transformers + peft too. No disk read figures, to fit 600 s. (Session 28's call 2 also
    # timed the o LoRA expand inside the norm, since removed: `git show e20fd8e:scripts/gpu/next_call.sh`.)
    skip="nvrtc kernels adapters sampling bench chunked"
    [ "$part" = round ] && skip="$skip golden"
    # GOLDEN_SILU_T=1: golden_silu_t first, about 60 s more (session 45 call 2: 469 s in all; its timeouts add up
    # past the device's 600 s if all ran long).
    [ "${GOLDEN_SILU_T:-0}" = 1 ] && golden_silu_t
    RUN_SKIP="$skip" timeout 150 scripts/gpu/run.sh "$R/run" "$bin" >"$R/run.txt" 2>&1
    echo "rc $?" >>"$R/run.txt"
    lap run
    BENCH_TIMEOUT=380 BENCH_PEFT_BUDGET=130 timeout 390 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
    echo "rc $?" >>"$R/bench.txt"
    lap bench
    ;;
detail-bench)
    # Session 30: where the LoRA kernels of a 128-row step with one adapter spend their time (ncu's detail
    # sections, stalls included) and what a 1000-token prompt's kernels reach; then bench.sh with the
    # router's one-thread handling (40aea91).
    LORAX_PROFILE_DETAIL="b128-identical p1000" timeout 200 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" \
        b128-identical p1000 >"$R/ncu.txt" 2>&1
    echo "rc $?" >>"$R/ncu.txt"
    lap ncu
    BENCH_TIMEOUT=330 BENCH_PEFT_BUDGET=120 timeout 340 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
    echo "rc $?" >>"$R/bench.txt"
    lap bench
    ;;
tc)
    # Session 30: the decode LoRA shrink on the tensor cores (bgmv_shrink_tc*, the default for 16-bit storage):
    # the LoRA kernel tests with it and on the CUDA cores (LORAX_CUDA_LORA_SHRINK=simt), golden (bf16/f16
    # logits with adapters against transformers + peft), graphs and e2e, both shrinks' kernel times under ncu,
    # 32-layer steps through graphs with each shrink (two rounds, interleaved), then bench.sh. Call 2 ran it as of 9588979,
    # call 3 with the expand on the tensor cores too (since removed) as of 1051043.
    simt="LORAX_CUDA_LORA_SHRINK=simt"
    timeout 120 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora-tc.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora-tc.txt"
    env $simt timeout 60 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora-simt.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora-simt.txt"
    lap lora
    RUN_SKIP="nvrtc kernels adapters sampling bench chunked" timeout 120 scripts/gpu/run.sh "$R/run" "$bin" \
        >"$R/run.txt" 2>&1
    echo "rc $?" >>"$R/run.txt"
    lap run
    LORAX_PROFILE_DETAIL="" timeout 60 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" b128-identical b128-distinct \
        >"$R/ncu.txt" 2>&1
    echo "rc $?" >>"$R/ncu.txt"
    # The CUDA-core shrink's kernel times on the same card (session 30 had them from H200s only).
    env $simt LORAX_PROFILE_DETAIL="" timeout 60 scripts/gpu/kernel_profile.sh "$R/ncu-simt" "$bin" b128-identical \
        b128-distinct >"$R/ncu-simt.txt" 2>&1
    echo "rc $?" >>"$R/ncu-simt.txt"
    lap ncu
    for round in 1 2; do
        for x in b128-identical b128-distinct; do
            profile_step "$x" "tc-$round" LORAX_PROFILE_GRAPHS=1
            profile_step "$x" "simt-$round" LORAX_PROFILE_GRAPHS=1 $simt
        done
    done
    lap steps
    BENCH_TIMEOUT=300 BENCH_PEFT_BUDGET=110 timeout 310 scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
    echo "rc $?" >>"$R/bench.txt"
    lap bench
    ;;
expand-tiles)
    for ct in auto 1 2; do
        LORAX_CUDA_LORA_EXPAND_TILES=$ct LORAX_PROFILE_DETAIL="" timeout 90 scripts/gpu/kernel_profile.sh \
            "$R/ncu-$ct" "$bin" b128-identical-all b128-a32-all >"$R/ncu-$ct.txt" 2>&1
        echo "rc $?" >>"$R/ncu-$ct.txt"
    done
    lap ncu
    for ct in auto 1 2; do
        for x in b128-identical-all b128-a32-all b128-distinct; do
            profile_step "$x" "tiles-$ct" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_EXPAND_TILES=$ct
        done
    done
    lap steps
    ;;
vx)
    # In order of what decides: the kernel tests, one round of steps, ncu, golden/e2e, a second round.
    ix="LORAX_CUDA_LORA_EXPAND=ix"
    export LORAX_CUDA_LORA_EXPAND=vx
    scen="b128-identical b128-distinct b128-identical-all b128-a32-all"
    timeout 120 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora.txt"
    lap lora
    for x in $scen; do
        profile_step "$x" "vx-1" LORAX_PROFILE_GRAPHS=1
        profile_step "$x" "ix-1" LORAX_PROFILE_GRAPHS=1 $ix
    done
    for x in b128-identical b128-identical-all; do
        profile_step "$x" "vx4-1" LORAX_PROFILE_GRAPHS=1 LORAX_CUDA_LORA_EXPAND_ROWS=4
    done
    lap steps
    # VX_NCU=0 skips the kernel times (up to 360 s) when little device time is left.
    if [ "${VX_NCU:-1}" = 1 ]; then
        LORAX_PROFILE_DETAIL="" timeout 180 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" $scen >"$R/ncu.txt" 2>&1
        echo "rc $?" >>"$R/ncu.txt"
        env $ix LORAX_PROFILE_DETAIL="" timeout 180 scripts/gpu/kernel_profile.sh "$R/ncu-ix" "$bin" $scen \
            >"$R/ncu-ix.txt" 2>&1
        echo "rc $?" >>"$R/ncu-ix.txt"
        lap ncu
    fi
    RUN_SKIP="nvrtc kernels adapters sampling bench chunked" timeout 120 scripts/gpu/run.sh "$R/run" "$bin" \
        >"$R/run.txt" 2>&1
    echo "rc $?" >>"$R/run.txt"
    lap run
    for x in $scen; do
        profile_step "$x" "ix-2" LORAX_PROFILE_GRAPHS=1 $ix
        profile_step "$x" "vx-2" LORAX_PROFILE_GRAPHS=1
    done
    lap steps2
    ;;
prompt)
    gemm="LORAX_CUDA_LORA_PROMPT=gemm"
    timeout 120 "$bin/cuda_kernels" lora --nocapture --test-threads 2 >"$R/kernels-lora.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora.txt"
    timeout 120 "$bin/cuda_golden" lora --nocapture --test-threads 1 >"$R/golden-lora.txt" 2>&1
    echo "rc $?" >>"$R/golden-lora.txt"
    lap tests
    for round in 1 2; do
        for x in p512-identical p1000-identical m64x8-a8; do
            profile_step "$x" "tc-$round"
            profile_step "$x" "gemm-$round" $gemm
        done
    done
    profile_step p512 base
    lap steps
    LORAX_PROFILE_DETAIL="" timeout 60 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" p512-identical >"$R/ncu.txt" 2>&1
    echo "rc $?" >>"$R/ncu.txt"
    env $gemm LORAX_PROFILE_DETAIL="" timeout 60 scripts/gpu/kernel_profile.sh "$R/ncu-gemm" "$bin" p512-identical \
        >"$R/ncu-gemm.txt" 2>&1
    echo "rc $?" >>"$R/ncu-gemm.txt"
    lap ncu
    ;;
mlp)
    simt="LORAX_CUDA_LORA_SHRINK=simt"
    LORAX_PROFILE_DETAIL="" timeout 90 scripts/gpu/kernel_profile.sh "$R/ncu" "$bin" b128-identical-all \
        b128-a32-all >"$R/ncu.txt" 2>&1
    echo "rc $?" >>"$R/ncu.txt"
    env $simt LORAX_PROFILE_DETAIL="" timeout 90 scripts/gpu/kernel_profile.sh "$R/ncu-simt" "$bin" \
        b128-identical-all b128-a32-all >"$R/ncu-simt.txt" 2>&1
    echo "rc $?" >>"$R/ncu-simt.txt"
    lap ncu
    for round in 1 2; do
        for x in b128-identical-all b128-a32-all; do
            profile_step "$x" "tc-$round" LORAX_PROFILE_GRAPHS=1
            profile_step "$x" "simt-$round" LORAX_PROFILE_GRAPHS=1 $simt
        done
    done
    lap steps
    ;;
attn)
    timeout 90 python3 scripts/gpu/attn_probe.py >"$R/attn.txt" 2>&1
    echo "rc $?" >>"$R/attn.txt"
    timeout 150 "$bin/cuda_bench" --ignored --exact prefill_benchmarks --nocapture >"$R/prefill.txt" 2>&1
    echo "rc $?" >>"$R/prefill.txt"
    lap attention
    ;;
sm90)
    # The Hopper prefill attention's forms (ws64 and ws128: 64 and 128 keys a step) against the CPU (attention_matches_cpu: every case, its Hopper passes among them), timed beside the
    # tensor-core kernel's shapes, 32-layer eager p1000 steps off and in each form that passed (two rounds in
    # opposite orders; SM90_ROUNDS=1: the first round only, 0: none). Then `sm90-bench` with the fastest (printed last) runs
    # bench.sh with it on.
    timeout 200 "$bin/cuda_kernels" --exact attention_matches_cpu --nocapture >"$R/kernels.txt" 2>&1
    echo "rc $?" >>"$R/kernels.txt"
    lap kernels
    timeout 150 "$bin/cuda_bench" --ignored --exact prefill_benchmarks --nocapture >"$R/prefill.txt" 2>&1
    echo "rc $?" >>"$R/prefill.txt"
    lap prefill
    # The test runs the forms in order and stops at the first that fails: every form before it passed.
    seen=$(sed -n 's/.*the Hopper prefill kernel, form \([a-z0-9]*\)$/\1/p' "$R/kernels.txt")
    if grep -q "test result: ok. 1 passed" "$R/kernels.txt"; then
        forms=$(echo $seen | tr ' ' '\n' | awk '!s[$0]++' | xargs)
    else
        last=$(echo "$seen" | tail -1)
        forms=$(echo "$seen" | awk -v x="$last" '$0 != x && !s[$0]++' | xargs)
    fi
    echo "forms that passed: ${forms:-none}" | tee -a "$R/laps.txt"
    if [ -n "$forms" ] && [ "${SM90_ROUNDS:-2}" -ge 1 ]; then
        for on in 0 $forms; do profile_step p1000 "sm90=$on round 1" LORAX_CUDA_PREFILL_SM90=$on; done
        if [ "${SM90_ROUNDS:-2}" -ge 2 ]; then
            for on in $(echo $forms | tr ' ' '\n' | tac) 0; do profile_step p1000 "sm90=$on round 2" LORAX_CUDA_PREFILL_SM90=$on; done
        fi
        lap steps
    fi
    best=$(awk '/^prefill tiles auto:/ {l = "auto"} /^prefill tiles w/ {l = ""}
        /sm90\), form / {l = $NF; sub(":", "", l)}
        /^BENCH prefill_attention_tc_len1000_h32kv8/ && l != "" {split($0, a, "|"); v[l] = a[2] + 0}
        END {b = 0; bv = v["auto"]; for (k in v) if (k != "auto" && index(" " f " ", " " k " ") && v[k] < bv) {b = k; bv = v[k]}
        print b}' f="$forms" "$R/prefill.txt")
    echo "prefill_benchmarks at 1000 tokens: the fastest Hopper form that passed: $best (0: none faster)" | tee -a "$R/laps.txt"
    ;;
long)
    # Session 43: what the default's choice by length (auto: ws128 from 8192 keys of the longest prompt) does to
    # a long prompt's whole step, against ws64 throughout (call 2: ws128 12% faster alone at 16384 tokens).
    for round in 1 2; do
        for x in p8192 p16384; do
            profile_step "$x" "auto-$round"
            profile_step "$x" "ws64-$round" LORAX_CUDA_PREFILL_SM90=ws64
        done
    done
    lap steps
    ;;
gemm)
    # Session 44: the Hopper prompt GEMM. Its tests (plain product against the CPU and cuBLAS, the silu-mul
    # epilogue against cuBLAS + silu_mul), its times against cuBLAS per shape and row count, golden against
    # transformers + peft with it running every product of any size (LORAX_CUDA_GEMM_SM90_ROWS=1: decode steps
    # and graphs too), then 32-layer eager steps of a 1000-token prompt and of the peft workload's mixed step
    # with it off, on the gate/up product only (silu) and on that and the o and down products with the residual
    # add (fused), two rounds in opposite orders.
    timeout 150 "$bin/cuda_kernels" --exact gemm_sm90_matches_cpu_and_cublas --nocapture >"$R/kernels.txt" 2>&1
    echo "rc $?" >>"$R/kernels.txt"
    lap kernels
    timeout 200 "$bin/cuda_bench" --ignored --exact gemm_sm90_benchmarks --nocapture >"$R/gemm.txt" 2>&1
    echo "rc $?" >>"$R/gemm.txt"
    lap bench
    if grep -q "test result: ok. 1 passed" "$R/kernels.txt"; then
        LORAX_CUDA_GEMM_SM90=all LORAX_CUDA_GEMM_SM90_ROWS=1 timeout 150 "$bin/cuda_golden" --test-threads=2 \
            >"$R/golden-all.txt" 2>&1
        echo "rc $?" >>"$R/golden-all.txt"
        lap golden
        # GEMM_NCU=1: ncu's detail of a 2-layer 1000-token prompt's kernels with every product on ours, and on
        # cuBLAS (speed of light, memory and L2 throughput, stalls).
        if [ "${GEMM_NCU:-0}" = 1 ]; then
            for v in all 0; do
                LORAX_PROFILE_LAYERS=2 LORAX_CUDA_GEMM_SM90=$v LORAX_PROFILE_DETAIL=p1000 timeout 150 \
                    scripts/gpu/kernel_profile.sh "$R/ncu-$v" "$bin" p1000 >"$R/ncu-$v.txt" 2>&1
                echo "rc $?" >>"$R/ncu-$v.txt"
            done
            lap ncu
        fi
        for v in 0 silu fused; do
            for x in p1000 m64x8; do profile_step "$x" "gemm=$v round 1" LORAX_CUDA_GEMM_SM90=$v; done
        done
        for v in fused silu 0; do
            for x in p1000 m64x8; do profile_step "$x" "gemm=$v round 2" LORAX_CUDA_GEMM_SM90=$v; done
        done
        lap steps
    fi
    ;;
gemm-ab)
    # Session 44: the Hopper prompt GEMM's test (both silu forms), its times at 1000 and 4160 rows (GEMM_AB_C1=1:
    # also in clusters of one block, -DGM_CLUSTER=1), then 32-layer eager p1000 steps off and with the silu
    # product on gemm_sm90_silu_t (LORAX_CUDA_GEMM_SM90_SWAP=1), two rounds in opposite orders.
    timeout 150 "$bin/cuda_kernels" --exact gemm_sm90_matches_cpu_and_cublas --nocapture >"$R/kernels.txt" 2>&1
    echo "rc $?" >>"$R/kernels.txt"
    lap kernels
    for c in 2 $([ "${GEMM_AB_C1:-0}" = 1 ] && echo 1); do
        LORAX_CUDA_DEFINES="-DGM_CLUSTER=$c" GEMM_BENCH_ROWS="${GEMM_ROWS:-512 1000 2048 4160}" GEMM_BENCH_ROUNDS=1 timeout 120 \
            "$bin/cuda_bench" --ignored --exact gemm_sm90_benchmarks --nocapture >"$R/gemm-c$c.txt" 2>&1
        echo "rc $?" >>"$R/gemm-c$c.txt"
    done
    lap bench
    if grep -q "test result: ok. 1 passed" "$R/kernels.txt"; then
        t=(LORAX_CUDA_GEMM_SM90=silu LORAX_CUDA_GEMM_SM90_SWAP=1)
        # GEMM_AB_GOLDEN=1: golden_silu_t (session 45 call 1).
        [ "${GEMM_AB_GOLDEN:-0}" = 1 ] && golden_silu_t
        profile_step p1000 "off round 1" LORAX_CUDA_GEMM_SM90=0
        profile_step p1000 "silu_t round 1" "${t[@]}"
        # GEMM_ONE_ROUND=1: one round of steps (a short call).
        if [ "${GEMM_ONE_ROUND:-0}" != 1 ]; then
            profile_step p1000 "silu_t round 2" "${t[@]}"
            profile_step p1000 "off round 2" LORAX_CUDA_GEMM_SM90=0
        fi
        lap steps
        # (Session 44's GEMM_AB_BENCH, bench.sh with it on when its steps were faster, went with the default: run
        # `bench-only`.)
    fi
    ;;
gemm-sweep | sweep-bench)
    # Session 45: the silu epilogues against silu_mul bit for bit, the default's choice of sizes, silu_mul (silu_f)
    # against the CPU, then the GEMM's times at a sweep of row counts (GEMM_ROWS) to check silu_t_fill's cut.
    # sweep-bench (session 46): then bench.sh with the defaults, as `bench-only`.
    gemm_kernel_tests
    GEMM_BENCH_ROWS="${GEMM_ROWS:-768 864 968 1000 1152 1296 1440 1728 2016 2048 2160 2592 3024 3600 4160}" \
        GEMM_BENCH_ROUNDS=1 timeout 200 "$bin/cuda_bench" --ignored --exact gemm_sm90_benchmarks --nocapture \
        >"$R/gemm-sweep.txt" 2>&1
    echo "rc $?" >>"$R/gemm-sweep.txt"
    lap gemm-bench
    [ "$part" = sweep-bench ] && bench_defaults
    ;;
stable-sigs)
    # Session 46: block tables and LoRA records uploaded at sizes set by the step's rows (stable graph
    # signatures). Graphs against eager steps, the LoRA step against the CPU, golden against transformers + peft,
    # then the regimes once with the graph module's debug lines (as `DECODE_STEPS_LOG=1 decode-steps`).
    timeout 120 "$bin/cuda_graphs" steps_through_graphs_equal_eager_steps --nocapture >"$R/graphs.txt" 2>&1
    echo "rc $?" >>"$R/graphs.txt"
    lap graphs
    timeout 90 "$bin/cuda_kernels" lora_step_matches_cpu --nocapture >"$R/kernels-lora.txt" 2>&1
    echo "rc $?" >>"$R/kernels-lora.txt"
    lap kernels-lora
    timeout 120 "$bin/cuda_golden" --test-threads=2 >"$R/golden.txt" 2>&1
    echo "rc $?" >>"$R/golden.txt"
    lap golden
    DECODE_STEPS_LOG=1 DECODE_STEPS_GRAPHS=0 decode_steps
    ;;
decode-steps)
    decode_steps
    ;;
feed)
    # Session 47: decode steps launched by the step before's sampling, their tokens gathered on the device
    # (LORAX_CUDA_GRAPH_FEED=1; the default on one GPU since session 49). graphs (fed_steps_equal_steps_launched_by_the_host), chunked
    # (steps_launched_ahead_match_prefill_then_decode), golden and e2e against transformers + peft (fed); then the base step
    # at 128 streams and the four regimes fed and not fed on this one machine, and fed again where time is left.
    feed_tests
    LORAX_CUDA_GRAPH_FEED=1 timeout 100 "$bin/cuda_golden" --test-threads=2 >"$R/golden.txt" 2>&1
    echo "rc $?" >>"$R/golden.txt"
    lap golden
    mkdir -p "$R/e2e"
    LORAX_CUDA_GRAPH_FEED=1 timeout 100 python3 scripts/gpu/e2e.py "$bin" "$R/e2e" >"$R/e2e.txt" 2>&1
    echo "rc $?" >>"$R/e2e.txt"
    lap e2e
    # FEED_RUNS: the bench runs, in order (default "fed nofeed fed2").
    for run in ${FEED_RUNS:-fed nofeed fed2}; do
        [ "$run" = fed2 ] && [ "$SECONDS" -gt 430 ] && break
        envs=(BENCH_PARTS=sweep,regimes BENCH_SWEEP=128 BENCH_PEFT=0 BENCH_TIMEOUT=130 BENCH_PEFT_BUDGET=0)
        if [ "$run" = nofeed ]; then envs+=(LORAX_CUDA_GRAPH_FEED=0); else envs+=(LORAX_CUDA_GRAPH_FEED=1); fi
        env "${envs[@]}" timeout 135 scripts/gpu/bench.sh "$R/$run" "$bin" >"$R/$run.txt" 2>&1
        echo "rc $?" >>"$R/$run.txt"
        lap "$run"
    done
    ;;
feed-bench)
    # Session 48: fed steps with prompts waiting for the step after one launched ahead (0fcdcb1). feed_tests
    # (cuda_chunked's case now asserts that prompts waited, and that the tokens still equal prefill then decode), then
    # bench.sh with LORAX_CUDA_GRAPH_FEED=1: the cold-load ITL row (13.4 ms gaps at joins in 2026-12-07-s48-2) should
    # be back near the 8.6-10.8 ms of runs without feeding, with the regimes at call s48-1's fed steps. Both held in
    # session 49 (2026-12-07-s49-1: 9.05 ms, +0.44 steps; regimes 79%), and feeding became the default on one GPU.
    feed_tests
    export LORAX_CUDA_GRAPH_FEED=1
    bench_defaults
    ;;
sm90-bench)
    # bench.sh with the Hopper prefill attention's form FORM on (LORAX_CUDA_PREFILL_SM90 passes through the
    # launcher to the shard).
    LORAX_CUDA_PREFILL_SM90=${FORM:?FORM=ws64|ws128} BENCH_TIMEOUT=390 BENCH_PEFT_BUDGET=135 timeout 400 \
        scripts/gpu/bench.sh "$R/bench" "$bin" >"$R/bench.txt" 2>&1
    echo "rc $?" >>"$R/bench.txt"
    lap bench
    ;;
graphs-bench | bench | bench-only)
    if [ "$part" = graphs-bench ]; then
        RUN_SKIP="nvrtc kernels adapters sampling bench chunked" timeout 150 scripts/gpu/run.sh "$R/run" "$bin" \
            >"$R/run.txt" 2>&1
        echo "rc $?" >>"$R/run.txt"
        lap run
    fi
    # bench-only (session 45): bench.sh alone, with the defaults.
    if [ "$part" != bench-only ]; then
        timeout 90 python3 scripts/gpu/disk_read.py /tmp/lorax-disk-read 27 24 >"$R/disk.txt" 2>&1
        echo "rc $?" >>"$R/disk.txt"
        lap disk
    fi
    bench_defaults
    ;;
*)
    echo "unknown part $part (uploads, bench, feed, feed-bench, bench-only, gemm-sweep, sweep-bench, decode-steps, stable-sigs, graphs-bench, expand, profile, round, detail-bench, tc, prompt, mlp, expand-tiles, vx, attn, sm90, sm90-bench, golden-bench, validation, long, gemm or gemm-ab)" >&2
    exit 2
    ;;
esac
tar -C "$OUT" -czf "$OUT/all.tgz" r
