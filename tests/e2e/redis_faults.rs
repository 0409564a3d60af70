//! Redis failing the way it does in production, under real nodes: a restart from an older
//! snapshot, a replica promoted without the primary's last writes, and a Redis too slow to
//! answer. In each, a room's stream position is never given to two messages: clients that
//! stayed connected receive every message published afterwards (none is dropped as a
//! duplicate), and clients that resume with `since` are told they cannot recover instead of
//! `recovered: true` with a gap. A publish whose answer comes too late is `unknown_outcome`.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::client::{position, subscribe_frame};
use switchboard_e2e::peer::Peer;
use switchboard_e2e::redis_faults::{Forwarder, SnapshotRedis};
use switchboard_e2e::{NodeProcess, wait_until};
use switchboard_protocol::{ErrorCode, ErrorFrame, Reply, StreamPosition};

const ROOM: &str = "ledger";

async fn start_node(redis_url: &str) -> Result<NodeProcess> {
    let node = NodeProcess::start(&[
        "--redis",
        redis_url,
        "--node-id",
        "node-a",
        "--node-ttl-ms",
        "1500",
    ])
    .await?;
    node.wait_ready().await?;
    Ok(node)
}

/// Publishes `data` to the room; returns its `reply` or `error`.
async fn publish(peer: &mut Peer, data: Value) -> Result<Result<Reply, ErrorFrame>> {
    let frame = peer.publish_frame(ROOM, data);
    peer.ask(frame).await
}

/// Publishes `data` to the room, which must succeed; returns the message's position.
async fn published(peer: &mut Peer, data: Value) -> Result<StreamPosition> {
    let frame = peer.publish_frame(ROOM, data);
    position_of(&peer.request(frame).await?)
}

fn position_of(reply: &Reply) -> Result<StreamPosition> {
    Ok(StreamPosition {
        offset: reply.offset.context("no offset")?,
        epoch: reply.epoch.clone().context("no epoch")?,
    })
}

/// What every rollback scenario checks before the fault: `early` subscribed before anything was
/// published (offset 0) and left; `stayed` stays connected and has seen offsets 1 to 4, of
/// which only `kept` survive the fault.
struct Before {
    early: StreamPosition,
    seen: StreamPosition,
    stayed: Peer,
    publisher: Peer,
}

async fn before_the_fault(
    node: &NodeProcess,
    between: impl AsyncFnOnce() -> Result<()>,
) -> Result<Before> {
    let mut early = Peer::connect(node, "early").await?;
    let early_position = position_of(&early.subscribe_with(ROOM, None, false).await?)?;
    ensure!(early_position.offset == 0, "{early_position:?}");
    drop(early);
    let mut stayed = Peer::connect(node, "stayed").await?;
    stayed.subscribe_with(ROOM, None, false).await?;
    let mut publisher = Peer::connect(node, "publisher").await?;
    let first = published(&mut publisher, json!(1)).await?;
    published(&mut publisher, json!(2)).await?;
    between().await?;
    published(&mut publisher, json!(3)).await?;
    let seen = published(&mut publisher, json!(4)).await?;
    ensure!(seen.offset == 4 && seen.epoch == first.epoch, "{seen:?}");
    for expected in 1..=4 {
        let message = stayed.message().await?;
        ensure!(
            message.offset == expected && message.epoch == seen.epoch,
            "{message:?}"
        );
    }
    Ok(Before {
        early: early_position,
        seen,
        stayed,
        publisher,
    })
}

