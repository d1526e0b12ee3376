//! Connection ids and the table of live connection processes, by conn id and
//! by clientid.
//!
//! A conn id is base64 of 24 bytes: this gateway's 4-byte key, a sequence
//! number, and 12 random bytes. The adapter must treat it as opaque; only
//! this module decodes it. Decoding is what lets the gateway answer like
//! EMQX without remembering every ended connection: EMQX decodes a conn to a
//! process id and answers CONN_PROCESS_NOT_ALIVE when that process is gone,
//! UNKNOWN when the string does not decode at all. Here a string with this
//! gateway's key and an issued sequence number that is not in the table is
//! an ended connection; anything else is undecodable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::mailbox::ConnCmd;

const KEY_LEN: usize = 4;
const ID_LEN: usize = KEY_LEN + 8 + 12;

/// A cheap handle on a live connection process.
#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    pub id: Arc<str>,
    /// Distinguishes this process from a later one with the same clientid.
    pub seq: u64,
    /// The process's mailbox for adapter calls.
    pub tx: mpsc::Sender<ConnCmd>,
}

pub(crate) enum Lookup {
    Live(ConnHandle),
    /// Issued by this gateway, and its process has exited.
    Ended,
    /// Not a conn id this gateway could have issued.
    Undecodable,
}

/// The connection that owns a clientid, and what EMQX's client list says
/// of it.
#[derive(Debug, Clone)]
struct Claim {
    handle: ConnHandle,
    username: String,
    connected_at: std::time::SystemTime,
    /// Cleared when its socket closes (the process may live on a while).
    connected: bool,
}

/// A logged-in client, as EMQX's REST API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    pub clientid: String,
    pub username: String,
    pub connected_at: std::time::SystemTime,
}

#[derive(Debug)]
pub(crate) struct Registry {
    key: [u8; KEY_LEN],
    issued: AtomicU64,
    conns: DashMap<Arc<str>, ConnHandle>,
    clientids: DashMap<String, Claim>,
}

impl Registry {
    pub fn new() -> Self {
        Self {
            key: rand::random(),
            issued: AtomicU64::new(0),
            conns: DashMap::new(),
            clientids: DashMap::new(),
        }
    }

    /// A fresh conn id and its sequence number.
    pub fn issue(&self) -> (Arc<str>, u64) {
        let seq = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let mut raw = [0u8; ID_LEN];
        raw[..KEY_LEN].copy_from_slice(&self.key);
        raw[KEY_LEN..KEY_LEN + 8].copy_from_slice(&seq.to_be_bytes());
        let tail: [u8; 12] = rand::random();
        raw[KEY_LEN + 8..].copy_from_slice(&tail);
        let id = base64::engine::general_purpose::STANDARD.encode(raw);
        (id.into(), seq)
    }

    pub fn insert(&self, handle: ConnHandle) {
        self.conns.insert(handle.id.clone(), handle);
    }

    pub fn remove(&self, id: &str) {
        self.conns.remove(id);
    }

    pub fn lookup(&self, conn: &str) -> Lookup {
        if let Some(h) = self.conns.get(conn) {
            return Lookup::Live(h.clone());
        }
        match self.decode(conn) {
            Some(seq) if seq <= self.issued.load(Ordering::Relaxed) => Lookup::Ended,
            _ => Lookup::Undecodable,
        }
    }

