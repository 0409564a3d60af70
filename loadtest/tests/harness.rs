//! Runs the real `switchboard-loadtest` binary against a real `redis-server` and two real
//! `switchboard` nodes on loopback ports, and checks the harness's own bookkeeping from the JSON
//! it writes. Every process started here is killed (by pid) when the test ends, pass or fail.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a process may take to start and answer.
const STARTUP: Duration = Duration::from_secs(20);

/// A child process, killed (by pid) and reaped on drop.
struct Process {
    child: Child,
    name: String,
}

impl Process {
    fn spawn(name: &str, command: &mut Command) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {name}: {error}"));
        Process {
            child,
            name: name.to_owned(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("{} exited with {status}", self.name);
        }
    }

    /// Waits for the process to exit, at most `within`; panics (and so kills it) past that.
    fn wait_success(&mut self, within: Duration, diagnostics: &Path) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    std::fs::read_to_string(diagnostics).unwrap_or_default()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {within:?}:\n{}",
                self.name,
                std::fs::read_to_string(diagnostics).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the package sits in the workspace")
        .to_path_buf()
}

/// The `switchboard` binary, built once per test process if it is not there yet.
fn switchboard_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let workspace = workspace();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let binary = target.join("debug").join("switchboard");
        if !binary.exists() {
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "switchboard",
                    "--bin",
                    "switchboard",
                ])
                .current_dir(&workspace)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building switchboard failed");
        }
        binary
    })
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a loopback port")
        .port()
}

