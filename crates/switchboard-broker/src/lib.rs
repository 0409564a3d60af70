//! The `Broker`: everything in switchboard that crosses nodes (room publish and fan-out, directed
//! sends through the session registry, broadcast, presence, history and offsets, node liveness).
//!
//! A node talks to exactly one broker. [`MemoryBroker`] is the embedded default: one process, no
//! Redis. Several `MemoryBroker`s attached to one [`MemoryBus`] behave like nodes of one cluster,
//! which lets the node's cross-node logic be tested in-process. [`FaultyBroker`] wraps any broker and
//! fails on command, for tests of failure paths. With the `conformance` feature,
//! [`conformance`] holds the tests every broker must pass.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod faulty;
mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, PresenceNotice, RoomMessage, Sender, StreamPosition};

pub use faulty::FaultyBroker;
pub use memory::{MemoryBroker, MemoryBus, MemoryConfig};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker, or the shard this request needs, cannot be reached. Nothing was done.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered, but not as expected.
    #[error("broker error: {0}")]
    Internal(String),
    /// A write was sent but its answer did not come in time (or the connection broke after
    /// sending it): it may or may not have been done. Only `publish`, `publish_keyed`,
    /// `send_persisted` and `ack` report this (a retry with the same key is then safe).
    #[error("outcome unknown: {0}")]
    UnknownOutcome(String),
}

pub type BrokerResult<T> = Result<T, BrokerError>;

/// Where one session lives, as the session registry records it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub session: String,
    pub user: String,
    pub node: String,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
}

/// A session of the SSE or long-poll transport, findable by id from any node: the node that
/// holds it and the SHA-256 (hex) of its `session_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    pub session: String,
    pub node: String,
    pub key_hash: String,
}

/// What became of client frames forwarded to a fallback session's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Handed to the node that holds the session (with no frames: the session is there).
    Delivered,
    /// No such session is registered on a live node.
    UnknownSession,
    /// The session exists; the key hash does not match.
    WrongKey,
}

/// What `history` and `subscribe … since` ask for.
///
/// The answer is one page read forward in offset order: the messages after `since` (or, without
/// `since`, the newest `limit` held, starting from the oldest of them), stopping at `limit` messages
/// or before their payloads pass `max_bytes`, whichever comes first; [`History::more`] says whether
/// it stopped early. A page holds at least one message when one is there, so paging always moves on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Messages after this position; `None`: the newest `limit` messages.
    pub since: Option<StreamPosition>,
    /// At most this many messages.
    pub limit: Option<usize>,
    /// At most this many bytes of message payloads (measured as the broker stores them: JSON in
    /// memory, MessagePack in Redis), so one request never loads more than about a frame's worth.
    pub max_bytes: Option<usize>,
}

/// The answer to a [`HistoryQuery`].
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// In offset order.
    pub messages: Vec<Arc<RoomMessage>>,
    /// The room's latest position when the history was read.
    pub position: StreamPosition,
    /// With `since`: whether every message after `since` up to `position` is still held (in
    /// `messages` and, when `more`, in the pages after it); false when the epoch changed or part of
    /// the gap is no longer held. `since.offset == 0` means "nothing seen yet": it recovers in any
    /// epoch of the same generation (see [`resumable`]) as long as history still holds the room's
    /// first message (offset 1), so a client that subscribed before a room had any state can
    /// resume.
    pub recovered: bool,
    /// The page stopped at `limit` or `max_bytes` before the last message held: read on with
    /// `since` set to the last offset in `messages`.
    pub more: bool,
}

/// Hex digits at the start of an epoch that name the generation of the store that made it (a
/// process of the embedded broker; a Redis server process, for the room's shard). Any loss of a
/// room's newest messages comes with a new generation (a restart, a failover), so epochs made
/// after it never share these digits with epochs made before.
pub const GENERATION_DIGITS: usize = 8;

/// Whether two epochs were made by the same generation of their store.
pub fn same_generation(a: &str, b: &str) -> bool {
    a.len() > GENERATION_DIGITS && a.get(..GENERATION_DIGITS) == b.get(..GENERATION_DIGITS)
}

/// The recovery rule both brokers apply, on positions alone (history must also still hold the
/// gap): a client at `since` may resume a room now at `position` when both are in one epoch and
/// `since` is not beyond it, or when `since.offset` is 0 ("nothing seen yet") and its epoch is of
/// the same generation as the room's, i.e. no restart or failover (which may have lost a whole
/// epoch the client never saw) came between.
pub fn resumable(since: &StreamPosition, position: &StreamPosition) -> bool {
    if since.offset == 0 {
        same_generation(&since.epoch, &position.epoch)
    } else {
        since.epoch == position.epoch && since.offset <= position.offset
    }
}

