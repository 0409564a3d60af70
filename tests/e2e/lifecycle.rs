//! Lifecycle tests: the real `switchboard` binary draining on SIGTERM/SIGINT, refusing bad
//! configuration with exit status 64, taking its configuration from flags, environment and a
//! TOML file, logging, the connection limit and the welcome frame.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use switchboard_client::{Client, ConnectOptions, Event, ReconnectPolicy};
use switchboard_e2e::api::readyz_within;
use switchboard_e2e::client::{close_code, publish_frame, subscribe_frame};
use switchboard_e2e::{
    DEADLINE, Handshake, NodeProcess, RawClient, binary, raw_handshake, send_signal, wait_until,
};
use switchboard_protocol::{Codec, ServerFrame, close};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Every option the binary has, as (flag, environment variable).
const OPTIONS: &[(&str, &str)] = &[
    ("--config", "SWITCHBOARD_CONFIG"),
    ("--listen", "SWITCHBOARD_LISTEN"),
    ("--internal-listen", "SWITCHBOARD_INTERNAL_LISTEN"),
    ("--node-id", "SWITCHBOARD_NODE_ID"),
    ("--redis", "SWITCHBOARD_REDIS"),
    ("--redis-ca-file", "SWITCHBOARD_REDIS_CA_FILE"),
    ("--jwt-secret", "SWITCHBOARD_JWT_SECRET"),
    ("--jwt-public-key", "SWITCHBOARD_JWT_PUBLIC_KEY"),
    ("--jwt-algorithm", "SWITCHBOARD_JWT_ALGORITHM"),
    ("--jwt-issuer", "SWITCHBOARD_JWT_ISSUER"),
    ("--jwt-audience", "SWITCHBOARD_JWT_AUDIENCE"),
    ("--jwt-leeway-secs", "SWITCHBOARD_JWT_LEEWAY_SECS"),
    ("--api-key", "SWITCHBOARD_API_KEY"),
    ("--allowed-origins", "SWITCHBOARD_ALLOWED_ORIGINS"),
    ("--max-connections", "SWITCHBOARD_MAX_CONNECTIONS"),
    ("--handshake-timeout-ms", "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS"),
    (
        "--max-connections-per-ip",
        "SWITCHBOARD_MAX_CONNECTIONS_PER_IP",
    ),
    ("--connect-rate-per-ip", "SWITCHBOARD_CONNECT_RATE_PER_IP"),
    ("--connect-burst-per-ip", "SWITCHBOARD_CONNECT_BURST_PER_IP"),
    ("--accept-rate", "SWITCHBOARD_ACCEPT_RATE"),
    ("--accept-burst", "SWITCHBOARD_ACCEPT_BURST"),
    (
        "--internal-header-timeout-ms",
        "SWITCHBOARD_INTERNAL_HEADER_TIMEOUT_MS",
    ),
    (
        "--internal-max-connections",
        "SWITCHBOARD_INTERNAL_MAX_CONNECTIONS",
    ),
    ("--max-message-size", "SWITCHBOARD_MAX_MESSAGE_SIZE"),
    ("--max-queue-bytes", "SWITCHBOARD_MAX_QUEUE_BYTES"),
    ("--max-subscriptions", "SWITCHBOARD_MAX_SUBSCRIPTIONS"),
    ("--rate-limit", "SWITCHBOARD_RATE_LIMIT"),
    ("--rate-limit-burst", "SWITCHBOARD_RATE_LIMIT_BURST"),
    ("--rate-limit-strikes", "SWITCHBOARD_RATE_LIMIT_STRIKES"),
    ("--max-bad-frames", "SWITCHBOARD_MAX_BAD_FRAMES"),
    ("--heartbeat-ms", "SWITCHBOARD_HEARTBEAT_MS"),
    ("--idle-timeout-ms", "SWITCHBOARD_IDLE_TIMEOUT_MS"),
    ("--drain-grace-ms", "SWITCHBOARD_DRAIN_GRACE_MS"),
    ("--drain-delay-ms", "SWITCHBOARD_DRAIN_DELAY_MS"),
    ("--history-size", "SWITCHBOARD_HISTORY_SIZE"),
    ("--history-ttl-secs", "SWITCHBOARD_HISTORY_TTL_SECS"),
    ("--stream-ttl-secs", "SWITCHBOARD_STREAM_TTL_SECS"),
    ("--room-linger-ms", "SWITCHBOARD_ROOM_LINGER_MS"),
    ("--read-buffer-size", "SWITCHBOARD_READ_BUFFER_SIZE"),
    ("--write-buffer-size", "SWITCHBOARD_WRITE_BUFFER_SIZE"),
    ("--trusted-proxies", "SWITCHBOARD_TRUSTED_PROXIES"),
    ("--log-format", "SWITCHBOARD_LOG_FORMAT"),
    ("--log", "SWITCHBOARD_LOG"),
];

