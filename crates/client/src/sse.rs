//! Server-sent events, read incrementally: bytes arrive in arbitrary chunks, events end with a blank
//! line, and only `data:` lines matter (comments such as keep-alives are skipped).

/// Splits a byte stream into the `data` of each event.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Adds received bytes.
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The data of the next complete event that has any (`data:` lines joined with newlines, as the
    /// specification says), or `None` until more bytes arrive.
    pub(crate) fn next_data(&mut self) -> Option<String> {
        loop {
            let (end, separator) = event_end(&self.buffer)?;
            let event: Vec<u8> = self.buffer.drain(..end + separator).collect();
            let event = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|value| value.strip_prefix(' ').unwrap_or(value))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }

    /// Whether bytes of an unfinished event are left.
    pub(crate) fn has_partial(&self) -> bool {
        !self.buffer.iter().all(u8::is_ascii_whitespace)
    }
}

/// Where the first event ends and how long its separator (a blank line) is.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks() {
        let mut parser = SseParser::default();
        parser.push(b"data: {\"a\":");
        assert_eq!(parser.next_data(), None);
        parser.push(b"1}\n\n: keep-alive\n\ndata:{\"b\":2}\n\ndata: x\r\n\r\n");
        assert_eq!(parser.next_data().as_deref(), Some("{\"a\":1}"));
        assert_eq!(
            parser.next_data().as_deref(),
            Some("{\"b\":2}"),
            "the comment is skipped"
        );
        assert_eq!(parser.next_data().as_deref(), Some("x"));
        assert_eq!(parser.next_data(), None);
        assert!(!parser.has_partial());
        parser.push(b"data: cut");
        assert!(parser.has_partial());
    }

    #[test]
    fn multi_line_data_is_joined() {
        let mut parser = SseParser::default();
        parser.push(b"event: token\ndata: a\ndata: b\n\n");
        assert_eq!(parser.next_data().as_deref(), Some("a\nb"));
    }
}
