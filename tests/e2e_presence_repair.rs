//! Presence that repairs itself where EMQX reports no disconnects: a node
//! that stops (it unloads the hook provider, then closes its clients
//! unreported), a node that dies and starts again (it loads the provider
//! with a small uptime), and a settings change (unload and load at once,
//! clients stay). Through the dev gateway, on SQLite and PostgreSQL.

mod e2e_support;
#[path = "support/postgres.rs"]
mod pg;

use std::time::Duration;

use e2e_support::{Client, Stack};

const MEMORY: &str = "sqlite::memory:";
const GRACE: Duration = Duration::from_millis(200);

async fn stack(store: &str) -> Stack {
    Stack::presence_with(store, |h| h.node_stop_grace = GRACE).await
}

/// Three clients, listed.
async fn three_online(s: &Stack) -> [Client; 3] {
    let ann = s.connected("ann").await;
    let ben = s.connected("ben").await;
    let mut cat = s.connected("cat").await;
    cat.ask_until("WHO", &["OK WHO 3 :ann ben cat"]).await;
    [ann, ben, cat]
}

async fn a_stopped_node_takes_its_clients_along(store: &str) {
    let s = stack(store).await;
    let clients = three_online(&s).await;
    s.gateway.faults().stop_node().await;
    drop(clients);
    // A client of the stopped node: the hooks are gone, so it is not
    // reported itself; it sees the others go once the grace is over.
    let mut late = s.connected("late").await;
    late.ask_until("WHO", &["OK WHO 0 :"]).await;
    s.gateway.faults().start_node().await;
    let mut ann = s.connected("ann").await;
    ann.ask_until("WHO", &["OK WHO 1 :ann"]).await;
}

async fn a_node_that_died_forgets_its_clients_when_it_is_back(store: &str) {
    let s = stack(store).await;
    let clients = three_online(&s).await;
    s.gateway.faults().crash_node().await;
    drop(clients);
    // Nothing said it: the rows stay until the node loads the provider
    // again, with an uptime that starts after them.
    let mut late = s.connected("late").await;
    assert_eq!(late.ask("WHO").await, "OK WHO 3 :ann ben cat");
    s.gateway.faults().start_node().await;
    late.ask_until("WHO", &["OK WHO 0 :"]).await;
}

async fn a_settings_change_keeps_everyone(store: &str) {
    let s = stack(store).await;
    let [_ann, _ben, mut cat] = three_online(&s).await;
    s.gateway.faults().reload_hooks().await;
    // Past the grace (nothing to await: the point is that nothing
    // happens), and past a hook that went through after the reload: still
    // everyone.
    tokio::time::sleep(GRACE * 3).await;
    let mut dan = s.connected("dan").await;
    dan.ask_until("WHO", &["OK WHO 4 :ann ben cat dan"]).await;
    assert_eq!(cat.ask("WHO").await, "OK WHO 4 :ann ben cat dan");
}

#[tokio::test]
async fn sqlite_a_stopped_node_takes_its_clients_along() {
    a_stopped_node_takes_its_clients_along(MEMORY).await;
}

#[tokio::test]
async fn sqlite_a_node_that_died_forgets_its_clients_when_it_is_back() {
    a_node_that_died_forgets_its_clients_when_it_is_back(MEMORY).await;
}

#[tokio::test]
async fn sqlite_a_settings_change_keeps_everyone() {
    a_settings_change_keeps_everyone(MEMORY).await;
}

#[tokio::test]
async fn postgres_a_stopped_node_takes_its_clients_along() {
    pg::with_schema("postgres_a_stopped_node", |url| async move {
        a_stopped_node_takes_its_clients_along(&url).await;
    })
    .await;
}

#[tokio::test]
async fn postgres_a_node_that_died_forgets_its_clients_when_it_is_back() {
    pg::with_schema("postgres_a_node_that_died", |url| async move {
        a_node_that_died_forgets_its_clients_when_it_is_back(&url).await;
    })
    .await;
}

#[tokio::test]
async fn postgres_a_settings_change_keeps_everyone() {
    pg::with_schema("postgres_a_settings_change", |url| async move {
        a_settings_change_keeps_everyone(&url).await;
    })
    .await;
}
