//! The Node wires the Hub (local sessions) to the Broker (everything across nodes), and is the
//! only way sessions and the server API reach either. It receives a room from the broker only
//! while a local session is subscribed to it, plus a short linger.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use serde_json::Value;
use switchboard_broker::{
    Acked, Broker, BrokerResult, DirectMessage, Forwarded, HistoryQuery, Inbox, InboxEntry,
    LinkRecord, Published, Sent, SessionRecord,
};
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{
    Codec, EncodeError, Member, RoomMessage, Sender, ServerFrame, StreamPosition,
};

use crate::auth::{Authenticator, unix_now_millis};
use crate::config::Config;
use crate::feed::FeedReader;
use crate::hub::{Hub, SessionHandle, encode_counted};
use crate::metered::MeteredBroker;
use crate::metrics::Metrics;
use crate::queue::Outbound;

/// Most messages one page of `since` recovery reads, so the frames' own fields (room, offset,
/// epoch, sender) add a bounded amount to the page's byte budget.
const RECOVERY_PAGE_MESSAGES: usize = 256;

pub struct Node {
    config: Config,
    hub: Arc<Hub>,
    broker: MeteredBroker,
    metrics: Arc<Metrics>,
    auth: Authenticator,
    /// Rooms this node receives from the broker, with how many local subscriptions hold each.
    upstream: DashMap<Arc<str>, Arc<Upstream>>,
    /// Set on SIGTERM: `/readyz` fails (before the drain when there is a drain delay).
    leaving: AtomicBool,
    /// Set when the drain starts: new handshakes are refused.
    draining: AtomicBool,
    /// The public address clients reach this node at, as `GET /api/nodes` reports it.
    public_addr: SocketAddr,
    started_at: u64,
}

struct Upstream {
    /// Async so that concurrent first joins wait for the one broker subscription.
    state: tokio::sync::Mutex<UpstreamState>,
}

#[derive(Default)]
struct UpstreamState {
    local: usize,
    subscribed: bool,
    /// Taken out of the map: a joiner holding a stale `Arc` must look again.
    removed: bool,
}

/// What joining a room read from the broker for the subscribe reply.
pub struct Joined {
    /// The room's position: after the recovered messages with `since`, else its newest message.
    pub position: StreamPosition,
    /// With `since`: whether the messages after it could all be recovered.
    pub recovered: Option<bool>,
    /// The first page of messages after `since`, when recovered.
    pub missed: Vec<Arc<RoomMessage>>,
    /// More recovered messages follow `missed`.
    pub more: bool,
}

impl Node {
    pub fn new(
        config: Config,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        auth: Authenticator,
        public_addr: SocketAddr,
    ) -> Self {
        Node {
            hub: Arc::new(Hub::new(metrics.clone(), config.max_queue_bytes)),
            broker: MeteredBroker::new(broker, metrics.clone()),
            config,
            metrics,
            auth,
            upstream: DashMap::new(),
            leaving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            public_addr,
            started_at: unix_now_millis(),
        }
    }

    /// Starts the broker, which delivers to this node's hub from now on.
    pub async fn start(&self) -> BrokerResult<()> {
        self.broker.start(self.hub.clone()).await
    }

    pub fn id(&self) -> &str {
        &self.config.node_id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// When the node started, in milliseconds since the Unix epoch.
    pub fn started_at(&self) -> u64 {
        self.started_at
    }

    pub fn session_count(&self) -> usize {
        self.hub.session_count()
    }

    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.hub.sessions()
    }

