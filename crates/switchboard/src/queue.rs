//! A session's outbound queue: bounded in bytes, drained by the session's writer in batches.
//!
//! Delivery never waits on a client: a push that would take the queue past its byte limit fails,
//! the queue closes itself with 1013 and drops what it held, and every other session keeps
//! receiving. A `VecDeque` behind a mutex (rather than a channel) costs nothing while idle.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::IntGauge;
use switchboard_protocol::{RoomMessage, close};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// One frame waiting to be written.
pub enum Outbound {
    /// A room message; the writer checks its offset against the session's subscription so a
    /// message is never written twice (at the seam of `since` recovery) or after `unsubscribe`.
    Room {
        message: Arc<RoomMessage>,
        frame: Message,
    },
    /// A persisted direct message; the writer checks its seq against what the session wrote of
    /// the user's inbox, so one is never written twice at the seam of the inbox delivery.
    /// `stored`: read from the inbox (else delivered live).
    Direct {
        seq: u64,
        stored: bool,
        frame: Message,
    },
    /// Any other frame (direct, broadcast, join, leave), with its type for metrics.
    Frame { kind: &'static str, frame: Message },
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Room { frame, .. }
            | Outbound::Direct { frame, .. }
            | Outbound::Frame { frame, .. } => frame.len(),
        }
    }
}

/// Why and how a session is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: String,
}

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue was full: it is now closing with 1013.
    Overflow,
    /// The session is already closing; the item was dropped.
    Closed,
}

/// Why a session that fell more than its queue's bound behind is closed (with 1013).
pub const TOO_SLOW: &str = "too slow to read: outbound queue full";

pub struct OutboundQueue {
    state: Mutex<QueueState>,
    /// Wakes the writer when items arrive or a close is requested.
    ready: Notify,
    /// Wakes a writer blocked on a slow socket when a close is requested.
    closing: Notify,
    max_bytes: usize,
    /// Node-wide total of queued bytes (`switchboard_queue_bytes`).
    total_bytes: IntGauge,
}

/// What the writer took: bytes to release once written, and when the oldest of it was queued.
#[derive(Debug)]
pub struct Taken {
    pub bytes: usize,
    pub oldest: Option<Instant>,
}

#[derive(Default)]
struct QueueState {
    /// Each item with when it was queued and its stamp (see [`OutboundQueue::push`]).
    items: VecDeque<(Instant, u64, Outbound)>,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
    close: Option<CloseRequest>,
}

impl OutboundQueue {
    pub fn new(max_bytes: usize, total_bytes: IntGauge) -> Self {
        OutboundQueue {
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
            closing: Notify::new(),
            max_bytes,
            total_bytes,
        }
    }

    /// Queues `item`; `queued_at` is taken once per fan-out by the caller, not per session. The
    /// item is stamped from `order` under the queue's lock, so a queue's items are in stamp
    /// order and an item stamped after another that was already queued here comes after it:
    /// the writer merges them with room feeds by stamp.
    pub fn push(&self, item: Outbound, queued_at: Instant, order: &AtomicU64) -> Push {
        let len = item.len();
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Push::Closed;
        }
        // The limit is at least twice the largest frame (config validation), so a reader still
        // taking one maximum-size frame has room for the next.
        if state.bytes + len > self.max_bytes {
            let dropped: usize = state.items.drain(..).map(|(_, _, item)| item.len()).sum();
            state.bytes -= dropped;
            self.total_bytes.sub(dropped as i64);
            state.close = Some(CloseRequest {
                code: close::TRY_AGAIN_LATER,
                reason: TOO_SLOW.to_owned(),
            });
            drop(state);
            self.wake_for_close();
            return Push::Overflow;
        }
        state.bytes += len;
        let stamp = order.fetch_add(1, Ordering::SeqCst);
        state.items.push_back((queued_at, stamp, item));
        drop(state);
        self.total_bytes.add(len as i64);
        self.ready.notify_one();
        Push::Queued
    }

    /// Asks the writer to close the session. The first request wins; returns whether this one did.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        let dropped: usize = state.items.drain(..).map(|(_, _, item)| item.len()).sum();
        state.bytes -= dropped;
        self.total_bytes.sub(dropped as i64);
        state.close = Some(CloseRequest {
            code,
            reason: truncate_reason(reason),
        });
        drop(state);
        self.wake_for_close();
        true
    }

    fn wake_for_close(&self) {
        self.ready.notify_one();
        self.closing.notify_one();
    }

    pub fn close_request(&self) -> Option<CloseRequest> {
        self.state.lock().close.clone()
    }

    /// Whether nothing is queued (bytes the writer took and has not released do not count).
    pub fn is_empty(&self) -> bool {
        self.state.lock().items.is_empty()
    }

    /// Bytes queued plus bytes taken by the writer and not yet released.
    pub fn bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// The most bytes this queue holds.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Wakes the writer: a room feed it reads has news.
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Resolves when there may be something to take.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Resolves when a close has been requested (possibly before this was called).
    pub async fn closing(&self) {
        self.closing.notified().await;
    }

    /// Moves the items stamped below `below` into `batch`, each with its stamp, and returns
    /// their bytes, which stay counted until [`release`](Self::release); or the close request,
    /// if any. (At most the queue's bound: no batch is larger.)
    pub fn take(
        &self,
        below: u64,
        batch: &mut Vec<(u64, Outbound)>,
    ) -> Result<Taken, CloseRequest> {
        let mut state = self.state.lock();
        if let Some(close) = &state.close {
            return Err(close.clone());
        }
        let mut oldest = None;
        let mut taken = 0;
        while let Some((queued_at, stamp, item)) = state.items.front()
            && *stamp < below
        {
            oldest.get_or_insert(*queued_at);
            taken += item.len();
            batch.extend(
                state
                    .items
                    .pop_front()
                    .map(|(_, stamp, item)| (stamp, item)),
            );
        }
        let more = !state.items.is_empty();
        drop(state);
        if more {
            self.ready.notify_one();
        }
        Ok(Taken {
            bytes: taken,
            oldest,
        })
    }

    /// The writer wrote (or dropped) `bytes` it took.
    pub fn release(&self, bytes: usize) {
        // A batch of room messages alone took nothing from the queue: no lock, and no write to
        // the node-wide gauge every session shares.
        if bytes == 0 {
            return;
        }
        self.state.lock().bytes -= bytes;
        self.total_bytes.sub(bytes as i64);
    }
}

