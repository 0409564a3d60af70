use super::*;

use serde_json::json;

/// Everything a node received from its broker, in arrival order.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Room(RoomMessage),
    Presence(PresenceEvent),
    Direct(DirectMessage),
    Broadcast(Value),
    Disconnect {
        user: String,
        code: u16,
        reason: String,
    },
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    /// Every event received so far; the list is emptied.
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock())
    }

    fn is_empty(&self) -> bool {
        self.events.lock().is_empty()
    }

    /// The offsets of the room messages received for `room`, in arrival order.
    fn room_offsets(&self, room: &str) -> Vec<u64> {
        self.events
            .lock()
            .iter()
            .filter_map(|event| match event {
                Event::Room(message) if message.room == room => Some(message.offset),
                _ => None,
            })
            .collect()
    }
}

impl BrokerHandler for Recorder {
    fn room_message(&self, message: Arc<RoomMessage>) {
        self.events.lock().push(Event::Room((*message).clone()));
    }

    fn presence(&self, event: PresenceEvent) {
        self.events.lock().push(Event::Presence(event));
    }

    fn direct(&self, message: Arc<DirectMessage>) {
        self.events.lock().push(Event::Direct((*message).clone()));
    }

    fn broadcast(&self, data: Arc<Value>) {
        self.events.lock().push(Event::Broadcast((*data).clone()));
    }

    fn frames(&self, _session: &str, _frames: Vec<String>) {}

    fn disconnect(&self, user: &str, code: u16, reason: &str) {
        self.events.lock().push(Event::Disconnect {
            user: user.to_owned(),
            code,
            reason: reason.to_owned(),
        });
    }
}

fn config(history_size: usize, history_ttl: Duration, stream_ttl: Duration) -> MemoryConfig {
    MemoryConfig {
        history_size,
        history_ttl,
        stream_ttl,
        ..MemoryConfig::default()
    }
}

