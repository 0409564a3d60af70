//! Request handling, whatever carries the frames: a decoded [`ClientFrame`] in, a reply or a
//! [`RequestError`] out, and the per-room subscription state that keeps every room message
//! written once and in order. Room messages reach the client only through the session's queue;
//! a transport supplies the two writes the core cannot do itself ([`Transport`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use switchboard_broker::{
    Acked, BrokerError, DirectMessage, HistoryQuery, InboxEntry, SessionRecord,
};
use switchboard_protocol::{
    ClientFrame, Codec, ErrorCode, InboxState, Member, Reply, RoomMessage, Sender, ServerFrame,
    StreamPosition, close,
};

use super::guards::Guards;
use super::{Exit, close_with};
use crate::auth::{INVALID_USER, Identity, unix_now_millis, unix_now_secs, valid_user};
use crate::feed::{FeedReader, Read};
use crate::hub::{SessionHandle, encode_counted};
use crate::node::{
    INVALID_KEY, INVALID_ROOM, Joined, Node, TooLarge, is_system_room, valid_key, valid_room,
};
use crate::queue::{CloseRequest, Outbound, OutboundQueue, TOO_SLOW, Taken};
use tokio_tungstenite::tungstenite::Message;

/// Most history messages one `history` request returns.
const MAX_HISTORY_LIMIT: usize = 1000;

/// What a transport does for the core, which writes nothing itself. The transport owns the
/// session's [`Core`] (one struct per session, so an idle session is no larger for the split).
pub(super) trait Transport {
    fn core(&mut self) -> &mut Core;

    /// The session's abuse limits, which count client frames whatever carries them.
    fn guards(&mut self) -> &mut Guards;

    /// Encodes and writes frames answering the client, ahead of anything queued.
    async fn write_frames(&mut self, frames: Vec<ServerFrame>) -> Result<(), Exit>;

    /// Writes the next batch of the session's queue, room messages through [`Core::admit`].
    async fn flush_queue(&mut self) -> Result<(), Exit>;
}

/// Why a request was refused: the `error` frame's code and message.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("{}", INVALID_ROOM)]
    BadRoom,
    #[error("{}", INVALID_USER)]
    BadUser,
    #[error("{}", INVALID_KEY)]
    BadKey,
    #[error("a key on send needs persist: true")]
    KeyWithoutPersist,
    #[error("ack of seq {seq} is beyond the inbox's seq {inbox}")]
    AckBeyondSeq { seq: u64, inbox: u64 },
    #[error("the token does not allow room {0:?}")]
    RoomForbidden(String),
    #[error("room {0:?} is read-only: only the nodes publish to $sys. rooms")]
    SystemRoom(String),
    #[error("the token does not allow publishing to {0:?}")]
    PublishForbidden(String),
    #[error("the token does not allow sending to {0:?}")]
    SendForbidden(String),
    #[error("already subscribed to {0:?}")]
    AlreadySubscribed(String),
    #[error("not subscribed to {0:?}")]
    NotSubscribed(String),
    #[error("a session may be subscribed to at most {0} rooms (--max-subscriptions)")]
    TooManySubscriptions(usize),
    /// A frame over the message size limit; the message says which and by how much.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// A broker call failed: nothing was done.
    #[error("{0}")]
    Unavailable(BrokerError),
    /// A publish failed; its outcome may be unknown.
    #[error("{0}")]
    PublishFailed(BrokerError),
}

impl RequestError {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            RequestError::BadRoom
            | RequestError::BadUser
            | RequestError::BadKey
            | RequestError::KeyWithoutPersist
            | RequestError::AckBeyondSeq { .. } => ErrorCode::BadFrame,
            RequestError::RoomForbidden(_)
            | RequestError::SystemRoom(_)
            | RequestError::PublishForbidden(_)
            | RequestError::SendForbidden(_) => ErrorCode::Forbidden,
            RequestError::AlreadySubscribed(_) => ErrorCode::AlreadySubscribed,
            RequestError::NotSubscribed(_) => ErrorCode::NotSubscribed,
            RequestError::TooManySubscriptions(_) => ErrorCode::LimitExceeded,
            RequestError::TooLarge(_) => ErrorCode::TooLarge,
            RequestError::PublishFailed(BrokerError::UnknownOutcome(_)) => {
                ErrorCode::UnknownOutcome
            }
            RequestError::Unavailable(_) | RequestError::PublishFailed(_) => ErrorCode::Unavailable,
        }
    }
}

/// What a request came to, when it was not refused.
pub(super) enum Answer {
    Reply(Reply),
    Pong,
    /// A `subscribe` with `since` that recovers: the reply, then what the room missed, starting
    /// with the first page already read.
    Recover {
        reply: Reply,
        room: String,
        missed: Vec<Arc<RoomMessage>>,
        more: bool,
    },
}

/// A session's view of one room it subscribed to.
struct Subscription {
    /// Where the session reads the room's live messages.
    feed: FeedReader,
    /// The newest offset written (or covered by the subscribe reply): anything at or below it
    /// is a duplicate.
    offset: u64,
    epoch: String,
    /// While `since` recovery pages through history: the highest live offset skipped because it
    /// came before the messages in between (history holds it, and a later page brings it), or
    /// `u64::MAX` for a live message of another epoch.
    recovering: Option<u64>,
}

/// One session's request state.
pub(super) struct Core {
    pub(super) node: Arc<Node>,
    pub(super) handle: Arc<SessionHandle>,
    identity: Identity,
    subscriptions: HashMap<String, Subscription>,
    /// The newest inbox seq written (or acknowledged before the session opened): a persisted
    /// direct at or below it is a duplicate.
    inbox: u64,
    /// While the inbox delivery after `welcome` pages through the inbox: the highest live seq
    /// skipped (a later page brings it); [`INBOX_DELIVERED`] once it is done.
    inbox_skipped: u64,
}

