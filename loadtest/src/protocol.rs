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
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::codec::{Codec, CodecSocket};
use crate::transport::{Conn, Transport};
use crate::ws::{Incoming, Socket, Stamp};

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
        self.open_with(url, target, source, Codec::Json).await
    }

    /// [`Protocol::open`], offering `codec`'s subprotocol (switchboard only); a server that does
    /// not choose it fails the handshake. The greeting is read in JSON, so `codec` must be JSON
    /// or a codec whose frames the caller decodes ([`Protocol::connect`] does).
    async fn open_with(
        self,
        url: &str,
        target: SocketAddr,
        source: Option<IpAddr>,
        codec: Codec,
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
        let mut request = url.into_client_request()?;
        if let Some(subprotocol) = codec.subprotocol() {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(subprotocol),
            );
        }
        let (mut socket, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        match self {
            Protocol::Switchboard => {
                // The welcome in any codec: a text frame, or a binary one.
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

impl Protocol {
    /// Opens one session to `url` at `target` (from `source`, if given) over `transport` and
    /// completes the greeting, as [`Protocol::open`]; only switchboard has the fallback
    /// transports, whose open reads the `welcome` itself, and the codecs other than JSON
    /// (WebSocket only).
    pub async fn connect(
        self,
        (transport, codec): (Transport, Codec),
        url: &str,
        target: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<Conn> {
        if codec != Codec::Json
            && (self != Protocol::Switchboard || transport != Transport::Websocket)
        {
            bail!("--codec msgpack|json+deflate is switchboard's, over WebSocket only");
        }
        if transport == Transport::Websocket {
            return Ok(Conn::Ws(Box::new(CodecSocket {
                socket: self.open_with(url, target, source, codec).await?,
                codec,
                received_wire_bytes: 0,
            })));
        }
        if self != Protocol::Switchboard {
            bail!("--transport sse|poll is switchboard's only");
        }
        Ok(Conn::Fallback(
            crate::fallback::open(url, transport, source).await?,
        ))
    }
}

/// Reads frames until a text frame `accept` takes (or a binary frame, if it takes any text:
/// switchboard's `welcome` in a binary codec), answering Engine.IO pings on the way.
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
                Some(Ok(Message::Binary(_))) if accept("") => return Ok(()),
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

/// An incoming text frame as the publishers and subscribers of `latency` and `fanout` read it.
pub enum Frame<'a> {
    /// A published message. switchboard's carries its room offset and epoch; the peers' carry
    /// neither, and their order is checked by the sequence numbers in the [`Stamp`].
    Delivery {
        stamp: Stamp,
        offset: Option<u64>,
        epoch: Option<&'a str>,
    },
    /// switchboard: a `reply` or `error` to a request.
    Answer(Incoming<'a>),
    /// The peers' subscribe acknowledgement (Socket.IO `43…`, raw `ok ROOM`).
    Subscribed,
    /// An Engine.IO ping: answer with [`Protocol::PONG`] or the server drops the connection.
    Ping,
    Other,
}

impl Protocol {
    /// The Engine.IO pong, the answer to [`Frame::Ping`].
    pub const PONG: &'static str = "3";

    /// The frame publishing `data` (a JSON object holding a [`Stamp`]) to `room` (run room
    /// names need no JSON escaping: `[a-z0-9-]`); `id` is switchboard's request id (the peers do
    /// not answer publishes).
    pub fn publish_frame(self, room: &str, data: &str, id: u64) -> String {
        match self {
            Protocol::Switchboard => {
                format!(r#"{{"type":"publish","room":"{room}","data":{data},"id":{id}}}"#)
            }
            Protocol::Socketio => format!(r#"42["publish","{room}",{data}]"#),
            Protocol::Raw => format!("pub {room} {data}"),
        }
    }

    /// What an incoming text frame is; strings borrow from `text`.
    pub fn parse(self, text: &str) -> Frame<'_> {
        match self {
            Protocol::Switchboard => match serde_json::from_str::<Incoming<'_>>(text) {
                Ok(Incoming {
                    kind: "message",
                    offset: Some(offset),
                    data: Some(stamp),
                    epoch,
                    ..
                }) => Frame::Delivery {
                    stamp,
                    offset: Some(offset),
                    epoch,
                },
                Ok(incoming) if matches!(incoming.kind, "reply" | "error") => {
                    Frame::Answer(incoming)
                }
                _ => Frame::Other,
            },
            Protocol::Socketio => {
                if text == "2" {
                    Frame::Ping
                } else if let Some(data) = text
                    .strip_prefix(r#"42["message","#)
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    peer_delivery(data)
                } else if text.starts_with("43") {
                    Frame::Subscribed
                } else {
                    Frame::Other
                }
            }
            Protocol::Raw => {
                if text.starts_with("ok ") {
                    Frame::Subscribed
                } else {
                    peer_delivery(text)
                }
            }
        }
    }

    /// Opens a session over `transport` and subscribes it to `room`; for switchboard, also
    /// returns the room's offset and epoch from the reply.
    pub async fn subscribe(
        self,
        connection: (Transport, Codec),
        url: &str,
        target: SocketAddr,
        room: &str,
    ) -> Result<(Conn, Option<(u64, String)>)> {
        let mut socket = self.connect(connection, url, target, None).await?;
        if self == Protocol::Switchboard {
            let (socket, subscribed) =
                crate::ws::subscribe_on(socket, &format!("\"{room}\""), None).await?;
            return Ok((socket, Some((subscribed.offset, subscribed.epoch))));
        }
        // Run room names need no escaping: `[a-z0-9-]`.
        let frame = match self {
            Protocol::Socketio => format!(r#"421["subscribe","{room}"]"#),
            _ => format!("sub {room}"),
        };
        socket.send(Message::text(frame)).await?;
        loop {
            let text = match socket.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(error.into()),
                None => bail!("closed before the subscribe acknowledgement"),
            };
            match self.parse(text.as_str()) {
                Frame::Subscribed => return Ok((socket, None)),
                Frame::Ping => socket.send(Message::text(Self::PONG)).await?,
                _ => bail!("unexpected answer to subscribe: {}", text.as_str()),
            }
        }
    }
}

/// A peer's delivery: the published data itself.
fn peer_delivery(data: &str) -> Frame<'_> {
    match serde_json::from_str::<Stamp>(data) {
        Ok(stamp) => Frame::Delivery {
            stamp,
            offset: None,
            epoch: None,
        },
        Err(_) => Frame::Other,
    }
}
