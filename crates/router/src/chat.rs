//! Chat templates: the Jinja template of a model's `tokenizer_config.json` (or an adapter's own),
//! rendered with `minijinja` as transformers' `apply_chat_template` does: `messages`, `bos_token`,
//! `eos_token`, `add_generation_prompt`, `raise_exception`, `tools`, Python string methods (pycompat)
//! and the `tojson` filter.

use std::path::Path;
use std::sync::Arc;

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

/// Why a conversation could not be turned into a prompt (422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, serde::Deserialize)]
pub enum ChatError {
    /// The model has no chat template.
    #[error("this model has no chat template (tokenizer_config.json has no `chat_template`); use /generate or /v1/completions")]
    NoTemplate,
    /// The template refused the conversation (`raise_exception`) or failed to render.
    #[error("chat template error: {0}")]
    Render(String),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text of the message.
    pub content: String,
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// The template's text (sent to a renderer process, `template_worker`).
    source: Arc<str>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object with `content`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// Template instructions one rendering may run (minijinja's fuel). A chat template, which an adapter on the
/// hub can ship, renders a few dozen instructions a message; this bounds a hostile one's loops to a
/// fraction of a second of the router's time.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// Largest rendered prompt, in bytes (far past any prompt the limits on tokens let through; it bounds
/// what a hostile template can make the router hold).
const MAX_RENDERED_BYTES: usize = 16 << 20;

/// An `io::Write` into a string that refuses to grow past [`MAX_RENDERED_BYTES`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other("the output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `source` without transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark the
/// assistant's tokens for training masks, TRL's templates among them, and render nothing), whitespace
/// control included: minijinja has no such tag and would refuse the template.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let tag_end = rest[start..].find("%}").map(|e| start + e + 2);
        let inner = tag_end.map(|end| rest[start + 2..end - 2].trim_matches(|c: char| c == '-' || c.is_whitespace()));
        match (tag_end, inner) {
            (Some(end), Some("generation" | "endgeneration")) => {
                out.push_str(&rest[..start]);
                rest = &rest[end..];
            }
            _ => {
                out.push_str(&rest[..start + 2]);
                rest = &rest[start + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl ChatTemplate {
    /// Compiles `source` with the given special tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", strip_generation_tags(source))
            .map_err(|e| ChatError::Render(e.to_string()))?;
        Ok(Self {
            env: Arc::new(env),
            source: source.into(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Reads the template and special tokens of a `tokenizer_config.json` value. `None` when it has no
    /// `chat_template`. A list of named templates picks `default`, else the first.
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Result<Option<Self>, ChatError> {
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first());
                match pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    Some(s) => s.to_string(),
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        Self::new(
            &source,
            &token_text(config.get("bos_token")),
            &token_text(config.get("eos_token")),
        )
        .map(Some)
    }

    /// The template of the `tokenizer_config.json` in `dir` (or next to the file `dir`), if any.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let dir = if dir.is_file() {
            dir.parent().unwrap_or(dir)
        } else {
            dir
        };
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ChatError::Render(format!("{} is not JSON: {e}", path.display())))?;
        Self::from_tokenizer_config(&config)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` and `eos_token` it is rendered with.
    pub fn special_tokens(&self) -> (&str, &str) {
        (&self.bos_token, &self.eos_token)
    }

    /// Renders `messages` into a prompt in this process; `add_generation_prompt` opens the assistant's
    /// turn. Fuel bounds a template's time and [`MAX_RENDERED_BYTES`] its output, but nothing bounds the
    /// memory its own variables take (a list doubled in a loop): an untrusted template goes through
    /// [`crate::template_worker`], which renders in a process of bounded memory.
    pub fn apply(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Render(e.to_string()))?;
        let mut out = Capped(Vec::new());
        template
            .render_captured_to(
                minijinja::context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    bos_token => self.bos_token.clone(),
                    eos_token => self.eos_token.clone(),
                    add_generation_prompt => add_generation_prompt,
                    tools => minijinja::Value::from(()),
                },
                &mut out,
            )
            .map_err(|e| {
                // raise_exception's message is the template's own words: pass it on unadorned.
                let text = match e.kind() {
                    ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                    ErrorKind::OutOfFuel => "the chat template ran too long (minijinja's fuel)".to_string(),
                    // `Capped` is the only writer, and refuses only past its limit.
                    ErrorKind::WriteFailure => {
                        format!("the chat template's output is larger than {MAX_RENDERED_BYTES} bytes")
                    }
                    _ => e.to_string(),
                };
                ChatError::Render(text)
            })?;
        String::from_utf8(out.0).map_err(|e| ChatError::Render(format!("the chat template's output: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

    fn m(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// transformers' `{% generation %}` tags (assistant masks for training) render nothing here, with or
    /// without whitespace control; other tags are kept.
    #[test]
    fn generation_tags_render_nothing() {
        let source = "{% for message in messages %}{% if message['role'] == 'assistant' %}{%- generation -%}\
                      {{ message['content'] }}{% endgeneration %}{% else %}[{{ message['content'] }}]{% endif %}\
                      {% endfor %}";
        assert!(!strip_generation_tags(source).contains("generation"));
        let t = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(
            t.apply(&[m("user", "Hi"), m("assistant", "Yo")], false).unwrap(),
            "[Hi]Yo"
        );
        assert_eq!(
            strip_generation_tags("{% if x %}a{% endif %}{%"),
            "{% if x %}a{% endif %}{%"
        );
    }

    #[test]
    fn hostile_templates_stop_with_an_error() {
        let start = std::time::Instant::now();
        let loops = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let e = loops.apply(&[m("user", "Hi")], true).unwrap_err();
        assert!(e.to_string().contains("ran too long"), "{e}");
        let big = ChatTemplate::new("{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}", "", "").unwrap();
        let e = big.apply(&[m("user", "Hi")], true).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t.apply(&[m("system", "Be brief."), m("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let closed = t.apply(&[m("user", "Hi")], false).unwrap();
        assert!(!closed.ends_with("assistant\n"));
    }

    #[test]
    fn special_tokens_python_methods_and_raise_exception() {
        let config = serde_json::json!({
            "chat_template": MISTRAL,
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        });
        let t = ChatTemplate::from_tokenizer_config(&config).unwrap().unwrap();
        let out = t
            .apply(&[m("user", "  Hi  "), m("assistant", "Hello"), m("user", "Bye")], true)
            .unwrap();
        assert_eq!(out, "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]");
        let e = t.apply(&[m("assistant", "x")], true).unwrap_err();
        assert_eq!(
            e,
            ChatError::Render("Conversation roles must alternate user/assistant/user/assistant/...".into())
        );
    }

    #[test]
    fn named_template_lists_and_missing_templates() {
        let config = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}],
        });
        let t = ChatTemplate::from_tokenizer_config(&config).unwrap().unwrap();
        assert_eq!(t.apply(&[m("user", "a")], false).unwrap(), "D1");
        assert!(ChatTemplate::from_tokenizer_config(&serde_json::json!({}))
            .unwrap()
            .is_none());
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatError::Render(_))
        ));
    }
}
