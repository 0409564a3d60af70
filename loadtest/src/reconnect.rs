//! Scenario `reconnect`: subscribers over rooms and targets while one publisher runs; at one
//! moment (after --drop-after-secs, or on SIGUSR1) every subscriber closes its connection, then
//! reconnects to the next target and resubscribes with `since` its last offset and epoch. Reports
//! how long each took to be back, and whether any room message was lost or duplicated across the
//! seam.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::ReconnectArgs;
use crate::html::{self, Figure, Numbers, Page};
use crate::report::{emit, ms};
use crate::sequence::advance;
use crate::ws::{Incoming, Socket, await_setup, open, run_tag, subscribe_one, url_addr};

/// Bound on each connection's handshake plus subscribe.
const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize)]
pub struct ReconnectResult {
    pub urls: Vec<String>,
    pub rooms: u64,
    pub subscribers: u64,
    pub rate_target: u64,
    /// Seconds from the start of publishing to the drop.
    pub dropped_after_secs: f64,
    pub published: u64,
    pub publish_errors: u64,
    pub publish_unanswered: u64,
    /// Subscribers back (resubscribed with `since`) within --reconnect-timeout-secs.
    pub reconnected: u64,
    pub reconnect_failures: u64,
    /// Attempts beyond the first, over all subscribers.
    pub reconnect_retries: u64,
    /// From the drop until the resubscribe reply.
    pub reconnect_ms_p50: f64,
    pub reconnect_ms_p99: f64,
    pub reconnect_ms_max: f64,
    /// From the drop until the last subscriber was back.
    pub all_back_ms: f64,
    /// Resubscribe replies with `recovered: true`, and with `recovered: false` (or none).
    pub recovered: u64,
    pub not_recovered: u64,
    pub epoch_changes: u64,
    pub expected_deliveries_total: u64,
    pub received_total: u64,
    pub lost: u64,
    pub lost_in_gaps: u64,
    pub undelivered_at_end: u64,
    pub duplicates: u64,
    pub epoch_mismatches: u64,
    pub unexpected_frames: u64,
    pub subscribers_closed_early: u64,
    /// Every subscriber's time from the drop until it was back, milliseconds, for the HTML
    /// report.
    #[serde(skip)]
    pub reconnect_ms: Vec<f64>,
    /// Subscriber connections open around the drop as (milliseconds since the drop, open), for
    /// the HTML report.
    #[serde(skip)]
    pub open_around_drop: Vec<(f64, f64)>,
    #[serde(skip)]
    pub reconnect_percentiles: Vec<(f64, f64)>,
}

/// Points of the chart of connections around the drop.
const TIMELINE_POINTS: usize = 300;

/// Subscriber connections open at evenly spaced moments from shortly before the drop until
/// shortly after the last one was back: all of them, less those closed (`closed_ms`, since the
/// drop), plus those back (`back_ms`).
fn open_around_drop(
    subscribers: u64,
    closed_ms: &mut [f64],
    back_ms: &mut [f64],
) -> Vec<(f64, f64)> {
    closed_ms.sort_by(f64::total_cmp);
    back_ms.sort_by(f64::total_cmp);
    let last = closed_ms
        .iter()
        .chain(back_ms.iter())
        .copied()
        .fold(1.0, f64::max);
    let margin = last * 0.1;
    (0..=TIMELINE_POINTS)
        .map(|step| {
            let at = -margin + (last + 2.0 * margin) * step as f64 / TIMELINE_POINTS as f64;
            let closed = closed_ms.partition_point(|&ms| ms <= at);
            let back = back_ms.partition_point(|&ms| ms <= at);
            (
                at,
                (subscribers as f64 - closed as f64 + back as f64).max(0.0),
            )
        })
        .collect()
}

/// Shared by the publisher and the subscribers of one run.
struct Shared {
    /// Room names, JSON-encoded.
    rooms: Vec<String>,
    /// Highest offset a publish reply acknowledged, per room.
    room_last: Vec<AtomicU64>,
    received: AtomicU64,
    answered: AtomicU64,
    publish_errors: AtomicU64,
}

