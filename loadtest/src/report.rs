//! What the scenarios report: their results, printed as JSON and optionally written to a file.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::codec::Codec;
use crate::payload::Payload;
use crate::protocol::Protocol;
use crate::transport::Transport;

/// Prints `result` as pretty JSON and, given a path, writes the same text there.
pub fn emit(result: &impl Serialize, json: Option<&Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(result)?;
    println!("{text}");
    if let Some(path) = json {
        std::fs::write(path, &text)?;
    }
    Ok(())
}

/// Microseconds as milliseconds.
pub fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Rounded to three decimals.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Scenario `connect`: connections opened by one or more worker processes, held, and what the
/// servers' memory did.
#[derive(Serialize)]
pub struct ConnectResult {
    pub protocol: crate::protocol::Protocol,
    /// `websocket`, `sse` or `poll` (`--transport`).
    pub transport: Transport,
    /// `json`, `msgpack` or `json+deflate` (`--codec`).
    pub codec: Codec,
    pub urls: Vec<String>,
    pub connections_requested: u64,
    pub rate_target: u64,
    pub hold_secs: u64,
    pub worker_processes: u64,
    /// Handshakes (TCP, WebSocket upgrade, greeting) that completed.
    pub connections_open: u64,
    /// Open connections per target, in the order of `urls`.
    pub connections_open_per_url: Vec<u64>,
    /// Handshakes that failed or were not done by --timeout-secs.
    pub failures: u64,
    /// Open connections the server closed (or that broke) before every worker was open, and
    /// during the hold.
    pub dropped_before_hold: u64,
    pub dropped_during_hold: u64,
    /// Connections still open at the end of the hold.
    pub connections_held: u64,
    /// Seconds from the start until every worker had finished its handshakes.
    pub open_secs: f64,
    pub handshake_ms_p50: f64,
    pub handshake_ms_p90: f64,
    pub handshake_ms_p99: f64,
    pub handshake_ms_p999: f64,
    pub handshake_ms_max: f64,
    pub handshake_ms_mean: f64,
    pub per_worker: Vec<WorkerFigures>,
    /// Every --pid process: RSS and open sockets before the first connection and at the end of
    /// the hold.
    pub servers: Vec<ServerFigures>,
    /// Sums over the --pid processes, and their RSS growth per connection held.
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_after_bytes: Option<u64>,
    pub server_rss_per_connection_bytes: Option<f64>,
    /// The handshake distribution as (percentile, milliseconds) points, for the HTML report.
    #[serde(skip)]
    pub handshake_percentiles: Vec<(f64, f64)>,
    /// Connections open over the run as (seconds since the start, open), for the HTML report.
    #[serde(skip)]
    pub open_over_time: Vec<(f64, f64)>,
}

/// What one `connect` worker process opened.
#[derive(Serialize)]
pub struct WorkerFigures {
    pub pid: u32,
    /// Its source addresses, first to last.
    pub sources: String,
    pub requested: u64,
    pub open: u64,
    pub failures: u64,
    pub dropped_before_hold: u64,
    pub dropped_during_hold: u64,
    pub open_secs: f64,
    pub handshake_ms_p50: f64,
    pub handshake_ms_p99: f64,
    pub handshake_ms_max: f64,
}

/// One watched server process.
#[derive(Serialize)]
pub struct ServerFigures {
    pub name: String,
    pub pid: u32,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// Established connections on the tested URLs' ports: the growth is the connections this
    /// process holds.
    pub sockets_before: u64,
    pub sockets_after: u64,
    /// RSS growth over socket growth.
    pub rss_per_connection_bytes: Option<f64>,
}

#[derive(Serialize)]
pub struct LatencyResult {
    pub publish_url: String,
    pub subscribe_urls: Vec<String>,
    pub rooms: u64,
    pub subscribers_per_room: u64,
    pub subscribers: u64,
    pub publishers: u64,
    pub rate_target: u64,
    pub warmup_secs: u64,
    pub duration_secs: u64,
    #[serde(flatten)]
    pub figures: DeliveryFigures,
}

/// Scenario `fanout`: every target takes subscribers (and publishers), the figures as `latency`.
#[derive(Serialize)]
pub struct FanoutResult {
    /// What the targets speak: `switchboard`, `socketio` or `raw` (`--protocol`).
    pub protocol: Protocol,
    /// `websocket`, `sse` or `poll` (`--transport`).
    pub transport: Transport,
    /// `json`, `msgpack` or `json+deflate` (`--codec`).
    pub codec: Codec,
    /// `stamp`, `market` or `chat` (`--payload`).
    pub payload: Payload,
    pub urls: Vec<String>,
    pub rooms: u64,
    pub subscribers: u64,
    pub subscribers_per_room: u64,
    /// Subscribers connected to each target, in the order of `urls`.
    pub subscribers_per_url: Vec<u64>,
    pub publishers: u64,
    pub rate_target: u64,
    pub warmup_secs: u64,
    pub duration_secs: u64,
    #[serde(flatten)]
    pub figures: DeliveryFigures,
}