/// Items a session's reused batch keeps room for between flushes.
const KEPT_BATCH_CAPACITY: usize = 64;

/// `Core::inbox_skipped` once the inbox delivery is over.
const INBOX_DELIVERED: u64 = u64::MAX;

/// What opening a session read of the user's inbox: the first page to deliver after `welcome`.
pub(super) struct Opened {
    pub(super) welcome: ServerFrame,
    pub(super) pending: Vec<InboxEntry>,
    pub(super) more: bool,
}

impl Core {
    pub(super) fn new(node: Arc<Node>, handle: Arc<SessionHandle>, identity: Identity) -> Self {
        Core {
            node,
            handle,
            identity,
            subscriptions: HashMap::new(),
            inbox: 0,
            inbox_skipped: 0,
        }
    }

    fn record(&self) -> SessionRecord {
        SessionRecord {
            session: self.handle.id.to_string(),
            user: self.identity.user.clone(),
            node: self.node.id().to_owned(),
            connected_at: unix_now_millis(),
        }
    }

    fn member(&self) -> Member {
        Member {
            user: self.identity.user.clone(),
            session: self.handle.id.to_string(),
            info: self.identity.info.clone(),
        }
    }

    fn sender(&self) -> Sender {
        Sender {
            user: self.identity.user.clone(),
            session: self.handle.id.to_string(),
        }
    }

    /// Registers the session in the node and the cluster, then reads the user's inbox: the
    /// `welcome` frame to write first and the inbox's first page, or the close when the cluster
    /// cannot take it. Registered first, so a persisted direct sent meanwhile is queued live and
    /// the seam with the pages drops or skips it ([`Core::admit_direct`]).
    pub(super) async fn open(&mut self) -> Result<Opened, Exit> {
        let unavailable = || close_with(close::TRY_AGAIN_LATER, "broker unavailable, retry later");
        let registered = self
            .node
            .register_session(&self.handle, &self.record())
            .await;
        if registered.is_err() {
            return Err(unavailable());
        }
        let inbox = self
            .node
            .inbox_page(&self.identity.user, 0)
            .await
            .map_err(|_| unavailable())?;
        let position = inbox.position;
        self.inbox = position.acked;
        let welcome = ServerFrame::Welcome {
            session: self.handle.id.to_string(),
            user: self.identity.user.clone(),
            node: self.node.id().to_owned(),
            protocol: self.handle.codec.protocol().to_owned(),
            heartbeat_ms: self.node.config().heartbeat.as_millis() as u64,
            inbox: InboxState {
                seq: position.seq,
                acked: position.acked,
                epoch: position.epoch,
            },
            transport: None,
            session_key: None,
        };
        Ok(Opened {
            welcome,
            pending: inbox.pending,
            more: inbox.more,
        })
    }

    /// Whether a persisted direct taken from the queue is written: not at or below the newest
    /// seq written, nor a live one while the inbox delivery has yet to bring the messages
    /// before it (the inbox holds it, and a later page brings it). Seqs may skip: messages
    /// acknowledged by another session, or dropped to keep the inbox size, are not delivered.
    pub(super) fn admit_direct(&mut self, seq: u64, stored: bool) -> bool {
        if seq <= self.inbox {
            return false;
        }
        if !stored && self.inbox_skipped != INBOX_DELIVERED {
            self.inbox_skipped = self.inbox_skipped.max(seq);
            return false;
        }
        self.inbox = seq;
        true
    }

    /// Encodes answer frames in the session's codec, counted by type (and errors by code), each
    /// as the transport writes it; an unencodable frame closes the session with 1011.
    pub(super) fn encode_answers<T>(
        &self,
        frames: &[ServerFrame],
        wire: impl Fn(Message) -> T,
    ) -> Result<Vec<T>, Exit> {
        let metrics = self.node.metrics();
        let mut encoded = Vec::with_capacity(frames.len());
        for frame in frames {
            match encode_counted(self.handle.codec, frame, metrics) {
                Ok(message) => {
                    metrics.frames_out.with_label_values(&[frame.kind()]).inc();
                    if let ServerFrame::Error(error) = frame {
                        metrics
                            .errors_sent
                            .with_label_values(&[error.code.as_str()])
                            .inc();
                    }
                    encoded.push(wire(message));
                }
                Err(error) => {
                    tracing::error!(%error, "cannot encode frame");
                    return Err(close_with(close::INTERNAL, "internal error"));
                }
            }
        }
        Ok(encoded)
    }

    /// Takes what waits for the session into `batch`, in stamp order: every item of its rooms'
    /// feeds and of its outbound queue stamped below the node's next stamp, read once before
    /// them. Every item stamped below that bound is visible by then (stamps are taken under the
    /// lock of the feed or queue an item enters), so the batch is a prefix, in stamp order, of
    /// everything for this session: frames leave in the order they reached the hub, whichever
    /// way they came. At most the queue's bound plus the feeds' backlog, which is bounded too:
    /// a session with more than its queue's bound waiting, queue and feeds together, is closed
    /// with 1013, as a full queue is.
    pub(super) fn take(&mut self, batch: &mut Vec<(u64, Outbound)>) -> Result<Taken, CloseRequest> {
        let below = self.node.next_stamp();
        let mut backlog = 0;
        let mut oldest = None;
        let mut more = false;
        let mut detached = false;
        for subscription in self.subscriptions.values_mut() {
            match subscription.feed.read(below, batch) {
                Read::Read {
                    backlog: waiting,
                    oldest: read_from,
                    more: left,
                } => {
                    backlog += waiting;
                    oldest = earliest(oldest, read_from);
                    more |= left;
                }
                Read::Detached => detached = true,
            }
        }
        let from_feeds = batch.len();
        let queue = &self.handle.queue;
        let mut taken = queue.take(below, batch)?;
        if detached || queue.bytes() + backlog > queue.max_bytes() {
            queue.release(taken.bytes);
            self.node.too_slow(&self.handle);
            return Err(closing_request(queue));
        }
        // Each source is in stamp order already: one source needs no sort.
        if from_feeds > 0 && (batch.len() > from_feeds || self.subscriptions.len() > 1) {
            batch.sort_unstable_by_key(|(stamp, _)| *stamp);
        }
        taken.oldest = earliest(taken.oldest, oldest);
        if more {
            queue.wake();
        }
        Ok(taken)
    }