/// What one subscriber saw.
#[derive(Default)]
struct SubscriberStats {
    room: usize,
    start_offset: u64,
    last_offset: u64,
    unique: u64,
    duplicates: u64,
    gaps: u64,
    epoch_mismatches: u64,
    unexpected: u64,
    reconnected: bool,
    retries: u64,
    recovered: bool,
    epoch_changed: bool,
    closed_early: bool,
}

/// The target subscriber `index` first connects to, so every room spans the targets.
fn target_of(index: u64, rooms: u64, targets: u64) -> usize {
    ((index / rooms + index % rooms) % targets) as usize
}

impl ReconnectArgs {
    /// Refuses flags outside the bounds one run is meant to hold.
    pub fn check(&self) -> Result<()> {
        if self.rooms == 0 || self.subscribers == 0 || self.subscribers > 50_000 {
            bail!("--rooms must be at least 1, --subscribers 1 to 50000");
        }
        if self.rate == 0 || self.rate > 100_000 {
            bail!("--rate must be 1 to 100000");
        }
        if self.drop_after_secs.is_some_and(|secs| secs > 600)
            || self.after_secs > 600
            || self.reconnect_timeout_secs == 0
            || self.reconnect_timeout_secs > 600
        {
            bail!(
                "--drop-after-secs and --after-secs at most 600, --reconnect-timeout-secs 1 to 600"
            );
        }
        self.common.check()
    }
}

