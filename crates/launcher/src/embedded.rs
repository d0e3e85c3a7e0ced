//! The embedded default model: a tiny random Llama (2 layers, hidden 32, llama3 rope scaling; the
//! golden-test fixture made by transformers) with the Mistral tokenizer, compiled into the binary so the
//! server runs with no network and no GPU. Its answers are gibberish by construction: it exists to show
//! the whole system working, not to be useful.

use std::path::{Path, PathBuf};

const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../../tests/fixtures/models/llama/config.json"),
    ),
    (
        "model.safetensors.index.json",
        include_bytes!("../../../tests/fixtures/models/llama/model.safetensors.index.json"),
    ),
    (
        "model-00001-of-00003.safetensors",
        include_bytes!("../../../tests/fixtures/models/llama/model-00001-of-00003.safetensors"),
    ),
    (
        "model-00002-of-00003.safetensors",
        include_bytes!("../../../tests/fixtures/models/llama/model-00002-of-00003.safetensors"),
    ),
    (
        "model-00003-of-00003.safetensors",
        include_bytes!("../../../tests/fixtures/models/llama/model-00003-of-00003.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../tests/fixtures/tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../tests/fixtures/tokenizer/tokenizer_config.json"),
    ),
];

/// The id the embedded model is shown under.
pub const MODEL_ID: &str = "lorax-embedded/tiny-random-llama";

/// Write the embedded model under `root` (once per version; rewritten if a file differs in size) and
/// return its directory.
pub fn materialize(root: &Path) -> std::io::Result<PathBuf> {
    let dir = root.join(format!("lorax-embedded-{}", env!("CARGO_PKG_VERSION")));
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let same = std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64);
        if !same {
            // Write to a temporary name and rename, so a concurrent launcher never reads half a file.
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    Ok(dir)
}
