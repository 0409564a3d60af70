//! The fallback transports in a cluster, behind a real HAProxy run from
//! `deploy/haproxy/haproxy.cfg`: two real nodes and one real `redis-server`. An SSE session's
//! stream is on one node while its POSTs go through HAProxy, which spreads them over both nodes
//! (the other one forwards its share through Redis); a long-poll session works through HAProxy
//! because its polls stick to its node (the other node answers a poll with 421); and after
//! `kill -9` of a stream's node, a new SSE session on the other node resumes with `since` and
//! misses nothing. HAProxy passes SSE events on at once (no 200 ms hold of small chunks), and
//! both shipped HAProxy configs outlast the node's heartbeat and long poll.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::haproxy::{Backend, HaproxyProcess};
use switchboard_e2e::transport::{Auth, Event, Options, Transport, TransportClient, post_frames};
use switchboard_e2e::{NodeProcess, RedisProcess, binary, wait_until, workspace_file};
use switchboard_protocol::{ClientFrame, PresenceNotice, ServerFrame, StreamPosition};

/// One test at a time: each runs a whole cluster on 2 shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// HAProxy's check interval here (production: 2 s).
const CHECK_INTERVAL: Duration = Duration::from_millis(100);

const SENT: &str = "switchboard_forwarded_frames_total{result=\"sent\"}";
const RECEIVED: &str = "switchboard_forwarded_frames_total{result=\"received\"}";

struct Cluster {
    _redis: RedisProcess,
    nodes: Vec<NodeProcess>,
    haproxy: HaproxyProcess,
}

impl Cluster {
    async fn start() -> Result<Cluster> {
        let redis = RedisProcess::start().await?;
        let mut nodes = Vec::new();
        for index in 1..=2 {
            nodes.push(
                NodeProcess::start(&[
                    "--redis",
                    &redis.url(),
                    "--node-id",
                    &format!("fallback-{index}"),
                    // A dropped SSE stream is noticed when a heartbeat cannot be written.
                    "--heartbeat-ms",
                    "1000",
                    "--history-size",
                    "1000",
                    // A killed node is dead for the cluster (its links gone) within 3 s.
                    "--node-ttl-ms",
                    "3000",
                ])
                .await?,
            );
        }
        for node in &nodes {
            node.wait_ready().await?;
        }
        let backends: Vec<Backend> = nodes.iter().map(Backend::from).collect();
        let haproxy = HaproxyProcess::start(&backends, CHECK_INTERVAL).await?;
        Ok(Cluster {
            _redis: redis,
            nodes,
            haproxy,
        })
    }

    /// The node whose id is `id`, and the index of the other one.
    fn by_id(&self, id: &str) -> Result<(usize, usize)> {
        let index = self
            .nodes
            .iter()
            .position(|node| node.node_id == id)
            .with_context(|| format!("no node {id}"))?;
        Ok((index, 1 - index))
    }
}

/// Reads frames (skipping the others) until `pick` takes one.
async fn until<T>(
    client: &mut TransportClient,
    what: &str,
    mut pick: impl FnMut(&ServerFrame) -> Option<T>,
) -> Result<T> {
    loop {
        let frame = client
            .next_frame()
            .await
            .with_context(|| format!("waiting for {what}"))?;
        if let Some(found) = pick(&frame) {
            return Ok(found);
        }
    }
}

fn subscribe(room: &str, id: u64, since: Option<StreamPosition>) -> ClientFrame {
    ClientFrame::Subscribe {
        room: room.to_owned(),
        id: Some(id),
        since,
        presence_events: true,
    }
}

/// Publishes and waits for the reply (skipping the rest: a subscribed publisher also gets its
/// own message, before or after the reply); returns the offset.
async fn publish(client: &mut TransportClient, room: &str, data: Value, id: u64) -> Result<u64> {
    client
        .send(&ClientFrame::Publish {
            room: room.to_owned(),
            data,
            id: Some(id),
            key: None,
        })
        .await?;
    until(client, "the publish reply", |frame| match frame {
        ServerFrame::Reply(reply) if reply.id == id => reply.offset,
        _ => None,
    })
    .await
}

