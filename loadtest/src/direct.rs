//! Scenario `direct`: users on different nodes messaging each other with `send`. Each user holds
//! one session (on the targets round-robin, named with `?user=`), sends to a partner on another
//! target at its share of a held total rate, and the receivers time each `direct` frame and check
//! the per-sender sequence for loss and duplicates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{DirectArgs, OutputArgs};
use crate::html::{self, Figure, Numbers, Page};
use crate::redis_info::{RedisSnapshot, redis_addr, redis_cost, redis_snapshot_of};
use crate::report::{RedisCost, emit, ms, round3};
use crate::sequence::advance;
use crate::ws::{Next, Socket, next_text, open, run_tag, url_addr};

type Sink = futures_util::stream::SplitSink<Socket, Message>;
type Stream = futures_util::stream::SplitStream<Socket>;

/// Bound on each connection's handshake.
const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Latencies are recorded in microseconds up to this; longer ones count as this.
const LATENCY_CEILING_US: u64 = 60_000_000;

#[derive(Serialize)]
pub struct DirectResult {
    pub urls: Vec<String>,
    pub users: u64,
    pub users_per_url: Vec<u64>,
    /// Pairs whose sender and receiver are on different targets.
    pub cross_target_pairs: u64,
    pub rate_target: u64,
    pub duration_secs: u64,
    pub sent: u64,
    pub sent_per_sec: f64,
    /// Unique `direct` frames received.
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub lost: u64,
    pub lost_in_gaps: u64,
    pub duplicates: u64,
    /// `send` replies that listed no session of the receiver.
    pub sent_to_no_session: u64,
    pub send_errors: u64,
    pub send_unanswered: u64,
    pub unexpected_frames: u64,
    pub users_closed_early: u64,
    #[serde(flatten)]
    pub figures: DirectFigures,
}

/// The figures `direct` and `direct --persist` report alike, flattened into their results (the
/// JSON keeps its flat keys).
#[derive(Serialize, Default)]
pub struct DirectFigures {
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    pub latency_ms_mean: f64,
    /// `send` frames written, and unique `direct` frames received, in each second from the
    /// start of sending (the drain included, trailing empty seconds left out).
    pub sent_by_second: Vec<u64>,
    pub delivered_by_second: Vec<u64>,
    /// With --redis-url: Redis commands from the start of sending to the end of the drain, per
    /// message sent (`*_per_publish` fields).
    pub redis: Option<RedisCost>,
    /// The latency distribution as (percentile, milliseconds) points, for the HTML report.
    #[serde(skip)]
    pub latency_percentiles: Vec<(f64, f64)>,
}

impl DirectFigures {
    /// The figures of a run of `duration_secs` from what `shared` counted, with the Redis cost of
    /// `sent` messages when both snapshots were taken.
    pub fn measure(
        shared: &Shared,
        duration_secs: u64,
        sent: u64,
        redis: (Option<&RedisSnapshot>, Option<&RedisSnapshot>),
    ) -> DirectFigures {
        let histogram = shared.histogram.lock().expect("histogram lock").clone();
        DirectFigures {
            latency_ms_p50: ms(histogram.value_at_quantile(0.5)),
            latency_ms_p90: ms(histogram.value_at_quantile(0.9)),
            latency_ms_p99: ms(histogram.value_at_quantile(0.99)),
            latency_ms_p999: ms(histogram.value_at_quantile(0.999)),
            latency_ms_max: ms(histogram.max()),
            latency_ms_mean: round3(histogram.mean() / 1000.0),
            sent_by_second: trimmed(&shared.sent_by_second, duration_secs as usize),
            delivered_by_second: trimmed(&shared.delivered_by_second, duration_secs as usize),
            latency_percentiles: html::percentile_curve(&histogram),
            redis: match redis {
                (Some(before), Some(after)) => {
                    Some(redis_cost(before, after, sent, duration_secs, None))
                }
                _ => None,
            },
        }
    }

    /// Prints `result` (and with --json writes it); with --html writes its report: the
    /// headline, the `parameters` keys, the summary, the latency distribution (`latency_title`)
    /// and the throughput per second.
    pub fn emit(
        &self,
        result: &impl Serialize,
        output: &OutputArgs,
        scenario: &str,
        parameters: &[&str],
        latency_title: &str,
    ) -> Result<()> {
        emit(result, output.json.as_deref())?;
        let Some(path) = &output.html else {
            return Ok(());
        };
        self.page(result, scenario, parameters, latency_title)?
            .write(path)
    }

