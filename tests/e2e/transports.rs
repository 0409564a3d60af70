//! The protocol over every transport: each scenario below is written once against
//! [`TransportClient`] and run on the WebSocket, on SSE and on long polling (the `per_transport!`
//! list at the end makes one test per transport: `welcome_carries_every_field::sse`, …). Where
//! two sessions meet (presence, directs), the second one uses another transport, so each
//! transport also talks to the others. What only the fallback transports have (their HTTP
//! answers, reaping a client that went away) is tested on both of them, and a few things on one
//! transport alone: SSE as `curl -N` shows it, empty long polls, refused polls.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::api::{api_publish, api_send};
use switchboard_e2e::auth::{token_signed_with, unix_now};
use switchboard_e2e::transport::{
    Auth, Event, Opened, Options, Transport, TransportClient, post_frames,
};
use switchboard_e2e::{NodeProcess, wait_until};
use switchboard_protocol::{
    ClientFrame, ErrorCode, PresenceNotice, ServerFrame, StreamPosition, close,
};
use tokio::time::Instant;

/// The HS256 secret of the nodes started with authentication on.
const SECRET: &str = "transports-e2e-secret-0123456789";

fn token(claims: &Value) -> String {
    token_signed_with(SECRET, claims)
}

fn subscribe_since(room: &str, id: u64, since: Option<StreamPosition>) -> ClientFrame {
    ClientFrame::Subscribe {
        room: room.to_owned(),
        id: Some(id),
        since,
        presence_events: false,
    }
}

fn publish_frame(room: &str, data: Value, id: u64) -> ClientFrame {
    ClientFrame::Publish {
        room: room.to_owned(),
        data,
        id: Some(id),
        key: None,
    }
}

fn send_frame(to: &str, data: Value, id: u64, persist: bool) -> ClientFrame {
    ClientFrame::Send {
        to: to.to_owned(),
        data,
        id: Some(id),
        persist,
        key: None,
    }
}

