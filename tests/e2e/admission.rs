//! Admission, end to end: the per-address connection cap and connection rate (HTTP 429 with
//! `Retry-After` before the upgrade, other addresses unaffected), the node-wide accept rate (a
//! burst waits in line, nobody is refused), and the internal port's header timeout, connection
//! cap and a SIGTERM that no internal client can hold up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use switchboard_e2e::{DEADLINE, NodeProcess, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{self, Message};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A loopback source address other than 127.0.0.1, so one machine can be several clients.
fn source(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Opens a TCP connection to `to` from `from` (port chosen by the kernel).
async fn connect_from(from: IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(tokio::time::timeout(DEADLINE, socket.connect(to))
        .await
        .context("TCP connect timed out")??)
}

enum Outcome {
    /// Upgraded, and the `welcome` frame read.
    Open(Box<WebSocketStream<TcpStream>>),
    Refused {
        status: u16,
        retry_after: Option<String>,
    },
}

impl Outcome {
    fn open(self) -> Result<WebSocketStream<TcpStream>> {
        match self {
            Outcome::Open(socket) => Ok(*socket),
            Outcome::Refused {
                status,
                retry_after,
            } => bail!("refused with {status} (Retry-After {retry_after:?})"),
        }
    }

    /// The `Retry-After` seconds of a 429.
    fn too_many(self) -> Result<u64> {
        match self {
            Outcome::Open(_) => bail!("upgraded, expected 429"),
            Outcome::Refused {
                status: 429,
                retry_after: Some(seconds),
            } => {
                let seconds: u64 = seconds
                    .parse()
                    .with_context(|| format!("Retry-After {seconds:?} is not seconds"))?;
                ensure!(seconds >= 1, "Retry-After 0");
                Ok(seconds)
            }
            Outcome::Refused {
                status,
                retry_after,
            } => bail!("refused with {status} (Retry-After {retry_after:?}), expected 429"),
        }
    }
}

/// A WebSocket handshake from `from` with extra headers; on success, waits for `welcome`.
async fn handshake_from(
    node: &NodeProcess,
    from: IpAddr,
    headers: &[(&str, &str)],
) -> Result<Outcome> {
    let stream = connect_from(from, node.public).await?;
    let mut request = node.ws_url().into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    let handshake =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(request, stream))
            .await
            .context("handshake timed out")?;
    match handshake {
        Ok((mut socket, _)) => {
            let first = tokio::time::timeout(DEADLINE, socket.next())
                .await
                .context("no welcome in time")?
                .context("closed before welcome")??;
            ensure!(
                matches!(&first, Message::Text(text) if text.contains("welcome")),
                "first frame is not welcome: {first:?}"
            );
            Ok(Outcome::Open(Box::new(socket)))
        }
        Err(tungstenite::Error::Http(response)) => Ok(Outcome::Refused {
            status: response.status().as_u16(),
            retry_after: response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
        }),
        Err(error) => Err(error.into()),
    }
}