    /// The HTML report of `result` ([`DirectFigures::emit`]).
    fn page(
        &self,
        result: &impl Serialize,
        scenario: &str,
        parameters: &[&str],
        latency_title: &str,
    ) -> Result<Page> {
        let all = serde_json::to_value(result)?;
        // `direct --persist` results also count what the storm and the inboxes did.
        let figures: Vec<Figure<'_>> = [
            ("delivered_per_sec", "delivered/s", false),
            ("sent_per_sec", "sent/s", false),
            ("latency_ms_p50", "p50 ms", false),
            ("latency_ms_p99", "p99 ms", false),
            ("lost", "lost", true),
            ("duplicates", "duplicates", true),
            ("redelivered_after_ack", "redelivered after ack", true),
            ("reconnect_failures", "not reconnected", true),
            ("send_errors", "send errors", true),
            ("users_closed_early", "users closed", true),
        ]
        .into_iter()
        .filter(|(key, _, _)| all.get(key).is_some())
        .map(|(key, label, bad)| {
            if bad {
                Figure::bad(&all, key, label)
            } else {
                Figure::of(&all, key, label)
            }
        })
        .collect();
        let mut page = Page::new(scenario);
        page.headline(&direct_sentence(&all), &figures);
        page.result_tables(result, |key| parameters.contains(&key))?;
        page.direct_sections(
            latency_title,
            [
                self.latency_ms_p50,
                self.latency_ms_p90,
                self.latency_ms_p99,
                self.latency_ms_p999,
                self.latency_ms_max,
            ],
            &self.latency_percentiles,
            &self.sent_by_second,
            &self.delivered_by_second,
        );
        Ok(page)
    }
}

/// What a `direct` run did, in one sentence: messages delivered against those sent (stored, with
/// --persist), between how many users, how fast, and what was lost; with a reconnect storm, how
/// many users came back.
fn direct_sentence(result: &Value) -> String {
    let numbers = Numbers(result);
    let (of, what) = if result.get("stored").is_some() {
        ("stored", "stored messages")
    } else {
        ("sent", "messages")
    };
    let storm = if result
        .get("drop_after_secs")
        .is_some_and(|secs| !secs.is_null())
    {
        format!(
            "; {} users back after the reconnect storm",
            numbers.whole("reconnected")
        )
    } else {
        String::new()
    };
    format!(
        "{} of {} {what} delivered between {} users ({} sent/s); {} delivered/s over the {}s of \
         sending, p99 {} ms{storm}; {}",
        numbers.whole("delivered"),
        numbers.whole(of),
        numbers.whole("users"),
        numbers.short("sent_per_sec"),
        numbers.whole("delivered_per_sec"),
        numbers.whole("duration_secs"),
        numbers.short("latency_ms_p99"),
        numbers.losses("lost", "users_closed_early", "users"),
    )
}

/// Who is who in a run: each user's name and partner, and how the users spread over the targets.
pub struct Pairing {
    pub names: Vec<String>,
    pub partners: Vec<u64>,
    /// Pairs whose partners are on different targets.
    pub cross_target_pairs: u64,
    pub users_per_url: Vec<u64>,
}

impl Pairing {
    /// `users` users named after `user_prefix` and a run tag, on `target_count` targets
    /// round-robin.
    pub fn new(user_prefix: &str, users: u64, target_count: u64) -> Pairing {
        let run_id = run_tag("");
        let names: Vec<String> = (0..users)
            .map(|index| format!("{user_prefix}-{run_id}-{index}"))
            .collect();
        let partners: Vec<u64> = (0..users)
            .map(|index| partner_of(index, users, target_count))
            .collect();
        let cross_target_pairs = (0..users)
            .filter(|&index| index % target_count != partners[index as usize] % target_count)
            .count() as u64;
        let mut users_per_url = vec![0u64; target_count as usize];
        for index in 0..users {
            users_per_url[(index % target_count) as usize] += 1;
        }
        Pairing {
            names,
            partners,
            cross_target_pairs,
            users_per_url,
        }
    }
}

/// Each of `urls` with its address.
pub fn targets(urls: &[String]) -> Result<Vec<(String, SocketAddr)>> {
    urls.iter()
        .map(|url| Ok((url.clone(), url_addr(url)?)))
        .collect()
}

/// Shared by every user of one run (of `direct`, and of `direct --persist`).
pub struct Shared {
    base: Instant,
    pub histogram: Mutex<Histogram<u64>>,
    received: AtomicU64,
    /// When sending starts, µs on the common clock.
    pub start_us: AtomicU64,
    pub sent_by_second: Vec<AtomicU64>,
    pub delivered_by_second: Vec<AtomicU64>,
}

