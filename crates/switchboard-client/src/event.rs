use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchboard_protocol::{ErrorFrame, PresenceNotice, RoomMessage, Sender};

/// Something that happened on the connection, in order, read with
/// [`Client::next_event`](crate::Client::next_event).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A message in a subscribed room (duplicates across a reconnect are already removed).
    Message(Arc<RoomMessage>),
    /// A message sent to this user; `from` is absent when sent by the server API.
    Direct { data: Value, from: Option<Sender> },
    /// A persisted message sent to this user, live or from the inbox after a welcome: each
    /// `seq` once per client (one redelivered after a reconnect is dropped), until
    /// acknowledged.
    PersistedDirect {
        data: Value,
        from: Option<Sender>,
        seq: u64,
    },
    /// A message to every session (`POST /api/broadcast`).
    Broadcast { data: Value },
    /// Another session joined a room subscribed with `presence_events`.
    Join(PresenceNotice),
    /// Another session left a room subscribed with `presence_events`.
    Leave(PresenceNotice),
    /// An `error` frame that answers no pending request (no id, or an unknown one).
    Error(ErrorFrame),
    /// A connection is up and welcomed: after the first connect and every reconnect.
    Connected { session: String, node: String },
    /// The connection ended; `code` is the close code when the server sent one.
    Disconnected { code: Option<u16>, reason: String },
    /// Waiting `delay` before reconnect attempt `attempt` (counting from 1).
    Reconnecting { attempt: u32, delay: Duration },
    /// A room was resubscribed after a reconnect. With `recovered: false` messages may have
    /// been missed (history no longer holds them, or its epoch changed): reload that room's
    /// state another way.
    Resubscribed { room: String, recovered: bool },
    /// A room could not be resubscribed after a reconnect (e.g. the token no longer allows it);
    /// the client no longer considers itself subscribed to it.
    ResubscribeFailed { room: String, error: ErrorFrame },
    /// Final: the client will not reconnect. No event follows.
    Closed,
}
