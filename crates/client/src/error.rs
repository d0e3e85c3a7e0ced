//! The client's one error type. A server's error answer, REST or gRPC, becomes [`ApiError`] with the
//! server's `error_type`; transport and decoding failures keep their own variants.

/// An error answer of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The server's stable kind (`validation`, `overloaded`, `generation`, `adapter_not_found`, ...);
    /// `None` when the answer did not say (not the router's error body, or a gRPC status from tonic
    /// itself).
    pub error_type: Option<String>,
    /// The human-readable message.
    pub message: String,
    /// The HTTP status (REST). `None` for an error event of a stream that had started, which has no
    /// status of its own, and on gRPC.
    pub http_status: Option<u16>,
    /// The gRPC code (gRPC only).
    pub grpc_code: Option<tonic::Code>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(status) = self.http_status {
            write!(f, "HTTP {status} ")?;
        }
        if let Some(code) = self.grpc_code {
            write!(f, "gRPC {code:?} ")?;
        }
        match &self.error_type {
            Some(error_type) => write!(f, "({error_type}): {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused or failed the request.
    #[error("{0}")]
    Api(ApiError),
    /// The REST request could not be sent or its answer read.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The gRPC channel could not be set up.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The answer was not what the API defines.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

impl Error {
    /// The server's `error_type`, when the server refused or failed the request.
    pub fn error_type(&self) -> Option<&str> {
        match self {
            Self::Api(api) => api.error_type.as_deref(),
            _ => None,
        }
    }
}

/// Response metadata key of the router's `error_type` on gRPC errors.
const ERROR_TYPE_METADATA: &str = "x-error-type";

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let error_type = status
            .metadata()
            .get(ERROR_TYPE_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Self::Api(ApiError {
            error_type,
            message: status.message().to_string(),
            http_status: None,
            grpc_code: Some(status.code()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_keep_the_error_type() {
        let mut status = tonic::Status::invalid_argument("`top_k` must be strictly positive");
        status.metadata_mut().insert(
            ERROR_TYPE_METADATA,
            tonic::metadata::MetadataValue::from_static("validation"),
        );
        let error = Error::from(status);
        assert_eq!(error.error_type(), Some("validation"));
        assert_eq!(
            error.to_string(),
            "gRPC InvalidArgument (validation): `top_k` must be strictly positive"
        );
        let bare = Error::from(tonic::Status::unavailable("connection refused"));
        assert_eq!(bare.error_type(), None);
    }
}
