//! The HTTP side of the fallback transports on the public port (the sessions themselves are
//! `session/fallback.rs`): opening a session (`GET /sse`, `GET /poll`), long polls
//! (`GET /poll/{session}`), client frames (`POST /sse|/poll/{session}`), which may reach any
//! node: a session of another node is found through the registry (`Node::forward`), and the
//! client's end of a session (`DELETE /sse|/poll/{session}`). All of them answer CORS requests
//! ([`cors`]), so a page on another origin can use them.
//! Every answer is one request per connection (`Connection: close`), so the front door's
//! per-address limits bound floods of polls and POSTs as they bound handshakes.

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};
use switchboard_broker::Forwarded;
use switchboard_protocol::close;
use tokio::sync::{mpsc, oneshot};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;
use crate::hub::SessionHandle;
use crate::node::Node;
use crate::session::{self, Admission, Kind, Started, key_hash};

/// Where EventSource clients open a session.
pub const SSE_PATH: &str = "/sse";
/// Where long-poll clients open a session.
pub const POLL_PATH: &str = "/poll";

/// Most client frames one POST may carry, so one request costs the session a bounded amount of
/// work (each frame is also counted by the session's rate limit).
pub const MAX_POST_FRAMES: usize = 100;

/// Longest session id looked up; ours are 16 hex digits.
const MAX_SESSION_ID_LEN: usize = 64;

/// The close reason of a session its client ended with `DELETE`.
pub const CLOSED_BY_CLIENT: &str = "closed by the client";

/// How long `DELETE` waits for the session to be gone everywhere (hub, presence, registry)
/// before it answers anyway: the session is closing either way.
const DELETE_WAIT: Duration = Duration::from_secs(5);

/// How long a browser may reuse a CORS preflight's answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(3600);

