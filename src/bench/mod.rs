//! `exproto-adapter bench`: measures a handler end to end through the dev
//! gateway, the way EMQX would drive it, and reports messages/s, latency
//! percentiles, handler events/s, and the handler process's CPU and memory.
//!
//! Two modes:
//! - `load` (default): real TCP clients through the dev gateway (in this
//!   process, standing in for EMQX) to a handler in its own process: the
//!   adapter (`serve`), a reference handler (`bench-handler --kind
//!   echo|noop`), or any external one (`--handler-url`, `--handler-pid`).
//!   See `load` for the workloads and `reference` for the references.
//! - `scale`: idle authenticated connections by the thousand, with the tool
//!   playing EMQX over gRPC (see `scale`), for RSS per connection and the
//!   time to establish them.
//!
//! The handler runs in a child process so that `/proc` shows its own CPU
//! and RSS (`proc`). One JSON object per run (`--json`), or a table;
//! `--save` keeps it and `--baseline` prints the ratios to a saved one.

pub mod load;
pub mod proc;
pub mod reference;
pub mod scale;
pub mod stats;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::parse_seconds;
use crate::dev_gateway::{DevGateway, GatewayConfig, GatewayStats, HandlerMode};
use load::{LoadPlan, Workload};
use proc::ProcSample;

pub use reference::HandlerArgs;

/// Which handler to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HandlerKind {
    /// exproto-adapter itself (`serve`), chat workload.
    Adapter,
    /// The echo reference: the chat workload's gRPC calls, no parsing.
    Echo,
    /// The no-op reference: answers every event, calls nothing.
    Noop,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Clients publishing through the gateway: throughput and latency.
    Load,
    /// Idle authenticated connections: memory per connection.
    Scale,
}

/// Flags of `exproto-adapter bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// `load`: throughput and latency; `scale`: idle connections and RSS.
    #[arg(long, value_enum, default_value_t = Mode::Load)]
    pub mode: Mode,

    /// The handler to spawn and measure.
    #[arg(long, value_enum, default_value_t = HandlerKind::Adapter)]
    pub handler: HandlerKind,

    /// Measure an external handler at this URL instead of spawning one
    /// (e.g. http://127.0.0.1:9001); the echo workload unless --workload.
    #[arg(long, value_name = "URL")]
    pub handler_url: Option<String>,

    /// The external handler's process id, to sample its CPU and RSS.
    #[arg(long, value_name = "PID", requires = "handler_url")]
    pub handler_pid: Option<u32>,

    /// What the clients speak; default chat for the adapter, echo otherwise.
    #[arg(long, value_enum)]
    pub workload: Option<Workload>,

    /// Which handler service the gateway calls.
    #[arg(long, value_enum, default_value_t = HandlerMode::Unary)]
    pub service: HandlerMode,

    /// TCP clients (load mode).
    #[arg(long, default_value_t = 128)]
    pub clients: usize,

    /// Clients per topic: every message is delivered to this many clients.
    #[arg(long, default_value_t = 1)]
    pub fanout: usize,

    /// Payload bytes per message (at least the ~20-byte timestamp header).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,

    /// Seconds measured, after the warm-up.
    #[arg(long, default_value = "10", value_parser = parse_seconds, value_name = "SECONDS")]
    pub duration: Duration,

    /// Seconds of traffic before measuring starts.
    #[arg(long, default_value = "2", value_parser = parse_seconds, value_name = "SECONDS")]
    pub warmup: Duration,

    /// Flat out: each client's own messages in flight at most. Keep 1 to
    /// compare handlers: with more, lines merge into shared chunks.
    #[arg(long, default_value_t = 1)]
    pub window: usize,

    /// Total publishes per second, paced across the clients; flat out
    /// (bounded by --window) when absent.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Where the gateway's ConnectionAdapter listens (EMQX's 9100; the
    /// Python example needs 127.0.0.1:9100). Port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub gateway_adapter_listen: SocketAddr,

    /// Where the gateway's client listener binds.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub gateway_listen: SocketAddr,

    /// Scale mode: idle authenticated connections to establish.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,

    /// Scale mode: connections being established at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// Scale mode, stream service: open streams per connection (2-5).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=5))]
    pub streams_per_conn: u8,

    /// Scale mode: once the connections are up, start a second adapter
    /// that takes over from the first (`--upgrade-socket`), and report the
    /// time to hand every session over and the memory of both processes.
    #[arg(long)]
    pub upgrade: bool,

    /// Extra flag for the spawned adapter (repeatable), e.g.
    /// `--adapter-arg=--max-queued-events=16`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub adapter_arg: Vec<String>,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Write this run's JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,

    /// Compare with a JSON saved by --save and print the ratios.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,

    /// The exproto-adapter executable to spawn (default: this one).
    #[arg(long, hide = true)]
    pub handler_exe: Option<PathBuf>,
}

