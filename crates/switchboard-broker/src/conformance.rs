//! The contract every [`Broker`] must keep, as async test functions: a broker implementation runs
//! each of them against its own [`Cluster`] (see docs/architecture.md, "Brokers"). Delivery is
//! awaited with generous deadlines, so brokers that deliver through a network (Redis pub/sub) pass
//! as well as the in-process one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::{Value, json};
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, PresenceNotice, RoomMessage, Sender, StreamPosition};

use crate::{
    Acked, Broker, BrokerHandler, DirectMessage, Forwarded, History, HistoryQuery, InboxEntry,
    LinkRecord, PresenceChange, PresenceEvent, Sent, SessionRecord, same_generation,
};

/// Time a broker gets to deliver an event or come up: long, because the test machine is loaded.
const DEADLINE: Duration = Duration::from_secs(20);

/// The inbox and idempotency limits the brokers of a test's cluster are configured with: the
/// macro [`conformance_tests!`](crate::conformance_tests) hands them to the function that makes
/// the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub inbox_size: usize,
    pub inbox_ttl: Duration,
    pub idempotency_window: Duration,
}

impl Limits {
    /// Far beyond what any test reaches or lasts.
    pub const GENEROUS: Limits = Limits {
        inbox_size: 1000,
        inbox_ttl: Duration::from_secs(3600),
        idempotency_window: Duration::from_secs(3600),
    };
    /// Three messages per inbox.
    pub const SMALL_INBOX: Limits = Limits {
        inbox_size: 3,
        ..Limits::GENEROUS
    };
    /// Inbox messages (and idle inboxes) expire after 5 s.
    pub const SHORT_TTL: Limits = Limits {
        inbox_ttl: Duration::from_secs(5),
        ..Limits::GENEROUS
    };
    /// Keys are remembered for 2 s.
    pub const SHORT_WINDOW: Limits = Limits {
        idempotency_window: Duration::from_secs(2),
        ..Limits::GENEROUS
    };

    /// The limits a test listed with them, else [`Limits::GENEROUS`].
    pub fn given(listed: &[Limits]) -> Limits {
        listed.first().copied().unwrap_or(Limits::GENEROUS)
    }
}

/// The brokers of one cluster, made by the implementation under test.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// A new broker of node `node`, not started, sharing the cluster's state with every broker
    /// this cluster made. Each test starts from a cluster without state.
    async fn broker(&self, node: &str) -> Arc<dyn Broker>;

    /// Drops all but the newest `keep` messages of `room`'s history, as eviction by size or age
    /// would (brokers may trim lazily, so the suite does not rely on their own eviction).
    async fn trim_history(&self, room: &str, keep: usize);
}

/// Everything a node received from its broker, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Room(RoomMessage),
    Presence(PresenceEvent),
    Direct(DirectMessage),
    Broadcast(Value),
    Disconnect {
        user: String,
        code: u16,
        reason: String,
    },
    /// Client frames forwarded to a fallback session of this node.
    Frames {
        session: String,
        frames: Vec<String>,
    },
}

/// A [`BrokerHandler`] that records what its broker delivers.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    /// Every event received so far; the list is emptied.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock())
    }

    /// Waits until `count` events have arrived and takes them; panics after the deadline.
    pub async fn take_exactly(&self, count: usize, what: &str) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let len = self.events.lock().len();
            if len >= count {
                let events = self.take();
                assert_eq!(events.len(), count, "{what}: too many events {events:?}");
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {len} of {count} events arrived: {:?}",
                self.events.lock()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn push(&self, event: Event) {
        self.events.lock().push(event);
    }
}

impl BrokerHandler for Recorder {
    fn room_message(&self, message: Arc<RoomMessage>) {
        self.push(Event::Room((*message).clone()));
    }

    fn presence(&self, event: PresenceEvent) {
        self.push(Event::Presence(event));
    }

    fn direct(&self, message: Arc<DirectMessage>) {
        self.push(Event::Direct((*message).clone()));
    }

    fn broadcast(&self, data: Arc<Value>) {
        self.push(Event::Broadcast((*data).clone()));
    }

    fn frames(&self, session: &str, frames: Vec<String>) {
        self.push(Event::Frames {
            session: session.to_owned(),
            frames,
        });
    }

    fn disconnect(&self, user: &str, code: u16, reason: &str) {
        self.push(Event::Disconnect {
            user: user.to_owned(),
            code,
            reason: reason.to_owned(),
        });
    }
}

/// A broker of `node`, started with a fresh recorder, healthy, and alive: it sent a heartbeat, as
/// a node does before it serves sessions (a broker may ignore the sessions and presence of nodes
/// it does not know to be alive).
pub async fn started(cluster: &dyn Cluster, node: &str) -> (Arc<dyn Broker>, Arc<Recorder>) {
    let (broker, recorder) = started_silent(cluster, node).await;
    broker
        .heartbeat(&node_info(node, 0, 0))
        .await
        .expect("heartbeat");
    (broker, recorder)
}

/// A broker of `node`, started with a fresh recorder and healthy, that sent no heartbeat.
pub async fn started_silent(cluster: &dyn Cluster, node: &str) -> (Arc<dyn Broker>, Arc<Recorder>) {
    let broker = cluster.broker(node).await;
    let recorder = Arc::new(Recorder::default());
    broker.start(recorder.clone()).await.expect("start");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !broker.is_healthy() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "broker of {node} did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (broker, recorder)
}

fn since(offset: u64, epoch: &str) -> HistoryQuery {
    HistoryQuery {
        since: Some(StreamPosition {
            offset,
            epoch: epoch.to_owned(),
        }),
        ..HistoryQuery::default()
    }
}

fn newest(limit: Option<usize>) -> HistoryQuery {
    HistoryQuery {
        limit,
        ..HistoryQuery::default()
    }
}

fn paged(
    since_offset: Option<(u64, &str)>,
    limit: Option<usize>,
    max_bytes: usize,
) -> HistoryQuery {
    HistoryQuery {
        since: since_offset.map(|(offset, epoch)| StreamPosition {
            offset,
            epoch: epoch.to_owned(),
        }),
        limit,
        max_bytes: Some(max_bytes),
    }
}

fn offsets(history: &History) -> Vec<u64> {
    history
        .messages
        .iter()
        .map(|message| message.offset)
        .collect()
}

fn room_offsets(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .map(|event| match event {
            Event::Room(message) => message.offset,
            other => panic!("expected a room message, got {other:?}"),
        })
        .collect()
}

fn sender(user: &str, session: &str) -> Sender {
    Sender {
        user: user.to_owned(),
        session: session.to_owned(),
    }
}

