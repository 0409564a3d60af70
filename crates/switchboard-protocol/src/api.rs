//! Request and response bodies of the server API on the internal port (JSON).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Member;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PublishRequest {
    pub room: String,
    pub data: Value,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PublishResponse {
    pub offset: u64,
    pub epoch: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub user: String,
    pub data: Value,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SendResponse {
    pub sessions: u64,
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
