//! The publishers of scenarios `latency` and `fanout`: each writes publish frames on its own
//! schedule and reads what the server sends back on the other half of its connection
//! (switchboard's replies, Engine.IO pings).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use super::shared::{PublisherStats, Shared, latency_histogram};
use crate::protocol::{Frame, Protocol};
use crate::transport::Conn;
use crate::ws::{Next, Stamp, next_text};
use futures_util::SinkExt;

type PublishSink = futures_util::stream::SplitSink<Conn, Message>;
type ReplyStream = futures_util::stream::SplitStream<Conn>;

/// One publisher's place in the run.
pub struct Schedule {
    /// Its index, carried in every payload so subscribers keep one sequence per publisher.
    pub index: usize,
    pub period: Duration,
    pub first: tokio::time::Instant,
    pub end: tokio::time::Instant,
    /// A write still blocked at this point means the server stopped reading.
    pub give_up: tokio::time::Instant,
}

/// Writes publish frames on a fixed schedule from `first` until `end`, rooms round-robin over
/// all publishers; each carries its write time on the common clock, the publisher's index and
/// its sequence number in the room (switchboard's request id is the run-wide sequence number,
/// from which the reply's room follows). A failed or stalled connection ends the schedule early
/// (the run still reports). What was sent goes to `done` at the end of the schedule; a ping
/// (`pong` notified) is answered until `stop`, so a Socket.IO server keeps the connection
/// through the drain.
pub async fn publish(
    mut sink: PublishSink,
    shared: Arc<Shared>,
    protocol: Protocol,
    plan: Schedule,
    pong: Arc<Notify>,
    done: oneshot::Sender<PublisherStats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stats = PublisherStats {
        sent: 0,
        sent_in_window: 0,
        lag: latency_histogram(),
        failed: false,
    };
    let mut schedule = tokio::time::interval_at(plan.first, plan.period);
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let rooms = shared.rooms.len() as u64;
    let mut room_seq = vec![0u64; shared.rooms.len()];
    loop {
        let (frame, published) = tokio::select! {
            biased;
            _ = pong.notified() => (Message::text(Protocol::PONG), None),
            scheduled = schedule.tick() => {
                if scheduled >= plan.end {
                    break;
                }
                let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
                let room = (seq % rooms) as usize;
                room_seq[room] += 1;
                let sent_us = shared.now_us();
                stats
                    .lag
                    .saturating_record(sent_us.saturating_sub(shared.us_at(scheduled)).max(1));
                let stamp = Stamp {
                    t: sent_us,
                    p: plan.index,
                    s: room_seq[room],
                };
                let data = shared.payload.data(&stamp);
                let frame = protocol.publish_frame(&shared.rooms[room], &data, seq + 1);
                (Message::text(frame), Some((room, sent_us)))
            }
        };
        match tokio::time::timeout_at(plan.give_up, sink.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                eprintln!("publisher {} connection failed: {error}", plan.index);
                stats.failed = true;
                break;
            }
            Err(_) => {
                eprintln!(
                    "publisher {} stalled: the server stopped reading",
                    plan.index
                );
                stats.failed = true;
                break;
            }
        }
        if let Some((room, sent_us)) = published {
            shared.room_published[room].fetch_add(1, Ordering::Relaxed);
            stats.sent += 1;
            if shared.in_window(sent_us) {
                stats.sent_in_window += 1;
            }
        }
    }
    let failed = stats.failed;
    let _ = done.send(stats);
    if failed {
        return;
    }
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = pong.notified() => {}
        }
        // A server that stopped reading must not hold the run past `stop`.
        let sent = tokio::select! {
            biased;
            _ = stop.changed() => break,
            sent = sink.send(Message::text(Protocol::PONG)) => sent,
        };
        if sent.is_err() {
            break;
        }
    }
}

/// Reads what the server sends a publisher until `stop`: switchboard's replies (the offset each
/// publish got, or its error) and Engine.IO pings, handed to the writer through `pong`.
pub async fn read_replies(
    mut stream: ReplyStream,
    shared: Arc<Shared>,
    protocol: Protocol,
    pong: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let rooms = shared.rooms.len() as u64;
    loop {
        let text = match next_text(&mut stream, &mut stop).await {
            Next::Text(text) => text,
            Next::Stop => break,
            Next::Closed => {
                eprintln!("publisher connection closed by the server");
                break;
            }
        };
        let incoming = match protocol.parse(text.as_str()) {
            Frame::Answer(incoming) => incoming,
            Frame::Ping => {
                pong.notify_one();
                continue;
            }
            _ => continue,
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
