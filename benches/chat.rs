//! Micro-benchmarks of the chat protocol's sans-IO layer: framing, parsing,
//! command handling and encoding, with no network.
//!
//! Besides criterion's timings it prints allocations per line, counted by a
//! global allocator wrapper, because "no allocation per line beyond the
//! payload" is a goal of its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use exproto_adapter::protocol::framer::LineFramer;
use exproto_adapter::protocol::{
    by_name, Action, CallResult, ConnMeta, Event, Message, ProtocolConfig, Session, SessionInit,
};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const LINES: usize = 1000;

fn session() -> Box<dyn Session> {
    let config = ProtocolConfig {
        keepalive: Duration::ZERO,
        ..ProtocolConfig::default()
    };
    let chat = by_name("chat", &config).expect("chat is built in");
    let mut s = chat.new_session(SessionInit { random: 1 });
    let mut out = Vec::new();
    s.handle(Event::Created(ConnMeta::default()), &mut out);
    s.handle(
        Event::Bytes(Bytes::from_static(b"CONNECT bench\n")),
        &mut out,
    );
    s.handle(Event::Reply(CallResult::Ok), &mut out);
    s
}

/// Feeds one chunk, answering every call with success, as the driver would.
fn feed(s: &mut dyn Session, event: Event, out: &mut Vec<Action>) -> usize {
    s.handle(event, out);
    let mut bytes = 0;
    loop {
        let mut call = false;
        for a in out.drain(..) {
            match a {
                Action::Send(b) => bytes += b.len(),
                Action::Call(_) => call = true,
                // The benchmarked lines make no query.
                Action::SetDeadline(_) | Action::Query(_) => {}
            }
        }
        if !call {
            return bytes;
        }
        s.handle(Event::Reply(CallResult::Ok), out);
    }
}

fn allocs_per_line(name: &str, mut run: impl FnMut()) {
    run();
    let before = ALLOCS.load(Ordering::Relaxed);
    run();
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "{name}: {:.3} allocations per line",
        n as f64 / LINES as f64
    );
}

fn bench(c: &mut Criterion) {
    let pings = Bytes::from("PING\n".repeat(LINES));
    let pubs = Bytes::from("PUB chat/lobby :hello everyone, this is a message\n".repeat(LINES));
    let mixed = Bytes::from(
        "sub chat/+/room 1\r\nPUB chat/a/room 1 :caf\\xC3\\xA9 \\n esc\\\\aped\nPING\n"
            .repeat(LINES / 3 + 1),
    );
    let msgs: Vec<Message> = (0..LINES)
        .map(|i| Message {
            node: "emqx@127.0.0.1".into(),
            id: format!("{i:032X}"),
            qos: 0,
            from: "alice".into(),
            topic: "chat/lobby".into(),
            payload: Bytes::from_static(b"hello everyone, this is a message"),
            timestamp_ms: 1_700_000_000_000,
        })
        .collect();

    let mut g = c.benchmark_group("chat");
    g.throughput(Throughput::Elements(LINES as u64));

    g.bench_function("framer_lines", |b| {
        let mut f = LineFramer::new(65_536);
        b.iter(|| {
            f.push(pubs.clone());
            let mut n = 0;
            while f.next_frame().is_some() {
                n += 1;
            }
            n
        })
    });

    let mut s = session();
    let mut out = Vec::new();
    g.bench_function("session_ping_lines", |b| {
        b.iter(|| feed(&mut *s, Event::Bytes(pings.clone()), &mut out))
    });
    g.bench_function("session_pub_lines", |b| {
        b.iter(|| feed(&mut *s, Event::Bytes(pubs.clone()), &mut out))
    });
    g.bench_function("session_mixed_lines", |b| {
        b.iter(|| feed(&mut *s, Event::Bytes(mixed.clone()), &mut out))
    });
    g.bench_function("session_msg_lines", |b| {
        b.iter(|| feed(&mut *s, Event::Messages(msgs.clone()), &mut out))
    });
    g.finish();

    let mut g = c.benchmark_group("chat_bytes");
    g.throughput(Throughput::Bytes(pubs.len() as u64));
    g.bench_function("session_pub_bytes", |b| {
        b.iter(|| feed(&mut *s, Event::Bytes(pubs.clone()), &mut out))
    });
    g.finish();

    allocs_per_line("session_ping_lines", || {
        feed(&mut *s, Event::Bytes(pings.clone()), &mut out);
    });
    allocs_per_line("session_pub_lines", || {
        feed(&mut *s, Event::Bytes(pubs.clone()), &mut out);
    });
    // The batch is cloned before counting: that copy is the benchmark's
    // cost, not the session's.
    let batches = [msgs.clone(), msgs.clone()];
    let [warm, counted] = batches;
    feed(&mut *s, Event::Messages(warm), &mut out);
    let before = ALLOCS.load(Ordering::Relaxed);
    feed(&mut *s, Event::Messages(counted), &mut out);
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "session_msg_lines: {:.3} allocations per line",
        n as f64 / LINES as f64
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