impl Drop for OutboundQueue {
    fn drop(&mut self) {
        self.total_bytes.sub(self.state.get_mut().bytes as i64);
    }
}

/// A close frame's reason is limited to 123 bytes; cut on a character boundary.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    static ORDER: AtomicU64 = AtomicU64::new(0);

    fn frame(len: usize) -> Outbound {
        Outbound::Frame {
            kind: "direct",
            frame: Message::Binary(vec![0; len].into()),
        }
    }

    fn queue(max: usize) -> (OutboundQueue, IntGauge) {
        let gauge = IntGauge::new("q", "q").unwrap();
        (OutboundQueue::new(max, gauge.clone()), gauge)
    }

    #[test]
    fn overflow_closes_with_1013_and_frees_what_was_queued() {
        let (queue, gauge) = queue(100);
        assert_eq!(queue.push(frame(60), Instant::now(), &ORDER), Push::Queued);
        assert_eq!(gauge.get(), 60);
        assert_eq!(
            queue.push(frame(60), Instant::now(), &ORDER),
            Push::Overflow
        );
        assert_eq!(gauge.get(), 0);
        assert_eq!(queue.push(frame(1), Instant::now(), &ORDER), Push::Closed);
        let close = queue.take(u64::MAX, &mut Vec::new()).unwrap_err();
        assert_eq!(close.code, close::TRY_AGAIN_LATER);
    }

    #[test]
    fn a_queue_holds_two_frames_of_half_its_bound_while_the_first_is_written() {
        let (queue, gauge) = queue(100);
        assert_eq!(queue.push(frame(50), Instant::now(), &ORDER), Push::Queued);
        let mut batch = Vec::new();
        let taken = queue.take(u64::MAX, &mut batch).unwrap();
        assert_eq!(queue.push(frame(50), Instant::now(), &ORDER), Push::Queued);
        assert_eq!(gauge.get(), 100);
        queue.release(taken.bytes);
        assert_eq!(queue.push(frame(50), Instant::now(), &ORDER), Push::Queued);
        assert_eq!(queue.push(frame(1), Instant::now(), &ORDER), Push::Overflow);
    }

    #[test]
    fn an_item_larger_than_the_bound_overflows_even_an_empty_queue() {
        let (queue, _) = queue(100);
        assert_eq!(
            queue.push(frame(101), Instant::now(), &ORDER),
            Push::Overflow
        );
    }

    #[test]
    fn bytes_taken_stay_counted_until_released() {
        let (queue, gauge) = queue(100);
        queue.push(frame(40), Instant::now(), &ORDER);
        queue.push(frame(40), Instant::now(), &ORDER);
        let mut batch = Vec::new();
        assert_eq!(queue.take(u64::MAX, &mut batch).unwrap().bytes, 80);
        assert_eq!(batch.len(), 2);
        assert_eq!(
            queue.push(frame(40), Instant::now(), &ORDER),
            Push::Overflow,
            "taken bytes still count"
        );
        queue.release(80);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn a_batch_says_when_its_oldest_item_was_queued() {
        let (queue, _) = queue(1000);
        let first = Instant::now();
        let second = first + std::time::Duration::from_millis(5);
        queue.push(frame(10), first, &ORDER);
        queue.push(frame(10), second, &ORDER);
        let mut batch = Vec::new();
        let taken = queue.take(u64::MAX, &mut batch).unwrap();
        assert_eq!((taken.bytes, taken.oldest), (20, Some(first)));
        assert_eq!(
            queue.take(u64::MAX, &mut batch).unwrap().oldest,
            None,
            "nothing left"
        );
    }

    #[test]
    fn items_are_taken_in_stamp_order_up_to_a_stamp() {
        let (queue, _) = queue(1000);
        let order = AtomicU64::new(5);
        for _ in 0..3 {
            queue.push(frame(10), Instant::now(), &order);
        }
        let mut batch = Vec::new();
        let taken = queue.take(7, &mut batch).unwrap();
        let stamps: Vec<u64> = batch.iter().map(|(stamp, _)| *stamp).collect();
        assert_eq!((stamps, taken.bytes), (vec![5, 6], 20));
        batch.clear();
        queue.take(u64::MAX, &mut batch).unwrap();
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn the_first_close_wins_and_reasons_are_cut_to_123_bytes() {
        let (queue, _) = queue(100);
        assert!(queue.close(1001, &"é".repeat(100)));
        assert!(!queue.close(1000, "later"));
        let close = queue.close_request().unwrap();
        assert_eq!(close.code, 1001);
        assert!(close.reason.len() <= 123);
    }

    #[tokio::test]
    async fn a_close_wakes_a_waiting_writer() {
        let (queue, _) = queue(100);
        queue.close(1000, "bye");
        tokio::time::timeout(std::time::Duration::from_secs(5), queue.closing())
            .await
            .unwrap();
    }
}
