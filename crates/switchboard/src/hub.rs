//! The Hub: this node's sessions, the rooms they joined and the users they belong to. No I/O:
//! delivery encodes a frame once per codec; a room message is appended to the room's feed, which
//! every subscriber reads, and any other frame is pushed, as the same bytes, to each session's
//! queue.
//!
//! Order across a session's sources: every queued item and feed entry takes a stamp from one
//! node-wide counter, under the lock of the queue or feed it enters, and the writer merges what
//! it takes by stamp (see `Core::take`). So frames that reach the hub one after the other (one
//! broker connection's messages, say) are written in that order whatever their kind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use serde_json::Value;
use switchboard_broker::{BrokerHandler, DirectMessage, PresenceChange, PresenceEvent};
use switchboard_protocol::{
    Codec, EncodeError, Encoded, ErrorCode, RoomMessage, ServerFrame, close, deflate,
};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::feed::{Feed, FeedReader};
use crate::metrics::Metrics;
use crate::queue::{Outbound, OutboundQueue, Push, TOO_SLOW};

/// What the rest of the node may touch of a session.
pub struct SessionHandle {
    pub id: Arc<str>,
    pub user: Arc<str>,
    pub codec: Codec,
    pub queue: OutboundQueue,
    /// How client frames reach a session of the SSE or long-poll transport; `None` on
    /// WebSocket (boxed: an idle WebSocket session pays one null pointer).
    pub link: Option<Box<Link>>,
}

/// The inbound side of a fallback session: POSTed frames (local or forwarded by another node)
/// and, for long polls, the polls waiting for frames.
pub struct Link {
    /// SHA-256 (hex) of the session key: what the POST and poll handlers compare.
    pub key_hash: String,
    /// `sse` or `poll`.
    pub transport: &'static str,
    /// Client frames (JSON text, one frame each) for the session task; bounded, so a flood of
    /// POSTs waits nowhere but is refused.
    pub inbound: mpsc::Sender<Vec<String>>,
    /// Long-poll sessions: each poll hands the session task the sender of its answer.
    pub polls: Option<mpsc::Sender<oneshot::Sender<Bytes>>>,
    /// Set by `DELETE /{sse|poll}/{session}` before it closes the session: the client is gone,
    /// so the session ends without waiting for a poll to take its close frame.
    pub closed_by_client: AtomicBool,
}

/// POSTs (or forwarded batches) waiting for a fallback session's task; one more is refused.
pub const INBOUND_CAPACITY: usize = 16;

struct Subscriber {
    session: Arc<SessionHandle>,
    presence_events: bool,
}

/// A room with local subscribers.
struct Room {
    subscribers: Vec<Subscriber>,
    feed: Arc<Feed>,
}

pub struct Hub {
    sessions: DashMap<Arc<str>, Arc<SessionHandle>>,
    users: DashMap<Arc<str>, Vec<Arc<SessionHandle>>>,
    rooms: DashMap<Arc<str>, Room>,
    metrics: Arc<Metrics>,
    /// Stamps every queued item and feed entry (see the module's doc).
    order: AtomicU64,
    /// The sessions' outbound queue bound, which also bounds how far a feed reader may lag.
    max_queue_bytes: usize,
}

/// Encodes one frame lazily, at most once per codec: a deflate frame is compressed once for all
/// of its subscribers.
struct FrameCache {
    frame: ServerFrame,
    encoded: [Option<Message>; Codec::ALL.len()],
}

impl FrameCache {
    fn new(frame: ServerFrame) -> Self {
        FrameCache {
            frame,
            encoded: Default::default(),
        }
    }

    fn get(&mut self, codec: Codec, metrics: &Metrics) -> Option<Message> {
        let slot = &mut self.encoded[codec.index()];
        if slot.is_none() {
            match encode_counted(codec, &self.frame, metrics) {
                Ok(message) => *slot = Some(message),
                Err(error) => {
                    tracing::error!(%error, kind = self.frame.kind(), "cannot encode frame");
                    return None;
                }
            }
        }
        slot.clone()
    }
}

/// Encodes a server frame as the WebSocket message of its codec.
pub fn encode(codec: Codec, frame: &ServerFrame) -> Result<Message, EncodeError> {
    Ok(match codec.encode(frame)? {
        Encoded::Text(text) => Message::Text(text.into()),
        Encoded::Binary(bytes) => Message::Binary(bytes.into()),
    })
}

