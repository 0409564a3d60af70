//! Scenario `direct --persist`: the users of `direct` send persisted messages (`send … persist:
//! true`), which land in the partner's inbox with a `seq` before they are answered. Each user holds
//! one session that sends, receives and acknowledges (cumulatively, after `--ack-every` new messages
//! or `--ack-interval-ms` after the first unacknowledged one). With `--drop-after-secs` every
//! session is dropped at once mid-run (a reconnect storm) and reconnects to the next target while
//! the others keep sending; the node then delivers the inbox after `welcome`.
//!
//! What the report counts, per user (the receiver), by inbox `seq`:
//! - `stored`: seqs the senders' replies reported; `lost`: stored seqs the user never received;
//!   `delivered_unconfirmed`: seqs received whose send answer the drop cut off.
//! - `duplicates`: a seq received twice on the same connection (a bug: the node promises no repeat
//!   within a session).
//! - `redelivered`: a seq received again on a later connection than the one that first received it,
//!   and not acknowledged as far as the user knew when that connection went: expected, the node
//!   resends what no ack covered.
//! - `redelivered_after_ack`: the same for a seq an answered `ack` covered before the drop (a bug).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::DirectArgs;
use crate::direct::{DirectFigures, Pairing, Shared, targets, with_user};
use crate::redis_info::{redis_addr, redis_snapshot_of};
use crate::report::{ms, round3};
use crate::ws::Socket;

/// Bound on each connection's handshake and welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Request ids of acks start here, above any send id.
const ACK_ID_BASE: u64 = 1 << 40;

#[derive(Serialize)]
pub struct PersistResult {
    pub urls: Vec<String>,
    pub persist: bool,
    pub users: u64,
    pub users_per_url: Vec<u64>,
    pub cross_target_pairs: u64,
    pub rate_target: u64,
    pub duration_secs: u64,
    pub ack_every: u64,
    pub ack_interval_ms: u64,
    /// Seconds from the start of sending to the reconnect storm, if there was one.
    pub drop_after_secs: Option<u64>,
    pub sent: u64,
    pub sent_per_sec: f64,
    /// Sends answered with a `seq`.
    pub stored: u64,
    /// Unique (user, seq) pairs received.
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub lost: u64,
    pub delivered_unconfirmed: u64,
    pub duplicates: u64,
    pub redelivered: u64,
    pub redelivered_after_ack: u64,
    /// Users back after the storm, and those that could not reconnect.
    pub reconnected: u64,
    pub reconnect_failures: u64,
    pub reconnect_ms_max: f64,
    /// Welcomes whose inbox epoch differed from the user's earlier one, when that one was of an
    /// inbox that existed (seq above 0): seqs restart then.
    pub epoch_changes: u64,
    pub acks_sent: u64,
    pub acks_answered: u64,
    pub send_errors: u64,
    /// Sends answered neither by a reply nor an error (those the storm cut off included).
    pub send_unanswered: u64,
    pub unexpected_frames: u64,
    pub users_closed_early: u64,
    #[serde(flatten)]
    pub figures: DirectFigures,
}

/// The `inbox` of a `welcome`.
#[derive(Deserialize)]
struct InboxPosition {
    seq: u64,
    acked: u64,
    epoch: String,
}

/// The fields of a server frame this scenario reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    data: Option<Payload>,
}

/// What a `send` carries: send time (µs on the common clock), sender index, sender's sequence.
#[derive(Deserialize)]
struct Payload {
    t: u64,
}

#[derive(Deserialize)]
struct Welcome {
    inbox: InboxPosition,
}

/// Opens a session for `url` at `addr` and returns it with the welcome's inbox position.
async fn connect(url: &str, addr: SocketAddr) -> Result<(Socket, InboxPosition)> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut socket, _) = tokio_tungstenite::client_async(url, stream).await?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let welcome: Welcome = serde_json::from_str(text.as_str())
                        .with_context(|| format!("not a welcome with inbox: {}", text.as_str()))?;
                    return Ok((socket, welcome.inbox));
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => bail!("closed before the welcome"),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .context("no welcome in 30s")?
}

/// Shared by the users of one run, beside the common [`Shared`].
struct Books {
    shared: Shared,
    /// Seqs the senders' replies reported, by receiving user.
    stored: Vec<Mutex<Vec<u64>>>,
    stored_count: AtomicU64,
    unique_count: AtomicU64,
}

/// What one user saw as a receiver (and sender).
#[derive(Default)]
struct UserStats {
    /// Every seq received, on any connection.
    received: HashSet<u64>,
    sent: u64,
    answered: u64,
    errors: u64,
    duplicates: u64,
    redelivered: u64,
    redelivered_after_ack: u64,
    epoch_changes: u64,
    acks_sent: u64,
    acks_answered: u64,
    unexpected: u64,
    closed_early: bool,
    reconnected: bool,
    reconnect_failed: bool,
    reconnect_us: u64,
}

