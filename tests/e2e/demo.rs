//! The demo page on the public port and the `$sys.stats` room that feeds its cluster panel: the
//! real binary serves the page and its files (the SDK byte for byte as in `clients/js`), nothing
//! else besides `/ws`; `--demo false` turns both off; clients cannot publish to `$sys.` rooms; every
//! node publishes its figures there once a second, across a cluster too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::client::{connect_user, publish_frame, subscribe};
use switchboard_e2e::{DEADLINE, NodeProcess, RawClient, RedisProcess};
use switchboard_protocol::{ClientFrame, Codec, ErrorCode, ServerFrame};

const STATS_ROOM: &str = "$sys.stats";

fn sdk_source() -> Result<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/js/switchboard.js");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

async fn get(node: &NodeProcess, path: &str) -> Result<reqwest::Response> {
    Ok(reqwest::get(format!("http://{}{path}", node.public)).await?)
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

/// Subscribes to the stats room and waits for the reply.
async fn subscribe_stats(client: &mut RawClient) -> Result<()> {
    subscribe(client, STATS_ROOM, 1).await?;
    Ok(())
}

/// The next stats message's data, with the time it arrived.
async fn next_stats(client: &mut RawClient) -> Result<(Value, Instant)> {
    loop {
        match client.next_frame().await? {
            ServerFrame::Message(message) if message.room == STATS_ROOM => {
                ensure!(
                    message.from.is_none(),
                    "stats come from the node, not a client: {message:?}"
                );
                return Ok((message.data.clone(), Instant::now()));
            }
            ServerFrame::Message(_) => {}
            other => bail!("expected a stats message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_page_and_its_files_are_served_and_nothing_else() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;

    let page = get(&node, "/").await?;
    ensure!(page.status() == 200, "GET /: {}", page.status());
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    ensure!(
        header(&page, "content-security-policy").contains("default-src 'self'"),
        "the page has a content security policy"
    );
    let html = page.text().await?;
    for reference in [
        r#"src="demo.js""#,
        r#"href="demo.css""#,
        r#"<html lang="en">"#,
    ] {
        ensure!(html.contains(reference), "the page lacks {reference}");
    }

    let sdk = get(&node, "/switchboard.js").await?;
    ensure!(sdk.status() == 200, "GET /switchboard.js: {}", sdk.status());
    assert_eq!(
        header(&sdk, "content-type"),
        "text/javascript; charset=utf-8"
    );
    assert_eq!(header(&sdk, "x-content-type-options"), "nosniff");
    let etag = header(&sdk, "etag").to_owned();
    ensure!(!etag.is_empty(), "the SDK has an ETag");
    ensure!(
        sdk.text().await? == sdk_source()?,
        "/switchboard.js differs from clients/js/switchboard.js"
    );

    let script = get(&node, "/demo.js").await?;
    assert_eq!(
        header(&script, "content-type"),
        "text/javascript; charset=utf-8"
    );
    ensure!(
        script.text().await?.contains("./switchboard.js"),
        "demo.js imports the SDK"
    );
    let style = get(&node, "/demo.css").await?;
    assert_eq!(header(&style, "content-type"), "text/css; charset=utf-8");

    // A browser revalidating its copy gets 304 without a body.
    let revalidated = reqwest::Client::new()
        .get(format!("http://{}/switchboard.js", node.public))
        .header("if-none-match", &etag)
        .send()
        .await?;
    assert_eq!(revalidated.status(), 304);
    ensure!(revalidated.bytes().await?.is_empty(), "a 304 has no body");

    for path in [
        "/index.html",
        "/favicon.ico",
        "/demo",
        "/static/demo.js",
        "/ws/",
    ] {
        let response = get(&node, path).await?;
        ensure!(
            response.status() == 404,
            "GET {path}: {}, expected 404",
            response.status()
        );
        assert_eq!(
            response.text().await?,
            "not found: WebSocket clients connect to /ws\n"
        );
    }
    let post = reqwest::Client::new()
        .post(format!("http://{}/", node.public))
        .send()
        .await?;
    assert_eq!(post.status(), 405);
    assert_eq!(header(&post, "allow"), "GET, HEAD");

    // The start-up line tells a person where to point the browser.
    let url = format!("demo page http://{}/", node.public);
    ensure!(
        node.logs().iter().any(|line| line.contains(&url)),
        "no log line names {url}: {:?}",
        node.logs()
    );
    Ok(())
}

#[tokio::test]
async fn demo_false_turns_off_the_page_and_the_stats() -> Result<()> {
    let by_flag = NodeProcess::start(&["--demo", "false"]).await?;
    let by_env = NodeProcess::start_with_env(&[], &[("SWITCHBOARD_DEMO", "false")]).await?;
    for node in [&by_flag, &by_env] {
        for path in ["/", "/switchboard.js", "/demo.js"] {
            let status = get(node, path).await?.status();
            ensure!(status == 404, "GET {path} with the demo off: {status}");
        }
        ensure!(
            !node.logs().iter().any(|line| line.contains("demo page")),
            "the start-up line offers no page when it is off"
        );
    }

    // Two stats intervals pass without a stats message, then a ping round trip shows nothing
    // was queued before it.
    let mut watcher = connect_user(&by_flag, "watcher").await?;
    subscribe_stats(&mut watcher).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    watcher
        .send_frame(&ClientFrame::Ping { id: Some(2) })
        .await?;
    match watcher.next_frame().await? {
        ServerFrame::Pong { id: Some(2) } => {}
        other => bail!("expected only the pong with the demo off, got {other:?}"),
    }

    // Still read-only.
    watcher
        .send_frame(&publish_frame(STATS_ROOM, json!({}), 3))
        .await?;
    match watcher.next_frame().await? {
        ServerFrame::Error(error) if error.id == Some(3) => {
            assert_eq!(error.code, ErrorCode::Forbidden);
        }
        other => bail!("expected error forbidden, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn clients_cannot_publish_to_system_rooms() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut mallory = connect_user(&node, "mallory").await?;
    for (id, room) in [(1, STATS_ROOM), (2, "$sys.other"), (3, "$sys.")] {
        mallory
            .send_frame(&publish_frame(
                room,
                json!({"node": "fake", "connections": 1_000_000}),
                id,
            ))
            .await?;
        match mallory.next_frame().await? {
            ServerFrame::Error(error) if error.id == Some(id) => {
                assert_eq!(error.code, ErrorCode::Forbidden, "{room}");
                ensure!(
                    error.message.contains("read-only"),
                    "the message says why: {}",
                    error.message
                );
            }
            other => bail!("publish to {room}: expected error forbidden, got {other:?}"),
        }
    }
    // A room that merely looks alike is an ordinary room.
    mallory
        .send_frame(&publish_frame("$system", json!("fine"), 4))
        .await?;
    match mallory.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == 4 => {}
        other => bail!("publish to $system: expected a reply, got {other:?}"),
    }

    // Nothing fake reached the room: its history holds the node's figures only.
    mallory
        .send_frame(&ClientFrame::History {
            room: STATS_ROOM.to_owned(),
            id: 5,
            since: None,
            limit: None,
        })
        .await?;
    match mallory.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == 5 => {
            for message in reply.messages.unwrap_or_default() {
                assert_eq!(message.data["node"], json!(node.node_id));
                ensure!(message.from.is_none(), "{message:?}");
            }
        }
        other => bail!("expected the history reply, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_token_that_allows_every_room_still_cannot_publish_to_system_rooms() -> Result<()> {
    const SECRET: &str = "demo-e2e-secret-0123456789";
    let node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "root", "exp": exp, "rooms": ["*"], "publish": ["*"]}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let url = format!("{}?token={token}", node.ws_url());
    let (mut root, _) = RawClient::connect(&url, Codec::Json).await?;
    subscribe_stats(&mut root).await?;
    root.send_frame(&publish_frame(STATS_ROOM, json!({"node": "fake"}), 2))
        .await?;
    // Stats messages may come first; the error answers the publish.
    loop {
        match root.next_frame().await? {
            ServerFrame::Message(message) => {
                assert_eq!(message.data["node"], json!(node.node_id));
            }
            ServerFrame::Error(error) if error.id == Some(2) => {
                assert_eq!(error.code, ErrorCode::Forbidden);
                return Ok(());
            }
            other => bail!("expected error forbidden, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn stats_arrive_once_a_second_with_the_node_id_and_its_figures() -> Result<()> {
    let node = NodeProcess::start(&["--node-id", "demo-a"]).await?;
    let mut watcher = connect_user(&node, "watcher").await?;
    subscribe_stats(&mut watcher).await?;

    let (first, first_at) = next_stats(&mut watcher).await?;
    assert_eq!(first["node"], json!("demo-a"));
    assert_eq!(first["interval_ms"], json!(1000));
    ensure!(
        first["connections"].as_u64() >= Some(1),
        "the watcher is connected: {first}"
    );
    for field in ["messages_in_per_sec", "messages_out_per_sec"] {
        ensure!(first[field].as_f64().is_some(), "{field} missing: {first}");
    }
    ensure!(first["uptime_secs"].as_u64().is_some(), "{first}");

    // A second client connects and sends a burst: the next figures count both.
    let mut talker = connect_user(&node, "talker").await?;
    for id in 0..20 {
        talker
            .send_frame(&ClientFrame::Ping { id: Some(id) })
            .await?;
    }
    for _ in 0..20 {
        talker.next_frame().await?;
    }
    let mut last_at = first_at;
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (stats, at) = next_stats(&mut watcher).await?;
        seen.push((stats.clone(), at.duration_since(last_at)));
        last_at = at;
        if stats["connections"].as_u64() >= Some(2)
            && stats["messages_in_per_sec"].as_f64() > Some(0.0)
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the figures never showed the second client's traffic: {seen:?}"
        );
    }

    // About one a second: four more messages take between 3 and 6 seconds.
    let started = Instant::now();
    for _ in 0..4 {
        let (stats, _) = next_stats(&mut watcher).await?;
        assert_eq!(stats["node"], json!("demo-a"));
    }
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_millis(2900) && took <= Duration::from_secs(6),
        "four stats messages took {took:?}, expected about 4 s"
    );
    Ok(())
}

#[tokio::test]
async fn every_node_of_a_cluster_publishes_to_the_one_room() -> Result<()> {
    let redis = RedisProcess::start().await?;
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["demo-a", "demo-b"] {
        let node = NodeProcess::start(&["--redis", &url, "--node-id", id]).await?;
        node.wait_ready().await?;
        nodes.push(node);
    }
    let mut watcher = connect_user(&nodes[0], "watcher").await?;
    subscribe_stats(&mut watcher).await?;
    let mut heard = BTreeSet::new();
    let deadline = Instant::now() + DEADLINE;
    while heard.len() < 2 {
        ensure!(
            Instant::now() < deadline,
            "heard only from {heard:?} in time"
        );
        let (stats, _) = next_stats(&mut watcher).await?;
        heard.insert(
            stats["node"]
                .as_str()
                .context("node is a string")?
                .to_owned(),
        );
    }
    assert_eq!(
        heard,
        BTreeSet::from(["demo-a".to_owned(), "demo-b".to_owned()])
    );
    Ok(())
}
