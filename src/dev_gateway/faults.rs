//! The fault table for tests: which ConnectionAdapter calls fail or lag,
//! which handler calls fail, which published messages are reported to the
//! hook server twice. The adapter service, the handler client and the
//! ExHook client consult it on every call; the test handle that fills it
//! is `Faults`, in `control.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
    /// The next gateway client list of the REST API stand-in waits here
    /// after it is made, before it is sent.
    list_hold: Mutex<Option<Arc<ListHold>>>,
}

/// A client list held between being read and being sent, so a test can
/// act in that gap (a client that connects after EMQX's list was read).
#[derive(Debug, Default)]
pub struct ListHold {
    arrived: tokio::sync::Notify,
    released: tokio::sync::Notify,
}

impl ListHold {
    /// Waits until a list has been read and is held.
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// Lets the held list go out.
    pub fn release(&self) {
        self.released.notify_one();
    }
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

    /// Holds the next gateway client list of the REST API stand-in.
    pub fn hold_next_list(&self) -> Arc<ListHold> {
        let hold = Arc::new(ListHold::default());
        *self
            .list_hold
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(hold.clone());
        hold
    }

    /// Called by a list once made: waits while a test holds it.
    pub async fn held_list(&self) {
        let hold = self
            .list_hold
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(hold) = hold {
            hold.arrived.notify_one();
            hold.released.notified().await;
        }
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

    /// The next `times` calls of `method` meet `fault`, after those
    /// already queued for it.
    pub fn push(&self, method: Method, fault: Fault, times: usize) {
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

    /// Every handler call for `conn` from now on fails.
    pub fn fail_handler_calls(&self, conn: &str) {
        self.armed.store(true, Ordering::Relaxed);
        self.handler_conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(conn.to_owned());
    }

    /// The next `times` handler calls, of any connection, fail.
    pub fn fail_next_handler_calls(&self, times: usize) {
        self.armed.store(true, Ordering::Relaxed);
        self.handler_next.fetch_add(times, Ordering::Relaxed);
    }

    /// The next `times` `message.publish` hook calls go out twice.
    pub fn repeat_publish_hooks(&self, times: usize) {
        self.armed.store(true, Ordering::Relaxed);
        self.hook_repeat.fetch_add(times, Ordering::Relaxed);
    }

    pub fn clear(&self) {
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