fn member(user: &str, session: &str) -> Member {
    Member {
        user: user.to_owned(),
        session: session.to_owned(),
        info: None,
    }
}

fn session(user: &str, session: &str, node: &str) -> SessionRecord {
    SessionRecord {
        session: session.to_owned(),
        user: user.to_owned(),
        node: node.to_owned(),
        connected_at: 1_700_000_000_000,
    }
}

fn link(session: &str, node: &str, key_hash: &str) -> LinkRecord {
    LinkRecord {
        session: session.to_owned(),
        node: node.to_owned(),
        key_hash: key_hash.to_owned(),
    }
}

fn texts(frames: &[&str]) -> Vec<String> {
    frames.iter().map(|frame| (*frame).to_owned()).collect()
}

fn frames_event(session: &str, frames: &[&str]) -> Event {
    Event::Frames {
        session: session.to_owned(),
        frames: texts(frames),
    }
}

/// Forwards `frames` to `session` with the right key and waits until `recorder` (its node's)
/// has them: every frame forwarded earlier to that node has then arrived too, so a check that
/// something did not arrive after this is not premature.
async fn frames_barrier(
    broker: &dyn Broker,
    recorder: &Recorder,
    session: &str,
    key_hash: &str,
    frames: &[&str],
) {
    assert_eq!(
        broker
            .forward(session, key_hash, texts(frames))
            .await
            .unwrap(),
        Forwarded::Delivered
    );
    assert_eq!(
        recorder.take_exactly(1, "frames barrier").await,
        vec![frames_event(session, frames)]
    );
}

fn node_info(id: &str, connections: u64, last_seen: u64) -> NodeInfo {
    NodeInfo {
        id: id.to_owned(),
        instance: "1".into(),
        address: format!("{id}.local:8080"),
        connections,
        started_at: 1_000,
        last_seen,
    }
}

fn presence_event(change: PresenceChange, room: &str, user: &str, session: &str) -> Event {
    Event::Presence(PresenceEvent {
        change,
        notice: PresenceNotice {
            room: room.to_owned(),
            user: user.to_owned(),
            session: session.to_owned(),
        },
    })
}

/// Publishes `n` messages `{"n": i}` (i from 1) to `room`; returns the epoch they carried.
async fn publish_n(broker: &dyn Broker, room: &str, n: u64) -> String {
    let mut epoch = None;
    for i in 1..=n {
        let message = broker.publish(room, json!({ "n": i }), None).await.unwrap();
        epoch.get_or_insert_with(|| message.epoch.clone());
        assert_eq!(epoch.as_deref(), Some(message.epoch.as_str()));
    }
    epoch.expect("published at least one message")
}

/// Publishes to `room` from `broker` and waits until `recorder` (subscribed to it) has it: every
/// event published earlier to a room `recorder` subscribes has then arrived too, so a check that
/// something did not arrive after this is not premature.
async fn barrier(broker: &dyn Broker, recorder: &Recorder, room: &str) {
    let message = broker.publish(room, json!("barrier"), None).await.unwrap();
    let events = recorder.take_exactly(1, "barrier").await;
    assert_eq!(events, vec![Event::Room((*message).clone())]);
}

/// Publish assigns offsets 1, 2, 3 in one epoch per room, and `position` reads the latest.
pub async fn publish_assigns_offsets_in_one_epoch(cluster: &dyn Cluster) {
    let (broker, _) = started(cluster, "n1").await;

    let first = broker
        .publish("a", json!({"text": "hi"}), Some(sender("alice", "s1")))
        .await
        .unwrap();
    assert_eq!(first.room, "a");
    assert_eq!(first.offset, 1);
    assert_eq!(first.data, json!({"text": "hi"}));
    assert_eq!(first.from, Some(sender("alice", "s1")));
    assert!(!first.epoch.is_empty());

    let second = broker.publish("a", json!(2), None).await.unwrap();
    let third = broker.publish("a", json!(3), None).await.unwrap();
    assert_eq!((second.offset, third.offset), (2, 3));
    assert_eq!(second.epoch, first.epoch);
    assert_eq!(third.epoch, first.epoch);
    assert_eq!(second.from, None);

    // Another room counts on its own.
    let other = broker.publish("b", json!("x"), None).await.unwrap();
    assert_eq!(other.offset, 1);
    assert_ne!(other.epoch, first.epoch);

    assert_eq!(
        broker.position("a").await.unwrap(),
        StreamPosition {
            offset: 3,
            epoch: first.epoch.clone()
        }
    );
    assert_eq!(broker.position("b").await.unwrap().offset, 1);
}

/// A room without state is at offset 0 in an epoch stored nowhere, its history is empty, and a
/// client that subscribed at that position recovers the room's first publish.
pub async fn a_room_without_state_is_at_offset_zero_and_stores_nothing(cluster: &dyn Cluster) {
    let (broker, _) = started(cluster, "n1").await;

    let before = broker.position("fresh").await.unwrap();
    assert_eq!(before.offset, 0);
    assert!(!before.epoch.is_empty());
    // Not stored: every read answers a fresh epoch.
    assert_ne!(broker.position("fresh").await.unwrap().epoch, before.epoch);

    let history = broker.history("fresh", newest(None)).await.unwrap();
    assert!(history.messages.is_empty());
    assert!(!history.recovered);
    assert!(!history.more);
    assert_eq!(history.position.offset, 0);
    let nothing = broker
        .history("fresh", since(0, &history.position.epoch))
        .await
        .unwrap();
    assert!(nothing.recovered);
    assert!(nothing.messages.is_empty());
    assert_eq!(broker.position("fresh").await.unwrap().offset, 0);

    // The first publish makes the room's epoch; the client at {0, epoch} recovers it.
    let message = broker.publish("fresh", json!(1), None).await.unwrap();
    assert_eq!(message.offset, 1);
    let history = broker
        .history("fresh", since(0, &before.epoch))
        .await
        .unwrap();
    assert!(history.recovered);
    assert_eq!(offsets(&history), vec![1]);
    assert_eq!(
        history.position,
        StreamPosition {
            offset: 1,
            epoch: message.epoch.clone()
        }
    );
}

