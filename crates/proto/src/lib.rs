//! Generated gRPC code. `shard::v1` is the internal router ↔ shard service (proto/lorax/shard/v1).

/// The internal shard service.
pub mod shard {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("lorax.shard.v1");
    }
}
