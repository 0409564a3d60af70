//! `RedisBroker`: N switchboard nodes become one gateway over S independent Redis servers.
//!
//! A consistent-hash ring (virtual nodes, keyed by shard URL) maps every room and user to one
//! shard. A room's offset, epoch, history, presence and channel live on its shard; a user's
//! session index on the user's shard. Each shard has a command pool and one pub/sub connection,
//! kept by a task that reconnects with back-off, subscribes again to everything the node needs,
//! writes this node's registry and presence entries again, and replays from history what the
//! node's rooms published while the connection was down. docs/architecture.md has the schema.

#[doc(hidden)]
pub mod envelope;
mod keys;
#[cfg(test)]
mod live_tests;
mod scripts;
mod writes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, PoolConfig, Runtime, Timeouts};
use futures_util::StreamExt;
use hashring::HashRing;
use parking_lot::Mutex;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use redis::aio::MultiplexedConnection;
use redis::{RedisError, RedisResult, TlsCertificates, Value};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value as Json;
use switchboard_broker::{
    Broker, BrokerError, BrokerHandler, BrokerResult, DirectMessage, History, HistoryQuery,
    PresenceChange, PresenceEvent, SessionRecord,
};
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, RoomMessage, Sender, StreamPosition};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::Envelope;
use crate::writes::{Write, Writer};

/// Longest a single Redis call may take before it counts as unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Virtual nodes per shard on the ring: enough for an even spread over a few shards.
const VIRTUAL_NODES: u32 = 160;
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
}

#[derive(Hash, Clone, Debug, PartialEq)]
struct VirtualNode {
    url: String,
    replica: u32,
}

struct Metrics {
    up: IntGaugeVec,
    reconnects: IntCounterVec,
    errors: IntCounterVec,
    messages: IntCounterVec,
    write_batch_size: HistogramVec,
}