/// A node on `bus`, started with a fresh recorder.
async fn started(bus: &MemoryBus, id: &str) -> (MemoryBroker, Arc<Recorder>) {
    let broker = bus.broker(id);
    let recorder = Arc::new(Recorder::default());
    broker.start(recorder.clone()).await.unwrap();
    (broker, recorder)
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

fn sender(user: &str, session: &str) -> Sender {
    Sender {
        user: user.to_owned(),
        session: session.to_owned(),
    }
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

fn offsets(history: &History) -> Vec<u64> {
    history
        .messages
        .iter()
        .map(|message| message.offset)
        .collect()
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
async fn publish_n(broker: &MemoryBroker, room: &str, n: u64) -> String {
    let mut epoch = None;
    for i in 1..=n {
        let message = broker.publish(room, json!({ "n": i }), None).await.unwrap();
        epoch.get_or_insert_with(|| message.epoch.clone());
        assert_eq!(epoch.as_deref(), Some(message.epoch.as_str()));
    }
    epoch.expect("published at least one message")
}

/// Lets spawned tasks (the sweeper) run on the current-thread test runtime.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

// ----- offsets and epochs -----------------------------------------------------------------------

#[tokio::test]
async fn wipe_history_changes_the_epoch_and_restarts_offsets() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let broker = bus.broker("n1");
    let old_epoch = publish_n(&broker, "r", 3).await;
    let untouched_before = broker.position("never-published").await.unwrap();

    bus.wipe_history();

    let position = broker.position("r").await.unwrap();
    assert_eq!(position.offset, 0);
    assert_ne!(position.epoch, old_epoch);

    // A client resuming from the old epoch learns that it missed something.
    let history = broker.history("r", since(3, &old_epoch)).await.unwrap();
    assert!(!history.recovered);
    assert!(history.messages.is_empty());
    assert_eq!(history.position.offset, 0);
    assert_ne!(history.position.epoch, old_epoch);
    assert!(
        broker
            .history("r", newest(None))
            .await
            .unwrap()
            .messages
            .is_empty()
    );

    // The room's new epoch is made by its first publish after the wipe.
    let message = broker.publish("r", json!("after"), None).await.unwrap();
    assert_eq!(message.offset, 1);
    assert_ne!(message.epoch, old_epoch);

    // A room never published to has no stored epoch: it is not answered with the old one.
    assert_ne!(
        broker.position("never-published").await.unwrap().epoch,
        untouched_before.epoch
    );
}

// ----- room delivery ----------------------------------------------------------------------------

#[tokio::test]
async fn publish_reaches_only_subscribed_nodes() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (n2, rec2) = started(&bus, "n2").await;

    n1.subscribe_room("r").await.unwrap();
    // Published from n2, which does not subscribe: only n1 receives it.
    let message = n2
        .publish("r", json!({"a": 1}), Some(sender("bob", "s9")))
        .await
        .unwrap();
    assert_eq!(rec1.take(), vec![Event::Room((*message).clone())]);
    assert!(rec2.is_empty());

    // Another room is not delivered to a node subscribed to "r".
    n2.publish("other", json!(0), None).await.unwrap();
    assert!(rec1.is_empty());
    assert!(rec2.is_empty());

    n2.subscribe_room("r").await.unwrap();
    // Subscribing twice does not double delivery.
    n2.subscribe_room("r").await.unwrap();
    n1.publish("r", json!(2), None).await.unwrap();
    assert_eq!(rec1.room_offsets("r"), vec![2]);
    assert_eq!(rec2.room_offsets("r"), vec![2]);
    rec1.take();
    rec2.take();

    n1.unsubscribe_room("r").await.unwrap();
    n1.publish("r", json!(3), None).await.unwrap();
    assert!(rec1.is_empty());
    assert_eq!(rec2.room_offsets("r"), vec![3]);
    rec2.take();

    n2.unsubscribe_room("r").await.unwrap();
    // Unsubscribing a room not subscribed is harmless.
    n2.unsubscribe_room("r").await.unwrap();
    n1.unsubscribe_room("never").await.unwrap();
    n1.publish("r", json!(4), None).await.unwrap();
    assert!(rec1.is_empty());
    assert!(rec2.is_empty());
    assert!(!bus.state.subscriptions.contains_key("r"));
}

#[tokio::test]
async fn brokers_on_different_buses_do_not_see_each_other() {
    let bus_a = MemoryBus::new(MemoryConfig::default());
    let bus_b = MemoryBus::new(MemoryConfig::default());
    let (a, rec_a) = started(&bus_a, "n1").await;
    let (b, rec_b) = started(&bus_b, "n1").await;
    a.subscribe_room("r").await.unwrap();
    b.subscribe_room("r").await.unwrap();

    b.publish("r", json!(1), None).await.unwrap();
    assert!(rec_a.is_empty());
    assert_eq!(rec_b.room_offsets("r"), vec![1]);
    assert_eq!(a.position("r").await.unwrap().offset, 0);
    assert_eq!(b.broadcast(json!("x")).await.unwrap(), 1);
    assert!(rec_a.is_empty());
}

#[tokio::test]
async fn delivery_order_is_offset_order() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (n2, rec2) = started(&bus, "n2").await;
    n1.subscribe_room("r").await.unwrap();
    n2.subscribe_room("r").await.unwrap();

    for i in 0..50 {
        let publisher = if i % 2 == 0 { &n1 } else { &n2 };
        publisher.publish("r", json!(i), None).await.unwrap();
    }
    let expected: Vec<u64> = (1..=50).collect();
    assert_eq!(rec1.room_offsets("r"), expected);
    assert_eq!(rec2.room_offsets("r"), expected);
    let data: Vec<Value> = rec1
        .take()
        .into_iter()
        .map(|event| match event {
            Event::Room(message) => message.data,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(data, (0..50).map(|i| json!(i)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_are_delivered_in_offset_order() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let n2 = Arc::new(bus.broker("n2"));
    n1.subscribe_room("r").await.unwrap();
    n1.subscribe_room("q").await.unwrap();

    let mut tasks = Vec::new();
    for t in 0..8 {
        let broker = n2.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                let room = if (t + i) % 3 == 0 { "q" } else { "r" };
                broker.publish(room, json!([t, i]), None).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let r = rec1.room_offsets("r");
    let q = rec1.room_offsets("q");
    assert_eq!(r.len() + q.len(), 800);
    assert_eq!(r, (1..=r.len() as u64).collect::<Vec<_>>());
    assert_eq!(q, (1..=q.len() as u64).collect::<Vec<_>>());
    assert_eq!(n1.position("r").await.unwrap().offset, r.len() as u64);
    assert_eq!(n1.position("q").await.unwrap().offset, q.len() as u64);
}

// ----- history ----------------------------------------------------------------------------------

#[tokio::test]
async fn history_since_another_epoch_is_not_recovered() {
    let broker = MemoryBroker::new("n1", MemoryConfig::default());
    let epoch = publish_n(&broker, "r", 3).await;

    let history = broker
        .history("r", since(1, "not-the-epoch"))
        .await
        .unwrap();
    assert!(!history.recovered);
    assert!(history.messages.is_empty());
    assert_eq!(history.position, StreamPosition { offset: 3, epoch });

    // Offset 0 means "nothing seen": in any epoch of this generation (such as the unstored one
    // a room without state answers) it recovers from the room's first message while history
    // holds it, and not once it is gone.
    let unstored = broker.position("elsewhere").await.unwrap().epoch;
    let zero = broker.history("r", since(0, &unstored)).await.unwrap();
    assert!(zero.recovered);
    assert_eq!(offsets(&zero), vec![1, 2, 3]);

    // An epoch of another generation: a whole epoch may have been lost since.
    let foreign = broker
        .history("r", since(0, "not-the-epoch"))
        .await
        .unwrap();
    assert!(!foreign.recovered);
    assert!(foreign.messages.is_empty());

    let small = MemoryBroker::new(
        "n1",
        config(2, Duration::from_secs(300), Duration::from_secs(300)),
    );
    let unstored = small.position("r").await.unwrap().epoch;
    publish_n(&small, "r", 3).await;
    let evicted = small.history("r", since(0, &unstored)).await.unwrap();
    assert!(!evicted.recovered);
}

#[tokio::test]
async fn nothing_seen_before_a_wipe_is_not_recovered_after_it() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let broker = bus.broker("n1");
    let before = broker.position("r").await.unwrap();
    assert_eq!(before.offset, 0);
    let lost = publish_n(&broker, "r", 2).await;
    bus.wipe_history();
    // A whole epoch was published and lost while the client at offset 0 was away: it must not be
    // told that the new epoch's messages are all it missed.
    let after = publish_n(&broker, "r", 1).await;
    assert_ne!(after, lost);
    let resumed = broker.history("r", since(0, &before.epoch)).await.unwrap();
    assert!(!resumed.recovered);
    assert!(resumed.messages.is_empty());
    // Nor told so by a room that has no state yet.
    let empty = broker.history("q", since(0, &before.epoch)).await.unwrap();
    assert!(!empty.recovered);
    // While an epoch of the new generation still recovers.
    let fresh = broker.position("q").await.unwrap();
    let from_start = broker.history("r", since(0, &fresh.epoch)).await.unwrap();
    assert!(from_start.recovered);
    assert_eq!(offsets(&from_start), vec![1]);
}

#[tokio::test]
async fn history_size_evicts_the_oldest_and_breaks_recovery_of_the_gap() {
    let broker = MemoryBroker::new(
        "n1",
        config(3, Duration::from_secs(300), Duration::from_secs(86_400)),
    );
    let epoch = publish_n(&broker, "r", 5).await;

    // Only the newest three are held.
    assert_eq!(
        offsets(&broker.history("r", newest(None)).await.unwrap()),
        vec![3, 4, 5]
    );
    assert_eq!(broker.bus.state.stream("r").lock().history.len(), 3);

    // Message 2 is gone: resuming after 1 cannot be complete.
    let gap = broker.history("r", since(1, &epoch)).await.unwrap();
    assert!(!gap.recovered);
    assert_eq!(offsets(&gap), vec![3, 4, 5]);

    let zero = broker.history("r", since(0, &epoch)).await.unwrap();
    assert!(!zero.recovered);

    // Resuming after 2 needs 3.. which are all held.
    let whole = broker.history("r", since(2, &epoch)).await.unwrap();
    assert!(whole.recovered);
    assert_eq!(offsets(&whole), vec![3, 4, 5]);
}

#[tokio::test]
async fn history_size_zero_keeps_nothing() {
    let broker = MemoryBroker::new(
        "n1",
        config(0, Duration::from_secs(300), Duration::from_secs(86_400)),
    );
    let epoch = publish_n(&broker, "r", 2).await;
    assert_eq!(broker.position("r").await.unwrap().offset, 2);
    assert!(
        broker
            .history("r", newest(None))
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert!(
        !broker
            .history("r", since(1, &epoch))
            .await
            .unwrap()
            .recovered
    );
    // Nothing was missed by a client at the head.
    assert!(
        broker
            .history("r", since(2, &epoch))
            .await
            .unwrap()
            .recovered
    );
}

#[tokio::test(start_paused = true)]
async fn history_ttl_expires_messages() {
    let broker = MemoryBroker::new(
        "n1",
        config(100, Duration::from_secs(10), Duration::from_secs(86_400)),
    );
    let epoch = broker
        .publish("r", json!(1), None)
        .await
        .unwrap()
        .epoch
        .clone();
    tokio::time::advance(Duration::from_secs(6)).await;
    broker.publish("r", json!(2), None).await.unwrap();

    // t = 9.999 s: both still held.
    tokio::time::advance(Duration::from_millis(3_999)).await;
    assert_eq!(
        offsets(&broker.history("r", newest(None)).await.unwrap()),
        vec![1, 2]
    );
    assert!(
        broker
            .history("r", since(0, &epoch))
            .await
            .unwrap()
            .recovered
    );

    // t = 10 s: message 1 is exactly `history_ttl` old and expires.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        offsets(&broker.history("r", newest(None)).await.unwrap()),
        vec![2]
    );
    let gap = broker.history("r", since(0, &epoch)).await.unwrap();
    assert!(!gap.recovered);
    assert_eq!(offsets(&gap), vec![2]);
    let after_one = broker.history("r", since(1, &epoch)).await.unwrap();
    assert!(after_one.recovered);
    assert_eq!(offsets(&after_one), vec![2]);

    // t = 16 s: message 2 expires too; the offset and epoch stay.
    tokio::time::advance(Duration::from_secs(6)).await;
    let empty = broker.history("r", newest(None)).await.unwrap();
    assert!(empty.messages.is_empty());
    assert_eq!(
        empty.position,
        StreamPosition {
            offset: 2,
            epoch: epoch.clone()
        }
    );
    assert!(
        !broker
            .history("r", since(1, &epoch))
            .await
            .unwrap()
            .recovered
    );
    assert!(
        broker
            .history("r", since(2, &epoch))
            .await
            .unwrap()
            .recovered
    );

    // The next publish continues the same stream.
    let next = broker.publish("r", json!(3), None).await.unwrap();
    assert_eq!((next.offset, next.epoch.as_str()), (3, epoch.as_str()));
}

#[tokio::test(start_paused = true)]
async fn sweep_drops_expired_history_without_a_reader() {
    let bus = MemoryBus::new(config(
        100,
        Duration::from_secs(10),
        Duration::from_secs(86_400),
    ));
    let broker = bus.broker("n1");
    publish_n(&broker, "r", 3).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(bus.state.stream("r").lock().history.len(), 3);
    bus.state.sweep();
    let stream = bus.state.stream("r");
    let stream = stream.lock();
    assert!(stream.history.is_empty());
    assert_eq!(stream.offset, 3);
}

// ----- stream_ttl -------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn sweep_forgets_an_idle_room_after_stream_ttl() {
    let bus = MemoryBus::new(config(100, Duration::from_secs(1), Duration::from_secs(10)));
    let broker = bus.broker("n1");
    let old_epoch = publish_n(&broker, "r", 2).await;

    tokio::time::advance(Duration::from_secs(5)).await;
    bus.state.sweep();
    assert_eq!(
        broker.position("r").await.unwrap(),
        StreamPosition {
            offset: 2,
            epoch: old_epoch.clone()
        }
    );

    tokio::time::advance(Duration::from_secs(5)).await;
    bus.state.sweep();
    assert!(!bus.state.streams.contains_key("r"));

    let position = broker.position("r").await.unwrap();
    assert_eq!(position.offset, 0);
    assert_ne!(position.epoch, old_epoch);
    let history = broker.history("r", since(2, &old_epoch)).await.unwrap();
    assert!(!history.recovered);

    let message = broker.publish("r", json!("again"), None).await.unwrap();
    assert_eq!(message.offset, 1);
    assert_ne!(message.epoch, old_epoch);
}

#[tokio::test(start_paused = true)]
async fn sweep_keeps_subscribed_rooms_and_rooms_with_history() {
    let bus = MemoryBus::new(config(
        100,
        Duration::from_secs(30),
        Duration::from_secs(10),
    ));
    let broker = bus.broker("n1");
    let subscribed_epoch = publish_n(&broker, "subscribed", 1).await;
    broker.subscribe_room("subscribed").await.unwrap();
    let held_epoch = publish_n(&broker, "held", 1).await;

    // Past stream_ttl, but "held" still has history and "subscribed" has a subscriber.
    tokio::time::advance(Duration::from_secs(20)).await;
    bus.state.sweep();
    assert!(bus.state.streams.contains_key("held"));
    assert!(bus.state.streams.contains_key("subscribed"));
    assert_eq!(broker.position("held").await.unwrap().epoch, held_epoch);

    // Once the history expires, the idle room goes; the subscribed one stays.
    tokio::time::advance(Duration::from_secs(10)).await;
    bus.state.sweep();
    assert!(!bus.state.streams.contains_key("held"));
    assert_eq!(
        broker.position("subscribed").await.unwrap(),
        StreamPosition {
            offset: 1,
            epoch: subscribed_epoch.clone()
        }
    );

    // Once nobody subscribes it goes too.
    broker.unsubscribe_room("subscribed").await.unwrap();
    bus.state.sweep();
    assert!(!bus.state.streams.contains_key("subscribed"));
    assert_ne!(
        broker.position("subscribed").await.unwrap().epoch,
        subscribed_epoch
    );
}

#[tokio::test(start_paused = true)]
async fn started_broker_sweeps_on_its_own() {
    let bus = MemoryBus::new(config(100, Duration::from_secs(1), Duration::from_secs(10)));
    let (broker, _recorder) = started(&bus, "n1").await;
    let old_epoch = publish_n(&broker, "r", 3).await;
    settle().await;

    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    // History expired by the sweeper (no reader touched the stream) but the room is kept.
    {
        let stream = bus
            .state
            .streams
            .get("r")
            .expect("room still known")
            .clone();
        let stream = stream.lock();
        assert!(stream.history.is_empty());
        assert_eq!(stream.offset, 3);
        assert_eq!(stream.epoch, old_epoch);
    }

    tokio::time::advance(Duration::from_secs(6)).await;
    settle().await;
    assert!(!bus.state.streams.contains_key("r"));
    let position = broker.position("r").await.unwrap();
    assert_eq!(position.offset, 0);
    assert_ne!(position.epoch, old_epoch);

    // A second start on the bus does not start a second sweeper (and does not panic).
    let (_other, _) = started(&bus, "n2").await;
    assert!(bus.state.sweeper_started.load(Ordering::SeqCst));
}

// ----- send, disconnect, broadcast --------------------------------------------------------------

#[tokio::test]
async fn send_reaches_only_nodes_hosting_the_user() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (n2, rec2) = started(&bus, "n2").await;
    let (n3, rec3) = started(&bus, "n3").await;
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
    // One call per hosting node; the node fans out to its own sessions.
    assert_eq!(rec1.take(), vec![Event::Direct(message.clone())]);
    assert_eq!(rec2.take(), vec![Event::Direct(message.clone())]);
    assert!(rec3.is_empty());

    let unknown = DirectMessage {
        user: "carol".into(),
        data: json!(1),
        from: None,
        seq: None,
    };
    assert_eq!(n1.send(unknown).await.unwrap(), 0);
    assert!(rec1.is_empty() && rec2.is_empty() && rec3.is_empty());

    n2.unregister_session(&session("alice", "s3", "n2"))
        .await
        .unwrap();
    assert_eq!(n1.send(message.clone()).await.unwrap(), 2);
    assert_eq!(rec1.take().len(), 1);
    assert!(rec2.is_empty());

    n1.unregister_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n1.unregister_session(&session("alice", "s2", "n1"))
        .await
        .unwrap();
    // Unregistering twice, or an unknown session, is harmless.
    n1.unregister_session(&session("alice", "s2", "n1"))
        .await
        .unwrap();
    n1.unregister_session(&session("zed", "s0", "n1"))
        .await
        .unwrap();
    assert_eq!(n1.send(message).await.unwrap(), 0);
    assert!(rec1.is_empty());
    assert!(!bus.state.registry.lock().contains_key("alice"));
    assert!(bus.state.registry.lock().contains_key("bob"));
}

#[tokio::test]
async fn disconnect_reaches_only_nodes_hosting_the_user() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (n2, rec2) = started(&bus, "n2").await;
    let (_n3, rec3) = started(&bus, "n3").await;
    n1.register_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s2", "n2"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s3", "n2"))
        .await
        .unwrap();
    n2.register_session(&session("bob", "s4", "n2"))
        .await
        .unwrap();

    assert_eq!(n1.disconnect("alice", 4000, "kicked").await.unwrap(), 3);
    let expected = Event::Disconnect {
        user: "alice".into(),
        code: 4000,
        reason: "kicked".into(),
    };
    assert_eq!(rec1.take(), vec![expected.clone()]);
    assert_eq!(rec2.take(), vec![expected]);
    assert!(rec3.is_empty());

    assert_eq!(n1.disconnect("bob", 1000, "").await.unwrap(), 1);
    assert!(rec1.is_empty());
    assert_eq!(
        rec2.take(),
        vec![Event::Disconnect {
            user: "bob".into(),
            code: 1000,
            reason: String::new()
        }]
    );

    assert_eq!(n1.disconnect("nobody", 1000, "x").await.unwrap(), 0);
    assert!(rec1.is_empty() && rec2.is_empty() && rec3.is_empty());
}

