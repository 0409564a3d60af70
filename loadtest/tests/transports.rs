//! `connect --transport` and `fanout --transport` over every transport (WebSocket, SSE, long
//! poll), run for real: the `switchboard-loadtest` binary against real `switchboard` nodes (and,
//! for `fanout`, a real `redis-server` they share), checking from the JSON it writes that every
//! session opened, was held, and that every message reached every subscriber once and in order;
//! and, from the node's own metrics, that the sessions were of the transport asked for. Every
//! process started here is killed (by pid) when the test ends, pass or fail.

mod common;

use std::time::Duration;

use common::{Loadtest, assert_delivered_everything, field, node};
use serde_json::Value;
use switchboard_e2e::RedisProcess;

/// Runs `connect --transport TRANSPORT` with 40 sessions against one node and checks the report
/// and, during the hold, that the node holds 40 sessions of that transport.
async fn connect_over(transport: &str) {
    let node = node(&format!("lt-connect-{transport}"), None, &[]).await;
    let sessions = 40;
    let args = [
        "connect".to_owned(),
        format!("--transport={transport}"),
        "--url".to_owned(),
        node.ws_url(),
        format!("--connections={sessions}"),
        "--rate=400".to_owned(),
        "--hold-secs=2".to_owned(),
        format!("--pid={}", node.pid()),
        "--timeout-secs=30".to_owned(),
    ];
    let mut loadtest = Loadtest::spawn(&format!("connect-{transport}"), &args);
    loadtest
        .wait_for_log("every worker holding", Duration::from_secs(60))
        .await;
    let held = node
        .metric(&format!(
            "switchboard_sessions{{transport=\"{transport}\"}}"
        ))
        .await
        .expect("reading the node's metrics");
    assert_eq!(held, sessions as f64, "{transport} sessions on the node");
    let result = loadtest.finish(Duration::from_secs(60)).await;
    assert_eq!(result["transport"], transport, "{result:#}");
    assert_eq!(result["protocol"], "switchboard", "{result:#}");
    for (name, expected) in [
        ("connections_requested", sessions),
        ("connections_open", sessions),
        ("connections_held", sessions),
        ("failures", 0),
        ("dropped_before_hold", 0),
        ("dropped_during_hold", 0),
    ] {
        assert_eq!(field(&result, name), expected, "{name}: {result:#}");
    }
    // An idle SSE session holds its stream; an idle poll session its pending poll.
    let server = &result["servers"][0];
    assert_eq!(
        field(server, "sockets_after") - field(server, "sockets_before"),
        sessions,
        "{result:#}"
    );
    assert!(
        result["server_rss_per_connection_bytes"].is_f64(),
        "{result:#}"
    );
}

#[tokio::test]
async fn connect_over_websocket_says_its_transport() {
    connect_over("websocket").await;
}

#[tokio::test]
async fn connect_over_sse_holds_every_session() {
    connect_over("sse").await;
}

#[tokio::test]
async fn connect_over_poll_holds_every_session() {
    connect_over("poll").await;
}

/// Runs `fanout --transport TRANSPORT` over two nodes sharing a Redis (4 rooms, 16 subscribers,
/// 2 publishers, 100 msgs/s for 2 s) and checks that nothing was lost, duplicated or reordered.
async fn fanout_over(transport: &str) -> Value {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let nodes = [
        node(&format!("lt-fan-{transport}-a"), Some(&redis), &[]).await,
        node(&format!("lt-fan-{transport}-b"), Some(&redis), &[]).await,
    ];
    let (rooms, subscribers, publishers, rate, duration_secs) = (4, 16, 2, 100, 2);
    let mut args = vec![
        "fanout".to_owned(),
        format!("--transport={transport}"),
        format!("--rooms={rooms}"),
        format!("--subscribers={subscribers}"),
        format!("--publishers={publishers}"),
        format!("--rate={rate}"),
        format!("--duration-secs={duration_secs}"),
        "--warmup-secs=1".to_owned(),
        "--drain-secs=10".to_owned(),
        "--setup-timeout-secs=60".to_owned(),
    ];
    for (index, node) in nodes.iter().enumerate() {
        args.push(format!("--url={}", node.ws_url()));
        args.push(format!("--cpu-pid=node-{index}={}", node.pid()));
    }
    let result = Loadtest::spawn(&format!("fanout-{transport}"), &args)
        .finish(Duration::from_secs(120))
        .await;
    assert_eq!(result["transport"], transport, "{result:#}");
    assert_eq!(field(&result, "subscribers"), subscribers, "{result:#}");
    assert_eq!(
        result["subscribers_per_url"],
        serde_json::json!([subscribers / 2, subscribers / 2]),
        "every node holds subscribers: {result:#}"
    );
    let subscribers_per_room = subscribers / rooms;
    assert_delivered_everything(
        &result,
        &[
            "lost",
            "lost_in_gaps",
            "undelivered_at_end",
            "duplicates",
            "epoch_mismatches",
            "publish_errors",
            "publish_unanswered",
            "publishers_failed",
            "subscribers_closed_early",
            "unexpected_frames",
        ],
        rate,
        duration_secs,
        subscribers_per_room,
    );
    assert_eq!(
        field(&result, "received_total"),
        field(&result, "published_total") * subscribers_per_room,
        "{result:#}"
    );
    assert!(result["latency_ms_p99"].is_f64(), "{result:#}");
    assert!(
        result["server_cpu_secs_per_million_deliveries"].is_f64(),
        "no server CPU per delivery: {result:#}"
    );
    result
}

