//! Long prompts tokenized in pieces on a pool of threads, for tokenizers where that gives the ids of one pass.
//!
//! A SentencePiece-style BPE tokenizer with no pre-tokenizer (Llama 2, Mistral 7B v0.1: the normalizer
//! prepends `▁` and turns each space into `▁`) runs its merges over a whole prompt as one word: about 1 ms
//! for 1000 tokens on the GPU machine's CPU, all of it on the request's way to its first token. Where no
//! token of the vocabulary has a `▁` after another character, no merge joins the symbols on the two sides of
//! a space that follows a character other than a space or a `▁` (after normalizing: a `▁` after another
//! character). So the text can be cut there and the pieces encoded apart, each piece but the first without
//! its first space (the `▁` the normalizer prepends to a piece stands for it), then joined and
//! post-processed (the BOS token): the same ids as one pass.
//!
//! Added tokens (`<s>`, `</s>`, ...) are split out of the text before the normalizer runs, and each text
//! segment between them gets its own prepended `▁`; so a cut is never placed right after or right before
//! one, and only tokenizers whose added tokens hold no white space and strip nothing are taken.

use std::sync::Arc;

use tokenizers::{Encoding, ModelWrapper, Tokenizer};

/// Bytes of text a piece is cut at (a 1000-token English-like prompt is about 4 KB: eight pieces).
const PIECE_BYTES: usize = 512;

/// Cuts long texts into pieces that encode to the same ids as the whole (see the module's documentation),
/// and encodes them on a pool of its own (so that a long prompt's pieces neither wait for nor hold up other
/// work on rayon's global pool).
pub struct PieceEncoder {
    /// The tokenizer `for_tokenizer` checked.
    tokenizer: Arc<Tokenizer>,
    /// The added tokens' texts: no cut right after or right before one.
    added: Vec<String>,
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for PieceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceEncoder")
            .field("added", &self.added)
            .field("threads", &self.pool.current_num_threads())
            .finish_non_exhaustive()
    }
}

/// Threads of the pool that encodes long prompts in pieces: the machine's cores, from 2 to 8 (a 1000-token
/// prompt is about eight pieces of 512 bytes; more gained little on the GPU machine: session 21).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

impl PieceEncoder {
    /// `Some` where `tokenizer` is a BPE tokenizer of the kind the module describes: the normalizer exactly
    /// `Prepend("▁")` then `Replace(" ", "▁")`, no pre-tokenizer, no padding or truncation (each piece is
    /// post-processed alone), a BPE model without dropout, affixes or whole-word lookups whose vocabulary
    /// holds `▁` (else unknown characters could fuse across a cut) and has no `▁` after another character,
    /// and added tokens without white space or `▁` that neither strip nor match whole words nor match
    /// normalized text. `threads` (at least 2; [`default_threads`] for a server) is the size of its pool.
    pub fn for_tokenizer(tokenizer: Arc<Tokenizer>, threads: usize) -> Option<Self> {
        let expected = serde_json::json!({
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        });
        let normalizer = serde_json::to_value(tokenizer.get_normalizer()?).ok()?;
        if normalizer != expected
            || tokenizer.get_pre_tokenizer().is_some()
            || tokenizer.get_padding().is_some()
            || tokenizer.get_truncation().is_some()
            || threads < 2
        {
            return None;
        }
        let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
            return None;
        };
        if bpe.dropout.is_some()
            || bpe.ignore_merges
            || bpe.continuing_subword_prefix.is_some()
            || bpe.end_of_word_suffix.is_some()
        {
            return None;
        }
        let joins_across = |token: &str| {
            let mut previous = None;
            token.chars().any(|c| {
                let across = c == '▁' && previous.is_some_and(|p| p != '▁');
                previous = Some(c);
                across
            })
        };
        let vocab = tokenizer.get_vocab(false);
        if !vocab.contains_key("▁") || vocab.keys().any(|t| joins_across(t)) {
            return None;
        }
        let mut added = Vec::new();
        for token in tokenizer.get_added_tokens_decoder().into_values() {
            let plain = !token.content.is_empty()
                && !token.content.chars().any(|c| c.is_whitespace() || c == '▁')
                && !token.lstrip
                && !token.rstrip
                && !token.single_word
                && !token.normalized;
            if !plain {
                return None;
            }
            added.push(token.content);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tokenize-{i}"))
            .build()
            .ok()?;
        Some(Self { tokenizer, added, pool })
    }

