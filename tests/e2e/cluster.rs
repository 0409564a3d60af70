//! The cluster: real `redis-server` processes and real `switchboard` nodes on loopback ports.
//!
//! Every test starts its own Redis server(s) and nodes (with a short node TTL and room linger),
//! talks to them over real sockets, and checks what crosses nodes: room fan-out only to the
//! nodes with subscribers, directed sends, broadcast, presence, `since` recovery on another
//! node, a node killed with SIGKILL, a Redis server killed and restarted, a node paused past
//! its TTL, a session closed while Redis does not answer, and two Redis shards. Raw WebSocket
//! clients are used where a test counts frames, so that nothing (like the SDK's
//! de-duplication) hides a duplicate; a duplicate would come before the next expected frame,
//! so tests check whole sequences, then that nothing else is queued (a ping round trip).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use switchboard_client::{Client, ClientError, ConnectOptions, SubscribeOptions};
use switchboard_e2e::api::{api, api_ok, api_presence, api_publish, api_send, readyz};
use switchboard_e2e::certs::TestCerts;
use switchboard_e2e::client::position;
use switchboard_e2e::peer::{Peer, offsets_and_data};
use switchboard_e2e::{DEADLINE, NodeProcess, RedisProcess, free_port, send_signal, wait_until};
use switchboard_protocol::api::{ApiError, BroadcastResponse, NodesResponse, PublishResponse};
use switchboard_protocol::{ErrorCode, PresenceNotice, Sender, ServerFrame};

/// The node TTL every test runs with: a node silent this long is dead.
const NODE_TTL: Duration = Duration::from_millis(1500);
/// How long a node keeps a room upstream after its last local subscriber left.
const ROOM_LINGER: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Redis shards and the nodes using them; everything is killed on drop.
struct Cluster {
    redis: Vec<RedisProcess>,
    nodes: Vec<NodeProcess>,
}

impl Cluster {
    /// Starts `shards` Redis servers and `nodes` nodes named `node-a`, `node-b`, ..., and waits
    /// until every node is ready (every shard connected).
    async fn start(shards: usize, nodes: usize) -> Result<Cluster> {
        Cluster::start_with_ttl(shards, nodes, NODE_TTL).await
    }

    async fn start_with_ttl(shards: usize, nodes: usize, node_ttl: Duration) -> Result<Cluster> {
        let mut redis = Vec::new();
        for _ in 0..shards {
            redis.push(RedisProcess::start().await?);
        }
        let urls = redis
            .iter()
            .map(RedisProcess::url)
            .collect::<Vec<_>>()
            .join(",");
        let ttl = node_ttl.as_millis().to_string();
        let linger = ROOM_LINGER.as_millis().to_string();
        let mut started = Vec::new();
        for index in 0..nodes {
            let id = format!("node-{}", char::from(b'a' + index as u8));
            let args = [
                "--redis",
                urls.as_str(),
                "--node-id",
                id.as_str(),
                "--node-ttl-ms",
                ttl.as_str(),
                "--room-linger-ms",
                linger.as_str(),
            ];
            started.push(NodeProcess::start(&args).await?);
        }
        for node in &started {
            node.wait_ready().await?;
        }
        Ok(Cluster {
            redis,
            nodes: started,
        })
    }

    fn node(&self, index: usize) -> &NodeProcess {
        &self.nodes[index]
    }

    fn redis(&self) -> &RedisProcess {
        &self.redis[0]
    }
}

fn set<const N: usize>(members: [(String, String); N]) -> BTreeSet<(String, String)> {
    members.into_iter().collect()
}

async fn api_nodes(node: &NodeProcess) -> Result<BTreeSet<String>> {
    let answer: NodesResponse = api_ok(node, "GET", "/api/nodes", None).await?;
    Ok(answer.nodes.into_iter().map(|node| node.id).collect())
}

/// How many Redis connections are subscribed to the room's channel.
async fn numsub(redis: &RedisProcess, room: &str) -> Result<u64> {
    let channel = format!("sb:r:{room}");
    let output = redis.cli(&["PUBSUB", "NUMSUB", &channel]).await?;
    let mut lines = output.lines();
    ensure!(lines.next() == Some(channel.as_str()), "NUMSUB: {output}");
    lines
        .next()
        .context("NUMSUB without a count")?
        .trim()
        .parse()
        .with_context(|| format!("NUMSUB: {output}"))
}

/// The room channels subscribed on a Redis server.
async fn room_channels(redis: &RedisProcess) -> Result<BTreeSet<String>> {
    let output = redis.cli(&["PUBSUB", "CHANNELS", "sb:r:*"]).await?;
    Ok(output
        .lines()
        .filter_map(|line| line.trim().strip_prefix("sb:r:"))
        .map(str::to_owned)
        .collect())
}

/// The shard that holds `key`; fails unless exactly one does.
async fn shard_of(cluster: &Cluster, key: &str) -> Result<usize> {
    let mut holders = Vec::new();
    for (index, redis) in cluster.redis.iter().enumerate() {
        if redis.cli(&["EXISTS", key]).await? == "1" {
            holders.push(index);
        }
    }
    match holders[..] {
        [shard] => Ok(shard),
        _ => bail!("{key} is on shards {holders:?}"),
    }
}

fn messages_received(shard: usize) -> String {
    format!("switchboard_redis_messages_total{{shard=\"{shard}\"}}")
}

fn reconnects(shard: usize) -> String {
    format!("switchboard_redis_reconnects_total{{shard=\"{shard}\"}}")
}

