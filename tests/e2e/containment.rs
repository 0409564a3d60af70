//! Containment: what one client can make the node hold or do to others. Each test runs the real
//! binary (and a real redis-server where it says so) and fails on the behaviour issue 10 reported:
//! history replies and `since` recovery of any size written whole, a queue that closed a reader
//! still taking one large frame, reads that created Redis keys, and no cap on subscriptions.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::api::api_publish;
use switchboard_e2e::client::{
    answer, connect_small_buffer, connect_user, publish_frame, subscribe_frame, user_url,
};
use switchboard_e2e::memory::process_memory;
use switchboard_e2e::{DEADLINE, NodeProcess, RawClient, RedisProcess, wait_until};
use switchboard_protocol::{ClientFrame, Codec, ErrorCode, Reply, ServerFrame, StreamPosition};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const MIB: usize = 1 << 20;
const LIMIT_REFUSALS: &str = "switchboard_limit_refusals_total";

/// Publishes `count` messages of about `size` bytes to `room`; returns the room's epoch.
async fn publish_large(node: &NodeProcess, room: &str, count: u64, size: usize) -> Result<String> {
    let mut epoch = String::new();
    for n in 1..=count {
        let data = json!({"n": n, "pad": "p".repeat(size)});
        let body = api_publish(node, room, data).await?;
        ensure!(body.offset == n, "publish {n} got {body:?}");
        epoch = body.epoch;
    }
    Ok(epoch)
}

async fn reply(client: &mut RawClient, id: u64) -> Result<Reply> {
    match answer(client, id).await? {
        ServerFrame::Reply(reply) => Ok(reply),
        other => bail!("expected the reply to {id}, got {other:?}"),
    }
}

async fn subscribe(client: &mut RawClient, room: &str, id: u64) -> Result<Reply> {
    client.send_frame(&subscribe_frame(room, id, None)).await?;
    reply(client, id).await
}

/// Waits a little after the last change so the node has done what it will do, then reads RSS.
async fn settled_rss(node: &NodeProcess) -> Result<usize> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(usize::try_from(process_memory(node, "VmRSS")?)?)
}

// ----- 1. every answer bounded -----------------------------------------------------------------