    /// The frames of a batch taken by [`Core::take`] that are written, each as the transport
    /// writes it: room messages through [`Core::admit`], persisted directs through
    /// [`Core::admit_direct`], counted by type. Drains `batch`, which the caller reuses.
    pub(super) fn admit_batch<T>(
        &mut self,
        batch: &mut Vec<(u64, Outbound)>,
        wire: impl Fn(Message) -> T,
    ) -> Vec<T> {
        let mut frames = Vec::with_capacity(batch.len());
        let mut room_frames = 0;
        for (_, item) in batch.drain(..) {
            match item {
                Outbound::Room { message, frame } => {
                    if self.admit(&message) {
                        room_frames += 1;
                        frames.push(wire(frame));
                    }
                }
                Outbound::Direct { seq, stored, frame } => {
                    if self.admit_direct(seq, stored) {
                        let frames_out = &self.node.metrics().frames_out;
                        frames_out.with_label_values(&["direct"]).inc();
                        frames.push(wire(frame));
                    }
                }
                Outbound::Frame { kind, frame } => {
                    let frames_out = &self.node.metrics().frames_out;
                    frames_out.with_label_values(&[kind]).inc();
                    frames.push(wire(frame));
                }
            }
        }
        // One update per batch: the counter is shared by every session of the node.
        self.node.metrics().message_frames_out.inc_by(room_frames);
        // A batch holds whatever was waiting: after a backlog, let its room go rather than keep
        // it for the session's life.
        if batch.capacity() > KEPT_BATCH_CAPACITY {
            *batch = Vec::new();
        }
        frames
    }

    /// After a batch taken from the queue was written (or failed): gives its bytes back to the
    /// queue and, when something was written, records how long its oldest frame waited.
    pub(super) fn written(&self, taken: Taken, wrote: bool) {
        self.handle.queue.release(taken.bytes);
        if let (true, Some(oldest)) = (wrote, taken.oldest) {
            self.node
                .metrics()
                .queue_wait_seconds
                .observe(oldest.elapsed().as_secs_f64());
        }
    }

    /// Whether the token the session was opened with has expired (past the leeway).
    pub(super) fn token_expired(&self) -> bool {
        self.identity.expires_at.is_some_and(|expires_at| {
            unix_now_secs() > expires_at.saturating_add(self.node.auth().leeway_secs())
        })
    }

    /// Whether a room message taken from the queue is written: not when it is at or below its
    /// subscription's offset (written already, or covered by the subscribe reply), nor for a
    /// room no longer subscribed, nor while `since` recovery has yet to bring the messages
    /// before it.
    pub(super) fn admit(&mut self, message: &RoomMessage) -> bool {
        let Some(subscription) = self.subscriptions.get_mut(message.room.as_str()) else {
            return false;
        };
        let same_epoch = message.epoch == subscription.epoch;
        if same_epoch && message.offset <= subscription.offset {
            return false;
        }
        if let Some(skipped) = &mut subscription.recovering
            && !(same_epoch && message.offset == subscription.offset + 1)
        {
            *skipped = if same_epoch {
                (*skipped).max(message.offset)
            } else {
                u64::MAX
            };
            return false;
        }
        subscription.offset = message.offset;
        subscription.epoch.clone_from(&message.epoch);
        true
    }

    /// Handles one request; returns the frames to write (reply or error first). A recovering
    /// `subscribe` writes its reply and the missed messages through the transport meanwhile.
    pub(super) async fn handle<T: Transport>(
        transport: &mut T,
        frame: ClientFrame,
    ) -> Result<Vec<ServerFrame>, Exit> {
        let id = frame.id();
        Ok(match (transport.core().answer(frame).await, id) {
            (Ok(Answer::Pong), id) => vec![ServerFrame::Pong { id }],
            (Ok(Answer::Reply(reply)), Some(id)) => vec![ServerFrame::Reply(Reply { id, ..reply })],
            (Ok(Answer::Reply(_)), None) => Vec::new(),
            (
                Ok(Answer::Recover {
                    reply,
                    room,
                    missed,
                    more,
                }),
                id,
            ) => {
                if let Some(id) = id {
                    let reply = ServerFrame::Reply(Reply { id, ..reply });
                    transport.write_frames(vec![reply]).await?;
                }
                recover(transport, &room, missed, more).await?;
                Vec::new()
            }
            (Err(error), id) => vec![ServerFrame::error(id, error.code(), error.to_string())],
        })
    }

    /// Answers one request, without writing anything.
    pub(super) async fn answer(&mut self, frame: ClientFrame) -> Result<Answer, RequestError> {
        match frame {
            ClientFrame::Subscribe {
                room,
                since,
                presence_events,
                ..
            } => self.subscribe(room, since, presence_events).await,
            ClientFrame::Unsubscribe { room, .. } => self.unsubscribe(room).await,
            ClientFrame::Publish {
                room, data, key, ..
            } => self.publish(room, data, key).await,
            ClientFrame::Send {
                to,
                data,
                persist,
                key,
                ..
            } => self.send(to, data, persist, key).await,
            ClientFrame::Ack { seq, .. } => self.ack(seq).await,
            ClientFrame::Presence { room, .. } => self.presence(room).await,
            ClientFrame::History {
                room, since, limit, ..
            } => self.history(room, since, limit).await,
            ClientFrame::Ping { .. } => Ok(Answer::Pong),
        }
    }