/// Without `since`, history is the newest `limit` from the oldest of them; with `since`, the
/// messages after it, the limit keeping the oldest, `recovered` ignoring the limit.
pub async fn history_pages_by_count(cluster: &dyn Cluster) {
    let (broker, _) = started(cluster, "n1").await;
    let epoch = publish_n(&*broker, "r", 5).await;
    let position = StreamPosition {
        offset: 5,
        epoch: epoch.clone(),
    };

    let two = broker.history("r", newest(Some(2))).await.unwrap();
    assert_eq!(offsets(&two), vec![4, 5]);
    assert_eq!(two.messages[0].data, json!({"n": 4}));
    assert_eq!(two.position, position);
    assert!(!two.recovered);

    let all = broker.history("r", newest(None)).await.unwrap();
    assert_eq!(offsets(&all), vec![1, 2, 3, 4, 5]);
    assert!(all.messages.iter().all(|message| message.epoch == epoch));
    assert_eq!(
        offsets(&broker.history("r", newest(Some(10))).await.unwrap()),
        vec![1, 2, 3, 4, 5]
    );
    let none = broker.history("r", newest(Some(0))).await.unwrap();
    assert!(none.messages.is_empty());
    assert_eq!(none.position, position);

    let history = broker.history("r", since(2, &epoch)).await.unwrap();
    assert!(history.recovered);
    assert_eq!(offsets(&history), vec![3, 4, 5]);
    assert_eq!(history.messages[0].data, json!({"n": 3}));
    assert_eq!(history.position, position);

    let limited = broker
        .history(
            "r",
            HistoryQuery {
                limit: Some(2),
                ..since(2, &epoch)
            },
        )
        .await
        .unwrap();
    assert!(limited.recovered);
    assert_eq!(offsets(&limited), vec![3, 4]);
    let none = broker
        .history(
            "r",
            HistoryQuery {
                limit: Some(0),
                ..since(1, &epoch)
            },
        )
        .await
        .unwrap();
    assert!(none.messages.is_empty());

    let from_start = broker.history("r", since(0, &epoch)).await.unwrap();
    assert!(from_start.recovered);
    assert_eq!(offsets(&from_start), vec![1, 2, 3, 4, 5]);

    // Up to date: nothing missed, fully recovered.
    let current = broker.history("r", since(5, &epoch)).await.unwrap();
    assert!(current.recovered);
    assert!(current.messages.is_empty());
}

/// Pages stop before their payloads pass `max_bytes` (or at `limit`) and say `more`; paging on
/// from the last offset gives every message exactly once; a page holds at least one message.
pub async fn history_pages_by_bytes_and_says_more(cluster: &dyn Cluster) {
    let (broker, _) = started(cluster, "n1").await;
    // Ten payloads of about 10 KB each: a little more as stored (JSON or MessagePack).
    let mut epoch = String::new();
    for n in 1..=10 {
        let message = broker
            .publish("big", json!(format!("{n:0>10000}")), None)
            .await
            .unwrap();
        epoch = message.epoch.clone();
    }

    let first = broker
        .history("big", paged(Some((0, &epoch)), None, 35_000))
        .await
        .unwrap();
    assert_eq!(offsets(&first), vec![1, 2, 3]);
    assert!(first.more);
    assert!(first.recovered, "offset 0 recovers from the first message");

    let mut seen = offsets(&first);
    let mut more = first.more;
    while more {
        let last = *seen.last().expect("a page moves on");
        let next = broker
            .history("big", paged(Some((last, &epoch)), None, 35_000))
            .await
            .unwrap();
        assert!(next.messages.len() <= 3 && !next.messages.is_empty());
        assert!(next.recovered);
        seen.extend(offsets(&next));
        more = next.more;
    }
    assert_eq!(seen, (1..=10).collect::<Vec<u64>>());

    // A budget below one payload still moves on by one.
    let one = broker
        .history("big", paged(Some((7, &epoch)), None, 10))
        .await
        .unwrap();
    assert_eq!(offsets(&one), vec![8]);
    assert!(one.more);

    // The count limit also says `more`; an exact fit to the end does not.
    let counted = broker
        .history("big", paged(Some((0, &epoch)), Some(4), usize::MAX))
        .await
        .unwrap();
    assert_eq!(offsets(&counted), vec![1, 2, 3, 4]);
    assert!(counted.more);
    let to_the_end = broker
        .history("big", paged(Some((6, &epoch)), Some(4), 41_000))
        .await
        .unwrap();
    assert_eq!(offsets(&to_the_end), vec![7, 8, 9, 10]);
    assert!(!to_the_end.more);

    // Without `since`: the newest `limit`, from the oldest of them.
    let newest = broker
        .history("big", paged(None, Some(5), 25_000))
        .await
        .unwrap();
    assert_eq!(offsets(&newest), vec![6, 7]);
    assert!(newest.more);
    let whole = broker
        .history("big", paged(None, Some(2), 1 << 20))
        .await
        .unwrap();
    assert_eq!(offsets(&whole), vec![9, 10]);
    assert!(!whole.more);
}

/// `since` recovers in the same epoch up to the room's position, and from offset 0 in any epoch
/// of the same generation; not in another epoch, not beyond the position, not once part of the
/// gap is no longer held.
pub async fn since_recovers_only_a_gap_still_held_in_the_same_epoch(cluster: &dyn Cluster) {
    let (broker, _) = started(cluster, "n1").await;
    let epoch = publish_n(&*broker, "r", 5).await;

    // Another epoch: not recovered, nothing returned, the room's position given.
    let other = broker
        .history("r", since(1, "not-the-epoch"))
        .await
        .unwrap();
    assert!(!other.recovered);
    assert!(other.messages.is_empty());
    assert_eq!(
        other.position,
        StreamPosition {
            offset: 5,
            epoch: epoch.clone()
        }
    );

    // Offset 0 in an epoch of this generation (such as the unstored one a room without state
    // answers) recovers from the room's first message.
    let unstored = broker.position("elsewhere").await.unwrap().epoch;
    let zero = broker.history("r", since(0, &unstored)).await.unwrap();
    assert!(zero.recovered);
    assert_eq!(offsets(&zero), vec![1, 2, 3, 4, 5]);

    // An epoch of another generation: a whole epoch may have been lost since.
    let foreign = broker
        .history("r", since(0, "not-the-epoch"))
        .await
        .unwrap();
    assert!(!foreign.recovered);
    assert!(foreign.messages.is_empty());

    // Beyond the room's position.
    for offset in [6, u64::MAX] {
        let future = broker.history("r", since(offset, &epoch)).await.unwrap();
        assert!(!future.recovered);
        assert!(future.messages.is_empty());
        assert_eq!(future.position.offset, 5);
    }

    // Only 3..=5 held: resuming after 1 (or from nothing) misses 2; after 2 misses nothing.
    cluster.trim_history("r", 3).await;
    assert_eq!(
        offsets(&broker.history("r", newest(None)).await.unwrap()),
        vec![3, 4, 5]
    );
    let gap = broker.history("r", since(1, &epoch)).await.unwrap();
    assert!(!gap.recovered);
    let zero = broker.history("r", since(0, &epoch)).await.unwrap();
    assert!(!zero.recovered);
    let whole = broker.history("r", since(2, &epoch)).await.unwrap();
    assert!(whole.recovered);
    assert_eq!(offsets(&whole), vec![3, 4, 5]);
}