/// What a request of the fallback transports asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Open(Kind),
    Poll(&'a str),
    Post(&'a str),
    Delete(&'a str),
    /// A session path with a method it does not take.
    NotAllowed(&'static str),
}

/// The fallback route of `method` and `path`, or `None` for another path.
pub fn route<'a>(method: &Method, path: &'a str) -> Option<Route<'a>> {
    match path {
        SSE_PATH => return Some(Route::Open(Kind::Sse)),
        POLL_PATH => return Some(Route::Open(Kind::Poll)),
        _ => {}
    }
    let (kind, session) = if let Some(session) = path.strip_prefix("/sse/") {
        (Kind::Sse, session)
    } else {
        (Kind::Poll, path.strip_prefix("/poll/")?)
    };
    if session.is_empty() || session.contains('/') {
        return None;
    }
    Some(match (method, kind) {
        (&Method::POST, _) => Route::Post(session),
        (&Method::DELETE, _) => Route::Delete(session),
        (&Method::GET, Kind::Poll) => Route::Poll(session),
        (_, Kind::Poll) => Route::NotAllowed("GET, POST, DELETE, OPTIONS"),
        (_, Kind::Sse) => Route::NotAllowed("POST, DELETE, OPTIONS"),
    })
}

/// CORS for the fallback endpoints (WebSocket needs none), so a page on another origin than the
/// node's can use them: the `--allowed-origins`, echoed with `Vary: Origin`, or any origin (`*`)
/// without an allow-list. No credentials: the token and the session key travel in headers.
pub fn cors(config: &Config) -> CorsLayer {
    let origins = match &config.allowed_origins {
        // Matched as the handshake matches them (admission.rs), so CORS and the 403 agree.
        Some(allowed) => {
            let allowed = allowed.clone();
            AllowOrigin::predicate(move |origin, _| {
                origin.to_str().is_ok_and(|origin| {
                    let origin = origin.trim_end_matches('/');
                    allowed.iter().any(|allowed| allowed == origin)
                })
            })
        }
        None => AllowOrigin::any(),
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([
            HeaderName::from_static("x-switchboard-session"),
            header::RETRY_AFTER,
        ])
        .max_age(CORS_MAX_AGE)
}

/// Why a poll or a POST is refused: its status, `code`, metric result and message.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    UnknownSession,
    Forbidden,
    WrongNode,
    TooLarge(String),
    BadFrame(String),
    RateLimited,
    Unavailable,
}

impl Refused {
    fn status(&self) -> StatusCode {
        match self {
            Refused::UnknownSession => StatusCode::NOT_FOUND,
            Refused::Forbidden => StatusCode::FORBIDDEN,
            Refused::WrongNode => StatusCode::MISDIRECTED_REQUEST,
            Refused::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refused::BadFrame(_) => StatusCode::BAD_REQUEST,
            Refused::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Refused::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The body's `code`.
    fn code(&self) -> &'static str {
        match self {
            Refused::UnknownSession => "unknown_session",
            Refused::Forbidden => "forbidden",
            Refused::WrongNode => "wrong_node",
            Refused::TooLarge(_) => "too_large",
            Refused::BadFrame(_) => "bad_frame",
            Refused::RateLimited => "rate_limited",
            Refused::Unavailable => "unavailable",
        }
    }

    /// The `switchboard_fallback_requests_total` result.
    fn result(&self) -> &'static str {
        match self {
            Refused::UnknownSession => "not_found",
            other => other.code(),
        }
    }

    fn message(&self) -> String {
        match self {
            Refused::UnknownSession => "no such session: open a new one".to_owned(),
            Refused::Forbidden => {
                "wrong or missing session key (Authorization: Session <session_key>)".to_owned()
            }
            Refused::WrongNode => {
                "the session is on another node: polls must reach the node that holds it".to_owned()
            }
            Refused::TooLarge(message) | Refused::BadFrame(message) => message.clone(),
            Refused::RateLimited => "too many requests for this session: slow down".to_owned(),
            Refused::Unavailable => "the session registry is unavailable: retry".to_owned(),
        }
    }
}

/// A JSON answer of these endpoints: never cached, one request per connection.
fn json_response(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Answers a refused poll or POST, counting it under `endpoint`.
fn refuse(node: &Node, endpoint: &'static str, refused: Refused) -> Response<Body> {
    count(node, endpoint, refused.result());
    tracing::debug!(endpoint, code = refused.code(), "fallback request refused");
    let body = json!({"code": refused.code(), "message": refused.message()}).to_string();
    let mut response = json_response(refused.status(), body);
    if refused == Refused::RateLimited {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn count(node: &Node, endpoint: &'static str, result: &'static str) {
    node.metrics()
        .fallback_requests
        .with_label_values(&[endpoint, result])
        .inc();
}

/// A session path with a method it does not take.
pub fn not_allowed(allow: &'static str) -> Response<Body> {
    let body = json!({"code": "bad_request", "message": format!("allowed methods: {allow}")});
    let mut response = json_response(StatusCode::METHOD_NOT_ALLOWED, body.to_string());
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Opens an admitted session: the SSE stream's head at once, or the long poll's `[welcome]`
/// once the session has opened. `keep` (the connection's permit and address slot) is held by
/// the session until it ends.
pub async fn open(
    node: &Arc<Node>,
    kind: Kind,
    admission: Admission,
    keep: Box<dyn Any + Send>,
) -> Response<Body> {
    node.metrics().handshakes.with_label_values(&["ok"]).inc();
    count(node, "open", "ok");
    match session::start(node.clone(), kind, admission, keep) {
        Started::Sse(chunks) => {
            let stream = futures_util::stream::unfold(chunks, |mut chunks| async move {
                let chunk = chunks.recv().await?;
                Some((Ok::<_, Infallible>(chunk), chunks))
            });
            let mut response = Response::new(Body::from_stream(stream));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            // nginx and some proxies buffer responses unless told not to.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Started::Poll { session, answer } => {
            // The session task always answers the open request (`[welcome]`, or `[close]`).
            let body = answer.await.unwrap_or_else(|_| Bytes::from_static(b"[]"));
            let mut response = json_response(StatusCode::OK, body);
            if let Ok(value) = HeaderValue::from_str(&session) {
                response
                    .headers_mut()
                    .insert("x-switchboard-session", value);
            }
            response
        }
    }
}

/// The session key of `Authorization: Session <key>`.
fn session_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("session") && !key.is_empty()).then_some(key)
}

/// `GET /poll/{session}`: waits for the session's next frames (at most `--poll-timeout-ms`).
/// `lasting` is called once the poll waits: its connection then outlives the handshake timeout.
pub async fn poll(
    node: &Arc<Node>,
    session: &str,
    headers: &HeaderMap,
    lasting: impl FnOnce(),
) -> Response<Body> {
    const ENDPOINT: &str = "poll";
    let handle = match held_here(node, session, headers).await {
        Ok(handle) => handle,
        Err(refused) => return refuse(node, ENDPOINT, refused),
    };
    let Some(link) = &handle.link else {
        return refuse(node, ENDPOINT, Refused::UnknownSession);
    };
    let Some(polls) = &link.polls else {
        // An SSE session is read from its stream.
        return refuse(node, ENDPOINT, Refused::UnknownSession);
    };
    let (answer, answered) = oneshot::channel();
    match polls.try_send(answer) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return refuse(node, ENDPOINT, Refused::RateLimited);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return refuse(node, ENDPOINT, Refused::UnknownSession);
        }
    }
    drop(handle);
    lasting();
    match answered.await {
        Ok(body) => {
            count(node, ENDPOINT, "ok");
            json_response(StatusCode::OK, body)
        }
        // The session ended without a last word for this poll.
        Err(_) => refuse(node, ENDPOINT, Refused::UnknownSession),
    }
}

/// The fallback session a poll or a DELETE names, held by this node and opened with the key
/// the request carries; else why the request is refused (a WebSocket session's id: 404, as it
/// takes neither).
async fn held_here(
    node: &Node,
    session: &str,
    headers: &HeaderMap,
) -> Result<Arc<SessionHandle>, Refused> {
    let key = session_key(headers).ok_or(Refused::Forbidden)?;
    if session.len() > MAX_SESSION_ID_LEN {
        return Err(Refused::UnknownSession);
    }
    let hash = key_hash(key);
    let Some(handle) = node.session(session) else {
        return Err(elsewhere(node, session, &hash).await);
    };
    match &handle.link {
        None => Err(Refused::UnknownSession),
        Some(link) if link.key_hash != hash => Err(Refused::Forbidden),
        Some(_) => Ok(handle),
    }
}

/// Why a poll or a DELETE for a session that is not on this node is refused. Long polls (and so
/// their DELETE) are sticky: say whether the session lives elsewhere, so a load balancer
/// misconfiguration shows as 421 rather than as lost sessions (one Redis round trip).
async fn elsewhere(node: &Node, session: &str, hash: &str) -> Refused {
    match node.forward(session, hash, Vec::new()).await {
        Ok(Forwarded::Delivered) => Refused::WrongNode,
        Ok(Forwarded::UnknownSession) => Refused::UnknownSession,
        Ok(Forwarded::WrongKey) => Refused::Forbidden,
        Err(_) => Refused::Unavailable,
    }
}

/// `DELETE /sse|/poll/{session}`: the client ends its session, as a WebSocket client closes
/// its connection: close 1000 "closed by the client" (the waiting poll or the stream gets the
/// close frame if it can take it at once), presence leave, link and registry entry removed.
/// Answers 204 once the session is gone (or after [`DELETE_WAIT`]); the connection then
/// outlives the handshake timeout, as `lasting` says.
pub async fn delete(
    node: &Arc<Node>,
    session: &str,
    headers: &HeaderMap,
    lasting: impl FnOnce(),
) -> Response<Body> {
    const ENDPOINT: &str = "delete";
    let handle = match held_here(node, session, headers).await {
        Ok(handle) => handle,
        Err(refused) => return refuse(node, ENDPOINT, refused),
    };
    let Some(link) = &handle.link else {
        return refuse(node, ENDPOINT, Refused::UnknownSession);
    };
    link.closed_by_client.store(true, Ordering::Relaxed);
    handle.queue.close(close::NORMAL, CLOSED_BY_CLIENT);
    lasting();
    // The session task holds the receiving end of its inbound channel until it has removed
    // the session everywhere.
    let _ = tokio::time::timeout(DELETE_WAIT, link.inbound.closed()).await;
    drop(handle);
    count(node, ENDPOINT, "ok");
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `POST /sse|/poll/{session}`: client frames for the session, wherever it is.
pub async fn post<B>(node: &Arc<Node>, session: &str, request: http::Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    const ENDPOINT: &str = "post";
    let Some(key) = session_key(request.headers()) else {
        return refuse(node, ENDPOINT, Refused::Forbidden);
    };
    if session.len() > MAX_SESSION_ID_LEN {
        return refuse(node, ENDPOINT, Refused::UnknownSession);
    }
    let hash = key_hash(key);
    let local = node.session(session);
    if let Some(handle) = &local {
        match &handle.link {
            // A WebSocket session takes its frames from its socket.
            None => return refuse(node, ENDPOINT, Refused::UnknownSession),
            Some(link) if link.key_hash != hash => {
                return refuse(node, ENDPOINT, Refused::Forbidden);
            }
            Some(_) => {}
        }
    }
    let limit = node.config().max_message_size;
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            let message = format!("the body is over the {limit}-byte message size limit");
            return refuse(node, ENDPOINT, Refused::TooLarge(message));
        }
        Err(error) => {
            tracing::debug!(%error, "reading a POST body failed");
            let message = "the body could not be read".to_owned();
            return refuse(node, ENDPOINT, Refused::BadFrame(message));
        }
    };
    let frames = match parse_frames(&body) {
        Ok(frames) => frames,
        Err(refused) => return refuse(node, ENDPOINT, refused),
    };
    let accepted = frames.len();
    let refused = match local.as_ref().and_then(|handle| handle.link.as_ref()) {
        Some(link) => match link.inbound.try_send(frames) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(Refused::RateLimited),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(Refused::UnknownSession),
        },
        None => match node.forward(session, &hash, frames).await {
            Ok(Forwarded::Delivered) => None,
            Ok(Forwarded::UnknownSession) => Some(Refused::UnknownSession),
            Ok(Forwarded::WrongKey) => Some(Refused::Forbidden),
            Err(_) => Some(Refused::Unavailable),
        },
    };
    if let Some(refused) = refused {
        return refuse(node, ENDPOINT, refused);
    }
    count(node, ENDPOINT, "ok");
    json_response(
        StatusCode::ACCEPTED,
        json!({"accepted": accepted}).to_string(),
    )
}

