//! `switchboard-loadtest`: drives a switchboard deployment over real sockets and reports what it
//! held. Scenario `connect` opens N idle connections at a held rate and reports handshake latency
//! and the server's resident memory per connection. Scenario `latency` publishes on one node at a
//! held rate, receives on others and reports end-to-end delivery latency, loss, duplicates and the
//! Redis commands each published message cost.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(
    name = "switchboard-loadtest",
    version,
    about = "Load-test harness for switchboard"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N connections at a held rate, hold them idle, report handshake latency and the
    /// server's RSS per connection.
    Connect(ConnectArgs),
    /// Publish at a held rate on one node, subscribe on others, report end-to-end delivery
    /// latency, loss, duplicates and (with --redis-url) Redis commands per published message.
    Latency(LatencyArgs),
}

#[derive(Parser)]
struct ConnectArgs {
    /// WebSocket URL of the node (e.g. ws://127.0.0.1:8080/ws).
    #[arg(long)]
    url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: u64,
    /// New connections per second (held by a scheduler).
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds to hold the connections once all are open.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Pid of the node, to read its RSS from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Source addresses 127.0.0.1 .. 127.0.0.N, so N × ~28k connections fit in ephemeral ports.
    #[arg(long, default_value_t = 8)]
    source_addresses: u8,
    /// Give up on the run after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct ConnectResult {
    connections_requested: u64,
    connections_open: u64,
    failures: u64,
    handshake_ms_p50: f64,
    handshake_ms_p99: f64,
    handshake_ms_max: f64,
    server_rss_before_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    server_rss_per_connection_bytes: Option<f64>,
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kib * 1024)
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Connect(args) => connect(args).await,
        Scenario::Latency(args) => latency(args).await,
    }
}

async fn connect(args: ConnectArgs) -> Result<()> {
    let url = url_addr(&args.url)?;
    let rss_before = args.pid.map(rss_bytes).transpose()?;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let failures = Arc::new(AtomicU64::new(0));
    let (socket_tx, mut socket_rx) = tokio::sync::mpsc::unbounded_channel();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut schedule =
        tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(1) as f64));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for index in 0..args.connections {
        schedule.tick().await;
        if Instant::now() > deadline {
            bail!("timed out while opening connections");
        }
        let source = Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % u64::from(args.source_addresses.max(1))) as u8,
        );
        let target = args.url.clone();
        let histogram = histogram.clone();
        let failures = failures.clone();
        let socket_tx = socket_tx.clone();
        tokio::spawn(async move {
            let begun = Instant::now();
            match open(&target, url, Some(IpAddr::V4(source))).await {
                Ok(socket) => {
                    let micros = begun.elapsed().as_micros() as u64;
                    histogram.lock().await.record(micros.max(1)).ok();
                    let _ = socket_tx.send(socket);
                }
                Err(error) => {
                    if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect failed: {error:#}");
                    }
                }
            }
        });
    }
    drop(socket_tx);
    let mut sockets = Vec::with_capacity(args.connections as usize);
    while let Some(socket) = tokio::time::timeout_at(deadline.into(), socket_rx.recv())
        .await
        .context("timed out waiting for handshakes")?
    {
        sockets.push(socket);
    }
    let open_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} connections open in {open_secs:.1}s; holding {}s",
        sockets.len(),
        args.hold_secs
    );
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_after = args.pid.map(rss_bytes).transpose()?;
    let histogram = histogram.lock().await;
    let open = sockets.len() as u64;
    let result = ConnectResult {
        connections_requested: args.connections,
        connections_open: open,
        failures: failures.load(Ordering::Relaxed),
        handshake_ms_p50: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        handshake_ms_p99: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        handshake_ms_max: histogram.max() as f64 / 1000.0,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_per_connection_bytes: match (rss_before, rss_after) {
            (Some(before), Some(after)) if open > 0 => {
                Some(after.saturating_sub(before) as f64 / open as f64)
            }
            _ => None,
        },
    };
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &text)?;
    }
    drop(sockets);
    Ok(())
}

