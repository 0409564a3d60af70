//! One WebSocket connection. A single task reads client frames, answers requests and writes the
//! session's outbound queue, so a request's reply and a `since` recovery are written before any
//! live message queued behind them, and per-room offsets drop anything written already.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use switchboard_broker::{DirectMessage, HistoryQuery, SessionRecord};
use switchboard_protocol::{
    ClientFrame, Codec, ErrorCode, Member, Reply, RoomMessage, Sender, ServerFrame, StreamPosition,
    close,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use crate::auth::{Identity, MAX_USER_LEN, unix_now_millis, unix_now_secs, valid_user};
use crate::hub::{SessionHandle, encode};
use crate::node::{Joined, Node, is_system_room, valid_room};
use crate::queue::{CloseRequest, Outbound, OutboundQueue};

/// Most history messages one `history` request returns.
const MAX_HISTORY_LIMIT: usize = 1000;
/// How long the server tries to deliver its close frame before dropping the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the handshake established about a connection.
pub struct Admission {
    pub identity: Identity,
    pub codec: Codec,
    /// The TCP peer (a load balancer, when there is one).
    pub remote: SocketAddr,
    /// The client: the peer, or what a trusted proxy's X-Forwarded-For says.
    pub client: IpAddr,
}

/// How the session loop ended.
enum Exit {
    /// The server closes the connection with this code.
    Close(CloseRequest),
    /// The peer closed or the connection broke.
    Gone,
}

fn close_with(code: u16, reason: &str) -> Exit {
    Exit::Close(CloseRequest {
        code,
        reason: reason.to_owned(),
    })
}

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

/// A session's view of one room it subscribed to.
struct Subscription {
    /// The newest offset written (or covered by the subscribe reply): anything at or below it
    /// is a duplicate.
    offset: u64,
    epoch: String,
    /// While `since` recovery pages through history: the highest live offset skipped because it
    /// came before the messages in between (history holds it, and a later page brings it), or
    /// `u64::MAX` for a live message of another epoch.
    recovering: Option<u64>,
}

/// Per-connection abuse limits, made on the first frame the rate limit counts, so idle
/// connections (which only answer heartbeats) don't pay.
struct Guards {
    rate: Option<DefaultDirectRateLimiter>,
    strikes: DefaultDirectRateLimiter,
    bad_frames: DefaultDirectRateLimiter,
}

impl Guards {
    fn new(node: &Node) -> Self {
        let config = node.config();
        let rate = NonZeroU32::new(config.rate_limit).map(|per_second| {
            let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(per_second);
            RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
        });
        Guards {
            rate,
            strikes: tolerance(config.rate_limit_strikes, Duration::from_secs(10)),
            bad_frames: tolerance(config.max_bad_frames, Duration::from_secs(60)),
        }
    }
}

/// A limiter that allows `count` events per `window` (at least one).
fn tolerance(count: u32, window: Duration) -> DefaultDirectRateLimiter {
    let count = NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN);
    let period = (window / count.get()).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(count);
    RateLimiter::direct(quota)
}

struct Session<S> {
    node: Arc<Node>,
    ws: WebSocketStream<S>,
    handle: Arc<SessionHandle>,
    identity: Identity,
    subscriptions: HashMap<String, Subscription>,
    guards: Option<Box<Guards>>,
    /// A heartbeat ping went out and its pong has not come back: that one pong is free.
    awaiting_pong: bool,
    last_inbound: Instant,
    /// Reused between flushes.
    batch: Vec<Outbound>,
}

