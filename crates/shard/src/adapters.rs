//! Where adapters come from and the host tier that keeps them parsed.
//!
//! Sources: `local` (a directory under one of the roots the launcher allows; `..`, symlinks and
//! absolute paths that lead outside are refused) and `hub` (hf-hub into the usual cache, honouring
//! HF_ENDPOINT and HF_HOME, with the request's token or HF_TOKEN; tokens are never logged). Errors are
//! gRPC statuses with the codes the proto documents, so the router can tell a missing adapter from a
//! forbidden path, a broken file or an unreachable hub.
//!
//! The host tier is an LRU of parsed [`HostAdapter`]s bounded in bytes. The device tier lives in the
//! engine; its size (adapter slots) is checked by the service.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use hf_hub::api::tokio::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use lorax_engine::lora::HostAdapter;
use lorax_engine::{EngineError, ModelConfig};
use tonic::Status;

/// How adapters are found and checked.
#[derive(Clone, Debug)]
pub struct AdapterSettings {
    /// Canonical directories local adapters must be under; empty = local source disabled.
    pub local_roots: Vec<PathBuf>,
    /// Largest LoRA rank accepted.
    pub max_rank: usize,
    /// Bytes of parsed adapters kept in host memory.
    pub host_cache_bytes: usize,
    /// Most adapters on the device at once.
    pub device_slots: usize,
}

/// Adapter files on this machine, ready to parse.
#[derive(Debug, Clone)]
pub struct Located {
    /// Directory with adapter_config.json and adapter_model.safetensors.
    pub dir: PathBuf,
}

/// The cache key of an adapter.
pub fn key(source: &str, id: &str) -> String {
    format!("{source}:{id}")
}

/// Canonicalizes the configured roots; a root that does not exist is a startup error.
pub fn canonical_roots(roots: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(r).map_err(|e| anyhow::anyhow!("adapter root {} cannot be used: {e}", r.display()))
        })
        .collect()
}

/// Resolves a `local` adapter id to a directory under one of `roots`. Relative ids are taken relative
/// to each root in turn. The path is canonicalized (symlinks and `..` resolved) before the check, so
/// no spelling leads outside the roots.
pub fn resolve_local(roots: &[PathBuf], id: &str) -> Result<Located, Status> {
    if roots.is_empty() {
        return Err(Status::permission_denied(
            "local adapters are disabled on this server (the launcher's --adapter-local-roots is empty)",
        ));
    }
    let candidates: Vec<PathBuf> = if Path::new(id).is_absolute() {
        vec![PathBuf::from(id)]
    } else {
        roots.iter().map(|r| r.join(id)).collect()
    };
    let mut outside = false;
    for candidate in &candidates {
        match std::fs::canonicalize(candidate) {
            Ok(real) => {
                if roots.iter().any(|r| real.starts_with(r)) {
                    if !real.is_dir() {
                        return Err(Status::not_found(format!("local adapter {id:?} is not a directory")));
                    }
                    return Ok(Located { dir: real });
                }
                outside = true;
            }
            Err(_) => {
                if !lexically_under(candidate, roots) {
                    outside = true;
                }
            }
        }
    }
    if outside {
        Err(Status::permission_denied(format!(
            "local adapter path {id:?} is outside the allowed adapter roots"
        )))
    } else {
        Err(Status::not_found(format!("local adapter {id:?} does not exist")))
    }
}

/// Whether `p`, with `.` and `..` applied to its text, is under one of `roots` (for paths that do not
/// exist, so the answer cannot come from the file system).
fn lexically_under(p: &Path, roots: &[PathBuf]) -> bool {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return false;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    roots.iter().any(|r| out.starts_with(r))
}

