//! `switchboard-loadtest`: drives a switchboard deployment over real sockets and reports what it
//! held. Scenario `connect` opens N idle connections at a held rate and reports handshake latency
//! and the server's resident memory per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::TcpSocket;
use tokio::sync::Mutex;
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
            match open(&target, url, source).await {
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

/// Opens one connection from `source` and reads the `welcome`.
async fn open(url: &str, target: SocketAddr, source: Ipv4Addr) -> Result<Socket> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
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
