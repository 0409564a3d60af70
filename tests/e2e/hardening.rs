//! Issue 10, against the real binary (and real HAProxy): the `send` claim, `iss`/`aud`, the
//! token edge cases, segment-safe room patterns, WebSocket control frames under the rate limit,
//! and no token (nor API key) in any log line, the node's or HAProxy's.

use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_e2e::auth::{token_signed_with, unix_now};
use switchboard_e2e::client::{
    connect, expect_ping_pong, expect_reply, open, publish_frame, refused, request_answer,
    subscribe_frame,
};
use switchboard_e2e::haproxy::{Backend, HaproxyProcess, haproxy_command, spawn_logged};
use switchboard_e2e::{DEADLINE, NodeProcess, RawClient, free_port, wait_until, workspace_file};
use switchboard_protocol::{ClientFrame, Codec, ErrorCode, JSON_PROTOCOL, ServerFrame, close};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The HS256 secret of the nodes started with authentication on.
const SECRET: &str = "hardening-e2e-secret-0123456789";

fn token(claims: &Value) -> String {
    token_signed_with(SECRET, claims)
}

fn user_token(user: &str, extra: Value) -> String {
    let mut claims =
        json!({"sub": user, "exp": unix_now() + 3600, "rooms": ["*"], "publish": ["*"]});
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    token(&claims)
}

fn with_token(url: &str, token: &str) -> String {
    format!("{url}?token={token}")
}

/// Connects with JSON and waits for the `welcome`; returns the client and its user.
async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<(RawClient, String)> {
    match open(url, Some(JSON_PROTOCOL), headers).await? {
        (client, ServerFrame::Welcome { user, .. }, _) => Ok((client, user)),
        (_, other, _) => bail!("the first frame is not a welcome: {other:?}"),
    }
}

async fn refused_status(url: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    refused(url, Some(JSON_PROTOCOL), headers).await
}

async fn expect_forbidden(client: &mut RawClient, frame: ClientFrame) -> Result<()> {
    match request_answer(client, frame).await? {
        ServerFrame::Error(error) if error.code == ErrorCode::Forbidden => Ok(()),
        other => bail!("expected error forbidden, got {other:?}"),
    }
}

async fn send(client: &mut RawClient, to: &str, data: Value, id: u64) -> Result<ServerFrame> {
    request_answer(
        client,
        ClientFrame::Send {
            to: to.to_owned(),
            data,
            id: Some(id),
            persist: false,
            key: None,
        },
    )
    .await
}

async fn subscribe(client: &mut RawClient, room: &str, id: u64) -> Result<ServerFrame> {
    request_answer(client, subscribe_frame(room, id, None)).await
}

async fn expect_direct(client: &mut RawClient, data: &Value) -> Result<()> {
    match client.next_frame().await? {
        ServerFrame::Direct { data: got, .. } if &got == data => Ok(()),
        other => bail!("expected direct {data}, got {other:?}"),
    }
}

