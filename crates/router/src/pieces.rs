//! Prompts tokenized word by word by the tokenizer's own BPE model, long ones in pieces on a pool of threads,
//! for tokenizers where that gives the ids of the tokenizer's one pass.
//!
//! A SentencePiece-style BPE tokenizer with no pre-tokenizer (Llama 2, Mistral 7B v0.1: the normalizer
//! prepends `▁` and turns each space into `▁`) runs its merges over a whole prompt as one word, inside the
//! tokenizers crate's pipeline (added tokens, the normalizer's alignments, token strings and offsets): about
//! 1 ms for 1000 tokens on the GPU machine's CPU, all of it on the request's way to its first token. Where no token of the vocabulary has a `▁` after another character, no merge joins the
//! symbols on the two sides of a `▁` that follows another character. So [`PieceEncoder`] does the pipeline's
//! steps itself for such tokenizers:
//! - the added tokens (`<s>`, `</s>`, ...) are found as the tokenizer finds them (leftmost-longest, on the
//!   raw text; only tokenizers whose added tokens hold no white space and strip nothing are taken);
//! - each stretch of text between them is normalized as the tokenizer's normalizer does (a `▁` prepended,
//!   each space turned into `▁`) and cut into words before each `▁` that follows another character;
//! - each word is merged by the tokenizer's BPE model, which keeps a cache of the words it has merged (per
//!   thread: a repeated word is a lookup), then the tokenizer's post-processor runs (the BOS token).
//!
//! The ids and special-tokens mask are those of `tokenizer.encode` (tests: 1200 generated texts). On the
//! 2-core development machine (`cargo run --release -p lorax-router --example validation_timing`, lorax-bench's
//! kind of 1000-token prompt, a different one each run) this took 0.21-0.32 ms on a pool of 2 threads, against
//! 0.36-0.54 for session 21's pieces through the pipeline and 0.60 for the pipeline's one pass (session 43).

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use tokenizers::models::bpe::BPE;
use tokenizers::{Encoding, Model, ModelWrapper, Tokenizer};

/// Words the model's cache holds a thread (the tokenizers crate's default is 10,000), and the longest word it
/// caches: a cached word keeps its symbols (32 bytes each), so long words made up to defeat the merges could
/// otherwise pin about 80 MB a thread; an English word is rarely longer.
const CACHE_WORDS: usize = 4096;
const CACHED_WORD_BYTES: usize = 32;

/// Bytes of text a piece of work for the pool is (a 1000-token English-like prompt is about 4 KB: eight
/// pieces); a text of less than two is encoded on the caller's thread.
const PIECE_BYTES: usize = 512;

/// Encodes prompts word by word (see the module's documentation), long ones in pieces on a pool of its own
/// (so that a long prompt's pieces neither wait for nor hold up other work on rayon's global pool).
pub struct PieceEncoder {
    /// The tokenizer `for_tokenizer` checked (its post-processor runs on the ids).
    tokenizer: Arc<Tokenizer>,
    /// Its BPE model: a copy with a cache of its own for words of up to [`CACHED_WORD_BYTES`], and one that
    /// caches nothing for longer words.
    bpe: BPE,
    bpe_long: BPE,
    /// The added tokens' texts, found leftmost-longest as the tokenizer finds them, and their ids by pattern.
    added: Option<AhoCorasick>,
    added_ids: Vec<u32>,
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for PieceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceEncoder")
            .field("added_ids", &self.added_ids)
            .field("threads", &self.pool.current_num_threads())
            .finish_non_exhaustive()
    }
}

/// Threads of the pool that encodes long prompts in pieces: the machine's cores, from 2 to 8 (a 1000-token
/// prompt is about eight pieces of 512 bytes; more gained little on the GPU machine: session 21).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// An encoding of `ids` alone (no token strings, offsets or special tokens; one sequence, all attended).
pub fn encoding_of_ids(ids: Vec<u32>) -> Encoding {
    let n = ids.len();
    Encoding::new(
        ids,
        vec![0; n],
        vec![String::new(); n],
        vec![None; n],
        vec![(0, 0); n],
        vec![0; n],
        vec![1; n],
        Vec::new(),
        Default::default(),
    )
}

/// A step of a prompt's encoding: an added token's id, or a word of normalized text for the model.
#[derive(Debug, PartialEq)]
enum Item<'a> {
    Added(u32),
    Word(&'a str),
}