/// Room messages reach a node only while it subscribes to the room, once however often it
/// subscribed, in offset order, wherever they were published. An unsubscribe may take effect
/// after it returns (a broker may send it on without waiting), but no later than a
/// `subscribe_room` of the same broker that returns after it.
pub async fn room_messages_reach_only_subscribed_nodes(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;

    n1.subscribe_room("r").await.unwrap();
    n2.subscribe_room("b2").await.unwrap();
    // Published from n2, which does not subscribe: only n1 receives it.
    let message = n2
        .publish("r", json!({"a": 1}), Some(sender("bob", "s9")))
        .await
        .unwrap();
    assert_eq!(
        rec1.take_exactly(1, "n1 subscribed").await,
        vec![Event::Room((*message).clone())]
    );
    // Another room is not delivered to a node subscribed to "r".
    n2.publish("other", json!(0), None).await.unwrap();
    barrier(&*n2, &rec2, "b2").await;
    assert!(rec1.take().is_empty());

    n2.subscribe_room("r").await.unwrap();
    // Subscribing twice does not double delivery.
    n2.subscribe_room("r").await.unwrap();
    for i in 0..20 {
        let publisher = if i % 2 == 0 { &n1 } else { &n2 };
        publisher.publish("r", json!(i), None).await.unwrap();
    }
    let expected: Vec<u64> = (2..=21).collect();
    assert_eq!(room_offsets(&rec1.take_exactly(20, "n1").await), expected);
    assert_eq!(room_offsets(&rec2.take_exactly(20, "n2").await), expected);

    n1.unsubscribe_room("r").await.unwrap();
    // Unsubscribing a room not subscribed is harmless.
    n1.unsubscribe_room("never").await.unwrap();
    n1.subscribe_room("b1").await.unwrap();
    n1.publish("r", json!(22), None).await.unwrap();
    assert_eq!(room_offsets(&rec2.take_exactly(1, "n2 still").await), [22]);
    barrier(&*n2, &rec1, "b1").await;
    assert!(rec1.take().is_empty());

    n2.unsubscribe_room("r").await.unwrap();
    n2.unsubscribe_room("r").await.unwrap();
    n2.subscribe_room("b2-again").await.unwrap();
    n1.publish("r", json!(23), None).await.unwrap();
    barrier(&*n1, &rec2, "b2").await;
    assert!(rec2.take().is_empty());
}

/// `send` counts the user's registered sessions and reaches each node hosting one, once.
pub async fn send_reaches_the_nodes_of_the_users_sessions(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    let (n3, rec3) = started(cluster, "n3").await;
    n1.register_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n1.register_session(&session("alice", "s2", "n1"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s3", "n2"))
        .await
        .unwrap();
    n3.register_session(&session("bob", "s4", "n3"))
        .await
        .unwrap();

    let message = DirectMessage {
        user: "alice".into(),
        data: json!({"hello": true}),
        from: Some(sender("bob", "s4")),
        seq: None,
    };
    assert_eq!(n3.send(message.clone()).await.unwrap(), 3);
    assert_eq!(
        rec1.take_exactly(1, "n1").await,
        vec![Event::Direct(message.clone())]
    );
    assert_eq!(
        rec2.take_exactly(1, "n2").await,
        vec![Event::Direct(message.clone())]
    );

    let unknown = DirectMessage {
        user: "carol".into(),
        data: json!(0),
        from: None,
        seq: None,
    };
    assert_eq!(n1.send(unknown).await.unwrap(), 0);

    // Once every session of alice on n1 is gone, n1 is no longer reached.
    n1.unregister_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n1.unregister_session(&session("alice", "s2", "n1"))
        .await
        .unwrap();
    assert_eq!(n3.send(message.clone()).await.unwrap(), 1);
    assert_eq!(
        rec2.take_exactly(1, "n2 again").await,
        vec![Event::Direct(message.clone())]
    );
    let to_bob = DirectMessage {
        user: "bob".into(),
        data: json!("bob"),
        from: None,
        seq: None,
    };
    assert_eq!(n1.send(to_bob.clone()).await.unwrap(), 1);
    assert_eq!(
        rec3.take_exactly(1, "n3").await,
        vec![Event::Direct(to_bob)]
    );
    n1.subscribe_room("b1").await.unwrap();
    barrier(&*n3, &rec1, "b1").await;
    assert!(rec1.take().is_empty());
}

/// Presence lists a room's members by session, the same from every node, and joins and leaves
/// are told to the room's subscribers only; leaving as a non-member tells nothing.
pub async fn presence_lists_members_and_tells_subscribers(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    n1.subscribe_room("r").await.unwrap();
    n2.subscribe_room("b2").await.unwrap();
    assert!(n1.presence("r").await.unwrap().is_empty());

    let alice = Member {
        info: Some(json!({"name": "Alice"})),
        ..member("alice", "s2")
    };
    let bob = member("bob", "s1");
    n2.join_presence("r", &alice).await.unwrap();
    assert_eq!(
        rec1.take_exactly(1, "alice joins").await,
        vec![presence_event(PresenceChange::Join, "r", "alice", "s2")]
    );
    n1.join_presence("r", &bob).await.unwrap();
    assert_eq!(
        rec1.take_exactly(1, "bob joins").await,
        vec![presence_event(PresenceChange::Join, "r", "bob", "s1")]
    );

    let members = vec![bob.clone(), alice.clone()];
    assert_eq!(n1.presence("r").await.unwrap(), members);
    assert_eq!(n2.presence("r").await.unwrap(), members);
    assert!(n1.presence("other").await.unwrap().is_empty());

    // Leaving a room one is not in, or as an unknown session: no event, no change.
    n2.leave_presence("r", &member("carol", "s9"))
        .await
        .unwrap();
    n2.leave_presence("other", &alice).await.unwrap();
    assert_eq!(n1.presence("r").await.unwrap(), members);

    n2.leave_presence("r", &alice).await.unwrap();
    assert_eq!(
        rec1.take_exactly(1, "alice leaves").await,
        vec![presence_event(PresenceChange::Leave, "r", "alice", "s2")]
    );
    assert_eq!(n2.presence("r").await.unwrap(), vec![bob.clone()]);
    barrier(&*n1, &rec2, "b2").await;
    assert!(rec2.take().is_empty(), "n2 does not subscribe to r");

    // After unsubscribing, n1 hears nothing more; n2 hears once subscribed.
    n1.unsubscribe_room("r").await.unwrap();
    n1.subscribe_room("b1").await.unwrap();
    n2.subscribe_room("r").await.unwrap();
    n1.leave_presence("r", &bob).await.unwrap();
    assert_eq!(
        rec2.take_exactly(1, "bob leaves").await,
        vec![presence_event(PresenceChange::Leave, "r", "bob", "s1")]
    );
    assert!(n1.presence("r").await.unwrap().is_empty());
    barrier(&*n2, &rec1, "b1").await;
    assert!(rec1.take().is_empty());
}

/// A broadcast reaches every started node and counts them.
pub async fn broadcast_reaches_every_started_node(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (_n2, rec2) = started(cluster, "n2").await;
    let (_n3, rec3) = started(cluster, "n3").await;

    assert_eq!(n1.broadcast(json!({"news": 1})).await.unwrap(), 3);
    for recorder in [&rec1, &rec2, &rec3] {
        assert_eq!(
            recorder.take_exactly(1, "broadcast").await,
            vec![Event::Broadcast(json!({"news": 1}))]
        );
    }
}

/// `disconnect` reaches the nodes hosting the user and counts the user's sessions.
pub async fn disconnect_reaches_the_nodes_of_the_users_sessions(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    n1.register_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s2", "n2"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s3", "n2"))
        .await
        .unwrap();

    assert_eq!(n1.disconnect("alice", 4000, "kicked").await.unwrap(), 3);
    let expected = Event::Disconnect {
        user: "alice".into(),
        code: 4000,
        reason: "kicked".into(),
    };
    assert_eq!(rec1.take_exactly(1, "n1").await, vec![expected.clone()]);
    assert_eq!(rec2.take_exactly(1, "n2").await, vec![expected]);
    assert_eq!(n1.disconnect("nobody", 1000, "x").await.unwrap(), 0);
}

