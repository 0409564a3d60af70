use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Codec, Member, PresenceNotice, RoomMessage, Sender, StreamPosition};
use tokio::time::Instant;

use crate::{
    Acked, Broker, BrokerHandler, BrokerResult, DirectMessage, Forwarded, History, HistoryQuery,
    Inbox, InboxEntry, InboxPosition, LinkRecord, PresenceChange, PresenceEvent, Published, Sent,
    SessionRecord, recovered, resumable,
};

/// Limits of the embedded broker's room history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Messages kept per room for `history` and `since` recovery.
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    /// How long a room's offset and epoch outlive its last publish once no node subscribes to it;
    /// after that the room starts over at offset 0 with a new epoch.
    pub stream_ttl: Duration,
    /// Messages kept per user inbox; beyond it the oldest unacknowledged are dropped.
    pub inbox_size: usize,
    /// How long an inbox message is kept; an inbox untouched (no send, no ack) for this long is
    /// forgotten, and starts over at seq 0 with a new epoch.
    pub inbox_ttl: Duration,
    /// How long a publish or persisted send key is remembered.
    pub idempotency_window: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            stream_ttl: Duration::from_secs(86_400),
            inbox_size: 1000,
            inbox_ttl: Duration::from_secs(604_800),
            idempotency_window: Duration::from_secs(300),
        }
    }
}

/// The shared state of one in-memory "cluster". A single node uses one bus through one
/// [`MemoryBroker`]; tests attach several brokers to one bus to play several nodes.
#[derive(Clone)]
pub struct MemoryBus {
    state: Arc<BusState>,
}

struct BusState {
    config: MemoryConfig,
    /// The first digits of every epoch made until the next wipe (see [`crate::resumable`]).
    generation: Mutex<String>,
    /// Per-room stream, each behind its own lock so rooms publish in parallel; the lock is held
    /// through delivery so that delivery order is offset order.
    streams: DashMap<String, Arc<Mutex<Stream>>>,
    /// Which nodes receive each room.
    subscriptions: DashMap<String, Vec<Arc<NodeSlot>>>,
    nodes: RwLock<Vec<Arc<NodeSlot>>>,
    /// user → session → node id.
    registry: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Fallback session id → its link.
    links: Mutex<HashMap<String, LinkRecord>>,
    /// room → session → member; a BTreeMap keeps listings stable.
    presence: Mutex<HashMap<String, BTreeMap<String, Member>>>,
    /// user → inbox, each behind its own lock, held through delivery so that delivery order is
    /// seq order.
    inboxes: DashMap<String, Arc<Mutex<UserInbox>>>,
    /// Keys of keyed publishes and persisted sends, with when they were first used and what they
    /// answered. Held through the keyed call, so that two calls with one key never both act.
    keys: Mutex<HashMap<IdempotencyKey, (Instant, Remembered)>>,
    sweeper_started: AtomicBool,
}

/// An idempotency key is scoped to its room or user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdempotencyKey {
    Room { room: String, key: String },
    User { user: String, key: String },
}

/// The first answer to a key.
enum Remembered {
    Published(Arc<RoomMessage>),
    Sent(Sent),
}

struct UserInbox {
    epoch: String,
    seq: u64,
    acked: u64,
    /// Unacknowledged messages in seq order, with when they were stored.
    entries: VecDeque<(InboxEntry, Instant)>,
    last_activity: Instant,
}

impl UserInbox {
    fn new(epoch: String) -> Self {
        UserInbox {
            epoch,
            seq: 0,
            acked: 0,
            entries: VecDeque::new(),
            last_activity: Instant::now(),
        }
    }

    fn position(&self) -> InboxPosition {
        InboxPosition {
            seq: self.seq,
            acked: self.acked,
            epoch: self.epoch.clone(),
        }
    }

    fn idle(&self, config: &MemoryConfig, now: Instant) -> bool {
        now.duration_since(self.last_activity) >= config.inbox_ttl
    }

