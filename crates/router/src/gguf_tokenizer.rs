//! The tokenizer and chat template of a GGUF model, rebuilt from its metadata.
//!
//! llama.cpp stores a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`) as the token list, the
//! token types and the merges, and names the pre-tokenizer (`tokenizer.ggml.pre`) rather than storing it;
//! this module maps the names it knows to the pre-tokenizers the original `tokenizer.json` files use and
//! assembles a `tokenizer.json` document for the `tokenizers` crate. SentencePiece vocabularies
//! (`"llama"`: Llama 2, Mistral) store scores instead of merges; the merges are derived from them and the
//! usual "▁" normalizer and byte-fallback decoder are added. Control and user-defined tokens become added
//! tokens, so `<|im_start|>` and friends are matched whole.

use lorax_gguf::{GgufFile, Value};
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

/// Llama 3's pre-tokenizer split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer llama.cpp calls `pre`, as the model's original tokenizer.json spells it.
fn pre_tokenizer(pre: &str, add_prefix_space: bool) -> Result<Json, String> {
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(add_prefix_space, true),
        // SmolLM/StarCoder: every digit alone, then GPT-2's byte-level split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(false, true),
        ]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_SPLIT),
            byte_level(false, false),
        ]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_SPLIT),
            byte_level(false, false),
        ]}),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} is not known here (known: default, gpt-2, smollm, starcoder, refact, llama-bpe, smaug-bpe, qwen2)"
            ))
        }
    })
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, String> {
    g.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("metadata {key} is missing or not an array"))?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| format!("metadata {key} holds a non-string")))
        .collect()
}

fn token_id(g: &GgufFile, key: &str, n: usize) -> Result<Option<u32>, String> {
    match g.get_u64(key) {
        None => Ok(None),
        Some(id) if (id as usize) < n => Ok(Some(id as u32)),
        Some(id) => Err(format!("{key} {id} is outside the vocabulary of {n} tokens")),
    }
}