/// Whether a client at `since` recovers a room now at `position`: the positions allow it
/// ([`resumable`]) and nothing between them is missing, i.e. the client is up to date or
/// `next_held`, the offset of the first message still held after `since` (`None`: none is known to
/// be held), is the very next one. Both brokers decide `History::recovered` with this alone.
pub fn recovered(
    since: &StreamPosition,
    position: &StreamPosition,
    next_held: Option<u64>,
) -> bool {
    resumable(since, position)
        && (since.offset == position.offset || next_held == since.offset.checked_add(1))
}

/// A message for every session of one user.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectMessage {
    pub user: String,
    pub data: Value,
    pub from: Option<Sender>,
    /// The message's seq in the user's inbox: `None` for a plain send, set by the broker for a
    /// persisted one.
    pub seq: Option<u64>,
}

/// Position of a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InboxPosition {
    /// The seq of the newest message stored (0: none yet in this epoch).
    pub seq: u64,
    /// Everything up to this seq is acknowledged.
    pub acked: u64,
    /// The inbox's epoch: `seq` never goes back within one. Made like room epochs (see
    /// [`GENERATION_DIGITS`]); an inbox without state has a fresh one of the current generation
    /// that is not stored.
    pub epoch: String,
}

/// One stored direct message.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxEntry {
    pub seq: u64,
    pub data: Value,
    pub from: Option<Sender>,
    /// Milliseconds since the Unix epoch when it was stored.
    pub at: u64,
}

/// A page of a user's unacknowledged messages after a seq, in seq order.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbox {
    pub position: InboxPosition,
    pub pending: Vec<InboxEntry>,
    /// The page stopped at its limit or byte budget before the newest pending message: read on
    /// after the last seq in `pending`.
    pub more: bool,
}

/// What a persisted send did.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// How many sessions the registry lists for the user.
    pub sessions: u64,
    pub seq: u64,
    pub epoch: String,
    /// A repeat of an earlier send with the same key within the idempotency window: the fields
    /// above are that send's, and nothing was stored or delivered.
    pub duplicate: bool,
    /// Unacknowledged messages dropped by this append to keep the inbox size.
    pub dropped: u64,
}

/// What a keyed publish did.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The message as delivered (for a duplicate: the first publish's message).
    pub message: Arc<RoomMessage>,
    /// A repeat of an earlier publish with the same key to the same room within the
    /// idempotency window: nothing was published.
    pub duplicate: bool,
}

/// What an `ack` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acked {
    /// Recorded (or already covered by an earlier ack): the position after it.
    Done(InboxPosition),
    /// The seq is beyond the inbox's seq: nothing was recorded.
    BeyondSeq(InboxPosition),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    Join,
    Leave,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub change: PresenceChange,
    pub notice: PresenceNotice,
}

/// What a broker delivers to its node. Calls are synchronous and must not block: the node only
/// hands each event to in-memory session queues.
pub trait BrokerHandler: Send + Sync + 'static {
    /// A message published to a room this node subscribed to.
    fn room_message(&self, message: Arc<RoomMessage>);
    /// A join or leave in a room this node subscribed to.
    fn presence(&self, event: PresenceEvent);
    /// A directed message for a user with at least one session on this node.
    fn direct(&self, message: Arc<DirectMessage>);
    /// A message for every session on this node.
    fn broadcast(&self, data: Arc<Value>);
    /// Close every local session of `user`.
    fn disconnect(&self, user: &str, code: u16, reason: &str);
    /// Client frames (JSON text, one frame each) POSTed on another node for a fallback session
    /// of this node.
    fn frames(&self, session: &str, frames: Vec<String>);
}

