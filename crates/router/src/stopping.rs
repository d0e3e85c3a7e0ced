//! When a sequence stops, decided by the router after every token: a stop sequence appearing in the
//! generated text or a (non-EOS) special token's text (`stop_sequence`), `max_new_tokens` reached
//! (`length`), or an end-of-sequence token (`eos_token`, unless `ignore_eos_token`). The checks run in
//! that order: a stop completed by the last allowed token is a stop (as OpenAI's API reports it), an EOS
//! token as the last allowed token a length (as TGI reports it).

use serde::Serialize;

/// Why a sequence stopped. Serialized as LoRAX's `finish_reason` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum FinishReason {
    /// `max_new_tokens` tokens were generated.
    #[serde(rename = "length")]
    Length,
    /// The model produced an end-of-sequence token.
    #[serde(rename = "eos_token")]
    EndOfSequenceToken,
    /// The generated text contains one of the stop sequences.
    #[serde(rename = "stop_sequence")]
    StopSequence,
}

/// What the router needs to decide when a request stops.
#[derive(Debug, Clone, PartialEq)]
pub struct StoppingParameters {
    /// Most tokens to generate (at least 1).
    pub max_new_tokens: u32,
    /// Stop as soon as the generated text contains one of these (non-empty strings).
    pub stop_sequences: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos_token: bool,
}

/// One sequence's stopping state: the token count and where a stop sequence ended (the text itself
/// is the incremental decoder's, passed in on every step).
#[derive(Debug, Clone)]
pub struct StoppingCriteria {
    params: StoppingParameters,
    eos_token_ids: Vec<u32>,
    generated: u32,
    /// Byte length of the generated text up to the end of the first stop-sequence match.
    stop_end: Option<usize>,
}

impl StoppingCriteria {
    /// Criteria for one request; `eos_token_ids` come from the shard's model info.
    pub fn new(params: StoppingParameters, eos_token_ids: Vec<u32>) -> Self {
        Self {
            params,
            eos_token_ids,
            generated: 0,
            stop_end: None,
        }
    }

    /// Tokens generated so far.
    pub fn generated_tokens(&self) -> u32 {
        self.generated
    }

    /// Records token `id`, after which the generated text (non-special tokens) is `text`, of which
    /// bytes from `new_from` on are new, and says whether the sequence is finished. `special` is the
    /// token's text when it is a special token (left out of `text`): a stop sequence found in it stops
    /// the sequence too, the text ending before the token (as LoRAX, which searches the text with special
    /// tokens: `stop: ["<|im_end|>"]` stops at that token when it is not an end-of-sequence token).
    pub fn step(&mut self, id: u32, text: &str, new_from: usize, special: Option<&str>) -> Option<FinishReason> {
        self.generated += 1;
        // A stop sequence completed by the last allowed token ends the sequence as a stop (its text
        // trimmed where the API trims it: OpenAI's routes), as OpenAI's API and vLLM report it; the length
        // still wins over the end-of-sequence token, as in TGI.
        if let Some(special) = special {
            if self.params.stop_sequences.iter().any(|s| special.contains(s.as_str())) {
                // Unless the token already ends the sequence.
                if self.params.ignore_eos_token || !self.eos_token_ids.contains(&id) {
                    self.stop_end = Some(text.len());
                    return Some(FinishReason::StopSequence);
                }
            }
        }
        if text.len() > new_from {
            if let Some(end) = find_stop(text, new_from, &self.params.stop_sequences) {
                self.stop_end = Some(end);
                return Some(FinishReason::StopSequence);
            }
        }
        if self.generated >= self.params.max_new_tokens {
            return Some(FinishReason::Length);
        }
        if !self.params.ignore_eos_token && self.eos_token_ids.contains(&id) {
            return Some(FinishReason::EndOfSequenceToken);
        }
        None
    }

    /// The generated `text` up to and including the stop sequence that ended it, when one did.
    pub fn text_through_stop<'a>(&self, text: &'a str) -> Option<&'a str> {
        self.stop_end.and_then(|end| text.get(..end))
    }
}

