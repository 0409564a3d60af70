//! [`TransportClient`]: one test client for every transport of the protocol: the WebSocket at
//! `/ws`, the SSE stream at `/sse` and the long poll at `/poll`, the last two with their frames
//! POSTed to `/sse/{session}` or `/poll/{session}`. A test is written once against it and run
//! per [`Transport`]. Every wait ends at [`DEADLINE`] and fails with what came instead.
//!
//! The SSE stream and the polls are read by a task of their own into a channel, so a frame is
//! never lost because a test stopped waiting: a long poll dropped half way could have carried
//! frames the server then counts as delivered.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard_protocol::{
    ClientFrame, Codec, ErrorCode, InboxState, Reply, RoomMessage, ServerFrame,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::{DEADLINE, Handshake, RawClient, raw_handshake};

/// The response header of `GET /poll` that names the session (a load balancer sticks polls
/// with it).
pub const SESSION_HEADER: &str = "X-Switchboard-Session";

/// How a session talks to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
    Poll,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::Poll];

    /// The transport's label in metrics (`switchboard_sessions{transport=…}`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }

    /// What the `welcome` says in `transport`: nothing on a WebSocket.
    pub fn welcome_name(self) -> Option<&'static str> {
        match self {
            Transport::WebSocket => None,
            fallback => Some(fallback.name()),
        }
    }

    /// Where a session of this transport is opened (and, for the fallbacks, the prefix of the
    /// paths its frames are POSTed to).
    pub fn path(self) -> &'static str {
        match self {
            Transport::WebSocket => "/ws",
            Transport::Sse => "/sse",
            Transport::Poll => "/poll",
        }
    }

    /// Another transport than this one, so that tests see two transports meet.
    pub fn other(self) -> Transport {
        match self {
            Transport::WebSocket => Transport::Sse,
            Transport::Sse => Transport::Poll,
            Transport::Poll => Transport::WebSocket,
        }
    }

    pub fn is_fallback(self) -> bool {
        self != Transport::WebSocket
    }
}

/// Who the session is: `?user=` (nodes without authentication), `?token=`, or neither.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    User(&'a str),
    Token(&'a str),
    Anonymous,
}

impl Auth<'_> {
    fn query(&self) -> String {
        match self {
            Auth::User(user) => format!("?user={user}"),
            Auth::Token(token) => format!("?token={token}"),
            Auth::Anonymous => String::new(),
        }
    }
}

/// Extra settings of [`TransportClient::open`].
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    /// Request headers of the opening request (e.g. `Origin`).
    pub headers: &'a [(&'a str, &'a str)],
    /// Where the fallback transports POST their frames; the opening address when `None`.
    pub post_to: Option<SocketAddr>,
}

/// What a session receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(ServerFrame),
    /// The server closed the session with this code: a WebSocket close frame, or a fallback
    /// transport's last `{"type":"close"}` frame (after which its stream ended).
    Closed(u16),
    /// The connection ended without a close (a killed node), or a poll found the session gone;
    /// why, for the test's message.
    Ended(String),
}

/// An answer of the HTTP side of the fallback transports.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
}

impl HttpAnswer {
    /// The `code` of a JSON error body.
    pub fn code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()?
            .get("code")?
            .as_str()
            .map(str::to_owned)
    }

    /// The status and, for an error, its code must be these.
    pub fn expect(&self, status: u16, code: Option<&str>) -> Result<()> {
        ensure!(
            self.status == status && self.code().as_deref() == code,
            "expected {status} {code:?}, got {} {}",
            self.status,
            self.body
        );
        Ok(())
    }
}

enum Link {
    WebSocket(Box<RawClient>),
    Fallback {
        events: mpsc::UnboundedReceiver<Result<Event>>,
        reader: JoinHandle<()>,
    },
}

/// One session on any transport.
pub struct TransportClient {
    pub transport: Transport,
    pub welcome: ServerFrame,
    pub session: String,
    pub user: String,
    pub node: String,
    pub inbox: InboxState,
    /// The secret of the fallback transports' POSTs and polls; `None` on a WebSocket.
    pub session_key: Option<String>,
    link: Link,
    http: reqwest::Client,
    /// `http://host:port` where frames are POSTed.
    post_base: String,
    /// Set once an [`Event::Closed`] or [`Event::Ended`] was read: nothing follows it.
    finished: bool,
}