pub fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Runs a session until it ends, then removes every trace of it (rooms, presence, registry).
pub async fn run<S>(node: Arc<Node>, ws: WebSocketStream<S>, admission: Admission)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session_id = new_session_id();
    let span = tracing::info_span!("session", session = %session_id,
        user = %admission.identity.user, remote = %admission.remote, client = %admission.client);
    async move {
        let handle = Arc::new(SessionHandle {
            id: Arc::from(session_id.as_str()),
            user: Arc::from(admission.identity.user.as_str()),
            codec: admission.codec,
            queue: OutboundQueue::new(
                node.config().max_queue_bytes,
                node.metrics().queue_bytes.clone(),
            ),
        });
        let mut session = Session {
            node: node.clone(),
            ws,
            handle,
            identity: admission.identity,
            subscriptions: HashMap::new(),
            guards: None,
            awaiting_pong: false,
            last_inbound: Instant::now(),
            batch: Vec::new(),
        };
        node.metrics().connections.inc();
        tracing::debug!(codec = admission.codec.protocol(), "session open");
        // A panic (a bug) must not leave the session in the hub, the registry or presence: it
        // ends the connection with 1011 and the normal clean-up runs.
        let exit = match AssertUnwindSafe(session.serve()).catch_unwind().await {
            Ok(exit) => exit,
            Err(panic) => {
                session_panicked(&node, "serving", panic.as_ref());
                close_with(close::INTERNAL, "internal error")
            }
        };
        let rooms: Vec<String> = session.subscriptions.keys().cloned().collect();
        // Boxed: the clean-up runs once, and inline its state would enlarge every idle session.
        if let Err(panic) = AssertUnwindSafe(Box::pin(session.finish(exit)))
            .catch_unwind()
            .await
        {
            session_panicked(&node, "closing", panic.as_ref());
            Box::pin(session.forget(&rooms)).await;
        }
        node.metrics().connections.dec();
    }
    .instrument(span)
    .await;
}

