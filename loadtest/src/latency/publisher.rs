//! The publishers of scenario `latency`: each writes `publish` frames on its own schedule and
//! reads the node's replies on the other half of its connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::shared::{PublisherStats, Shared, latency_histogram};
use crate::ws::{Incoming, Socket};

type PublishSink = futures_util::stream::SplitSink<Socket, Message>;
type ReplyStream = futures_util::stream::SplitStream<Socket>;

/// Writes `publish` frames on a fixed schedule from `first` until `end`; each carries its write
/// time on the common clock and its sequence number (also its request id).
pub async fn publish(
    mut sink: PublishSink,
    shared: Arc<Shared>,
    period: Duration,
    first: tokio::time::Instant,
    end: tokio::time::Instant,
    give_up: tokio::time::Instant,
) -> Result<PublisherStats> {
    let mut stats = PublisherStats {
        sent: 0,
        sent_in_window: 0,
        lag: latency_histogram(),
    };
    let mut schedule = tokio::time::interval_at(first, period);
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let rooms = shared.rooms.len() as u64;
    loop {
        let scheduled = schedule.tick().await;
        if scheduled >= end {
            break;
        }
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        let room = &shared.rooms[(seq % rooms) as usize];
        let sent_us = shared.now_us();
        stats
            .lag
            .saturating_record(sent_us.saturating_sub(shared.us_at(scheduled)).max(1));
        let frame = format!(
            r#"{{"type":"publish","room":{room},"data":{{"t":{sent_us},"s":{seq}}},"id":{}}}"#,
            seq + 1
        );
        tokio::time::timeout_at(give_up, sink.send(Message::text(frame)))
            .await
            .context("publisher stalled: the node stopped reading")??;
        stats.sent += 1;
        if shared.in_window(sent_us) {
            stats.sent_in_window += 1;
        }
    }
    Ok(stats)
}

/// Reads a publisher's replies: the offset each publish got, or its error.
pub async fn read_replies(
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
            Some(Err(error)) => {
                eprintln!("publisher connection failed: {error}");
                break;
            }
            None => {
                eprintln!("publisher connection closed by the node");
                break;
            }
        };
        let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(text.as_str()) else {
            continue;
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