#[tokio::test]
async fn broadcast_reaches_every_started_node() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (_n2, rec2) = started(&bus, "n2").await;
    let (_n3, rec3) = started(&bus, "n3").await;
    // Not started: it has no handler and is not counted.
    let _idle = bus.broker("n4");

    assert_eq!(n1.broadcast(json!({"news": 1})).await.unwrap(), 3);
    for recorder in [&rec1, &rec2, &rec3] {
        assert_eq!(recorder.take(), vec![Event::Broadcast(json!({"news": 1}))]);
    }

    let single = MemoryBroker::new("solo", MemoryConfig::default());
    assert_eq!(single.broadcast(json!(0)).await.unwrap(), 0);
}

// ----- presence ---------------------------------------------------------------------------------

#[tokio::test]
async fn presence_lists_members_and_announces_to_subscribers_only() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (n2, rec2) = started(&bus, "n2").await;
    n1.subscribe_room("r").await.unwrap();

    assert!(n1.presence("r").await.unwrap().is_empty());

    let alice = Member {
        info: Some(json!({"name": "Alice"})),
        ..member("alice", "s2")
    };
    let bob = member("bob", "s1");
    n2.join_presence("r", &alice).await.unwrap();
    assert_eq!(
        rec1.take(),
        vec![presence_event(PresenceChange::Join, "r", "alice", "s2")]
    );
    assert!(rec2.is_empty());

    n1.join_presence("r", &bob).await.unwrap();
    assert_eq!(
        rec1.take(),
        vec![presence_event(PresenceChange::Join, "r", "bob", "s1")]
    );
    assert!(rec2.is_empty());

    // Listed by session id, identical from every node, with the info.
    let members = vec![bob.clone(), alice.clone()];
    assert_eq!(n1.presence("r").await.unwrap(), members);
    assert_eq!(n2.presence("r").await.unwrap(), members);
    assert!(n1.presence("other").await.unwrap().is_empty());

    // Leaving a room one is not in, or as an unknown session: no event, no change.
    n2.leave_presence("r", &member("carol", "s9"))
        .await
        .unwrap();
    n2.leave_presence("other", &alice).await.unwrap();
    assert!(rec1.is_empty() && rec2.is_empty());
    assert_eq!(n1.presence("r").await.unwrap(), members);

    n2.leave_presence("r", &alice).await.unwrap();
    assert_eq!(
        rec1.take(),
        vec![presence_event(PresenceChange::Leave, "r", "alice", "s2")]
    );
    assert!(rec2.is_empty());
    assert_eq!(n2.presence("r").await.unwrap(), vec![bob.clone()]);

    // A second leave of the same member is not announced.
    n2.leave_presence("r", &alice).await.unwrap();
    assert!(rec1.is_empty());

    // After unsubscribing, n1 hears nothing more; n2 hears once subscribed.
    n1.unsubscribe_room("r").await.unwrap();
    n2.subscribe_room("r").await.unwrap();
    n1.leave_presence("r", &bob).await.unwrap();
    assert!(rec1.is_empty());
    assert_eq!(
        rec2.take(),
        vec![presence_event(PresenceChange::Leave, "r", "bob", "s1")]
    );
    assert!(n1.presence("r").await.unwrap().is_empty());
    assert!(!bus.state.presence.lock().contains_key("r"));
}

