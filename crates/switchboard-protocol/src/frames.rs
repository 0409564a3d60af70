use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A room's stream position: the offset of a message, or the latest offset of the room, within one
/// epoch. Offsets of different epochs are unrelated.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// Who sent a room message or a direct message.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub user: String,
    pub session: String,
}

/// One presence entry: a session subscribed to a room.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Member {
    pub user: String,
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

/// A frame a client sends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Subscribe {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
        #[serde(default, skip_serializing_if = "is_false")]
        presence_events: bool,
    },
    Unsubscribe {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Publish {
        room: String,
        data: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Idempotency key: a repeat within the window answers the first result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    Send {
        to: String,
        data: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Append to the recipient's inbox before answering.
        #[serde(default, skip_serializing_if = "is_false")]
        persist: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// Acknowledges every inbox message of the user up to `seq`.
    Ack {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Presence {
        room: String,
        id: u64,
    },
    History {
        room: String,
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

impl ClientFrame {
    /// The request id, if the client asked for an answer.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Publish { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::Ack { id, .. }
            | ClientFrame::Ping { id } => *id,
            ClientFrame::Presence { id, .. } | ClientFrame::History { id, .. } => Some(*id),
        }
    }

    /// The `type` field's value, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::History { .. } => "history",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

/// The client frame types this protocol version knows; anything else is `unknown_type`.
pub const CLIENT_FRAME_TYPES: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "publish",
    "send",
    "ack",
    "presence",
    "history",
    "ping",
];

/// A message published to a room. Shared (`Arc`) between every session that receives it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RoomMessage {
    pub room: String,
    pub data: Value,
    pub offset: u64,
    pub epoch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Sender>,
}

/// A join or leave notice.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceNotice {
    pub room: String,
    pub user: String,
    pub session: String,
}

/// The answer to a request that carried an `id`. Which optional fields are present depends on the
/// request: see the protocol reference.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Reply {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Arc<RoomMessage>>>,
    /// `history` stopped before the end to keep the reply within the size limit: page on
    /// with `since` set to the last offset received.
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    /// A persisted `send`: the message's seq in the recipient's inbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// A keyed `publish` or `send` repeated within the idempotency window: nothing new was
    /// created, the rest of the reply is the first one's.
    #[serde(default, skip_serializing_if = "is_false")]
    pub duplicate: bool,
}

/// Where a user's inbox stands: the newest seq, the acknowledged one, and the epoch they count in.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct InboxState {
    pub seq: u64,
    pub acked: u64,
    pub epoch: String,
}

/// Stable, machine-readable error codes.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be parsed, or a field has an invalid value.
    BadFrame,
    /// The frame's `type` is not one this server knows.
    UnknownType,
    /// The token does not allow this room or this publish.
    Forbidden,
    /// `unsubscribe` of a room the session is not subscribed to.
    NotSubscribed,
    /// `subscribe` to a room the session is already subscribed to.
    AlreadySubscribed,
    /// A message over the size limit.
    TooLarge,
    /// Over the per-connection message rate; the frame was dropped.
    RateLimited,
    /// The broker (or the part of it this request needs) is unreachable; nothing was done.
    Unavailable,
    /// An unexpected server-side failure.
    Internal,
    /// A per-session limit (such as the number of subscriptions) was reached; nothing was done.
    LimitExceeded,
    /// The broker did not answer a `publish` in time (or its connection broke after the request
    /// was sent): the message may or may not have been published. Unlike `unavailable`, a blind
    /// retry may publish it twice.
    UnknownOutcome,
    /// A code from a newer server this client does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::UnknownOutcome => "unknown_outcome",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `error` frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

/// A frame the server sends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        session: String,
        user: String,
        node: String,
        protocol: String,
        heartbeat_ms: u64,
        /// The user's inbox; its unacknowledged messages follow the welcome.
        #[serde(default)]
        inbox: InboxState,
        /// `sse` or `poll` on the fallback transports; absent on WebSocket.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport: Option<String>,
        /// The secret that authorizes the fallback transports' POSTs and polls for this session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_key: Option<String>,
    },
    Message(Arc<RoomMessage>),
    Direct {
        data: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<Sender>,
        /// Only persisted messages carry their inbox seq.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    Broadcast {
        data: Value,
    },
    Join(PresenceNotice),
    Leave(PresenceNotice),
    Reply(Reply),
    Error(ErrorFrame),
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// The last frame of a fallback transport's session that the server closed: what a
    /// WebSocket close frame says.
    Close {
        code: u16,
        reason: String,
    },
}

impl ServerFrame {
    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error(ErrorFrame {
            id,
            code,
            message: message.into(),
        })
    }

    /// The `type` field's value, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Welcome { .. } => "welcome",
            ServerFrame::Message(_) => "message",
            ServerFrame::Direct { .. } => "direct",
            ServerFrame::Broadcast { .. } => "broadcast",
            ServerFrame::Join(_) => "join",
            ServerFrame::Leave(_) => "leave",
            ServerFrame::Reply(_) => "reply",
            ServerFrame::Error(_) => "error",
            ServerFrame::Pong { .. } => "pong",
            ServerFrame::Close { .. } => "close",
        }
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}
