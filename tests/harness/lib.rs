//! Harness for end-to-end tests: starts the real `switchboard` binary on ports the OS picks,
//! talks to it over real sockets, and kills it (by pid) when the test ends, pass or fail.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard_protocol::{ClientFrame, Codec, Encoded, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod api;
pub mod auth;
pub mod certs;
pub mod client;
pub mod haproxy;
pub mod http;
pub mod memory;
pub mod peer;
pub mod redis_faults;
pub mod transport;

/// How long any single expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The `switchboard` binary, built once per test process if it is not there yet.
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("SWITCHBOARD_BIN") {
                return PathBuf::from(path);
            }
            let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            // `cargo test` describes this crate in these; ring's build script reruns when they
            // change, which would rebuild the node here and again at the next plain `cargo build`.
            for (key, _) in std::env::vars() {
                if key.starts_with("CARGO_PKG_")
                    || key.starts_with("CARGO_MANIFEST_")
                    || matches!(key.as_str(), "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE")
                {
                    cargo.env_remove(key);
                }
            }
            let status = cargo
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
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"));
            target.join("debug").join("switchboard")
        })
        .clone()
}

/// A running `switchboard` process.
pub struct NodeProcess {
    child: Child,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub node_id: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl NodeProcess {
    /// Starts a node with the embedded broker and `args`, on free loopback ports.
    pub async fn start(args: &[&str]) -> Result<NodeProcess> {
        Self::start_with_env(args, &[]).await
    }

    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<NodeProcess> {
        Self::start_on("127.0.0.1:0", "127.0.0.1:0", args, env).await
    }

    /// Starts a node on the given public and internal addresses (port 0: a free one), e.g. to
    /// restart it where a load balancer expects it.
    pub async fn start_on(
        public: &str,
        internal: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<NodeProcess> {
        let mut command = Command::new(binary());
        for (key, _) in std::env::vars() {
            if key.starts_with("SWITCHBOARD_") {
                command.env_remove(key);
            }
        }
        // `--log` may be given once: a test that sets its own level replaces the default.
        let log: &[&str] = if args.contains(&"--log") {
            &[]
        } else {
            &["--log", "info"]
        };
        command
            .args([
                "--listen",
                public,
                "--internal-listen",
                internal,
                "--log-format",
                "json",
            ])
            .args(log)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("spawning switchboard")?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(value) = serde_json::from_str::<Value>(&line)
                        && let Some(fields) = value.get("fields")
                        && let (Some(public), Some(internal), Some(node)) = (
                            fields.get("public").and_then(Value::as_str),
                            fields.get("internal").and_then(Value::as_str),
                            fields.get("node").and_then(Value::as_str),
                        )
                    {
                        let _ = started_tx.send((
                            public.to_owned(),
                            internal.to_owned(),
                            node.to_owned(),
                        ));
                    }
                    logs.lock().expect("logs lock").push(line);
                }
            });
        }
        let mut node = NodeProcess {
            child,
            public: SocketAddr::from(([127, 0, 0, 1], 0)),
            internal: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_id: String::new(),
            logs,
        };
        let started = tokio::task::spawn_blocking(move || started_rx.recv_timeout(DEADLINE))
            .await?
            .map_err(|_| anyhow!("switchboard did not start: {}", node.logs().join("\n")));
        let (public, internal, node_id) = match started {
            Ok(started) => started,
            Err(error) => {
                if let Some(status) = node.child.try_wait()? {
                    bail!("switchboard exited with {status}: {error}");
                }
                return Err(error);
            }
        };
        node.public = public.parse()?;
        node.internal = internal.parse()?;
        node.node_id = node_id;
        Ok(node)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs lock").clone()
    }

    /// Sends SIGTERM (a drain).
    pub fn terminate(&self) {
        send_signal(self.pid(), "TERM").expect("SIGTERM sent");
    }

    /// Kills the process (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("switchboard {} still running after {within:?}", self.pid());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The value of one metric sample, e.g. `switchboard_closes_total{code="1013"}`; 0 if absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        let text = reqwest::get(self.http_url("/metrics"))
            .await?
            .text()
            .await?;
        Ok(parse_metric(&text, sample))
    }

    /// Waits until `/readyz` answers 200 (with Redis: every shard connected).
    pub async fn wait_ready(&self) -> Result<()> {
        let url = self.http_url("/readyz");
        wait_until("the node to be ready", || {
            let url = url.clone();
            async move {
                reqwest::get(url)
                    .await
                    .is_ok_and(|response| response.status().is_success())
            }
        })
        .await
    }

    /// Waits until the metric reaches at least `value`.
    pub async fn wait_metric(&self, sample: &str, value: f64) -> Result<f64> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let current = self.metric(sample).await?;
            if current >= value {
                return Ok(current);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{sample} is {current}, expected at least {value}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends the signal `name` (`TERM`, `INT`, `STOP`, `9`, ...) to `pid` with `kill`.
pub fn send_signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{name} {pid}");
    Ok(())
}

/// Finds `sample` (name with labels, exactly as exposed) in Prometheus text.
pub fn parse_metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Waits for `condition` to hold, polling, failing after [`DEADLINE`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A loopback port that was free a moment ago; whoever binds it next may lose a race for it, so
/// callers that spawn a server on it retry with another on failure.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A file of this workspace, by its path from the workspace root.
pub fn workspace_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|workspace| workspace.join(path))
        .unwrap_or_default()
}