impl Shared {
    /// Counters for a run of `seconds` seconds (sending and drain).
    pub fn new(seconds: u64) -> Shared {
        Shared {
            base: Instant::now(),
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, LATENCY_CEILING_US, 3)
                    .expect("valid histogram bounds"),
            ),
            received: AtomicU64::new(0),
            start_us: AtomicU64::new(0),
            sent_by_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            delivered_by_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Counts one event at `at_us` (common clock) in its second of `by_second`.
    pub fn count(&self, by_second: &[AtomicU64], at_us: u64) {
        let second = at_us.saturating_sub(self.start_us.load(Ordering::Relaxed)) / 1_000_000;
        if let Some(slot) = by_second.get(second as usize) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Per-second counts, trailing empty seconds after the first `keep` left out.
pub fn trimmed(by_second: &[AtomicU64], keep: usize) -> Vec<u64> {
    let mut counts: Vec<u64> = by_second
        .iter()
        .map(|count| count.load(Ordering::SeqCst))
        .collect();
    while counts.len() > keep && counts.last() == Some(&0) {
        counts.pop();
    }
    counts
}

/// What one user's reading half saw.
#[derive(Default)]
struct ReaderStats {
    unique: u64,
    duplicates: u64,
    gaps: u64,
    answered: u64,
    no_session: u64,
    errors: u64,
    unexpected: u64,
    closed_early: bool,
}

/// The fields of a server frame this scenario reads.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    sessions: Option<u64>,
    #[serde(default)]
    data: Option<Payload>,
}

/// What a `send` carries: send time (µs on the common clock), sender index, per-pair sequence
/// (from 1).
#[derive(Deserialize)]
struct Payload {
    t: u64,
    f: u64,
    s: u64,
}

/// The partner of user `index`: the next user (wrapping) on another target, or the next user when
/// there is one target.
pub fn partner_of(index: u64, users: u64, targets: u64) -> u64 {
    let own = index % targets;
    (1..users)
        .map(|step| (index + step) % users)
        .find(|other| targets == 1 || other % targets != own)
        .unwrap_or((index + 1) % users)
}

/// `url` with `?user=` (or `&user=`) appended.
pub fn with_user(url: &str, user: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}user={user}")
}

