//! The OpenAI-compatible routes over real HTTP against in-process fake shards (deterministic tokens that
//! depend on the adapter): completions and chat, whole and streamed, `n`, logprobs, stop, usage,
//! adapters as `model`, the chat template, `/v1/models`, and errors in OpenAI's shape.

mod common;

use common::{error_of, fake_tokens_for, Deployment, Setup, SseReader, HELLO_LAST};
use serde_json::{json, Value};

fn tokenizer() -> tokenizers::Tokenizer {
    lorax_router::load_tokenizer(&common::tokenizer_dir()).expect("tokenizer")
}

/// Text the fake shard's `tokens` add after `prompt_ids` (decoded in context, as the router does).
fn continuation(prompt_ids: &[u32], tokens: &[u32]) -> String {
    let t = tokenizer();
    let prefix = t.decode(prompt_ids, false).expect("decode");
    let all: Vec<u32> = prompt_ids.iter().chain(tokens).copied().collect();
    t.decode(&all, false).expect("decode")[prefix.len()..].to_string()
}

const HELLO: [u32; 2] = [1, HELLO_LAST];

/// The text of a stream's chunks at `pointer` (`/choices/0/text`, `/choices/0/delta/content`), joined.
fn streamed_text(chunks: &[Value], pointer: &str) -> String {
    chunks.iter().filter_map(|e| e.pointer(pointer)?.as_str()).collect()
}

async fn events(d: &Deployment, path: &str, body: Value) -> Vec<Value> {
    let response = d.post(path, body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("header")
        .starts_with("text/event-stream"));
    SseReader::new(response).collect().await
}