/// Appends each line `stream` yields to `logs`, from a thread of its own, until the stream ends.
pub fn collect_lines(stream: impl Read + Send + 'static, logs: &Arc<Mutex<Vec<String>>>) {
    let logs = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            logs.lock().expect("logs lock").push(line);
        }
    });
}

/// A raw WebSocket client for tests that need to send what the SDK never would.
pub struct RawClient {
    pub socket: Socket,
    pub codec: Codec,
}

/// How a raw handshake went: the socket, or the HTTP refusal.
pub enum Handshake {
    Open(Box<RawClient>, tungstenite::http::Response<Option<Vec<u8>>>),
    Refused { status: u16, body: String },
}

/// Opens a WebSocket with the given subprotocol header (`None`: no header) and extra headers.
pub async fn raw_handshake(
    url: &str,
    protocol: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Handshake> {
    let mut request = url.into_client_request()?;
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocol)?);
    }
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    let codec = protocol
        .and_then(|protocol| protocol.split(',').find_map(Codec::from_protocol))
        .unwrap_or(Codec::Json);
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request)).await? {
        Ok((socket, response)) => Ok(Handshake::Open(
            Box::new(RawClient { socket, codec }),
            response,
        )),
        Err(tungstenite::Error::Http(response)) => Ok(Handshake::Refused {
            status: response.status().as_u16(),
            body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned(),
        }),
        Err(error) => Err(error.into()),
    }
}

impl RawClient {
    /// Connects with the codec's subprotocol and reads the `welcome`.
    pub async fn connect(url: &str, codec: Codec) -> Result<(RawClient, ServerFrame)> {
        match raw_handshake(url, Some(codec.protocol()), &[]).await? {
            Handshake::Open(client, _) => {
                let mut client = *client;
                let welcome = client.next_frame().await?;
                if !matches!(welcome, ServerFrame::Welcome { .. }) {
                    bail!("first frame is not welcome: {welcome:?}");
                }
                Ok((client, welcome))
            }
            Handshake::Refused { status, body } => bail!("refused: {status} {body}"),
        }
    }

    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        self.socket.send(message).await?;
        Ok(())
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<()> {
        let message = match self.codec.encode(frame).map_err(|error| anyhow!(error))? {
            Encoded::Text(text) => Message::Text(text.into()),
            Encoded::Binary(bytes) => Message::Binary(bytes.into()),
        };
        self.send_message(message).await
    }

    /// The next text, binary or close message, control frames skipped; fails when the connection
    /// fails or ends, or when each message takes longer than [`DEADLINE`].
    pub async fn next_message(&mut self) -> Result<Message> {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.socket.next())
                .await
                .context("no frame in time")?
                .context("connection ended")??;
            match message {
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                other => return Ok(other),
            }
        }
    }

    /// The next data frame, decoded; fails on close, error or after [`DEADLINE`].
    pub async fn next_frame(&mut self) -> Result<ServerFrame> {
        match self.next_message().await? {
            Message::Text(text) => Codec::Json.decode(text.as_bytes()).map_err(|e| anyhow!(e)),
            Message::Binary(bytes) if self.codec == Codec::JsonDeflate => {
                Codec::JsonDeflate.decode(&bytes).map_err(|e| anyhow!(e))
            }
            Message::Binary(bytes) => Codec::MsgPack.decode(&bytes).map_err(|e| anyhow!(e)),
            Message::Close(frame) => bail!("closed: {frame:?}"),
            other => bail!("unexpected message {other:?}"),
        }
    }

    /// Reads until the server closes; returns the close frame, skipping data frames.
    pub async fn expect_close(&mut self) -> Result<Option<CloseFrame>> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .context("no close in time")?;
            match next {
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => {}
                Some(Err(error)) => bail!("connection failed before a close frame: {error}"),
                None => bail!("connection ended without a close frame"),
            }
        }
    }
}

/// A `redis-server` on a free loopback port, without persistence; killed (by pid) on drop.
pub struct RedisProcess {
    child: Option<Child>,
    pub port: u16,
}

impl RedisProcess {
    pub async fn start() -> Result<RedisProcess> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut redis = RedisProcess { child: None, port };
            match redis.spawn().await {
                Ok(()) => return Ok(redis),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("redis-server did not start")))
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]);
        spawn_redis(&mut command, self.port, &mut self.child).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server and returns its trimmed output.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.port, args).await
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        kill_redis(&mut self.child);
    }

    /// Starts the server again on the same port, empty.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }
}

/// Spawns `command` (a redis-server told to listen on `port`) with its output discarded into
/// `slot`, then waits until it answers PING; fails when it exits first or stays silent past
/// [`DEADLINE`].
pub async fn spawn_redis(command: &mut Command, port: u16, slot: &mut Option<Child>) -> Result<()> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning redis-server (install the redis-server package)")?;
    let child = slot.insert(child);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if redis_cli(port, &["PING"])
            .await
            .is_ok_and(|reply| reply == "PONG")
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("redis-server exited with {status}");
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("redis-server on port {port} did not answer");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the redis-server in `slot`, if any, with SIGKILL and reaps it.
pub fn kill_redis(slot: &mut Option<Child>) {
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs `redis-cli` against the server on `port` and returns its trimmed output.
pub async fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .context("running redis-cli")?;
    if !output.status.success() {
        bail!(
            "redis-cli failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