    fn decode(&self, conn: &str) -> Option<u64> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(conn)
            .ok()?;
        if raw.len() != ID_LEN || raw[..KEY_LEN] != self.key {
            return None;
        }
        let seq = u64::from_be_bytes(raw[KEY_LEN..KEY_LEN + 8].try_into().ok()?);
        (seq > 0).then_some(seq)
    }

    /// Makes `handle` the owner of `clientid`; returns the previous owner,
    /// which the caller must discard (EMQX's open_session with clean start).
    pub fn claim_clientid(
        &self,
        clientid: &str,
        username: &str,
        handle: ConnHandle,
    ) -> Option<ConnHandle> {
        let seq = handle.seq;
        let claim = Claim {
            handle,
            username: username.to_owned(),
            connected_at: std::time::SystemTime::now(),
            connected: true,
        };
        self.clientids
            .insert(clientid.to_owned(), claim)
            .map(|old| old.handle)
            .filter(|old| old.seq != seq)
    }

    /// Releases `clientid` if `seq` still owns it.
    pub fn release_clientid(&self, clientid: &str, seq: u64) {
        self.clientids
            .remove_if(clientid, |_, c| c.handle.seq == seq);
    }

    /// `clientid`'s socket closed, if `seq` still owns it: no longer
    /// listed as connected.
    pub fn socket_closed(&self, clientid: &str, seq: u64) {
        if let Some(mut c) = self.clientids.get_mut(clientid) {
            if c.handle.seq == seq {
                c.connected = false;
            }
        }
    }

    /// The logged-in clients whose sockets are open, by clientid.
    pub fn connected_clients(&self) -> Vec<Listed> {
        let mut listed: Vec<Listed> = self
            .clientids
            .iter()
            .filter(|c| c.connected)
            .map(|c| Listed {
                clientid: c.key().clone(),
                username: c.username.clone(),
                connected_at: c.connected_at,
            })
            .collect();
        listed.sort_by(|a, b| a.clientid.cmp(&b.clientid));
        listed
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Every live connection process, at this moment.
    pub fn live(&self) -> Vec<ConnHandle> {
        self.conns.iter().map(|e| e.value().clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_opaque_and_decodable_only_here() {
        let a = Registry::new();
        let b = Registry::new();
        let (id1, s1) = a.issue();
        let (id2, s2) = a.issue();
        assert_ne!(id1, id2);
        assert_eq!((s1, s2), (1, 2));
        assert!(matches!(a.lookup(&id1), Lookup::Ended));
        assert!(matches!(b.lookup(&id1), Lookup::Undecodable));
        assert!(matches!(a.lookup("not base64!"), Lookup::Undecodable));
        assert!(matches!(a.lookup(""), Lookup::Undecodable));
        let (tx, _rx) = mpsc::channel(1);
        a.insert(ConnHandle {
            id: id1.clone(),
            seq: s1,
            tx,
        });
        assert!(matches!(a.lookup(&id1), Lookup::Live(_)));
        a.remove(&id1);
        assert!(matches!(a.lookup(&id1), Lookup::Ended));
    }

    #[test]
    fn clientid_ownership() {
        let r = Registry::new();
        let (tx, _rx) = mpsc::channel(1);
        let h = |seq| ConnHandle {
            id: format!("c{seq}").into(),
            seq,
            tx: tx.clone(),
        };
        assert!(r.claim_clientid("x", "u", h(1)).is_none());
        assert_eq!(r.claim_clientid("x", "u", h(2)).map(|o| o.seq), Some(1));
        r.release_clientid("x", 1);
        assert_eq!(r.claim_clientid("x", "u", h(3)).map(|o| o.seq), Some(2));
        r.release_clientid("x", 3);
        assert!(r.claim_clientid("x", "u", h(4)).is_none());
    }

    #[test]
    fn the_client_list_holds_logged_in_clients_with_open_sockets() {
        let r = Registry::new();
        let (tx, _rx) = mpsc::channel(1);
        let h = |seq| ConnHandle {
            id: format!("c{seq}").into(),
            seq,
            tx: tx.clone(),
        };
        r.claim_clientid("b", "ub", h(1));
        r.claim_clientid("a", "ua", h(2));
        let listed: Vec<(String, String)> = r
            .connected_clients()
            .into_iter()
            .map(|c| (c.clientid, c.username))
            .collect();
        assert_eq!(
            listed,
            [("a".into(), "ua".into()), ("b".into(), "ub".into())]
        );
        // Another connection's close does not unlist the owner.
        r.socket_closed("a", 9);
        r.socket_closed("b", 1);
        let listed: Vec<String> = r
            .connected_clients()
            .into_iter()
            .map(|c| c.clientid)
            .collect();
        assert_eq!(listed, ["a"]);
    }
}