/// Opening a session: accepted (its client, the `welcome` read) or refused with an HTTP status.
pub enum Opened {
    Open(Box<TransportClient>),
    Refused { status: u16, body: String },
}

impl TransportClient {
    /// Opens a session on `addr` (a node's public address, or HAProxy's) and reads its
    /// `welcome`, which must be the first frame and carry what the transport's welcome carries.
    pub async fn connect(
        transport: Transport,
        addr: SocketAddr,
        auth: Auth<'_>,
    ) -> Result<TransportClient> {
        Self::connect_with(transport, addr, auth, &Options::default()).await
    }

    pub async fn connect_with(
        transport: Transport,
        addr: SocketAddr,
        auth: Auth<'_>,
        options: &Options<'_>,
    ) -> Result<TransportClient> {
        match Self::open(transport, addr, auth, options).await? {
            Opened::Open(client) => Ok(*client),
            Opened::Refused { status, body } => {
                bail!("{} open refused: {status} {body}", transport.name())
            }
        }
    }

    /// Opens a session that must be refused; returns the status and body.
    pub async fn refused(
        transport: Transport,
        addr: SocketAddr,
        auth: Auth<'_>,
        options: &Options<'_>,
    ) -> Result<(u16, String)> {
        match Self::open(transport, addr, auth, options).await? {
            Opened::Open(client) => bail!(
                "{} open accepted (session {}), expected a refusal",
                transport.name(),
                client.session
            ),
            Opened::Refused { status, body } => Ok((status, body)),
        }
    }

    pub async fn open(
        transport: Transport,
        addr: SocketAddr,
        auth: Auth<'_>,
        options: &Options<'_>,
    ) -> Result<Opened> {
        let http = reqwest::Client::new();
        let post_base = format!("http://{}", options.post_to.unwrap_or(addr));
        let url = format!("{}{}", transport.path(), auth.query());
        let (link, welcome) = match transport {
            Transport::WebSocket => {
                let url = format!("ws://{addr}{url}");
                match raw_handshake(&url, Some(Codec::Json.protocol()), options.headers).await? {
                    Handshake::Refused { status, body } => {
                        return Ok(Opened::Refused { status, body });
                    }
                    Handshake::Open(raw, _) => {
                        let mut link = Link::WebSocket(raw);
                        let welcome = first_frame(&mut link).await?;
                        (link, welcome)
                    }
                }
            }
            Transport::Sse => {
                let response = request(&http, &format!("http://{addr}{url}"), options)
                    .send()
                    .await?;
                if response.status() != 200 {
                    return Ok(refusal(response).await);
                }
                let kind = header(&response, "content-type");
                ensure!(
                    kind.starts_with("text/event-stream"),
                    "/sse answered {kind}"
                );
                ensure!(
                    header(&response, "cache-control") == "no-store",
                    "/sse without Cache-Control: no-store"
                );
                let (sender, events) = mpsc::unbounded_channel();
                let reader = tokio::spawn(read_sse(response, sender));
                let mut link = Link::Fallback { events, reader };
                let welcome = first_frame(&mut link).await?;
                (link, welcome)
            }
            Transport::Poll => {
                let response = request(&http, &format!("http://{addr}{url}"), options)
                    .send()
                    .await?;
                if response.status() != 200 {
                    return Ok(refusal(response).await);
                }
                let session = header(&response, SESSION_HEADER);
                let frames: Vec<ServerFrame> = response.json().await?;
                let [welcome] = <[ServerFrame; 1]>::try_from(frames)
                    .map_err(|frames| anyhow!("GET /poll answered {frames:?}, not [welcome]"))?;
                let ServerFrame::Welcome {
                    session: ref welcomed,
                    ref session_key,
                    ..
                } = welcome
                else {
                    bail!("GET /poll answered [{welcome:?}], not [welcome]");
                };
                ensure!(
                    &session == welcomed,
                    "{SESSION_HEADER} {session:?}, but the welcome names {welcomed}"
                );
                let key = session_key
                    .clone()
                    .context("poll welcome without session_key")?;
                let (sender, events) = mpsc::unbounded_channel();
                let poll_url = format!("http://{addr}/poll/{session}");
                let reader = tokio::spawn(read_polls(http.clone(), poll_url, key, sender));
                (Link::Fallback { events, reader }, welcome)
            }
        };
        let ServerFrame::Welcome {
            session,
            user,
            node,
            inbox,
            transport: welcomed_transport,
            session_key,
            ..
        } = welcome.clone()
        else {
            bail!("the first frame is not a welcome: {welcome:?}");
        };
        ensure!(
            welcomed_transport.as_deref() == transport.welcome_name(),
            "welcome says transport {welcomed_transport:?} on {}",
            transport.name()
        );
        if transport.is_fallback() {
            let key = session_key.as_deref().unwrap_or_default();
            ensure!(
                key.len() == 32
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "session_key {session_key:?} is not 32 lowercase hex characters"
            );
        } else {
            ensure!(
                session_key.is_none(),
                "a WebSocket welcome carries a session_key"
            );
        }
        Ok(Opened::Open(Box::new(TransportClient {
            transport,
            welcome,
            session,
            user,
            node,
            inbox,
            session_key,
            link,
            http,
            post_base,
            finished: false,
        })))
    }