/// How one user behaves; the same for every user of a run.
#[derive(Clone)]
struct Plan {
    period: Duration,
    end: Instant,
    drop_at: Option<Instant>,
    ack_every: u64,
    ack_interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
}

pub async fn run(args: DirectArgs) -> Result<()> {
    args.check()?;
    let targets = targets(&args.urls)?;
    let redis = args.redis_url.as_deref().map(redis_addr).transpose()?;
    let target_count = targets.len() as u64;
    let users = args.users;
    let pairing = Pairing::new(&args.user_prefix, users, target_count);
    let seconds = args.duration_secs + args.common.drain_secs + 2;
    let books = Arc::new(Books {
        shared: Shared::new(seconds),
        stored: (0..users).map(|_| Mutex::new(Vec::new())).collect(),
        stored_count: AtomicU64::new(0),
        unique_count: AtomicU64::new(0),
    });

    let setup_deadline = Instant::now() + Duration::from_secs(args.common.setup_timeout_secs);
    let mut schedule = tokio::time::interval(Duration::from_secs_f64(
        1.0 / args.common.connect_rate as f64,
    ));
    let mut opening = Vec::with_capacity(users as usize);
    for index in 0..users {
        schedule.tick().await;
        let (url, addr) = targets[(index % target_count) as usize].clone();
        let url = with_user(&url, &pairing.names[index as usize]);
        opening.push(tokio::spawn(async move { connect(&url, addr).await }));
    }
    let mut sessions = Vec::with_capacity(users as usize);
    for task in opening {
        let session = tokio::time::timeout_at(setup_deadline, task)
            .await
            .context("timed out opening user connections")?
            .context("connect task")??;
        sessions.push(session);
    }
    eprintln!("{users} users on {} target(s)", targets.len());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = redis_snapshot_of(redis).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let start_at = Instant::now() + Duration::from_millis(100);
    books
        .shared
        .start_us
        .store(books.shared.now_us() + 100_000, Ordering::SeqCst);
    let plan = Plan {
        period: Duration::from_secs_f64(users as f64 / args.rate as f64),
        end: start_at + Duration::from_secs(args.duration_secs),
        drop_at: args
            .drop_after_secs
            .map(|secs| start_at + Duration::from_secs(secs)),
        ack_every: args.ack_every,
        ack_interval: Duration::from_millis(args.ack_interval_ms),
        stop: stop_rx,
    };
    let drain_deadline = plan.end + Duration::from_secs(args.common.drain_secs);
    let mut tasks = Vec::with_capacity(users as usize);
    for (index, session) in sessions.into_iter().enumerate() {
        let first = start_at + plan.period.mul_f64(index as f64 / users as f64);
        let (url, addr) = targets[(index as u64 + 1) as usize % targets.len()].clone();
        let user = User {
            index: index as u64,
            partner: pairing.partners[index],
            to: serde_json::to_string(&pairing.names[pairing.partners[index] as usize])?,
            reconnect_url: with_user(&url, &pairing.names[index]),
            reconnect_addr: addr,
        };
        tasks.push(tokio::spawn(user.run(
            session,
            books.clone(),
            plan.clone(),
            first,
        )));
    }
    eprintln!(
        "sending {} persisted msgs/s from {users} users for {}s",
        args.rate, args.duration_secs
    );
    tokio::time::sleep_until(plan.end).await;
    // Deliveries, and the acks that settle them, trail the last send.
    while books.unique_count.load(Ordering::SeqCst) < books.stored_count.load(Ordering::SeqCst)
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = redis_snapshot_of(redis).await?;
    let _ = stop_tx.send(true);

    let mut result = PersistResult {
        urls: args.urls.clone(),
        persist: true,
        users,
        users_per_url: pairing.users_per_url,
        cross_target_pairs: pairing.cross_target_pairs,
        rate_target: args.rate,
        duration_secs: args.duration_secs,
        ack_every: args.ack_every,
        ack_interval_ms: args.ack_interval_ms,
        drop_after_secs: args.drop_after_secs,
        sent: 0,
        sent_per_sec: 0.0,
        stored: books.stored_count.load(Ordering::SeqCst),
        delivered: 0,
        delivered_per_sec: 0.0,
        lost: 0,
        delivered_unconfirmed: 0,
        duplicates: 0,
        redelivered: 0,
        redelivered_after_ack: 0,
        reconnected: 0,
        reconnect_failures: 0,
        reconnect_ms_max: 0.0,
        epoch_changes: 0,
        acks_sent: 0,
        acks_answered: 0,
        send_errors: 0,
        send_unanswered: 0,
        unexpected_frames: 0,
        users_closed_early: 0,
        figures: DirectFigures::default(),
    };
    let mut reconnect_us_max = 0;
    for (index, task) in tasks.into_iter().enumerate() {
        let stats = task.await.context("user task")?;
        let stored: HashSet<u64> = books.stored[index]
            .lock()
            .expect("stored lock")
            .iter()
            .copied()
            .collect();
        result.sent += stats.sent;
        result.delivered += stats.received.len() as u64;
        result.lost += stored.difference(&stats.received).count() as u64;
        result.delivered_unconfirmed += stats.received.difference(&stored).count() as u64;
        result.duplicates += stats.duplicates;
        result.redelivered += stats.redelivered;
        result.redelivered_after_ack += stats.redelivered_after_ack;
        result.reconnected += u64::from(stats.reconnected);
        result.reconnect_failures += u64::from(stats.reconnect_failed);
        reconnect_us_max = reconnect_us_max.max(stats.reconnect_us);
        result.epoch_changes += stats.epoch_changes;
        result.acks_sent += stats.acks_sent;
        result.acks_answered += stats.acks_answered;
        result.send_errors += stats.errors;
        result.send_unanswered += stats.sent.saturating_sub(stats.answered + stats.errors);
        result.unexpected_frames += stats.unexpected;
        result.users_closed_early += u64::from(stats.closed_early);
    }
    let window = args.duration_secs as f64;
    result.sent_per_sec = round3(result.sent as f64 / window);
    result.delivered_per_sec = round3(result.delivered as f64 / window);
    result.reconnect_ms_max = ms(reconnect_us_max);
    result.figures = DirectFigures::measure(
        &books.shared,
        args.duration_secs,
        result.sent,
        (before.as_ref(), after.as_ref()),
    );
    result.figures.emit(
        &result,
        &args.common.output,
        "direct --persist",
        &[
            "urls",
            "persist",
            "users",
            "users_per_url",
            "cross_target_pairs",
            "rate_target",
            "duration_secs",
            "ack_every",
            "ack_interval_ms",
            "drop_after_secs",
        ],
        "Send to first delivery (ms)",
    )
}