    /// Drops expired messages, then the oldest beyond `keep`; returns how many it dropped for
    /// the size (expired ones are gone anyway).
    fn evict(&mut self, config: &MemoryConfig, keep: usize, now: Instant) -> u64 {
        while let Some((_, at)) = self.entries.front() {
            if now.duration_since(*at) < config.inbox_ttl {
                break;
            }
            self.entries.pop_front();
        }
        let mut dropped = 0;
        while self.entries.len() > keep {
            self.entries.pop_front();
            dropped += 1;
        }
        dropped
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

struct NodeSlot {
    id: String,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    status: Mutex<Option<NodeInfo>>,
}

struct Stream {
    epoch: String,
    offset: u64,
    history: VecDeque<(Arc<RoomMessage>, Instant)>,
    last_activity: Instant,
}

impl Stream {
    fn new(epoch: String) -> Self {
        Stream {
            epoch,
            offset: 0,
            history: VecDeque::new(),
            last_activity: Instant::now(),
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    fn evict(&mut self, config: &MemoryConfig, now: Instant) {
        while self.history.len() > config.history_size {
            self.history.pop_front();
        }
        while let Some((_, at)) = self.history.front() {
            if now.duration_since(*at) < config.history_ttl {
                break;
            }
            self.history.pop_front();
        }
    }
}

fn new_generation() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl MemoryBus {
    pub fn new(config: MemoryConfig) -> Self {
        MemoryBus {
            state: Arc::new(BusState {
                config,
                streams: DashMap::new(),
                subscriptions: DashMap::new(),
                nodes: RwLock::new(Vec::new()),
                registry: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                presence: Mutex::new(HashMap::new()),
                inboxes: DashMap::new(),
                keys: Mutex::new(HashMap::new()),
                sweeper_started: AtomicBool::new(false),
                generation: Mutex::new(new_generation()),
            }),
        }
    }

    /// A broker for one node on this bus.
    pub fn broker(&self, node_id: &str) -> MemoryBroker {
        let slot = Arc::new(NodeSlot {
            id: node_id.to_owned(),
            handler: OnceLock::new(),
            status: Mutex::new(None),
        });
        self.state.nodes.write().push(slot.clone());
        MemoryBroker {
            bus: self.clone(),
            slot,
        }
    }

    /// Forgets every room's offsets and history, every inbox and every idempotency key, as a
    /// wiped store would: every room and inbox gets a new epoch on its next use.
    pub fn wipe_history(&self) {
        *self.state.generation.lock() = new_generation();
        self.state.streams.clear();
        self.state.inboxes.clear();
        self.state.keys.lock().clear();
    }
}

impl BusState {
    fn new_epoch(&self) -> String {
        format!("{}{:08x}", self.generation.lock(), rand::random::<u32>())
    }

    /// A room's stream, if it has one: only publishing creates it.
    fn existing_stream(&self, room: &str) -> Option<Arc<Mutex<Stream>>> {
        self.streams.get(room).map(|stream| stream.clone())
    }

    fn stream(&self, room: &str) -> Arc<Mutex<Stream>> {
        if let Some(stream) = self.streams.get(room) {
            return stream.clone();
        }
        self.streams
            .entry(room.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(self.new_epoch()))))
            .clone()
    }

    fn publish(&self, room: &str, data: Value, from: Option<Sender>) -> Arc<RoomMessage> {
        let stream = self.stream(room);
        let mut stream = stream.lock();
        let now = Instant::now();
        stream.offset += 1;
        stream.last_activity = now;
        let message = Arc::new(RoomMessage {
            room: room.to_owned(),
            data,
            offset: stream.offset,
            epoch: stream.epoch.clone(),
            from,
        });
        if self.config.history_size > 0 {
            stream.history.push_back((message.clone(), now));
        }
        stream.evict(&self.config, now);
        for handler in self.room_nodes(room) {
            handler.room_message(message.clone());
        }
        message
    }

    /// A user's inbox, if it has one that is not idle past its TTL: only a persisted send
    /// creates one.
    fn existing_inbox(&self, user: &str) -> Option<Arc<Mutex<UserInbox>>> {
        let inbox = self.inboxes.get(user)?.clone();
        let idle = inbox.lock().idle(&self.config, Instant::now());
        (!idle).then_some(inbox)
    }

    fn inbox(&self, user: &str) -> Arc<Mutex<UserInbox>> {
        let inbox = self
            .inboxes
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(UserInbox::new(self.new_epoch()))))
            .clone();
        {
            let mut held = inbox.lock();
            if held.idle(&self.config, Instant::now()) {
                *held = UserInbox::new(self.new_epoch());
            }
        }
        inbox
    }