/// 100 messages of ~900 KB, then four clients that ask for all of them and never read: the node
/// used to build one ~90 MB reply per client (RSS +90 MB each); now each gets at most one page.
/// The same for `subscribe … since`, whose recovery now flows through the bounded queue. Then a
/// reader pages through everything and gets each message exactly once, in frames under the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_recovery_for_clients_that_never_read_keep_the_node_small() -> Result<()> {
    const SIZE: usize = 900_000;
    const GROWTH: usize = 40 * MIB;
    let node = NodeProcess::start(&[
        "--max-message-size",
        "1048576",
        "--history-size",
        "100",
        "--history-ttl-secs",
        "600",
        "--stream-ttl-secs",
        "600",
        "--rate-limit",
        "0",
    ])
    .await?;
    let room = "big";
    let epoch = publish_large(&node, room, 100, SIZE).await?;

    let baseline = settled_rss(&node).await?;
    let mut idle = Vec::new();
    for n in 0..4 {
        let mut client =
            connect_small_buffer(&node, &user_url(&node, &format!("hoarder-{n}"))).await?;
        client
            .send_frame(&ClientFrame::History {
                room: room.to_owned(),
                id: 1,
                since: None,
                limit: Some(100),
            })
            .await?;
        idle.push(client);
    }
    wait_until("four history replies written", || async {
        node.metric(r#"switchboard_frames_out_total{type="reply"}"#)
            .await
            .is_ok_and(|replies| replies >= 4.0)
    })
    .await?;
    let after_history = settled_rss(&node).await?;
    ensure!(
        after_history < baseline + GROWTH,
        "RSS grew by {} MiB for four history requests that are not read",
        (after_history - baseline) / MIB
    );

    for n in 0..4 {
        let mut client =
            connect_small_buffer(&node, &user_url(&node, &format!("recoverer-{n}"))).await?;
        client
            .send_frame(&ClientFrame::Subscribe {
                room: room.to_owned(),
                id: Some(1),
                since: Some(StreamPosition {
                    offset: 0,
                    epoch: epoch.clone(),
                }),
                presence_events: false,
            })
            .await?;
        idle.push(client);
    }
    wait_until("four recoveries started", || async {
        node.metric(r#"switchboard_frames_out_total{type="reply"}"#)
            .await
            .is_ok_and(|replies| replies >= 8.0)
    })
    .await?;
    let after_recovery = settled_rss(&node).await?;
    ensure!(
        after_recovery < after_history + GROWTH,
        "RSS grew by {} MiB for four recoveries that are not read",
        (after_recovery.saturating_sub(after_history)) / MIB
    );

    // A reader pages through the whole history: every message once, every frame within the limit.
    let mut reader = connect_user(&node, "reader").await?;
    let mut seen = Vec::new();
    let mut since = None;
    for id in 1..=200 {
        reader
            .send_frame(&ClientFrame::History {
                room: room.to_owned(),
                id,
                since: since.clone(),
                limit: Some(100),
            })
            .await?;
        let page = reply(&mut reader, id).await?;
        let messages = page.messages.clone().unwrap_or_default();
        let size = Codec::Json
            .encode(&ServerFrame::Reply(page.clone()))
            .map_err(anyhow::Error::msg)?
            .len();
        ensure!(size <= MIB, "a history reply of {size} bytes");
        seen.extend(messages.iter().map(|message| message.offset));
        if !page.more {
            break;
        }
        let last = messages.last().context("a page with more is not empty")?;
        since = Some(StreamPosition {
            offset: last.offset,
            epoch: last.epoch.clone(),
        });
    }
    ensure!(
        seen == (1..=100).collect::<Vec<u64>>(),
        "paged history: {seen:?}"
    );

    // The same node still serves: recovery for a client that reads is complete and in order,
    // and a live message follows it exactly once.
    let mut resumer = connect_user(&node, "resumer").await?;
    resumer
        .send_frame(&ClientFrame::Subscribe {
            room: room.to_owned(),
            id: Some(9),
            since: Some(StreamPosition {
                offset: 50,
                epoch: epoch.clone(),
            }),
            presence_events: false,
        })
        .await?;
    let subscribed = reply(&mut resumer, 9).await?;
    ensure!(subscribed.recovered == Some(true), "{subscribed:?}");
    let live = tokio::spawn({
        let url = node.http_url("/api/publish");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"room": "big", "data": {"n": 101}}))
                .send()
                .await
        }
    });
    let mut offsets = Vec::new();
    while offsets.len() < 51 {
        match resumer.next_frame().await? {
            ServerFrame::Message(message) => offsets.push(message.offset),
            other => bail!("expected messages, got {other:?}"),
        }
    }
    ensure!(live.await??.status().is_success());
    ensure!(
        offsets == (51..=101).collect::<Vec<u64>>(),
        "recovered then live: {offsets:?}"
    );
    drop(idle);
    Ok(())
}

/// A client that does not read its recovery is closed with 1013 once its queue is full or its
/// write stalls, like a slow reader of live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_nobody_reads_ends_with_1013() -> Result<()> {
    let node = NodeProcess::start(&[
        "--max-message-size",
        "65536",
        "--history-size",
        "200",
        "--heartbeat-ms",
        "500",
        "--idle-timeout-ms",
        "2000",
    ])
    .await?;
    let epoch = publish_large(&node, "r", 200, 60_000).await?;
    let mut client = connect_small_buffer(&node, &user_url(&node, "stuck")).await?;
    client
        .send_frame(&subscribe_frame(
            "r",
            1,
            Some(StreamPosition { offset: 0, epoch }),
        ))
        .await?;
    node.wait_metric("switchboard_slow_consumer_closes_total", 1.0)
        .await?;
    let close = client.expect_close().await?.context("a close frame")?;
    ensure!(close.code == CloseCode::Again, "closed with {close:?}");
    Ok(())
}

