//! wss://, end to end: the real binary with `--tls-cert` / `--tls-key` and a throwaway CA made
//! with the `openssl` CLI at test time (tests/harness/certs.rs); clients trust only that CA, so
//! every connection here verifies the certificate. Also HAProxy's TLS frontend
//! (deploy/haproxy/haproxy.cfg with `SB_TLS_PEM`) in front of a plain node.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::certs::TestCerts;
use switchboard_e2e::client::{expect_message, publish, subscribe, until_tcp_closed};
use switchboard_e2e::haproxy::{self, Backend, HaproxyProcess};
use switchboard_e2e::{
    DEADLINE, Handshake, NodeProcess, RawClient, binary, free_port, raw_handshake,
};
use switchboard_protocol::Codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Starts a node serving TLS with the test certificate.
async fn tls_node(certs: &TestCerts, args: &[&str]) -> Result<NodeProcess> {
    let (cert, key) = (certs.path("server.pem")?, certs.path("server.key")?);
    let mut all = vec!["--tls-cert", &cert, "--tls-key", &key];
    all.extend_from_slice(args);
    NodeProcess::start(&all).await
}

fn wss_url(node: &NodeProcess) -> String {
    format!("wss://{}/ws", node.public)
}

/// Publishes `data` from `from` and checks that `to` (subscribed) receives it at the offset the
/// publisher was told.
async fn round_trip(
    from: &mut RawClient,
    to: &mut RawClient,
    room: &str,
    data: Value,
) -> Result<()> {
    let offset = publish(from, room, data.clone(), 7).await?;
    let received = expect_message(to, room, &data).await?;
    ensure!(
        received == offset,
        "received offset {received}, published {offset}"
    );
    Ok(())
}

/// Two wss clients (one per codec) subscribe and publish to each other: the node still serves.
async fn assert_serves_wss(certs: &TestCerts, url: &str, room: &str) -> Result<()> {
    let (mut json_client, _) = certs.connect_wss(url, Codec::Json).await?;
    let (mut msgpack_client, _) = certs.connect_wss(url, Codec::MsgPack).await?;
    subscribe(&mut json_client, room, 1).await?;
    subscribe(&mut msgpack_client, room, 1).await?;
    round_trip(
        &mut json_client,
        &mut msgpack_client,
        room,
        json!({"over": "tls"}),
    )
    .await?;
    // The publisher gets its own message too; then the other way round.
    json_client.next_frame().await?;
    round_trip(
        &mut msgpack_client,
        &mut json_client,
        room,
        json!([1, 2, 3]),
    )
    .await
}

/// The node serves wss:// with the configured certificate: JSON and MessagePack clients verify
/// it against the test CA, subscribe and publish to each other; the demo page is served over
/// https with ALPN http/1.1; the start-up log names wss:// and the certificate's expiry, which is
/// also a metric.
#[tokio::test]
async fn wss_clients_round_trip_straight_to_the_node() -> Result<()> {
    let certs = TestCerts::new()?;
    let node = tls_node(&certs, &[]).await?;
    assert_serves_wss(&certs, &wss_url(&node), "sealed").await?;
    // The name in the certificate is checked too: `localhost` is in it, as is 127.0.0.1.
    let url = format!("wss://localhost:{}/ws", node.public.port());
    certs.connect_wss(&url, Codec::Json).await?;
    node.wait_metric("switchboard_handshakes_total{result=\"ok\"}", 3.0)
        .await?;

    let mut https = certs.connect_tls(node.public, "127.0.0.1").await?;
    ensure!(
        https.get_ref().1.alpn_protocol() == Some(b"http/1.1".as_slice()),
        "ALPN: {:?}",
        https.get_ref().1.alpn_protocol()
    );
    https
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, https.read_to_end(&mut response))
        .await
        .context("no https response in time")??;
    let response = String::from_utf8_lossy(&response);
    ensure!(
        response.starts_with("HTTP/1.1 200") && response.contains("<html"),
        "the demo page over https: {response:.200}"
    );

    // The test certificate is valid for a day from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let expiry = node
        .metric("switchboard_tls_certificate_expiry_timestamp_seconds")
        .await?;
    ensure!(
        expiry > now + 3600.0 && expiry < now + 2.0 * 86_400.0,
        "certificate expiry exported as {expiry}, now is {now}"
    );

    let logs = node.logs().join("\n");
    ensure!(
        logs.contains("TLS on the public port")
            && logs.contains("CN=127.0.0.1")
            && logs.contains("days_left"),
        "the start-up log names the certificate and its expiry: {logs}"
    );
    ensure!(
        logs.contains(&format!("WebSocket wss://{}/ws", node.public)),
        "the start-up log gives the wss:// URL: {logs}"
    );
    Ok(())
}