/// One user: who it sends to, and where it reconnects after the storm.
struct User {
    index: u64,
    partner: u64,
    /// The partner's id, JSON-encoded.
    to: String,
    reconnect_url: String,
    reconnect_addr: SocketAddr,
}

/// One user's bookkeeping of the current connection.
struct Connection {
    /// Seqs received on this connection.
    seen: HashSet<u64>,
    /// Send ids not answered yet.
    unanswered: HashSet<u64>,
}

impl User {
    /// Sends on a schedule, receives, acknowledges, and rides out the storm, until told to stop.
    async fn run(
        self,
        session: (Socket, InboxPosition),
        books: Arc<Books>,
        mut plan: Plan,
        first: Instant,
    ) -> UserStats {
        let mut stats = UserStats::default();
        let (socket, position) = session;
        let (mut sink, mut stream) = socket.split();
        // The epoch of an inbox that exists; a user without one is welcomed with a provisional
        // epoch that its first stored message replaces.
        let mut epoch = (position.seq > 0).then_some(position.epoch);
        // Highest seq up to which everything was received, what was acked, and what the node
        // confirmed acked.
        let mut contiguous = position.acked;
        let mut ack_sent = position.acked;
        let mut ack_confirmed = position.acked;
        let mut ack_due: Option<Instant> = None;
        let mut acks_pending: HashMap<u64, u64> = HashMap::new();
        // The connection on which each seq first came, and the ack confirmed when it went.
        let mut first_connection: HashMap<u64, u32> = HashMap::new();
        let mut connection_number = 0u32;
        let mut confirmed_at_drop = 0u64;
        let mut connection = Connection {
            seen: HashSet::new(),
            unanswered: HashSet::new(),
        };
        let mut schedule = tokio::time::interval_at(first, plan.period);
        // Sends missed while reconnecting are skipped, not burst.
        schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut seq = 0u64;
        let mut dropped = plan.drop_at.is_none();
        let far = plan.end + Duration::from_secs(3600);
        loop {
            tokio::select! {
                biased;
                _ = plan.stop.changed() => break,
                _ = tokio::time::sleep_until(plan.drop_at.unwrap_or(far)), if !dropped => {
                    dropped = true;
                    let since = Instant::now();
                    // Dropped without a close handshake, as a broken network would.
                    drop(sink);
                    drop(stream);
                    connection.seen.clear();
                    connection.unanswered.clear();
                    confirmed_at_drop = ack_confirmed;
                    acks_pending.clear();
                    match connect(&self.reconnect_url, self.reconnect_addr).await {
                        Ok((socket, position)) => {
                            (sink, stream) = socket.split();
                            stats.reconnected = true;
                            stats.reconnect_us = since.elapsed().as_micros() as u64;
                            connection_number += 1;
                            if epoch.as_ref().is_some_and(|epoch| *epoch != position.epoch) {
                                stats.epoch_changes += 1;
                            }
                            if position.seq > 0 {
                                epoch = Some(position.epoch);
                            }
                            contiguous = contiguous.max(position.acked);
                            ack_sent = ack_sent.max(position.acked);
                            ack_confirmed = ack_confirmed.max(position.acked);
                        }
                        Err(error) => {
                            eprintln!("user {} could not reconnect: {error:#}", self.index);
                            stats.reconnect_failed = true;
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep_until(ack_due.unwrap_or(far)), if ack_due.is_some() => {
                    ack_due = None;
                    if send_ack(&mut sink, &mut stats, &mut acks_pending, contiguous).await.is_err() {
                        stats.closed_early = true;
                        break;
                    }
                    ack_sent = contiguous;
                }
                at = schedule.tick(), if at_before(plan.end) => {
                    if at >= plan.end {
                        continue;
                    }
                    seq += 1;
                    let t = books.shared.now_us();
                    books.shared.count(&books.shared.sent_by_second, t);
                    let frame = format!(
                        r#"{{"type":"send","to":{},"persist":true,"data":{{"t":{t},"f":{},"s":{seq}}},"id":{seq}}}"#,
                        self.to, self.index
                    );
                    stats.sent += 1;
                    connection.unanswered.insert(seq);
                    if sink.send(Message::text(frame)).await.is_err() {
                        stats.closed_early = true;
                        break;
                    }
                }
                next = stream.next() => {
                    let text = match next {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => {
                            stats.closed_early = true;
                            break;
                        }
                    };
                    let received_us = books.shared.now_us();
                    let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
                        stats.unexpected += 1;
                        continue;
                    };
                    match (frame.kind, frame.id) {
                        ("direct", _) => {
                            let (Some(seq), Some(payload)) = (frame.seq, frame.data) else {
                                stats.unexpected += 1;
                                continue;
                            };
                            if !connection.seen.insert(seq) {
                                stats.duplicates += 1;
                                continue;
                            }
                            if let Some(&earlier) = first_connection.get(&seq) {
                                if earlier < connection_number {
                                    if seq <= confirmed_at_drop {
                                        stats.redelivered_after_ack += 1;
                                    } else {
                                        stats.redelivered += 1;
                                    }
                                }
                                continue;
                            }
                            first_connection.insert(seq, connection_number);
                            stats.received.insert(seq);
                            books.unique_count.fetch_add(1, Ordering::Relaxed);
                            books.shared.count(&books.shared.delivered_by_second, received_us);
                            books
                                .shared
                                .histogram
                                .lock()
                                .expect("histogram lock")
                                .saturating_record(received_us.saturating_sub(payload.t).max(1));
                            while stats.received.contains(&(contiguous + 1)) {
                                contiguous += 1;
                            }
                            if contiguous >= ack_sent + plan.ack_every {
                                ack_due = None;
                                if send_ack(&mut sink, &mut stats, &mut acks_pending, contiguous).await.is_err() {
                                    stats.closed_early = true;
                                    break;
                                }
                                ack_sent = contiguous;
                            } else if contiguous > ack_sent && ack_due.is_none() {
                                ack_due = Some(Instant::now() + plan.ack_interval);
                            }
                        }
                        ("reply", Some(id)) if id >= ACK_ID_BASE => {
                            if let Some(acked) = acks_pending.remove(&id) {
                                stats.acks_answered += 1;
                                ack_confirmed = ack_confirmed.max(acked);
                            }
                        }
                        ("reply", Some(id)) if connection.unanswered.remove(&id) => {
                            stats.answered += 1;
                            if let Some(seq) = frame.seq {
                                books.stored[self.partner as usize]
                                    .lock()
                                    .expect("stored lock")
                                    .push(seq);
                                books.stored_count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        ("error", Some(id)) if connection.unanswered.remove(&id) => {
                            stats.errors += 1;
                            eprintln!("send refused: {}", text.as_str());
                        }
                        ("pong", _) => {}
                        _ => stats.unexpected += 1,
                    }
                }
            }
        }
        stats
    }
}

/// Whether the scheduled sending is still on.
fn at_before(end: Instant) -> bool {
    Instant::now() < end
}

/// Sends a cumulative `ack` of `seq`, remembered under its request id until answered.
async fn send_ack(
    sink: &mut futures_util::stream::SplitSink<Socket, Message>,
    stats: &mut UserStats,
    pending: &mut HashMap<u64, u64>,
    seq: u64,
) -> Result<()> {
    stats.acks_sent += 1;
    let id = ACK_ID_BASE + stats.acks_sent;
    pending.insert(id, seq);
    sink.send(Message::text(format!(
        r#"{{"type":"ack","seq":{seq},"id":{id}}}"#
    )))
    .await?;
    Ok(())
}
