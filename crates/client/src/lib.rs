//! A Rust client of the lorax-rs router, over either of its APIs:
//!
//! - [`Client`]: the REST API (`/generate`, `/generate_stream` as server-sent events, `/health`, `/info`,
//!   `/tokenize`), with `reqwest`;
//! - [`GrpcClient`]: the public gRPC API (`lorax.generate.v1.LoraxService`), with `tonic`.
//!
//! Both take the same [`Parameters`] and answer with the same [`GenerateResponse`] and
//! [`StreamResponse`] types, so code can switch transport without changing anything else. Failures are
//! one [`Error`]; a refusal or failure reported by the server is [`Error::Api`], with the server's
//! stable `error_type` (`validation`, `overloaded`, `adapter_not_found`, ...) on both transports.
//!
//! ```no_run
//! # async fn example() -> Result<(), lorax_client::Error> {
//! use futures::StreamExt;
//! use lorax_client::{Client, GrpcClient, Parameters};
//!
//! let parameters = Parameters { max_new_tokens: Some(20), ..Parameters::default() };
//! let rest = Client::new("http://127.0.0.1:3000")?;
//! let answer = rest.generate("What is Deep Learning?", &parameters).await?;
//! println!("{}", answer.generated_text);
//!
//! let mut grpc = GrpcClient::connect("http://127.0.0.1:50051").await?;
//! let mut stream = grpc.generate_stream("What is Deep Learning?", &parameters).await?;
//! while let Some(message) = stream.next().await {
//!     print!("{}", message?.token.text);
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod grpc;
mod rest;
mod sse;
mod types;

pub use error::{ApiError, Error};
pub use grpc::GrpcClient;
/// The generated messages and client of the gRPC API, for what [`GrpcClient`] does not wrap.
pub use lorax_proto::generate::v1 as pb;
pub use rest::Client;
pub use types::{
    AlternativeToken, Details, FinishReason, GenerateResponse, Info, Parameters, PrefillToken, SimpleToken,
    StreamDetails, StreamResponse, Token, TokenStream,
};