/// One load run's results.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub mode: &'static str,
    /// adapter, echo, noop or external.
    pub handler: String,
    pub service: &'static str,
    pub workload: Workload,
    pub clients: usize,
    pub fanout: usize,
    pub payload_bytes: usize,
    pub window: usize,
    pub rate_target: Option<f64>,
    pub duration_s: f64,
    pub published: u64,
    pub delivered: u64,
    pub errors: u64,
    pub skipped: u64,
    /// Deliveries per second (MSG lines, or echoed payloads) end to end.
    pub messages_per_sec: f64,
    pub publishes_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Handler calls the gateway made per second.
    pub handler_events_per_sec: f64,
    /// ConnectionAdapter calls the handler made per second.
    pub adapter_calls_per_sec: f64,
    /// The handler process (named adapter whichever it is): CPU as a
    /// percentage of one core, CPU per delivered message, RSS at the end.
    pub adapter_cpu_percent: Option<f64>,
    pub adapter_cpu_us_per_msg: Option<f64>,
    pub adapter_rss_bytes: Option<u64>,
    /// RSS growth from before the clients connected, per client.
    pub adapter_rss_per_conn_bytes: Option<f64>,
    /// This process (clients and gateway), percentage of one core.
    pub bench_cpu_percent: f64,
    /// The machine's 1-minute load average before and after the run.
    pub loadavg_before: Option<f64>,
    pub loadavg_after: Option<f64>,
}

/// One scale run's results.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub mode: &'static str,
    pub handler: String,
    pub service: &'static str,
    pub connections: usize,
    pub streams_per_conn: Option<u8>,
    pub establish_s: f64,
    pub connections_per_sec: f64,
    pub adapter_rss_before_bytes: u64,
    pub adapter_rss_bytes: u64,
    pub adapter_rss_per_conn_bytes: f64,
    pub adapter_cpu_s: f64,
    /// With `--upgrade`: the takeover.
    pub upgrade: Option<UpgradeReport>,
    pub loadavg_before: Option<f64>,
    pub loadavg_after: Option<f64>,
}

/// What a takeover of a scale run's sessions cost.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    /// From starting the successor until the old process had sent every
    /// session (its own count, from its log).
    pub handoff_s: f64,
    /// From starting the successor until the old process exited.
    pub old_exit_s: f64,
    /// Session state sent, and per session.
    pub state_bytes: u64,
    pub state_bytes_per_session: f64,
    /// Peak RSS of each process while the takeover ran.
    pub old_rss_peak_bytes: u64,
    pub new_rss_peak_bytes: u64,
    /// The successor's RSS once the old process had gone.
    pub new_rss_after_bytes: u64,
    /// Whether a session answered through the successor afterwards.
    pub served_after: bool,
}

/// A run's results, either kind.
#[derive(Debug, Clone)]
pub enum Report {
    Load(LoadReport),
    Scale(ScaleReport),
}

