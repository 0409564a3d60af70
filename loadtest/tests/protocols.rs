//! `fanout --protocol raw|socketio` run for real: the `switchboard-loadtest` binary against the
//! raw ceiling server (`switchboard-raw-ceiling`) and against two Socket.IO peers
//! (`loadtest/peers/socketio`) sharing a real redis-server, checking the harness's loss,
//! duplicate and order bookkeeping by sequence numbers from the JSON it writes, and that a server
//! dying mid-run is reported rather than hanging the run. Every process started here is killed by
//! pid when its guard is dropped, pass or fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use switchboard_e2e::{RedisProcess, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a server may take to start.
const STARTUP: Duration = Duration::from_secs(20);

/// A process, killed by pid when dropped.
struct Process {
    child: Child,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A peer server and the address it printed (`listening on IP:PORT`) once bound.
struct Server {
    process: Process,
    addr: SocketAddr,
}

impl Server {
    async fn start(mut command: Command) -> Server {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {command:?}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let process = Process { child };
        let mut line = String::new();
        tokio::time::timeout(STARTUP, BufReader::new(stdout).read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("{command:?} printed nothing in {STARTUP:?}"))
            .expect("reading the server's stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        Server { process, addr }
    }
}

async fn start_raw() -> Server {
    Server::start(Command::new(env!("CARGO_BIN_EXE_switchboard-raw-ceiling"))).await
}

/// A running `switchboard-loadtest`, writing its JSON and its log (stderr) to files.
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
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
            .args(args)
            .arg("--json")
            .arg(&json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("creating the log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawning switchboard-loadtest");
        Loadtest {
            process: Process { child },
            json,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `text`, at most `within`.
    async fn wait_for_log(&mut self, text: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.log().contains(text) {
            if let Some(status) = self.process.child.try_wait().expect("try_wait") {
                panic!("the harness exited with {status}:\n{}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {text:?} in the log after {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a successful exit, at most `within`, and returns the JSON written.
    async fn finish(mut self, within: Duration) -> Value {
        let status = tokio::time::timeout(within, self.process.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running after {within:?}:\n{}", self.log()))
            .expect("waiting for the harness");
        assert!(status.success(), "exited with {status}:\n{}", self.log());
        let text = std::fs::read_to_string(&self.json)
            .unwrap_or_else(|error| panic!("no --json file ({error}):\n{}", self.log()));
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(&self.log);
        serde_json::from_str(&text).expect("the --json file holds JSON")
    }
}

fn field(result: &Value, name: &str) -> u64 {
    result
        .get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer {name} in {result:#}"))
}

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
    for zero in [
        "lost",
        "lost_in_gaps",
        "undelivered_at_end",
        "duplicates",
        "epoch_mismatches",
        "publish_errors",
        "publishers_failed",
        "subscribers_closed_early",
        "unexpected_frames",
    ] {
        assert_eq!(field(result, zero), 0, "{zero}: {result:#}");
    }
    assert!(
        result["publish_unanswered"].is_null(),
        "the peers answer no publish: {result:#}"
    );
    let subscribers_per_room = run.subscribers / run.rooms;
    let published = field(result, "published");
    let scheduled = run.rate * run.duration_secs;
    assert!(
        published >= scheduled * 8 / 10 && published <= scheduled * 12 / 10,
        "published {published} in the window, scheduled {scheduled}: {result:#}"
    );
    assert_eq!(
        field(result, "delivered"),
        published * subscribers_per_room,
        "{result:#}"
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
    let server = start_raw().await;
    let run = Run {
        protocol: "raw",
        urls: vec![format!("ws://{}/", server.addr)],
        rooms: 4,
        subscribers: 16,
        publishers: 2,
        rate: 200,
        duration_secs: 2,
        cpu_pids: vec![("raw", server.process.pid())],
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

fn socketio_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/socketio")
}

/// Installs the Socket.IO peer's npm dependencies (from package-lock.json) unless they are there.
fn npm_ci(dir: &Path) {
    if dir.join("node_modules").is_dir() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("running npm (tests/run.sh installs node and npm)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

#[tokio::test]
async fn fanout_against_two_socketio_nodes_loses_nothing() {
    let dir = socketio_dir();
    npm_ci(&dir);
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut command = Command::new("node");
        command
            .arg(dir.join("server.js"))
            .env("PORT", "0")
            .env("REDIS_URL", redis.url());
        nodes.push(Server::start(command).await);
    }
    // Once both adapters subscribed to the request channel (after their broadcast pattern, on
    // the same connection), neither misses a publish.
    wait_until("both Socket.IO nodes subscribed in Redis", || async {
        redis
            .cli(&["PUBSUB", "NUMSUB", "socket.io-request#/#"])
            .await
            .is_ok_and(|reply| reply.lines().nth(1) == Some("2"))
    })
    .await
    .expect("the adapters never subscribed");
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
        cpu_pids: vec![
            ("sio1", nodes[0].process.pid()),
            ("sio2", nodes[1].process.pid()),
        ],
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
    let mut server = start_raw().await;
    let run = Run {
        protocol: "raw",
        urls: vec![format!("ws://{}/", server.addr)],
        rooms: 4,
        subscribers: 16,
        publishers: 2,
        rate: 100,
        duration_secs: 3,
        cpu_pids: Vec::new(),
    };
    let mut loadtest = Loadtest::spawn("protocols-dies", &run.args());
    loadtest
        .wait_for_log("publishing ", Duration::from_secs(30))
        .await;
    // Let some messages through first, so the run has both deliveries and a failure.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server
        .process
        .child
        .kill()
        .await
        .expect("killing the server");
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
