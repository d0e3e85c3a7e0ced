//! The HTTP edge of error handling: every layer's error (validation, inference, shard client, request
//! decoding) becomes one [`ApiError`] here, with its status code and a stable `error_type` string that
//! is also the `err` label of `lorax_request_failure`.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::adapters::AdapterFailure;
use crate::client::ClientError;
use crate::infer::InferError;
use crate::metrics as m;
use crate::schema::ErrorResponse;
use crate::validation::ValidationError;

/// An error answer: status, message and error_type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// Stable machine-readable kind.
    pub error_type: &'static str,
}

/// `error_type` of invalid requests (422, and 400/413/415 for bodies that cannot be read).
pub const VALIDATION: &str = "validation";
/// `error_type` of requests refused for lack of capacity (429).
pub const OVERLOADED: &str = "overloaded";
/// `error_type` of shard failures during generation (424).
pub const GENERATION: &str = "generation";
/// `error_type` of an unhealthy deployment (503).
pub const UNHEALTHY: &str = "unhealthy";
/// `error_type` of a generation that ended without its final token (500).
pub const INCOMPLETE_GENERATION: &str = "incomplete_generation";
/// `error_type` of a request without a valid API key, when `--api-key` is set (401).
pub const UNAUTHORIZED: &str = "unauthorized";
/// `error_type` of a path the router does not serve (404).
pub const NOT_FOUND: &str = "not_found";
/// `error_type` of a method a route does not take, e.g. `GET /generate` (405).
pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
/// `error_type` of a request whose adapter does not exist (404).
pub const ADAPTER_NOT_FOUND: &str = "adapter_not_found";
/// `error_type` of a request whose adapter may not be fetched: token refused, path not allowed (403).
pub const ADAPTER_FORBIDDEN: &str = "adapter_forbidden";
/// `error_type` of a request whose adapter cannot be used with this model (422).
pub const ADAPTER_INVALID: &str = "adapter_invalid";
/// `error_type` of a request whose adapter could not be made ready for another reason; a retry may
/// work (424).
pub const ADAPTER_UNAVAILABLE: &str = "adapter_unavailable";

/// Status and `error_type` of an adapter failure; `error_type` is also the `err` label of
/// `lorax_adapter_load_failures`.
pub fn adapter_status(kind: AdapterFailure) -> (StatusCode, &'static str) {
    match kind {
        AdapterFailure::NotFound => (StatusCode::NOT_FOUND, ADAPTER_NOT_FOUND),
        AdapterFailure::Forbidden => (StatusCode::FORBIDDEN, ADAPTER_FORBIDDEN),
        AdapterFailure::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, ADAPTER_INVALID),
        AdapterFailure::Unavailable => (StatusCode::FAILED_DEPENDENCY, ADAPTER_UNAVAILABLE),
    }
}

impl ApiError {
    /// An error with its status, `error_type` and message.
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            error_type,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.message.clone(),
            error_type: self.error_type.to_string(),
        }
    }

    /// Counts this error in `lorax_request_failure{err=error_type}`.
    pub fn record(&self) {
        metrics::counter!(m::REQUEST_FAILURE, "err" => self.error_type).increment(1);
    }

    /// A shard health failure.
    pub fn unhealthy(error: &ClientError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            UNHEALTHY,
            format!("unhealthy: {error}"),
        )
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, VALIDATION, e.to_string())
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Overloaded => Self::new(StatusCode::TOO_MANY_REQUESTS, OVERLOADED, e.to_string()),
            InferError::Generation(_) => Self::new(StatusCode::FAILED_DEPENDENCY, GENERATION, e.to_string()),
            InferError::Adapter(ref adapter) => {
                let (status, error_type) = adapter_status(adapter.kind);
                Self::new(status, error_type, e.to_string())
            }
            InferError::Unavailable => Self::new(StatusCode::SERVICE_UNAVAILABLE, UNHEALTHY, e.to_string()),
            InferError::IncompleteGeneration => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, INCOMPLETE_GENERATION, e.to_string())
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    /// Bodies that cannot be read as the expected JSON: 400 (syntax), 413 (too large), 415 (not JSON)
    /// or 422 (wrong shape: missing, unknown or mistyped fields), with serde's explanation.
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let message = match &rejection {
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                format!("invalid request body: {}", rejection_detail(&rejection))
            }
            JsonRejection::MissingJsonContentType(_) => {
                "expected a request with `Content-Type: application/json`".to_string()
            }
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_string(),
            _ => rejection.body_text(),
        };
        Self::new(status, VALIDATION, message)
    }
}

/// The innermost cause of a JSON rejection (serde's message with line and column).
fn rejection_detail(rejection: &JsonRejection) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(rejection);
    let mut detail = rejection.body_text();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    detail
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        closing_if_unread(status, (status, Json(self.body())).into_response())
    }
}

/// `response` with `Connection: close` when it answers a body too large to read (413): the server closes
/// the connection after it, and says so, so that a client does not send its next request on it.
pub fn closing_if_unread(status: StatusCode, mut response: Response) -> Response {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_types() {
        let cases = [
            (InferError::Overloaded, 429, OVERLOADED),
            (InferError::Generation("boom".into()), 424, GENERATION),
            (InferError::Unavailable, 503, UNHEALTHY),
            (InferError::IncompleteGeneration, 500, INCOMPLETE_GENERATION),
        ];
        for (e, status, error_type) in cases {
            let api = ApiError::from(e);
            assert_eq!(api.status.as_u16(), status);
            assert_eq!(api.error_type, error_type);
        }
        let api = ApiError::from(InferError::Generation("CUDA out of memory".into()));
        assert!(api.message.contains("CUDA out of memory"));
    }

    #[test]
    fn adapter_failures() {
        use crate::adapters::{AdapterError, AdapterKey, AdapterSource};
        // Each kind's status and type, and a message that says what went wrong: an invalid adapter was found
        // (and read) but cannot be used; a local one is read, not downloaded.
        let cases = [
            (
                AdapterFailure::NotFound,
                AdapterSource::Hub,
                404,
                ADAPTER_NOT_FOUND,
                "(hub) was not found",
            ),
            (
                AdapterFailure::Forbidden,
                AdapterSource::Hub,
                403,
                ADAPTER_FORBIDDEN,
                "(hub) could not be downloaded",
            ),
            (
                AdapterFailure::Invalid,
                AdapterSource::Local,
                422,
                ADAPTER_INVALID,
                "(local) cannot be used",
            ),
            (
                AdapterFailure::Unavailable,
                AdapterSource::Hub,
                424,
                ADAPTER_UNAVAILABLE,
                "(hub) could not be downloaded",
            ),
            (
                AdapterFailure::Unavailable,
                AdapterSource::Local,
                424,
                ADAPTER_UNAVAILABLE,
                "(local) could not be read",
            ),
        ];
        for (kind, source, status, error_type, says) in cases {
            let api = ApiError::from(InferError::Adapter(AdapterError {
                kind,
                adapter: AdapterKey::new(source, "org/a"),
                stage: "downloaded",
                no_room: false,
                message: "why".into(),
            }));
            assert_eq!((api.status.as_u16(), api.error_type), (status, error_type));
            assert_eq!(api.message, format!("adapter `org/a` {says}: why"));
        }
    }
}