#[tokio::test]
async fn presence_is_per_room_and_per_session() {
    let broker = MemoryBroker::new("n1", MemoryConfig::default());
    let recorder = Arc::new(Recorder::default());
    broker.start(recorder.clone()).await.unwrap();
    broker.subscribe_room("a").await.unwrap();

    // The same user with two sessions is two members.
    broker
        .join_presence("a", &member("alice", "s1"))
        .await
        .unwrap();
    broker
        .join_presence("a", &member("alice", "s2"))
        .await
        .unwrap();
    broker
        .join_presence("b", &member("alice", "s1"))
        .await
        .unwrap();
    // Only room "a" is subscribed.
    assert_eq!(
        recorder.take(),
        vec![
            presence_event(PresenceChange::Join, "a", "alice", "s1"),
            presence_event(PresenceChange::Join, "a", "alice", "s2"),
        ]
    );
    assert_eq!(
        broker.presence("a").await.unwrap(),
        vec![member("alice", "s1"), member("alice", "s2")]
    );
    assert_eq!(
        broker.presence("b").await.unwrap(),
        vec![member("alice", "s1")]
    );

    broker
        .leave_presence("a", &member("alice", "s1"))
        .await
        .unwrap();
    assert_eq!(
        broker.presence("a").await.unwrap(),
        vec![member("alice", "s2")]
    );
    assert_eq!(
        broker.presence("b").await.unwrap(),
        vec![member("alice", "s1")]
    );
}

