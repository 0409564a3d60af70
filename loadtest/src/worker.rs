//! One worker process of `connect --workers N`: the harness re-executed as `connect-worker`. It
//! reads its share of the connections (one JSON line) from stdin, opens them at its share of the
//! rate from its own source addresses, reports on stdout (JSON lines: progress, then `opened` with
//! its handshake histogram), holds them (answering Socket.IO pings, counting what the server
//! closes) and, once stdin closes, closes them and reports `done`. Stdin closing is the parent's
//! only signal to stop, so a worker whose parent died stops too.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::codec::Codec;
use crate::protocol::Protocol;
use crate::transport::{Conn, Transport};
use crate::ws::url_addr;

/// Width of one step of the open/dropped timelines.
pub const TICK: Duration = Duration::from_millis(100);
/// Handshake times are recorded in microseconds up to this; longer ones count as this.
const HANDSHAKE_CEILING_US: u64 = 600_000_000;
/// How often a worker reports progress while opening.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// The line the parent writes once every worker has all of its connections open.
pub const HOLD: &str = "hold";

/// What one worker opens: connections `first .. first + count` of the run, each to
/// `urls[index % urls.len()]`.
#[derive(Serialize, Deserialize)]
pub struct Share {
    pub protocol: String,
    pub transport: Transport,
    pub codec: Codec,
    pub urls: Vec<String>,
    pub first: u64,
    pub count: u64,
    /// Connections per second.
    pub rate: f64,
    /// Connections take these source addresses in turn.
    pub sources: Vec<Ipv4Addr>,
    /// Handshakes not done this long after the worker started count as failures.
    pub timeout_secs: u64,
    /// Rooms each connection subscribes to before it counts as open.
    pub subscribe: u32,
}

/// A line a worker writes on stdout.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// Handshakes finished so far, opened or failed.
    Progress { done: u64 },
    /// Every handshake of the share finished.
    Opened {
        open: u64,
        failures: u64,
        /// Open connections per target, in the order of the share's `urls`.
        open_per_url: Vec<u64>,
        open_secs: f64,
        /// Handshake times (µs), an HdrHistogram in its V2 serialization, base64.
        handshakes: String,
        /// When the worker read its share, µs since the Unix epoch (aligns the timelines).
        started_unix_us: u64,
    },
    /// The worker read [`HOLD`]: from now on, a connection the server closes counts as dropped
    /// during the hold.
    Holding,
    /// The connections are closed.
    Done {
        dropped_before_hold: u64,
        dropped_during_hold: u64,
        /// Handshakes completed and connections the server closed, per [`TICK`] since the start.
        opened_by_tick: Vec<u32>,
        dropped_by_tick: Vec<u32>,
        /// The tick in which the worker was told to close.
        closed_tick: u64,
    },
}

/// A new, empty handshake histogram.
pub fn handshake_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HANDSHAKE_CEILING_US, 3).expect("valid histogram bounds")
}

pub fn encode_histogram(histogram: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|error| anyhow!("serializing a histogram: {error:?}"))?;
    Ok(BASE64.encode(bytes))
}

pub fn decode_histogram(text: &str) -> Result<Histogram<u64>> {
    let bytes = BASE64.decode(text)?;
    Deserializer::new()
        .deserialize(&mut Cursor::new(bytes))
        .map_err(|error| anyhow!("deserializing a histogram: {error:?}"))
}

/// Microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// What the held connections of one worker saw.
struct Holding {
    base: Instant,
    /// Set once the parent says every worker is open.
    hold: AtomicBool,
    dropped_before_hold: AtomicU64,
    dropped_during_hold: AtomicU64,
    dropped_by_tick: Mutex<Vec<u32>>,
}

impl Holding {
    fn dropped(&self) {
        if self.hold.load(Ordering::SeqCst) {
            self.dropped_during_hold.fetch_add(1, Ordering::SeqCst);
        } else {
            self.dropped_before_hold.fetch_add(1, Ordering::SeqCst);
        }
        bump(
            &mut self.dropped_by_tick.lock().expect("timeline lock"),
            tick_of(self.base.elapsed()),
        );
    }
}

fn tick_of(elapsed: Duration) -> usize {
    (elapsed.as_millis() / TICK.as_millis()) as usize
}