pub async fn run(args: DirectArgs) -> Result<()> {
    if args.persist {
        return crate::persist::run(args).await;
    }
    args.check()?;
    let redis = args.redis_url.as_deref().map(redis_addr).transpose()?;
    let targets = targets(&args.urls)?;
    let target_count = targets.len() as u64;
    let users = args.users;
    let pairing = Pairing::new(&args.user_prefix, users, target_count);

    let seconds = args.duration_secs + args.common.drain_secs + 2;
    let shared = Arc::new(Shared::new(seconds));

    // Every user connected before anyone sends.
    let setup_deadline =
        tokio::time::Instant::now() + Duration::from_secs(args.common.setup_timeout_secs);
    let mut schedule = tokio::time::interval(Duration::from_secs_f64(
        1.0 / args.common.connect_rate as f64,
    ));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut opening = Vec::with_capacity(users as usize);
    for index in 0..users {
        schedule.tick().await;
        let (url, addr) = targets[(index % target_count) as usize].clone();
        let url = with_user(&url, &pairing.names[index as usize]);
        opening.push(tokio::spawn(async move {
            tokio::time::timeout(SETUP_STEP_TIMEOUT, open(&url, addr, None))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no welcome in 30s")))
        }));
    }
    let mut sockets = Vec::with_capacity(users as usize);
    for task in opening {
        let socket = tokio::time::timeout_at(setup_deadline, task)
            .await
            .context("timed out opening user connections")?
            .context("connect task")??;
        sockets.push(socket);
    }
    eprintln!(
        "{users} users on {} target(s) after {:.1}s",
        targets.len(),
        shared.base.elapsed().as_secs_f64()
    );
    // Let the session registry settle before the first send.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = redis_snapshot_of(redis).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let period = Duration::from_secs_f64(users as f64 / args.rate as f64);
    let start_at = tokio::time::Instant::now() + Duration::from_millis(100);
    shared
        .start_us
        .store(shared.now_us() + 100_000, Ordering::SeqCst);
    let end_at = start_at + Duration::from_secs(args.duration_secs);
    let drain_deadline = end_at + Duration::from_secs(args.common.drain_secs);
    let mut readers = Vec::with_capacity(users as usize);
    let mut writers = Vec::with_capacity(users as usize);
    for (index, socket) in sockets.into_iter().enumerate() {
        let (sink, stream) = socket.split();
        readers.push(tokio::spawn(read(stream, shared.clone(), stop_rx.clone())));
        let first = start_at + period.mul_f64(index as f64 / users as f64);
        let to = serde_json::to_string(&pairing.names[pairing.partners[index] as usize])?;
        writers.push(tokio::spawn(write(
            sink,
            shared.clone(),
            index as u64,
            to,
            period,
            first,
            end_at,
            drain_deadline,
        )));
    }
    eprintln!(
        "sending {} msgs/s from {users} users for {}s",
        args.rate, args.duration_secs
    );

    let mut sent = 0u64;
    let mut sinks = Vec::with_capacity(users as usize);
    for task in writers {
        let (sink, count) = task.await.context("sender task")??;
        sent += count;
        sinks.push(sink);
    }
    while shared.received.load(Ordering::SeqCst) < sent
        && tokio::time::Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Replies trail deliveries a little; give them a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = redis_snapshot_of(redis).await?;
    let _ = stop_tx.send(true);
    let mut totals = ReaderStats::default();
    let mut closed_early = 0u64;
    for task in readers {
        let stats = task.await.context("reader task")?;
        totals.unique += stats.unique;
        totals.duplicates += stats.duplicates;
        totals.gaps += stats.gaps;
        totals.answered += stats.answered;
        totals.no_session += stats.no_session;
        totals.errors += stats.errors;
        totals.unexpected += stats.unexpected;
        closed_early += u64::from(stats.closed_early);
    }
    for mut sink in sinks {
        let _ = sink.close().await;
    }

    let window = args.duration_secs as f64;
    let result = DirectResult {
        urls: args.urls.clone(),
        users,
        users_per_url: pairing.users_per_url,
        cross_target_pairs: pairing.cross_target_pairs,
        rate_target: args.rate,
        duration_secs: args.duration_secs,
        sent,
        sent_per_sec: round3(sent as f64 / window),
        delivered: totals.unique,
        delivered_per_sec: round3(totals.unique as f64 / window),
        lost: sent.saturating_sub(totals.unique),
        lost_in_gaps: totals.gaps,
        duplicates: totals.duplicates,
        sent_to_no_session: totals.no_session,
        send_errors: totals.errors,
        send_unanswered: sent.saturating_sub(totals.answered + totals.errors),
        unexpected_frames: totals.unexpected,
        users_closed_early: closed_early,
        figures: DirectFigures::measure(
            &shared,
            args.duration_secs,
            sent,
            (before.as_ref(), after.as_ref()),
        ),
    };
    result.figures.emit(
        &result,
        &args.common.output,
        "direct",
        &[
            "urls",
            "users",
            "users_per_url",
            "cross_target_pairs",
            "rate_target",
            "duration_secs",
        ],
        "Send to delivery (ms)",
    )
}

/// Writes `send` frames to `to` (JSON-encoded) on a fixed schedule from `first` until `end`;
/// returns the sink and how many were sent.
#[allow(clippy::too_many_arguments)]
async fn write(
    mut sink: Sink,
    shared: Arc<Shared>,
    from: u64,
    to: String,
    period: Duration,
    first: tokio::time::Instant,
    end: tokio::time::Instant,
    give_up: tokio::time::Instant,
) -> Result<(Sink, u64)> {
    let mut schedule = tokio::time::interval_at(first, period);
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0u64;
    loop {
        if schedule.tick().await >= end {
            break;
        }
        seq += 1;
        let t = shared.now_us();
        shared.count(&shared.sent_by_second, t);
        let frame = format!(
            r#"{{"type":"send","to":{to},"data":{{"t":{t},"f":{from},"s":{seq}}},"id":{seq}}}"#
        );
        tokio::time::timeout_at(give_up, sink.send(Message::text(frame)))
            .await
            .context("sender stalled: the node stopped reading")??;
    }
    Ok((sink, seq))
}

