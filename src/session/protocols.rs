//! Which protocol a connection speaks: the one mapped to the EMQX listener
//! it came through (`ConnInfo.sockname`'s port, `--listener PORT=NAME`),
//! else the default; a saved session, the one that saved it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::protocol::Protocol;

/// The protocols a driver serves.
#[derive(Clone)]
pub struct Protocols {
    default: Arc<dyn Protocol>,
    by_port: HashMap<u16, Arc<dyn Protocol>>,
    by_name: HashMap<&'static str, Arc<dyn Protocol>>,
}

impl std::fmt::Debug for Protocols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ports: Vec<_> = self.by_port.iter().map(|(p, v)| (*p, v.name())).collect();
        ports.sort_unstable();
        f.debug_struct("Protocols")
            .field("default", &self.default.name())
            .field("by_port", &ports)
            .finish()
    }
}

impl From<Arc<dyn Protocol>> for Protocols {
    fn from(p: Arc<dyn Protocol>) -> Self {
        Self::new(p, Vec::new())
    }
}

impl Protocols {
    /// `default` on every listener but those `by_port` names.
    pub fn new(default: Arc<dyn Protocol>, by_port: Vec<(u16, Arc<dyn Protocol>)>) -> Self {
        let mut by_name = HashMap::new();
        by_name.insert(default.name(), default.clone());
        for (_, p) in &by_port {
            by_name.insert(p.name(), p.clone());
        }
        Self {
            default,
            by_port: by_port.into_iter().collect(),
            by_name,
        }
    }

    /// The protocol of a connection that came through `sockname`.
    pub fn for_listener(&self, sockname: Option<SocketAddr>) -> &Arc<dyn Protocol> {
        sockname
            .and_then(|a| self.by_port.get(&a.port()))
            .unwrap_or(&self.default)
    }

    /// The protocol called `name`, when this driver serves it.
    pub fn by_name(&self, name: &str) -> Option<&Arc<dyn Protocol>> {
        self.by_name.get(name)
    }

    /// The protocol of listeners not mapped to another; also what a
    /// connection the driver knows nothing about is answered in.
    pub fn default(&self) -> &Arc<dyn Protocol> {
        &self.default
    }
}
