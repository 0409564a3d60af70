//! The Redis key and channel schema (docs/architecture.md lists it). Everything of a room lives on
//! the room's shard; a user's session index on the user's shard; node liveness, node inboxes and
//! the broadcast channel on every shard.

/// Prefix of every key and channel, so a Redis server can be shared with other data.
pub const PREFIX: &str = "sb:";

/// Hash `{e: epoch, o: offset}` of a room's stream.
pub fn room_meta(room: &str) -> String {
    format!("{PREFIX}r:{room}:meta")
}

/// Stream of a room's history; entry id `<offset>-0`, fields `p` (payload) and `t` (ms).
pub fn room_log(room: &str) -> String {
    format!("{PREFIX}r:{room}:log")
}

/// Hash of a room's presence: session → `node \n user \n packed member`.
pub fn room_presence(room: &str) -> String {
    format!("{PREFIX}r:{room}:presence")
}

/// Channel of a room's messages and presence events.
pub fn room_channel(room: &str) -> String {
    format!("{PREFIX}r:{room}")
}

/// The room a room channel belongs to.
pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix(PREFIX)?.strip_prefix("r:")
}

/// Hash of a user's sessions: session → node.
pub fn user_sessions(user: &str) -> String {
    format!("{PREFIX}u:{user}")
}

/// A node's liveness key (value: its packed figures), expiring after the node TTL.
pub fn node_alive(node: &str) -> String {
    format!("{PREFIX}n:{node}")
}

/// Prefix of node liveness keys, for the scripts.
pub const NODE_ALIVE_PREFIX: &str = "sb:n:";

/// Set of every node id seen, for listing and reaping.
pub const NODES: &str = "sb:nodes";

/// Channel of a node's directed messages.
pub fn inbox(node: &str) -> String {
    format!("{PREFIX}inbox:{node}")
}

/// Prefix of inbox channels, for the scripts.
pub const INBOX_PREFIX: &str = "sb:inbox:";

/// Channel every node receives broadcasts on.
pub const BROADCAST: &str = "sb:broadcast";

/// Set of the users with sessions on a node, on each user's shard (for reaping).
pub fn node_users(node: &str) -> String {
    format!("{PREFIX}n:{node}:users")
}

/// Set while a node's entries on this shard were removed because it looked dead (its leaves
/// were published): if it was only paused, it announces its members again when it writes them
/// back. Expires after [`REAPED_MARK_TTL_MS`].
pub fn node_reaped(node: &str) -> String {
    format!("{PREFIX}n:{node}:reaped")
}

/// How long a reaped mark is kept: far longer than any pause a node survives.
pub const REAPED_MARK_TTL_MS: u64 = 3_600_000;

/// Set of the rooms with presence members of a node, on each room's shard (for reaping).
pub fn node_rooms(node: &str) -> String {
    format!("{PREFIX}n:{node}:rooms")
}
