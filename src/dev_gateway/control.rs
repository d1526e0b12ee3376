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

    /// The node stops as EMQX's does on `emqx stop`: it unloads the hook
    /// provider (`OnProviderUnloaded`, after the hook calls already made),
    /// then closes every client socket, their disconnects unreported: the
    /// hooks are gone by then. Until [`Faults::start_node`] nothing is
    /// reported to the hook server; the gateway still takes clients.
    pub async fn stop_node(&self) {
        if let Some(hooks) = &self.shared.exhook {
            hooks.unload().await;
        }
        self.close_all().await;
    }

    /// The node dies: every client socket closes and nothing at all is
    /// reported, not even `OnProviderUnloaded`.
    pub async fn crash_node(&self) {
        if let Some(hooks) = &self.shared.exhook {
            hooks.crash().await;
        }
        self.close_all().await;
    }

    /// The node starts again after [`Faults::stop_node`] or
    /// [`Faults::crash_node`]: its uptime starts from zero and it loads
    /// the hook provider, as EMQX does at boot.
    pub async fn start_node(&self) {
        if let Some(hooks) = &self.shared.exhook {
            hooks.load(true).await;
        }
    }

    /// The hook server's settings change (an update through EMQX's
    /// dashboard or REST API): the node unloads the provider and loads it
    /// again at once; its clients stay connected.
    pub async fn reload_hooks(&self) {
        if let Some(hooks) = &self.shared.exhook {
            hooks.unload().await;
            hooks.load(false).await;
        }
    }

    async fn close_all(&self) {
        for conn in self.shared.registry.live() {
            let _ = conn.tx.send(ConnCmd::Kick).await;
        }
    }

    /// Holds the next gateway client list of the REST API stand-in after
    /// it is read and before it is sent: what a client that connects
    /// while EMQX's list is on its way looks like to a reconciliation.
    pub fn hold_next_client_list(&self) -> Arc<super::faults::ListHold> {
        self.shared.faults.hold_next_list()
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
