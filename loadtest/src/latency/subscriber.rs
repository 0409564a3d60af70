//! The subscribers of scenarios `latency` and `fanout`: opened at a held rate and subscribed, then
//! each reads its messages, timing them and checking their order: by room offset on switchboard,
//! by each publisher's sequence numbers on the peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use super::shared::{HISTOGRAM_SHARDS, Shared, SubscriberStats};
use crate::codec::Codec;
use crate::protocol::{Frame, Protocol};
use crate::sequence::advance;
use crate::transport::{Conn, Transport};
use crate::ws::{Next, await_setup, next_text};

/// Bound on each connection's handshake plus subscribe.
pub const SETUP_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The target subscriber `index` connects to: subscriber j of room k (index j × rooms + k) goes
/// to target (j + k) mod N, so every room spans the targets and, even with one subscriber per
/// room, the rooms spread over them.
pub fn target_of(index: u64, rooms: u64, targets: u64) -> usize {
    ((index / rooms + index % rooms) % targets) as usize
}

/// Opens `subscribers_per_room` subscribers for every room at `connect_rate` per second and waits
/// until all are subscribed, spread over the targets by [`target_of`]. Each task then reads
/// until `stop` and returns what its subscriber saw of the messages of `publishers` publishers.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    shared: &Arc<Shared>,
    (protocol, transport, codec): (Protocol, Transport, Codec),
    publishers: u64,
    targets: &[(String, SocketAddr)],
    subscribers_per_room: u64,
    connect_rate: u64,
    setup_timeout: Duration,
    stop_tx: &watch::Sender<bool>,
) -> Result<Vec<JoinHandle<Option<SubscriberStats>>>> {
    let rooms = shared.rooms.len() as u64;
    let subscribers = rooms * subscribers_per_room;
    let setup_deadline = tokio::time::Instant::now() + setup_timeout;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<()>>();
    let mut schedule = tokio::time::interval(Duration::from_secs_f64(1.0 / connect_rate as f64));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(subscribers as usize);
    for index in 0..subscribers {
        schedule.tick().await;
        if tokio::time::Instant::now() > setup_deadline {
            bail!("timed out while opening subscriber connections");
        }
        let room = (index % rooms) as usize;
        let (url, target) = targets[target_of(index, rooms, targets.len() as u64)].clone();
        let shared = shared.clone();
        let ready_tx = ready_tx.clone();
        let stop = stop_tx.subscribe();
        let shard = (index % HISTOGRAM_SHARDS) as usize;
        tasks.push(tokio::spawn(async move {
            let setup = tokio::time::timeout(
                SETUP_STEP_TIMEOUT,
                protocol.subscribe((transport, codec), &url, target, &shared.rooms[room]),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no subscribe reply in 30s")));
            match setup {
                Ok((socket, position)) => {
                    shared.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = ready_tx.send(Ok(()));
                    let (start_offset, epoch) = position.unzip();
                    let start_offset = start_offset.unwrap_or(0);
                    let stats = SubscriberStats {
                        room,
                        start_offset,
                        last_offset: start_offset,
                        last_seq: match protocol {
                            Protocol::Switchboard => Vec::new(),
                            _ => vec![0; publishers as usize],
                        },
                        wire_bytes_in_window: socket.received_wire_bytes().map(|_| 0),
                        ..SubscriberStats::default()
                    };
                    let connected = shared.clone();
                    let stats = receive(socket, protocol, stats, epoch, shard, shared, stop).await;
                    connected.connected.fetch_sub(1, Ordering::Relaxed);
                    Some(stats)
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    None
                }
            }
        }));
    }
    drop(ready_tx);
    if let Err(error) = await_setup(&mut ready_rx, subscribers, setup_deadline).await {
        let _ = stop_tx.send(true);
        return Err(error);
    }
    Ok(tasks)
}

/// Reads a subscriber's messages until told to stop: latency of each, and its order checked
/// against the last one seen (switchboard: the room offset, in `epoch`; the peers: the sender's
/// sequence number).
async fn receive(
    mut socket: Conn,
    protocol: Protocol,
    mut stats: SubscriberStats,
    mut epoch: Option<String>,
    shard: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberStats {
    loop {
        let wire_before = socket.received_wire_bytes();
        let text = match next_text(&mut socket, &mut stop).await {
            Next::Text(text) => text,
            Next::Stop => break,
            Next::Closed => {
                stats.closed_early = true;
                break;
            }
        };
        let received_us = shared.now_us();
        let (stamp, offset, message_epoch) = match protocol.parse(text.as_str()) {
            Frame::Delivery {
                stamp,
                offset,
                epoch,
            } => (stamp, offset, epoch),
            Frame::Ping => {
                if socket.send(Message::text(Protocol::PONG)).await.is_err() {
                    stats.closed_early = true;
                    break;
                }
                continue;
            }
            _ => {
                stats.unexpected += 1;
                continue;
            }
        };
        match offset {
            Some(offset) => {
                if message_epoch != epoch.as_deref() {
                    match message_epoch {
                        // A room without state answers an epoch it does not keep; its first
                        // message brings the epoch its first publish made.
                        Some(first) if stats.last_offset == 0 => epoch = Some(first.to_owned()),
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
            }
            None => {
                let Some(last) = stats.last_seq.get_mut(stamp.p) else {
                    stats.unexpected += 1;
                    continue;
                };
                if !advance(last, stamp.s, &mut stats.duplicates, &mut stats.gaps) {
                    continue;
                }
            }
        }
        stats.unique += 1;
        shared.received.fetch_add(1, Ordering::Relaxed);
        if shared.in_window(received_us) {
            stats.received_in_window += 1;
            stats.json_bytes_in_window += text.len() as u64;
            stats.wire_bytes_in_window = stats
                .wire_bytes_in_window
                .zip(socket.received_wire_bytes().zip(wire_before))
                .map(|(sum, (after, before))| sum + (after - before));
            let second = (received_us - shared.window_start_us.load(Ordering::Relaxed)) / 1_000_000;
            if let Some(count) = shared.delivered_by_second.get(second as usize) {
                count.fetch_add(1, Ordering::Relaxed);
            }
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
            if let Some(histogram) = shared.histograms_by_second.get(second as usize) {
                histogram
                    .lock()
                    .expect("histogram lock")
                    .saturating_record(micros);
            }
        }
    }
    socket.end().await;
    stats
}