/// The `tokenizer.json` document equivalent to the GGUF metadata of `g`.
pub fn tokenizer_json(g: &GgufFile) -> Result<Json, String> {
    let model = g.get_str("tokenizer.ggml.model").unwrap_or("none");
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(format!(
                "GGUF tokenizer model {other:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece \"llama\" are); serve the model from a directory with its tokenizer.json instead"
            ))
        }
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        Some(a) => return Err(format!("{} token types for {} tokens", a.len(), tokens.len())),
        None => vec![1; tokens.len()],
    };
    let flag = |key: &str, default: bool| g.get(key).and_then(Value::as_bool).unwrap_or(default);
    // SentencePiece models mark word starts with "▁" and put one before the text; GPT-2 ones do not.
    let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", spm);
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
        // 2 = unknown, 3 = control (special), 4 = user-defined: matched whole, before the model sees the text.
        if *ty == 3 || *ty == 4 || (spm && *ty == 2) {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": *ty != 4}),
            );
        }
    }
    if vocab.len() != tokens.len() {
        return Err("the token list holds duplicates".into());
    }
    let n = tokens.len();
    let bos = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let post = match (flag("tokenizer.ggml.add_bos_token", spm), bos) {
        (true, Some(bos)) => {
            let text = tokens[bos as usize];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text: {"id": text, "ids": [bos], "tokens": [text]}}})
        }
        _ => Json::Null,
    };
    if spm {
        let scores: Vec<f64> = g
            .get("tokenizer.ggml.scores")
            .and_then(Value::as_array)
            .filter(|a| a.len() == n)
            .ok_or("a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")?
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0))
            .collect();
        let unk = token_id(g, "tokenizer.ggml.unknown_token_id", n)?.map_or("<unk>", |id| tokens[id as usize]);
        let replace_space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if add_space_prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace_space]})
        } else {
            replace_space
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        return Ok(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": spm_merges(&tokens, &scores),
            }
        }));
    }
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let pre = pre_tokenizer(g.get_str("tokenizer.ggml.pre").unwrap_or("default"), add_space_prefix)?;
    let ignore_merges = matches!(
        g.get_str("tokenizer.ggml.pre"),
        Some("llama-bpe" | "llama3" | "smaug-bpe")
    );
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// BPE merges equivalent to a SentencePiece vocabulary (which stores scores, not merges): every split
/// of a piece into two pieces of the vocabulary is a merge, ranked by the merged piece's score, then by
/// the scores of its halves (transformers' `GGUFTokenizerSkeleton` does the same).
fn spm_merges(tokens: &[&str], scores: &[f64]) -> Vec<[String; 2]> {
    let score: std::collections::HashMap<&str, f64> = tokens.iter().copied().zip(scores.iter().copied()).collect();
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for (piece, &s) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, s))
            .collect();
        local.sort_by(|a, b| {
            (score[b.0], score[b.1])
                .partial_cmp(&(score[a.0], score[a.1]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges
        .into_iter()
        .map(|(l, r, _)| [l.to_string(), r.to_string()])
        .collect()
}

/// The tokenizer of the GGUF model `g`.
pub fn tokenizer(g: &GgufFile) -> Result<Tokenizer, String> {
    let doc = tokenizer_json(g)?;
    doc.to_string().parse::<Tokenizer>().map_err(|e| e.to_string())
}

/// The chat template of `g` as a `tokenizer_config.json`-shaped value (`chat_template`, `bos_token`,
/// `eos_token`), if the file has a template.
pub fn tokenizer_config(g: &GgufFile) -> Option<Json> {
    let template = g.get_str("tokenizer.chat_template")?;
    let tokens = g.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    let text = |key: &str| {
        g.get_u64(key)
            .and_then(|id| tokens.and_then(|t| t.get(id as usize)))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Some(json!({
        "chat_template": template,
        "bos_token": text("tokenizer.ggml.bos_token_id"),
        "eos_token": text("tokenizer.ggml.eos_token_id"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    /// A SentencePiece vocabulary (Mistral 7B v0.1's, with its scores, as llama.cpp stores it) rebuilt into
    /// a BPE tokenizer encodes like Mistral's own tokenizer.json.
    #[test]
    fn sentencepiece_vocabulary_encodes_like_the_original_tokenizer() {
        let g = GgufFile::open(&fixture("gguf/spm-tokenizer.gguf")).expect("fixture");
        let ours = tokenizer(&g).expect("tokenizer");
        let theirs = Tokenizer::from_file(fixture("tokenizer/tokenizer.json")).expect("reference");
        let readme = std::fs::read_to_string(fixture("../../README.md")).expect("README");
        let mut texts: Vec<String> = readme.lines().map(str::to_string).collect();
        texts.extend(
            [
                "Hello world",
                " leading space",
                "two  spaces",
                "",
                "ünïcödé ✓ 🦀 中文 日本語",
                "tabs\tand\nnewlines\n\n",
                "<s>[INST] What is 12 + 34? [/INST]</s>",
                "don't stop-believing!",
                "\u{7}\u{0}control",
                "    indented code();",
            ]
            .map(str::to_string),
        );
        let mut tokens = 0;
        for text in &texts {
            for special in [true, false] {
                let a = ours.encode(text.as_str(), special).expect("ours");
                let b = theirs.encode(text.as_str(), special).expect("theirs");
                assert_eq!(a.get_ids(), b.get_ids(), "{text:?} (add_special_tokens {special})");
                tokens += a.get_ids().len();
            }
            let ids = theirs.encode(text.as_str(), false).expect("theirs");
            assert_eq!(
                ours.decode(ids.get_ids(), true).expect("decode"),
                theirs.decode(ids.get_ids(), true).expect("decode")
            );
        }
        assert!(tokens > 5000, "{tokens}");
    }

    fn tiny() -> GgufFile {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/tiny-llama.gguf");
        GgufFile::open(&p).expect("fixture")
    }

    #[test]
    fn byte_level_bpe_round_trips_and_applies_merges() {
        let g = tiny();
        let t = tokenizer(&g).expect("tokenizer");
        assert_eq!(t.get_vocab_size(true), 299);
        for text in [
            "the capital of france is paris .",
            "Ünïcödé ✓ and emoji 🦀, tabs\tand\nnewlines  ",
            "",
        ] {
            let enc = t.encode(text, true).expect("encode");
            assert_eq!(t.decode(enc.get_ids(), false).expect("decode"), text);
        }
        // Merges learnt from the corpus make " the" fewer tokens than its bytes; unknown words stay bytes.
        let the = t.encode(" the capital", false).expect("encode");
        assert!(the.get_ids().len() < " the capital".len(), "{:?}", the.get_tokens());
        let zq = t.encode("zqxj", false).expect("encode");
        assert_eq!(zq.get_ids().len(), 4);
        // Specials are whole tokens with their ids; digits are split one by one.
        let chat = t.encode("<|im_start|>user\n12<|im_end|>", false).expect("encode");
        assert_eq!(chat.get_ids()[0], 1);
        assert_eq!(*chat.get_ids().last().expect("last"), 2);
        let digits = t.encode("12", false).expect("encode");
        assert_eq!(digits.get_tokens(), ["1", "2"]);
        // No BOS is added (add_bos_token is false in the file).
        assert_ne!(t.encode("hello", true).expect("encode").get_ids()[0], 1);
    }

    #[test]
    fn chat_template_and_special_tokens_come_from_the_metadata() {
        let c = tokenizer_config(&tiny()).expect("template");
        assert!(c["chat_template"].as_str().expect("str").contains("<|im_start|>"));
        assert_eq!(c["bos_token"], "<|im_start|>");
        assert_eq!(c["eos_token"], "<|im_end|>");
    }

    #[test]
    fn unknown_pre_tokenizer_is_a_clear_error() {
        let e = pre_tokenizer("mystery", false).expect_err("unknown");
        assert!(e.contains("mystery") && e.contains("smollm"), "{e}");
    }
}
