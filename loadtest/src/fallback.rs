//! The client side of the fallback transports (PROTOCOL.md, "Fallback transports"): a session
//! over `GET /sse` (one streaming response, one server frame per `data:` event, heartbeats as
//! comments) or over long polls (`GET /poll` answers `[welcome]`, then `GET /poll/{session}` in a
//! loop), whose client frames go out with `POST /{sse|poll}/{session}` and
//! `Authorization: Session <session_key>`. A [`Session`] is a stream of the server's frames and a
//! sink of client frames, as a WebSocket is, so every scenario drives both the same way.
//!
//! Sockets: an SSE session holds one for its stream, a poll session one for the poll in flight;
//! each POST takes one more while it runs (the node answers every request with
//! `Connection: close`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{Sink, Stream, StreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use sse_stream::SseByteStream;
use switchboard_protocol::ServerFrame;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::PollSender;

use crate::transport::Transport;

/// Server frames read but not yet taken by the scenario; past this the reader stops reading, so
/// a slow consumer is a slow reader to the node, as on a WebSocket.
const FRAMES_BUFFERED: usize = 64;
/// Client frames waiting for their POST; past this, sending waits.
const FRAMES_QUEUED: usize = 1024;
/// Most frames one POST carries (the node refuses more than 100 with 413).
const MAX_BATCH_FRAMES: usize = 100;
/// A POST takes no more queued frames once its body is this long, far below the node's
/// default `--max-message-size` (1 MiB).
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// How often one batch is retried after `429` before the session counts as failed.
const MAX_RETRIES: u32 = 10;

/// One open fallback session. Dropping it ends its stream (SSE: the node sees the connection
/// close) or its polls (the node reaps the session after `--idle-timeout-ms`).
pub struct Session {
    frames: mpsc::Receiver<Result<Message, WsError>>,
    posts: PollSender<String>,
    tasks: [AbortHandle; 2],
}

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Stream for Session {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.frames.poll_recv(cx)
    }
}

impl Sink<Message> for Session {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.posts
            .poll_reserve(cx)
            .map_err(|_| WsError::AlreadyClosed)
    }

    /// Text frames are queued for the next POST; the fallback transports have no other kind
    /// (pings are WebSocket control frames; a session ends by dropping it).
    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        match message {
            Message::Text(text) => self
                .posts
                .send_item(text.as_str().to_owned())
                .map_err(|_| WsError::AlreadyClosed),
            _ => Ok(()),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.posts.close();
        Poll::Ready(Ok(()))
    }
}

/// The HTTP client for connections from `source` (any, if `None`): one per source address, shared
/// by its sessions. No proxy (the targets are loopback) and no idle pool (the node closes every
/// connection after its answer).
fn client(source: Option<IpAddr>) -> Result<Client> {
    static CLIENTS: LazyLock<Mutex<HashMap<Option<IpAddr>, Client>>> =
        LazyLock::new(Mutex::default);
    let mut clients = CLIENTS.lock().expect("clients lock");
    if let Some(client) = clients.get(&source) {
        return Ok(client.clone());
    }
    let client = Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .local_address(source)
        .build()
        .context("building the HTTP client")?;
    clients.insert(source, client.clone());
    Ok(client)
}

/// The URL that opens a session of `transport` for the WebSocket URL `ws_url` (of `/ws`), derived
/// as the JS SDK does: `ws:` becomes `http:` and the last path segment `ws` becomes `sse` or
/// `poll`; the query (`?user=`, `?token=`) stays.
pub fn open_url(ws_url: &str, transport: Transport) -> Result<Url> {
    let mut url = Url::parse(ws_url).with_context(|| format!("not a URL: {ws_url}"))?;
    if url.scheme() != "ws" {
        bail!("{ws_url}: --transport sse|poll needs a ws:// URL of /ws");
    }
    if url
        .path_segments()
        .and_then(|mut segments| segments.next_back())
        != Some("ws")
    {
        bail!("{ws_url}: --transport sse|poll needs the URL of /ws");
    }
    url.set_scheme("http")
        .map_err(|()| anyhow!("{ws_url}: cannot be made an http:// URL"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow!("{ws_url}: no path"))?
        .pop()
        .push(transport.path());
    Ok(url)
}

/// The URL of `session`'s polls and POSTs: the open URL with the session id as a last path
/// segment, without the query.
fn session_url(open: &Url, session: &str) -> Url {
    let mut url = open.clone();
    url.set_query(None);
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.push(session);
    }
    url
}

