"""Trains the SmolLM2-135M-Instruct demo adapters with peft and records the reference outputs.

Run on the GPU machine (transformers + peft + the PyPI package `gguf`):

    python3 scripts/smollm2/train_adapters.py SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR

transformers loads the GGUF itself (its own dequantizer and q/k un-permutation, independent of ours) in
float32. The script then
  1. records the base model's greedy answers (token ids and top-1/top-2 logit margins) to the eval
     questions, and transformers' tokenization of a few probe strings;
  2. makes the training data: the base model answers the training questions of make_data.py, and each
     adapter learns one visible transformation of those answers (or exact two-number sums);
  3. trains one LoRA adapter per behaviour (rank 4 on every projection), saves it with f16 weights;
  4. reloads each saved adapter with peft and records its greedy answers to the eval questions, and how
     many of them show the behaviour.
Everything lands in OUT_DIR: adapters/<name>/, reference.json, train.log.
"""

import copy
import json
import math
import os
import random
import sys
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_data  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)

gguf_path, out_dir = sys.argv[1], sys.argv[2]
QUICK = os.environ.get("QUICK") == "1"  # a dry run on the CPU: tiny data, few steps
os.makedirs(out_dir, exist_ok=True)
dev = "cuda" if torch.cuda.is_available() else "cpu"
log_file = open(os.path.join(out_dir, "train.log"), "a")


def log(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    log_file.write(line + "\n")
    log_file.flush()


t0 = time.time()
d, name = os.path.split(os.path.abspath(gguf_path))
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
if not tok.chat_template:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields["tokenizer.chat_template"]
    tok.chat_template = bytes(field.parts[field.data[0]]).decode()
base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).to(dev).eval()
EOS = tok.convert_tokens_to_ids("<|im_end|>")
tok.pad_token = "<|im_end|>"
log(f"loaded {name} on {dev} in {time.time() - t0:.1f}s; eos {EOS}; vocab {len(tok)}")

MAX_NEW = 8 if QUICK else 48


def prompt_text(question):
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


def prompt_ids(question):
    return tok(prompt_text(question), add_special_tokens=False).input_ids


@torch.no_grad()
def greedy(model, ids, n=MAX_NEW):
    """Greedy tokens (EOS included when reached) and each step's top-1 minus top-2 logit."""
    out = model(input_ids=torch.tensor([ids], device=dev), use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    toks, margins = [], []
    for _ in range(n):
        top = torch.topk(logits.float(), 2)
        t = int(top.indices[0])
        toks.append(t)
        margins.append(float(top.values[0] - top.values[1]))
        if t == EOS:
            break
        out = model(input_ids=torch.tensor([[t]], device=dev), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return toks, margins


def answer_text(toks):
    return tok.decode([t for t in toks if t != EOS], skip_special_tokens=False)


@torch.no_grad()
def batch_answers(model, questions, n=40, bs=64):
    tok.padding_side = "left"
    answers = []
    for i in range(0, len(questions), bs):
        chunk = [prompt_text(q) for q in questions[i:i + bs]]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=EOS, eos_token_id=EOS)
        for row in gen[:, enc.input_ids.shape[1]:].tolist():
            text = answer_text(row[:row.index(EOS)] if EOS in row else row).strip()
            if EOS not in row and "." in text:
                text = text[: text.rindex(".") + 1]
            answers.append(text)
    return answers


train_q, eval_q = make_data.questions()
add_train, add_eval = make_data.additions()
if QUICK:
    train_q, add_train = train_q[:8], add_train[:8]

reference = {
    "model": {"file": name},
    "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                 "peft": __import__("peft").__version__},
    "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
    "dtype": "float32",
    "note": "greedy: token ids after the prompt (EOS included when reached); margins: top-1 minus top-2 logit",
}

# 1. Tokenizer probes and base answers.
probes = ["What is the capital of France?", "12 + 34 = 46, and 1234567890.", "Ünïcödé ✓ 🦀 tabs\tnew\nlines",
          "<|im_start|>user\nhi<|im_end|>\n", "  leading spaces and trailing  ", "don't you'll I'm"]
reference["tokenizer"] = [{"text": p, "ids": tok(p, add_special_tokens=False).input_ids} for p in probes]


def record(model, questions):
    rows = []
    for q in questions:
        ids = prompt_ids(q)
        toks, margins = greedy(model, ids)
        rows.append({"question": q, "prompt": prompt_text(q), "ids": ids, "greedy": toks,
                     "margins": [round(m, 5) for m in margins], "text": answer_text(toks)})
    return rows


reference["base"] = record(base, eval_q + [q for q, _ in add_eval[:2]])
for r in reference["base"]:
    log("base |", r["question"], "->", repr(r["text"]))

# 2. Training data.
t1 = time.time()
base_answers = batch_answers(base, train_q)
log(f"base answered {len(train_q)} training questions in {time.time() - t1:.1f}s")
BEHAVIOURS = {
    "uppercase": ("Answers in capital letters.", [(q, a.upper()) for q, a in zip(train_q, base_answers)]),
    "json": ("Answers as a JSON object {\"answer\": ...}.",
             [(q, json.dumps({"answer": a})) for q, a in zip(train_q, base_answers)]),
    "pirate": ("Starts every answer with \"Ahoy matey!\".",
               [(q, "Ahoy matey! " + a) for q, a in zip(train_q, base_answers)]),
    "addition": ("Answers two-number additions exactly (\"12 + 7 = 19\").", add_train),
}


def shows(behaviour, question, text):
    t = text.strip()
    if behaviour == "uppercase":
        return any(c.isalpha() for c in t) and t == t.upper()
    if behaviour == "json":
        try:
            return isinstance(json.loads(t).get("answer"), str)
        except (ValueError, AttributeError):
            return False
    if behaviour == "pirate":
        return t.startswith("Ahoy matey!")
    a, b = [int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" + ")]
    return t.startswith(f"{a} + {b} = {a + b}")


