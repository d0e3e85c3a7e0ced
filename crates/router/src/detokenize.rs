//! Incremental detokenization: turning one sequence's generated ids into text chunks as they arrive,
//! correctly across multi-byte characters split over several byte-fallback tokens (`<0xE6>` ...).
//!
//! This is text-generation-inference's prefix/read-offset method: keep a window of already-emitted
//! tokens (`ids[prefix..read]`) in front of the new ones, decode the window with and without the new
//! tokens and emit the difference, but only once it does not end in U+FFFD (an incomplete character).
//! Decoding a window rather than single tokens keeps word-boundary spaces that decoders such as
//! SentencePiece's strip from the first token of a string.

use std::collections::HashSet;
use std::sync::Arc;

use tokenizers::Tokenizer;

/// Prompt tokens kept in front of the generated ones as decoding context (as TGI does).
pub const CONTEXT_TOKENS: usize = 5;

/// The tokenizer with what the batching loop needs to turn ids into text.
#[derive(Clone)]
pub struct TokenDecoder {
    tokenizer: Arc<Tokenizer>,
    special: Arc<HashSet<u32>>,
    bytes: TokenBytes,
}

impl std::fmt::Debug for TokenDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenDecoder")
            .field("special", &self.special.len())
            .finish_non_exhaustive()
    }
}

impl TokenDecoder {
    /// Wraps `tokenizer`; its special added tokens (`<s>`, `</s>`, ...) are marked `special` in responses.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        let special = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Self {
            bytes: TokenBytes::new(Arc::clone(&tokenizer)),
            tokenizer,
            special: Arc::new(special),
        }
    }

    /// The tokens' raw bytes.
    pub fn token_bytes(&self) -> &TokenBytes {
        &self.bytes
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// Decodes `ids`; a tokenizer error (not expected for in-vocabulary ids) gives an empty string.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.tokenizer.decode(ids, skip_special_tokens).unwrap_or_else(|e| {
            tracing::warn!("cannot decode {ids:?}: {e}");
            String::new()
        })
    }

    /// The text of a single token on its own (prefill tokens and alternatives), special tokens included.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false)
    }
}

/// One sequence's incremental decoding state.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Context tokens followed by every generated token.
    ids: Vec<u32>,
    /// Number of context tokens at the front of `ids`.
    context: usize,
    /// Start of the decoding window.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
    /// Emitted text of the non-special tokens: the generated text.
    text: String,
}

/// What [`IncrementalDecoder::push_with_alternatives`] returns for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The newly completed text (empty while a character is incomplete).
    pub text: String,
    /// For a special token: the leading bytes of `text` that were held back before it and belong to
    /// the generated text (see [`crate::infer::TokenInfo::held`]); 0 otherwise.
    pub held: usize,
    /// The text of each alternative, in the sequence's context.
    pub alternatives: Vec<String>,
}

impl IncrementalDecoder {
    /// A decoder whose output continues `prompt` (only its last [`CONTEXT_TOKENS`] ids are kept).
    pub fn new(prompt: &[u32]) -> Self {
        let ids: Vec<u32> = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let context = ids.len();
        Self {
            ids,
            context,
            prefix_offset: 0,
            read_offset: context,
            text: String::new(),
        }
    }

    /// Generated ids so far.
    pub fn generated(&self) -> &[u32] {
        &self.ids[self.context..]
    }

    /// Appends `id` and returns the newly completed text (empty while a character is incomplete).
    /// Special tokens are rendered (`</s>`), as in TGI's per-token text, but left out of [`Self::text`].
    pub fn push(&mut self, decoder: &TokenDecoder, id: u32) -> String {
        self.push_with_alternatives(decoder, id, &[]).text
    }