    // ---- sending ------------------------------------------------------------------------------

    /// Sends one frame: a text frame on a WebSocket, a POST (which must be accepted; one refused
    /// with 429 is repeated after its Retry-After) otherwise.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.send_all(std::slice::from_ref(frame)).await
    }

    /// Sends frames at once: one write on a WebSocket, one POST of an array otherwise.
    pub async fn send_all(&mut self, frames: &[ClientFrame]) -> Result<()> {
        match &mut self.link {
            Link::WebSocket(raw) => {
                for frame in frames {
                    let text = serde_json::to_string(frame)?;
                    raw.socket.feed(Message::Text(text.into())).await?;
                }
                raw.socket.flush().await?;
                Ok(())
            }
            Link::Fallback { .. } => {
                let body = if let [frame] = frames {
                    serde_json::to_string(frame)?
                } else {
                    serde_json::to_string(frames)?
                };
                self.post_accepted(body, frames.len()).await
            }
        }
    }

    /// Sends `text` as it is: a text frame on a WebSocket, a POST body (which must be
    /// accepted as one frame) otherwise.
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        match &mut self.link {
            Link::WebSocket(raw) => raw.send_message(Message::Text(text.into())).await,
            Link::Fallback { .. } => self.post_accepted(text.to_owned(), 1).await,
        }
    }

    /// POSTs frames, which must be accepted. A 429 (the front door's per-address connection
    /// rate, or the session's inbound queue full) refused them whole: as a client should, the
    /// POST is repeated after its Retry-After, until [`DEADLINE`].
    async fn post_accepted(&self, body: String, frames: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let answer = loop {
            let answer = self.post(body.clone()).await?;
            if answer.status != 429 || tokio::time::Instant::now() >= deadline {
                break answer;
            }
            tokio::time::sleep(retry_after(&answer)).await;
        };
        ensure!(
            answer.status == 202,
            "POST of {frames} frame(s) answered {} {}",
            answer.status,
            answer.body
        );
        let accepted: Value = serde_json::from_str(&answer.body)?;
        ensure!(
            accepted.get("accepted").and_then(Value::as_u64) == Some(frames as u64),
            "POST of {frames} frame(s) answered {}",
            answer.body
        );
        Ok(())
    }

    /// POSTs `body` for this session, with its key, to where its frames go; any answer.
    pub async fn post(&self, body: impl Into<reqwest::Body>) -> Result<HttpAnswer> {
        let key = self
            .session_key
            .as_deref()
            .context("a WebSocket session has no POST side")?;
        post_frames(
            &self.http,
            &self.post_base,
            self.transport,
            &self.session,
            Some(key),
            body,
        )
        .await
    }

    /// One `GET /poll/{session}` with this session's key at `addr` (another node than the
    /// session's: on its own node it would take the place of the client's pending poll).
    pub async fn poll_at(&self, addr: SocketAddr) -> Result<HttpAnswer> {
        let key = self
            .session_key
            .as_deref()
            .context("a WebSocket session has no poll")?;
        let response = self
            .http
            .get(format!("http://{addr}/poll/{}", self.session))
            .header("Authorization", format!("Session {key}"))
            .send()
            .await?;
        Ok(answer_of(response).await)
    }

    /// One `DELETE /poll/{session}` (ending the session) with this session's key at `addr`.
    pub async fn delete_at(&self, addr: SocketAddr) -> Result<HttpAnswer> {
        let key = self
            .session_key
            .as_deref()
            .context("a WebSocket session has no DELETE")?;
        let response = self
            .http
            .delete(format!("http://{addr}/poll/{}", self.session))
            .header("Authorization", format!("Session {key}"))
            .send()
            .await?;
        Ok(answer_of(response).await)
    }

    /// Ends the session from the client's side: a close frame on a WebSocket, the end of the
    /// stream on SSE. A long-poll session has nothing to close: it stops polling and the node
    /// reaps it after its idle timeout.
    pub async fn close(mut self) {
        if let Link::WebSocket(raw) = &mut self.link {
            let _ = raw.socket.close(None).await;
        }
    }

    // ---- receiving ----------------------------------------------------------------------------

    /// The next frame, close or end; fails when nothing comes within [`DEADLINE`].
    pub async fn next_event(&mut self) -> Result<Event> {
        ensure!(
            !self.finished,
            "the session already ended: nothing can follow"
        );
        let event = next_event(&mut self.link).await?;
        self.finished = !matches!(event, Event::Frame(_));
        Ok(event)
    }

    /// The next frame; fails on a close or an end.
    pub async fn next_frame(&mut self) -> Result<ServerFrame> {
        match self.next_event().await? {
            Event::Frame(frame) => Ok(frame),
            other => bail!(
                "{} session: {other:?} instead of a frame",
                self.transport.name()
            ),
        }
    }

    /// Reads until the server closes the session (skipping frames); returns the close code. On
    /// the fallbacks nothing may follow the close frame: the SSE response ends there, and the
    /// poll that carried it is the last.
    pub async fn expect_close(&mut self) -> Result<u16> {
        loop {
            match self.next_event().await? {
                Event::Frame(_) => {}
                Event::Closed(code) => {
                    if let Link::Fallback { events, .. } = &mut self.link {
                        let after = tokio::time::timeout(DEADLINE, events.recv())
                            .await
                            .context("the stream did not end after the close frame")?;
                        ensure!(after.is_none(), "after the close frame: {after:?}");
                    }
                    return Ok(code);
                }
                Event::Ended(why) => bail!("ended without a close: {why}"),
            }
        }
    }

    /// Sends a request and returns the very next frame, whatever it is.
    pub async fn request(&mut self, frame: &ClientFrame) -> Result<ServerFrame> {
        self.send(frame).await?;
        self.next_frame().await
    }

    /// Sends a request (which must carry an id); the next frame must be its `reply`.
    pub async fn reply(&mut self, frame: &ClientFrame) -> Result<Reply> {
        let id = frame.id().context("requests carry an id")?;
        match self.request(frame).await? {
            ServerFrame::Reply(reply) if reply.id == id => Ok(reply),
            other => bail!("expected the reply to {id}, got {other:?}"),
        }
    }

    /// The next frame must be an `error` with this id and code and a message; returns it.
    pub async fn expect_error(&mut self, id: Option<u64>, code: ErrorCode) -> Result<String> {
        match self.next_frame().await? {
            ServerFrame::Error(error) if error.id == id && error.code == code => {
                ensure!(!error.message.is_empty(), "empty error message");
                Ok(error.message)
            }
            other => bail!("expected error {code} with id {id:?}, got {other:?}"),
        }
    }

    /// A `ping`, whose `pong` must be the next frame: the session is open, answering, and had
    /// nothing else queued.
    pub async fn expect_ping_pong(&mut self, id: u64) -> Result<()> {
        match self.request(&ClientFrame::Ping { id: Some(id) }).await? {
            ServerFrame::Pong { id: Some(got) } if got == id => Ok(()),
            other => bail!("expected pong {id}, got {other:?}"),
        }
    }

    /// Subscribes to `room` (with presence events when asked); the next frame must be the reply.
    pub async fn subscribe(&mut self, room: &str, id: u64, presence_events: bool) -> Result<Reply> {
        let reply = self
            .reply(&ClientFrame::Subscribe {
                room: room.to_owned(),
                id: Some(id),
                since: None,
                presence_events,
            })
            .await?;
        ensure!(reply.room.as_deref() == Some(room), "{reply:?}");
        Ok(reply)
    }

    /// Publishes; the next frame must be the reply, with the offset, which is returned.
    pub async fn publish(&mut self, room: &str, data: Value, id: u64) -> Result<u64> {
        let reply = self
            .reply(&ClientFrame::Publish {
                room: room.to_owned(),
                data,
                id: Some(id),
                key: None,
            })
            .await?;
        reply.offset.context("publish reply without an offset")
    }

    /// The next frame must be a message of `room` with `data`.
    pub async fn expect_message(
        &mut self,
        room: &str,
        data: &Value,
    ) -> Result<std::sync::Arc<RoomMessage>> {
        match self.next_frame().await? {
            ServerFrame::Message(message) if message.room == room && &message.data == data => {
                Ok(message)
            }
            other => bail!("expected a message {data} in {room}, got {other:?}"),
        }
    }
}

