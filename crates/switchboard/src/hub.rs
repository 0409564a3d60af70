//! The Hub: this node's sessions, the rooms they joined and the users they belong to. No I/O:
//! delivery encodes a frame once per codec and pushes the same bytes to every session's queue.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use serde_json::Value;
use switchboard_broker::{BrokerHandler, DirectMessage, PresenceChange, PresenceEvent};
use switchboard_protocol::{Codec, EncodeError, Encoded, ErrorCode, RoomMessage, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::metrics::Metrics;
use crate::queue::{Outbound, OutboundQueue, Push};

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
}

/// POSTs (or forwarded batches) waiting for a fallback session's task; one more is refused.
pub const INBOUND_CAPACITY: usize = 16;

struct Subscriber {
    session: Arc<SessionHandle>,
    presence_events: bool,
}

pub struct Hub {
    sessions: DashMap<Arc<str>, Arc<SessionHandle>>,
    users: DashMap<Arc<str>, Vec<Arc<SessionHandle>>>,
    rooms: DashMap<Arc<str>, Vec<Subscriber>>,
    metrics: Arc<Metrics>,
}

/// Encodes one frame lazily, at most once per codec.
struct FrameCache {
    frame: ServerFrame,
    encoded: [Option<Message>; 2],
}

impl FrameCache {
    fn new(frame: ServerFrame) -> Self {
        FrameCache {
            frame,
            encoded: [None, None],
        }
    }

    fn get(&mut self, codec: Codec) -> Option<Message> {
        let slot = &mut self.encoded[codec.index()];
        if slot.is_none() {
            match encode(codec, &self.frame) {
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

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Hub {
            sessions: DashMap::new(),
            users: DashMap::new(),
            rooms: DashMap::new(),
            metrics,
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

    /// Adds `session` to `room`'s local subscribers.
    pub fn join(&self, room: &str, session: &Arc<SessionHandle>, presence_events: bool) {
        let mut subscribers = self.rooms.entry(Arc::from(room)).or_default();
        if subscribers.is_empty() {
            self.metrics.rooms.inc();
        }
        subscribers.push(Subscriber {
            session: session.clone(),
            presence_events,
        });
    }

    /// Removes `session` from `room`'s local subscribers.
    pub fn leave(&self, room: &str, session: &SessionHandle) {
        if let Some(mut subscribers) = self.rooms.get_mut(room) {
            subscribers.retain(|subscriber| subscriber.session.id != session.id);
        }
        if self
            .rooms
            .remove_if(room, |_, subscribers| subscribers.is_empty())
            .is_some()
        {
            self.metrics.rooms.dec();
        }
    }

    /// Pushes one item, counting what could not be queued.
    pub fn push(&self, session: &SessionHandle, item: Outbound, queued_at: Instant) -> bool {
        match session.queue.push(item, queued_at) {
            Push::Queued => true,
            Push::Overflow => {
                self.metrics.slow_closes.inc();
                self.metrics.dropped.with_label_values(&["slow"]).inc();
                tracing::warn!(session = %session.id, user = %session.user,
                    "closing a session too slow to read its queue (1013)");
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
            if let Some(frame) = cache.get(session.codec)
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
        let Some(subscribers) = self.rooms.get(message.room.as_str()) else {
            return;
        };
        let mut cache = FrameCache::new(ServerFrame::Message(message.clone()));
        let mut delivered = 0;
        let queued_at = Instant::now();
        for subscriber in subscribers.iter() {
            let session = &subscriber.session;
            if let Some(frame) = cache.get(session.codec) {
                let item = Outbound::Room {
                    message: message.clone(),
                    frame,
                };
                if self.push(session, item, queued_at) {
                    delivered += 1;
                }
            }
        }
        self.metrics.room_deliveries.inc_by(delivered);
    }

    fn presence(&self, event: PresenceEvent) {
        let Some(subscribers) = self.rooms.get(event.notice.room.as_str()) else {
            return;
        };
        let targets: Vec<&Arc<SessionHandle>> = subscribers
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
                if let Some(frame) = FrameCache::new(error).get(handle.codec) {
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
