//! Command-line flags of the scenarios, and the bounds the `latency` and `fanout` flags are
//! checked against.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::codec::Codec;
use crate::payload::Payload;
use crate::protocol::Protocol;
use crate::transport::Transport;

/// Most subscriber connections one run opens.
const MAX_SUBSCRIBERS: u64 = 50_000;
/// Highest total publish rate, messages per second.
const MAX_RATE: u64 = 100_000;
const MAX_PUBLISHERS: u64 = 64;
/// Longest warm-up or measured window, seconds.
const MAX_WINDOW_SECS: u64 = 600;
const MAX_DRAIN_SECS: u64 = 60;

#[derive(Parser)]
#[command(
    name = "switchboard-loadtest",
    version,
    about = "Load-test harness for switchboard"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand)]
pub enum Scenario {
    /// Open N connections at a held rate, hold them idle, report handshake latency and the
    /// server's RSS per connection.
    Connect(ConnectArgs),
    /// Publish at a held rate on one node, subscribe on others, report end-to-end delivery
    /// latency, loss, duplicates and (with --redis-url) Redis commands per published message.
    Latency(LatencyArgs),
    /// Spread subscribers over rooms and over every target (each node, or a load balancer),
    /// publish from connections spread the same way, and report end-to-end latency, delivered
    /// messages per second, server CPU per delivery, loss, duplicates and order, against
    /// switchboard or (--protocol) a Socket.IO or raw peer.
    Fanout(FanoutArgs),
    /// Users on different targets messaging each other with `send`: each user sends to a partner
    /// on another target at its share of a held rate; reports delivery latency, loss and
    /// duplicates by per-sender sequence. With --persist the messages go through the receivers'
    /// inboxes and are acknowledged; with --drop-after-secs too, every connection drops at once
    /// mid-run and reconnects (a reconnect storm); loss, duplicates and redeliveries by inbox seq.
    Direct(DirectArgs),
    /// Subscribers over rooms and targets while a publisher runs; every subscriber connection is
    /// dropped at once (after --drop-after-secs, or on SIGUSR1), then each reconnects to the next
    /// target and resubscribes with `since`; reports reconnect times and any message lost.
    Reconnect(ReconnectArgs),
    /// One of `connect --workers`' processes: reads its share from stdin, reports on stdout.
    #[command(hide = true)]
    ConnectWorker,
    /// Read `fanout` results (and `connect` results, for RSS per connection) of switchboard,
    /// Socket.IO and the raw ceiling server and print one table comparing them, with ratios
    /// against the switchboard run of the same subscribers, rooms and rate.
    Compare(CompareArgs),
}

