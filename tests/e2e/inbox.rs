//! Durable direct messages and idempotent publish: the user's inbox (persisted `send`, `ack`,
//! the inbox delivered after `welcome`, `GET /api/inbox/{user}`) and keys on `publish` and
//! persisted `send`, on the real binary. The cluster tests run two nodes on a real
//! `redis-server`; raw sessions ([`Peer`]) are used so that a duplicate or a gap shows up as the
//! wrong next frame, and every test ends with a ping barrier that nothing else was queued.

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::api::{api, api_get, api_post};
use switchboard_e2e::auth::{token_signed_with, unix_now};
use switchboard_e2e::client::{connect, error_of, expect_ping_pong, expect_reply, request_answer};
use switchboard_e2e::peer::Peer;
use switchboard_e2e::{NodeProcess, RedisProcess};
use switchboard_protocol::api::{InboxResponse, PublishResponse, SendResponse};
use switchboard_protocol::{ClientFrame, Codec, ErrorCode, Reply, ServerFrame};

/// One Redis server and two nodes on it, killed on drop.
struct Pair {
    _redis: RedisProcess,
    a: NodeProcess,
    b: NodeProcess,
}

impl Pair {
    async fn start() -> Result<Pair> {
        let redis = RedisProcess::start().await?;
        let url = redis.url();
        let mut nodes = Vec::new();
        for id in ["node-a", "node-b"] {
            let args = [
                "--redis",
                url.as_str(),
                "--node-id",
                id,
                "--node-ttl-ms",
                "1500",
            ];
            nodes.push(NodeProcess::start(&args).await?);
        }
        for node in &nodes {
            node.wait_ready().await?;
        }
        let b = nodes.pop().context("node b")?;
        let a = nodes.pop().context("node a")?;
        Ok(Pair {
            _redis: redis,
            a,
            b,
        })
    }
}

fn send_frame(to: &str, data: Value, id: u64, key: Option<&str>) -> ClientFrame {
    ClientFrame::Send {
        to: to.to_owned(),
        data,
        id: Some(id),
        persist: true,
        key: key.map(str::to_owned),
    }
}

/// A persisted send from `peer`; returns the reply.
async fn persist(peer: &mut Peer, to: &str, data: Value, key: Option<&str>) -> Result<Reply> {
    let id = peer.id();
    peer.request(send_frame(to, data, id, key)).await
}

async fn ack(peer: &mut Peer, seq: u64) -> Result<Reply> {
    let id = peer.id();
    peer.request(ClientFrame::Ack { seq, id: Some(id) }).await
}

/// The next `count` frames must be persisted directs; their (seq, data).
async fn directs(peer: &mut Peer, count: usize) -> Result<Vec<(u64, Value)>> {
    let mut got = Vec::new();
    for _ in 0..count {
        match peer.next().await? {
            ServerFrame::Direct {
                data,
                seq: Some(seq),
                ..
            } => got.push((seq, data)),
            other => bail!(
                "{} expected a persisted direct after {got:?}, got {other:?}",
                peer.user
            ),
        }
    }
    Ok(got)
}

fn numbered(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, Value)> {
    seqs.map(|seq| (seq, json!({"n": seq}))).collect()
}

async fn api_inbox(node: &NodeProcess, user: &str) -> Result<InboxResponse> {
    api_get(node, &format!("/api/inbox/{user}")).await
}

#[tokio::test]
async fn an_offline_user_gets_everything_sent_meanwhile_in_order_on_another_node() -> Result<()> {
    let pair = Pair::start().await?;
    let mut alice = Peer::connect(&pair.a, "alice").await?;
    for n in 1..=5u64 {
        let reply = persist(&mut alice, "bob", json!({"n": n}), None).await?;
        ensure!(
            reply.seq == Some(n) && reply.sessions == Some(0) && !reply.duplicate,
            "send {n}: {reply:?}"
        );
    }
    let stored = api_inbox(&pair.b, "bob").await?;
    ensure!(
        (stored.seq, stored.acked, stored.pending.len()) == (5, 0, 5),
        "{stored:?}"
    );
    let from = &stored.pending[0].from;
    ensure!(from.as_ref() == Some(&alice.sender()), "from {from:?}");

    let mut bob = Peer::connect(&pair.b, "bob").await?;
    ensure!(
        (bob.inbox.seq, bob.inbox.acked, &bob.inbox.epoch) == (5, 0, &stored.epoch),
        "welcome inbox {:?}",
        bob.inbox
    );
    ensure!(directs(&mut bob, 5).await? == numbered(1..=5));
    bob.quiet().await?;

    // Live from now on, across the nodes, in the same count.
    let reply = persist(&mut alice, "bob", json!({"n": 6}), None).await?;
    ensure!(
        reply.seq == Some(6) && reply.sessions == Some(1),
        "{reply:?}"
    );
    ensure!(directs(&mut bob, 1).await? == numbered(6..=6));
    bob.quiet().await?;
    alice.quiet().await
}

