//! Resolving `--model-id` to a local directory: the embedded default, a local directory, or a
//! Hugging Face Hub repository downloaded with `hf-hub` into the usual cache (HF_HOME, HF_ENDPOINT and
//! HF_TOKEN honoured).

use std::path::{Path, PathBuf};

use anyhow::Context;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::embedded;

/// A model ready to load: where its files are and what to call it.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// Directory with config.json, tokenizer.json and safetensors weights, or a `.gguf` file.
    pub dir: PathBuf,
    /// Id to show in /info.
    pub model_id: String,
}

/// Where the model comes from (with its checkpoint).
#[cfg(test)]
pub fn resolve(model_id: Option<&str>, revision: Option<&str>, embedded_root: &Path) -> anyhow::Result<ResolvedModel> {
    resolve_with(model_id, revision, embedded_root, true)
}

/// [`resolve`]; without `weights` (`--load-format dummy`) a hub model's checkpoint is not downloaded,
/// only its config and tokenizer.
pub fn resolve_with(
    model_id: Option<&str>,
    revision: Option<&str>,
    embedded_root: &Path,
    weights: bool,
) -> anyhow::Result<ResolvedModel> {
    let Some(id) = model_id else {
        let dir = embedded::materialize(embedded_root)
            .with_context(|| format!("writing the embedded model under {}", embedded_root.display()))?;
        return Ok(ResolvedModel {
            dir,
            model_id: embedded::MODEL_ID.to_string(),
        });
    };
    let local = Path::new(id);
    if local.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        // One file holds the weights, the configuration, the tokenizer and the chat template.
        anyhow::ensure!(local.is_file(), "GGUF model file {} does not exist", local.display());
        return Ok(ResolvedModel {
            dir: local.to_path_buf(),
            model_id: id.to_string(),
        });
    }
    if local.is_dir() {
        for needed in ["config.json", "tokenizer.json"] {
            anyhow::ensure!(
                local.join(needed).exists(),
                "local model directory {} has no {needed}",
                local.display()
            );
        }
        return Ok(ResolvedModel {
            dir: local.to_path_buf(),
            model_id: id.to_string(),
        });
    }
    // A path that names nothing here is a typo, not a hub repository: say so instead of asking the hub.
    anyhow::ensure!(
        is_repo_id(id),
        "--model-id {id:?} is neither a local directory (nothing is there) nor a hub repository id (`name` or \
         `org/name`)"
    );
    download(id, revision, weights)
}

/// Whether `id` has the form of a hub repository id: `name` or `org/name`, of letters, digits, `-`, `_`
/// and `.`, neither part empty nor `..`.
fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn download(id: &str, revision: Option<&str>, weights: bool) -> anyhow::Result<ResolvedModel> {
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        if !token.is_empty() {
            builder = builder.with_token(Some(token));
        }
    }
    let api = builder.build().context("setting up the Hugging Face Hub client")?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    ));
    let fetch = |file: &str| repo.get(file).with_context(|| format!("downloading {file} of {id}"));
    tracing::info!(model = id, "downloading from the hub");
    let config = fetch("config.json")?;
    fetch("tokenizer.json")?;
    if let Err(e) = fetch("tokenizer_config.json") {
        tracing::info!("no tokenizer_config.json ({e:#}); continuing without it");
    }
    match weights.then(|| fetch("model.safetensors.index.json")) {
        None => tracing::info!("--load-format dummy: the checkpoint is not downloaded"),
        Some(Ok(index)) => {
            let text = std::fs::read_to_string(&index)?;
            let v: serde_json::Value = serde_json::from_str(&text).context("parsing model.safetensors.index.json")?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .context("model.safetensors.index.json has no weight_map")?;
            let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            files.sort_unstable();
            files.dedup();
            for f in files {
                fetch(f)?;
            }
        }
        Some(Err(_)) => {
            fetch("model.safetensors").context(
                "the repository has neither model.safetensors nor model.safetensors.index.json \
                 (pickle .bin weights are never loaded: convert them to safetensors)",
            )?;
        }
    }
    let dir = config
        .parent()
        .context("config.json has no parent directory")?
        .to_path_buf();
    Ok(ResolvedModel {
        dir,
        model_id: id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hub_test_server;

    fn fixture(p: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(p)
    }

    /// Lay out a hub repo folder: the llama fixture (sharded, with index) plus the tokenizer.
    fn repo_folder(root: &Path) -> PathBuf {
        let dir = root.join("repo");
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture("models/llama")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::copy(fixture("tokenizer/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        dir
    }

    // One test touches the process environment (HF_*), so everything env-related lives in it.
    #[test]
    fn downloads_from_a_hub_api_server_into_hf_home() {
        let tmp = std::env::temp_dir().join(format!("lorax-hub-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let folder = repo_folder(&tmp);
        let server = hub_test_server::start(vec![("acme/tiny".into(), folder.clone())], Some("s3cret".into())).unwrap();
        let home = tmp.join("hf-home");
        // SAFETY: this is the only test in this binary that reads or writes the environment.
        unsafe {
            std::env::set_var("HF_ENDPOINT", &server.endpoint);
            std::env::set_var("HF_HOME", &home);
            std::env::set_var("HF_TOKEN", "wrong");
        }
        // A wrong token is refused by the server: a clear error naming the file.
        let e = resolve(Some("acme/tiny"), None, &tmp).unwrap_err();
        assert!(format!("{e:#}").contains("config.json"), "{e:#}");
        unsafe { std::env::set_var("HF_TOKEN", "s3cret") };
        let m = resolve(Some("acme/tiny"), Some("main"), &tmp).unwrap();
        assert!(m.dir.starts_with(&home), "{} not under HF_HOME", m.dir.display());
        for f in [
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00003-of-00003.safetensors",
        ] {
            let got = std::fs::read(m.dir.join(f)).unwrap();
            assert_eq!(got, std::fs::read(folder.join(f)).unwrap(), "{f} differs");
        }
        // The downloaded checkpoint opens with the engine's loader's expectations (a real safetensors).
        let before = server.requests.load(std::sync::atomic::Ordering::SeqCst);
        assert!(before > 0);
        // A repo that does not exist fails with the repo's name in the message.
        let e = resolve(Some("acme/missing"), None, &tmp).unwrap_err();
        assert!(format!("{e:#}").contains("acme/missing"), "{e:#}");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_missing_local_path_is_not_sent_to_the_hub() {
        let tmp = tempfile::tempdir().unwrap();
        for id in ["/nonexistent/model", "./models/mistral", "../m", "~/m", "a/b/c"] {
            let e = resolve(Some(id), None, tmp.path()).unwrap_err().to_string();
            assert!(e.contains("neither a local directory"), "{id}: {e}");
        }
        assert!(is_repo_id("mistralai/Mistral-7B-v0.1") && is_repo_id("gpt2") && is_repo_id("org/model.v1_2"));
    }

    #[test]
    fn local_dir_needs_config_and_tokenizer() {
        let tmp = std::env::temp_dir().join(format!("lorax-local-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let e = resolve(Some(tmp.to_str().unwrap()), None, &tmp).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        let emb = resolve(None, None, &tmp).unwrap();
        assert!(emb.dir.join("model-00001-of-00003.safetensors").exists());
        let again = resolve(Some(emb.dir.to_str().unwrap()), None, &tmp).unwrap();
        assert_eq!(again.dir, emb.dir);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
