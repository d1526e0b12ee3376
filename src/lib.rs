//! exproto-adapter: an EMQX ExProto handler that turns a line protocol spoken
//! over raw TCP into EMQX calls. See the README for the architecture.

pub mod dev_gateway;
pub mod protocol;

/// Code generated from EMQX's `exproto.proto` (package `emqx.exproto.v1`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("emqx.exproto.v1");
}