    /// [`Self::push`] of `id`, and the text it would have returned for each of `alternatives` instead
    /// (decoded in the sequence's context, so that they read as a chosen token does, a leading space
    /// included; where that text would be an incomplete character, the token's text on its own; `id`
    /// itself, when among them, with `id`'s text). The window's prefix is decoded once for all of them.
    ///
    /// A special token's text starts with whatever was held back before it (an incomplete character
    /// turns into U+FFFD, as in a one-shot decode): those [`Pushed::held`] bytes join the generated text.
    pub fn push_with_alternatives(&mut self, decoder: &TokenDecoder, id: u32, alternatives: &[u32]) -> Pushed {
        let prefix_text = decoder.decode(&self.ids[self.prefix_offset..self.read_offset], false);
        // The text a window ending in a new token completes, when it completes a character.
        let completed = |new_text: String| {
            (new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}'))
                .then(|| suffix_after(&new_text, &prefix_text))
        };
        let mut others = Vec::with_capacity(alternatives.len());
        if !alternatives.is_empty() {
            let mut window = self.ids[self.prefix_offset..].to_vec();
            for &a in alternatives {
                // The chosen token's own text is filled in below, from its own decode.
                if a == id {
                    others.push(String::new());
                    continue;
                }
                window.push(a);
                others.push(completed(decoder.decode(&window, false)).unwrap_or_else(|| decoder.token_text(a)));
                window.pop();
            }
        }
        let pending = self.read_offset < self.ids.len();
        self.ids.push(id);
        // The chosen token among its alternatives reads as it does.
        let chosen = |others: &mut Vec<String>, text: &str| {
            for (other, _) in others.iter_mut().zip(alternatives).filter(|(_, &a)| a == id) {
                text.clone_into(other);
            }
        };
        let Some(mut chunk) = completed(decoder.decode(&self.ids[self.prefix_offset..], false)) else {
            chosen(&mut others, "");
            return Pushed {
                text: String::new(),
                held: 0,
                alternatives: others,
            };
        };
        let mut held = 0;
        if !decoder.is_special(id) {
            self.text.push_str(&chunk);
        } else if pending {
            let before = self.ids.len() - 1;
            let text = suffix_after(
                &decoder.decode(&self.ids[self.prefix_offset..before], false),
                &prefix_text,
            );
            if !chunk.starts_with(&text) {
                chunk = format!("{text}{}", decoder.token_text(id));
            }
            held = text.len();
            self.text.push_str(&text);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        chosen(&mut others, &chunk);
        Pushed {
            text: chunk,
            held,
            alternatives: others,
        }
    }

    /// Every emitted non-special chunk so far (what stop sequences are searched in).
    pub fn emitted(&self) -> &str {
        &self.text
    }

    /// The generated text: every emitted non-special chunk, then whatever is still pending (an
    /// incomplete character at the end decodes to U+FFFD, as a one-shot decode would give).
    pub fn text(&self, decoder: &TokenDecoder) -> String {
        let pending = &self.ids[self.read_offset..];
        if pending.is_empty() || pending.iter().all(|&id| decoder.is_special(id)) {
            return self.text.clone();
        }
        let prefix_text = decoder.decode(&self.ids[self.prefix_offset..self.read_offset], false);
        let new_text = decoder.decode(&self.ids[self.prefix_offset..], false);
        format!("{}{}", self.text, suffix_after(&new_text, &prefix_text))
    }
}

/// `text` without its leading `prefix`; when decoding changed the prefix (normalisation at the seam),
/// everything after the prefix's length (on a character boundary).
fn suffix_after(text: &str, prefix: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let mut start = prefix.len().min(text.len());
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture_tokenizer() -> Arc<Tokenizer> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer/tokenizer.json"
        );
        Arc::new(Tokenizer::from_file(path).expect("fixture tokenizer"))
    }

    fn encode(decoder: &TokenDecoder, text: &str) -> Vec<u32> {
        decoder
            .tokenizer()
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    fn stream(decoder: &TokenDecoder, prompt: &[u32], ids: &[u32]) -> (Vec<String>, IncrementalDecoder) {
        let mut inc = IncrementalDecoder::new(prompt);
        let chunks = ids.iter().map(|&id| inc.push(decoder, id)).collect();
        (chunks, inc)
    }

    #[test]
    fn multibyte_stream_reassembles_exactly() {
        let decoder = TokenDecoder::new(fixture_tokenizer());
        let text = "こんにちは、世界！🦀🎉 日本語のテキストと絵文字 😀👍🏽 終わり";
        let ids = encode(&decoder, text);
        let byte_tokens = ids
            .iter()
            .filter(|&&id| {
                decoder
                    .tokenizer()
                    .id_to_token(id)
                    .is_some_and(|t| t.starts_with("<0x"))
            })
            .count();
        assert!(
            byte_tokens >= 4,
            "the text must exercise byte fallback, got {byte_tokens}"
        );

        let (chunks, inc) = stream(&decoder, &[], &ids);
        for chunk in &chunks {
            assert!(
                !chunk.contains('\u{FFFD}'),
                "chunk {chunk:?} has a replacement character"
            );
        }
        let all = decoder.decode(&ids, false);
        assert_eq!(chunks.concat(), all);
        assert!(!all.contains('\u{FFFD}'));
        assert_eq!(inc.text(&decoder), all);
        // Some tokens completed no character on their own.
        assert!(chunks.iter().any(String::is_empty));
    }

    #[test]
    fn alternatives_read_as_the_chosen_token_would() {
        let decoder = TokenDecoder::new(fixture_tokenizer());
        let prompt = encode(&decoder, "The capital of France is");
        let ids = encode(&decoder, "The capital of France is Paris, 東京 🦀 and Rome");
        assert_eq!(ids[..prompt.len()], prompt[..], "the prompt's ids start the text's");
        let mut inc = IncrementalDecoder::new(&prompt);
        let mut spaced = 0;
        let other = prompt[1];
        for &id in &ids[prompt.len()..] {
            // Each next token as an alternative of another token, and chosen: the same text.
            let mut peek = inc.clone();
            let peeked = peek
                .push_with_alternatives(&decoder, other, &[id])
                .alternatives
                .remove(0);
            let Pushed {
                text: pushed,
                alternatives: itself,
                ..
            } = inc.push_with_alternatives(&decoder, id, &[other, id]);
            if !pushed.is_empty() {
                assert_eq!(peeked, pushed, "token {id}");
            }
            // Among its own alternatives, the chosen token has its own text (empty inside a character).
            assert_eq!(itself[1], pushed, "token {id}");
            if pushed.starts_with(' ') && !decoder.token_text(id).starts_with(' ') {
                spaced += 1;
            }
        }
        assert!(
            spaced >= 2,
            "the text must have tokens whose space comes from the context: {spaced}"
        );
    }

    #[test]
    fn continuation_keeps_leading_spaces() {
        let decoder = TokenDecoder::new(fixture_tokenizer());
        let prompt = decoder
            .tokenizer()
            .encode("Say hello in Japanese:", true)
            .expect("encode");
        let prompt = prompt.get_ids();
        let full = decoder
            .tokenizer()
            .encode("Say hello in Japanese: こんにちは 🦀 done", true)
            .expect("encode");
        let full = full.get_ids();
        assert_eq!(
            &full[..prompt.len()],
            prompt,
            "prompt is a token prefix of the full text"
        );
        let generated = &full[prompt.len()..];

        let (chunks, inc) = stream(&decoder, prompt, generated);
        assert_eq!(chunks.concat(), " こんにちは 🦀 done");
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
        assert_eq!(inc.text(&decoder), " こんにちは 🦀 done");
        assert_eq!(inc.generated(), generated);
    }

    #[test]
    fn special_tokens_render_but_can_be_skipped() {
        let decoder = TokenDecoder::new(fixture_tokenizer());
        assert!(decoder.is_special(1) && decoder.is_special(2));
        let hello = decoder
            .tokenizer()
            .encode("Hello", false)
            .expect("encode")
            .get_ids()
            .to_vec();
        let mut ids = hello.clone();
        ids.push(2);
        let (chunks, inc) = stream(&decoder, &[1], &ids);
        assert_eq!(chunks.last().map(String::as_str), Some("</s>"));
        assert_eq!(inc.text(&decoder), " Hello");
        assert_eq!(decoder.token_text(2), "</s>");
    }

    /// Bytes of an unfinished character held back when a special token comes: they join the generated
    /// text (as a one-shot decode that skips special tokens keeps them) and lead the special token's text.
    #[test]
    fn text_held_before_a_special_token_is_kept() {
        let decoder = TokenDecoder::new(fixture_tokenizer());
        let ids = encode(&decoder, "ok 🦀");
        let mut cut = ids[..ids.len() - 1].to_vec();
        cut.push(2);
        let mut inc = IncrementalDecoder::new(&[]);
        let pushed: Vec<Pushed> = cut
            .iter()
            .map(|&id| inc.push_with_alternatives(&decoder, id, &[]))
            .collect();
        let last = pushed.last().expect("pushed");
        let one_shot = decoder.decode(&cut, true);
        assert!(one_shot.ends_with('\u{FFFD}'), "{one_shot:?}");
        assert_eq!(inc.text(&decoder), one_shot);
        assert_eq!(
            inc.emitted(),
            one_shot,
            "held bytes are searched for stop sequences too"
        );
        let held = &last.text[..last.held];
        assert!(!held.is_empty() && held.chars().all(|c| c == '\u{FFFD}'), "{held:?}");
        assert_eq!(&last.text[last.held..], "</s>");
        let streamed: String = pushed[..pushed.len() - 1].iter().map(|p| p.text.as_str()).collect();
        assert_eq!(format!("{streamed}{}", &last.text[..last.held]), one_shot);
        assert!(pushed.iter().all(|p| p.held == 0 || p.text.ends_with("</s>")));
    }

    #[test]
    fn incomplete_character_at_the_end_is_flushed() {
        let decoder = TokenDecoder::new(fixture_tokenizer());
        let ids = encode(&decoder, "ok 🦀");
        assert!(ids.len() >= 3, "{ids:?}");
        // Stop one byte short of the crab: its bytes are pending, nothing of it was streamed.
        let cut = &ids[..ids.len() - 1];
        let (chunks, inc) = stream(&decoder, &[], cut);
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
        assert_eq!(chunks.concat(), "ok ");
        let text = inc.text(&decoder);
        assert!(text.starts_with("ok ") && text.ends_with('\u{FFFD}'), "{text:?}");
    }

    /// A byte-level BPE tokenizer (Llama 3, Qwen) whose tokens each end one character and begin the next
    /// ("日本語です" as [E6 97] [A5 E6] [9C AC E8] [AA 9E E3] [81 A7 E3] [81 99]): every window ends in an
    /// unfinished character, but no byte is invalid, so nothing turns into U+FFFD (the text comes whole once
    /// a token ends on a character's end).
    #[test]
    fn byte_level_tokens_across_characters_stay_whole() {
        let pieces: [&[u8]; 6] = [
            &[0xE6, 0x97],
            &[0xA5, 0xE6],
            &[0x9C, 0xAC, 0xE8],
            &[0xAA, 0x9E, 0xE3],
            &[0x81, 0xA7, 0xE3],
            &[0x81, 0x99],
        ];
        let alphabet = |b: u8| {
            (0u32..=0x3ff)
                .filter_map(char::from_u32)
                .find(|&c| byte_level_byte(c) == Some(b))
                .expect("byte-level character")
        };
        let vocab: std::collections::HashMap<String, u32> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.iter().map(|&b| alphabet(b)).collect::<String>(), i as u32))
            .collect();
        let bpe = tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(
                vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(),
                Vec::new(),
            )
            .build()
            .expect("bpe");
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let decoder = TokenDecoder::new(Arc::new(tokenizer));
        let ids: Vec<u32> = (0..6).collect();
        assert_eq!(decoder.decode(&ids, false), "日本語です");
        let (chunks, inc) = stream(&decoder, &[], &ids);
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
        assert_eq!(chunks.concat(), "日本語です");
        assert_eq!(inc.text(&decoder), "日本語です");
    }

    #[test]
    fn suffix_after_handles_changed_prefix() {
        assert_eq!(suffix_after("abcdef", "abc"), "def");
        assert_eq!(suffix_after("xbcdef", "abc"), "def");
        assert_eq!(suffix_after("é!", "a"), "!");
    }
}

