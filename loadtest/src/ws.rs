//! WebSocket client helpers: the loopback address of a URL, opening a connection (through its
//! `welcome`), subscribing one, and the server-frame fields the scenarios read.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::protocol::Protocol;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A tag unique to this run (process id and start time), so rooms and users of earlier runs
/// against the same Redis do not matter.
pub fn run_tag(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    )
}

/// What a reader gets next.
pub enum Next {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    /// The run told the reader to stop.
    Stop,
    /// The server closed the connection, or it broke.
    Closed,
}

/// The next text frame of `stream` (other frames are skipped), unless the run says stop first.
pub async fn next_text<S>(stream: &mut S, stop: &mut tokio::sync::watch::Receiver<bool>) -> Next
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => return Next::Stop,
            next = stream.next() => next,
        };
        match next {
            Some(Ok(Message::Text(text))) => return Next::Text(text),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Next::Closed,
            Some(Ok(_)) => {}
        }
    }
}

/// Waits for `expected` setup answers (one per connection), failing on the first deadline miss
/// or, once all answered, if any of them failed (the first five failures are printed).
pub async fn await_setup<T>(
    ready: &mut tokio::sync::mpsc::UnboundedReceiver<Result<T>>,
    expected: u64,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let mut failures = 0u64;
    for _ in 0..expected {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => {
                failures += 1;
                if failures <= 5 {
                    eprintln!("subscribe failed: {error:#}");
                }
            }
            Ok(None) => break,
            Err(_) => bail!("timed out waiting for subscribe replies"),
        }
    }
    if failures > 0 {
        bail!("{failures} of {expected} subscribers failed");
    }
    Ok(())
}

/// The socket address of a WebSocket URL; loopback IP addresses only.
pub fn url_addr(url: &str) -> Result<SocketAddr> {
    let request = url.into_client_request()?;
    let host = request.uri().host().context("URL host")?;
    let port = request.uri().port_u16().unwrap_or(80);
    let ip: IpAddr = host.parse().context("the target must be an IP address")?;
    if !ip.is_loopback() {
        bail!("load tests target loopback addresses only");
    }
    Ok(SocketAddr::new(ip, port))
}

/// Opens one switchboard connection (from `source`, if given) and reads the `welcome`.
pub async fn open(url: &str, target: SocketAddr, source: Option<IpAddr>) -> Result<Socket> {
    Protocol::Switchboard.open(url, target, source).await
}

/// What a `subscribe` reply said: the room's position and whether `since` recovery worked.
pub struct Subscribed {
    pub offset: u64,
    pub epoch: String,
    pub recovered: bool,
}

/// Opens a subscriber connection and subscribes it to `room` (JSON-encoded), resuming after
/// `since` (offset, epoch) if given; returns the socket and the reply. Recovered messages follow.
pub async fn subscribe_one(
    url: &str,
    target: SocketAddr,
    room: &str,
    since: Option<(u64, &str)>,
) -> Result<(Socket, Subscribed)> {
    subscribe_on(open(url, target, None).await?, room, since).await
}

/// Subscribes an open session (a WebSocket, or a fallback session: see
/// [`crate::transport::Conn`]) to `room` (JSON-encoded), resuming after `since` (offset, epoch)
/// if given; returns it and the reply. Recovered messages follow.
pub async fn subscribe_on<S>(
    mut socket: S,
    room: &str,
    since: Option<(u64, &str)>,
) -> Result<(S, Subscribed)>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin,
{
    let since = match since {
        Some((offset, epoch)) => format!(
            r#","since":{{"offset":{offset},"epoch":{}}}"#,
            serde_json::to_string(epoch)?
        ),
        None => String::new(),
    };
    socket
        .send(Message::text(format!(
            r#"{{"type":"subscribe","room":{room},"id":1{since}}}"#
        )))
        .await?;
    loop {
        let message = match socket.next().await {
            Some(message) => message?,
            None => bail!("closed before the subscribe reply"),
        };
        let Message::Text(text) = &message else {
            if let Message::Close(frame) = &message {
                bail!("closed before the subscribe reply: {frame:?}");
            }
            continue;
        };
        let incoming: Incoming<'_> = serde_json::from_str(text.as_str())?;
        match (incoming.kind, incoming.id) {
            ("reply", Some(1)) => {
                let offset = incoming.offset.context("subscribe reply without offset")?;
                let epoch = incoming.epoch.context("subscribe reply without epoch")?;
                let subscribed = Subscribed {
                    offset,
                    epoch: epoch.to_owned(),
                    recovered: incoming.recovered == Some(true),
                };
                return Ok((socket, subscribed));
            }
            ("error", _) => bail!(
                "subscribe refused: {} {}",
                incoming.code.unwrap_or("?"),
                incoming.message.unwrap_or_default()
            ),
            _ => {}
        }
    }
}

/// The fields of a server frame this harness reads; strings borrow from the frame.
#[derive(Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: &'a str,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default, borrow)]
    pub epoch: Option<&'a str>,
    #[serde(default)]
    pub data: Option<Stamp>,
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub recovered: Option<bool>,
}

/// What a published message carries: its send time (µs on the common clock) and, from the
/// `latency` and `fanout` publishers, the publisher's index and the message's sequence number
/// among that publisher's messages to the room (1, 2, …).
#[derive(Deserialize)]
pub struct Stamp {
    pub t: u64,
    #[serde(default)]
    pub p: usize,
    #[serde(default)]
    pub s: u64,
}
