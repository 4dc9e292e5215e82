//! The master–worker gRPC contract (`kiln.proto`), generated at build time. Nothing else lives here.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("kiln.worker.v1");

/// The metadata key that carries a worker's token on every call.
pub const AUTHORIZATION: &str = "authorization";