pub async fn run(args: ReconnectArgs) -> Result<()> {
    args.check()?;
    // Listen for SIGUSR1 before anything else, so an early signal is not the default (exit).
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let targets = args
        .urls
        .iter()
        .map(|url| Ok((url.clone(), url_addr(url)?)))
        .collect::<Result<Vec<(String, SocketAddr)>>>()?;
    let target_count = targets.len() as u64;
    let run_id = run_tag("rc");
    let rooms = (0..args.rooms)
        .map(|room| serde_json::to_string(&format!("{run_id}-{room}")))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Arc::new(Shared {
        room_last: rooms.iter().map(|_| AtomicU64::new(0)).collect(),
        rooms,
        received: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        publish_errors: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drop_tx, drop_rx) = watch::channel::<Option<Instant>>(None);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<()>>();
    let (back_tx, mut back_rx) = mpsc::unbounded_channel::<(Duration, Option<Duration>)>();
    let reconnect_timeout = Duration::from_secs(args.reconnect_timeout_secs);

    // Subscribers, at a held connect rate.
    let setup_deadline =
        tokio::time::Instant::now() + Duration::from_secs(args.common.setup_timeout_secs);
    let mut schedule = tokio::time::interval(Duration::from_secs_f64(
        1.0 / args.common.connect_rate as f64,
    ));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut subscriber_tasks = Vec::with_capacity(args.subscribers as usize);
    for index in 0..args.subscribers {
        schedule.tick().await;
        let first = target_of(index, args.rooms, target_count);
        let task = tokio::spawn(subscriber(
            (index % args.rooms) as usize,
            targets[first].clone(),
            targets[(first + 1) % targets.len()].clone(),
            shared.clone(),
            ready_tx.clone(),
            back_tx.clone(),
            drop_rx.clone(),
            stop_rx.clone(),
            reconnect_timeout,
        ));
        subscriber_tasks.push(task);
    }
    drop(ready_tx);
    drop(back_tx);
    if let Err(error) = await_setup(&mut ready_rx, args.subscribers, setup_deadline).await {
        let _ = stop_tx.send(true);
        return Err(error);
    }
    eprintln!(
        "{} subscribers in {} rooms on {} target(s)",
        args.subscribers,
        args.rooms,
        targets.len()
    );

    // One publisher, on the first target.
    let (url, addr) = &targets[0];
    let socket = tokio::time::timeout(SETUP_STEP_TIMEOUT, open(url, *addr, None))
        .await
        .context("publisher connection timed out")??;
    let (sink, stream) = socket.split();
    let (stop_publish_tx, stop_publish_rx) = watch::channel(false);
    let publish_reader = tokio::spawn(read_replies(stream, shared.clone(), stop_rx.clone()));
    let publisher = tokio::spawn(publish(
        sink,
        shared.clone(),
        Duration::from_secs_f64(1.0 / args.rate as f64),
        stop_publish_rx,
    ));
    let publishing_since = Instant::now();
    eprintln!("publishing {} msgs/s", args.rate);

    match args.drop_after_secs {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => {
            eprintln!("waiting for SIGUSR1 to drop every subscriber");
            usr1.recv().await;
        }
    }
    let dropped_at = Instant::now();
    let dropped_after_secs = (dropped_at - publishing_since).as_secs_f64();
    let _ = drop_tx.send(Some(dropped_at));
    eprintln!("dropping {} subscriber connections", args.subscribers);

    let mut times =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
    let mut reconnected = 0u64;
    let mut all_back = Duration::ZERO;
    let (mut closed_ms, mut back_ms) = (Vec::new(), Vec::new());
    let back_deadline = tokio::time::Instant::now() + reconnect_timeout + Duration::from_secs(5);
    for _ in 0..args.subscribers {
        match tokio::time::timeout_at(back_deadline, back_rx.recv()).await {
            Ok(Some((closed, back))) => {
                closed_ms.push(closed.as_secs_f64() * 1000.0);
                if let Some(elapsed) = back {
                    reconnected += 1;
                    all_back = all_back.max(elapsed);
                    times.saturating_record((elapsed.as_micros() as u64).max(1));
                    back_ms.push(elapsed.as_secs_f64() * 1000.0);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    eprintln!(
        "{reconnected} of {} subscribers back after {:.1}ms",
        args.subscribers,
        all_back.as_secs_f64() * 1000.0
    );

    tokio::time::sleep(Duration::from_secs(args.after_secs)).await;
    let _ = stop_publish_tx.send(true);
    let sent = publisher.await.context("publisher task")??;
    let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(args.common.drain_secs);
    let per_room: Vec<u64> = (0..args.rooms)
        .map(|room| {
            (0..args.subscribers)
                .filter(|index| index % args.rooms == room)
                .count() as u64
        })
        .collect();
    loop {
        let expected: u64 = per_room
            .iter()
            .zip(&shared.room_last)
            .map(|(count, last)| count * last.load(Ordering::SeqCst))
            .sum();
        let answered = shared.answered.load(Ordering::SeqCst) >= sent;
        let delivered = shared.received.load(Ordering::SeqCst) >= expected;
        if (answered && delivered) || tokio::time::Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let _ = publish_reader.await;

    let mut result = ReconnectResult {
        urls: args.urls.clone(),
        rooms: args.rooms,
        subscribers: args.subscribers,
        rate_target: args.rate,
        dropped_after_secs: (dropped_after_secs * 1000.0).round() / 1000.0,
        published: sent,
        publish_errors: shared.publish_errors.load(Ordering::SeqCst),
        publish_unanswered: sent.saturating_sub(shared.answered.load(Ordering::SeqCst)),
        reconnected,
        reconnect_failures: args.subscribers - reconnected,
        reconnect_retries: 0,
        reconnect_ms_p50: ms(times.value_at_quantile(0.5)),
        reconnect_ms_p99: ms(times.value_at_quantile(0.99)),
        reconnect_ms_max: ms(times.max()),
        all_back_ms: (all_back.as_secs_f64() * 1_000_000.0).round() / 1000.0,
        recovered: 0,
        not_recovered: 0,
        epoch_changes: 0,
        expected_deliveries_total: 0,
        received_total: 0,
        lost: 0,
        lost_in_gaps: 0,
        undelivered_at_end: 0,
        duplicates: 0,
        epoch_mismatches: 0,
        unexpected_frames: 0,
        subscribers_closed_early: 0,
        open_around_drop: open_around_drop(args.subscribers, &mut closed_ms, &mut back_ms),
        reconnect_ms: back_ms,
        reconnect_percentiles: html::percentile_curve(&times),
    };
    for task in subscriber_tasks {
        let Some(stats) = task.await.context("subscriber task")? else {
            continue;
        };
        let last = shared.room_last[stats.room].load(Ordering::SeqCst);
        result.expected_deliveries_total += last.saturating_sub(stats.start_offset);
        result.undelivered_at_end += last.saturating_sub(stats.last_offset);
        result.received_total += stats.unique;
        result.lost_in_gaps += stats.gaps;
        result.duplicates += stats.duplicates;
        result.epoch_mismatches += stats.epoch_mismatches;
        result.unexpected_frames += stats.unexpected;
        result.reconnect_retries += stats.retries;
        if stats.reconnected {
            if stats.recovered {
                result.recovered += 1;
            } else {
                result.not_recovered += 1;
            }
        }
        result.epoch_changes += u64::from(stats.epoch_changed);
        result.subscribers_closed_early += u64::from(stats.closed_early);
    }
    result.lost = result
        .expected_deliveries_total
        .saturating_sub(result.received_total);
    emit(&result, args.common.output.json.as_deref())?;
    if let Some(path) = &args.common.output.html {
        html_report(&result)?.write(path)?;
    }
    Ok(())
}

/// The HTML report: the headline, parameters, summary, how long the subscribers took to be back
/// and the connections open around the drop.
fn html_report(result: &ReconnectResult) -> Result<Page> {
    let mut page = Page::new("reconnect");
    let all = serde_json::to_value(result)?;
    let numbers = Numbers(&all);
    page.headline(
        &format!(
            "{} of {} subscribers back on another target {} ms after the drop (p99 {} ms), {} \
             recovered with since; {} of {} expected deliveries; {}",
            numbers.whole("reconnected"),
            numbers.whole("subscribers"),
            numbers.short("all_back_ms"),
            numbers.short("reconnect_ms_p99"),
            numbers.whole("recovered"),
            numbers.whole("received_total"),
            numbers.whole("expected_deliveries_total"),
            numbers.losses("lost", "subscribers_closed_early", "subscribers"),
        ),
        &[
            Figure::of(&all, "reconnected", "back"),
            Figure::of(&all, "all_back_ms", "ms until all back"),
            Figure::of(&all, "reconnect_ms_p99", "p99 ms to be back"),
            Figure::of(&all, "recovered", "recovered"),
            Figure::bad(&all, "reconnect_failures", "not back"),
            Figure::bad(&all, "not_recovered", "not recovered"),
            Figure::bad(&all, "lost", "lost"),
            Figure::bad(&all, "duplicates", "duplicates"),
        ],
    );
    let parameters = [
        "urls",
        "rooms",
        "subscribers",
        "rate_target",
        "dropped_after_secs",
    ];
    page.result_tables(result, |key| parameters.contains(&key))?;
    page.section(
        "Time until back",
        &[
            html::distribution_chart(
                "Subscribers by time from the drop until back",
                "ms",
                &result.reconnect_ms,
                10,
            ),
            html::percentile_chart(
                "Time until back by percentile (ms)",
                &result.reconnect_percentiles,
            ),
        ],
    );
    page.section(
        "Around the drop",
        &[html::line_chart(
            "Subscriber connections open",
            "milliseconds since the drop",
            &[html::Series {
                name: "open",
                color: html::PURPLE,
                points: result.open_around_drop.clone(),
            }],
            None,
        )],
    );
    Ok(page)
}

/// What a subscriber's read loop was interrupted by.
enum Event {
    Stop,
    Drop,
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
}

/// One subscriber: subscribes on `first`, reads; on the drop closes its connection, resubscribes
/// on `second` with `since`, and reads on until told to stop. `None` if the first subscribe
/// failed.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    room: usize,
    first: (String, SocketAddr),
    second: (String, SocketAddr),
    shared: Arc<Shared>,
    ready_tx: mpsc::UnboundedSender<Result<()>>,
    back_tx: mpsc::UnboundedSender<(Duration, Option<Duration>)>,
    mut drop_rx: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
    reconnect_timeout: Duration,
) -> Option<SubscriberStats> {
    let setup = tokio::time::timeout(
        SETUP_STEP_TIMEOUT,
        subscribe_one(&first.0, first.1, &shared.rooms[room], None),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no subscribe reply in 30s")));
    let (mut socket, start_offset, mut epoch) = match setup {
        Ok((socket, subscribed)) => {
            let _ = ready_tx.send(Ok(()));
            (socket, subscribed.offset, subscribed.epoch)
        }
        Err(error) => {
            let _ = ready_tx.send(Err(error));
            return None;
        }
    };
    drop(ready_tx);
    let mut stats = SubscriberStats {
        room,
        start_offset,
        last_offset: start_offset,
        ..SubscriberStats::default()
    };
    let mut dropped = false;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => Event::Stop,
            changed = drop_rx.changed(), if !dropped => match changed {
                Ok(()) => Event::Drop,
                // The run is over before any drop.
                Err(_) => Event::Stop,
            },
            next = socket.next() => Event::Frame(next),
        };
        let text = match event {
            Event::Stop => break,
            Event::Drop => {
                dropped = true;
                let dropped_at = (*drop_rx.borrow()).unwrap_or_else(Instant::now);
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
                drop(socket);
                let closed = dropped_at.elapsed();
                let deadline = dropped_at + reconnect_timeout;
                match resume(&second, &shared.rooms[room], &mut stats, &epoch, deadline).await {
                    Some((resumed, resumed_epoch)) => {
                        let _ = back_tx.send((closed, Some(dropped_at.elapsed())));
                        stats.reconnected = true;
                        if resumed_epoch != epoch {
                            // Before any message, the epoch was one the room did not keep (it
                            // had no state): the room's own is no change.
                            stats.epoch_changed |= stats.last_offset > 0;
                            epoch = resumed_epoch;
                        }
                        socket = resumed;
                        continue;
                    }
                    None => {
                        let _ = back_tx.send((closed, None));
                        stats.closed_early = true;
                        return Some(stats);
                    }
                }
            }
            Event::Frame(Some(Ok(Message::Text(text)))) => text,
            Event::Frame(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => {
                stats.closed_early = true;
                break;
            }
            Event::Frame(Some(Ok(_))) => continue,
        };
        let (offset, message_epoch) = match serde_json::from_str::<Incoming<'_>>(text.as_str()) {
            Ok(Incoming {
                kind: "message",
                offset: Some(offset),
                epoch,
                ..
            }) => (offset, epoch.map(str::to_owned)),
            _ => {
                stats.unexpected += 1;
                continue;
            }
        };
        if message_epoch.as_deref() != Some(epoch.as_str()) {
            match message_epoch {
                // A room without state answers an epoch it does not keep; its first message
                // brings the epoch its first publish made.
                Some(first) if stats.last_offset == 0 => epoch = first,
                _ => stats.epoch_mismatches += 1,
            }
        }
        if !advance(
            &mut stats.last_offset,
            offset,
            &mut stats.duplicates,
            &mut stats.gaps,
        ) {
            continue;
        }
        stats.unique += 1;
        shared.received.fetch_add(1, Ordering::Relaxed);
    }
    let _ = socket.close(None).await;
    Some(stats)
}

/// Resubscribes on `target` with `since` the subscriber's last offset and `epoch`, retrying
/// until `deadline`; returns the socket and the room's epoch from the reply.
async fn resume(
    target: &(String, SocketAddr),
    room: &str,
    stats: &mut SubscriberStats,
    epoch: &str,
    deadline: Instant,
) -> Option<(Socket, String)> {
    let mut attempt = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if attempt > 0 {
            stats.retries += 1;
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
        attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = tokio::time::timeout(
            left,
            subscribe_one(&target.0, target.1, room, Some((stats.last_offset, epoch))),
        )
        .await;
        match outcome {
            Ok(Ok((socket, subscribed))) => {
                stats.recovered = subscribed.recovered;
                return Some((socket, subscribed.epoch));
            }
            Ok(Err(error)) => {
                if attempt <= 3 {
                    eprintln!("resubscribe failed: {error:#}");
                }
            }
            Err(_) => return None,
        }
    }
}

type PublishSink = futures_util::stream::SplitSink<Socket, Message>;
type ReplyStream = futures_util::stream::SplitStream<Socket>;

/// Publishes to the rooms round-robin, one frame per `period`, until told to stop; returns how
/// many were sent. Each frame's id is its sequence number from 1.
async fn publish(
    mut sink: PublishSink,
    shared: Arc<Shared>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<u64> {
    let mut schedule = tokio::time::interval(period);
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let rooms = shared.rooms.len() as u64;
    let mut sent = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = schedule.tick() => {}
        }
        let room = &shared.rooms[(sent % rooms) as usize];
        sent += 1;
        let frame = format!(
            r#"{{"type":"publish","room":{room},"data":{{"t":0,"s":{sent}}},"id":{sent}}}"#
        );
        tokio::time::timeout(Duration::from_secs(30), sink.send(Message::text(frame)))
            .await
            .context("publisher stalled: the node stopped reading")??;
    }
    Ok(sent)
}

/// Reads the publisher's replies until told to stop, keeping each room's highest offset.
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
            Some(Err(_)) | None => break,
        };
        let Ok(frame) = serde_json::from_str::<Incoming<'_>>(text.as_str()) else {
            continue;
        };
        match (frame.kind, frame.id, frame.offset) {
            ("reply", Some(id), Some(offset)) if id > 0 => {
                shared.room_last[((id - 1) % rooms) as usize].fetch_max(offset, Ordering::SeqCst);
                shared.answered.fetch_add(1, Ordering::SeqCst);
            }
            ("error", _, _) => {
                shared.publish_errors.fetch_add(1, Ordering::SeqCst);
                shared.answered.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::html::read_back::headline;

    #[test]
    fn a_reconnect_report_opens_with_its_figures() {
        let result = ReconnectResult {
            urls: vec!["ws://a/ws".to_owned(), "ws://b/ws".to_owned()],
            rooms: 10,
            subscribers: 2000,
            rate_target: 200,
            dropped_after_secs: 5.0,
            published: 1400,
            publish_errors: 0,
            publish_unanswered: 0,
            reconnected: 1999,
            reconnect_failures: 1,
            reconnect_retries: 3,
            reconnect_ms_p50: 210.5,
            reconnect_ms_p99: 812.25,
            reconnect_ms_max: 990.0,
            all_back_ms: 990.125,
            recovered: 1990,
            not_recovered: 9,
            epoch_changes: 0,
            expected_deliveries_total: 280_000,
            received_total: 279_900,
            lost: 100,
            lost_in_gaps: 100,
            undelivered_at_end: 0,
            duplicates: 0,
            epoch_mismatches: 0,
            unexpected_frames: 0,
            subscribers_closed_early: 1,
            reconnect_ms: vec![210.5, 990.0],
            open_around_drop: vec![(0.0, 2000.0), (990.0, 1999.0)],
            reconnect_percentiles: Vec::new(),
        };
        let page = html_report(&result).expect("a page").finish();
        let (sentence, figures) = headline(&page);
        assert_eq!(
            sentence,
            "1,999 of 2,000 subscribers back on another target 990 ms after the drop (p99 812 \
             ms), 1,990 recovered with since; 279,900 of 280,000 expected deliveries; 100 lost, 1 \
             subscribers closed early."
        );
        let json = serde_json::to_value(&result).expect("JSON");
        assert_eq!(figures.len(), 8, "{figures:?}");
        for (key, value) in &figures {
            assert_eq!(value, &json[key.as_str()], "{key}");
        }
        for bad in ["reconnect_failures", "not_recovered", "lost"] {
            assert!(
                page.contains(&format!("class=\"figure bad\" data-key=\"{bad}\"")),
                "{bad}"
            );
        }
        assert!(page.find("class=\"headline\"") < page.find("<h2>Parameters</h2>"));
    }
}