    /// A session of this node, by id.
    pub fn session(&self, id: &str) -> Option<Arc<SessionHandle>> {
        self.hub.session(id)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether the node is shutting down, draining or about to: `/readyz` fails.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// `/readyz` fails from now on; the node still accepts and serves until `start_draining`.
    pub fn start_leaving(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    pub fn start_draining(&self) {
        self.start_leaving();
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        let ready = !self.is_leaving() && self.broker.is_healthy();
        self.metrics.ready.set(i64::from(ready));
        ready
    }

    pub fn broker_healthy(&self) -> bool {
        self.broker.is_healthy()
    }

    /// Reports this node's liveness and figures to the cluster.
    pub async fn heartbeat(&self) -> BrokerResult<()> {
        self.broker.heartbeat(&self.info()).await
    }

    /// Takes this node out of the cluster's node list, at the end of a drain.
    pub async fn leave_cluster(&self) -> BrokerResult<()> {
        self.broker.deregister_node(self.id()).await
    }

    /// Makes a new session reachable: in the hub, then in the cluster's registry. On an error
    /// the session is still in the hub; [`Node::unregister_session`] removes it.
    pub async fn register_session(
        &self,
        session: &Arc<SessionHandle>,
        record: &SessionRecord,
    ) -> BrokerResult<()> {
        self.hub.add_session(session.clone());
        self.broker.register_session(record).await
    }

    /// Makes a fallback session findable from the other nodes, for POSTs they receive.
    pub async fn register_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.broker.register_link(link).await
    }

    pub async fn unregister_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.broker.unregister_link(link).await
    }

    /// Hands client frames POSTed here to the node holding the fallback session `session` (with
    /// none: only finds whether it is there and the key right). Counted as sent when delivered.
    pub async fn forward(
        &self,
        session: &str,
        key_hash: &str,
        frames: Vec<String>,
    ) -> BrokerResult<Forwarded> {
        let count = frames.len() as u64;
        let forwarded = self.broker.forward(session, key_hash, frames).await?;
        if forwarded == Forwarded::Delivered {
            self.metrics
                .forwarded_frames
                .with_label_values(&["sent"])
                .inc_by(count);
        }
        Ok(forwarded)
    }

    /// Removes an ended session from the hub and the cluster's registry.
    pub async fn unregister_session(&self, session: &SessionHandle, record: &SessionRecord) {
        self.hub.remove_session(session);
        // A failure is counted and warned about by the metered broker; the registry's entry
        // expires with this node's liveness.
        let _ = self.broker.unregister_session(record).await;
    }

    /// Joins `session` to `room`: the broker delivers the room to this node, the hub to the
    /// session, and the room's position (with `since`, the messages after it) is read for the
    /// reply. `joined` runs once the read succeeded, before the presence join, with the reader of
    /// the room's feed, so the session records the room before anything else can fail. On an
    /// error, nothing is left joined.
    pub async fn join_room(
        self: &Arc<Self>,
        room: &str,
        session: &Arc<SessionHandle>,
        member: &Member,
        presence_events: bool,
        since: Option<&StreamPosition>,
        joined: impl FnOnce(&Joined, FeedReader),
    ) -> BrokerResult<Joined> {
        self.acquire_room(room).await?;
        // Live messages wait in the feed from here on; the history read below covers everything
        // before.
        let reader = self.hub.join(room, session, presence_events);
        let read = match since {
            Some(since) => self
                .recovery_history(room, since.clone())
                .await
                .map(|history| {
                    let (messages, more) = if history.recovered {
                        (history.messages, history.more)
                    } else {
                        (Vec::new(), false)
                    };
                    Joined {
                        position: history.position,
                        recovered: Some(history.recovered),
                        missed: messages,
                        more,
                    }
                }),
            None => self.broker.position(room).await.map(|position| Joined {
                position,
                recovered: None,
                missed: Vec::new(),
                more: false,
            }),
        };
        let read = match read {
            Ok(read) => read,
            Err(error) => {
                self.hub.leave(room, session);
                self.release_room(room).await;
                return Err(error);
            }
        };
        joined(&read, reader);
        // A failure is counted and warned about; the session stays subscribed without presence.
        let _ = self.broker.join_presence(room, member).await;
        Ok(read)
    }

    /// Takes `session` out of `room` everywhere.
    pub async fn leave_room(
        self: &Arc<Self>,
        room: &str,
        session: &SessionHandle,
        member: &Member,
    ) {
        self.hub.leave(room, session);
        self.release_room(room).await;
        let _ = self.broker.leave_presence(room, member).await;
    }

