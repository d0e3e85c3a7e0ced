"""Throughput against transformers + peft on the same workload, in one run on one GPU.

Mistral-7B shape in bf16, 8 random rank-16 q/k/v/o adapters (`lorax-bench make-adapters`), 128 streams at
once, 512-token prompts and 256 new tokens (BENCH_OUT overrides), adapters assigned round-robin:

  1. our server (`--load-format dummy`), driven by `lorax-bench run --concurrency 128 --requests 128` with
     `--popularity distinct --num-adapters 8` (request i uses adapter i mod 8);
  2. transformers + peft on the same GPU once our server has exited: the model made from the same
     config.json (random weights; only shapes matter for speed), the same 8 adapter folders loaded with
     `load_adapter`, and one `generate` call of the whole batch with `adapter_names` (peft's mixed-adapter
     batch; row i uses adapter i mod 8), min_new_tokens = max_new_tokens, greedy. Prompts are random token
     ids of the same length (with random weights the ids do not change the work).

Both end-to-end figures are generated tokens per second of wall time, prefill included. Decode only:
ours is streams / TPOT p50; theirs is the tokens after the first over the `generate` time less that of
a `generate` of one token (the prefill).

    python3 scripts/gpu/peft_compare.py BIN_DIR LOG_DIR

Lines go to LOG_DIR/peft-compare.txt, figures to LOG_DIR/peft-compare.json (bench.py --summary reads it).
BENCH_TINY=1: a dry run on the CPU (tiny shape, 8 streams; transformers + peft on the CPU when installed).
PEFT_OURS_ONLY=1: our server's run alone (A/B runs of server flags through LORAX_BENCH_LAUNCHER_ARGS).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import (MISTRAL_7B_SHAPE, dummy_server_args, parse_step_metrics, start_launcher,  # noqa: E402
                     steps_line, stop_launcher, write_dummy_model)

BIN, LOGS = sys.argv[1], sys.argv[2]
WORK = "/tmp/lorax-peft-compare"
TINY = os.environ.get("BENCH_TINY") == "1"
STREAMS, PROMPT, N_ADAPTERS = 128, 512, 8
OUT = int(os.environ.get("BENCH_OUT", "256"))
CFG = dict(MISTRAL_7B_SHAPE)
if TINY:
    CFG.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    STREAMS, PROMPT, OUT = 8, 64, int(os.environ.get("BENCH_OUT", "8"))
T_START = time.time()
RESULT = {"streams": STREAMS, "adapters": N_ADAPTERS, "prompt": PROMPT, "out": OUT, "sections": {}}


def say(line):
    print(line, flush=True)
    with open(f"{LOGS}/peft-compare.txt", "a") as f:
        f.write(line + "\n")


def save():
    with open(f"{LOGS}/peft-compare.json", "w") as f:
        json.dump(RESULT, f, indent=1)


def section(name, t):
    RESULT["sections"][name] = round(time.time() - t, 1)
    say(f"SECTION peft {name}: {time.time() - t:.0f}s (peft_compare.py at {time.time() - T_START:.0f}s)")
    save()


def ours(model):
    t = time.time()
    srv, base = start_launcher(BIN, dummy_server_args(model, f"{WORK}/adapters"), f"{LOGS}/peft-compare-server.log")
    section("our server start", t)
    t = time.time()
    try:
        out = f"{LOGS}/peft-compare-ours.json"
        r = subprocess.run([f"{BIN}/lorax-bench", "run", "--url", base, "--label", "ours", "--out", out,
                            "--concurrency", str(STREAMS), "--requests", str(STREAMS), "--warmup", "16",
                            "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUT), "--popularity",
                            "distinct", "--num-adapters", str(N_ADAPTERS)],
                           capture_output=True, text=True, timeout=300)
        say(r.stdout.strip())
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-500:])
        rep = json.load(open(out))["report"]
        section("ours", t)
        try:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as m:
                steps = steps_line({}, parse_step_metrics(m.read().decode()))
        except OSError as e:
            steps = f"metrics unavailable: {e}"
        say(f"PEFT ours steps (the 16 warm-up requests included): {steps}")
        return rep
    finally:
        t = time.time()
        stop_launcher(srv, timeout=15)
        section("our server stop", t)


def theirs(model):
    import torch
    import transformers
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM
    from peft import PeftModel

    dev = "cpu" if TINY else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    t = time.time()
    cfg = AutoConfig.from_pretrained(model)
    with torch.device(dev):
        try:
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    m.eval()
    names = [f"adapter-{i}" for i in range(N_ADAPTERS)]
    # The adapters as saved (float16), not upcast to float32 (peft's default): our server does not upcast
    # them either, and float32 LoRA would slow peft's side.
    # (A peft without the argument loads them its own way, as before; said in the log.)
    try:
        pm = PeftModel.from_pretrained(m, f"{WORK}/adapters/{names[0]}", adapter_name=names[0],
                                       autocast_adapter_dtype=False)
        keep = {"autocast_adapter_dtype": False}
    except TypeError as e:
        say(f"PEFT autocast_adapter_dtype not taken ({e}): adapters in peft's default dtype")
        pm, keep = PeftModel.from_pretrained(m, f"{WORK}/adapters/{names[0]}", adapter_name=names[0]), {}
    for n in names[1:]:
        pm.load_adapter(f"{WORK}/adapters/{n}", adapter_name=n, **keep)
    say("PEFT adapter weights: " + ", ".join(sorted({str(p.dtype) for k, p in pm.named_parameters() if "lora_" in k})))
    pm.eval()
    say(f"PEFT transformers {transformers.__version__}, peft {peft.__version__}: model and {N_ADAPTERS} adapters "
        f"ready in {time.time() - t:.1f}s")
    section("transformers + peft load", t)
    ids = torch.randint(3, cfg.vocab_size, (STREAMS, PROMPT), device=dev)
    mask = torch.ones_like(ids)
    rows = [names[i % N_ADAPTERS] for i in range(STREAMS)]

    def generate(n, k=STREAMS, length=PROMPT):
        sync()
        t = time.time()
        out = pm.generate(input_ids=ids[:k, :length], attention_mask=mask[:k, :length], max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, adapter_names=rows[:k], pad_token_id=0)
        sync()
        return out, time.time() - t

    with torch.no_grad():
        generate(4, 8, 32)  # warm-up
        _, prefill = generate(1)
        say(f"PEFT transformers+peft: one token (the prefill of {STREAMS} x {PROMPT}) in {prefill:.2f}s")
        t = time.time()
        out, secs = generate(OUT)
        section("transformers + peft generate", t)
    generated = (out.shape[1] - PROMPT) * STREAMS
    decode = STREAMS * (OUT - 1) / (secs - prefill) if secs > prefill and OUT > 1 else None
    return {"e2e_tok_s": generated / secs, "seconds": secs, "generated": generated, "prefill_s": prefill,
            "decode_tok_s": decode, "versions": f"transformers {transformers.__version__}, peft {peft.__version__}"}


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM"))  # stop our server on the way out
    os.makedirs(LOGS, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    model = f"{WORK}/mistral-7b-shape"
    write_dummy_model(model, CFG)
    subprocess.run([f"{BIN}/lorax-bench", "make-adapters", "--config", f"{model}/config.json", "--count",
                    str(N_ADAPTERS), "--rank", "16", "--out", f"{WORK}/adapters"], check=True)
    try:
        a = ours(model)
    except RuntimeError as e:
        RESULT["error"] = f"our run failed: {e}"[:300]
        say(f"PEFT {RESULT['error']}")
        save()
        return 1
    tpot = a["tpot_ms"]["p50"]
    RESULT["ours"] = {"e2e_tok_s": a["output_tok_s"], "decode_tok_s": STREAMS / (tpot / 1e3) if tpot > 0 else None,
                      "ttft_p50_ms": a["ttft_ms"]["p50"], "tpot_p50_ms": tpot, "duration_s": a["duration_s"],
                      "completed": a["completed"], "requests": a["requests"]}
    save()
    say(f"PEFT ours: {a['output_tok_s']:.0f} tok/s end to end ({a['completed']}/{a['requests']} requests, "
        f"{a['duration_s']:.1f}s); decode only {RESULT['ours']['decode_tok_s'] or 0:.0f} tok/s ({STREAMS} / TPOT p50 "
        f"{tpot:.2f} ms)")
    if os.environ.get("PEFT_OURS_ONLY") == "1":
        return 0
    try:
        b = theirs(model)
    except ImportError as e:
        RESULT["error"] = f"transformers + peft not run: {e}"
        say(f"PEFT {RESULT['error']}")
        save()
        return 0 if TINY else 1
    RESULT["theirs"] = b
    ratio = a["output_tok_s"] / b["e2e_tok_s"]
    RESULT["ratio"] = ratio
    if b["decode_tok_s"] and RESULT["ours"]["decode_tok_s"]:
        RESULT["decode_ratio"] = RESULT["ours"]["decode_tok_s"] / b["decode_tok_s"]
    save()
    say(f"PEFT transformers+peft: {b['e2e_tok_s']:.0f} tok/s end to end ({b['generated']} tokens in {b['seconds']:.1f}s); "
        f"decode only {b['decode_tok_s'] or 0:.0f} tok/s")
    say(f"PEFT ratio: {ratio:.1f}x end to end (decode only: {RESULT.get('decode_ratio', float('nan')):.1f}x) at "
        f"{STREAMS} streams, {N_ADAPTERS} adapters round-robin, {PROMPT}-token prompts, {OUT} new tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