/// Reads one user's frames until told to stop: replies to its sends, and the `direct` frames
/// addressed to it, timed and checked per sender.
async fn read(
    mut stream: Stream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> ReaderStats {
    let mut stats = ReaderStats::default();
    let mut last_by_sender: HashMap<u64, u64> = HashMap::new();
    loop {
        let text = match next_text(&mut stream, &mut stop).await {
            Next::Text(text) => text,
            Next::Stop => break,
            Next::Closed => {
                stats.closed_early = true;
                break;
            }
        };
        let received_us = shared.now_us();
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
            stats.unexpected += 1;
            continue;
        };
        match (frame.kind, frame.data) {
            ("direct", Some(payload)) => {
                let last = last_by_sender.entry(payload.f).or_insert(0);
                if !advance(last, payload.s, &mut stats.duplicates, &mut stats.gaps) {
                    continue;
                }
                stats.unique += 1;
                shared.received.fetch_add(1, Ordering::Relaxed);
                shared.count(&shared.delivered_by_second, received_us);
                shared
                    .histogram
                    .lock()
                    .expect("histogram lock")
                    .saturating_record(received_us.saturating_sub(payload.t).max(1));
            }
            ("reply", _) => {
                stats.answered += 1;
                if frame.sessions == Some(0) {
                    stats.no_session += 1;
                }
            }
            ("error", _) => stats.errors += 1,
            ("pong", _) => {}
            _ => stats.unexpected += 1,
        }
    }
    stats
}

impl DirectArgs {
    /// Refuses flags outside the bounds one run is meant to hold.
    pub fn check(&self) -> Result<()> {
        if self.users < 2 || self.users > 50_000 {
            bail!("--users must be 2 to 50000");
        }
        if self.rate == 0 || self.rate > 100_000 {
            bail!("--rate must be 1 to 100000");
        }
        if self.duration_secs == 0 || self.duration_secs > 600 {
            bail!("--duration-secs must be 1 to 600");
        }
        if self.user_prefix.is_empty() || self.user_prefix.len() > 64 {
            bail!("--user-prefix must be 1 to 64 bytes");
        }
        if !self.persist && self.drop_after_secs.is_some() {
            bail!("--drop-after-secs needs --persist");
        }
        if self
            .drop_after_secs
            .is_some_and(|secs| secs >= self.duration_secs)
        {
            bail!("--drop-after-secs must be below --duration-secs");
        }
        if self.ack_every == 0 || self.ack_interval_ms > 60_000 {
            bail!("--ack-every must be at least 1, --ack-interval-ms at most 60000");
        }
        self.common.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::html::read_back::headline;

    fn result() -> DirectResult {
        DirectResult {
            urls: vec!["ws://a/ws".to_owned(), "ws://b/ws".to_owned()],
            users: 1200,
            users_per_url: vec![600, 600],
            cross_target_pairs: 1200,
            rate_target: 5000,
            duration_secs: 10,
            sent: 49_990,
            sent_per_sec: 4999.0,
            delivered: 49_985,
            delivered_per_sec: 4998.5,
            lost: 5,
            lost_in_gaps: 2,
            duplicates: 0,
            sent_to_no_session: 0,
            send_errors: 1,
            send_unanswered: 0,
            unexpected_frames: 0,
            users_closed_early: 2,
            figures: DirectFigures {
                latency_ms_p50: 1.25,
                latency_ms_p99: 7.5,
                ..DirectFigures::default()
            },
        }
    }

    #[test]
    fn a_direct_report_opens_with_its_figures() {
        let result = result();
        let page = result
            .figures
            .page(&result, "direct", &["urls"], "Send to delivery (ms)")
            .expect("a page")
            .finish();
        let (sentence, figures) = headline(&page);
        assert_eq!(
            sentence,
            "49,985 of 49,990 messages delivered between 1,200 users (4999 sent/s); 4,999 \
             delivered/s over the 10s of sending, p99 7.5 ms; 5 lost, 2 users closed early."
        );
        let json = serde_json::to_value(&result).expect("JSON");
        let keys: Vec<&str> = figures.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "delivered_per_sec",
                "sent_per_sec",
                "latency_ms_p50",
                "latency_ms_p99",
                "lost",
                "duplicates",
                "send_errors",
                "users_closed_early"
            ]
        );
        for (key, value) in &figures {
            assert_eq!(value, &json[key.as_str()], "{key}");
        }
        assert!(page.contains("class=\"figure bad\" data-key=\"lost\""));
        assert!(page.find("class=\"headline\"") < page.find("<h2>Parameters</h2>"));
    }

    #[test]
    fn a_persisted_run_headline_counts_stored_messages_and_the_storm() {
        let mut json = serde_json::to_value(result()).expect("JSON");
        json["stored"] = 49_000.into();
        json["drop_after_secs"] = 3.into();
        json["reconnected"] = 1198.into();
        json["lost"] = 0.into();
        json["users_closed_early"] = 0.into();
        assert_eq!(
            direct_sentence(&json),
            "49,985 of 49,000 stored messages delivered between 1,200 users (4999 sent/s); 4,999 \
             delivered/s over the 10s of sending, p99 7.5 ms; 1,198 users back after the \
             reconnect storm; nothing lost."
        );
    }
}