/// Publishes from `publisher` and expects `subscriber` to receive it: the node serves.
async fn assert_delivers(
    publisher: &mut RawClient,
    subscriber: &mut RawClient,
    room: &str,
    id: u64,
) -> Result<()> {
    let data = json!({"still": "serving", "id": id});
    expect_reply(request_answer(publisher, publish_frame(room, data.clone(), id)).await?)?;
    loop {
        match subscriber.next_frame().await? {
            ServerFrame::Message(message) if message.room == room && message.data == data => {
                return Ok(());
            }
            ServerFrame::Message(_) => {}
            other => bail!("expected the message in {room}, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The send claim
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn with_auth_on_send_needs_a_matching_send_claim() -> Result<()> {
    let node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let url = node.ws_url();
    let mut bob = connect(
        &with_token(&url, &user_token("bob", json!({}))),
        Codec::Json,
    )
    .await?;
    let mut team = connect(
        &with_token(&url, &user_token("team.carol", json!({}))),
        Codec::Json,
    )
    .await?;
    let mut silent = connect(
        &with_token(&url, &user_token("mallory", json!({}))),
        Codec::Json,
    )
    .await?;
    let mut sender = connect(
        &with_token(
            &url,
            &user_token("alice", json!({"send": ["bob", "team.*"]})),
        ),
        Codec::Json,
    )
    .await?;

    // No send claim: refused, and nothing reaches bob.
    let answer = send(&mut silent, "bob", json!("spam"), 1).await?;
    ensure!(
        matches!(&answer, ServerFrame::Error(error) if error.code == ErrorCode::Forbidden),
        "a token without `send` may not send: {answer:?}"
    );
    // A claim that does not name the user (nor a pattern that matches it).
    for (to, id) in [("bobby", 2), ("team", 3), ("carol", 4)] {
        let answer = send(&mut sender, to, json!("x"), id).await?;
        ensure!(
            matches!(&answer, ServerFrame::Error(error) if error.code == ErrorCode::Forbidden),
            "send to {to}: {answer:?}"
        );
    }
    // The claim's exact name and its segment pattern are allowed.
    let reply = expect_reply(send(&mut sender, "bob", json!("hi bob"), 5).await?)?;
    ensure!(reply.sessions == Some(1), "{reply:?}");
    expect_direct(&mut bob, &json!("hi bob")).await?;
    let reply = expect_reply(send(&mut sender, "team.carol", json!("hi team"), 6).await?)?;
    ensure!(reply.sessions == Some(1), "{reply:?}");
    expect_direct(&mut team, &json!("hi team")).await?;

    // The backend's POST /api/send needs no claim.
    let response = reqwest::Client::new()
        .post(node.http_url("/api/send"))
        .json(&json!({"user": "bob", "data": "from the backend"}))
        .send()
        .await?;
    ensure!(response.status().is_success(), "{}", response.status());
    expect_direct(&mut bob, &json!("from the backend")).await?;
    // The refused send reached nobody: bob's next frame answers his own ping.
    expect_ping_pong(&mut bob, 7).await?;
    expect_ping_pong(&mut silent, 8).await
}

#[tokio::test]
async fn with_auth_off_send_stays_allowed() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut bob = connect(&format!("{}?user=bob", node.ws_url()), Codec::Json).await?;
    let mut alice = connect(&format!("{}?user=alice", node.ws_url()), Codec::Json).await?;
    let reply = expect_reply(send(&mut alice, "bob", json!("open"), 1).await?)?;
    ensure!(reply.sessions == Some(1), "{reply:?}");
    expect_direct(&mut bob, &json!("open")).await
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_for_another_audience_or_issuer_is_refused_with_401() -> Result<()> {
    let node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-issuer",
        "https://idp.test",
        "--jwt-audience",
        "switchboard",
    ])
    .await?;
    let url = node.ws_url();
    let exp = unix_now() + 3600;
    let cases = [
        (
            "another audience",
            json!({"sub": "a", "exp": exp, "iss": "https://idp.test", "aud": "billing"}),
        ),
        (
            "no audience",
            json!({"sub": "a", "exp": exp, "iss": "https://idp.test"}),
        ),
        (
            "another issuer",
            json!({"sub": "a", "exp": exp, "iss": "https://evil.test", "aud": "switchboard"}),
        ),
        (
            "no issuer",
            json!({"sub": "a", "exp": exp, "aud": "switchboard"}),
        ),
    ];
    for (what, claims) in cases {
        let (status, body) = refused_status(&with_token(&url, &token(&claims)), &[]).await?;
        ensure!(status == 401, "{what}: status {status} ({body})");
    }
    let right =
        token(&json!({"sub": "a", "exp": exp, "iss": "https://idp.test", "aud": "switchboard"}));
    let (mut client, user) = connect_with(&with_token(&url, &right), &[]).await?;
    ensure!(user == "a", "welcomed as {user}");
    expect_ping_pong(&mut client, 1).await
}

#[tokio::test]
async fn an_empty_query_token_does_not_hide_the_header_and_bearer_is_any_case() -> Result<()> {
    let node =
        NodeProcess::start(&["--jwt-secret", SECRET, "--api-key", "hardening-api-key"]).await?;
    let url = node.ws_url();
    let header = format!("Bearer {}", user_token("header-user", json!({})));
    let (mut client, user) =
        connect_with(&format!("{url}?token="), &[("Authorization", &header)]).await?;
    ensure!(user == "header-user", "welcomed as {user}");
    expect_ping_pong(&mut client, 1).await?;

    for scheme in ["bearer", "BEARER", "bEaReR"] {
        let header = format!("{scheme} {}", user_token("any-case", json!({})));
        let (mut client, user) = connect_with(&url, &[("Authorization", &header)]).await?;
        ensure!(user == "any-case", "{scheme}: welcomed as {user}");
        expect_ping_pong(&mut client, 2).await?;
    }
    // A non-empty query token still wins over the header.
    let (_, user) = connect_with(
        &with_token(&url, &user_token("query-user", json!({}))),
        &[("Authorization", &header)],
    )
    .await?;
    ensure!(user == "query-user", "welcomed as {user}");
    // Nothing at all is still refused.
    let (status, _) = refused_status(&format!("{url}?token="), &[]).await?;
    ensure!(status == 401, "empty token and no header: {status}");
    let (status, _) = refused_status(&url, &[("Authorization", "Bearer ")]).await?;
    ensure!(status == 401, "empty bearer: {status}");

    // The internal API's key: the scheme in any case, the key itself exactly.
    let http = reqwest::Client::new();
    for (authorization, expected) in [
        ("bearer hardening-api-key", 200),
        ("BEARER hardening-api-key", 200),
        ("Bearer HARDENING-API-KEY", 401),
        ("Basic hardening-api-key", 401),
    ] {
        let status = http
            .post(node.http_url("/api/broadcast"))
            .header("Authorization", authorization)
            .json(&json!({"data": "hello"}))
            .send()
            .await?
            .status()
            .as_u16();
        ensure!(status == expected, "{authorization}: {status}");
    }
    Ok(())
}

#[tokio::test]
async fn a_token_valid_until_the_end_of_time_neither_panics_nor_wraps() -> Result<()> {
    // Heartbeats every 100 ms run the expiry check (exp + leeway) many times.
    let mut node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--heartbeat-ms",
        "100",
        "--idle-timeout-ms",
        "10000",
    ])
    .await?;
    let forever = token(&json!({"sub": "forever", "exp": u64::MAX, "rooms": ["*"]}));
    let mut client = connect(&with_token(&node.ws_url(), &forever), Codec::Json).await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut id = 0;
    while tokio::time::Instant::now() < until {
        id += 1;
        expect_ping_pong(&mut client, id).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let heartbeats = node
        .metric("switchboard_frames_out_total{type=\"pong\"}")
        .await?;
    ensure!(heartbeats >= 5.0, "only {heartbeats} pongs");
    ensure!(node.is_running(), "the node exited");
    ensure!(
        node.metric("switchboard_session_panics_total").await? == 0.0,
        "a session panicked"
    );
    ensure!(
        node.metric("switchboard_connections").await? == 1.0,
        "the session ended"
    );
    Ok(())
}

#[tokio::test]
async fn a_dot_star_room_pattern_stays_within_its_segment() -> Result<()> {
    let node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let url = node.ws_url();
    let scoped = token(&json!({"sub": "alice", "exp": unix_now() + 3600,
        "rooms": ["user.alice.*"], "publish": ["user.alice.*"]}));
    let raw = token(&json!({"sub": "alice", "exp": unix_now() + 3600, "rooms": ["user.alice*"]}));
    let mut scoped = connect(&with_token(&url, &scoped), Codec::Json).await?;
    let mut raw = connect(&with_token(&url, &raw), Codec::Json).await?;

    expect_reply(subscribe(&mut scoped, "user.alice.inbox", 1).await?)?;
    for (room, id) in [("user.alice2", 2), ("user.alice", 3), ("user.alice.", 4)] {
        expect_forbidden(&mut scoped, subscribe_frame(room, id, None))
            .await
            .with_context(|| format!("user.alice.* and {room}"))?;
    }
    expect_forbidden(&mut scoped, publish_frame("user.alice2.inbox", json!(1), 5)).await?;
    // The raw prefix keeps its old, documented meaning.
    expect_reply(subscribe(&mut raw, "user.alice2", 6).await?)?;
    expect_reply(subscribe(&mut raw, "user.alice.inbox", 7).await?)?;
    assert_delivers(&mut scoped, &mut raw, "user.alice.inbox", 8).await
}

// ---------------------------------------------------------------------------------------------
// Control frames
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_websocket_ping_flood_is_closed_with_1008_while_others_keep_receiving() -> Result<()> {
    // The default limits: 100 frames/s, a burst of 200, 50 strikes.
    let node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let mut subscriber = connect(&url, Codec::Json).await?;
    expect_reply(subscribe(&mut subscriber, "calm", 1).await?)?;
    let mut publisher = connect(&url, Codec::Json).await?;
    let mut flooder = connect(&url, Codec::Json).await?;

    // 5,000 WebSocket pings, 100 to a write; after each write a protocol `ping` whose answer
    // shows the node has read the batch (so the node never closes on unread bytes, which would
    // reset the connection before the close frame arrives). Between batches the subscriber gets
    // a message: it keeps receiving during the flood.
    const FLOOD: u64 = 5_000;
    const BATCH: u64 = 100;
    let mut sent = 0;
    let code = 'flood: loop {
        ensure!(sent < FLOOD, "{sent} pings and the node never closed");
        for _ in 0..BATCH {
            flooder
                .socket
                .feed(Message::Ping(Default::default()))
                .await?;
        }
        sent += BATCH;
        let barrier = ClientFrame::Ping { id: Some(sent) };
        flooder
            .socket
            .feed(Message::Text(serde_json::to_string(&barrier)?.into()))
            .await?;
        flooder.socket.flush().await?;
        loop {
            let next = tokio::time::timeout(DEADLINE, flooder.socket.next())
                .await
                .context("flood: nothing in time")?
                .context("flood: connection ended without a close frame")??;
            match next {
                Message::Close(frame) => break 'flood frame.map(|frame| u16::from(frame.code)),
                Message::Text(text) => match Codec::Json.decode::<ServerFrame>(text.as_bytes()) {
                    Ok(ServerFrame::Pong { id: Some(id) }) if id == sent => break,
                    Ok(ServerFrame::Error(error)) if error.id == Some(sent) => break,
                    other => bail!("flood: unexpected frame {other:?}"),
                },
                _ => {}
            }
        }
        assert_delivers(&mut publisher, &mut subscriber, "calm", 10 + sent).await?;
    };
    ensure!(
        code == Some(close::POLICY),
        "the flood was closed with {code:?} after {sent} pings, expected 1008"
    );
    ensure!(sent <= 500, "closed only after {sent} pings");
    node.wait_metric("switchboard_rate_limited_total{kind=\"control\"}", 1.0)
        .await?;
    node.wait_metric("switchboard_closes_total{code=\"1008\"}", 1.0)
        .await?;

    assert_delivers(&mut publisher, &mut subscriber, "calm", 2).await?;
    expect_ping_pong(&mut subscriber, 3).await?;
    let mut newcomer = connect(&url, Codec::Json).await?;
    expect_ping_pong(&mut newcomer, 4).await
}