/// The raw bytes a token stands for, for OpenAI's `logprobs.bytes` (which exist so that a client can join
/// the bytes of a character split over several tokens): a byte-fallback token `<0xHH>` its byte; a
/// byte-level BPE token (GPT-2's alphabet of printable stand-ins: Llama 3, Qwen) its characters mapped back
/// to bytes; any other its text with SentencePiece's `▁` as a space.
#[derive(Clone)]
pub struct TokenBytes {
    tokenizer: Arc<Tokenizer>,
    byte_level: bool,
}

impl TokenBytes {
    /// For `tokenizer`; byte-level when its decoder is (or holds) a `ByteLevel` one.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        let byte_level = tokenizer
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|json| json.contains("\"ByteLevel\""));
        Self { tokenizer, byte_level }
    }

    /// The bytes of token `id`; `fallback` (the token's text as the API shows it) for an id the vocabulary
    /// lacks.
    pub fn of(&self, id: u32, fallback: &str) -> Vec<u8> {
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return fallback.as_bytes().to_vec();
        };
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if hex.len() == 2 {
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    return vec![b];
                }
            }
        }
        if self.byte_level {
            if let Some(bytes) = piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable bytes stand for themselves, the other 68
/// (0-32, 127-160 and 173) for characters 256 + n in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = u32::from(c);
    if printable(code) {
        return u8::try_from(code).ok();
    }
    let n = code.checked_sub(256)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(usize::try_from(n).ok()?)
        .and_then(|b| u8::try_from(b).ok())
}