/// Heartbeats list a node with its latest figures; `deregister_node` removes the node, its
/// sessions and its presence.
pub async fn heartbeat_lists_nodes_and_deregister_removes_them(cluster: &dyn Cluster) {
    let (n1, _) = started_silent(cluster, "n1").await;
    let (n2, _) = started_silent(cluster, "n2").await;
    assert!(n1.is_healthy());
    // A node that never sent a heartbeat is not listed.
    assert!(n1.nodes().await.unwrap().is_empty());

    n1.heartbeat(&node_info("n1", 3, 10)).await.unwrap();
    assert_eq!(n2.nodes().await.unwrap(), vec![node_info("n1", 3, 10)]);
    n2.heartbeat(&node_info("n2", 0, 11)).await.unwrap();
    // A later heartbeat replaces the earlier figures.
    n1.heartbeat(&node_info("n1", 7, 12)).await.unwrap();
    let mut nodes = n1.nodes().await.unwrap();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(nodes, vec![node_info("n1", 7, 12), node_info("n2", 0, 11)]);

    n1.register_session(&session("bob", "s3", "n1"))
        .await
        .unwrap();
    n1.join_presence("r", &member("bob", "s3")).await.unwrap();
    n2.join_presence("r", &member("alice", "s2")).await.unwrap();

    n1.deregister_node("n1").await.unwrap();
    assert_eq!(n2.nodes().await.unwrap(), vec![node_info("n2", 0, 11)]);
    let to_bob = DirectMessage {
        user: "bob".into(),
        data: json!(1),
        from: None,
        seq: None,
    };
    assert_eq!(n2.send(to_bob).await.unwrap(), 0);
    assert_eq!(n2.presence("r").await.unwrap(), vec![member("alice", "s2")]);
}

/// A plain send to `user` from `broker`, awaited at `recorder` (a node hosting one of the user's
/// sessions): every direct message sent to the user earlier has then arrived too, so a check that
/// something did not arrive after this is not premature.
async fn direct_barrier(broker: &dyn Broker, recorder: &Recorder, user: &str) {
    let message = direct(user, json!("barrier"));
    broker.send(message.clone()).await.unwrap();
    let events = recorder.take_exactly(1, "direct barrier").await;
    assert_eq!(events, vec![Event::Direct(message)]);
}

fn direct(user: &str, data: Value) -> DirectMessage {
    DirectMessage {
        user: user.to_owned(),
        data,
        from: None,
        seq: None,
    }
}

fn seqs(entries: &[InboxEntry]) -> Vec<u64> {
    entries.iter().map(|entry| entry.seq).collect()
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as u64
}

/// A persisted send appends to the user's inbox under the next seq (1, 2, 3 in one epoch) and
/// reaches every node hosting the user's sessions with that seq, in seq order; the inbox holds
/// what was sent, from whom and when. A user who never had one has an inbox at seq 0 in an epoch
/// of the current generation, and reading it stores nothing.
pub async fn persisted_sends_number_the_inbox_and_deliver_with_seq(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    let (n3, _) = started(cluster, "n3").await;
    n1.register_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s2", "n2"))
        .await
        .unwrap();

    let empty = n3.inbox("alice", 0, 100, 1 << 20).await.unwrap();
    assert_eq!((empty.position.seq, empty.position.acked), (0, 0));
    assert!(empty.pending.is_empty() && !empty.more);

    let before = unix_millis();
    let mut epoch = None;
    let mut sent = Vec::new();
    for i in 1..=3u64 {
        let message = DirectMessage {
            from: Some(sender("bob", "s9")),
            ..direct("alice", json!({ "n": i }))
        };
        let answer = n3.send_persisted(message.clone(), None).await.unwrap();
        let epoch = epoch.get_or_insert_with(|| answer.epoch.clone());
        assert_eq!(
            answer,
            Sent {
                sessions: 2,
                seq: i,
                epoch: epoch.clone(),
                duplicate: false,
                dropped: 0,
            }
        );
        sent.push(Event::Direct(DirectMessage {
            seq: Some(i),
            ..message
        }));
    }
    let epoch = epoch.expect("an epoch");
    assert!(
        same_generation(&empty.position.epoch, &epoch),
        "an inbox without state is in the current generation: {} then {epoch}",
        empty.position.epoch
    );
    assert_eq!(rec1.take_exactly(3, "n1").await, sent);
    assert_eq!(rec2.take_exactly(3, "n2").await, sent);

    let inbox = n1.inbox("alice", 0, 100, 1 << 20).await.unwrap();
    assert_eq!(
        (
            inbox.position.seq,
            inbox.position.acked,
            &inbox.position.epoch
        ),
        (3, 0, &epoch)
    );
    assert!(!inbox.more);
    assert_eq!(seqs(&inbox.pending), vec![1, 2, 3]);
    let after = unix_millis();
    for (i, entry) in inbox.pending.iter().enumerate() {
        assert_eq!(entry.data, json!({ "n": i + 1 }));
        assert_eq!(entry.from, Some(sender("bob", "s9")));
        // Stamped by the broker's clock (Redis's, for Redis), allowed a little skew.
        assert!(
            entry.at + 5_000 >= before && entry.at <= after + 5_000,
            "stored at {} outside {before}..{after}",
            entry.at
        );
    }

    // A user without sessions gets an inbox all the same; nobody is reached.
    let to_carol = n3
        .send_persisted(direct("carol", json!("later")), None)
        .await
        .unwrap();
    assert_eq!((to_carol.sessions, to_carol.seq), (0, 1));
    let carol = n2.inbox("carol", 0, 100, 1 << 20).await.unwrap();
    assert_eq!(seqs(&carol.pending), vec![1]);
    assert_eq!(carol.position.epoch, to_carol.epoch);
    direct_barrier(&*n3, &rec1, "alice").await;
}

