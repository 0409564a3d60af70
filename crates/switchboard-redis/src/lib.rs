//! `RedisBroker`: N switchboard nodes become one gateway over S independent Redis servers.
//!
//! A consistent-hash ring (virtual nodes, keyed by shard URL) maps every room, user and fallback
//! session id to one shard. A room's offset, epoch, history, presence and channel live on its
//! shard; a user's session index on the user's shard; a fallback session's link on the session
//! id's shard. Each shard has a command pool and one pub/sub connection, kept by a task that
//! reconnects with back-off, subscribes again to everything the node needs, writes this node's
//! registry, link and presence entries again, and replays from history what the node's rooms
//! published while the connection was down. docs/architecture.md has the schema.
//!
//! One module per job: `ring` (which shard holds a key), `shard` (a shard's client, TLS, command
//! connection and bounded calls), `subscriber` (the pub/sub task and replay), `history` (the READ
//! script), `inbox` (the user inbox and keyed publishes), `mirror` (this node's sessions,
//! presence and liveness, written back after Redis lost them; failed writes retried), `writes`
//! (those writes batched per shard), `reaper` (dead nodes and earlier incarnations), `metrics`, `envelope` (the pub/sub payloads), `keys` and `scripts`.
//! This file holds [`RedisBroker`] and its `Broker` impl, which delegates to them.

#[doc(hidden)]
pub mod envelope;
mod history;
mod inbox;
mod keys;
#[cfg(test)]
mod live_tests;
mod metrics;
mod mirror;
mod reaper;
mod ring;
mod scripts;
mod shard;
mod subscriber;
mod writes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use prometheus::Registry;
use serde_json::Value as Json;
use switchboard_broker::{
    Acked, Broker, BrokerError, BrokerHandler, BrokerResult, DirectMessage, Forwarded, History,
    HistoryQuery, Inbox, LinkRecord, Published, Sent, SessionRecord,
};
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, RoomMessage, Sender, StreamPosition};

use crate::metrics::Metrics;
use crate::mirror::Pending;
use crate::reaper::{reap_dead_nodes, reap_predecessors, reap_predecessors_once};
use crate::ring::Ring;
use crate::shard::Shard;
pub use crate::shard::{CaError, SetupError, check_ca_pem, redacted};
use crate::subscriber::run_shard;

/// Longest a single Redis call may take before it counts as unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the Redis broker needs to know.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS) URLs of the shards; order does not matter (the ring
    /// hashes the URLs).
    pub shards: Vec<String>,
    /// PEM certificates that `rediss://` shards' certificates must chain to, instead of the
    /// built-in Mozilla roots.
    pub ca_pem: Option<Vec<u8>>,
    pub node_id: String,
    /// This process's instance id: with the node id, it names the node's incarnation in Redis
    /// (see [`keys::incarnation`]).
    pub instance: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub stream_ttl: Duration,
    /// A node that has not heartbeated for this long is dead: its sessions and presence go.
    pub node_ttl: Duration,
    /// Messages kept per user inbox; beyond it the oldest unacknowledged are dropped.
    pub inbox_size: usize,
    /// How long an inbox message is kept; an inbox untouched (no send, no ack) for this long is
    /// forgotten, and starts over at seq 0 with a new epoch.
    pub inbox_ttl: Duration,
    /// How long a publish or persisted send key is remembered.
    pub idempotency_window: Duration,
}

struct Inner {
    /// For the tasks `Inner` starts itself, which must not keep it alive.
    this: Weak<Inner>,
    config: RedisConfig,
    /// The name of this node in Redis: `node id @ instance id`.
    incarnation: String,
    shards: Vec<Shard>,
    ring: Ring,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    metrics: Metrics,
    /// This node's registry entries, written again when a shard comes back without them.
    sessions: Mutex<HashMap<String, SessionRecord>>,
    /// This node's fallback session links by session id, likewise.
    links: Mutex<HashMap<String, LinkRecord>>,
    /// This node's presence entries by (room, session), likewise.
    /// Ordered, so a room's members are one range.
    members: Mutex<BTreeMap<(String, String), Member>>,
    /// The figures this node last reported, likewise.
    liveness: Mutex<Option<NodeInfo>>,
    /// Set after the first heartbeat: a liveness key missing after that had expired.
    heartbeated: AtomicBool,
    /// Registry and presence writes that failed, retried on every heartbeat.
    pending: Mutex<Pending>,
}

