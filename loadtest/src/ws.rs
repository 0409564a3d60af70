//! WebSocket client helpers: the loopback address of a URL, opening a connection (through its
//! `welcome`), subscribing one, and the server-frame fields the scenarios read.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

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

/// Opens one connection (from `source`, if given) and reads the `welcome`.
pub async fn open(url: &str, target: SocketAddr, source: Option<IpAddr>) -> Result<Socket> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(target).await?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut socket, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
        Ok(Some(Ok(_welcome))) => Ok(socket),
        Ok(Some(Err(error))) => Err(error.into()),
        Ok(None) => bail!("closed before welcome"),
        Err(_) => bail!("no welcome in 30s"),
    }
}

/// Opens a subscriber connection and subscribes it to `room` (JSON-encoded); returns the socket
/// and the room's position from the reply.
pub async fn subscribe_one(
    url: &str,
    target: SocketAddr,
    room: &str,
) -> Result<(Socket, u64, String)> {
    let mut socket = open(url, target, None).await?;
    socket
        .send(Message::text(format!(
            r#"{{"type":"subscribe","room":{room},"id":1}}"#
        )))
        .await?;
    loop {
        let message = match socket.next().await {
            Some(message) => message?,
            None => bail!("closed before the subscribe reply"),
        };
        let Message::Text(text) = &message else {
            continue;
        };
        let incoming: Incoming<'_> = serde_json::from_str(text.as_str())?;
        match (incoming.kind, incoming.id) {
            ("reply", Some(1)) => {
                let offset = incoming.offset.context("subscribe reply without offset")?;
                let epoch = incoming.epoch.context("subscribe reply without epoch")?;
                return Ok((socket, offset, epoch.to_owned()));
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
}

/// What a published message carries: its send time (µs on the common clock).
#[derive(Deserialize)]
pub struct Stamp {
    pub t: u64,
}