/// An inbox page holds the messages above both `after` and the acked seq, oldest first, stopping
/// at `limit` or before its payloads pass `max_bytes` (at least one message), with `more`.
pub async fn inbox_pages_after_the_acked_seq(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let (n2, _) = started(cluster, "n2").await;
    let text = "x".repeat(1000);
    for i in 1..=5u64 {
        let sent = n1
            .send_persisted(direct("alice", json!({ "n": i, "text": text })), None)
            .await
            .unwrap();
        assert_eq!(sent.seq, i);
    }
    let Acked::Done(position) = n2.ack("alice", 2).await.unwrap() else {
        panic!("ack 2 of 5 refused")
    };
    assert_eq!((position.seq, position.acked), (5, 2));

    let page = |after: u64, limit: usize, max_bytes: usize| {
        let n2 = n2.clone();
        async move { n2.inbox("alice", after, limit, max_bytes).await.unwrap() }
    };
    let all = page(0, 100, 1 << 20).await;
    assert_eq!((seqs(&all.pending), all.more), (vec![3, 4, 5], false));
    assert_eq!((all.position.seq, all.position.acked), (5, 2));
    let after = page(3, 100, 1 << 20).await;
    assert_eq!((seqs(&after.pending), after.more), (vec![4, 5], false));
    let counted = page(0, 2, 1 << 20).await;
    assert_eq!((seqs(&counted.pending), counted.more), (vec![3, 4], true));
    let read_on = page(4, 2, 1 << 20).await;
    assert_eq!((seqs(&read_on.pending), read_on.more), (vec![5], false));
    // Each payload is a little over 1000 bytes as stored.
    let by_bytes = page(0, 100, 2500).await;
    assert_eq!((seqs(&by_bytes.pending), by_bytes.more), (vec![3, 4], true));
    let at_least_one = page(0, 100, 1).await;
    assert_eq!(
        (seqs(&at_least_one.pending), at_least_one.more),
        (vec![3], true)
    );
    let none = page(5, 100, 1 << 20).await;
    assert!(none.pending.is_empty() && !none.more);
}

/// An ack is cumulative, per user, seen from every node: acked becomes max(acked, seq) and never
/// goes back; an ack beyond the inbox's seq records nothing and says where the inbox is.
pub async fn ack_is_cumulative_never_goes_back_and_not_beyond_seq(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let (n2, _) = started(cluster, "n2").await;
    // An inbox without state is at seq 0: acking 0 is fine, anything more is beyond it.
    assert!(matches!(
        n1.ack("alice", 0).await.unwrap(),
        Acked::Done(position) if (position.seq, position.acked) == (0, 0)
    ));
    assert!(matches!(
        n1.ack("alice", 1).await.unwrap(),
        Acked::BeyondSeq(position) if (position.seq, position.acked) == (0, 0)
    ));
    let mut epoch = String::new();
    for _ in 0..3 {
        epoch = n1
            .send_persisted(direct("alice", json!("m")), None)
            .await
            .unwrap()
            .epoch;
    }
    let at = |seq: u64, acked: u64| crate::InboxPosition {
        seq,
        acked,
        epoch: epoch.clone(),
    };
    assert_eq!(n1.ack("alice", 2).await.unwrap(), Acked::Done(at(3, 2)));
    assert_eq!(n2.ack("alice", 1).await.unwrap(), Acked::Done(at(3, 2)));
    assert_eq!(
        n2.ack("alice", 4).await.unwrap(),
        Acked::BeyondSeq(at(3, 2))
    );
    assert_eq!(
        seqs(&n2.inbox("alice", 0, 10, 1 << 20).await.unwrap().pending),
        vec![3]
    );
    assert_eq!(n2.ack("alice", 3).await.unwrap(), Acked::Done(at(3, 3)));
    let inbox = n1.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert!(inbox.pending.is_empty());
    assert_eq!(inbox.position, at(3, 3));
    // Another user's inbox is untouched.
    assert!(matches!(
        n1.ack("bob", 1).await.unwrap(),
        Acked::BeyondSeq(position) if position.seq == 0
    ));
    // Sending on continues the seq; acked stays.
    let next = n2
        .send_persisted(direct("alice", json!("m")), None)
        .await
        .unwrap();
    assert_eq!((next.seq, next.epoch.as_str()), (4, epoch.as_str()));
    let inbox = n1.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert_eq!((seqs(&inbox.pending), inbox.position), (vec![4], at(4, 3)));
}

/// Beyond the inbox size (3 here) an append drops the oldest unacknowledged messages and says
/// how many; acknowledged ones are not counted, since they are no longer held.
pub async fn the_inbox_size_drops_the_oldest_unacknowledged(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let send = |n: u64| {
        let n1 = n1.clone();
        async move {
            n1.send_persisted(direct("alice", json!(n)), None)
                .await
                .unwrap()
        }
    };
    for n in 1..=3 {
        assert_eq!(send(n).await.dropped, 0);
    }
    let fourth = send(4).await;
    assert_eq!((fourth.seq, fourth.dropped), (4, 1));
    let inbox = n1.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert_eq!(seqs(&inbox.pending), vec![2, 3, 4]);
    assert_eq!(
        inbox
            .pending
            .iter()
            .map(|entry| entry.data.clone())
            .collect::<Vec<_>>(),
        vec![json!(2), json!(3), json!(4)]
    );
    assert!(matches!(n1.ack("alice", 2).await.unwrap(), Acked::Done(_)));
    assert_eq!(send(5).await.dropped, 0, "2 was acked: 3, 4, 5 fit");
    assert_eq!(send(6).await.dropped, 1);
    let inbox = n1.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert_eq!(seqs(&inbox.pending), vec![4, 5, 6]);
    assert_eq!((inbox.position.seq, inbox.position.acked), (6, 2));
}