#[tokio::test]
async fn heartbeat_pongs_of_an_idle_client_are_not_held_against_it() -> Result<()> {
    // A rate limit of 1 frame/s with a burst of 1 and 1 strike: unsolicited control frames
    // would close the connection at once, the pong answering each heartbeat must not.
    let node = NodeProcess::start(&[
        "--heartbeat-ms",
        "50",
        "--rate-limit",
        "1",
        "--rate-limit-burst",
        "1",
        "--rate-limit-strikes",
        "1",
    ])
    .await?;
    let mut client = connect(&node.ws_url(), Codec::Json).await?;
    // Reading answers the node's pings (tungstenite replies with pongs).
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(next) = tokio::time::timeout_at(until, client.socket.next()).await {
        match next {
            Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(error)) => bail!("connection failed: {error}"),
            None => bail!("connection ended"),
        }
    }
    ensure!(
        node.metric("switchboard_rate_limited_total{kind=\"control\"}")
            .await?
            == 0.0,
        "heartbeat pongs were rate limited"
    );
    expect_ping_pong(&mut client, 1).await
}

// ---------------------------------------------------------------------------------------------
// No token in any log
// ---------------------------------------------------------------------------------------------

/// The parts of a JWT that identify it (payload and signature); the header is the same for
/// every HS256 token.
fn secret_parts(token: &str) -> Vec<String> {
    token.split('.').skip(1).map(str::to_owned).collect()
}

