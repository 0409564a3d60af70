//! Scenario `latency`: publishes at a held rate on one node, subscribes on others, and reports
//! end-to-end delivery latency, loss, duplicates, CPU use and (with --redis-url) Redis commands
//! per published message.

mod publisher;
mod shared;
mod subscriber;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio::sync::watch;

use self::shared::{Shared, SubscriberStats, latency_histogram};
use self::subscriber::SETUP_STEP_TIMEOUT;
use crate::cli::{LatencyArgs, RunArgs};
use crate::codec::Codec;
use crate::payload::Payload;
use crate::procfs::{CpuSample, cpu_use};
use crate::progress;
use crate::protocol::Protocol;
use crate::redis_info::{redis_addr, redis_cost, redis_snapshot};
use crate::report::{DeliveryFigures, LatencyResult, emit, ms, round3};
use crate::transport::Transport;
use crate::ws::{run_tag, url_addr};

pub async fn run(args: LatencyArgs) -> Result<()> {
    args.check()?;
    let plan = Plan {
        redis: args.redis_url.as_deref().map(redis_addr).transpose()?,
        baseline_secs: args.baseline_secs.unwrap_or(args.run.duration_secs),
        ..Plan::new(
            &args.run,
            vec![(args.publish_url.clone(), url_addr(&args.publish_url)?)],
            args.subscribe_urls
                .iter()
                .map(|url| Ok((url.clone(), url_addr(url)?)))
                .collect::<Result<Vec<_>>>()?,
            (args.rooms, args.subscribers_per_room),
            (Protocol::Switchboard, Transport::Websocket),
        )
    };
    let figures = measure(&plan).await?;
    let result = LatencyResult {
        publish_url: args.publish_url.clone(),
        subscribe_urls: args.subscribe_urls.clone(),
        rooms: args.rooms,
        subscribers_per_room: args.subscribers_per_room,
        subscribers: plan.subscribers(),
        publishers: plan.publishers,
        rate_target: args.run.rate,
        warmup_secs: args.run.warmup_secs,
        duration_secs: args.run.duration_secs,
        figures,
    };
    emit(&result, args.run.json.as_deref())?;
    if let Some(path) = &args.run.html {
        crate::html::write(path, "latency", &result, &result.figures)?;
    }
    Ok(())
}

/// One publish/subscribe run, already checked: what `latency` and `fanout` both drive.
pub struct Plan {
    /// Publisher i connects to target i mod N.
    pub publish_targets: Vec<(String, SocketAddr)>,
    /// Subscribers spread over these by [`subscriber::target_of`].
    pub subscribe_targets: Vec<(String, SocketAddr)>,
    pub rooms: u64,
    pub subscribers_per_room: u64,
    /// Publisher connections, at most `rate`.
    pub publishers: u64,
    /// Published messages per second, in total.
    pub rate: u64,
    pub duration_secs: u64,
    pub warmup_secs: u64,
    pub drain_secs: u64,
    pub connect_rate: u64,
    pub setup_timeout_secs: u64,
    pub redis: Option<SocketAddr>,
    /// With `redis`: seconds of the idle baseline, 0 for none.
    pub baseline_secs: u64,
    pub cpu_pids: Vec<(String, u32)>,
    /// What every connection speaks; `redis` and the offset checks are switchboard's.
    pub protocol: Protocol,
    /// How every connection reaches its node (switchboard only: the peers are WebSocket ones).
    pub transport: Transport,
    /// The WebSocket codec of every connection (switchboard only).
    pub codec: Codec,
    pub payload: Payload,
}

impl Plan {
    /// A plan with `run`'s publishing, timing and CPU watching, `rooms` × `subscribers_per_room`
    /// subscribers, no Redis figures and no baseline.
    pub fn new(
        run: &RunArgs,
        publish_targets: Vec<(String, SocketAddr)>,
        subscribe_targets: Vec<(String, SocketAddr)>,
        (rooms, subscribers_per_room): (u64, u64),
        (protocol, transport): (Protocol, Transport),
    ) -> Plan {
        Plan {
            publish_targets,
            subscribe_targets,
            rooms,
            subscribers_per_room,
            publishers: run.publishers.min(run.rate),
            rate: run.rate,
            duration_secs: run.duration_secs,
            warmup_secs: run.warmup_secs,
            drain_secs: run.drain_secs,
            connect_rate: run.connect_rate,
            setup_timeout_secs: run.setup_timeout_secs,
            redis: None,
            baseline_secs: 0,
            cpu_pids: run.cpu_pids.clone(),
            protocol,
            transport,
            codec: run.codec,
            payload: run.payload,
        }
    }