fn url_addr(url: &str) -> Result<SocketAddr> {
    let request = url.into_client_request()?;
    let host = request.uri().host().context("URL host")?;
    let port = request.uri().port_u16().unwrap_or(80);
    let ip: IpAddr = host.parse().context("the target must be an IP address")?;
    if !ip.is_loopback() {
        bail!("load tests target loopback addresses only");
    }
    Ok(SocketAddr::new(ip, port))
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one connection (from `source`, if given) and reads the `welcome`.
async fn open(url: &str, target: SocketAddr, source: Option<IpAddr>) -> Result<Socket> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(target).await?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut socket, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
        Ok(Some(Ok(_welcome))) => Ok(socket),
        Ok(Some(Err(error))) => Err(error.into()),
        Ok(None) => bail!("closed before welcome"),
        Err(_) => bail!("no welcome in 30s"),
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario `latency`

/// Most subscriber connections one run opens.
const MAX_SUBSCRIBERS: u64 = 50_000;
/// Highest total publish rate, messages per second.
const MAX_RATE: u64 = 100_000;
const MAX_PUBLISHERS: u64 = 64;
/// Longest warm-up or measured window, seconds.
const MAX_WINDOW_SECS: u64 = 600;
const MAX_DRAIN_SECS: u64 = 60;
/// Latencies are recorded in microseconds up to this; longer ones count as this.
const LATENCY_CEILING_US: u64 = 60_000_000;
/// Subscribers record into this many histograms, to keep lock contention and memory small.
const HISTOGRAM_SHARDS: u64 = 16;
/// Bound on each connection's handshake plus subscribe.
const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
struct LatencyArgs {
    /// WebSocket URL of the node the publishers connect to (e.g. ws://127.0.0.1:8081/ws).
    #[arg(long)]
    publish_url: String,
    /// WebSocket URL of a node the subscribers connect to; repeat for several nodes (each room's
    /// subscribers are spread over them).
    #[arg(long = "subscribe-url", required = true)]
    subscribe_urls: Vec<String>,
    /// Rooms; publishes go to them round-robin.
    #[arg(long, default_value_t = 100)]
    rooms: u64,
    /// Subscriber connections per room (each connection subscribes to one room).
    #[arg(long, default_value_t = 5)]
    subscribers_per_room: u64,
    /// Published messages per second, in total over all publishers (held by a scheduler).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Publisher connections; a node handles one connection's frames one after another, so a
    /// few connections keep a Redis round trip from capping the rate.
    #[arg(long, default_value_t = 4)]
    publishers: u64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Seconds of publishing before the measured window, left out of the figures.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// After the last publish, wait at most this long for outstanding deliveries before counting
    /// what is missing as lost.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
    /// New subscriber connections per second while setting up.
    #[arg(long, default_value_t = 2_000)]
    connect_rate: u64,
    /// Give up unless every subscriber is subscribed within this many seconds.
    #[arg(long, default_value_t = 60)]
    setup_timeout_secs: u64,
    /// The cluster's Redis (redis://127.0.0.1:PORT, no password): its INFO commandstats is read
    /// before and after the measured window to report Redis commands per published message.
    #[arg(long)]
    redis_url: Option<String>,
    /// With --redis-url: seconds of an idle window (everyone connected and subscribed, nothing
    /// published) before publishing starts, whose Redis commands per second are subtracted to
    /// give the commands publishing itself costs. 0 skips it [default: --duration-secs].
    #[arg(long)]
    baseline_secs: Option<u64>,
    /// NAME=PID of a process (a node, redis-server) whose CPU use over the measured window to
    /// report, from /proc; repeatable. The harness's own is always reported.
    #[arg(long = "cpu-pid", value_parser = parse_cpu_pid)]
    cpu_pids: Vec<(String, u32)>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_cpu_pid(value: &str) -> Result<(String, u32), String> {
    let (name, pid) = value
        .split_once('=')
        .ok_or_else(|| "expected NAME=PID".to_owned())?;
    let pid = pid.parse().map_err(|_| format!("not a pid: {pid}"))?;
    Ok((name.to_owned(), pid))
}

#[derive(Serialize)]
struct LatencyResult {
    publish_url: String,
    subscribe_urls: Vec<String>,
    rooms: u64,
    subscribers_per_room: u64,
    subscribers: u64,
    publishers: u64,
    rate_target: u64,
    warmup_secs: u64,
    duration_secs: u64,
    /// Publishes sent in the measured window.
    published: u64,
    published_per_sec: f64,
    /// Publishes sent over the whole run (warm-up included).
    published_total: u64,
    publish_errors: u64,
    /// Publishes the node never answered (neither reply nor error) by the end of the drain.
    publish_unanswered: u64,
    /// How late the publishers wrote against their schedule (a generator that cannot keep up
    /// shows here, not in the latency figures).
    schedule_lag_ms_p99: f64,
    schedule_lag_ms_max: f64,
    /// Send (publisher's write) to receipt (subscriber's read), messages sent in the window.
    latency_ms_p50: f64,
    latency_ms_p90: f64,
    latency_ms_p99: f64,
    latency_ms_p999: f64,
    latency_ms_max: f64,
    latency_ms_mean: f64,
    /// Deliveries of messages sent in the window (the latency figures' population).
    delivered: u64,
    /// Deliveries received during the window, per second: what the subscribers actually got.
    /// Below published_per_sec × subscribers_per_room, the cluster (or generator) fell behind.
    delivered_per_sec: f64,
    /// The slowest delivery of the messages sent in each second of the window: flat when the
    /// cluster keeps up, rising when a backlog builds, one-second spikes for stalls.
    latency_ms_max_by_second: Vec<f64>,
    /// Over the whole run: deliveries the acknowledged offsets call for, unique deliveries seen,
    /// and the difference at the end of the drain, split into offsets a subscriber skipped (a
    /// later one arrived: lost for good) and offsets after a subscriber's last one (not arrived
    /// by the end of the drain: late or lost); and messages at or below an offset already seen.
    expected_deliveries_total: u64,
    received_total: u64,
    lost: u64,
    lost_in_gaps: u64,
    undelivered_at_end: u64,
    duplicates: u64,
    epoch_mismatches: u64,
    subscribers_closed_early: u64,
    unexpected_frames: u64,
    /// CPU used over the measured window, percent of one core, per watched process and for
    /// this harness (`loadtest`).
    cpu_percent: BTreeMap<String, f64>,
    /// The whole machine's busy CPU over the window (/proc/stat, including interrupt and softirq
    /// time no process is charged for), percent of one core: the ceiling is 100 × cores.
    machine_cpu_percent: Option<f64>,
    /// CPU of every other process alive at the end of the window: anything else running on the
    /// machine (a build, another test) competes with the measurement.
    other_processes_cpu_percent: f64,
    redis: Option<RedisCost>,
}

#[derive(Serialize)]
struct RedisCost {
    /// Every command Redis executed in the measured window (INFO commandstats: the commands
    /// nodes sent plus those their Lua scripts ran; this harness's INFO left out) per publish.
    commands_per_publish: f64,
    /// Script invocations (EVAL, EVALSHA, FCALL and their _ro forms) per publish.
    script_calls_per_publish: f64,
    /// Delta of INFO stats total_commands_processed per publish (also counts script-internal
    /// commands, and this harness's own INFO calls).
    total_commands_processed_per_publish: f64,
    /// Commands executed in the window, by name, per publish.
    by_command_per_publish: BTreeMap<String, f64>,
    commands: u64,
    /// Commands per second while nothing was published (the nodes' periodic work: liveness,
    /// re-registration of sessions and presence, room position checks), if a baseline was taken.
    background_commands_per_sec: Option<f64>,
    /// commands_per_publish less the background: what publishing itself costs.
    net_commands_per_publish: Option<f64>,
    net_by_command_per_publish: Option<BTreeMap<String, f64>>,
}

/// State shared by the publishers and subscribers of one run.
struct Shared {
    /// The common clock: every timestamp is microseconds since this.
    base: Instant,
    /// Room names, JSON-encoded (quoted), ready to splice into frames.
    rooms: Vec<String>,
    /// Highest offset a publish reply acknowledged, per room.
    room_last: Vec<AtomicU64>,
    window_start_us: AtomicU64,
    window_end_us: AtomicU64,
    histograms: Vec<std::sync::Mutex<Histogram<u64>>>,
    /// Highest latency (µs) per second of the window, by send time.
    max_by_second: Vec<AtomicU64>,
    /// Unique deliveries over the whole run.
    received: AtomicU64,
    seq: AtomicU64,
    answered: AtomicU64,
    publish_errors: AtomicU64,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn us_at(&self, at: tokio::time::Instant) -> u64 {
        at.into_std()
            .saturating_duration_since(self.base)
            .as_micros() as u64
    }

    fn in_window(&self, at_us: u64) -> bool {
        at_us >= self.window_start_us.load(Ordering::Relaxed)
            && at_us < self.window_end_us.load(Ordering::Relaxed)
    }
}

/// The fields of a server frame this harness reads; strings borrow from the frame.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<&'a str>,
    #[serde(default)]
    data: Option<Stamp>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
    #[serde(default)]
    message: Option<String>,
}

/// What a published message carries: its send time (µs on the common clock).
#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

#[derive(Default)]
struct SubscriberStats {
    room: usize,
    start_offset: u64,
    last_offset: u64,
    unique: u64,
    duplicates: u64,
    epoch_mismatches: u64,
    unexpected: u64,
    in_window: u64,
    received_in_window: u64,
    gaps: u64,
    closed_early: bool,
}

struct PublisherStats {
    sent: u64,
    sent_in_window: u64,
    lag: Histogram<u64>,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_CEILING_US, 3).expect("valid histogram bounds")
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn check_latency_args(args: &LatencyArgs) -> Result<()> {
    let subscribers = args.rooms.saturating_mul(args.subscribers_per_room);
    if args.rooms == 0 || args.subscribers_per_room == 0 || subscribers > MAX_SUBSCRIBERS {
        bail!("--rooms × --subscribers-per-room must be 1 to {MAX_SUBSCRIBERS}");
    }
    if args.rate == 0 || args.rate > MAX_RATE {
        bail!("--rate must be 1 to {MAX_RATE}");
    }
    if args.publishers == 0 || args.publishers > MAX_PUBLISHERS {
        bail!("--publishers must be 1 to {MAX_PUBLISHERS}");
    }
    if args.duration_secs == 0
        || args.duration_secs > MAX_WINDOW_SECS
        || args.warmup_secs > MAX_WINDOW_SECS
    {
        bail!("--duration-secs must be 1 to {MAX_WINDOW_SECS}, --warmup-secs at most that");
    }
    if args
        .baseline_secs
        .is_some_and(|secs| secs > MAX_WINDOW_SECS)
    {
        bail!("--baseline-secs must be at most {MAX_WINDOW_SECS}");
    }
    if args.drain_secs > MAX_DRAIN_SECS || args.setup_timeout_secs > 600 {
        bail!("--drain-secs must be at most {MAX_DRAIN_SECS}, --setup-timeout-secs at most 600");
    }
    if args.connect_rate == 0 {
        bail!("--connect-rate must be at least 1");
    }
    Ok(())
}

async fn latency(args: LatencyArgs) -> Result<()> {
    check_latency_args(&args)?;
    let publish_target = url_addr(&args.publish_url)?;
    let subscribe_targets = args
        .subscribe_urls
        .iter()
        .map(|url| Ok((url.clone(), url_addr(url)?)))
        .collect::<Result<Vec<_>>>()?;
    let redis = args.redis_url.as_deref().map(redis_addr).transpose()?;
    let publishers = args.publishers.min(args.rate);
    let subscribers = args.rooms * args.subscribers_per_room;

    // Fresh room names per run, so earlier runs against the same Redis do not matter.
    let run = format!(
        "lt{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let shared = Arc::new(Shared {
        base: Instant::now(),
        rooms: (0..args.rooms)
            .map(|room| serde_json::to_string(&format!("{run}-{room}")))
            .collect::<Result<_, _>>()?,
        room_last: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        window_start_us: AtomicU64::new(u64::MAX),
        window_end_us: AtomicU64::new(u64::MAX),
        histograms: (0..HISTOGRAM_SHARDS)
            .map(|_| std::sync::Mutex::new(latency_histogram()))
            .collect(),
        max_by_second: (0..args.duration_secs).map(|_| AtomicU64::new(0)).collect(),
        received: AtomicU64::new(0),
        seq: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        publish_errors: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Subscribers: subscriber j of room k connects to URL j mod N, so every room spans the nodes.
    let setup_deadline = tokio::time::Instant::now() + Duration::from_secs(args.setup_timeout_secs);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(usize, u64)>>();
    let mut schedule =
        tokio::time::interval(Duration::from_secs_f64(1.0 / args.connect_rate as f64));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut subscriber_tasks = Vec::with_capacity(subscribers as usize);
    for index in 0..subscribers {
        schedule.tick().await;
        if tokio::time::Instant::now() > setup_deadline {
            bail!("timed out while opening subscriber connections");
        }
        let room = (index % args.rooms) as usize;
        let (url, target) = subscribe_targets
            [((index / args.rooms) % subscribe_targets.len() as u64) as usize]
            .clone();
        let shared = shared.clone();
        let ready_tx = ready_tx.clone();
        let stop = stop_rx.clone();
        let shard = (index % HISTOGRAM_SHARDS) as usize;
        subscriber_tasks.push(tokio::spawn(async move {
            let setup = tokio::time::timeout(
                SETUP_STEP_TIMEOUT,
                subscribe_one(&url, target, &shared.rooms[room]),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no subscribe reply in 30s")));
            match setup {
                Ok((socket, start_offset, epoch)) => {
                    let _ = ready_tx.send(Ok((room, start_offset)));
                    let stats = SubscriberStats {
                        room,
                        start_offset,
                        last_offset: start_offset,
                        ..SubscriberStats::default()
                    };
                    Some(receive(socket, stats, epoch, shard, shared, stop).await)
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    None
                }
            }
        }));
    }
    drop(ready_tx);
    let mut subscribe_failures = 0u64;
    for _ in 0..subscribers {
        match tokio::time::timeout_at(setup_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => {
                subscribe_failures += 1;
                if subscribe_failures <= 5 {
                    eprintln!("subscribe failed: {error:#}");
                }
            }
            Ok(None) => break,
            Err(_) => bail!("timed out waiting for subscribe replies"),
        }
    }
    if subscribe_failures > 0 {
        let _ = stop_tx.send(true);
        bail!("{subscribe_failures} of {subscribers} subscribers failed");
    }
    eprintln!(
        "{subscribers} subscribers in {} rooms on {} node(s) after {:.1}s",
        args.rooms,
        subscribe_targets.len(),
        shared.base.elapsed().as_secs_f64()
    );

    // Publishers, each with its own scheduler, phases spread over one period.
    let mut publisher_sockets = Vec::with_capacity(publishers as usize);
    for _ in 0..publishers {
        let socket = tokio::time::timeout(
            SETUP_STEP_TIMEOUT,
            open(&args.publish_url, publish_target, None),
        )
        .await
        .context("publisher connection timed out")??;
        publisher_sockets.push(socket);
    }
    // Idle baseline of the nodes' own Redis traffic.
    let baseline_secs = args.baseline_secs.unwrap_or(args.duration_secs);
    let mut baseline = None;
    if let (Some(addr), true) = (redis, baseline_secs > 0) {
        eprintln!("measuring the idle Redis baseline for {baseline_secs}s");
        let before = redis_snapshot(addr).await?;
        tokio::time::sleep(Duration::from_secs(baseline_secs)).await;
        let after = redis_snapshot(addr).await?;
        baseline = Some((before, after, baseline_secs));
    }

    let period = Duration::from_secs_f64(publishers as f64 / args.rate as f64);
    let start_at = tokio::time::Instant::now() + Duration::from_millis(200);
    let measure_at = start_at + Duration::from_secs(args.warmup_secs);
    let end_at = measure_at + Duration::from_secs(args.duration_secs);
    let drain_deadline = end_at + Duration::from_secs(args.drain_secs);
    shared
        .window_start_us
        .store(shared.us_at(measure_at), Ordering::SeqCst);
    shared
        .window_end_us
        .store(shared.us_at(end_at), Ordering::SeqCst);
    let mut reader_tasks = Vec::with_capacity(publishers as usize);
    let mut writer_tasks = Vec::with_capacity(publishers as usize);
    for (index, socket) in publisher_sockets.into_iter().enumerate() {
        let (sink, stream) = socket.split();
        reader_tasks.push(tokio::spawn(read_replies(
            stream,
            shared.clone(),
            stop_rx.clone(),
        )));
        let first = start_at + period.mul_f64(index as f64 / publishers as f64);
        writer_tasks.push(tokio::spawn(publish(
            sink,
            shared.clone(),
            period,
            first,
            end_at,
            drain_deadline,
        )));
    }
    eprintln!(
        "publishing {} msgs/s from {publishers} connection(s): {}s warm-up, {}s measured",
        args.rate, args.warmup_secs, args.duration_secs
    );

    // CPU and Redis counters around the measured window.
    let mut watched = vec![("loadtest".to_owned(), std::process::id())];
    watched.extend(args.cpu_pids.iter().cloned());
    tokio::time::sleep_until(measure_at).await;
    let cpu_before: Vec<Option<u64>> = watched.iter().map(|(_, pid)| cpu_ticks(*pid)).collect();
    let machine_before = machine_busy_ticks();
    let all_before = all_cpu_ticks();
    let redis_before = match redis {
        Some(addr) => Some(redis_snapshot(addr).await),
        None => None,
    };
    tokio::time::sleep_until(end_at).await;
    let cpu_after: Vec<Option<u64>> = watched.iter().map(|(_, pid)| cpu_ticks(*pid)).collect();
    let machine_after = machine_busy_ticks();
    let all_after = all_cpu_ticks();
    let redis_after = match redis {
        Some(addr) => Some(redis_snapshot(addr).await),
        None => None,
    };
    let percent = |ticks: u64| {
        let secs = ticks as f64 / CLOCK_TICKS_PER_SEC;
        (secs / args.duration_secs as f64 * 1000.0).round() / 10.0
    };
    let mut cpu_percent = BTreeMap::new();
    for (index, (name, _)) in watched.iter().enumerate() {
        if let (Some(before), Some(after)) = (cpu_before[index], cpu_after[index]) {
            cpu_percent.insert(name.clone(), percent(after.saturating_sub(before)));
        }
    }
    let machine_cpu_percent = match (machine_before, machine_after) {
        (Some(before), Some(after)) => Some(percent(after.saturating_sub(before))),
        _ => None,
    };
    let other_processes_cpu_percent = percent(
        all_after
            .iter()
            .filter(|(pid, _)| !watched.iter().any(|(_, watched)| watched == *pid))
            .map(|(pid, after)| after.saturating_sub(all_before.get(pid).copied().unwrap_or(0)))
            .sum(),
    );

    let mut lag = latency_histogram();
    let (mut sent, mut sent_in_window) = (0u64, 0u64);
    for task in writer_tasks {
        let stats = task.await.context("publisher task")??;
        sent += stats.sent;
        sent_in_window += stats.sent_in_window;
        lag.add(&stats.lag).ok();
    }

    // Drain: every publish answered, every acknowledged message delivered, or the deadline.
    let expected_total = || {
        (0..args.rooms)
            .map(|room| shared.room_last[room as usize].load(Ordering::SeqCst))
            .sum::<u64>()
    };
    loop {
        let answered = shared.answered.load(Ordering::SeqCst) >= sent;
        // Rooms are fresh, so every subscriber starts at offset 0 (checked per subscriber below).
        let delivered =
            shared.received.load(Ordering::SeqCst) >= expected_total() * args.subscribers_per_room;
        if (answered && delivered) || tokio::time::Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for task in reader_tasks {
        let _ = task.await;
    }

    let mut totals = SubscriberStats::default();
    let mut expected_deliveries = 0u64;
    let mut closed_early = 0u64;
    let mut undelivered_at_end = 0u64;
    for task in subscriber_tasks {
        let Some(stats) = task.await.context("subscriber task")? else {
            continue;
        };
        let last = shared.room_last[stats.room].load(Ordering::SeqCst);
        expected_deliveries += last.saturating_sub(stats.start_offset);
        undelivered_at_end += last.saturating_sub(stats.last_offset);
        totals.gaps += stats.gaps;
        totals.unique += stats.unique;
        totals.duplicates += stats.duplicates;
        totals.epoch_mismatches += stats.epoch_mismatches;
        totals.unexpected += stats.unexpected;
        totals.in_window += stats.in_window;
        totals.received_in_window += stats.received_in_window;
        closed_early += u64::from(stats.closed_early);
    }
    let mut histogram = latency_histogram();
    for shard in &shared.histograms {
        histogram.add(&*shard.lock().expect("histogram lock")).ok();
    }

    let redis_cost = match (redis_before, redis_after) {
        (Some(Ok(before)), Some(Ok(after))) => Some(redis_cost(
            &before,
            &after,
            sent_in_window,
            args.duration_secs,
            baseline.as_ref(),
        )),
        (Some(Err(error)), _) | (_, Some(Err(error))) => {
            eprintln!("reading Redis INFO failed: {error:#}");
            None
        }
        _ => None,
    };
    let window = args.duration_secs as f64;
    let answered = shared.answered.load(Ordering::SeqCst);
    let result = LatencyResult {
        publish_url: args.publish_url.clone(),
        subscribe_urls: args.subscribe_urls.clone(),
        rooms: args.rooms,
        subscribers_per_room: args.subscribers_per_room,
        subscribers,
        publishers,
        rate_target: args.rate,
        warmup_secs: args.warmup_secs,
        duration_secs: args.duration_secs,
        published: sent_in_window,
        published_per_sec: round3(sent_in_window as f64 / window),
        published_total: sent,
        publish_errors: shared.publish_errors.load(Ordering::SeqCst),
        publish_unanswered: sent.saturating_sub(answered),
        schedule_lag_ms_p99: ms(lag.value_at_quantile(0.99)),
        schedule_lag_ms_max: ms(lag.max()),
        latency_ms_p50: ms(histogram.value_at_quantile(0.5)),
        latency_ms_p90: ms(histogram.value_at_quantile(0.9)),
        latency_ms_p99: ms(histogram.value_at_quantile(0.99)),
        latency_ms_p999: ms(histogram.value_at_quantile(0.999)),
        latency_ms_max: ms(histogram.max()),
        latency_ms_mean: round3(histogram.mean() / 1000.0),
        delivered: totals.in_window,
        delivered_per_sec: round3(totals.received_in_window as f64 / window),
        latency_ms_max_by_second: shared
            .max_by_second
            .iter()
            .map(|max| ms(max.load(Ordering::SeqCst)))
            .collect(),
        expected_deliveries_total: expected_deliveries,
        received_total: totals.unique,
        lost: expected_deliveries.saturating_sub(totals.unique),
        lost_in_gaps: totals.gaps,
        undelivered_at_end,
        duplicates: totals.duplicates,
        epoch_mismatches: totals.epoch_mismatches,
        subscribers_closed_early: closed_early,
        unexpected_frames: totals.unexpected,
        cpu_percent,
        machine_cpu_percent,
        other_processes_cpu_percent,
        redis: redis_cost,
    };
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &text)?;
    }
    Ok(())
}

/// Opens a subscriber connection and subscribes it to `room` (JSON-encoded); returns the socket
/// and the room's position from the reply.
async fn subscribe_one(url: &str, target: SocketAddr, room: &str) -> Result<(Socket, u64, String)> {
    let mut socket = open(url, target, None).await?;
    socket
        .send(Message::text(format!(
            r#"{{"type":"subscribe","room":{room},"id":1}}"#
        )))
        .await?;
    loop {
        let message = match socket.next().await {
            Some(message) => message?,
            None => bail!("closed before the subscribe reply"),
        };
        let Message::Text(text) = &message else {
            continue;
        };
        let incoming: Incoming<'_> = serde_json::from_str(text.as_str())?;
        match (incoming.kind, incoming.id) {
            ("reply", Some(1)) => {
                let offset = incoming.offset.context("subscribe reply without offset")?;
                let epoch = incoming.epoch.context("subscribe reply without epoch")?;
                return Ok((socket, offset, epoch.to_owned()));
            }
            ("error", _) => bail!(
                "subscribe refused: {} {}",
                incoming.code.unwrap_or("?"),
                incoming.message.unwrap_or_default()
            ),
            _ => {}
        }
    }
}

/// Reads a subscriber's messages until told to stop: latency of each, and its offsets checked
/// against the last one seen.
async fn receive(
    mut socket: Socket,
    mut stats: SubscriberStats,
    epoch: String,
    shard: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberStats {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => break,
            next = socket.next() => next,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                stats.closed_early = true;
                break;
            }
            Some(Ok(_)) => continue,
        };
        let received_us = shared.now_us();
        let parsed = serde_json::from_str::<Incoming<'_>>(text.as_str());
        let (offset, stamp, message_epoch) = match parsed {
            Ok(Incoming {
                kind: "message",
                offset: Some(offset),
                data: Some(stamp),
                epoch,
                ..
            }) => (offset, stamp, epoch),
            _ => {
                stats.unexpected += 1;
                continue;
            }
        };
        if message_epoch != Some(epoch.as_str()) {
            stats.epoch_mismatches += 1;
        }
        if offset <= stats.last_offset {
            stats.duplicates += 1;
            continue;
        }
        stats.gaps += offset - stats.last_offset - 1;
        stats.last_offset = offset;
        stats.unique += 1;
        shared.received.fetch_add(1, Ordering::Relaxed);
        if shared.in_window(received_us) {
            stats.received_in_window += 1;
        }
        if shared.in_window(stamp.t) {
            stats.in_window += 1;
            let micros = received_us.saturating_sub(stamp.t).max(1);
            shared.histograms[shard]
                .lock()
                .expect("histogram lock")
                .saturating_record(micros);
            let second = (stamp.t - shared.window_start_us.load(Ordering::Relaxed)) / 1_000_000;
            if let Some(max) = shared.max_by_second.get(second as usize) {
                max.fetch_max(micros, Ordering::Relaxed);
            }
        }
    }
    let _ = socket.close(None).await;
    stats
}