impl Metrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| {
            let metric = IntGaugeVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        Ok(Metrics {
            up: gauge(
                "switchboard_redis_shard_up",
                "1 while the shard's pub/sub connection is up and subscribed, else 0.",
            )?,
            reconnects: counter(
                "switchboard_redis_reconnects_total",
                "Times the shard's pub/sub connection was re-established after a loss.",
            )?,
            errors: counter(
                "switchboard_redis_errors_total",
                "Redis calls that failed or timed out, and lost pub/sub connections.",
            )?,
            messages: counter(
                "switchboard_redis_messages_total",
                "Pub/sub messages received from the shard.",
            )?,
            write_batch_size: {
                let metric = HistogramVec::new(
                    HistogramOpts::new(
                        "switchboard_redis_write_batch_size",
                        "Registry and presence writes sent to the shard in one pipeline.",
                    )
                    .buckets(vec![1.0, 10.0, 100.0, 500.0, 1000.0]),
                    &["shard"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
        })
    }
}

enum Control {
    Subscribe {
        room: String,
        done: oneshot::Sender<BrokerResult<()>>,
    },
    Unsubscribe {
        room: String,
    },
    /// A page of a room's replay after a reconnect (see [`replay`]), from replay round `round`;
    /// `done` on the room's last.
    Replayed {
        round: u64,
        room: String,
        messages: Vec<Arc<RoomMessage>>,
        done: bool,
    },
    Stop,
}

impl Shard {
    /// A multiplexed connection shared by every call to this shard. It comes from the pool once
    /// and is reused until a call finds it broken: taking one from the pool per call would cost
    /// the pool's health check (a round trip) every time.
    async fn connection(&self) -> BrokerResult<MultiplexedConnection> {
        if let Some(connection) = self.shared.lock().clone() {
            return Ok(connection);
        }
        let pooled = self
            .pool
            .get()
            .await
            .map_err(|error| BrokerError::Unavailable(error.to_string()))?;
        let mut connection = MultiplexedConnection::clone(&pooled);
        // redis-rs fails a call whose answer takes over 500 ms by default, which a burst of
        // writes on a busy node easily passes: calls are bounded by COMMAND_TIMEOUT instead.
        connection.set_response_timeout(COMMAND_TIMEOUT);
        *self.shared.lock() = Some(connection.clone());
        Ok(connection)
    }
}

struct Shard {
    /// See [`Shard::connection`].
    shared: Mutex<Option<MultiplexedConnection>>,
    label: String,
    client: redis::Client,
    pool: Pool,
    control: mpsc::UnboundedSender<Control>,
    /// Taken by `start`, which spawns the shard's task.
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
    up: AtomicBool,
    /// The queue of this shard's registry and presence writes (see `writes`).
    writer: OnceLock<Writer>,
}

struct Inner {
    /// For the tasks `Inner` starts itself, which must not keep it alive.
    this: Weak<Inner>,
    config: RedisConfig,
    /// The name of this node in Redis: `node id @ instance id`.
    incarnation: String,
    shards: Vec<Shard>,
    ring: HashRing<VirtualNode>,
    shard_of_url: HashMap<String, usize>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    metrics: Metrics,
    /// This node's registry entries, written again when a shard comes back without them.
    sessions: Mutex<HashMap<String, SessionRecord>>,
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

/// Writes of this node's entries that failed, to be done when Redis answers again.
#[derive(Default)]
struct Pending {
    /// Closed sessions still in the registry, by session id.
    sessions: HashMap<String, SessionRecord>,
    /// (room, session) of members that joined but are not in the room's presence.
    joins: HashSet<(String, String)>,
    /// Members that left but may still be in the room's presence.
    leaves: HashMap<(String, String), Member>,
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

/// Checks that `pem` holds at least one certificate and that every one is a usable trust anchor,
/// so that a bad `--redis-ca-file` stops the node at start rather than every TLS connect.
pub fn check_ca_pem(pem: &[u8]) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(pem) {
        let certificate =
            certificate.map_err(|error| format!("not a PEM certificate file: {error}"))?;
        roots
            .add(certificate)
            .map_err(|error| format!("unusable certificate: {error}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(())
}

/// The client of one shard: a `rediss://` shard verifies its certificate against `ca_pem` when
/// given, else against the built-in roots.
fn shard_client(url: &str, ca_pem: Option<&[u8]>) -> RedisResult<redis::Client> {
    match ca_pem {
        Some(pem) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            url,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        _ => redis::Client::open(url),
    }
}

fn redis_error(error: RedisError) -> BrokerError {
    if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
    {
        BrokerError::Unavailable(error.to_string())
    } else {
        BrokerError::Internal(error.to_string())
    }
}

/// A shard URL fit for logs and error messages: its password, if any, replaced by `***`.
pub fn redacted(shard_url: &str) -> String {
    match url::Url::parse(shard_url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => shard_url.to_owned(),
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

impl RedisBroker {
    /// Builds the broker; connects lazily, so a node starts (not ready) while Redis is down.
    pub fn new(config: RedisConfig, registry: &Registry) -> Result<Self, String> {
        if config.shards.is_empty() {
            return Err("no Redis shard configured".into());
        }
        // rustls picks the process-wide provider; naming ring keeps that choice explicit should
        // another dependency ever enable a second provider. Err: one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Metrics::new(registry).map_err(|error| error.to_string())?;
        let mut ring = HashRing::new();
        let mut shards = Vec::new();
        let mut shard_of_url = HashMap::new();
        for (index, url) in config.shards.iter().enumerate() {
            let shown = redacted(url);
            if shard_of_url.insert(url.clone(), index).is_some() {
                return Err(format!("shard {shown} is listed twice"));
            }
            for replica in 0..VIRTUAL_NODES {
                ring.add(VirtualNode {
                    url: url.clone(),
                    replica,
                });
            }
            let client = shard_client(url, config.ca_pem.as_deref())
                .map_err(|error| format!("{shown}: {error}"))?;
            // From the client's connection info, which carries the TLS roots (a URL would not).
            let manager = Manager::new(client.get_connection_info().clone())
                .map_err(|error| format!("{shown}: {error}"))?;
            let pool = Pool::builder(manager)
                .config(PoolConfig {
                    max_size: 16,
                    timeouts: Timeouts {
                        wait: Some(COMMAND_TIMEOUT),
                        create: Some(COMMAND_TIMEOUT),
                        recycle: Some(COMMAND_TIMEOUT),
                    },
                    ..PoolConfig::default()
                })
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|error| format!("{shown}: {error}"))?;
            let (control, control_rx) = mpsc::unbounded_channel();
            let label = index.to_string();
            metrics.up.with_label_values(&[&label]).set(0);
            shards.push(Shard {
                shared: Mutex::new(None),
                label,
                client,
                pool,
                control,
                control_rx: Mutex::new(Some(control_rx)),
                up: AtomicBool::new(false),
                writer: OnceLock::new(),
            });
        }
        Ok(RedisBroker {
            inner: Arc::new_cyclic(|this| Inner {
                this: this.clone(),
                incarnation: keys::incarnation(&config.node_id, &config.instance),
                config,
                shards,
                ring,
                shard_of_url,
                handler: OnceLock::new(),
                metrics,
                sessions: Mutex::new(HashMap::new()),
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
    fn shard_index(&self, key: &str) -> usize {
        self.ring
            .get(&key)
            .and_then(|node| self.shard_of_url.get(&node.url).copied())
            .unwrap_or(0)
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[self.shard_index(key)]
    }

    fn node(&self) -> &str {
        &self.incarnation
    }

    fn error(&self, shard: &Shard, op: &str, error: BrokerError) -> BrokerError {
        self.metrics.errors.with_label_values(&[&shard.label]).inc();
        tracing::debug!(shard = %shard.label, op, %error, "redis call failed");
        error
    }

    /// Runs one call on the shard's pool, bounded by the command timeout.
    async fn call<T, F>(&self, shard: &Shard, op: &str, call: F) -> BrokerResult<T>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    {
        let attempt = async {
            let mut connection = shard.connection().await?;
            call(&mut connection).await.map_err(redis_error)
        };
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Unavailable(format!("redis {op} timed out"))),
        };
        result.map_err(|error| {
            if matches!(error, BrokerError::Unavailable(_)) {
                shard.shared.lock().take();
            }
            self.error(shard, op, error)
        })
    }

    /// Like [`Inner::call`], for a call that changes state: once it may have been sent, a timeout
    /// or a broken connection leaves its outcome unknown, which `call` would report as
    /// `Unavailable` (certainly not done).
    async fn call_write<T, F>(&self, shard: &Shard, op: &str, call: F) -> BrokerResult<T>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    {
        if !shard.up.load(Ordering::SeqCst) {
            // The shard's pub/sub connection is down, so its command connection is most likely
            // dead too, and a write sent on it would end unknown: better certainly not sent.
            let error = BrokerError::Unavailable(format!("redis {op}: the shard is down"));
            return Err(self.error(shard, op, error));
        }
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, shard.connection()).await {
            Err(_) => Err(BrokerError::Unavailable(format!(
                "redis {op}: no connection in time"
            ))),
            Ok(Err(error)) => Err(error),
            Ok(Ok(mut connection)) => {
                match tokio::time::timeout(COMMAND_TIMEOUT, call(&mut connection)).await {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(error)) if error.is_connection_refusal() => {
                        Err(BrokerError::Unavailable(error.to_string()))
                    }
                    Ok(Err(error))
                        if error.is_io_error()
                            || error.is_connection_dropped()
                            || error.is_timeout() =>
                    {
                        Err(BrokerError::UnknownOutcome(error.to_string()))
                    }
                    Ok(Err(error)) => Err(BrokerError::Internal(error.to_string())),
                    Err(_) => Err(BrokerError::UnknownOutcome(format!(
                        "redis {op} sent but not answered in time"
                    ))),
                }
            }
        };
        result.map_err(|error| {
            if matches!(
                error,
                BrokerError::Unavailable(_) | BrokerError::UnknownOutcome(_)
            ) {
                shard.shared.lock().take();
            }
            self.error(shard, op, error)
        })
    }

    /// The stored presence value: `node \n user \n packed member`.
    fn presence_value(&self, member: &Member) -> BrokerResult<Vec<u8>> {
        let packed = envelope::pack(member).map_err(BrokerError::Internal)?;
        Ok([
            self.node().as_bytes(),
            b"\n",
            member.user.as_bytes(),
            b"\n",
            &packed,
        ]
        .concat())
    }

    /// Writes again what this node keeps on `shard`: liveness, registry entries and presence.
    /// Members missing from presence are announced with a join if the node had been reaped
    /// (its leaves were published); after Redis merely lost them, nobody saw them go. The entries
    /// go through the shard's writer [`RESTORE_BATCH`] at a time, each batch tried up to
    /// [`RESTORE_ATTEMPTS`] times: one pipeline of everything would grow with the node and could
    /// not finish within the command timeout on a big one, and the writer keeps the order with
    /// the node's other writes (a session that closes meanwhile is not written back after its
    /// removal).
    async fn restore(&self, index: usize, node_info: Option<NodeInfo>) -> BrokerResult<()> {
        let shard = &self.shards[index];
        if let Some(info) = node_info {
            let packed = envelope::pack(&info).map_err(BrokerError::Internal)?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(keys::node_alive(self.node()))
                .arg(packed)
                .arg("PX")
                .arg(millis(self.config.node_ttl))
                .ignore();
            pipe.cmd("SADD").arg(keys::NODES).arg(self.node()).ignore();
            self.call(shard, "restore", async |connection| {
                pipe.query_async::<()>(connection).await
            })
            .await?;
        }
        let sessions: Vec<String> = self
            .sessions
            .lock()
            .values()
            .filter(|record| self.shard_index(&record.user) == index)
            .map(|record| record.session.clone())
            .collect();
        for chunk in sessions.chunks(RESTORE_BATCH) {
            self.restore_batch(index, || {
                let sessions = self.sessions.lock();
                chunk
                    .iter()
                    .filter_map(|session| sessions.get(session))
                    .map(|record| {
                        Ok(Write::Register {
                            user: record.user.clone(),
                            session: record.session.clone(),
                        })
                    })
                    .collect()
            })
            .await?;
        }
        let members: Vec<(String, String)> = self
            .members
            .lock()
            .keys()
            .filter(|(room, _)| self.shard_index(room) == index)
            .cloned()
            .collect();
        for chunk in members.chunks(RESTORE_BATCH) {
            self.restore_batch(index, || {
                let members = self.members.lock();
                chunk
                    .iter()
                    .filter_map(|key| Some((&key.0, members.get(key)?)))
                    .map(|(room, member)| {
                        Ok(Write::Restore {
                            room: room.clone(),
                            session: member.session.clone(),
                            value: self.presence_value(member)?,
                            event: envelope::presence_event(true, &member.session, &member.user),
                        })
                    })
                    .collect()
            })
            .await?;
        }
        self.call(shard, "restore", async |connection| {
            redis::cmd("DEL")
                .arg(keys::node_reaped(self.node()))
                .query_async::<()>(connection)
                .await
        })
        .await
    }

    /// Sends the writes `batch` makes (from the entries still held when it is called) through
    /// the shard's writer, and again, up to [`RESTORE_ATTEMPTS`] times, while any fails.
    async fn restore_batch(
        &self,
        index: usize,
        batch: impl Fn() -> BrokerResult<Vec<Write>>,
    ) -> BrokerResult<()> {
        let mut attempt = 1;
        loop {
            let writes = batch()?;
            let outcomes = futures_util::future::join_all(
                writes.into_iter().map(|write| self.write(index, write)),
            )
            .await;
            match outcomes.into_iter().find_map(Result::err) {
                None => return Ok(()),
                Some(error) if attempt >= RESTORE_ATTEMPTS => return Err(error),
                Some(_) => {
                    tokio::time::sleep(MIN_BACKOFF * attempt).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One page of a room's history (see the READ script).
    async fn read(
        &self,
        room: &str,
        since: Option<u64>,
        count: i64,
        max_bytes: Option<usize>,
    ) -> BrokerResult<ReadPage> {
        let shard = self.shard(room);
        let budget = max_bytes.map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX));
        let mode = if since.is_some() { "since" } else { "newest" };
        let value: Value = self
            .call(shard, "read", async |connection| {
                scripts::READ
                    .key(keys::room_meta(room))
                    .key(keys::room_log(room))
                    .arg(millis(self.config.stream_ttl))
                    .arg(mode)
                    .arg(since.unwrap_or(0))
                    .arg(count)
                    .arg(budget)
                    .arg(millis(self.config.history_ttl))
                    .invoke_async(connection)
                    .await
            })
            .await?;
        let (mut position, entries, more, expired) =
            parse_read(value).map_err(BrokerError::Internal)?;
        if position.offset == 0 && position.epoch.len() == 8 {
            // A room without state: an epoch of the shard's generation, stored nowhere (reads
            // create nothing).
            position.epoch.push_str(&epoch_digits());
        }
        let mut messages = Vec::with_capacity(entries.len());
        for (offset, payload) in entries {
            let stored: envelope::Stored =
                envelope::unpack(&payload).map_err(BrokerError::Internal)?;
            messages.push(Arc::new(RoomMessage {
                room: room.to_owned(),
                data: stored.data,
                offset,
                epoch: position.epoch.clone(),
                from: stored.from,
            }));
        }
        Ok(ReadPage {
            position,
            messages,
            expired,
            more,
        })
    }

    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    /// Hands one pub/sub payload to the node. A room message of a room being replayed waits in
    /// `replaying` until the replay has delivered what came before it.
    fn dispatch(
        &self,
        rooms: &mut HashMap<String, Option<StreamPosition>>,
        replaying: &mut HashMap<String, Vec<Arc<RoomMessage>>>,
        channel: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let Some(handler) = self.handler() else {
            return Ok(());
        };
        let room = keys::room_of_channel(channel);
        match envelope::decode(room, payload)? {
            Envelope::Room(message) => match replaying.get_mut(&message.room) {
                Some(waiting) => waiting.push(Arc::new(message)),
                None => self.deliver(rooms, Arc::new(message)),
            },
            Envelope::Join(notice) => handler.presence(PresenceEvent {
                change: PresenceChange::Join,
                notice,
            }),
            Envelope::Leave(notice) => handler.presence(PresenceEvent {
                change: PresenceChange::Leave,
                notice,
            }),
            Envelope::Direct(direct) => handler.direct(Arc::new(DirectMessage {
                user: direct.user,
                data: direct.data,
                from: direct.from,
            })),
            Envelope::Disconnect(disconnect) => {
                handler.disconnect(&disconnect.user, disconnect.code, &disconnect.reason)
            }
            Envelope::Broadcast(data) => handler.broadcast(Arc::new(data)),
        }
        Ok(())
    }

    /// Hands a room message to the node; remembers each room's newest offset for replay.
    fn deliver(
        &self,
        rooms: &mut HashMap<String, Option<StreamPosition>>,
        message: Arc<RoomMessage>,
    ) {
        let Some(handler) = self.handler() else {
            return;
        };
        if let Some(position) = rooms.get_mut(&message.room) {
            *position = Some(StreamPosition {
                offset: message.offset,
                epoch: message.epoch.clone(),
            });
        }
        handler.room_message(message);
    }

    /// Reads, page by page, what `room` published after `position` (the newest message this node
    /// received), handing each page to `page`. Sessions drop what they already have by offset.
    async fn replay_room(
        &self,
        room: &str,
        position: Option<StreamPosition>,
        mut page: impl FnMut(Vec<Arc<RoomMessage>>),
    ) {
        let mut since = position.as_ref().map_or(0, |position| position.offset);
        let mut first = true;
        loop {
            let mut read = self
                .read(room, Some(since), -1, Some(REPLAY_PAGE_BYTES))
                .await;
            if let (true, Ok(read_page), Some(seen)) = (first, &read, position.as_ref())
                && read_page.position.epoch != seen.epoch
                && since > 0
            {
                // The room started a new epoch (Redis restarted, failed over, or lost it): every
                // message of the new epoch, even those published before this connection was
                // back, is new to this node.
                since = 0;
                read = self.read(room, Some(0), -1, Some(REPLAY_PAGE_BYTES)).await;
            }
            first = false;
            match read {
                Ok(read_page) => {
                    if let Some(last) = read_page.messages.last() {
                        since = last.offset;
                    }
                    let more = read_page.more;
                    page(read_page.messages);
                    if !more {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%room, %error, "cannot replay a room after a reconnect");
                    break;
                }
            }
        }
    }
}

/// Rooms replayed at once after a reconnect: enough to hide round trips, few enough that a
/// reconnect of a node with many rooms does not flood the shard.
const REPLAY_CONCURRENCY: usize = 8;

/// After a reconnect: reads what each room published while the connection was down, outside
/// the shard's pub/sub task, and hands it to that task page by page, so live messages of every
/// other room keep flowing however slow the reads are. The task delivers the pages, then the
/// live messages of the room that came meanwhile: a room's messages stay in offset order.
async fn replay(
    weak: Weak<Inner>,
    index: usize,
    round: u64,
    rooms: Vec<(String, Option<StreamPosition>)>,
) {
    futures_util::stream::iter(rooms)
        .for_each_concurrent(REPLAY_CONCURRENCY, |(room, position)| {
            let weak = weak.clone();
            async move {
                let Some(inner) = weak.upgrade() else { return };
                let control = inner.shards[index].control.clone();
                inner
                    .replay_room(&room, position, |messages| {
                        let _ = control.send(Control::Replayed {
                            round,
                            room: room.clone(),
                            messages,
                            done: false,
                        });
                    })
                    .await;
                let _ = control.send(Control::Replayed {
                    round,
                    room,
                    messages: Vec::new(),
                    done: true,
                });
            }
        })
        .await;
}

/// One history entry as read: offset, stored payload.
type LogEntry = (u64, Vec<u8>);

/// Entries written back per batch by `restore`.
const RESTORE_BATCH: usize = 500;
/// Tries of each restore batch before the restore gives up (the next reconnect or expired
/// heartbeat restores again).
const RESTORE_ATTEMPTS: u32 = 3;

/// Payload bytes read per page when replaying a room after a reconnect.
const REPLAY_PAGE_BYTES: usize = 1 << 20;

/// One page of history as [`Inner::read`] returns it.
struct ReadPage {
    position: StreamPosition,
    messages: Vec<Arc<RoomMessage>>,
    /// Entries after the requested offset had passed the history TTL (so the page may not start
    /// the gap).
    expired: bool,
    more: bool,
}

/// Parses the READ script's `{offset, epoch, entries, more, expired}`.
fn parse_read(value: Value) -> Result<(StreamPosition, Vec<LogEntry>, bool, bool), String> {
    let Value::Array(mut parts) = value else {
        return Err("READ: not an array".into());
    };
    if parts.len() != 5 {
        return Err("READ: expected 5 parts".into());
    }
    let expired: i64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))
        .map_err(|error| error.to_string())?;
    let more: i64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))
        .map_err(|error| error.to_string())?;
    let entries = parts.pop().unwrap_or(Value::Nil);
    let epoch: String = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))
        .map_err(|error| error.to_string())?;
    let offset: u64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))
        .map_err(|error| error.to_string())?;
    let entries = match entries {
        Value::Array(entries) => entries,
        // What a range with COUNT 0 answers; the script avoids it, but it means "none".
        Value::Nil => Vec::new(),
        _ => return Err("READ: entries not an array".into()),
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut entry) = entry else {
            return Err("READ: entry not an array".into());
        };
        let fields = entry.pop().unwrap_or(Value::Nil);
        let id: String = redis::from_redis_value(entry.pop().unwrap_or(Value::Nil))
            .map_err(|error| error.to_string())?;
        let offset = id
            .split_once('-')
            .and_then(|(offset, _)| offset.parse().ok())
            .ok_or("READ: bad entry id")?;
        let fields: Vec<Vec<u8>> =
            redis::from_redis_value(fields).map_err(|error| error.to_string())?;
        let payload = fields
            .chunks(2)
            .find_map(|pair| match pair {
                [name, value] if name == b"p" => Some(value.clone()),
                _ => None,
            })
            .ok_or("READ: entry without payload")?;
        parsed.push((offset, payload));
    }
    Ok((
        StreamPosition { offset, epoch },
        parsed,
        more == 1,
        expired == 1,
    ))
}

/// Keeps one shard's pub/sub connection: (re)connects with back-off, subscribes the node's inbox,
/// the broadcast channel and every room it needs, restores and replays after a loss, and hands
/// every message to the node.
async fn run_shard(weak: Weak<Inner>, index: usize, mut control: mpsc::UnboundedReceiver<Control>) {
    let mut rooms: HashMap<String, Option<StreamPosition>> = HashMap::new();
    // Rooms being replayed after a reconnect, with their live messages held until then.
    let mut replaying: HashMap<String, Vec<Arc<RoomMessage>>> = HashMap::new();
    let mut round = 0;
    let mut replay_task: Option<tokio::task::AbortHandle> = None;
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let shard = &inner.shards[index];
        let connect = async {
            let pubsub = shard.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            let mut channels = vec![keys::inbox(inner.node()), keys::BROADCAST.to_owned()];
            channels.extend(rooms.keys().map(|room| keys::room_channel(room)));
            sink.subscribe(channels).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let (mut sink, mut stream) = match tokio::time::timeout(COMMAND_TIMEOUT, connect).await {
            Ok(Ok(connection)) => connection,
            failed => {
                if let Ok(Err(error)) = failed {
                    // Once per outage at warn (e.g. a certificate that does not verify), then
                    // quieter while the back-off retries.
                    if backoff == MIN_BACKOFF {
                        tracing::warn!(shard = %shard.label, %error, "cannot connect to redis shard; retrying");
                    } else {
                        tracing::debug!(shard = %shard.label, %error, "redis pub/sub connect failed");
                    }
                }
                inner
                    .metrics
                    .errors
                    .with_label_values(&[&shard.label])
                    .inc();
                drop(inner);
                if !wait_refusing(&mut control, &mut rooms, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if connected_before {
            inner
                .metrics
                .reconnects
                .with_label_values(&[&shard.label])
                .inc();
            let info = inner.liveness.lock().clone();
            if let Err(error) = inner.restore(index, info).await {
                tracing::warn!(shard = %shard.label, %error, "cannot restore this node's entries");
            }
            round += 1;
            replaying = rooms
                .keys()
                .map(|room| (room.clone(), Vec::new()))
                .collect();
            let replay = tokio::spawn(replay(
                weak.clone(),
                index,
                round,
                rooms
                    .iter()
                    .map(|(room, position)| (room.clone(), position.clone()))
                    .collect(),
            ));
            replay_task = Some(replay.abort_handle());
            tracing::info!(shard = %shard.label, rooms = rooms.len(), "redis shard reconnected");
        }
        connected_before = true;
        backoff = MIN_BACKOFF;
        shard.up.store(true, Ordering::SeqCst);
        inner.metrics.up.with_label_values(&[&shard.label]).set(1);
        let mut ping = tokio::time::interval(inner.config.node_ttl / 3);
        ping.tick().await;
        let stop = loop {
            tokio::select! {
                biased;
                command = control.recv() => match command {
                    None | Some(Control::Stop) => break true,
                    Some(Control::Subscribe { room, done }) => {
                        if done.is_closed() {
                            continue; // the caller gave up waiting
                        }
                        let subscribed = tokio::time::timeout(
                            COMMAND_TIMEOUT,
                            sink.subscribe(keys::room_channel(&room)),
                        )
                        .await;
                        if matches!(subscribed, Ok(Ok(()))) {
                            let new = !rooms.contains_key(&room);
                            rooms.entry(room.clone()).or_insert(None);
                            if done.send(Ok(())).is_err() && new {
                                // The caller gave up meanwhile and counts the room as not
                                // subscribed: leave no SUBSCRIBE behind that nothing would remove.
                                rooms.remove(&room);
                                let unsubscribed = tokio::time::timeout(
                                    COMMAND_TIMEOUT,
                                    sink.unsubscribe(keys::room_channel(&room)),
                                )
                                .await;
                                if !matches!(unsubscribed, Ok(Ok(()))) {
                                    break false;
                                }
                            }
                        } else {
                            let _ = done.send(Err(BrokerError::Unavailable(
                                "redis shard connection lost".into(),
                            )));
                            break false;
                        }
                    }
                    Some(Control::Unsubscribe { room }) => {
                        rooms.remove(&room);
                        replaying.remove(&room);
                        let unsubscribed = tokio::time::timeout(
                            COMMAND_TIMEOUT,
                            sink.unsubscribe(keys::room_channel(&room)),
                        )
                        .await;
                        if !matches!(unsubscribed, Ok(Ok(()))) {
                            break false;
                        }
                    }
                    Some(Control::Replayed { round: of, room, messages, done }) => {
                        if of != round || !replaying.contains_key(&room) {
                            continue; // from an earlier connection, or unsubscribed since
                        }
                        for message in messages {
                            inner.deliver(&mut rooms, message);
                        }
                        if done {
                            for message in replaying.remove(&room).unwrap_or_default() {
                                inner.deliver(&mut rooms, message);
                            }
                        }
                    }
                },
                message = stream.next() => {
                    let Some(message) = message else { break false };
                    inner.metrics.messages.with_label_values(&[&shard.label]).inc();
                    if let Err(error) =
                        inner.dispatch(&mut rooms, &mut replaying, message.get_channel_name(), message.get_payload_bytes())
                    {
                        tracing::warn!(shard = %shard.label, %error, "undecodable pub/sub message");
                    }
                }
                _ = ping.tick() => {
                    // On a subscribed RESP2 connection the answer is `["pong", ""]`, not `PONG`:
                    // any answer will do.
                    let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break false;
                    }
                }
            }
        };
        shard.up.store(false, Ordering::SeqCst);
        inner.metrics.up.with_label_values(&[&shard.label]).set(0);
        if let Some(task) = replay_task.take() {
            task.abort();
        }
        // Live messages held for an unfinished replay are dropped, not delivered ahead of what
        // came before them: the room's position was not moved, so the next replay reads them.
        replaying.clear();
        if stop {
            return;
        }
        inner
            .metrics
            .errors
            .with_label_values(&[&shard.label])
            .inc();
        tracing::warn!(shard = %shard.label, "redis pub/sub connection lost; reconnecting");
    }
}

/// Waits out a back-off while the shard is down, answering subscribes with `Unavailable`.
/// Returns false when the broker is stopping.
async fn wait_refusing(
    control: &mut mpsc::UnboundedReceiver<Control>,
    rooms: &mut HashMap<String, Option<StreamPosition>>,
    backoff: Duration,
) -> bool {
    let deadline = tokio::time::sleep(backoff);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return true,
            command = control.recv() => match command {
                None | Some(Control::Stop) => return false,
                Some(Control::Subscribe { done, .. }) => {
                    let _ = done.send(Err(BrokerError::Unavailable("redis shard is down".into())));
                }
                Some(Control::Unsubscribe { room }) => {
                    rooms.remove(&room);
                }
                Some(Control::Replayed { .. }) => {} // of an aborted replay
            },
        }
    }
}

/// Removes the sessions and presence of nodes whose liveness key expired, on every shard.
async fn reap_dead_nodes(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let period = inner.config.node_ttl;
        for shard in &inner.shards {
            if !shard.up.load(Ordering::SeqCst) {
                continue;
            }
            let nodes: BrokerResult<Vec<String>> = inner
                .call(shard, "reap", async |connection| {
                    redis::cmd("SMEMBERS")
                        .arg(keys::NODES)
                        .query_async(connection)
                        .await
                })
                .await;
            for node in nodes.unwrap_or_default() {
                if node == inner.node() {
                    // Alive by definition; if its key expired, its next heartbeat fixes that.
                    continue;
                }
                let alive: BrokerResult<bool> = inner
                    .call(shard, "reap", async |connection| {
                        redis::cmd("EXISTS")
                            .arg(keys::node_alive(&node))
                            .query_async(connection)
                            .await
                    })
                    .await;
                if matches!(alive, Ok(false)) {
                    tracing::info!(shard = %shard.label, %node, "reaping a dead node's sessions and presence");
                    let _ = inner.reap(shard, &node, Reap::Dead).await;
                }
            }
        }
        drop(inner);
        tokio::time::sleep(period).await;
    }
}