    pub fn subscribers(&self) -> u64 {
        self.rooms * self.subscribers_per_room
    }

    /// Subscribers connected to each subscribe target, in order.
    pub fn subscribers_per_target(&self) -> Vec<u64> {
        let targets = self.subscribe_targets.len() as u64;
        let mut counts = vec![0; targets as usize];
        for index in 0..self.subscribers() {
            counts[subscriber::target_of(index, self.rooms, targets)] += 1;
        }
        counts
    }
}

/// Sets up the subscribers and publishers of `plan`, publishes through the warm-up and the
/// measured window, drains, and returns what was measured.
pub async fn measure(plan: &Plan) -> Result<DeliveryFigures> {
    let redis = plan.redis;
    let publishers = plan.publishers;
    let subscribers = plan.subscribers();
    let subscribe_targets = &plan.subscribe_targets;

    let protocol = plan.protocol;
    // Fresh room names per run, so earlier runs against the same Redis do not matter.
    let run = run_tag("lt");
    let rooms = (0..plan.rooms)
        .map(|room| format!("{run}-{room}"))
        .collect();
    let shared = Arc::new(Shared::new(rooms, plan.payload, plan.duration_secs));
    let (stop_tx, stop_rx) = watch::channel(false);

    let setup_bar = progress::counter(subscribers, "subscribers");
    let setup_ticker = tokio::spawn({
        let (shared, bar) = (shared.clone(), setup_bar.clone());
        async move {
            loop {
                bar.set_position(shared.connected.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let subscriber_tasks = subscriber::start(
        &shared,
        (protocol, plan.transport, plan.codec),
        publishers,
        subscribe_targets,
        plan.subscribers_per_room,
        plan.connect_rate,
        Duration::from_secs(plan.setup_timeout_secs),
        &stop_tx,
    )
    .await;
    setup_ticker.abort();
    setup_bar.finish_and_clear();
    let subscriber_tasks = subscriber_tasks?;
    eprintln!(
        "{subscribers} subscribers in {} rooms on {} node(s) after {:.1}s",
        plan.rooms,
        subscribe_targets.len(),
        shared.base.elapsed().as_secs_f64()
    );

    // Publishers, each with its own scheduler, phases spread over one period.
    let mut publisher_sockets = Vec::with_capacity(publishers as usize);
    for index in 0..publishers {
        let (url, target) = &plan.publish_targets[index as usize % plan.publish_targets.len()];
        let socket = tokio::time::timeout(
            SETUP_STEP_TIMEOUT,
            protocol.connect((plan.transport, plan.codec), url, *target, None),
        )
        .await
        .context("publisher connection timed out")??;
        publisher_sockets.push(socket);
    }
    // Idle baseline of the nodes' own Redis traffic.
    let baseline_secs = plan.baseline_secs;
    let mut baseline = None;
    if let (Some(addr), true) = (redis, baseline_secs > 0) {
        eprintln!("measuring the idle Redis baseline for {baseline_secs}s");
        let before = redis_snapshot(addr).await?;
        tokio::time::sleep(Duration::from_secs(baseline_secs)).await;
        let after = redis_snapshot(addr).await?;
        baseline = Some((before, after, baseline_secs));
    }

    let period = Duration::from_secs_f64(publishers as f64 / plan.rate as f64);
    let start_at = tokio::time::Instant::now() + Duration::from_millis(200);
    let measure_at = start_at + Duration::from_secs(plan.warmup_secs);
    let end_at = measure_at + Duration::from_secs(plan.duration_secs);
    let drain_deadline = end_at + Duration::from_secs(plan.drain_secs);
    shared.set_window(measure_at, end_at);
    let mut publisher_tasks = Vec::with_capacity(2 * publishers as usize);
    let mut schedules_done = Vec::with_capacity(publishers as usize);
    for (index, socket) in publisher_sockets.into_iter().enumerate() {
        let (sink, stream) = socket.split();
        let pong = Arc::new(tokio::sync::Notify::new());
        publisher_tasks.push(tokio::spawn(publisher::read_replies(
            stream,
            shared.clone(),
            protocol,
            pong.clone(),
            stop_rx.clone(),
        )));
        let schedule = publisher::Schedule {
            index,
            period,
            first: start_at + period.mul_f64(index as f64 / publishers as f64),
            end: end_at,
            give_up: drain_deadline,
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        schedules_done.push(done_rx);
        publisher_tasks.push(tokio::spawn(publisher::publish(
            sink,
            shared.clone(),
            protocol,
            schedule,
            pong,
            done_tx,
            stop_rx.clone(),
        )));
    }
    eprintln!(
        "publishing {} msgs/s from {publishers} connection(s): {}s warm-up, {}s measured",
        plan.rate, plan.warmup_secs, plan.duration_secs
    );

    // CPU and Redis counters around the measured window.
    let mut watched = vec![("loadtest".to_owned(), std::process::id())];
    watched.extend(plan.cpu_pids.iter().cloned());
    tokio::time::sleep_until(measure_at).await;
    let cpu_before = CpuSample::take(&watched);
    let redis_before = match redis {
        Some(addr) => Some(redis_snapshot(addr).await),
        None => None,
    };
    let connections_by_second = watch_window(&shared, measure_at, plan.duration_secs).await;
    tokio::time::sleep_until(end_at).await;
    let cpu_after = CpuSample::take(&watched);
    let redis_after = match redis {
        Some(addr) => Some(redis_snapshot(addr).await),
        None => None,
    };
    let cpu = cpu_use(&watched, &cpu_before, &cpu_after, plan.duration_secs);

    let mut lag = latency_histogram();
    let (mut sent, mut sent_in_window, mut publishers_failed) = (0u64, 0u64, 0u64);
    for done in schedules_done {
        let stats = done.await.context("publisher task")?;
        sent += stats.sent;
        sent_in_window += stats.sent_in_window;
        publishers_failed += u64::from(stats.failed);
        lag.add(&stats.lag).ok();
    }

    // Drain: every publish answered, every acknowledged (switchboard) or written (the peers)
    // message delivered, or the deadline.
    let switchboard = protocol == Protocol::Switchboard;
    let room_count = |room: usize| {
        if switchboard {
            shared.room_last[room].load(Ordering::SeqCst)
        } else {
            shared.room_published[room].load(Ordering::SeqCst)
        }
    };
    let expected_total = || (0..plan.rooms as usize).map(room_count).sum::<u64>();
    loop {
        let answered = !switchboard || shared.answered.load(Ordering::SeqCst) >= sent;
        // Rooms are fresh, so every subscriber starts at offset 0 (checked per subscriber below),
        // and every subscriber was subscribed before the first publish.
        let delivered =
            shared.received.load(Ordering::SeqCst) >= expected_total() * plan.subscribers_per_room;
        if (answered && delivered) || tokio::time::Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for task in publisher_tasks {
        let _ = task.await;
    }

    let mut totals = SubscriberStats::default();
    let mut expected_deliveries = 0u64;
    let mut closed_early = 0u64;
    let mut undelivered_at_end = 0u64;
    let mut wire_bytes = Some(0u64);
    for task in subscriber_tasks {
        let Some(stats) = task.await.context("subscriber task")? else {
            continue;
        };
        let last = room_count(stats.room);
        expected_deliveries += last.saturating_sub(stats.start_offset);
        undelivered_at_end += if switchboard {
            last.saturating_sub(stats.last_offset)
        } else {
            // Published to the room after the last message seen from each publisher.
            last.saturating_sub(stats.last_seq.iter().sum())
        };
        totals.gaps += stats.gaps;
        totals.unique += stats.unique;
        totals.duplicates += stats.duplicates;
        totals.epoch_mismatches += stats.epoch_mismatches;
        totals.unexpected += stats.unexpected;
        totals.in_window += stats.in_window;
        totals.received_in_window += stats.received_in_window;
        totals.json_bytes_in_window += stats.json_bytes_in_window;
        wire_bytes = wire_bytes
            .zip(stats.wire_bytes_in_window)
            .map(|(a, b)| a + b);
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
            plan.duration_secs,
            baseline.as_ref(),
        )),
        (Some(Err(error)), _) | (_, Some(Err(error))) => {
            eprintln!("reading Redis INFO failed: {error:#}");
            None
        }
        _ => None,
    };
    let window = plan.duration_secs as f64;
    let answered = shared.answered.load(Ordering::SeqCst);
    // Every watched process but this harness is a server (nodes, peers, their Redis).
    let server_cpu_percent = (watched.len() > 1).then(|| {
        let harness = &watched[0].0;
        round3(
            cpu.by_name
                .iter()
                .filter(|(name, _)| *name != harness)
                .map(|(_, percent)| percent)
                .sum(),
        )
    });
    let server_cpu_secs_per_million_deliveries = server_cpu_percent
        .filter(|_| totals.received_in_window > 0)
        .map(|percent| round3(percent / 100.0 * window / totals.received_in_window as f64 * 1e6));
    let per_delivery = |bytes: u64| {
        (totals.received_in_window > 0)
            .then(|| round3(bytes as f64 / totals.received_in_window as f64))
    };
    Ok(DeliveryFigures {
        wire_bytes_per_delivery: wire_bytes.and_then(per_delivery),
        json_bytes_per_delivery: per_delivery(totals.json_bytes_in_window),
        published: sent_in_window,
        published_per_sec: round3(sent_in_window as f64 / window),
        published_total: sent,
        publish_errors: shared.publish_errors.load(Ordering::SeqCst),
        publish_unanswered: switchboard.then(|| sent.saturating_sub(answered)),
        publishers_failed,
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
        latency_ms_p50_by_second: by_second_quantile(&shared, 0.5),
        latency_ms_p99_by_second: by_second_quantile(&shared, 0.99),
        delivered_by_second: shared
            .delivered_by_second
            .iter()
            .map(|count| count.load(Ordering::SeqCst))
            .collect(),
        connections_by_second,
        latency_percentiles: crate::html::percentile_curve(&histogram),
        expected_deliveries_total: expected_deliveries,
        received_total: totals.unique,
        lost: expected_deliveries.saturating_sub(totals.unique),
        lost_in_gaps: totals.gaps,
        undelivered_at_end,
        duplicates: totals.duplicates,
        epoch_mismatches: totals.epoch_mismatches,
        subscribers_closed_early: closed_early,
        unexpected_frames: totals.unexpected,
        cpu_percent: cpu.by_name,
        machine_cpu_percent: cpu.machine,
        other_processes_cpu_percent: cpu.others,
        server_cpu_percent,
        server_cpu_secs_per_million_deliveries,
        redis: redis_cost,
    })
}

/// Through the measured window from `start`: samples the open subscriber connections at the start
/// of each second, and shows elapsed seconds and delivered/s on a progress line.
async fn watch_window(shared: &Shared, start: tokio::time::Instant, secs: u64) -> Vec<u64> {
    let bar = progress::window(secs, "measuring");
    let mut samples = Vec::with_capacity(secs as usize);
    let mut received = shared.received.load(Ordering::Relaxed);
    for second in 0..secs {
        tokio::time::sleep_until(start + Duration::from_secs(second)).await;
        samples.push(shared.connected.load(Ordering::Relaxed));
        let now = shared.received.load(Ordering::Relaxed);
        bar.set_position(second);
        if second > 0 {
            bar.set_message(format!("{} delivered/s", now - received));
        }
        received = now;
    }
    tokio::time::sleep_until(start + Duration::from_secs(secs)).await;
    bar.finish_and_clear();
    samples
}

/// Latency (ms) at `quantile` of the messages sent in each second of the window.
fn by_second_quantile(shared: &Shared, quantile: f64) -> Vec<f64> {
    shared
        .histograms_by_second
        .iter()
        .map(|histogram| {
            let histogram = histogram.lock().expect("histogram lock");
            if histogram.is_empty() {
                0.0
            } else {
                ms(histogram.value_at_quantile(quantile))
            }
        })
        .collect()
}