/// A plain ws:// client, a client that does not trust the certificate's CA and garbage bytes on
/// the TLS port all fail at the TLS layer, are counted as `tls_error`, and the node keeps serving.
#[tokio::test]
async fn clients_that_do_not_speak_tls_fail_cleanly_and_the_node_keeps_serving() -> Result<()> {
    let certs = TestCerts::new()?;
    let node = tls_node(&certs, &[]).await?;

    let plain = format!("ws://{}/ws", node.public);
    match raw_handshake(&plain, Some(Codec::Json.protocol()), &[]).await {
        Ok(Handshake::Open(..)) => bail!("a plain ws:// client was upgraded on the TLS port"),
        Ok(Handshake::Refused { status, body }) => {
            bail!("a plain ws:// client got an HTTP answer on the TLS port: {status} {body}")
        }
        Err(_) => {}
    }
    // A client with only the public roots (not the test CA) refuses the certificate.
    let untrusting =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(wss_url(&node)))
            .await
            .context("no answer in time")?;
    let error = match untrusting {
        Ok(_) => bail!("a client without the test CA accepted the certificate"),
        Err(error) => error.to_string(),
    };
    ensure!(
        error.contains("UnknownIssuer"),
        "refused for the wrong reason: {error}"
    );
    let mut garbage = TcpStream::connect(node.public).await?;
    garbage.write_all(&[0xff; 64]).await?;
    until_tcp_closed(&mut garbage).await?;
    node.wait_metric("switchboard_handshakes_total{result=\"tls_error\"}", 3.0)
        .await?;
    assert_serves_wss(&certs, &wss_url(&node), "after-garbage").await
}

/// The TLS handshake counts within --handshake-timeout-ms and holds a connection permit: a TCP
/// client that never sends a ClientHello, and one that stops in the middle of it, are dropped at
/// the timeout; with --max-connections 1 a wss client waits for the silent one's permit.
#[tokio::test]
async fn a_client_that_never_finishes_the_tls_handshake_is_dropped_at_the_timeout() -> Result<()> {
    let certs = TestCerts::new()?;
    let node = tls_node(&certs, &["--handshake-timeout-ms", "800"]).await?;

    let started = Instant::now();
    let mut silent = TcpStream::connect(node.public).await?;
    let mut half_hello = TcpStream::connect(node.public).await?;
    // A TLS handshake record header announcing 512 bytes, then nothing.
    half_hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await?;
    until_tcp_closed(&mut silent).await?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(600),
        "a silent client was dropped after {elapsed:?}, before the 800 ms timeout"
    );
    until_tcp_closed(&mut half_hello).await?;
    node.wait_metric("switchboard_handshakes_total{result=\"timeout\"}", 2.0)
        .await?;
    assert_serves_wss(&certs, &wss_url(&node), "after-silence").await?;
    drop(node);

    let node = tls_node(
        &certs,
        &["--handshake-timeout-ms", "2000", "--max-connections", "1"],
    )
    .await?;
    // Connected first, so first in the kernel's accept queue: it gets the only permit.
    let mut silent = TcpStream::connect(node.public).await?;
    let started = Instant::now();
    certs.connect_wss(&wss_url(&node), Codec::Json).await?;
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_millis(1000),
        "the wss client was served after {waited:?} while the silent one held the only permit"
    );
    until_tcp_closed(&mut silent).await?;
    Ok(())
}