/// Opens a session of `transport` (`Sse` or `Poll`) to the node behind `ws_url`, from `source` if
/// given, and reads its `welcome`; the frames after it are the session's stream.
pub async fn open(ws_url: &str, transport: Transport, source: Option<IpAddr>) -> Result<Session> {
    let client = client(source)?;
    let url = open_url(ws_url, transport)?;
    let response = expect_status(client.get(url.clone()).send().await?, StatusCode::OK).await?;
    let (frames_tx, frames) = mpsc::channel(FRAMES_BUFFERED);
    let (session, key, reader) = match transport {
        Transport::Sse => {
            let mut events = SseByteStream::new(Box::pin(body_stream(response)));
            let welcome = loop {
                match events.next().await {
                    Some(Ok(event)) => match event.data {
                        Some(data) => break data,
                        None => continue,
                    },
                    Some(Err(error)) => bail!("reading the SSE stream: {error}"),
                    None => bail!("the SSE stream ended before the welcome"),
                }
            };
            let (session, key) = welcome_of(&welcome, "sse")?;
            let reader = tokio::spawn(read_events(events, frames_tx.clone()));
            (session, key, reader)
        }
        Transport::Poll => {
            let mut first = response
                .json::<Vec<serde_json::Value>>()
                .await
                .context("reading the answer to GET /poll")?
                .into_iter();
            let welcome = first.next().context("GET /poll answered no welcome")?;
            let (session, key) = welcome_of(&welcome.to_string(), "poll")?;
            let polls = Polls {
                client: client.clone(),
                url: session_url(&url, &session),
                key: key.clone(),
            };
            let leftover: Vec<_> = first.collect();
            let reader = tokio::spawn(polls.run(leftover, frames_tx.clone()));
            (session, key, reader)
        }
        Transport::Websocket => bail!("a WebSocket is not a fallback session"),
    };
    let (posts_tx, posts_rx) = mpsc::channel(FRAMES_QUEUED);
    let poster = Poster {
        client,
        url: session_url(&url, &session),
        key,
    };
    // Weak: the stream ends when its reader does, whatever the POSTs do.
    let poster = tokio::spawn(poster.run(posts_rx, frames_tx.downgrade()));
    Ok(Session {
        frames,
        posts: PollSender::new(posts_tx),
        tasks: [reader.abort_handle(), poster.abort_handle()],
    })
}

/// `response` if it has `status`, else an error with the status and the body the node gave.
async fn expect_status(
    response: reqwest::Response,
    status: StatusCode,
) -> Result<reqwest::Response> {
    if response.status() == status {
        return Ok(response);
    }
    let got = response.status();
    let body = response.text().await.unwrap_or_default();
    bail!("{got}: {}", body.trim())
}

/// The body of `response` as a stream of byte chunks, ending after the first error.
fn body_stream(
    response: reqwest::Response,
) -> impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> {
    futures_util::stream::unfold(Some(response), |response| async move {
        let mut response = response?;
        match response.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(response))),
            Ok(None) => None,
            Err(error) => Some((Err(error), None)),
        }
    })
}

/// The session id and key of a fallback `welcome` of `transport`.
fn welcome_of(text: &str, transport: &str) -> Result<(String, String)> {
    let frame: ServerFrame =
        serde_json::from_str(text).with_context(|| format!("not a server frame: {text}"))?;
    let ServerFrame::Welcome {
        session,
        transport: said,
        session_key,
        ..
    } = frame
    else {
        bail!("expected the welcome first, got {text}");
    };
    if said.as_deref() != Some(transport) {
        bail!("welcome of transport {said:?}, expected {transport}: {text}");
    }
    let key = session_key.with_context(|| format!("welcome without session_key: {text}"))?;
    Ok((session, key))
}

