//! Many clients at once: every message reaches every subscriber exactly
//! once, in both handler modes.

mod e2e_support;

use std::collections::HashMap;

use e2e_support::Stack;

async fn everyone_hears_everyone(s: Stack, clients: usize) {
    let mut tasks = Vec::new();
    // Everyone is subscribed before anyone publishes, so each client must
    // hear exactly `clients` messages.
    let (ready_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients + 1));
    for i in 0..clients {
        let addr = s.addr();
        let barrier = barrier.clone();
        let mut go = ready_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut c = e2e_support::Client::connect(addr).await;
            assert_eq!(c.line().await, e2e_support::HELLO);
            assert_eq!(
                c.ask(&format!("CONNECT load{i}")).await,
                format!("OK CONNECT load{i}")
            );
            assert_eq!(c.ask("SUB load/all").await, "OK SUB load/all 0");
            barrier.wait().await;
            let _ = go.recv().await;
            c.send(format!("PUB load/all :from {i}\n")).await;
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut ok = 0;
            while seen.values().sum::<usize>() < clients || ok < 1 {
                let line = c.line().await;
                if line == "OK PUB load/all" {
                    ok += 1;
                } else {
                    let body = line
                        .strip_prefix("MSG load/all ")
                        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
                    *seen.entry(body.to_string()).or_default() += 1;
                }
            }
            assert_eq!(ok, 1);
            assert_eq!(seen.len(), clients, "client {i} missed messages");
            assert!(seen.values().all(|&n| n == 1), "client {i}: duplicates");
            for j in 0..clients {
                assert_eq!(seen.get(&format!("load{j} :from {j}")), Some(&1));
            }
            c.silent_for(std::time::Duration::from_millis(50)).await;
        }));
    }
    barrier.wait().await;
    ready_tx.send(()).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_unary() {
    everyone_hears_everyone(Stack::unary().await, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_stream() {
    everyone_hears_everyone(Stack::stream().await, 200).await;
}