#[tokio::test]
async fn a_session_killed_before_its_ack_gets_the_message_again_and_an_acked_one_never()
-> Result<()> {
    let mut pair = Pair::start().await?;
    let mut alice = Peer::connect(&pair.a, "alice").await?;
    let mut bob = Peer::connect(&pair.b, "bob").await?;
    for n in 1..=2u64 {
        persist(&mut alice, "bob", json!({"n": n}), None).await?;
    }
    ensure!(directs(&mut bob, 2).await? == numbered(1..=2));
    ack(&mut bob, 1).await?;
    // kill -9: the node writes nothing more, and bob never acknowledged seq 2.
    pair.b.kill()?;

    let mut again = Peer::connect(&pair.a, "bob").await?;
    ensure!(
        (again.inbox.seq, again.inbox.acked) == (2, 1),
        "{:?}",
        again.inbox
    );
    ensure!(directs(&mut again, 1).await? == numbered(2..=2));
    again.quiet().await?;
    ack(&mut again, 2).await?;
    again.close().await?;

    let mut last = Peer::connect(&pair.a, "bob").await?;
    ensure!(
        (last.inbox.seq, last.inbox.acked) == (2, 2),
        "{:?}",
        last.inbox
    );
    last.quiet().await?;
    let stored = api_inbox(&pair.a, "bob").await?;
    ensure!(stored.pending.is_empty(), "{stored:?}");
    alice.quiet().await
}

#[tokio::test]
async fn an_ack_from_one_device_stops_redelivery_to_the_other() -> Result<()> {
    let pair = Pair::start().await?;
    let mut alice = Peer::connect(&pair.a, "alice").await?;
    let mut phone = Peer::connect(&pair.a, "bob").await?;
    let mut laptop = Peer::connect(&pair.b, "bob").await?;
    for n in 1..=3u64 {
        let reply = persist(&mut alice, "bob", json!({"n": n}), None).await?;
        ensure!(reply.sessions == Some(2), "{reply:?}");
    }
    ensure!(directs(&mut phone, 3).await? == numbered(1..=3));
    ensure!(directs(&mut laptop, 3).await? == numbered(1..=3));
    ack(&mut phone, 2).await?;
    laptop.close().await?;

    let mut laptop = Peer::connect(&pair.b, "bob").await?;
    ensure!(
        (laptop.inbox.seq, laptop.inbox.acked) == (3, 2),
        "{:?}",
        laptop.inbox
    );
    ensure!(directs(&mut laptop, 1).await? == numbered(3..=3));
    laptop.quiet().await?;
    phone.quiet().await
}

#[tokio::test]
async fn the_embedded_broker_delivers_the_inbox_on_connect_until_acknowledged() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut alice = Peer::connect(&node, "alice").await?;
    for n in 1..=3u64 {
        persist(&mut alice, "bob", json!({"n": n}), None).await?;
    }
    let mut bob = Peer::connect(&node, "bob").await?;
    ensure!(
        (bob.inbox.seq, bob.inbox.acked) == (3, 0),
        "{:?}",
        bob.inbox
    );
    ensure!(directs(&mut bob, 3).await? == numbered(1..=3));
    ack(&mut bob, 2).await?;
    bob.close().await?;

    let mut bob = Peer::connect(&node, "bob").await?;
    ensure!(
        (bob.inbox.seq, bob.inbox.acked) == (3, 2),
        "{:?}",
        bob.inbox
    );
    ensure!(directs(&mut bob, 1).await? == numbered(3..=3));
    // The closed session may still be registered a moment: `sessions` is not checked here.
    let reply = persist(&mut alice, "bob", json!({"n": 4}), None).await?;
    ensure!(reply.seq == Some(4), "{reply:?}");
    ensure!(directs(&mut bob, 1).await? == numbered(4..=4));
    bob.quiet().await?;
    alice.quiet().await
}

