use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use switchboard_protocol::{ClientFrame, Member, Reply, RoomMessage, StreamPosition};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::driver::{self, Answer, Command, Driver, Outbound, SessionInfo};
use crate::inbox;
use crate::options::Config;
use crate::{
    ClientError, ConnectOptions, Event, InboxPosition, PublishOptions, Published, SendOptions, Sent,
};

/// What a `subscribe` reply says about the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The room's latest offset (0 when nothing was published yet).
    pub offset: u64,
    /// The room's current epoch.
    pub epoch: String,
    /// With `since`: whether every missed message follows (else reload the room's state).
    pub recovered: bool,
}

/// Options of [`Client::subscribe_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Resume after this position: the missed messages arrive before any live one.
    pub since: Option<StreamPosition>,
    /// Receive `join` / `leave` events for the room.
    pub presence_events: bool,
}

/// A page of a room's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryReply {
    pub messages: Vec<Arc<RoomMessage>>,
    /// The room's latest offset.
    pub offset: u64,
    pub epoch: String,
    /// The reply stopped early to stay within the server's message size limit: ask again with
    /// `since` set to the last message's position for the next page.
    pub more: bool,
}

/// A connection to a switchboard server that survives drops.
///
/// A background task owns the socket; this handle only talks to it, so it is cheap to clone and
/// every clone drives the same connection. The task ends, closing the connection, when
/// [`close`](Client::close) is called or the last handle is dropped.
///
/// Events are buffered without bound until read with [`next_event`](Client::next_event): a
/// client consumes its own events, so a bound would only move the stall elsewhere. Read them.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    /// The events, and (with automatic acks) the seq of the persisted direct handed out last.
    events: tokio::sync::Mutex<(mpsc::UnboundedReceiver<Event>, Option<u64>)>,
    auto_ack: bool,
    session: Arc<Mutex<SessionInfo>>,
    next_id: Arc<AtomicU64>,
    request_timeout: Duration,
    retry: bool,
    retry_window: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.info();
        f.debug_struct("Client")
            .field("session", &info.session)
            .field("user", &info.user)
            .field("node", &info.node)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, waits for the server's `welcome` (within `request_timeout`) and starts the
    /// background task. Must be called inside a tokio runtime. The first connection is not
    /// retried: a wrong URL or token fails here instead of looping.
    pub async fn connect(url: &str, options: ConnectOptions) -> Result<Client, ClientError> {
        let config = Arc::new(Config::new(url, options)?);
        let connection = driver::connect(&config).await?;
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let (event_sender, events) = mpsc::unbounded_channel();
        let session = Arc::new(Mutex::new(connection.info.clone()));
        let next_id = Arc::new(AtomicU64::new(1));
        let request_timeout = config.request_timeout;
        let (retry, retry_window) = (config.retry, config.retry_window);
        let auto_ack = config.auto_ack;
        let driver = Driver::new(
            config,
            command_receiver,
            event_sender,
            Arc::clone(&session),
            Arc::clone(&next_id),
        );
        tokio::spawn(driver.run(connection));
        Ok(Client {
            inner: Arc::new(Inner {
                commands,
                events: tokio::sync::Mutex::new((events, None)),
                auto_ack,
                session,
                next_id,
                request_timeout,
                retry,
                retry_window,
            }),
        })
    }

    fn info(&self) -> SessionInfo {
        self.inner
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The session id from the latest `welcome` (it changes on reconnect).
    pub fn session(&self) -> String {
        self.info().session
    }

    /// The user id the server assigned.
    pub fn user(&self) -> String {
        self.info().user
    }

    /// The node serving the current connection.
    pub fn node(&self) -> String {
        self.info().node
    }

    /// The user's inbox as last heard: from the latest `welcome` (updated before
    /// [`Event::Connected`]), raised by persisted directs and acks. Always `Some`: every
    /// welcome carries one, and a welcome without `inbox` (a server older than the inbox)
    /// reads as an empty inbox (seq and acked 0, epoch `""`).
    pub fn inbox(&self) -> Option<InboxPosition> {
        Some(self.info().inbox)
    }

    /// The next event, in arrival order; `None` after [`Event::Closed`]. Clones share one
    /// stream: each event goes to one caller. With
    /// [`auto_ack`](ConnectOptions::auto_ack), a call after an [`Event::PersistedDirect`]
    /// acknowledges it.
    pub async fn next_event(&self) -> Option<Event> {
        let mut events = self.inner.events.lock().await;
        let (receiver, handed_out) = &mut *events;
        // Asking for more means the application is done with the persisted direct it took last.
        if let Some(seq) = handed_out.take() {
            let _ = self.inner.commands.send(Command::Handled(seq));
        }
        let event = receiver.recv().await;
        if self.inner.auto_ack
            && let Some(Event::PersistedDirect { seq, .. }) = &event
        {
            *handed_out = Some(*seq);
        }
        event
    }

    /// Subscribes to a room; its messages arrive as [`Event::Message`].
    pub async fn subscribe(&self, room: impl Into<String>) -> Result<Subscription, ClientError> {
        self.subscribe_with(room, SubscribeOptions::default()).await
    }

    /// Subscribes with a resume position and/or presence events. The client resubscribes on
    /// every reconnect, from the last position it saw.
    pub async fn subscribe_with(
        &self,
        room: impl Into<String>,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        let room = room.into();
        let reply = self
            .reply(|id| ClientFrame::Subscribe {
                room,
                id: Some(id),
                since: options.since,
                presence_events: options.presence_events,
            })
            .await?;
        Ok(Subscription {
            offset: reply.offset.ok_or_else(|| missing("offset"))?,
            epoch: reply.epoch.ok_or_else(|| missing("epoch"))?,
            recovered: reply.recovered.unwrap_or(false),
        })
    }

    /// Leaves a room (and stops resubscribing it).
    pub async fn unsubscribe(&self, room: impl Into<String>) -> Result<(), ClientError> {
        let room = room.into();
        self.reply(|id| ClientFrame::Unsubscribe { room, id: Some(id) })
            .await
            .map(drop)
    }

    /// Publishes to a room; returns the message's offset.
    pub async fn publish(&self, room: impl Into<String>, data: Value) -> Result<u64, ClientError> {
        let room = room.into();
        let reply = self
            .reply(|id| ClientFrame::Publish {
                room,
                data,
                id: Some(id),
                key: None,
            })
            .await?;
        reply.offset.ok_or_else(|| missing("offset"))
    }

    /// Sends to every session of a user; returns how many sessions it reached. With
    /// authentication on, the token's `send` claim must allow `user` (else `forbidden`).
    pub async fn send(&self, user: impl Into<String>, data: Value) -> Result<u64, ClientError> {
        let to = user.into();
        let reply = self
            .reply(|id| ClientFrame::Send {
                to,
                data,
                id: Some(id),
                persist: false,
                key: None,
            })
            .await?;
        reply.sessions.ok_or_else(|| missing("sessions"))
    }

    /// Publishes with an idempotency key and/or retry through a reconnect (see
    /// [`PublishOptions`]); the answer says whether the key had been used already.
    pub async fn publish_with(
        &self,
        room: impl Into<String>,
        data: Value,
        options: PublishOptions,
    ) -> Result<Published, ClientError> {
        let retry = options.retry.unwrap_or(self.inner.retry);
        let key = inbox::key_for(options.key, retry)?;
        let room = room.into();
        let reply = self
            .reply_or_retry(
                |id| ClientFrame::Publish {
                    room,
                    data,
                    id: Some(id),
                    key,
                },
                retry,
            )
            .await?;
        Ok(Published {
            offset: reply.offset.ok_or_else(|| missing("offset"))?,
            epoch: reply.epoch.ok_or_else(|| missing("epoch"))?,
            duplicate: reply.duplicate,
        })
    }

    /// Sends to every session of a user after storing the message in the user's inbox, from
    /// which it is delivered to sessions that connect later, until acknowledged. Same
    /// permission as [`send`](Client::send). `key` and `retry` work as for
    /// [`publish_with`](Client::publish_with).
    pub async fn send_persisted(
        &self,
        user: impl Into<String>,
        data: Value,
        options: SendOptions,
    ) -> Result<Sent, ClientError> {
        let retry = options.retry.unwrap_or(self.inner.retry);
        let key = inbox::key_for(options.key, retry)?;
        let to = user.into();
        let reply = self
            .reply_or_retry(
                |id| ClientFrame::Send {
                    to,
                    data,
                    id: Some(id),
                    persist: true,
                    key,
                },
                retry,
            )
            .await?;
        Ok(Sent {
            sessions: reply.sessions.ok_or_else(|| missing("sessions"))?,
            seq: reply.seq.ok_or_else(|| missing("seq"))?,
            duplicate: reply.duplicate,
        })
    }

    /// Acknowledges every inbox message of this user up to `seq` (cumulative, for every
    /// session of the user). A seq beyond the inbox's latest is refused with `bad_frame`.
    pub async fn ack(&self, seq: u64) -> Result<(), ClientError> {
        self.request(|id| ClientFrame::Ack { seq, id: Some(id) }, false)
            .await
            .map(drop)
    }

    /// The sessions subscribed to a room.
    pub async fn presence(&self, room: impl Into<String>) -> Result<Vec<Member>, ClientError> {
        let room = room.into();
        let reply = self.reply(|id| ClientFrame::Presence { room, id }).await?;
        reply.members.ok_or_else(|| missing("members"))
    }

    /// A room's stored messages after `since` (from the oldest one kept when `None`), at most
    /// `limit` of them.
    pub async fn history(
        &self,
        room: impl Into<String>,
        since: Option<StreamPosition>,
        limit: Option<u32>,
    ) -> Result<HistoryReply, ClientError> {
        let room = room.into();
        let reply = self
            .reply(|id| ClientFrame::History {
                room,
                id,
                since,
                limit,
            })
            .await?;
        Ok(HistoryReply {
            messages: reply.messages.unwrap_or_default(),
            offset: reply.offset.ok_or_else(|| missing("offset"))?,
            epoch: reply.epoch.ok_or_else(|| missing("epoch"))?,
            more: reply.more,
        })
    }

    /// An application-level ping; returns the round trip.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        match self
            .request(|id| ClientFrame::Ping { id: Some(id) }, false)
            .await?
        {
            Answer::Pong => Ok(started.elapsed()),
            Answer::Reply(_) => Err(ClientError::Protocol(
                "a reply instead of a pong to ping".to_owned(),
            )),
        }
    }

    /// Writes any WebSocket message as is (for tests of the server's handling of bad input);
    /// nothing waits for an answer. Held back while reconnecting, like requests.
    pub async fn send_raw(&self, frame: Message) -> Result<(), ClientError> {
        self.inner
            .commands
            .send(Command::Send(Outbound::Raw(frame)))
            .map_err(|_| ClientError::Closed)
    }

    /// Closes the connection normally (1000) and stops reconnecting; returns once the
    /// background task is done. Later requests fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.inner.commands.send(Command::Close(ack)).is_ok() {
            // An error means the task already ended, which is what was asked.
            let _ = done.await;
        }
    }

    async fn reply(&self, frame: impl FnOnce(u64) -> ClientFrame) -> Result<Reply, ClientError> {
        self.reply_or_retry(frame, false).await
    }

    /// A request answered by a `reply`; with `retry`, sent again after a reconnect (a keyed
    /// publish or persisted send).
    async fn reply_or_retry(
        &self,
        frame: impl FnOnce(u64) -> ClientFrame,
        retry: bool,
    ) -> Result<Reply, ClientError> {
        match self.request(frame, retry).await? {
            Answer::Reply(reply) => Ok(reply),
            Answer::Pong => Err(ClientError::Protocol(
                "a pong instead of a reply".to_owned(),
            )),
        }
    }

    /// Sends a request with a fresh id and waits for its answer, at most `request_timeout`
    /// (time held back during a reconnect included), or `retry_window` for one retried
    /// through reconnects.
    async fn request(
        &self,
        frame: impl FnOnce(u64) -> ClientFrame,
        retry: bool,
    ) -> Result<Answer, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Send(Outbound::Request {
                id,
                frame: frame(id),
                reply,
                retry,
            }))
            .map_err(|_| ClientError::Closed)?;
        let mut guard = CancelOnDrop {
            id,
            commands: &self.inner.commands,
            armed: true,
        };
        let limit = if retry {
            self.inner.retry_window
        } else {
            self.inner.request_timeout
        };
        let answer = tokio::time::timeout(limit, answer).await;
        guard.armed = answer.is_err();
        match answer {
            Ok(Ok(result)) => result,
            // The task dropped the request: it is shutting down for good.
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }
}

/// Tells the task to forget a request whose caller stopped waiting (timed out, or its future
/// was dropped), so abandoned requests do not pile up.
struct CancelOnDrop<'a> {
    id: u64,
    commands: &'a mpsc::UnboundedSender<Command>,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

fn missing(field: &str) -> ClientError {
    ClientError::Protocol(format!("reply without {field}"))
}
