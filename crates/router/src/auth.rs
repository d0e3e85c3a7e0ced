//! Optional API keys (`--api-key`, `--api-key-file`): when set, every route except the public ones
//! ([`is_public`]: `/health`, `/metrics` and the API documentation) needs one of the keys, sent as
//! `Authorization: Bearer <key>` (what OpenAI clients send) or as `X-API-Key: <key>` (for LoRAX clients,
//! which use `Authorization: Bearer` for the hub token of private adapters). A key that arrives in
//! `Authorization` is removed from the request before the handlers see it, so it is never taken for a
//! hub token; with the key in `X-API-Key`, `Authorization` keeps its LoRAX meaning. Anything else is
//! refused with 401 and `error_type` `unauthorized`. Keys are compared in constant time and never
//! logged: their `Debug` form is redacted.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::errors::{ApiError, UNAUTHORIZED};

/// The header that carries a key when `Authorization` is used for something else.
pub const API_KEY_HEADER: &str = "x-api-key";

/// One API key as given on the command line; shown as `***` by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        check_key(key)?;
        Ok(Self(key.to_string()))
    }
}

/// A key must fit in a header and survive copy and paste: visible ASCII, no spaces, not empty.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("an API key must not be empty".into());
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key must be visible ASCII characters without spaces".into());
    }
    Ok(())
}

/// The accepted keys (at least one).
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// How a request proved it holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// `Authorization: Bearer <key>`; the header is not a hub token.
    Bearer,
    /// `X-API-Key: <key>`.
    Header,
}

impl ApiKeys {
    /// The keys of `--api-key` and of the lines of `--api-key-file` (blank lines and lines starting
    /// with `#` skipped); `None` when neither is given, so no key is needed.
    ///
    /// # Errors
    /// An unreadable file, a line that is not a valid key, or a file without any key. Messages never
    /// contain a key.
    pub fn from_flags(key: Option<&ApiKey>, file: Option<&Path>) -> Result<Option<Self>, String> {
        let mut keys: Vec<Vec<u8>> = key.map(|k| k.0.as_bytes().to_vec()).into_iter().collect();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read --api-key-file {}: {e}", file.display()))?;
            let before = keys.len();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                check_key(line).map_err(|e| format!("line {} of --api-key-file {}: {e}", n + 1, file.display()))?;
                keys.push(line.as_bytes().to_vec());
            }
            if keys.len() == before {
                return Err(format!("--api-key-file {} holds no key", file.display()));
            }
        }
        Ok((!keys.is_empty()).then(|| Self { keys: Arc::new(keys) }))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a set is only made with at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `given` is one of the keys; every key is compared in full, whatever matches.
    fn accepts(&self, given: &[u8]) -> bool {
        self.keys.iter().fold(false, |found, key| found | same(key, given))
    }

    /// Which credential of `headers` holds a key: `X-API-Key` first, then `Authorization: Bearer`.
    ///
    /// # Errors
    /// 401 `unauthorized` when neither does.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<Credential, ApiError> {
        if let Some(given) = headers.get(API_KEY_HEADER) {
            if self.accepts(given.as_bytes()) {
                return Ok(Credential::Header);
            }
        }
        if let Some(token) = crate::server::bearer_token(headers) {
            if self.accepts(token.0.as_bytes()) {
                return Ok(Credential::Bearer);
            }
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            UNAUTHORIZED,
            "a valid API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
        ))
    }
}

/// Compares two byte strings in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Routes served without a key: health checks, Prometheus scraping and the API documentation (the
/// static OpenAPI document and Swagger UI, which hold no model data).
pub fn is_public(path: &str) -> bool {
    matches!(path, "/health" | "/metrics" | "/docs" | "/api-doc/openapi.json") || path.starts_with("/docs/")
}