type PublishSink = futures_util::stream::SplitSink<Socket, Message>;
type ReplyStream = futures_util::stream::SplitStream<Socket>;

/// Writes `publish` frames on a fixed schedule from `first` until `end`; each carries its write
/// time on the common clock and its sequence number (also its request id).
async fn publish(
    mut sink: PublishSink,
    shared: Arc<Shared>,
    period: Duration,
    first: tokio::time::Instant,
    end: tokio::time::Instant,
    give_up: tokio::time::Instant,
) -> Result<PublisherStats> {
    let mut stats = PublisherStats {
        sent: 0,
        sent_in_window: 0,
        lag: latency_histogram(),
    };
    let mut schedule = tokio::time::interval_at(first, period);
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let rooms = shared.rooms.len() as u64;
    loop {
        let scheduled = schedule.tick().await;
        if scheduled >= end {
            break;
        }
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        let room = &shared.rooms[(seq % rooms) as usize];
        let sent_us = shared.now_us();
        stats
            .lag
            .saturating_record(sent_us.saturating_sub(shared.us_at(scheduled)).max(1));
        let frame = format!(
            r#"{{"type":"publish","room":{room},"data":{{"t":{sent_us},"s":{seq}}},"id":{}}}"#,
            seq + 1
        );
        tokio::time::timeout_at(give_up, sink.send(Message::text(frame)))
            .await
            .context("publisher stalled: the node stopped reading")??;
        stats.sent += 1;
        if shared.in_window(sent_us) {
            stats.sent_in_window += 1;
        }
    }
    Ok(stats)
}

