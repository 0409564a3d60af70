//! The fallback transports as their clients use them, over real HTTP (reqwest, one connection
//! per request as the node answers): an SSE stream read event by event as `curl -N` shows it,
//! long polls, and POSTed frames. Frames are JSON values, as a browser sees them.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{DEADLINE, NodeProcess};

/// One item of an SSE stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    /// A `data:` event: one server frame.
    Frame(Value),
    /// A comment line (`:`), the heartbeat.
    Comment,
}

/// The public port's base URL, for `/sse`, `/poll` and their session paths.
pub fn public_url(node: &NodeProcess, path: &str) -> String {
    format!("http://{}{path}", node.public)
}

/// A client that keeps no idle connection (the node closes each after its answer).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client")
}

/// An open SSE response, read as raw text.
pub struct SseStream {
    pub response_headers: reqwest::header::HeaderMap,
    response: reqwest::Response,
    /// Text received and not yet split into events.
    pending: String,
    /// Everything received so far, as `curl -N` would print it.
    pub raw: String,
}

/// Opens `GET path` on the public port; the status and, when 200, the stream.
pub async fn open_sse(
    node: &NodeProcess,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Option<SseStream>, String)> {
    let mut request = http_client().get(public_url(node, path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .context("no SSE response head in time")??;
    let status = response.status().as_u16();
    if status != 200 {
        let body = tokio::time::timeout(DEADLINE, response.text()).await??;
        return Ok((status, None, body));
    }
    let stream = SseStream {
        response_headers: response.headers().clone(),
        response,
        pending: String::new(),
        raw: String::new(),
    };
    Ok((status, Some(stream), String::new()))
}

impl SseStream {
    /// The next event or comment; `None` when the stream ended. Fails after [`DEADLINE`].
    pub async fn next_item(&mut self) -> Result<Option<SseItem>> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let block = block.trim_end_matches('\n');
                if block.starts_with(':') {
                    return Ok(Some(SseItem::Comment));
                }
                let Some(data) = block.strip_prefix("data: ") else {
                    bail!("not an event of ours: {block:?}");
                };
                ensure!(!data.contains('\n'), "one data line per event: {block:?}");
                let frame = serde_json::from_str(data)
                    .with_context(|| format!("event data is not JSON: {data:?}"))?;
                return Ok(Some(SseItem::Frame(frame)));
            }
            let chunk = tokio::time::timeout(DEADLINE, self.response.chunk())
                .await
                .context("nothing on the SSE stream in time")??;
            let Some(chunk) = chunk else {
                ensure!(self.pending.is_empty(), "stream ended mid-event");
                return Ok(None);
            };
            let text = std::str::from_utf8(&chunk).context("stream is not UTF-8")?;
            self.raw.push_str(text);
            self.pending.push_str(text);
        }
    }

    /// The next frame, heartbeat comments skipped; fails if the stream ends.
    pub async fn next_frame(&mut self) -> Result<Value> {
        loop {
            match self.next_item().await? {
                Some(SseItem::Frame(frame)) => return Ok(frame),
                Some(SseItem::Comment) => {}
                None => bail!("the SSE stream ended"),
            }
        }
    }

    /// The next frame of type `kind`, others skipped.
    pub async fn frame_of(&mut self, kind: &str) -> Result<Value> {
        loop {
            let frame = self.next_frame().await?;
            if frame["type"] == kind {
                return Ok(frame);
            }
        }
    }

    /// Reads until the stream ends; the frames received meanwhile.
    pub async fn until_end(&mut self) -> Result<Vec<Value>> {
        let mut frames = Vec::new();
        while let Some(item) = self.next_item().await? {
            if let SseItem::Frame(frame) = item {
                frames.push(frame);
            }
        }
        Ok(frames)
    }
}

/// A fallback session as its client knows it: id and key from `welcome`.
#[derive(Debug, Clone)]
pub struct SessionKey {
    pub session: String,
    pub key: String,
}

impl SessionKey {
    /// The session and key a `welcome` announces.
    pub fn of(welcome: &Value) -> Result<SessionKey> {
        ensure!(welcome["type"] == "welcome", "not a welcome: {welcome}");
        Ok(SessionKey {
            session: welcome["session"].as_str().context("session")?.to_owned(),
            key: welcome["session_key"]
                .as_str()
                .context("session_key")?
                .to_owned(),
        })
    }
}

/// An HTTP answer: status, headers, body as JSON (a JSON string when it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

async fn answer(request: reqwest::RequestBuilder, within: Duration) -> Result<Answer> {
    let response = tokio::time::timeout(within, request.send())
        .await
        .context("no answer in time")??;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = tokio::time::timeout(within, response.text()).await??;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// `GET path` on the public port (an open or a poll), with `headers`.
pub async fn get(
    node: &NodeProcess,
    path: &str,
    headers: &[(&str, &str)],
    within: Duration,
) -> Result<Answer> {
    let mut request = http_client().get(public_url(node, path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request, within).await
}

/// `POST path` on the public port with a raw body and `headers`.
pub async fn post_raw(
    node: &NodeProcess,
    path: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> Result<Answer> {
    let mut request = http_client()
        .post(public_url(node, path))
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request, DEADLINE).await
}

/// Opens a long-poll session: the answer of `GET /poll?…` and the session's key.
pub async fn open_poll(node: &NodeProcess, query: &str) -> Result<(Answer, SessionKey)> {
    let opened = get(node, &format!("/poll{query}"), &[], DEADLINE).await?;
    ensure!(opened.status == 200, "open refused: {opened:?}");
    let welcome = opened.body.get(0).context("an empty open answer")?.clone();
    let key = SessionKey::of(&welcome)?;
    Ok((opened, key))
}

impl SessionKey {
    fn authorization(&self) -> String {
        format!("Session {}", self.key)
    }

    /// POSTs `body` (a frame or an array of frames) to `/{transport}/{session}`.
    pub async fn post(&self, node: &NodeProcess, transport: &str, body: &Value) -> Result<Answer> {
        let path = format!("/{transport}/{}", self.session);
        let authorization = self.authorization();
        post_raw(
            node,
            &path,
            body.to_string(),
            &[("authorization", authorization.as_str())],
        )
        .await
    }

    /// One long poll; must be answered within `within`.
    pub async fn poll_within(&self, node: &NodeProcess, within: Duration) -> Result<Answer> {
        let path = format!("/poll/{}", self.session);
        let authorization = self.authorization();
        get(
            node,
            &path,
            &[("authorization", authorization.as_str())],
            within,
        )
        .await
    }

    /// Polls until a frame of type `kind` comes (other frames skipped); the frames up to it.
    pub async fn poll_until(&self, node: &NodeProcess, kind: &str) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + DEADLINE * 3;
        let mut frames = Vec::new();
        loop {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no {kind} polled in time; got {frames:?}"
            );
            let answer = self.poll_within(node, DEADLINE * 3).await?;
            ensure!(answer.status == 200, "poll refused: {answer:?}");
            let batch = answer.body.as_array().context("a poll answers an array")?;
            for frame in batch {
                frames.push(frame.clone());
                if frame["type"] == kind {
                    return Ok(frames);
                }
            }
        }
    }
}