#[tokio::test]
async fn completions_whole_with_logprobs_usage_and_adapter_model() {
    let d = Deployment::start(Setup::default()).await;
    let body = json!({"model": "", "prompt": "Hello", "max_tokens": 5, "logprobs": 2, "temperature": 0});
    let r = d.post("/v1/completions", body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "text_completion");
    let info: Value = d.get("/info").await.json().await.expect("info");
    assert_eq!(v["model"], info["model_id"], "empty model means the base model");
    let tokens = fake_tokens_for("", HELLO_LAST, 5);
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], continuation(&HELLO, &tokens));
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7})
    );
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().expect("logprobs").len(), 5);
    for top in lp["top_logprobs"].as_array().expect("top") {
        assert_eq!(top.as_object().expect("map").len(), 2, "{top}");
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");

    // An adapter as `model`.
    let body = json!({"model": "org/adapter-a", "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    let v: Value = d.post("/v1/completions", body).await.json().await.expect("json");
    assert_eq!(v["model"], "org/adapter-a");
    let adapter_tokens = fake_tokens_for("org/adapter-a", HELLO_LAST, 4);
    assert_eq!(v["choices"][0]["text"], continuation(&HELLO, &adapter_tokens));
    assert_ne!(adapter_tokens, tokens[..4].to_vec());

    // The adapter is now known to /v1/models, next to the base model.
    let models: Value = d.get("/v1/models").await.json().await.expect("models");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.first().copied(), info["model_id"].as_str());
    assert!(ids.contains(&"org/adapter-a"), "{models}");
    d.assert_no_violations();
}

#[tokio::test]
async fn completions_stream_equals_whole_and_ends_with_usage_and_done() {
    let d = Deployment::start(Setup::default()).await;
    let whole: Value = d
        .post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 6}))
        .await
        .json()
        .await
        .expect("json");
    let events = events(
        &d,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let chunks = &events[..events.len() - 2];
    assert_eq!(chunks.len(), 6, "one chunk per token");
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().expect("text"));
    assert!(chunks[..5].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn n_choices_and_stop_sequences() {
    let d = Deployment::start(Setup::default()).await;
    let v: Value = d
        .post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 3, "n": 3}))
        .await
        .json()
        .await
        .expect("json");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        // n > 1 samples (unit test `temperature_zero_is_greedy_and_several_choices_sample`); the fake
        // shard's tokens do not depend on it, so the texts are not compared here.
    }
    assert_eq!(v["usage"]["completion_tokens"], 9);

    // Streamed n=2: each choice's chunks carry its index.
    let two = events(
        &d,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 3, "n": 2, "stream": true}),
    )
    .await;
    for index in 0..2 {
        let text: String = two
            .iter()
            .filter(|e| e["choices"][0]["index"] == index)
            .map(|e| e["choices"][0]["text"].as_str().expect("text"))
            .collect();
        assert_eq!(text, choices[0]["text"].as_str().expect("text"), "choice {index}");
    }

    // A stop sequence inside the text: finish_reason "stop", the text cut before the match (OpenAI: the
    // returned text does not contain the stop sequence), whole and streamed alike.
    let full = choices[0]["text"].as_str().expect("text").to_string();
    let stop: String = full.chars().skip(2).take(2).collect();
    let body = json!({"prompt": "Hello", "max_tokens": 3, "stop": stop});
    let v = d.post_ok("/v1/completions", body.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{v}");
    let text = c["text"].as_str().expect("text");
    assert!(
        full.starts_with(&format!("{text}{stop}")) && !text.contains(&stop),
        "{text:?} vs {full:?} / {stop:?}"
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = events(&d, "/v1/completions", streamed.clone()).await;
    let joined = streamed_text(&chunks, "/choices/0/text");
    assert_eq!(joined, text, "streamed {chunks:?}");
    // Two choices streamed side by side, each cut the same way.
    streamed["n"] = json!(2);
    let chunks = events(&d, "/v1/completions", streamed).await;
    for index in 0..2 {
        let mine: Vec<Value> = chunks
            .iter()
            .filter(|e| e["choices"][0]["index"] == index)
            .cloned()
            .collect();
        assert_eq!(
            streamed_text(&mine, "/choices/0/text"),
            text,
            "choice {index}: {chunks:?}"
        );
        assert_eq!(mine.last().expect("chunks")["choices"][0]["finish_reason"], "stop");
    }
    // Chat too.
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let v = d
        .post_ok("/v1/chat/completions", json!({"messages": messages, "max_tokens": 3}))
        .await;
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    // One character inside the text, so that no token count ends the request first.
    let stop: String = full.chars().skip(1).take(1).collect();
    let body = json!({"messages": messages, "max_tokens": 4, "stop": [stop]});
    let v = d.post_ok("/v1/chat/completions", body.clone()).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(
        full.starts_with(&format!("{content}{stop}")) && !content.contains(&stop),
        "{v}"
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = events(&d, "/v1/chat/completions", streamed).await;
    let joined = streamed_text(&chunks, "/choices/0/delta/content");
    assert_eq!(joined, content, "streamed {chunks:?}");
}

#[tokio::test]
async fn special_tokens_are_not_content() {
    let d = Deployment::start(Setup::default()).await;
    // "<s>" is the BOS special token, so the prompt is [1, 1] and the fake's next token is 2 = </s>.
    let whole = d
        .post_ok(
            "/v1/completions",
            json!({"prompt": "<s>", "max_tokens": 5, "logprobs": 1}),
        )
        .await;
    let c = &whole["choices"][0];
    assert_eq!(c["text"], "", "{whole}");
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["logprobs"]["tokens"], json!(["</s>"]), "the token is in logprobs");
    let chunks = events(
        &d,
        "/v1/completions",
        json!({"prompt": "<s>", "max_tokens": 5, "stream": true}),
    )
    .await;
    let joined = streamed_text(&chunks, "/choices/0/text");
    assert_eq!(joined, "", "streamed {chunks:?}");

    // The end-of-sequence token as the last token allowed: `stop` here (as OpenAI, vLLM), `length` on the
    // native route (as TGI); with `ignore_eos_token` it is a length.
    let body = json!({"prompt": "<s>", "max_tokens": 1});
    let whole = d.post_ok("/v1/completions", body.clone()).await;
    assert_eq!(whole["choices"][0]["finish_reason"], "stop", "{whole}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = events(&d, "/v1/completions", streamed).await;
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{chunks:?}");
    let body = json!({"prompt": "<s>", "max_tokens": 1, "ignore_eos_token": true});
    let whole = d.post_ok("/v1/completions", body).await;
    assert_eq!(whole["choices"][0]["finish_reason"], "length", "{whole}");
    let native = d
        .post_ok(
            "/generate",
            json!({"inputs": "<s>", "parameters": {"max_new_tokens": 1, "details": true}}),
        )
        .await;
    assert_eq!(native["details"]["finish_reason"], "length", "{native}");

    // A stop sequence that is the special token's text (the token ignored as end of sequence).
    let body = json!({"prompt": "<s>", "max_tokens": 5, "ignore_eos_token": true, "stop": ["</s>"]});
    let whole = d.post_ok("/v1/completions", body.clone()).await;
    assert_eq!(whole["choices"][0]["text"], "", "{whole}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop", "{whole}");
    assert_eq!(whole["usage"]["completion_tokens"], 1, "{whole}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = events(&d, "/v1/completions", streamed).await;
    assert_eq!(streamed_text(&chunks, "/choices/0/text"), "", "streamed {chunks:?}");
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{chunks:?}");
}

#[tokio::test]
async fn echoed_completion_offsets_index_the_returned_text() {
    let d = Deployment::start(Setup::default()).await;
    // Words (their leading spaces), a character split over byte tokens, and a prompt of token ids.
    let t = tokenizer();
    let ids: Vec<u32> = t.encode("Hello world again", true).expect("encode").get_ids().to_vec();
    for prompt in [
        json!("Hello world again"),
        json!("日本 and 🦀 too"),
        json!("Hello</s> world"),
        json!(ids),
    ] {
        let v = d
            .post_ok(
                "/v1/completions",
                json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 3}),
            )
            .await;
        let c = &v["choices"][0];
        let text: Vec<char> = c["text"].as_str().expect("text").chars().collect();
        let lp = &c["logprobs"];
        let tokens = lp["tokens"].as_array().expect("tokens");
        let offsets = lp["text_offset"].as_array().expect("offsets");
        assert_eq!(tokens.len(), v["usage"]["total_tokens"], "{v}");
        // Every token's text stands at its offset, and the prompt's tokens (but the special <s>) join into
        // the echoed prompt.
        let mut joined = String::new();
        for (i, (tok, o)) in tokens.iter().zip(offsets).enumerate().filter(|(_, (t, _))| *t != "<s>") {
            let o = usize::try_from(o.as_u64().expect("offset")).expect("offset");
            let tok: Vec<char> = tok.as_str().expect("token").chars().collect();
            assert_eq!(text[o..o + tok.len()], tok[..], "token {i}: {v}");
            if i < usize::try_from(v["usage"]["prompt_tokens"].as_u64().expect("usage")).expect("count") {
                joined.extend(tok);
            }
        }
        // The fake shard's first alternative of a prompt token is the token itself: it reads as the token
        // does (a word's leading space included), so a client can tell the greedy token by its text.
        let prompt_tokens = usize::try_from(v["usage"]["prompt_tokens"].as_u64().expect("usage")).expect("count");
        for (i, tok) in tokens.iter().enumerate().take(prompt_tokens).skip(1) {
            let top = lp["top_logprobs"][i].as_object().expect("alternatives");
            assert!(
                top.contains_key(tok.as_str().expect("token")),
                "position {i}: {tok} not in {top:?}: {v}"
            );
        }
        let echoed: String = text.iter().collect();
        assert!(
            echoed.starts_with(&joined),
            "prompt tokens {joined:?} do not join into {echoed:?}: {v}"
        );
        assert!(!joined.contains('\u{FFFD}'), "{v}");
        if prompt.is_string() {
            assert_eq!(joined, prompt.as_str().expect("prompt"), "{v}");
        } else {
            assert_eq!(
                joined, "Hello world again",
                "ids echo as their text, <s> taking no room: {v}"
            );
        }
    }
}

/// `echo` with `logprobs` returns the prompt's tokens first, with their log-probabilities and alternatives
/// (the first one's `null`), as OpenAI's completions do; with `max_tokens: 0` the prompt alone (prompt
/// scoring, as lm-evaluation-harness's loglikelihood asks), whole and streamed alike.
#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    let d = Deployment::start(Setup::default()).await;
    let body = json!({"prompt": "Hello", "echo": true, "logprobs": 2, "max_tokens": 2, "temperature": 0});
    let v = d.post_ok("/v1/completions", body.clone()).await;
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let generated = fake_tokens_for("", HELLO_LAST, 2);
    assert_eq!(c["text"], format!("Hello{}", continuation(&HELLO, &generated)), "{v}");
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), 4, "{v}");
    assert_eq!(lp["tokens"][1], "Hello", "{v}");
    // The fake shard: prompt tokens after the first have logprob -1; their first alternative is the token.
    assert_eq!(lp["token_logprobs"][0], Value::Null, "{v}");
    assert_eq!(lp["top_logprobs"][0], Value::Null, "{v}");
    assert_eq!(lp["token_logprobs"][1], -1.0, "{v}");
    let top = lp["top_logprobs"][1].as_object().expect("alternatives");
    assert_eq!(top.len(), 2, "{v}");
    assert_eq!(top["Hello"], -1.0, "{v}");
    assert_eq!(lp["token_logprobs"][2], -0.25, "a generated token: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 2);

    // Streamed: the first chunk carries the echo and the prompt's logprobs; the whole is the same.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = events(&d, "/v1/completions", streamed).await;
    assert_eq!(
        streamed_text(&chunks, "/choices/0/text"),
        c["text"].as_str().expect("text")
    );
    let tokens: Vec<Value> = chunks
        .iter()
        .filter_map(|e| e.pointer("/choices/0/logprobs/tokens")?.as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(tokens, lp["tokens"].as_array().expect("tokens").clone(), "{chunks:?}");

    // Prompt scoring: the prompt alone, no completion tokens.
    let mut score = body;
    score["max_tokens"] = json!(0);
    let v = d.post_ok("/v1/completions", score.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(c["text"], "Hello", "{v}");
    assert_eq!(c["finish_reason"], "length", "{v}");
    assert_eq!(c["logprobs"]["tokens"], json!(["<s>", "Hello"]), "{v}");
    assert_eq!(c["logprobs"]["token_logprobs"], json!([null, -1.0]), "{v}");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2})
    );
    score["stream"] = json!(true);
    score["stream_options"] = json!({"include_usage": true});
    let chunks = events(&d, "/v1/completions", score).await;
    assert_eq!(streamed_text(&chunks, "/choices/0/text"), "Hello", "{chunks:?}");
    let usage = chunks.iter().find_map(|e| e.get("usage")).expect("usage chunk");
    assert_eq!(usage["completion_tokens"], 0, "{chunks:?}");
}