/// After Redis came back without offsets 3 and 4 (under the same epoch key, or not).
async fn after_the_fault(node: &NodeProcess, mut before: Before) -> Result<()> {
    // The node's pub/sub connection is back (it was cut by the fault).
    wait_until("the node to reconnect", || async {
        node.metric(r#"switchboard_redis_reconnects_total{shard="0"}"#)
            .await
            .is_ok_and(|count| count >= 1.0)
    })
    .await?;
    node.wait_ready().await?;
    let after = published(&mut before.publisher, json!("after")).await?;
    ensure!(
        after.epoch != before.seen.epoch,
        "a stream that went back kept its epoch: {after:?} after {:?}",
        before.seen
    );
    // The client that stayed gets the new message (of the new epoch), not silence.
    let message = before.stayed.message().await?;
    ensure!(
        message.offset == after.offset
            && message.epoch == after.epoch
            && message.data == json!("after"),
        "{message:?}"
    );
    before.stayed.quiet().await?;

    // A client that saw offset 4 is told it cannot recover; so is one that had seen offset 2
    // (which the restored data still holds, but under an epoch that no longer names it).
    for seen in [
        before.seen.clone(),
        StreamPosition {
            offset: 2,
            epoch: before.seen.epoch.clone(),
        },
    ] {
        let mut resumer = Peer::connect(node, "resumer").await?;
        let reply = resumer
            .subscribe_with(ROOM, Some(seen.clone()), false)
            .await?;
        ensure!(reply.recovered == Some(false), "since {seen:?}: {reply:?}");
        ensure!(position_of(&reply)?.epoch == after.epoch, "{reply:?}");
        resumer.quiet().await?;
    }
    // The client that had seen nothing yet (offset 0, before the fault) is not told that the
    // new epoch is all it missed: a whole epoch of messages passed while it was away.
    let mut early = Peer::connect(node, "early").await?;
    let reply = early
        .subscribe_with(ROOM, Some(before.early.clone()), false)
        .await?;
    ensure!(
        reply.recovered == Some(false),
        "since {:?}: {reply:?}",
        before.early
    );
    early.quiet().await?;
    // While a client that saw only the new epoch recovers it.
    let mut fresh = Peer::connect(node, "fresh").await?;
    let reply = fresh
        .subscribe_with(ROOM, Some(position(0, &after.epoch)), false)
        .await?;
    ensure!(reply.recovered == Some(true), "{reply:?}");
    let message = fresh.message().await?;
    ensure!(
        message.offset == after.offset && message.data == json!("after"),
        "{message:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_restart_from_an_older_snapshot_starts_a_new_epoch() -> Result<()> {
    let mut redis = SnapshotRedis::start(None).await?;
    let node = start_node(&redis.url()).await?;
    let before = before_the_fault(&node, async || {
        ensure!(redis.cli(&["SAVE"]).await? == "OK");
        Ok(())
    })
    .await?;
    // SIGKILL, then a start from the snapshot taken after offset 2.
    redis.restart().await?;
    ensure!(
        redis
            .cli(&["HGET", &format!("sb:r:{ROOM}:meta"), "o"])
            .await?
            == "2",
        "the snapshot should hold offset 2"
    );
    after_the_fault(&node, before).await
}

#[tokio::test]
async fn a_replica_promoted_without_the_last_writes_starts_a_new_epoch() -> Result<()> {
    let mut primary = SnapshotRedis::start(None).await?;
    let mut replica = SnapshotRedis::start(Some(primary.port)).await?;
    wait_until("the replica to sync", || async {
        replica
            .cli(&["INFO", "replication"])
            .await
            .is_ok_and(|info| info.contains("master_link_status:up"))
    })
    .await?;
    let shard = Forwarder::start(primary.port).await?;
    let node = start_node(&shard.url()).await?;
    let before = before_the_fault(&node, async || {
        // Offsets 1 and 2 reach the replica; then its link breaks, and 3 and 4 never do.
        ensure!(primary.cli(&["WAIT", "1", "5000"]).await? == "1");
        replica.detach().await?;
        Ok(())
    })
    .await?;
    primary.kill();
    replica.promote().await?;
    ensure!(
        replica
            .cli(&["HGET", &format!("sb:r:{ROOM}:meta"), "o"])
            .await?
            == "2",
        "the replica should hold offset 2"
    );
    shard.retarget(replica.port);
    after_the_fault(&node, before).await
}

/// Makes Redis stop for 4 s (`DEBUG SLEEP`; the node times out after 2 s) and returns once it
/// has: what it receives meanwhile it carries out when it wakes.
async fn stall(redis: &SnapshotRedis) -> Result<tokio::task::JoinHandle<()>> {
    let port = redis.port.to_string();
    let cli = |args: &[&str]| {
        let mut command = tokio::process::Command::new("redis-cli");
        command
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    };
    let mut sleep = cli(&["DEBUG", "SLEEP", "4"]);
    let sleeping = tokio::spawn(async move {
        let _ = sleep.status().await;
    });
    wait_until("Redis to stall", || async {
        let probe = cli(&["PING"]).status();
        tokio::time::timeout(Duration::from_millis(300), probe)
            .await
            .is_err()
    })
    .await?;
    Ok(sleeping)
}

#[tokio::test]
async fn a_publish_answered_too_late_is_unknown_outcome_and_did_happen() -> Result<()> {
    let redis = SnapshotRedis::start(None).await?;
    let node = start_node(&redis.url()).await?;
    let mut stayed = Peer::connect(&node, "stayed").await?;
    stayed.subscribe_with(ROOM, None, false).await?;
    let mut publisher = Peer::connect(&node, "publisher").await?;
    published(&mut publisher, json!("warm-up")).await?;
    ensure!(stayed.message().await?.data == json!("warm-up"));

    // Redis holds every command for longer than the node's 2 s command timeout.
    let sleeping = stall(&redis).await?;
    let answer = publish(&mut publisher, json!("late")).await?;
    let Err(error) = answer else {
        bail!("a publish Redis answered after 4 s succeeded: {answer:?}");
    };
    ensure!(error.code == ErrorCode::UnknownOutcome, "{error:?}");
    sleeping.await?;
    // It was published all the same: the code told the truth.
    let message = stayed.message().await?;
    ensure!(message.data == json!("late"), "{message:?}");
    stayed.quiet().await?;

    // The HTTP API says so with 504.
    let sleeping = stall(&redis).await?;
    let response = reqwest::Client::new()
        .post(node.http_url("/api/publish"))
        .json(&json!({"room": ROOM, "data": "late-api"}))
        .timeout(Duration::from_secs(20))
        .send()
        .await?;
    ensure!(response.status().as_u16() == 504, "{}", response.status());
    let body: Value = response.json().await?;
    ensure!(body["code"] == "unknown_outcome", "{body}");
    sleeping.await?;
    let message = stayed.message().await?;
    ensure!(message.data == json!("late-api"), "{message:?}");
    // A publish that never reached Redis is still `unavailable` (nothing was done).
    drop(redis);
    wait_until("the node to notice Redis is gone", || async {
        node.metric(r#"switchboard_redis_shard_up{shard="0"}"#)
            .await
            .is_ok_and(|up| up == 0.0)
    })
    .await?;
    let answer = publish(&mut publisher, json!("never")).await?;
    let Err(error) = answer else {
        bail!("a publish without Redis succeeded: {answer:?}");
    };
    ensure!(error.code == ErrorCode::Unavailable, "{error:?}");
    Ok(())
}

#[tokio::test]
async fn a_subscribe_redis_does_not_answer_leaves_no_subscription_behind() -> Result<()> {
    let redis = SnapshotRedis::start(None).await?;
    let node = start_node(&redis.url()).await?;
    let mut peer = Peer::connect(&node, "peer").await?;
    let numsub = async || -> Result<String> {
        redis
            .cli(&["PUBSUB", "NUMSUB", &format!("sb:r:{ROOM}")])
            .await
    };
    let sleeping = stall(&redis).await?;
    let id = peer.id();
    let answer = peer.ask(subscribe_frame(ROOM, id, None)).await?;
    let Err(error) = answer else {
        bail!("a subscribe Redis did not answer succeeded: {answer:?}");
    };
    ensure!(error.code == ErrorCode::Unavailable, "{error:?}");
    sleeping.await?;
    node.wait_ready().await?;
    // The session is not subscribed, and neither is the node in Redis.
    ensure!(numsub().await?.ends_with("\n0"), "{}", numsub().await?);
    peer.quiet().await?;
    // The node and the session carry on: the same subscribe now works.
    peer.subscribe_with(ROOM, None, false).await?;
    ensure!(numsub().await?.ends_with("\n1"), "{}", numsub().await?);
    Ok(())
}
