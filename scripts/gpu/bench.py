"""First serving benchmark on one GPU (the benchmark issue's workload, without the transformers + peft
baseline yet): a Mistral-7B-shaped bf16 model on dummy weights (`--load-format dummy`), 1000 random rank-16
q/k/v/o adapters made by `lorax-bench make-adapters`, and `lorax-bench run` for

  - base-model decode at 1, 32 and 128 concurrent streams (512-token prompts, 256 new tokens);
  - the four popularity regimes (identical, uniform, Zipf(1), all distinct) over the 1000 adapters at 128
    streams;
  - cold adapter loads: 8 never-seen adapters one at a time (TTFT against the base model's, and the
    shard's own load-duration histogram);
  - TTFT of a 1000-token prompt.

Each throughput is compared with its memory roofline: per decode step, the weights + the KV cache read +
the distinct adapters' weights, over the copy bandwidth measured in the same run (BENCH_COPY_GBS).

    python3 scripts/gpu/bench.py BIN_DIR LOG_DIR
"""

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import MISTRAL_7B_SHAPE, dummy_server_args, start_launcher, stop_launcher, write_dummy_model  # noqa: E402

BIN, LOGS = sys.argv[1], sys.argv[2]
WORK = "/tmp/lorax-bench"
COPY_GBS = float(os.environ.get("BENCH_COPY_GBS", "4200"))
# cuBLAS bf16 GEMM rate measured on this GPU before (bench/NOTES.md: 772-804 TFLOP/s).
GEMM_TFLOPS = float(os.environ.get("BENCH_GEMM_TFLOPS", "790"))
CFG = dict(MISTRAL_7B_SHAPE)
PROMPT, OUT, STREAMS, N_ADAPTERS, RANK = 512, 256, 128, 1000, 16
if os.environ.get("BENCH_TINY") == "1":  # a dry run of the script on a CPU: tiny shape, small counts
    CFG.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    PROMPT, OUT, STREAMS, N_ADAPTERS = 64, 8, 8, 20


def say(line):
    print(line, flush=True)
    with open(f"{LOGS}/bench-summary.txt", "a") as f:
        f.write(line + "\n")