/// Runs the binary with `args` and expects exit 64 with `expected` on stderr.
fn expect_config_error(args: &[&str], expected: &str) -> Result<()> {
    let mut child = Command::new(binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("switchboard {args:?} still running: a bad TLS configuration must exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut stderr)?;
    ensure!(
        status.code() == Some(64),
        "{args:?}: exit {status}, expected 64: {stderr}"
    );
    ensure!(
        stderr.contains(expected),
        "{args:?}: stderr does not say {expected:?}: {stderr}"
    );
    Ok(())
}

/// Only one of the two options, a missing file, garbage, a key that is not the certificate's:
/// each exits 64 at start with a message naming the option.
#[tokio::test]
async fn a_bad_tls_configuration_exits_64_naming_the_option() -> Result<()> {
    let certs = TestCerts::new()?;
    let (cert, key) = (certs.path("server.pem")?, certs.path("server.key")?);
    let (ca, ca_key) = (certs.path("ca.pem")?, certs.path("ca.key")?);
    let garbage = certs.dir().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )?;
    let garbage = garbage.to_str().context("UTF-8 path")?;
    let missing = "/nonexistent/switchboard/server.pem";
    expect_config_error(&["--tls-cert", &cert], "invalid option tls-key")?;
    expect_config_error(&["--tls-key", &key], "invalid option tls-cert")?;
    expect_config_error(
        &["--tls-cert", missing, "--tls-key", &key],
        "invalid option tls-cert: /nonexistent/switchboard/server.pem",
    )?;
    expect_config_error(
        &["--tls-cert", &cert, "--tls-key", missing],
        "invalid option tls-key",
    )?;
    expect_config_error(
        &["--tls-cert", garbage, "--tls-key", &key],
        "invalid option tls-cert",
    )?;
    expect_config_error(
        &["--tls-cert", &cert, "--tls-key", garbage],
        "invalid option tls-key",
    )?;
    expect_config_error(
        &["--tls-cert", &key, "--tls-key", &key],
        "invalid option tls-cert",
    )?;
    expect_config_error(
        &["--tls-cert", &ca, "--tls-key", &key],
        "invalid option tls-key",
    )?;
    // The same through the environment.
    let status = Command::new(binary())
        .env("SWITCHBOARD_TLS_CERT", &cert)
        .env("SWITCHBOARD_TLS_KEY", &ca_key)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.code() == Some(64), "env: exit {status}");
    Ok(())
}

/// `--help` lists both options with their environment variables and defaults.
#[test]
fn help_lists_the_tls_options() -> Result<()> {
    let help = Command::new(binary()).arg("--help").output()?;
    ensure!(help.status.success(), "--help exited with {}", help.status);
    let help = String::from_utf8(help.stdout)?;
    for (flag, env) in [
        ("--tls-cert <FILE>", "SWITCHBOARD_TLS_CERT"),
        ("--tls-key <FILE>", "SWITCHBOARD_TLS_KEY"),
    ] {
        let entry = help
            .split_once(flag)
            .map(|(_, rest)| rest.split("\n      --").next().unwrap_or_default())
            .with_context(|| format!("--help lacks {flag}:\n{help}"))?;
        ensure!(
            entry.contains(env) && entry.contains("[default:"),
            "--help's {flag} lacks {env} or its default: {entry}"
        );
    }
    Ok(())
}

/// HAProxy's TLS frontend (SB_TLS_PEM) ends TLS in front of a plain node: a wss client that
/// trusts the test CA round-trips through it, and the plain ws:// frontend still works beside it.
#[tokio::test]
async fn wss_through_haproxy_with_the_tls_frontend() -> Result<()> {
    let certs = TestCerts::new()?;
    let node = NodeProcess::start(&[]).await?;
    let backend = Backend::from(&node);
    let tls_port = free_port()?;
    let tls_env = vec![
        ("SB_TLS_PEM".to_owned(), certs.path("server-bundle.pem")?),
        ("SB_TLS_BIND".to_owned(), format!("127.0.0.1:{tls_port}")),
    ];
    haproxy::check_config(&tls_env)?;
    let haproxy =
        HaproxyProcess::start_with_env(&[backend], Duration::from_millis(100), &tls_env).await?;
    let url = format!("wss://127.0.0.1:{tls_port}/ws");
    assert_serves_wss(&certs, &url, "through-haproxy").await?;
    let (mut plain, _) = RawClient::connect(&haproxy.ws_url(), Codec::Json).await?;
    let (mut secure, _) = certs.connect_wss(&url, Codec::Json).await?;
    subscribe(&mut plain, "mixed", 1).await?;
    round_trip(&mut secure, &mut plain, "mixed", json!("from wss to ws")).await?;
    node.wait_metric("switchboard_handshakes_total{result=\"ok\"}", 4.0)
        .await?;
    Ok(())
}