#[cfg(test)]
mod token_bytes_tests {
    use super::*;

    fn fixture(name: &str) -> Arc<Tokenizer> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name);
        Arc::new(Tokenizer::from_file(path).expect("fixture tokenizer"))
    }

    /// The fixture tokenizer (SentencePiece with byte fallback): `<0x93>` is the byte 0x93, `▁Hello` is
    /// " Hello"; an id past the vocabulary falls back to the shown text.
    #[test]
    fn sentencepiece_byte_fallback_tokens_are_their_byte() {
        let t = TokenBytes::new(fixture("tokenizer/tokenizer.json"));
        assert!(!t.byte_level);
        let byte = t.tokenizer.token_to_id("<0x93>").expect("byte token");
        assert_eq!(t.of(byte, "\u{fffd}"), vec![0x93]);
        let hello = t.tokenizer.token_to_id("\u{2581}Hello").expect("word token");
        assert_eq!(t.of(hello, "ignored"), b" Hello".to_vec());
        assert_eq!(t.of(u32::MAX, "shown"), b"shown".to_vec());
    }

    /// GPT-2's alphabet: printable bytes stand for themselves, `Ġ` (U+0120) is the space, `Ċ` (U+010A) the
    /// newline, and the 68 stand-ins map back to every byte they replace, once each.
    #[test]
    fn byte_level_characters_map_back_to_bytes() {
        assert_eq!(byte_level_byte('A'), Some(b'A'));
        assert_eq!(byte_level_byte('\u{0120}'), Some(b' '));
        assert_eq!(byte_level_byte('\u{010A}'), Some(b'\n'));
        assert_eq!(byte_level_byte('\u{0100}'), Some(0));
        assert_eq!(byte_level_byte('\u{00E9}'), Some(0xE9));
        let mut seen: Vec<u8> = (256u32..256 + 68)
            .filter_map(|c| byte_level_byte(char::from_u32(c)?))
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 68);
        assert_eq!(byte_level_byte('\u{0144}'), None, "past the 68 stand-ins");
        // A tokenizer whose decoder is ByteLevel is read that way.
        let mut bpe = Tokenizer::new(tokenizers::models::bpe::BPE::default());
        bpe.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        assert!(TokenBytes::new(Arc::new(bpe)).byte_level);
    }
}
