//! The test handle on a running gateway: inject faults into the tables the
//! services consult, stop and restart the ConnectionAdapter service while
//! client sockets stay open, kick a connection. It reaches the services
//! from above, so none of them has to know it.

use std::sync::Arc;
use std::time::Duration;

use super::adapter::AdapterServer;
use super::faults::{Fault, Method};
use super::mailbox::ConnCmd;
use super::registry::Lookup;
use super::shared::Shared;
use crate::pb::ResultCode;

/// The test handle on a running gateway's faults. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    shared: Arc<Shared>,
    adapter: Arc<AdapterServer>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Faults {
    pub(crate) fn new(shared: Arc<Shared>, adapter: Arc<AdapterServer>) -> Self {
        Self { shared, adapter }
    }

    /// The next `times` calls of `method` answer `code` (message
    /// "injected fault") without doing anything. Faults queue up per method.
    pub fn fail_next(&self, method: Method, code: ResultCode, times: usize) {
        self.inject(
            method,
            Fault::Code {
                code,
                message: "injected fault".to_owned(),
            },
            times,
        );
    }

    /// The next `times` calls of `method` wait `delay`, then run.
    pub fn delay_next(&self, method: Method, delay: Duration, times: usize) {
        self.inject(method, Fault::Delay(delay), times);
    }

    /// The next `times` calls of `method` meet `fault`.
    pub fn inject(&self, method: Method, fault: Fault, times: usize) {
        self.shared.faults.push(method, fault, times);
    }

    /// Every handler call for `conn` from now on fails, which closes that
    /// connection as EMQX does (`{shutdown,{error,{FUN,...}}}`).
    pub fn fail_handler_calls(&self, conn: &str) {
        self.shared.faults.fail_handler_calls(conn);
    }

    /// The next `times` handler calls, of any connection, fail.
    pub fn fail_next_handler_calls(&self, times: usize) {
        self.shared.faults.fail_next_handler_calls(times);
    }

    /// The next `times` messages published through the gateway are
    /// reported to the hook server twice, with the same message id: what a
    /// store shared by several hook servers sees when each hears of the
    /// same message (e.g. two adapters, both listed in every EMQX node's
    /// `exhook.servers`, writing to one PostgreSQL).
    pub fn repeat_publish_hooks(&self, times: usize) {
        self.shared.faults.repeat_publish_hooks(times);
    }

    /// Removes every pending fault.
    pub fn clear(&self) {
        self.shared.faults.clear();
    }

    /// Stops the ConnectionAdapter gRPC service: the port closes, calls in
    /// progress finish, and new calls fail to connect. Client sockets and
    /// their connection processes stay. Returns once the port is closed.
    pub async fn stop_adapter(&self) {
        self.adapter.stop().await;
    }

    /// Starts the ConnectionAdapter service again on the same address.
    ///
    /// # Errors
    /// The port cannot be bound again.
    pub async fn start_adapter(&self) -> std::io::Result<()> {
        self.adapter.start().await
    }

    /// Whether the ConnectionAdapter service is serving.
    pub async fn adapter_running(&self) -> bool {
        self.adapter.is_running().await
    }

    /// Kicks a connection as EMQX's management API would: its socket
    /// closes and `OnSocketClosed{"{shutdown,kicked}"}` follows. Returns
    /// false when `conn` is not live.
    pub async fn kick(&self, conn: &str) -> bool {
        match self.shared.registry.lookup(conn) {
            Lookup::Live(h) => h.tx.send(ConnCmd::Kick).await.is_ok(),
            Lookup::Ended | Lookup::Undecodable => false,
        }
    }
}
