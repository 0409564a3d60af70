//! The background task that owns the socket: it writes requests, routes answers to their
//! callers, turns everything else into events, and reconnects when the connection drops.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use switchboard_protocol::{
    ClientFrame, Codec, EncodeError, Encoded, ErrorCode, ErrorFrame, Reply, Sender, ServerFrame,
    StreamPosition, close,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::inbox::{InboxPosition, InboxState};
use crate::options::Config;
use crate::rooms::Rooms;
use crate::{ClientError, Event};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long to wait for the peer's side of a close handshake before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What answers a request: a `reply`, or a `pong` for `ping`.
#[derive(Debug)]
pub(crate) enum Answer {
    Reply(Reply),
    Pong,
}

pub(crate) type AnswerSender = oneshot::Sender<Result<Answer, ClientError>>;

/// Something to write to the socket; held back while reconnecting.
#[derive(Debug)]
pub(crate) enum Outbound {
    Request {
        id: u64,
        frame: ClientFrame,
        reply: AnswerSender,
        /// Sent again, with the same id and key, after a reconnect when the connection dropped
        /// before the answer.
        retry: bool,
    },
    Raw(Message),
}

/// What a [`Client`](crate::Client) handle asks of the task.
#[derive(Debug)]
pub(crate) enum Command {
    Send(Outbound),
    /// The caller stopped waiting (timeout or dropped future): forget the request.
    Cancel(u64),
    /// The application is done with the persisted direct `seq` (automatic acks).
    Handled(u64),
    /// Close normally, stop reconnecting, then acknowledge.
    Close(oneshot::Sender<()>),
}

/// Who this connection is, from the latest `welcome`.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    pub(crate) session: String,
    pub(crate) user: String,
    pub(crate) node: String,
    /// The user's inbox as last heard: the welcome's, raised by persisted directs and acks.
    pub(crate) inbox: InboxPosition,
}

/// A welcomed connection, ready to serve.
#[derive(Debug)]
pub(crate) struct Connection {
    socket: Socket,
    pub(crate) info: SessionInfo,
    /// The server's heartbeat interval; `None` when it announced 0 (no keepalive).
    heartbeat: Option<Duration>,
}

/// Opens a connection and waits for its `welcome`, within the request timeout.
pub(crate) async fn connect(config: &Config) -> Result<Connection, ClientError> {
    let attempt = async {
        let (mut socket, _response) = tokio_tungstenite::connect_async(config.request()?).await?;
        let (info, heartbeat) = read_welcome(&mut socket, config.codec).await?;
        Ok(Connection {
            socket,
            info,
            heartbeat,
        })
    };
    tokio::time::timeout(config.request_timeout, attempt)
        .await
        .map_err(|_| ClientError::Timeout)?
}