/// A stretch of a prompt: an added token's id, or the normalized text between two.
enum Stretch {
    Added(u32),
    Text(String),
}

/// The normalizer's output for a stretch of text: `▁` prepended (to a stretch that is not empty), each space
/// turned into `▁`.
fn normalize(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 3 * (text.bytes().filter(|&b| b == b' ').count() + 1));
    if !text.is_empty() {
        s.push('▁');
    }
    for c in text.chars() {
        s.push(if c == ' ' { '▁' } else { c });
    }
    s
}

/// Normalized text cut into words: before each `▁` that follows another character.
fn words(normalized: &str) -> impl Iterator<Item = &str> {
    let mut previous: Option<char> = None;
    let cuts = normalized.char_indices().filter_map(move |(i, c)| {
        let cut = c == '▁' && previous.is_some_and(|p| p != '▁');
        previous = Some(c);
        cut.then_some(i)
    });
    // A cut is never at 0, so only an empty text makes an empty word.
    let mut start = 0;
    cuts.chain(std::iter::once(normalized.len())).filter_map(move |end| {
        let word = &normalized[start..end];
        start = end;
        (!word.is_empty()).then_some(word)
    })
}

impl PieceEncoder {
    /// `Some` where `tokenizer` is a BPE tokenizer of the kind the module describes: the normalizer exactly
    /// `Prepend("▁")` then `Replace(" ", "▁")`, no pre-tokenizer, no padding or truncation, a BPE model
    /// without dropout, affixes or whole-word lookups whose vocabulary holds `▁` (else unknown characters
    /// could fuse across a cut) and has no `▁` after another character, an unknown token in the vocabulary
    /// without `▁` (else a character the model drops, or an unknown token ending in `▁`, would put two `▁`s
    /// side by side across a cut, which one pass merges), and added tokens without white space
    /// or `▁` that neither strip nor match whole words nor match normalized text, split out of the text even
    /// when special. `threads` (at least 2; [`default_threads`] for a server) is the size of its pool.
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
            || tokenizer.get_encode_special_tokens()
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
        let unk_ok = bpe
            .get_unk_token()
            .as_ref()
            .is_some_and(|u| vocab.contains_key(u) && !u.contains('▁'));
        if !vocab.contains_key("▁") || !unk_ok || vocab.keys().any(|t| joins_across(t)) {
            return None;
        }
        let (mut texts, mut added_ids) = (Vec::new(), Vec::new());
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            let plain = !token.content.is_empty()
                && !token.content.chars().any(|c| c.is_whitespace() || c == '▁')
                && !token.lstrip
                && !token.rstrip
                && !token.single_word
                && !token.normalized;
            if !plain {
                return None;
            }
            texts.push(token.content);
            added_ids.push(id);
        }
        let added = match texts.is_empty() {
            true => None,
            false => Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&texts)
                    .ok()?,
            ),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tokenize-{i}"))
            .build()
            .ok()?;
        let (mut bpe, mut bpe_long) = (bpe.clone(), bpe.clone());
        bpe.resize_cache(CACHE_WORDS);
        bpe_long.resize_cache(0);
        Some(Self {
            tokenizer,
            bpe,
            bpe_long,
            added,
            added_ids,
            pool,
        })
    }

    /// The tokenizer's encoding of `text`: in a piece of [`PIECE_BYTES`] for each thread of the pool at
    /// most, each encoded on it (a short text on the caller's thread). Its ids and special-tokens mask are
    /// those of `tokenizer.encode`; nothing else is (no offsets or token strings: callers that need them
    /// encode with the tokenizer).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> tokenizers::Result<Encoding> {
        let pieces = (text.len() / PIECE_BYTES).min(self.pool.current_num_threads());
        self.encode_pieces(text, add_special_tokens, pieces)
    }

    /// [`PieceEncoder::encode`] in `pieces` pieces of about as many words each (one on the caller's thread
    /// for less than two).
    fn encode_pieces(&self, text: &str, add_special_tokens: bool, pieces: usize) -> tokenizers::Result<Encoding> {
        // The added tokens, and the normalized text of each stretch between them.
        let mut stretches = Vec::new();
        let mut at = 0;
        for m in self.added.iter().flat_map(|a| a.find_iter(text)) {
            if m.start() > at {
                stretches.push(Stretch::Text(normalize(&text[at..m.start()])));
            }
            stretches.push(Stretch::Added(self.added_ids[m.pattern().as_usize()]));
            at = m.end();
        }
        if at < text.len() {
            stretches.push(Stretch::Text(normalize(&text[at..])));
        }
        let mut items = Vec::new();
        for s in &stretches {
            match s {
                Stretch::Added(id) => items.push(Item::Added(*id)),
                Stretch::Text(normalized) => items.extend(words(normalized).map(Item::Word)),
            }
        }
        let ids = if pieces < 2 {
            self.ids(&items)?
        } else {
            let chunk = items.len().div_ceil(pieces).max(1);
            let parts = self.pool.install(|| {
                items
                    .par_chunks(chunk)
                    .map(|c| self.ids(c))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            parts.concat()
        };
        self.tokenizer
            .post_process(encoding_of_ids(ids), None, add_special_tokens)
    }

    /// The ids of `items`: an added token's own, a word's from the model.
    fn ids(&self, items: &[Item<'_>]) -> tokenizers::Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(items.len() * 2);
        for item in items {
            match item {
                Item::Added(id) => ids.push(*id),
                Item::Word(w) => {
                    let bpe = if w.len() <= CACHED_WORD_BYTES {
                        &self.bpe
                    } else {
                        &self.bpe_long
                    };
                    ids.extend(bpe.tokenize(w)?.into_iter().map(|t| t.id));
                }
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detokenize::tests::fixture_tokenizer;

    /// A text like the benchmark's filler, with runs of spaces, newlines, punctuation, characters outside
    /// the vocabulary (byte fallback) and the added tokens in every position.
    fn text(seed: u64, words: usize) -> String {
        const WORDS: [&str; 20] = [
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
            "internationalizationsverantwortlichkeiten",
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

    /// Word by word, in 1 to 16 pieces, with and without special tokens: the ids and special-tokens mask of
    /// the tokenizer's one pass, for 200 generated texts (twice: the second time the model's cache of words
    /// answers).
    #[test]
    fn words_give_the_ids_of_one_pass() {
        let tokenizer = fixture_tokenizer();
        let pe =
            PieceEncoder::for_tokenizer(Arc::clone(&tokenizer), 4).expect("the fixture (Mistral) tokenizer qualifies");
        for round in 0..2 {
            for seed in 0..200 {
                let t = text(seed, 20 + (seed as usize * 7) % 300);
                for pieces in [1, 2, 3, 5, 8, 16] {
                    for special in [true, false] {
                        let whole = tokenizer.encode(t.as_str(), special).expect("encode");
                        let ours = pe.encode_pieces(&t, special, pieces).expect("encode word by word");
                        assert_eq!(
                            ours.get_ids(),
                            whole.get_ids(),
                            "round {round}, {pieces} pieces of {t:?}"
                        );
                        assert_eq!(
                            ours.get_special_tokens_mask(),
                            whole.get_special_tokens_mask(),
                            "round {round}, {pieces} pieces of {t:?}"
                        );
                    }
                }
            }
        }
        // The empty text and one of added tokens alone.
        for t in ["", "<s></s>", " ", "<unk> "] {
            let whole = tokenizer.encode(t, true).expect("encode");
            assert_eq!(pe.encode(t, true).expect("encode").get_ids(), whole.get_ids(), "{t:?}");
        }
    }

    #[test]
    fn words_are_cut_before_a_space_after_another_character() {
        let cut = |t: &str| words(&normalize(t)).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(cut("ab cd"), ["▁ab", "▁cd"]);
        assert_eq!(cut("ab   cd "), ["▁ab", "▁▁▁cd", "▁"]);
        assert_eq!(cut(" x▁y\n z"), ["▁▁x", "▁y\n", "▁z"]);
        assert_eq!(cut(""), Vec::<&str>::new());
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
        // No unknown token, or one ending in `▁`: a dropped character, or the token, would leave two `▁`s side
        // by side across a cut (session 43's review: "𓀀 " is `▁▁` in one pass without an unknown token).
        assert!(!load(&|j| j["model"]["unk_token"] = serde_json::Value::Null));
        assert!(!load(&|j| j["model"]["unk_token"] = serde_json::json!("▁")));
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