/// The axum middleware: lets public routes and requests with a key through (without an
/// `Authorization` header that carried the key), answers 401 to the others.
pub async fn guard(State(keys): State<ApiKeys>, mut request: Request, next: Next) -> Response {
    if is_public(request.uri().path()) {
        return next.run(request).await;
    }
    match keys.authorize(request.headers()) {
        Ok(Credential::Bearer) => {
            request.headers_mut().remove(header::AUTHORIZATION);
            next.run(request).await
        }
        Ok(Credential::Header) => next.run(request).await,
        Err(error) => {
            tracing::debug!(path = request.uri().path(), "request without a valid API key");
            let mut response = crate::server::error_for(request.uri().path(), error);
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).expect("header value"));
        }
        headers
    }

    fn keys(key: &str) -> ApiKeys {
        let key: ApiKey = key.parse().expect("key");
        ApiKeys::from_flags(Some(&key), None).expect("keys").expect("some keys")
    }

    #[test]
    fn credentials() {
        let k = keys("s3cret-key");
        assert_eq!(
            k.authorize(&headers(&[("authorization", "Bearer s3cret-key")])),
            Ok(Credential::Bearer)
        );
        assert_eq!(
            k.authorize(&headers(&[
                ("x-api-key", "s3cret-key"),
                ("authorization", "Bearer hf_hub")
            ])),
            Ok(Credential::Header),
            "the hub token stays in Authorization"
        );
        for bad in [
            headers(&[]),
            headers(&[("authorization", "Bearer s3cret-kez")]),
            headers(&[("authorization", "Bearer s3cret-key2")]),
            headers(&[("authorization", "Basic s3cret-key")]),
            headers(&[("x-api-key", "")]),
            headers(&[("x-api-key", "S3CRET-KEY")]),
        ] {
            let error = k.authorize(&bad).expect_err("refused");
            assert_eq!((error.status.as_u16(), error.error_type), (401, "unauthorized"));
            assert!(!error.message.contains("s3cret"), "{}", error.message);
        }
    }

    #[test]
    fn keys_file_and_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys");
        std::fs::write(&file, "# rotation: old key first\nold-key\n\n  new-key  \n").expect("write");
        let flag: ApiKey = "flag-key".parse().expect("key");
        let k = ApiKeys::from_flags(Some(&flag), Some(&file))
            .expect("read")
            .expect("keys");
        assert_eq!(k.len(), 3);
        for key in ["old-key", "new-key", "flag-key"] {
            assert!(k.accepts(key.as_bytes()), "{key}");
        }
        assert!(!k.accepts(b"# rotation: old key first"));
        assert_eq!(format!("{k:?}"), "ApiKeys(3 keys)");
        assert_eq!(format!("{flag:?}"), "***");

        assert!(ApiKeys::from_flags(None, None).expect("no flags").is_none());
        std::fs::write(&file, "# nothing\n\n").expect("write");
        let error = ApiKeys::from_flags(None, Some(&file)).expect_err("empty file");
        assert!(error.contains("holds no key"), "{error}");
        std::fs::write(&file, "good\nbad key with spaces\n").expect("write");
        let error = ApiKeys::from_flags(None, Some(&file)).expect_err("bad line");
        assert!(error.contains("line 2") && !error.contains("spaces\n"), "{error}");
        assert!(ApiKeys::from_flags(None, Some(&dir.path().join("missing"))).is_err());
        assert!("".parse::<ApiKey>().is_err());
        assert!("has space".parse::<ApiKey>().is_err());
    }

    #[test]
    fn public_routes() {
        for path in [
            "/health",
            "/metrics",
            "/docs",
            "/docs/swagger-ui.css",
            "/api-doc/openapi.json",
        ] {
            assert!(is_public(path), "{path}");
        }
        for path in [
            "/",
            "/generate",
            "/generate_stream",
            "/info",
            "/tokenize",
            "/v1/models",
            "/healthz",
            "/docsx",
        ] {
            assert!(!is_public(path), "{path}");
        }
    }
}
