//! What the load-test integration tests share: the `switchboard-loadtest` binary run with
//! `--json`, peer servers that print `listening on IP:PORT`, and the Socket.IO peer's setup.
//! Every process started here is killed by pid when its guard is dropped, pass or fail.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_e2e::{NodeProcess, RedisProcess, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a peer server may take to start.
pub const STARTUP: Duration = Duration::from_secs(20);

/// A child process, killed (by pid) and reaped on drop.
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {name}: {error}"));
        Process {
            child,
            name: name.to_owned(),
        }
    }

    /// Waits for the process to exit, at most `within`, and returns whether it succeeded;
    /// panics (and so kills it) past that, showing the file `diagnostics`.
    pub async fn wait_exit(&mut self, within: Duration, diagnostics: &Path) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {within:?}:\n{}",
                self.name,
                std::fs::read_to_string(diagnostics).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
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

/// A running `switchboard-loadtest`, writing its JSON and its log (stderr) to files.
pub struct Loadtest {
    pub process: Process,
    pub json: PathBuf,
    pub log: PathBuf,
}

impl Loadtest {
    pub fn spawn(name: &str, args: &[String]) -> Loadtest {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `text`, at most `within`, and returns the log.
    pub async fn wait_for_log(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            if let Some(status) = self.process.child.try_wait().expect("try_wait") {
                panic!("{} exited with {status}:\n{log}", self.process.name);
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log after {within:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a successful exit, at most `within`, and returns the JSON written.
    pub async fn finish(mut self, within: Duration) -> Value {
        let log = self.log.clone();
        assert!(
            self.process.wait_exit(within, &log).await,
            "{} failed:\n{}",
            self.process.name,
            self.log()
        );
        let text = std::fs::read_to_string(&self.json)
            .unwrap_or_else(|error| panic!("no --json file ({error}):\n{}", self.log()));
        let result = serde_json::from_str(&text).expect("the --json file holds JSON");
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(&self.log);
        result
    }
}

/// Runs the load-test binary with `args` plus `--json FILE`, bounded by `within`, and returns
/// the JSON it wrote.
pub async fn run_loadtest(name: &str, args: &[String], within: Duration) -> Value {
    Loadtest::spawn(name, args).finish(within).await
}

/// The integer `name` of a result.
pub fn field(result: &Value, name: &str) -> u64 {
    result
        .get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer {name} in {result:#}"))
}

/// A peer server and the address it printed (`listening on IP:PORT`) once bound; killed by pid
/// when dropped.
pub struct Server {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl Server {
    pub async fn start(mut command: tokio::process::Command) -> Server {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {command:?}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        // On a panic below, kill_on_drop stops the server.
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
        Server { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server is running")
    }

    /// Panics if the server has exited.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("try_wait");
        assert!(status.is_none(), "the server exited: {status:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The raw ceiling server (`switchboard-raw-ceiling`) with extra `args`.
pub async fn start_raw(args: &[&str]) -> Server {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard-raw-ceiling"));
    command.args(args);
    Server::start(command).await
}

/// The Socket.IO 4 peer's directory, its npm dependencies installed (from package-lock.json)
/// unless they are there.
pub fn socketio_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/socketio");
    for tool in ["node", "npm"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            found,
            "`{tool}` is not installed: the Socket.IO peer needs node and npm (tests/run.sh installs them)"
        );
    }
    if !dir.join("node_modules").is_dir() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("running npm ci");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    dir
}

/// A Socket.IO peer node (`loadtest/peers/socketio/server.js`) on `redis`.
pub async fn start_socketio(redis: &RedisProcess) -> Server {
    let mut command = tokio::process::Command::new("node");
    command
        .arg(socketio_dir().join("server.js"))
        .env("PORT", "0")
        .env("REDIS_URL", redis.url());
    Server::start(command).await
}

/// Waits until `nodes` Socket.IO adapters subscribed in `redis`. Each adapter subscribes to its
/// broadcast pattern, then (on the same Redis connection, so after it) to the request channel:
/// once every node has the latter, none misses a publish.
pub async fn wait_for_socketio_adapters(redis: &RedisProcess, nodes: usize) {
    let nodes = nodes.to_string();
    wait_until("every Socket.IO node subscribed in Redis", || async {
        redis
            .cli(&["PUBSUB", "NUMSUB", "socket.io-request#/#"])
            .await
            .is_ok_and(|reply| reply.lines().nth(1) == Some(nodes.as_str()))
    })
    .await
    .expect("the adapters never subscribed");
}

/// The headline an `--html` report opens with: its sentence, and each figure's result key and
/// value (from `data-key` and `data-value`, parsed as JSON), in order.
pub fn headline(page: &str) -> (String, Vec<(String, Value)>) {
    let document = tl::parse(page, tl::ParserOptions::default()).expect("HTML");
    let parser = document.parser();
    let attribute = |tag: &tl::HTMLTag<'_>, name: &str| {
        tag.attributes()
            .get(name)
            .flatten()
            .map(|value| value.as_utf8_str().into_owned())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let sentence = document
        .query_selector("section.headline")
        .expect("a selector")
        .next()
        .and_then(|handle| handle.get(parser)?.as_tag())
        .and_then(|section| section.query_selector(parser, "p")?.next()?.get(parser))
        .map(|p| p.inner_text(parser).into_owned())
        .expect("a headline sentence");
    let figures = document
        .query_selector(".figure")
        .expect("a selector")
        .filter_map(|handle| handle.get(parser)?.as_tag())
        .map(|figure| {
            let value = attribute(figure, "data-value");
            (
                attribute(figure, "data-key"),
                serde_json::from_str(&value).expect("JSON"),
            )
        })
        .collect();
    (sentence, figures)
}

/// Asserts that a report's headline figures are the result's own: each key's value as the JSON
/// has it, and every key of `keys` among them.
pub fn assert_headline_figures(figures: &[(String, Value)], result: &Value, keys: &[&str]) {
    for (key, value) in figures {
        assert_eq!(
            value,
            &result[key.as_str()],
            "{key} in the headline: {result:#}"
        );
    }
    for key in keys {
        assert!(
            figures.iter().any(|(shown, _)| shown == key),
            "no {key} in the headline: {figures:?}"
        );
    }
}

/// An integer with thousands separators, as the headlines print them.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Asserts what every lossless delivery run shows: each field in `zeros` is 0, the publishers
/// held `rate` over the window (within 20 %), and every message published in the window reached
/// each of its room's `subscribers_per_room`.
pub fn assert_delivered_everything(
    result: &Value,
    zeros: &[&str],
    rate: u64,
    duration_secs: u64,
    subscribers_per_room: u64,
) {
    for zero in zeros {
        assert_eq!(field(result, zero), 0, "{zero}: {result:#}");
    }
    let published = field(result, "published");
    let scheduled = rate * duration_secs;
    assert!(
        published >= scheduled * 8 / 10 && published <= scheduled * 12 / 10,
        "published {published} in the window, scheduled {scheduled}: {result:#}"
    );
    assert_eq!(
        field(result, "delivered"),
        published * subscribers_per_room,
        "{result:#}"
    );
}

/// A ready node named `name` on `redis` (or with the embedded broker), plus `extra` flags, its
/// admission limits off: they would refuse or pace the generator's many loopback connections.
pub async fn node(name: &str, redis: Option<&RedisProcess>, extra: &[&str]) -> NodeProcess {
    let mut args = vec![
        "--node-id",
        name,
        "--rate-limit",
        "0",
        "--max-connections-per-ip",
        "0",
        "--connect-rate-per-ip",
        "0",
        "--accept-rate",
        "0",
    ];
    let url = redis.map(RedisProcess::url);
    if let Some(url) = &url {
        args.extend(["--redis", url.as_str()]);
    }
    args.extend(extra);
    let node = NodeProcess::start(&args)
        .await
        .unwrap_or_else(|error| panic!("starting {name}: {error:#}"));
    node.wait_ready()
        .await
        .unwrap_or_else(|error| panic!("{name} not ready: {error:#}"));
    node
}