// ----- nodes ------------------------------------------------------------------------------------

#[tokio::test]
async fn deregister_node_removes_its_sessions_presence_subscriptions_and_liveness() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (n1, rec1) = started(&bus, "n1").await;
    let (n2, rec2) = started(&bus, "n2").await;
    n1.heartbeat(&node_info("n1", 2, 1)).await.unwrap();
    n2.heartbeat(&node_info("n2", 1, 1)).await.unwrap();

    n1.register_session(&session("alice", "s1", "n1"))
        .await
        .unwrap();
    n2.register_session(&session("alice", "s2", "n2"))
        .await
        .unwrap();
    n1.register_session(&session("bob", "s3", "n1"))
        .await
        .unwrap();
    n1.subscribe_room("r").await.unwrap();
    n1.subscribe_room("only-n1").await.unwrap();
    n2.subscribe_room("r").await.unwrap();
    n1.join_presence("r", &member("alice", "s1")).await.unwrap();
    n2.join_presence("r", &member("alice", "s2")).await.unwrap();
    n1.join_presence("r", &member("bob", "s3")).await.unwrap();
    n1.join_presence("only-n1", &member("bob", "s3"))
        .await
        .unwrap();
    rec1.take();
    rec2.take();

    n1.deregister_node("n1").await.unwrap();

    // Registry: only n2's session of alice remains, bob is gone.
    assert_eq!(
        n2.send(DirectMessage {
            user: "alice".into(),
            data: json!(1),
            from: None,
            seq: None,
        })
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        n2.send(DirectMessage {
            user: "bob".into(),
            data: json!(1),
            from: None,
            seq: None,
        })
        .await
        .unwrap(),
        0
    );
    assert_eq!(n2.disconnect("bob", 1000, "").await.unwrap(), 0);
    assert!(!bus.state.registry.lock().contains_key("bob"));

    // Presence: n1's sessions left every room.
    assert_eq!(n2.presence("r").await.unwrap(), vec![member("alice", "s2")]);
    assert!(n2.presence("only-n1").await.unwrap().is_empty());
    assert!(!bus.state.presence.lock().contains_key("only-n1"));

    // Subscriptions: n1 receives nothing more.
    n2.publish("r", json!(1), None).await.unwrap();
    n2.publish("only-n1", json!(1), None).await.unwrap();
    assert_eq!(rec2.room_offsets("r"), vec![1]);
    assert!(!bus.state.subscriptions.contains_key("only-n1"));

    // Liveness: n1 is no longer listed nor reached by a broadcast.
    assert_eq!(n2.nodes().await.unwrap(), vec![node_info("n2", 1, 1)]);
    assert_eq!(n2.broadcast(json!("bye")).await.unwrap(), 1);
    assert!(rec1.is_empty());
    assert_eq!(
        rec2.take(),
        vec![
            Event::Direct(DirectMessage {
                user: "alice".into(),
                data: json!(1),
                from: None,
                seq: None,
            }),
            Event::Room(RoomMessage {
                room: "r".into(),
                data: json!(1),
                offset: 1,
                epoch: n2.position("r").await.unwrap().epoch,
                from: None,
            }),
            Event::Broadcast(json!("bye")),
        ]
    );

    // Deregistering an unknown node changes nothing.
    n2.deregister_node("ghost").await.unwrap();
    assert_eq!(n2.nodes().await.unwrap(), vec![node_info("n2", 1, 1)]);
    assert_eq!(n2.presence("r").await.unwrap().len(), 1);
}

