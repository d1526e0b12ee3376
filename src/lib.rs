//! exproto-adapter: an EMQX ExProto handler that turns a line protocol spoken
//! over raw TCP into EMQX calls. See the README for the architecture.
//!
//! Event flow: EMQX -> [`handler`] (gRPC) -> [`session::Driver`] and its
//! [`registry`] -> a [`protocol::Session`] (sans-IO) -> actions -> [`emqx`]
//! client -> EMQX.

pub mod bench;
mod clock;
pub mod codec;
pub mod config;
pub mod config_file;
pub mod dev_gateway;
pub mod emqx;
pub mod exhook;
pub mod handler;
pub mod journal;
pub mod redact;
mod reflection;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upgrade;
pub mod web;

/// The sans-IO protocol layer, a crate of its own (`exproto-protocol`) so
/// that protocol authors compile neither tonic nor a database driver.
pub use exproto_protocol as protocol;
/// The protocol authors' test kit (`protocol::testing`), at the top too.
pub use exproto_protocol::testing;

/// HTTP/2 connection window for every gRPC link the crate serves or
/// dials. h2 (0.4.20) sends GOAWAY `ENHANCE_YOUR_CALM "too_many_data_frames"`
/// once the small DATA frames received but not yet read by the application
/// exceed a budget of half the connection window (each frame counted at
/// about 256 bytes). gRPC calls are small frames: with hyper's defaults
/// (1 MiB serving, 5 MiB dialling) a few thousand calls in flight on one
/// connection were enough to lose the whole connection, and every call on
/// it. The window is credit, not memory that is set aside.
pub(crate) const H2_CONNECTION_WINDOW: u32 = 64 << 20;

/// The encoded descriptors of every vendored .proto file, for gRPC
/// reflection.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Code generated from EMQX's `exproto.proto` (package `emqx.exproto.v1`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("emqx.exproto.v1");
}