fn session_panicked(node: &Node, during: &str, panic: &(dyn Any + Send)) {
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
    fn record(&self) -> SessionRecord {
        SessionRecord {
            session: self.handle.id.to_string(),
            user: self.identity.user.clone(),
            node: self.node.id().to_owned(),
            connected_at: unix_now_millis(),
        }
    }

    fn member(&self) -> Member {
        Member {
            user: self.identity.user.clone(),
            session: self.handle.id.to_string(),
            info: self.identity.info.clone(),
        }
    }

    fn sender(&self) -> Sender {
        Sender {
            user: self.identity.user.clone(),
            session: self.handle.id.to_string(),
        }
    }

    async fn serve(&mut self) -> Exit {
        let registered = self
            .node
            .register_session(&self.handle, &self.record())
            .await;
        if registered.is_err() {
            return close_with(close::TRY_AGAIN_LATER, "broker unavailable, retry later");
        }
        let welcome = ServerFrame::Welcome {
            session: self.handle.id.to_string(),
            user: self.identity.user.clone(),
            node: self.node.id().to_owned(),
            protocol: self.handle.codec.protocol().to_owned(),
            heartbeat_ms: self.node.config().heartbeat.as_millis() as u64,
        };
        if let Err(exit) = self.write_frames(vec![welcome]).await {
            return exit;
        }
        let period = self.node.config().heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let queue = &self.handle.queue;
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

    /// Writes the next batch of the outbound queue.
    async fn flush_queue(&mut self) -> Result<(), Exit> {
        let mut batch = std::mem::take(&mut self.batch);
        let taken = match self.handle.queue.take(&mut batch) {
            Ok(taken) => taken,
            Err(close) => return Err(Exit::Close(close)),
        };
        if batch.is_empty() {
            self.batch = batch;
            return Ok(());
        }
        let metrics = &self.node.metrics();
        let mut messages = Vec::with_capacity(batch.len());
        let mut room_frames = 0;
        for item in batch.drain(..) {
            match item {
                Outbound::Room { message, frame } => {
                    let Some(subscription) = self.subscriptions.get_mut(message.room.as_str())
                    else {
                        continue;
                    };
                    let same_epoch = message.epoch == subscription.epoch;
                    if same_epoch && message.offset <= subscription.offset {
                        continue;
                    }
                    if let Some(skipped) = &mut subscription.recovering
                        && !(same_epoch && message.offset == subscription.offset + 1)
                    {
                        *skipped = if same_epoch {
                            (*skipped).max(message.offset)
                        } else {
                            u64::MAX
                        };
                        continue;
                    }
                    subscription.offset = message.offset;
                    subscription.epoch.clone_from(&message.epoch);
                    room_frames += 1;
                    messages.push(frame);
                }
                Outbound::Frame { kind, frame } => {
                    metrics.frames_out.with_label_values(&[kind]).inc();
                    messages.push(frame);
                }
            }
        }
        // One update per batch: the counter is shared by every session of the node.
        metrics.message_frames_out.inc_by(room_frames);
        self.batch = batch;
        let wrote = !messages.is_empty();
        let result = self.write_messages(messages).await;
        self.handle.queue.release(taken.bytes);
        if let (Ok(()), true, Some(oldest)) = (&result, wrote, taken.oldest) {
            self.node
                .metrics()
                .queue_wait_seconds
                .observe(oldest.elapsed().as_secs_f64());
        }
        result
    }

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
            () = self.handle.queue.closing() => {
                let close = self.handle.queue.close_request().unwrap_or(CloseRequest {
                    code: close::NORMAL,
                    reason: String::new(),
                });
                return Err(Exit::Close(close));
            }
            () = tokio::time::sleep(self.node.config().idle_timeout) => {
                self.node.metrics().slow_closes.inc();
                tracing::info!("closing a peer that stopped reading");
                return Err(close_with(close::TRY_AGAIN_LATER, "too slow to read: write timed out"));
            }
        };
        match result {
            Ok(()) => {
                self.node.metrics().bytes_out.inc_by(bytes as u64);
                Ok(())
            }
            Err(error) => {
                tracing::debug!(%error, "write failed");
                Err(Exit::Gone)
            }
        }
    }

    /// Encodes and writes frames answering the client, ahead of anything queued.
    async fn write_frames(&mut self, frames: Vec<ServerFrame>) -> Result<(), Exit> {
        let mut messages = Vec::with_capacity(frames.len());
        for frame in &frames {
            match encode(self.handle.codec, frame) {
                Ok(message) => {
                    self.node
                        .metrics()
                        .frames_out
                        .with_label_values(&[frame.kind()])
                        .inc();
                    if let ServerFrame::Error(error) = frame {
                        self.node
                            .metrics()
                            .errors_sent
                            .with_label_values(&[error.code.as_str()])
                            .inc();
                    }
                    messages.push(message);
                }
                Err(error) => {
                    tracing::error!(%error, "cannot encode frame");
                    return Err(close_with(close::INTERNAL, "internal error"));
                }
            }
        }
        self.write_messages(messages).await
    }

    async fn on_heartbeat(&mut self) -> Result<(), Exit> {
        if self.last_inbound.elapsed() > self.node.config().idle_timeout {
            tracing::info!("closing an idle connection");
            return Err(close_with(close::NORMAL, "idle timeout"));
        }
        if let Some(expires_at) = self.identity.expires_at
            && unix_now_secs() > expires_at.saturating_add(self.node.auth().leeway_secs())
        {
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
        let metrics = self.node.metrics().clone();
        let message = match incoming {
            None => return Err(Exit::Gone),
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                return Err(read_error_close(&error).map_or(Exit::Gone, Exit::Close));
            }
        };
        self.last_inbound = Instant::now();
        let payload = match &message {
            Message::Text(text) if self.handle.codec == Codec::Json => text.as_bytes(),
            Message::Binary(bytes) if self.handle.codec == Codec::MsgPack => bytes,
            Message::Text(_) | Message::Binary(_) => {
                metrics.bytes_in.inc_by(message.len() as u64);
                metrics.frames_in.with_label_values(&["invalid"]).inc();
                let text = if self.handle.codec == Codec::Json {
                    "binary frame on the switchboard.v1.json subprotocol: send text frames"
                } else {
                    "text frame on the switchboard.v1.msgpack subprotocol: send binary frames"
                };
                return self.bad_frame(None, text.to_owned()).await;
            }
            Message::Pong(_) if std::mem::take(&mut self.awaiting_pong) => return Ok(()),
            Message::Ping(_) | Message::Pong(_) => {
                // Control frames cost a read and a pong each: a flood of them is abuse like any
                // other. A limited ping gets no pong now (tungstenite keeps the latest pending).
                if self.over_rate("control")? {
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
        metrics.bytes_in.inc_by(payload.len() as u64);
        let frame = match self.handle.codec.decode_client(payload) {
            Ok(frame) => frame,
            Err(error) => {
                metrics.frames_in.with_label_values(&["invalid"]).inc();
                return self
                    .bad_frame_with(error.id, error.code, error.message)
                    .await;
            }
        };
        metrics.frames_in.with_label_values(&[frame.kind()]).inc();
        if self.over_rate("data")? {
            let error = ServerFrame::error(
                frame.id(),
                ErrorCode::RateLimited,
                "too many frames: slow down",
            );
            return self.write_frames(vec![error]).await;
        }
        let frames = self.dispatch(frame).await?;
        if frames.is_empty() {
            Ok(())
        } else {
            self.write_frames(frames).await
        }
    }

    /// Counts one frame against the rate limit: `Ok(true)` when it is over the limit and must be
    /// refused, `Err` (close with 1008) once the client keeps going over it.
    fn over_rate(&mut self, kind: &'static str) -> Result<bool, Exit> {
        let node = self.node.clone();
        let guards = self
            .guards
            .get_or_insert_with(|| Box::new(Guards::new(&node)));
        let Some(rate) = &guards.rate else {
            return Ok(false);
        };
        if rate.check().is_ok() {
            return Ok(false);
        }
        node.metrics().rate_limited.with_label_values(&[kind]).inc();
        if guards.strikes.check().is_err() {
            tracing::info!(kind, "closing: sustained rate-limit abuse");
            return Err(close_with(close::POLICY, "rate limit exceeded"));
        }
        Ok(true)
    }

    async fn bad_frame(&mut self, id: Option<u64>, message: String) -> Result<(), Exit> {
        self.bad_frame_with(id, ErrorCode::BadFrame, message).await
    }

    /// Answers an undecodable frame, closing with 1008 once a client keeps sending them.
    async fn bad_frame_with(
        &mut self,
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    ) -> Result<(), Exit> {
        let node = self.node.clone();
        let guards = self
            .guards
            .get_or_insert_with(|| Box::new(Guards::new(&node)));
        if guards.bad_frames.check().is_err() {
            tracing::info!("closing: too many bad frames");
            return Err(close_with(close::POLICY, "too many bad frames"));
        }
        self.write_frames(vec![ServerFrame::error(id, code, message)])
            .await
    }

    /// Handles one request; returns the frames to write (reply or error first).
    async fn dispatch(&mut self, frame: ClientFrame) -> Result<Vec<ServerFrame>, Exit> {
        let id = frame.id();
        let result = match frame {
            ClientFrame::Subscribe {
                room,
                since,
                presence_events,
                ..
            } => return self.subscribe(id, room, since, presence_events).await,
            ClientFrame::Unsubscribe { room, .. } => self.unsubscribe(room).await,
            ClientFrame::Publish { room, data, .. } => self.publish(room, data).await,
            ClientFrame::Send { to, data, .. } => self.send(to, data).await,
            ClientFrame::Presence { room, .. } => self.presence(room).await,
            ClientFrame::History {
                room, since, limit, ..
            } => self.history(room, since, limit).await,
            ClientFrame::Ping { id } => return Ok(vec![ServerFrame::Pong { id }]),
        };
        Ok(match (result, id) {
            (Ok(reply), Some(id)) => vec![ServerFrame::Reply(Reply { id, ..reply })],
            (Ok(_), None) => Vec::new(),
            (Err((code, message)), id) => vec![ServerFrame::error(id, code, message)],
        })
    }

    fn check_room(&self, room: &str) -> Result<(), (ErrorCode, String)> {
        if valid_room(room) {
            Ok(())
        } else {
            Err((
                ErrorCode::BadFrame,
                "room names are 1 to 256 bytes without control characters".to_owned(),
            ))
        }
    }

    fn check_subscribe_permission(&self, room: &str) -> Result<(), (ErrorCode, String)> {
        self.check_room(room)?;
        if self.identity.rooms.allows(room) {
            Ok(())
        } else {
            Err((
                ErrorCode::Forbidden,
                format!("the token does not allow room {room:?}"),
            ))
        }
    }

    /// Subscribes; with `since`, writes the reply and then the missed messages (see [`recover`]).
    /// Returns the frames still to write: an error, or the reply when there is nothing to recover.
    async fn subscribe(
        &mut self,
        id: Option<u64>,
        room: String,
        since: Option<StreamPosition>,
        presence_events: bool,
    ) -> Result<Vec<ServerFrame>, Exit> {
        let error = |code, message: String| Ok(vec![ServerFrame::error(id, code, message)]);
        if let Err((code, message)) = self.check_subscribe_permission(&room) {
            return error(code, message);
        }
        if self.subscriptions.contains_key(&room) {
            return error(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {room:?}"),
            );
        }
        let max = self.node.config().max_subscriptions;
        if self.subscriptions.len() >= max {
            self.node
                .metrics()
                .limit_refusals
                .with_label_values(&["subscriptions"])
                .inc();
            return error(
                ErrorCode::LimitExceeded,
                format!("a session may be subscribed to at most {max} rooms (--max-subscriptions)"),
            );
        }
        let node = self.node.clone();
        let member = self.member();
        let subscriptions = &mut self.subscriptions;
        let joined = node
            .join_room(
                &room,
                &self.handle,
                &member,
                presence_events,
                since.as_ref(),
                |joined| {
                    let subscription = match (&since, joined.recovered) {
                        // Everything after `since` comes from history, page by page, before any
                        // live message.
                        (Some(since), Some(true)) => Subscription {
                            offset: since.offset,
                            epoch: joined.position.epoch.clone(),
                            recovering: Some(0),
                        },
                        _ => Subscription {
                            offset: joined.position.offset,
                            epoch: joined.position.epoch.clone(),
                            recovering: None,
                        },
                    };
                    subscriptions.insert(room.clone(), subscription);
                },
            )
            .await;
        let Joined {
            position,
            recovered,
            missed,
            more,
        } = match joined {
            Ok(joined) => joined,
            Err(broker_error) => return error(ErrorCode::Unavailable, broker_error.to_string()),
        };
        let recovering = recovered == Some(true);
        let reply = id.map(|id| {
            ServerFrame::Reply(Reply {
                id,
                room: Some(room.clone()),
                offset: Some(position.offset),
                epoch: Some(position.epoch),
                recovered,
                ..Reply::default()
            })
        });
        if !recovering {
            return Ok(reply.into_iter().collect());
        }
        if let Some(reply) = reply {
            self.write_frames(vec![reply]).await?;
        }
        self.recover(&room, missed, more).await?;
        Ok(Vec::new())
    }

    /// Writes what a `since` subscription missed, starting with `missed` (the first page read),
    /// through the outbound queue, one page at a time: the node holds at most the queue's bound
    /// plus one page for this session, and a client that does not read is closed with 1013 as
    /// for live messages. Live messages of the room that come before the pages are skipped
    /// meanwhile and brought by a later page, so the client gets every message once, in order.
    async fn recover(
        &mut self,
        room: &str,
        mut missed: Vec<Arc<RoomMessage>>,
        mut more: bool,
    ) -> Result<(), Exit> {
        let node = self.node.clone();
        loop {
            // Make room for the page (a quarter of the queue), then queue it whole.
            let handle = self.handle.clone();
            let queue = &handle.queue;
            while queue.bytes() > queue.max_bytes() / 2 && !queue.is_empty() {
                self.flush_queue().await?;
            }
            let last = missed.last().map(|message| message.offset);
            let queued_at = Instant::now();
            for message in missed.drain(..) {
                let frame = match encode(self.handle.codec, &ServerFrame::Message(message.clone()))
                {
                    Ok(frame) => frame,
                    Err(error) => {
                        tracing::error!(%error, "cannot encode frame");
                        return Err(close_with(close::INTERNAL, "internal error"));
                    }
                };
                if !node.push(&self.handle, Outbound::Room { message, frame }, queued_at) {
                    return Err(Exit::Close(self.closing_request()));
                }
            }
            while let Some(last) = last
                && self
                    .subscriptions
                    .get(room)
                    .is_some_and(|sub| sub.offset < last)
                && !self.handle.queue.is_empty()
            {
                self.flush_queue().await?;
            }
            let Some(subscription) = self.subscriptions.get_mut(room) else {
                return Ok(());
            };
            let skipped = subscription.recovering.unwrap_or(0);
            if !more && skipped <= subscription.offset {
                subscription.recovering = None;
                return Ok(());
            }
            subscription.recovering = Some(0);
            let since = StreamPosition {
                offset: subscription.offset,
                epoch: subscription.epoch.clone(),
            };
            let history = match node.recovery_history(room, since).await {
                Ok(history) => history,
                Err(_) => {
                    return Err(close_with(
                        close::TRY_AGAIN_LATER,
                        "broker unavailable during recovery, resume with since",
                    ));
                }
            };
            if !history.recovered {
                tracing::info!(%room, "history moved on during recovery");
                return Err(close_with(
                    close::TRY_AGAIN_LATER,
                    "too slow to recover: resume with since",
                ));
            }
            missed = history.messages;
            more = history.more;
        }
    }

    /// The close the outbound queue asked for (it overflowed or was closed meanwhile).
    fn closing_request(&self) -> CloseRequest {
        self.handle.queue.close_request().unwrap_or(CloseRequest {
            code: close::TRY_AGAIN_LATER,
            reason: "too slow to read: outbound queue full".to_owned(),
        })
    }

    async fn unsubscribe(&mut self, room: String) -> Result<Reply, (ErrorCode, String)> {
        if self.subscriptions.remove(&room).is_none() {
            return Err((
                ErrorCode::NotSubscribed,
                format!("not subscribed to {room:?}"),
            ));
        }
        self.node
            .leave_room(&room, &self.handle, &self.member())
            .await;
        Ok(Reply::default())
    }

    async fn publish(&mut self, room: String, data: Value) -> Result<Reply, (ErrorCode, String)> {
        self.check_room(&room)?;
        if is_system_room(&room) {
            return Err((
                ErrorCode::Forbidden,
                format!("room {room:?} is read-only: only the nodes publish to $sys. rooms"),
            ));
        }
        if !self.identity.publish.allows(&room) {
            return Err((
                ErrorCode::Forbidden,
                format!("the token does not allow publishing to {room:?}"),
            ));
        }
        let sender = self.sender();
        self.node
            .check_room_frame(&room, &data, Some(&sender))
            .map_err(|message| (ErrorCode::TooLarge, message))?;
        let message = self
            .node
            .publish(&room, data, Some(sender))
            .await
            .map_err(|error| {
                let code = match error {
                    switchboard_broker::BrokerError::UnknownOutcome(_) => ErrorCode::UnknownOutcome,
                    _ => ErrorCode::Unavailable,
                };
                (code, error.to_string())
            })?;
        Ok(Reply {
            offset: Some(message.offset),
            epoch: Some(message.epoch.clone()),
            ..Reply::default()
        })
    }

    async fn send(&mut self, to: String, data: Value) -> Result<Reply, (ErrorCode, String)> {
        if !valid_user(&to) {
            return Err((
                ErrorCode::BadFrame,
                format!("user ids are 1 to {MAX_USER_LEN} bytes without control characters"),
            ));
        }
        if !self.identity.send.allows(&to) {
            return Err((
                ErrorCode::Forbidden,
                format!("the token does not allow sending to {to:?}"),
            ));
        }
        let sender = self.sender();
        self.node
            .check_direct_frame(&data, Some(&sender))
            .map_err(|message| (ErrorCode::TooLarge, message))?;
        let message = DirectMessage {
            user: to,
            data,
            from: Some(sender),
        };
        let sessions = self
            .node
            .send(message)
            .await
            .map_err(|error| (ErrorCode::Unavailable, error.to_string()))?;
        Ok(Reply {
            sessions: Some(sessions),
            ..Reply::default()
        })
    }

    async fn presence(&mut self, room: String) -> Result<Reply, (ErrorCode, String)> {
        self.check_subscribe_permission(&room)?;
        let members = self
            .node
            .presence(&room)
            .await
            .map_err(|error| (ErrorCode::Unavailable, error.to_string()))?;
        Ok(fit_presence_reply(
            self.handle.codec,
            self.node.config().max_message_size,
            members,
        ))
    }

    async fn history(
        &mut self,
        room: String,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    ) -> Result<Reply, (ErrorCode, String)> {
        self.check_subscribe_permission(&room)?;
        let limit = limit.map_or(self.node.config().history_size, |limit| limit as usize);
        let query = HistoryQuery {
            since,
            limit: Some(limit.min(MAX_HISTORY_LIMIT)),
            max_bytes: Some(self.node.config().max_message_size),
        };
        let history = self
            .node
            .history(&room, query)
            .await
            .map_err(|error| (ErrorCode::Unavailable, error.to_string()))?;
        let reply = Reply {
            messages: Some(history.messages),
            offset: Some(history.position.offset),
            epoch: Some(history.position.epoch),
            more: history.more,
            ..Reply::default()
        };
        fit_history_reply(
            self.handle.codec,
            self.node.config().max_message_size,
            reply,
        )
    }

    /// Sends the close frame (if the server is closing) and removes the session everywhere.
    async fn finish(&mut self, exit: Exit) {
        if let Exit::Close(request) = &exit {
            self.node.metrics().close_sent(request.code);
            tracing::debug!(code = request.code, reason = %request.reason, "closing session");
            let frame = CloseFrame {
                code: CloseCode::from(request.code),
                reason: request.reason.as_str().into(),
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
        }
        let member = self.member();
        let rooms: Vec<String> = self.subscriptions.keys().cloned().collect();
        for room in rooms {
            self.node.leave_room(&room, &self.handle, &member).await;
            self.subscriptions.remove(&room);
        }
        self.node
            .unregister_session(&self.handle, &self.record())
            .await;
        tracing::debug!("session closed");
    }

    /// After `finish` panicked: see [`Node::forget_session`].
    async fn forget(&mut self, rooms: &[String]) {
        self.subscriptions.clear();
        let (member, record) = (self.member(), self.record());
        self.node
            .forget_session(&self.handle, rooms, &member, &record)
            .await;
    }
}

/// A `presence` reply with as many members as fit in one frame of `limit` bytes (with any id),
/// marked `more` when some were left out: a crowded room must not make a frame over the limit.
fn fit_presence_reply(codec: Codec, limit: usize, mut members: Vec<Member>) -> Reply {
    let empty = Reply {
        id: u64::MAX,
        members: Some(Vec::new()),
        more: true,
        ..Reply::default()
    };
    let mut used = codec.encoded_len(&ServerFrame::Reply(empty));
    let mut fits = 0;
    for member in &members {
        // As for history: its encoding, a separator, and room for MessagePack's array header.
        let cost = codec.encoded_len(member) + 1;
        if used + cost + 4 > limit {
            break;
        }
        used += cost;
        fits += 1;
    }
    let more = fits < members.len();
    members.truncate(fits);
    Reply {
        members: Some(members),
        more,
        ..Reply::default()
    }
}

/// Cuts a `history` reply's messages to what fits in one frame of `limit` bytes (with any id),
/// marking it `more` when it cut. A first message that does not fit alone (only possible for
/// messages published before the limit was lowered) is an error naming its offset.
fn fit_history_reply(
    codec: Codec,
    limit: usize,
    mut reply: Reply,
) -> Result<Reply, (ErrorCode, String)> {
    let messages = reply.messages.take().unwrap_or_default();
    // Measured with the largest id, so the real reply is no larger.
    let measure = |reply: &Reply| {
        codec.encoded_len(&ServerFrame::Reply(Reply {
            id: u64::MAX,
            ..reply.clone()
        }))
    };
    let mut empty = reply.clone();
    empty.messages = Some(Vec::new());
    empty.more = true;
    let mut used = measure(&empty);
    let mut fits = 0;
    for message in &messages {
        // A message in the array costs its own encoding plus at most a separator; MessagePack's
        // array header grows by at most 4 bytes past 15 elements.
        let cost = codec.encoded_len(message) + 1;
        if used + cost + 4 > limit {
            break;
        }
        used += cost;
        fits += 1;
    }
    if fits == 0 && !messages.is_empty() {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "the message at offset {} does not fit in a frame of the {limit}-byte message size limit",
                messages[0].offset
            ),
        ));
    }
    let cut = fits < messages.len();
    let mut messages = messages;
    messages.truncate(fits);
    reply.messages = Some(messages);
    reply.more |= cut;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn reply_with(count: u64, size: usize) -> Reply {
        let messages = (1..=count)
            .map(|offset| {
                Arc::new(RoomMessage {
                    room: "r".to_owned(),
                    data: json!("x".repeat(size)),
                    offset,
                    epoch: "0123456789abcdef".to_owned(),
                    from: None,
                })
            })
            .collect();
        Reply {
            id: 7,
            messages: Some(messages),
            offset: Some(count),
            epoch: Some("0123456789abcdef".to_owned()),
            ..Reply::default()
        }
    }

    #[test]
    fn a_history_reply_is_cut_to_the_size_limit_and_says_more() {
        for codec in Codec::ALL {
            let limit = 4096;
            let reply = fit_history_reply(codec, limit, reply_with(10, 1000)).unwrap();
            let kept = reply.messages.as_ref().unwrap().len();
            assert!((1..10).contains(&kept), "{codec:?} kept {kept}");
            assert!(reply.more);
            let frame = ServerFrame::Reply(Reply {
                id: u64::MAX,
                ..reply
            });
            assert!(codec.encode(&frame).unwrap().len() <= limit);

            let whole = fit_history_reply(codec, limit, reply_with(2, 100)).unwrap();
            assert_eq!(whole.messages.unwrap().len(), 2);
            assert!(!whole.more);
        }
    }

    #[test]
    fn a_presence_reply_is_cut_to_the_size_limit_and_says_more() {
        let members: Vec<Member> = (0..100)
            .map(|n| Member {
                user: format!("user-{n}"),
                session: format!("{n:016x}"),
                info: Some(json!({"name": "x".repeat(100)})),
            })
            .collect();
        for codec in Codec::ALL {
            let reply = fit_presence_reply(codec, 4096, members.clone());
            let kept = reply.members.as_ref().unwrap().len();
            assert!((1..100).contains(&kept), "{codec:?} kept {kept}");
            assert!(reply.more);
            let frame = ServerFrame::Reply(Reply {
                id: u64::MAX,
                ..reply
            });
            assert!(codec.encode(&frame).unwrap().len() <= 4096);
            let all = fit_presence_reply(codec, 1 << 20, members.clone());
            assert_eq!(all.members.unwrap().len(), 100);
            assert!(!all.more);
        }
    }

    #[test]
    fn a_stored_message_larger_than_the_limit_is_refused_by_offset() {
        let (code, message) = fit_history_reply(Codec::Json, 512, reply_with(1, 1000)).unwrap_err();
        assert_eq!(code, ErrorCode::TooLarge);
        assert!(message.contains("offset 1"), "{message}");
    }
}