#[derive(Parser)]
pub struct CompareArgs {
    /// JSON files `fanout --json` wrote.
    #[arg(required = true)]
    pub fanout: Vec<PathBuf>,
    /// JSON files `connect --json` wrote; each is matched to the fanout results of its
    /// system: `protocol` (switchboard if it has none), `transport` and `codec`. Repeatable.
    #[arg(long = "connect", num_args = 1..)]
    pub connect: Vec<PathBuf>,
    /// Print a Markdown table instead of aligned text.
    #[arg(long)]
    pub markdown: bool,
    /// Also write one self-contained HTML page (inline SVG, no scripts) with the table and the
    /// systems' charts side by side: deliveries/s, server CPU per delivery, p99 latency, memory
    /// per idle connection and, when measured, WebSocket bytes per delivery.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

#[derive(Parser)]
pub struct ConnectArgs {
    /// WebSocket URL of a target (a node, a peer server or a load balancer); repeat for several.
    /// Connections are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// What the targets speak; each connection completes the protocol's greeting before it
    /// counts as open, and held Socket.IO connections answer the server's pings.
    #[arg(long, value_enum, default_value = "switchboard")]
    pub protocol: Protocol,
    /// How each connection reaches a switchboard node: a WebSocket, or a fallback session over
    /// SSE or long poll, opened at http://HOST:PORT/sse or /poll, derived from the ws:// URL of
    /// /ws as the JS SDK does. A fallback session counts as open once its `welcome` is read.
    #[arg(long, value_enum, default_value_t = Transport::Websocket)]
    pub transport: Transport,
    /// The codec every connection offers (switchboard over WebSocket only): JSON text frames,
    /// `switchboard.v1.msgpack`, or `switchboard.v1.json+deflate`; a connection the node does
    /// not answer with that subprotocol fails its handshake. Subscribe replies are decoded in it.
    #[arg(long, value_enum, default_value_t = Codec::Json)]
    pub codec: Codec,
    /// Connections to open, in total over all workers.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u64,
    /// New connections per second, in total (each worker holds its share with a scheduler).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Seconds to hold the connections once every worker has all of its own open.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// Rooms each switchboard connection subscribes to (connection I to rooms idle-((I + J) mod
    /// 1000), J below N) before it counts as open; 0 holds it without any.
    #[arg(long, default_value_t = 0)]
    pub subscribe: u32,
    /// A server process whose RSS and open sockets to read from /proc before the connections
    /// and at the end of the hold: NAME=PID, or just PID (named `server`); repeatable.
    #[arg(long = "pid", value_parser = parse_server_pid)]
    pub pids: Vec<(String, u32)>,
    /// Worker processes (this binary, re-executed) that open the connections, each its share
    /// from its own source addresses: one process may hold at most its open-files limit.
    #[arg(long, default_value_t = 1)]
    pub workers: u64,
    /// Source addresses per worker: worker W uses 127.0.0.(1 + W × N) onwards, so N × ~28k
    /// connections per worker fit in the ephemeral ports.
    #[arg(long, default_value_t = 8)]
    pub source_addresses: u8,
    /// Handshakes (TCP, WebSocket upgrade and greeting) not done this many seconds after the
    /// start count as failures.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where a scenario writes its result besides stdout.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report (inline CSS and SVG charts) to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

/// `--pid` as NAME=PID, or a bare PID named `server`.
fn parse_server_pid(value: &str) -> Result<(String, u32), String> {
    if value.contains('=') {
        return parse_cpu_pid(value);
    }
    let pid = value.parse().map_err(|_| format!("not a pid: {value}"))?;
    Ok(("server".to_owned(), pid))
}

#[derive(Parser)]
pub struct LatencyArgs {
    /// WebSocket URL of the node the publishers connect to (e.g. ws://127.0.0.1:8081/ws).
    #[arg(long)]
    pub publish_url: String,
    /// WebSocket URL of a node the subscribers connect to; repeat for several nodes (each room's
    /// subscribers are spread over them).
    #[arg(long = "subscribe-url", required = true)]
    pub subscribe_urls: Vec<String>,
    /// Rooms; publishes go to them round-robin.
    #[arg(long, default_value_t = 100)]
    pub rooms: u64,
    /// Subscriber connections per room (each connection subscribes to one room).
    #[arg(long, default_value_t = 5)]
    pub subscribers_per_room: u64,
    /// The cluster's Redis (redis://127.0.0.1:PORT, no password): its INFO commandstats is read
    /// before and after the measured window to report Redis commands per published message.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// With --redis-url: seconds of an idle window (everyone connected and subscribed, nothing
    /// published) before publishing starts, whose Redis commands per second are subtracted to
    /// give the commands publishing itself costs. 0 skips it [default: --duration-secs].
    #[arg(long)]
    pub baseline_secs: Option<u64>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Parser)]
pub struct FanoutArgs {
    /// WebSocket URL of a target (a node, or a load balancer in front of them); repeat for
    /// several. Subscribers and publishers are spread round-robin over them.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Rooms; publishes go to them round-robin.
    #[arg(long, default_value_t = 100)]
    pub rooms: u64,
    /// Subscriber connections in total, a multiple of --rooms: each room gets the same number,
    /// spread over the targets.
    #[arg(long, default_value_t = 500)]
    pub subscribers: u64,
    /// What the targets speak: switchboard, a Socket.IO 4 server (the URL is its Engine.IO one,
    /// ws://HOST:PORT/socket.io/?EIO=4&transport=websocket) or the raw ceiling server
    /// (switchboard-raw-ceiling). Loss and order are checked by room offset on switchboard, by
    /// each publisher's sequence numbers on the others.
    #[arg(long, value_enum, default_value_t = Protocol::Switchboard)]
    pub protocol: Protocol,
    /// How every subscriber and publisher reaches a switchboard node: a WebSocket, or a fallback
    /// session over SSE or long poll (opened at http://HOST:PORT/sse or /poll, derived from the
    /// ws:// URL of /ws as the JS SDK does; client frames by POST). Latency runs from the
    /// publisher's write (queueing its POST) to the subscriber's read of the frame.
    #[arg(long, value_enum, default_value_t = Transport::Websocket)]
    pub transport: Transport,
    #[command(flatten)]
    pub run: RunArgs,
}

impl FanoutArgs {
    /// Refuses flags outside the bounds one run is meant to hold.
    pub fn check(&self) -> Result<()> {
        if self.rooms == 0 || self.subscribers == 0 || self.subscribers > MAX_SUBSCRIBERS {
            bail!(
                "--rooms and --subscribers must be at least 1, --subscribers at most {MAX_SUBSCRIBERS}"
            );
        }
        if !self.subscribers.is_multiple_of(self.rooms) {
            bail!("--subscribers must be a multiple of --rooms");
        }
        check_transport(self.protocol, self.transport)?;
        check_codec(self.protocol, self.transport, self.run.codec)?;
        self.run.check()
    }
}

/// The publishing, timing and output flags `latency` and `fanout` share.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Published messages per second, in total over all publishers (held by a scheduler).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Publisher connections (spread over the targets); a node handles one connection's frames
    /// one after another, so a few connections keep a Redis round trip from capping the rate.
    #[arg(long, default_value_t = 4)]
    pub publishers: u64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Seconds of publishing before the measured window, left out of the figures.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// After the last publish, wait at most this long for outstanding deliveries before counting
    /// what is missing as lost.
    #[arg(long, default_value_t = 5)]
    pub drain_secs: u64,
    /// New subscriber connections per second while setting up.
    #[arg(long, default_value_t = 2_000)]
    pub connect_rate: u64,
    /// Give up unless every subscriber is subscribed within this many seconds.
    #[arg(long, default_value_t = 60)]
    pub setup_timeout_secs: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report (inline CSS and SVG charts) to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// NAME=PID of a server process (a node, a peer, redis-server) whose CPU use over the
    /// measured window to report, from /proc; repeatable. Their sum gives server_cpu_percent and
    /// server CPU seconds per million deliveries. The harness's own is always reported.
    #[arg(long = "cpu-pid", value_parser = parse_cpu_pid)]
    pub cpu_pids: Vec<(String, u32)>,
    /// The codec of every WebSocket (switchboard only): JSON text frames, MessagePack
    /// (`switchboard.v1.msgpack`), or JSON with server frames compressed
    /// (`switchboard.v1.json+deflate`); subscribers decode each frame and check offsets and loss
    /// as for JSON. The report gives the WebSocket bytes received per delivery.
    #[arg(long, value_enum, default_value_t = Codec::Json)]
    pub codec: Codec,
    /// What each publish carries: the bare stamp (~40 bytes), or the stamp in a realistic ~1 KiB
    /// JSON message: market data (an order-book update) or chat (author, timestamps, a body of
    /// English sentences differing per message, mentions, reactions, a link preview).
    #[arg(long, value_enum, default_value_t = Payload::Stamp)]
    pub payload: Payload,
}