/// Reaps, on every shard, the earlier incarnations of this node's id: a process restarted under
/// the same id (a container restart keeps the pod name) removes its predecessor's sessions and
/// presence at once rather than after the node TTL. Retried until every shard has answered.
async fn reap_predecessors(weak: Weak<Inner>) {
    let mut done = HashSet::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        for (index, shard) in inner.shards.iter().enumerate() {
            if done.contains(&index) {
                continue;
            }
            let nodes: BrokerResult<Vec<String>> = inner
                .call(shard, "reap", async |connection| {
                    redis::cmd("SMEMBERS")
                        .arg(keys::NODES)
                        .query_async(connection)
                        .await
                })
                .await;
            let Ok(nodes) = nodes else { continue };
            let mut reaped = true;
            for node in nodes {
                if node != inner.node() && keys::is_incarnation_of(&node, &inner.config.node_id) {
                    tracing::info!(shard = %shard.label, %node, "reaping an earlier incarnation of this node");
                    reaped &= inner.reap(shard, &node, Reap::Replaced).await.is_ok();
                }
            }
            if reaped {
                done.insert(index);
            }
        }
        if done.len() == inner.shards.len() {
            return;
        }
        drop(inner);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why a node is reaped: the REAP script's modes.
#[derive(Clone, Copy)]
enum Reap {
    /// This node, leaving on purpose.
    Forced,
    /// A node whose liveness key expired (left alone if it heartbeated since).
    Dead,
    /// An earlier incarnation of this node's id.
    Replaced,
}

impl Inner {
    /// Removes `node`'s entries on `shard`, one bounded REAP call after another until they are
    /// gone (or, for a dead node, until it turns out to be alive).
    async fn reap(&self, shard: &Shard, node: &str, why: Reap) -> BrokerResult<()> {
        let mode = match why {
            Reap::Forced => "forced",
            Reap::Dead => "dead",
            Reap::Replaced => "replaced",
        };
        loop {
            let done: i64 = self
                .call(shard, "reap", async |connection| {
                    scripts::REAP
                        .arg(keys::PREFIX)
                        .arg(node)
                        .arg(mode)
                        .arg(keys::REAPED_MARK_TTL_MS)
                        .arg(scripts::REAP_BATCH)
                        .arg(scripts::REAP_LEGACY_BATCH)
                        .invoke_async(connection)
                        .await
                })
                .await?;
            if done != 0 {
                return Ok(());
            }
        }
    }

    fn up_shard(&self) -> BrokerResult<&Shard> {
        self.shards
            .iter()
            .find(|shard| shard.up.load(Ordering::SeqCst))
            .ok_or_else(|| BrokerError::Unavailable("no Redis shard is up".into()))
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
        tokio::spawn(reap_predecessors(Arc::downgrade(inner)));
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
        let payload = envelope::pack(&stored).map_err(BrokerError::Internal)?;
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
        let shard = self.inner.shard(room);
        let (done, answer) = oneshot::channel();
        shard
            .control
            .send(Control::Subscribe {
                room: room.to_owned(),
                done,
            })
            .map_err(|_| BrokerError::Unavailable("broker stopped".into()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, answer).await {
            Ok(Ok(result)) => result,
            _ => Err(BrokerError::Unavailable("redis subscribe timed out".into())),
        }
    }

    async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.inner
            .shard(room)
            .control
            .send(Control::Unsubscribe {
                room: room.to_owned(),
            })
            .map_err(|_| BrokerError::Unavailable("broker stopped".into()))
    }

    async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        let count = query.limit.map_or(-1, |limit| limit as i64);
        match &query.since {
            None => {
                let count = query.limit.unwrap_or(self.inner.config.history_size) as i64;
                let page = self.inner.read(room, None, count, query.max_bytes).await?;
                Ok(History {
                    messages: page.messages,
                    position: page.position,
                    recovered: false,
                    more: page.more,
                })
            }
            Some(since) => {
                let page = self
                    .inner
                    .read(room, Some(since.offset), count, query.max_bytes)
                    .await?;
                let position = page.position;
                // Offset 0 is "nothing seen yet": any epoch of the shard's generation recovers from
                // the room's first message.
                if !switchboard_broker::resumable(since, &position) {
                    return Ok(History {
                        messages: Vec::new(),
                        position,
                        recovered: false,
                        more: false,
                    });
                }
                // An expired entry skipped on the way may have been the next one.
                let next_held = if page.expired {
                    None
                } else {
                    page.messages.first().map(|message| message.offset)
                };
                let recovered = switchboard_broker::recovered(since, &position, next_held);
                Ok(History {
                    messages: page.messages,
                    position,
                    recovered,
                    more: page.more,
                })
            }
        }
    }

    async fn position(&self, room: &str) -> BrokerResult<StreamPosition> {
        Ok(self.inner.read(room, None, 0, None).await?.position)
    }

    async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        let envelope = envelope::direct(&envelope::Direct {
            user: message.user.clone(),
            data: message.data,
            from: message.from,
        })
        .map_err(BrokerError::Internal)?;
        self.inner
            .send_to_user(&message.user, envelope, "send")
            .await
    }

    async fn broadcast(&self, data: Json) -> BrokerResult<u64> {
        let payload = envelope::broadcast(&data).map_err(BrokerError::Internal)?;
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
        })
        .map_err(BrokerError::Internal)?;
        self.inner.send_to_user(user, envelope, "disconnect").await
    }

    async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        let inner = &self.inner;
        inner
            .sessions
            .lock()
            .insert(record.session.clone(), record.clone());
        // Awaited: the session's welcome, and so any send to it, comes after its entry.
        let result = inner
            .write(
                inner.shard_index(&record.user),
                Write::Register {
                    user: record.user.clone(),
                    session: record.session.clone(),
                },
            )
            .await;
        if result.is_err() {
            inner.sessions.lock().remove(&record.session);
        }
        result
    }

    async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        let inner = &self.inner;
        inner.sessions.lock().remove(&record.session);
        let result = inner.unregister(record).await;
        if result.is_err() {
            inner
                .pending
                .lock()
                .sessions
                .insert(record.session.clone(), record.clone());
        }
        result
    }

    async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let inner = &self.inner;
        let key = (room.to_owned(), member.session.clone());
        inner.members.lock().insert(key.clone(), member.clone());
        inner.pending.lock().leaves.remove(&key);
        let result = inner.join(room, member).await;
        if result.is_err() {
            inner.pending.lock().joins.insert(key);
        }
        result
    }

    async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let inner = &self.inner;
        let key = (room.to_owned(), member.session.clone());
        inner.members.lock().remove(&key);
        inner.pending.lock().joins.remove(&key);
        let result = inner.leave(room, member).await;
        if result.is_err() {
            inner.pending.lock().leaves.insert(key, member.clone());
        }
        result
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
        let inner = &self.inner;
        *inner.liveness.lock() = Some(node.clone());
        let packed = envelope::pack(node).map_err(BrokerError::Internal)?;
        let mut result = Ok(());
        for (index, shard) in inner.shards.iter().enumerate() {
            let written = inner
                .call(shard, "heartbeat", async |connection| {
                    redis::pipe()
                        .cmd("SET")
                        .arg(keys::node_alive(inner.node()))
                        .arg(&packed)
                        .arg("PX")
                        .arg(millis(inner.config.node_ttl))
                        .arg("GET")
                        .cmd("SADD")
                        .arg(keys::NODES)
                        .arg(inner.node())
                        .ignore()
                        .query_async::<(Option<Vec<u8>>,)>(connection)
                        .await
                })
                .await;
            match written {
                // The key had expired: this node was silent past its TTL (paused, starved, cut
                // off) and the others may have reaped its sessions and presence, which nothing
                // else would ever write back. (After a lost connection, the pub/sub task
                // restores instead, once it is back.)
                Ok((None,))
                    if inner.heartbeated.load(Ordering::SeqCst)
                        && shard.up.load(Ordering::SeqCst) =>
                {
                    tracing::warn!(shard = %shard.label, "this node's liveness had expired; writing its entries back");
                    if let Err(error) = inner.restore(index, Some(node.clone())).await {
                        result = Err(error);
                    }
                }
                Ok(_) => {}
                Err(error) => result = Err(error),
            }
        }
        inner.heartbeated.store(true, Ordering::SeqCst);
        inner.retry_pending().await;
        result
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
        let inner = &self.inner;
        // This node is known to Redis by its incarnation.
        let node = if node == inner.config.node_id {
            inner.node()
        } else {
            node
        };
        let mut result = Ok(());
        for shard in &inner.shards {
            if let Err(error) = inner.reap(shard, node, Reap::Forced).await {
                result = Err(error);
            }
            let _ = shard.control.send(Control::Stop);
        }
        result
    }

    fn is_healthy(&self) -> bool {
        self.inner
            .shards
            .iter()
            .all(|shard| shard.up.load(Ordering::SeqCst))
    }
}

