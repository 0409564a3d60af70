//! Checks of the broker's scripts and recovery logic against a real `redis-server` (started on a
//! free loopback port per test, killed on drop; tests/run.sh installs it). The end-to-end
//! cluster tests (tests/e2e/cluster.rs) cover the same paths through real nodes.

use std::process::{Child, Command, Stdio};

use futures_util::StreamExt;
use redis::Value;
use serde_json::json;
use switchboard_broker::conformance::Limits;
use switchboard_broker::{Acked, PresenceEvent};
use switchboard_protocol::PresenceNotice;
use tokio::sync::oneshot;

use super::*;
use crate::envelope::Envelope;
use crate::mirror::RESTORE_BATCH;
use crate::reaper::Reap;
use crate::subscriber::Control;

/// A throwaway `redis-server` without persistence.
struct Server {
    child: Option<Child>,
    port: u16,
}

impl Server {
    async fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let mut server = Server { child: None, port };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (tests/run.sh installs it)");
        self.child = Some(child);
        for _ in 0..500 {
            if let Ok(mut connection) = self.connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    async fn query<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> T {
        let mut connection = self.connection().await.expect("connected");
        command.query_async(&mut connection).await.expect("query")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn broker(server: &Server, node: &str, node_ttl: Duration) -> (RedisBroker, Registry) {
    incarnation(server, node, "1", node_ttl)
}

/// A broker of node `node` as the process with instance id `instance`.
fn incarnation(
    server: &Server,
    node: &str,
    instance: &str,
    node_ttl: Duration,
) -> (RedisBroker, Registry) {
    limited(server, node, instance, node_ttl, Limits::GENEROUS)
}

/// A broker of node `node` as the process with instance id `instance`, with the inbox and
/// idempotency limits of a conformance test.
fn limited(
    server: &Server,
    node: &str,
    instance: &str,
    node_ttl: Duration,
    limits: Limits,
) -> (RedisBroker, Registry) {
    let registry = Registry::new();
    let config = RedisConfig {
        shards: vec![server.url()],
        ca_pem: None,
        node_id: node.to_owned(),
        instance: instance.to_owned(),
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        stream_ttl: Duration::from_secs(600),
        node_ttl,
        inbox_size: limits.inbox_size,
        inbox_ttl: limits.inbox_ttl,
        idempotency_window: limits.idempotency_window,
    };
    (
        RedisBroker::new(config, &registry).expect("a broker"),
        registry,
    )
}

/// A handler that records what the broker hands to the node.
#[derive(Default)]
struct Recorder {
    messages: Mutex<Vec<Arc<RoomMessage>>>,
    broadcasts: Mutex<Vec<Arc<Json>>>,
    /// Forwarded client frames: (session, frames).
    frames: Mutex<Vec<(String, Vec<String>)>>,
}

impl BrokerHandler for Recorder {
    fn room_message(&self, message: Arc<RoomMessage>) {
        self.messages.lock().push(message);
    }
    fn presence(&self, _event: PresenceEvent) {}
    fn direct(&self, _message: Arc<DirectMessage>) {}
    fn broadcast(&self, data: Arc<Json>) {
        self.broadcasts.lock().push(data);
    }
    fn frames(&self, session: &str, frames: Vec<String>) {
        self.frames.lock().push((session.to_owned(), frames));
    }
    fn disconnect(&self, _user: &str, _code: u16, _reason: &str) {}
}

/// Starts the broker's shard tasks and waits until the shard is up: writes are not sent to a
/// shard that is down.
async fn start(broker: &RedisBroker, handler: Arc<dyn BrokerHandler>) {
    broker.start(handler).await.expect("start");
    for _ in 0..500 {
        if broker.is_healthy() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the shard did not come up");
}

fn offsets(messages: &[Arc<RoomMessage>]) -> Vec<u64> {
    messages.iter().map(|message| message.offset).collect()
}

fn member(user: &str, session: &str) -> Member {
    Member {
        user: user.to_owned(),
        session: session.to_owned(),
        info: None,
    }
}

fn record(user: &str, session: &str, node: &str) -> SessionRecord {
    SessionRecord {
        session: session.to_owned(),
        user: user.to_owned(),
        node: node.to_owned(),
        connected_at: 0,
    }
}

fn info(node: &str) -> NodeInfo {
    NodeInfo {
        id: node.to_owned(),
        instance: "1".into(),
        address: "127.0.0.1:1".into(),
        connections: 1,
        started_at: 0,
        last_seen: 0,
    }
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command
}

/// What the shard's task does with a replay, in line.
async fn replay_all(broker: &RedisBroker, rooms: &mut HashMap<String, Option<StreamPosition>>) {
    let snapshot: Vec<_> = rooms
        .iter()
        .map(|(room, position)| (room.clone(), position.clone()))
        .collect();
    for (room, position) in snapshot {
        let mut pages = Vec::new();
        broker
            .inner
            .replay_room(&room, position, |messages| pages.extend(messages))
            .await;
        for message in pages {
            broker.inner.deliver(rooms, message);
        }
    }
}

#[tokio::test]
async fn replay_after_lost_history_delivers_the_whole_new_epoch() {
    let server = Server::start().await;
    let (broker, _) = broker(&server, "n", Duration::from_secs(3));
    let recorder = Arc::new(Recorder::default());
    start(&broker, recorder.clone()).await;
    let first = broker
        .publish("room", json!(1), None)
        .await
        .expect("publish");
    broker
        .publish("room", json!(2), None)
        .await
        .expect("publish");

    // The node had seen offset 7 of an epoch Redis no longer has: both messages are new to it.
    let mut rooms = HashMap::from([(
        "room".to_owned(),
        Some(StreamPosition {
            offset: 7,
            epoch: "lost".into(),
        }),
    )]);
    replay_all(&broker, &mut rooms).await;
    assert_eq!(offsets(&recorder.messages.lock()), [1, 2]);
    assert_eq!(
        rooms["room"],
        Some(StreamPosition {
            offset: 2,
            epoch: first.epoch.clone()
        })
    );

    // Same epoch: only what came after.
    recorder.messages.lock().clear();
    broker
        .publish("room", json!(3), None)
        .await
        .expect("publish");
    replay_all(&broker, &mut rooms).await;
    assert_eq!(offsets(&recorder.messages.lock()), [3]);
}

#[tokio::test]
async fn reaping_spares_live_nodes_and_a_reaped_node_writes_itself_back() {
    let server = Server::start().await;
    let ttl = Duration::from_secs(5);
    let (x, _) = broker(&server, "x", ttl);
    let (y, _) = broker(&server, "y", ttl);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    x.register_session(&record("ann", "s1", "x"))
        .await
        .expect("register");
    x.join_presence("room", &member("ann", "s1"))
        .await
        .expect("join");
    let registered = || server.query::<Option<String>>(cmd(&["HGET", "sb:u:ann", "s1"]));

    // x is alive: y's reaper leaves it alone, even if it decided to reap a moment earlier.
    y.inner
        .reap(&y.inner.shards[0], "x@1", Reap::Dead)
        .await
        .expect("reap");
    assert_eq!(registered().await.as_deref(), Some("x@1"));
    assert_eq!(x.presence("room").await.expect("presence").len(), 1);

    // x goes silent past its TTL and is reaped: its entries go, and it is marked reaped.
    let _: () = server.query(cmd(&["DEL", "sb:n:x@1"])).await;
    y.inner
        .reap(&y.inner.shards[0], "x@1", Reap::Dead)
        .await
        .expect("reap");
    assert_eq!(registered().await, None);
    assert!(y.presence("room").await.expect("presence").is_empty());
    assert!(
        server
            .query::<bool>(cmd(&["EXISTS", "sb:n:x@1:reaped"]))
            .await
    );

    // x wakes up: its next heartbeat finds its key gone, writes everything back and announces
    // the member again (its leave was published).
    let client = redis::Client::open(server.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe("sb:r:room").await.expect("subscribe");
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    assert_eq!(registered().await.as_deref(), Some("x@1"));
    assert_eq!(
        y.presence("room").await.expect("presence"),
        [member("ann", "s1")]
    );
    assert!(
        !server
            .query::<bool>(cmd(&["EXISTS", "sb:n:x@1:reaped"]))
            .await
    );
    let mut messages = pubsub.on_message();
    let announced = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("a join in time")
        .expect("a message");
    match envelope::decode(Some("room"), announced.get_payload_bytes()).expect("decodes") {
        Envelope::Join(notice) => assert_eq!(
            notice,
            PresenceNotice {
                room: "room".into(),
                user: "ann".into(),
                session: "s1".into()
            }
        ),
        _ => panic!("expected a join"),
    }

    // A forced reap (the node leaving on purpose) removes a live node and leaves no mark.
    x.inner
        .reap(&x.inner.shards[0], "x@1", Reap::Forced)
        .await
        .expect("reap");
    assert_eq!(registered().await, None);
    assert!(
        !server
            .query::<bool>(cmd(&["EXISTS", "sb:n:x@1:reaped"]))
            .await
    );
}

#[tokio::test]
async fn removals_that_failed_are_done_by_a_later_heartbeat() {
    let mut server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    x.heartbeat(&info("x")).await.expect("heartbeat");
    x.register_session(&record("ann", "s1", "x"))
        .await
        .expect("register");
    x.join_presence("room", &member("ann", "s1"))
        .await
        .expect("join");

    server.stop();
    x.leave_presence("room", &member("ann", "s1"))
        .await
        .expect_err("Redis is down");
    x.unregister_session(&record("ann", "s1", "x"))
        .await
        .expect_err("Redis is down");
    {
        let pending = x.inner.pending.lock();
        assert_eq!(pending.sessions.len(), 1);
        assert_eq!(pending.leaves.len(), 1);
    }

    // Redis comes back with the entries (as a server that kept its data would).
    server.spawn().await;
    let value = x.inner.presence_value(&member("ann", "s1")).expect("value");
    let _: () = server.query(cmd(&["HSET", "sb:u:ann", "s1", "x@1"])).await;
    let mut hset = cmd(&["HSET", "sb:r:room:presence", "s1"]);
    hset.arg(value);
    let _: () = server.query(hset).await;
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    assert!(
        !server
            .query::<bool>(cmd(&["HEXISTS", "sb:u:ann", "s1"]))
            .await
    );
    assert!(x.presence("room").await.expect("presence").is_empty());
    let pending = x.inner.pending.lock();
    assert!(pending.sessions.is_empty() && pending.leaves.is_empty());
}

#[tokio::test]
async fn a_pending_leave_is_dropped_when_the_member_joins_again() {
    let mut server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    x.heartbeat(&info("x")).await.expect("heartbeat");
    x.join_presence("room", &member("ann", "s1"))
        .await
        .expect("join");
    server.stop();
    x.leave_presence("room", &member("ann", "s1"))
        .await
        .expect_err("Redis is down");
    server.spawn().await;
    x.join_presence("room", &member("ann", "s1"))
        .await
        .expect("join again");
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    assert_eq!(
        x.presence("room").await.expect("presence"),
        [member("ann", "s1")]
    );
}

#[tokio::test]
async fn the_pubsub_connection_survives_its_pings() {
    let server = Server::start().await;
    // Pings every 100 ms.
    let (x, _) = broker(&server, "x", Duration::from_millis(300));
    x.start(Arc::new(Recorder::default())).await.expect("start");
    for _ in 0..500 {
        if x.is_healthy() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(x.is_healthy());
    // Ten ping periods: on a subscribed connection the answer is `["pong", ""]`, which once
    // counted as a failure and dropped the connection at every ping.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(x.is_healthy());
    let metrics = &x.inner.metrics;
    assert_eq!(metrics.reconnects.with_label_values(&["0"]).get(), 0);
    assert_eq!(metrics.errors.with_label_values(&["0"]).get(), 0);
    x.deregister_node("x").await.expect("deregister");
}

#[tokio::test]
async fn a_burst_of_registrations_and_removals_goes_in_few_round_trips() {
    const SESSIONS: usize = 20_000;
    let server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    let records: Vec<SessionRecord> = (0..SESSIONS)
        .map(|n| record(&format!("user-{}", n % 1000), &format!("s{n}"), "x"))
        .collect();
    let registry_entries = || async {
        let users: Vec<String> = server.query(cmd(&["KEYS", "sb:u:*"])).await;
        let mut entries = 0;
        for user in users {
            entries += server.query::<usize>(cmd(&["HLEN", &user])).await;
        }
        entries
    };
    let batches = || {
        x.inner
            .metrics
            .write_batch_size
            .with_label_values(&["0"])
            .get_sample_count()
    };

    let registered =
        futures_util::future::join_all(records.iter().map(|record| x.register_session(record)))
            .await;
    assert!(
        registered.iter().all(Result::is_ok),
        "every registration succeeds"
    );
    assert_eq!(registry_entries().await, SESSIONS);
    let register_batches = batches();

    let removed =
        futures_util::future::join_all(records.iter().map(|record| x.unregister_session(record)))
            .await;
    assert!(removed.iter().all(Result::is_ok), "every removal succeeds");
    // Gone at once, without any heartbeat's retry.
    assert_eq!(registry_entries().await, 0);
    assert!(x.inner.pending.lock().sessions.is_empty());
    assert_eq!(x.inner.metrics.errors.with_label_values(&["0"]).get(), 0);

    // One pipeline per batch of up to 1000 writes, not one round trip per session.
    let remove_batches = batches() - register_batches;
    for (what, count) in [
        ("registrations", register_batches),
        ("removals", remove_batches),
    ] {
        assert!(
            count > 0 && count <= (SESSIONS / 100) as u64,
            "{what}: {count} batches for {SESSIONS} sessions"
        );
    }
    let stats: String = server.query(cmd(&["INFO", "commandstats"])).await;
    let calls = |command: &str| {
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse::<usize>().ok())
            .unwrap_or(0)
    };
    assert_eq!(calls("hset"), SESSIONS);
    assert_eq!(calls("hdel"), SESSIONS);
}

#[tokio::test]
async fn a_burst_of_presence_joins_and_leaves_goes_in_few_round_trips() {
    const MEMBERS: usize = 5_000;
    let server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    x.heartbeat(&info("x")).await.expect("heartbeat");
    let members: Vec<(String, Member)> = (0..MEMBERS)
        .map(|n| {
            (
                format!("room-{}", n % 50),
                member(&format!("user-{n}"), &format!("s{n}")),
            )
        })
        .collect();
    let joined = futures_util::future::join_all(
        members
            .iter()
            .map(|(room, member)| x.join_presence(room, member)),
    )
    .await;
    assert!(joined.iter().all(Result::is_ok), "every join succeeds");
    assert_eq!(
        x.presence("room-0").await.expect("presence").len(),
        MEMBERS / 50
    );

    let left = futures_util::future::join_all(
        members
            .iter()
            .map(|(room, member)| x.leave_presence(room, member)),
    )
    .await;
    assert!(left.iter().all(Result::is_ok), "every leave succeeds");
    let rooms: Vec<String> = server.query(cmd(&["KEYS", "sb:r:*:presence"])).await;
    assert!(rooms.is_empty(), "presence left: {rooms:?}");
    assert_eq!(x.inner.metrics.errors.with_label_values(&["0"]).get(), 0);
    let batches = x
        .inner
        .metrics
        .write_batch_size
        .with_label_values(&["0"])
        .get_sample_count();
    assert!(batches <= (2 * MEMBERS / 100) as u64, "{batches} batches");
}

#[tokio::test]
async fn a_burst_of_failed_removals_counts_one_error_per_batch_and_is_retried() {
    const SESSIONS: usize = 500;
    let mut server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    let records: Vec<SessionRecord> = (0..SESSIONS)
        .map(|n| record(&format!("user-{n}"), &format!("s{n}"), "x"))
        .collect();
    let registered =
        futures_util::future::join_all(records.iter().map(|record| x.register_session(record)))
            .await;
    assert!(registered.iter().all(Result::is_ok));

    server.stop();
    let removed =
        futures_util::future::join_all(records.iter().map(|record| x.unregister_session(record)))
            .await;
    assert!(removed.iter().all(Result::is_err), "Redis is down");
    assert_eq!(x.inner.pending.lock().sessions.len(), SESSIONS);
    let errors = x.inner.metrics.errors.with_label_values(&["0"]).get();
    assert!(
        (1..=5).contains(&errors),
        "{errors} errors counted for {SESSIONS} removals in one burst"
    );

    // Redis comes back with the entries (as a server that kept its data would).
    server.spawn().await;
    let mut pipe = redis::pipe();
    for record in &records {
        pipe.cmd("HSET")
            .arg(keys::user_sessions(&record.user))
            .arg(&record.session)
            .arg("x")
            .ignore();
    }
    let mut connection = server.connection().await.expect("connected");
    let _: () = pipe
        .query_async(&mut connection)
        .await
        .expect("entries back");
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    assert!(x.inner.pending.lock().sessions.is_empty());
    let users: Vec<String> = server.query(cmd(&["KEYS", "sb:u:*"])).await;
    assert!(users.is_empty(), "left in the registry: {}", users.len());
}

#[tokio::test]
async fn calls_wait_for_a_slow_redis_up_to_the_command_timeout() {
    let server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    // Redis busy for 1 s (a script holds it), then answering: slower than redis-rs's default
    // response timeout (500 ms), well within COMMAND_TIMEOUT.
    let busy = r"
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= 1000000
return 1
";
    let shard = &x.inner.shards[0];
    let started = tokio::time::Instant::now();
    let (slow, registered) = tokio::join!(
        x.inner.call(shard, "busy", async |connection| {
            redis::cmd("EVAL")
                .arg(busy)
                .arg(0)
                .query_async::<i64>(connection)
                .await
        }),
        async {
            // Queued behind the script on the same connection.
            tokio::time::sleep(Duration::from_millis(50)).await;
            x.register_session(&record("ann", "s1", "x")).await
        }
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(slow, Ok(1));
    assert_eq!(registered, Ok(()));
    assert_eq!(x.inner.metrics.errors.with_label_values(&["0"]).get(), 0);
}

fn page(since: Option<(u64, &str)>, limit: Option<usize>, max_bytes: usize) -> HistoryQuery {
    HistoryQuery {
        since: since.map(|(offset, epoch)| StreamPosition {
            offset,
            epoch: epoch.to_owned(),
        }),
        limit,
        max_bytes: Some(max_bytes),
    }
}

#[tokio::test]
async fn reading_and_leaving_rooms_without_state_leaves_no_key() {
    let server = Server::start().await;
    let (broker, _) = broker(&server, "n", Duration::from_secs(3));
    let keys_now = async || -> Vec<String> {
        let mut keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*").clone()).await;
        keys.sort();
        keys
    };
    let before = keys_now().await;
    let alice = member("alice", "s1");
    for room in ["a", "b", "c"] {
        broker.position(room).await.expect("position");
        broker
            .history(room, page(None, Some(10), 1 << 20))
            .await
            .expect("history");
        broker
            .history(room, page(Some((4, "e")), None, 1 << 20))
            .await
            .expect("history since");
        broker.presence(room).await.expect("presence");
        broker.join_presence(room, &alice).await.expect("join");
        broker.leave_presence(room, &alice).await.expect("leave");
    }
    assert_eq!(
        keys_now().await,
        before,
        "no key made by reads, joins and leaves"
    );

    // Two members of this node: each is in the node's member set until it leaves.
    let bob = member("bob", "s2");
    broker.join_presence("d", &alice).await.expect("join");
    broker.join_presence("d", &bob).await.expect("join");
    broker.leave_presence("d", &alice).await.expect("leave");
    let entries: Vec<String> = server
        .query(
            redis::cmd("SMEMBERS")
                .arg(keys::node_members("n@1"))
                .clone(),
        )
        .await;
    assert_eq!(entries, [keys::node_entry("s2", "d")]);
    broker.leave_presence("d", &bob).await.expect("leave");
    assert_eq!(keys_now().await, before);
}

fn since(offset: u64, epoch: &str) -> HistoryQuery {
    HistoryQuery {
        since: Some(StreamPosition {
            offset,
            epoch: epoch.to_owned(),
        }),
        limit: None,
        max_bytes: None,
    }
}

#[tokio::test]
async fn a_stream_left_by_another_server_generation_starts_a_new_epoch() {
    let server = Server::start().await;
    let (broker, _) = broker(&server, "n", Duration::from_secs(3));
    start(&broker, Arc::new(Recorder::default())).await;
    let unstored = broker.position("room").await.expect("position").epoch;
    let mut last = None;
    for n in 1..=5 {
        last = Some(
            broker
                .publish("room", json!(n), None)
                .await
                .expect("publish"),
        );
    }
    let seen = last.expect("published");
    // What a restart from a snapshot, or a promoted replica, leaves: the stream as it was two
    // publishes earlier, under an epoch another server process made.
    let foreign = format!("ffffffff{}", &seen.epoch[8..]);
    server
        .query::<()>(cmd(&["HSET", "sb:r:room:meta", "e", &foreign, "o", "3"]))
        .await;
    server
        .query::<()>(cmd(&["XTRIM", "sb:r:room:log", "MAXLEN", "3"]))
        .await;
    let seen_foreign = StreamPosition {
        offset: 5,
        epoch: foreign.clone(),
    };

    // A client that saw offset 5 is told it cannot recover, not handed offsets 4 and 5 again.
    let resumed = broker
        .history("room", since(5, &foreign))
        .await
        .expect("history");
    assert!(!resumed.recovered);
    assert!(resumed.messages.is_empty());
    assert_ne!(resumed.position.epoch, foreign);

    // The next publish starts a new epoch at offset 1: no offset of the old epoch is reused.
    let next = broker
        .publish("room", json!(6), None)
        .await
        .expect("publish");
    assert_eq!(next.offset, 1);
    assert_ne!(next.epoch, seen_foreign.epoch);
    assert!(switchboard_broker::same_generation(&next.epoch, &unstored));
    let old = broker
        .history("room", since(3, &foreign))
        .await
        .expect("history");
    assert!(!old.recovered);

    // "Nothing seen yet" in this generation recovers the new epoch from its first message; in
    // the lost generation it does not (a whole epoch may have passed unseen).
    let zero = broker
        .history("room", since(0, &unstored))
        .await
        .expect("history");
    assert!(zero.recovered);
    assert_eq!(offsets(&zero.messages), [1]);
    let zero_foreign = broker
        .history("room", since(0, &foreign))
        .await
        .expect("history");
    assert!(!zero_foreign.recovered);
    assert!(zero_foreign.messages.is_empty());
}

#[tokio::test]
async fn an_inbox_left_by_another_server_generation_starts_a_new_epoch() {
    let server = Server::start().await;
    let (broker, _) = broker(&server, "n", Duration::from_secs(3));
    start(&broker, Arc::new(Recorder::default())).await;
    let keys_now = async || -> Vec<String> {
        let mut keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*").clone()).await;
        keys.sort();
        keys
    };
    let before = keys_now().await;
    let unstored = broker.inbox("alice", 0, 10, 1 << 20).await.expect("inbox");
    assert!(matches!(broker.ack("alice", 0).await, Ok(Acked::Done(_))));
    assert!(matches!(
        broker.ack("alice", 2).await,
        Ok(Acked::BeyondSeq(_))
    ));
    assert_eq!(keys_now().await, before, "no key made by reads and acks");

    let message = DirectMessage {
        user: "alice".into(),
        data: json!("m"),
        from: None,
        seq: None,
    };
    let mut seen = None;
    for _ in 0..3 {
        seen = Some(
            broker
                .send_persisted(message.clone(), Some("k"))
                .await
                .expect("send"),
        );
    }
    let seen = seen.expect("sent");
    assert_eq!((seen.seq, seen.duplicate), (1, true));
    assert!(switchboard_broker::same_generation(
        &seen.epoch,
        &unstored.position.epoch
    ));
    // The inbox lives for the inbox TTL from its last write, its key for the window.
    for key in [
        keys::user_inbox_meta("alice"),
        keys::user_inbox_log("alice"),
    ] {
        let ttl: i64 = server.query(cmd(&["PTTL", &key])).await;
        assert!(ttl > 0 && ttl <= 3_600_000, "{key}: {ttl}");
    }
    let ttl: i64 = server
        .query(cmd(&["PTTL", &keys::send_key("alice", "k")]))
        .await;
    assert!(ttl > 0 && ttl <= 3_600_000, "key: {ttl}");

    // What a restart from a snapshot, or a promoted replica, leaves: the inbox under an epoch
    // another server process made.
    let foreign = format!("ffffffff{}", &seen.epoch[8..]);
    server
        .query::<()>(cmd(&[
            "HSET",
            &keys::user_inbox_meta("alice"),
            "e",
            &foreign,
        ]))
        .await;
    let read = broker.inbox("alice", 0, 10, 1 << 20).await.expect("inbox");
    assert_eq!((read.position.seq, read.position.acked), (0, 0));
    assert!(read.pending.is_empty());
    assert_ne!(read.position.epoch, foreign);
    let next = broker
        .send_persisted(message.clone(), None)
        .await
        .expect("send");
    assert_eq!(next.seq, 1);
    assert_ne!(next.epoch, foreign);
    assert_ne!(
        next.epoch, seen.epoch,
        "a seq is never given twice in one epoch"
    );
}

#[tokio::test]
async fn inbox_pages_read_in_several_fetches_cover_every_message_once() {
    let server = Server::start().await;
    let (broker, _) = broker(&server, "n", Duration::from_secs(3));
    start(&broker, Arc::new(Recorder::default())).await;
    for n in 1..=40u64 {
        let message = DirectMessage {
            user: "alice".into(),
            data: json!({ "n": n, "text": "y".repeat(100) }),
            from: None,
            seq: None,
        };
        broker.send_persisted(message, None).await.expect("send");
    }
    let all = broker.inbox("alice", 0, 100, 1 << 20).await.expect("inbox");
    assert_eq!(all.pending.len(), 40);
    assert!(!all.more);
    for (limit, max_bytes) in [(7, 1 << 20), (100, 1000), (5, 300)] {
        let mut after = 0;
        let mut read = Vec::new();
        loop {
            let page = broker
                .inbox("alice", after, limit, max_bytes)
                .await
                .expect("inbox");
            assert!(!page.pending.is_empty() && page.pending.len() <= limit);
            read.extend(page.pending.iter().map(|entry| entry.seq));
            after = page.pending.last().expect("an entry").seq;
            if !page.more {
                break;
            }
        }
        assert_eq!(
            read,
            (1..=40).collect::<Vec<_>>(),
            "limit {limit}, {max_bytes} bytes"
        );
    }
}

#[tokio::test]
async fn expiry_is_judged_by_redis_time_on_every_entry_and_paging_skips_expired_pages() {
    let server = Server::start().await;
    let registry = Registry::new();
    let broker = RedisBroker::new(
        RedisConfig {
            shards: vec![server.url()],
            ca_pem: None,
            node_id: "n".into(),
            history_size: 1000,
            history_ttl: Duration::from_secs(2),
            stream_ttl: Duration::from_secs(600),
            node_ttl: Duration::from_secs(3),
            instance: "1".into(),
            inbox_size: 100,
            inbox_ttl: Duration::from_secs(600),
            idempotency_window: Duration::from_secs(600),
        },
        &registry,
    )
    .expect("a broker");
    start(&broker, Arc::new(Recorder::default())).await;
    let mut epoch = String::new();
    for n in 1..=150 {
        epoch = broker
            .publish("room", json!(n), None)
            .await
            .expect("publish")
            .epoch
            .clone();
    }
    // Stamped by Redis's clock, not by the publishing node's.
    let entries: Vec<(String, Vec<Vec<u8>>)> = server
        .query(cmd(&["XRANGE", "sb:r:room:log", "-", "+", "COUNT", "1"]))
        .await;
    let fields = &entries[0].1;
    let at = fields
        .iter()
        .position(|field| field == b"t")
        .expect("a stamp");
    let stamp: u64 = String::from_utf8_lossy(&fields[at + 1])
        .parse()
        .expect("a ms stamp");
    let (seconds, micros): (u64, u64) = server.query(cmd(&["TIME"])).await;
    let redis_now = seconds * 1000 + micros / 1000;
    assert!(
        stamp <= redis_now && redis_now - stamp < 10_000,
        "{stamp} vs {redis_now}"
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker
        .publish("room", json!(151), None)
        .await
        .expect("publish");
    // More expired entries than one page of the script's paging: the answer still reaches the
    // fresh one, and says the gap is not all held.
    for query in [
        since(0, &epoch),
        since(10, &epoch),
        HistoryQuery {
            max_bytes: Some(4),
            ..since(10, &epoch)
        },
        HistoryQuery {
            limit: Some(1),
            ..since(10, &epoch)
        },
    ] {
        let page = broker
            .history("room", query.clone())
            .await
            .expect("history");
        assert!(!page.recovered, "{query:?}");
        assert_eq!(offsets(&page.messages), [151], "{query:?}");
        assert!(!page.more, "{query:?}");
    }
    let newest = broker
        .history(
            "room",
            HistoryQuery {
                since: None,
                limit: Some(100),
                max_bytes: None,
            },
        )
        .await
        .expect("history");
    assert_eq!(offsets(&newest.messages), [151]);
    let current = broker
        .history("room", since(150, &epoch))
        .await
        .expect("history");
    assert!(current.recovered);
    assert_eq!(offsets(&current.messages), [151]);
}

#[tokio::test]
async fn a_subscribe_whose_caller_gave_up_leaves_no_subscription() {
    let server = Server::start().await;
    let (broker, _) = broker(&server, "n", Duration::from_secs(3));
    broker
        .start(Arc::new(Recorder::default()))
        .await
        .expect("start");
    let numsub = async |room: &str| {
        let answer: (String, u64) = server
            .query(cmd(&["PUBSUB", "NUMSUB", &keys::room_channel(room)]))
            .await;
        answer.1
    };
    // The caller stopped waiting (its timeout passed) before the shard's task got to it.
    let shard = broker.inner.shard("late");
    let (done, answer) = oneshot::channel();
    drop(answer);
    shard
        .control
        .send(Control::Subscribe {
            room: "late".into(),
            done,
        })
        .expect("queued");
    // A subscribe queued after it completes only once the first was handled.
    broker.subscribe_room("other").await.expect("subscribe");
    let shard = broker.inner.shard("late2");
    let (done, answer) = oneshot::channel();
    shard
        .control
        .send(Control::Subscribe {
            room: "late2".into(),
            done,
        })
        .expect("queued");
    let wait = tokio::time::timeout(Duration::from_secs(10), answer);
    assert!(matches!(wait.await, Ok(Ok(Ok(())))));
    assert_eq!(numsub("late").await, 0);
    assert_eq!(numsub("late2").await, 1);
    assert_eq!(numsub("other").await, 1);
}

/// A TCP proxy to a server that can refuse new connections, and hold back (while `slow`) what
/// the server sends on a connection that asked for a history read (the READ script): a Redis
/// slow to answer the replay while pub/sub and other connections are fine.
struct SlowReads {
    port: u16,
    refuse: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowReads {
    async fn start(target: u16) -> SlowReads {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let port = listener.local_addr().expect("bound").port();
        let refuse = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(false));
        let (refusing, slowing) = (refuse.clone(), slow.clone());
        let read_sha = scripts::READ.get_hash().as_bytes().to_vec();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let held = Arc::new(AtomicBool::new(false));
                let (holding, slow, sha) = (held.clone(), slowing.clone(), read_sha.clone());
                tokio::spawn(async move {
                    let mut buffer = vec![0; 1 << 16];
                    while let Ok(read @ 1..) = client_read.read(&mut buffer).await {
                        let chunk = &buffer[..read];
                        if slow.load(Ordering::SeqCst)
                            && chunk.windows(sha.len()).any(|window| window == sha)
                        {
                            holding.store(true, Ordering::SeqCst);
                        }
                        if server_write.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                });
                let slow = slowing.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 1 << 16];
                    while let Ok(read @ 1..) = server_read.read(&mut buffer).await {
                        while held.load(Ordering::SeqCst) && slow.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        held.store(false, Ordering::SeqCst);
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SlowReads {
            port,
            refuse,
            slow,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowReads {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_slow_replay_holds_up_no_other_live_delivery() {
    let server = Server::start().await;
    let proxy = SlowReads::start(server.port).await;
    let config = |url: String, node: &str| RedisConfig {
        shards: vec![url],
        ca_pem: None,
        node_id: node.to_owned(),
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        stream_ttl: Duration::from_secs(600),
        node_ttl: Duration::from_secs(3),
        instance: "1".into(),
        inbox_size: 100,
        inbox_ttl: Duration::from_secs(600),
        idempotency_window: Duration::from_secs(600),
    };
    let node = RedisBroker::new(config(proxy.url(), "node"), &Registry::new()).expect("a broker");
    let received = Arc::new(Recorder::default());
    start(&node, received.clone()).await;
    let other =
        RedisBroker::new(config(server.url(), "other"), &Registry::new()).expect("a broker");
    start(&other, Arc::new(Recorder::default())).await;
    let rooms = ["r0", "r1", "r2", "r3"];
    for room in rooms {
        node.subscribe_room(room).await.expect("subscribe");
    }

    // The node's pub/sub connection drops and stays down while every room gets a message.
    proxy.refuse.store(true, Ordering::SeqCst);
    server
        .query::<()>(cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]))
        .await;
    eventually("the node to lose the shard", || !node.is_healthy()).await;
    eventually("the other broker to reconnect", || other.is_healthy()).await;
    for room in rooms {
        other
            .publish(room, json!("missed"), None)
            .await
            .expect("publish");
    }

    // It comes back, and its history reads for the replay get no answer for now.
    proxy.slow.store(true, Ordering::SeqCst);
    proxy.refuse.store(false, Ordering::SeqCst);
    eventually("the node to reconnect", || node.is_healthy()).await;
    // Meanwhile a room subscribed since and a broadcast reach it live.
    node.subscribe_room("fresh").await.expect("subscribe");
    other
        .publish("fresh", json!("live"), None)
        .await
        .expect("publish");
    other.broadcast(json!("everyone")).await.expect("broadcast");
    eventually("live delivery during the replay", || {
        received
            .messages
            .lock()
            .iter()
            .any(|message| message.room == "fresh")
            && !received.broadcasts.lock().is_empty()
    })
    .await;
    assert!(
        !received
            .messages
            .lock()
            .iter()
            .any(|message| message.data == json!("missed")),
        "the replay was held back"
    );

    // Once Redis answers, the replay delivers what the rooms published while the node was away.
    proxy.slow.store(false, Ordering::SeqCst);
    eventually("the replay", || {
        received
            .messages
            .lock()
            .iter()
            .filter(|message| message.data == json!("missed"))
            .count()
            == rooms.len()
    })
    .await;
}

#[tokio::test]
async fn a_big_node_is_trimmed_as_it_goes_and_reaped_in_bounded_calls_by_its_successor() {
    let server = Server::start().await;
    let ttl = Duration::from_secs(60);
    let (old, _) = incarnation(&server, "x", "1", ttl);
    old.heartbeat(&info("x")).await.expect("heartbeat");
    let sessions = 2 * scripts::REAP_BATCH + 50;
    let records: Vec<SessionRecord> = (0..sessions)
        .map(|index| record(&format!("u{index}"), &format!("s{index}"), "x"))
        .collect();
    let joined = records.iter().map(|record| async {
        old.register_session(record).await.expect("register");
        let room = format!("room{}", record.session.len());
        old.join_presence(&room, &member(&record.user, &record.session))
            .await
            .expect("join");
    });
    futures_util::future::join_all(joined).await;
    let count = async |key: String| server.query::<usize>(cmd(&["SCARD", &key])).await;
    assert_eq!(count(keys::node_sessions("x@1")).await, sessions);
    assert_eq!(count(keys::node_members("x@1")).await, sessions);

    // Sessions that leave leave the node's index sets.
    for record in &records[..50] {
        old.leave_presence(
            &format!("room{}", record.session.len()),
            &member(&record.user, &record.session),
        )
        .await
        .expect("leave");
        old.unregister_session(record).await.expect("unregister");
    }
    assert_eq!(count(keys::node_sessions("x@1")).await, sessions - 50);
    assert_eq!(count(keys::node_members("x@1")).await, sessions - 50);

    // The process restarts under the same id while its key is still alive: the new incarnation
    // reaps the old one's entries at once, several bounded calls, without waiting for the TTL.
    let _: () = server
        .query(cmd(&[
            "CONFIG",
            "SET",
            "slowlog-log-slower-than",
            "0",
            "slowlog-max-len",
            "10000",
        ]))
        .await;
    let _: () = server.query(cmd(&["SLOWLOG", "RESET"])).await;
    let (new, _) = incarnation(&server, "x", "2", ttl);
    new.start(Arc::new(Recorder::default()))
        .await
        .expect("start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let nodes: Vec<String> = server.query(cmd(&["SMEMBERS", "sb:nodes"])).await;
        if !nodes.iter().any(|node| node == "x@1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "x@1 never reaped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:u:*"])).await;
    assert!(left.is_empty(), "registry entries left: {left:?}");
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:r:*:presence"])).await;
    assert!(left.is_empty(), "presence entries left: {left:?}");
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:n:x@1*"])).await;
    assert_eq!(left, ["sb:n:x@1:reaped"]);
    let log: Vec<(i64, i64, i64, Vec<Vec<u8>>)> = server
        .query::<Vec<Value>>(cmd(&["SLOWLOG", "GET", "-1"]))
        .await
        .into_iter()
        .filter_map(|entry| match entry {
            Value::Array(fields) => {
                let fields: Vec<Value> = fields.into_iter().take(4).collect();
                redis::from_redis_value(Value::Array(fields)).ok()
            }
            _ => None,
        })
        .collect();
    let reaps = log
        .iter()
        .filter(|(_, _, _, args)| args.get(3).is_some_and(|arg| arg == b"sb:"))
        .count();
    assert!(
        reaps >= 2,
        "the reap took several calls ({reaps} in {} logged)",
        log.len()
    );
}

#[test]
fn incarnations_of_a_node_id_are_told_apart_from_other_ids() {
    assert_eq!(keys::incarnation("web-1", "ab"), "web-1@ab");
    assert!(keys::is_incarnation_of("web-1@ab", "web-1"));
    assert!(keys::is_incarnation_of("web-1", "web-1"));
    assert!(!keys::is_incarnation_of("web-10@ab", "web-1"));
    assert!(!keys::is_incarnation_of("web-1.x@ab", "web-1"));
}

#[tokio::test]
async fn a_node_writes_a_big_set_of_entries_back_in_bounded_batches() {
    const SESSIONS: usize = 5 * RESTORE_BATCH / 2;
    let server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(60));
    x.heartbeat(&info("x")).await.expect("heartbeat");
    for index in 0..SESSIONS {
        let record = record(&format!("u{index}"), &format!("s{index}"), "x");
        x.register_session(&record).await.expect("register");
        x.join_presence("room", &member(&record.user, &record.session))
            .await
            .expect("join");
    }
    let batches = || {
        x.inner
            .metrics
            .write_batch_size
            .with_label_values(&["0"])
            .get_sample_count()
    };

    // Redis loses everything (a restart without persistence); the node's next heartbeat finds
    // its key gone and writes its entries back, a bounded batch at a time.
    let _: () = server.query(cmd(&["FLUSHALL"])).await;
    let before = batches();
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    assert!(
        batches() - before >= 6,
        "{} write batches for {SESSIONS} sessions and members",
        batches() - before
    );
    let count = async |command: &[&str]| server.query::<usize>(cmd(command)).await;
    assert_eq!(count(&["HLEN", "sb:r:room:presence"]).await, SESSIONS);
    assert_eq!(count(&["SCARD", "sb:n:x@1:sessions"]).await, SESSIONS);
    assert_eq!(count(&["SCARD", "sb:n:x@1:members"]).await, SESSIONS);
    let users: Vec<String> = server.query(cmd(&["KEYS", "sb:u:*"])).await;
    assert_eq!(users.len(), SESSIONS);
    assert_eq!(x.presence("room").await.expect("presence").len(), SESSIONS);
}

#[tokio::test]
async fn a_node_started_under_the_id_of_a_node_of_an_earlier_version_reaps_its_old_sets() {
    let server = Server::start().await;
    // What a node before incarnations left: its bare id everywhere, and sets of users and rooms.
    let users = 3 * scripts::REAP_LEGACY_BATCH;
    for index in 0..users {
        let (user, session) = (format!("u{index}"), format!("s{index}"));
        let _: () = server
            .query(cmd(&["HSET", &format!("sb:u:{user}"), &session, "x"]))
            .await;
        let _: () = server.query(cmd(&["SADD", "sb:n:x:users", &user])).await;
        let mut hset = cmd(&["HSET", "sb:r:room:presence", &session]);
        hset.arg(format!("x\n{user}\npacked"));
        let _: () = server.query(hset).await;
    }
    // Another node's member in the same room stays.
    let (other, _) = broker(&server, "y", Duration::from_secs(60));
    other.heartbeat(&info("y")).await.expect("heartbeat");
    other
        .join_presence("room", &member("ann", "s-ann"))
        .await
        .expect("join");
    let _: () = server.query(cmd(&["SADD", "sb:n:x:rooms", "room"])).await;
    let _: () = server.query(cmd(&["SET", "sb:n:x", "alive"])).await;
    let _: () = server.query(cmd(&["SADD", "sb:nodes", "x"])).await;

    let (x, _) = incarnation(&server, "x", "2", Duration::from_secs(60));
    x.start(Arc::new(Recorder::default())).await.expect("start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server
        .query::<bool>(cmd(&["SISMEMBER", "sb:nodes", "x"]))
        .await
    {
        assert!(tokio::time::Instant::now() < deadline, "x never reaped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:u:*"])).await;
    assert!(left.is_empty(), "registry entries left: {left:?}");
    let left: Vec<String> = server.query(cmd(&["HKEYS", "sb:r:room:presence"])).await;
    assert_eq!(left, ["s-ann"]);
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:n:x"])).await;
    assert!(left.is_empty(), "liveness left: {left:?}");
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:n:x:*"])).await;
    assert_eq!(left, ["sb:n:x:reaped"]);
}

fn link(session: &str, node: &str, key_hash: &str) -> LinkRecord {
    LinkRecord {
        session: session.to_owned(),
        node: node.to_owned(),
        key_hash: key_hash.to_owned(),
    }
}

/// The commands clients sent since the last `SLOWLOG RESET` (the server logging every command)
/// whose arguments mention `needle`, as their arguments. Redis logs the commands a script runs
/// too, with the client `?:0`: those are left out, since they cost no round trip.
async fn sent_commands(server: &Server, needle: &str) -> Vec<Vec<String>> {
    server
        .query::<Vec<Value>>(cmd(&["SLOWLOG", "GET", "-1"]))
        .await
        .into_iter()
        .filter_map(|entry| match entry {
            Value::Array(fields) => {
                let mut fields = fields.into_iter().skip(3);
                let args = redis::from_redis_value::<Vec<Vec<u8>>>(fields.next()?).ok()?;
                let client = redis::from_redis_value::<String>(fields.next()?).ok()?;
                (client != "?:0").then_some(args)
            }
            _ => None,
        })
        .map(|args| {
            args.iter()
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
        })
        .filter(|args| args.iter().any(|arg| arg.contains(needle)))
        .collect()
}

#[tokio::test]
async fn a_forward_is_one_round_trip_to_the_holding_nodes_inbox() {
    let server = Server::start().await;
    let ttl = Duration::from_secs(30);
    let (x, _) = broker(&server, "x", ttl);
    let (y, _) = broker(&server, "y", ttl);
    let (on_x, on_y) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    start(&x, on_x.clone()).await;
    start(&y, on_y.clone()).await;
    x.heartbeat(&info("x")).await.expect("heartbeat");
    y.heartbeat(&info("y")).await.expect("heartbeat");
    // The node named in the record is ignored: Redis knows the node by its incarnation.
    y.register_link(&link("f00d", "whatever", "hash-1"))
        .await
        .expect("register");
    let stored: HashMap<String, String> = server.query(cmd(&["HGETALL", "sb:l:f00d"])).await;
    assert_eq!(
        stored,
        HashMap::from([
            ("n".to_owned(), "y@1".to_owned()),
            ("k".to_owned(), "hash-1".to_owned())
        ])
    );
    assert!(
        server
            .query::<bool>(cmd(&["SISMEMBER", "sb:n:y@1:links", "f00d"]))
            .await
    );

    // Once the script is loaded, a forward is one EVALSHA: one round trip, whatever it answers.
    assert_eq!(
        x.forward("f00d", "hash-1", Vec::new())
            .await
            .expect("check"),
        Forwarded::Delivered
    );
    let _: () = server
        .query(cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]))
        .await;
    let _: () = server.query(cmd(&["SLOWLOG", "RESET"])).await;
    let frames = vec![r#"{"type":"ping","id":1}"#.to_owned(), "second".to_owned()];
    assert_eq!(
        x.forward("f00d", "hash-1", frames.clone())
            .await
            .expect("forward"),
        Forwarded::Delivered
    );
    assert_eq!(
        x.forward("f00d", "hash-2", vec!["bad".into()])
            .await
            .expect("forward"),
        Forwarded::WrongKey
    );
    let logged = sent_commands(&server, "sb:l:f00d").await;
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(
        logged
            .iter()
            .all(|args| args[0].eq_ignore_ascii_case("evalsha")),
        "{logged:?}"
    );
    eventually("the frames on y", || !on_y.frames.lock().is_empty()).await;
    assert_eq!(*on_y.frames.lock(), [("f00d".to_owned(), frames)]);
    assert!(on_x.frames.lock().is_empty());

    // A node leaving on purpose takes its links with it.
    y.deregister_node("y").await.expect("deregister");
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:l:*"])).await;
    assert!(left.is_empty(), "links left: {left:?}");
    assert!(
        !server
            .query::<bool>(cmd(&["EXISTS", "sb:n:y@1:links"]))
            .await
    );
    assert_eq!(
        x.forward("f00d", "hash-1", Vec::new())
            .await
            .expect("check"),
        Forwarded::UnknownSession
    );
}

#[tokio::test]
async fn the_links_of_a_dead_node_are_dropped_by_a_forward_and_by_the_reaper() {
    let server = Server::start().await;
    let (y, _) = broker(&server, "y", Duration::from_secs(1));
    y.heartbeat(&info("y")).await.expect("heartbeat");
    // More links than one reap call handles.
    let links = 2 * scripts::REAP_BATCH + 10;
    futures_util::future::join_all((0..links).map(|index| {
        let y = &y;
        async move {
            y.register_link(&link(&format!("s{index}"), "y", "k"))
                .await
                .expect("register")
        }
    }))
    .await;
    assert_eq!(
        server
            .query::<usize>(cmd(&["SCARD", "sb:n:y@1:links"]))
            .await,
        links
    );

    // y stops heartbeating; x's reaper runs every second.
    let (x, _) = broker(&server, "x", Duration::from_secs(1));
    start(&x, Arc::new(Recorder::default())).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.query::<bool>(cmd(&["EXISTS", "sb:n:y@1"])).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "y's key never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A forward to a dead node's session finds it unknown and deletes its link, whether the
    // reaper got there first or not.
    assert_eq!(
        x.forward("s0", "k", vec!["late".into()])
            .await
            .expect("forward"),
        Forwarded::UnknownSession
    );
    assert!(!server.query::<bool>(cmd(&["EXISTS", "sb:l:s0"])).await);

    // The reaper drains every link, several bounded calls, and forgets y only then.
    while server
        .query::<bool>(cmd(&["SISMEMBER", "sb:nodes", "y@1"]))
        .await
    {
        assert!(tokio::time::Instant::now() < deadline, "y never reaped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:l:*"])).await;
    assert!(left.is_empty(), "{} links left", left.len());
    let left: Vec<String> = server.query(cmd(&["KEYS", "sb:n:y@1*"])).await;
    assert_eq!(left, ["sb:n:y@1:reaped"]);
    assert_eq!(
        x.forward("s1", "k", Vec::new()).await.expect("check"),
        Forwarded::UnknownSession
    );
}

#[tokio::test]
async fn links_are_written_back_after_a_loss_and_failed_removals_retried() {
    let mut server = Server::start().await;
    let (x, _) = broker(&server, "x", Duration::from_secs(5));
    x.heartbeat(&info("x")).await.expect("heartbeat");
    x.register_link(&link("kept", "x", "k1"))
        .await
        .expect("register");
    x.register_link(&link("closed", "x", "k2"))
        .await
        .expect("register");

    // Redis goes down while a session closes: its link's removal fails and is kept.
    server.stop();
    x.unregister_link(&link("closed", "x", "k2"))
        .await
        .expect_err("Redis is down");
    assert_eq!(x.inner.pending.lock().links.len(), 1);

    // Redis comes back having lost everything: the next heartbeat writes the live link back
    // (and not the closed one), and the removal is done.
    server.spawn().await;
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    let stored: HashMap<String, String> = server.query(cmd(&["HGETALL", "sb:l:kept"])).await;
    assert_eq!(stored.get("k").map(String::as_str), Some("k1"));
    assert_eq!(stored.get("n").map(String::as_str), Some("x@1"));
    let members: Vec<String> = server.query(cmd(&["SMEMBERS", "sb:n:x@1:links"])).await;
    assert_eq!(members, ["kept"]);
    assert!(!server.query::<bool>(cmd(&["EXISTS", "sb:l:closed"])).await);
    assert!(x.inner.pending.lock().links.is_empty());

    // A removal that failed while Redis kept the link is done by a later heartbeat.
    server.stop();
    x.unregister_link(&link("kept", "x", "k1"))
        .await
        .expect_err("Redis is down");
    server.spawn().await;
    let _: () = server
        .query(cmd(&["HSET", "sb:l:kept", "n", "x@1", "k", "k1"]))
        .await;
    let _: () = server.query(cmd(&["SADD", "sb:n:x@1:links", "kept"])).await;
    x.inner.shards[0].up.store(true, Ordering::SeqCst);
    x.heartbeat(&info("x")).await.expect("heartbeat");
    assert!(!server.query::<bool>(cmd(&["EXISTS", "sb:l:kept"])).await);
    assert!(
        !server
            .query::<bool>(cmd(&["EXISTS", "sb:n:x@1:links"]))
            .await
    );
    assert!(x.inner.pending.lock().links.is_empty());
}

// ----- the conformance suite --------------------------------------------------------------------

mod conformance {
    use switchboard_broker::conformance::Cluster;

    use super::*;

    /// Brokers on one fresh `redis-server`, with the test's limits.
    struct OneShard(Server, Limits);

    #[async_trait]
    impl Cluster for OneShard {
        async fn broker(&self, node: &str) -> Arc<dyn Broker> {
            Arc::new(limited(&self.0, node, "1", Duration::from_secs(30), self.1).0)
        }

        async fn trim_history(&self, room: &str, keep: usize) {
            let keep = keep.to_string();
            let log = keys::room_log(room);
            self.0
                .query::<()>(cmd(&["XTRIM", &log, "MAXLEN", &keep]))
                .await;
        }
    }

    switchboard_broker::conformance_tests!(|limits: Limits| async move {
        OneShard(Server::start().await, limits)
    });
}
