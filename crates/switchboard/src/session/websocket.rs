//! The WebSocket transport: one task per connection reads client frames, hands them to the
//! session's [`Core`], answers heartbeats, writes the outbound queue, and closes with the code
//! the session ended with.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use switchboard_protocol::deflate::{self, UnpackError};
use switchboard_protocol::{Codec, ErrorCode, ServerFrame, close};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use super::core::{Core, Transport, deliver_inbox};
use super::guards::Guards;
use super::inbound;
use super::{Admission, Exit, close_with, new_session_id};
use crate::hub::SessionHandle;
use crate::node::Node;
use crate::queue::{CloseRequest, Outbound, OutboundQueue};
use std::sync::Arc;

/// How long the server tries to deliver its close frame before dropping the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The close a failed WebSocket read calls for, or `None` when the peer is simply gone. Public
/// for the Autobahn|Testsuite echo fixture (examples/autobahn_echo.rs), which must close exactly
/// as a session does.
pub fn read_error_close(error: &WsError) -> Option<CloseRequest> {
    let request = |code: u16, reason: &str| {
        Some(CloseRequest {
            code,
            reason: reason.to_owned(),
        })
    };
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            tracing::info!(size, max_size, "closing: message over the size limit");
            request(close::TOO_BIG, "message too large")
        }
        WsError::Capacity(error) => {
            tracing::info!(%error, "closing: frame over the size limit");
            request(close::TOO_BIG, "frame too large")
        }
        WsError::Utf8(_) => request(close::INVALID_PAYLOAD, "text frame is not valid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(error) => {
            tracing::info!(%error, "closing: WebSocket protocol error");
            request(close::PROTOCOL_ERROR, "WebSocket protocol error")
        }
        error => {
            tracing::debug!(%error, "read failed");
            None
        }
    }
}

struct Session<S> {
    core: Core,
    ws: WebSocketStream<S>,
    guards: Guards,
    /// A heartbeat ping went out and its pong has not come back: that one pong is free.
    awaiting_pong: bool,
    last_inbound: Instant,
    /// Reused between flushes.
    batch: Vec<(u64, Outbound)>,
}

/// Runs a session until it ends, then removes every trace of it (rooms, presence, registry).
/// Not an `async fn`: the session is built here, so the future holds it once, not also the
/// arguments it was built from (an async fn keeps its arguments' room for as long as it runs,
/// which made every idle session's task about 1.3 KiB larger).
pub fn run<S>(
    node: Arc<Node>,
    ws: WebSocketStream<S>,
    admission: Admission,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session_id = new_session_id();
    let span = tracing::info_span!("session", session = %session_id,
        user = %admission.identity.user, remote = %admission.remote, client = %admission.client);
    let codec = admission.codec;
    let handle = Arc::new(SessionHandle {
        id: Arc::from(session_id.as_str()),
        user: Arc::from(admission.identity.user.as_str()),
        codec,
        queue: OutboundQueue::new(
            node.config().max_queue_bytes,
            node.metrics().queue_bytes.clone(),
        ),
        link: None,
    });
    let mut session = Session {
        core: Core::new(node.clone(), handle, admission.identity),
        ws,
        guards: Guards::default(),
        awaiting_pong: false,
        last_inbound: Instant::now(),
        batch: Vec::new(),
    };
    async move {
        node.metrics().connections.inc();
        let transport_sessions = node.metrics().sessions.with_label_values(&["websocket"]);
        transport_sessions.inc();
        tracing::debug!(codec = codec.protocol(), "session open");
        // A panic (a bug) must not leave the session in the hub, the registry or presence: it
        // ends the connection with 1011 and the normal clean-up runs.
        let exit = match AssertUnwindSafe(session.serve()).catch_unwind().await {
            Ok(exit) => exit,
            Err(panic) => {
                session_panicked(&node, "serving", panic.as_ref());
                close_with(close::INTERNAL, "internal error")
            }
        };
        let rooms = session.core.rooms();
        // Boxed: the clean-up runs once, and inline its state would enlarge every idle session.
        if let Err(panic) = AssertUnwindSafe(Box::pin(session.finish(exit)))
            .catch_unwind()
            .await
        {
            session_panicked(&node, "closing", panic.as_ref());
            Box::pin(session.core.forget(&rooms)).await;
        }
        node.metrics().connections.dec();
        transport_sessions.dec();
    }
    .instrument(span)
}