/// A publish or send whose frame would be over the message size limit is refused (client:
/// `error too_large`, connection open; API: 413 `too_large`), so no frame the node writes is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_limit_are_refused_at_publish_and_send() -> Result<()> {
    let node = NodeProcess::start(&["--max-message-size", "4096"]).await?;
    let mut client = connect_user(&node, "writer").await?;
    // The client frame fits the limit; the frame subscribers would get (with offset, epoch and
    // the sender) does not.
    let data = json!("x".repeat(4000));
    client
        .send_frame(&publish_frame("r", data.clone(), 1))
        .await?;
    match answer(&mut client, 1).await? {
        ServerFrame::Error(error) => ensure!(error.code == ErrorCode::TooLarge, "{error:?}"),
        other => bail!("publish over the limit: {other:?}"),
    }
    client
        .send_frame(&ClientFrame::Send {
            to: "writer".to_owned(),
            data: json!("x".repeat(4050)),
            id: Some(2),
            persist: false,
            key: None,
        })
        .await?;
    match answer(&mut client, 2).await? {
        ServerFrame::Error(error) => ensure!(error.code == ErrorCode::TooLarge, "{error:?}"),
        other => bail!("send over the limit: {other:?}"),
    }
    // Still open, and a message that fits goes through.
    client
        .send_frame(&publish_frame("r", json!("x".repeat(3000)), 3))
        .await?;
    let published = reply(&mut client, 3).await?;
    ensure!(published.offset == Some(1), "{published:?}");

    let http = reqwest::Client::new();
    for (path, body) in [
        ("/api/publish", json!({"room": "r", "data": data})),
        (
            "/api/send",
            json!({"user": "writer", "data": "x".repeat(4096)}),
        ),
        ("/api/broadcast", json!({"data": "x".repeat(4096)})),
    ] {
        let response = http.post(node.http_url(path)).json(&body).send().await?;
        ensure!(response.status() == 413, "{path}: {}", response.status());
        let error: Value = response.json().await?;
        ensure!(error["code"] == "too_large", "{path}: {error}");
    }
    ensure!(
        node.metric(&format!(r#"{LIMIT_REFUSALS}{{limit="message_size"}}"#))
            .await?
            >= 5.0
    );
    Ok(())
}

// ----- 2. a queue that holds two large frames ------------------------------------------------

/// Sends the victim ~256 KB directs from the server API until the node cannot hand them to its
/// socket any more (bytes stay in the node's queues): as over a real network, where the kernel
/// does not absorb megabytes for a client that is not reading. Returns how many it sent.
async fn fill_socket(node: &NodeProcess, user: &str) -> Result<usize> {
    let http = reqwest::Client::new();
    let filler = "f".repeat(256 * 1024);
    for sent in 1..=64 {
        let response = http
            .post(node.http_url("/api/send"))
            .json(&json!({"user": user, "data": filler}))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "fill: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        if node.metric("switchboard_queue_bytes").await? > 0.0 {
            return Ok(sent);
        }
    }
    bail!("64 × 256 KB to a client that does not read, and the node still holds nothing")
}

