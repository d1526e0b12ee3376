//! Fault controls for tests: make chosen ConnectionAdapter calls fail or
//! lag, make handler calls fail, stop and restart the ConnectionAdapter
//! service while client sockets stay open, kick a connection, report a
//! message to the hook server twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::adapter::AdapterServer;
use super::conn::ConnCmd;
use super::registry::Lookup;
use super::Shared;
use crate::pb::ResultCode;

/// A ConnectionAdapter method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Send,
    Close,
    Authenticate,
    StartTimer,
    Publish,
    Subscribe,
    Unsubscribe,
    RawPublish,
}

/// What an injected fault does to one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this code and message instead of doing the call.
    Code { code: ResultCode, message: String },
    /// Fail the call with a gRPC status (a transport-level failure).
    Status(tonic::Code),
    /// Do the call after this delay.
    Delay(Duration),
}

/// The fault table, consulted on every call.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    /// Set once anything was injected, so calls skip the locks otherwise.
    armed: AtomicBool,
    adapter: Mutex<HashMap<Method, VecDeque<(Fault, usize)>>>,
    handler_conns: Mutex<HashSet<String>>,
    handler_next: AtomicUsize,
    /// `message.publish` hook calls still to be made twice.
    hook_repeat: AtomicUsize,
}

impl FaultState {
    /// The fault for this call of `method`, if one is pending.
    pub fn take(&self, method: Method) -> Option<Fault> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut table = self.adapter.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = table.get_mut(&method)?;
        let (fault, left) = queue.front_mut()?;
        let fault = fault.clone();
        *left -= 1;
        if *left == 0 {
            queue.pop_front();
        }
        Some(fault)
    }

    /// Whether the next handler call for `conn` must fail.
    pub fn handler_should_fail(&self, conn: &str) -> bool {
        if !self.armed.load(Ordering::Relaxed) {
            return false;
        }
        let taken = self
            .handler_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        taken
            || self
                .handler_conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(conn)
    }

    /// Whether this `message.publish` hook call must go out twice.
    pub fn take_hook_repeat(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
            && self
                .hook_repeat
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Drops per-connection faults of an ended connection.
    pub fn forget(&self, conn: &str) {
        if self.armed.load(Ordering::Relaxed) {
            self.handler_conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(conn);
        }
    }

    fn push(&self, method: Method, fault: Fault, times: usize) {
        if times == 0 {
            return;
        }
        self.armed.store(true, Ordering::Relaxed);
        self.adapter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(method)
            .or_default()
            .push_back((fault, times));
    }

    fn clear(&self) {
        self.adapter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.handler_conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.handler_next.store(0, Ordering::Relaxed);
        self.hook_repeat.store(0, Ordering::Relaxed);
    }
}

/// The test handle on a running gateway's faults. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    pub(crate) shared: Arc<Shared>,
    pub(crate) adapter: Arc<AdapterServer>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Faults {
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
        let state = &self.shared.faults;
        state.armed.store(true, Ordering::Relaxed);
        state
            .handler_conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(conn.to_owned());
    }

    /// The next `times` handler calls, of any connection, fail.
    pub fn fail_next_handler_calls(&self, times: usize) {
        let state = &self.shared.faults;
        state.armed.store(true, Ordering::Relaxed);
        state.handler_next.fetch_add(times, Ordering::Relaxed);
    }

    /// The next `times` messages published through the gateway are
    /// reported to the hook server twice, with the same message id: what a
    /// store shared by several hook servers sees when each hears of the
    /// same message (e.g. two adapters, both listed in every EMQX node's
    /// `exhook.servers`, writing to one PostgreSQL).
    pub fn repeat_publish_hooks(&self, times: usize) {
        let state = &self.shared.faults;
        state.armed.store(true, Ordering::Relaxed);
        state.hook_repeat.fetch_add(times, Ordering::Relaxed);
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