def weight_bytes():
    h, f, v, L = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], CFG["num_hidden_layers"]
    kv = CFG["num_key_value_heads"] * (h // CFG["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return 2 * (2 * v * h + L * per_layer + h)


def kv_bytes_per_token():
    h, L = CFG["hidden_size"], CFG["num_hidden_layers"]
    kv = CFG["num_key_value_heads"] * (h // CFG["num_attention_heads"])
    return 2 * L * kv * 2


def adapter_bytes():
    h = CFG["hidden_size"]
    kv = CFG["num_key_value_heads"] * (h // CFG["num_attention_heads"])
    per_layer = RANK * (h + h) + 2 * RANK * (h + kv) + RANK * (h + h)
    return 2 * CFG["num_hidden_layers"] * per_layer


def roofline_tok_s(batch, distinct_adapters):
    """Tokens/s if each decode step only read its bytes at the copy bandwidth (mean context PROMPT + OUT/2)."""
    step_bytes = weight_bytes() + batch * (PROMPT + OUT / 2) * kv_bytes_per_token() + distinct_adapters * adapter_bytes()
    return batch / (step_bytes / (COPY_GBS * 1e9))


def bench(name, *args):
    out = f"{LOGS}/{name}.json"
    cmd = [f"{BIN}/lorax-bench", "run", "--url", BASE, "--label", name, "--out", out, *args]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        say(f"BENCH {name} FAILED: {r.stderr.strip()[-400:]}")
        return None
    rep = json.load(open(out))["report"]
    say(f"BENCH {name} ({time.time() - t:.0f}s) {r.stdout.strip().splitlines()[-1]}")
    return rep


def main():
    os.makedirs(LOGS, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    model = f"{WORK}/mistral-7b-shape"
    write_dummy_model(model, CFG)
    t = time.time()
    subprocess.run([f"{BIN}/lorax-bench", "make-adapters", "--config", f"{model}/config.json", "--count",
                    str(N_ADAPTERS), "--rank", str(RANK), "--out", f"{WORK}/adapters"], check=True)
    subprocess.run([f"{BIN}/lorax-bench", "make-adapters", "--config", f"{model}/config.json", "--count", "8",
                    "--rank", str(RANK), "--seed", "99", "--name-template", "cold-{i}", "--out", f"{WORK}/adapters"],
                   check=True)
    say(f"BENCH adapters: {N_ADAPTERS} rank-{RANK} q/k/v/o written in {time.time() - t:.1f}s, "
        f"{adapter_bytes() / 1e6:.1f} MB each; weights {weight_bytes() / 1e9:.2f} GB; copy {COPY_GBS:.0f} GB/s")
    global BASE
    t = time.time()
    try:
        srv, BASE = start_launcher(BIN, dummy_server_args(model, f"{WORK}/adapters"), f"{LOGS}/bench-server.log")
    except RuntimeError as e:
        say(f"BENCH {e}")
        return 1
    try:
        say(f"BENCH server up in {time.time() - t:.0f}s")
        lens = ["--prompt-tokens", str(PROMPT), "--output-tokens", str(OUT)]
        # Cold adapter loads, one at a time, against the base model's TTFT.
        base1 = bench("ttft-base-512", "--concurrency", "1", "--requests", "8", "--warmup", "2",
                      "--prompt-tokens", "512", "--output-tokens", "1")
        cold = bench("ttft-cold-adapter-512", "--concurrency", "1", "--requests", "8", "--prompt-tokens", "512",
                     "--output-tokens", "1", "--popularity", "distinct", "--num-adapters", "8",
                     "--adapter-id-template", "cold-{i}")
        if base1 and cold:
            say(f"BENCH cold adapter load: TTFT p50 {cold['ttft_ms']['p50']:.1f} ms vs base {base1['ttft_ms']['p50']:.1f} ms "
                f"(+{cold['ttft_ms']['p50'] - base1['ttft_ms']['p50']:.1f} ms)")
        long = bench("ttft-1000", "--concurrency", "1", "--requests", "8", "--prompt-tokens", "1000",
                     "--output-tokens", "1")
        if long:
            flops = 2 * (weight_bytes() / 2) * 1000 + 4 * CFG["num_hidden_layers"] * CFG["hidden_size"] * 1000 * 1000 / 2
            roof_ms = flops / (GEMM_TFLOPS * 1e12) * 1e3
            say(f"BENCH TTFT of a 1000-token prompt: p50 {long['ttft_ms']['p50']:.1f} ms, compute roofline "
                f"{roof_ms:.1f} ms ({GEMM_TFLOPS:.0f} TFLOP/s), ratio {long['ttft_ms']['p50'] / roof_ms:.2f}")
        results = {}
        for c in sorted({1, 32, STREAMS}):
            n = max(4, 2 * c)
            results[f"base-c{c}"] = (bench(f"base-c{c}", "--concurrency", str(c), "--requests", str(n),
                                           "--warmup", str(min(c, 8)), *lens), c, 0)
        for regime in ("identical", "uniform", "zipf:1", "distinct"):
            name = f"{regime.replace(':', '')}-c{STREAMS}"
            rep = bench(name, "--concurrency", str(STREAMS), "--requests", str(2 * STREAMS), "--warmup", "16",
                        "--popularity", regime, "--num-adapters", str(N_ADAPTERS), *lens)
            distinct = 1 if regime == "identical" else min(STREAMS, rep["distinct_adapters"]) if rep else STREAMS
            results[name] = (rep, STREAMS, distinct)
        try:
            metrics = urllib_get(f"{BASE}/metrics")
            for line in metrics.splitlines():
                if line.startswith("lorax_adapter_load_duration_sum") or line.startswith("lorax_adapter_load_duration_count"):
                    say(f"BENCH {line}")
                if line.startswith("lorax_adapter_load_duration{") or line.startswith("lorax_adapter_load_duration_bucket"):
                    say(f"BENCH {line}")
        except Exception as e:  # noqa: BLE001
            say(f"BENCH metrics unavailable: {e}")
        say("")
        say("| run | streams | tok/s | roofline tok/s | share | TTFT p50 ms | TPOT p50 ms | errors |")
        say("|---|---|---|---|---|---|---|---|")
        base_c = results.get(f"base-c{STREAMS}", (None,))[0]
        for name, (rep, c, distinct) in results.items():
            if not rep:
                say(f"| {name} | {c} | failed | | | | | |")
                continue
            roof = roofline_tok_s(c, distinct)
            say(f"| {name} | {c} | {rep['output_tok_s']:.0f} | {roof:.0f} | {rep['output_tok_s'] / roof:.0%} | "
                f"{rep['ttft_ms']['p50']:.0f} | {rep['tpot_ms']['p50']:.2f} | {sum(rep['errors'].values())} |")
        if base_c:
            for name, (rep, c, _) in results.items():
                if rep and not name.startswith("base"):
                    say(f"BENCH {name}: {rep['output_tok_s'] / base_c['output_tok_s']:.0%} of base-only throughput")
    finally:
        stop_launcher(srv)
    return 0


def urllib_get(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


if __name__ == "__main__":
    sys.exit(main())