/// `--inbox-ttl-secs`: a message nobody acknowledged within the TTL is gone (from the inbox API
/// and from what the user gets on connect), and the inbox serves new messages afterwards.
#[tokio::test]
async fn an_unacknowledged_message_expires_after_the_inbox_ttl() -> Result<()> {
    let node = NodeProcess::start(&["--inbox-ttl-secs", "1"]).await?;
    for n in 1..=2u64 {
        let body = json!({"user": "dora", "data": {"n": n}, "persist": true});
        let sent: SendResponse = api_post(&node, "/api/send", &body).await?;
        ensure!(sent.seq == Some(n), "{sent:?}");
    }
    let stored = api_inbox(&node, "dora").await?;
    ensure!(stored.pending.len() == 2, "stored at first: {stored:?}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while !api_inbox(&node, "dora").await?.pending.is_empty() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the inbox still holds messages long after the 1 s TTL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut dora = Peer::connect(&node, "dora").await?;
    dora.quiet().await?;
    let body = json!({"user": "dora", "data": {"n": 3}, "persist": true});
    let sent: SendResponse = api_post(&node, "/api/send", &body).await?;
    let seq = sent.seq.context("a persisted send answers its seq")?;
    ensure!(directs(&mut dora, 1).await? == [(seq, json!({"n": 3}))]);
    dora.quiet().await
}

/// Persisted sends keep coming, from several senders at once, while the user connects: stored
/// ones come from the inbox (in many small pages: a small message size limit), later ones live,
/// and the seam between them has neither a gap nor a repeat.
#[tokio::test]
async fn messages_sent_while_the_user_connects_come_once_in_order() -> Result<()> {
    const BEFORE: u64 = 100;
    const SENDERS: u64 = 8;
    const EACH: u64 = 40;
    const TOTAL: u64 = BEFORE + SENDERS * EACH;
    // Pages of about three messages; a queue large enough for every live burst, so that only the
    // seam is tested here.
    let args = ["--max-message-size", "1024", "--max-queue-bytes", "1048576"];
    let node = Arc::new(NodeProcess::start(&args).await?);
    let send = |node: Arc<NodeProcess>, n: u64| async move {
        let body =
            json!({"user": "dave", "data": {"n": n, "pad": "x".repeat(300)}, "persist": true});
        let sent: SendResponse = api_post(&node, "/api/send", &body).await?;
        sent.seq.context("no seq")
    };
    for n in 1..=BEFORE {
        send(node.clone(), n).await?;
    }
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let node = node.clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    send(node.clone(), BEFORE + 1 + sender * EACH + n).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let mut dave = Peer::connect(&node, "dave").await?;
    let got = directs(&mut dave, TOTAL as usize).await?;
    for sender in senders {
        sender.await??;
    }
    let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
    ensure!(seqs == (1..=TOTAL).collect::<Vec<_>>(), "got seqs {seqs:?}");
    let mut numbers: Vec<u64> = got
        .iter()
        .filter_map(|(_, data)| data["n"].as_u64())
        .collect();
    numbers.sort_unstable();
    ensure!(
        numbers == (1..=TOTAL).collect::<Vec<_>>(),
        "data lost or repeated"
    );
    dave.quiet().await
}

#[tokio::test]
async fn a_full_inbox_drops_the_oldest_unacknowledged_and_counts_them() -> Result<()> {
    let node = NodeProcess::start(&["--inbox-size", "3"]).await?;
    for n in 1..=5u64 {
        let body = json!({"user": "carol", "data": {"n": n}, "persist": true});
        let sent: SendResponse = api_post(&node, "/api/send", &body).await?;
        ensure!(sent.seq == Some(n) && sent.sessions == 0, "{sent:?}");
    }
    node.wait_metric("switchboard_inbox_dropped_total", 2.0)
        .await?;
    let stored = api_inbox(&node, "carol").await?;
    let seqs: Vec<u64> = stored.pending.iter().map(|entry| entry.seq).collect();
    ensure!(seqs == [3, 4, 5] && stored.seq == 5, "{stored:?}");

    let mut carol = Peer::connect(&node, "carol").await?;
    ensure!(directs(&mut carol, 3).await? == numbered(3..=5));
    carol.quiet().await
}

#[tokio::test]
async fn a_retried_publish_or_persisted_send_with_its_key_is_a_duplicate_on_any_node() -> Result<()>
{
    let pair = Pair::start().await?;
    let mut reader = Peer::connect(&pair.b, "reader").await?;
    reader.subscribe("orders").await?;
    let body = json!({"room": "orders", "data": {"order": 1}, "key": "order-1"});
    let first: PublishResponse = api_post(&pair.a, "/api/publish", &body).await?;
    ensure!(!first.duplicate, "{first:?}");
    // The retry goes through the other node, as a client that reconnected elsewhere would.
    let mut writer = Peer::connect(&pair.b, "writer").await?;
    let id = writer.id();
    let retried = writer
        .request(ClientFrame::Publish {
            room: "orders".to_owned(),
            data: json!({"order": 1}),
            id: Some(id),
            key: Some("order-1".to_owned()),
        })
        .await?;
    ensure!(
        retried.duplicate
            && retried.offset == Some(first.offset)
            && retried.epoch.as_deref() == Some(first.epoch.as_str()),
        "{retried:?} after {first:?}"
    );
    let message = reader.message().await?;
    ensure!(message.offset == first.offset, "{message:?}");
    reader.quiet().await?;

    let sent = persist(&mut writer, "reader", json!("once"), Some("dm-1")).await?;
    let body = json!({"user": "reader", "data": "once", "persist": true, "key": "dm-1"});
    let again: SendResponse = api_post(&pair.a, "/api/send", &body).await?;
    ensure!(
        !sent.duplicate && again.duplicate && again.seq == sent.seq,
        "{sent:?} then {again:?}"
    );
    ensure!(directs(&mut reader, 1).await? == vec![(1, json!("once"))]);
    reader.quiet().await?;
    writer.quiet().await
}

const SECRET: &str = "inbox-e2e-secret-0123456789abcdef";

#[tokio::test]
async fn bad_inbox_input_gets_clear_errors_and_the_connection_stays_open() -> Result<()> {
    let node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let claims = json!({"sub": "alice", "exp": unix_now() + 3600, "rooms": ["*"],
        "publish": ["*"], "send": ["bob"]});
    let url = format!(
        "{}?token={}",
        node.ws_url(),
        token_signed_with(SECRET, &claims)
    );
    let mut alice = connect(&url, Codec::Json).await?;

    let reply =
        expect_reply(request_answer(&mut alice, send_frame("bob", json!(1), 1, None)).await?)?;
    ensure!(reply.seq == Some(1), "{reply:?}");

    let ack_beyond = ClientFrame::Ack {
        seq: 7,
        id: Some(2),
    };
    let message = error_of(
        request_answer(&mut alice, ack_beyond).await?,
        Some(2),
        ErrorCode::BadFrame,
    )?;
    ensure!(
        message == "ack of seq 7 is beyond the inbox's seq 0",
        "{message}"
    );

    let long_key = "k".repeat(65);
    let frame = send_frame("bob", json!(1), 3, Some(&long_key));
    let message = error_of(
        request_answer(&mut alice, frame).await?,
        Some(3),
        ErrorCode::BadFrame,
    )?;
    ensure!(message == "keys are 1 to 64 bytes", "{message}");
    let publish = ClientFrame::Publish {
        room: "r".to_owned(),
        data: json!(1),
        id: Some(4),
        key: Some(long_key.clone()),
    };
    let message = error_of(
        request_answer(&mut alice, publish).await?,
        Some(4),
        ErrorCode::BadFrame,
    )?;
    ensure!(message == "keys are 1 to 64 bytes", "{message}");

    let frame = send_frame("mallory", json!(1), 5, None);
    let message = error_of(
        request_answer(&mut alice, frame).await?,
        Some(5),
        ErrorCode::Forbidden,
    )?;
    ensure!(message.contains("\"mallory\""), "{message}");

    let not_persisted = ClientFrame::Send {
        to: "bob".to_owned(),
        data: json!(1),
        id: Some(6),
        persist: false,
        key: Some("k".to_owned()),
    };
    let message = error_of(
        request_answer(&mut alice, not_persisted).await?,
        Some(6),
        ErrorCode::BadFrame,
    )?;
    ensure!(message == "a key on send needs persist: true", "{message}");
    expect_ping_pong(&mut alice, 7).await?;

    // Nothing refused was stored: bob's inbox holds the one message.
    let stored = api_inbox(&node, "bob").await?;
    ensure!(stored.seq == 1 && stored.pending.len() == 1, "{stored:?}");
    let body = json!({"user": "bob", "data": 1, "persist": true, "key": long_key});
    let (status, answer) = api(&node, "POST", "/api/send", Some(body)).await?;
    ensure!(status == 400, "{status} {answer}");
    ensure!(answer["message"] == "keys are 1 to 64 bytes", "{answer}");
    expect_ping_pong(&mut alice, 8).await
}
