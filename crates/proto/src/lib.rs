//! Generated gRPC code. `shard::v1` is the internal router ↔ shard service (proto/lorax/shard/v1).

/// The internal shard service.
pub mod shard {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("lorax.shard.v1");
    }
}

/// Connecting to a shard's Unix socket with tonic.
pub mod uds {
    use std::path::PathBuf;

    use hyper_util::rt::TokioIo;
    use tonic::transport::{Channel, Endpoint};

    /// A channel to the gRPC server listening on the Unix socket at `path`.
    ///
    /// # Errors
    /// When the socket cannot be connected to.
    pub async fn connect(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
        let path: PathBuf = path.into();
        // The URI is required by the API but unused: the connector below decides where to go.
        Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
    }
}
