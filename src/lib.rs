//! exproto-adapter: an EMQX ExProto handler that turns a line protocol spoken
//! over raw TCP into EMQX calls. See the README for the architecture.
//!
//! Event flow: EMQX -> [`handler`] (gRPC) -> [`session::Driver`] and its
//! [`registry`] -> a [`protocol::Session`] (sans-IO) -> actions -> [`emqx`]
//! client -> EMQX.

pub mod bench;
pub mod codec;
pub mod config;
pub mod config_file;
pub mod dev_gateway;
pub mod emqx;
pub mod exhook;
pub mod handler;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;

/// The encoded descriptors of every vendored .proto file, for gRPC
/// reflection.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Code generated from EMQX's `exproto.proto` (package `emqx.exproto.v1`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("emqx.exproto.v1");
}