/// A hub repo id: `name` or `org/name` of letters, digits, `-`, `_`, `.` (no `..`).
fn valid_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    !id.contains("..")
        && (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn hub_status(id: &str, file: &str, e: &ApiError) -> Status {
    if let ApiError::RequestError(err) = e {
        if let Some(code) = err.status() {
            let code = code.as_u16();
            return match code {
                401 | 403 => Status::permission_denied(format!(
                    "the hub refused access to adapter {id:?} (HTTP {code}): check api_token"
                )),
                404 => Status::not_found(format!("adapter {id:?} has no {file} on the hub (HTTP 404)")),
                _ => Status::unavailable(format!("the hub answered HTTP {code} for {file} of adapter {id:?}")),
            };
        }
        return Status::unavailable(format!("the hub could not be reached for adapter {id:?}: {err}"));
    }
    Status::unavailable(format!("downloading {file} of adapter {id:?} failed: {e}"))
}

/// Downloads a hub adapter's two files into the hub cache. `token` is the request's or HF_TOKEN's; it
/// goes only into the Authorization header.
///
/// Asynchronous, so that a caller's timeout releases what it holds: dropping the future drops hf-hub's
/// lock on the file being written (a later try can take it), and it holds no thread (a blocking download
/// on a hub that stops sending kept its thread, and that lock, for good: ureq has no read timeout there).
/// hf-hub fetches a file in 10 MB pieces, one at a time, each in a task of its own (spawned, so dropping
/// the download would not stop them), and records the pieces done, so a later try resumes after them. The
/// download therefore runs on a runtime of its own, on a thread of its own, which is shut down when this
/// future is dropped or done: every piece task stops with it and lets go of its connection.
///
/// Files not yet in the cache are sized first (a one-byte range request, as hf-hub itself makes): weights
/// larger than `max_weights` bytes (the largest adapter the model and rank limit allow) and configs larger
/// than [`MAX_CONFIG_BYTES`] are refused before any of them is downloaded (an adapter comes from whoever
/// published it, and a file on the hub may be many gigabytes).
pub async fn download_hub(id: &str, token: Option<String>, max_weights: usize) -> Result<Located, Status> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // Dropped with this future (a timeout): the download's runtime then stops.
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let id = id.to_string();
    std::thread::Builder::new()
        .name("hub-download".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = done_tx.send(Err(Status::internal(format!("starting a download runtime: {e}"))));
                    return;
                }
            };
            let done = runtime.block_on(async {
                tokio::select! {
                    done = download_hub_here(&id, token, max_weights) => Some(done),
                    _ = stop_rx => None,
                }
            });
            // Drops every task still running (hf-hub's pieces) without waiting for them.
            runtime.shutdown_background();
            if let Some(done) = done {
                let _ = done_tx.send(done);
            }
        })
        .map_err(|e| Status::internal(format!("starting a download thread: {e}")))?;
    done_rx
        .await
        .map_err(|_| Status::internal("the hub download's thread ended without an answer"))?
}

