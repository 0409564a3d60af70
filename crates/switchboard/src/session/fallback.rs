//! The fallback transports, for clients whose WebSocket cannot open: Server-Sent Events
//! (`GET /sse`, one `data:` event per frame down a streaming response) and long polling
//! (`GET /poll`, then `GET /poll/{session}` answered with a JSON array of frames). Client frames
//! arrive by POST (server.rs), on this node or forwarded by another one, through the session's
//! [`Link`]. One task per session, as on WebSocket: it reads the POSTed frames, hands them to the
//! session's [`Core`], and writes its answers and queue to the stream or the next poll.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use sha2::{Digest, Sha256};
use switchboard_broker::LinkRecord;
use switchboard_protocol::{Codec, ServerFrame, close};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tracing::Instrument;

use super::core::{Core, Transport, deliver_inbox};
use super::guards::Guards;
use super::websocket::session_panicked;
use super::{Admission, Exit, close_with, inbound, new_session_id};
use crate::hub::{INBOUND_CAPACITY, Link, SessionHandle, encode};
use crate::node::Node;
use crate::queue::{CloseRequest, Outbound, OutboundQueue};

/// How long the server tries to deliver its close frame (down the stream, or to the next poll)
/// before the session ends without it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Chunks waiting between a stream's session task and its HTTP response: the outbound queue is
/// the one buffer bounded in bytes; this only decouples the task from hyper.
const STREAM_CHUNKS: usize = 2;

/// Polls handed to a session task and not yet taken; one more is refused (429).
const POLLS_WAITING: usize = 4;

/// The answer of a long poll: a JSON array of frames.
type PollAnswer = oneshot::Sender<Bytes>;

/// Which fallback transport a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sse,
    Poll,
}

impl Kind {
    /// The name in `welcome`'s `transport`, the `switchboard_sessions` label and the link.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sse => "sse",
            Kind::Poll => "poll",
        }
    }
}

/// What the request that opened a session answers with.
pub enum Started {
    /// The stream's chunks (`data:` events and heartbeat comments); it ends with the session.
    Sse(mpsc::Receiver<Bytes>),
    /// The session id (for `X-Switchboard-Session`) and the open request's answer, `[welcome]`
    /// (or `[close]` when the session could not open).
    Poll {
        session: String,
        answer: oneshot::Receiver<Bytes>,
    },
}

/// The SHA-256 (hex) of a session key, as links store it: a stolen registry entry does not
/// give the key.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new session key: 128 random bits as 32 lowercase hex digits.
fn new_session_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Starts a fallback session's task; `keep` (the connection's permit and address slot) is held
/// until the session ends.
pub fn start(
    node: Arc<Node>,
    kind: Kind,
    admission: Admission,
    keep: Box<dyn Any + Send>,
) -> Started {
    let session_id = new_session_id();
    let (stream, started, polls, pending) = match kind {
        Kind::Sse => {
            let (sender, receiver) = mpsc::channel(STREAM_CHUNKS);
            (Some(sender), Started::Sse(receiver), None, None)
        }
        Kind::Poll => {
            let (answer, receiver) = oneshot::channel();
            let (polls, requests) = mpsc::channel(POLLS_WAITING);
            let started = Started::Poll {
                session: session_id.clone(),
                answer: receiver,
            };
            let pending = Pending::new(&node, answer);
            (None, started, Some((polls, requests)), Some(pending))
        }
    };
    let key = new_session_key();
    let (inbound, frames) = mpsc::channel(INBOUND_CAPACITY);
    let (polls, requests) = polls.unzip();
    let handle = Arc::new(SessionHandle {
        id: Arc::from(session_id.as_str()),
        user: Arc::from(admission.identity.user.as_str()),
        codec: Codec::Json,
        queue: OutboundQueue::new(
            node.config().max_queue_bytes,
            node.metrics().queue_bytes.clone(),
        ),
        link: Some(Box::new(Link {
            key_hash: key_hash(&key),
            transport: kind.name(),
            inbound,
            polls,
            closed_by_client: AtomicBool::new(false),
        })),
    });
    let span = tracing::info_span!("session", session = %session_id, transport = kind.name(),
        user = %admission.identity.user, remote = %admission.remote, client = %admission.client);
    let session = Session {
        core: Core::new(node, handle, admission.identity),
        guards: Guards::default(),
        kind,
        frames,
        stream,
        requests,
        pending,
        outbox: Vec::new(),
        outbox_bytes: 0,
        unpolled_since: Instant::now(),
        batch: Vec::new(),
    };
    tokio::spawn(
        async move {
            run(session, key).await;
            drop(keep);
        }
        .instrument(span),
    );
    started
}