impl Report {
    /// The JSON object `--json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Report::Load(r) => serde_json::to_value(r),
            Report::Scale(r) => serde_json::to_value(r),
        };
        // Plain structs of numbers and strings always serialise.
        v.unwrap_or(serde_json::Value::Null)
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("n/a".into(), f);
        match self {
            Report::Load(r) => {
                rows.push((
                    "handler",
                    format!("{} ({}, {:?} workload)", r.handler, r.service, r.workload),
                ));
                rows.push((
                    "clients",
                    format!(
                        "{} (fan-out {}, payload {} B, window {})",
                        r.clients, r.fanout, r.payload_bytes, r.window
                    ),
                ));
                if let Some(rate) = r.rate_target {
                    rows.push(("target rate", format!("{rate:.0} publishes/s")));
                }
                rows.push(("measured", format!("{:.1} s", r.duration_s)));
                rows.push(("messages/s", format!("{:.0}", r.messages_per_sec)));
                rows.push(("publishes/s", format!("{:.0}", r.publishes_per_sec)));
                rows.push((
                    "latency ms",
                    format!(
                        "p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                        r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms
                    ),
                ));
                rows.push((
                    "handler events/s",
                    format!("{:.0}", r.handler_events_per_sec),
                ));
                rows.push(("EMQX calls/s", format!("{:.0}", r.adapter_calls_per_sec)));
                rows.push((
                    "handler CPU",
                    opt(r.adapter_cpu_percent, &|v| format!("{v:.0}% of a core")),
                ));
                rows.push((
                    "CPU per message",
                    opt(r.adapter_cpu_us_per_msg, &|v| format!("{v:.1} us")),
                ));
                rows.push((
                    "handler RSS",
                    opt(r.adapter_rss_bytes.map(|b| b as f64), &|v| {
                        format!("{:.1} MiB", v / 1048576.0)
                    }),
                ));
                rows.push((
                    "RSS per client",
                    opt(r.adapter_rss_per_conn_bytes, &|v| format!("{v:.0} B")),
                ));
                rows.push((
                    "bench CPU",
                    format!("{:.0}% of a core (clients + gateway)", r.bench_cpu_percent),
                ));
                rows.push(("errors", format!("{} (skipped {})", r.errors, r.skipped)));
                rows.push((
                    "load average",
                    format!("{:?} -> {:?}", r.loadavg_before, r.loadavg_after),
                ));
            }
            Report::Scale(r) => {
                rows.push(("handler", format!("{} ({})", r.handler, r.service)));
                rows.push(("connections", r.connections.to_string()));
                if let Some(s) = r.streams_per_conn {
                    rows.push(("streams per conn", s.to_string()));
                }
                rows.push((
                    "established in",
                    format!(
                        "{:.2} s ({:.0} conn/s)",
                        r.establish_s, r.connections_per_sec
                    ),
                ));
                rows.push((
                    "handler RSS",
                    format!(
                        "{:.1} MiB (before {:.1} MiB)",
                        r.adapter_rss_bytes as f64 / 1048576.0,
                        r.adapter_rss_before_bytes as f64 / 1048576.0
                    ),
                ));
                rows.push((
                    "RSS per connection",
                    format!("{:.0} B", r.adapter_rss_per_conn_bytes),
                ));
                rows.push(("handler CPU", format!("{:.2} s", r.adapter_cpu_s)));
                if let Some(u) = &r.upgrade {
                    let mib = |b: u64| b as f64 / 1048576.0;
                    rows.push((
                        "takeover",
                        format!(
                            "sessions handed over in {:.3} s, old process gone after {:.3} s",
                            u.handoff_s, u.old_exit_s
                        ),
                    ));
                    rows.push((
                        "handoff state",
                        format!(
                            "{:.1} MiB ({:.0} B per session)",
                            mib(u.state_bytes),
                            u.state_bytes_per_session
                        ),
                    ));
                    rows.push((
                        "takeover RSS",
                        format!(
                            "old peak {:.1} MiB, new peak {:.1} MiB, new after {:.1} MiB",
                            mib(u.old_rss_peak_bytes),
                            mib(u.new_rss_peak_bytes),
                            mib(u.new_rss_after_bytes)
                        ),
                    ));
                    rows.push(("served after", u.served_after.to_string()));
                }
                rows.push((
                    "load average",
                    format!("{:?} -> {:?}", r.loadavg_before, r.loadavg_after),
                ));
            }
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// The ratio of every number in `current` to the same field in `baseline`,
/// in key order; fields missing or zero in the baseline are left out.
pub fn baseline_ratios(
    current: &serde_json::Value,
    baseline: &serde_json::Value,
) -> Vec<(String, f64)> {
    let (Some(cur), Some(base)) = (current.as_object(), baseline.as_object()) else {
        return Vec::new();
    };
    let mut out: Vec<(String, f64)> = cur
        .iter()
        .filter_map(|(k, v)| {
            let now = v.as_f64()?;
            let then = base.get(k)?.as_f64()?;
            (then != 0.0).then(|| (k.clone(), now / then))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Runs `bench` and prints the report as asked.
///
/// # Errors
/// Bad flags, a handler that cannot be started or reached, a failed run.
pub async fn main(args: BenchArgs) -> anyhow::Result<()> {
    let report = run(&args).await?;
    let json = report.to_json();
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.save {
        std::fs::write(path, format!("{json:#}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.baseline {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let base: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let mut lines = format!("ratio to baseline {} (now / then):\n", path.display());
        for (k, r) in baseline_ratios(&json, &base) {
            lines.push_str(&format!("  {k:<28} {r:.3}\n"));
        }
        // Stdout stays one JSON object with --json.
        if args.json {
            eprint!("{lines}");
        } else {
            print!("{lines}");
        }
    }
    Ok(())
}

/// Runs one measurement.
///
/// # Errors
/// Bad flags, a handler that cannot be started or reached, a failed run.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    match args.mode {
        Mode::Load => run_load(args).await.map(Report::Load),
        Mode::Scale => run_scale(args).await.map(Report::Scale),
    }
}

fn service_name(m: HandlerMode) -> &'static str {
    match m {
        HandlerMode::Unary => "unary",
        HandlerMode::Stream => "stream",
    }
}

fn handler_label(args: &BenchArgs) -> String {
    if args.handler_url.is_some() {
        return "external".into();
    }
    match args.handler {
        HandlerKind::Adapter => "adapter",
        HandlerKind::Echo => "echo",
        HandlerKind::Noop => "noop",
    }
    .into()
}

/// The handler process: spawned by us (killed on drop) or external.
struct HandlerProc {
    url: String,
    pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for HandlerProc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl HandlerProc {
    fn sample(&self) -> Option<ProcSample> {
        self.pid.and_then(|p| proc::sample(p).ok())
    }
}

/// A free port on 127.0.0.1 for the child to listen on. Another process
/// could take it before the child binds; then the child fails loudly.
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = StdListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?)
}

/// Starts the handler (or adopts the external one) and waits until it
/// accepts connections.
/// `listen` is where a spawned handler listens (ignored for an external one).
async fn start_handler(
    args: &BenchArgs,
    emqx: SocketAddr,
    listen: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<HandlerProc> {
    let cmd = handler_command(args, emqx, listen, extra)?;
    start_child(cmd, listen).await
}

/// The command that runs the handler `args` name; `None` for an external
/// one (`--handler-url`).
fn handler_command(
    args: &BenchArgs,
    emqx: SocketAddr,
    listen: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<Result<Command, HandlerProc>> {
    if let Some(url) = &args.handler_url {
        return Ok(Err(HandlerProc {
            url: url.clone(),
            pid: args.handler_pid,
            child: None,
        }));
    }
    let exe = match &args.handler_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    let mut cmd = Command::new(&exe);
    let emqx_url = format!("http://{emqx}");
    match args.handler {
        HandlerKind::Adapter => {
            cmd.args([
                "serve",
                "--listen",
                &listen.to_string(),
                "--emqx",
                &emqx_url,
            ]);
            cmd.args(extra);
            cmd.args(&args.adapter_arg);
        }
        HandlerKind::Echo | HandlerKind::Noop => {
            let kind = if args.handler == HandlerKind::Echo {
                "echo"
            } else {
                "noop"
            };
            cmd.args(["bench-handler", "--kind", kind, "--listen"])
                .arg(listen.to_string())
                .args(["--emqx", &emqx_url, "--fanout"])
                .arg(args.fanout.to_string());
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    Ok(Ok(cmd))
}

/// Spawns `cmd` (or adopts the external handler) and waits until it
/// accepts connections on `listen`.
async fn start_child(
    cmd: Result<Command, HandlerProc>,
    listen: SocketAddr,
) -> anyhow::Result<HandlerProc> {
    let mut cmd = match cmd {
        Ok(cmd) => cmd,
        Err(external) => return Ok(external),
    };
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let mut h = HandlerProc {
        url: format!("http://{listen}"),
        pid: Some(child.id()),
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        if let Some(c) = &mut h.child {
            if let Some(status) = c.try_wait()? {
                bail!("the handler exited at start ({status})");
            }
        }
        if Instant::now() >= deadline {
            bail!("the handler did not listen on {listen} within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(h)
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_percent(a: Option<ProcSample>, b: Option<ProcSample>, wall: Duration) -> Option<f64> {
    let (a, b) = (a?, b?);
    Some(b.cpu.saturating_sub(a.cpu).as_secs_f64() / wall.as_secs_f64() * 100.0)
}

/// Readings at both ends of the measured window.
#[derive(Default)]
struct Window {
    handler: [Option<ProcSample>; 2],
    bench: [Option<ProcSample>; 2],
    gateway: [GatewayStats; 2],
    wall: Duration,
}

async fn run_load(args: &BenchArgs) -> anyhow::Result<LoadReport> {
    let workload = args.workload.unwrap_or(match args.handler {
        _ if args.handler_url.is_some() => Workload::Echo,
        HandlerKind::Adapter => Workload::Chat,
        HandlerKind::Echo => Workload::Echo,
        HandlerKind::Noop => Workload::Hop,
    });
    if workload == Workload::Hop {
        return run_hop(args).await;
    }
    if workload == Workload::Echo && args.window > 1 {
        // Lines written back to back merge into one chunk, which the echo
        // handler publishes as one message: fewer calls per line than chat.
        tracing::warn!("echo workload with --window > 1: lines may share a chunk and a Publish; use --window 1 to compare with chat");
    }
    if args.duration.is_zero() {
        bail!("--duration must be more than zero");
    }
    let loadavg_before = loadavg();
    // The gateway must know the handler's URL before it starts, and the
    // handler the gateway's ConnectionAdapter address: the handler's port
    // is chosen first, the handler started after the gateway.
    let listen = free_port()?;
    let handler_listen = match &args.handler_url {
        Some(u) => u.clone(),
        None => format!("http://{listen}"),
    };
    let gw_cfg = GatewayConfig {
        listen: args.gateway_listen,
        adapter_listen: args.gateway_adapter_listen,
        handler: handler_listen.clone(),
        handler_mode: args.service,
        ..GatewayConfig::default()
    };
    let gateway = DevGateway::start(gw_cfg).await?;
    let handler = start_handler(args, gateway.adapter_addr(), listen, &[]).await?;
    let rss_start = handler.sample().map(|s| s.rss_bytes);

    let plan = LoadPlan {
        addr: gateway.client_addr(),
        workload,
        clients: args.clients,
        fanout: args.fanout,
        payload: args.payload,
        window: args.window,
        rate: args.rate,
        warmup: args.warmup,
        duration: args.duration,
    };
    let (win_tx, win_rx) = tokio::sync::oneshot::channel::<(Instant, Instant)>();
    let pid = handler.pid;
    let gw_stats = {
        // The gateway is shared with the sampler through its stats only.
        let gw = &gateway;
        move || gw.stats()
    };
    let sampler = sample_window(win_rx, pid, gw_stats);
    let (outcome, window) = tokio::join!(
        load::run(&plan, move |from, to| {
            let _ = win_tx.send((from, to));
        }),
        sampler
    );
    let mut outcome = outcome?;
    let window = window.context("the run ended before its measured window")?;
    let rss_end = handler.sample().map(|s| s.rss_bytes);
    drop(handler);
    gateway.shutdown().await;

    let events = window.gateway[1].handler_events - window.gateway[0].handler_events;
    Ok(load_report(
        args,
        Shape {
            workload,
            fanout: args.fanout,
            window: args.window,
            rate_target: args.rate,
        },
        Counted {
            published: outcome.published,
            delivered: outcome.delivered,
            errors: outcome.errors,
            skipped: outcome.skipped,
            events,
            latencies_us: &mut outcome.latencies_us,
        },
        &window,
        (rss_start, rss_end),
        loadavg_before,
    ))
}

/// The hop workload: the tool is EMQX, calling the handler directly.
async fn run_hop(args: &BenchArgs) -> anyhow::Result<LoadReport> {
    if args.service != HandlerMode::Unary {
        bail!("the hop workload drives the unary service only");
    }
    let loadavg_before = loadavg();
    let fake = scale::start_fake_gateway(args.gateway_adapter_listen).await?;
    let handler = start_handler(args, fake.addr, free_port()?, &[]).await?;
    let rss_start = handler.sample().map(|s| s.rss_bytes);
    let plan = scale::HopPlan {
        handler_url: handler.url.clone(),
        conns: args.clients,
        payload: args.payload,
        warmup: args.warmup,
        duration: args.duration,
    };
    let (win_tx, win_rx) = tokio::sync::oneshot::channel::<(Instant, Instant)>();
    let pid = handler.pid;
    let counts = fake.counts.clone();
    let sampler = sample_window(win_rx, pid, move || GatewayStats {
        handler_events: 0,
        adapter_calls: counts.calls.load(std::sync::atomic::Ordering::Relaxed),
    });
    let (outcome, window) = tokio::join!(
        scale::hop(&plan, move |from, to| {
            let _ = win_tx.send((from, to));
        }),
        sampler
    );
    let mut outcome = outcome?;
    let window = window.context("the run ended before its measured window")?;
    let rss_end = handler.sample().map(|s| s.rss_bytes);
    drop(handler);
    // Here a "message" is one answered handler call.
    Ok(load_report(
        args,
        Shape {
            workload: Workload::Hop,
            fanout: 1,
            window: 1,
            rate_target: None,
        },
        Counted {
            published: outcome.calls,
            delivered: outcome.calls,
            errors: outcome.errors,
            skipped: 0,
            events: outcome.calls,
            latencies_us: &mut outcome.latencies_us,
        },
        &window,
        (rss_start, rss_end),
        loadavg_before,
    ))
}

/// What a load run was asked to do, as its report states it.
struct Shape {
    workload: Workload,
    fanout: usize,
    window: usize,
    rate_target: Option<f64>,
}

/// What a load run counted.
struct Counted<'a> {
    published: u64,
    delivered: u64,
    errors: u64,
    skipped: u64,
    events: u64,
    latencies_us: &'a mut [u64],
}

/// Samples the handler, this process and the gateway's counters at both
/// ends of the measured window, once the run says where it lies.
async fn sample_window(
    window: tokio::sync::oneshot::Receiver<(Instant, Instant)>,
    pid: Option<u32>,
    gateway: impl Fn() -> GatewayStats,
) -> Option<Window> {
    let (from, to) = window.await.ok()?;
    let mut w = Window::default();
    tokio::time::sleep_until(from).await;
    let t0 = Instant::now();
    for end in 0..2 {
        if end == 1 {
            tokio::time::sleep_until(to).await;
        }
        w.handler[end] = pid.and_then(|p| proc::sample(p).ok());
        w.bench[end] = proc::sample(std::process::id()).ok();
        w.gateway[end] = gateway();
    }
    w.wall = t0.elapsed();
    Some(w)
}

fn load_report(
    args: &BenchArgs,
    shape: Shape,
    counted: Counted<'_>,
    window: &Window,
    (rss_start, rss_end): (Option<u64>, Option<u64>),
    loadavg_before: Option<f64>,
) -> LoadReport {
    let secs = window.wall.as_secs_f64().max(1e-9);
    let p = stats::summarise(counted.latencies_us);
    let handler_cpu = match (window.handler[0], window.handler[1]) {
        (Some(a), Some(b)) => Some(b.cpu.saturating_sub(a.cpu)),
        _ => None,
    };
    let calls = window.gateway[1].adapter_calls - window.gateway[0].adapter_calls;
    LoadReport {
        mode: "load",
        handler: handler_label(args),
        service: service_name(args.service),
        workload: shape.workload,
        clients: args.clients,
        fanout: shape.fanout,
        payload_bytes: args.payload,
        window: shape.window,
        rate_target: shape.rate_target,
        duration_s: secs,
        published: counted.published,
        delivered: counted.delivered,
        errors: counted.errors,
        skipped: counted.skipped,
        messages_per_sec: counted.delivered as f64 / secs,
        publishes_per_sec: counted.published as f64 / secs,
        p50_ms: p.p50,
        p99_ms: p.p99,
        p999_ms: p.p999,
        max_ms: p.max,
        mean_ms: p.mean,
        handler_events_per_sec: counted.events as f64 / secs,
        adapter_calls_per_sec: calls as f64 / secs,
        adapter_cpu_percent: cpu_percent(window.handler[0], window.handler[1], window.wall),
        adapter_cpu_us_per_msg: handler_cpu
            .filter(|_| counted.delivered > 0)
            .map(|c| c.as_secs_f64() * 1e6 / counted.delivered as f64),
        adapter_rss_bytes: rss_end,
        adapter_rss_per_conn_bytes: match (rss_start, rss_end) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / args.clients.max(1) as f64),
            _ => None,
        },
        bench_cpu_percent: cpu_percent(window.bench[0], window.bench[1], window.wall)
            .unwrap_or(0.0),
        loadavg_before,
        loadavg_after: loadavg(),
    }
}

async fn run_scale(args: &BenchArgs) -> anyhow::Result<ScaleReport> {
    if args.handler != HandlerKind::Adapter && args.handler_url.is_none() {
        bail!("scale mode measures a chat handler: --handler adapter or --handler-url");
    }
    if args.upgrade && (args.handler_url.is_some() || args.service != HandlerMode::Unary) {
        bail!("--upgrade takes over a spawned adapter serving the unary service");
    }
    let loadavg_before = loadavg();
    let fake = scale::start_fake_gateway(args.gateway_adapter_listen).await?;
    let socket = std::env::temp_dir().join(format!("exproto-bench-{}.sock", std::process::id()));
    let socket_arg = socket.display().to_string();
    // Nothing may expire while the connections sit idle.
    let mut extra = vec![
        "--keepalive",
        "0",
        "--login-timeout",
        "86400",
        "--idle-probe",
        "86400",
    ];
    if args.upgrade {
        extra.extend(["--upgrade-socket", &socket_arg, "--upgrade-timeout", "600"]);
    }
    let listen = free_port()?;
    let mut cmd = handler_command(args, fake.addr, listen, &extra)?;
    if let Ok(cmd) = &mut cmd {
        if args.upgrade {
            // Its last words say how much state it handed over.
            cmd.env("RUST_LOG", "warn,exproto_adapter::server=info")
                .stderr(Stdio::piped());
        }
    }
    let mut handler = start_child(cmd, listen).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = handler
        .sample()
        .context("scale mode needs the handler's pid (--handler-pid)")?;
    let plan = scale::ScalePlan {
        handler_url: handler.url.clone(),
        mode: args.service,
        connections: args.connections,
        concurrency: args.concurrency,
        streams_per_conn: usize::from(args.streams_per_conn),
        timeout: Duration::from_secs(600),
    };
    let (took, keep) = scale::establish(&plan, &fake.counts).await?;
    // Let the last calls finish and the allocator settle before reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = handler.sample().context("the handler exited")?;
    let upgrade = if args.upgrade {
        let mut next = handler_command(args, fake.addr, listen, &extra)?
            .map_err(|_| anyhow::anyhow!("no command for the successor"))?;
        next.arg("--upgrade-required");
        Some(take_over(&mut handler, next, &fake, args.connections).await?)
    } else {
        None
    };
    let _ = std::fs::remove_file(&socket);
    drop(keep);
    drop(handler);
    let n = args.connections.max(1) as f64;
    Ok(ScaleReport {
        mode: "scale",
        handler: handler_label(args),
        service: service_name(args.service),
        connections: args.connections,
        streams_per_conn: (args.service == HandlerMode::Stream).then_some(args.streams_per_conn),
        establish_s: took.as_secs_f64(),
        connections_per_sec: n / took.as_secs_f64().max(1e-9),
        adapter_rss_before_bytes: before.rss_bytes,
        adapter_rss_bytes: after.rss_bytes,
        adapter_rss_per_conn_bytes: (after.rss_bytes as f64 - before.rss_bytes as f64) / n,
        adapter_cpu_s: after.cpu.saturating_sub(before.cpu).as_secs_f64(),
        upgrade,
        loadavg_before,
        loadavg_after: loadavg(),
    })
}

/// Starts `next` to take over from `old`, samples both processes' memory
/// until `old` exits, then checks that a session answers through `next`,
/// which replaces `old` in `handler`.
async fn take_over(
    handler: &mut HandlerProc,
    mut next: Command,
    fake: &scale::FakeGateway,
    sessions: usize,
) -> anyhow::Result<UpgradeReport> {
    let mut old = handler.child.take().context("the first adapter is gone")?;
    let old_pid = old.id();
    let stderr = old.stderr.take().context("the first adapter's log")?;
    // Its log is read off as it comes, so that it never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let started = Instant::now();
    let child = next.spawn().context("starting the successor")?;
    let new_pid = child.id();
    handler.child = Some(child);
    handler.pid = Some(new_pid);
    let (mut old_peak, mut new_peak) = (0u64, 0u64);
    let deadline = started + Duration::from_secs(600);
    let old_exit = loop {
        if let Ok(s) = proc::sample(old_pid) {
            old_peak = old_peak.max(s.rss_bytes);
        }
        if let Ok(s) = proc::sample(new_pid) {
            new_peak = new_peak.max(s.rss_bytes);
        }
        if let Some(status) = old.try_wait()? {
            if !status.success() {
                bail!("the old adapter failed during the takeover ({status})");
            }
            break started.elapsed();
        }
        if Instant::now() >= deadline {
            let _ = old.kill();
            bail!("the old adapter did not leave within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let text = log.join().unwrap_or_default();
    let field = |name: &str| -> Option<String> {
        let line = text
            .lines()
            .rev()
            .find(|l| l.contains("handed over to the successor"))?;
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        Some(line[at..].split_whitespace().next()?.to_owned())
    };
    let state_bytes: u64 = field("bytes")
        .and_then(|b| b.parse().ok())
        .context("the old adapter did not report the state it handed over")?;
    let handoff_s = field("handed")
        .and_then(|d| humantime::parse_duration(&d.replace("ms", "ms ")).ok())
        .map_or(old_exit.as_secs_f64(), |d| d.as_secs_f64());
    let new_after = proc::sample(new_pid).map(|s| s.rss_bytes).unwrap_or(0);
    let before = fake.counts.calls.load(std::sync::atomic::Ordering::Relaxed);
    let served_after = scale::ping(&handler.url, 0).await.is_ok() && {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if fake.counts.calls.load(std::sync::atomic::Ordering::Relaxed) > before {
                break true;
            }
            if Instant::now() >= until {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    Ok(UpgradeReport {
        handoff_s,
        old_exit_s: old_exit.as_secs_f64(),
        state_bytes,
        state_bytes_per_session: state_bytes as f64 / sessions.max(1) as f64,
        old_rss_peak_bytes: old_peak,
        new_rss_peak_bytes: new_peak,
        new_rss_after_bytes: new_after,
        served_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios_to_a_baseline() {
        let now = json!({"messages_per_sec": 150.0, "p99_ms": 2.0, "handler": "adapter", "x": 1});
        let then = json!({"messages_per_sec": 100.0, "p99_ms": 4.0, "handler": "adapter", "x": 0});
        assert_eq!(
            baseline_ratios(&now, &then),
            vec![("messages_per_sec".into(), 1.5), ("p99_ms".into(), 0.5)]
        );
        assert!(baseline_ratios(&json!(1), &then).is_empty());
    }
}