    /// The byte offsets where `text` is cut into about `pieces` pieces: spaces after a character other than
    /// a space or a `▁` (which the normalizer's `▁` would join: the vocabulary has `▁▁`), not the text's
    /// last character, neither right after nor right before an added token, at or past each
    /// `len * j / pieces`.
    fn cuts(&self, text: &str, pieces: usize) -> Vec<usize> {
        let bytes = text.as_bytes();
        let mut cuts: Vec<usize> = Vec::with_capacity(pieces.saturating_sub(1));
        for j in 1..pieces {
            let from = (bytes.len() * j / pieces).max(cuts.last().map_or(1, |&c| c + 1));
            // A piece is never empty: the normalizer prepends nothing to an empty text.
            let found = (from..bytes.len().saturating_sub(1)).find(|&i| {
                bytes[i] == b' '
                    && bytes[i - 1] != b' '
                    && !text[..i].ends_with('▁')
                    && !self.added.iter().any(|a| text[..i].ends_with(a.as_str()))
                    && !self.added.iter().any(|a| text[i + 1..].starts_with(a.as_str()))
            });
            match found {
                Some(i) => cuts.push(i),
                None => break,
            }
        }
        cuts
    }

    /// The tokenizer's encoding of `text`: a piece of [`PIECE_BYTES`] for each thread of the pool at most,
    /// encoded on it (a short text in one pass). Its ids and special-tokens mask are those of
    /// `tokenizer.encode`; nothing else is (no offsets or token strings: callers that need them encode in
    /// one pass).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> tokenizers::Result<Encoding> {
        let pieces = (text.len() / PIECE_BYTES).min(self.pool.current_num_threads());
        self.encode_pieces(text, add_special_tokens, pieces)
    }

    /// [`PieceEncoder::encode`] in about `pieces` pieces (one pass when none can be cut).
    fn encode_pieces(&self, text: &str, add_special_tokens: bool, pieces: usize) -> tokenizers::Result<Encoding> {
        let cuts = self.cuts(text, pieces);
        if cuts.is_empty() {
            return self.tokenizer.encode_fast(text, add_special_tokens);
        }
        let starts = std::iter::once(0).chain(cuts.iter().map(|&c| c + 1));
        let ends = cuts.iter().copied().chain(std::iter::once(text.len()));
        let parts: Vec<&str> = starts.zip(ends).map(|(a, b)| &text[a..b]).collect();
        // The tokenizer's own batch encoding (its parallel iterator runs on the installed pool).
        let encodings = self.pool.install(|| self.tokenizer.encode_batch_fast(parts, false))?;
        self.tokenizer
            .post_process(Encoding::merge(encodings, false), None, add_special_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detokenize::tests::fixture_tokenizer;

    /// A text like the benchmark's filler, with runs of spaces, newlines, punctuation, characters outside
    /// the vocabulary (byte fallback) and the added tokens in every position.
    fn text(seed: u64, words: usize) -> String {
        const WORDS: [&str; 19] = [
            "ka",
            "lorem",
            "ren",
            "the",
            "sol,",
            "mar.",
            "en",
            "x",
            "<s>",
            "</s>",
            "<unk>",
            "日本語",
            "🦀",
            "\t",
            "é",
            "a<s>b",
            "▁",
            "x▁",
            "▁▁y",
        ];
        const GAPS: [&str; 6] = [" ", " ", " ", "  ", "\n", "   "];
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut s = String::new();
        if next(4) == 0 {
            s.push(' ');
        }
        for w in 0..words {
            if w > 0 {
                s.push_str(GAPS[next(GAPS.len())]);
            }
            s.push_str(WORDS[next(WORDS.len())]);
        }
        if next(4) == 0 {
            s.push(' ');
        }
        s
    }

    #[test]
    fn pieces_give_the_ids_of_one_pass() {
        let tokenizer = fixture_tokenizer();
        let pe =
            PieceEncoder::for_tokenizer(Arc::clone(&tokenizer), 4).expect("the fixture (Mistral) tokenizer qualifies");
        let mut cut_texts = 0;
        for seed in 0..200 {
            let t = text(seed, 20 + (seed as usize * 7) % 300);
            for pieces in [2, 3, 5, 8, 16] {
                for special in [true, false] {
                    let whole = tokenizer.encode(t.as_str(), special).expect("encode");
                    let split = pe.encode_pieces(&t, special, pieces).expect("encode in pieces");
                    assert_eq!(split.get_ids(), whole.get_ids(), "{pieces} pieces of {t:?}");
                    assert_eq!(
                        split.get_special_tokens_mask(),
                        whole.get_special_tokens_mask(),
                        "{pieces} pieces of {t:?}"
                    );
                }
                cut_texts += usize::from(!pe.cuts(&t, pieces).is_empty());
            }
        }
        assert!(cut_texts > 900, "only {cut_texts} of 1000 texts were cut");
    }

    #[test]
    fn no_cut_next_to_an_added_token() {
        let pe = PieceEncoder::for_tokenizer(fixture_tokenizer(), 2).expect("qualifies");
        // The only spaces that begin a run are right after or right before `<s>`, or after a `▁`.
        assert_eq!(pe.cuts("ab<s> cd <s>", 4), Vec::<usize>::new());
        assert_eq!(pe.cuts("▁▁ ▁x", 2), Vec::<usize>::new());
        assert_eq!(pe.cuts("ab cd", 2), vec![2]);
        assert_eq!(
            pe.cuts("ab   cd ef", 2),
            vec![7],
            "a run's first space, at or past the middle"
        );
    }

    #[test]
    fn other_tokenizers_are_refused() {
        let base = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer/tokenizer.json"
        ))
        .expect("fixture tokenizer");
        let json: serde_json::Value = serde_json::from_str(&base).expect("json");
        let load = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut j = json.clone();
            edit(&mut j);
            let t = Tokenizer::from_bytes(serde_json::to_vec(&j).expect("json")).expect("tokenizer");
            PieceEncoder::for_tokenizer(Arc::new(t), 2).is_some()
        };
        assert!(load(&|_| {}), "unchanged");
        // A merge could join across a cut: a token with `▁` after a letter.
        assert!(!load(&|j| {
            j["model"]["vocab"]["a▁b"] = serde_json::json!(32000);
        }));
        // Spaces split apart before the merges, or the normalizer changed.
        assert!(!load(&|j| {
            j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": "first", "split": true});
        }));
        assert!(!load(&|j| {
            j["normalizer"]["normalizers"][0]["prepend"] = serde_json::json!("_");
        }));
        assert!(!load(&|j| j["model"]["dropout"] = serde_json::json!(0.1)));
        // An added token that strips the spaces beside it.
        assert!(!load(&|j| j["added_tokens"][1]["lstrip"] = serde_json::json!(true)));
        // Padding: each piece would be padded.
        let mut padded = Tokenizer::from_bytes(base.as_bytes()).expect("tokenizer");
        padded.with_padding(Some(tokenizers::PaddingParams::default()));
        assert!(PieceEncoder::for_tokenizer(Arc::new(padded), 2).is_none());
        // A vocabulary without `▁`: unknown characters could fuse across a cut.
        let tiny = |vocab: serde_json::Value| {
            let mut j = json.clone();
            j["added_tokens"] = serde_json::json!([]);
            j["post_processor"] = serde_json::Value::Null;
            j["model"]["vocab"] = vocab;
            j["model"]["merges"] = serde_json::json!([]);
            let t = Tokenizer::from_bytes(serde_json::to_vec(&j).expect("json")).expect("tokenizer");
            PieceEncoder::for_tokenizer(Arc::new(t), 2).is_some()
        };
        assert!(tiny(serde_json::json!({"<unk>": 0, "a": 1, "▁": 2})));
        assert!(!tiny(serde_json::json!({"<unk>": 0, "a": 1})));
    }
}