pub(super) fn session_panicked(node: &Node, during: &str, panic: &(dyn Any + Send)) {
    node.metrics().session_panics.inc();
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(during, panic = message, "session task panicked");
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn serve(&mut self) -> Exit {
        let opened = match self.core.open().await {
            Ok(opened) => opened,
            Err(exit) => return exit,
        };
        if let Err(exit) = self.write_frames(vec![opened.welcome]).await {
            return exit;
        }
        // Boxed: it runs once, and inline its state would enlarge every idle session.
        if let Err(exit) = Box::pin(deliver_inbox(self, opened.pending, opened.more)).await {
            return exit;
        }
        let period = self.core.node.config().heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let queue = &self.core.handle.queue;
            let step = tokio::select! {
                biased;
                () = queue.ready() => self.flush_queue().await,
                incoming = self.ws.next() => {
                    // Boxed so the rarely used request path does not grow every idle session.
                    Box::pin(self.on_incoming(incoming)).await
                }
                _ = heartbeat.tick() => self.on_heartbeat().await,
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    async fn on_heartbeat(&mut self) -> Result<(), Exit> {
        if self.last_inbound.elapsed() > self.core.node.config().idle_timeout {
            tracing::info!("closing an idle connection");
            return Err(close_with(close::NORMAL, "idle timeout"));
        }
        if self.core.token_expired() {
            return Err(close_with(close::POLICY, "token expired"));
        }
        self.awaiting_pong = true;
        self.write_messages(vec![Message::Ping(Default::default())])
            .await
    }

    async fn on_incoming(
        &mut self,
        incoming: Option<Result<Message, WsError>>,
    ) -> Result<(), Exit> {
        let node = self.core.node.clone();
        let metrics = node.metrics();
        let message = match incoming {
            None => return Err(Exit::Gone),
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                return Err(read_error_close(&error).map_or(Exit::Gone, Exit::Close));
            }
        };
        self.last_inbound = Instant::now();
        let codec = self.core.handle.codec;
        let unpacked;
        let payload = match &message {
            Message::Text(text) if codec.content() == Codec::Json => text.as_bytes(),
            Message::Binary(bytes) if codec == Codec::MsgPack => bytes,
            Message::Binary(bytes) if codec == Codec::JsonDeflate => {
                // Inflated only up to the message size limit: a decompression bomb is refused
                // like an oversize frame, before its output is held.
                match deflate::unpack(bytes, node.config().max_message_size) {
                    Ok(json) => {
                        unpacked = json;
                        &unpacked
                    }
                    Err(UnpackError::TooLarge { limit }) => {
                        metrics.bytes_in.inc_by(message.len() as u64);
                        tracing::info!(limit, "closing: frame inflates over the size limit");
                        return Err(close_with(close::TOO_BIG, "message too large"));
                    }
                    Err(error) => {
                        metrics.bytes_in.inc_by(message.len() as u64);
                        metrics.frames_in.with_label_values(&["invalid"]).inc();
                        let text = error.to_string();
                        return inbound::bad_frame(self, None, ErrorCode::BadFrame, text).await;
                    }
                }
            }
            Message::Text(_) | Message::Binary(_) => {
                metrics.bytes_in.inc_by(message.len() as u64);
                metrics.frames_in.with_label_values(&["invalid"]).inc();
                let text = if codec == Codec::Json {
                    "binary frame on the switchboard.v1.json subprotocol: send text frames"
                } else {
                    "text frame on the switchboard.v1.msgpack subprotocol: send binary frames"
                };
                return inbound::bad_frame(self, None, ErrorCode::BadFrame, text.to_owned()).await;
            }
            Message::Pong(_) if std::mem::take(&mut self.awaiting_pong) => return Ok(()),
            Message::Ping(_) | Message::Pong(_) => {
                // Control frames cost a read and a pong each: a flood of them is abuse like any
                // other. A limited ping gets no pong now (tungstenite keeps the latest pending).
                if inbound::over_rate(self, "control")? {
                    return Ok(());
                }
                // tungstenite queued the pong to a ping; flushing sends it.
                return self.write_messages(Vec::new()).await;
            }
            Message::Close(_) => {
                // tungstenite queued the close reply; flushing sends it.
                let _ = self.write_messages(Vec::new()).await;
                return Err(Exit::Gone);
            }
            Message::Frame(_) => return Ok(()),
        };
        inbound::receive(self, payload).await
    }

    /// Sends the close frame (if the server is closing) and removes the session everywhere.
    async fn finish(&mut self, exit: Exit) {
        if let Exit::Close(request) = &exit {
            self.core.node.metrics().close_sent(request.code);
            tracing::debug!(code = request.code, reason = %request.reason, "closing session");
            let frame = CloseFrame {
                code: CloseCode::from(request.code),
                reason: request.reason.as_str().into(),
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
            // What the client sent behind the frame that closed it (a flood) is read and
            // dropped: a socket closed with unread bytes is reset, and the reset can destroy
            // the close frame before the client reads it. Only what has arrived, at most the
            // message size limit: the session does not wait for the client.
            let mut budget = self.core.node.config().max_message_size;
            while let Some(Some(Ok(message))) = self.ws.next().now_or_never() {
                budget = budget.saturating_sub(message.len().max(1));
                if budget == 0 {
                    break;
                }
            }
        }
        self.core.close().await;
        tracing::debug!("session closed");
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Writes and flushes, giving up if the session is closed meanwhile or the peer takes no
    /// bytes for the idle timeout (a reader that stopped reading may never drain its socket).
    async fn write_messages(&mut self, messages: Vec<Message>) -> Result<(), Exit> {
        let bytes: usize = messages.iter().map(Message::len).sum();
        let ws = &mut self.ws;
        let write = async {
            for message in messages {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        // Write first: a write that completes at once (the usual case) then never arms the
        // timer or registers for the close notification, which cost more than the write's
        // bookkeeping on a busy node.
        let result = tokio::select! {
            biased;
            result = write => result,
            () = self.core.handle.queue.closing() => {
                let close = self.core.handle.queue.close_request().unwrap_or(CloseRequest {
                    code: close::NORMAL,
                    reason: String::new(),
                });
                return Err(Exit::Close(close));
            }
            () = tokio::time::sleep(self.core.node.config().idle_timeout) => {
                self.core.node.metrics().slow_closes.inc();
                tracing::info!("closing a peer that stopped reading");
                return Err(close_with(close::TRY_AGAIN_LATER, "too slow to read: write timed out"));
            }
        };
        match result {
            Ok(()) => {
                self.core.node.metrics().bytes_out.inc_by(bytes as u64);
                Ok(())
            }
            Err(error) => {
                tracing::debug!(%error, "write failed");
                Err(Exit::Gone)
            }
        }
    }
}

impl<S> Transport for Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn guards(&mut self) -> &mut Guards {
        &mut self.guards
    }

    async fn write_frames(&mut self, frames: Vec<ServerFrame>) -> Result<(), Exit> {
        let messages = self.core.encode_answers(&frames, |message| message)?;
        self.write_messages(messages).await
    }

    async fn flush_queue(&mut self) -> Result<(), Exit> {
        let mut batch = std::mem::take(&mut self.batch);
        let taken = match self.core.take(&mut batch) {
            Ok(taken) => taken,
            Err(close) => return Err(Exit::Close(close)),
        };
        if batch.is_empty() {
            self.batch = batch;
            return Ok(());
        }
        let messages = self.core.admit_batch(&mut batch, |message| message);
        self.batch = batch;
        let wrote = !messages.is_empty();
        let result = self.write_messages(messages).await;
        self.core.written(taken, wrote && result.is_ok());
        result
    }
}