#[tokio::test]
async fn fanout_over_websocket_says_its_transport() {
    fanout_over("websocket").await;
}

#[tokio::test]
async fn fanout_over_sse_loses_nothing() {
    fanout_over("sse").await;
}

#[tokio::test]
async fn fanout_over_poll_loses_nothing() {
    fanout_over("poll").await;
}

#[tokio::test]
async fn a_fallback_transport_needs_switchboard() {
    let mut loadtest = Loadtest::spawn(
        "transport-peer",
        &[
            "fanout".to_owned(),
            "--protocol=raw".to_owned(),
            "--transport=sse".to_owned(),
            "--url=ws://127.0.0.1:9/".to_owned(),
        ],
    );
    let log = loadtest.log.clone();
    assert!(
        !loadtest
            .process
            .wait_exit(Duration::from_secs(30), &log)
            .await,
        "a raw peer has no SSE: the run must be refused"
    );
    let log = loadtest.log();
    assert!(
        log.contains("--transport sse|poll needs --protocol switchboard"),
        "{log}"
    );
}

/// A fanout over `transport` whose second node is killed mid-run: its subscribers' sessions end
/// (an SSE stream breaks, a poll fails) and are reported closed early, with what they missed
/// counted as lost, rather than hanging the run.
async fn fanout_over_reports_a_node_that_dies(transport: &str) {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let mut nodes = [
        node(&format!("lt-die-{transport}-a"), Some(&redis), &[]).await,
        node(&format!("lt-die-{transport}-b"), Some(&redis), &[]).await,
    ];
    // One publisher: it goes to the first target (node a), so the run outlives node b.
    let mut args = vec![
        "fanout".to_owned(),
        format!("--transport={transport}"),
        "--rooms=4".to_owned(),
        "--subscribers=16".to_owned(),
        "--publishers=1".to_owned(),
        "--rate=100".to_owned(),
        "--duration-secs=3".to_owned(),
        "--warmup-secs=1".to_owned(),
        "--drain-secs=2".to_owned(),
        "--setup-timeout-secs=60".to_owned(),
    ];
    for node in &nodes {
        args.push(format!("--url={}", node.ws_url()));
    }
    let mut loadtest = Loadtest::spawn(&format!("fanout-dies-{transport}"), &args);
    loadtest
        .wait_for_log("publishing ", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[1].kill().expect("killing node b");
    let result = loadtest.finish(Duration::from_secs(120)).await;
    let lost = field(&result, "lost");
    assert!(lost > 0, "no loss reported: {result:#}");
    assert_eq!(
        field(&result, "subscribers_closed_early"),
        8,
        "node b's subscribers: {result:#}"
    );
    assert_eq!(
        field(&result, "received_total") + lost,
        field(&result, "expected_deliveries_total"),
        "{result:#}"
    );
}

#[tokio::test]
async fn fanout_over_sse_reports_a_node_that_dies() {
    fanout_over_reports_a_node_that_dies("sse").await;
}

#[tokio::test]
async fn fanout_over_poll_reports_a_node_that_dies() {
    fanout_over_reports_a_node_that_dies("poll").await;
}
