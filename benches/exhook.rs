//! How fast the hook server answers `OnMessagePublish` while its database
//! is stalled: EMQX waits for this answer inside the publisher's own
//! connection process, so it must not depend on the database at all.
//!
//! The store is SQLite in memory behind a wrapper that makes every call
//! hang (`Fault::Stalled`) for the whole run. Measured:
//! - `grpc/stalled`: a tonic client on loopback, as EMQX calls it (the
//!   record is queued);
//! - `grpc/stalled_queue_full`: the same with the queue already full (the
//!   record is dropped and counted);
//! - `grpc/healthy`: the same with a working store, for comparison;
//! - `core/stalled`: the version-independent core called in process,
//!   without gRPC.
//!
//! Run with `cargo bench --bench exhook`; each answer should take well
//! under a millisecond. That nothing the queue accepted is lost once the
//! store returns is shown by `tests/exhook.rs`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use exproto_adapter::exhook::pb::v3;
use exproto_adapter::exhook::{HookConfig, Hooks};
use exproto_adapter::store::{self, Fault, FaultyStore, Retention, StoredMessage};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

struct Setup {
    hooks: Hooks,
    faulty: Arc<FaultyStore>,
    client: v3::hook_provider_client::HookProviderClient<Channel>,
}

fn setup(rt: &Runtime, fault: Fault, queue: usize) -> Setup {
    rt.block_on(async {
        let db = store::open("sqlite::memory:").await.expect("sqlite");
        let faulty = Arc::new(FaultyStore::new(db));
        faulty.set(fault);
        let config = HookConfig {
            queue,
            retention: Retention::default(),
            ..HookConfig::default()
        };
        let mut hooks = Hooks::start(faulty.clone(), &config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = hooks.serve(listener).expect("serve");
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect");
        Setup {
            hooks,
            faulty,
            client: v3::hook_provider_client::HookProviderClient::new(channel),
        }
    })
}

fn request(n: u64) -> v3::MessagePublishRequest {
    v3::MessagePublishRequest {
        message: Some(v3::Message {
            node: "emqx@127.0.0.1".into(),
            id: format!("{n:032X}"),
            qos: 1,
            from: "alice".into(),
            topic: "chat/bench".into(),
            payload: Bytes::from_static(&[b'x'; 64]),
            timestamp: 1_700_000_000_000 + n,
            headers: Default::default(),
        }),
        ..Default::default()
    }
}

fn grpc(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let n = AtomicU64::new(0);
    let mut group = c.benchmark_group("grpc");
    group.measurement_time(Duration::from_secs(5));
    // A queue larger than the run's iterations, so every record is queued
    // (none dropped) while the store hangs.
    for (name, fault, queue) in [
        ("stalled", Fault::Stalled, 4_000_000),
        ("stalled_queue_full", Fault::Stalled, 16),
        ("healthy", Fault::None, 4_000_000),
    ] {
        let s = setup(&rt, fault, queue);
        group.bench_function(name, |b| {
            b.iter(|| {
                let req = request(n.fetch_add(1, Ordering::Relaxed));
                let mut client = s.client.clone();
                let answer = rt
                    .block_on(client.on_message_publish(req))
                    .expect("answered");
                black_box(answer);
            })
        });
        let stats = s.hooks.stats();
        eprintln!(
            "grpc/{name}: queued {} dropped {} stored {}",
            stats.queued, stats.dropped, stats.stored
        );
        if fault == Fault::Stalled && queue > 16 {
            assert_eq!(stats.dropped, 0, "a record was dropped; enlarge the queue");
        }
    }
    group.finish();
}

fn core(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let n = AtomicU64::new(0);
    let payload = Bytes::from_static(&[b'x'; 64]);
    c.bench_function("core/stalled", |b| {
        // Millions of calls a second: each sample gets a fresh hook server
        // whose queue holds exactly its calls, so every record is queued
        // (the path measured) and memory stays bounded.
        b.iter_custom(|iters| {
            let s = setup(
                &rt,
                Fault::Stalled,
                usize::try_from(iters).unwrap_or(usize::MAX),
            );
            let core = s.hooks.core().clone();
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let n = n.fetch_add(1, Ordering::Relaxed);
                black_box(core.message_published(StoredMessage {
                    id: format!("{n:032X}"),
                    topic: "chat/bench".into(),
                    from: "alice".into(),
                    payload: payload.clone(),
                    qos: 1,
                    timestamp_ms: 1_700_000_000_000 + n,
                }));
            }
            let elapsed = start.elapsed();
            let stats = s.hooks.stats();
            assert_eq!(stats.dropped, 0, "a record was dropped");
            // The stalled call fails at once; the writer gives up its
            // records and the next sample starts clean.
            s.faulty.set(Fault::Down);
            drop(core);
            let _ = rt.block_on(s.hooks.shutdown(Duration::ZERO));
            elapsed
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).warm_up_time(Duration::from_secs(1));
    targets = grpc, core
}
criterion_main!(benches);