impl Inner {
    async fn unregister(&self, record: &SessionRecord) -> BrokerResult<()> {
        let write = Write::Unregister {
            user: record.user.clone(),
            session: record.session.clone(),
        };
        self.write(self.shard_index(&record.user), write).await
    }

    async fn join(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let write = Write::Join {
            room: room.to_owned(),
            session: member.session.clone(),
            value: self.presence_value(member)?,
            event: envelope::presence_event(true, &member.session, &member.user),
        };
        self.write(self.shard_index(room), write).await
    }

    async fn leave(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let write = Write::Leave {
            room: room.to_owned(),
            session: member.session.clone(),
            event: envelope::presence_event(false, &member.session, &member.user),
        };
        self.write(self.shard_index(room), write).await
    }

    /// Retries the registry and presence writes that failed (Redis unreachable or too slow):
    /// without this, a session that closed during an outage would stay listed in the registry
    /// and presence for as long as this node lives, if Redis kept its data. All are queued at
    /// once, so they go in as few batches as the writers make, and nothing is tried on a shard
    /// that is down.
    async fn retry_pending(&self) {
        let Pending {
            sessions,
            joins,
            leaves,
        } = std::mem::take(&mut *self.pending.lock());
        let up = |key: &str| self.shard(key).up.load(Ordering::SeqCst);
        let mut retry = Pending::default();
        let mut removals = Vec::new();
        for (id, record) in sessions {
            if up(&record.user) {
                removals.push(async move {
                    let result = self.unregister(&record).await;
                    (id, record, result)
                });
            } else {
                retry.sessions.insert(id, record);
            }
        }
        let mut departures = Vec::new();
        for (key, member) in leaves {
            if self.members.lock().contains_key(&key) {
                continue; // joined the room again since
            }
            if up(&key.0) {
                departures.push(async move {
                    let result = self.leave(&key.0, &member).await;
                    (key, member, result)
                });
            } else {
                retry.leaves.insert(key, member);
            }
        }
        let mut arrivals = Vec::new();
        for key in joins {
            let Some(member) = self.members.lock().get(&key).cloned() else {
                continue; // left the room since
            };
            if up(&key.0) {
                arrivals.push(async move {
                    let result = self.join(&key.0, &member).await;
                    (key, result)
                });
            } else {
                retry.joins.insert(key);
            }
        }
        let (removals, departures, arrivals) = futures_util::future::join3(
            futures_util::future::join_all(removals),
            futures_util::future::join_all(departures),
            futures_util::future::join_all(arrivals),
        )
        .await;
        for (id, record, result) in removals {
            if result.is_err() {
                retry.sessions.insert(id, record);
            }
        }
        for (key, member, result) in departures {
            if result.is_err() {
                retry.leaves.insert(key, member);
            }
        }
        for (key, result) in arrivals {
            if result.is_err() {
                retry.joins.insert(key);
            }
        }
        // Merge back, keeping what was recorded meanwhile.
        let mut pending = self.pending.lock();
        pending.sessions.extend(retry.sessions);
        for (key, member) in retry.leaves {
            if !pending.joins.contains(&key) && !self.members.lock().contains_key(&key) {
                pending.leaves.entry(key).or_insert(member);
            }
        }
        for key in retry.joins {
            if !pending.leaves.contains_key(&key) && self.members.lock().contains_key(&key) {
                pending.joins.insert(key);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_shard_urls() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redacted("rediss://user:s3cret@cache.example.com:6380"),
            "rediss://user:***@cache.example.com:6380"
        );
        assert_eq!(redacted("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert!(!redacted("redis://:s3cret@[bad").contains("s3cret"));
    }

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
        };
        assert!(RedisBroker::new(config, &Registry::new()).is_err());
    }
}