/// Waits until `probe` returns `expected`; fails with the last value seen after [`DEADLINE`].
async fn wait_for<T, F, Fut>(what: &str, expected: T, mut probe: F) -> Result<()>
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let seen = probe().await;
        match &seen {
            Ok(value) if *value == expected => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                bail!("{what}: expected {expected:?}, last seen {seen:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Room fan-out
// ---------------------------------------------------------------------------------------------

/// A room message published on A reaches the subscribers on B and C exactly once each, in offset
/// order, and reaches only the nodes that have subscribers: `PUBSUB NUMSUB` counts the nodes
/// with subscribers (and drops after the last one leaves and the linger passes), and a node
/// without subscribers receives nothing from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_messages_reach_only_subscribed_nodes_exactly_once() -> Result<()> {
    let cluster = Cluster::start(1, 3).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let redis = cluster.redis();
    let mut publisher = Peer::connect(a, "publisher").await?;
    let mut on_b1 = Peer::connect(b, "bea").await?;
    let mut on_b2 = Peer::connect(b, "ben").await?;
    let mut on_c = Peer::connect(c, "cid").await?;
    // C subscribes another room only, to show that what it receives stops at its own rooms.
    on_c.subscribe("elsewhere").await?;

    assert_eq!(numsub(redis, "chat").await?, 0);
    let start = on_b1.subscribe("chat").await?;
    assert_eq!(start.offset, 0);
    // No epoch is stored for a room without state, so only the offset is the same.
    assert_eq!(on_b2.subscribe("chat").await?.offset, start.offset);
    assert_eq!(
        numsub(redis, "chat").await?,
        1,
        "one node (B) has subscribers"
    );

    let before = c.metric(&messages_received(0)).await?;
    for n in 1..=5u64 {
        assert_eq!(publisher.publish("chat", json!({"n": n})).await?, n);
    }
    // A message to C's own room after them: had C received "chat", it would have come first.
    api_publish(a, "elsewhere", json!("sentinel")).await?;
    let expected: Vec<(u64, Value)> = (1..=5).map(|n| (n, json!({"n": n}))).collect();
    let mut epoch = None;
    for peer in [&mut on_b1, &mut on_b2] {
        let messages = peer.messages(5).await?;
        assert_eq!(offsets_and_data(&messages), expected, "{}", peer.user);
        for message in &messages {
            assert_eq!(message.room, "chat");
            // One epoch, the one the first publish made.
            assert_eq!(
                epoch.get_or_insert_with(|| message.epoch.clone()),
                &message.epoch
            );
            assert_eq!(message.from, Some(publisher.sender()));
        }
    }
    let sentinel = on_c.messages(1).await?;
    assert_eq!(sentinel[0].data, json!("sentinel"));
    assert_eq!(
        c.metric(&messages_received(0)).await? - before,
        1.0,
        "C's Redis connection carried the sentinel only, none of the 5 chat messages"
    );
    publisher.quiet().await?;

    // C joins the room: now two nodes receive it, each message once per session.
    assert_eq!(on_c.subscribe("chat").await?.offset, 5);
    assert_eq!(numsub(redis, "chat").await?, 2);
    for n in 6..=8u64 {
        assert_eq!(publisher.publish("chat", json!({"n": n})).await?, n);
    }
    api_publish(a, "chat", json!("last")).await?;
    let expected: Vec<(u64, Value)> = (6..=8)
        .map(|n| (n, json!({"n": n})))
        .chain([(9, json!("last"))])
        .collect();
    for peer in [&mut on_b1, &mut on_b2, &mut on_c] {
        let messages = peer.messages(4).await?;
        assert_eq!(offsets_and_data(&messages), expected, "{}", peer.user);
        assert_eq!(messages[3].from, None, "published by the server API");
        peer.quiet().await?;
    }

    // B's subscribers leave: after the linger only C's connection is subscribed.
    on_b1.unsubscribe("chat").await?;
    assert_eq!(numsub(redis, "chat").await?, 2, "B still has a subscriber");
    on_b2.unsubscribe("chat").await?;
    wait_for("NUMSUB after B's last subscriber left", 1, || {
        numsub(redis, "chat")
    })
    .await?;
    let b_before = b.metric(&messages_received(0)).await?;
    assert_eq!(publisher.publish("chat", json!("c only")).await?, 10);
    let messages = on_c.messages(1).await?;
    assert_eq!(offsets_and_data(&messages), [(10, json!("c only"))]);
    on_c.unsubscribe("chat").await?;
    wait_for("NUMSUB after every subscriber left", 0, || {
        numsub(redis, "chat")
    })
    .await?;
    assert_eq!(
        b.metric(&messages_received(0)).await?,
        b_before,
        "B no longer receives the room"
    );
    for peer in [&mut on_b1, &mut on_b2, &mut on_c] {
        peer.quiet().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Directed send
// ---------------------------------------------------------------------------------------------

fn expect_direct(frame: &ServerFrame) -> Result<(Value, Option<Sender>)> {
    match frame {
        ServerFrame::Direct { data, from, .. } => Ok((data.clone(), from.clone())),
        other => bail!("expected a direct message, got {other:?}"),
    }
}

/// A send to a user with sessions on two nodes reaches every session once; the reply counts the
/// sessions, from a client and from `POST /api/send` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directed_send_reaches_every_session_of_the_user_on_every_node() -> Result<()> {
    let cluster = Cluster::start(1, 3).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let mut sender = Peer::connect(c, "sender").await?;
    let mut dana_a = Peer::connect(a, "dana").await?;
    let mut dana_b = Peer::connect(b, "dana").await?;

    assert_eq!(sender.send("dana", json!("hello")).await?, 2);
    assert_eq!(api_send(c, "dana", json!("from the api")).await?, 2);
    assert_eq!(api_send(a, "dana", json!("last")).await?, 2);
    for dana in [&mut dana_a, &mut dana_b] {
        let frames = dana.take(3).await?;
        let got: Vec<(Value, Option<Sender>)> =
            frames.iter().map(expect_direct).collect::<Result<_>>()?;
        assert_eq!(
            got,
            [
                (json!("hello"), Some(sender.sender())),
                (json!("from the api"), None),
                (json!("last"), None),
            ],
            "each of dana's sessions gets each send exactly once"
        );
        dana.quiet().await?;
    }
    sender.quiet().await?;

    // A second session on B: one inbox message to B, delivered to both of its sessions.
    let mut dana_b2 = Peer::connect(b, "dana").await?;
    assert_eq!(sender.send("dana", json!(3)).await?, 3);
    for dana in [&mut dana_a, &mut dana_b, &mut dana_b2] {
        assert_eq!(
            expect_direct(&dana.next().await?)?,
            (json!(3), Some(sender.sender()))
        );
        dana.quiet().await?;
    }

    assert_eq!(sender.send("nobody", json!(0)).await?, 0);
    assert_eq!(api_send(a, "nobody", json!(0)).await?, 0);
    assert_eq!(sender.send("sender", json!("self")).await?, 1);
    assert_eq!(expect_direct(&sender.next().await?)?.0, json!("self"));

    // A session that leaves is no longer counted.
    dana_a.close().await?;
    wait_for("dana's sessions after one closed", 2, || {
        api_send(c, "dana", json!("ping"))
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Broadcast
// ---------------------------------------------------------------------------------------------

/// `POST /api/broadcast` on one node reaches every session on every node once and reports the
/// number of nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_session_on_every_node() -> Result<()> {
    let cluster = Cluster::start(1, 3).await?;
    let mut peers = Vec::new();
    for (node, user) in [(0, "ann"), (1, "bob"), (1, "bea"), (2, "cid")] {
        peers.push(Peer::connect(cluster.node(node), user).await?);
    }
    for (index, data) in [json!({"notice": 1}), json!("second")]
        .into_iter()
        .enumerate()
    {
        let node = cluster.node(index);
        let answer: BroadcastResponse =
            api_ok(node, "POST", "/api/broadcast", Some(json!({"data": data}))).await?;
        assert_eq!(
            answer.nodes, 3,
            "every node is subscribed to the broadcast channel"
        );
    }
    for peer in &mut peers {
        let frames = peer.take(2).await?;
        assert_eq!(
            frames,
            [
                ServerFrame::Broadcast {
                    data: json!({"notice": 1})
                },
                ServerFrame::Broadcast {
                    data: json!("second")
                },
            ],
            "{}",
            peer.user
        );
        peer.quiet().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Presence
// ---------------------------------------------------------------------------------------------

fn join(room: &str, peer: &Peer) -> ServerFrame {
    ServerFrame::Join(PresenceNotice {
        room: room.to_owned(),
        user: peer.user.clone(),
        session: peer.session.clone(),
    })
}

fn leave(room: &str, user: &str, session: &str) -> ServerFrame {
    ServerFrame::Leave(PresenceNotice {
        room: room.to_owned(),
        user: user.to_owned(),
        session: session.to_owned(),
    })
}

/// A room's members are the same from every node, and joins and leaves on one node reach the
/// subscribers that asked for presence events on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_its_events_cross_nodes() -> Result<()> {
    let cluster = Cluster::start(1, 3).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let room = "lobby";
    let mut ann = Peer::connect(a, "ann").await?;
    let mut bob = Peer::connect(b, "bob").await?;
    let mut cat = Peer::connect(c, "cat").await?;

    ann.subscribe_with(room, None, true).await?;
    bob.subscribe_with(room, None, true).await?;
    cat.subscribe(room).await?;
    let everyone = set([ann.member(), bob.member(), cat.member()]);
    for node in &cluster.nodes {
        assert_eq!(
            api_presence(node, room).await?,
            everyone,
            "{}",
            node.node_id
        );
    }
    for peer in [&mut ann, &mut bob, &mut cat] {
        assert_eq!(peer.presence(room).await?, everyone, "{}", peer.user);
    }

    cat.unsubscribe(room).await?;
    let cat_session = cat.session.clone();
    let bob_session = bob.session.clone();
    bob.close().await?;
    wait_for(
        "the members after cat and bob left",
        set([ann.member()]),
        || api_presence(c, room),
    )
    .await?;

    // ann saw bob and cat come and go; bob saw cat come and go, never his own join.
    let frames = ann.take(4).await?;
    let cat_join = join(room, &cat);
    assert_eq!(
        frames,
        [
            ServerFrame::Join(PresenceNotice {
                room: room.into(),
                user: "bob".into(),
                session: bob_session.clone(),
            }),
            cat_join,
            leave(room, "cat", &cat_session),
            leave(room, "bob", &bob_session),
        ]
    );
    ann.quiet().await?;
    cat.quiet().await?;
    assert_eq!(api_presence(b, room).await?, set([ann.member()]));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Recovery with `since` on another node
// ---------------------------------------------------------------------------------------------

/// A client that reconnects to another node with `since` gets every message it missed, in
/// order, then live ones, none repeated (also while messages are being published during the
/// resubscribe); a wrong epoch gets `recovered: false` and no replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_recovers_missed_messages_on_another_node() -> Result<()> {
    let cluster = Cluster::start(1, 3).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let room = "feed";

    let mut first = Peer::connect(a, "reader").await?;
    // The room has no state yet: its epoch is made by the first publish.
    assert_eq!(first.subscribe(room).await?.offset, 0);
    for n in 1..=5u64 {
        assert_eq!(api_publish(c, room, json!(n)).await?.offset, n);
    }
    let seen = first.messages(5).await?;
    let last = seen.last().context("five messages")?;
    let epoch = last.epoch.clone();
    assert!(seen.iter().all(|message| message.epoch == epoch));
    let resume = position(last.offset, &last.epoch);
    assert_eq!(resume, position(5, &epoch));
    first.close().await?;

    for n in 6..=10u64 {
        assert_eq!(api_publish(c, room, json!(n)).await?.offset, n);
    }
    let mut second = Peer::connect(b, "reader").await?;
    let reply = second.subscribe_with(room, Some(resume), false).await?;
    assert_eq!(
        (reply.offset, reply.epoch.as_deref(), reply.recovered),
        (Some(10), Some(epoch.as_str()), Some(true))
    );
    assert_eq!(api_publish(a, room, json!(11)).await?.offset, 11);
    let messages = second.messages(6).await?;
    let expected: Vec<(u64, Value)> = (6..=11).map(|n| (n, json!(n))).collect();
    assert_eq!(offsets_and_data(&messages), expected);
    second.quiet().await?;
    second.close().await?;

    // Resubscribe on C while A publishes 12..=80 as fast as it can: the replay and the live
    // stream meet without a gap or a repeat.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let publisher_url = a.http_url("/api/publish");
    let publishing = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut started = Some(started_tx);
        for n in 12..=80u64 {
            let answer: PublishResponse = http
                .post(&publisher_url)
                .json(&json!({"room": "feed", "data": n}))
                .send()
                .await?
                .json()
                .await?;
            ensure!(answer.offset == n, "published {n} at {}", answer.offset);
            if n == 20 {
                let _ = started.take().map(|started| started.send(()));
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    started_rx.await.context("publisher stopped early")?;
    let mut third = Peer::connect(c, "reader").await?;
    let reply = third
        .subscribe_with(room, Some(position(11, &epoch)), false)
        .await?;
    assert_eq!(reply.recovered, Some(true), "{reply:?}");
    publishing.await??;
    let messages = third.messages(69).await?;
    let expected: Vec<(u64, Value)> = (12..=80).map(|n| (n, json!(n))).collect();
    assert_eq!(offsets_and_data(&messages), expected);
    third.quiet().await?;

    // A wrong epoch: not recovered, nothing replayed, live messages follow.
    let mut fourth = Peer::connect(b, "reader").await?;
    let reply = fourth
        .subscribe_with(room, Some(position(3, "not-the-epoch")), false)
        .await?;
    assert_eq!(
        (reply.offset, reply.epoch.as_deref(), reply.recovered),
        (Some(80), Some(epoch.as_str()), Some(false))
    );
    api_publish(c, room, json!(81)).await?;
    let messages = fourth.messages(1).await?;
    assert_eq!(offsets_and_data(&messages), [(81, json!(81))]);

    // The SDK does the same on another node.
    let sdk = Client::connect(
        &a.ws_url(),
        ConnectOptions {
            user: Some("reader".into()),
            ..ConnectOptions::default()
        },
    )
    .await?;
    let subscription = sdk
        .subscribe_with(
            room,
            SubscribeOptions {
                since: Some(position(78, &epoch)),
                presence_events: false,
            },
        )
        .await?;
    assert!(subscription.recovered);
    assert_eq!(subscription.offset, 81);
    let mut offsets = Vec::new();
    while offsets.len() < 3 {
        match tokio::time::timeout(DEADLINE, sdk.next_event()).await? {
            Some(switchboard_client::Event::Message(message)) => offsets.push(message.offset),
            Some(switchboard_client::Event::Connected { .. }) => {}
            other => bail!("expected a message, got {other:?}"),
        }
    }
    assert_eq!(offsets, [79, 80, 81]);
    sdk.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. A node killed with SIGKILL
// ---------------------------------------------------------------------------------------------

/// After `kill -9` of a node, its sessions leave presence (the survivors see leave events) and
/// the registry, and the node leaves the node list, within the node TTL plus one reaper period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_presence_registry_and_the_node_list() -> Result<()> {
    let mut cluster = Cluster::start(1, 3).await?;
    let room = "vigil";
    let (mut watcher, mut vera, mut victor1, mut victor2) = {
        let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
        (
            Peer::connect(a, "watcher").await?,
            Peer::connect(b, "vera").await?,
            Peer::connect(c, "victor").await?,
            Peer::connect(c, "victor").await?,
        )
    };
    watcher.subscribe_with(room, None, true).await?;
    vera.subscribe(room).await?;
    victor1.subscribe(room).await?;
    victor2.subscribe(room).await?;
    let frames = watcher.take(3).await?;
    assert_eq!(
        frames,
        [
            join(room, &vera),
            join(room, &victor1),
            join(room, &victor2)
        ]
    );
    let (a, b) = (cluster.node(0), cluster.node(1));
    assert_eq!(api_send(b, "victor", json!("hi")).await?, 2);
    assert_eq!(
        api_nodes(a).await?,
        BTreeSet::from(["node-a".to_owned(), "node-b".into(), "node-c".into()])
    );
    assert_eq!(numsub(cluster.redis(), room).await?, 3);

    let mut victim = cluster.nodes.pop().context("three nodes")?;
    send_signal(victim.pid(), "9")?;
    let killed = Instant::now();
    victim.wait_exit(DEADLINE).await?;
    drop(victim);
    let (a, b) = (cluster.node(0), cluster.node(1));

    let survivors = set([watcher.member(), vera.member()]);
    wait_for(
        "the members without the killed node's",
        survivors.clone(),
        || api_presence(b, room),
    )
    .await?;
    wait_for("victor's sessions", 0, || {
        api_send(a, "victor", json!("gone?"))
    })
    .await?;
    wait_for(
        "the node list",
        BTreeSet::from(["node-a".to_owned(), "node-b".into()]),
        || api_nodes(b),
    )
    .await?;
    let mut leaves = BTreeSet::new();
    for frame in watcher.take(2).await? {
        match frame {
            ServerFrame::Leave(notice) => leaves.insert((notice.user, notice.session)),
            other => bail!("expected a leave, got {other:?}"),
        };
    }
    let elapsed = killed.elapsed();
    assert_eq!(leaves, set([victor1.member(), victor2.member()]));
    // The liveness key expires within one TTL of the kill and the reaper runs every TTL.
    let bound = NODE_TTL * 2 + Duration::from_secs(1);
    assert!(
        elapsed < bound,
        "the dead node was gone after {elapsed:?}, not within {bound:?}"
    );
    assert_eq!(api_presence(a, room).await?, survivors);
    assert_eq!(numsub(cluster.redis(), room).await?, 2);

    // The survivors carry on, on the pub/sub connections they started with (kept alive by
    // pings every third of the TTL all along).
    assert_eq!(vera.publish(room, json!("still here")).await?, 1);
    let message = watcher.messages(1).await?;
    assert_eq!(offsets_and_data(&message), [(1, json!("still here"))]);
    watcher.quiet().await?;
    for node in &cluster.nodes {
        assert_eq!(node.metric(&reconnects(0)).await?, 0.0, "{}", node.node_id);
        assert_eq!(readyz(node).await?, 200);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Redis killed and restarted
// ---------------------------------------------------------------------------------------------

/// While Redis is down the nodes stay up, report not ready and refuse requests with
/// `unavailable`; once it is back (empty) they reconnect, subscribe their rooms again, write
/// their sessions and presence again and deliver what was published while they reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_is_survived_and_state_restored() -> Result<()> {
    let mut cluster = Cluster::start(1, 2).await?;
    let room = "weather";
    let (mut sam, mut ada, mut pat) = {
        let (a, b) = (cluster.node(0), cluster.node(1));
        (
            Peer::connect(b, "sam").await?,
            Peer::connect(a, "ada").await?,
            Peer::connect(a, "pat").await?,
        )
    };
    let sdk = Client::connect(
        &cluster.node(1).ws_url(),
        ConnectOptions {
            user: Some("sue".into()),
            ..ConnectOptions::default()
        },
    )
    .await?;
    let old_epoch = sam.subscribe(room).await?.epoch;
    ada.subscribe_with(room, None, true).await?;
    assert_eq!(pat.publish(room, json!("before")).await?, 1);
    for peer in [&mut sam, &mut ada] {
        assert_eq!(
            offsets_and_data(&peer.messages(1).await?),
            [(1, json!("before"))]
        );
    }

    cluster.redis[0].kill();
    for node in &cluster.nodes {
        wait_for("/readyz while Redis is down", 503, || readyz(node)).await?;
    }
    let frame = pat.publish_frame(room, json!("lost"));
    match pat.ask(frame).await? {
        Err(error) => assert_eq!(error.code, ErrorCode::Unavailable, "{error:?}"),
        Ok(reply) => bail!("a publish succeeded while Redis was down: {reply:?}"),
    }
    match sdk.publish(room, json!("lost")).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Unavailable),
        other => bail!("expected unavailable, got {other:?}"),
    }
    match sdk.subscribe("new-room").await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Unavailable),
        other => bail!("expected unavailable, got {other:?}"),
    }
    for (path, body) in [
        ("/api/publish", json!({"room": room, "data": "lost"})),
        ("/api/send", json!({"user": "sam", "data": "lost"})),
        ("/api/broadcast", json!({"data": "lost"})),
    ] {
        let (status, answer) = api(cluster.node(0), "POST", path, Some(body)).await?;
        assert_eq!(status, 503, "{path}: {answer}");
        let error: ApiError = serde_json::from_value(answer)?;
        assert_eq!(error.code, "unavailable");
    }
    let (status, _) = api(cluster.node(1), "GET", "/api/presence/weather", None).await?;
    assert_eq!(status, 503);
    for node in &mut cluster.nodes {
        assert!(node.is_running(), "{} crashed", node.node_id);
        assert_eq!(
            node.metric("switchboard_redis_shard_up{shard=\"0\"}")
                .await?,
            0.0
        );
    }
    // Sessions stay open through the outage.
    sam.quiet().await?;
    ada.quiet().await?;

    cluster.redis[0].restart().await?;
    // Published as soon as Redis answers, likely before the nodes' pub/sub connections are
    // back: the nodes replay it from history when they reconnect.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let during = loop {
        match api(
            cluster.node(0),
            "POST",
            "/api/publish",
            Some(json!({"room": room, "data": "during"})),
        )
        .await?
        {
            (200, answer) => break serde_json::from_value::<PublishResponse>(answer)?,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            (status, answer) => bail!("publish after the restart: {status} {answer}"),
        }
    };
    assert_eq!(during.offset, 1, "Redis came back empty: a new stream");
    assert_ne!(
        during.epoch, old_epoch,
        "history was lost, so the epoch changed"
    );
    for node in &cluster.nodes {
        node.wait_ready().await?;
        assert!(node.metric(&reconnects(0)).await? >= 1.0);
    }

    // The subscriptions of before work again.
    assert_eq!(pat.publish(room, json!("after")).await?, 2);
    for peer in [&mut sam, &mut ada] {
        let messages = peer.messages(2).await?;
        assert_eq!(
            offsets_and_data(&messages),
            [(1, json!("during")), (2, json!("after"))],
            "{}",
            peer.user
        );
        assert!(messages.iter().all(|message| message.epoch == during.epoch));
        peer.quiet().await?;
    }
    // Presence and the registry were written again.
    let members = set([sam.member(), ada.member()]);
    assert_eq!(api_presence(cluster.node(0), room).await?, members);
    assert_eq!(sam.presence(room).await?, members);
    assert_eq!(
        api_send(cluster.node(0), "sam", json!("found you")).await?,
        1
    );
    assert_eq!(expect_direct(&sam.next().await?)?.0, json!("found you"));
    assert_eq!(pat.send("sue", json!("and you")).await?, 1);
    assert_eq!(
        api_nodes(cluster.node(1)).await?,
        BTreeSet::from(["node-a".to_owned(), "node-b".into()])
    );
    // Presence events flow again.
    let mut late = Peer::connect(cluster.node(1), "late").await?;
    late.subscribe(room).await?;
    assert_eq!(ada.next().await?, join(room, &late));
    ada.quiet().await?;
    sdk.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Two Redis shards
// ---------------------------------------------------------------------------------------------

/// With two shards, rooms and users spread over both, and room delivery, directed sends,
/// broadcast (each node once), presence and `since` recovery all still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_spread_rooms_and_keep_every_guarantee() -> Result<()> {
    let cluster = Cluster::start(2, 3).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let mut on_b = Peer::connect(b, "bea").await?;
    let mut on_c = Peer::connect(c, "cid").await?;
    let mut on_a = Peer::connect(a, "ann").await?;
    // Rooms until each shard has at least four (the ring hashes the shards' URLs, whose ports
    // change from run to run, so which room lands where does too).
    let mut rooms: Vec<String> = Vec::new();
    let mut per_shard = [0; 2];
    while per_shard.iter().any(|count| *count < 4) {
        ensure!(
            rooms.len() < 64,
            "64 rooms and still {per_shard:?} per shard"
        );
        let room = format!("room-{}", rooms.len());
        on_b.subscribe(&room).await?;
        on_c.subscribe_with(&room, None, true).await?;
        let shard = shard_of(&cluster, &format!("sb:r:{room}:presence")).await?;
        per_shard[shard] += 1;
        rooms.push(room);
    }

    // Each room's channel is on exactly one shard, the one with its stream.
    let shard0 = room_channels(&cluster.redis[0]).await?;
    let shard1 = room_channels(&cluster.redis[1]).await?;
    assert!(
        shard0.len() >= 4 && shard1.len() >= 4,
        "{shard0:?} / {shard1:?}"
    );
    assert!(shard0.is_disjoint(&shard1));
    let all: BTreeSet<String> = shard0.union(&shard1).cloned().collect();
    assert_eq!(all, rooms.iter().cloned().collect::<BTreeSet<_>>());
    for room in &rooms {
        let shard = shard_of(&cluster, &format!("sb:r:{room}:presence")).await?;
        let channels = if shard == 0 { &shard0 } else { &shard1 };
        assert!(
            channels.contains(room),
            "{room}'s channel is not on its shard {shard}"
        );
        assert_eq!(
            numsub(&cluster.redis[shard], room).await?,
            2,
            "{room}: nodes B and C"
        );
    }

    // Room delivery: two rounds; every subscriber gets each room's [1, 2] exactly.
    for round in 1..=2u64 {
        for room in &rooms {
            assert_eq!(on_a.publish(room, json!([room, round])).await?, round);
        }
    }
    for peer in [&mut on_b, &mut on_c] {
        let messages = peer.messages(rooms.len() * 2).await?;
        let mut by_room: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for message in &messages {
            assert_eq!(message.data, json!([message.room, message.offset]));
            by_room
                .entry(message.room.clone())
                .or_default()
                .push(message.offset);
        }
        assert_eq!(by_room.len(), rooms.len(), "{}", peer.user);
        assert!(
            by_room.values().all(|offsets| offsets == &[1, 2]),
            "{by_room:?}"
        );
        peer.quiet().await?;
    }

    // Presence of every room, from a node with no subscriber at all.
    let members = set([on_b.member(), on_c.member()]);
    for room in &rooms {
        assert_eq!(api_presence(a, room).await?, members, "{room}");
    }

    // Directed sends to users on both shards (at least three on each), each with a session on
    // B and one on C.
    let mut users: Vec<String> = Vec::new();
    let mut sessions = Vec::new();
    let mut per_shard = [0; 2];
    while per_shard.iter().any(|count| *count < 3) {
        ensure!(
            users.len() < 64,
            "64 users and still {per_shard:?} per shard"
        );
        let user = format!("user-{}", users.len());
        sessions.push(Peer::connect(b, &user).await?);
        sessions.push(Peer::connect(c, &user).await?);
        per_shard[shard_of(&cluster, &format!("sb:u:{user}")).await?] += 1;
        users.push(user);
    }
    for user in &users {
        assert_eq!(on_a.send(user, json!(["first", user])).await?, 2);
        assert_eq!(api_send(a, user, json!(["second", user])).await?, 2);
    }
    for peer in &mut sessions {
        let frames = peer.take(2).await?;
        let got: Vec<Value> = frames
            .iter()
            .map(|frame| expect_direct(frame).map(|(data, _)| data))
            .collect::<Result<_>>()?;
        assert_eq!(
            got,
            [json!(["first", peer.user]), json!(["second", peer.user])]
        );
        peer.quiet().await?;
    }

    // Broadcast: every node once, whatever the number of shards.
    for data in [json!("one"), json!("two")] {
        let answer: BroadcastResponse =
            api_ok(b, "POST", "/api/broadcast", Some(json!({"data": data}))).await?;
        assert_eq!(answer.nodes, 3);
    }
    let mut everyone: Vec<&mut Peer> = vec![&mut on_a, &mut on_b, &mut on_c];
    everyone.extend(sessions.iter_mut());
    for peer in everyone {
        let frames = peer.take(2).await?;
        assert_eq!(
            frames,
            [
                ServerFrame::Broadcast { data: json!("one") },
                ServerFrame::Broadcast { data: json!("two") },
            ],
            "{}",
            peer.user
        );
        peer.quiet().await?;
    }

    // Presence events and `since` recovery, for one room on each shard.
    let picks = [
        shard0.iter().next().context("a room on shard 0")?.clone(),
        shard1.iter().next().context("a room on shard 1")?.clone(),
    ];
    let epochs = {
        let mut epochs = Vec::new();
        for room in &picks {
            epochs.push(on_a.subscribe(room).await?.epoch);
        }
        epochs
    };
    for room in &picks {
        assert_eq!(on_c.next().await?, join(room, &on_a));
    }
    on_c.quiet().await?;
    on_b.close().await?;
    for (room, epoch) in picks.iter().zip(&epochs) {
        for n in 3..=5u64 {
            assert_eq!(api_publish(c, room, json!(n)).await?.offset, n);
        }
        let mut back = Peer::connect(a, "bea").await?;
        let reply = back
            .subscribe_with(room, Some(position(2, epoch)), false)
            .await?;
        assert_eq!(reply.recovered, Some(true), "{room}: {reply:?}");
        assert_eq!(reply.offset, Some(5));
        let messages = back.messages(3).await?;
        let expected: Vec<(u64, Value)> = (3..=5).map(|n| (n, json!(n))).collect();
        assert_eq!(offsets_and_data(&messages), expected, "{room}");
        back.quiet().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A node paused past its TTL
// ---------------------------------------------------------------------------------------------

/// A node that stops (SIGSTOP) longer than its TTL is reaped like a dead one; when it resumes
/// it must put its sessions and presence back, or its users stay unreachable for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_ttl_comes_back_whole() -> Result<()> {
    let cluster = Cluster::start(1, 2).await?;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let room = "nap";
    let mut watcher = Peer::connect(a, "watcher").await?;
    let mut sleeper = Peer::connect(b, "sleeper").await?;
    watcher.subscribe_with(room, None, true).await?;
    sleeper.subscribe(room).await?;
    assert_eq!(watcher.next().await?, join(room, &sleeper));
    let both = set([watcher.member(), sleeper.member()]);
    assert_eq!(api_presence(a, room).await?, both);

    send_signal(b.pid(), "STOP")?;
    let resumed = async {
        wait_for("the paused node's user", 0, || {
            api_send(a, "sleeper", json!("asleep"))
        })
        .await?;
        wait_for("the members while paused", set([watcher.member()]), || {
            api_presence(a, room)
        })
        .await?;
        assert_eq!(
            watcher.next().await?,
            leave(room, "sleeper", &sleeper.session)
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    send_signal(b.pid(), "CONT")?;
    resumed?;

    wait_for("the resumed node's user", 1, || {
        api_send(a, "sleeper", json!("awake"))
    })
    .await?;
    wait_for("the members after the resume", both, || {
        api_presence(a, room)
    })
    .await?;
    assert_eq!(watcher.next().await?, join(room, &sleeper));
    wait_for(
        "the node list",
        BTreeSet::from(["node-a".to_owned(), "node-b".into()]),
        || api_nodes(a),
    )
    .await?;
    // The sleeper's session works throughout. Sends made before its liveness expired were
    // delivered when it resumed, before the one that found it back.
    loop {
        let frame = sleeper.next().await?;
        match expect_direct(&frame)?.0 {
            data if data == json!("asleep") => {}
            data => {
                assert_eq!(data, json!("awake"));
                break;
            }
        }
    }
    assert_eq!(watcher.publish(room, json!("morning")).await?, 1);
    let messages = sleeper.messages(1).await?;
    assert_eq!(offsets_and_data(&messages), [(1, json!("morning"))]);
    // Redis kept the paused node's pub/sub connection: it was not a reconnect that wrote the
    // entries back, but the heartbeat that found the node's liveness key gone.
    assert_eq!(b.metric(&reconnects(0)).await?, 0.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Redis unreachable while a session closes
// ---------------------------------------------------------------------------------------------

/// A session that closes while Redis does not answer cannot be removed from the registry and
/// presence then; once Redis answers again (with its data), the node must remove it, or it stays
/// listed (and counted by sends) for as long as the node lives. The outage: Redis holds every
/// write (`CLIENT PAUSE WRITE`) until the node's calls time out, then drops the held calls with
/// the connections that made them (`CLIENT KILL TYPE normal`), as a network cut would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closed_during_an_outage_leaves_no_ghost() -> Result<()> {
    // Heartbeats are held too: a TTL longer than the outage keeps both nodes alive through it.
    let cluster = Cluster::start_with_ttl(1, 2, Duration::from_secs(10)).await?;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let redis = cluster.redis();
    let room = "haunt";
    let mut watcher = Peer::connect(a, "watcher").await?;
    let mut ghost = Peer::connect(b, "gus").await?;
    watcher.subscribe_with(room, None, true).await?;
    ghost.subscribe(room).await?;
    assert_eq!(watcher.next().await?, join(room, &ghost));
    let ghost_member = ghost.member();

    redis.cli(&["CLIENT", "PAUSE", "8000", "WRITE"]).await?;
    let outage = async {
        ghost.close().await?;
        // The node gives up on Redis (2 s per call) for the presence leave, then the registry.
        b.wait_metric(
            "switchboard_broker_errors_total{op=\"unregister_session\"}",
            1.0,
        )
        .await?;
        ensure!(
            b.metric("switchboard_broker_errors_total{op=\"leave_presence\"}")
                .await?
                >= 1.0
        );
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).await?;
        ensure!(killed.parse::<u32>()? >= 1, "killed {killed}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    redis.cli(&["CLIENT", "UNPAUSE"]).await?;
    outage?;

    wait_for("gus's sessions after the outage", 0, || {
        api_send(a, "gus", json!("anyone?"))
    })
    .await?;
    wait_for(
        "the members after the outage",
        set([watcher.member()]),
        || api_presence(a, room),
    )
    .await?;
    assert_eq!(
        watcher.next().await?,
        leave(room, &ghost_member.0, &ghost_member.1)
    );
    watcher.quiet().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Redis over TLS

/// A `redis-server` that speaks only TLS, with a certificate for 127.0.0.1 signed by a throwaway
/// CA (made with the `openssl` CLI); killed, and its directory removed, on drop.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    certs: TestCerts,
}

impl TlsRedis {
    async fn start() -> Result<TlsRedis> {
        let certs = TestCerts::new()?;
        let mut last_error = None;
        // A port found free may be taken before redis-server binds it: then try another.
        for _ in 0..5 {
            let port = free_port()?;
            let mut child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--tls-auth-clients", "no"])
                .args([
                    "--tls-cert-file",
                    "server.pem",
                    "--tls-key-file",
                    "server.key",
                ])
                .args(["--tls-ca-cert-file", "ca.pem"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .current_dir(certs.dir())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("spawning redis-server (install the redis-server package)")?;
            match wait_listening(&mut child, port).await {
                Ok(()) => return Ok(TlsRedis { child, port, certs }),
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("redis-server did not start")))
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn ca_file(&self) -> Result<String> {
        self.certs.path("ca.pem")
    }
}

/// Waits until `child` (a redis-server) accepts TCP connections on `port`.
async fn wait_listening(child: &mut std::process::Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("redis-server exited with {status}");
        }
        ensure!(
            Instant::now() < deadline,
            "redis-server on TLS port {port} did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rediss:// shards: nodes given the private CA (--redis-ca-file) form a cluster over TLS; a node
/// without it refuses the server's certificate (the built-in roots do not hold that CA), so it
/// stays not ready and logs why — the certificate is verified, not merely encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_shards_verify_the_certificate_against_the_redis_ca_file() -> Result<()> {
    let redis = TlsRedis::start().await?;
    let url = redis.url();
    let ca = redis.ca_file()?;
    let ttl = NODE_TTL.as_millis().to_string();
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b"] {
        nodes.push(
            NodeProcess::start(&[
                "--redis",
                &url,
                "--redis-ca-file",
                &ca,
                "--node-id",
                id,
                "--node-ttl-ms",
                &ttl,
            ])
            .await?,
        );
    }
    for node in &nodes {
        node.wait_ready().await?;
    }
    let mut on_a = Peer::connect(&nodes[0], "ann").await?;
    let mut on_b = Peer::connect(&nodes[1], "bea").await?;
    on_a.subscribe("sealed").await?;
    let offset = on_b.publish("sealed", json!("over TLS")).await?;
    let received = on_a.messages(1).await?;
    assert_eq!(
        (received[0].offset, &received[0].data),
        (offset, &json!("over TLS"))
    );
    on_a.quiet().await?;

    let untrusting = NodeProcess::start(&["--redis", &url, "--node-id", "node-c"]).await?;
    wait_until("node-c to log the refused certificate", || {
        let logs = untrusting.logs();
        async move {
            logs.iter().any(|line| {
                line.contains("cannot connect to redis shard") && line.contains("UnknownIssuer")
            })
        }
    })
    .await?;
    // Still refused after retries: never up, never ready.
    untrusting
        .wait_metric("switchboard_redis_errors_total{shard=\"0\"}", 3.0)
        .await?;
    assert_eq!(
        untrusting
            .metric("switchboard_redis_shard_up{shard=\"0\"}")
            .await?,
        0.0
    );
    assert_eq!(readyz(&untrusting).await?, 503);
    Ok(())
}
