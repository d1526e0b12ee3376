//! What every connection process, the adapter service and the fault
//! controls share: the settings and the gateway-wide parts, built once at
//! start. It sits below all of them so that none of them needs another to
//! reach the registry, the router or the handler client.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::auth::Access;
use super::broker::{self, Broker};
use super::config::GatewayConfig;
use super::exhook::HookClient;
use super::faults::FaultState;
use super::handler::HandlerClient;
use super::registry::Registry;
use super::router::Router;
use crate::pb;

/// What every connection process and the adapter service share.
pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    pub access: Access,
    pub registry: Registry,
    pub router: Router,
    pub handler: HandlerClient,
    pub faults: Arc<FaultState>,
    /// The ExHook client, when `cfg.exhook` names a hook server.
    pub exhook: Option<HookClient>,
    /// The embedded MQTT broker, unless off or replaced by `cfg.mqtt`.
    pub broker: Option<Broker>,
    /// Cancelled when the gateway stops; everything watches it.
    pub shutdown: CancellationToken,
    /// Calls counted for load tests (`exproto-adapter bench`).
    pub stats: Counters,
}

/// Running totals of the calls between the gateway and its handler.
#[derive(Default)]
pub(crate) struct Counters {
    pub handler_events: AtomicU64,
    pub adapter_calls: AtomicU64,
    /// Connections with a handler call in flight or waiting for the
    /// handler now.
    pub calls_pending: AtomicUsize,
}

impl broker::Gateway for Shared {
    fn access(&self) -> &Access {
        &self.access
    }

    fn node(&self) -> &str {
        &self.cfg.node
    }

    fn exhook(&self) -> Option<&HookClient> {
        self.exhook.as_ref()
    }

    fn route(&self, msg: &pb::Message) {
        // With `cfg.mqtt` there is no embedded broker to route from.
        if let Router::Memory(router) = &self.router {
            router.publish(msg);
        }
    }
}
