//! One WebSocket connection. A single task reads client frames, answers requests and writes the
//! session's outbound queue, so a request's reply and a `since` recovery are written before any
//! live message queued behind them, and per-room offsets drop anything written already.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use switchboard_broker::{DirectMessage, HistoryQuery, SessionRecord};
use switchboard_protocol::{
    ClientFrame, Codec, ErrorCode, Member, Reply, Sender, ServerFrame, StreamPosition, close,
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
use crate::node::{Node, is_system_room, valid_room};
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
}

/// Per-connection abuse limits, made on the first data frame so idle connections don't pay.
struct Guards {
    rate: Option<DefaultDirectRateLimiter>,
    strikes: DefaultDirectRateLimiter,
    bad_frames: DefaultDirectRateLimiter,
}

impl Guards {
    fn new(node: &Node) -> Self {
        let config = &node.config;
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
                node.config.max_queue_bytes,
                node.metrics.queue_bytes.clone(),
            ),
        });
        let mut session = Session {
            node: node.clone(),
            ws,
            handle,
            identity: admission.identity,
            subscriptions: HashMap::new(),
            guards: None,
            last_inbound: Instant::now(),
            batch: Vec::new(),
        };
        node.metrics.connections.inc();
        tracing::debug!(codec = admission.codec.protocol(), "session open");
        let exit = session.serve().await;
        session.finish(exit).await;
        node.metrics.connections.dec();
    }
    .instrument(span)
    .await;
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
        self.node.hub.add_session(self.handle.clone());
        if let Err(error) = self.node.broker.register_session(&self.record()).await {
            self.node.broker_error("register_session", error);
            return close_with(close::TRY_AGAIN_LATER, "broker unavailable, retry later");
        }
        let welcome = ServerFrame::Welcome {
            session: self.handle.id.to_string(),
            user: self.identity.user.clone(),
            node: self.node.id().to_owned(),
            protocol: self.handle.codec.protocol().to_owned(),
            heartbeat_ms: self.node.config.heartbeat.as_millis() as u64,
        };
        if let Err(exit) = self.write_frames(vec![welcome]).await {
            return exit;
        }
        let period = self.node.config.heartbeat;
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
        let metrics = &self.node.metrics;
        let mut messages = Vec::with_capacity(batch.len());
        let mut room_frames = 0;
        for item in batch.drain(..) {
            match item {
                Outbound::Room { message, frame } => {
                    let Some(subscription) = self.subscriptions.get_mut(message.room.as_str())
                    else {
                        continue;
                    };
                    if message.epoch == subscription.epoch && message.offset <= subscription.offset
                    {
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
                .metrics
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
            () = tokio::time::sleep(self.node.config.idle_timeout) => {
                self.node.metrics.slow_closes.inc();
                tracing::info!("closing a peer that stopped reading");
                return Err(close_with(close::TRY_AGAIN_LATER, "too slow to read: write timed out"));
            }
        };
        match result {
            Ok(()) => {
                self.node.metrics.bytes_out.inc_by(bytes as u64);
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
                        .metrics
                        .frames_out
                        .with_label_values(&[frame.kind()])
                        .inc();
                    if let ServerFrame::Error(error) = frame {
                        self.node
                            .metrics
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
        if self.last_inbound.elapsed() > self.node.config.idle_timeout {
            tracing::info!("closing an idle connection");
            return Err(close_with(close::NORMAL, "idle timeout"));
        }
        if let Some(expires_at) = self.identity.expires_at
            && unix_now_secs() > expires_at + self.node.auth.leeway_secs()
        {
            return Err(close_with(close::POLICY, "token expired"));
        }
        self.write_messages(vec![Message::Ping(Default::default())])
            .await
    }

    async fn on_incoming(
        &mut self,
        incoming: Option<Result<Message, WsError>>,
    ) -> Result<(), Exit> {
        let metrics = self.node.metrics.clone();
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
            Message::Ping(_) | Message::Pong(_) => {
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
        let node = self.node.clone();
        let guards = self
            .guards
            .get_or_insert_with(|| Box::new(Guards::new(&node)));
        if let Some(rate) = &guards.rate
            && rate.check().is_err()
        {
            if guards.strikes.check().is_err() {
                tracing::info!("closing: sustained rate-limit abuse");
                return Err(close_with(close::POLICY, "rate limit exceeded"));
            }
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
            } => return Ok(self.subscribe(id, room, since, presence_events).await),
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

    async fn subscribe(
        &mut self,
        id: Option<u64>,
        room: String,
        since: Option<StreamPosition>,
        presence_events: bool,
    ) -> Vec<ServerFrame> {
        let error = |code, message: String| vec![ServerFrame::error(id, code, message)];
        if let Err((code, message)) = self.check_subscribe_permission(&room) {
            return error(code, message);
        }
        if self.subscriptions.contains_key(&room) {
            return error(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {room:?}"),
            );
        }
        let node = self.node.clone();
        if let Err(broker_error) = node.acquire_room(&room).await {
            return error(ErrorCode::Unavailable, broker_error.to_string());
        }
        // Live messages queue from here on; the history read below covers everything before.
        node.hub.join(&room, &self.handle, presence_events);
        let recovery = match &since {
            Some(since) => {
                let query = HistoryQuery {
                    since: Some(since.clone()),
                    limit: None,
                };
                node.broker.history(&room, query).await.map(|history| {
                    let messages = if history.recovered {
                        history.messages
                    } else {
                        Vec::new()
                    };
                    (history.position, Some(history.recovered), messages)
                })
            }
            None => node
                .broker
                .position(&room)
                .await
                .map(|position| (position, None, Vec::new())),
        };
        let (position, recovered, missed) = match recovery {
            Ok(recovery) => recovery,
            Err(broker_error) => {
                let op = if since.is_some() {
                    "history"
                } else {
                    "position"
                };
                let broker_error = node.broker_error(op, broker_error);
                node.hub.leave(&room, &self.handle);
                node.release_room(&room).await;
                return error(ErrorCode::Unavailable, broker_error.to_string());
            }
        };
        self.subscriptions.insert(
            room.clone(),
            Subscription {
                offset: position.offset,
                epoch: position.epoch.clone(),
            },
        );
        if let Err(broker_error) = node.broker.join_presence(&room, &self.member()).await {
            node.broker_error("join_presence", broker_error);
        }
        let mut frames = Vec::with_capacity(missed.len() + 1);
        if let Some(id) = id {
            frames.push(ServerFrame::Reply(Reply {
                id,
                room: Some(room),
                offset: Some(position.offset),
                epoch: Some(position.epoch),
                recovered,
                ..Reply::default()
            }));
        }
        frames.extend(missed.into_iter().map(ServerFrame::Message));
        frames
    }

    async fn unsubscribe(&mut self, room: String) -> Result<Reply, (ErrorCode, String)> {
        if self.subscriptions.remove(&room).is_none() {
            return Err((
                ErrorCode::NotSubscribed,
                format!("not subscribed to {room:?}"),
            ));
        }
        let member = self.member();
        Self::leave_room(&self.node, &self.handle, &member, &room).await;
        Ok(Reply::default())
    }

    /// Leaves a room everywhere. Takes no `&self`: the connection type need not be `Sync`.
    async fn leave_room(
        node: &Arc<Node>,
        handle: &Arc<SessionHandle>,
        member: &Member,
        room: &str,
    ) {
        node.hub.leave(room, handle);
        node.release_room(room).await;
        if let Err(error) = node.broker.leave_presence(room, member).await {
            node.broker_error("leave_presence", error);
        }
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
        let message = self
            .node
            .publish(&room, data, Some(self.sender()))
            .await
            .map_err(|error| (ErrorCode::Unavailable, error.to_string()))?;
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
        let message = DirectMessage {
            user: to,
            data,
            from: Some(self.sender()),
        };
        let sessions = self.node.broker.send(message).await.map_err(|error| {
            (
                ErrorCode::Unavailable,
                self.node.broker_error("send", error).to_string(),
            )
        })?;
        Ok(Reply {
            sessions: Some(sessions),
            ..Reply::default()
        })
    }

    async fn presence(&mut self, room: String) -> Result<Reply, (ErrorCode, String)> {
        self.check_subscribe_permission(&room)?;
        let members = self.node.broker.presence(&room).await.map_err(|error| {
            (
                ErrorCode::Unavailable,
                self.node.broker_error("presence", error).to_string(),
            )
        })?;
        Ok(Reply {
            members: Some(members),
            ..Reply::default()
        })
    }

    async fn history(
        &mut self,
        room: String,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    ) -> Result<Reply, (ErrorCode, String)> {
        self.check_subscribe_permission(&room)?;
        let limit = limit.map_or(self.node.config.history_size, |limit| limit as usize);
        let query = HistoryQuery {
            since,
            limit: Some(limit.min(MAX_HISTORY_LIMIT)),
        };
        let history = self
            .node
            .broker
            .history(&room, query)
            .await
            .map_err(|error| {
                (
                    ErrorCode::Unavailable,
                    self.node.broker_error("history", error).to_string(),
                )
            })?;
        Ok(Reply {
            messages: Some(history.messages),
            offset: Some(history.position.offset),
            epoch: Some(history.position.epoch),
            ..Reply::default()
        })
    }

    /// Sends the close frame (if the server is closing) and removes the session everywhere.
    async fn finish(&mut self, exit: Exit) {
        if let Exit::Close(request) = &exit {
            self.node.metrics.close_sent(request.code);
            tracing::debug!(code = request.code, reason = %request.reason, "closing session");
            let frame = CloseFrame {
                code: CloseCode::from(request.code),
                reason: request.reason.as_str().into(),
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
        }
        let member = self.member();
        let rooms: Vec<String> = self.subscriptions.drain().map(|(room, _)| room).collect();
        for room in rooms {
            Self::leave_room(&self.node, &self.handle, &member, &room).await;
        }
        self.node.hub.remove_session(&self.handle);
        if let Err(error) = self.node.broker.unregister_session(&self.record()).await {
            self.node.broker_error("unregister_session", error);
        }
        tracing::debug!("session closed");
    }
}