/// POSTs `body` to `{base}/{transport}/{session}` with `Authorization: Session {key}` (none when
/// `key` is `None`); any answer.
pub async fn post_frames(
    http: &reqwest::Client,
    base: &str,
    transport: Transport,
    session: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Result<HttpAnswer> {
    let mut post = http
        .post(format!("{base}{}/{session}", transport.path()))
        .header("Content-Type", "application/json")
        .body(body);
    if let Some(key) = key {
        post = post.header("Authorization", format!("Session {key}"));
    }
    Ok(answer_of(post.send().await?).await)
}

fn request(http: &reqwest::Client, url: &str, options: &Options<'_>) -> reqwest::RequestBuilder {
    options
        .headers
        .iter()
        .fold(http.get(url), |request, (name, value)| {
            request.header(*name, *value)
        })
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn answer_of(response: reqwest::Response) -> HttpAnswer {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    HttpAnswer {
        status,
        body,
        retry_after,
    }
}

/// How long a 429 asks to wait: its Retry-After (seconds), or a second.
fn retry_after(answer: &HttpAnswer) -> Duration {
    let seconds = answer
        .retry_after
        .as_deref()
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds)
}

async fn refusal(response: reqwest::Response) -> Opened {
    let answer = answer_of(response).await;
    Opened::Refused {
        status: answer.status,
        body: answer.body,
    }
}

/// The first frame of a new session, which must come within [`DEADLINE`].
async fn first_frame(link: &mut Link) -> Result<ServerFrame> {
    match next_event(link).await? {
        Event::Frame(frame) => Ok(frame),
        other => bail!("{other:?} before the welcome"),
    }
}

async fn next_event(link: &mut Link) -> Result<Event> {
    match link {
        Link::WebSocket(raw) => loop {
            let message = tokio::time::timeout(DEADLINE, raw.socket.next())
                .await
                .context("no frame in time")?;
            return Ok(match message {
                None => Event::Ended("the connection ended".into()),
                Some(Err(error)) => Event::Ended(error.to_string()),
                Some(Ok(Message::Text(text))) => Event::Frame(
                    Codec::Json
                        .decode(text.as_bytes())
                        .map_err(|error| anyhow!(error))?,
                ),
                Some(Ok(Message::Close(frame))) => match frame {
                    Some(frame) => Event::Closed(frame.code.into()),
                    None => Event::Ended("a close frame without a code".into()),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(other)) => bail!("unexpected message {other:?} on the JSON codec"),
            });
        },
        Link::Fallback { events, .. } => tokio::time::timeout(DEADLINE, events.recv())
            .await
            .context("no frame in time")?
            .unwrap_or_else(|| Ok(Event::Ended("the reader stopped".into()))),
    }
}

/// A frame of the fallback transports: a `close` frame is the session's end.
fn event_of(text: &str) -> Result<Event> {
    let frame: ServerFrame = serde_json::from_str(text)
        .with_context(|| format!("a frame that does not decode: {text}"))?;
    Ok(match frame {
        ServerFrame::Close { code, .. } => Event::Closed(code),
        frame => Event::Frame(frame),
    })
}

/// Reads the SSE stream: each event one frame in its `data`; after the `close` frame the
/// stream must end.
async fn read_sse(response: reqwest::Response, events: mpsc::UnboundedSender<Result<Event>>) {
    let mut stream = response.bytes_stream().eventsource();
    let mut closed = false;
    while let Some(next) = stream.next().await {
        let event = match next {
            Ok(event) if closed => Err(anyhow!("an event after the close frame: {}", event.data)),
            Ok(event) if !event.event.is_empty() && event.event != "message" => Err(anyhow!(
                "an event named {:?}: frames have none",
                event.event
            )),
            Ok(event) => event_of(&event.data),
            Err(error) if closed => Err(anyhow!("the stream failed after the close: {error}")),
            Err(error) => Ok(Event::Ended(format!("the stream failed: {error}"))),
        };
        closed = matches!(event, Ok(Event::Closed(_)));
        let stop = !matches!(event, Ok(Event::Frame(_)) | Ok(Event::Closed(_)));
        if events.send(event).is_err() || stop {
            return;
        }
    }
    if !closed {
        let _ = events.send(Ok(Event::Ended("the stream ended".into())));
    }
}

/// Polls one after the other, as a long-poll client does, until the session closes or is gone;
/// a poll refused with 429 is repeated after its Retry-After.
async fn read_polls(
    http: reqwest::Client,
    url: String,
    key: String,
    events: mpsc::UnboundedSender<Result<Event>>,
) {
    loop {
        let response = http
            .get(&url)
            .header("Authorization", format!("Session {key}"))
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                let _ = events.send(Ok(Event::Ended(format!("the poll failed: {error}"))));
                return;
            }
        };
        if response.status() == 429 {
            // The front door's per-address connection rate: every poll is a new connection.
            // A client waits as told and polls again; its frames wait in the session's queue.
            tokio::time::sleep(retry_after(&answer_of(response).await)).await;
            continue;
        }
        if response.status() != 200 {
            let answer = answer_of(response).await;
            let _ = events.send(Ok(Event::Ended(format!(
                "the poll answered {} {}",
                answer.status, answer.body
            ))));
            return;
        }
        let frames = match response.json::<Vec<Value>>().await {
            Ok(frames) => frames,
            Err(error) => {
                let _ = events.send(Err(anyhow!("a poll answer that is no array: {error}")));
                return;
            }
        };
        for (index, frame) in frames.iter().enumerate() {
            let event = event_of(&frame.to_string()).and_then(|event| match event {
                Event::Closed(_) if index + 1 < frames.len() => {
                    Err(anyhow!("frames after the close frame: {frames:?}"))
                }
                event => Ok(event),
            });
            let closed = matches!(event, Ok(Event::Closed(_)));
            let stop = !matches!(event, Ok(Event::Frame(_)));
            if events.send(event).is_err() || stop {
                if closed {
                    // After its close frame the session is gone: a poll finds nothing (or no
                    // node, once a drained node has exited).
                    let after = http
                        .get(&url)
                        .header("Authorization", format!("Session {key}"))
                        .send()
                        .await;
                    if let Ok(response) = after
                        && response.status() != 404
                    {
                        let answer = answer_of(response).await;
                        let _ = events.send(Err(anyhow!(
                            "a poll after the close frame answered {} {}",
                            answer.status,
                            answer.body
                        )));
                    }
                }
                return;
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Link::Fallback { reader, .. } = self {
            reader.abort();
        }
    }
}