/// An attacker sends a message just under the 1 MiB limit, then a small one, to a victim that
/// pauses reading for 300 ms while its socket is full: the victim is not closed and gets both.
/// Then the room variant with two publishes. A victim that never reads is still closed with 1013.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_victim_still_reading_a_large_frame_is_not_closed_by_the_next() -> Result<()> {
    // The largest data whose `direct` / `message` frame fits the default 1 MiB limit, with room.
    const BIG: usize = MIB - 512;
    let node = NodeProcess::start(&[]).await?;
    let big = "b".repeat(BIG);
    let mut victim = connect_small_buffer(&node, &user_url(&node, "victim")).await?;
    subscribe(&mut victim, "lobby", 1).await?;
    let mut attacker = connect_user(&node, "attacker").await?;
    let filled = fill_socket(&node, "victim").await?;

    for (id, data) in [(1, json!(big)), (2, json!("small"))] {
        attacker
            .send_frame(&ClientFrame::Send {
                to: "victim".to_owned(),
                data,
                id: Some(id),
                persist: false,
                key: None,
            })
            .await?;
        let sent = reply(&mut attacker, id).await?;
        ensure!(sent.sessions == Some(1), "{sent:?}");
    }
    for (id, data) in [(3, json!(big)), (4, json!("small"))] {
        attacker
            .send_frame(&ClientFrame::Publish {
                room: "lobby".to_owned(),
                data,
                id: Some(id),
                key: None,
            })
            .await?;
        reply(&mut attacker, id).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    while got.len() < filled + 4 {
        match victim.next_frame().await? {
            ServerFrame::Direct { data, .. } => got.push(("direct", data)),
            ServerFrame::Message(message) => got.push(("message", message.data.clone())),
            other => bail!("the victim got {other:?}"),
        }
    }
    let lengths: Vec<(&str, usize)> = got
        .iter()
        .skip(filled)
        .map(|(kind, data)| (*kind, data.as_str().map_or(0, str::len)))
        .collect();
    ensure!(
        lengths
            == [
                ("direct", BIG),
                ("direct", 5),
                ("message", BIG),
                ("message", 5)
            ],
        "after {filled} fillers the victim got {lengths:?}"
    );
    ensure!(
        node.metric("switchboard_slow_consumer_closes_total")
            .await?
            == 0.0
    );

    // A victim that never reads: the queue (4 MiB by default) overflows and it is closed with 1013.
    let mut sleeper = connect_small_buffer(&node, &user_url(&node, "sleeper")).await?;
    for id in 10..30 {
        attacker
            .send_frame(&ClientFrame::Send {
                to: "sleeper".to_owned(),
                data: json!(big),
                id: Some(id),
                persist: false,
                key: None,
            })
            .await?;
        reply(&mut attacker, id).await?;
        if node
            .metric("switchboard_slow_consumer_closes_total")
            .await?
            >= 1.0
        {
            break;
        }
    }
    node.wait_metric("switchboard_slow_consumer_closes_total", 1.0)
        .await?;
    let close = sleeper.expect_close().await?.context("a close frame")?;
    ensure!(close.code == CloseCode::Again, "closed with {close:?}");
    Ok(())
}