/// `prompt` as a list (a batch: `n` choices of each prompt, in order, and each prompt's tokens counted
/// once in `usage`) and as token ids (no special tokens added; echoed as their text).
#[tokio::test]
async fn batched_and_token_id_prompts() {
    let d = Deployment::start(Setup::default()).await;
    let one = d
        .post_ok(
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0}),
        )
        .await;
    let hello = one["choices"][0]["text"].clone();
    let v = d
        .post_ok(
            "/v1/completions",
            json!({"prompt": ["Hello", "Hello world"], "n": 2, "max_tokens": 3, "temperature": 0}),
        )
        .await;
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
    }
    assert_eq!(choices[0]["text"], hello, "{v}");
    assert_eq!(choices[1]["text"], hello, "{v}");
    assert_ne!(choices[2]["text"], hello, "the second prompt's choices: {v}");
    let t = tokenizer();
    let world = t.encode("Hello world", true).expect("encode").get_ids().len();
    assert_eq!(v["usage"]["prompt_tokens"], 2 + world, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");

    // Token ids: the same prompt as "Hello" (its ids include <s>), the same answer.
    let v = d
        .post_ok(
            "/v1/completions",
            json!({"prompt": HELLO, "max_tokens": 3, "temperature": 0, "echo": true}),
        )
        .await;
    // Echoed as their text, special tokens left out.
    let echoed = t.decode(&HELLO, true).expect("decode");
    assert_eq!(echoed, "Hello");
    assert_eq!(
        v["choices"][0]["text"],
        format!("{echoed}{}", hello.as_str().expect("text")),
        "{v}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], 2, "{v}");
    let v = d
        .post_ok(
            "/v1/completions",
            json!({"prompt": [HELLO, HELLO], "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(v["choices"][1]["text"], hello, "{v}");

    // At most --max-client-batch-size (4 here) prompts in one request.
    let (status, v) = error_of(
        d.post(
            "/v1/completions",
            json!({"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 1}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["param"], "prompt", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("5 prompts") && message.contains("--max-client-batch-size"),
        "{v}"
    );
}

#[tokio::test]
async fn chat_uses_the_template_without_a_second_bos() {
    let d = Deployment::start(Setup::default()).await;
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]);
    let rendered = "<s>[INST] Be brief.\n\nHi there [/INST]";
    let prompt_ids: Vec<u32> = tokenizer().encode(rendered, false).expect("encode").get_ids().to_vec();
    assert_eq!(prompt_ids[0], 1, "the template's <s> is the BOS token");
    assert_ne!(prompt_ids[1], 1);
    let last = *prompt_ids.last().expect("ids");

    let body = json!({"model": "", "messages": messages, "max_tokens": 4, "logprobs": true, "top_logprobs": 2});
    let v = d.post_ok("/v1/chat/completions", body).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_ids.len(), "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let tokens = fake_tokens_for("", last, 4);
    assert_eq!(c["message"]["content"], continuation(&prompt_ids, &tokens));
    let content = c["logprobs"]["content"].as_array().expect("logprobs");
    assert_eq!(content.len(), 4);
    assert!(content
        .iter()
        .all(|t| t["top_logprobs"].as_array().expect("top").len() == 2));

    // A byte-fallback token (an incomplete character: its text is empty) has its byte as `bytes`. The
    // first adapter name whose fake continuation reaches a high byte before any end-of-sequence token
    // picks it.
    let tk = tokenizer();
    let high_byte = |id: u32| {
        tk.id_to_token(id)
            .filter(|p| p.len() == 6 && p.starts_with("<0x"))
            .and_then(|p| u8::from_str_radix(&p[3..5], 16).ok())
            .filter(|&b| b >= 0x80)
    };
    let (adapter, at, byte) = (0..1000)
        .map(|i| format!("org/bytes-{i}"))
        .find_map(|n| {
            let ids = fake_tokens_for(&n, last, 64);
            let at = ids.iter().position(|&id| id == 2 || high_byte(id).is_some())?;
            Some((n.clone(), at, high_byte(ids[at])?))
        })
        .expect("an adapter name whose continuation reaches a high byte");
    let body = json!({"model": adapter, "messages": messages, "max_tokens": at + 1, "logprobs": true});
    let v = d.post_ok("/v1/chat/completions", body).await;
    let entry = &v["choices"][0]["logprobs"]["content"][at];
    assert_eq!(entry["bytes"], json!([byte]), "{adapter} token {at}: {entry}");

    // Streamed, with an adapter: the role comes first, the text adds up.
    let body = json!({"model": "org/chat-adapter", "messages": messages, "max_tokens": 4, "stream": true});
    let events = events(&d, "/v1/chat/completions", body).await;
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    let chunks = &events[..events.len() - 1];
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().expect("content"))
        .collect();
    let adapter_tokens = fake_tokens_for("org/chat-adapter", last, 4);
    assert_eq!(text, continuation(&prompt_ids, &adapter_tokens));
    d.assert_no_violations();
}

#[tokio::test]
async fn errors_have_openai_shape() {
    let d = Deployment::start(Setup::default()).await;
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "Hello", "temperature": -1.0}),
            422,
            "temperature",
        ),
        ("/v1/completions", json!({"prompt": []}), 422, "empty"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            422,
            "`top_logprobs` must be at most 20",
        ),
        ("/v1/completions", json!({"prompt": [[1, 99999999]]}), 422, "vocabulary"),
        ("/v1/completions", json!({"prompt": [1, -2]}), 422, "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 0}),
            422,
            "max_tokens",
        ),
        ("/v1/completions", json!({"prompt": "Hello", "n": 9}), 422, "`n`"),
        (
            "/v1/completions",
            json!({"prompt": "Hello", "logprobs": 6}),
            422,
            "at most 5",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hello", "model": "x", "adapter_source": "s3"}),
            422,
            "adapter_source",
        ),
        ("/v1/completions", json!({"prompt": 7}), 422, ""),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            422,
            "must not be empty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "assistant", "content": "x"}]}),
            422,
            "Conversation roles must alternate",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            422,
            "tools",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (got, v) = error_of(d.post(path, body.clone()).await).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("not OpenAI's shape: {v}"));
        assert!(message.contains(needle), "{path} {body}: {message}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    // The shared validation's messages in these routes' names, with the field as `param`.
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "Hello", "max_tokens": 100_000})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100_000}),
        ),
    ] {
        let (got, v) = error_of(d.post(path, body).await).await;
        assert_eq!(got, 422, "{path}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("`max_tokens`") && message.contains("prompt tokens"),
            "{path}: {message}"
        );
        assert!(
            !message.contains("max_new_tokens") && !message.contains("inputs"),
            "{path}: {message}"
        );
        assert_eq!(v["error"]["param"], "max_tokens", "{path}: {v}");
    }
    let (_, v) = error_of(
        d.post("/v1/completions", json!({"prompt": "Hello", "temperature": -1.0}))
            .await,
    )
    .await;
    assert_eq!(v["error"]["param"], "temperature", "{v}");
    // Fields of the wrong type, shared or not: the message and `param` name the field (the shared fields
    // are flattened into each request, where serde alone loses the path).
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        ("/v1/chat/completions", body)
    };
    for ((path, body), field, reason) in [
        (
            ("/v1/completions", json!({"prompt": "Hello", "temperature": "hot"})),
            "temperature",
            "expected f32",
        ),
        (
            chat(json!({"stop": 5})),
            "stop",
            "expected a string or a list of strings",
        ),
        (chat(json!({"max_tokens": "many"})), "max_tokens", "expected i64"),
        (
            chat(json!({"messages": [{"role": "user", "content": 5}]})),
            "messages",
            "content parts",
        ),
        (
            ("/v1/completions", json!({"prompt": {"text": "Hello"}})),
            "prompt",
            "a list of lists of token ids",
        ),
        (
            ("/v1/completions", json!({"prompt": "Hello", "best_of": 2})),
            "best_of",
            "not supported",
        ),
    ] {
        let (got, v) = error_of(d.post(path, body.clone()).await).await;
        assert_eq!(got, 422, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("`{field}")) && message.contains(reason),
            "{body}: {v}"
        );
        assert!(!message.contains("enum"), "no type names of ours: {v}");
        assert_eq!(v["error"]["param"], field, "{body}: {v}");
    }
    // Malformed JSON is a 4xx in the same shape.
    let r = d
        .http
        .post(format!("{}/v1/completions", d.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    let (got, v) = error_of(r).await;
    assert!((400..500).contains(&got), "{got}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[tokio::test]
async fn chat_uses_the_template_an_adapter_ships() {
    let d = Deployment::start(Setup::default()).await;
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let rendered = "ADAPTER user: Hi there =>";
    let ids: Vec<u32> = tokenizer().encode(rendered, false).expect("encode").get_ids().to_vec();
    let last = *ids.last().expect("ids");

    // Concurrent first requests for the adapter share one template fetch.
    let mut handles = Vec::new();
    for _ in 0..3 {
        let (http, url) = (d.http.clone(), format!("{}/v1/chat/completions", d.base));
        let body = json!({"model": "org/templated-adapter", "messages": messages, "max_tokens": 3});
        handles.push(tokio::spawn(async move {
            http.post(url)
                .json(&body)
                .send()
                .await
                .expect("sent")
                .json::<Value>()
                .await
                .expect("json")
        }));
    }
    for h in handles {
        let v = h.await.expect("task");
        assert_eq!(v["usage"]["prompt_tokens"], ids.len(), "the adapter's template: {v}");
        let tokens = fake_tokens_for("org/templated-adapter", last, 3);
        assert_eq!(v["choices"][0]["message"]["content"], continuation(&ids, &tokens));
    }
    // One fetch for the template, one by the batching task: never one per request.
    assert!(
        d.hub.downloads("org/templated-adapter") <= 2,
        "{}",
        d.hub.downloads("org/templated-adapter")
    );

    // An adapter without its own template, and the base model, use the model's.
    let base_ids = tokenizer()
        .encode("<s>[INST] Hi there [/INST]", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    for model in ["", "org/plain-adapter"] {
        let v = d
            .post_ok(
                "/v1/chat/completions",
                json!({"model": model, "messages": messages, "max_tokens": 2}),
            )
            .await;
        assert_eq!(v["usage"]["prompt_tokens"], base_ids.len(), "{model:?}: {v}");
    }

    // A template fetch that fails fails the request like any adapter failure.
    d.hub
        .fail("org/templated-missing", tonic::Code::NotFound, "no such adapter");
    let (status, v) = error_of(
        d.post(
            "/v1/chat/completions",
            json!({"model": "org/templated-missing", "messages": messages}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["type"], "adapter_not_found");

    // An adapter whose template does not compile, or whose tokenizer_config.json is not JSON, fails chat
    // requests with 422 rather than rendering them with the model's template; the native route, which
    // renders nothing, still serves it.
    for (model, why) in [
        ("org/badtemplate-adapter", "chat template cannot be used"),
        ("org/badconfig-adapter", "tokenizer_config.json is not JSON"),
    ] {
        let (status, v) = error_of(
            d.post(
                "/v1/chat/completions",
                json!({"model": model, "messages": messages, "max_tokens": 2}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 422, "{model}: {v}");
        assert_eq!(v["error"]["type"], "adapter_invalid", "{model}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why) && message.contains(model), "{model}: {message}");
        d.post_ok(
            "/generate",
            json!({"inputs": "Hello", "parameters": {"adapter_id": model, "max_new_tokens": 2}}),
        )
        .await;
    }
    d.assert_no_violations();
}

/// LoRAX's `apply_chat_template: true` on /generate and /generate_stream: `inputs` is a JSON list of
/// messages rendered with the chat template (the adapter's own when it ships one).
#[tokio::test]
async fn native_routes_apply_the_chat_template() {
    let d = Deployment::start(Setup::default()).await;
    let inputs = json!([{"role": "user", "content": "Hi there"}]).to_string();
    let ids: Vec<u32> = tokenizer()
        .encode("<s>[INST] Hi there [/INST]", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let body = json!({"inputs": inputs, "parameters": {"apply_chat_template": true, "max_new_tokens": 3}});
    let r = d.post("/generate", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-prompt-tokens"], ids.len().to_string().as_str());
    let v: Value = r.json().await.expect("json");
    let tokens = fake_tokens_for("", *ids.last().expect("ids"), 3);
    assert_eq!(v["generated_text"], continuation(&ids, &tokens));
    // Streamed: the same text.
    let events = events(&d, "/generate_stream", body).await;
    assert_eq!(events.last().expect("events")["generated_text"], v["generated_text"]);

    // With an adapter that ships a template, that one renders the prompt.
    let own: Vec<u32> = tokenizer()
        .encode("ADAPTER user: Hi there =>", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let body = json!({"inputs": inputs, "parameters": {
        "apply_chat_template": true, "max_new_tokens": 2, "adapter_id": "org/templated-native"
    }});
    let r = d.post("/generate", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-prompt-tokens"], own.len().to_string().as_str());

    // Inputs that are not a message list are a 422.
    let (status, v) = error_of(
        d.post(
            "/generate",
            json!({"inputs": "plain text", "parameters": {"apply_chat_template": true}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().expect("message").contains("JSON list"), "{v}");
    d.assert_no_violations();
}

#[tokio::test]
async fn a_bearer_token_is_not_a_hub_token_on_openai_routes() {
    let d = Deployment::start(Setup::default()).await;
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let cases = [
        (
            "/v1/completions",
            json!({"model": "org/oai-bearer", "prompt": "Hello", "max_tokens": 2}),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "org/oai-bearer-chat", "messages": messages, "max_tokens": 2}),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "org/oai-body-token", "prompt": "Hello", "max_tokens": 2, "api_token": "hf_BODY"}),
            Some("hf_BODY"),
        ),
    ];
    for (path, body, hub_token) in cases {
        let id = body["model"].as_str().expect("model").to_string();
        // An OpenAI client's placeholder key.
        let r = d
            .http
            .post(format!("{}{path}", d.base))
            .header("authorization", "Bearer EMPTY")
            .json(&body)
            .send()
            .await
            .expect("answered");
        assert_eq!(r.status(), 200, "{id}");
        let seen = d.hub.tokens(&id);
        assert!(!seen.is_empty(), "{id} was downloaded");
        assert!(
            seen.iter().all(|t| t.as_deref() == hub_token),
            "{id}: the hub saw {seen:?}"
        );
    }
}

#[tokio::test]
async fn a_chat_request_fetching_its_template_holds_its_place() {
    let d = Deployment::start(Setup {
        flags: vec!["--max-concurrent-requests".into(), "1".into()],
        ..Setup::default()
    })
    .await;
    d.hub.hold("org/templated-held");
    let body = json!({"model": "org/templated-held", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2});
    let held = {
        let (http, url) = (d.http.clone(), format!("{}/v1/chat/completions", d.base));
        tokio::spawn(async move { http.post(url).json(&body).send().await.expect("answered").status() })
    };
    common::eventually(
        "the template's download started",
        std::time::Duration::from_secs(20),
        || async { d.hub.downloads("org/templated-held") == 1 },
    )
    .await;
    // The one place is taken: another request gets 429 at once.
    let r = d
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(r.status(), 429);
    d.hub.release("org/templated-held");
    assert_eq!(held.await.expect("task"), 200);

    // More choices than the server takes at once could never start: 422, not a 429 that invites
    // retries; as many as it takes are served.
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2, "n": 2})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2}),
        ),
    ] {
        let (status, v) = error_of(d.post(path, body).await).await;
        assert_eq!(status, 422, "{path}: {v}");
        assert_eq!(v["error"]["type"], "validation", "{path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("`n` must be at most 1"),
            "{v}"
        );
    }
    d.post_ok("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2, "n": 1}))
        .await;
}

/// Chat follows OpenAI's limits and names: `top_logprobs` up to 20 (the error names the field), and
/// `max_completion_tokens` wins over `max_tokens` (as vLLM).
#[tokio::test]
async fn chat_top_logprobs_and_max_completion_tokens() {
    let d = Deployment::start(Setup::default()).await;
    let v = d
        .post_ok(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 20,
                   "max_tokens": 6, "max_completion_tokens": 3, "ignore_eos_token": true}),
        )
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().expect("content");
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(content.len(), 3, "{v}");
    for t in content {
        assert_eq!(t["top_logprobs"].as_array().expect("alternatives").len(), 20, "{v}");
    }
    let (status, e) = error_of(
        d.post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 21}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["param"], "top_logprobs", "{e}");
}
