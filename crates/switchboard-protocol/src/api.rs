//! Request and response bodies of the server API on the internal port (JSON).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Member, Sender};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PublishRequest {
    pub room: String,
    pub data: Value,
    /// Idempotency key (1 to 64 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PublishResponse {
    pub offset: u64,
    pub epoch: String,
    /// A repeat of a keyed publish: nothing new was published.
    #[serde(default, skip_serializing_if = "is_false")]
    pub duplicate: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub user: String,
    pub data: Value,
    /// Append to the user's inbox before answering.
    #[serde(default, skip_serializing_if = "is_false")]
    pub persist: bool,
    /// Idempotency key (1 to 64 bytes), for a persisted send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SendResponse {
    pub sessions: u64,
    /// A persisted send: the message's seq in the user's inbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub duplicate: bool,
}

/// One unacknowledged message of a user's inbox; `at` is when it was stored (ms since the Unix
/// epoch).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InboxMessage {
    pub seq: u64,
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Sender>,
    pub at: u64,
}

/// `GET /api/inbox/{user}`: the inbox's position and its unacknowledged messages, oldest first.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InboxResponse {
    pub seq: u64,
    pub acked: u64,
    pub epoch: String,
    pub pending: Vec<InboxMessage>,
    /// Only the oldest pending messages are listed: the answer is bounded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BroadcastRequest {
    pub data: Value,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BroadcastResponse {
    pub nodes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DisconnectRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DisconnectResponse {
    pub sessions: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PresenceResponse {
    pub members: Vec<Member>,
}

/// One live node, as `GET /api/nodes` lists it. Times are milliseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// This process's instance id, new at every start: a node restarted under the same id (a
    /// container restart keeps the pod name) shows a new instance. Empty from nodes of earlier
    /// versions.
    #[serde(default)]
    pub instance: String,
    pub address: String,
    pub connections: u64,
    pub started_at: u64,
    pub last_seen: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodesResponse {
    pub nodes: Vec<NodeInfo>,
}

/// The body of every 4xx/5xx answer of the server API.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

fn is_false(value: &bool) -> bool {
    !*value
}