/// A queue below twice the message limit is refused at start with exit 64, naming both options.
#[tokio::test]
async fn a_queue_below_twice_the_message_limit_is_refused() -> Result<()> {
    // A binary that accepted the options would run on: give up after the deadline (the child
    // is killed when the future is dropped).
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(switchboard_e2e::binary())
            .args(["--max-message-size", "65536", "--max-queue-bytes", "100000"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--internal-listen",
                "127.0.0.1:0",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the node started with a queue below twice the message limit")??;
    ensure!(output.status.code() == Some(64), "{:?}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr.contains("max-queue-bytes") && stderr.contains("max-message-size"),
        "{stderr}"
    );
    Ok(())
}

// ----- 3. reads create no state -----------------------------------------------------------------

/// `history`, `presence`, `subscribe` and `unsubscribe` of rooms nobody published to leave Redis
/// as it was; a client that subscribed to such a room (offset 0) recovers what is published later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_fresh_rooms_leaves_no_redis_key() -> Result<()> {
    let redis = RedisProcess::start().await?;
    let url = redis.url();
    // Without the demo: its stats publisher writes `$sys.stats` every second once Redis is
    // reachable, and the first of those could fall between the two scans.
    let node = NodeProcess::start(&[
        "--redis",
        &url,
        "--room-linger-ms",
        "100",
        "--demo",
        "false",
    ])
    .await?;
    node.wait_ready().await?;
    let mut client = connect_user(&node, "reader").await?;
    let keys = async || -> Result<Vec<String>> {
        let listed = redis.cli(&["--scan"]).await?;
        let mut keys: Vec<String> = listed.lines().map(str::to_owned).collect();
        keys.sort();
        Ok(keys)
    };
    let before = keys().await?;
    let mut id = 0;
    for n in 0..20 {
        let room = format!("fresh-{n}");
        id += 1;
        client
            .send_frame(&ClientFrame::History {
                room: room.clone(),
                id,
                since: None,
                limit: Some(10),
            })
            .await?;
        reply(&mut client, id).await?;
        id += 1;
        client
            .send_frame(&ClientFrame::Presence {
                room: room.clone(),
                id,
            })
            .await?;
        reply(&mut client, id).await?;
        id += 1;
        let subscribed = subscribe(&mut client, &room, id).await?;
        ensure!(subscribed.offset == Some(0), "{subscribed:?}");
        id += 1;
        client
            .send_frame(&ClientFrame::Unsubscribe {
                room: room.clone(),
                id: Some(id),
            })
            .await?;
        reply(&mut client, id).await?;
    }
    let after = keys().await?;
    ensure!(
        before == after,
        "keys before: {before:?}\nkeys after: {after:?}"
    );

    // The epoch a subscriber of the empty room was told was stored nowhere; offset 0 still
    // recovers everything published since.
    let first = subscribe(&mut client, "later", 100).await?;
    ensure!(first.offset == Some(0));
    drop(client);
    for n in 1..=3 {
        api_publish(&node, "later", json!(n)).await?;
    }
    let mut back = connect_user(&node, "reader").await?;
    back.send_frame(&ClientFrame::Subscribe {
        room: "later".to_owned(),
        id: Some(1),
        since: Some(StreamPosition {
            offset: 0,
            epoch: first.epoch.context("an epoch")?,
        }),
        presence_events: false,
    })
    .await?;
    let resumed = reply(&mut back, 1).await?;
    ensure!(resumed.recovered == Some(true), "{resumed:?}");
    for n in 1..=3u64 {
        match back.next_frame().await? {
            ServerFrame::Message(message) => ensure!(message.offset == n, "{message:?}"),
            other => bail!("expected message {n}, got {other:?}"),
        }
    }
    Ok(())
}

// ----- 4. --max-subscriptions -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_past_the_limit_is_refused_and_the_connection_stays_open() -> Result<()> {
    let node = NodeProcess::start(&["--max-subscriptions", "3"]).await?;
    let mut client = connect_user(&node, "collector").await?;
    for n in 1..=3 {
        subscribe(&mut client, &format!("room-{n}"), n).await?;
    }
    client
        .send_frame(&subscribe_frame("room-4", 4, None))
        .await?;
    match answer(&mut client, 4).await? {
        ServerFrame::Error(error) => {
            ensure!(error.code == ErrorCode::LimitExceeded, "{error:?}");
        }
        other => bail!("a fourth subscription: {other:?}"),
    }
    ensure!(
        node.metric(&format!(r#"{LIMIT_REFUSALS}{{limit="subscriptions"}}"#))
            .await?
            == 1.0
    );
    // Still open: after an unsubscribe, the fourth room is allowed.
    client
        .send_frame(&ClientFrame::Unsubscribe {
            room: "room-1".to_owned(),
            id: Some(5),
        })
        .await?;
    reply(&mut client, 5).await?;
    subscribe(&mut client, "room-4", 6).await?;
    Ok(())
}

/// A crowded room's `presence` reply lists what fits in the message size limit and says `more`;
/// the server API still lists everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_reply_never_passes_the_size_limit() -> Result<()> {
    let node = NodeProcess::start(&["--max-message-size", "4096"]).await?;
    let mut members = Vec::new();
    for n in 0..40 {
        // Long user ids: 40 members take about 6 KB.
        let mut client = connect_user(&node, &format!("{n:0>100}")).await?;
        subscribe(&mut client, "crowd", 1).await?;
        members.push(client);
    }
    let mut asker = connect_user(&node, "asker").await?;
    asker
        .send_frame(&ClientFrame::Presence {
            room: "crowd".to_owned(),
            id: 7,
        })
        .await?;
    let listed = reply(&mut asker, 7).await?;
    let size = Codec::Json
        .encode(&ServerFrame::Reply(listed.clone()))
        .map_err(anyhow::Error::msg)?
        .len();
    ensure!(size <= 4096, "a presence reply of {size} bytes");
    let shown = listed.members.clone().unwrap_or_default().len();
    ensure!(
        listed.more && (1..40).contains(&shown),
        "{shown} members, more: {}",
        listed.more
    );

    let all: Value = reqwest::get(node.http_url("/api/presence/crowd"))
        .await?
        .json()
        .await?;
    ensure!(all["members"].as_array().map(Vec::len) == Some(40), "{all}");
    drop(members);
    Ok(())
}
