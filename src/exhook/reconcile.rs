//! Reconciliation: presence checked against EMQX's own client list, for
//! what hooks cannot tell (an outage of this hook server, disconnects EMQX
//! never reported). It runs for a node when the node is first heard from
//! after this hook server started (the end of its outage), when the node
//! loads the provider, and every `every` for every node heard from.
//!
//! One pass over a node: note the time, read the node's connected clients
//! from EMQX's REST API, then remove the node's rows of clients EMQX no
//! longer has (only rows written before the pass began: a connect that
//! came after EMQX was asked is newer than what the pass knows) and add
//! the clients EMQX has and the store lacks (unless their disconnect came
//! during the pass, and never over a row a connect wrote). Work per pass
//! is bounded: at most `max_clients` are read, and a node with more is not
//! pruned (a client beyond the bound is not known to be gone); nor is one
//! whose list took more than one page, since EMQX's paging may skip a
//! client when another leaves meanwhile.
//!
//! Only the nodes that report to this hook server are reconciled: in a
//! cluster whose adapters share one database, each keeps its own node's
//! rows true, and the disconnects that must not be undone are the ones it
//! hears.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::core::HookCore;
use super::emqx_api::EmqxApi;
use crate::store::{now_ms, Presence, Store};

/// How reconciliation runs.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    pub api: EmqxApi,
    /// Every node heard from is reconciled this often.
    pub every: Duration,
    /// Clients read per node and pass at most.
    pub max_clients: usize,
}

pub(crate) struct Reconciler {
    config: ReconcileConfig,
    store: Arc<dyn Store>,
    core: Arc<HookCore>,
    /// Set while passes fail, so that is logged once per episode.
    failing: bool,
}

/// What one pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Changes {
    removed: u64,
    added: u64,
}

