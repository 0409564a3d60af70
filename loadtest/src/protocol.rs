//! The servers the harness can drive, and opening a connection to each: switchboard itself, the
//! Socket.IO 4 peer (`loadtest/peers/socketio`) and the raw tokio-tungstenite ceiling server
//! (`loadtest/peers/raw`), so one scenario runs against all three under the same conditions.
//!
//! What each peer speaks (the peers implement exactly this):
//! - Socket.IO: Engine.IO 4 over the WebSocket transport only
//!   (`ws://HOST:PORT/socket.io/?EIO=4&transport=websocket`). The server opens with `0{…}`, the
//!   client joins the default namespace with `40` and waits for `40{…}`; the server pings with `2`,
//!   the client answers `3`. Events: `421["subscribe",ROOM]` joins ROOM and is acknowledged with
//!   `431[…]`; `42["publish",ROOM,DATA]` emits `42["message",DATA]` to every socket in ROOM on
//!   every node (through `@socket.io/redis-adapter`), unacknowledged.
//! - Raw: any path; a text frame `sub ROOM` subscribes and is answered `ok ROOM`; a text frame
//!   `pub ROOM DATA` sends DATA as a text frame to every connection subscribed to ROOM on that
//!   one server, unacknowledged. No Redis, no envelope: the ceiling of the machine.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::ws::Socket;

/// How long a server may take to say hello once the WebSocket is open.
const GREETING_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// switchboard's own protocol (PROTOCOL.md).
    Switchboard,
    /// Socket.IO 4 over the WebSocket transport (the `loadtest/peers/socketio` server).
    Socketio,
    /// The raw ceiling server's `sub`/`pub` lines (`switchboard-raw-ceiling`).
    Raw,
}

impl Protocol {
    /// Opens one connection to `url` at `target` (from `source`, if given) and completes the
    /// protocol's greeting: switchboard's `welcome`, Socket.IO's open and namespace connect, or
    /// nothing for the raw server.
    pub async fn open(
        self,
        url: &str,
        target: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<Socket> {
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
        match self {
            Protocol::Switchboard => {
                next_greeting(&mut socket, |_| true).await?;
            }
            Protocol::Socketio => {
                next_greeting(&mut socket, |text| text.starts_with('0')).await?;
                socket.send(Message::text("40")).await?;
                next_greeting(&mut socket, |text| text.starts_with("40")).await?;
            }
            Protocol::Raw => {}
        }
        Ok(socket)
    }
}

/// Reads frames until a text frame `accept` takes, answering Engine.IO pings on the way.
async fn next_greeting(socket: &mut Socket, accept: impl Fn(&str) -> bool) -> Result<()> {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) if accept(text.as_str()) => return Ok(()),
                Some(Ok(Message::Text(text))) if text.as_str() == "2" => {
                    socket.send(Message::text("3")).await?;
                }
                Some(Ok(Message::Text(text))) => {
                    bail!("unexpected greeting: {}", text.as_str())
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => bail!("closed before the greeting"),
            }
        }
    };
    match tokio::time::timeout(GREETING_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => bail!("no greeting in {}s", GREETING_TIMEOUT.as_secs()),
    }
}
