//! Generated gRPC code. `shard::v1` is the internal router ↔ shard service (proto/lorax/shard/v1);
//! `generate::v1` is the public API the router serves to clients (proto/lorax/generate/v1).

/// The internal shard service.
pub mod shard {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("lorax.shard.v1");

        impl SamplingParameters {
            /// proto3 cannot tell "unset" from 0: a zero temperature, top_p, typical_p or
            /// repetition_penalty means "off" (1.0), the value the router always sends explicitly.
            #[must_use]
            pub fn normalized(self) -> Self {
                let one_if_zero = |v: f32| if v == 0.0 { 1.0 } else { v };
                Self {
                    temperature: one_if_zero(self.temperature),
                    top_p: one_if_zero(self.top_p),
                    typical_p: one_if_zero(self.typical_p),
                    repetition_penalty: one_if_zero(self.repetition_penalty),
                    ..self
                }
            }

            /// The TGI/LoRAX rule: tokens are drawn when `do_sample` is set or any warper is on.
            pub fn is_sampling(&self) -> bool {
                let p = self.normalized();
                p.do_sample || p.temperature != 1.0 || p.top_k != 0 || p.top_p < 1.0 || p.typical_p < 1.0
            }
        }

        /// Now, in nanoseconds since the Unix epoch (0 if the clock is before it): the clock of
        /// `received_unix_ns` in Prefill/DecodeResponse, which the router compares with its own.
        #[must_use]
        pub fn unix_time_ns() -> u64 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        }
    }
}

/// The public client API (`LoraxService`: Generate, GenerateStream, Tokenize, Health, ListAdapters).
pub mod generate {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("lorax.generate.v1");
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