/// The cluster broker. Cheap to share; every node has one.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

/// The random half of an epoch (the scripts prefix the shard's generation).
fn epoch_digits() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().max(1) as u64
}

impl RedisBroker {
    /// Builds the broker; connects lazily, so a node starts (not ready) while Redis is down.
    pub fn new(config: RedisConfig, registry: &Registry) -> Result<Self, SetupError> {
        if config.shards.is_empty() {
            return Err(SetupError::NoShard);
        }
        // rustls picks the process-wide provider; naming ring keeps that choice explicit should
        // another dependency ever enable a second provider. Err: one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Metrics::new(registry)?;
        let mut ring = Ring::new();
        let mut shards = Vec::new();
        for (index, url) in config.shards.iter().enumerate() {
            if !ring.add(url, index) {
                return Err(SetupError::ListedTwice(redacted(url)));
            }
            let shard = Shard::new(index, url, config.ca_pem.as_deref())?;
            metrics.up.with_label_values(&[&shard.label]).set(0);
            shards.push(shard);
        }
        Ok(RedisBroker {
            inner: Arc::new_cyclic(|this| Inner {
                this: this.clone(),
                incarnation: keys::incarnation(&config.node_id, &config.instance),
                config,
                shards,
                ring,
                handler: OnceLock::new(),
                metrics,
                sessions: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                members: Mutex::new(BTreeMap::new()),
                liveness: Mutex::new(None),
                heartbeated: AtomicBool::new(false),
                pending: Mutex::new(Pending::default()),
            }),
        })
    }

    /// The index of the shard that holds `key` (a room name or a user id).
    pub fn shard_index(&self, key: &str) -> usize {
        self.inner.shard_index(key)
    }
}

impl Inner {
    fn node(&self) -> &str {
        &self.incarnation
    }

    async fn send_to_user(&self, user: &str, envelope: Vec<u8>, op: &str) -> BrokerResult<u64> {
        let shard = self.shard(user);
        self.call(shard, op, async |connection| {
            scripts::SEND
                .key(keys::user_sessions(user))
                .arg(envelope)
                .arg(keys::NODE_ALIVE_PREFIX)
                .arg(keys::INBOX_PREFIX)
                .invoke_async(connection)
                .await
        })
        .await
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> BrokerResult<()> {
        let inner = &self.inner;
        let _ = inner.handler.set(handler);
        for (index, shard) in inner.shards.iter().enumerate() {
            if let Some(control) = shard.control_rx.lock().take() {
                tokio::spawn(run_shard(Arc::downgrade(inner), index, control));
            }
        }
        tokio::spawn(reap_dead_nodes(Arc::downgrade(inner)));
        // Awaited once before the node takes sessions, so that watchers see the old sessions
        // leave before the returning clients join; a shard that does not answer is retried in
        // the background.
        let mut done = HashSet::new();
        reap_predecessors_once(inner, &mut done).await;
        tokio::spawn(reap_predecessors(Arc::downgrade(inner), done));
        Ok(())
    }

    async fn publish(
        &self,
        room: &str,
        data: Json,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>> {
        let inner = &self.inner;
        let stored = envelope::Stored { data, from };
        let payload = envelope::pack(&stored)?;
        let shard = inner.shard(room);
        let (offset, epoch): (u64, String) = inner
            .call_write(shard, "publish", async |connection| {
                scripts::PUBLISH
                    .key(keys::room_meta(room))
                    .key(keys::room_log(room))
                    .key(keys::room_channel(room))
                    .arg(payload)
                    .arg(inner.config.history_size)
                    .arg(millis(inner.config.history_ttl))
                    .arg(millis(inner.config.stream_ttl))
                    .arg(epoch_digits())
                    .invoke_async(connection)
                    .await
            })
            .await?;
        Ok(Arc::new(RoomMessage {
            room: room.to_owned(),
            data: stored.data,
            offset,
            epoch,
            from: stored.from,
        }))
    }

    async fn subscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.inner.subscribe_room(room).await
    }

    async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.inner.unsubscribe_room(room).await
    }

