# Session 27 call 5, on an NVIDIA H200 (nvidia-h200), binaries of c75b633 (.gpu-bin-serve, scripts/gpu/build.sh), from the
# repository root; a short call for the device time left (bench.py without the peft comparison, whose budget was 0):
bin=.gpu-bin-serve; . scripts/gpu/call_prelude.sh
timeout 70 "$bin/cuda_graphs" --include-ignored --test-threads=1 --nocapture > "$R/graphs.txt" 2>&1; echo "rc $?" >> "$R/graphs.txt"; lap graphs
BENCH_TIMEOUT=150 BENCH_PEFT_BUDGET=0 timeout 165 scripts/gpu/bench.sh "$R/bench" "$bin" > "$R/bench.txt" 2>&1; echo "rc $?" >> "$R/bench.txt"; lap bench