/// Reads a publisher's replies: the offset each publish got, or its error.
async fn read_replies(
    mut stream: ReplyStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let rooms = shared.rooms.len() as u64;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => break,
            next = stream.next() => next,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                eprintln!("publisher connection failed: {error}");
                break;
            }
            None => {
                eprintln!("publisher connection closed by the node");
                break;
            }
        };
        let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(text.as_str()) else {
            continue;
        };
        match (incoming.kind, incoming.id) {
            ("reply", Some(id)) if id > 0 => {
                if let Some(offset) = incoming.offset {
                    let room = ((id - 1) % rooms) as usize;
                    shared.room_last[room].fetch_max(offset, Ordering::SeqCst);
                }
                shared.answered.fetch_add(1, Ordering::SeqCst);
            }
            ("error", id) => {
                if shared.publish_errors.fetch_add(1, Ordering::SeqCst) < 5 {
                    eprintln!(
                        "publish error: {} {}",
                        incoming.code.unwrap_or("?"),
                        incoming.message.unwrap_or_default()
                    );
                }
                if id.is_some() {
                    shared.answered.fetch_add(1, Ordering::SeqCst);
                }
            }
            _ => {}
        }
    }
}

/// The address of a `redis://HOST:PORT` URL; loopback only, no credentials.
fn redis_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("redis://")
        .context("--redis-url must look like redis://127.0.0.1:6379")?;
    if rest.contains('@') {
        bail!("--redis-url with credentials is not supported");
    }
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = match authority.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => SocketAddr::new(
            authority
                .parse::<IpAddr>()
                .context("the Redis host must be an IP address")?,
            6379,
        ),
    };
    if !addr.ip().is_loopback() {
        bail!("load tests target loopback addresses only");
    }
    Ok(addr)
}