    /// After a session's clean-up panicked: repeats what is safe to repeat (the hub, presence in
    /// `rooms`, the registry). Upstream room subscriptions are not released again: releasing one
    /// twice would take it from another session; at worst the node keeps receiving a room nobody
    /// reads here.
    pub async fn forget_session(
        &self,
        session: &SessionHandle,
        rooms: &[String],
        member: &Member,
        record: &SessionRecord,
    ) {
        for room in rooms {
            self.hub.leave(room, session);
        }
        self.hub.remove_session(session);
        for room in rooms {
            let _ = self.broker.leave_presence(room, member).await;
        }
        let _ = self.broker.unregister_session(record).await;
    }

    /// The stamp the hub gives next: everything stamped below it is in its queue or feed.
    pub(crate) fn next_stamp(&self) -> u64 {
        self.hub.next_stamp()
    }

    /// Closes `session` with 1013 for falling more than its queue's bound behind.
    pub(crate) fn too_slow(&self, session: &SessionHandle) {
        self.hub.too_slow(session);
    }

    /// Queues a recovered room message for `session`, encoded for its codec, as the hub queues
    /// live ones: whether it was queued, or why it cannot be encoded.
    pub fn push_message(
        &self,
        session: &SessionHandle,
        message: Arc<RoomMessage>,
        queued_at: Instant,
    ) -> Result<bool, EncodeError> {
        let frame = encode_counted(
            session.codec,
            &ServerFrame::Message(message.clone()),
            &self.metrics,
        )?;
        Ok(self
            .hub
            .push(session, Outbound::Room { message, frame }, queued_at))
    }

    /// One page of `since` recovery: a quarter of the outbound queue's bound at most, so a page
    /// always fits beside what is queued.
    pub async fn recovery_history(
        &self,
        room: &str,
        since: StreamPosition,
    ) -> BrokerResult<switchboard_broker::History> {
        let query = HistoryQuery {
            since: Some(since),
            limit: Some(RECOVERY_PAGE_MESSAGES),
            max_bytes: Some(
                self.config
                    .max_message_size
                    .min(self.config.max_queue_bytes / 4),
            ),
        };
        self.broker.history(room, query).await
    }

    pub async fn history(
        &self,
        room: &str,
        query: HistoryQuery,
    ) -> BrokerResult<switchboard_broker::History> {
        self.broker.history(room, query).await
    }

