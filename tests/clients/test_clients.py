"""The real PyPI clients against a running server (started by tests/clients/run.sh on the embedded
model, with the fixture adapters under an allowed local root). Every answer is checked against the
golden fixtures made by transformers + peft, not against this server's earlier output."""

import json
import os
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
URL = os.environ["LORAX_URL"]
N_NEW = 16


def _safetensors_ints(path, name):
    """An int64 tensor from a safetensors file (no numpy needed)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start, end = header[name]["data_offsets"]
    raw = data[8 + n + start : 8 + n + end]
    return list(struct.unpack(f"<{len(raw) // 8}q", raw))


MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
PROMPT = MANIFEST["prompts"][1]
BASE_GREEDY = _safetensors_ints(FIXTURES / "models/llama/golden.safetensors", "p1.greedy")[:N_NEW]
R8_GREEDY = _safetensors_ints(FIXTURES / "adapters/golden_lora.safetensors", "lora-r8.p1.greedy")[:N_NEW]
RS_GREEDY = _safetensors_ints(
    FIXTURES / "adapters/golden_lora.safetensors", "rslora-r16-patterns.p1.greedy"
)[:N_NEW]
assert BASE_GREEDY != R8_GREEDY, "fixture adapters must change the output"


def test_lorax_client_generate_base_and_adapter():
    from lorax import Client

    client = Client(URL)
    base = client.generate(PROMPT, max_new_tokens=N_NEW, details=True, ignore_eos_token=True)
    assert [t.id for t in base.details.tokens] == BASE_GREEDY
    assert base.generated_text == "".join(t.text for t in base.details.tokens)
    assert base.details.generated_tokens == N_NEW
    assert base.details.prompt_tokens == len(MANIFEST["prompt_ids"][1])

    tuned = client.generate(
        PROMPT,
        adapter_id="lora-r8",
        adapter_source="local",
        max_new_tokens=N_NEW,
        details=True,
        ignore_eos_token=True,
    )
    assert [t.id for t in tuned.details.tokens] == R8_GREEDY


def test_lorax_client_generate_stream_with_adapter():
    from lorax import Client

    client = Client(URL)
    tokens, final = [], None
    for r in client.generate_stream(
        PROMPT,
        adapter_id="rslora-r16-patterns",
        adapter_source="local",
        max_new_tokens=N_NEW,
        ignore_eos_token=True,
    ):
        tokens.append(r.token)
        if r.generated_text is not None:
            final = r
    assert [t.id for t in tokens] == RS_GREEDY
    assert final is not None and final.details.generated_tokens == N_NEW
    assert final.generated_text == "".join(t.text for t in tokens)


def test_lorax_client_errors_are_raised_with_the_message():
    from lorax import Client
    from lorax.errors import ValidationError

    client = Client(URL)
    with pytest.raises(ValidationError) as e:
        client.generate(PROMPT, max_new_tokens=N_NEW, temperature=-1.0)
    assert "temperature" in str(e.value)


def test_text_generation_client_generate_and_stream():
    from text_generation import Client

    client = Client(URL)
    r = client.generate(PROMPT, max_new_tokens=N_NEW, top_n_tokens=2)
    ids = [t.id for t in r.details.tokens]
    # Without ignore_eos the answer may stop early at </s>; it is a prefix of the golden continuation.
    assert ids == BASE_GREEDY[: len(ids)] and len(ids) >= 1
    assert all(len(t) == 2 for t in r.details.top_tokens)
    streamed = [s.token.id for s in client.generate_stream(PROMPT, max_new_tokens=N_NEW)]
    assert streamed == ids


def _openai():
    from openai import OpenAI

    return OpenAI(base_url=f"{URL}/v1", api_key="unused")


def test_openai_completions_base_and_adapter():
    client = _openai()
    models = [m.id for m in client.models.list().data]
    assert models, "GET /v1/models listed nothing"
    base = client.completions.create(model="", prompt=PROMPT, max_tokens=N_NEW, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos_token": True})
    choice = base.choices[0]
    assert base.usage.completion_tokens == N_NEW
    assert base.usage.prompt_tokens == len(MANIFEST["prompt_ids"][1])
    assert len(choice.logprobs.tokens) == N_NEW and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    assert choice.finish_reason == "length"
    tuned = client.completions.create(model="lora-r8", prompt=PROMPT, max_tokens=N_NEW, temperature=0,
                                      extra_body={"ignore_eos_token": True, "adapter_source": "local"})
    assert tuned.choices[0].text != choice.text
    assert tuned.model == "lora-r8"
    # The adapter's text is what the native API (checked against peft above) gives for it.
    from lorax import Client

    native = Client(URL).generate(PROMPT, adapter_id="lora-r8", adapter_source="local", max_new_tokens=N_NEW,
                                  ignore_eos_token=True)
    assert tuned.choices[0].text == native.generated_text


def test_openai_completions_echo_scores_prompts_as_lm_eval_does():
    """Prompt scoring as lm-evaluation-harness's loglikelihood asks it: token ids, `echo`, `max_tokens: 0`,
    `logprobs: 1`. Each continuation token that transformers + peft's greedy decoding chose must be the most
    likely at its position (lm-eval's `is_greedy`) under the model it was decoded with, and the adapter's
    continuation must not all be greedy under the base model."""
    client = _openai()
    prompt = MANIFEST["prompt_ids"][1]

    def scored(model, continuation):
        ids = prompt + continuation
        r = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                      extra_body={"adapter_source": "local"})
        lp = r.choices[0].logprobs
        assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
        assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
        greedy = [lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(len(prompt), len(ids))]
        # lm-eval's own is_greedy compares texts: the top alternative's text with the token's.
        by_text = [max(lp.top_logprobs[i], key=lp.top_logprobs[i].get) == lp.tokens[i]
                   for i in range(len(prompt), len(ids))]
        assert by_text == greedy, (lp.tokens[len(prompt):], lp.top_logprobs[len(prompt):])
        return sum(lp.token_logprobs[len(prompt):]), greedy

    base_ll, base_greedy = scored("", BASE_GREEDY[:8])
    assert all(base_greedy), base_greedy
    tuned_ll, tuned_greedy = scored("lora-r8", R8_GREEDY[:8])
    assert all(tuned_greedy), tuned_greedy
    _, cross = scored("", R8_GREEDY[:8])
    assert not all(cross), "the adapter's continuation should not be the base model's greedy one"
    assert base_ll < 0 and tuned_ll < 0
    # Batched: the same scores, in order.
    r = client.completions.create(model="", prompt=[prompt + BASE_GREEDY[:8], prompt + R8_GREEDY[:8]], max_tokens=0,
                                  echo=True, logprobs=1)
    sums = [sum(c.logprobs.token_logprobs[len(prompt):]) for c in sorted(r.choices, key=lambda c: c.index)]
    assert sums[0] == pytest.approx(base_ll, abs=1e-4) and sums[1] < sums[0]


def test_openai_completions_stream_and_stop():
    client = _openai()
    full = client.completions.create(model="", prompt=PROMPT, max_tokens=N_NEW, temperature=0,
                                     extra_body={"ignore_eos_token": True}).choices[0].text
    parts = list(client.completions.create(model="", prompt=PROMPT, max_tokens=N_NEW, temperature=0, stream=True,
                                           extra_body={"ignore_eos_token": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    if stop.strip():
        stopped = client.completions.create(model="", prompt=PROMPT, max_tokens=N_NEW, temperature=0, stop=[stop],
                                            extra_body={"ignore_eos_token": True})
        assert stopped.choices[0].finish_reason == "stop"
        # As OpenAI: the text ends before the stop sequence, streamed or not.
        assert full.startswith(stopped.choices[0].text + stop) and stop not in stopped.choices[0].text
        parts = list(client.completions.create(model="", prompt=PROMPT, max_tokens=N_NEW, temperature=0, stop=[stop],
                                               stream=True, extra_body={"ignore_eos_token": True}))
        assert "".join(p.choices[0].text for p in parts if p.choices) == stopped.choices[0].text


def test_openai_chat_with_adapter_as_model():
    client = _openai()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(model="", messages=messages, max_tokens=N_NEW, temperature=0, seed=7,
                                          logprobs=True, top_logprobs=1)
    assert base.choices[0].message.role == "assistant"
    assert base.choices[0].logprobs.content and len(base.choices[0].logprobs.content[0].top_logprobs) == 1
    tuned = client.chat.completions.create(model="lora-r16-all", messages=messages, max_tokens=N_NEW, temperature=0,
                                           extra_body={"adapter_source": "local"})
    assert tuned.choices[0].message.content != base.choices[0].message.content
    chunks = list(client.chat.completions.create(model="lora-r16-all", messages=messages, max_tokens=N_NEW,
                                                 temperature=0, stream=True,
                                                 extra_body={"adapter_source": "local"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tuned.choices[0].message.content
    assert base.usage.prompt_tokens > 5


def test_openai_errors_have_openai_shape():
    import openai

    client = _openai()
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="", prompt=PROMPT, max_tokens=N_NEW, temperature=-1)
    assert "temperature" in str(e.value)
