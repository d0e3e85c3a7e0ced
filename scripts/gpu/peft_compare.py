"""Throughput against transformers + peft on the same workload, in one run on one GPU.

Mistral-7B shape in bf16, 8 random rank-16 q/k/v/o adapters (`lorax-bench make-adapters`), 128 streams at
once, 512-token prompts and a fixed number of new tokens (BENCH_OUT, default 64), adapters assigned
round-robin:

  1. our server (`--load-format dummy`), driven by `lorax-bench run --concurrency 128` with
     `--popularity distinct --num-adapters 8` (request i uses adapter i mod 8);
  2. transformers 5 + peft on the same GPU once our server has exited: the model made from the same
     config.json (random weights; only shapes matter for speed), the same 8 adapter folders loaded with
     `load_adapter`, and one `generate` call of the whole batch with `adapter_names` (peft's mixed-adapter
     batch), min_new_tokens = max_new_tokens, greedy.

Both figures are generated tokens per second of wall time, prefill included.

    python3 scripts/gpu/peft_compare.py BIN_DIR LOG_DIR
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
WORK = "/tmp/lorax-peft-compare"
STREAMS, PROMPT, N_ADAPTERS = 128, 512, 8
OUT = int(os.environ.get("BENCH_OUT", "64"))
CFG = dict(MISTRAL_7B_SHAPE)


def say(line):
    print(line, flush=True)
    with open(f"{LOGS}/peft-compare.txt", "a") as f:
        f.write(line + "\n")


def ours(model):
    srv, base = start_launcher(BIN, dummy_server_args(model, f"{WORK}/adapters"), f"{LOGS}/peft-compare-server.log")
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
        return json.load(open(out))["report"]
    finally:
        stop_launcher(srv)


def theirs(model):
    import torch
    import transformers
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM
    from peft import PeftModel

    torch.manual_seed(0)
    t = time.time()
    cfg = AutoConfig.from_pretrained(model)
    with torch.device("cuda"):
        try:
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    m.eval()
    names = [f"adapter-{i}" for i in range(N_ADAPTERS)]
    pm = PeftModel.from_pretrained(m, f"{WORK}/adapters/{names[0]}", adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(f"{WORK}/adapters/{n}", adapter_name=n)
    pm.eval()
    say(f"PEFT transformers {transformers.__version__}, peft {peft.__version__}: model and {N_ADAPTERS} adapters "
        f"ready in {time.time() - t:.1f}s")
    ids = torch.randint(3, cfg.vocab_size, (STREAMS, PROMPT), device="cuda")
    mask = torch.ones_like(ids)
    rows = [names[i % N_ADAPTERS] for i in range(STREAMS)]
    with torch.no_grad():
        pm.generate(input_ids=ids[:8, :32], attention_mask=mask[:8, :32], max_new_tokens=4, min_new_tokens=4,
                    do_sample=False, adapter_names=rows[:8], pad_token_id=0)
        torch.cuda.synchronize()
        t = time.time()
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=OUT, min_new_tokens=OUT,
                          do_sample=False, adapter_names=rows, pad_token_id=0)
        torch.cuda.synchronize()
        secs = time.time() - t
    generated = (out.shape[1] - PROMPT) * STREAMS
    return {"output_tok_s": generated / secs, "seconds": secs, "generated": generated}


def main():
    os.makedirs(LOGS, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    model = f"{WORK}/mistral-7b-shape"
    write_dummy_model(model, CFG)
    subprocess.run([f"{BIN}/lorax-bench", "make-adapters", "--config", f"{model}/config.json", "--count",
                    str(N_ADAPTERS), "--rank", "16", "--out", f"{WORK}/adapters"], check=True)
    a = ours(model)
    say(f"PEFT ours: {a['output_tok_s']:.0f} tok/s ({a['completed']}/{a['requests']} requests, {a['duration_s']:.1f}s)")
    b = theirs(model)
    say(f"PEFT transformers+peft: {b['output_tok_s']:.0f} tok/s ({b['generated']} tokens in {b['seconds']:.1f}s)")
    say(f"PEFT ratio: {a['output_tok_s'] / b['output_tok_s']:.1f}x at {STREAMS} streams, {N_ADAPTERS} adapters, "
        f"{PROMPT}-token prompts, {OUT} new tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