    fn check_room(&self, room: &str) -> Result<(), RequestError> {
        if valid_room(room) {
            Ok(())
        } else {
            Err(RequestError::BadRoom)
        }
    }

    fn check_subscribe_permission(&self, room: &str) -> Result<(), RequestError> {
        self.check_room(room)?;
        if self.identity.rooms.allows(room) {
            Ok(())
        } else {
            Err(RequestError::RoomForbidden(room.to_owned()))
        }
    }

    /// Subscribes; with `since`, the answer says what to recover (see [`recover`]).
    async fn subscribe(
        &mut self,
        room: String,
        since: Option<StreamPosition>,
        presence_events: bool,
    ) -> Result<Answer, RequestError> {
        self.check_subscribe_permission(&room)?;
        if self.subscriptions.contains_key(&room) {
            return Err(RequestError::AlreadySubscribed(room));
        }
        let max = self.node.config().max_subscriptions;
        if self.subscriptions.len() >= max {
            self.node
                .metrics()
                .limit_refusals
                .with_label_values(&["subscriptions"])
                .inc();
            return Err(RequestError::TooManySubscriptions(max));
        }
        let node = self.node.clone();
        let member = self.member();
        let subscriptions = &mut self.subscriptions;
        let Joined {
            position,
            recovered,
            missed,
            more,
        } = node
            .join_room(
                &room,
                &self.handle,
                &member,
                presence_events,
                since.as_ref(),
                |joined, feed| {
                    let subscription = match (&since, joined.recovered) {
                        // Everything after `since` comes from history, page by page, before any
                        // live message.
                        (Some(since), Some(true)) => Subscription {
                            feed,
                            offset: since.offset,
                            epoch: joined.position.epoch.clone(),
                            recovering: Some(0),
                        },
                        _ => Subscription {
                            feed,
                            offset: joined.position.offset,
                            epoch: joined.position.epoch.clone(),
                            recovering: None,
                        },
                    };
                    subscriptions.insert(room.clone(), subscription);
                },
            )
            .await
            .map_err(RequestError::Unavailable)?;
        let reply = Reply {
            room: Some(room.clone()),
            offset: Some(position.offset),
            epoch: Some(position.epoch),
            recovered,
            ..Reply::default()
        };
        if recovered == Some(true) {
            Ok(Answer::Recover {
                reply,
                room,
                missed,
                more,
            })
        } else {
            Ok(Answer::Reply(reply))
        }
    }

    async fn unsubscribe(&mut self, room: String) -> Result<Answer, RequestError> {
        if self.subscriptions.remove(&room).is_none() {
            return Err(RequestError::NotSubscribed(room));
        }
        self.node
            .leave_room(&room, &self.handle, &self.member())
            .await;
        Ok(Answer::Reply(Reply::default()))
    }

    async fn publish(
        &mut self,
        room: String,
        data: Value,
        key: Option<String>,
    ) -> Result<Answer, RequestError> {
        self.check_room(&room)?;
        if key.as_deref().is_some_and(|key| !valid_key(key)) {
            return Err(RequestError::BadKey);
        }
        if is_system_room(&room) {
            return Err(RequestError::SystemRoom(room));
        }
        if !self.identity.publish.allows(&room) {
            return Err(RequestError::PublishForbidden(room));
        }
        let sender = self.sender();
        self.node
            .check_room_frame(&room, &data, Some(&sender))
            .map_err(RequestError::TooLarge)?;
        let (message, duplicate) = match key {
            Some(key) => {
                let published = self
                    .node
                    .publish_keyed(&room, data, Some(sender), &key)
                    .await
                    .map_err(RequestError::PublishFailed)?;
                (published.message, published.duplicate)
            }
            None => {
                let message = self
                    .node
                    .publish(&room, data, Some(sender))
                    .await
                    .map_err(RequestError::PublishFailed)?;
                (message, false)
            }
        };
        Ok(Answer::Reply(Reply {
            offset: Some(message.offset),
            epoch: Some(message.epoch.clone()),
            duplicate,
            ..Reply::default()
        }))
    }

    async fn send(
        &mut self,
        to: String,
        data: Value,
        persist: bool,
        key: Option<String>,
    ) -> Result<Answer, RequestError> {
        if !valid_user(&to) {
            return Err(RequestError::BadUser);
        }
        match (&key, persist) {
            (Some(key), _) if !valid_key(key) => return Err(RequestError::BadKey),
            (Some(_), false) => return Err(RequestError::KeyWithoutPersist),
            _ => {}
        }
        // A persisted send needs no more than a plain one: the token's `send` claim.
        if !self.identity.send.allows(&to) {
            return Err(RequestError::SendForbidden(to));
        }
        let sender = self.sender();
        self.node
            .check_direct_frame(&data, Some(&sender), persist)
            .map_err(RequestError::TooLarge)?;
        let message = DirectMessage {
            user: to,
            data,
            from: Some(sender),
            seq: None,
        };
        if persist {
            // Like a publish, its outcome may be unknown on a timeout: retry with the key.
            let sent = self
                .node
                .send_persisted(message, key.as_deref())
                .await
                .map_err(RequestError::PublishFailed)?;
            return Ok(Answer::Reply(Reply {
                sessions: Some(sent.sessions),
                seq: Some(sent.seq),
                duplicate: sent.duplicate,
                ..Reply::default()
            }));
        }
        let sessions = self
            .node
            .send(message)
            .await
            .map_err(RequestError::Unavailable)?;
        Ok(Answer::Reply(Reply {
            sessions: Some(sessions),
            ..Reply::default()
        }))
    }

