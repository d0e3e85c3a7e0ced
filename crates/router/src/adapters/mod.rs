//! LoRA adapters on the router side: what names an adapter ([`AdapterKey`]), why one could not be made
//! ready ([`AdapterError`], from the shard's gRPC code), the scheduler's per-adapter state and queues
//! ([`registry`]) and the shard calls that run in spawned tasks ([`tasks`]).
//!
//! The shards keep adapters in two tiers: DownloadAdapter puts the files in a host cache shared by every
//! rank, LoadAdapter makes them usable on the device, OffloadAdapter gives the device memory back. The
//! router decides which adapters are on the device (at most `--max-active-adapters`) from the requests
//! waiting for them; see docs/architecture.md, "Adapter scheduler".

pub mod catalog;
pub mod registry;
pub mod tasks;
pub mod templates;

use std::fmt;

/// Where an adapter's files come from. The values are the shard contract's `adapter_source` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum AdapterSource {
    /// A Hugging Face Hub repository id.
    Hub,
    /// A directory on the shards' machine.
    Local,
}

impl AdapterSource {
    /// The accepted request values, for error messages.
    pub const ACCEPTED: &'static str = "\"hub\", \"local\"";

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hub => "hub",
            Self::Local => "local",
        }
    }

    /// Parses a request's `adapter_source` (exact, lower case).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "hub" => Some(Self::Hub),
            "local" => Some(Self::Local),
            _ => None,
        }
    }
}

impl fmt::Display for AdapterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An adapter as the shards know it: (source, id). The same id from two sources is two adapters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    /// Where it comes from.
    pub source: AdapterSource,
    /// Hub repo id or local path.
    pub id: String,
}

impl AdapterKey {
    /// The adapter `id` from `source`. A local path is spelled one way ([`local_spelling`]), so that one
    /// directory named several ways is one adapter: one load, one slot, one metric label.
    pub fn new(source: AdapterSource, id: impl Into<String>) -> Self {
        let id = id.into();
        let id = match source {
            AdapterSource::Local => local_spelling(&id),
            AdapterSource::Hub => id,
        };
        Self { source, id }
    }
}

/// `path` without what never changes the directory it names: empty and `.` components, repeated and
/// trailing slashes (`./a//b/` is `a/b`, `/x/./a` is `/x/a`). `..` stays: what it leads to depends on
/// symbolic links, which only the shard resolves (and checks against its adapter roots).
fn local_spelling(path: &str) -> String {
    let absolute = path.starts_with('/');
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    match (absolute, parts.is_empty()) {
        (true, _) => format!("/{}", parts.join("/")),
        (false, true) => ".".to_string(),
        (false, false) => parts.join("/"),
    }
}

impl fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({})", self.id, self.source)
    }
}

/// Metric label value of requests to the base model (`adapter` label of the per-adapter metrics).
pub const BASE_MODEL_LABEL: &str = "__base__";

/// The `adapter` metric label of a request's adapter.
pub fn metric_label(adapter: Option<&AdapterKey>) -> String {
    adapter.map_or_else(|| BASE_MODEL_LABEL.to_string(), |key| key.id.clone())
}

/// Why an adapter could not be downloaded or loaded, from the shard's gRPC code (the contract above
/// `DownloadAdapterRequest` in shard.proto). The HTTP edge maps each kind to a status once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFailure {
    /// No such repository, directory or file (`NOT_FOUND`).
    NotFound,
    /// The hub refused the token, or a local path outside the allowed roots (`PERMISSION_DENIED`,
    /// `UNAUTHENTICATED`).
    Forbidden,
    /// The adapter cannot be used with this model: bad format, config or shapes (`INVALID_ARGUMENT`).
    Invalid,
    /// Anything else: hub unreachable, timeouts, a full device tier, transport errors. A retry may work.
    Unavailable,
}

impl AdapterFailure {
    /// The kind for a shard's gRPC code (`None`: no code, e.g. the connection broke).
    pub fn from_code(code: Option<tonic::Code>) -> Self {
        match code {
            Some(tonic::Code::NotFound) => Self::NotFound,
            Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) => Self::Forbidden,
            Some(tonic::Code::InvalidArgument) => Self::Invalid,
            _ => Self::Unavailable,
        }
    }
}