    pub async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        self.broker.send(message).await
    }

    /// Appends to the recipient's inbox and delivers; counts what the append dropped to keep
    /// the inbox size.
    pub async fn send_persisted(
        &self,
        message: DirectMessage,
        key: Option<&str>,
    ) -> BrokerResult<Sent> {
        let sent = self.broker.send_persisted(message, key).await?;
        self.metrics.inbox_dropped.inc_by(sent.dropped);
        Ok(sent)
    }

    pub async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked> {
        self.broker.ack(user, seq).await
    }

    pub async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox> {
        self.broker.inbox(user, after, limit, max_bytes).await
    }

    /// One page of the inbox delivery after `welcome`, bounded as a page of `since` recovery.
    pub async fn inbox_page(&self, user: &str, after: u64) -> BrokerResult<Inbox> {
        let max_bytes = self
            .config
            .max_message_size
            .min(self.config.max_queue_bytes / 4);
        self.broker
            .inbox(user, after, RECOVERY_PAGE_MESSAGES, max_bytes)
            .await
    }

    /// Queues a stored inbox message for `session`, as the hub queues live persisted ones.
    pub fn push_direct(
        &self,
        session: &SessionHandle,
        entry: InboxEntry,
        queued_at: Instant,
    ) -> Result<bool, EncodeError> {
        let seq = entry.seq;
        let frame = ServerFrame::Direct {
            data: entry.data,
            from: entry.from,
            seq: Some(seq),
        };
        let frame = encode_counted(session.codec, &frame, &self.metrics)?;
        let item = Outbound::Direct {
            seq,
            stored: true,
            frame,
        };
        Ok(self.hub.push(session, item, queued_at))
    }

    pub async fn broadcast(&self, data: Value) -> BrokerResult<u64> {
        self.broker.broadcast(data).await
    }

    pub async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64> {
        self.broker.disconnect(user, code, reason).await
    }

    pub async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>> {
        self.broker.presence(room).await
    }

    pub async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
        self.broker.nodes().await
    }

    /// Makes sure the broker delivers `room` to this node, for one more local subscription.
    async fn acquire_room(&self, room: &str) -> BrokerResult<()> {
        loop {
            let upstream = self
                .upstream
                .entry(Arc::from(room))
                .or_insert_with(|| {
                    Arc::new(Upstream {
                        state: tokio::sync::Mutex::new(UpstreamState::default()),
                    })
                })
                .clone();
            let mut state = upstream.state.lock().await;
            if state.removed {
                continue;
            }
            if !state.subscribed {
                if let Err(error) = self.broker.subscribe_room(room).await {
                    if state.local == 0 {
                        state.removed = true;
                        self.upstream
                            .remove_if(room, |_, entry| Arc::ptr_eq(entry, &upstream));
                    }
                    return Err(error);
                }
                state.subscribed = true;
            }
            state.local += 1;
            return Ok(());
        }
    }

    /// One local subscription of `room` ended; after the linger, stop receiving it if none is left.
    async fn release_room(self: &Arc<Self>, room: &str) {
        let Some(upstream) = self.upstream.get(room).map(|entry| entry.clone()) else {
            return;
        };
        let mut state = upstream.state.lock().await;
        state.local = state.local.saturating_sub(1);
        if state.local > 0 {
            return;
        }
        drop(state);
        let node = self.clone();
        let room: Arc<str> = Arc::from(room);
        tokio::spawn(async move {
            tokio::time::sleep(node.config.room_linger).await;
            let mut state = upstream.state.lock().await;
            if state.local > 0 || state.removed {
                return;
            }
            // Unsubscribe before leaving the map: a joiner still finds this entry, waits for the
            // lock, sees `removed` and subscribes anew after this unsubscribe.
            if state.subscribed {
                let _ = node.broker.unsubscribe_room(&room).await;
            }
            state.removed = true;
            node.upstream
                .remove_if(&room, |_, entry| Arc::ptr_eq(entry, &upstream));
        });
    }

    /// Rooms this node currently receives from the broker.
    pub fn upstream_rooms(&self) -> usize {
        self.upstream.len()
    }

    /// Publishes through the broker, once per `key` within the idempotency window.
    pub async fn publish_keyed(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published> {
        self.broker.publish_keyed(room, data, from, key).await
    }

    /// Publishes through the broker.
    pub async fn publish(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>> {
        self.broker.publish(room, data, from).await
    }

    /// This node's figures, for the broker's node list.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.config.node_id.clone(),
            instance: self.config.instance.clone(),
            address: self.public_addr.to_string(),
            connections: self.hub.session_count() as u64,
            started_at: self.started_at,
            last_seen: unix_now_millis(),
        }
    }
}

/// What a frame carrying `data` would take, at most, over either codec: the frame measured with
/// `data` null, less the null, plus `data` itself.
fn frame_len_with(skeleton: &ServerFrame, data: &Value) -> usize {
    Codec::ALL
        .iter()
        .map(|codec| {
            let null = codec.encoded_len(&Value::Null);
            codec.encoded_len(skeleton) - null + codec.encoded_len(data)
        })
        .max()
        .unwrap_or(0)
}

/// An epoch as long as any a broker makes (16 hex digits), for measuring frames before publishing.
const EPOCH_BOUND: &str = "0000000000000000";

/// Why a frame would pass the message size limit (`error too_large`, API 413).
#[derive(Debug, thiserror::Error)]
pub enum TooLarge {
    /// A publish, send or broadcast whose frame recipients would receive is too large.
    #[error(
        "the frame recipients would receive is {bytes} bytes, over the {limit}-byte message size limit"
    )]
    Frame { bytes: usize, limit: usize },
    /// A stored message that does not fit a `history` reply of its own.
    #[error(
        "the message at offset {offset} does not fit in a frame of the {limit}-byte message size limit"
    )]
    Stored { offset: u64, limit: usize },
}