/// The node still opens sessions of every transport and answers them.
async fn assert_serves(node: &NodeProcess) -> Result<()> {
    for transport in Transport::ALL {
        let mut client =
            TransportClient::connect(transport, node.public, Auth::User("bystander")).await?;
        client
            .expect_ping_pong(99)
            .await
            .with_context(|| format!("a new {} session", transport.name()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Opening a session
// ---------------------------------------------------------------------------------------------

async fn welcome_carries_every_field(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&["--node-id", "n-transports", "--heartbeat-ms", "2500"]).await?;
    let mut alice = TransportClient::connect(transport, node.public, Auth::User("alice")).await?;
    let ServerFrame::Welcome {
        ref protocol,
        heartbeat_ms,
        ref inbox,
        ..
    } = alice.welcome
    else {
        bail!("not a welcome: {:?}", alice.welcome);
    };
    ensure!(
        alice.user == "alice" && alice.node == "n-transports" && !alice.session.is_empty(),
        "{:?}",
        alice.welcome
    );
    ensure!(protocol == "switchboard.v1.json", "protocol {protocol}");
    ensure!(heartbeat_ms == 2500, "heartbeat_ms {heartbeat_ms}");
    ensure!(
        inbox.seq == 0 && inbox.acked == 0,
        "a new user's inbox: {inbox:?}"
    );

    let second = TransportClient::connect(transport, node.public, Auth::User("alice")).await?;
    ensure!(second.session != alice.session, "two sessions share an id");
    ensure!(
        second.session_key.is_none() || second.session_key != alice.session_key,
        "two sessions share a key"
    );
    let anonymous = TransportClient::connect(transport, node.public, Auth::Anonymous).await?;
    ensure!(
        anonymous.user.starts_with("anon-"),
        "anonymous user {}",
        anonymous.user
    );
    node.wait_metric(
        &format!("switchboard_sessions{{transport=\"{}\"}}", transport.name()),
        3.0,
    )
    .await?;
    alice.expect_ping_pong(1).await
}

async fn admission_is_the_websockets(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--allowed-origins",
        "https://good.example",
    ])
    .await?;
    let good_origin = Options {
        headers: &[("Origin", "https://good.example")],
        post_to: None,
    };
    let good = token(&json!({"sub": "erin", "exp": unix_now() + 3600, "rooms": ["*"]}));
    let expired = token(&json!({"sub": "erin", "exp": unix_now() - 3600}));
    for (auth, what) in [
        (Auth::Anonymous, "no token"),
        (Auth::Token("not.a.token"), "a garbage token"),
        (Auth::Token(&expired), "an expired token"),
    ] {
        let (status, body) =
            TransportClient::refused(transport, node.public, auth, &good_origin).await?;
        ensure!(status == 401, "{what}: {status} {body}");
    }
    for origin in ["https://evil.example", "https://good.example.evil.example"] {
        let bad_origin = Options {
            headers: &[("Origin", origin)],
            post_to: None,
        };
        let (status, body) =
            TransportClient::refused(transport, node.public, Auth::Token(&good), &bad_origin)
                .await?;
        ensure!(status == 403, "origin {origin}: {status} {body}");
    }
    let mut client =
        TransportClient::connect_with(transport, node.public, Auth::Token(&good), &good_origin)
            .await?;
    ensure!(client.user == "erin");
    client.expect_ping_pong(1).await
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

async fn subscribe_publish_and_reply_ids(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let other = transport.other();
    let mut reader = TransportClient::connect(transport, node.public, Auth::User("reader")).await?;
    let mut listener = TransportClient::connect(other, node.public, Auth::User("listener")).await?;
    let mut writer = TransportClient::connect(transport, node.public, Auth::User("writer")).await?;
    let mut foreign = TransportClient::connect(other, node.public, Auth::User("foreign")).await?;

    let reply = reader.subscribe("lobby", 41, false).await?;
    ensure!(
        reply.offset == Some(0) && reply.epoch.is_some(),
        "{reply:?}"
    );
    listener.subscribe("lobby", 1, false).await?;

    let data = json!({"text": "hello", "n": 1});
    let offset = writer.publish("lobby", data.clone(), 42).await?;
    ensure!(offset == 1, "first offset {offset}");
    for client in [&mut reader, &mut listener] {
        let message = client.expect_message("lobby", &data).await?;
        ensure!(message.offset == 1, "{message:?}");
        let from = message
            .from
            .as_ref()
            .context("a client's message has from")?;
        ensure!(
            from.user == "writer" && from.session == writer.session,
            "{from:?}"
        );
    }
    // The other transport's publish reaches this one.
    let data = json!("from the other transport");
    ensure!(foreign.publish("lobby", data.clone(), 2).await? == 2);
    reader.expect_message("lobby", &data).await?;
    listener.expect_message("lobby", &data).await?;
    // So does the server API's, without `from`.
    let data = json!("from the API");
    api_publish(&node, "lobby", data.clone()).await?;
    let message = reader.expect_message("lobby", &data).await?;
    ensure!(message.from.is_none() && message.offset == 3, "{message:?}");

    // Ids are echoed, whatever their size; a ping without id gets a pong without.
    ensure!(
        reader.request(&ClientFrame::Ping { id: None }).await? == ServerFrame::Pong { id: None }
    );
    reader.expect_ping_pong(u64::MAX).await?;
    let reply = reader
        .reply(&ClientFrame::Unsubscribe {
            room: "lobby".into(),
            id: Some(43),
        })
        .await?;
    ensure!(reply.id == 43, "{reply:?}");
    writer.publish("lobby", json!("unheard"), 44).await?;
    reader.expect_ping_pong(45).await?;
    Ok(())
}

async fn bad_frames_get_errors_and_the_session_stays(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut client = TransportClient::connect(transport, node.public, Auth::User("sloppy")).await?;

    // JSON of the wrong shape: its id is echoed.
    client
        .send_text(r#"{"type":"publish","id":8,"room":"r"}"#)
        .await?;
    client.expect_error(Some(8), ErrorCode::BadFrame).await?;
    client.send_text(r#"{"id":9}"#).await?;
    client.expect_error(Some(9), ErrorCode::BadFrame).await?;
    client.send_text(r#"{"type":"ping","id":"abc"}"#).await?;
    client.expect_error(None, ErrorCode::BadFrame).await?;
    client.send_text(r#"{"type":"dance","id":7}"#).await?;
    let message = client.expect_error(Some(7), ErrorCode::UnknownType).await?;
    ensure!(message.contains("dance"), "{message}");
    client.expect_ping_pong(1).await?;

    // Fields with bad values.
    for (id, room) in [(2, ""), (3, "bad\nroom")] {
        client.send(&subscribe_since(room, id, None)).await?;
        client
            .expect_error(Some(id), ErrorCode::BadFrame)
            .await
            .with_context(|| format!("subscribe to {room:?}"))?;
    }
    client
        .send(&ClientFrame::Unsubscribe {
            room: "never".into(),
            id: Some(4),
        })
        .await?;
    client
        .expect_error(Some(4), ErrorCode::NotSubscribed)
        .await?;
    client.subscribe("twice", 5, false).await?;
    client.send(&subscribe_since("twice", 6, None)).await?;
    client
        .expect_error(Some(6), ErrorCode::AlreadySubscribed)
        .await?;

    // Not JSON at all: an error frame on a WebSocket; a 400 for the POST of a fallback, where
    // no frame could be read from the body.
    if transport.is_fallback() {
        client
            .post("{not json")
            .await?
            .expect(400, Some("bad_frame"))?;
    } else {
        client.send_text("{not json").await?;
        client.expect_error(None, ErrorCode::BadFrame).await?;
    }
    client.expect_ping_pong(10).await?;
    assert_serves(&node).await
}

async fn too_many_bad_frames_close_with_1008(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&["--max-bad-frames", "3"]).await?;
    let mut client = TransportClient::connect(transport, node.public, Auth::User("noisy")).await?;
    // JSON objects that are no frames: a fallback's POST accepts them, the session refuses them.
    for (text, id) in [
        (r#"{"id":1}"#, Some(1)),
        (r#"{"type":"publish"}"#, None),
        (r#"{"type":7}"#, None),
    ] {
        client.send_text(text).await?;
        client
            .expect_error(id, ErrorCode::BadFrame)
            .await
            .with_context(|| format!("frame {text}"))?;
    }
    // Good frames in between do not count.
    client.expect_ping_pong(1).await?;
    client.send_text(r#"{"type":"subscribe"}"#).await?;
    let code = client.expect_close().await?;
    ensure!(code == close::POLICY, "closed with {code}, expected 1008");
    node.wait_metric("switchboard_closes_total{code=\"1008\"}", 1.0)
        .await?;
    assert_serves(&node).await
}

async fn forbidden_with_auth_on(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let exp = unix_now() + 3600;
    let limited =
        token(&json!({"sub": "dave", "exp": exp, "rooms": ["chat.*"], "publish": ["chat.news"]}));
    let mut dave = TransportClient::connect(transport, node.public, Auth::Token(&limited)).await?;
    dave.send(&subscribe_since("secret", 1, None)).await?;
    dave.expect_error(Some(1), ErrorCode::Forbidden).await?;
    dave.send(&publish_frame("chat.lobby", json!("no"), 2))
        .await?;
    dave.expect_error(Some(2), ErrorCode::Forbidden).await?;
    // No `send` claim: no sending.
    dave.send(&send_frame("erin", json!("no"), 3, false))
        .await?;
    dave.expect_error(Some(3), ErrorCode::Forbidden).await?;
    // What the token allows still works.
    dave.subscribe("chat.lobby", 4, false).await?;
    let offset = dave.publish("chat.news", json!("yes"), 5).await?;
    ensure!(offset == 1);
    dave.expect_ping_pong(6).await
}

async fn one_subscription_past_the_limit_is_refused(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&["--max-subscriptions", "2"]).await?;
    let mut client =
        TransportClient::connect(transport, node.public, Auth::User("collector")).await?;
    client.subscribe("room-1", 1, false).await?;
    client.subscribe("room-2", 2, false).await?;
    client.send(&subscribe_since("room-3", 3, None)).await?;
    client
        .expect_error(Some(3), ErrorCode::LimitExceeded)
        .await?;
    client
        .reply(&ClientFrame::Unsubscribe {
            room: "room-1".into(),
            id: Some(4),
        })
        .await?;
    client.subscribe("room-3", 5, false).await?;
    Ok(())
}

async fn history_pages_the_room(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut client =
        TransportClient::connect(transport, node.public, Auth::User("archivist")).await?;
    let history =
        |id: u64, since: Option<StreamPosition>, limit: Option<u32>| ClientFrame::History {
            room: "archive".into(),
            id,
            since,
            limit,
        };
    let empty = client.reply(&history(1, None, None)).await?;
    ensure!(
        empty.offset == Some(0) && empty.messages.as_deref().is_some_and(<[_]>::is_empty),
        "{empty:?}"
    );
    let mut epoch = String::new();
    for n in 1..=6u64 {
        epoch = api_publish(&node, "archive", json!({"n": n})).await?.epoch;
    }
    let offsets = |reply: &switchboard_protocol::Reply| -> Vec<u64> {
        reply
            .messages
            .iter()
            .flatten()
            .map(|message| message.offset)
            .collect()
    };
    let all = client.reply(&history(2, None, None)).await?;
    ensure!(offsets(&all) == [1, 2, 3, 4, 5, 6], "{all:?}");
    ensure!(
        all.offset == Some(6) && all.epoch.as_deref() == Some(epoch.as_str()),
        "{all:?}"
    );
    ensure!(
        all.messages
            .iter()
            .flatten()
            .all(|message| message.data == json!({"n": message.offset})),
        "{all:?}"
    );
    let newest = client.reply(&history(3, None, Some(2))).await?;
    ensure!(offsets(&newest) == [5, 6], "{newest:?}");
    let later = client
        .reply(&history(
            4,
            Some(StreamPosition {
                offset: 3,
                epoch: epoch.clone(),
            }),
            Some(2),
        ))
        .await?;
    ensure!(offsets(&later) == [4, 5], "{later:?}");
    // History is not a subscription.
    client.expect_ping_pong(5).await
}

async fn recovery_and_idempotency_answer_as_on_the_websocket(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut client = TransportClient::connect(transport, node.public, Auth::User("keyed")).await?;
    let keyed = |id: u64| ClientFrame::Publish {
        room: "ledger".into(),
        data: json!({"entry": 1}),
        id: Some(id),
        key: Some("entry-1".into()),
    };
    let first = client.reply(&keyed(1)).await?;
    ensure!(first.offset == Some(1) && !first.duplicate, "{first:?}");
    let again = client.reply(&keyed(2)).await?;
    ensure!(
        again.offset == Some(1) && again.duplicate,
        "a retried publish: {again:?}"
    );
    // A position of another epoch cannot be recovered: the client learns it from the reply.
    let since = StreamPosition {
        offset: 1,
        epoch: "not-the-epoch".into(),
    };
    let reply = client
        .reply(&subscribe_since("ledger", 3, Some(since)))
        .await?;
    ensure!(
        reply.recovered == Some(false) && reply.offset == Some(1),
        "{reply:?}"
    );
    client.expect_ping_pong(4).await
}

async fn the_server_api_reaches_every_transport(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut dan = TransportClient::connect(transport, node.public, Auth::User("dan")).await?;
    let mut erin = TransportClient::connect(transport, node.public, Auth::User("erin")).await?;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| http.post(node.http_url(path)).json(&body).send();
    let answer: Value = post("/api/broadcast", json!({"data": "maintenance"}))
        .await?
        .json()
        .await?;
    ensure!(answer["nodes"] == 1, "{answer}");
    for client in [&mut dan, &mut erin] {
        ensure!(
            client.next_frame().await?
                == ServerFrame::Broadcast {
                    data: json!("maintenance")
                }
        );
    }
    let answer: Value = post(
        "/api/disconnect",
        json!({"user": "dan", "code": 4000, "reason": "bye dan"}),
    )
    .await?
    .json()
    .await?;
    ensure!(answer["sessions"] == 1, "{answer}");
    let code = dan.expect_close().await?;
    ensure!(code == 4000, "disconnected with {code}");
    erin.expect_ping_pong(1).await
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

fn notice(room: &str, client: &TransportClient) -> PresenceNotice {
    PresenceNotice {
        room: room.to_owned(),
        user: client.user.clone(),
        session: client.session.clone(),
    }
}

fn members(reply: &switchboard_protocol::Reply) -> BTreeSet<(String, String)> {
    reply
        .members
        .iter()
        .flatten()
        .map(|member| (member.user.clone(), member.session.clone()))
        .collect()
}

async fn presence_events_cross_transports(transport: Transport) -> Result<()> {
    // An SSE stream the client dropped is noticed at the latest when a heartbeat cannot be
    // written: every second here.
    let node = NodeProcess::start(&["--heartbeat-ms", "1000"]).await?;
    let room = "stage";
    let mut watcher = TransportClient::connect(transport, node.public, Auth::User("alice")).await?;
    watcher.subscribe(room, 1, true).await?;

    // Joins from both other transports, and a leave on unsubscribe.
    let mut joiners = Vec::new();
    for (index, other) in [transport.other(), transport.other().other()]
        .into_iter()
        .enumerate()
    {
        let mut joiner =
            TransportClient::connect(other, node.public, Auth::User(&format!("user-{index}")))
                .await?;
        joiner.subscribe(room, 1, false).await?;
        ensure!(
            watcher.next_frame().await? == ServerFrame::Join(notice(room, &joiner)),
            "{} joining, seen on {}",
            other.name(),
            transport.name()
        );
        joiners.push(joiner);
    }
    let listed = watcher
        .reply(&ClientFrame::Presence {
            room: room.into(),
            id: 2,
        })
        .await?;
    let expected: BTreeSet<_> = std::iter::once(&watcher)
        .chain(&joiners)
        .map(|client| (client.user.clone(), client.session.clone()))
        .collect();
    ensure!(members(&listed) == expected, "{listed:?}");

    for mut joiner in joiners {
        let leave = ServerFrame::Leave(notice(room, &joiner));
        if joiner.transport == Transport::Poll {
            // A long-poll session has no connection to close: it leaves by unsubscribing.
            joiner
                .reply(&ClientFrame::Unsubscribe {
                    room: room.into(),
                    id: Some(3),
                })
                .await?;
        } else {
            joiner.close().await;
        }
        ensure!(watcher.next_frame().await? == leave, "{leave:?}");
    }

    // The watcher's own leave: the others hear it, it hears nothing about itself.
    let mut other =
        TransportClient::connect(transport.other(), node.public, Auth::User("bob")).await?;
    other.subscribe(room, 1, true).await?;
    ensure!(watcher.next_frame().await? == ServerFrame::Join(notice(room, &other)));
    watcher
        .reply(&ClientFrame::Unsubscribe {
            room: room.into(),
            id: Some(4),
        })
        .await?;
    ensure!(other.next_frame().await? == ServerFrame::Leave(notice(room, &watcher)));
    watcher.expect_ping_pong(5).await
}

// ---------------------------------------------------------------------------------------------
// Recovery with `since`
// ---------------------------------------------------------------------------------------------

/// Resumers subscribe with `since: 5` at different moments while the API publishes; each gets
/// the reply, then every later message once, in order, then nothing.
async fn since_recovers_with_no_gap_or_repeat(transport: Transport) -> Result<()> {
    const ROOM: &str = "feed";
    const PUBLISHED: u64 = 300;
    const RESUMERS: u64 = 4;
    let node = NodeProcess::start(&["--history-size", "5000"]).await?;
    let mut epoch = String::new();
    for n in 1..=5u64 {
        epoch = api_publish(&node, ROOM, json!({"n": n})).await?.epoch;
    }
    let mut resumers = Vec::new();
    for index in 0..RESUMERS {
        resumers.push(
            TransportClient::connect(transport, node.public, Auth::User(&format!("r{index}")))
                .await?,
        );
    }
    let progress = Arc::new(AtomicU64::new(5));
    let publisher = {
        let progress = progress.clone();
        let url = node.http_url("/api/publish");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 6..=PUBLISHED {
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
                progress.store(n, Ordering::SeqCst);
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let readers: Vec<_> = resumers
        .into_iter()
        .enumerate()
        .map(|(index, mut client)| {
            let progress = progress.clone();
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let threshold = 5 + index as u64 * PUBLISHED / (RESUMERS + 1);
                wait_until("the publisher to make progress", || {
                    let progress = progress.clone();
                    async move { progress.load(Ordering::SeqCst) >= threshold }
                })
                .await?;
                let since = StreamPosition {
                    offset: 5,
                    epoch: epoch.clone(),
                };
                let reply = client
                    .reply(&subscribe_since(ROOM, 77, Some(since)))
                    .await?;
                ensure!(
                    reply.recovered == Some(true) && reply.epoch.as_deref() == Some(epoch.as_str()),
                    "{reply:?}"
                );
                let latest = reply.offset.context("reply without offset")?;
                for expected in 6..=PUBLISHED {
                    let frame = client
                        .next_frame()
                        .await
                        .with_context(|| format!("waiting for {expected} (reply at {latest})"))?;
                    let ServerFrame::Message(message) = frame else {
                        bail!("expected offset {expected}, got {frame:?}");
                    };
                    ensure!(
                        message.offset == expected && message.data == json!({"n": expected}),
                        "expected offset {expected}, got {message:?} (reply at {latest})"
                    );
                }
                client.expect_ping_pong(78).await?;
                Ok::<_, anyhow::Error>(latest)
            })
        })
        .collect();
    publisher.await??;
    let mut raced = 0;
    for (index, reader) in readers.into_iter().enumerate() {
        let latest = reader.await?.with_context(|| format!("resumer {index}"))?;
        raced += usize::from(latest < PUBLISHED);
    }
    ensure!(
        raced >= 1,
        "no resume raced the publisher: the seam went untested"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Directs and the inbox
// ---------------------------------------------------------------------------------------------

fn expect_direct(frame: ServerFrame, data: &Value) -> Result<(Option<String>, Option<u64>)> {
    match frame {
        ServerFrame::Direct {
            data: got,
            from,
            seq,
        } if &got == data => Ok((from.map(|from| from.user), seq)),
        other => bail!("expected the direct {data}, got {other:?}"),
    }
}

async fn directs_and_the_inbox(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut bob = TransportClient::connect(transport, node.public, Auth::User("bob")).await?;
    let mut alice =
        TransportClient::connect(transport.other(), node.public, Auth::User("alice")).await?;

    // Live directs, both ways across transports, and from the API.
    let data = json!({"hi": "bob"});
    let reply = alice
        .reply(&send_frame("bob", data.clone(), 1, false))
        .await?;
    ensure!(reply.sessions == Some(1), "{reply:?}");
    let (from, seq) = expect_direct(bob.next_frame().await?, &data)?;
    ensure!(from.as_deref() == Some("alice") && seq.is_none());
    let data = json!({"hi": "alice"});
    bob.reply(&send_frame("alice", data.clone(), 2, false))
        .await?;
    expect_direct(alice.next_frame().await?, &data)?;
    ensure!(api_send(&node, "bob", json!("api")).await? == 1);
    ensure!(
        expect_direct(bob.next_frame().await?, &json!("api"))?
            .0
            .is_none()
    );

    // Persisted while carol is away: on connect, her inbox in the welcome, then the messages.
    for n in 1..=2u64 {
        let reply = alice
            .reply(&send_frame("carol", json!({"n": n}), 10 + n, true))
            .await?;
        ensure!(
            reply.seq == Some(n) && reply.sessions == Some(0),
            "{reply:?}"
        );
    }
    let mut carol = TransportClient::connect(transport, node.public, Auth::User("carol")).await?;
    ensure!(
        carol.inbox.seq == 2 && carol.inbox.acked == 0,
        "{:?}",
        carol.inbox
    );
    for n in 1..=2u64 {
        let (_, seq) = expect_direct(carol.next_frame().await?, &json!({"n": n}))?;
        ensure!(seq == Some(n));
    }
    carol.expect_ping_pong(1).await?;
    // Not acknowledged: a new session gets them again.
    carol.close().await;
    let mut carol = TransportClient::connect(transport, node.public, Auth::User("carol")).await?;
    for n in 1..=2u64 {
        let (_, seq) = expect_direct(carol.next_frame().await?, &json!({"n": n}))
            .context("redelivered on reconnect")?;
        ensure!(seq == Some(n));
    }
    let reply = carol
        .reply(&ClientFrame::Ack {
            seq: 2,
            id: Some(3),
        })
        .await?;
    ensure!(reply.id == 3);
    carol.close().await;
    // Acknowledged: never again.
    let mut carol = TransportClient::connect(transport, node.public, Auth::User("carol")).await?;
    ensure!(carol.inbox.acked == 2, "{:?}", carol.inbox);
    carol.expect_ping_pong(4).await
}

// ---------------------------------------------------------------------------------------------
// Limits and closes
// ---------------------------------------------------------------------------------------------

async fn a_flood_is_rate_limited_then_closed_with_1008(transport: Transport) -> Result<()> {
    const FLOOD: u64 = 60;
    let node = NodeProcess::start(&[
        "--rate-limit",
        "10",
        "--rate-limit-burst",
        "10",
        "--rate-limit-strikes",
        "20",
    ])
    .await?;
    let mut calm = TransportClient::connect(transport, node.public, Auth::User("calm")).await?;
    calm.subscribe("calm", 1, false).await?;
    let mut flooder = TransportClient::connect(transport, node.public, Auth::User("flood")).await?;
    let pings: Vec<_> = (1..=FLOOD)
        .map(|id| ClientFrame::Ping { id: Some(id) })
        .collect();
    flooder.send_all(&pings).await?;
    let (mut pongs, mut limited) = (0, 0);
    let code = loop {
        match flooder.next_event().await? {
            Event::Frame(ServerFrame::Pong { .. }) => pongs += 1,
            Event::Frame(ServerFrame::Error(error)) if error.code == ErrorCode::RateLimited => {
                ensure!(error.id.is_some(), "rate_limited should echo the ping's id");
                limited += 1;
            }
            Event::Closed(code) => break code,
            other => bail!("flood: unexpected {other:?}"),
        }
    };
    ensure!(
        code == close::POLICY,
        "flood closed with {code}, expected 1008 ({pongs} pongs, {limited} rate_limited)"
    );
    ensure!(pongs >= 10, "only {pongs} pongs: the burst is 10");
    ensure!(
        limited >= 20,
        "only {limited} rate_limited before the close"
    );
    ensure!(pongs + limited < FLOOD, "every ping was answered: no close");

    // The calm session of the same transport is unaffected.
    calm.expect_ping_pong(2).await?;
    let data = json!("still calm");
    api_publish(&node, "calm", data.clone()).await?;
    calm.expect_message("calm", &data).await?;
    assert_serves(&node).await
}

async fn an_oversize_frame_is_refused(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&["--max-message-size", "1024"]).await?;
    let mut client = TransportClient::connect(transport, node.public, Auth::User("big")).await?;
    client.publish("big", json!("x".repeat(600)), 1).await?;
    let frame = publish_frame("big", json!("x".repeat(2048)), 2);
    if transport.is_fallback() {
        // The POST is refused before any of it is read as frames; the session goes on.
        client
            .post(serde_json::to_string(&frame)?)
            .await?
            .expect(413, Some("too_large"))?;
        // So is a POST of frames each under the limit that together pass it.
        let small = publish_frame("big", json!("y".repeat(400)), 3);
        client
            .post(serde_json::to_string(&[&small, &small, &small])?)
            .await?
            .expect(413, Some("too_large"))?;
        client.expect_ping_pong(4).await?;
    } else {
        client.send(&frame).await?;
        let code = client.expect_close().await?;
        ensure!(code == close::TOO_BIG, "closed with {code}, expected 1009");
    }
    assert_serves(&node).await
}

async fn an_expiring_token_closes_the_session_with_1008(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-leeway-secs",
        "0",
        "--heartbeat-ms",
        "200",
        "--idle-timeout-ms",
        "10000",
        "--poll-timeout-ms",
        "5000",
    ])
    .await?;
    let long = token(&json!({"sub": "steady", "exp": unix_now() + 3600, "rooms": ["*"]}));
    let mut steady = TransportClient::connect(transport, node.public, Auth::Token(&long)).await?;
    let short = token(&json!({"sub": "short", "exp": unix_now() + 2, "rooms": ["*"]}));
    let started = Instant::now();
    let mut expiring =
        TransportClient::connect(transport, node.public, Auth::Token(&short)).await?;
    expiring.subscribe("expiry", 1, false).await?;
    let code = expiring.expect_close().await?;
    ensure!(code == close::POLICY, "closed with {code}, expected 1008");
    ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before the token expired",
        started.elapsed()
    );
    steady.expect_ping_pong(2).await
}

async fn a_drain_closes_every_session_with_1001(transport: Transport) -> Result<()> {
    // The drain delay (the node not ready but still serving) gives every long-poll client the
    // time to have its poll waiting when the listener closes: a client between two polls at that
    // moment cannot reach the node for its close frame (docs/protocol.md) and reopens elsewhere.
    let mut node =
        NodeProcess::start(&["--drain-grace-ms", "500", "--drain-delay-ms", "1000"]).await?;
    let mut clients = Vec::new();
    for index in 0..4 {
        clients.push(
            TransportClient::connect(transport, node.public, Auth::User(&format!("d{index}")))
                .await?,
        );
    }
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { client.expect_close().await }))
        .collect();
    node.terminate();
    for (index, waiter) in waiters.into_iter().enumerate() {
        let code = waiter.await?.with_context(|| format!("session {index}"))?;
        ensure!(
            code == close::GOING_AWAY,
            "session {index} closed with {code}, expected 1001"
        );
    }
    // A session opened during the drain is refused (or finds the listener closed).
    match TransportClient::open(
        transport,
        node.public,
        Auth::User("late"),
        &Options::default(),
    )
    .await
    {
        Ok(Opened::Open(client)) => bail!("session {} opened during the drain", client.session),
        Ok(Opened::Refused { status, body }) => {
            ensure!(status == 503, "an open during the drain: {status} {body}")
        }
        Err(_) => {}
    }
    let status = node.wait_exit(Duration::from_secs(8)).await?;
    ensure!(
        status.code() == Some(0),
        "exit status after SIGTERM: {status}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The fallback transports' own HTTP answers
// ---------------------------------------------------------------------------------------------

async fn bad_posts_get_http_errors_and_the_session_stays(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&["--max-message-size", "65536"]).await?;
    let mut client = TransportClient::connect(transport, node.public, Auth::User("poster")).await?;
    let mut stranger =
        TransportClient::connect(transport, node.public, Auth::User("stranger")).await?;
    let websocket =
        TransportClient::connect(Transport::WebSocket, node.public, Auth::User("ws")).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", node.public);
    let key = client.session_key.clone().context("no key")?;

    for body in [
        "{not json",
        "",
        "[]",
        "[1, 2]",
        "\"ping\"",
        "[{\"type\":\"ping\"}, 3]",
    ] {
        client
            .post(body)
            .await?
            .expect(400, Some("bad_frame"))
            .with_context(|| format!("body {body:?}"))?;
    }
    let many: Vec<_> = (0..101)
        .map(|id| ClientFrame::Ping { id: Some(id) })
        .collect();
    client
        .post(serde_json::to_string(&many)?)
        .await?
        .expect(413, Some("too_large"))?;

    let ping = r#"{"type":"ping","id":1}"#;
    // No key, a wrong key, another session's key: 403, whichever path the POST takes.
    for path in [Transport::Sse, Transport::Poll] {
        post_frames(&http, &base, path, &client.session, None, ping)
            .await?
            .expect(403, Some("forbidden"))?;
        post_frames(
            &http,
            &base,
            path,
            &client.session,
            Some(&"0".repeat(32)),
            ping,
        )
        .await?
        .expect(403, Some("forbidden"))?;
        post_frames(
            &http,
            &base,
            path,
            &client.session,
            stranger.session_key.as_deref(),
            ping,
        )
        .await?
        .expect(403, Some("forbidden"))?;
        // An unknown session, and a WebSocket session (it has no link): 404.
        post_frames(&http, &base, path, "no-such-session", Some(&key), ping)
            .await?
            .expect(404, Some("unknown_session"))?;
        post_frames(&http, &base, path, &websocket.session, Some(&key), ping)
            .await?
            .expect(404, Some("unknown_session"))?;
    }
    // The POST to the other transport's path is accepted: the path's name is informational.
    let other = match transport {
        Transport::Sse => Transport::Poll,
        _ => Transport::Sse,
    };
    post_frames(&http, &base, other, &client.session, Some(&key), ping)
        .await?
        .expect(202, None)?;
    ensure!(client.next_frame().await? == ServerFrame::Pong { id: Some(1) });

    // Nothing of it reached either session.
    client.expect_ping_pong(2).await?;
    stranger.expect_ping_pong(3).await?;
    node.wait_metric(
        "switchboard_fallback_requests_total{endpoint=\"post\",result=\"forbidden\"}",
        6.0,
    )
    .await?;
    assert_serves(&node).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_with_a_bad_key_or_an_unknown_session_are_refused() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut client =
        TransportClient::connect(Transport::Poll, node.public, Auth::User("poller")).await?;
    let http = reqwest::Client::new();
    let url = format!("http://{}/poll/{}", node.public, client.session);
    let status = |response: reqwest::Response| response.status().as_u16();
    ensure!(
        status(http.get(&url).send().await?) == 403,
        "a poll without a key"
    );
    ensure!(
        status(
            http.get(&url)
                .header("Authorization", format!("Session {}", "f".repeat(32)))
                .send()
                .await?
        ) == 403,
        "a poll with a wrong key"
    );
    ensure!(
        status(
            http.get(format!("http://{}/poll/no-such-session", node.public))
                .header("Authorization", format!("Session {}", "f".repeat(32)))
                .send()
                .await?
        ) == 404,
        "a poll of an unknown session"
    );
    client.expect_ping_pong(1).await
}

/// A long-poll session with nothing to receive gets `[]` at each `--poll-timeout-ms` and goes
/// on polling; the frame that finally comes arrives by the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_poll_session_lives_on_through_empty_polls() -> Result<()> {
    let node = NodeProcess::start(&["--poll-timeout-ms", "300"]).await?;
    let mut client =
        TransportClient::connect(Transport::Poll, node.public, Auth::User("idle")).await?;
    client.subscribe("later", 1, false).await?;
    let polled = "switchboard_fallback_requests_total{endpoint=\"poll\",result=\"ok\"}";
    let before = node.metric(polled).await?;
    // Several timeouts pass with nothing to send.
    node.wait_metric(polled, before + 5.0).await?;
    let data = json!("at last");
    api_publish(&node, "later", data.clone()).await?;
    client.expect_message("later", &data).await?;
    client.expect_ping_pong(2).await
}

/// `curl -N /sse?user=…` shows the stream as it is: the headers a proxy needs, then one
/// `data:` line per frame (the welcome first) and a comment line at each heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_shows_readable_sse_events() -> Result<()> {
    let node = NodeProcess::start(&["--heartbeat-ms", "300"]).await?;
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "-N", "--max-time", "2"])
        .arg(format!("http://{}/sse?user=curly", node.public))
        .output()
        .await
        .context("running curl")?;
    let text = String::from_utf8(output.stdout)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no headers: {text}"))?;
    let head = head.to_ascii_lowercase();
    for header in [
        "content-type: text/event-stream",
        "cache-control: no-store",
        "x-accel-buffering: no",
    ] {
        ensure!(head.contains(header), "no {header}: {head}");
    }
    let lines: Vec<&str> = body.lines().collect();
    let first = lines.first().copied().unwrap_or_default();
    ensure!(
        first.starts_with(r#"data: {"type":"welcome""#) && first.contains(r#""user":"curly""#),
        "first line: {first}"
    );
    let welcome: ServerFrame = serde_json::from_str(&first["data: ".len()..])?;
    ensure!(matches!(welcome, ServerFrame::Welcome { .. }));
    let heartbeats = lines.iter().filter(|line| line.starts_with(':')).count();
    ensure!(
        heartbeats >= 3,
        "{heartbeats} heartbeats in 2 s at 300 ms: {body}"
    );
    ensure!(
        lines
            .iter()
            .all(|line| line.is_empty() || line.starts_with(':') || line.starts_with("data: ")),
        "only data and comment lines: {body}"
    );
    Ok(())
}

/// A client that goes away without a word (an SSE stream dropped, a long-poll client that stops
/// polling) is reaped: it leaves its rooms, its session is gone, and its POSTs find nothing.
async fn a_session_whose_client_went_away_is_reaped(transport: Transport) -> Result<()> {
    let node = NodeProcess::start(&[
        "--heartbeat-ms",
        "500",
        "--idle-timeout-ms",
        "2000",
        "--poll-timeout-ms",
        "1000",
    ])
    .await?;
    let mut watcher =
        TransportClient::connect(Transport::WebSocket, node.public, Auth::User("watcher")).await?;
    watcher.subscribe("wake", 1, true).await?;
    let mut gone = TransportClient::connect(transport, node.public, Auth::User("gone")).await?;
    gone.subscribe("wake", 1, false).await?;
    let notice = notice("wake", &gone);
    ensure!(watcher.next_frame().await? == ServerFrame::Join(notice.clone()));
    let gauge = format!("switchboard_sessions{{transport=\"{}\"}}", transport.name());
    node.wait_metric(&gauge, 1.0).await?;

    let (session, key) = (gone.session.clone(), gone.session_key.clone());
    gone.close().await;
    ensure!(watcher.next_frame().await? == ServerFrame::Leave(notice));
    wait_until("the session gauge to drop", || async {
        node.metric(&gauge)
            .await
            .is_ok_and(|sessions| sessions == 0.0)
    })
    .await?;
    let http = reqwest::Client::new();
    post_frames(
        &http,
        &format!("http://{}", node.public),
        transport,
        &session,
        key.as_deref(),
        r#"{"type":"ping","id":1}"#,
    )
    .await?
    .expect(404, Some("unknown_session"))?;
    watcher.expect_ping_pong(2).await
}

/// One `#[tokio::test]` per transport for each scenario: `scenario::websocket`, `scenario::sse`,
/// `scenario::poll`.
macro_rules! per_transport {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Transport;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn websocket() -> anyhow::Result<()> {
                super::$scenario(Transport::WebSocket).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sse() -> anyhow::Result<()> {
                super::$scenario(Transport::Sse).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poll() -> anyhow::Result<()> {
                super::$scenario(Transport::Poll).await
            }
        }
    )*};
}

/// The same for what only the fallback transports have.
macro_rules! per_fallback {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Transport;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sse() -> anyhow::Result<()> {
                super::$scenario(Transport::Sse).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poll() -> anyhow::Result<()> {
                super::$scenario(Transport::Poll).await
            }
        }
    )*};
}

per_transport!(
    welcome_carries_every_field,
    admission_is_the_websockets,
    subscribe_publish_and_reply_ids,
    bad_frames_get_errors_and_the_session_stays,
    too_many_bad_frames_close_with_1008,
    forbidden_with_auth_on,
    one_subscription_past_the_limit_is_refused,
    history_pages_the_room,
    recovery_and_idempotency_answer_as_on_the_websocket,
    the_server_api_reaches_every_transport,
    presence_events_cross_transports,
    since_recovers_with_no_gap_or_repeat,
    directs_and_the_inbox,
    a_flood_is_rate_limited_then_closed_with_1008,
    an_oversize_frame_is_refused,
    an_expiring_token_closes_the_session_with_1008,
    a_drain_closes_every_session_with_1001,
);

per_fallback!(
    bad_posts_get_http_errors_and_the_session_stays,
    a_session_whose_client_went_away_is_reaped,
);
