"""Random PEFT LoRA adapters for a model shape (config.json), for tests and benchmarks of big shapes
that have no real adapters at hand: q/k/v/o targets, lora_A uniform in ±1/sqrt(in), lora_B uniform in
±0.5/sqrt(r) (non-zero, unlike a freshly initialised adapter), lora_alpha = r (scale 1). With a unit-RMS
input, the adapter's term has about 30% of the base projection's RMS: visible in the outputs, and sane.
float32 safetensors (numpy only), seeded.

    python3 scripts/gpu/make_adapters.py CONFIG_JSON OUT_DIR COUNT [RANK]

writes OUT_DIR/lora-<i>/{adapter_config.json, adapter_model.safetensors} for i in 0..COUNT.
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file


def make(cfg, out, seed, r):
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            p = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            a = rng.uniform(-1, 1, (r, fan_in)).astype(np.float32) / np.float32(np.sqrt(fan_in))
            b = rng.uniform(-1, 1, (fan_out, r)).astype(np.float32) * np.float32(0.5 / np.sqrt(r))
            tensors[f"{p}.lora_A.weight"] = a
            tensors[f"{p}.lora_B.weight"] = b
    os.makedirs(out, exist_ok=True)
    save_file(tensors, f"{out}/adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "dummy",
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": list(shapes), "use_rslora": False, "use_dora": False,
    }
    with open(f"{out}/adapter_config.json", "w") as f:
        json.dump(config, f, indent=1)


def main():
    cfg = json.load(open(sys.argv[1]))
    out, count = sys.argv[2], int(sys.argv[3])
    r = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    for i in range(count):
        make(cfg, f"{out}/lora-{i}", 1000 + i, r)
        print(f"adapter {out}/lora-{i}: rank {r}, q/k/v/o, {cfg['num_hidden_layers']} layers", flush=True)


if __name__ == "__main__":
    main()