/// What a server frame becomes on the session's stream: the last `close` frame becomes a close,
/// as on a WebSocket (its `type` is the first field: the frames are serde's internally tagged
/// enum), every other frame a text message.
fn message_of(text: String) -> (Message, bool) {
    if text.starts_with(r#"{"type":"close""#)
        && let Ok(ServerFrame::Close { code, reason }) = serde_json::from_str(&text)
    {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        return (Message::Close(Some(frame)), true);
    }
    (Message::text(text), false)
}

/// Hands the SSE stream's frames to the session until its last frame, its end or an error.
async fn read_events<S>(mut events: S, frames: mpsc::Sender<Result<Message, WsError>>)
where
    S: Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Unpin,
{
    while let Some(event) = events.next().await {
        let data = match event {
            // Heartbeats are comments: no data.
            Ok(event) => match event.data {
                Some(data) => data,
                None => continue,
            },
            Err(error) => {
                let _ = frames.send(Err(broken(anyhow!(error)))).await;
                return;
            }
        };
        let (message, last) = message_of(data);
        if frames.send(Ok(message)).await.is_err() || last {
            return;
        }
    }
}

/// The long-poll loop of one session.
struct Polls {
    client: Client,
    url: Url,
    key: String,
}

impl Polls {
    /// Polls until the session's last frame, a `404` (the session is gone) or an error, handing
    /// every frame to the session, `first` (what the open's answer held after the welcome) first.
    async fn run(
        self,
        first: Vec<serde_json::Value>,
        frames: mpsc::Sender<Result<Message, WsError>>,
    ) {
        let mut batch = first;
        loop {
            for frame in batch.drain(..) {
                let (message, last) = message_of(frame.to_string());
                if frames.send(Ok(message)).await.is_err() || last {
                    return;
                }
            }
            match self.poll().await {
                Ok(Some(next)) => batch = next,
                Ok(None) => return,
                Err(error) => {
                    let _ = frames.send(Err(broken(error))).await;
                    return;
                }
            }
        }
    }

    /// One poll: the frames it answered, or `None` if the session is gone.
    async fn poll(&self) -> Result<Option<Vec<serde_json::Value>>> {
        let response = self
            .client
            .get(self.url.clone())
            .header(AUTHORIZATION, format!("Session {}", self.key))
            .send()
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = expect_status(response, StatusCode::OK).await?;
        Ok(Some(
            response.json().await.context("reading a poll's answer")?,
        ))
    }
}

/// The POSTs of one session: one at a time, so the node gets its frames in order, each carrying
/// every frame queued meanwhile (up to [`MAX_BATCH_FRAMES`] and about [`MAX_BATCH_BYTES`]).
struct Poster {
    client: Client,
    url: Url,
    key: String,
}

impl Poster {
    /// Posts queued frames until the queue closes; a POST that fails ends the session's stream
    /// with the error.
    async fn run(
        self,
        mut queue: mpsc::Receiver<String>,
        frames: mpsc::WeakSender<Result<Message, WsError>>,
    ) {
        while let Some(first) = queue.recv().await {
            let mut bytes = first.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_FRAMES && bytes < MAX_BATCH_BYTES {
                match queue.try_recv() {
                    Ok(frame) => {
                        bytes += frame.len() + 1;
                        batch.push(frame);
                    }
                    Err(_) => break,
                }
            }
            let body = match batch.len() {
                1 => batch.pop().unwrap_or_default(),
                _ => format!("[{}]", batch.join(",")),
            };
            if let Err(error) = self.post(body).await {
                if let Some(frames) = frames.upgrade() {
                    let _ = frames.send(Err(broken(error))).await;
                }
                return;
            }
        }
    }

    /// POSTs one body until the node takes it (`202`), waiting out `429` as its `Retry-After`
    /// says (the session's inbound queue was full, or the front door's rate).
    async fn post(&self, body: String) -> Result<()> {
        for _ in 0..MAX_RETRIES {
            let response = self
                .client
                .post(self.url.clone())
                .header(AUTHORIZATION, format!("Session {}", self.key))
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await?;
            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                expect_status(response, StatusCode::ACCEPTED)
                    .await
                    .with_context(|| format!("POST {}", self.url))?;
                return Ok(());
            }
            let wait = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
        bail!("POST {}: still 429 after {MAX_RETRIES} tries", self.url)
    }
}

/// An error of the HTTP side as the WebSocket error the scenarios read.
fn broken(error: anyhow::Error) -> WsError {
    WsError::Io(std::io::Error::other(format!("{error:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_url_follows_the_websocket_url() {
        let sse = open_url("ws://127.0.0.1:8080/ws?user=ann", Transport::Sse).expect("derived");
        assert_eq!(sse.as_str(), "http://127.0.0.1:8080/sse?user=ann");
        let poll = open_url("ws://127.0.0.1:8080/gw/ws", Transport::Poll).expect("derived");
        assert_eq!(poll.as_str(), "http://127.0.0.1:8080/gw/poll");
        assert_eq!(
            session_url(&sse, "n1-7").as_str(),
            "http://127.0.0.1:8080/sse/n1-7"
        );
        for bad in [
            "ws://127.0.0.1:8080/",
            "http://127.0.0.1:8080/ws",
            "wss://127.0.0.1/ws",
        ] {
            assert!(open_url(bad, Transport::Sse).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_welcome_gives_the_session_and_its_key() {
        let welcome = r#"{"type":"welcome","session":"n1-7","user":"u","node":"n1","protocol":"switchboard.v1.json","heartbeat_ms":25000,"transport":"sse","session_key":"0f1e2d3c4b5a69788796a5b4c3d2e1f0"}"#;
        let (session, key) = welcome_of(welcome, "sse").expect("a welcome");
        assert_eq!(session, "n1-7");
        assert_eq!(key, "0f1e2d3c4b5a69788796a5b4c3d2e1f0");
        assert!(welcome_of(welcome, "poll").is_err(), "the wrong transport");
        assert!(welcome_of(r#"{"type":"pong"}"#, "sse").is_err());
        let websocket = welcome.replace(r#""transport":"sse","#, "");
        assert!(welcome_of(&websocket, "sse").is_err(), "no transport");
    }

    #[test]
    fn the_close_frame_ends_the_stream_and_others_pass_as_text() {
        let (message, last) =
            message_of(r#"{"type":"close","code":1001,"reason":"draining"}"#.to_owned());
        assert!(last);
        match message {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1001);
                assert_eq!(frame.reason.as_str(), "draining");
            }
            other => panic!("not a close: {other:?}"),
        }
        let text =
            r#"{"type":"message","room":"r","data":{"type":"close"},"offset":1,"epoch":"e"}"#;
        let (message, last) = message_of(text.to_owned());
        assert!(!last);
        assert_eq!(message, Message::text(text));
    }
}