    fn unstored_inbox_position(&self) -> InboxPosition {
        InboxPosition {
            seq: 0,
            acked: 0,
            epoch: self.new_epoch(),
        }
    }

    /// Delivers to every node hosting `user`; returns how many sessions the registry lists.
    fn deliver_direct(&self, message: DirectMessage) -> u64 {
        let message = Arc::new(message);
        let mut sessions = 0;
        for (node, count) in self.user_nodes(&message.user) {
            if let Some(handler) = self.handler_of(&node) {
                handler.direct(message.clone());
                sessions += count;
            }
        }
        sessions
    }

    /// Appends to the user's inbox and delivers, under the inbox's lock.
    fn append(&self, mut message: DirectMessage) -> Sent {
        let inbox = self.inbox(&message.user);
        let mut inbox = inbox.lock();
        let now = Instant::now();
        inbox.seq += 1;
        inbox.last_activity = now;
        let keep = self.config.inbox_size.saturating_sub(1);
        let dropped = inbox.evict(&self.config, keep, now);
        let seq = inbox.seq;
        if self.config.inbox_size > 0 {
            let entry = InboxEntry {
                seq,
                data: message.data.clone(),
                from: message.from.clone(),
                at: unix_millis(),
            };
            inbox.entries.push_back((entry, now));
        }
        message.seq = Some(seq);
        let sessions = self.deliver_direct(message);
        Sent {
            sessions,
            seq,
            epoch: inbox.epoch.clone(),
            duplicate: false,
            dropped,
        }
    }

    fn room_nodes(&self, room: &str) -> Vec<Arc<dyn BrokerHandler>> {
        self.subscriptions
            .get(room)
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|node| node.handler.get().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn handler_of(&self, node_id: &str) -> Option<Arc<dyn BrokerHandler>> {
        self.nodes
            .read()
            .iter()
            .find(|node| node.id == node_id)
            .and_then(|node| node.handler.get().cloned())
    }

    /// Node ids hosting `user`, with how many of the user's sessions each hosts.
    fn user_nodes(&self, user: &str) -> Vec<(String, u64)> {
        let registry = self.registry.lock();
        let mut per_node: HashMap<&str, u64> = HashMap::new();
        if let Some(sessions) = registry.get(user) {
            for node in sessions.values() {
                *per_node.entry(node.as_str()).or_default() += 1;
            }
        }
        per_node
            .into_iter()
            .map(|(node, count)| (node.to_owned(), count))
            .collect()
    }

    fn announce(&self, room: &str, change: PresenceChange, member: &Member) {
        let event = PresenceEvent {
            change,
            notice: PresenceNotice {
                room: room.to_owned(),
                user: member.user.clone(),
                session: member.session.clone(),
            },
        };
        for handler in self.room_nodes(room) {
            handler.presence(event.clone());
        }
    }

    /// Drops expired history and forgets rooms idle past `stream_ttl` that no node receives.
    fn sweep(&self) {
        let now = Instant::now();
        self.streams.retain(|room, stream| {
            let mut stream = stream.lock();
            stream.evict(&self.config, now);
            let idle = now.duration_since(stream.last_activity) >= self.config.stream_ttl;
            !(idle && stream.history.is_empty() && !self.subscriptions.contains_key(room))
        });
        self.inboxes
            .retain(|_, inbox| !inbox.lock().idle(&self.config, now));
        self.keys
            .lock()
            .retain(|_, (at, _)| now.duration_since(*at) < self.config.idempotency_window);
    }

    /// The remembered answer to `key`, if it was used within the window.
    fn remembered<'a>(
        &self,
        keys: &'a HashMap<IdempotencyKey, (Instant, Remembered)>,
        key: &IdempotencyKey,
    ) -> Option<&'a Remembered> {
        keys.get(key)
            .filter(|(at, _)| Instant::now().duration_since(*at) < self.config.idempotency_window)
            .map(|(_, remembered)| remembered)
    }
}