/// A file under the temp directory with a unique name, removed on drop (pass or fail).
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(contents: &str) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "switchboard-lifecycle-{}-{}-{nanos}.toml",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        ));
        std::fs::write(&path, contents)?;
        Ok(TempFile { path })
    }

    fn path_str(&self) -> Result<&str> {
        self.path.to_str().context("temp path is not UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The binary, with no `SWITCHBOARD_*` variable inherited from the test's environment.
fn clean_command() -> Command {
    let mut command = Command::new(binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHBOARD_") {
            command.env_remove(key);
        }
    }
    command
}

/// How a directly run binary ended.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary to completion (killing it and failing if it is still running after
/// [`DEADLINE`], e.g. because it accepted a configuration it should have refused).
async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Result<Finished> {
    let mut child = clean_command()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning switchboard")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            bail!("switchboard {args:?} still running after {DEADLINE:?}; stderr:\n{stderr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok(Finished {
        code: status.code(),
        stdout: out_reader.join().map_err(|_| anyhow!("stdout reader"))?,
        stderr: err_reader.join().map_err(|_| anyhow!("stderr reader"))?,
    })
}

/// Asserts a configuration error: exit status 64 and exactly one non-empty stderr line, naming
/// `option`.
fn assert_config_error(finished: &Finished, option: &str) {
    assert_eq!(
        finished.code,
        Some(64),
        "expected exit status 64 for a bad {option}; stderr:\n{}",
        finished.stderr
    );
    let lines: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one clear line on stderr, got:\n{}",
        finished.stderr
    );
    assert!(
        lines[0].contains(option),
        "the error line does not name {option}: {}",
        lines[0]
    );
}

/// How long one HTTP request may take: a draining node must still answer its probes promptly.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .expect("http client")
}