/// An adapter that could not be made ready; fails the requests that were waiting for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AdapterError {
    /// What kind of failure (decides the HTTP status).
    pub kind: AdapterFailure,
    /// The adapter.
    pub adapter: AdapterKey,
    /// "downloaded" or "loaded".
    pub stage: &'static str,
    /// The shard's message (with the request's api_token, if it echoed it, replaced by `***`).
    pub message: String,
    /// A load refused for want of room on the device (RESOURCE_EXHAUSTED): the adapter's requests may
    /// wait for an offload rather than fail ([`registry::Registry::load_refused`]).
    pub no_room: bool,
}

/// "adapter `id` (source) ...: the shard's message": an invalid adapter "cannot be used", a missing one "was not
/// found", else it "could not be" downloaded (a local one: read) or loaded.
impl fmt::Display for AdapterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (adapter, message) = (&self.adapter, &self.message);
        match (self.kind, self.adapter.source, self.stage) {
            (AdapterFailure::Invalid, ..) => write!(f, "adapter {adapter} cannot be used: {message}"),
            (AdapterFailure::NotFound, ..) => write!(f, "adapter {adapter} was not found: {message}"),
            (_, AdapterSource::Local, "downloaded") => write!(f, "adapter {adapter} could not be read: {message}"),
            (.., stage) => write!(f, "adapter {adapter} could not be {stage}: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One local directory spelled several ways is one adapter; `..` and hub ids are left as they are.
    #[test]
    fn local_paths_have_one_spelling() {
        let local = |id: &str| AdapterKey::new(AdapterSource::Local, id).id;
        for same in [
            "lora-r8",
            "lora-r8/",
            "lora-r8//",
            "./lora-r8",
            "./././lora-r8",
            ".//lora-r8/.",
        ] {
            assert_eq!(local(same), "lora-r8", "{same:?}");
        }
        assert_eq!(local("/data//a/./b/"), "/data/a/b");
        assert_eq!(local("/"), "/");
        assert_eq!(local("./"), ".");
        assert_eq!(local("x/../a"), "x/../a");
        assert_eq!(AdapterKey::new(AdapterSource::Hub, "org/a/").id, "org/a/");
    }

    #[test]
    fn sources_parse_exactly() {
        assert_eq!(AdapterSource::parse("hub"), Some(AdapterSource::Hub));
        assert_eq!(AdapterSource::parse("local"), Some(AdapterSource::Local));
        for bad in ["", "Hub", "s3", "pbase", "hub "] {
            assert_eq!(AdapterSource::parse(bad), None, "{bad:?}");
        }
        for source in [AdapterSource::Hub, AdapterSource::Local] {
            assert_eq!(AdapterSource::parse(source.as_str()), Some(source));
            assert!(AdapterSource::ACCEPTED.contains(&format!("\"{source}\"")));
        }
    }

    #[test]
    fn codes_map_to_failures() {
        use tonic::Code;
        let cases = [
            (Some(Code::NotFound), AdapterFailure::NotFound),
            (Some(Code::PermissionDenied), AdapterFailure::Forbidden),
            (Some(Code::Unauthenticated), AdapterFailure::Forbidden),
            (Some(Code::InvalidArgument), AdapterFailure::Invalid),
            (Some(Code::Unavailable), AdapterFailure::Unavailable),
            (Some(Code::DeadlineExceeded), AdapterFailure::Unavailable),
            (Some(Code::ResourceExhausted), AdapterFailure::Unavailable),
            (Some(Code::Internal), AdapterFailure::Unavailable),
            (None, AdapterFailure::Unavailable),
        ];
        for (code, kind) in cases {
            assert_eq!(AdapterFailure::from_code(code), kind, "{code:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(metric_label(None), BASE_MODEL_LABEL);
        assert_eq!(
            metric_label(Some(&AdapterKey::new(AdapterSource::Hub, "org/a"))),
            "org/a"
        );
    }
}