/// Redis's command counters at one moment.
struct RedisSnapshot {
    /// `calls` per command, from INFO commandstats.
    calls: BTreeMap<String, u64>,
    /// total_commands_processed, from INFO stats.
    total_commands_processed: u64,
}

async fn redis_snapshot(addr: SocketAddr) -> Result<RedisSnapshot> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = BufReader::new(TcpStream::connect(addr).await?);
        let commandstats = redis_info(&mut stream, "commandstats").await?;
        let stats = redis_info(&mut stream, "stats").await?;
        let calls = commandstats
            .lines()
            .filter_map(|line| {
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect();
        let total_commands_processed = stats
            .lines()
            .find_map(|line| line.strip_prefix("total_commands_processed:"))
            .context("no total_commands_processed in INFO stats")?
            .trim()
            .parse()?;
        Ok(RedisSnapshot {
            calls,
            total_commands_processed,
        })
    })
    .await
    .context("Redis INFO timed out")?
}

/// Sends `INFO <section>` (RESP) and returns the bulk-string answer.
async fn redis_info(stream: &mut BufReader<TcpStream>, section: &str) -> Result<String> {
    let request = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut header = String::new();
    stream.read_line(&mut header).await?;
    let Some(length) = header.strip_prefix('$') else {
        bail!("Redis answered {:?}", header.trim_end());
    };
    let length: usize = length.trim_end().parse()?;
    if length > 1 << 20 {
        bail!("INFO answer of {length} bytes");
    }
    let mut body = vec![0; length + 2];
    stream.read_exact(&mut body).await?;
    body.truncate(length);
    Ok(String::from_utf8(body)?)
}

