//! The Redis key and channel schema (docs/architecture.md lists it). Everything of a room lives on
//! the room's shard; a user's session index on the user's shard; a fallback session's link on the
//! session id's shard; node liveness, node inboxes and the broadcast channel on every shard.

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

/// Hash `{e: epoch, s: seq, a: acked}` of a user's inbox.
pub fn user_inbox_meta(user: &str) -> String {
    format!("{PREFIX}ui:{user}:meta")
}

/// Stream of a user's unacknowledged inbox messages; entry id `<seq>-0`, fields `p` (payload)
/// and `t` (ms).
pub fn user_inbox_log(user: &str) -> String {
    format!("{PREFIX}ui:{user}:log")
}

/// A keyed publish's idempotency key (value `offset:epoch`), on the room's shard. The key's
/// length comes first, so no two (key, room) pairs share a name.
pub fn publish_key(room: &str, key: &str) -> String {
    format!("{PREFIX}ik:r:{}:{key}:{room}", key.len())
}

/// A keyed persisted send's idempotency key (value `sessions:seq:epoch`), on the user's shard.
pub fn send_key(user: &str, key: &str) -> String {
    format!("{PREFIX}ik:u:{}:{key}:{user}", key.len())
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

/// Set of a node's sessions, as `session \n user`, on each user's shard: what reaping the node
/// removes from the registry. Entries leave with their session, so it holds live sessions only.
pub fn node_sessions(node: &str) -> String {
    format!("{PREFIX}n:{node}:sessions")
}

/// Hash `{n: node, k: key hash}` of a fallback (SSE or long-poll) session's link, on the session
/// id's shard: which node holds the session, and the SHA-256 (hex) of its key. No TTL: it goes
/// with the session, or when its node is reaped or found dead by a forward.
pub fn link(session: &str) -> String {
    format!("{PREFIX}l:{session}")
}

/// Set of a node's fallback session ids whose link is on this shard: what reaping the node
/// removes. Entries leave with their link, so it holds live sessions only.
pub fn node_links(node: &str) -> String {
    format!("{PREFIX}n:{node}:links")
}

/// The entry of [`node_sessions`] or [`node_members`] for `session` and its user or room
/// (session ids are hex, so the first newline splits it).
pub fn node_entry(session: &str, of: &str) -> String {
    format!("{session}\n{of}")
}

/// Set while a node's entries on this shard were removed because it looked dead (its leaves
/// were published): if it was only paused, it announces its members again when it writes them
/// back. Expires after [`REAPED_MARK_TTL_MS`].
pub fn node_reaped(node: &str) -> String {
    format!("{PREFIX}n:{node}:reaped")
}

/// How long a reaped mark is kept: far longer than any pause a node survives.
pub const REAPED_MARK_TTL_MS: u64 = 3_600_000;

/// Set of a node's presence members, as `session \n room`, on each room's shard: what reaping
/// the node removes from presence. Entries leave with their member.
pub fn node_members(node: &str) -> String {
    format!("{PREFIX}n:{node}:members")
}

/// A node incarnation's name in Redis: the node id and the instance id of this process, so that
/// a process restarted under the same id (a Kubernetes container restart keeps the pod name)
/// never shares keys, entries or inbox with its predecessor.
pub fn incarnation(node_id: &str, instance: &str) -> String {
    format!("{node_id}@{instance}")
}

/// Whether `name` (a member of [`NODES`]) is an incarnation of `node_id`, or the bare id a
/// node of an earlier version registered under.
pub fn is_incarnation_of(name: &str, node_id: &str) -> bool {
    name.strip_prefix(node_id)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('@'))
}