impl Reconciler {
    pub(crate) fn start(
        config: ReconcileConfig,
        store: Arc<dyn Store>,
        core: Arc<HookCore>,
    ) -> tokio::task::JoinHandle<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        core.set_reconciler(tx);
        let this = Self {
            config,
            store,
            core,
            failing: false,
        };
        tokio::spawn(this.run(rx))
    }

    async fn run(mut self, mut asked: mpsc::UnboundedReceiver<String>) {
        info!(api = %crate::redact::redact_url(self.config.api.base()), every = ?self.config.every, "presence reconciliation with EMQX's REST API");
        // A cluster of one node names the node this hook server serves
        // before any hook does: its rows are reconciled at once.
        match self.config.api.nodes().await {
            Ok(nodes) if nodes.len() == 1 => self.core.ask_reconcile(&nodes[0]),
            Ok(_) => {}
            Err(e) => {
                self.failing = true;
                warn!(error = %format!("{e:#}"), "EMQX's REST API cannot be read; presence is reconciled once it can");
            }
        }
        let mut tick = tokio::time::interval(self.config.every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let nodes = tokio::select! {
                node = asked.recv() => match node {
                    Some(node) => {
                        // Requests that came together make one pass each.
                        let mut nodes = HashSet::from([node]);
                        while let Ok(more) = asked.try_recv() {
                            nodes.insert(more);
                        }
                        nodes.into_iter().collect::<Vec<_>>()
                    }
                    None => return,
                },
                _ = tick.tick() => self.core.nodes(),
            };
            for node in nodes {
                self.pass(&node).await;
            }
        }
    }

    async fn pass(&mut self, node: &str) {
        self.core.begin_pass(node);
        let result = self.reconcile(node).await;
        self.core.end_pass(node, result.is_ok());
        match result {
            Ok(changes) => {
                crate::telemetry::reconciliation("ok");
                crate::telemetry::presence_repaired("removed", changes.removed);
                crate::telemetry::presence_repaired("added", changes.added);
                if std::mem::replace(&mut self.failing, false) {
                    info!("EMQX's REST API answers again");
                }
                if changes == Changes::default() {
                    debug!(%node, "presence reconciled: nothing to change");
                } else {
                    info!(%node, removed = changes.removed, added = changes.added, "presence reconciled with EMQX");
                }
            }
            Err(e) => {
                crate::telemetry::reconciliation("failed");
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(%node, error = %format!("{e:#}"), "presence not reconciled; next try at the next pass");
                }
            }
        }
    }

    async fn reconcile(&self, node: &str) -> anyhow::Result<Changes> {
        let max = self.config.max_clients.max(1);
        let began_ms = now_ms();
        let listing = self.config.api.connected(node, max).await?;
        self.apply(node, began_ms, &listing).await
    }

    /// Brings `node`'s rows in line with `listing`, which EMQX gave after
    /// `began_ms`.
    async fn apply(
        &self,
        node: &str,
        began_ms: u64,
        listing: &super::emqx_api::Listing,
    ) -> anyhow::Result<Changes> {
        let max = self.config.max_clients.max(1);
        let rows = self.store.presence_of_node(node, max).await?;
        let mut changes = Changes::default();
        let known: HashSet<&str> = rows.iter().map(|p| p.clientid.as_str()).collect();
        if listing.complete {
            for row in &rows {
                if !listing.clients.contains_key(&row.clientid)
                    && self
                        .store
                        .presence_remove_before(&row.clientid, node, began_ms)
                        .await?
                {
                    changes.removed += 1;
                }
            }
        }
        for (clientid, username) in &listing.clients {
            if known.contains(clientid.as_str()) || self.core.gone_during_pass(node, clientid) {
                continue;
            }
            let row = Presence {
                clientid: clientid.clone(),
                username: username.clone(),
                node: node.to_owned(),
                connected_at_ms: began_ms,
            };
            if self.store.presence_insert_absent(row).await? {
                changes.added += 1;
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::exhook::emqx_api::Listing;
    use crate::exhook::HookConfig;
    use crate::protocol::Secret;

    async fn reconciler() -> (Reconciler, Arc<dyn Store>) {
        let store: Arc<dyn Store> = crate::store::open("sqlite::memory:").await.unwrap();
        let hooks = super::super::Hooks::start(store.clone(), &HookConfig::default());
        let config = ReconcileConfig {
            api: EmqxApi::new("http://127.0.0.1:9", "k", &Secret::new("s")).unwrap(),
            every: Duration::from_secs(60),
            max_clients: 100,
        };
        let r = Reconciler {
            config,
            store: store.clone(),
            core: hooks.core().clone(),
            failing: false,
        };
        (r, store)
    }

    fn row(clientid: &str, node: &str, at: u64) -> Presence {
        Presence {
            clientid: clientid.into(),
            username: String::new(),
            node: node.into(),
            connected_at_ms: at,
        }
    }

    fn listing(ids: &[&str], complete: bool) -> Listing {
        Listing {
            clients: ids
                .iter()
                .map(|id| (id.to_string(), format!("u-{id}")))
                .collect::<HashMap<_, _>>(),
            complete,
        }
    }

    async fn ids(store: &dyn Store) -> Vec<String> {
        store.presence_list("", 100).await.unwrap().ids
    }

    #[tokio::test]
    async fn gone_clients_go_and_listed_ones_come_but_newer_connects_stay() {
        let (r, store) = reconciler().await;
        for p in [
            row("gone", "n1", 10),
            row("stays", "n1", 10),
            row("other-node", "n2", 10),
        ] {
            store.presence_upsert(p).await.unwrap();
        }
        // Connected after the pass began (EMQX's list could not have it).
        store
            .presence_upsert(row("racing", "n1", 2_000))
            .await
            .unwrap();
        let changes = r
            .apply("n1", 1_000, &listing(&["stays", "missing"], true))
            .await
            .unwrap();
        assert_eq!(
            changes,
            Changes {
                removed: 1,
                added: 1
            }
        );
        assert_eq!(
            ids(&*store).await,
            ["missing", "other-node", "racing", "stays"]
        );
        let added = store.presence_of_node("n1", 10).await.unwrap();
        let missing = added.iter().find(|p| p.clientid == "missing").unwrap();
        assert_eq!(
            (missing.username.as_str(), missing.connected_at_ms),
            ("u-missing", 1_000)
        );
    }

    #[tokio::test]
    async fn a_disconnect_during_the_pass_is_not_undone_and_a_partial_list_removes_nothing() {
        let (r, store) = reconciler().await;
        store.presence_upsert(row("old", "n1", 10)).await.unwrap();
        r.core.begin_pass("n1");
        // EMQX listed it, then its disconnect came.
        r.core.client_disconnected("left".into(), "n1".into());
        let changes = r
            .apply("n1", 1_000, &listing(&["left"], false))
            .await
            .unwrap();
        r.core.end_pass("n1", true);
        assert_eq!(changes, Changes::default());
        assert_eq!(
            ids(&*store).await,
            ["old"],
            "a partial list proves no one gone"
        );
        assert!(r.core.last_reconciled_ms().is_some());
    }
}