    async fn ack(&mut self, seq: u64) -> Result<Answer, RequestError> {
        match self.node.ack(&self.identity.user, seq).await {
            Ok(Acked::Done(_)) => Ok(Answer::Reply(Reply::default())),
            Ok(Acked::BeyondSeq(position)) => Err(RequestError::AckBeyondSeq {
                seq,
                inbox: position.seq,
            }),
            Err(error) => Err(RequestError::Unavailable(error)),
        }
    }

    async fn presence(&mut self, room: String) -> Result<Answer, RequestError> {
        self.check_subscribe_permission(&room)?;
        let members = self
            .node
            .presence(&room)
            .await
            .map_err(RequestError::Unavailable)?;
        Ok(Answer::Reply(fit_presence_reply(
            self.handle.codec,
            self.node.config().max_message_size,
            members,
        )))
    }

    async fn history(
        &mut self,
        room: String,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    ) -> Result<Answer, RequestError> {
        self.check_subscribe_permission(&room)?;
        let config = self.node.config();
        let limit = limit.map_or(config.history_size, |limit| limit as usize);
        let query = HistoryQuery {
            since,
            limit: Some(limit.min(MAX_HISTORY_LIMIT)),
            max_bytes: Some(config.max_message_size),
        };
        let history = self
            .node
            .history(&room, query)
            .await
            .map_err(RequestError::Unavailable)?;
        let reply = Reply {
            messages: Some(history.messages),
            offset: Some(history.position.offset),
            epoch: Some(history.position.epoch),
            more: history.more,
            ..Reply::default()
        };
        fit_history_reply(self.handle.codec, config.max_message_size, reply).map(Answer::Reply)
    }

    /// The rooms the session is subscribed to, for the clean-up after a panic.
    pub(super) fn rooms(&self) -> Vec<String> {
        self.subscriptions.keys().cloned().collect()
    }

    /// Leaves every room and removes the session from the node and the cluster.
    pub(super) async fn close(&mut self) {
        let member = self.member();
        for room in self.rooms() {
            self.node.leave_room(&room, &self.handle, &member).await;
            self.subscriptions.remove(&room);
        }
        self.node
            .unregister_session(&self.handle, &self.record())
            .await;
    }

    /// After `close` panicked: see [`Node::forget_session`].
    pub(super) async fn forget(&mut self, rooms: &[String]) {
        self.subscriptions.clear();
        let (member, record) = (self.member(), self.record());
        self.node
            .forget_session(&self.handle, rooms, &member, &record)
            .await;
    }
}

/// Writes what a `since` subscription missed, starting with `missed` (the first page read),
/// through the outbound queue, one page at a time: the node holds at most the queue's bound plus
/// one page for this session, and a client that does not read is closed with 1013 as for live
/// messages. Live messages of the room that come before the pages are skipped meanwhile and
/// brought by a later page, so the client gets every message once, in order.
async fn recover<T: Transport>(
    transport: &mut T,
    room: &str,
    mut missed: Vec<Arc<RoomMessage>>,
    mut more: bool,
) -> Result<(), Exit> {
    let core = transport.core();
    let node = core.node.clone();
    let handle = core.handle.clone();
    let queue = &handle.queue;
    loop {
        // Make room for the page (a quarter of the queue), then queue it whole.
        while queue.bytes() > queue.max_bytes() / 2 && !queue.is_empty() {
            transport.flush_queue().await?;
        }
        let last = missed.last().map(|message| message.offset);
        let queued_at = Instant::now();
        for message in missed.drain(..) {
            match node.push_message(&handle, message, queued_at) {
                Ok(true) => {}
                Ok(false) => return Err(Exit::Close(closing_request(queue))),
                Err(error) => {
                    tracing::error!(%error, "cannot encode frame");
                    return Err(close_with(close::INTERNAL, "internal error"));
                }
            }
        }
        while let Some(last) = last
            && transport
                .core()
                .subscriptions
                .get(room)
                .is_some_and(|sub| sub.offset < last)
            && !queue.is_empty()
        {
            transport.flush_queue().await?;
        }
        let Some(subscription) = transport.core().subscriptions.get_mut(room) else {
            return Ok(());
        };
        let skipped = subscription.recovering.unwrap_or(0);
        if !more && skipped <= subscription.offset {
            subscription.recovering = None;
            return Ok(());
        }
        subscription.recovering = Some(0);
        let since = StreamPosition {
            offset: subscription.offset,
            epoch: subscription.epoch.clone(),
        };
        let history = match node.recovery_history(room, since).await {
            Ok(history) => history,
            Err(_) => {
                return Err(close_with(
                    close::TRY_AGAIN_LATER,
                    "broker unavailable during recovery, resume with since",
                ));
            }
        };
        if !history.recovered {
            tracing::info!(%room, "history moved on during recovery");
            return Err(close_with(
                close::TRY_AGAIN_LATER,
                "too slow to recover: resume with since",
            ));
        }
        missed = history.messages;
        more = history.more;
    }
}

