//! The fallback transports on one node (embedded broker): the SSE stream as `curl -N` reads it,
//! long polls, POSTed frames, rooms and presence shared with WebSocket clients, `since`
//! recovery, bad requests (each refused with its status while the node keeps serving),
//! sessions whose client went away (reaped), the drain's last `close` frame, the client's own
//! end of a session (`DELETE`), and CORS for pages on another origin.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use switchboard_e2e::api::api;
use switchboard_e2e::auth::{token_signed_with, unix_now};
use switchboard_e2e::client::{connect_user, expect_ping_pong, publish, request_answer};
use switchboard_e2e::http::{
    SessionKey, SseItem, SseStream, get, open_poll, open_sse, post_raw, public_url,
};
use switchboard_e2e::{DEADLINE, NodeProcess, RedisProcess, wait_until};
use switchboard_protocol::{ClientFrame, ServerFrame};

/// Heartbeats and idle checks fast enough for a test; the poll timeout short so an empty poll
/// answers quickly.
const FAST: &[&str] = &[
    "--heartbeat-ms",
    "200",
    "--idle-timeout-ms",
    "2000",
    "--poll-timeout-ms",
    "600",
];

/// Opens an SSE session for `user`; returns the stream, its welcome and key.
async fn sse_session(node: &NodeProcess, user: &str) -> Result<(SseStream, Value, SessionKey)> {
    let (status, stream, body) = open_sse(node, &format!("/sse?user={user}"), &[]).await?;
    ensure!(status == 200, "SSE open refused: {status} {body}");
    let mut stream = stream.context("a stream")?;
    let welcome = stream.next_frame().await?;
    let key = SessionKey::of(&welcome)?;
    Ok((stream, welcome, key))
}

/// POSTs `body` and expects 202 `{accepted: n}`.
async fn post_accepted(
    node: &NodeProcess,
    key: &SessionKey,
    transport: &str,
    body: Value,
    n: u64,
) -> Result<()> {
    let answer = key.post(node, transport, &body).await?;
    ensure!(
        answer.status == 202 && answer.body == json!({"accepted": n}),
        "POST {body} answered {answer:?}"
    );
    ensure!(answer.header("cache-control") == Some("no-store"));
    Ok(())
}

async fn sessions(node: &NodeProcess, transport: &str) -> Result<f64> {
    node.metric(&format!(
        "switchboard_sessions{{transport=\"{transport}\"}}"
    ))
    .await
}

async fn wait_sessions(node: &NodeProcess, transport: &str, count: f64) -> Result<()> {
    wait_until(&format!("{count} {transport} sessions"), || async {
        sessions(node, transport).await.ok() == Some(count)
    })
    .await
}