/// Polls `/readyz` until it answers 503, which must happen within `within` and while the
/// process is still serving (it has sessions to drain).
async fn wait_not_ready(node: &mut NodeProcess, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let status = readyz_within(node, HTTP_TIMEOUT)
            .await
            .context("/readyz stopped answering before it reported 503")?;
        if status == 503 {
            ensure!(
                node.is_running(),
                "the process exited while /readyz said 503"
            );
            return Ok(());
        }
        ensure!(
            status == 200,
            "/readyz answered {status}, expected 200 or 503"
        );
        if Instant::now() >= deadline {
            bail!("/readyz still 200 {within:?} after the signal");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn welcome_fields(frame: ServerFrame) -> Result<(String, String, String, String, u64)> {
    match frame {
        ServerFrame::Welcome {
            session,
            user,
            node,
            protocol,
            heartbeat_ms,
            ..
        } => Ok((session, user, node, protocol, heartbeat_ms)),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// An SDK client that never reconnects.
async fn sdk_client(node: &NodeProcess, user: &str) -> Result<Client> {
    let options = ConnectOptions {
        user: Some(user.into()),
        reconnect: ReconnectPolicy {
            max_attempts: Some(0),
            ..ReconnectPolicy::default()
        },
        ..ConnectOptions::default()
    };
    Ok(Client::connect(&node.ws_url(), options).await?)
}

/// Waits for the SDK client's `Disconnected` event and returns its close code.
async fn sdk_disconnect_code(client: &Client) -> Result<Option<u16>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .context("no Disconnected event in time")?
            .context("events ended before Disconnected")?;
        match event {
            Event::Disconnected { code, .. } => return Ok(code),
            Event::Closed => bail!("Closed before Disconnected"),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Draining on signals

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_every_client_with_1001_and_exits_0() -> Result<()> {
    const RAW: usize = 16;
    const SDK: usize = 4;
    let mut node = NodeProcess::start(&["--drain-grace-ms", "1000"]).await?;

    let mut raw = Vec::new();
    for _ in 0..RAW {
        let (client, _) = RawClient::connect(&node.ws_url(), Codec::Json).await?;
        raw.push(client);
    }
    let mut sdk = Vec::new();
    for index in 0..SDK {
        sdk.push(sdk_client(&node, &format!("sdk-{index}")).await?);
    }
    assert_eq!(
        readyz_within(&node, HTTP_TIMEOUT).await?,
        200,
        "ready before the signal"
    );

    // Every client reads until its close, concurrently, noting when it came.
    let started = Instant::now();
    let mut waiters = Vec::new();
    for mut client in raw {
        waiters.push(tokio::spawn(async move {
            let code = close_code(&mut client).await?;
            Ok::<_, anyhow::Error>((Some(code), started.elapsed()))
        }));
    }
    for client in sdk {
        waiters.push(tokio::spawn(async move {
            let code = sdk_disconnect_code(&client).await?;
            Ok::<_, anyhow::Error>((code, started.elapsed()))
        }));
    }

    node.terminate();
    wait_not_ready(&mut node, Duration::from_secs(1)).await?;

    // New handshakes are refused while the node drains.
    match raw_handshake(&node.ws_url(), Some(Codec::Json.protocol()), &[]).await {
        Ok(Handshake::Refused { status, .. }) => {
            assert_eq!(status, 503, "a handshake during the drain got {status}")
        }
        Ok(Handshake::Open(..)) => panic!("a new WebSocket was accepted during the drain"),
        Err(_) => {} // the listener is closed: connection refused
    }
    assert!(
        node.is_running(),
        "the node exited before the drain grace period (1 s) could spread the closes"
    );

    let mut times = Vec::new();
    for (index, waiter) in waiters.into_iter().enumerate() {
        let (code, at) = waiter
            .await?
            .with_context(|| format!("client {index} during the drain"))?;
        assert_eq!(
            code,
            Some(close::GOING_AWAY),
            "client {index} was closed with {code:?}, expected 1001"
        );
        times.push(at);
    }
    let first = times.iter().min().copied().unwrap_or_default();
    let last = times.iter().max().copied().unwrap_or_default();
    assert!(
        last - first >= Duration::from_millis(300),
        "the closes were not spread over the grace period: first {first:?}, last {last:?}"
    );

    let status = node.wait_exit(Duration::from_secs(8)).await?;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    Ok(())
}

/// The next frame must be the reply to request `id`.
async fn expect_reply(client: &mut RawClient, id: u64) -> Result<()> {
    match client.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == id => Ok(()),
        other => bail!("expected the reply to request {id}, got {other:?}"),
    }
}

/// With a drain delay, SIGTERM first only fails `/readyz`: for the delay the node still accepts
/// handshakes (a load balancer that has not seen the 503 yet still sends them) and serves its
/// clients; then it drains as without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_delay_keeps_serving_after_readyz_fails_then_drains() -> Result<()> {
    const DELAY: Duration = Duration::from_millis(1500);
    let mut node =
        NodeProcess::start(&["--drain-delay-ms", "1500", "--drain-grace-ms", "200"]).await?;
    let (mut reader, _) = RawClient::connect(&node.ws_url(), Codec::Json).await?;
    reader.send_frame(&subscribe_frame("news", 1, None)).await?;
    expect_reply(&mut reader, 1).await?;
    assert_eq!(
        readyz_within(&node, HTTP_TIMEOUT).await?,
        200,
        "ready before the signal"
    );

    let signalled = Instant::now();
    node.terminate();
    wait_not_ready(&mut node, Duration::from_secs(1)).await?;
    let body = http()
        .get(node.http_url("/readyz"))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(body, "draining\n", "/readyz during the delay");

    // After the 503: a new handshake still succeeds, and the new session publishes to an
    // existing one.
    let (mut late, _) = RawClient::connect(&node.ws_url(), Codec::Json)
        .await
        .context("a handshake after /readyz turned 503, during the drain delay")?;
    late.send_frame(&publish_frame("news", json!("still serving"), 2))
        .await?;
    expect_reply(&mut late, 2).await?;
    match reader.next_frame().await? {
        ServerFrame::Message(message) => assert_eq!(message.data, json!("still serving")),
        other => bail!("expected the message published during the delay, got {other:?}"),
    }
    assert_eq!(
        readyz_within(&node, HTTP_TIMEOUT).await?,
        503,
        "ready again during the delay"
    );

    // Then the drain, as without a delay: both closed with 1001, none before the delay ran out.
    for (name, mut client) in [("the first client", reader), ("the late client", late)] {
        let code = close_code(&mut client).await?;
        let after = signalled.elapsed();
        assert_eq!(code, close::GOING_AWAY, "{name} was not closed with 1001");
        assert!(
            after >= DELAY,
            "{name} was closed {after:?} after SIGTERM, within the {DELAY:?} drain delay"
        );
    }
    match raw_handshake(&node.ws_url(), Some(Codec::Json.protocol()), &[]).await {
        Ok(Handshake::Refused { status, .. }) => assert_eq!(status, 503),
        Ok(Handshake::Open(..)) => panic!("a new WebSocket was accepted during the drain"),
        Err(_) => {} // the listener is closed: connection refused
    }
    let status = node.wait_exit(DEADLINE).await?;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_0() -> Result<()> {
    let mut node = NodeProcess::start(&["--drain-grace-ms", "500"]).await?;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(RawClient::connect(&node.ws_url(), Codec::MsgPack).await?.0);
    }
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { close_code(&mut client).await }))
        .collect();

    send_signal(node.pid(), "INT")?;
    wait_not_ready(&mut node, Duration::from_secs(1)).await?;
    for waiter in waiters {
        assert_eq!(waiter.await??, close::GOING_AWAY);
    }
    let status = node.wait_exit(Duration::from_secs(8)).await?;
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status}");
    assert!(
        node.logs().iter().any(|line| line.contains("SIGINT")),
        "no log line says SIGINT was received"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_without_clients_exits_0_promptly() -> Result<()> {
    let mut node = NodeProcess::start(&["--drain-grace-ms", "10000"]).await?;
    node.terminate();
    // Nothing to drain: the grace period is not waited out.
    let status = node.wait_exit(Duration::from_secs(3)).await?;
    assert_eq!(
        status.code(),
        Some(0),
        "{status}: SIGTERM killed the node instead of draining it"
    );
    Ok(())
}

/// Once the node says it is listening, a SIGTERM must drain it (exit 0), never kill it: an
/// orchestrator may stop a pod the moment it has started.
#[tokio::test]
async fn sigterm_right_after_the_listening_line_drains() -> Result<()> {
    for attempt in 0..5 {
        let mut child = clean_command()
            .args(LOOPBACK)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let stderr = child.stderr.take().context("stderr")?;
        // Signal from the reader thread the instant the line is read.
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut signalled = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !signalled && line.contains("listening") {
                    signalled = send_signal(pid, "TERM").is_ok();
                }
                lines.push(line);
            }
            (signalled, lines)
        });
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("attempt {attempt}: still running {DEADLINE:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let (signalled, lines) = reader.join().map_err(|_| anyhow!("reader"))?;
        ensure!(signalled, "no listening line: {}", lines.join("\n"));
        assert_eq!(
            status.code(),
            Some(0),
            "attempt {attempt}: {status}: a SIGTERM right after the listening line killed the \
             node instead of draining it; logs:\n{}",
            lines.join("\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bad configuration: exit status 64, one clear line

/// Extra flags, environment, and the option the error must name.
type BadCase = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

const LOOPBACK: [&str; 4] = [
    "--listen",
    "127.0.0.1:0",
    "--internal-listen",
    "127.0.0.1:0",
];

#[tokio::test]
async fn idle_timeout_not_above_heartbeat_exits_64() -> Result<()> {
    let mut args = LOOPBACK.to_vec();
    args.extend(["--heartbeat-ms", "1000", "--idle-timeout-ms", "500"]);
    let finished = run_binary(&args, &[]).await?;
    assert_config_error(&finished, "idle-timeout-ms");
    Ok(())
}

#[tokio::test]
async fn unparsable_listen_address_exits_64_naming_the_flag() -> Result<()> {
    let finished = run_binary(
        &[
            "--listen",
            "notanaddress",
            "--internal-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await?;
    assert_eq!(finished.code, Some(64), "stderr:\n{}", finished.stderr);
    let first = finished
        .stderr
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    assert!(
        first.contains("--listen") && first.contains("notanaddress"),
        "the first stderr line should name --listen and the value: {}",
        finished.stderr
    );
    Ok(())
}

#[tokio::test]
async fn unknown_flag_exits_64() -> Result<()> {
    let finished = run_binary(&["--no-such-option"], &[]).await?;
    assert_eq!(finished.code, Some(64), "stderr:\n{}", finished.stderr);
    assert!(finished.stderr.contains("--no-such-option"));
    Ok(())
}

#[tokio::test]
async fn short_jwt_secret_from_the_environment_exits_64() -> Result<()> {
    let finished = run_binary(&LOOPBACK, &[("SWITCHBOARD_JWT_SECRET", "tooshort9")]).await?;
    assert_config_error(&finished, "jwt-secret");
    assert!(
        !finished.stderr.contains("tooshort9"),
        "the error leaks the secret: {}",
        finished.stderr
    );
    Ok(())
}

#[tokio::test]
async fn other_bad_options_exit_64_naming_them() -> Result<()> {
    let cases: &[BadCase] = &[
        (&["--max-connections", "0"], &[], "max-connections"),
        (&["--redis", "http://localhost:6379"], &[], "redis"),
        (&["--read-buffer-size", "10"], &[], "read-buffer-size"),
        (&["--log", "switchboard=notalevel"], &[], "log"),
        (
            &["--history-ttl-secs", "600", "--stream-ttl-secs", "60"],
            &[],
            "stream-ttl-secs",
        ),
        (
            &[],
            &[("SWITCHBOARD_JWT_LEEWAY_SECS", "61")],
            "jwt-leeway-secs",
        ),
        (
            &[],
            &[("SWITCHBOARD_ALLOWED_ORIGINS", ",")],
            "allowed-origins",
        ),
    ];
    for (args, env, option) in cases {
        let mut all = LOOPBACK.to_vec();
        all.extend_from_slice(args);
        let finished = run_binary(&all, env).await?;
        assert_config_error(&finished, option);
    }
    Ok(())
}

#[tokio::test]
async fn bad_config_file_exits_64_naming_the_key() -> Result<()> {
    let file = TempFile::new("node-id = \"n\"\nmax-conections = 5\n")?;
    let mut args = LOOPBACK.to_vec();
    args.extend(["--config", file.path_str()?]);
    let finished = run_binary(&args, &[]).await?;
    assert_config_error(&finished, "max-conections");

    let missing = std::env::temp_dir().join(format!(
        "switchboard-lifecycle-missing-{}.toml",
        std::process::id()
    ));
    let missing = missing.to_str().context("utf-8")?;
    let mut args = LOOPBACK.to_vec();
    args.extend(["--config", missing]);
    let finished = run_binary(&args, &[]).await?;
    assert_config_error(&finished, missing);
    Ok(())
}

#[tokio::test]
async fn help_exits_0_and_lists_every_option_with_its_env_name() -> Result<()> {
    let secret = "help-must-not-print-this-secret";
    let api_key = "help-must-not-print-this-api-key";
    let finished = run_binary(
        &["--help"],
        &[
            ("SWITCHBOARD_JWT_SECRET", secret),
            ("SWITCHBOARD_API_KEY", api_key),
        ],
    )
    .await?;
    assert_eq!(finished.code, Some(0), "stderr:\n{}", finished.stderr);
    let help = &finished.stdout;
    let mut missing = Vec::new();
    for (flag, env) in OPTIONS {
        if !help.contains(&format!("{flag} ")) && !help.contains(&format!("{flag}\n")) {
            missing.push(*flag);
        }
        if !help.contains(env) {
            missing.push(*env);
        }
    }
    assert!(missing.is_empty(), "--help lacks {missing:?}:\n{help}");
    assert!(
        !help.contains(secret) && !help.contains(api_key),
        "--help prints secret values from the environment:\n{help}"
    );
    Ok(())
}

#[tokio::test]
async fn version_exits_0() -> Result<()> {
    let finished = run_binary(&["--version"], &[]).await?;
    assert_eq!(finished.code, Some(0), "stderr:\n{}", finished.stderr);
    assert!(
        finished.stdout.starts_with("switchboard "),
        "{}",
        finished.stdout
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configuration from the environment and a file

#[tokio::test]
async fn environment_variables_configure_the_node() -> Result<()> {
    let node = NodeProcess::start_with_env(
        &[],
        &[
            ("SWITCHBOARD_NODE_ID", "n-test"),
            ("SWITCHBOARD_HEARTBEAT_MS", "7000"),
            ("SWITCHBOARD_API_KEY", "env-api-key"),
            // The harness passes --log-format json: the flag must win over this.
            ("SWITCHBOARD_LOG_FORMAT", "text"),
        ],
    )
    .await?;
    assert_eq!(node.node_id, "n-test", "the startup log names another node");

    let url = format!("{}?user=env-user", node.ws_url());
    let (_client, welcome) = RawClient::connect(&url, Codec::Json).await?;
    let (_, user, node_id, _, heartbeat_ms) = welcome_fields(welcome)?;
    assert_eq!(node_id, "n-test");
    assert_eq!(user, "env-user");
    assert_eq!(heartbeat_ms, 7000);

    let nodes_url = node.http_url("/api/nodes");
    let unauthorized = http().get(&nodes_url).send().await?.status().as_u16();
    assert_eq!(
        unauthorized, 401,
        "SWITCHBOARD_API_KEY did not protect /api"
    );
    let last = std::sync::Mutex::new(Value::Null);
    let last_ref = &last;
    wait_until("n-test in GET /api/nodes", || {
        let request = http().get(&nodes_url).bearer_auth("env-api-key").send();
        async move {
            let Ok(response) = request.await else {
                return false;
            };
            let Ok(body) = response.json::<Value>().await else {
                return false;
            };
            let found = body["nodes"]
                .as_array()
                .is_some_and(|nodes| nodes.iter().any(|n| n["id"] == "n-test"));
            *last_ref.lock().expect("lock") = body;
            found
        }
    })
    .await
    .with_context(|| format!("last answer: {}", last.lock().expect("lock")))?;
    Ok(())
}

#[tokio::test]
async fn a_toml_file_configures_the_node() -> Result<()> {
    let file = TempFile::new(
        "node-id = \"n-file\"\nheartbeat-ms = 4321\nidle-timeout-ms = 20000\nmax-bad-frames = 3\n",
    )?;
    let node = NodeProcess::start(&["--config", file.path_str()?]).await?;
    assert_eq!(node.node_id, "n-file");
    let (_client, welcome) = RawClient::connect(&node.ws_url(), Codec::Json).await?;
    let (_, _, node_id, _, heartbeat_ms) = welcome_fields(welcome)?;
    assert_eq!(node_id, "n-file");
    assert_eq!(heartbeat_ms, 4321, "welcome.heartbeat_ms ignores the file");
    Ok(())
}

#[tokio::test]
async fn flags_and_environment_win_over_the_file() -> Result<()> {
    let file = TempFile::new("node-id = \"n-file\"\nheartbeat-ms = 4321\n")?;
    // The file itself comes from SWITCHBOARD_CONFIG; the node id from the environment; the
    // heartbeat from a flag.
    let node = NodeProcess::start_with_env(
        &["--heartbeat-ms", "1500"],
        &[
            ("SWITCHBOARD_CONFIG", file.path_str()?),
            ("SWITCHBOARD_NODE_ID", "n-env"),
        ],
    )
    .await?;
    let (_client, welcome) = RawClient::connect(&node.ws_url(), Codec::Json).await?;
    let (_, _, node_id, _, heartbeat_ms) = welcome_fields(welcome)?;
    assert_eq!(node_id, "n-env", "the environment must win over the file");
    assert_eq!(heartbeat_ms, 1500, "a flag must win over the file");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Logging

#[tokio::test]
async fn json_logs_carry_the_session_span() -> Result<()> {
    // One bad frame is tolerated, the next closes the connection with an info-level line
    // logged inside the session's span.
    let node = NodeProcess::start(&["--max-bad-frames", "1"]).await?;
    let url = format!("{}?user=log-user", node.ws_url());
    let (mut client, welcome) = RawClient::connect(&url, Codec::Json).await?;
    let (session, ..) = welcome_fields(welcome)?;
    for _ in 0..3 {
        if client
            .send_message(Message::Text("this is not json".into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(close_code(&mut client).await?, close::POLICY);

    let about_session = |line: &Value| {
        let span_matches = |span: &Value| {
            span["session"].as_str() == Some(session.as_str())
                && span["user"].as_str() == Some("log-user")
        };
        span_matches(&line["span"])
            || line["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(span_matches))
    };
    let found = {
        let node = &node;
        let about_session = &about_session;
        wait_until("a log line in the session's span", || async move {
            node.logs().iter().any(|line| {
                serde_json::from_str::<Value>(line)
                    .is_ok_and(|value| value.is_object() && about_session(&value))
            })
        })
        .await
    };
    let logs = node.logs();
    found.with_context(|| format!("logs:\n{}", logs.join("\n")))?;
    for line in &logs {
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("--log-format json wrote a non-JSON line: {line}"))?;
        ensure!(value.is_object(), "not a JSON object: {line}");
    }
    Ok(())
}

/// The `client` field of the session span of the first log line about `user`'s session, after
/// closing it with bad frames (an info line inside the span).
async fn logged_client(node: &NodeProcess, user: &str, forwarded_for: &str) -> Result<String> {
    let url = format!("{}?user={user}", node.ws_url());
    let headers = [("X-Forwarded-For", forwarded_for)];
    let Handshake::Open(mut client, _) =
        raw_handshake(&url, Some(Codec::Json.protocol()), &headers).await?
    else {
        bail!("handshake refused");
    };
    client.next_frame().await?;
    for _ in 0..3 {
        if client
            .send_message(Message::Text("not json".into()))
            .await
            .is_err()
        {
            break;
        }
    }
    client.expect_close().await?;
    let span_client = || {
        node.logs().iter().find_map(|line| {
            let value: Value = serde_json::from_str(line).ok()?;
            let span = &value["span"];
            (span["user"].as_str() == Some(user))
                .then(|| span["client"].as_str().map(str::to_owned))
                .flatten()
        })
    };
    wait_until("a log line in the session's span", || async {
        span_client().is_some()
    })
    .await?;
    span_client().context("client field")
}

#[tokio::test]
async fn the_client_address_comes_from_x_forwarded_for_only_behind_a_trusted_proxy() -> Result<()> {
    let trusting =
        NodeProcess::start(&["--max-bad-frames", "1", "--trusted-proxies", "127.0.0.1"]).await?;
    assert_eq!(
        logged_client(&trusting, "behind-proxy", "203.0.113.7").await?,
        "203.0.113.7"
    );
    let untrusting = NodeProcess::start(&["--max-bad-frames", "1"]).await?;
    assert_eq!(
        logged_client(&untrusting, "spoofing", "203.0.113.7").await?,
        "127.0.0.1",
        "a peer that is not a trusted proxy cannot choose its address"
    );
    Ok(())
}

#[tokio::test]
async fn default_log_format_is_text() -> Result<()> {
    let mut child = clean_command()
        .args(LOOPBACK)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = tokio::task::spawn_blocking(move || -> Result<String> {
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = lines_rx
                .recv_timeout(left)
                .map_err(|_| anyhow!("no startup line; stderr so far:\n{}", seen.join("\n")))?;
            if line.contains("listening") {
                return Ok(line);
            }
            seen.push(line);
        }
    })
    .await?;
    let _ = child.kill();
    let _ = child.wait();
    let line = result?;
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "the default log format looks like JSON: {line}"
    );
    assert!(line.contains("INFO"), "a text line shows its level: {line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Connection limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_in_the_backlog() -> Result<()> {
    let node = NodeProcess::start(&["--max-connections", "3"]).await?;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(RawClient::connect(&node.ws_url(), Codec::Json).await?.0);
    }

    let url = node.ws_url();
    let mut fourth = tokio::spawn(async move { RawClient::connect(&url, Codec::Json).await });
    let early = tokio::time::timeout(Duration::from_secs(1), &mut fourth).await;
    if let Ok(result) = early {
        match result? {
            Ok(_) => panic!("a fourth connection was welcomed with --max-connections 3"),
            Err(error) => panic!("the fourth connection failed instead of waiting: {error}"),
        }
    }

    // One of the three leaves: the fourth gets its place.
    let mut leaving = open.pop().context("a client")?;
    leaving.socket.close(None).await?;
    let (_client, welcome) = tokio::time::timeout(DEADLINE, fourth)
        .await
        .context("the fourth connection was not admitted after one left")???;
    welcome_fields(welcome)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The welcome frame

#[tokio::test]
async fn welcome_is_the_first_frame_with_every_field() -> Result<()> {
    let node = NodeProcess::start(&["--node-id", "n-welcome", "--heartbeat-ms", "2500"]).await?;
    let url = format!("{}?user=alice", node.ws_url());

    // JSON: read the very first WebSocket message raw.
    let Handshake::Open(mut client, response) =
        raw_handshake(&url, Some("switchboard.v1.json"), &[]).await?
    else {
        bail!("JSON handshake refused");
    };
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|value| value.to_str().ok()),
        Some("switchboard.v1.json")
    );
    let first = client.next_message().await?;
    let Message::Text(text) = first else {
        bail!("the first JSON frame is not a text frame: {first:?}");
    };
    let welcome: Value = serde_json::from_str(&text)?;
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["node"], "n-welcome");
    assert_eq!(welcome["protocol"], "switchboard.v1.json");
    assert_eq!(welcome["heartbeat_ms"], 2500);
    let json_session = welcome["session"].as_str().unwrap_or_default().to_owned();
    assert!(!json_session.is_empty(), "no session id: {welcome}");

    // MessagePack, offered after an unknown protocol: the supported one is chosen.
    let Handshake::Open(mut client, response) =
        raw_handshake(&url, Some("chat.v9, switchboard.v1.msgpack"), &[]).await?
    else {
        bail!("msgpack handshake refused");
    };
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|value| value.to_str().ok()),
        Some("switchboard.v1.msgpack")
    );
    let first = client.next_message().await?;
    let Message::Binary(bytes) = first else {
        bail!("the first msgpack frame is not binary: {first:?}");
    };
    let frame: ServerFrame = Codec::MsgPack.decode(&bytes).map_err(|e| anyhow!(e))?;
    let (session, user, node_id, protocol, heartbeat_ms) = welcome_fields(frame)?;
    assert_eq!(user, "alice");
    assert_eq!(node_id, "n-welcome");
    assert_eq!(protocol, "switchboard.v1.msgpack");
    assert_eq!(heartbeat_ms, 2500);
    assert!(!session.is_empty());
    assert_ne!(session, json_session, "two sessions share an id");

    // No subprotocol header: JSON, an anonymous user.
    let Handshake::Open(mut client, response) = raw_handshake(&node.ws_url(), None, &[]).await?
    else {
        bail!("handshake without a subprotocol refused");
    };
    assert!(
        response.headers().get("sec-websocket-protocol").is_none(),
        "a subprotocol was chosen though none was offered"
    );
    let first = client.next_message().await?;
    let Message::Text(text) = first else {
        bail!("the first frame without a subprotocol is not text: {first:?}");
    };
    let welcome: Value = serde_json::from_str(&text)?;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["protocol"], "switchboard.v1.json");
    assert!(
        welcome["user"]
            .as_str()
            .is_some_and(|user| user.starts_with("anon-")),
        "anonymous user id: {welcome}"
    );
    Ok(())
}
