//! The adapter's side of EMQX's `ConnectionAdapter`: a small trait the driver
//! calls, with a gRPC implementation ([`GrpcAdapter`]) and room for fakes.
//!
//! A `CodeResponse` other than SUCCESS is an error value here, never a
//! success: callers cannot forget to look at the code.

mod grpc;
mod outage;

pub use grpc::GrpcAdapter;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::protocol::Call;

/// One request to EMQX for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Bytes for the client (`Send`). Empty bytes probe whether the
    /// connection process is still alive.
    Send(Bytes),
    /// Anything a protocol session asks for.
    Call(Call),
}

impl Op {
    /// The RPC's name, for logs and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Op::Send(_) => "Send",
            Op::Call(c) => c.method(),
        }
    }
}

/// Why a call to EMQX did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmqxError {
    /// `CONN_PROCESS_NOT_ALIVE`: the connection is gone for good.
    #[error("connection process is not alive")]
    Gone,
    /// `PERMISSION_DENY`: authentication or authorization refused.
    #[error("permission denied: {0}")]
    Denied(String),
    /// Any other result code (EMQX 5.1 reports most failures as `UNKNOWN`).
    #[error("EMQX answered code {code}: {message}")]
    Rejected { code: i32, message: String },
    /// No answer: connection refused, reset, or the per-call timeout.
    #[error("EMQX unreachable: {0}")]
    Unreachable(String),
}

/// The calls the adapter makes to EMQX.
pub trait ConnectionAdapter: Send + Sync + 'static {
    /// Performs `op` for `conn`.
    ///
    /// # Errors
    /// Every outcome other than SUCCESS, see [`EmqxError`].
    fn call(&self, conn: &str, op: Op) -> BoxFuture<'static, Result<(), EmqxError>>;
}
