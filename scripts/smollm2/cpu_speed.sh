#!/usr/bin/env bash
# CPU decode speed of SmolLM2-135M-Instruct at batch 1 (and 4): starts the release launcher on the CPU,
# then times /generate with ignore_eos. Decode rate = (N - 1) / (t(N tokens) - t(1 token)), so the prompt's
# prefill and the HTTP round trip cancel out; each figure is the median of 5 runs.
#
#   cargo build --release --bins && scripts/smollm2/cpu_speed.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/../.."
port=${1:-3917}
model=$(scripts/smollm2/fetch.sh)
log=$(mktemp)
./target/release/lorax-launcher --model-id "$model" --device cpu --port "$port" --hostname 127.0.0.1 \
    --max-batch-prefill-tokens 512 --max-total-tokens 1024 --max-input-length 512 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
python3 - "$port" <<'PY'
import concurrent.futures as cf, json, os, statistics, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + 300
while True:
    try:
        if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
            break
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit("server did not start")
    time.sleep(0.5)
prompt = "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
def gen(n):
    body = json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": n, "ignore_eos_token": True}}).encode()
    req = urllib.request.Request(base + "/generate", body, {"Content-Type": "application/json"})
    t = time.perf_counter()
    urllib.request.urlopen(req).read()
    return time.perf_counter() - t
def timed(n, conc):
    with cf.ThreadPoolExecutor(conc) as ex:
        t = time.perf_counter()
        list(ex.map(gen, [n] * conc))
        return time.perf_counter() - t
N = 128
gen(8)  # warm
info = json.load(urllib.request.urlopen(base + "/info"))
print(f"model {info['model_id'].rsplit('/', 1)[-1]} on {info['model_device_type']} ({os.cpu_count()} CPUs), a short chat prompt, {N} new tokens")
for conc in (1, 4):
    one = statistics.median(timed(1, conc) for _ in range(5))
    full = statistics.median(timed(N, conc) for _ in range(5))
    rate = (N - 1) / (full - one)
    print(f"batch {conc}: {rate:6.1f} tok/s per sequence, {rate * conc:6.1f} tok/s in all "
          f"({full:.2f} s for {N} tokens, {one:.3f} s for 1)")
PY