/// Earliest end of a stop sequence in `text` among matches that include text appended after byte
/// `new_from` (older text was searched on earlier steps). Returns the byte index just past the match.
pub fn find_stop(text: &str, new_from: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|stop| {
            // A match ending in the new text starts at most len-1 bytes before it.
            let mut start = new_from.saturating_sub(stop.len().saturating_sub(1));
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            text[start..].find(stop.as_str()).map(|i| start + i + stop.len())
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Criteria plus the text buffer the decoder keeps in production.
    struct Run {
        c: StoppingCriteria,
        text: String,
    }

    impl Run {
        fn step(&mut self, id: u32, chunk: &str) -> Option<FinishReason> {
            let from = self.text.len();
            self.text.push_str(chunk);
            self.c.step(id, &self.text, from, None)
        }

        /// A special token: its text is not part of the generated text.
        fn special(&mut self, id: u32, rendered: &str) -> Option<FinishReason> {
            self.c.step(id, &self.text, self.text.len(), Some(rendered))
        }

        fn generated_tokens(&self) -> u32 {
            self.c.generated_tokens()
        }

        fn text_through_stop(&self) -> Option<&str> {
            self.c.text_through_stop(&self.text)
        }
    }

    fn criteria(max_new_tokens: u32, stops: &[&str], ignore_eos_token: bool) -> Run {
        Run {
            c: StoppingCriteria::new(
                StoppingParameters {
                    max_new_tokens,
                    stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
                    ignore_eos_token,
                },
                vec![2, 32000],
            ),
            text: String::new(),
        }
    }

    #[test]
    fn length() {
        let mut c = criteria(3, &[], false);
        assert_eq!(c.step(10, "a"), None);
        assert_eq!(c.step(11, "b"), None);
        assert_eq!(c.step(12, "c"), Some(FinishReason::Length));
        assert_eq!(c.generated_tokens(), 3);
    }

    #[test]
    fn eos_unless_ignored() {
        let mut c = criteria(10, &[], false);
        assert_eq!(c.step(10, "a"), None);
        assert_eq!(c.step(32000, ""), Some(FinishReason::EndOfSequenceToken));
        let mut c = criteria(10, &[], true);
        assert_eq!(c.special(2, "</s>"), None);
        assert_eq!(c.special(2, "</s>"), None);
    }

    #[test]
    fn stop_sequence_in_a_special_token() {
        // A chat model's end-of-turn token that is not its end-of-sequence token.
        let mut c = criteria(10, &["<|im_end|>"], false);
        assert_eq!(c.step(5, "Hi"), None);
        assert_eq!(c.special(7, "<|im_start|>"), None, "another special token");
        assert_eq!(c.special(8, "<|im_end|>"), Some(FinishReason::StopSequence));
        assert_eq!(c.text_through_stop(), Some("Hi"), "the text ends before the token");
        // The end-of-sequence token's text, with the token ignored as end of sequence.
        let mut c = criteria(10, &["</s>"], true);
        assert_eq!(c.step(5, "a"), None);
        assert_eq!(c.special(2, "</s>"), Some(FinishReason::StopSequence));
        assert_eq!(c.text_through_stop(), Some("a"));
        // Unless the token already ends the sequence.
        let mut c = criteria(10, &["</s>"], false);
        assert_eq!(c.special(2, "</s>"), Some(FinishReason::EndOfSequenceToken));
    }

    /// A stop sequence that the last allowed token completes is a stop, the text through it kept for the
    /// routes that trim (session 34's probe: OpenAI answers kept "…ann" + "els" as a length).
    #[test]
    fn a_stop_on_the_last_allowed_token_is_a_stop() {
        let mut c = criteria(2, &["ann"], false);
        assert_eq!(c.step(5, "Car"), None);
        assert_eq!(c.step(6, "annels"), Some(FinishReason::StopSequence));
        assert_eq!(c.text_through_stop(), Some("Carann"));
    }

    #[test]
    fn length_wins_over_eos() {
        let mut c = criteria(1, &[], false);
        assert_eq!(c.step(2, ""), Some(FinishReason::Length));
    }

    #[test]
    fn stop_sequence_spanning_tokens() {
        let mut c = criteria(100, &["END"], false);
        assert_eq!(c.step(5, "The E"), None);
        assert_eq!(c.step(6, "N"), None);
        assert_eq!(c.step(7, "Dgame"), Some(FinishReason::StopSequence));
        assert_eq!(c.text_through_stop(), Some("The END"));
    }

    #[test]
    fn stop_sequence_inside_one_token_and_earliest_wins() {
        let mut c = criteria(100, &["cd", "b"], false);
        assert_eq!(c.step(5, "x"), None);
        assert_eq!(c.step(6, "abcde"), Some(FinishReason::StopSequence));
        assert_eq!(c.text_through_stop(), Some("xab"));
    }

    #[test]
    fn stop_sequence_with_multibyte_text() {
        let mut c = criteria(100, &["世界"], false);
        assert_eq!(c.step(5, "こんにちは"), None);
        assert_eq!(c.step(6, "、世"), None);
        assert_eq!(c.step(7, "界！"), Some(FinishReason::StopSequence));
        assert_eq!(c.text_through_stop(), Some("こんにちは、世界"));
    }

    #[test]
    fn old_text_is_not_searched_again() {
        // Only matches touching the new chunk count (earlier text was checked on earlier steps).
        assert_eq!(find_stop("abXab", 3, &["X".into()]), None);
        assert_eq!(find_stop("abXab", 2, &["X".into()]), Some(3));
        assert_eq!(find_stop("abc", 0, &[String::new()]), None);
    }
}