// ----- bounded pages and reads without state ----------------------------------------------------

#[tokio::test]
async fn reading_rooms_without_state_creates_none() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (broker, _) = started(&bus, "n1").await;
    let member = member("alice", "s1");
    for room in ["a", "b", "c"] {
        broker.position(room).await.unwrap();
        broker.history(room, newest(Some(10))).await.unwrap();
        broker.history(room, since(5, "e")).await.unwrap();
        broker.presence(room).await.unwrap();
        broker.subscribe_room(room).await.unwrap();
        broker.join_presence(room, &member).await.unwrap();
        broker.leave_presence(room, &member).await.unwrap();
        broker.unsubscribe_room(room).await.unwrap();
    }
    let state = &bus.state;
    assert_eq!(
        state.streams.len(),
        0,
        "no stream for a room never published to"
    );
    assert!(state.presence.lock().is_empty(), "no presence entry left");
    assert_eq!(state.subscriptions.len(), 0, "no subscription left");

    // Publishing creates the stream, as before.
    broker.publish("a", json!(1), None).await.unwrap();
    assert_eq!(state.streams.len(), 1);
}

// ----- the inbox and idempotency keys ------------------------------------------------------------

fn inbox_config(inbox_ttl: Duration, idempotency_window: Duration) -> MemoryConfig {
    MemoryConfig {
        inbox_ttl,
        idempotency_window,
        ..MemoryConfig::default()
    }
}