/// Everything that crosses nodes. Every method that fails returns an error and has done nothing
/// (or, for publish, nothing a client can observe as a gap: the offset is not reused), except a
/// write that fails with [`BrokerError::UnknownOutcome`], which may have been done.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Starts delivering this node's events to `handler`. Called once, before anything else.
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> BrokerResult<()>;

    /// Assigns the next offset of `room`, appends to its history and delivers it to every node
    /// subscribed to the room. Returns the message as delivered.
    async fn publish(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>>;

    /// Starts receiving `room`'s messages and presence events. Once this returns, every later
    /// publish reaches this node.
    async fn subscribe_room(&self, room: &str) -> BrokerResult<()>;

    /// Stops receiving `room`.
    async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()>;

    /// Reads a room's history and latest position.
    async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History>;

    /// The room's latest position (offset 0 and a fresh epoch, not stored, for a room without
    /// state: reading never creates it).
    async fn position(&self, room: &str) -> BrokerResult<StreamPosition>;

    /// Delivers to every session of `message.user` on every node. Returns how many sessions the
    /// registry lists for the user.
    async fn send(&self, message: DirectMessage) -> BrokerResult<u64>;

    /// Like [`Broker::publish`], once per `key` and room within the idempotency window: a repeat
    /// publishes nothing and answers the first message with `duplicate: true`.
    async fn publish_keyed(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published>;

    /// Appends to `message.user`'s inbox (the next seq; dropping the oldest unacknowledged
    /// messages beyond the inbox size) and delivers like [`Broker::send`], with `seq` set. With a
    /// `key`, once per key and user within the idempotency window: a repeat stores and delivers
    /// nothing and answers the first result with `duplicate: true`.
    async fn send_persisted(&self, message: DirectMessage, key: Option<&str>)
    -> BrokerResult<Sent>;

    /// Acknowledges everything up to `seq` in `user`'s inbox: the acked seq becomes
    /// max(acked, seq), and those messages are no longer pending.
    async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked>;

    /// A page of `user`'s pending messages: seq above max(`after`, acked), oldest first, at most
    /// `limit` and stopping before `max_bytes` of stored payload (at least one when one is
    /// there). Messages older than the inbox TTL are not returned. Reading creates nothing.
    async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox>;

    /// Delivers to every node. Returns how many nodes it reached.
    async fn broadcast(&self, data: Value) -> BrokerResult<u64>;

    /// Closes every session of `user` on every node. Returns how many sessions it closed.
    async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64>;

    /// Records a session in the registry.
    async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()>;

    /// Removes a session from the registry.
    async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()>;

    /// Adds a member to a room's presence and tells the room's subscribers.
    async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()>;

    /// Removes a member from a room's presence and tells the room's subscribers.
    async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()>;

    /// The room's members.
    async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>>;

    /// Records this node as alive, with its current figures.
    async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()>;

    /// Makes a fallback session findable by [`Broker::forward`] until it is unregistered or its
    /// node dies.
    async fn register_link(&self, link: &LinkRecord) -> BrokerResult<()>;

    /// Removes a fallback session's link.
    async fn unregister_link(&self, link: &LinkRecord) -> BrokerResult<()>;

    /// Hands client frames to the node holding `session` when `key_hash` matches its link: one
    /// round trip. With no frames it only checks (the session is there and the key right).
    async fn forward(
        &self,
        session: &str,
        key_hash: &str,
        frames: Vec<String>,
    ) -> BrokerResult<Forwarded>;

    /// Every live node.
    async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>>;

    /// Removes this node (its registry entries, presence and liveness) on a clean shutdown.
    async fn deregister_node(&self, node: &str) -> BrokerResult<()>;

    /// Whether the broker can serve requests now (drives `/readyz`).
    fn is_healthy(&self) -> bool;
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    fn at(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: epoch.to_owned(),
        }
    }

    #[test]
    fn recovery_needs_resumable_positions_and_the_next_message_held() {
        let room = at(5, "0000000aroom");
        // Up to date, or the next message still held.
        assert!(recovered(&at(5, "0000000aroom"), &room, None));
        assert!(recovered(&at(2, "0000000aroom"), &room, Some(3)));
        assert!(recovered(&at(0, "0000000aother"), &room, Some(1)));
        // A gap no longer held, or nothing known to be held.
        assert!(!recovered(&at(2, "0000000aroom"), &room, Some(4)));
        assert!(!recovered(&at(2, "0000000aroom"), &room, None));
        assert!(!recovered(&at(0, "0000000aother"), &room, Some(2)));
        // Positions that do not allow it, whatever is held.
        assert!(!recovered(&at(2, "0000000bother"), &room, Some(3)));
        assert!(!recovered(&at(0, "0000000bother"), &room, Some(1)));
        assert!(!recovered(&at(6, "0000000aroom"), &room, Some(7)));
        assert!(!recovered(&at(u64::MAX, "0000000aroom"), &room, None));
    }
}
