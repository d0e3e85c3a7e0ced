"""Helpers of the GPU scripts: a free local port, a JSON call, starting and stopping the launcher, the
router's per-step metrics, and the dummy Mistral-7B-shaped model of the benchmarks (bench.py,
peft_compare.py)."""
import json
import re
import socket
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(url, body=None, timeout=120):
    """(status, decoded JSON answer) of a GET (no body) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def start_launcher(bin_dir, args, log_path, timeout=240, env=None):
    """Starts `lorax-launcher ARGS` on a free local port (its own process group, output to log_path) and
    waits until /health answers 200. Returns (process, base URL); stop it with `stop_launcher`.
    LORAX_BENCH_LAUNCHER_ARGS (shell words) are appended, to compare settings in one call (e.g.
    `--max-batch-prefill-chunk-tokens 0`); the environment (LORAX_CUDA_ATTN=l8, say) is inherited."""
    import os
    import shlex
    import subprocess
    import time

    args = [*args, *shlex.split(os.environ.get("LORAX_BENCH_LAUNCHER_ARGS", ""))]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    proc = subprocess.Popen([f"{bin_dir}/lorax-launcher", "--port", str(port), "--hostname", "127.0.0.1", *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    deadline = time.time() + timeout
    while True:
        try:
            if call(f"{base}/health", timeout=5)[0] == 200:
                return proc, base
        except Exception:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_launcher(proc)
            raise RuntimeError(f"server not healthy (exit {proc.poll()}); see {log_path}")
        time.sleep(0.5)


def stop_launcher(proc, timeout=60):
    """SIGTERM to the launcher's process group (it stops its shards), SIGKILL after `timeout` seconds."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def write_dummy_model(directory, config):
    """A model folder for `--load-format dummy`: config.json plus the repo's Mistral tokenizer."""
    import json
    import os
    import shutil

    os.makedirs(directory, exist_ok=True)
    with open(f"{directory}/config.json", "w") as f:
        json.dump(config, f)
    shutil.copy("tests/fixtures/tokenizer/tokenizer.json", directory)


MISTRAL_7B_SHAPE = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def dummy_server_args(model, adapters):
    """Launcher flags of the benchmarks: dummy bf16 weights, local adapters, room for 128+ streams."""
    return ["--model-id", model, "--load-format", "dummy", "--dtype", "bfloat16", "--adapter-local-roots", adapters,
            "--adapter-source", "local", "--max-input-length", "1100", "--max-total-tokens", "1400",
            "--max-batch-prefill-tokens", "8192", "--num-blocks", "16384", "--max-active-adapters", "128",
            "--max-concurrent-requests", "1024", "--shard-startup-timeout-s", "240"]


STEP_HISTOGRAMS = (("lorax_batch_shard_duration", "shard engine"), ("lorax_batch_shard_handler_duration", "handler"),
                   ("lorax_batch_shard_send_duration", "send"), ("lorax_batch_shard_return_duration", "return"),
                   ("lorax_batch_forward_duration", "forward"), ("lorax_batch_inference_duration", "step"))


def parse_step_metrics(text):
    """Sums and counts of the router's per-step histograms in a /metrics text: {(name, method, "sum" |
    "count"): value}, with method "" for the unlabelled ones (each request's validation and queue time); the
    decode rows a step are kept by method, "decode" or "mixed" (a mixed step's decoding rows)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'(lorax_batch_(?:(?:forward|inference|shard|shard_handler|shard_send|shard_return)_duration|decode_size))_(sum|count)\{method="(\w+)"\}\s+(\S+)', line)
        if m:
            out[(m.group(1), m.group(3), m.group(2))] = float(m.group(4))
        m = re.match(r'(lorax_request_(?:validation|queue)_duration)_(sum|count)\s+(\S+)', line)
        if m:
            out[(m.group(1), "", m.group(2))] = float(m.group(3))
    return out


def steps_line(before, after):
    """Mean time per step of each kind between two parse_step_metrics() results: "shard engine" is the shard's
    engine step as the shard reports it, "forward" the shard call as the router sees it (the engine step, the
    shard's handler, gRPC), "step" adds the router's handling of the results."""
    parts = []
    for method in ("prefill", "mixed", "decode"):
        for name, short in STEP_HISTOGRAMS:
            n = after.get((name, method, "count"), 0) - before.get((name, method, "count"), 0)
            total = after.get((name, method, "sum"), 0) - before.get((name, method, "sum"), 0)
            if n > 0:
                parts.append(f"{method} {short} {1e3 * total / n:.2f} ms x {n:.0f}")
    for method in ("decode", "mixed"):
        key = ("lorax_batch_decode_size", method)
        n = after.get((*key, "count"), 0) - before.get((*key, "count"), 0)
        if n > 0:
            rows = (after.get((*key, "sum"), 0) - before.get((*key, "sum"), 0)) / n
            parts.append(f"{rows:.1f} decoding rows a {method} step")
    return ", ".join(parts) or "none counted"