/// Calls per command between two snapshots, this harness's INFO left out.
fn command_deltas(before: &RedisSnapshot, after: &RedisSnapshot) -> BTreeMap<String, u64> {
    after
        .calls
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, &calls)| {
            let delta = calls.saturating_sub(before.calls.get(name).copied().unwrap_or(0));
            (name.clone(), delta)
        })
        .filter(|(_, delta)| *delta > 0)
        .collect()
}

fn redis_cost(
    before: &RedisSnapshot,
    after: &RedisSnapshot,
    published: u64,
    window_secs: u64,
    baseline: Option<&(RedisSnapshot, RedisSnapshot, u64)>,
) -> RedisCost {
    let published = published.max(1) as f64;
    let measured = command_deltas(before, after);
    let commands: u64 = measured.values().sum();
    let script_calls: u64 = measured
        .iter()
        .filter(|(name, _)| {
            matches!(
                name.as_str(),
                "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
            )
        })
        .map(|(_, delta)| delta)
        .sum();
    let by_command = measured
        .iter()
        .map(|(name, &delta)| (name.clone(), round3(delta as f64 / published)))
        .collect();
    // The background scaled to the measured window, subtracted command by command.
    let net = baseline.map(|(idle_before, idle_after, idle_secs)| {
        let idle = command_deltas(idle_before, idle_after);
        let scale = window_secs as f64 / *idle_secs as f64;
        let background_per_sec = idle.values().sum::<u64>() as f64 / *idle_secs as f64;
        let mut net_by_command = BTreeMap::new();
        let mut net_total = 0.0;
        for (name, &delta) in &measured {
            let background = idle.get(name).copied().unwrap_or(0) as f64 * scale;
            let net = (delta as f64 - background).max(0.0) / published;
            net_total += net;
            if net >= 0.0005 {
                net_by_command.insert(name.clone(), round3(net));
            }
        }
        (
            round3(background_per_sec),
            round3(net_total),
            net_by_command,
        )
    });
    RedisCost {
        commands_per_publish: round3(commands as f64 / published),
        script_calls_per_publish: round3(script_calls as f64 / published),
        total_commands_processed_per_publish: round3(
            after
                .total_commands_processed
                .saturating_sub(before.total_commands_processed) as f64
                / published,
        ),
        by_command_per_publish: by_command,
        commands,
        background_commands_per_sec: net.as_ref().map(|net| net.0),
        net_commands_per_publish: net.as_ref().map(|net| net.1),
        net_by_command_per_publish: net.map(|net| net.2),
    }
}

/// Linux's USER_HZ, the unit of utime and stime in /proc/PID/stat (100 on every mainstream
/// architecture).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Busy CPU time of the whole machine (every state but idle and iowait), in clock ticks.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy = |index: usize| ticks.get(index).copied().unwrap_or(0);
    Some(busy(0) + busy(1) + busy(2) + busy(5) + busy(6) + busy(7))
}

/// CPU time of every process on the machine, by pid.
fn all_cpu_ticks() -> std::collections::HashMap<u32, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            Some((pid, cpu_ticks(pid)?))
        })
        .collect()
}

/// CPU time (user + system, all threads) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}