/// A long poll waiting for frames.
struct Pending {
    answer: PollAnswer,
    /// When it is answered with `[]` if nothing came.
    deadline: tokio::time::Instant,
}

impl Pending {
    fn new(node: &Node, answer: PollAnswer) -> Self {
        Pending {
            answer,
            deadline: tokio::time::Instant::now() + node.config().poll_timeout,
        }
    }
}

struct Session {
    core: Core,
    guards: Guards,
    kind: Kind,
    /// POSTed frames, from this node's handler or forwarded by another node.
    frames: mpsc::Receiver<Vec<String>>,
    /// SSE: the response body's chunks.
    stream: Option<mpsc::Sender<Bytes>>,
    /// Long poll: polls handed over by `GET /poll/{session}`.
    requests: Option<mpsc::Receiver<PollAnswer>>,
    /// Long poll: the poll waiting for frames, at most one.
    pending: Option<Pending>,
    /// Long poll: frames (JSON) for the next poll, at most the queue's bound in bytes.
    outbox: Vec<Bytes>,
    outbox_bytes: usize,
    /// Long poll: since when no poll has been waiting; past the idle timeout the session is
    /// reaped as a dead connection.
    unpolled_since: Instant,
    /// Reused between flushes.
    batch: Vec<(u64, Outbound)>,
}