/// The embedded broker: one node's handle on a [`MemoryBus`].
pub struct MemoryBroker {
    bus: MemoryBus,
    slot: Arc<NodeSlot>,
}

impl MemoryBroker {
    /// A single-node broker on a bus of its own.
    pub fn new(node_id: &str, config: MemoryConfig) -> Self {
        MemoryBus::new(config).broker(node_id)
    }

    fn state(&self) -> &BusState {
        &self.bus.state
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> BrokerResult<()> {
        let _ = self.slot.handler.set(handler);
        if !self.state().sweeper_started.swap(true, Ordering::SeqCst) {
            let weak: Weak<BusState> = Arc::downgrade(&self.bus.state);
            let period = self
                .state()
                .config
                .history_ttl
                .min(Duration::from_secs(60))
                .max(Duration::from_millis(100));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(state) = weak.upgrade() else { break };
                    state.sweep();
                }
            });
        }
        Ok(())
    }

    async fn publish(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>> {
        Ok(self.state().publish(room, data, from))
    }

    async fn publish_keyed(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published> {
        let state = self.state();
        let key = IdempotencyKey::Room {
            room: room.to_owned(),
            key: key.to_owned(),
        };
        let mut keys = state.keys.lock();
        if let Some(Remembered::Published(message)) = state.remembered(&keys, &key) {
            return Ok(Published {
                message: message.clone(),
                duplicate: true,
            });
        }
        let message = state.publish(room, data, from);
        keys.insert(
            key,
            (Instant::now(), Remembered::Published(message.clone())),
        );
        Ok(Published {
            message,
            duplicate: false,
        })
    }

    async fn send_persisted(
        &self,
        message: DirectMessage,
        key: Option<&str>,
    ) -> BrokerResult<Sent> {
        let state = self.state();
        let Some(key) = key else {
            return Ok(state.append(message));
        };
        let key = IdempotencyKey::User {
            user: message.user.clone(),
            key: key.to_owned(),
        };
        let mut keys = state.keys.lock();
        if let Some(Remembered::Sent(first)) = state.remembered(&keys, &key) {
            return Ok(Sent {
                duplicate: true,
                dropped: 0,
                ..first.clone()
            });
        }
        let sent = state.append(message);
        keys.insert(key, (Instant::now(), Remembered::Sent(sent.clone())));
        Ok(sent)
    }

    async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked> {
        let state = self.state();
        let Some(inbox) = state.existing_inbox(user) else {
            let position = state.unstored_inbox_position();
            return Ok(if seq == 0 {
                Acked::Done(position)
            } else {
                Acked::BeyondSeq(position)
            });
        };
        let mut inbox = inbox.lock();
        if seq > inbox.seq {
            return Ok(Acked::BeyondSeq(inbox.position()));
        }
        inbox.acked = inbox.acked.max(seq);
        inbox.last_activity = Instant::now();
        let acked = inbox.acked;
        while inbox
            .entries
            .front()
            .is_some_and(|(entry, _)| entry.seq <= acked)
        {
            inbox.entries.pop_front();
        }
        Ok(Acked::Done(inbox.position()))
    }

    async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox> {
        let state = self.state();
        let Some(inbox) = state.existing_inbox(user) else {
            return Ok(Inbox {
                position: state.unstored_inbox_position(),
                pending: Vec::new(),
                more: false,
            });
        };
        let mut inbox = inbox.lock();
        inbox.evict(&state.config, usize::MAX, Instant::now());
        let after = after.max(inbox.acked);
        let mut pending = Vec::new();
        let mut used = 0usize;
        let mut more = false;
        for (entry, _) in inbox.entries.iter().filter(|(entry, _)| entry.seq > after) {
            let size = Codec::Json.encoded_len(&entry.data);
            if pending.len() == limit || (!pending.is_empty() && used + size > max_bytes) {
                more = true;
                break;
            }
            used += size;
            pending.push(entry.clone());
        }
        Ok(Inbox {
            position: inbox.position(),
            pending,
            more,
        })
    }

    async fn subscribe_room(&self, room: &str) -> BrokerResult<()> {
        let mut nodes = self
            .state()
            .subscriptions
            .entry(room.to_owned())
            .or_default();
        if !nodes.iter().any(|node| Arc::ptr_eq(node, &self.slot)) {
            nodes.push(self.slot.clone());
        }
        Ok(())
    }

    async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        let subscriptions = &self.state().subscriptions;
        if let Some(mut nodes) = subscriptions.get_mut(room) {
            nodes.retain(|node| !Arc::ptr_eq(node, &self.slot));
        }
        subscriptions.remove_if(room, |_, nodes| nodes.is_empty());
        Ok(())
    }

    async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        let state = self.state();
        let Some(stream) = state.existing_stream(room) else {
            // Nothing was ever published (or it was forgotten): nothing to read, and reading
            // creates nothing.
            let position = StreamPosition {
                offset: 0,
                epoch: state.new_epoch(),
            };
            return Ok(History {
                messages: Vec::new(),
                recovered: query
                    .since
                    .is_some_and(|since| recovered(&since, &position, None)),
                position,
                more: false,
            });
        };
        let mut stream = stream.lock();
        stream.evict(&state.config, Instant::now());
        let position = stream.position();
        let oldest_held = stream
            .history
            .front()
            .map_or(stream.offset + 1, |(message, _)| message.offset);
        let limit = query.limit.unwrap_or(usize::MAX);
        // The page starts after this offset.
        let (after, recovered) = match &query.since {
            None => {
                let skip = stream.history.len().saturating_sub(limit);
                let after = stream
                    .history
                    .get(skip)
                    .map_or(stream.offset, |(message, _)| message.offset - 1);
                (after, false)
            }
            Some(since) if !resumable(since, &position) => {
                return Ok(History {
                    messages: Vec::new(),
                    position,
                    recovered: false,
                    more: false,
                });
            }
            // History holds oldest_held..=position.offset without a gap.
            Some(since) => {
                let next_held =
                    (oldest_held <= position.offset).then(|| oldest_held.max(since.offset + 1));
                (since.offset, recovered(since, &position, next_held))
            }
        };
        let budget = query.max_bytes.unwrap_or(usize::MAX);
        let mut messages = Vec::new();
        let mut used = 0usize;
        let mut more = false;
        for (message, _) in stream
            .history
            .iter()
            .skip_while(|(message, _)| message.offset <= after)
        {
            let size = Codec::Json.encoded_len(&message.data);
            if messages.len() == limit || (!messages.is_empty() && used + size > budget) {
                more = true;
                break;
            }
            used += size;
            messages.push(message.clone());
        }
        Ok(History {
            messages,
            position,
            recovered,
            more,
        })
    }

    async fn position(&self, room: &str) -> BrokerResult<StreamPosition> {
        Ok(match self.state().existing_stream(room) {
            Some(stream) => stream.lock().position(),
            None => StreamPosition {
                offset: 0,
                epoch: self.state().new_epoch(),
            },
        })
    }

    async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        Ok(self.state().deliver_direct(message))
    }

    async fn broadcast(&self, data: Value) -> BrokerResult<u64> {
        let data = Arc::new(data);
        let handlers: Vec<_> = self
            .state()
            .nodes
            .read()
            .iter()
            .filter_map(|node| node.handler.get().cloned())
            .collect();
        for handler in &handlers {
            handler.broadcast(data.clone());
        }
        Ok(handlers.len() as u64)
    }

    async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64> {
        let state = self.state();
        let mut sessions = 0;
        for (node, count) in state.user_nodes(user) {
            if let Some(handler) = state.handler_of(&node) {
                handler.disconnect(user, code, reason);
                sessions += count;
            }
        }
        Ok(sessions)
    }

    async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.state()
            .registry
            .lock()
            .entry(record.user.clone())
            .or_default()
            .insert(record.session.clone(), record.node.clone());
        Ok(())
    }

    async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        let mut registry = self.state().registry.lock();
        if let Some(sessions) = registry.get_mut(&record.user) {
            sessions.remove(&record.session);
            if sessions.is_empty() {
                registry.remove(&record.user);
            }
        }
        Ok(())
    }

    async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let state = self.state();
        state
            .presence
            .lock()
            .entry(room.to_owned())
            .or_default()
            .insert(member.session.clone(), member.clone());
        state.announce(room, PresenceChange::Join, member);
        Ok(())
    }

    async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let state = self.state();
        let removed = {
            let mut presence = state.presence.lock();
            let removed = presence
                .get_mut(room)
                .and_then(|members| members.remove(&member.session))
                .is_some();
            if presence.get(room).is_some_and(BTreeMap::is_empty) {
                presence.remove(room);
            }
            removed
        };
        if removed {
            state.announce(room, PresenceChange::Leave, member);
        }
        Ok(())
    }

    async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>> {
        Ok(self
            .state()
            .presence
            .lock()
            .get(room)
            .map(|members| members.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()> {
        *self.slot.status.lock() = Some(node.clone());
        Ok(())
    }

    async fn register_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.state()
            .links
            .lock()
            .insert(link.session.clone(), link.clone());
        Ok(())
    }

    async fn unregister_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.state().links.lock().remove(&link.session);
        Ok(())
    }

    async fn forward(
        &self,
        session: &str,
        key_hash: &str,
        frames: Vec<String>,
    ) -> BrokerResult<Forwarded> {
        let state = self.state();
        let handler = {
            let mut links = state.links.lock();
            let Some(link) = links.get(session) else {
                return Ok(Forwarded::UnknownSession);
            };
            // A node that left the bus holds no session any more: its link goes, as the
            // Redis broker drops the link of a dead node.
            let Some(handler) = state.handler_of(&link.node) else {
                links.remove(session);
                return Ok(Forwarded::UnknownSession);
            };
            if link.key_hash != key_hash {
                return Ok(Forwarded::WrongKey);
            }
            handler
        };
        if !frames.is_empty() {
            handler.frames(session, frames);
        }
        Ok(Forwarded::Delivered)
    }

    async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
        Ok(self
            .state()
            .nodes
            .read()
            .iter()
            .filter_map(|node| node.status.lock().clone())
            .collect())
    }

    async fn deregister_node(&self, node: &str) -> BrokerResult<()> {
        let state = self.state();
        let sessions: Vec<String> = {
            let mut registry = state.registry.lock();
            let mut gone = Vec::new();
            registry.retain(|_, sessions| {
                sessions.retain(|session, host| {
                    let keep = host != node;
                    if !keep {
                        gone.push(session.clone());
                    }
                    keep
                });
                !sessions.is_empty()
            });
            gone
        };
        state.presence.lock().retain(|_, members| {
            members.retain(|session, _| !sessions.contains(session));
            !members.is_empty()
        });
        state.links.lock().retain(|_, link| link.node != node);
        state.nodes.write().retain(|slot| slot.id != node);
        for mut nodes in state.subscriptions.iter_mut() {
            nodes.retain(|slot| slot.id != node);
        }
        state.subscriptions.retain(|_, nodes| !nodes.is_empty());
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
