//! SmolLM2-135M-Instruct's tokenizer and chat template, rebuilt from its GGUF metadata, against
//! transformers 5.17's own GGUF tokenizer (tests/fixtures/smollm2/reference.json): the ids of probe strings
//! (digits, Unicode, specials, spaces, contractions) and of every rendered chat prompt, and the rendered
//! prompt text itself. Skipped, visibly, when the GGUF file is not there (scripts/smollm2/fetch.sh).
#![allow(clippy::unwrap_used)]

use lorax_router::chat::{ChatTemplate, Message};
use serde_json::Value;

#[path = "../../../tests/fixtures/smollm2/gguf_path.rs"]
mod gguf_path;
use gguf_path::smollm2_gguf as gguf;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_and_chat_template_equal_transformers() {
    let Some(path) = gguf() else { return };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/smollm2/reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let tokenizer = lorax_router::load_tokenizer(&path).unwrap();
    let probes = reference["tokenizer"].as_array().unwrap();
    for p in probes {
        let text = p["text"].as_str().unwrap();
        let enc = tokenizer.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), ids(&p["ids"]).as_slice(), "ids of {text:?}");
        assert_eq!(
            tokenizer.decode(enc.get_ids(), false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    let g = lorax_gguf::GgufFile::open(&path).unwrap();
    let config = lorax_router::gguf_tokenizer::tokenizer_config(&g).unwrap();
    let template = ChatTemplate::from_tokenizer_config(&config).unwrap().unwrap();
    let mut rows = 0;
    for section in ["base", "adapters"] {
        let all: Vec<&Value> = match &reference[section] {
            Value::Array(a) => a.iter().collect(),
            Value::Object(o) => o.values().flat_map(|v| v.as_array().unwrap()).collect(),
            _ => unreachable!(),
        };
        for row in all {
            let messages = [Message {
                role: "user".into(),
                content: row["question"].as_str().unwrap().into(),
            }];
            let prompt = template.apply(&messages, true).unwrap();
            assert_eq!(prompt, row["prompt"].as_str().unwrap());
            let enc = tokenizer.encode(prompt.as_str(), true).unwrap();
            assert_eq!(enc.get_ids(), ids(&row["ids"]).as_slice(), "ids of {prompt:?}");
            rows += 1;
        }
    }
    eprintln!(
        "{} probes and {rows} chat prompts tokenized as transformers does",
        probes.len()
    );
    assert!(rows >= 30);
}