/// [`encode`], counting deflate-codec frames by whether they went compressed or stored.
pub fn encode_counted(
    codec: Codec,
    frame: &ServerFrame,
    metrics: &Metrics,
) -> Result<Message, EncodeError> {
    let message = encode(codec, frame)?;
    if codec == Codec::JsonDeflate {
        let result = match &message {
            Message::Binary(bytes) if bytes.first() == Some(&deflate::DEFLATED) => "compressed",
            _ => "stored",
        };
        metrics.deflate_frames.with_label_values(&[result]).inc();
    }
    Ok(message)
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, max_queue_bytes: usize) -> Self {
        Hub {
            sessions: DashMap::new(),
            users: DashMap::new(),
            rooms: DashMap::new(),
            metrics,
            order: AtomicU64::new(0),
            max_queue_bytes,
        }
    }

    pub fn add_session(&self, session: Arc<SessionHandle>) {
        self.users
            .entry(session.user.clone())
            .or_default()
            .push(session.clone());
        self.sessions.insert(session.id.clone(), session);
    }

    pub fn remove_session(&self, session: &SessionHandle) {
        self.sessions.remove(&session.id);
        if let Some(mut sessions) = self.users.get_mut(&session.user) {
            sessions.retain(|other| other.id != session.id);
        }
        self.users
            .remove_if(&session.user, |_, sessions| sessions.is_empty());
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn session(&self, id: &str) -> Option<Arc<SessionHandle>> {
        self.sessions.get(id).map(|entry| entry.value().clone())
    }

    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.sessions
            .iter()
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// Adds `session` to `room`'s local subscribers; it reads the room's messages from the
    /// returned reader, from the next one on. (Attached while the room is locked, so a fan-out
    /// either sees the subscriber and encodes for its codec, or appends before it starts.)
    pub fn join(
        &self,
        room: &str,
        session: &Arc<SessionHandle>,
        presence_events: bool,
    ) -> FeedReader {
        let mut entry = self.rooms.entry(Arc::from(room)).or_insert_with(|| Room {
            subscribers: Vec::new(),
            feed: Arc::new(Feed::new(
                self.max_queue_bytes,
                self.metrics.queue_bytes.clone(),
            )),
        });
        if entry.subscribers.is_empty() {
            self.metrics.rooms.inc();
        }
        entry.subscribers.push(Subscriber {
            session: session.clone(),
            presence_events,
        });
        entry.feed.attach(session.clone())
    }

    /// Removes `session` from `room`'s local subscribers (its feed reader detaches when the
    /// session drops it).
    pub fn leave(&self, room: &str, session: &SessionHandle) {
        if let Some(mut entry) = self.rooms.get_mut(room) {
            entry
                .subscribers
                .retain(|subscriber| subscriber.session.id != session.id);
        }
        if self
            .rooms
            .remove_if(room, |_, entry| entry.subscribers.is_empty())
            .is_some()
        {
            self.metrics.rooms.dec();
        }
    }

    /// The next stamp (see the module's doc): read with the same ordering the stamps are taken
    /// with, so an item stamped below it is in its queue or feed by the time a reader locks it.
    pub fn next_stamp(&self) -> u64 {
        self.order.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes a session that fell more than its queue's bound behind, counting it (unless it
    /// was closing already).
    pub fn too_slow(&self, session: &SessionHandle) {
        if session.queue.close(close::TRY_AGAIN_LATER, TOO_SLOW) {
            self.count_too_slow(session);
        }
    }

    fn count_too_slow(&self, session: &SessionHandle) {
        self.metrics.slow_closes.inc();
        self.metrics.dropped.with_label_values(&["slow"]).inc();
        tracing::warn!(session = %session.id, user = %session.user,
            "closing a session too slow to read its queue (1013)");
    }

    /// Pushes one item, counting what could not be queued.
    pub fn push(&self, session: &SessionHandle, item: Outbound, queued_at: Instant) -> bool {
        match session.queue.push(item, queued_at, &self.order) {
            Push::Queued => true,
            Push::Overflow => {
                self.count_too_slow(session);
                false
            }
            Push::Closed => {
                self.metrics.dropped.with_label_values(&["closed"]).inc();
                false
            }
        }
    }

    fn push_frame<'a>(
        &self,
        kind: &'static str,
        frame: ServerFrame,
        sessions: impl Iterator<Item = &'a Arc<SessionHandle>>,
    ) -> u64 {
        self.push_each(kind, frame, sessions, |frame| Outbound::Frame {
            kind,
            frame,
        })
    }

    /// Encodes `frame` once per codec and queues `item(encoded)` to each of `sessions`, counting
    /// the deliveries under `kind`.
    fn push_each<'a>(
        &self,
        kind: &'static str,
        frame: ServerFrame,
        sessions: impl Iterator<Item = &'a Arc<SessionHandle>>,
        item: impl Fn(Message) -> Outbound,
    ) -> u64 {
        let mut cache = FrameCache::new(frame);
        let mut delivered = 0;
        let queued_at = Instant::now();
        for session in sessions {
            if let Some(frame) = cache.get(session.codec, &self.metrics)
                && self.push(session, item(frame), queued_at)
            {
                delivered += 1;
            }
        }
        self.metrics
            .deliveries
            .with_label_values(&[kind])
            .inc_by(delivered);
        delivered
    }

    /// Closes every local session of `user`; returns how many.
    pub fn disconnect_user(&self, user: &str, code: u16, reason: &str) -> u64 {
        let Some(sessions) = self.users.get(user).map(|sessions| sessions.clone()) else {
            return 0;
        };
        sessions
            .iter()
            .filter(|session| session.queue.close(code, reason))
            .count() as u64
    }
}