/// [`download_hub`] on the current runtime.
async fn download_hub_here(id: &str, token: Option<String>, max_weights: usize) -> Result<Located, Status> {
    if !valid_repo_id(id) {
        return Err(Status::invalid_argument(format!(
            "{id:?} is not a hub repository id (expected `name` or `org/name`)"
        )));
    }
    let token = token
        .or_else(|| std::env::var("HF_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .with_token(token)
        .build()
        .map_err(|e| Status::unavailable(format!("setting up the hub client failed: {e}")))?;
    let repo = api.repo(Repo::new(id.to_string(), RepoType::Model));
    let cache = Cache::from_env().repo(Repo::new(id.to_string(), RepoType::Model));
    // The size of a file not yet in the cache as the hub states it for a one-byte range request
    // (`Content-Range`, redirects followed); a hub that does not say fails hf-hub's own download.
    let too_large = |file: &str, limit: usize| {
        let request = cache
            .get(file)
            .is_none()
            .then(|| api.client().get(repo.url(file)).header("Range", "bytes=0-0").send());
        async move {
            let Some(request) = request else { return false };
            let Ok(response) = request.await else { return false };
            let size = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|range| range.rsplit('/').next())
                .and_then(|n| n.trim().parse::<u64>().ok());
            size.is_some_and(|n| n > limit as u64)
        }
    };
    for (file, limit) in [
        ("adapter_config.json", MAX_CONFIG_BYTES),
        ("adapter_model.safetensors", max_weights),
    ] {
        if too_large(file, limit).await {
            return Err(Status::invalid_argument(format!(
                "{file} of adapter {id:?} is larger than the {limit} bytes an adapter of this model within \
                 --max-lora-rank can take; it was not downloaded"
            )));
        }
    }
    let config = repo
        .get("adapter_config.json")
        .await
        .map_err(|e| hub_status(id, "adapter_config.json", &e))?;
    repo.get("adapter_model.safetensors").await.map_err(|e| {
        let s = hub_status(id, "adapter_model.safetensors", &e);
        if s.code() == tonic::Code::NotFound {
            Status::not_found(format!(
                "{} (pickle adapter_model.bin files are never loaded: convert the adapter with peft's \
                 save_pretrained(..., safe_serialization=True))",
                s.message()
            ))
        } else {
            s
        }
    })?;
    // Optional: an adapter may ship its own chat template.
    if too_large("tokenizer_config.json", MAX_CONFIG_BYTES).await {
        tracing::warn!(
            adapter = id,
            "the adapter's tokenizer_config.json is over {MAX_CONFIG_BYTES} bytes: not downloaded"
        );
    } else if let Err(e) = repo.get("tokenizer_config.json").await {
        tracing::debug!(adapter = id, "no tokenizer_config.json on the hub: {e}");
    }
    let dir = config
        .parent()
        .ok_or_else(|| Status::internal("hub cache path has no parent"))?
        .to_path_buf();
    Ok(Located { dir })
}

/// Largest `adapter_config.json` or `tokenizer_config.json` downloaded or read.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The adapter's own `tokenizer_config.json` (for its chat template), if it has one of at most 1 MiB.
pub fn tokenizer_config(located: &Located) -> Option<String> {
    let path = located.dir.join("tokenizer_config.json");
    let size = std::fs::metadata(&path).ok()?.len();
    if size > MAX_CONFIG_BYTES as u64 {
        tracing::warn!(path = %path.display(), size, "tokenizer_config.json over 1 MiB is ignored");
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// A hub adapter already in the cache (no network), for a Load after the host tier dropped it.
pub fn cached_hub(id: &str) -> Option<Located> {
    let repo = Cache::from_env().repo(Repo::new(id.to_string(), RepoType::Model));
    let config = repo.get("adapter_config.json")?;
    repo.get("adapter_model.safetensors")?;
    Some(Located {
        dir: config.parent()?.to_path_buf(),
    })
}

/// Removes a hub adapter's files from the hub cache (the snapshot entries and the blobs they point to),
/// after they failed to parse: hf-hub serves cached files without asking the hub, so a corrupt or
/// truncated download would otherwise fail every retry, even once the hub serves good files again.
pub fn evict_hub(id: &str) {
    let repo = Cache::from_env().repo(Repo::new(id.to_string(), RepoType::Model));
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        if let Some(entry) = repo.get(file) {
            if let Ok(blob) = std::fs::canonicalize(&entry) {
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(&entry);
        }
    }
}

/// Parses and checks an adapter against the base model, as a status on failure.
pub fn parse(located: &Located, cfg: &ModelConfig, max_rank: usize) -> Result<HostAdapter, Status> {
    HostAdapter::load(&located.dir, cfg, max_rank).map_err(|e| parse_error(e, located))
}

/// The status of a failed parse of the adapter at `located`.
pub fn parse_error(e: EngineError, located: &Located) -> Status {
    match e {
        EngineError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            Status::not_found(format!("the adapter has no {file}"))
        }
        // Messages name files by their path on this machine; keep only the adapter-relative part.
        other => Status::invalid_argument(lorax_engine::lora::strip_dir(&other.to_string(), &located.dir)),
    }
}

/// What identifies an adapter's two files as they are on disk: per file its device, inode, size and
/// modification and change times (a hub snapshot's links followed to their blobs). Equal stamps mean
/// that a parse of then still holds now: a rewrite, replacement or new revision changes the stamp, except
/// a rewrite within the file system's timestamp granularity of the stamp, which [`stamp`] rules out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Vec<[i64; 7]>);

/// A file modified less than this before its stamp is taken gets none (git's "racy" rule): timestamps
/// may advance only once per clock tick, so a same-size rewrite within it would leave the stamp equal.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// The stamp of `located`'s adapter_config.json and adapter_model.safetensors (None: one cannot be read,
/// or was modified within [`RACY`] of now). Taken from the opened files, so that a network file system
/// revalidates what it reports.
pub fn stamp(located: &Located) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let now = std::time::SystemTime::now();
    ["adapter_config.json", "adapter_model.safetensors"]
        .into_iter()
        .map(|f| {
            let m = std::fs::File::open(located.dir.join(f)).ok()?.metadata().ok()?;
            let age = now.duration_since(m.modified().ok()?).unwrap_or_default();
            if age < RACY {
                return None;
            }
            #[allow(clippy::cast_possible_wrap)]
            Some([
                m.dev() as i64,
                m.ino() as i64,
                m.len() as i64,
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            ])
        })
        .collect::<Option<Vec<_>>>()
        .map(FileStamp)
}

struct HostEntry {
    adapter: Arc<HostAdapter>,
    last_used: u64,
    /// The files' stamp when they were parsed (None: not known).
    stamp: Option<FileStamp>,
}

/// Parsed adapters in host memory, least recently used evicted first once over budget.
pub struct HostTier {
    budget: usize,
    inner: Mutex<(HashMap<String, HostEntry>, u64)>,
}

impl HostTier {
    /// An empty tier holding at most `budget` bytes (one adapter larger than that is still kept alone).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// The adapter `key`, marking it used.
    pub fn get(&self, key: &str) -> Option<Arc<HostAdapter>> {
        self.get_if(key, |_| true)
    }

    /// The adapter `key` if it was parsed from files of `stamp` (they are unchanged since), marking it used.
    pub fn get_unchanged(&self, key: &str, stamp: &FileStamp) -> Option<Arc<HostAdapter>> {
        self.get_if(key, |e| e.stamp.as_ref() == Some(stamp))
    }

    fn get_if(&self, key: &str, keep: impl Fn(&HostEntry) -> bool) -> Option<Arc<HostAdapter>> {
        let mut g = self.inner.lock().ok()?;
        let (map, clock) = &mut *g;
        *clock += 1;
        let now = *clock;
        map.get_mut(key).filter(|e| keep(e)).map(|e| {
            e.last_used = now;
            Arc::clone(&e.adapter)
        })
    }

    /// Inserts `adapter` under `key`, parsed from files of `stamp`, evicting the least recently used
    /// others beyond the budget.
    pub fn insert(&self, key: &str, adapter: Arc<HostAdapter>, stamp: Option<FileStamp>) {
        let Ok(mut g) = self.inner.lock() else { return };
        let (map, clock) = &mut *g;
        *clock += 1;
        map.insert(
            key.to_string(),
            HostEntry {
                adapter,
                last_used: *clock,
                stamp,
            },
        );
        loop {
            let total: usize = map.values().map(|e| e.adapter.held_bytes).sum();
            if total <= self.budget || map.len() <= 1 {
                break;
            }
            let Some(oldest) = map
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            tracing::debug!(adapter = %oldest, "evicted from the host tier");
            map.remove(&oldest);
        }
    }

    /// Bytes and entries held.
    pub fn usage(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map(|g| (g.0.values().map(|e| e.adapter.held_bytes).sum(), g.0.len()))
            .unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(valid_repo_id("org/name-1.2_x"));
        assert!(valid_repo_id("name"));
        for bad in [
            "", "a/b/c", "../x", "a/..", "a/b c", "a/b?x=1", "/abs", "a//b", "a/b%2e",
        ] {
            assert!(!valid_repo_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn local_paths_stay_under_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("good")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let roots = canonical_roots(std::slice::from_ref(&root)).unwrap();
        let ok = resolve_local(&roots, "good").unwrap();
        assert_eq!(ok.dir, roots[0].join("good"));
        assert!(resolve_local(&roots, &root.join("good").display().to_string()).is_ok());
        let code = |id: &str| resolve_local(&roots, id).unwrap_err().code();
        assert_eq!(code("../outside"), tonic::Code::PermissionDenied);
        assert_eq!(code("link"), tonic::Code::PermissionDenied, "symlink out of the root");
        assert_eq!(code(&outside.display().to_string()), tonic::Code::PermissionDenied);
        assert_eq!(code("good/../../outside"), tonic::Code::PermissionDenied);
        assert_eq!(code("../nonexistent"), tonic::Code::PermissionDenied);
        assert_eq!(code("missing"), tonic::Code::NotFound);
        assert_eq!(
            resolve_local(&[], "good").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