/// Inbox messages older than the inbox TTL (5 s here) are no longer returned; an inbox untouched
/// for that long is forgotten, and starts over at seq 0 in a new epoch.
pub async fn inbox_messages_expire_after_the_ttl(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let first = n1
        .send_persisted(direct("alice", json!("old")), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = n1
        .send_persisted(direct("alice", json!("new")), None)
        .await
        .unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    // Past the TTL of the first, within the TTL of the second.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let inbox = n1.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert_eq!(seqs(&inbox.pending), vec![2]);
    assert_eq!(inbox.pending[0].data, json!("new"));
    assert_eq!(
        (inbox.position.seq, &inbox.position.epoch),
        (2, &first.epoch)
    );

    // Reading is no activity: 5 s after the last send, the inbox is gone.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let gone = n1.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert!(gone.pending.is_empty());
    assert_eq!((gone.position.seq, gone.position.acked), (0, 0));
    let again = n1
        .send_persisted(direct("alice", json!("again")), None)
        .await
        .unwrap();
    assert_eq!(again.seq, 1);
    assert_ne!(
        again.epoch, first.epoch,
        "a seq is never reused in one epoch"
    );
}

/// A repeat of a keyed publish to the same room within the window publishes nothing: it answers
/// the first message with `duplicate`, from any node. The same key in another room, or another
/// key, is a new publish.
pub async fn a_keyed_publish_is_done_once_per_room_and_key(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    n2.subscribe_room("r").await.unwrap();
    let first = n1
        .publish_keyed("r", json!("once"), Some(sender("alice", "s1")), "k1")
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert_eq!(
        (first.message.offset, &first.message.data),
        (1, &json!("once"))
    );
    let repeat = n2
        .publish_keyed("r", json!("twice"), Some(sender("alice", "s2")), "k1")
        .await
        .unwrap();
    assert!(repeat.duplicate);
    assert_eq!(repeat.message, first.message);
    assert_eq!(
        rec2.take_exactly(1, "the first publish").await,
        vec![Event::Room((*first.message).clone())]
    );
    assert_eq!(n1.position("r").await.unwrap().offset, 1);

    let other_key = n1.publish_keyed("r", json!(2), None, "k2").await.unwrap();
    assert_eq!((other_key.duplicate, other_key.message.offset), (false, 2));
    let other_room = n1.publish_keyed("r2", json!(1), None, "k1").await.unwrap();
    assert_eq!(
        (other_room.duplicate, other_room.message.offset),
        (false, 1)
    );
    let plain = n1.publish("r", json!(3), None).await.unwrap();
    assert_eq!(plain.offset, 3);
    let events = rec2
        .take_exactly(2, "the other key and the plain publish")
        .await;
    assert_eq!(room_offsets(&events), vec![2, 3]);
    barrier(&*n1, &rec2, "r").await;
}

/// A repeat of a keyed persisted send to the same user within the window stores and delivers
/// nothing: it answers the first result with `duplicate` (and nothing dropped). The same key for
/// another user, or as a room publish key, is new.
pub async fn a_keyed_persisted_send_is_done_once_per_user_and_key(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, _) = started(cluster, "n2").await;
    n1.register_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    let first = n2
        .send_persisted(direct("alice", json!("once")), Some("k1"))
        .await
        .unwrap();
    assert_eq!((first.seq, first.sessions, first.duplicate), (1, 1, false));
    let repeat = n1
        .send_persisted(direct("alice", json!("twice")), Some("k1"))
        .await
        .unwrap();
    assert_eq!(
        repeat,
        Sent {
            duplicate: true,
            ..first.clone()
        }
    );
    assert_eq!(
        rec1.take_exactly(1, "the first send").await,
        vec![Event::Direct(DirectMessage {
            seq: Some(1),
            ..direct("alice", json!("once"))
        })]
    );
    direct_barrier(&*n2, &rec1, "alice").await;
    let inbox = n2.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert_eq!(seqs(&inbox.pending), vec![1]);
    assert_eq!(inbox.position.seq, 1);

    let other_user = n2
        .send_persisted(direct("bob", json!(1)), Some("k1"))
        .await
        .unwrap();
    assert_eq!((other_user.seq, other_user.duplicate), (1, false));
    let room = n2
        .publish_keyed("alice", json!(1), None, "k1")
        .await
        .unwrap();
    assert!(!room.duplicate, "room and user keys are apart");
    let other_key = n2
        .send_persisted(direct("alice", json!(2)), Some("k2"))
        .await
        .unwrap();
    assert_eq!((other_key.seq, other_key.duplicate), (2, false));
}