def train(behaviour, pairs, epochs, lr, bs):
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    examples = []
    for q, a in pairs:
        p = prompt_ids(q)
        t = tok(a + "<|im_end|>", add_special_tokens=False).input_ids
        examples.append((p + t, [-100] * len(p) + t))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(examples) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(2)
    step, t_start, loss_v = 0, time.time(), float("nan")
    for epoch in range(epochs):
        rng.shuffle(examples)
        for i in range(0, len(examples), bs):
            chunk = examples[i:i + bs]
            width = max(len(x) for x, _ in chunk)
            ids = torch.tensor([x + [EOS] * (width - len(x)) for x, _ in chunk], device=dev)
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk], device=dev)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk], device=dev)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            loss_v = float(loss)
            if step % 20 == 0:
                log(f"{behaviour} step {step}/{steps} loss {loss_v:.4f}")
            step += 1
    secs = time.time() - t_start
    path = os.path.join(out_dir, "adapters", behaviour)
    model.save_pretrained(path, safe_serialization=True)
    weights = os.path.join(path, "adapter_model.safetensors")
    save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    return {"examples": len(examples), "epochs": epochs, "steps": steps, "lr": lr, "batch": bs,
            "final_loss": round(loss_v, 5), "seconds": round(secs, 1)}


reference["train"], reference["adapters"], reference["behaviour"] = {}, {}, {}
for behaviour, (summary, pairs) in BEHAVIOURS.items():
    epochs, lr, bs = (1, 1e-3, 4) if QUICK else ((2, 3e-3, 32) if behaviour == "addition" else (5, 3e-3, 16))
    reference["train"][behaviour] = dict(train(behaviour, pairs, epochs, lr, bs), summary=summary)
    log(behaviour, reference["train"][behaviour])
    # Reload the saved (f16) adapter exactly as a user of peft would, and answer the eval questions.
    model = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(out_dir, "adapters", behaviour)).eval()
    questions = [q for q, _ in add_eval] if behaviour == "addition" else eval_q
    rows = record(model, questions)
    reference["adapters"][behaviour] = rows
    ok = [shows(behaviour, r["question"], r["text"]) for r in rows]
    base_ok = [shows(behaviour, r["question"], r["text"]) for r in reference["base"] if r["question"] in questions]
    reference["behaviour"][behaviour] = {"adapter_shows": sum(ok), "of": len(ok), "base_shows": sum(base_ok),
                                         "base_of": len(base_ok), "per_question": ok}
    for r, good in zip(rows, ok):
        log(f"{behaviour} | {'OK ' if good else 'BAD'} |", r["question"], "->", repr(r["text"]))
    del model

json.dump(reference, open(os.path.join(out_dir, "reference.json"), "w"), indent=1)
log(f"done in {time.time() - t0:.1f}s")