/// Waits for the room message with `data` (skipping the rest); returns its offset and sender.
async fn message(client: &mut TransportClient, data: &Value) -> Result<(u64, Option<String>)> {
    until(
        client,
        &format!("the message {data}"),
        |frame| match frame {
            ServerFrame::Message(message) if &message.data == data => Some((
                message.offset,
                message.from.as_ref().map(|from| from.user.clone()),
            )),
            _ => None,
        },
    )
    .await
}

/// Sends `count` pings, one POST each, and waits for every pong (in any order: two POSTs that
/// reached different nodes may overtake each other on their way to the session).
async fn ping_each(client: &mut TransportClient, ids: std::ops::Range<u64>) -> Result<()> {
    for id in ids.clone() {
        client.send(&ClientFrame::Ping { id: Some(id) }).await?;
    }
    let mut missing: BTreeSet<u64> = ids.collect();
    while !missing.is_empty() {
        let frame = client
            .next_frame()
            .await
            .with_context(|| format!("pongs {missing:?} missing"))?;
        if let ServerFrame::Pong { id: Some(id) } = frame {
            ensure!(missing.remove(&id), "pong {id} twice or unasked");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_on_one_node_is_fed_by_posts_through_haproxy_to_both() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    let (stream_node, other_node) = (&cluster.nodes[0], &cluster.nodes[1]);

    // The stream straight to node 1; every POST through HAProxy.
    let through_haproxy = Options {
        headers: &[],
        post_to: Some(cluster.haproxy.public),
    };
    let mut alice = TransportClient::connect_with(
        Transport::Sse,
        stream_node.public,
        Auth::User("alice"),
        &through_haproxy,
    )
    .await?;
    ensure!(alice.node == stream_node.node_id);
    let mut bob =
        TransportClient::connect(Transport::WebSocket, other_node.public, Auth::User("bob"))
            .await?;
    bob.reply(&subscribe("square", 1, None)).await?;

    // Presence: bob, on the other node, hears alice join.
    let reply = alice.reply(&subscribe("square", 1, None)).await?;
    ensure!(reply.room.as_deref() == Some("square"), "{reply:?}");
    let alice_notice = PresenceNotice {
        room: "square".into(),
        user: "alice".into(),
        session: alice.session.clone(),
    };
    ensure!(bob.next_frame().await? == ServerFrame::Join(alice_notice.clone()));

    // Requests spread over both nodes: every answer comes down the one stream.
    ping_each(&mut alice, 100..140).await?;
    let forwarded = other_node.metric(SENT).await?;
    ensure!(
        forwarded >= 1.0,
        "no POST reached the other node through HAProxy (forwarded {forwarded})"
    );
    let received = stream_node.wait_metric(RECEIVED, forwarded).await?;
    ensure!(
        stream_node.metric(SENT).await? == 0.0,
        "the stream's node forwarded its own session's frames"
    );
    eprintln!("of 40 POSTs, {forwarded} went to the other node and were forwarded ({received})");

    // Room messages both ways, and a reply with its offset.
    let offset = publish(&mut alice, "square", json!("from alice"), 2).await?;
    let (received, from) = message(&mut bob, &json!("from alice")).await?;
    ensure!(received == offset && from.as_deref() == Some("alice"));
    let offset = publish(&mut bob, "square", json!("from bob"), 2).await?;
    let (received, from) = message(&mut alice, &json!("from bob")).await?;
    ensure!(received == offset && from.as_deref() == Some("bob"));

    // Directs both ways; presence lists both.
    bob.send(&ClientFrame::Send {
        to: "alice".into(),
        data: json!("psst"),
        id: Some(3),
        persist: false,
        key: None,
    })
    .await?;
    let reached = until(&mut bob, "the send reply", |frame| match frame {
        ServerFrame::Reply(reply) if reply.id == 3 => Some(reply.sessions),
        _ => None,
    })
    .await?;
    ensure!(
        reached == Some(1),
        "bob's direct reached {reached:?} sessions"
    );
    until(&mut alice, "bob's direct", |frame| {
        matches!(frame, ServerFrame::Direct { data, .. } if data == &json!("psst")).then_some(())
    })
    .await?;
    alice
        .send(&ClientFrame::Send {
            to: "bob".into(),
            data: json!("back"),
            id: Some(4),
            persist: false,
            key: None,
        })
        .await?;
    until(&mut bob, "alice's direct", |frame| {
        matches!(frame, ServerFrame::Direct { data, .. } if data == &json!("back")).then_some(())
    })
    .await?;
    alice
        .send(&ClientFrame::Presence {
            room: "square".into(),
            id: 5,
        })
        .await?;
    let members = until(&mut alice, "the presence reply", |frame| match frame {
        ServerFrame::Reply(reply) if reply.id == 5 => reply.members.clone(),
        _ => None,
    })
    .await?;
    let users: BTreeSet<_> = members.iter().map(|member| member.user.as_str()).collect();
    ensure!(users == BTreeSet::from(["alice", "bob"]), "{members:?}");

    // Alice's stream ends: she leaves, on every node.
    alice.close().await;
    until(&mut bob, "alice's leave", |frame| {
        (frame == &ServerFrame::Leave(alice_notice.clone())).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_session_through_haproxy_sticks_to_its_node() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    // Opened, polled and fed through HAProxy, as a browser behind it does.
    let mut carol =
        TransportClient::connect(Transport::Poll, cluster.haproxy.public, Auth::User("carol"))
            .await?;
    let (home, away) = cluster.by_id(&carol.node)?;
    let (home, away) = (&cluster.nodes[home], &cluster.nodes[away]);
    let mut dave =
        TransportClient::connect(Transport::WebSocket, away.public, Auth::User("dave")).await?;

    carol.reply(&subscribe("porch", 1, None)).await?;
    // Each pong needs a poll: every poll must have reached carol's node, or the reader would
    // have ended on a 421.
    ping_each(&mut carol, 100..130).await?;
    let polls = home
        .metric("switchboard_fallback_requests_total{endpoint=\"poll\",result=\"ok\"}")
        .await?;
    ensure!(polls >= 2.0, "only {polls} polls answered");
    let misrouted = "switchboard_fallback_requests_total{endpoint=\"poll\",result=\"wrong_node\"}";
    ensure!(
        away.metric(misrouted).await? == 0.0,
        "HAProxy sent a poll to the wrong node"
    );
    let forwarded = away.metric(SENT).await?;
    ensure!(forwarded >= 1.0, "no POST went to the other node");

    // A room message from the other node arrives by poll.
    let offset = publish(&mut dave, "porch", json!("knock"), 1).await?;
    ensure!(message(&mut carol, &json!("knock")).await?.0 == offset);
    // Carol's publish reaches dave.
    dave.reply(&subscribe("porch", 2, None)).await?;
    until(&mut carol, "dave's join", |frame| {
        matches!(frame, ServerFrame::Join(notice) if notice.user == "dave").then_some(())
    })
    .await?;
    let offset = publish(&mut carol, "porch", json!("who's there"), 2).await?;
    ensure!(message(&mut dave, &json!("who's there")).await?.0 == offset);

    // The session's poll sent straight to the other node: 421, and the session lives on.
    let answer = carol.poll_at(away.public).await?;
    answer.expect(421, Some("wrong_node"))?;
    away.wait_metric(misrouted, 1.0).await?;
    ping_each(&mut carol, 200..201).await?;

    // The DELETE that ends the session sticks to its node too: 204, and the session is gone.
    let answer = carol.delete_at(cluster.haproxy.public).await?;
    answer.expect(204, None)?;
    wait_until("the poll session gone from its node", || async {
        home.metric("switchboard_sessions{transport=\"poll\"}")
            .await
            .is_ok_and(|sessions| sessions == 0.0)
    })
    .await?;
    let misrouted_delete =
        "switchboard_fallback_requests_total{endpoint=\"delete\",result=\"wrong_node\"}";
    ensure!(
        away.metric(misrouted_delete).await? == 0.0,
        "HAProxy sent the DELETE to the wrong node"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill_9_of_its_node_an_sse_client_resumes_on_the_other_with_nothing_lost()
-> Result<()> {
    const ROOM: &str = "ticker";
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await?;
    let mut client =
        TransportClient::connect(Transport::Sse, cluster.haproxy.public, Auth::User("erin"))
            .await?;
    let (doomed, survivor) = cluster.by_id(&client.node)?;
    let reply = client.reply(&subscribe(ROOM, 1, None)).await?;
    ensure!(reply.offset == Some(0), "{reply:?}");

    // A backend publishes a numbered stream through the surviving node's API.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, published) = (stop.clone(), published.clone());
        let url = cluster.nodes[survivor].http_url("/api/publish");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let response = http
                    .post(&url)
                    .json(&json!({"room": ROOM, "data": {"n": n}}))
                    .send()
                    .await?;
                ensure!(
                    response.status() == 200,
                    "publish {n}: {}",
                    response.status()
                );
                let offset = response.json::<Value>().await?["offset"].as_u64();
                ensure!(offset == Some(n), "publish {n} got offset {offset:?}");
                published.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(n)
        })
    };

    // Read a while, then the node dies under the stream.
    let mut epoch = String::new();
    let mut last = 0;
    while last < 20 {
        let frame = client.next_frame().await?;
        if let ServerFrame::Message(message) = frame {
            ensure!(message.offset == last + 1, "after {last}: {message:?}");
            last = message.offset;
            epoch.clone_from(&message.epoch);
        }
    }
    cluster.nodes[doomed].kill()?;
    loop {
        match client.next_event().await? {
            Event::Frame(ServerFrame::Message(message)) => {
                ensure!(message.offset == last + 1, "after {last}: {message:?}");
                last = message.offset;
            }
            Event::Frame(_) => {}
            Event::Ended(_) => break,
            Event::Closed(code) => bail!("a killed node sent close {code}"),
        }
    }
    let seen_before = last;
    // The dead node's session is gone for every POST: 404 once the cluster knows it is dead.
    let old_session = client.session.clone();
    let old_key = client.session_key.clone();
    let haproxy_base = format!("http://{}", cluster.haproxy.public);
    let http = reqwest::Client::new();
    wait_until(
        "a POST for the dead node's session to answer 404",
        || async {
            post_frames(
                &http,
                &haproxy_base,
                Transport::Sse,
                &old_session,
                old_key.as_deref(),
                r#"{"type":"ping"}"#,
            )
            .await
            .is_ok_and(|answer| answer.status == 404)
        },
    )
    .await?;

    // Back through HAProxy: the only node left, from where the old stream stopped.
    let mut client =
        TransportClient::connect(Transport::Sse, cluster.haproxy.public, Auth::User("erin"))
            .await?;
    ensure!(
        client.node == cluster.nodes[survivor].node_id,
        "reopened on {}",
        client.node
    );
    let since = StreamPosition {
        offset: last,
        epoch: epoch.clone(),
    };
    let reply = client.reply(&subscribe(ROOM, 2, Some(since))).await?;
    ensure!(reply.recovered == Some(true), "{reply:?}");
    wait_until("the publisher to go on after the resume", || {
        let published = published.clone();
        async move { published.load(Ordering::SeqCst) >= seen_before + 30 }
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    let total = publisher.await??;
    while last < total {
        let frame = client
            .next_frame()
            .await
            .with_context(|| format!("after offset {last} of {total}"))?;
        if let ServerFrame::Message(message) = frame {
            ensure!(
                message.offset == last + 1
                    && message.epoch == epoch
                    && message.data == json!({"n": message.offset}),
                "after {last}: {message:?}"
            );
            last = message.offset;
        }
    }
    eprintln!("{seen_before} messages before the kill, {total} in all, none lost or repeated");
    client.expect_ping_pong(3).await
}

/// HAProxy passes each SSE event on at once. Without `option http-no-delay` it holds the small
/// chunks of a response of unknown length for about 200 ms (measured: a ping's pong took 208 ms
/// through HAProxy without it, 1.2 ms with it); the median here must stay far below that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_through_haproxy_are_not_held_back() -> Result<()> {
    const PINGS: u64 = 21;
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    let mut client =
        TransportClient::connect(Transport::Sse, cluster.haproxy.public, Auth::User("quick"))
            .await?;
    let (home, _) = cluster.by_id(&client.node)?;
    // The POSTs straight to the session's node: only the stream passes HAProxy.
    let base = format!("http://{}", cluster.nodes[home].public);
    let (session, key) = (client.session.clone(), client.session_key.clone());
    let http = reqwest::Client::new();
    let mut round_trips = Vec::new();
    for id in 0..PINGS {
        let started = tokio::time::Instant::now();
        post_frames(
            &http,
            &base,
            Transport::Sse,
            &session,
            key.as_deref(),
            format!(r#"{{"type":"ping","id":{id}}}"#),
        )
        .await?
        .expect(202, None)?;
        until(&mut client, "the pong", |frame| {
            (frame == &ServerFrame::Pong { id: Some(id) }).then_some(())
        })
        .await?;
        round_trips.push(started.elapsed());
    }
    round_trips.sort();
    let median = round_trips[round_trips.len() / 2];
    eprintln!(
        "ping to pong through HAProxy's SSE stream: median {median:?}, max {:?}",
        round_trips.last()
    );
    ensure!(
        median < Duration::from_millis(100),
        "median ping-pong {median:?}: HAProxy holds SSE events back"
    );
    Ok(())
}

/// The default of `flag` in `switchboard --help`, in milliseconds.
fn help_default_ms(help: &str, flag: &str) -> Result<Duration> {
    let default = help
        .split(flag)
        .nth(1)
        .and_then(|after| after.split("[default: ").nth(1))
        .with_context(|| format!("no default for {flag} in --help"))?;
    let digits: String = default.chars().take_while(char::is_ascii_digit).collect();
    Ok(Duration::from_millis(digits.parse()?))
}

fn haproxy_duration(value: &str) -> Result<Duration> {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits
        .parse()
        .with_context(|| format!("duration {value}"))?;
    Ok(match &value[digits.len()..] {
        "ms" | "" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        unit => bail!("unknown unit {unit} in {value}"),
    })
}

/// Both shipped HAProxy configs let an SSE stream live between heartbeats and a long poll wait
/// its full time with the node's defaults, and carry the settings the tests above exercise.
#[test]
fn the_haproxy_configs_let_streams_and_polls_wait_as_long_as_the_node_does() -> Result<()> {
    let help = std::process::Command::new(binary())
        .arg("--help")
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    let heartbeat = help_default_ms(&help, "--heartbeat-ms")?;
    let poll = help_default_ms(&help, "--poll-timeout-ms")?;
    for path in ["deploy/haproxy/haproxy.cfg", "k8s/base/haproxy.cfg"] {
        let config = std::fs::read_to_string(workspace_file(path))?;
        let lines: Vec<&str> = config.lines().map(str::trim).collect();
        for name in ["server", "client"] {
            let value = lines
                .iter()
                .find_map(|line| line.strip_prefix(&format!("timeout {name} ")))
                .with_context(|| format!("{path}: no timeout {name}"))?;
            let value = haproxy_duration(value.trim())?;
            ensure!(
                value > heartbeat.max(poll),
                "{path}: timeout {name} {value:?} must exceed the heartbeat ({heartbeat:?}) and \
                 the long poll ({poll:?})"
            );
        }
        for setting in [
            "option http-no-delay",
            "stick store-response res.hdr(X-Switchboard-Session)",
            "http-request disable-l7-retry if METH_POST",
        ] {
            ensure!(lines.contains(&setting), "{path}: no `{setting}`");
        }
    }
    Ok(())
}