impl RunArgs {
    /// Refuses flags outside the bounds one run is meant to hold.
    fn check(&self) -> Result<()> {
        if self.rate == 0 || self.rate > MAX_RATE {
            bail!("--rate must be 1 to {MAX_RATE}");
        }
        if self.publishers == 0 || self.publishers > MAX_PUBLISHERS {
            bail!("--publishers must be 1 to {MAX_PUBLISHERS}");
        }
        if self.duration_secs == 0
            || self.duration_secs > MAX_WINDOW_SECS
            || self.warmup_secs > MAX_WINDOW_SECS
        {
            bail!("--duration-secs must be 1 to {MAX_WINDOW_SECS}, --warmup-secs at most that");
        }
        check_setup(self.drain_secs, self.setup_timeout_secs, self.connect_rate)
    }
}

/// Refuses a drain, set-up timeout or connect rate outside the bounds one run is meant to hold.
fn check_setup(drain_secs: u64, setup_timeout_secs: u64, connect_rate: u64) -> Result<()> {
    if drain_secs > MAX_DRAIN_SECS || setup_timeout_secs > 600 {
        bail!("--drain-secs must be at most {MAX_DRAIN_SECS}, --setup-timeout-secs at most 600");
    }
    if connect_rate == 0 {
        bail!("--connect-rate must be at least 1");
    }
    Ok(())
}

/// Refuses a fallback transport with a peer protocol: only switchboard serves SSE and polls.
pub fn check_transport(protocol: Protocol, transport: Transport) -> Result<()> {
    if transport != Transport::Websocket && protocol != Protocol::Switchboard {
        bail!("--transport sse|poll needs --protocol switchboard");
    }
    Ok(())
}