fn assert_no_secret(lines: &[String], secrets: &[String], whose: &str) -> Result<()> {
    for secret in secrets {
        if let Some(line) = lines.iter().find(|line| line.contains(secret.as_str())) {
            bail!("{whose} logged a secret ({secret}): {line}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_node_never_logs_tokens_nor_the_api_key() -> Result<()> {
    const API_KEY: &str = "hardening-secret-api-key-5c2e";
    let node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--api-key",
        API_KEY,
        "--log",
        "trace",
    ])
    .await?;
    let url = node.ws_url();
    let valid = user_token("logged", json!({}));
    let expired = token(&json!({"sub": "logged", "exp": unix_now() - 3600}));
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "logged", "exp": unix_now() + 3600, "marker": "forged-token-payload"}),
        &EncodingKey::from_secret(b"another-secret-of-at-least-16-bytes"),
    )?;

    let (mut in_query, _) = connect_with(&with_token(&url, &valid), &[]).await?;
    expect_ping_pong(&mut in_query, 1).await?;
    let bearer = format!("Bearer {valid}");
    let (mut in_header, _) = connect_with(&url, &[("Authorization", &bearer)]).await?;
    expect_ping_pong(&mut in_header, 2).await?;
    for bad in [&expired, &forged] {
        let (status, _) = refused_status(&with_token(&url, bad), &[]).await?;
        ensure!(status == 401, "status {status}");
        let bearer = format!("Bearer {bad}");
        let (status, _) = refused_status(&url, &[("Authorization", &bearer)]).await?;
        ensure!(status == 401, "status {status}");
    }
    in_query.socket.close(None).await?;
    in_header.socket.close(None).await?;
    let http = reqwest::Client::new();
    for key in [API_KEY, "wrong-key"] {
        http.post(node.http_url("/api/broadcast"))
            .bearer_auth(key)
            .json(&json!({"data": 1}))
            .send()
            .await?;
    }
    // Wait for the node to have logged what it logs about all of that.
    wait_until("the node to log the refusals and both session ends", || {
        let logs = node.logs();
        async move {
            logs.iter()
                .filter(|line| line.contains("handshake refused"))
                .count()
                >= 4
                && logs
                    .iter()
                    .filter(|line| line.contains("session closed"))
                    .count()
                    >= 2
        }
    })
    .await?;
    let logs = node.logs();
    let mut secrets = vec![API_KEY.to_owned()];
    for token in [&valid, &expired, &forged] {
        secrets.extend(secret_parts(token));
    }
    assert_no_secret(&logs, &secrets, "the node")
}