impl BrokerHandler for Hub {
    fn room_message(&self, message: Arc<RoomMessage>) {
        let Some(room) = self.rooms.get(message.room.as_str()) else {
            return;
        };
        let mut cache = FrameCache::new(ServerFrame::Message(message.clone()));
        let appended = room
            .feed
            .append(message, &self.order, Instant::now(), |codec| {
                cache.get(codec, &self.metrics)
            });
        for subscriber in &room.subscribers {
            subscriber.session.queue.wake();
        }
        drop(room);
        for session in &appended.too_slow {
            self.too_slow(session);
        }
        self.metrics.room_deliveries.inc_by(appended.readers as u64);
    }

    fn presence(&self, event: PresenceEvent) {
        let Some(room) = self.rooms.get(event.notice.room.as_str()) else {
            return;
        };
        let targets: Vec<&Arc<SessionHandle>> = room
            .subscribers
            .iter()
            .filter(|subscriber| {
                subscriber.presence_events && *subscriber.session.id != *event.notice.session
            })
            .map(|subscriber| &subscriber.session)
            .collect();
        if targets.is_empty() {
            return;
        }
        let (kind, frame) = match event.change {
            PresenceChange::Join => ("join", ServerFrame::Join(event.notice)),
            PresenceChange::Leave => ("leave", ServerFrame::Leave(event.notice)),
        };
        self.push_frame(kind, frame, targets.into_iter());
    }

    fn direct(&self, message: Arc<DirectMessage>) {
        let Some(sessions) = self.users.get(message.user.as_str()).map(|s| s.clone()) else {
            return;
        };
        let frame = ServerFrame::Direct {
            data: message.data.clone(),
            from: message.from.clone(),
            seq: message.seq,
        };
        match message.seq {
            None => self.push_frame("direct", frame, sessions.iter()),
            Some(seq) => {
                self.push_each("direct", frame, sessions.iter(), |frame| Outbound::Direct {
                    seq,
                    stored: false,
                    frame,
                })
            }
        };
    }

    fn broadcast(&self, data: Arc<Value>) {
        let sessions = self.sessions();
        let frame = ServerFrame::Broadcast {
            data: (*data).clone(),
        };
        self.push_frame("broadcast", frame, sessions.iter());
    }

    fn disconnect(&self, user: &str, code: u16, reason: &str) {
        self.disconnect_user(user, code, reason);
    }