fn bump(timeline: &mut Vec<u32>, tick: usize) {
    if timeline.len() <= tick {
        timeline.resize(tick + 1, 0);
    }
    timeline[tick] += 1;
}

/// Writes one report line on stdout.
async fn say(stdout: &mut tokio::io::Stdout, report: &Report) -> Result<()> {
    let mut line = serde_json::to_string(report)?;
    line.push('\n');
    stdout.write_all(line.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

pub async fn run() -> Result<()> {
    let mut stdout = tokio::io::stdout();
    let (line_tx, mut lines) = mpsc::unbounded_channel::<String>();
    // Reads stdin to its end; the channel closing means the parent closed it (or died).
    tokio::spawn(async move {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let share: Share = serde_json::from_str(&lines.recv().await.context("no share on stdin")?)?;
    let started_unix_us = unix_us();
    let base = Instant::now();
    let protocol = Protocol::from_str(&share.protocol, true).map_err(|error| anyhow!(error))?;
    let targets = share
        .urls
        .iter()
        .map(|url| Ok((url.clone(), url_addr(url)?)))
        .collect::<Result<Vec<(String, SocketAddr)>>>()?;
    let holding = Arc::new(Holding {
        base,
        hold: AtomicBool::new(false),
        dropped_before_hold: AtomicU64::new(0),
        dropped_during_hold: AtomicU64::new(0),
        dropped_by_tick: Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (result_tx, mut results) = mpsc::unbounded_channel::<(usize, Result<Duration>)>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(share.timeout_secs);
    let opener = tokio::spawn(open_all(
        share,
        protocol,
        targets.clone(),
        deadline,
        holding.clone(),
        result_tx,
        stop_rx,
    ));

    let mut histogram = handshake_histogram();
    let mut open_per_url = vec![0u64; targets.len()];
    let mut opened_by_tick = Vec::new();
    let (mut open, mut failures) = (0u64, 0u64);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            result = results.recv() => match result {
                Some((target, Ok(took))) => {
                    open += 1;
                    open_per_url[target] += 1;
                    histogram.saturating_record((took.as_micros() as u64).max(1));
                    bump(&mut opened_by_tick, tick_of(base.elapsed()));
                }
                Some((_, Err(error))) => {
                    failures += 1;
                    if failures <= 5 {
                        eprintln!("connect failed: {error:#}");
                    }
                }
                // Every connection task has answered.
                None => break,
            },
            _ = progress.tick() => say(&mut stdout, &Report::Progress { done: open + failures }).await?,
            line = lines.recv() => if line.is_none() {
                anyhow::bail!("stdin closed while opening: the parent is gone");
            },
        }
    }
    let tasks = opener.await.context("opener task")?;
    say(
        &mut stdout,
        &Report::Opened {
            open,
            failures,
            open_per_url,
            open_secs: base.elapsed().as_secs_f64(),
            handshakes: encode_histogram(&histogram)?,
            started_unix_us,
        },
    )
    .await?;

    // Hold until stdin closes; the parent says when the hold (every worker open) begins.
    while let Some(line) = lines.recv().await {
        if line.trim() == HOLD {
            holding.hold.store(true, Ordering::SeqCst);
            say(&mut stdout, &Report::Holding).await?;
        }
    }
    let closed_tick = tick_of(base.elapsed()) as u64;
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let dropped_by_tick = std::mem::take(&mut *holding.dropped_by_tick.lock().expect("lock"));
    say(
        &mut stdout,
        &Report::Done {
            dropped_before_hold: holding.dropped_before_hold.load(Ordering::SeqCst),
            dropped_during_hold: holding.dropped_during_hold.load(Ordering::SeqCst),
            opened_by_tick,
            dropped_by_tick,
            closed_tick,
        },
    )
    .await
}

/// Starts one task per connection of `share`, at its rate; returns the tasks.
async fn open_all(
    share: Share,
    protocol: Protocol,
    targets: Vec<(String, SocketAddr)>,
    deadline: tokio::time::Instant,
    holding: Arc<Holding>,
    result_tx: mpsc::UnboundedSender<(usize, Result<Duration>)>,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut schedule = tokio::time::interval(Duration::from_secs_f64(1.0 / share.rate.max(0.001)));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(share.count as usize);
    for offset in 0..share.count {
        schedule.tick().await;
        let index = share.first + offset;
        let target = (index % targets.len() as u64) as usize;
        let source = share.sources[(offset % share.sources.len() as u64) as usize];
        tasks.push(tokio::spawn(connection(
            (protocol, share.transport, share.codec),
            (index, share.subscribe),
            target,
            targets[target].clone(),
            IpAddr::V4(source),
            deadline,
            holding.clone(),
            result_tx.clone(),
            stop.clone(),
        )));
    }
    tasks
}

/// Opens one connection, reports how long it took (or why it failed), then holds it until told
/// to stop.
#[allow(clippy::too_many_arguments)]
async fn connection(
    (protocol, transport, codec): (Protocol, Transport, Codec),
    (index, rooms): (u64, u32),
    target: usize,
    (url, addr): (String, SocketAddr),
    source: IpAddr,
    deadline: tokio::time::Instant,
    holding: Arc<Holding>,
    result_tx: mpsc::UnboundedSender<(usize, Result<Duration>)>,
    stop: watch::Receiver<bool>,
) {
    let begun = Instant::now();
    let opened = tokio::time::timeout_at(deadline, async {
        let mut socket = protocol
            .connect((transport, codec), &url, addr, Some(source))
            .await?;
        subscribe_rooms(&mut socket, index, rooms).await?;
        Ok::<_, anyhow::Error>(socket)
    })
    .await;
    let socket = match opened {
        Ok(Ok(socket)) => {
            let _ = result_tx.send((target, Ok(begun.elapsed())));
            socket
        }
        Ok(Err(error)) => {
            let _ = result_tx.send((target, Err(error)));
            return;
        }
        Err(_) => {
            let _ = result_tx.send((target, Err(anyhow!("handshake not done by the deadline"))));
            return;
        }
    };
    drop(result_tx);
    hold(socket, protocol, &holding, stop).await;
}

/// Subscribes connection `index` to `rooms` rooms, idle-((index + j) mod 1000), and reads their
/// replies: every room is shared by many connections, as rooms are.
async fn subscribe_rooms(socket: &mut Conn, index: u64, rooms: u32) -> Result<()> {
    for j in 0..u64::from(rooms) {
        let room = (index + j) % 1000;
        let frame = format!(r#"{{"type":"subscribe","room":"idle-{room}","id":{j}}}"#);
        socket.feed(Message::text(frame)).await?;
    }
    socket.flush().await?;
    let mut replies = 0;
    while replies < rooms {
        let message = socket
            .next()
            .await
            .context("closed before the subscribe replies")??;
        let Message::Text(text) = &message else {
            continue;
        };
        let incoming: crate::ws::Incoming<'_> = serde_json::from_str(text.as_str())?;
        match incoming.kind {
            "reply" => replies += 1,
            "error" => anyhow::bail!(
                "subscribe refused: {} {}",
                incoming.code.unwrap_or("?"),
                incoming.message.unwrap_or_default()
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Reads a held connection until told to stop: answers Engine.IO pings (`2` with `3`) and
/// counts a close or error from the server as a drop. Stopping drops the socket (no close
/// handshake: thousands of them would only slow the end of the run).
async fn hold(
    mut socket: Conn,
    protocol: Protocol,
    holding: &Holding,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => return,
            next = socket.next() => next,
        };
        match next {
            Some(Ok(Message::Text(text)))
                if protocol == Protocol::Socketio && text.as_str() == "2" =>
            {
                if socket.send(Message::text("3")).await.is_err() {
                    holding.dropped();
                    return;
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                holding.dropped();
                return;
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_round_trip() {
        let mut histogram = handshake_histogram();
        for micros in [5, 500, 50_000, 5_000_000] {
            histogram.record(micros).expect("in range");
        }
        let decoded =
            decode_histogram(&encode_histogram(&histogram).expect("encodes")).expect("decodes");
        assert_eq!(decoded.len(), 4);
        assert_eq!(decoded.max(), histogram.max());
        assert_eq!(
            decoded.value_at_quantile(0.5),
            histogram.value_at_quantile(0.5)
        );
    }

    #[test]
    fn timelines_grow_to_the_tick() {
        let mut timeline = Vec::new();
        bump(&mut timeline, 3);
        bump(&mut timeline, 3);
        bump(&mut timeline, 0);
        assert_eq!(timeline, vec![1, 0, 0, 2]);
        assert_eq!(tick_of(Duration::from_millis(250)), 2);
    }
}