/// A POST body's client frames, each as JSON text: one object, or a non-empty array of at most
/// [`MAX_POST_FRAMES`] objects. What a frame holds is the session's to judge, as for a
/// WebSocket text frame.
pub fn parse_frames(body: &[u8]) -> Result<Vec<String>, Refused> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| Refused::BadFrame(format!("the body is not JSON: {error}")))?;
    match value {
        Value::Object(_) => Ok(vec![value.to_string()]),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(Refused::BadFrame(
                    "an empty array holds no frame".to_owned(),
                ));
            }
            if items.len() > MAX_POST_FRAMES {
                return Err(Refused::TooLarge(format!(
                    "{} frames in one POST: at most {MAX_POST_FRAMES}",
                    items.len()
                )));
            }
            items
                .into_iter()
                .map(|item| match item {
                    Value::Object(_) => Ok(item.to_string()),
                    _ => Err(Refused::BadFrame(
                        "every element of the array must be a frame (a JSON object)".to_owned(),
                    )),
                })
                .collect()
        }
        _ => Err(Refused::BadFrame(
            "the body must be a frame (a JSON object) or an array of frames".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use http_body_util::Full;
    use switchboard_broker::{FaultyBroker, SessionRecord};
    use switchboard_protocol::Codec;

    use super::*;
    use crate::hub::{INBOUND_CAPACITY, Link, SessionHandle};
    use crate::queue::OutboundQueue;

    /// A started node of its own on the memory broker behind a `FaultyBroker`.
    async fn node() -> (Arc<Node>, Arc<FaultyBroker>) {
        let (node, broker) = crate::node::test_node(Default::default());
        node.start().await.unwrap();
        (node, broker)
    }

    fn post_request(session: &str, key: &str, body: &'static str) -> http::Request<Full<Bytes>> {
        http::Request::post(format!("/poll/{session}"))
            .header(header::AUTHORIZATION, format!("Session {key}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    async fn body_json(response: Response<Body>) -> Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn requests(node: &Node, endpoint: &str, result: &str) -> u64 {
        node.metrics()
            .fallback_requests
            .with_label_values(&[endpoint, result])
            .get()
    }

    #[tokio::test]
    async fn a_local_session_with_its_waiting_posts_full_is_answered_429_with_retry_after() {
        let (node, _) = node().await;
        // A session whose task takes nothing: its inbound channel fills.
        let (inbound, _frames) = mpsc::channel(INBOUND_CAPACITY);
        let handle = Arc::new(SessionHandle {
            id: Arc::from("00000000000000aa"),
            user: Arc::from("u"),
            codec: Codec::Json,
            queue: OutboundQueue::new(1 << 20, node.metrics().queue_bytes.clone()),
            link: Some(Box::new(Link {
                key_hash: key_hash("k"),
                transport: "poll",
                inbound,
                polls: None,
                closed_by_client: AtomicBool::new(false),
            })),
        });
        let record = SessionRecord {
            session: handle.id.to_string(),
            user: "u".to_owned(),
            node: node.id().to_owned(),
            connected_at: 0,
        };
        node.register_session(&handle, &record).await.unwrap();
        let ping = r#"{"type":"ping"}"#;
        for _ in 0..INBOUND_CAPACITY {
            let response = post(&node, &handle.id, post_request(&handle.id, "k", ping)).await;
            assert_eq!(response.status(), StatusCode::ACCEPTED);
        }
        let response = post(&node, &handle.id, post_request(&handle.id, "k", ping)).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(body_json(response).await["code"], "rate_limited");
        assert_eq!(requests(&node, "post", "rate_limited"), 1);
        assert_eq!(requests(&node, "post", "ok"), INBOUND_CAPACITY as u64);
        // The key is still checked first.
        let response = post(&node, &handle.id, post_request(&handle.id, "x", ping)).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_broker_failure_answers_503_for_a_session_of_another_node() {
        let (node, broker) = node().await;
        broker.set_down(true);
        let session = "00000000000000bb";
        let response = post(
            &node,
            session,
            post_request(session, "k", r#"{"type":"ping"}"#),
        )
        .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_json(response).await["code"], "unavailable");
        assert_eq!(requests(&node, "post", "unavailable"), 1);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Session k"));
        let response = poll(&node, session, &headers, || {}).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = delete(&node, session, &headers, || {}).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(requests(&node, "delete", "unavailable"), 1);
        // Once the registry answers again: no such session.
        broker.set_down(false);
        let response = post(
            &node,
            session,
            post_request(session, "k", r#"{"type":"ping"}"#),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn routes() {
        let (get, post, put) = (Method::GET, Method::POST, Method::PUT);
        assert_eq!(route(&get, "/sse"), Some(Route::Open(Kind::Sse)));
        assert_eq!(route(&post, "/poll"), Some(Route::Open(Kind::Poll)));
        assert_eq!(route(&get, "/poll/abc"), Some(Route::Poll("abc")));
        assert_eq!(route(&post, "/poll/abc"), Some(Route::Post("abc")));
        assert_eq!(route(&post, "/sse/abc"), Some(Route::Post("abc")));
        assert_eq!(
            route(&Method::DELETE, "/poll/abc"),
            Some(Route::Delete("abc"))
        );
        assert_eq!(
            route(&Method::DELETE, "/sse/abc"),
            Some(Route::Delete("abc"))
        );
        assert_eq!(
            route(&get, "/sse/abc"),
            Some(Route::NotAllowed("POST, DELETE, OPTIONS"))
        );
        assert_eq!(
            route(&put, "/poll/abc"),
            Some(Route::NotAllowed("GET, POST, DELETE, OPTIONS"))
        );
        for path in [
            "/ws",
            "/sse/",
            "/poll/",
            "/poll/a/b",
            "/ssex",
            "/polls/a",
            "/",
        ] {
            assert_eq!(route(&get, path), None, "{path}");
            assert_eq!(route(&post, path), None, "{path}");
        }
    }

    #[test]
    fn a_body_is_one_frame_or_an_array_of_frames() {
        assert_eq!(
            parse_frames(br#"{"type":"ping","id":1}"#),
            Ok(vec![r#"{"id":1,"type":"ping"}"#.to_owned()])
        );
        assert_eq!(
            parse_frames(br#"[{"type":"ping"},{"type":"nonsense"}]"#).map(|frames| frames.len()),
            Ok(2),
            "what a frame holds is the session's to judge"
        );
        for body in [
            &b"not json"[..],
            b"",
            b"[]",
            b"[1]",
            b"[{}, 2]",
            b"\"x\"",
            b"3",
            b"null",
        ] {
            assert!(
                matches!(parse_frames(body), Err(Refused::BadFrame(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let most = format!("[{}]", vec!["{}"; MAX_POST_FRAMES].join(","));
        assert_eq!(
            parse_frames(most.as_bytes()).map(|f| f.len()),
            Ok(MAX_POST_FRAMES)
        );
        let over = format!("[{}]", vec!["{}"; MAX_POST_FRAMES + 1].join(","));
        assert!(matches!(
            parse_frames(over.as_bytes()),
            Err(Refused::TooLarge(_))
        ));
    }

    #[test]
    fn the_session_key_comes_from_a_session_authorization() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert_eq!(session_key(&headers("Session abc")), Some("abc"));
        assert_eq!(session_key(&headers("session  abc ")), Some("abc"));
        for value in ["Bearer abc", "Session", "Session ", "abc"] {
            assert_eq!(session_key(&headers(value)), None, "{value}");
        }
        assert_eq!(session_key(&HeaderMap::new()), None);
    }

    #[test]
    fn refusals_carry_their_status_code_and_result() {
        let cases = [
            (Refused::UnknownSession, 404, "unknown_session", "not_found"),
            (Refused::Forbidden, 403, "forbidden", "forbidden"),
            (Refused::WrongNode, 421, "wrong_node", "wrong_node"),
            (
                Refused::TooLarge(String::new()),
                413,
                "too_large",
                "too_large",
            ),
            (
                Refused::BadFrame(String::new()),
                400,
                "bad_frame",
                "bad_frame",
            ),
            (Refused::RateLimited, 429, "rate_limited", "rate_limited"),
            (Refused::Unavailable, 503, "unavailable", "unavailable"),
        ];
        for (refused, status, code, result) in cases {
            assert_eq!(refused.status().as_u16(), status);
            assert_eq!((refused.code(), refused.result()), (code, result));
        }
    }
}