fn to(user: &str, data: Value) -> DirectMessage {
    DirectMessage {
        user: user.to_owned(),
        data,
        from: None,
        seq: None,
    }
}

#[tokio::test]
async fn reading_and_acking_inboxes_without_state_creates_none() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (broker, _) = started(&bus, "n1").await;
    for user in ["alice", "bob"] {
        broker.inbox(user, 0, 10, 1 << 20).await.unwrap();
        broker.ack(user, 0).await.unwrap();
        broker.ack(user, 3).await.unwrap();
    }
    assert_eq!(
        bus.state.inboxes.len(),
        0,
        "no inbox without a persisted send"
    );
    broker
        .send_persisted(to("alice", json!(1)), None)
        .await
        .unwrap();
    assert_eq!(bus.state.inboxes.len(), 1);
    assert!(
        bus.state.keys.lock().is_empty(),
        "an unkeyed send keeps no key"
    );
}

#[tokio::test(start_paused = true)]
async fn sweep_forgets_idle_inboxes_and_expired_keys() {
    let bus = MemoryBus::new(inbox_config(
        Duration::from_secs(10),
        Duration::from_secs(3),
    ));
    let (broker, _) = started(&bus, "n1").await;
    broker
        .send_persisted(to("alice", json!(1)), Some("k"))
        .await
        .unwrap();
    broker
        .send_persisted(to("bob", json!(1)), None)
        .await
        .unwrap();
    broker
        .publish_keyed("r", json!(1), None, "k")
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    bus.state.sweep();
    assert!(bus.state.keys.lock().is_empty(), "keys outlive no window");
    assert_eq!(bus.state.inboxes.len(), 2);
    // An ack keeps alice's inbox as a send would; bob's is idle for the TTL.
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(matches!(
        broker.ack("alice", 1).await.unwrap(),
        Acked::Done(_)
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    bus.state.sweep();
    assert_eq!(bus.state.inboxes.len(), 1);
    assert!(bus.state.inboxes.contains_key("alice"));
    let alice = broker.inbox("alice", 0, 10, 1 << 20).await.unwrap();
    assert_eq!((alice.position.seq, alice.position.acked), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn an_inbox_message_expires_exactly_at_the_ttl() {
    let bus = MemoryBus::new(inbox_config(
        Duration::from_secs(10),
        Duration::from_secs(60),
    ));
    let (broker, _) = started(&bus, "n1").await;
    broker
        .send_persisted(to("alice", json!(1)), None)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    broker
        .send_persisted(to("alice", json!(2)), None)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_millis(5_999)).await;
    let pending = |inbox: Inbox| {
        inbox
            .pending
            .iter()
            .map(|entry| entry.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        pending(broker.inbox("alice", 0, 10, 1 << 20).await.unwrap()),
        [1, 2]
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        pending(broker.inbox("alice", 0, 10, 1 << 20).await.unwrap()),
        [2]
    );
}

#[tokio::test]
async fn wipe_history_forgets_inboxes_and_keys() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let (broker, _) = started(&bus, "n1").await;
    let first = broker
        .send_persisted(to("alice", json!(1)), Some("k"))
        .await
        .unwrap();
    bus.wipe_history();
    let again = broker
        .send_persisted(to("alice", json!(1)), Some("k"))
        .await
        .unwrap();
    assert_eq!((again.seq, again.duplicate), (1, false));
    assert!(!crate::same_generation(&first.epoch, &again.epoch));
}

// ----- the conformance suite --------------------------------------------------------------------

mod conformance {
    use super::*;
    use crate::conformance::{Cluster, Limits};

    struct Bus(MemoryBus);

    #[async_trait]
    impl Cluster for Bus {
        async fn broker(&self, node: &str) -> Arc<dyn Broker> {
            Arc::new(self.0.broker(node))
        }

        async fn trim_history(&self, room: &str, keep: usize) {
            let stream = self
                .0
                .state
                .existing_stream(room)
                .expect("a room with state");
            let mut stream = stream.lock();
            while stream.history.len() > keep {
                stream.history.pop_front();
            }
        }
    }

    crate::conformance_tests!(|limits: Limits| async move {
        Bus(MemoryBus::new(MemoryConfig {
            inbox_size: limits.inbox_size,
            inbox_ttl: limits.inbox_ttl,
            idempotency_window: limits.idempotency_window,
            ..MemoryConfig::default()
        }))
    });
}