/// What a publish/subscribe run measured: the figures `latency` and `fanout` share.
#[derive(Serialize, Default)]
pub struct DeliveryFigures {
    /// Publishes sent in the measured window.
    pub published: u64,
    pub published_per_sec: f64,
    /// Publishes sent over the whole run (warm-up included).
    pub published_total: u64,
    pub publish_errors: u64,
    /// Publishes the node never answered (neither reply nor error) by the end of the drain;
    /// null for the peers, which do not answer publishes.
    pub publish_unanswered: Option<u64>,
    /// Publisher connections that failed (closed, broken) or stalled (the server stopped
    /// reading until the end of the drain) before the end of their schedule; each ended its
    /// schedule there, so the run published less than its rate.
    pub publishers_failed: u64,
    /// How late the publishers wrote against their schedule (a generator that cannot keep up
    /// shows here, not in the latency figures).
    pub schedule_lag_ms_p99: f64,
    pub schedule_lag_ms_max: f64,
    /// Send (publisher's write) to receipt (subscriber's read), messages sent in the window.
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    pub latency_ms_mean: f64,
    /// Deliveries of messages sent in the window (the latency figures' population).
    pub delivered: u64,
    /// Deliveries received during the window, per second: what the subscribers actually got.
    /// Below published_per_sec × subscribers_per_room, the cluster (or generator) fell behind.
    pub delivered_per_sec: f64,
    /// The slowest delivery of the messages sent in each second of the window: flat when the
    /// cluster keeps up, rising when a backlog builds, one-second spikes for stalls.
    pub latency_ms_max_by_second: Vec<f64>,
    /// The median and 99th percentile latency of the messages sent in each second of the window.
    pub latency_ms_p50_by_second: Vec<f64>,
    pub latency_ms_p99_by_second: Vec<f64>,
    /// Unique deliveries received in each second of the window.
    pub delivered_by_second: Vec<u64>,
    /// Subscriber connections open at the start of each second of the window.
    pub connections_by_second: Vec<u64>,
    /// The latency distribution as (percentile, milliseconds) points, for the HTML report.
    #[serde(skip)]
    pub latency_percentiles: Vec<(f64, f64)>,
    /// Over the whole run: deliveries the acknowledged offsets call for, unique deliveries seen,
    /// and the difference at the end of the drain, split into offsets a subscriber skipped (a
    /// later one arrived: lost for good) and offsets after a subscriber's last one (not arrived
    /// by the end of the drain: late or lost); and messages at or below an offset already seen.
    /// Against the peers (`socketio`, `raw`), which give no offsets and acknowledge nothing, the
    /// same by each publisher's sequence numbers per room: expected is every message written
    /// to a room's publishers' connections × the room's subscribers, a skipped sequence number
    /// is lost in a gap, one at or below the last seen from that publisher is a duplicate (or
    /// out of order), and epoch_mismatches is 0.
    pub expected_deliveries_total: u64,
    pub received_total: u64,
    pub lost: u64,
    pub lost_in_gaps: u64,
    pub undelivered_at_end: u64,
    pub duplicates: u64,
    pub epoch_mismatches: u64,
    pub subscribers_closed_early: u64,
    pub unexpected_frames: u64,
    /// CPU used over the measured window, percent of one core, per watched process and for
    /// this harness (`loadtest`).
    pub cpu_percent: BTreeMap<String, f64>,
    /// WebSocket bytes the subscribers received per delivery in the window: each delivered
    /// frame's payload plus its frame header (2, 4 or 10 bytes by payload length, computed as
    /// for one unfragmented frame: tungstenite joins fragments, so a fragmented frame's extra
    /// headers are not counted), not TCP/IP. Null over a fallback transport.
    pub wire_bytes_per_delivery: Option<f64>,
    /// The JSON those deliveries decoded to, bytes per delivery (the codec's input).
    pub json_bytes_per_delivery: Option<f64>,
    /// The whole machine's busy CPU over the window (/proc/stat, including interrupt and softirq
    /// time no process is charged for), percent of one core: the ceiling is 100 × cores.
    pub machine_cpu_percent: Option<f64>,
    /// CPU of every other process alive at the end of the window: anything else running on the
    /// machine (a build, another test) competes with the measurement.
    pub other_processes_cpu_percent: f64,
    /// CPU of the watched processes (`--cpu-pid`: nodes or peers and their Redis), summed,
    /// percent of one core; null without `--cpu-pid`.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU seconds used in the measured window per million deliveries received in it
    /// (server_cpu_percent / 100 × window ÷ deliveries received in the window × 10⁶): the cost of
    /// one delivery, comparable across systems and rates; null without `--cpu-pid` or without
    /// deliveries.
    pub server_cpu_secs_per_million_deliveries: Option<f64>,
    pub redis: Option<RedisCost>,
}

#[derive(Serialize)]
pub struct RedisCost {
    /// Every command Redis executed in the measured window (INFO commandstats: the commands
    /// nodes sent plus those their Lua scripts ran; this harness's INFO left out) per publish.
    pub commands_per_publish: f64,
    /// Script invocations (EVAL, EVALSHA, FCALL and their _ro forms) per publish.
    pub script_calls_per_publish: f64,
    /// Delta of INFO stats total_commands_processed per publish (also counts script-internal
    /// commands, and this harness's own INFO calls).
    pub total_commands_processed_per_publish: f64,
    /// Commands executed in the window, by name, per publish.
    pub by_command_per_publish: BTreeMap<String, f64>,
    pub commands: u64,
    /// Commands per second while nothing was published (the nodes' periodic work: liveness,
    /// re-registration of sessions and presence, room position checks), if a baseline was taken.
    pub background_commands_per_sec: Option<f64>,
    /// commands_per_publish less the background: what publishing itself costs.
    pub net_commands_per_publish: Option<f64>,
    pub net_by_command_per_publish: Option<BTreeMap<String, f64>>,
}
