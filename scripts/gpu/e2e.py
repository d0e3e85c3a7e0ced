"""End-to-end on the CUDA backend: the real launcher (embedded llama fixture) spawns a CUDA shard and the
router; greedy generations over HTTP, for the base model and a local LoRA adapter, are compared with the
transformers/peft references in tests/fixtures. float32 storage must reproduce the reference tokens
exactly; bfloat16 is reported (see docs/gpu.md). Then prompt scoring through /v1/completions (token ids,
`echo`, `max_tokens: 0`, `logprobs: 1`, as lm-evaluation-harness asks): each reference continuation token
must be the most likely at its position, and its logprob must equal the one the generation gave it (the
prompt pass's sampling kernel against the decode steps'), in float32; reported in bfloat16.

    python3 scripts/gpu/e2e.py BIN_DIR LOG_DIR
"""
import json
import os
import signal
import subprocess
import sys
import time

from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import call, free_port  # noqa: E402

BIN, LOGS = sys.argv[1], sys.argv[2]
FX = os.path.abspath("tests/fixtures")
BASE = load_file(f"{FX}/models/llama/golden.safetensors")
LORA = load_file(f"{FX}/adapters/golden_lora.safetensors")
MANIFEST = json.load(open(f"{FX}/manifest.json"))
PROMPTS = MANIFEST["prompts"]
N = 32


failures = 0
# E2E_SHARDS: tensor-parallel sizes to run, e.g. "1,2" (a GPU per rank with --device auto).
SHARDS = [int(n) for n in os.environ.get("E2E_SHARDS", "1").split(",")]
tokens = {}
for shards, dtype in [(n, d) for n in SHARDS for d in ["float32", "bfloat16"]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(f"{LOGS}/e2e-server-{dtype}-tp{shards}.log", "w")
    env = dict(os.environ, LORAX_DTYPE=dtype)
    device = os.environ.get("E2E_DEVICE", "cuda" if shards == 1 else "auto")
    proc = subprocess.Popen(
        [f"{BIN}/lorax-launcher", "--device", device, "--dtype", dtype, "--num-shard", str(shards),
         "--port", str(port), "--hostname", "127.0.0.1", "--adapter-local-roots", f"{FX}/adapters"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if call(f"{base}/health", timeout=5)[0] == 200:
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not become healthy (exit {proc.poll()}), see e2e-server-{dtype}.log")
            time.sleep(0.5)
        info = call(f"{base}/info")[1]
        print(f"E2E {dtype} TP={shards}: /info device {info.get('model_device_type')!r}, dtype "
              f"{info.get('model_dtype')!r}, shards {info.get('num_shards')}", flush=True)
        for adapter in [None, "lora-r8"]:
            for p in [1, 2]:
                params = {"max_new_tokens": N, "details": True, "ignore_eos_token": True}
                if adapter:
                    params["adapter_id"] = f"{FX}/adapters/{adapter}"
                    params["adapter_source"] = "local"
                status, out = call(f"{base}/generate", {"inputs": PROMPTS[p], "parameters": params})
                ids = [t["id"] for t in out["details"]["tokens"]]
                ref = (LORA[f"{adapter}.p{p}.greedy"] if adapter else BASE[f"p{p}.greedy"]).tolist()
                same = 0
                while same < min(len(ids), len(ref)) and ids[same] == ref[same]:
                    same += 1
                ok = dtype != "float32" or same == N
                failures += 0 if ok else 1
                tokens[(shards, dtype, adapter, p)] = ids
                one = tokens.get((1, dtype, adapter, p))
                vs_one = ""
                if shards > 1 and one is not None:
                    agree = 0
                    while agree < min(len(ids), len(one)) and ids[agree] == one[agree]:
                        agree += 1
                    vs_one = f", {agree}/{N} equal TP=1's"
                print(f"E2E {dtype} TP={shards} {adapter or 'base'} p{p}: HTTP {status}, {same}/{N} greedy tokens "
                      f"equal the reference{vs_one}{'' if ok else '  FAIL'}", flush=True)
                # Prompt scoring of the reference continuation's first 8 tokens.
                cont = ref[:8]
                body = {"model": f"{FX}/adapters/{adapter}" if adapter else "", "adapter_source": "local",
                        "prompt": MANIFEST["prompt_ids"][p] + cont, "max_tokens": 0, "echo": True, "logprobs": 1}
                status, scored = call(f"{base}/v1/completions", body)
                lp = scored["choices"][0]["logprobs"]
                at = len(MANIFEST["prompt_ids"][p])
                greedy = sum(lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())
                             for i in range(at, at + len(cont)))
                gen = [t["logprob"] for t in out["details"]["tokens"][:len(cont)]]
                diff = max(abs(a - b) for a, b in zip(lp["token_logprobs"][at:], gen))
                ok = dtype != "float32" or (status == 200 and greedy == len(cont) and diff < 1e-3
                                            and scored["usage"]["completion_tokens"] == 0)
                failures += 0 if ok else 1
                print(f"E2E {dtype} TP={shards} {adapter or 'base'} p{p} scoring: HTTP {status}, {greedy}/{len(cont)} "
                      f"reference tokens most likely at their position, logprobs within {diff:.2e} of the "
                      f"generation's{'' if ok else '  FAIL'}", flush=True)
                if p == 1:
                    # A prompt of 700 tokens scored whole: its rows' sampling takes two launches (512 rows at
                    # most); its first positions must score as the short prompt's did (causal attention).
                    long_ids = (MANIFEST["prompt_ids"][p] + cont) * 50
                    body["prompt"] = long_ids[:700]
                    status, scored_long = call(f"{base}/v1/completions", body)
                    lpl = scored_long["choices"][0]["logprobs"]["token_logprobs"]
                    short = lp["token_logprobs"]
                    drift = max(abs(a - b) for a, b in zip(lpl[1:len(short)], short[1:]))
                    finite = sum(1 for v in lpl[1:] if v is not None and v == v and abs(v) < 1e30)
                    ok = status == 200 and len(lpl) == 700 and finite == 699 and (dtype != "float32" or drift < 1e-3)
                    failures += 0 if ok else 1
                    print(f"E2E {dtype} TP={shards} {adapter or 'base'} p{p} scoring 700 tokens: HTTP {status}, "
                          f"{len(lpl)} logprobs, {finite} finite after the first, the first {len(short)} within "
                          f"{drift:.2e} of the short prompt's{'' if ok else '  FAIL'}", flush=True)
    except Exception as e:
        failures += 1
        print(f"E2E {dtype} TP={shards}: FAIL {e}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
sys.exit(1 if failures else 0)
