"""Tensor parallelism on two GPUs through the real launcher, on dummy weights (`--load-format dummy`):

1. agreement: a Mistral-7B-shaped model (hidden 4096, 32 layers, 32/8 heads, FFN 14336, vocab 32000)
   served with --num-shard 1 and --num-shard 2 (NCCL), in bfloat16 and float32; 4 prompts x (base + 3
   random rank-16 adapters) in one concurrent batch, 64 greedy tokens each; the fraction of tokens
   TP=2 generates identical to TP=1 is reported (leading run and position by position);
2. throughput: a Llama-3-70B-shaped model (hidden 8192, 80 layers, 64/8 heads, FFN 28672, vocab 128256,
   bf16, ~70 GB a GPU) served with --num-shard 2; decode rate at batch 1 and batch 64 from streamed
   token timestamps, against the two-GPU memory roofline (bytes each GPU reads per step over the copy
   bandwidth measured in the same run, TP_COPY_GBS, by tp.sh).

    python3 scripts/gpu/tp.py BIN_DIR LOG_DIR

Environment: TP_PARTS (default "agree,70b"), TP_SAMPLING (70B runs: "device", "host" or both,
comma-separated; host sets LORAX_CUDA_SAMPLING=host), TP_DEVICE (launcher --device, default auto), TP_TINY=1
(tiny shapes: checks this script on a CPU machine), TP_WORK (scratch, default /tmp/lorax-tp).
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import call, free_port  # noqa: E402

BIN, LOGS = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORK = os.environ.get("TP_WORK", "/tmp/lorax-tp")
DEVICE = os.environ.get("TP_DEVICE", "auto")
PARTS = os.environ.get("TP_PARTS", "agree,70b").split(",")
TINY = os.environ.get("TP_TINY") == "1"
COPY_GBS = float(os.environ.get("TP_COPY_GBS", "0") or 0)

SHAPES = {
    "mistral-7b": dict(arch="MistralForCausalLM", model_type="mistral", hidden=4096, layers=32, heads=32, kv=8,
                       ffn=14336, vocab=32000, theta=1e6),
    "llama-3-70b": dict(arch="LlamaForCausalLM", model_type="llama", hidden=8192, layers=80, heads=64, kv=8,
                        ffn=28672, vocab=128256, theta=5e5),
}
if TINY:
    SHAPES = {k: dict(v, hidden=128, layers=2, heads=4, kv=2, ffn=256, vocab=32000 if k == "mistral-7b" else 32256)
              for k, v in SHAPES.items()}

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
    "In a quiet village by the sea, an old fisherman",
    "The three laws of thermodynamics state that",
]
N_AGREE = 64
summary = []


def say(line):
    print(line, flush=True)
    summary.append(line)


def write_model(name):
    s = SHAPES[name]
    d = f"{WORK}/{name}"
    os.makedirs(d, exist_ok=True)
    cfg = {
        "architectures": [s["arch"]], "model_type": s["model_type"], "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"], "head_dim": s["hidden"] // s["heads"], "vocab_size": s["vocab"],
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": s["theta"],
        "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copy(f"{ROOT}/tests/fixtures/tokenizer/tokenizer.json", f"{d}/tokenizer.json")
    return d, cfg


class Server:
    def __init__(self, model_dir, shards, dtype, tag, extra=(), env=None):
        self.tag = tag
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(f"{LOGS}/tp-server-{tag}.log", "w")
        args = [f"{BIN}/lorax-launcher", "--model-id", model_dir, "--load-format", "dummy",
                "--num-shard", str(shards), "--device", DEVICE, "--dtype", dtype, "--port", str(port),
                "--hostname", "127.0.0.1", "--adapter-local-roots", f"{WORK}/adapters",
                "--max-input-length", "512", "--max-total-tokens", "1024", "--shard-startup-timeout-s", "240",
                *extra]
        t0 = time.time()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, **(env or {})))
        deadline = time.time() + 240
        while True:
            try:
                if call(f"{self.base}/health", timeout=5)[0] == 200:
                    break
            except Exception:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{tag}: server not healthy (exit {self.proc.poll()}); see tp-server-{tag}.log")
            time.sleep(0.5)
        self.startup_s = time.time() - t0
        self.info = call(f"{self.base}/info")[1]

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


def params(n, adapter):
    p = {"max_new_tokens": n, "details": True, "ignore_eos_token": True}
    if adapter:
        p["adapter_id"] = f"{WORK}/adapters/{adapter}"
        p["adapter_source"] = "local"
    return p


def generate(base, prompt, n, adapter=None):
    status, out = call(f"{base}/generate", {"inputs": prompt, "parameters": params(n, adapter)})
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {out}")
    return [t["id"] for t in out["details"]["tokens"]]


def stream(base, prompt, n, out):
    """Token timestamps of one streamed generation, appended to `out` as (time, id)."""
    body = json.dumps({"inputs": prompt, "parameters": params(n, None)}).encode()
    req = urllib.request.Request(f"{base}/generate_stream", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:"):
                ev = json.loads(line[5:].strip())
                if "token" in ev:
                    out.append((time.perf_counter(), ev["token"]["id"]))


def concurrently(fns):
    results = [None] * len(fns)
    errors = []

    def run(i, f):
        try:
            results[i] = f()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {e}")

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


ADAPTERS = [None, "lora-0", "lora-1", "lora-2"]
REQUESTS = [(p, a) for p in range(len(PROMPTS)) for a in ADAPTERS]


def agreement():
    d, cfg = write_model("mistral-7b")
    if not os.path.exists(f"{WORK}/adapters/lora-2/adapter_model.safetensors"):
        subprocess.run([sys.executable, f"{ROOT}/scripts/gpu/make_adapters.py", f"{d}/config.json",
                        f"{WORK}/adapters", "3", "16"], check=True)
    failures = 0
    for dtype in ["bfloat16", "float32"]:
        tokens = {}
        for shards in [1, 2]:
            tag = f"7b-{dtype}-tp{shards}"
            srv = Server(d, shards, dtype, tag)
            try:
                t0 = time.time()
                tokens[shards] = concurrently(
                    [lambda p=p, a=a: generate(srv.base, PROMPTS[p], N_AGREE, a) for p, a in REQUESTS])
                say(f"TP 7B {dtype} TP={shards}: up in {srv.startup_s:.0f} s ({srv.info.get('model_device_type')}, "
                    f"{srv.info.get('num_shards')} shards); {len(REQUESTS)} requests x {N_AGREE} tokens in "
                    f"{time.time() - t0:.1f} s")
            finally:
                srv.stop()
        one, two = tokens[1], tokens[2]
        lead = same = total = 0
        for i, (p, a) in enumerate(REQUESTS):
            k = 0
            while k < min(len(one[i]), len(two[i])) and one[i][k] == two[i][k]:
                k += 1
            eq = sum(x == y for x, y in zip(one[i], two[i]))
            lead, same, total = lead + k, same + eq, total + len(one[i])
            say(f"TP 7B {dtype} p{p} {a or 'base'}: leading {k}/{N_AGREE} equal, {eq}/{N_AGREE} positions equal")
        # Adapters change the answer (lora_B is non-zero): each adapter's tokens differ from the base's.
        differs = sum(one[i] != one[(i // len(ADAPTERS)) * len(ADAPTERS)] for i, (p, a) in enumerate(REQUESTS) if a)
        say(f"TP 7B {dtype} SUMMARY: TP=2 vs TP=1 identical tokens {same}/{total} ({100 * same / total:.1f}%), "
            f"leading runs {lead}/{total} ({100 * lead / total:.1f}%); adapter answers differing from base "
            f"{differs}/{len(REQUESTS) - len(PROMPTS)}")
        if dtype == "float32" and same < total * 0.9:
            failures += 1
            say("TP 7B float32: FAIL (expected near-identical tokens)")
    return failures


def weight_bytes_per_gpu(s, world, dtype_bytes=2):
    h, ffn, hd = s["hidden"], s["ffn"], s["hidden"] // s["heads"]
    q, kv = s["heads"] * hd, s["kv"] * hd
    per_layer = (h * q + 2 * h * kv + q * h + 3 * h * ffn) / world + 2 * h
    # The lm_head is whole on every rank and read every step; the embedding is only gathered.
    return (s["layers"] * per_layer + s["vocab"] * h + h) * dtype_bytes


def kv_bytes_per_gpu(s, world, contexts, dtype_bytes=2):
    hd = s["hidden"] // s["heads"]
    return sum(contexts) * s["layers"] * 2 * (s["kv"] // world) * hd * dtype_bytes


def throughput():
    # TP_SAMPLING: where the shards sample, "device" (the CUDA kernel) and/or "host" (LORAX_CUDA_SAMPLING=host).
    for mode in os.environ.get("TP_SAMPLING", "device").split(","):
        throughput_with(mode)
    return 0


def throughput_with(mode):
    d, cfg = write_model("llama-3-70b")
    s = SHAPES["llama-3-70b"]
    env = {"LORAX_CUDA_SAMPLING": "host"} if mode == "host" else {}
    srv = Server(d, 2, "bfloat16", f"70b-bf16-tp2-{mode}", extra=["--max-batch-prefill-tokens", "4096"], env=env)
    try:
        say(f"TP 70B ({mode} sampling): up in {srv.startup_s:.0f} s, {srv.info.get('num_shards')} shards, "
            f"{srv.info.get('model_device_type')} {srv.info.get('model_dtype')}")
        try:
            mem = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().replace("\n", "; ")
            say(f"TP 70B GPU memory in use: {mem}")
        except Exception as e:  # noqa: BLE001
            say(f"TP 70B nvidia-smi: {e}")
        generate(srv.base, PROMPTS[0], 8)  # warm the decode path
        prompt = PROMPTS[2]
        prompt_len = len(call(f"{srv.base}/tokenize", {"inputs": prompt})[1])
        n = 128
        for batch in [1, 64]:
            outs = [[] for _ in range(batch)]
            t0 = time.perf_counter()
            concurrently([lambda o=o: stream(srv.base, prompt, n, o) for o in outs])
            wall = time.perf_counter() - t0
            if any(len(o) != n for o in outs):
                raise RuntimeError(f"batch {batch}: token counts {[len(o) for o in outs]}")
            if batch == 1:
                times = [t for t, _ in outs[0]]
                gaps = [b - a for a, b in zip(times, times[1:])]
                step = statistics.median(gaps)
                tok_s = 1 / step
                window = f"median of {len(gaps)} inter-token gaps"
            else:
                start = max(o[0][0] for o in outs)  # every request has been prefilled
                end = min(o[-1][0] for o in outs)  # none has finished
                inside = sum(start < t <= end for o in outs for t, _ in o)
                tok_s = inside / (end - start)
                step = batch / tok_s
                window = f"{inside} tokens in the {end - start:.2f} s all {batch} decode together"
            ctx = prompt_len + n // 2  # mean context over the generation
            need = weight_bytes_per_gpu(s, 2) + kv_bytes_per_gpu(s, 2, [ctx] * batch)
            line = (f"TP 70B batch {batch} ({mode} sampling): {tok_s:.1f} tok/s, {step * 1e3:.2f} ms per decode step ({window}; "
                    f"wall {wall:.1f} s for {batch}x{n} tokens); each GPU reads {need / 1e9:.2f} GB per step")
            if COPY_GBS > 0:
                floor = need / (COPY_GBS * 1e9)
                line += (f"; roofline at {COPY_GBS:.0f} GB/s: {floor * 1e3:.2f} ms per step = "
                         f"{batch / floor:.1f} tok/s -> {100 * floor / step:.0f}% of roofline")
            say(line)
    finally:
        srv.stop()


def main():
    os.makedirs(LOGS, exist_ok=True)
    os.makedirs(f"{WORK}/adapters", exist_ok=True)
    failures = 0
    for part, fn in [("agree", agreement), ("70b", throughput)]:
        if part not in PARTS:
            continue
        try:
            failures += fn()
        except Exception as e:  # noqa: BLE001 - one part failing must not hide the other
            failures += 1
            say(f"TP {part}: FAIL {e}")
    with open(f"{LOGS}/tp-summary.txt", "w") as f:
        f.write("\n".join(summary) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
