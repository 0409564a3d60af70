//! Lua scripts: each runs atomically on one shard, in one round trip. Their bodies, with their
//! KEYS/ARGV contracts, are in `lua/`; docs/architecture.md explains them.

use std::sync::LazyLock;

use redis::Script;

/// Assigns the next offset of a room, appends to its history and publishes (lua/publish.lua);
/// with an idempotency key, once per key within the window.
/// Prefixed with lua/generation.lua, which reads the Redis process's generation into `gen`.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/generation.lua"),
        include_str!("lua/publish.lua"),
    ))
});

/// Reads a room's offset, epoch and a page of its history atomically (lua/read.lua). Prefixed
/// with lua/generation.lua, like PUBLISH, and lua/entry.lua (an entry's payload size and stamp).
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/generation.lua"),
        include_str!("lua/entry.lua"),
        include_str!("lua/read.lua"),
    ))
});

/// Adds a member to a room's presence and announces it (lua/join.lua).
pub static JOIN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/join.lua")));

/// Removes a member from a room's presence, announcing it if it was there (lua/leave.lua).
pub static LEAVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/leave.lua")));

/// Lists a room's members of live nodes, reaping those of dead nodes (lua/presence.lua).
pub static PRESENCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/presence.lua")));

/// Sends an envelope to every live node hosting a user (lua/send.lua). Prefixed with
/// lua/deliver.lua, which defines the delivery INBOX_SEND shares.
pub static SEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/deliver.lua"),
        include_str!("lua/send.lua"),
    ))
});

/// Hands client frames to the node holding a fallback session, if the key hash is the link's and
/// the node alive; with no frames only checks (lua/forward.lua).
pub static FORWARD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/forward.lua")));

/// A persisted send: checks its idempotency key, appends to the user's inbox under the next seq
/// and delivers like SEND, in one round trip (lua/inbox_send.lua). Prefixed with
/// lua/generation.lua, lua/deliver.lua and lua/entry.lua.
pub static INBOX_SEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/generation.lua"),
        include_str!("lua/deliver.lua"),
        include_str!("lua/entry.lua"),
        include_str!("lua/inbox_send.lua"),
    ))
});

/// Acknowledges a user's inbox up to a seq (lua/ack.lua). Prefixed with lua/generation.lua.
pub static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/generation.lua"),
        include_str!("lua/ack.lua"),
    ))
});

/// Reads a page of a user's pending inbox messages (lua/inbox_read.lua). Prefixed with
/// lua/generation.lua and lua/entry.lua.
pub static INBOX_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/generation.lua"),
        include_str!("lua/entry.lua"),
        include_str!("lua/inbox_read.lua"),
    ))
});

/// How many index entries one REAP call handles: a call's cost must not grow with the size of
/// the node, or reaping a big node blocks the shard (and every node's pub/sub pings with it).
pub const REAP_BATCH: usize = 100;

/// Entries of the sets of nodes of earlier versions (rooms, users) one REAP call handles: each
/// costs a walk of the room's presence or the user's sessions.
pub const REAP_LEGACY_BATCH: usize = 20;

/// Reaps one batch of a node's sessions and members on this shard (lua/reap.lua); called again
/// while it answers 0, with REAP_BATCH and REAP_LEGACY_BATCH as its batch sizes.
pub static REAP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/reap.lua")));

/// Writes one of this node's members back, announcing it only if its leave had been published
/// (lua/restore_member.lua).
pub static RESTORE_MEMBER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/restore_member.lua")));
