//! Runs the real `switchboard-loadtest` binary against a real `redis-server` and real
//! `switchboard` nodes on loopback ports (started with the e2e harness's `RedisProcess` and
//! `NodeProcess`), and checks the harness's own bookkeeping from the JSON it writes. Every process
//! started here is killed (by pid) when the test ends, pass or fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Loadtest, Server, assert_delivered_everything, assert_headline_figures, field, headline, node,
    run_loadtest, socketio_dir, thousands,
};
use serde_json::Value;
use switchboard_e2e::{NodeProcess, RedisProcess};

/// Sends `signal` (e.g. `KILL`, `INT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Whether a process with this pid exists (a zombie counts: nobody reaped it).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until none of `pids` exists, at most `within`.
async fn wait_gone(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "processes still there after {within:?}: {:?}",
            pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One Redis and two nodes sharing it. Fields drop in order: the nodes before their Redis.
struct Cluster {
    a: NodeProcess,
    b: NodeProcess,
    redis: RedisProcess,
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = RedisProcess::start().await.expect("starting redis-server");
        Cluster {
            a: node("loadtest-a", Some(&redis), &[]).await,
            b: node("loadtest-b", Some(&redis), &[]).await,
            redis,
        }
    }
}

/// A path for an `--html` report, and a check of what was written there.
fn html_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}.html", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Reads (and removes) the report at `path`, and checks it is a self-contained page with charts.
fn read_report(path: &Path) -> String {
    let report = std::fs::read_to_string(path).expect("the --html file");
    let _ = std::fs::remove_file(path);
    assert!(report.starts_with("<!DOCTYPE html>"), "{report}");
    assert!(report.contains("<svg"), "{report}");
    for external in ["http://", "https://", "<script", "<link", "src="] {
        assert!(
            !report.contains(external),
            "{external} in the report: {report}"
        );
    }
    report
}

/// The pid of a Redis server, from its INFO.
async fn redis_pid(redis: &RedisProcess) -> u32 {
    let info = redis.cli(&["INFO", "server"]).await.expect("INFO server");
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_id in {info}"))
}

#[tokio::test]
async fn connect_opens_every_connection() {
    let cluster = Cluster::start().await;
    let html = html_path("connect");
    let args = [
        "connect".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--connections=50".to_owned(),
        "--rate=500".to_owned(),
        "--hold-secs=1".to_owned(),
        format!("--pid={}", cluster.a.pid()),
        "--timeout-secs=30".to_owned(),
        "--html".to_owned(),
        html.display().to_string(),
    ];
    let result = run_loadtest("connect", &args, Duration::from_secs(60)).await;
    assert_eq!(field(&result, "connections_requested"), 50, "{result:#}");
    assert_eq!(field(&result, "connections_open"), 50, "{result:#}");
    assert_eq!(field(&result, "connections_held"), 50, "{result:#}");
    assert_eq!(field(&result, "failures"), 0, "{result:#}");
    assert_eq!(result["protocol"], "switchboard", "{result:#}");
    assert!(
        field(&result, "server_rss_after_bytes") > 0,
        "no RSS read: {result:#}"
    );
    // The node holds one more socket per connection.
    let server = &result["servers"][0];
    assert_eq!(server["name"], "server", "{result:#}");
    assert_eq!(
        field(server, "sockets_after") - field(server, "sockets_before"),
        50,
        "{result:#}"
    );
    let report = read_report(&html);
    assert!(report.contains("Handshake latency"), "{report}");
    assert!(report.contains("Connections open"), "{report}");
}