#[tokio::test]
async fn an_sse_stream_reads_as_plain_text_events_with_heartbeats_and_replies() -> Result<()> {
    let node = NodeProcess::start(FAST).await?;
    // No Accept header: `curl -N` works as EventSource does.
    let (status, stream, _) = open_sse(&node, "/sse?user=alice", &[]).await?;
    ensure!(status == 200);
    let mut stream = stream.context("a stream")?;
    let headers = &stream.response_headers;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    ensure!(
        header("content-type") == Some("text/event-stream"),
        "{headers:?}"
    );
    ensure!(header("cache-control") == Some("no-store"), "{headers:?}");
    ensure!(header("x-accel-buffering") == Some("no"), "{headers:?}");
    let welcome = stream.next_frame().await?;
    ensure!(
        stream.raw.starts_with("data: {") && stream.raw.contains("\"type\":\"welcome\""),
        "the first event is the welcome as one data line: {:?}",
        stream.raw
    );
    ensure!(welcome["transport"] == "sse" && welcome["user"] == "alice");
    let key = SessionKey::of(&welcome)?;
    ensure!(
        key.key.len() == 32
            && key
                .key
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
        "session_key is 32 lowercase hex digits: {}",
        key.key
    );
    // A heartbeat comment comes within a few heartbeat periods.
    let item = stream.next_item().await?;
    ensure!(item == Some(SseItem::Comment), "a heartbeat, not {item:?}");
    ensure!(stream.raw.contains("\n\n:\n\n"), "{:?}", stream.raw);
    post_accepted(&node, &key, "sse", json!({"type": "ping", "id": 1}), 1).await?;
    ensure!(stream.next_frame().await? == json!({"type": "pong", "id": 1}));
    post_accepted(
        &node,
        &key,
        "sse",
        json!([{"type": "ping", "id": 2}, {"type": "ping", "id": 3}]),
        2,
    )
    .await?;
    ensure!(stream.next_frame().await?["id"] == 2);
    ensure!(stream.next_frame().await?["id"] == 3);
    // A frame the session cannot decode is answered down the stream, as on /ws.
    post_accepted(&node, &key, "sse", json!({"type": "nonsense", "id": 4}), 1).await?;
    let error = stream.next_frame().await?;
    ensure!(error["type"] == "error" && error["id"] == 4, "{error}");
    ensure!(sessions(&node, "sse").await? == 1.0);
    ensure!(node.metric("switchboard_connections").await? == 1.0);
    ensure!(
        node.metric("switchboard_handshakes_total{result=\"ok\"}")
            .await?
            == 1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_long_poll_session_opens_polls_times_out_and_gets_replies() -> Result<()> {
    let node = NodeProcess::start(FAST).await?;
    let (opened, key) = open_poll(&node, "?user=bob").await?;
    let frames = opened.body.as_array().context("an array")?;
    ensure!(frames.len() == 1, "[welcome] alone: {frames:?}");
    ensure!(frames[0]["transport"] == "poll" && frames[0]["user"] == "bob");
    ensure!(opened.header("x-switchboard-session") == Some(key.session.as_str()));
    ensure!(opened.header("content-type") == Some("application/json"));
    ensure!(opened.header("cache-control") == Some("no-store"));
    // Nothing queued: `[]` after the poll timeout (600 ms), well before the deadline.
    let empty = key.poll_within(&node, DEADLINE).await?;
    ensure!(empty.status == 200 && empty.body == json!([]), "{empty:?}");
    post_accepted(&node, &key, "poll", json!([{"type": "ping", "id": 7}]), 1).await?;
    let frames = key.poll_until(&node, "pong").await?;
    ensure!(
        frames.last() == Some(&json!({"type": "pong", "id": 7})),
        "{frames:?}"
    );
    // The POST path's transport name is informational.
    post_accepted(&node, &key, "sse", json!({"type": "ping", "id": 8}), 1).await?;
    let frames = key.poll_until(&node, "pong").await?;
    ensure!(frames.last().is_some_and(|f| f["id"] == 8), "{frames:?}");
    Ok(())
}

#[tokio::test]
async fn a_new_poll_answers_the_waiting_one_with_an_empty_array() -> Result<()> {
    // A long poll timeout: an early `[]` can only come from the second poll.
    let node = NodeProcess::start(&["--poll-timeout-ms", "30000"]).await?;
    let (_, key) = open_poll(&node, "?user=carol").await?;
    let mut first = tokio::spawn({
        let (key, url) = (key.clone(), node.public);
        async move { poll_at(url, &key).await }
    });
    let mut second = tokio::spawn({
        let (key, url) = (key.clone(), node.public);
        async move { poll_at(url, &key).await }
    });
    // Whichever reached the session first is answered `[]` when the other takes its place.
    let (finished, other) = tokio::select! {
        answer = &mut first => (answer, second),
        answer = &mut second => (answer, first),
    };
    let (status, body) = finished??;
    ensure!(status == 200 && body == json!([]), "{status} {body}");
    post_accepted(&node, &key, "poll", json!({"type": "ping", "id": 1}), 1).await?;
    let (status, body) = tokio::time::timeout(DEADLINE, other).await???;
    ensure!(
        status == 200 && body == json!([{"type": "pong", "id": 1}]),
        "{status} {body}"
    );
    Ok(())
}

/// One poll straight at `addr` (for a spawned task, which cannot borrow the node).
async fn poll_at(addr: std::net::SocketAddr, key: &SessionKey) -> Result<(u16, Value)> {
    let response = switchboard_e2e::http::http_client()
        .get(format!("http://{addr}/poll/{}", key.session))
        .header("authorization", format!("Session {}", key.key))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

#[tokio::test]
async fn websocket_sse_and_poll_clients_share_rooms_and_presence() -> Result<()> {
    let node = NodeProcess::start(FAST).await?;
    let mut ws = connect_user(&node, "wendy").await?;
    let reply = request_answer(
        &mut ws,
        ClientFrame::Subscribe {
            room: "lobby".into(),
            id: Some(1),
            since: None,
            presence_events: true,
        },
    )
    .await?;
    ensure!(matches!(reply, ServerFrame::Reply(_)), "{reply:?}");
    let (mut sse, _, sse_key) = sse_session(&node, "sam").await?;
    let subscribe = json!({"type": "subscribe", "room": "lobby", "id": 1, "presence_events": true});
    post_accepted(&node, &sse_key, "sse", subscribe.clone(), 1).await?;
    ensure!(sse.frame_of("reply").await?["id"] == 1);
    let (_, poll_key) = open_poll(&node, "?user=paula").await?;
    post_accepted(&node, &poll_key, "poll", subscribe, 1).await?;
    poll_key.poll_until(&node, "reply").await?;
    // Both fallback sessions joined: the WebSocket watcher and the SSE client see it.
    let joined = sse.frame_of("join").await?;
    ensure!(joined["user"] == "paula" && joined["session"] == poll_key.session.as_str());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let ServerFrame::Join(notice) = ws.next_frame().await? {
            seen.push(notice.user);
        }
    }
    seen.sort();
    ensure!(seen == ["paula", "sam"], "{seen:?}");
    // A WebSocket publish reaches both fallback clients.
    publish(&mut ws, "lobby", json!("from ws"), 2).await?;
    let message = sse.frame_of("message").await?;
    ensure!(message["data"] == "from ws" && message["from"]["user"] == "wendy");
    let polled = poll_key.poll_until(&node, "message").await?;
    ensure!(
        polled.last().is_some_and(|m| m["data"] == "from ws"),
        "{polled:?}"
    );
    // A POSTed publish reaches the WebSocket client and the poll client.
    let publish = json!({"type": "publish", "room": "lobby", "data": "from sse", "id": 2});
    post_accepted(&node, &sse_key, "sse", publish, 1).await?;
    ensure!(sse.frame_of("reply").await?["offset"] == 2);
    loop {
        // The WebSocket client is subscribed: its own publish comes first.
        if let ServerFrame::Message(message) = ws.next_frame().await?
            && message.data == json!("from sse")
        {
            ensure!(message.offset == 2 && message.from.as_ref().is_some_and(|f| f.user == "sam"));
            break;
        }
    }
    let polled = poll_key.poll_until(&node, "message").await?;
    ensure!(
        polled.last().is_some_and(|m| m["data"] == "from sse"),
        "{polled:?}"
    );
    // Presence lists the fallback sessions like any other.
    let (status, members) = api(&node, "GET", "/api/presence/lobby", None).await?;
    ensure!(status == 200 && members["members"].as_array().map(Vec::len) == Some(3));
    // The SSE client leaves by closing its stream: the others see it leave.
    drop(sse);
    loop {
        if let ServerFrame::Leave(notice) = ws.next_frame().await? {
            ensure!(notice.user == "sam" && notice.session == sse_key.session);
            break;
        }
    }
    wait_sessions(&node, "sse", 0.0).await?;
    let gone = sse_key.post(&node, "sse", &json!({"type": "ping"})).await?;
    ensure!(
        gone.status == 404 && gone.body["code"] == "unknown_session",
        "{gone:?}"
    );
    expect_ping_pong(&mut ws, 9).await?;
    Ok(())
}

#[tokio::test]
async fn since_recovers_missed_messages_over_sse() -> Result<()> {
    let node = NodeProcess::start(FAST).await?;
    let mut epoch = String::new();
    for n in 1..=3 {
        let (status, body) = api(
            &node,
            "POST",
            "/api/publish",
            Some(json!({"room": "news", "data": n})),
        )
        .await?;
        ensure!(status == 200, "{body}");
        epoch = body["epoch"].as_str().context("epoch")?.to_owned();
    }
    let (mut sse, _, key) = sse_session(&node, "reader").await?;
    let subscribe = json!({"type": "subscribe", "room": "news", "id": 5,
        "since": {"offset": 1, "epoch": epoch}});
    post_accepted(&node, &key, "sse", subscribe, 1).await?;
    let reply = sse.next_frame().await?;
    ensure!(
        reply["type"] == "reply" && reply["recovered"] == true,
        "{reply}"
    );
    for (offset, data) in [(2, 2), (3, 3)] {
        let message = sse.next_frame().await?;
        ensure!(
            message["type"] == "message" && message["offset"] == offset && message["data"] == data,
            "{message}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn bad_posts_and_polls_are_refused_with_their_status_and_the_node_keeps_serving() -> Result<()>
{
    let node = NodeProcess::start(&["--max-message-size", "2048"]).await?;
    let (mut sse, _, key) = sse_session(&node, "alice").await?;
    // Kept open: the session lives as long as its stream.
    let (_other_stream, _, other) = sse_session(&node, "mallory").await?;
    let path = format!("/sse/{}", key.session);
    let authorization = format!("Session {}", key.key);
    let auth: &[(&str, &str)] = &[("authorization", authorization.as_str())];
    // What is sent, body, headers, expected status and code.
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("not JSON", "{\"type\":".to_owned(), auth, 400, "bad_frame"),
        ("an empty array", "[]".to_owned(), auth, 400, "bad_frame"),
        ("a number", "42".to_owned(), auth, 400, "bad_frame"),
        (
            "an array of non-objects",
            "[{}, \"x\"]".to_owned(),
            auth,
            400,
            "bad_frame",
        ),
        (
            "a body over the limit",
            format!("{{\"data\":\"{}\"}}", "x".repeat(3000)),
            auth,
            413,
            "too_large",
        ),
        (
            "101 frames",
            format!("[{}]", vec!["{\"type\":\"ping\"}"; 101].join(",")),
            auth,
            413,
            "too_large",
        ),
        (
            "no key",
            "{\"type\":\"ping\"}".to_owned(),
            &[],
            403,
            "forbidden",
        ),
        (
            "a wrong key",
            "{\"type\":\"ping\"}".to_owned(),
            &[("authorization", "Session 00000000000000000000000000000000")],
            403,
            "forbidden",
        ),
        (
            "a bearer token",
            "{\"type\":\"ping\"}".to_owned(),
            &[("authorization", "Bearer x")],
            403,
            "forbidden",
        ),
    ];
    for (what, body, headers, status, code) in cases {
        let answer = post_raw(&node, &path, body, headers).await?;
        ensure!(
            answer.status == status && answer.body["code"] == code,
            "{what}: expected {status} {code}, got {answer:?}"
        );
        ensure!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    // Another user's session key does not open this session.
    let stolen = format!("Session {}", other.key);
    let answer = post_raw(&node, &path, "{}", &[("authorization", stolen.as_str())]).await?;
    ensure!(answer.status == 403, "{answer:?}");
    let poll = get(&node, &format!("/poll/{}", other.session), auth, DEADLINE).await?;
    ensure!(poll.status == 403, "{poll:?}");
    // A WebSocket session takes no POSTs; its id is no fallback session.
    let mut ws = connect_user(&node, "wanda").await?;
    request_answer(
        &mut ws,
        ClientFrame::Subscribe {
            room: "r".into(),
            id: Some(1),
            since: None,
            presence_events: false,
        },
    )
    .await?;
    let (status, members) = api(&node, "GET", "/api/presence/r", None).await?;
    ensure!(status == 200, "{members}");
    let ws_session = members["members"][0]["session"]
        .as_str()
        .context("the ws session")?
        .to_owned();
    for session in [ws_session.as_str(), "0123456789abcdef"] {
        let answer = post_raw(&node, &format!("/poll/{session}"), "{}", auth).await?;
        ensure!(
            answer.status == 404 && answer.body["code"] == "unknown_session",
            "{session}: {answer:?}"
        );
        let polled = get(&node, &format!("/poll/{session}"), auth, DEADLINE).await?;
        ensure!(polled.status == 404, "{session}: {polled:?}");
    }
    // An SSE session is not polled.
    let polled = get(&node, &format!("/poll/{}", key.session), auth, DEADLINE).await?;
    ensure!(polled.status == 404, "{polled:?}");
    let wrong_method = get(&node, &path, auth, DEADLINE).await?;
    ensure!(wrong_method.status == 405, "{wrong_method:?}");
    // Nothing reached the session; it and the node still serve.
    post_accepted(&node, &key, "sse", json!({"type": "ping", "id": 1}), 1).await?;
    ensure!(sse.next_frame().await? == json!({"type": "pong", "id": 1}));
    expect_ping_pong(&mut ws, 2).await?;
    let refused = |result: &str| {
        format!("switchboard_fallback_requests_total{{endpoint=\"post\",result=\"{result}\"}}")
    };
    ensure!(node.metric(&refused("bad_frame")).await? == 4.0);
    ensure!(node.metric(&refused("too_large")).await? == 2.0);
    ensure!(node.metric(&refused("forbidden")).await? == 4.0);
    ensure!(node.metric(&refused("not_found")).await? == 2.0);
    Ok(())
}

#[tokio::test]
async fn the_front_door_limits_posts_and_polls_like_handshakes() -> Result<()> {
    let node =
        NodeProcess::start(&["--connect-rate-per-ip", "1", "--connect-burst-per-ip", "3"]).await?;
    let (_, key) = open_poll(&node, "?user=flood").await?;
    let mut refused = None;
    for n in 0..20 {
        let answer = key
            .post(&node, "poll", &json!({"type": "ping", "id": n}))
            .await?;
        if answer.status == 429 {
            refused = Some(answer);
            break;
        }
        ensure!(answer.status == 202, "{answer:?}");
    }
    let refused = refused.context("20 POSTs in a burst of 3 were never refused")?;
    ensure!(refused.header("retry-after").is_some(), "{refused:?}");
    // Once the rate allows it again, the session is still there and answers.
    wait_until("a POST accepted again", || async {
        key.post(&node, "poll", &json!({"type": "ping", "id": 99}))
            .await
            .is_ok_and(|answer| answer.status == 202)
    })
    .await?;
    // Polls are connections too: the first ones may be refused until the rate allows them.
    wait_until("a poll with the pongs", || async {
        key.poll_within(&node, DEADLINE).await.is_ok_and(|answer| {
            answer.status == 200
                && answer
                    .body
                    .as_array()
                    .is_some_and(|frames| frames.iter().any(|frame| frame["type"] == "pong"))
        })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_poll_session_nobody_polls_is_reaped_after_the_idle_timeout() -> Result<()> {
    let node = NodeProcess::start(FAST).await?;
    let mut watcher = connect_user(&node, "watcher").await?;
    request_answer(
        &mut watcher,
        ClientFrame::Subscribe {
            room: "room".into(),
            id: Some(1),
            since: None,
            presence_events: true,
        },
    )
    .await?;
    let (_, key) = open_poll(&node, "?user=ghost").await?;
    let subscribe = json!({"type": "subscribe", "room": "room", "id": 1});
    post_accepted(&node, &key, "poll", subscribe, 1).await?;
    ensure!(sessions(&node, "poll").await? == 1.0);
    // It never polls again: it joins, then is reaped and leaves.
    let mut joined = false;
    loop {
        match watcher.next_frame().await? {
            ServerFrame::Join(notice) if notice.user == "ghost" => joined = true,
            ServerFrame::Leave(notice) if notice.user == "ghost" => break,
            _ => {}
        }
    }
    ensure!(joined, "the leave came without a join");
    wait_sessions(&node, "poll", 0.0).await?;
    ensure!(node.metric("switchboard_connections").await? == 1.0);
    let polled = key.poll_within(&node, DEADLINE).await?;
    ensure!(polled.status == 404, "{polled:?}");
    expect_ping_pong(&mut watcher, 2).await?;
    Ok(())
}

#[tokio::test]
async fn a_drain_ends_the_stream_and_the_waiting_poll_with_a_close_frame() -> Result<()> {
    let mut node = NodeProcess::start(&[
        "--drain-grace-ms",
        "0",
        "--poll-timeout-ms",
        "30000",
        "--log",
        "info,switchboard::session=debug",
    ])
    .await?;
    let (mut sse, _, _) = sse_session(&node, "streamer").await?;
    let (_, key) = open_poll(&node, "?user=poller").await?;
    let poll = tokio::spawn({
        let (key, url) = (key.clone(), node.public);
        async move { poll_at(url, &key).await }
    });
    // The poll waits at the session before the drain starts (the session logs it).
    wait_until("the poll to wait", || async {
        node.logs()
            .iter()
            .any(|line| line.contains("poll waiting") && line.contains(&key.session))
    })
    .await?;
    node.terminate();
    let frames = sse.until_end().await?;
    let last = frames.last().context("no frame before the end")?;
    ensure!(
        last["type"] == "close" && last["code"] == 1001,
        "the stream's last frame: {frames:?}"
    );
    let (status, body) = tokio::time::timeout(DEADLINE, poll).await???;
    let last = body.as_array().and_then(|frames| frames.last()).cloned();
    ensure!(
        status == 200
            && last
                .as_ref()
                .is_some_and(|f| f["type"] == "close" && f["code"] == 1001),
        "the poll's answer: {status} {body}"
    );
    let status = node.wait_exit(DEADLINE).await?;
    ensure!(status.success(), "{status}");
    Ok(())
}

#[tokio::test]
async fn fallback_opens_are_refused_like_handshakes() -> Result<()> {
    let node = NodeProcess::start(&[
        "--jwt-secret",
        "0123456789abcdef0123456789abcdef",
        "--allowed-origins",
        "https://app.example",
    ])
    .await?;
    for path in ["/sse", "/poll"] {
        let origin = [("origin", "https://app.example")];
        let unauthorized = get(&node, &format!("{path}?user=x"), &origin, DEADLINE).await?;
        ensure!(unauthorized.status == 401, "{path}: {unauthorized:?}");
        let bad_origin = [("origin", "https://evil.example")];
        let forbidden = get(&node, &format!("{path}?token=x"), &bad_origin, DEADLINE).await?;
        ensure!(forbidden.status == 403, "{path}: {forbidden:?}");
    }
    ensure!(
        node.metric("switchboard_handshakes_total{result=\"unauthorized\"}")
            .await?
            == 2.0
    );
    ensure!(
        node.metric("switchboard_handshakes_total{result=\"forbidden_origin\"}")
            .await?
            == 2.0
    );
    let unknown = get(&node, "/ssex", &[], DEADLINE).await?;
    ensure!(unknown.status == 404, "{unknown:?}");
    ensure!(public_url(&node, "/sse").starts_with("http://127.0.0.1:"));
    Ok(())
}

#[tokio::test]
async fn an_expired_token_ends_an_sse_session_with_1008() -> Result<()> {
    const SECRET: &str = "0123456789abcdef-fallback-expiry";
    let node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-leeway-secs",
        "0",
        "--heartbeat-ms",
        "200",
        "--idle-timeout-ms",
        "2000",
    ])
    .await?;
    let claims = |sub: &str, exp: u64| json!({"sub": sub, "exp": exp, "rooms": ["*"]});
    let short = token_signed_with(SECRET, &claims("brief", unix_now() + 2));
    let long = token_signed_with(SECRET, &claims("steady", unix_now() + 3600));
    let started = tokio::time::Instant::now();
    let (status, stream, body) = open_sse(&node, &format!("/sse?token={short}"), &[]).await?;
    ensure!(status == 200, "{status} {body}");
    let mut stream = stream.context("a stream")?;
    ensure!(stream.next_frame().await?["user"] == "brief");
    // The Authorization header works as on /ws.
    let bearer = format!("Bearer {long}");
    let (status, steady, body) =
        open_sse(&node, "/sse", &[("authorization", bearer.as_str())]).await?;
    ensure!(status == 200, "{status} {body}");
    let mut steady = steady.context("a stream")?;
    let key = SessionKey::of(&steady.next_frame().await?)?;
    let frames = stream.until_end().await?;
    let last = frames.last().context("no close frame")?;
    ensure!(
        last["type"] == "close" && last["code"] == 1008 && last["reason"] == "token expired",
        "{frames:?}"
    );
    ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before the token expired"
    );
    post_accepted(&node, &key, "sse", json!({"type": "ping", "id": 1}), 1).await?;
    ensure!(steady.frame_of("pong").await?["id"] == 1);
    Ok(())
}

#[tokio::test]
async fn a_stream_nobody_reads_is_closed_as_a_slow_reader_and_the_node_keeps_serving() -> Result<()>
{
    let node = NodeProcess::start(&["--max-message-size", "65536"]).await?;
    // The SSE client subscribes, then never reads its stream again.
    let (_stalled, _, key) = sse_session(&node, "stalled").await?;
    let subscribe = json!({"type": "subscribe", "room": "firehose", "id": 1});
    post_accepted(&node, &key, "sse", subscribe, 1).await?;
    let data = json!("x".repeat(60_000));
    let mut published = 0;
    while node
        .metric("switchboard_slow_consumer_closes_total")
        .await?
        < 1.0
    {
        ensure!(
            published < 400,
            "24 MB published and the stalled stream's queue never overflowed"
        );
        let body = json!({"room": "firehose", "data": data});
        let (status, answer) = api(&node, "POST", "/api/publish", Some(body)).await?;
        ensure!(status == 200, "{answer}");
        published += 1;
    }
    // Its queue overflowed: the session ends (the close frame cannot reach a stream nobody
    // reads) and leaves no trace.
    wait_sessions(&node, "sse", 0.0).await?;
    ensure!(node.metric("switchboard_queue_bytes").await? == 0.0);
    let gone = key.post(&node, "sse", &json!({"type": "ping"})).await?;
    ensure!(gone.status == 404, "{gone:?}");
    let mut reader = connect_user(&node, "reader").await?;
    request_answer(
        &mut reader,
        ClientFrame::Subscribe {
            room: "firehose".into(),
            id: Some(1),
            since: None,
            presence_events: false,
        },
    )
    .await?;
    publish(&mut reader, "firehose", data.clone(), 2).await?;
    loop {
        if let ServerFrame::Message(message) = reader.next_frame().await? {
            ensure!(message.data == data);
            break;
        }
    }
    Ok(())
}

/// `DELETE /{transport}/{session}` with `authorization` (none when `None`): status and body.
async fn delete(
    node: &NodeProcess,
    transport: &str,
    session: &str,
    authorization: Option<&str>,
) -> Result<(u16, reqwest::header::HeaderMap, String)> {
    let mut request = switchboard_e2e::http::http_client()
        .delete(public_url(node, &format!("/{transport}/{session}")))
        .timeout(DEADLINE);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Ok((status, headers, response.text().await?))
}

async fn delete_key(
    node: &NodeProcess,
    transport: &str,
    key: &SessionKey,
) -> Result<(u16, reqwest::header::HeaderMap, String)> {
    let authorization = format!("Session {}", key.key);
    delete(node, transport, &key.session, Some(&authorization)).await
}

async fn deletes(node: &NodeProcess, result: &str) -> Result<f64> {
    node.metric(&format!(
        "switchboard_fallback_requests_total{{endpoint=\"delete\",result=\"{result}\"}}"
    ))
    .await
}

#[tokio::test]
async fn delete_ends_a_session_at_once_with_a_close_frame_for_the_waiting_poll() -> Result<()> {
    // Idle timeout and poll timeout long: what ends the sessions here is the DELETE.
    let node = NodeProcess::start(&[
        "--idle-timeout-ms",
        "120000",
        "--poll-timeout-ms",
        "60000",
        "--log",
        "info,switchboard::session=debug",
    ])
    .await?;
    let mut watcher = connect_user(&node, "watcher").await?;
    request_answer(
        &mut watcher,
        ClientFrame::Subscribe {
            room: "room".into(),
            id: Some(1),
            since: None,
            presence_events: true,
        },
    )
    .await?;
    let subscribe = json!({"type": "subscribe", "room": "room", "id": 1});
    let (_, key) = open_poll(&node, "?user=leaver").await?;
    post_accepted(&node, &key, "poll", subscribe.clone(), 1).await?;
    key.poll_until(&node, "reply").await?;
    let waits = || {
        node.logs()
            .iter()
            .filter(|line| line.contains("poll waiting") && line.contains(&key.session))
            .count()
    };
    let before = waits();
    let poll = tokio::spawn({
        let (key, url) = (key.clone(), node.public);
        async move { poll_at(url, &key).await }
    });
    wait_until("the poll to wait", || async { waits() > before }).await?;
    // A wrong or missing key: 403, the session stays.
    let (status, _, body) = delete(&node, "poll", &key.session, Some("Session nope")).await?;
    ensure!(
        status == 403 && body.contains("forbidden"),
        "{status} {body}"
    );
    let (status, _, body) = delete(&node, "poll", &key.session, None).await?;
    ensure!(status == 403, "{status} {body}");
    ensure!(sessions(&node, "poll").await? == 1.0);

    let (status, headers, body) = delete_key(&node, "poll", &key).await?;
    ensure!(status == 204 && body.is_empty(), "{status} {body}");
    ensure!(
        headers
            .get("cache-control")
            .is_some_and(|v| v == "no-store")
    );
    // Gone everywhere when the 204 comes: the waiting poll got the close frame, the watcher
    // sees the leave, the session is not in presence.
    let (status, answer) = tokio::time::timeout(DEADLINE, poll).await???;
    ensure!(
        status == 200
            && answer.as_array().and_then(|frames| frames.last())
                == Some(&json!({"type": "close", "code": 1000, "reason": "closed by the client"})),
        "the waiting poll's answer: {status} {answer}"
    );
    ensure!(sessions(&node, "poll").await? == 0.0);
    let (status, members) = api(&node, "GET", "/api/presence/room", None).await?;
    ensure!(status == 200 && members["members"].as_array().map(Vec::len) == Some(1));
    loop {
        match watcher.next_frame().await? {
            ServerFrame::Leave(notice) => {
                ensure!(notice.user == "leaver" && notice.session == key.session);
                break;
            }
            ServerFrame::Join(_) => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let (status, _, body) = delete_key(&node, "poll", &key).await?;
    ensure!(
        status == 404 && body.contains("unknown_session"),
        "{status} {body}"
    );
    ensure!(key.poll_within(&node, DEADLINE).await?.status == 404);

    // An SSE session, ended by DELETE on its own path while its client still reads: the
    // stream ends with the close frame; a session nobody knows: 404.
    let (mut sse, _, sse_key) = sse_session(&node, "streamer").await?;
    post_accepted(&node, &sse_key, "sse", subscribe, 1).await?;
    ensure!(sse.frame_of("reply").await?["id"] == 1);
    let (status, _, body) = delete_key(&node, "sse", &sse_key).await?;
    ensure!(status == 204, "{status} {body}");
    let frames = sse.until_end().await?;
    ensure!(
        frames.last()
            == Some(&json!({"type": "close", "code": 1000, "reason": "closed by the client"})),
        "{frames:?}"
    );
    loop {
        if let ServerFrame::Leave(notice) = watcher.next_frame().await? {
            ensure!(notice.user == "streamer");
            break;
        }
    }
    ensure!(sessions(&node, "sse").await? == 0.0);
    let (status, _, _) = delete(&node, "sse", "0123456789abcdef", Some("Session k")).await?;
    ensure!(status == 404);
    ensure!(deletes(&node, "ok").await? == 2.0);
    ensure!(deletes(&node, "forbidden").await? == 2.0);
    ensure!(deletes(&node, "not_found").await? == 2.0);
    expect_ping_pong(&mut watcher, 2).await?;
    Ok(())
}

#[tokio::test]
async fn a_delete_that_reaches_another_node_is_told_421_and_the_session_lives_on() -> Result<()> {
    let redis = RedisProcess::start().await?;
    let url = redis.url();
    let a = NodeProcess::start(&["--redis", &url, "--node-id", "del-a"]).await?;
    let b = NodeProcess::start(&["--redis", &url, "--node-id", "del-b"]).await?;
    a.wait_ready().await?;
    b.wait_ready().await?;
    let (_, key) = open_poll(&a, "?user=sticky").await?;
    let (status, _, body) = delete_key(&b, "poll", &key).await?;
    ensure!(
        status == 421 && body.contains("wrong_node"),
        "{status} {body}"
    );
    let authorization = "Session 00000000000000000000000000000000";
    let (status, _, body) = delete(&b, "poll", &key.session, Some(authorization)).await?;
    ensure!(
        status == 403 && body.contains("forbidden"),
        "{status} {body}"
    );
    ensure!(deletes(&b, "wrong_node").await? == 1.0);
    // Still there: a POST through the other node reaches it, its own node ends it.
    post_accepted(&b, &key, "poll", json!({"type": "ping", "id": 7}), 1).await?;
    let polled = key.poll_until(&a, "pong").await?;
    ensure!(polled.last().is_some_and(|f| f["id"] == 7), "{polled:?}");
    let (status, _, _) = delete_key(&a, "poll", &key).await?;
    ensure!(status == 204);
    // The link went with it: the other node no longer finds it.
    let (status, _, body) = delete_key(&b, "poll", &key).await?;
    ensure!(status == 404, "{status} {body}");
    Ok(())
}

/// `method path` on the public port with `headers`: status and headers.
async fn request_headers(
    node: &NodeProcess,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, reqwest::header::HeaderMap)> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut request = switchboard_e2e::http::http_client()
        .request(method, public_url(node, path))
        .timeout(DEADLINE);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    Ok((response.status().as_u16(), response.headers().clone()))
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Every value of a comma-separated header, lowercase.
fn header_list(headers: &reqwest::header::HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|item| item.trim().to_ascii_lowercase())
        .collect()
}

/// A browser's preflight of a POST (or DELETE) with the session key from `origin`.
async fn preflight(
    node: &NodeProcess,
    path: &str,
    origin: &str,
    method: &str,
) -> Result<(u16, reqwest::header::HeaderMap)> {
    request_headers(
        node,
        "OPTIONS",
        path,
        &[
            ("origin", origin),
            ("access-control-request-method", method),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn without_an_allow_list_the_fallback_endpoints_allow_any_origin() -> Result<()> {
    let node = NodeProcess::start(FAST).await?;
    let origin = "https://app.example.com";
    let (_, key) = open_poll(&node, "?user=far").await?;
    for (path, method) in [
        (format!("/poll/{}", key.session), "POST"),
        (format!("/sse/{}", key.session), "DELETE"),
        ("/sse".to_owned(), "GET"),
    ] {
        let (status, headers) = preflight(&node, &path, origin, method).await?;
        ensure!(status == 200, "{path}: {status}");
        ensure!(
            header(&headers, "access-control-allow-origin") == Some("*"),
            "{headers:?}"
        );
        let methods = header_list(&headers, "access-control-allow-methods");
        ensure!(
            ["get", "post", "delete"]
                .iter()
                .all(|m| methods.iter().any(|x| x == m)),
            "{methods:?}"
        );
        let allowed = header_list(&headers, "access-control-allow-headers");
        ensure!(
            allowed.contains(&"authorization".into()) && allowed.contains(&"content-type".into()),
            "{allowed:?}"
        );
        ensure!(
            header(&headers, "access-control-max-age") == Some("3600"),
            "{headers:?}"
        );
        ensure!(
            header(&headers, "connection") == Some("close"),
            "{headers:?}"
        );
        ensure!(header(&headers, "access-control-allow-credentials").is_none());
    }
    // Simple requests: the open answer's session header is readable by the page.
    let (status, headers) =
        request_headers(&node, "GET", "/poll?user=page", &[("origin", origin)]).await?;
    ensure!(status == 200 && header(&headers, "access-control-allow-origin") == Some("*"));
    let exposed = header_list(&headers, "access-control-expose-headers");
    ensure!(
        exposed.contains(&"x-switchboard-session".into())
            && exposed.contains(&"retry-after".into()),
        "{exposed:?}"
    );
    let authorization = format!("Session {}", key.key);
    let (status, headers) = request_headers(
        &node,
        "GET",
        &format!("/poll/{}", key.session),
        &[("origin", origin), ("authorization", &authorization)],
    )
    .await?;
    ensure!(status == 200 && header(&headers, "access-control-allow-origin") == Some("*"));
    // Refusals carry it too, so the page can read their status and Retry-After.
    let (status, headers) = request_headers(
        &node,
        "GET",
        &format!("/poll/{}", key.session),
        &[("origin", origin), ("authorization", "Session wrong")],
    )
    .await?;
    ensure!(status == 403 && header(&headers, "access-control-allow-origin") == Some("*"));
    // WebSocket and the other paths get no CORS.
    let (status, headers) = preflight(&node, "/ws", origin, "GET").await?;
    ensure!(
        status != 200 && header(&headers, "access-control-allow-origin").is_none(),
        "{status} {headers:?}"
    );
    let (_, headers) = request_headers(&node, "GET", "/ws?user=x", &[("origin", origin)]).await?;
    ensure!(
        header(&headers, "access-control-allow-origin").is_none(),
        "{headers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn with_an_allow_list_only_its_origins_are_allowed_and_echoed() -> Result<()> {
    let allowed = "https://app.example.com";
    let node = NodeProcess::start(&[
        "--allowed-origins",
        "https://app.example.com,https://other.example",
    ])
    .await?;
    let (status, stream, body) = open_sse(&node, "/sse?user=pager", &[("origin", allowed)]).await?;
    ensure!(status == 200, "{status} {body}");
    let mut stream = stream.context("a stream")?;
    let headers = stream.response_headers.clone();
    ensure!(
        header(&headers, "access-control-allow-origin") == Some(allowed),
        "{headers:?}"
    );
    ensure!(
        header_list(&headers, "vary").contains(&"origin".into()),
        "{headers:?}"
    );
    let key = SessionKey::of(&stream.next_frame().await?)?;
    let path = format!("/sse/{}", key.session);
    for method in ["POST", "DELETE"] {
        let (status, headers) = preflight(&node, &path, allowed, method).await?;
        ensure!(
            status == 200 && header(&headers, "access-control-allow-origin") == Some(allowed),
            "{headers:?}"
        );
        ensure!(
            header_list(&headers, "vary").contains(&"origin".into()),
            "{headers:?}"
        );
        // Any other origin: no permission, so its browser sends nothing more.
        for other in [
            "https://evil.example",
            "https://app.example.com.evil.example",
            "null",
        ] {
            let (_, headers) = preflight(&node, &path, other, method).await?;
            ensure!(
                header(&headers, "access-control-allow-origin").is_none(),
                "{other}: {headers:?}"
            );
        }
    }
    let authorization = format!("Session {}", key.key);
    let answer = post_raw(
        &node,
        &path,
        json!({"type": "ping", "id": 1}).to_string(),
        &[("origin", allowed), ("authorization", &authorization)],
    )
    .await?;
    ensure!(answer.status == 202 && answer.header("access-control-allow-origin") == Some(allowed));
    ensure!(stream.frame_of("pong").await?["id"] == 1);
    // The open is refused for an origin outside the list (403), without CORS permission.
    let (status, headers) = request_headers(
        &node,
        "GET",
        "/poll?user=x",
        &[("origin", "https://evil.example")],
    )
    .await?;
    ensure!(status == 403 && header(&headers, "access-control-allow-origin").is_none());
    Ok(())
}
