//! `fanout --protocol raw|socketio` run for real: the `switchboard-loadtest` binary against the
//! raw ceiling server (`switchboard-raw-ceiling`) and against two Socket.IO peers
//! (`loadtest/peers/socketio`) sharing a real redis-server, checking the harness's loss,
//! duplicate and order bookkeeping by sequence numbers from the JSON it writes, and that a server
//! dying mid-run is reported rather than hanging the run. Every process started here is killed by
//! pid when its guard is dropped, pass or fail.

mod common;

use std::time::Duration;

use common::{
    Loadtest, Server, assert_delivered_everything, field, start_raw, start_socketio,
    wait_for_socketio_adapters,
};
use serde_json::Value;
use switchboard_e2e::RedisProcess;

/// A short `fanout` run's flags.
struct Run {
    protocol: &'static str,
    urls: Vec<String>,
    rooms: u64,
    subscribers: u64,
    publishers: u64,
    rate: u64,
    duration_secs: u64,
    cpu_pids: Vec<(&'static str, u32)>,
}

impl Run {
    /// A run against one raw server: 4 rooms, 16 subscribers, 2 publishers.
    fn raw(server: &Server, rate: u64, duration_secs: u64) -> Run {
        Run {
            protocol: "raw",
            urls: vec![format!("ws://{}/", server.addr)],
            rooms: 4,
            subscribers: 16,
            publishers: 2,
            rate,
            duration_secs,
            cpu_pids: Vec::new(),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "fanout".to_owned(),
            format!("--protocol={}", self.protocol),
            format!("--rooms={}", self.rooms),
            format!("--subscribers={}", self.subscribers),
            format!("--publishers={}", self.publishers),
            format!("--rate={}", self.rate),
            format!("--duration-secs={}", self.duration_secs),
            "--warmup-secs=1".to_owned(),
            "--drain-secs=3".to_owned(),
            "--setup-timeout-secs=30".to_owned(),
        ];
        for url in &self.urls {
            args.push(format!("--url={url}"));
        }
        for (name, pid) in &self.cpu_pids {
            args.push(format!("--cpu-pid={name}={pid}"));
        }
        args
    }
}

/// Checks a run that should have lost nothing: every message written reached every subscriber
/// of its room, once and in order.
fn assert_lossless(run: &Run, result: &Value) {
    assert_eq!(result["protocol"], run.protocol, "{result:#}");
    assert_eq!(field(result, "subscribers"), run.subscribers, "{result:#}");
    assert!(
        result["publish_unanswered"].is_null(),
        "the peers answer no publish: {result:#}"
    );
    let subscribers_per_room = run.subscribers / run.rooms;
    assert_delivered_everything(
        result,
        &[
            "lost",
            "lost_in_gaps",
            "undelivered_at_end",
            "duplicates",
            "epoch_mismatches",
            "publish_errors",
            "publishers_failed",
            "subscribers_closed_early",
            "unexpected_frames",
        ],
        run.rate,
        run.duration_secs,
        subscribers_per_room,
    );
    let expected = field(result, "published_total") * subscribers_per_room;
    assert_eq!(
        field(result, "expected_deliveries_total"),
        expected,
        "{result:#}"
    );
    assert_eq!(field(result, "received_total"), expected, "{result:#}");
    assert!(result["latency_ms_p99"].is_f64(), "{result:#}");
    assert!(
        result["server_cpu_percent"].is_f64(),
        "no server CPU: {result:#}"
    );
    assert!(
        result["server_cpu_secs_per_million_deliveries"].is_f64(),
        "no server CPU per delivery: {result:#}"
    );
}

#[tokio::test]
async fn fanout_against_the_raw_server_loses_nothing() {
    let server = start_raw(&[]).await;
    let run = Run {
        cpu_pids: vec![("raw", server.pid())],
        ..Run::raw(&server, 200, 2)
    };
    let result = Loadtest::spawn("protocols-raw", &run.args())
        .finish(Duration::from_secs(60))
        .await;
    assert_lossless(&run, &result);
    assert!(
        result["cpu_percent"].get("raw").is_some(),
        "no CPU of the server: {result:#}"
    );
}

#[tokio::test]
async fn fanout_against_two_socketio_nodes_loses_nothing() {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let nodes = [start_socketio(&redis).await, start_socketio(&redis).await];
    wait_for_socketio_adapters(&redis, nodes.len()).await;
    let run = Run {
        protocol: "socketio",
        urls: nodes
            .iter()
            .map(|node| format!("ws://{}/socket.io/?EIO=4&transport=websocket", node.addr))
            .collect(),
        rooms: 4,
        subscribers: 16,
        publishers: 2,
        rate: 100,
        duration_secs: 2,
        cpu_pids: vec![("sio1", nodes[0].pid()), ("sio2", nodes[1].pid())],
    };
    let result = Loadtest::spawn("protocols-socketio", &run.args())
        .finish(Duration::from_secs(60))
        .await;
    assert_lossless(&run, &result);
    // Every node held subscribers, so deliveries crossed Redis.
    assert_eq!(
        result["subscribers_per_url"],
        serde_json::json!([8, 8]),
        "{result:#}"
    );
}

#[tokio::test]
async fn fanout_reports_a_server_that_dies_mid_run() {
    let mut server = start_raw(&[]).await;
    let run = Run::raw(&server, 100, 3);
    let mut loadtest = Loadtest::spawn("protocols-dies", &run.args());
    loadtest
        .wait_for_log("publishing ", Duration::from_secs(30))
        .await;
    // Let some messages through first, so the run has both deliveries and a failure.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.child.kill().await.expect("killing the server");
    let result = loadtest.finish(Duration::from_secs(60)).await;
    assert_eq!(
        field(&result, "subscribers_closed_early"),
        run.subscribers,
        "{result:#}"
    );
    assert_eq!(
        field(&result, "publishers_failed"),
        run.publishers,
        "{result:#}"
    );
    assert!(field(&result, "received_total") > 0, "{result:#}");
    assert_eq!(
        field(&result, "received_total") + field(&result, "lost"),
        field(&result, "expected_deliveries_total"),
        "{result:#}"
    );
    assert!(
        result["server_cpu_percent"].is_null(),
        "no --cpu-pid: {result:#}"
    );
}