#[tokio::test]
async fn the_haproxy_access_log_never_holds_a_token() -> Result<()> {
    let node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    node.wait_ready().await?;
    let haproxy =
        HaproxyProcess::start(&[Backend::from(&node)], Duration::from_millis(100)).await?;
    let valid = user_token("through-haproxy", json!({}));
    let forged = format!("{}x", user_token("forged", json!({})));
    let url = haproxy.ws_url();
    let (mut client, user) =
        connect_with(&format!("{url}?user=ignored&token={valid}"), &[]).await?;
    ensure!(user == "through-haproxy", "welcomed as {user}");
    expect_ping_pong(&mut client, 1).await?;
    client.socket.close(None).await?;
    let (status, _) = refused_status(&with_token(&url, &forged), &[]).await?;
    ensure!(status == 401, "status {status}");

    // HAProxy logs a request when its connection ends.
    wait_until("haproxy to log both requests", || {
        let logs = haproxy.logs();
        async move {
            logs.iter()
                .filter(|line| line.contains("\"GET /ws HTTP/1.1\""))
                .count()
                >= 2
        }
    })
    .await?;
    let logs = haproxy.logs();
    ensure!(
        logs.iter()
            .any(|line| line.contains(" 101 ") && line.contains("switchboard/node1")),
        "no log line for the upgrade: {logs:#?}"
    );
    ensure!(
        logs.iter().any(|line| line.contains(" 401 ")),
        "no log line for the refusal: {logs:#?}"
    );
    let mut secrets = secret_parts(&valid);
    secrets.extend(secret_parts(&forged));
    secrets.push("token=".into());
    assert_no_secret(&logs, &secrets, "haproxy")
}