async fn read_welcome(
    socket: &mut Socket,
    codec: Codec,
) -> Result<(SessionInfo, Option<Duration>), ClientError> {
    while let Some(message) = socket.next().await {
        let payload = match message? {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Close(frame) => {
                let (code, reason) = close_details(frame);
                return Err(ClientError::ClosedBeforeWelcome { code, reason });
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        return match codec.decode::<ServerFrame>(&payload) {
            Ok(ServerFrame::Welcome {
                session,
                user,
                node,
                heartbeat_ms,
                inbox,
                ..
            }) => Ok((
                SessionInfo {
                    session,
                    user,
                    node,
                    inbox,
                },
                (heartbeat_ms > 0).then(|| Duration::from_millis(heartbeat_ms)),
            )),
            Ok(other) => Err(ClientError::Protocol(format!(
                "expected a welcome frame first, got {}",
                other.kind()
            ))),
            Err(error) => Err(ClientError::Protocol(format!(
                "undecodable first frame: {error}"
            ))),
        };
    }
    Err(ClientError::ClosedBeforeWelcome {
        code: None,
        reason: "connection ended".to_owned(),
    })
}

fn close_details(frame: Option<CloseFrame>) -> (Option<u16>, String) {
    frame.map_or((None, String::new()), |frame| {
        (Some(u16::from(frame.code)), frame.reason.to_string())
    })
}

fn encode(codec: Codec, frame: &impl serde::Serialize) -> Result<Message, EncodeError> {
    Ok(match codec.encode(frame)? {
        Encoded::Text(text) => Message::Text(text.into()),
        Encoded::Binary(bytes) => Message::Binary(bytes.into()),
    })
}

/// What a subscribe request needs remembered until its reply, to track the room.
#[derive(Debug)]
struct SubscribeIntent {
    room: String,
    since: Option<StreamPosition>,
    presence_events: bool,
}

impl SubscribeIntent {
    fn of(frame: &ClientFrame) -> Option<Self> {
        match frame {
            ClientFrame::Subscribe {
                room,
                since,
                presence_events,
                ..
            } => Some(SubscribeIntent {
                room: room.clone(),
                since: since.clone(),
                presence_events: *presence_events,
            }),
            _ => None,
        }
    }
}

/// A request written to the current connection, waiting for its answer.
#[derive(Debug)]
enum Pending {
    /// Asked by the application, which waits on `reply`.
    App {
        reply: AnswerSender,
        subscribe: Option<SubscribeIntent>,
        /// An `ack`: (seq, the inbox epoch it was sent in).
        ack: Option<(u64, String)>,
        /// Kept to be sent again after a reconnect.
        retry: Option<ClientFrame>,
    },
    /// The task's own resubscribe after a reconnect.
    Resubscribe(SubscribeIntent),
    /// The task's own automatic ack.
    AutoAck { seq: u64, epoch: String },
}

/// Why serving a connection stopped.
enum Ended {
    Dropped {
        code: Option<u16>,
        reason: String,
    },
    ClosedByApp(oneshot::Sender<()>),
    /// Every `Client` handle is gone: nobody can use the connection any more.
    HandleGone,
}

/// How an outage ended.
enum Recovery {
    Reconnected(Box<Connection>),
    Stop(Option<oneshot::Sender<()>>),
}

pub(crate) struct Driver {
    config: Arc<Config>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    session: Arc<Mutex<SessionInfo>>,
    next_id: Arc<AtomicU64>,
    rooms: Rooms,
    pending: HashMap<u64, Pending>,
    /// Frames asked for while reconnecting, written once the next connection is up.
    queued: VecDeque<Outbound>,
    inbox: InboxState,
    /// Frames the task itself wants written (automatic acks), flushed by `serve`.
    outgoing: Vec<Message>,
}

impl Driver {
    pub(crate) fn new(
        config: Arc<Config>,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<Event>,
        session: Arc<Mutex<SessionInfo>>,
        next_id: Arc<AtomicU64>,
    ) -> Self {
        Driver {
            config,
            commands,
            events,
            session,
            next_id,
            rooms: Rooms::default(),
            pending: HashMap::new(),
            queued: VecDeque::new(),
            inbox: InboxState::default(),
            outgoing: Vec::new(),
        }
    }

    /// Serves `connection`, and each one after it, until the client is closed for good.
    pub(crate) async fn run(mut self, mut connection: Connection) {
        let ack = loop {
            let (code, reason) = match self.serve(connection).await {
                Ended::Dropped { code, reason } => (code, reason),
                Ended::ClosedByApp(ack) => {
                    self.fail_pending(|| ClientError::Closed);
                    self.emit(Event::Disconnected {
                        code: Some(close::NORMAL),
                        reason: "closed by the client".to_owned(),
                    });
                    break Some(ack);
                }
                Ended::HandleGone => break None,
            };
            debug!(?code, %reason, "connection dropped");
            self.hold_retries();
            self.fail_pending(|| ClientError::Disconnected);
            self.emit(Event::Disconnected { code, reason });
            if code == Some(close::POLICY) {
                break None;
            }
            match self.recover(code).await {
                Recovery::Reconnected(next) => connection = *next,
                Recovery::Stop(ack) => break ack,
            }
        };
        for outbound in self.queued.drain(..) {
            if let Outbound::Request { reply, .. } = outbound {
                let _ = reply.send(Err(ClientError::Closed));
            }
        }
        self.emit(Event::Closed);
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }

    fn emit(&self, event: Event) {
        // The receiver lives in the client handles; once they are gone nobody listens.
        let _ = self.events.send(event);
    }

    fn fail_pending(&mut self, error: impl Fn() -> ClientError) {
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::App { reply, .. } => {
                    let _ = reply.send(Err(error()));
                }
                Pending::AutoAck { .. } => self.inbox.ack_in_flight = false,
                Pending::Resubscribe(_) => {}
            }
        }
    }

    /// Queues the requests to retry for the next connection, in the order they were sent
    /// (ids grow), with the same id (so a caller that stops waiting can still cancel) and key.
    fn hold_retries(&mut self) {
        let mut ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, pending)| matches!(pending, Pending::App { retry: Some(_), .. }))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(Pending::App {
                reply,
                retry: Some(frame),
                ..
            }) = self.pending.remove(&id)
            {
                self.queued.push_back(Outbound::Request {
                    id,
                    frame,
                    reply,
                    retry: true,
                });
            }
        }
    }

    async fn serve(&mut self, connection: Connection) -> Ended {
        let Connection {
            socket,
            info,
            heartbeat,
        } = connection;
        let (mut sink, mut stream) = socket.split();
        // Updated before the event, so `Client::session()` is current for whoever reacts to it.
        let event = Event::Connected {
            session: info.session.clone(),
            node: info.node.clone(),
        };
        self.inbox.welcome(info.inbox.clone());
        *self.session.lock().unwrap_or_else(PoisonError::into_inner) = info;
        self.emit(event);

        // Resubscribe first, so requests held back during the outage see their rooms again.
        let mut outbox = self.resubscribe_frames();
        while let Some(outbound) = self.queued.pop_front() {
            outbox.extend(self.prepare(outbound));
        }
        // An automatic ack lost with the previous connection.
        outbox.extend(self.auto_ack());
        for message in outbox {
            if let Err(error) = sink.feed(message).await {
                return dropped(error);
            }
        }
        if let Err(error) = sink.flush().await {
            return dropped(error);
        }

        let mut keepalive = heartbeat.map(|period| {
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            (interval, period)
        });
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                incoming = stream.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        Some(Ok(Message::Text(text))) => self.handle_payload(text.as_bytes()),
                        Some(Ok(Message::Binary(bytes))) => self.handle_payload(&bytes),
                        Some(Ok(Message::Close(frame))) => {
                            // Let tungstenite write its half of the close handshake.
                            drain(&mut stream).await;
                            let (code, reason) = close_details(frame);
                            return Ended::Dropped { code, reason };
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Err(error)) => return dropped(error),
                        None => {
                            return Ended::Dropped {
                                code: None,
                                reason: "connection ended without a close frame".to_owned(),
                            };
                        }
                    }
                    for message in std::mem::take(&mut self.outgoing) {
                        if let Err(error) = sink.send(message).await {
                            return dropped(error);
                        }
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Send(outbound)) => {
                        self.note_unsubscribe(&outbound);
                        if let Some(message) = self.prepare(outbound)
                            && let Err(error) = sink.send(message).await
                        {
                            return dropped(error);
                        }
                    }
                    Some(Command::Cancel(id)) => {
                        self.pending.remove(&id);
                    }
                    Some(Command::Handled(seq)) => {
                        self.inbox.handled(seq);
                        if let Some(ack) = self.auto_ack()
                            && let Err(error) = sink.send(ack).await
                        {
                            return dropped(error);
                        }
                    }
                    Some(Command::Close(ack)) => {
                        close_normally(&mut sink, &mut stream).await;
                        return Ended::ClosedByApp(ack);
                    }
                    None => {
                        close_normally(&mut sink, &mut stream).await;
                        return Ended::HandleGone;
                    }
                },
                period = tick(keepalive.as_mut()) => {
                    // A half-open TCP connection never errors: notice the silence instead. The
                    // ping makes a healthy server answer even when it has nothing to say.
                    if last_heard.elapsed() >= period * 2 {
                        return Ended::Dropped {
                            code: None,
                            reason: format!("nothing heard from the server for {:?}", period * 2),
                        };
                    }
                    if let Err(error) = sink.send(Message::Ping(Default::default())).await {
                        return dropped(error);
                    }
                }
            }
        }
    }

    /// Subscribe frames for every tracked room, from its last seen position.
    fn resubscribe_frames(&mut self) -> Vec<Message> {
        let mut frames = Vec::new();
        for point in self.rooms.resume_points() {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let frame = ClientFrame::Subscribe {
                room: point.room.clone(),
                id: Some(id),
                since: Some(point.since.clone()),
                presence_events: point.presence_events,
            };
            match encode(self.config.codec, &frame) {
                Ok(message) => {
                    self.pending.insert(
                        id,
                        Pending::Resubscribe(SubscribeIntent {
                            room: point.room,
                            since: Some(point.since),
                            presence_events: point.presence_events,
                        }),
                    );
                    frames.push(message);
                }
                Err(error) => warn!(room = %point.room, %error, "cannot encode a resubscribe"),
            }
        }
        frames
    }

    /// An unsubscribe takes effect locally at once, so a reconnect racing its reply does not
    /// resubscribe the room.
    fn note_unsubscribe(&mut self, outbound: &Outbound) -> bool {
        match outbound {
            Outbound::Request {
                frame: ClientFrame::Unsubscribe { room, .. },
                ..
            } => self.rooms.unsubscribed(room),
            _ => false,
        }
    }

    /// Encodes an outbound frame and registers what waits for its answer.
    fn prepare(&mut self, outbound: Outbound) -> Option<Message> {
        match outbound {
            Outbound::Raw(message) => Some(message),
            Outbound::Request {
                id,
                frame,
                reply,
                retry,
            } => match encode(self.config.codec, &frame) {
                Ok(message) => {
                    let ack = match &frame {
                        ClientFrame::Ack { seq, .. } => {
                            Some((*seq, self.inbox.position.epoch.clone()))
                        }
                        _ => None,
                    };
                    let pending = Pending::App {
                        reply,
                        subscribe: SubscribeIntent::of(&frame),
                        ack,
                        retry: retry.then(|| frame.clone()),
                    };
                    self.pending.insert(id, pending);
                    Some(message)
                }
                Err(error) => {
                    let _ = reply.send(Err(ClientError::Protocol(format!(
                        "cannot encode {}: {error}",
                        frame.kind()
                    ))));
                    None
                }
            },
        }
    }

    fn handle_payload(&mut self, payload: &[u8]) {
        match self.config.codec.decode::<ServerFrame>(payload) {
            Ok(frame) => self.handle_frame(frame),
            Err(error) => warn!(%error, "undecodable frame from the server"),
        }
    }

    fn handle_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Message(message) => {
                if self.rooms.accept(&message) {
                    self.emit(Event::Message(message));
                }
            }
            ServerFrame::Direct { data, from, seq } => match seq {
                None => self.emit(Event::Direct { data, from }),
                Some(seq) => self.on_persisted_direct(data, from, seq),
            },
            ServerFrame::Broadcast { data } => self.emit(Event::Broadcast { data }),
            ServerFrame::Join(notice) => self.emit(Event::Join(notice)),
            ServerFrame::Leave(notice) => self.emit(Event::Leave(notice)),
            ServerFrame::Reply(reply) => self.on_reply(reply),
            ServerFrame::Error(error) => self.on_error(error),
            ServerFrame::Pong { id } => match id.and_then(|id| self.pending.remove(&id)) {
                Some(Pending::App { reply, .. }) => {
                    let _ = reply.send(Ok(Answer::Pong));
                }
                Some(Pending::Resubscribe(intent)) => {
                    self.resubscribe_failed(intent, id, "answered with a pong");
                }
                Some(Pending::AutoAck { .. }) => self.inbox.ack_in_flight = false,
                None => {}
            },
            ServerFrame::Welcome {
                session,
                user,
                node,
                ..
            } => {
                warn!("a second welcome on one connection");
                let mut info = self.session.lock().unwrap_or_else(PoisonError::into_inner);
                info.session = session;
                info.user = user;
                info.node = node;
            }
            // Only the fallback transports send it; this client speaks WebSocket.
            ServerFrame::Close { code, reason } => {
                warn!(code, %reason, "a close frame on a WebSocket connection");
            }
        }
    }

    fn on_reply(&mut self, reply: Reply) {
        match self.pending.remove(&reply.id) {
            Some(Pending::App {
                reply: waiter,
                subscribe,
                ack,
                ..
            }) => {
                if let Some(intent) = subscribe {
                    self.track(&intent, &reply);
                }
                if let Some((seq, epoch)) = ack {
                    self.inbox.acked(&epoch, seq);
                    self.share_inbox();
                }
                let _ = waiter.send(Ok(Answer::Reply(reply)));
            }
            Some(Pending::AutoAck { seq, epoch }) => {
                self.inbox.ack_in_flight = false;
                self.inbox.acked(&epoch, seq);
                self.share_inbox();
                if let Some(ack) = self.auto_ack() {
                    self.outgoing.push(ack);
                }
            }
            Some(Pending::Resubscribe(intent)) => {
                if self.track(&intent, &reply) {
                    self.emit(Event::Resubscribed {
                        room: intent.room,
                        recovered: reply.recovered.unwrap_or(false),
                    });
                } else {
                    self.resubscribe_failed(
                        intent,
                        Some(reply.id),
                        "reply without offset and epoch",
                    );
                }
            }
            None => debug!(
                id = reply.id,
                "reply to a request nobody waits for any more"
            ),
        }
    }

    /// Records a subscribe reply; false when it lacks the position.
    fn track(&mut self, intent: &SubscribeIntent, reply: &Reply) -> bool {
        let (Some(offset), Some(epoch)) = (reply.offset, reply.epoch.clone()) else {
            return false;
        };
        self.rooms.subscribed(
            &intent.room,
            StreamPosition { offset, epoch },
            intent.since.as_ref(),
            reply.recovered.unwrap_or(false),
            intent.presence_events,
        );
        true
    }

    fn on_error(&mut self, error: ErrorFrame) {
        match error.id.and_then(|id| self.pending.remove(&id)) {
            Some(Pending::AutoAck { .. }) => {
                self.inbox.ack_in_flight = false;
                self.emit(Event::Error(error));
            }
            Some(Pending::App { reply, .. }) => {
                let _ = reply.send(Err(ClientError::Server {
                    code: error.code,
                    message: error.message,
                }));
            }
            Some(Pending::Resubscribe(intent)) => {
                self.rooms.unsubscribed(&intent.room);
                self.emit(Event::ResubscribeFailed {
                    room: intent.room,
                    error,
                });
            }
            None => self.emit(Event::Error(error)),
        }
    }

    /// Hands out a persisted direct new to this client.
    fn on_persisted_direct(&mut self, data: serde_json::Value, from: Option<Sender>, seq: u64) {
        if self.inbox.accept(seq) {
            self.share_inbox();
            self.emit(Event::PersistedDirect { data, from, seq });
        }
    }

    /// An `ack` of the highest seq handed out, unless one is in flight (the next covers what
    /// is handed out meanwhile: acks are cumulative) or nothing is left to acknowledge.
    fn auto_ack(&mut self) -> Option<Message> {
        let (seq, epoch) = self.inbox.ack_due()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match encode(self.config.codec, &ClientFrame::Ack { seq, id: Some(id) }) {
            Ok(message) => {
                self.inbox.ack_in_flight = true;
                self.pending.insert(id, Pending::AutoAck { seq, epoch });
                Some(message)
            }
            Err(error) => {
                warn!(seq, %error, "cannot encode an ack");
                None
            }
        }
    }

    /// Makes the inbox position visible to `Client::inbox`.
    fn share_inbox(&self) {
        self.session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .inbox
            .clone_from(&self.inbox.position);
    }

    fn resubscribe_failed(&mut self, intent: SubscribeIntent, id: Option<u64>, message: &str) {
        warn!(room = %intent.room, message, "resubscribe failed");
        self.rooms.unsubscribed(&intent.room);
        self.emit(Event::ResubscribeFailed {
            room: intent.room,
            error: ErrorFrame {
                id,
                code: ErrorCode::Unknown,
                message: message.to_owned(),
            },
        });
    }

    /// Waits out the back-off and reconnects, holding back requests meanwhile.
    async fn recover(&mut self, close_code: Option<u16>) -> Recovery {
        let mut backoff = Backoff::new(self.config.reconnect.clone(), close_code);
        loop {
            let Some((attempt, delay)) = backoff.next_delay() else {
                warn!("giving up reconnecting");
                return Recovery::Stop(None);
            };
            self.emit(Event::Reconnecting { attempt, delay });
            let config = Arc::clone(&self.config);
            let reconnect = async move {
                tokio::time::sleep(delay).await;
                connect(&config).await
            };
            tokio::pin!(reconnect);
            let result = loop {
                tokio::select! {
                    result = &mut reconnect => break result,
                    command = self.commands.recv() => match command {
                        Some(Command::Send(outbound)) => self.hold(outbound),
                        // Acknowledged after the welcome.
                        Some(Command::Handled(seq)) => self.inbox.handled(seq),
                        Some(Command::Cancel(id)) => self.queued.retain(
                            |outbound| !matches!(outbound, Outbound::Request { id: queued, .. } if *queued == id),
                        ),
                        Some(Command::Close(ack)) => return Recovery::Stop(Some(ack)),
                        None => return Recovery::Stop(None),
                    },
                }
            };
            match result {
                Ok(connection) => return Recovery::Reconnected(Box::new(connection)),
                Err(error) if error.is_permanent() => {
                    warn!(attempt, %error, "reconnect refused; not retrying");
                    return Recovery::Stop(None);
                }
                Err(error) => {
                    debug!(attempt, %error, "reconnect attempt failed");
                    backoff.observe(error.close_code());
                }
            }
        }
    }

    /// Queues a frame for the next connection. Unsubscribing a room the outage already dropped
    /// is answered here: there is nothing left to unsubscribe on the server.
    fn hold(&mut self, outbound: Outbound) {
        if self.note_unsubscribe(&outbound) {
            if let Outbound::Request { id, reply, .. } = outbound {
                let _ = reply.send(Ok(Answer::Reply(Reply {
                    id,
                    ..Reply::default()
                })));
            }
            return;
        }
        self.queued.push_back(outbound);
    }
}

fn dropped(error: tokio_tungstenite::tungstenite::Error) -> Ended {
    Ended::Dropped {
        code: None,
        reason: error.to_string(),
    }
}

/// Resolves at the next keepalive tick, with the period; never without a heartbeat.
async fn tick(keepalive: Option<&mut (Interval, Duration)>) -> Duration {
    match keepalive {
        Some((interval, period)) => {
            interval.tick().await;
            *period
        }
        None => std::future::pending().await,
    }
}

/// Reads (and discards) until the peer finishes the close handshake or the grace period ends.
async fn drain(stream: &mut SplitStream<Socket>) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

async fn close_normally(sink: &mut SplitSink<Socket, Message>, stream: &mut SplitStream<Socket>) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if sink.send(Message::Close(Some(frame))).await.is_ok() {
        drain(stream).await;
    }
}