/// Retries the handshake from `from` until the address has a free place.
async fn open_when_free(node: &NodeProcess, from: IpAddr) -> Result<WebSocketStream<TcpStream>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match handshake_from(node, from, &[]).await? {
            Outcome::Open(socket) => return Ok(*socket),
            refused if Instant::now() >= deadline => {
                refused.open().context("no place freed")?;
            }
            Outcome::Refused { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Reads until the peer closes the connection; returns what it sent. Fails if it is still open
/// after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>> {
    let mut received = Vec::new();
    let deadline = Instant::now() + within;
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => bail!(
                "still open after {within:?}; received {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(received),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// One complete `GET path` on a fresh connection; the status code.
async fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let response = read_until_closed(&mut stream, DEADLINE).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .with_context(|| format!("not an HTTP response: {text:?}"))?;
    Ok(status.parse()?)
}

// ---------------------------------------------------------------------------------------------
// Per-address limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_cap_refuses_with_429_and_frees_a_place_however_a_connection_ends() -> Result<()>
{
    let node = NodeProcess::start(&[
        "--max-connections-per-ip",
        "3",
        "--connect-rate-per-ip",
        "0",
    ])
    .await?;
    let crowded = source(2);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(handshake_from(&node, crowded, &[]).await?.open()?);
    }
    let retry_after = handshake_from(&node, crowded, &[]).await?.too_many()?;
    assert!(retry_after <= 60, "Retry-After {retry_after} s");
    assert_eq!(
        node.metric("switchboard_handshakes_total{result=\"ip_connections\"}")
            .await?,
        1.0
    );
    assert_eq!(node.metric("switchboard_client_addresses").await?, 1.0);

    // Another address is not affected.
    let _other = handshake_from(&node, source(3), &[]).await?.open()?;
    assert_eq!(node.metric("switchboard_client_addresses").await?, 2.0);

    // A clean close frees a place...
    let mut closing = open.pop().context("a client")?;
    closing.close(None).await?;
    open.push(open_when_free(&node, crowded).await?);
    // ... and so does a connection that just vanishes (no close frame).
    drop(open.pop());
    open.push(open_when_free(&node, crowded).await?);
    handshake_from(&node, crowded, &[]).await?.too_many()?;

    // Everyone leaves: the address is forgotten.
    drop((open, _other));
    wait_until("no client address left", || async {
        node.metric("switchboard_client_addresses")
            .await
            .is_ok_and(|count| count == 0.0)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_rate_refuses_with_429_and_admits_again_after_retry_after() -> Result<()> {
    let node = NodeProcess::start(&[
        "--connect-rate-per-ip",
        "1",
        "--connect-burst-per-ip",
        "2",
        "--max-connections-per-ip",
        "0",
    ])
    .await?;
    let eager = source(4);
    for _ in 0..2 {
        handshake_from(&node, eager, &[])
            .await?
            .open()?
            .close(None)
            .await?;
    }
    let retry_after = handshake_from(&node, eager, &[]).await?.too_many()?;
    assert!(retry_after <= 2, "Retry-After {retry_after} s at 1/s");
    assert!(
        node.metric("switchboard_handshakes_total{result=\"ip_rate\"}")
            .await?
            >= 1.0
    );
    let _other = handshake_from(&node, source(5), &[]).await?.open()?;

    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let _again = handshake_from(&node, eager, &[])
        .await?
        .open()
        .context("refused after waiting Retry-After")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_is_limited_and_the_proxy_is_not() -> Result<()>
{
    let node = NodeProcess::start(&[
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
        "--connect-rate-per-ip",
        "0",
    ])
    .await?;
    let proxy = source(1);
    let alice = [("x-forwarded-for", "203.0.113.7")];
    let _first = handshake_from(&node, proxy, &alice).await?.open()?;
    handshake_from(&node, proxy, &alice).await?.too_many()?;
    let _bob = handshake_from(&node, proxy, &[("x-forwarded-for", "203.0.113.8")])
        .await?
        .open()?;
    // The proxy's own connections (no X-Forwarded-For) speak for many clients.
    let _own = [
        handshake_from(&node, proxy, &[]).await?.open()?,
        handshake_from(&node, proxy, &[]).await?.open()?,
    ];
    // An untrusted peer's X-Forwarded-For is ignored: it is limited as itself.
    let spoofer = source(6);
    let _spoof = handshake_from(&node, spoofer, &[("x-forwarded-for", "198.51.100.1")])
        .await?
        .open()?;
    handshake_from(&node, spoofer, &[("x-forwarded-for", "198.51.100.2")])
        .await?
        .too_many()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The node-wide accept rate

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_over_the_accept_rate_waits_in_line_and_nobody_is_refused() -> Result<()> {
    const CLIENTS: usize = 200;
    const RATE: u64 = 50;
    const BURST: u64 = 10;
    let node = NodeProcess::start(&[
        "--accept-rate",
        &RATE.to_string(),
        "--accept-burst",
        &BURST.to_string(),
        "--max-connections-per-ip",
        "0",
        "--connect-rate-per-ip",
        "0",
        // The line is (200 − 10) / 50 ≈ 4 s long; the timeout keeps a loaded machine's slowness
        // from failing the test, not the pacing.
        "--handshake-timeout-ms",
        "30000",
    ])
    .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..CLIENTS {
        let url = node.ws_url();
        let public = node.public;
        tasks.push(tokio::spawn(async move {
            let from = source(10 + (index % 50) as u8);
            let stream = connect_from(from, public).await?;
            let (mut socket, _) = tokio::time::timeout(
                Duration::from_secs(60),
                tokio_tungstenite::client_async(url, stream),
            )
            .await
            .context("handshake timed out")??;
            let welcome = tokio::time::timeout(Duration::from_secs(60), socket.next())
                .await
                .context("no welcome")?
                .context("closed")??;
            ensure!(welcome.is_text(), "not welcome: {welcome:?}");
            Ok::<_, anyhow::Error>(socket)
        }));
    }
    let mut sockets = Vec::new();
    for task in tasks {
        sockets.push(task.await??);
    }
    let elapsed = started.elapsed();
    let least = Duration::from_secs_f64((CLIENTS as u64 - BURST) as f64 / RATE as f64 * 0.8);
    assert!(
        elapsed >= least,
        "{CLIENTS} connections in {elapsed:?}: the accept rate did not pace them (at least {least:?})"
    );
    assert_eq!(
        node.metric("switchboard_handshakes_total{result=\"ok\"}")
            .await?,
        CLIENTS as f64
    );
    let waited = node.metric("switchboard_accept_waits_total").await?;
    assert!(
        waited >= (CLIENTS as u64 - 2 * BURST) as f64 && waited <= CLIENTS as f64,
        "{waited} connections waited"
    );
    assert_eq!(node.metric("switchboard_accept_waiting").await?, 0.0);
    assert_eq!(
        node.metric("switchboard_handshakes_total{result=\"queue_timeout\"}")
            .await?,
        0.0
    );
    assert_eq!(sockets.len(), CLIENTS);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_waits_past_the_handshake_timeout_is_dropped_and_counted() -> Result<()> {
    const CLIENTS: usize = 6;
    let node = NodeProcess::start(&[
        "--accept-rate",
        "1",
        "--accept-burst",
        "1",
        "--handshake-timeout-ms",
        "1500",
        "--max-connections-per-ip",
        "0",
        "--connect-rate-per-ip",
        "0",
    ])
    .await?;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let url = node.ws_url();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
                .await
                .map(|result| result.ok())
                .ok()
                .flatten()
                .map(|(socket, _)| socket)
        }));
    }
    let mut opened = Vec::new();
    for task in tasks {
        if let Some(socket) = task.await? {
            opened.push(socket);
        }
    }
    // One at once, one a second: within 1.5 s at most about two get their turn.
    ensure!(
        (1..=3).contains(&opened.len()),
        "{} of {CLIENTS} handshakes completed at 1/s within 1.5 s",
        opened.len()
    );
    let dropped = (CLIENTS - opened.len()) as f64;
    node.wait_metric(
        "switchboard_handshakes_total{result=\"queue_timeout\"}",
        dropped,
    )
    .await?;
    // The line is gone: the next client gets in.
    let _later = open_when_free(&node, source(1)).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The internal port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_port_closes_half_sent_requests_and_idle_keep_alive_after_the_header_timeout()
-> Result<()> {
    let node = NodeProcess::start(&["--internal-header-timeout-ms", "1000"]).await?;

    let started = Instant::now();
    let mut half_sent = TcpStream::connect(node.internal).await?;
    half_sent.write_all(b"GET /metrics HTTP/1.1\r\n").await?;
    let answer = read_until_closed(&mut half_sent, DEADLINE).await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}, before the header timeout"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("200 OK"),
        "a half-sent request was answered: {answer}"
    );

    let mut keep_alive = TcpStream::connect(node.internal).await?;
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let answer = read_until_closed(&mut keep_alive, DEADLINE).await?;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    assert_eq!(http_status(node.internal, "/healthz").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_connection_cap_closes_extra_connections_until_places_free() -> Result<()> {
    let node = NodeProcess::start(&[
        "--internal-max-connections",
        "3",
        "--internal-header-timeout-ms",
        "3000",
    ])
    .await?;
    assert_eq!(http_status(node.internal, "/healthz").await?, 200);
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(node.internal).await?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\n").await?;
        holders.push(stream);
    }
    // The places are taken: an extra connection is closed at once, not left hanging. Shown
    // without a clock: one left waiting for a place would be served when the holders time out,
    // and so answered.
    let mut extra = TcpStream::connect(node.internal).await?;
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut extra, DEADLINE).await?;
    assert!(
        answer.is_empty(),
        "answered over the cap: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // The holders time out, and the port serves again.
    wait_until("/healthz after the holders time out", || async {
        http_status(node.internal, "/healthz").await.ok() == Some(200)
    })
    .await?;
    assert!(node.metric("switchboard_internal_refused_total").await? >= 1.0);
    for mut holder in holders {
        read_until_closed(&mut holder, DEADLINE).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_time_whatever_the_internal_clients_do() -> Result<()> {
    const GRACE_MS: u64 = 1000;
    let mut node = NodeProcess::start(&[
        "--drain-grace-ms",
        &GRACE_MS.to_string(),
        // Longer than the bound below: only the shutdown itself can end these clients in time.
        "--internal-header-timeout-ms",
        "60000",
    ])
    .await?;
    // A WebSocket client too, so that the drain has something to close.
    let _session = handshake_from(&node, source(1), &[]).await?.open()?;

    let mut half_sent = TcpStream::connect(node.internal).await?;
    half_sent.write_all(b"GET /metrics HTTP/1.1\r\n").await?;

    let mut idle = TcpStream::connect(node.internal).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(DEADLINE, idle.read(&mut buffer)).await??;
    ensure!(
        buffer[..read].starts_with(b"HTTP/1.1 200"),
        "keep-alive /healthz: {:?}",
        String::from_utf8_lossy(&buffer[..read])
    );

    // A slow reader: many pipelined /metrics requests, a small receive window, nothing read,
    // so the node is stuck writing a response.
    let slow_socket = TcpSocket::new_v4()?;
    slow_socket.set_recv_buffer_size(4096)?;
    let slow = slow_socket.connect(node.internal).await?;
    let (_slow_read, mut slow_write) = slow.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..2000 {
            if slow_write
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                break;
            }
        }
    });

    wait_until("the internal clients to be connected", || async {
        node.metric("switchboard_internal_connections")
            .await
            .is_ok_and(|open| open >= 4.0)
    })
    .await?;
    // The slow reader's responses have filled the socket buffers.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    node.terminate();
    let status = node
        .wait_exit(Duration::from_millis(GRACE_MS) + Duration::from_secs(3))
        .await
        .context("the internal port's clients held the node up")?;
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_millis(GRACE_MS) + Duration::from_secs(3),
        "exited after {:?}",
        started.elapsed()
    );
    writer.abort();
    Ok(())
}