/// Refuses a codec other than JSON outside switchboard over WebSocket: only switchboard has the
/// binary codecs, and only on its WebSocket.
pub fn check_codec(protocol: Protocol, transport: Transport, codec: Codec) -> Result<()> {
    if codec != Codec::Json
        && (protocol != Protocol::Switchboard || transport != Transport::Websocket)
    {
        bail!(
            "--codec msgpack|json+deflate needs --protocol switchboard over --transport websocket"
        );
    }
    Ok(())
}

fn parse_cpu_pid(value: &str) -> Result<(String, u32), String> {
    let (name, pid) = value
        .split_once('=')
        .ok_or_else(|| "expected NAME=PID".to_owned())?;
    let pid = pid.parse().map_err(|_| format!("not a pid: {pid}"))?;
    Ok((name.to_owned(), pid))
}

impl LatencyArgs {
    /// Refuses flags outside the bounds one run is meant to hold.
    pub fn check(&self) -> Result<()> {
        let subscribers = self.rooms.saturating_mul(self.subscribers_per_room);
        if self.rooms == 0 || self.subscribers_per_room == 0 || subscribers > MAX_SUBSCRIBERS {
            bail!("--rooms × --subscribers-per-room must be 1 to {MAX_SUBSCRIBERS}");
        }
        if self
            .baseline_secs
            .is_some_and(|secs| secs > MAX_WINDOW_SECS)
        {
            bail!("--baseline-secs must be at most {MAX_WINDOW_SECS}");
        }
        self.run.check()
    }
}

#[derive(Parser)]
pub struct DirectArgs {
    /// WebSocket URL of a target (a node); repeat for several. Users are spread round-robin over
    /// them, and each sends to a user on another target.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Users, one session each (named with `?user=`, so the nodes must run with auth off).
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Prefix of the user ids; each run adds its own id and the user's index.
    #[arg(long, default_value = "lt-user")]
    pub user_prefix: String,
    /// `send` frames per second, in total over all users (held by a scheduler).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Send persisted messages (`persist: true`): each lands in the receiver's inbox with a seq,
    /// the receiver acknowledges, and loss, duplicates and redeliveries are counted by seq.
    #[arg(long)]
    pub persist: bool,
    /// With --persist: acknowledge (cumulatively) once this many new messages are in.
    #[arg(long, default_value_t = 10)]
    pub ack_every: u64,
    /// With --persist: acknowledge at most this many milliseconds after the first
    /// unacknowledged message came in.
    #[arg(long, default_value_t = 100)]
    pub ack_interval_ms: u64,
    /// With --persist: this many seconds into sending, every user's connection drops at once
    /// (a reconnect storm) and reconnects to the next target, while the others keep sending.
    #[arg(long)]
    pub drop_after_secs: Option<u64>,
    /// The cluster's Redis (redis://127.0.0.1:PORT, no password): its INFO commandstats is read
    /// when sending starts and after the drain to report Redis commands per message sent.
    #[arg(long)]
    pub redis_url: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Parser)]
pub struct ReconnectArgs {
    /// WebSocket URL of a target (a node); repeat for several. Subscribers are spread
    /// round-robin over them and reconnect to the next one.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Rooms; publishes go to them round-robin.
    #[arg(long, default_value_t = 10)]
    pub rooms: u64,
    /// Subscriber connections in total, spread over the rooms.
    #[arg(long, default_value_t = 100)]
    pub subscribers: u64,
    /// Published messages per second (one publisher on the first target).
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Seconds of publishing before every subscriber is dropped; without it, the drop waits
    /// for SIGUSR1.
    #[arg(long)]
    pub drop_after_secs: Option<u64>,
    /// Seconds of publishing after every subscriber is back.
    #[arg(long, default_value_t = 2)]
    pub after_secs: u64,
    /// Give up on subscribers not back within this many seconds of the drop.
    #[arg(long, default_value_t = 30)]
    pub reconnect_timeout_secs: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The setup, drain and output flags `direct` and `reconnect` share.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// After the last send or publish, wait at most this long for outstanding deliveries.
    #[arg(long, default_value_t = 5)]
    pub drain_secs: u64,
    /// New connections per second while setting up.
    #[arg(long, default_value_t = 2_000)]
    pub connect_rate: u64,
    /// Give up unless every connection is set up within this many seconds.
    #[arg(long, default_value_t = 60)]
    pub setup_timeout_secs: u64,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl CommonArgs {
    /// Refuses flags outside the bounds one run is meant to hold.
    pub fn check(&self) -> Result<()> {
        check_setup(self.drain_secs, self.setup_timeout_secs, self.connect_rate)
    }
}