/// A `redis-server` on a free loopback port, without persistence.
struct Redis {
    process: Process,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let mut process = Process::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let deadline = Instant::now() + STARTUP;
        loop {
            if ping(port) {
                return Redis { process, port };
            }
            process.assert_running();
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Whether Redis on `port` answers PING.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

/// A `switchboard` node on loopback ports it picked itself, sharing `redis`.
struct Node {
    process: Process,
    public: SocketAddr,
    internal: SocketAddr,
}

impl Node {
    fn start(name: &str, redis: &Redis) -> Node {
        let mut command = Command::new(switchboard_binary());
        for (key, _) in std::env::vars() {
            if key.starts_with("SWITCHBOARD_") {
                command.env_remove(key);
            }
        }
        command
            .args([
                "--node-id",
                name,
                "--redis",
                &redis.url(),
                "--rate-limit",
                "0",
            ])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--internal-listen",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json", "--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = Process::spawn(name, &mut command);
        let stderr = process.child.stderr.take().expect("piped stderr");
        let (started_tx, started_rx) = mpsc::channel();
        // Reads the log to its end, so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line)
                    && let Some(fields) = value.get("fields")
                    && let (Some(public), Some(internal)) = (
                        fields.get("public").and_then(Value::as_str),
                        fields.get("internal").and_then(Value::as_str),
                    )
                {
                    let _ = started_tx.send((public.to_owned(), internal.to_owned()));
                }
            }
        });
        let (public, internal) = started_rx
            .recv_timeout(STARTUP)
            .unwrap_or_else(|_| panic!("{name} never logged its listening addresses"));
        let node = Node {
            process,
            public: public.parse().expect("public address"),
            internal: internal.parse().expect("internal address"),
        };
        node.wait_ready();
        node
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    /// Waits until `/readyz` answers 200 (every Redis shard connected).
    fn wait_ready(&self) {
        let deadline = Instant::now() + STARTUP;
        while !http_ok(self.internal, "/readyz") {
            assert!(
                Instant::now() < deadline,
                "{} never became ready",
                self.process.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether a GET of `path` answers 200.
fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut status = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && BufReader::new(stream).read_line(&mut status).is_ok()
        && status.split_whitespace().nth(1) == Some("200")
}

/// One Redis and two nodes sharing it. Fields drop in order: the nodes before their Redis.
struct Cluster {
    a: Node,
    b: Node,
    redis: Redis,
}

impl Cluster {
    fn start() -> Cluster {
        let redis = Redis::start();
        Cluster {
            a: Node::start("loadtest-a", &redis),
            b: Node::start("loadtest-b", &redis),
            redis,
        }
    }
}

/// Runs the load-test binary with `args` plus `--json FILE`, bounded by `within`, and returns
/// the JSON it wrote.
fn run_loadtest(name: &str, args: &[String], within: Duration) -> Value {
    Loadtest::spawn(name, args).finish(within)
}

/// A running load-test binary, writing its JSON and its log (stderr) to files.
struct Loadtest {
    process: Process,
    json: PathBuf,
    log: PathBuf,
}

impl Loadtest {
    fn spawn(name: &str, args: &[String]) -> Loadtest {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let json = dir.join(format!("{name}-{}.json", std::process::id()));
        let log = dir.join(format!("{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&json);
        let process = Process::spawn(
            name,
            Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
                .args(args)
                .arg("--json")
                .arg(&json)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("creating the log file")),
        );
        Loadtest { process, json, log }
    }

    /// Waits until the log holds `text`, at most `within`.
    fn wait_for_log(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(text) {
                return;
            }
            self.process.assert_running();
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log after {within:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a successful exit, at most `within`, and returns the JSON written.
    fn finish(mut self, within: Duration) -> Value {
        self.process.wait_success(within, &self.log);
        let text = std::fs::read_to_string(&self.json).expect("the --json file");
        let result = serde_json::from_str(&text).expect("the --json file holds JSON");
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(&self.log);
        result
    }
}

fn field(result: &Value, name: &str) -> u64 {
    result
        .get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer {name} in {result:#}"))
}

#[test]
fn connect_opens_every_connection() {
    let cluster = Cluster::start();
    let args = [
        "connect".to_owned(),
        "--url".to_owned(),
        cluster.a.ws_url(),
        "--connections=50".to_owned(),
        "--rate=500".to_owned(),
        "--hold-secs=1".to_owned(),
        format!("--pid={}", cluster.a.process.pid()),
        "--timeout-secs=30".to_owned(),
    ];
    let result = run_loadtest("connect", &args, Duration::from_secs(60));
    assert_eq!(field(&result, "connections_requested"), 50, "{result:#}");
    assert_eq!(field(&result, "connections_open"), 50, "{result:#}");
    assert_eq!(field(&result, "failures"), 0, "{result:#}");
    assert!(
        field(&result, "server_rss_after_bytes") > 0,
        "no RSS read: {result:#}"
    );
}

#[test]
fn latency_across_nodes_loses_nothing() {
    let cluster = Cluster::start();
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
        format!("--cpu-pid=node-a={}", cluster.a.process.pid()),
        format!("--cpu-pid=node-b={}", cluster.b.process.pid()),
        format!("--cpu-pid=redis={}", cluster.redis.process.pid()),
    ];
    let result = run_loadtest("latency", &args, Duration::from_secs(90));
    assert_eq!(
        field(&result, "subscribers"),
        rooms * subscribers_per_room,
        "{result:#}"
    );
    for zero in [
        "lost",
        "lost_in_gaps",
        "undelivered_at_end",
        "duplicates",
        "epoch_mismatches",
        "publish_errors",
        "publish_unanswered",
        "subscribers_closed_early",
    ] {
        assert_eq!(field(&result, zero), 0, "{zero}: {result:#}");
    }
    let published = field(&result, "published");
    let published_total = field(&result, "published_total");
    let scheduled = rate * duration_secs;
    assert!(
        published >= scheduled * 8 / 10 && published <= scheduled * 12 / 10,
        "published {published} in the window, scheduled {scheduled}: {result:#}"
    );
    assert_eq!(
        field(&result, "delivered"),
        published * subscribers_per_room,
        "{result:#}"
    );
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

#[test]
fn fanout_over_both_nodes_loses_nothing() {
    let cluster = Cluster::start();
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
    let html = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fanout-{}.html", std::process::id()));
    let _ = std::fs::remove_file(&html);
    args.push("--html".to_owned());
    args.push(html.display().to_string());
    let result = run_loadtest("fanout", &args, Duration::from_secs(90));
    let report = std::fs::read_to_string(&html).expect("the --html file");
    let _ = std::fs::remove_file(&html);
    assert!(report.starts_with("<!DOCTYPE html>"), "{report}");
    assert!(report.contains("<svg"), "{report}");
    assert!(
        !report.contains("http://") && !report.contains("https://"),
        "external reference in the report: {report}"
    );
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
    for zero in [
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
    let published = field(&result, "published");
    let scheduled = rate * duration_secs;
    assert!(
        published >= scheduled * 8 / 10 && published <= scheduled * 12 / 10,
        "published {published} in the window, scheduled {scheduled}: {result:#}"
    );
    assert_eq!(
        field(&result, "delivered"),
        published * subscribers_per_room,
        "{result:#}"
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

#[test]
fn fanout_reports_loss_when_a_node_dies() {
    let mut cluster = Cluster::start();
    // One publisher: it connects to the first target (node a), so the run outlives node b,
    // whose subscribers lose the rest of the run.
    let args = fanout_args(&cluster, 4, 16, 1, 100, 3, 2);
    let mut loadtest = Loadtest::spawn("fanout-loss", &args);
    loadtest.wait_for_log("publishing ", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    // SIGKILL: node b's connections drop without a close frame.
    cluster.b.process.child.kill().expect("killing node b");
    let _ = cluster.b.process.child.wait();
    let result = loadtest.finish(Duration::from_secs(90));
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

#[test]
fn direct_between_nodes_loses_nothing() {
    let cluster = Cluster::start();
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
    ];
    let result = run_loadtest("direct", &args, Duration::from_secs(60));
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

#[test]
fn reconnect_resumes_every_subscriber_without_loss() {
    let cluster = Cluster::start();
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
    ];
    let result = run_loadtest("reconnect", &args, Duration::from_secs(90));
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