/// The worker pids a `connect` run logged.
fn worker_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|line| line.strip_prefix("worker "))
        .filter_map(|rest| {
            rest.split_whitespace()
                .nth(2)?
                .trim_end_matches(':')
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test]
async fn connect_spreads_over_workers_and_nodes() {
    let cluster = Cluster::start().await;
    let args = [
        "connect".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--url".to_owned(),
        cluster.b.ws_url(),
        "--workers=2".to_owned(),
        "--source-addresses=2".to_owned(),
        "--connections=40".to_owned(),
        "--rate=400".to_owned(),
        "--hold-secs=1".to_owned(),
        format!("--pid=node-a={}", cluster.a.pid()),
        format!("--pid=node-b={}", cluster.b.pid()),
        "--timeout-secs=30".to_owned(),
    ];
    let result = run_loadtest("connect-workers", &args, Duration::from_secs(60)).await;
    assert_eq!(field(&result, "connections_open"), 40, "{result:#}");
    assert_eq!(field(&result, "failures"), 0, "{result:#}");
    assert_eq!(field(&result, "worker_processes"), 2, "{result:#}");
    assert_eq!(
        result["connections_open_per_url"],
        serde_json::json!([20, 20]),
        "{result:#}"
    );
    let workers = result["per_worker"].as_array().expect("per_worker");
    assert_eq!(workers.len(), 2, "{result:#}");
    for worker in workers {
        assert_eq!(field(worker, "requested"), 20, "{result:#}");
        assert_eq!(field(worker, "open"), 20, "{result:#}");
    }
    assert_eq!(workers[0]["sources"], "127.0.0.1–127.0.0.2", "{result:#}");
    assert_eq!(workers[1]["sources"], "127.0.0.3–127.0.0.4", "{result:#}");
    for (index, name) in ["node-a", "node-b"].iter().enumerate() {
        let server = &result["servers"][index];
        assert_eq!(server["name"], *name, "{result:#}");
        assert_eq!(
            field(server, "sockets_after") - field(server, "sockets_before"),
            20,
            "{name}: {result:#}"
        );
    }
    assert!(
        result["server_rss_per_connection_bytes"].is_f64(),
        "{result:#}"
    );
    let pids: Vec<u32> = workers
        .iter()
        .map(|worker| field(worker, "pid") as u32)
        .collect();
    wait_gone(&pids, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn connect_interrupted_leaves_no_worker() {
    let cluster = Cluster::start().await;
    let args = [
        "connect".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--workers=3".to_owned(),
        "--connections=30".to_owned(),
        "--rate=300".to_owned(),
        "--hold-secs=60".to_owned(),
        "--timeout-secs=30".to_owned(),
    ];
    let mut loadtest = Loadtest::spawn("connect-interrupted", &args);
    let log = loadtest
        .wait_for_log("connections open after", Duration::from_secs(30))
        .await;
    let pids = worker_pids(&log);
    assert_eq!(pids.len(), 3, "{log}");
    assert!(pids.iter().all(|pid| alive(*pid)), "{log}");
    signal(loadtest.process.child.id(), "INT");
    let log_path = loadtest.log.clone();
    assert!(
        !loadtest
            .process
            .wait_exit(Duration::from_secs(10), &log_path)
            .await,
        "an interrupted run reports failure"
    );
    wait_gone(&pids, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn connect_counts_connections_the_node_refuses() {
    // The node accepts 5 connections; the rest wait in the kernel's backlog until the timeout.
    let node = node("loadtest-small", None, &["--max-connections", "5"]).await;
    let args = [
        "connect".to_owned(),
        "--url".to_owned(),
        node.ws_url(),
        "--connections=12".to_owned(),
        "--rate=200".to_owned(),
        "--hold-secs=0".to_owned(),
        "--timeout-secs=2".to_owned(),
    ];
    let result = run_loadtest("connect-refused", &args, Duration::from_secs(60)).await;
    assert_eq!(field(&result, "connections_open"), 5, "{result:#}");
    assert_eq!(field(&result, "failures"), 7, "{result:#}");
}

#[tokio::test]
async fn connect_counts_drops_during_the_hold() {
    let mut node = node("loadtest-dies", None, &[]).await;
    let args = [
        "connect".to_owned(),
        "--url".to_owned(),
        node.ws_url(),
        "--workers=2".to_owned(),
        "--connections=20".to_owned(),
        "--rate=400".to_owned(),
        "--hold-secs=3".to_owned(),
        "--timeout-secs=30".to_owned(),
    ];
    let mut loadtest = Loadtest::spawn("connect-drops", &args);
    loadtest
        .wait_for_log("every worker holding", Duration::from_secs(30))
        .await;
    node.kill().expect("killing the node");
    let result = loadtest.finish(Duration::from_secs(60)).await;
    assert_eq!(field(&result, "connections_open"), 20, "{result:#}");
    assert_eq!(field(&result, "dropped_during_hold"), 20, "{result:#}");
    assert_eq!(field(&result, "connections_held"), 0, "{result:#}");
}

/// A Socket.IO 4 server (the peer's own npm packages, `loadtest/peers/socketio`) that pings every
/// 300 ms and closes a connection whose pong is 300 ms late; killed on drop.
struct PingingSocketio {
    server: Server,
}

impl PingingSocketio {
    async fn start() -> PingingSocketio {
        let peer = socketio_dir();
        let script = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("pinging-socketio-{}.js", std::process::id()));
        std::fs::write(
            &script,
            r#"const http = require("node:http");
const { Server } = require("socket.io");
const server = http.createServer();
new Server(server, { transports: ["websocket"], pingInterval: 300, pingTimeout: 300 });
server.listen(0, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${server.address().port}`));
"#,
        )
        .expect("writing the server script");
        let mut command = tokio::process::Command::new("node");
        command
            .arg(&script)
            .env("NODE_PATH", peer.join("node_modules"));
        let server = Server::start(command).await;
        let _ = std::fs::remove_file(&script);
        PingingSocketio { server }
    }

    fn url(&self) -> String {
        format!(
            "ws://{}/socket.io/?EIO=4&transport=websocket",
            self.server.addr
        )
    }
}

#[tokio::test]
async fn connect_keeps_socketio_connections_alive_by_answering_pings() {
    let server = PingingSocketio::start().await;
    let connect = |protocol: &str| {
        vec![
            "connect".to_owned(),
            "--url".to_owned(),
            server.url(),
            format!("--protocol={protocol}"),
            "--workers=2".to_owned(),
            "--connections=20".to_owned(),
            "--rate=400".to_owned(),
            // Several ping intervals and timeouts.
            "--hold-secs=2".to_owned(),
            format!("--pid=socketio={}", server.server.pid()),
            "--timeout-secs=30".to_owned(),
        ]
    };
    let result = run_loadtest(
        "connect-socketio",
        &connect("socketio"),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(field(&result, "connections_open"), 20, "{result:#}");
    assert_eq!(field(&result, "dropped_before_hold"), 0, "{result:#}");
    assert_eq!(field(&result, "dropped_during_hold"), 0, "{result:#}");
    assert_eq!(field(&result, "connections_held"), 20, "{result:#}");
    // The same connections without the Socket.IO greeting and pongs: the server closes them.
    let result = run_loadtest(
        "connect-socketio-mute",
        &connect("raw"),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(field(&result, "connections_open"), 20, "{result:#}");
    assert_eq!(field(&result, "connections_held"), 0, "{result:#}");
}

#[tokio::test]
async fn latency_across_nodes_loses_nothing() {
    let cluster = Cluster::start().await;
    let (rooms, subscribers_per_room, rate, duration_secs) = (5, 3, 100, 2);
    let args = [
        "latency".to_owned(),
        "--publish-url".to_owned(),
        cluster.a.ws_url(),
        "--subscribe-url".to_owned(),
        cluster.b.ws_url(),
        format!("--rooms={rooms}"),
        format!("--subscribers-per-room={subscribers_per_room}"),
        format!("--rate={rate}"),
        format!("--duration-secs={duration_secs}"),
        "--warmup-secs=1".to_owned(),
        "--baseline-secs=1".to_owned(),
        "--drain-secs=5".to_owned(),
        "--setup-timeout-secs=30".to_owned(),
        format!("--redis-url={}", cluster.redis.url()),
        format!("--cpu-pid=node-a={}", cluster.a.pid()),
        format!("--cpu-pid=node-b={}", cluster.b.pid()),
        format!("--cpu-pid=redis={}", redis_pid(&cluster.redis).await),
    ];
    let result = run_loadtest("latency", &args, Duration::from_secs(90)).await;
    assert_eq!(
        field(&result, "subscribers"),
        rooms * subscribers_per_room,
        "{result:#}"
    );
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
            "subscribers_closed_early",
        ],
        rate,
        duration_secs,
        subscribers_per_room,
    );
    let published_total = field(&result, "published_total");
    assert_eq!(
        field(&result, "expected_deliveries_total"),
        published_total * subscribers_per_room,
        "{result:#}"
    );
    assert_eq!(
        field(&result, "received_total"),
        field(&result, "expected_deliveries_total"),
        "{result:#}"
    );
    let redis = &result["redis"];
    let commands_per_publish = redis["commands_per_publish"]
        .as_f64()
        .unwrap_or_else(|| panic!("no redis.commands_per_publish: {result:#}"));
    assert!(
        (5.0..=10.0).contains(&commands_per_publish),
        "{commands_per_publish} Redis commands per publish: {result:#}"
    );
    assert!(
        redis["net_commands_per_publish"].is_f64(),
        "no baseline: {result:#}"
    );
    for process in ["loadtest", "node-a", "node-b", "redis"] {
        assert!(
            result["cpu_percent"].get(process).is_some(),
            "no CPU of {process}: {result:#}"
        );
    }
}

/// The flags of a short `fanout` run over both nodes of `cluster`.
fn fanout_args(
    cluster: &Cluster,
    rooms: u64,
    subscribers: u64,
    publishers: u64,
    rate: u64,
    duration_secs: u64,
    drain_secs: u64,
) -> Vec<String> {
    vec![
        "fanout".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--url".to_owned(),
        cluster.b.ws_url(),
        format!("--rooms={rooms}"),
        format!("--subscribers={subscribers}"),
        format!("--publishers={publishers}"),
        format!("--rate={rate}"),
        format!("--duration-secs={duration_secs}"),
        "--warmup-secs=1".to_owned(),
        format!("--drain-secs={drain_secs}"),
        "--setup-timeout-secs=30".to_owned(),
    ]
}

#[tokio::test]
async fn fanout_over_both_nodes_loses_nothing() {
    let cluster = Cluster::start().await;
    let (rooms, subscribers, publishers, rate, duration_secs) = (4, 16, 2, 100, 2);
    let mut args = fanout_args(
        &cluster,
        rooms,
        subscribers,
        publishers,
        rate,
        duration_secs,
        5,
    );
    let html = html_path("fanout");
    args.push("--html".to_owned());
    args.push(html.display().to_string());
    let result = run_loadtest("fanout", &args, Duration::from_secs(90)).await;
    read_report(&html);
    assert_eq!(
        result["delivered_by_second"].as_array().map(Vec::len),
        Some(duration_secs as usize),
        "{result:#}"
    );
    let subscribers_per_room = subscribers / rooms;
    assert_eq!(field(&result, "subscribers"), subscribers, "{result:#}");
    assert_eq!(
        field(&result, "subscribers_per_room"),
        subscribers_per_room,
        "{result:#}"
    );
    assert_eq!(field(&result, "publishers"), publishers, "{result:#}");
    // Every node holds subscribers.
    assert_eq!(
        result["subscribers_per_url"],
        serde_json::json!([subscribers / 2, subscribers / 2]),
        "{result:#}"
    );
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
    assert!(
        result["delivered_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{result:#}"
    );
    assert!(result["latency_ms_p99"].is_f64(), "{result:#}");
}

#[tokio::test]
async fn fanout_reports_loss_when_a_node_dies() {
    let mut cluster = Cluster::start().await;
    // One publisher: it connects to the first target (node a), so the run outlives node b,
    // whose subscribers lose the rest of the run.
    let args = fanout_args(&cluster, 4, 16, 1, 100, 3, 2);
    let mut loadtest = Loadtest::spawn("fanout-loss", &args);
    loadtest
        .wait_for_log("publishing ", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: node b's connections drop without a close frame.
    cluster.b.kill().expect("killing node b");
    let result = loadtest.finish(Duration::from_secs(90)).await;
    let lost = field(&result, "lost");
    let closed_early = field(&result, "subscribers_closed_early");
    assert!(lost > 0, "no loss reported: {result:#}");
    assert_eq!(closed_early, 8, "node b's subscribers: {result:#}");
    assert_eq!(
        field(&result, "received_total") + lost,
        field(&result, "expected_deliveries_total"),
        "{result:#}"
    );
}

#[tokio::test]
async fn direct_between_nodes_loses_nothing() {
    let cluster = Cluster::start().await;
    let html = html_path("direct");
    let args = [
        "direct".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--url".to_owned(),
        cluster.b.ws_url(),
        "--users=10".to_owned(),
        "--rate=100".to_owned(),
        "--duration-secs=2".to_owned(),
        "--drain-secs=5".to_owned(),
        "--setup-timeout-secs=30".to_owned(),
        "--html".to_owned(),
        html.display().to_string(),
    ];
    let result = run_loadtest("direct", &args, Duration::from_secs(60)).await;
    let report = read_report(&html);
    assert!(report.contains("Messages per second"), "{report}");
    // The headline is the run's own figures.
    let (sentence, figures) = headline(&report);
    assert_headline_figures(
        &figures,
        &result,
        &["delivered_per_sec", "latency_ms_p99", "lost", "duplicates"],
    );
    assert!(
        sentence.starts_with(&format!(
            "{} of {} messages delivered between 10 users",
            thousands(field(&result, "delivered")),
            thousands(field(&result, "sent"))
        )),
        "{sentence}: {result:#}"
    );
    assert!(sentence.ends_with("; nothing lost."), "{sentence}");
    let delivered_by_second: u64 = result["delivered_by_second"]
        .as_array()
        .unwrap_or_else(|| panic!("no delivered_by_second: {result:#}"))
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        delivered_by_second,
        field(&result, "delivered"),
        "{result:#}"
    );
    assert_eq!(field(&result, "users"), 10, "{result:#}");
    assert_eq!(
        field(&result, "cross_target_pairs"),
        10,
        "every pair spans the nodes: {result:#}"
    );
    let sent = field(&result, "sent");
    assert!(
        (160..=240).contains(&sent),
        "sent {sent}, scheduled 200: {result:#}"
    );
    for zero in [
        "lost",
        "lost_in_gaps",
        "duplicates",
        "sent_to_no_session",
        "send_errors",
        "send_unanswered",
        "unexpected_frames",
        "users_closed_early",
    ] {
        assert_eq!(field(&result, zero), 0, "{zero}: {result:#}");
    }
    assert_eq!(field(&result, "delivered"), sent, "{result:#}");
    assert!(result["latency_ms_p99"].is_f64(), "{result:#}");
}

#[tokio::test]
async fn reconnect_resumes_every_subscriber_without_loss() {
    let cluster = Cluster::start().await;
    let html = html_path("reconnect");
    let subscribers = 16;
    let args = [
        "reconnect".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--url".to_owned(),
        cluster.b.ws_url(),
        "--rooms=4".to_owned(),
        format!("--subscribers={subscribers}"),
        "--rate=100".to_owned(),
        "--drop-after-secs=1".to_owned(),
        "--after-secs=1".to_owned(),
        "--drain-secs=5".to_owned(),
        "--setup-timeout-secs=30".to_owned(),
        "--html".to_owned(),
        html.display().to_string(),
    ];
    let result = run_loadtest("reconnect", &args, Duration::from_secs(90)).await;
    let report = read_report(&html);
    assert!(report.contains("Around the drop"), "{report}");
    let (sentence, figures) = headline(&report);
    assert_headline_figures(
        &figures,
        &result,
        &["reconnected", "all_back_ms", "lost", "not_recovered"],
    );
    assert!(
        sentence.starts_with(&format!(
            "{subscribers} of {subscribers} subscribers back on another target"
        )),
        "{sentence}"
    );
    assert!(
        sentence.ends_with(&format!(
            "recovered with since; {} of {} expected deliveries; nothing lost.",
            thousands(field(&result, "received_total")),
            thousands(field(&result, "expected_deliveries_total"))
        )),
        "{sentence}: {result:#}"
    );
    assert_eq!(field(&result, "reconnected"), subscribers, "{result:#}");
    assert_eq!(field(&result, "recovered"), subscribers, "{result:#}");
    for zero in [
        "reconnect_failures",
        "not_recovered",
        "epoch_changes",
        "lost",
        "lost_in_gaps",
        "undelivered_at_end",
        "duplicates",
        "epoch_mismatches",
        "publish_errors",
        "publish_unanswered",
        "subscribers_closed_early",
        "unexpected_frames",
    ] {
        assert_eq!(field(&result, zero), 0, "{zero}: {result:#}");
    }
    assert!(field(&result, "published") > 0, "{result:#}");
    assert_eq!(
        field(&result, "received_total"),
        field(&result, "expected_deliveries_total"),
        "{result:#}"
    );
    assert!(result["reconnect_ms_max"].is_f64(), "{result:#}");
}

/// `direct --persist` between the nodes of a Redis cluster, with the given extra flags.
async fn direct_persisted(cluster: &Cluster, extra: &[&str]) -> Value {
    let mut args = vec![
        "direct".to_owned(),
        "--persist".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--url".to_owned(),
        cluster.b.ws_url(),
        "--redis-url".to_owned(),
        cluster.redis.url(),
        "--users=10".to_owned(),
        "--rate=100".to_owned(),
        "--duration-secs=3".to_owned(),
        "--drain-secs=10".to_owned(),
        "--setup-timeout-secs=30".to_owned(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    run_loadtest("direct-persist", &args, Duration::from_secs(90)).await
}

#[tokio::test]
async fn direct_persisted_between_nodes_loses_nothing_and_acks() {
    let cluster = Cluster::start().await;
    let html = html_path("direct-persist");
    let html_arg = html.display().to_string();
    let result = direct_persisted(&cluster, &["--html", html_arg.as_str()]).await;
    let report = read_report(&html);
    assert!(report.contains("Messages per second"), "{report}");
    let (sentence, figures) = headline(&report);
    assert_headline_figures(
        &figures,
        &result,
        &["delivered_per_sec", "lost", "redelivered_after_ack"],
    );
    assert!(
        sentence.starts_with(&format!(
            "{} of {} stored messages delivered between 10 users",
            thousands(field(&result, "delivered")),
            thousands(field(&result, "stored"))
        )),
        "{sentence}: {result:#}"
    );
    let sent = field(&result, "sent");
    assert!(
        (240..=360).contains(&sent),
        "sent {sent}, scheduled 300: {result:#}"
    );
    assert_eq!(field(&result, "stored"), sent, "{result:#}");
    assert_eq!(field(&result, "delivered"), sent, "{result:#}");
    for zero in [
        "lost",
        "delivered_unconfirmed",
        "duplicates",
        "redelivered",
        "redelivered_after_ack",
        "reconnected",
        "epoch_changes",
        "send_errors",
        "send_unanswered",
        "unexpected_frames",
        "users_closed_early",
    ] {
        assert_eq!(field(&result, zero), 0, "{zero}: {result:#}");
    }
    // The last ack may still be on its way when the run stops.
    let answered = field(&result, "acks_answered");
    assert!(answered > 0, "{result:#}");
    assert!(answered <= field(&result, "acks_sent"), "{result:#}");
    assert!(result["latency_ms_p99"].is_f64(), "{result:#}");
    // Every persisted send ran the inbox script on the receiver's shard.
    let scripts = result["redis"]["script_calls_per_publish"]
        .as_f64()
        .unwrap_or_else(|| panic!("no Redis cost: {result:#}"));
    assert!(scripts >= 1.0, "{result:#}");
}

#[tokio::test]
async fn direct_persisted_through_a_reconnect_storm_loses_nothing() {
    let cluster = Cluster::start().await;
    // An ack every 4 messages leaves some unacknowledged at the drop: those come again.
    let result = direct_persisted(
        &cluster,
        &[
            "--drop-after-secs=1",
            "--ack-every=4",
            "--ack-interval-ms=60000",
        ],
    )
    .await;
    assert_eq!(field(&result, "reconnected"), 10, "{result:#}");
    for zero in [
        "lost",
        "duplicates",
        "redelivered_after_ack",
        "reconnect_failures",
        "epoch_changes",
        "send_errors",
        "unexpected_frames",
        "users_closed_early",
    ] {
        assert_eq!(field(&result, zero), 0, "{zero}: {result:#}");
    }
    let stored = field(&result, "stored");
    assert!(stored > 100, "{result:#}");
    // Sends the drop cut off before their answer may have been stored: delivered, unconfirmed.
    assert_eq!(
        field(&result, "delivered"),
        stored + field(&result, "delivered_unconfirmed"),
        "{result:#}"
    );
    assert!(
        field(&result, "delivered_unconfirmed") <= field(&result, "send_unanswered"),
        "{result:#}"
    );
    assert!(field(&result, "redelivered") > 0, "{result:#}");
    assert!(field(&result, "acks_answered") > 0, "{result:#}");
}

#[tokio::test]
async fn direct_drop_needs_persist() {
    let args = [
        "direct".to_owned(),
        "--url".to_owned(),
        "ws://127.0.0.1:9/ws".to_owned(),
        "--drop-after-secs=1".to_owned(),
    ];
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
        .args(&args)
        .output()
        .expect("running switchboard-loadtest");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--drop-after-secs needs --persist"),
        "{stderr}"
    );
}