    async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        self.inner.history(room, query).await
    }

    async fn position(&self, room: &str) -> BrokerResult<StreamPosition> {
        Ok(self.inner.read(room, None, 0, None).await?.position)
    }

    async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        let envelope = envelope::direct(&envelope::Direct {
            user: message.user.clone(),
            data: message.data,
            from: message.from,
            seq: None,
        })?;
        self.inner
            .send_to_user(&message.user, envelope, "send")
            .await
    }

    async fn publish_keyed(
        &self,
        room: &str,
        data: Json,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published> {
        self.inner.publish_keyed(room, data, from, key).await
    }

    async fn send_persisted(
        &self,
        message: DirectMessage,
        key: Option<&str>,
    ) -> BrokerResult<Sent> {
        self.inner.send_persisted(message, key).await
    }

    async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked> {
        self.inner.ack(user, seq).await
    }

    async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox> {
        self.inner.inbox(user, after, limit, max_bytes).await
    }

    async fn broadcast(&self, data: Json) -> BrokerResult<u64> {
        let payload = envelope::broadcast(&data)?;
        let shard = self.inner.up_shard()?;
        self.inner
            .call(shard, "broadcast", async |connection| {
                redis::cmd("PUBLISH")
                    .arg(keys::BROADCAST)
                    .arg(payload)
                    .query_async(connection)
                    .await
            })
            .await
    }

    async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64> {
        let envelope = envelope::disconnect(&envelope::Disconnect {
            user: user.to_owned(),
            code,
            reason: reason.to_owned(),
        })?;
        self.inner.send_to_user(user, envelope, "disconnect").await
    }

    async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.inner.register_session(record).await
    }

    async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.inner.unregister_session(record).await
    }

    async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.inner.join_presence(room, member).await
    }

    async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.inner.leave_presence(room, member).await
    }

    async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>> {
        let inner = &self.inner;
        let shard = inner.shard(room);
        let values: Vec<Vec<u8>> = inner
            .call(shard, "presence", async |connection| {
                scripts::PRESENCE
                    .key(keys::room_presence(room))
                    .key(keys::room_channel(room))
                    .arg(keys::NODE_ALIVE_PREFIX)
                    .arg(keys::REAPED_MARK_TTL_MS)
                    .invoke_async(connection)
                    .await
            })
            .await?;
        let mut members = Vec::with_capacity(values.len());
        for value in values {
            let packed = value
                .splitn(3, |byte| *byte == b'\n')
                .nth(2)
                .ok_or_else(|| BrokerError::Internal("bad presence entry".into()))?;
            let member: Member = rmp_serde::from_slice(packed)
                .map_err(|error| BrokerError::Internal(error.to_string()))?;
            members.push(member);
        }
        members.sort_by(|a, b| a.session.cmp(&b.session));
        Ok(members)
    }

    async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()> {
        self.inner.heartbeat(node).await
    }

    /// The link is stored under this node's incarnation, whatever `link.node` says (as
    /// `register_session` does).
    async fn register_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.inner.register_link(link).await
    }

    async fn unregister_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.inner.unregister_link(link).await
    }

    async fn forward(
        &self,
        session: &str,
        key_hash: &str,
        frames: Vec<String>,
    ) -> BrokerResult<Forwarded> {
        let inner = &self.inner;
        let payload = if frames.is_empty() {
            Vec::new()
        } else {
            envelope::frames(&envelope::Frames {
                session: session.to_owned(),
                frames,
            })?
        };
        let shard = inner.shard(session);
        let answer: i64 = inner
            .call_write(shard, "forward", async |connection| {
                scripts::FORWARD
                    .key(keys::link(session))
                    .arg(key_hash)
                    .arg(&payload)
                    .arg(keys::NODE_ALIVE_PREFIX)
                    .arg(keys::INBOX_PREFIX)
                    .invoke_async(connection)
                    .await
            })
            .await?;
        match answer {
            1 => Ok(Forwarded::Delivered),
            0 => Ok(Forwarded::UnknownSession),
            -1 => Ok(Forwarded::WrongKey),
            other => Err(BrokerError::Internal(format!(
                "the forward script answered {other}"
            ))),
        }
    }

    async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
        let inner = &self.inner;
        let shard = inner.up_shard()?;
        let ids: Vec<String> = inner
            .call(shard, "nodes", async |connection| {
                redis::cmd("SMEMBERS")
                    .arg(keys::NODES)
                    .query_async(connection)
                    .await
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = inner
            .call(shard, "nodes", async |connection| {
                redis::cmd("MGET")
                    .arg(
                        ids.iter()
                            .map(|id| keys::node_alive(id))
                            .collect::<Vec<_>>(),
                    )
                    .query_async(connection)
                    .await
            })
            .await?;
        let mut nodes: Vec<NodeInfo> = values
            .into_iter()
            .flatten()
            .filter_map(|value| rmp_serde::from_slice(&value).ok())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn deregister_node(&self, node: &str) -> BrokerResult<()> {
        self.inner.deregister_node(node).await
    }

    fn is_healthy(&self) -> bool {
        self.inner
            .shards
            .iter()
            .all(|shard| shard.up.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_spreads_keys_and_ignores_shard_order() {
        let registry = Registry::new();
        let config = |shards: Vec<&str>| RedisConfig {
            shards: shards.into_iter().map(str::to_owned).collect(),
            ca_pem: None,
            node_id: "n".into(),
            instance: "1".into(),
            history_size: 10,
            history_ttl: Duration::from_secs(60),
            stream_ttl: Duration::from_secs(600),
            node_ttl: Duration::from_secs(3),
            inbox_size: 10,
            inbox_ttl: Duration::from_secs(60),
            idempotency_window: Duration::from_secs(60),
        };
        let a = "redis://127.0.0.1:1";
        let b = "redis://127.0.0.1:2";
        let forward = RedisBroker::new(config(vec![a, b]), &registry).unwrap();
        let backward = RedisBroker::new(config(vec![b, a]), &Registry::new()).unwrap();
        let mut counts = [0usize; 2];
        for index in 0..1000 {
            let key = format!("room-{index}");
            let shard = forward.shard_index(&key);
            counts[shard] += 1;
            assert_eq!(
                forward.inner.config.shards[shard],
                backward.inner.config.shards[backward.shard_index(&key)],
                "the same key maps to the same URL whatever the order"
            );
        }
        assert!(counts.iter().all(|count| *count > 350), "{counts:?}");
    }

    #[test]
    fn a_shard_listed_twice_is_refused() {
        let config = RedisConfig {
            shards: vec!["redis://127.0.0.1:1".into(), "redis://127.0.0.1:1".into()],
            ca_pem: None,
            node_id: "n".into(),
            instance: "1".into(),
            history_size: 10,
            history_ttl: Duration::from_secs(60),
            stream_ttl: Duration::from_secs(600),
            node_ttl: Duration::from_secs(3),
            inbox_size: 10,
            inbox_ttl: Duration::from_secs(60),
            idempotency_window: Duration::from_secs(60),
        };
        let Err(error) = RedisBroker::new(config, &Registry::new()) else {
            panic!("a shard listed twice is accepted")
        };
        assert!(
            matches!(&error, SetupError::ListedTwice(shard) if shard == "redis://127.0.0.1:1"),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "shard redis://127.0.0.1:1 is listed twice"
        );
    }
}