/// Writes the user's unacknowledged inbox messages after `welcome`, starting with `pending`
/// (the first page read), through the outbound queue one page at a time, as [`recover`] does for
/// a room: live persisted directs that come before the pages are skipped and brought by a later
/// page, so the client gets every message once, in seq order.
pub(super) async fn deliver_inbox<T: Transport>(
    transport: &mut T,
    mut pending: Vec<InboxEntry>,
    mut more: bool,
) -> Result<(), Exit> {
    let core = transport.core();
    let node = core.node.clone();
    let handle = core.handle.clone();
    let user = core.identity.user.clone();
    let queue = &handle.queue;
    loop {
        while queue.bytes() > queue.max_bytes() / 2 && !queue.is_empty() {
            transport.flush_queue().await?;
        }
        let Some(last) = pending.last().map(|entry| entry.seq) else {
            // Nothing (more) pending: a live one skipped meanwhile was acknowledged or dropped.
            transport.core().inbox_skipped = INBOX_DELIVERED;
            return Ok(());
        };
        let queued_at = Instant::now();
        for entry in pending.drain(..) {
            match node.push_direct(&handle, entry, queued_at) {
                Ok(true) => {}
                Ok(false) => return Err(Exit::Close(closing_request(queue))),
                Err(error) => {
                    tracing::error!(%error, "cannot encode frame");
                    return Err(close_with(close::INTERNAL, "internal error"));
                }
            }
        }
        while transport.core().inbox < last && !queue.is_empty() {
            transport.flush_queue().await?;
        }
        let core = transport.core();
        if !more && core.inbox_skipped <= core.inbox {
            core.inbox_skipped = INBOX_DELIVERED;
            return Ok(());
        }
        core.inbox_skipped = 0;
        let after = core.inbox;
        let Ok(inbox) = node.inbox_page(&user, after).await else {
            return Err(close_with(
                close::TRY_AGAIN_LATER,
                "broker unavailable during inbox delivery, reconnect",
            ));
        };
        pending = inbox.pending;
        more = inbox.more;
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The close the outbound queue asked for (it overflowed or was closed meanwhile).
fn closing_request(queue: &OutboundQueue) -> CloseRequest {
    queue.close_request().unwrap_or(CloseRequest {
        code: close::TRY_AGAIN_LATER,
        reason: TOO_SLOW.to_owned(),
    })
}

/// A `presence` reply with as many members as fit in one frame of `limit` bytes (with any id),
/// marked `more` when some were left out: a crowded room must not make a frame over the limit.
fn fit_presence_reply(codec: Codec, limit: usize, mut members: Vec<Member>) -> Reply {
    let empty = Reply {
        id: u64::MAX,
        members: Some(Vec::new()),
        more: true,
        ..Reply::default()
    };
    let mut used = codec.encoded_len(&ServerFrame::Reply(empty));
    let mut fits = 0;
    for member in &members {
        // As for history: its encoding, a separator, and room for MessagePack's array header.
        let cost = codec.encoded_len(member) + 1;
        if used + cost + 4 > limit {
            break;
        }
        used += cost;
        fits += 1;
    }
    let more = fits < members.len();
    members.truncate(fits);
    Reply {
        members: Some(members),
        more,
        ..Reply::default()
    }
}

/// Cuts a `history` reply's messages to what fits in one frame of `limit` bytes (with any id),
/// marking it `more` when it cut. A first message that does not fit alone (only possible for
/// messages published before the limit was lowered) is an error naming its offset.
fn fit_history_reply(codec: Codec, limit: usize, mut reply: Reply) -> Result<Reply, RequestError> {
    let messages = reply.messages.take().unwrap_or_default();
    // Measured with the largest id, so the real reply is no larger.
    let measure = |reply: &Reply| {
        codec.encoded_len(&ServerFrame::Reply(Reply {
            id: u64::MAX,
            ..reply.clone()
        }))
    };
    let mut empty = reply.clone();
    empty.messages = Some(Vec::new());
    empty.more = true;
    let mut used = measure(&empty);
    let mut fits = 0;
    for message in &messages {
        // A message in the array costs its own encoding plus at most a separator; MessagePack's
        // array header grows by at most 4 bytes past 15 elements.
        let cost = codec.encoded_len(message) + 1;
        if used + cost + 4 > limit {
            break;
        }
        used += cost;
        fits += 1;
    }
    if fits == 0 && !messages.is_empty() {
        return Err(RequestError::TooLarge(TooLarge::Stored {
            offset: messages[0].offset,
            limit,
        }));
    }
    let cut = fits < messages.len();
    let mut messages = messages;
    messages.truncate(fits);
    reply.messages = Some(messages);
    reply.more |= cut;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use switchboard_broker::FaultyBroker;

    use super::*;

    fn reply_with(count: u64, size: usize) -> Reply {
        let messages = (1..=count)
            .map(|offset| {
                Arc::new(RoomMessage {
                    room: "r".to_owned(),
                    data: json!("x".repeat(size)),
                    offset,
                    epoch: "0123456789abcdef".to_owned(),
                    from: None,
                })
            })
            .collect();
        Reply {
            id: 7,
            messages: Some(messages),
            offset: Some(count),
            epoch: Some("0123456789abcdef".to_owned()),
            ..Reply::default()
        }
    }

    /// A session's core on a node of its own, on the memory broker behind a `FaultyBroker`.
    fn core_with(options: crate::config::Options) -> (Core, Arc<FaultyBroker>) {
        let (node, broker) = crate::node::test_node(options);
        let identity = node.auth().authenticate(None, Some("alice")).unwrap();
        let queue = OutboundQueue::new(
            node.config().max_queue_bytes,
            node.metrics().queue_bytes.clone(),
        );
        let handle = Arc::new(SessionHandle {
            id: Arc::from("0123456789abcdef"),
            user: Arc::from("alice"),
            codec: Codec::Json,
            queue,
            link: None,
        });
        (Core::new(node, handle, identity), broker)
    }

    fn core() -> Core {
        core_with(crate::config::Options::default()).0
    }

    fn subscribe(room: &str) -> ClientFrame {
        ClientFrame::Subscribe {
            id: Some(1),
            room: room.to_owned(),
            since: None,
            presence_events: false,
        }
    }

    fn publish(room: &str, data: Value) -> ClientFrame {
        ClientFrame::Publish {
            id: Some(2),
            room: room.to_owned(),
            data,
            key: None,
        }
    }

    fn refusal(answer: Result<Answer, RequestError>) -> RequestError {
        match answer {
            Ok(_) => panic!("expected a refusal"),
            Err(error) => error,
        }
    }

    #[tokio::test]
    async fn a_bad_room_name_is_a_bad_frame_whatever_the_request() {
        let mut core = core();
        for room in ["", "a\nb", &"r".repeat(257)] {
            for frame in [subscribe(room), publish(room, json!(1))] {
                let error = refusal(core.answer(frame).await);
                assert!(matches!(error, RequestError::BadRoom), "{error:?}");
                assert_eq!(error.code(), ErrorCode::BadFrame);
                assert_eq!(
                    error.to_string(),
                    "room names are 1 to 256 bytes without control characters"
                );
            }
        }
        assert!(core.rooms().is_empty());
    }

    #[tokio::test]
    async fn subscribing_past_the_limit_is_refused_and_counted() {
        let (mut core, _) = core_with(crate::config::Options {
            max_subscriptions: Some(2),
            ..Default::default()
        });
        for room in ["a", "b"] {
            assert!(matches!(
                core.answer(subscribe(room)).await,
                Ok(Answer::Reply(_))
            ));
        }
        let error = refusal(core.answer(subscribe("c")).await);
        assert_eq!(error.code(), ErrorCode::LimitExceeded);
        assert_eq!(
            error.to_string(),
            "a session may be subscribed to at most 2 rooms (--max-subscriptions)"
        );
        let refusals = &core.node.metrics().limit_refusals;
        assert_eq!(refusals.with_label_values(&["subscriptions"]).get(), 1);
        let again = refusal(core.answer(subscribe("a")).await);
        assert_eq!(again.code(), ErrorCode::AlreadySubscribed);
        assert_eq!(
            core.node.upstream_rooms(),
            2,
            "the refused room was not joined"
        );
    }

    #[tokio::test]
    async fn a_publish_over_the_message_size_limit_is_too_large_and_takes_no_offset() {
        let (mut core, _) = core_with(crate::config::Options {
            max_message_size: Some(1024),
            ..Default::default()
        });
        let error = refusal(core.answer(publish("r", json!("x".repeat(2000)))).await);
        assert_eq!(error.code(), ErrorCode::TooLarge);
        assert!(
            error.to_string().contains("1024-byte message size limit"),
            "{error}"
        );
        let Ok(Answer::Reply(reply)) = core.answer(publish("r", json!("small"))).await else {
            panic!("a small publish is accepted");
        };
        assert_eq!(reply.offset, Some(1));
    }

    #[tokio::test]
    async fn publishing_to_a_system_room_is_forbidden_and_unsubscribing_needs_a_subscription() {
        let mut core = core();
        let error = refusal(core.answer(publish("$sys.stats", json!(1))).await);
        assert_eq!(error.code(), ErrorCode::Forbidden);
        let frame = ClientFrame::Unsubscribe {
            id: Some(3),
            room: "r".to_owned(),
        };
        let error = refusal(core.answer(frame).await);
        assert_eq!(error.code(), ErrorCode::NotSubscribed);
        assert_eq!(error.to_string(), "not subscribed to \"r\"");
    }

    #[tokio::test]
    async fn a_subscribe_the_broker_fails_is_unavailable_and_leaves_nothing_joined() {
        let (mut core, broker) = core_with(crate::config::Options::default());
        broker.set_down(true);
        let error = refusal(core.answer(subscribe("r")).await);
        assert_eq!(error.code(), ErrorCode::Unavailable);
        assert!(core.rooms().is_empty());
        assert_eq!(core.node.upstream_rooms(), 0);
        let errors = &core.node.metrics().broker_errors;
        assert_eq!(errors.with_label_values(&["subscribe"]).get(), 1);
        broker.set_down(false);
        assert!(matches!(
            core.answer(subscribe("r")).await,
            Ok(Answer::Reply(_))
        ));
    }

    #[tokio::test]
    async fn room_messages_are_admitted_once_in_order_and_only_while_subscribed() {
        let mut core = core();
        let message = |room: &str, offset| RoomMessage {
            room: room.to_owned(),
            data: json!(offset),
            offset,
            epoch: String::new(),
            from: None,
        };
        let Ok(Answer::Reply(reply)) = core.answer(publish("r", json!(0))).await else {
            panic!("published");
        };
        let epoch = reply.epoch.unwrap();
        let at = |offset| RoomMessage {
            epoch: epoch.clone(),
            ..message("r", offset)
        };
        assert!(!core.admit(&at(2)), "not subscribed");
        let Ok(Answer::Reply(reply)) = core.answer(subscribe("r")).await else {
            panic!("subscribed");
        };
        assert_eq!(reply.offset, Some(1));
        assert!(!core.admit(&at(1)), "covered by the reply");
        assert!(core.admit(&at(2)));
        assert!(!core.admit(&at(2)), "written already");
        assert!(core.admit(&at(3)));
        assert!(!core.admit(&message("other", 1)));
    }

    #[tokio::test]
    async fn room_messages_and_queued_frames_are_taken_in_the_order_they_reached_the_hub() {
        // The memory broker's node is "n": the session's record must name it.
        let (mut core, _) = core_with(crate::config::Options {
            node_id: Some("n".into()),
            ..Default::default()
        });
        core.node.start().await.unwrap();
        assert!(core.open().await.is_ok());
        assert!(core.answer(subscribe("r")).await.is_ok());
        for n in 0..3 {
            assert!(core.answer(publish("r", json!(n))).await.is_ok());
            assert!(core.answer(send("alice", false, None)).await.is_ok());
        }
        let mut batch = Vec::new();
        core.take(&mut batch).unwrap();
        let kinds: Vec<&str> = batch
            .iter()
            .map(|(_, item)| match item {
                Outbound::Room { .. } => "message",
                Outbound::Frame { kind, .. } => kind,
                Outbound::Direct { .. } => "persisted",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "message", "direct", "message", "direct", "message", "direct"
            ]
        );
        let mut written = core.admit_batch(&mut batch, |message| message);
        assert_eq!(written.len(), 6);
        written.clear();
        assert!(
            core.take(&mut batch).unwrap().oldest.is_none(),
            "nothing left"
        );
    }

    #[test]
    fn a_batch_lets_go_of_a_backlogs_room_once_written() {
        let mut core = core();
        let frame = || Outbound::Frame {
            kind: "direct",
            frame: Message::text("{}"),
        };
        let mut batch: Vec<_> = (0..1000).map(|stamp| (stamp, frame())).collect();
        assert_eq!(core.admit_batch(&mut batch, |message| message).len(), 1000);
        assert!(batch.capacity() <= KEPT_BATCH_CAPACITY);
        let mut batch = Vec::with_capacity(KEPT_BATCH_CAPACITY);
        batch.push((0, frame()));
        core.admit_batch(&mut batch, |message| message);
        assert_eq!(batch.capacity(), KEPT_BATCH_CAPACITY, "a small one is kept");
    }

    fn send(to: &str, persist: bool, key: Option<&str>) -> ClientFrame {
        ClientFrame::Send {
            to: to.to_owned(),
            data: json!("hi"),
            id: Some(4),
            persist,
            key: key.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn persisted_sends_count_seqs_repeat_by_key_and_acks_stop_at_the_inbox_seq() {
        let mut core = core();
        let Ok(Answer::Reply(first)) = core.answer(send("bob", true, Some("k1"))).await else {
            panic!("persisted");
        };
        assert_eq!((first.seq, first.duplicate), (Some(1), false));
        let Ok(Answer::Reply(again)) = core.answer(send("bob", true, Some("k1"))).await else {
            panic!("repeated");
        };
        assert_eq!((again.seq, again.duplicate), (Some(1), true));
        let Ok(Answer::Reply(plain)) = core.answer(send("bob", false, None)).await else {
            panic!("plain");
        };
        assert_eq!((plain.seq, plain.duplicate), (None, false));
        for frame in [
            send("bob", true, Some("")),
            send("bob", true, Some(&"k".repeat(65))),
            send("bob", false, Some("k2")),
        ] {
            let error = refusal(core.answer(frame).await);
            assert_eq!(error.code(), ErrorCode::BadFrame, "{error}");
        }
        let Ok(Answer::Reply(keyed)) = core.answer(send("bob", true, Some(&"k".repeat(64)))).await
        else {
            panic!("a 64-byte key is accepted");
        };
        assert_eq!(keyed.seq, Some(2));
        let error = refusal(core.answer(ClientFrame::Ack { seq: 1, id: None }).await);
        assert_eq!(
            error.to_string(),
            "ack of seq 1 is beyond the inbox's seq 0",
            "alice's own inbox is empty"
        );
        let publish_keyed = |key: &str| ClientFrame::Publish {
            id: Some(2),
            room: "r".to_owned(),
            data: json!(1),
            key: Some(key.to_owned()),
        };
        let Ok(Answer::Reply(first)) = core.answer(publish_keyed("p")).await else {
            panic!("published");
        };
        let Ok(Answer::Reply(again)) = core.answer(publish_keyed("p")).await else {
            panic!("published again");
        };
        assert_eq!((first.offset, first.duplicate), (Some(1), false));
        assert_eq!((again.offset, again.duplicate), (Some(1), true));
        let error = refusal(core.answer(publish_keyed(&"p".repeat(65))).await);
        assert_eq!(error.to_string(), "keys are 1 to 64 bytes");
    }

    #[test]
    fn persisted_directs_are_admitted_once_and_live_ones_wait_for_the_inbox_delivery() {
        let mut core = core();
        core.inbox = 2;
        assert!(
            !core.admit_direct(2, true),
            "acknowledged before the session"
        );
        assert!(!core.admit_direct(4, false), "live during the delivery");
        assert!(core.admit_direct(3, true));
        assert!(core.admit_direct(5, true), "seqs may skip");
        assert_eq!(core.inbox_skipped, 4);
        core.inbox_skipped = INBOX_DELIVERED;
        assert!(!core.admit_direct(5, false), "written already");
        assert!(core.admit_direct(6, false));
    }

    #[test]
    fn a_history_reply_is_cut_to_the_size_limit_and_says_more() {
        for codec in Codec::ALL {
            let limit = 4096;
            let reply = fit_history_reply(codec, limit, reply_with(10, 1000)).unwrap();
            let kept = reply.messages.as_ref().unwrap().len();
            assert!((1..10).contains(&kept), "{codec:?} kept {kept}");
            assert!(reply.more);
            let frame = ServerFrame::Reply(Reply {
                id: u64::MAX,
                ..reply
            });
            assert!(codec.encode(&frame).unwrap().len() <= limit);

            let whole = fit_history_reply(codec, limit, reply_with(2, 100)).unwrap();
            assert_eq!(whole.messages.unwrap().len(), 2);
            assert!(!whole.more);
        }
    }

    #[test]
    fn a_presence_reply_is_cut_to_the_size_limit_and_says_more() {
        let members: Vec<Member> = (0..100)
            .map(|n| Member {
                user: format!("user-{n}"),
                session: format!("{n:016x}"),
                info: Some(json!({"name": "x".repeat(100)})),
            })
            .collect();
        for codec in Codec::ALL {
            let reply = fit_presence_reply(codec, 4096, members.clone());
            let kept = reply.members.as_ref().unwrap().len();
            assert!((1..100).contains(&kept), "{codec:?} kept {kept}");
            assert!(reply.more);
            let frame = ServerFrame::Reply(Reply {
                id: u64::MAX,
                ..reply
            });
            assert!(codec.encode(&frame).unwrap().len() <= 4096);
            let all = fit_presence_reply(codec, 1 << 20, members.clone());
            assert_eq!(all.members.unwrap().len(), 100);
            assert!(!all.more);
        }
    }

    #[test]
    fn a_stored_message_larger_than_the_limit_is_refused_by_offset() {
        let error = fit_history_reply(Codec::Json, 512, reply_with(1, 1000)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::TooLarge);
        let message = error.to_string();
        assert!(message.contains("offset 1"), "{message}");
    }
}