/// Runs a session until it ends, then removes every trace of it (link, rooms, presence, registry).
async fn run(mut session: Session, key: String) {
    let node = session.core.node.clone();
    let transport_sessions = node
        .metrics()
        .sessions
        .with_label_values(&[session.kind.name()]);
    node.metrics().connections.inc();
    transport_sessions.inc();
    tracing::debug!("session open");
    // A panic (a bug) must not leave the session in the hub, the registry or presence: it ends
    // the session with 1011 and the normal clean-up runs.
    let exit = match AssertUnwindSafe(session.serve(key)).catch_unwind().await {
        Ok(exit) => exit,
        Err(panic) => {
            session_panicked(&node, "serving", panic.as_ref());
            close_with(close::INTERNAL, "internal error")
        }
    };
    let rooms = session.core.rooms();
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

/// Resolves with the next poll handed over, never without a poll channel.
async fn next_poll(requests: &mut Option<mpsc::Receiver<PollAnswer>>) -> Option<PollAnswer> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the waiting poll is due for its empty answer, never without one.
async fn poll_due(pending: &Option<Pending>) {
    match pending {
        Some(pending) => tokio::time::sleep_until(pending.deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the SSE response is gone (its connection closed), never for a long poll.
async fn stream_gone(stream: &Option<mpsc::Sender<Bytes>>) {
    match stream {
        Some(stream) => stream.closed().await,
        None => std::future::pending().await,
    }
}

/// One SSE event per frame: the frame's JSON holds no raw newline, so one `data:` line.
fn sse_events(frames: &[Bytes]) -> Bytes {
    let len = frames.iter().map(|frame| frame.len() + 8).sum();
    let mut chunk = BytesMut::with_capacity(len);
    for frame in frames {
        chunk.extend_from_slice(b"data: ");
        chunk.extend_from_slice(frame);
        chunk.extend_from_slice(b"\n\n");
    }
    chunk.freeze()
}

/// A long poll's answer: the frames as one JSON array.
fn json_array(frames: &[Bytes]) -> Bytes {
    let len = frames.iter().map(|frame| frame.len() + 1).sum::<usize>() + 2;
    let mut body = BytesMut::with_capacity(len);
    body.extend_from_slice(b"[");
    for (index, frame) in frames.iter().enumerate() {
        if index > 0 {
            body.extend_from_slice(b",");
        }
        body.extend_from_slice(frame);
    }
    body.extend_from_slice(b"]");
    body.freeze()
}

/// A queued or encoded frame's bytes (JSON text: fallback sessions use the JSON codec).
fn payload(message: Message) -> Bytes {
    match message {
        Message::Text(text) => Bytes::from(text),
        other => other.into_data(),
    }
}

fn closing_request(queue: &OutboundQueue) -> CloseRequest {
    queue.close_request().unwrap_or(CloseRequest {
        code: close::NORMAL,
        reason: String::new(),
    })
}

impl Session {
    fn link_record(&self) -> Option<LinkRecord> {
        let handle = &self.core.handle;
        let link = handle.link.as_ref()?;
        Some(LinkRecord {
            session: handle.id.to_string(),
            node: self.core.node.id().to_owned(),
            key_hash: link.key_hash.clone(),
        })
    }

    async fn serve(&mut self, key: String) -> Exit {
        let mut opened = match self.core.open().await {
            Ok(opened) => opened,
            Err(exit) => return exit,
        };
        // Without its link the session still serves POSTs that reach this node (the metered
        // broker counts and logs the failure); those reaching another node get 404.
        if let Some(record) = self.link_record()
            && self.core.node.register_link(&record).await.is_err()
        {
            tracing::warn!("link not registered: POSTs reaching other nodes will not find it");
        }
        if let ServerFrame::Welcome {
            transport,
            session_key,
            ..
        } = &mut opened.welcome
        {
            *transport = Some(self.kind.name().to_owned());
            *session_key = Some(key);
        }
        if let Err(exit) = self.write_frames(vec![opened.welcome]).await {
            return exit;
        }
        // The open request answers `[welcome]` alone, at once.
        self.answer_poll();
        // Boxed: it runs once, and inline its state would enlarge every idle session.
        if let Err(exit) = Box::pin(deliver_inbox(self, opened.pending, opened.more)).await {
            return exit;
        }
        let period = self.core.node.config().heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let queue = &self.core.handle.queue;
            // Frames leave the queue only for a stream or a waiting poll: a long-poll session
            // nobody polls fills its queue (closed with 1013) or is reaped.
            let writable = self.stream.is_some() || self.pending.is_some();
            let step = tokio::select! {
                biased;
                () = queue.closing() => Err(Exit::Close(closing_request(queue))),
                () = queue.ready(), if writable => self.flush_queue().await,
                frames = self.frames.recv() => Box::pin(self.on_frames(frames)).await,
                request = next_poll(&mut self.requests) => {
                    self.on_poll(request);
                    Ok(())
                }
                () = poll_due(&self.pending) => {
                    self.answer_poll();
                    Ok(())
                }
                () = stream_gone(&self.stream) => Err(Exit::Gone),
                _ = heartbeat.tick() => self.on_heartbeat().await,
            };
            if let Err(exit) = step {
                return exit;
            }
            if !self.outbox.is_empty() {
                self.answer_poll();
            }
        }
    }

    async fn on_frames(&mut self, frames: Option<Vec<String>>) -> Result<(), Exit> {
        // The handle (in the hub) holds the sender while the session runs.
        let Some(frames) = frames else {
            return Err(Exit::Gone);
        };
        for frame in frames {
            inbound::receive(self, frame.as_bytes()).await?;
        }
        Ok(())
    }

    /// A new poll takes the place of the waiting one, which is answered with what there is.
    fn on_poll(&mut self, request: Option<PollAnswer>) {
        if let Some(answer) = request {
            if self.pending.is_some() {
                self.answer_poll();
            }
            self.pending = Some(Pending::new(&self.core.node, answer));
            tracing::debug!("poll waiting");
        }
    }

    async fn on_heartbeat(&mut self) -> Result<(), Exit> {
        if self.core.token_expired() {
            return Err(close_with(close::POLICY, "token expired"));
        }
        match self.kind {
            Kind::Sse => self.send_chunk(Bytes::from_static(b":\n\n")).await,
            Kind::Poll => {
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|pending| pending.answer.is_closed())
                {
                    self.pending = None;
                    self.unpolled_since = Instant::now();
                }
                if self.pending.is_none()
                    && self.unpolled_since.elapsed() > self.core.node.config().idle_timeout
                {
                    tracing::info!("reaping a long-poll session nobody polls");
                    return Err(Exit::Gone);
                }
                Ok(())
            }
        }
    }

    /// Answers the waiting poll, if any, with the outbox (possibly empty).
    fn answer_poll(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        self.unpolled_since = Instant::now();
        if pending.answer.is_closed() {
            // Its client went away: the frames wait for the next poll.
            return;
        }
        let body = json_array(&self.outbox);
        let bytes = body.len();
        if pending.answer.send(body).is_ok() {
            self.core.node.metrics().bytes_out.inc_by(bytes as u64);
            self.outbox.clear();
            self.outbox_bytes = 0;
        }
    }

    /// Waits (up to the idle timeout) for a poll and answers it with the outbox.
    async fn wait_for_poll(&mut self) -> Result<(), Exit> {
        if self.pending.is_none() {
            let queue = &self.core.handle.queue;
            let request = tokio::select! {
                biased;
                () = queue.closing() => return Err(Exit::Close(closing_request(queue))),
                request = next_poll(&mut self.requests) => request,
                () = tokio::time::sleep(self.core.node.config().idle_timeout) => {
                    self.core.node.metrics().slow_closes.inc();
                    tracing::info!("closing a long-poll session that stopped polling");
                    return Err(close_with(close::TRY_AGAIN_LATER, "too slow to read: no poll came"));
                }
            };
            self.on_poll(request);
        }
        self.answer_poll();
        Ok(())
    }

    /// Sends one chunk down the SSE stream, giving up if the session is closed meanwhile or the
    /// stream takes nothing for the idle timeout (a reader that stopped reading).
    async fn send_chunk(&mut self, chunk: Bytes) -> Result<(), Exit> {
        let Some(stream) = &self.stream else {
            return Err(Exit::Gone);
        };
        let bytes = chunk.len();
        let queue = &self.core.handle.queue;
        let result = tokio::select! {
            biased;
            result = stream.send(chunk) => result,
            () = queue.closing() => return Err(Exit::Close(closing_request(queue))),
            () = tokio::time::sleep(self.core.node.config().idle_timeout) => {
                self.core.node.metrics().slow_closes.inc();
                tracing::info!("closing a stream that stopped reading");
                return Err(close_with(close::TRY_AGAIN_LATER, "too slow to read: write timed out"));
            }
        };
        match result {
            Ok(()) => {
                self.core.node.metrics().bytes_out.inc_by(bytes as u64);
                Ok(())
            }
            Err(_) => Err(Exit::Gone),
        }
    }

    /// Writes frames (JSON) down the stream, or into the outbox for the next poll (waiting for
    /// a poll first when the outbox is full).
    async fn write_out(&mut self, frames: Vec<Bytes>) -> Result<(), Exit> {
        if frames.is_empty() {
            return Ok(());
        }
        match self.kind {
            Kind::Sse => self.send_chunk(sse_events(&frames)).await,
            Kind::Poll => {
                let bytes: usize = frames.iter().map(Bytes::len).sum();
                let limit = self.core.node.config().max_queue_bytes;
                if self.outbox_bytes > 0 && self.outbox_bytes + bytes > limit {
                    self.wait_for_poll().await?;
                }
                self.outbox_bytes += bytes;
                self.outbox.extend(frames);
                Ok(())
            }
        }
    }

    /// Ends the stream (or the next poll) with the close frame if the server is closing, and
    /// removes the session everywhere.
    async fn finish(&mut self, exit: Exit) {
        if let Exit::Close(request) = &exit {
            self.core.node.metrics().close_sent(request.code);
            tracing::debug!(code = request.code, reason = %request.reason, "closing session");
            let frame = ServerFrame::Close {
                code: request.code,
                reason: request.reason.clone(),
            };
            if let Ok(message) = encode(Codec::Json, &frame) {
                self.core
                    .node
                    .metrics()
                    .frames_out
                    .with_label_values(&["close"])
                    .inc();
                let frame = payload(message);
                // A client that ended the session (DELETE) does not wait for its close frame:
                // the frame goes out only if it can at once.
                let by_client = self
                    .core
                    .handle
                    .link
                    .as_ref()
                    .is_some_and(|link| link.closed_by_client.load(Ordering::Relaxed));
                match self.kind {
                    Kind::Sse => {
                        if let Some(stream) = &self.stream {
                            let chunk = sse_events(&[frame]);
                            if by_client {
                                let _ = stream.try_send(chunk);
                            } else {
                                let _ =
                                    tokio::time::timeout(CLOSE_TIMEOUT, stream.send(chunk)).await;
                            }
                        }
                    }
                    Kind::Poll => {
                        self.outbox.push(frame);
                        if self.pending.is_none()
                            && !by_client
                            && let Ok(request) =
                                tokio::time::timeout(CLOSE_TIMEOUT, next_poll(&mut self.requests))
                                    .await
                        {
                            self.on_poll(request);
                        }
                        self.answer_poll();
                    }
                }
            }
        }
        // The response ends with the stream; a poll after this finds no session (404).
        self.stream = None;
        if let Some(record) = self.link_record() {
            // A failure is counted and warned about; the reaper drops links of dead nodes.
            let _ = self.core.node.unregister_link(&record).await;
        }
        self.core.close().await;
        tracing::debug!("session closed");
    }
}

impl Transport for Session {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn guards(&mut self) -> &mut Guards {
        &mut self.guards
    }

    async fn write_frames(&mut self, frames: Vec<ServerFrame>) -> Result<(), Exit> {
        let encoded = self.core.encode_answers(&frames, payload)?;
        self.write_out(encoded).await
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
        let frames = self.core.admit_batch(&mut batch, payload);
        self.batch = batch;
        let wrote = !frames.is_empty();
        let result = self.write_out(frames).await;
        self.core.written(taken, wrote && result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[tokio::test]
    async fn an_sse_stream_that_takes_nothing_for_the_idle_timeout_is_closed_with_1013() {
        let (node, _) = crate::node::test_node(crate::config::Options {
            heartbeat_ms: Some(50),
            idle_timeout_ms: Some(400),
            ..Default::default()
        });
        node.start().await.unwrap();
        let metrics = node.metrics().clone();
        let identity = node.auth().authenticate(None, Some("stalled")).unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let admission = Admission {
            identity,
            codec: Codec::Json,
            remote: addr,
            client: addr.ip(),
        };
        let Started::Sse(mut chunks) = start(node.clone(), Kind::Sse, admission, Box::new(()))
        else {
            panic!("an SSE session starts a stream");
        };
        // The response body takes the welcome, then nothing: a stalled reader (its socket full).
        let welcome = chunks.recv().await.unwrap();
        assert!(welcome.starts_with(b"data: {\"type\":\"welcome\""));
        // Fed below the queue's bound: the queue never overflows, the write times out.
        node.broadcast(serde_json::json!("fed")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while metrics.slow_closes.get() == 0 {
            assert!(
                Instant::now() < deadline,
                "the stalled stream was never closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.dropped.with_label_values(&["slow"]).get(), 0);
        // The reader wakes up within the close's own timeout: it gets what the stream held,
        // then the close frame, then the end.
        let mut rest = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            rest.extend_from_slice(&chunk);
        }
        let rest = String::from_utf8(rest).unwrap();
        assert!(
            rest.ends_with(
                "data: {\"type\":\"close\",\"code\":1013,\"reason\":\"too slow to read: write timed out\"}\n\n"
            ),
            "{rest:?}"
        );
        assert_eq!(metrics.closes.with_label_values(&["1013"]).get(), 1);
        assert_eq!(node.session_count(), 0);
    }

    #[test]
    fn frames_become_one_sse_event_each() {
        let frames = [
            Bytes::from_static(b"{\"type\":\"pong\"}"),
            Bytes::from_static(b"{}"),
        ];
        assert_eq!(
            &sse_events(&frames)[..],
            b"data: {\"type\":\"pong\"}\n\ndata: {}\n\n"
        );
    }

    #[test]
    fn a_poll_answer_is_a_json_array_of_the_frames() {
        assert_eq!(&json_array(&[])[..], b"[]");
        let frames = [Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"{}")];
        let body = json_array(&frames);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed, serde_json::json!([{"a": 1}, {}]));
    }

    #[test]
    fn session_keys_are_128_random_bits_in_lowercase_hex_and_links_keep_their_hash() {
        let (a, b) = (new_session_key(), new_session_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        let hash = key_hash(&a);
        assert_eq!(hash.len(), 64);
        assert_ne!(hash, key_hash(&b));
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            key_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