/// A key is remembered for the idempotency window (2 s here) only: a repeat after it is new.
pub async fn a_key_is_new_again_after_the_window(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let publish = n1.publish_keyed("r", json!(1), None, "k").await.unwrap();
    let send = n1
        .send_persisted(direct("alice", json!(1)), Some("k"))
        .await
        .unwrap();
    assert!(
        n1.publish_keyed("r", json!(1), None, "k")
            .await
            .unwrap()
            .duplicate
    );
    assert!(
        n1.send_persisted(direct("alice", json!(1)), Some("k"))
            .await
            .unwrap()
            .duplicate
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let publish_again = n1.publish_keyed("r", json!(2), None, "k").await.unwrap();
    assert_eq!(
        (publish_again.duplicate, publish_again.message.offset),
        (false, publish.message.offset + 1)
    );
    let send_again = n1
        .send_persisted(direct("alice", json!(2)), Some("k"))
        .await
        .unwrap();
    assert_eq!(
        (send_again.duplicate, send_again.seq),
        (false, send.seq + 1)
    );
}

/// Frames forwarded with a link's key reach the handler of the node holding the session, and
/// only that node, in the order forwarded, from another node or from the same one. A forward
/// without frames only checks: `Delivered`, and nothing reaches the handler.
pub async fn forwarded_frames_reach_the_node_holding_the_session(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    n2.register_link(&link("f1", "n2", "k1")).await.unwrap();
    n1.register_link(&link("f2", "n1", "k2")).await.unwrap();

    assert_eq!(
        n1.forward("f1", "k1", texts(&[r#"{"type":"ping"}"#, "b"]))
            .await
            .unwrap(),
        Forwarded::Delivered
    );
    assert_eq!(
        n1.forward("f1", "k1", texts(&["c"])).await.unwrap(),
        Forwarded::Delivered
    );
    assert_eq!(
        n2.forward("f1", "k1", texts(&["d"])).await.unwrap(),
        Forwarded::Delivered,
        "a forward from the session's own node"
    );
    assert_eq!(
        rec2.take_exactly(3, "frames in order").await,
        vec![
            frames_event("f1", &[r#"{"type":"ping"}"#, "b"]),
            frames_event("f1", &["c"]),
            frames_event("f1", &["d"]),
        ]
    );

    // Without frames: the session is there, and nothing is handed over.
    assert_eq!(
        n1.forward("f1", "k1", Vec::new()).await.unwrap(),
        Forwarded::Delivered
    );
    assert_eq!(
        n2.forward("f2", "k2", Vec::new()).await.unwrap(),
        Forwarded::Delivered
    );
    frames_barrier(&*n1, &rec2, "f1", "k1", &["e"]).await;
    // n1's session gets its own frames, and none of n2's.
    frames_barrier(&*n2, &rec1, "f2", "k2", &["f"]).await;
    frames_barrier(&*n1, &rec1, "f2", "k2", &["g"]).await;
    assert!(rec1.take().is_empty());
    assert!(rec2.take().is_empty());
}

/// A wrong key answers `WrongKey`, a session without a link `UnknownSession`; neither hands
/// anything over.
pub async fn a_wrong_key_or_an_unknown_session_delivers_nothing(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    n2.register_link(&link("f1", "n2", "k1")).await.unwrap();

    for frames in [texts(&["bad"]), Vec::new()] {
        assert_eq!(
            n1.forward("f1", "k2", frames.clone()).await.unwrap(),
            Forwarded::WrongKey
        );
        assert_eq!(
            n1.forward("f1", "", frames.clone()).await.unwrap(),
            Forwarded::WrongKey
        );
        assert_eq!(
            n1.forward("nobody", "k1", frames.clone()).await.unwrap(),
            Forwarded::UnknownSession
        );
        assert_eq!(
            n2.forward("nobody", "k1", frames).await.unwrap(),
            Forwarded::UnknownSession
        );
    }
    frames_barrier(&*n1, &rec2, "f1", "k1", &["good"]).await;
    assert!(rec2.take().is_empty());
}

/// After `unregister_link` the session is unknown (the node's other links stay); unregistering
/// twice is harmless, and registering again makes it reachable again.
pub async fn an_unregistered_link_is_an_unknown_session(cluster: &dyn Cluster) {
    let (n1, _) = started(cluster, "n1").await;
    let (n2, rec2) = started(cluster, "n2").await;
    n2.register_link(&link("f1", "n2", "k1")).await.unwrap();
    n2.register_link(&link("f2", "n2", "k2")).await.unwrap();
    n2.unregister_link(&link("f1", "n2", "k1")).await.unwrap();

    assert_eq!(
        n1.forward("f1", "k1", texts(&["late"])).await.unwrap(),
        Forwarded::UnknownSession
    );
    assert_eq!(
        n1.forward("f1", "k1", Vec::new()).await.unwrap(),
        Forwarded::UnknownSession
    );
    frames_barrier(&*n1, &rec2, "f2", "k2", &["other"]).await;
    assert!(rec2.take().is_empty());

    n2.unregister_link(&link("f1", "n2", "k1")).await.unwrap();
    n2.unregister_link(&link("never", "n2", "k")).await.unwrap();
    n2.register_link(&link("f1", "n2", "k3")).await.unwrap();
    assert_eq!(
        n1.forward("f1", "k1", Vec::new()).await.unwrap(),
        Forwarded::WrongKey
    );
    frames_barrier(&*n1, &rec2, "f1", "k3", &["again"]).await;
}

/// A node that deregistered takes its links with it: its sessions are unknown; other nodes'
/// links stay.
pub async fn the_links_of_a_deregistered_node_are_unknown_sessions(cluster: &dyn Cluster) {
    let (n1, rec1) = started(cluster, "n1").await;
    let (n2, _) = started(cluster, "n2").await;
    n2.register_link(&link("f1", "n2", "k1")).await.unwrap();
    n1.register_link(&link("f2", "n1", "k2")).await.unwrap();

    n2.deregister_node("n2").await.unwrap();
    assert_eq!(
        n1.forward("f1", "k1", texts(&["gone"])).await.unwrap(),
        Forwarded::UnknownSession
    );
    assert_eq!(
        n1.forward("f1", "k1", Vec::new()).await.unwrap(),
        Forwarded::UnknownSession
    );
    frames_barrier(&*n1, &rec1, "f2", "k2", &["still"]).await;
}

/// Defines one `#[tokio::test]` per conformance function, each on a cluster made by `$cluster`,
/// a function (or closure) taking the test's [`Limits`] to an async expression evaluating to a
/// value that implements [`Cluster`].
#[macro_export]
macro_rules! conformance_tests {
    ($cluster:expr) => {
        $crate::conformance_tests!(@each $cluster;
            publish_assigns_offsets_in_one_epoch,
            a_room_without_state_is_at_offset_zero_and_stores_nothing,
            history_pages_by_count,
            history_pages_by_bytes_and_says_more,
            since_recovers_only_a_gap_still_held_in_the_same_epoch,
            room_messages_reach_only_subscribed_nodes,
            send_reaches_the_nodes_of_the_users_sessions,
            presence_lists_members_and_tells_subscribers,
            broadcast_reaches_every_started_node,
            disconnect_reaches_the_nodes_of_the_users_sessions,
            heartbeat_lists_nodes_and_deregister_removes_them,
            persisted_sends_number_the_inbox_and_deliver_with_seq,
            inbox_pages_after_the_acked_seq,
            ack_is_cumulative_never_goes_back_and_not_beyond_seq,
            the_inbox_size_drops_the_oldest_unacknowledged(SMALL_INBOX),
            inbox_messages_expire_after_the_ttl(SHORT_TTL),
            a_keyed_publish_is_done_once_per_room_and_key,
            a_keyed_persisted_send_is_done_once_per_user_and_key,
            a_key_is_new_again_after_the_window(SHORT_WINDOW),
            forwarded_frames_reach_the_node_holding_the_session,
            a_wrong_key_or_an_unknown_session_delivers_nothing,
            an_unregistered_link_is_an_unknown_session,
            the_links_of_a_deregistered_node_are_unknown_sessions,
        );
    };
    (@each $cluster:expr; $($name:ident $(($limits:ident))?),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let limits = $crate::conformance::Limits::given(
                    &[$($crate::conformance::Limits::$limits)?],
                );
                let cluster = ($cluster)(limits).await;
                $crate::conformance::$name(&cluster).await;
            }
        )*
    };
}