impl Node {
    /// Checks that the `message` frame subscribers of `room` would get for `data` fits the
    /// message size limit, whatever their codec, with the largest offset and epoch. Room
    /// messages also travel inside `history` replies, which add a little more: see
    /// [`HISTORY_REPLY_HEADROOM`].
    pub fn check_room_frame(
        &self,
        room: &str,
        data: &Value,
        from: Option<&Sender>,
    ) -> Result<(), TooLarge> {
        let skeleton = ServerFrame::Message(Arc::new(RoomMessage {
            room: room.to_owned(),
            data: Value::Null,
            offset: u64::MAX,
            epoch: EPOCH_BOUND.to_owned(),
            from: from.cloned(),
        }));
        self.check_frame(&skeleton, data, HISTORY_REPLY_HEADROOM)
    }

    /// Checks that the `direct` frame for `data` fits the message size limit (with the largest
    /// seq when it is persisted).
    pub fn check_direct_frame(
        &self,
        data: &Value,
        from: Option<&Sender>,
        persisted: bool,
    ) -> Result<(), TooLarge> {
        let skeleton = ServerFrame::Direct {
            data: Value::Null,
            from: from.cloned(),
            seq: persisted.then_some(u64::MAX),
        };
        self.check_frame(&skeleton, data, 0)
    }

    /// Checks that the `broadcast` frame for `data` fits the message size limit.
    pub fn check_broadcast_frame(&self, data: &Value) -> Result<(), TooLarge> {
        let skeleton = ServerFrame::Broadcast { data: Value::Null };
        self.check_frame(&skeleton, data, 0)
    }

    fn check_frame(
        &self,
        skeleton: &ServerFrame,
        data: &Value,
        headroom: usize,
    ) -> Result<(), TooLarge> {
        let limit = self.config.max_message_size;
        let bytes = frame_len_with(skeleton, data) + headroom;
        if bytes <= limit {
            Ok(())
        } else {
            self.metrics
                .limit_refusals
                .with_label_values(&["message_size"])
                .inc();
            Err(TooLarge::Frame { bytes, limit })
        }
    }
}

/// Bytes a `history` reply adds around one room message (its type, id, position and `more`),
/// reserved when a message is published so that any message fits a reply of its own.
pub const HISTORY_REPLY_HEADROOM: usize = 128;

/// Longest idempotency key accepted, so remembering keys costs a bounded amount per request.
pub const MAX_KEY_LEN: usize = 64;

/// Why an idempotency key is refused, in a session's `error` frame and the server API's 400 alike.
pub const INVALID_KEY: &str = "keys are 1 to 64 bytes";

/// Idempotency keys are 1 to 64 bytes.
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len())
}

/// Longest room name accepted, to keep keys and frames bounded.
pub const MAX_ROOM_LEN: usize = 256;

/// Rooms whose names start with this are the nodes' own: clients may subscribe to them (as their
/// token allows) but never publish to them.
pub const SYSTEM_ROOM_PREFIX: &str = "$sys.";

/// Whether clients are refused publishing to `room`.
pub fn is_system_room(room: &str) -> bool {
    room.starts_with(SYSTEM_ROOM_PREFIX)
}

/// Why a room name is refused, in a session's `error` frame and the server API's 400 alike.
pub const INVALID_ROOM: &str = "room names are 1 to 256 bytes without control characters";

/// Room names are 1 to 256 bytes without control characters.
pub fn valid_room(room: &str) -> bool {
    !room.is_empty() && room.len() <= MAX_ROOM_LEN && !room.chars().any(char::is_control)
}

/// For the node's unit tests: a node (not started) with `options` on loopback ports, its broker the
/// embedded one (node id "n") behind a [`FaultyBroker`](switchboard_broker::FaultyBroker), and
/// authentication off.
#[cfg(test)]
pub(crate) fn test_node(
    options: crate::config::Options,
) -> (Arc<Node>, Arc<switchboard_broker::FaultyBroker>) {
    use switchboard_broker::{FaultyBroker, MemoryBroker, MemoryConfig};
    let config = crate::config::Options {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..options
    }
    .resolve()
    .unwrap();
    let broker = Arc::new(FaultyBroker::new(Arc::new(MemoryBroker::new(
        "n",
        MemoryConfig::default(),
    ))));
    let metrics = Arc::new(Metrics::new().unwrap());
    let auth = Authenticator::new(None).unwrap();
    let addr = "127.0.0.1:1".parse().unwrap();
    let node = Arc::new(Node::new(config, broker.clone(), metrics, auth, addr));
    (node, broker)
}
