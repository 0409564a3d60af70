//! How a switchboard session reaches its node (`--transport`): a WebSocket on `/ws`, or one of
//! the fallback transports, SSE (`/sse`) and long poll (`/poll`). A [`Conn`] is either kind,
//! read and written the same way (a stream of server frames, a sink of client frames), so the
//! scenarios that support the fallbacks run unchanged over them.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::codec::CodecSocket;
use crate::fallback;
use crate::ws::Socket;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `GET /ws`, the WebSocket.
    Websocket,
    /// `GET /sse`: one streaming response per session; client frames by POST.
    Sse,
    /// `GET /poll`, then `GET /poll/{session}` in a loop; client frames by POST.
    Poll,
}

impl Transport {
    /// The path segment of the transport's endpoints (`/sse`, `/poll/{session}`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Transport::Websocket => "ws",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }
}

/// One open session over any transport.
pub enum Conn {
    /// A WebSocket in one of switchboard's codecs (JSON for the peers).
    Ws(Box<CodecSocket>),
    Fallback(fallback::Session),
}

impl Conn {
    /// Ends the session: a WebSocket with a close handshake, a fallback session by dropping its
    /// stream or polls.
    pub async fn end(mut self) {
        if let Conn::Ws(socket) = &mut self {
            let _ = Socket::close(&mut socket.socket, None).await;
        }
    }
}

impl Stream for Conn {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Conn::Ws(socket) => socket.poll_next_unpin(cx),
            Conn::Fallback(session) => session.poll_next_unpin(cx),
        }
    }
}

impl Conn {
    /// Wire bytes of the WebSocket data frames read so far ([`crate::codec::wire_bytes`]); a
    /// fallback session has none.
    pub fn received_wire_bytes(&self) -> Option<u64> {
        match self {
            Conn::Ws(socket) => Some(socket.received_wire_bytes),
            Conn::Fallback(_) => None,
        }
    }
}

impl Sink<Message> for Conn {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.get_mut() {
            Conn::Ws(socket) => socket.poll_ready_unpin(cx),
            Conn::Fallback(session) => session.poll_ready_unpin(cx),
        }
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        match self.get_mut() {
            Conn::Ws(socket) => socket.start_send_unpin(message),
            Conn::Fallback(session) => session.start_send_unpin(message),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.get_mut() {
            Conn::Ws(socket) => socket.poll_flush_unpin(cx),
            Conn::Fallback(session) => session.poll_flush_unpin(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.get_mut() {
            Conn::Ws(socket) => socket.poll_close_unpin(cx),
            Conn::Fallback(session) => session.poll_close_unpin(cx),
        }
    }
}