/// `k8s/base/haproxy.cfg`, run by a real `haproxy`; killed (by pid) on drop.
struct K8sHaproxy {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for K8sHaproxy {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `log-format` lines of a HAProxy config.
fn log_formats(config: &str) -> Vec<String> {
    config
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("log-format") || line.starts_with("option httplog"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_kubernetes_haproxy_config_logs_no_query_string_either() -> Result<()> {
    let k8s = std::fs::read_to_string(workspace_file("k8s/base/haproxy.cfg"))?;
    let deploy = std::fs::read_to_string(workspace_file("deploy/haproxy/haproxy.cfg"))?;
    let formats = log_formats(&k8s);
    ensure!(
        formats == log_formats(&deploy),
        "the two configs log differently: {formats:?}"
    );
    // %r (the request line), %HU (the URI) and %HQ (the query) would log `?token=`.
    let logs_query = |format: &str| {
        format
            .split(|c: char| c.is_whitespace() || c == '"' || c == '\\')
            .any(|field| {
                field == "%r"
                    || field.ends_with("}r")
                    || field.contains("%HU")
                    || field.contains("%HQ")
            })
    };
    ensure!(
        formats.len() == 1 && formats[0].contains("%HPO") && !logs_query(&formats[0]),
        "the Kubernetes config must log the path without the query: {formats:?}"
    );

    // Run it. Without nodes in DNS every request gets HAProxy's 503, logged all the same.
    let public_port = free_port()?;
    let stats_port = free_port()?;
    let env = [
        ("SB_NODES_DNS", "switchboard-headless.invalid".to_owned()),
        ("SB_NODE_SLOTS", "2".to_owned()),
        ("SB_PUBLIC_BIND", format!("127.0.0.1:{public_port}")),
        ("SB_STATS_BIND", format!("127.0.0.1:{stats_port}")),
        ("SB_MAXCONN", "200".to_owned()),
        ("SB_FRONTEND_MAXCONN", "100".to_owned()),
        ("SB_SERVER_MAXCONN", "100".to_owned()),
    ]
    .map(|(key, value)| (key.to_owned(), value));
    let (child, logs) = spawn_logged(
        haproxy_command(&env)
            .arg("-f")
            .arg(workspace_file("k8s/base/haproxy.cfg")),
    )?;
    let mut haproxy = K8sHaproxy { child, logs };
    let healthz = format!("http://127.0.0.1:{stats_port}/healthz");
    wait_until("the Kubernetes haproxy to start", || {
        let healthz = healthz.clone();
        async move {
            reqwest::get(healthz)
                .await
                .is_ok_and(|response| response.status().is_success())
        }
    })
    .await
    .with_context(|| format!("{:?}", haproxy.logs.lock().map(|logs| logs.join("\n"))))?;
    ensure!(
        matches!(haproxy.child.try_wait(), Ok(None)),
        "haproxy exited"
    );

    let secret = "SECRETVALUE-k8s-7f3a91";
    let mut stream = TcpStream::connect(("127.0.0.1", public_port)).await?;
    stream
        .write_all(
            format!(
                "GET /ws?token={secret}&user=x HTTP/1.1\r\nHost: sb\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8_lossy(&response);
    ensure!(response.starts_with("HTTP/1.1 503"), "{response}");

    let logs = haproxy.logs.clone();
    wait_until("haproxy to log the request", || {
        let logged = logs
            .lock()
            .expect("logs lock")
            .iter()
            .any(|line| line.contains("\"GET /ws HTTP/1.1\""));
        async move { logged }
    })
    .await?;
    let lines = haproxy.logs.lock().expect("logs lock").clone();
    assert_no_secret(
        &lines,
        &[secret.to_owned(), "token=".to_owned()],
        "the Kubernetes haproxy",
    )
}