    fn frames(&self, session: &str, frames: Vec<String>) {
        let count = frames.len() as u64;
        let forwarded = &self.metrics.forwarded_frames;
        let Some(handle) = self.session(session) else {
            forwarded.with_label_values(&["dropped"]).inc_by(count);
            return;
        };
        let Some(link) = &handle.link else {
            forwarded.with_label_values(&["dropped"]).inc_by(count);
            return;
        };
        match link.inbound.try_send(frames) {
            Ok(()) => forwarded.with_label_values(&["received"]).inc_by(count),
            Err(mpsc::error::TrySendError::Full(_)) => {
                forwarded.with_label_values(&["dropped"]).inc_by(count);
                // The POST was answered 202 on another node: the client learns of the loss
                // down its stream, as a /ws client learns of a refused frame.
                let error =
                    ServerFrame::error(None, ErrorCode::RateLimited, "too many frames: slow down");
                if let Some(frame) = FrameCache::new(error).get(handle.codec, &self.metrics) {
                    let item = Outbound::Frame {
                        kind: "error",
                        frame,
                    };
                    self.push(&handle, item, Instant::now());
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                forwarded.with_label_values(&["dropped"]).inc_by(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(metrics: &Metrics, id: &str, link: Option<Box<Link>>) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            id: Arc::from(id),
            user: Arc::from("u"),
            codec: Codec::Json,
            queue: OutboundQueue::new(1 << 16, metrics.queue_bytes.clone()),
            link,
        })
    }

    #[test]
    fn a_room_fan_out_compresses_once_for_all_its_deflate_subscribers() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(metrics.clone(), 1 << 16);
        let mut subscribers: Vec<_> = (0..5)
            .map(|n| {
                let session = Arc::new(SessionHandle {
                    id: Arc::from(format!("d{n}")),
                    user: Arc::from("u"),
                    codec: Codec::JsonDeflate,
                    queue: OutboundQueue::new(1 << 16, metrics.queue_bytes.clone()),
                    link: None,
                });
                hub.add_session(session.clone());
                hub.join("chat", &session, false)
            })
            .collect();
        let json = handle(&metrics, "json", None);
        hub.add_session(json.clone());
        let mut json_reader = hub.join("chat", &json, false);
        let frames = |metrics: &Metrics, result: &str| {
            metrics.deflate_frames.with_label_values(&[result]).get()
        };
        let message = |text: String| {
            Arc::new(RoomMessage {
                room: "chat".into(),
                data: serde_json::json!({ "text": text }),
                offset: 1,
                epoch: "e".into(),
                from: None,
            })
        };

        let large = message("bid 101.25 ask 101.50 volume 3000; ".repeat(30));
        hub.room_message(large.clone());
        assert_eq!(frames(&metrics, "compressed"), 1);
        assert_eq!(frames(&metrics, "stored"), 0);
        let read = |reader: &mut FeedReader| {
            let mut batch = Vec::new();
            reader.read(u64::MAX, &mut batch);
            batch
        };
        let mut payloads = Vec::new();
        for reader in &mut subscribers {
            let batch = read(reader);
            let [(_, Outbound::Room { frame, .. })] = batch.as_slice() else {
                panic!("expected one room frame");
            };
            let Message::Binary(bytes) = frame else {
                panic!("deflate frames are binary");
            };
            payloads.push(bytes.clone());
        }
        // The same buffer for every subscriber: encoded and compressed once.
        assert!(
            payloads
                .iter()
                .all(|bytes| bytes.as_ptr() == payloads[0].as_ptr())
        );
        assert_eq!(payloads[0][0], deflate::DEFLATED);
        let decoded: ServerFrame = Codec::JsonDeflate.decode(&payloads[0]).unwrap();
        assert_eq!(decoded, ServerFrame::Message(large));
        assert!(matches!(
            read(&mut json_reader).as_slice(),
            [(
                _,
                Outbound::Room {
                    frame: Message::Text(_),
                    ..
                }
            )]
        ));

        hub.room_message(message("hi".into()));
        assert_eq!(frames(&metrics, "compressed"), 1);
        assert_eq!(frames(&metrics, "stored"), 1);
    }

    fn forwarded(metrics: &Metrics, result: &str) -> u64 {
        metrics.forwarded_frames.with_label_values(&[result]).get()
    }

    #[test]
    fn forwarded_frames_reach_the_session_or_are_dropped_and_counted() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(metrics.clone(), 1 << 16);
        let (inbound, mut frames) = mpsc::channel(1);
        let link = Link {
            key_hash: String::new(),
            transport: "sse",
            inbound,
            polls: None,
            closed_by_client: AtomicBool::new(false),
        };
        let sse = handle(&metrics, "sse", Some(Box::new(link)));
        hub.add_session(sse.clone());
        hub.add_session(handle(&metrics, "ws", None));

        hub.frames("sse", vec!["{}".into(), "{}".into()]);
        assert_eq!(frames.try_recv().unwrap().len(), 2);
        assert_eq!(forwarded(&metrics, "received"), 2);

        // Full: dropped, and the session is told down its stream.
        hub.frames("sse", vec!["{}".into()]);
        hub.frames("sse", vec!["{}".into(), "{}".into()]);
        assert_eq!(forwarded(&metrics, "dropped"), 2);
        let mut batch = Vec::new();
        sse.queue.take(u64::MAX, &mut batch).unwrap();
        match batch.as_slice() {
            [
                (
                    _,
                    Outbound::Frame {
                        kind: "error",
                        frame,
                    },
                ),
            ] => {
                assert!(frame.to_text().unwrap().contains("rate_limited"));
            }
            _ => panic!("expected one error frame queued"),
        }

        // No such session, or a WebSocket session: dropped.
        hub.frames("gone", vec!["{}".into()]);
        hub.frames("ws", vec!["{}".into()]);
        assert_eq!(forwarded(&metrics, "dropped"), 4);
        assert_eq!(forwarded(&metrics, "received"), 3);
    }
}
