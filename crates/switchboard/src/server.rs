//! The public port: an accept loop that takes a connection permit before `accept()`, an HTTP/1.1
//! handshake (hyper) bounded by a timeout, and the upgrade to a WebSocket session.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use switchboard_protocol::Codec;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, bearer_token};
use crate::config::Config;
use crate::demo;
use crate::frontdoor::{FrontDoor, IpSlot, Refusal};
use crate::node::Node;
use crate::session::{self, Admission};

/// The path WebSocket clients connect to.
pub const WS_PATH: &str = "/ws";

/// A connection refused for its address gets this long to send the request the 429 answers:
/// short, so that a flood of refused connections cannot hold many of `--max-connections`.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until `shutdown` is cancelled. A connection holds its permit from before
/// `accept()` until its session ends, so at most `max_connections` are open; the rest wait in the
/// kernel's backlog.
pub async fn serve_public(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(node.config().max_connections));
    let door = FrontDoor::new(node.config(), node.metrics().clone());
    let mut backoff = Duration::from_millis(1);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, remote)) => {
                backoff = Duration::from_millis(1);
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle_connection(
                    node.clone(),
                    door.clone(),
                    stream,
                    remote,
                    permit,
                ));
            }
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// What a connection holds until its session ends: its place under `--max-connections` and
/// under its address's `--max-connections-per-ip`. The upgrade takes both; otherwise they are
/// released when the connection ends.
struct Held {
    permit: Option<OwnedSemaphorePermit>,
    /// `None` until the client's address has been admitted.
    slot: Option<IpSlot>,
}

async fn handle_connection(
    node: Arc<Node>,
    door: Arc<FrontDoor>,
    stream: TcpStream,
    remote: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let timeout = node.config().handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    // A peer that is not a trusted proxy is the client: its address is admitted before it takes
    // a turn in the node-wide pace, so that one address's flood cannot crowd out everyone
    // else's handshakes. Behind a trusted proxy the client is known only from the request.
    let slot = if is_trusted(&remote.ip(), &node.config().trusted_proxies) {
        None
    } else {
        match door.admit(remote.ip()) {
            Ok(slot) => Some(slot),
            Err(refusal) => {
                // On a TLS port the 429 can only be read over TLS.
                let refusal_deadline = tokio::time::Instant::now() + REFUSAL_TIMEOUT;
                if let Some(stream) =
                    crate::tls::accept(&node, stream, remote, refusal_deadline).await
                {
                    answer_refusal(node, stream, refusal).await;
                }
                return;
            }
        }
    };
    if tokio::time::timeout_at(deadline, door.pace())
        .await
        .is_err()
    {
        node.metrics()
            .handshakes
            .with_label_values(&["queue_timeout"])
            .inc();
        tracing::debug!(%remote, "waited for --accept-rate past the handshake timeout");
        return;
    }
    let Some(stream) = crate::tls::accept(&node, stream, remote, deadline).await else {
        return;
    };
    let held = Arc::new(Mutex::new(Held {
        permit: Some(permit),
        slot,
    }));
    let service_node = node.clone();
    let service = service_fn(move |request| {
        let response = handle_request(&service_node, &door, request, remote, &held);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    match tokio::time::timeout_at(deadline, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            if error.is_timeout() {
                node.metrics()
                    .handshakes
                    .with_label_values(&["timeout"])
                    .inc();
            }
            tracing::debug!(%error, %remote, "handshake connection failed");
        }
        Err(_) => {
            node.metrics()
                .handshakes
                .with_label_values(&["timeout"])
                .inc();
            tracing::debug!(%remote, "handshake timed out");
        }
    }
}

/// Answers whatever the connection asks with the refusal's 429.
async fn answer_refusal(node: Arc<Node>, stream: crate::tls::Stream, refusal: Refusal) {
    let service = service_fn(move |_request| {
        let response = too_many(&node, &refusal);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, connection).await;
}

fn too_many(node: &Node, refusal: &Refusal) -> Response<Body> {
    let mut response = refuse(
        node,
        refusal.result,
        StatusCode::TOO_MANY_REQUESTS,
        refusal.message,
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(refusal.retry_after_secs),
    );
    response
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{text}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The public port serves one request per connection unless it upgrades.
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Refuses a handshake, counting it under `result`.
fn refuse(node: &Node, result: &'static str, status: StatusCode, text: &str) -> Response<Body> {
    node.metrics().handshakes.with_label_values(&[result]).inc();
    tracing::debug!(result, %status, text, "handshake refused");
    plain(status, text)
}

#[doc(hidden)]
pub fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// The codec for the offered subprotocols: none offered → JSON; else the first we support, in
/// the client's order; `Err` when only unknown ones are offered.
#[doc(hidden)]
#[allow(clippy::result_unit_err)]
pub fn choose_codec(headers: &HeaderMap) -> Result<Option<Codec>, ()> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|name| Codec::from_protocol(name))
        .map(Some)
        .ok_or(())
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the nearest
/// address in X-Forwarded-For (read from the right, as each proxy appends its peer) that is not a
/// trusted proxy itself. A malformed entry ends the search at the peer: nothing left of it can be
/// believed.
#[doc(hidden)]
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    if !is_trusted(&peer, trusted) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            return peer;
        };
        client = ip;
        if !is_trusted(&ip, trusted) {
            break;
        }
    }
    client
}

fn is_trusted(ip: &IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    trusted.iter().any(|network| network.contains(ip))
}

#[doc(hidden)]
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[doc(hidden)]
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

fn handle_request(
    node: &Arc<Node>,
    door: &Arc<FrontDoor>,
    mut request: Request<hyper::body::Incoming>,
    remote: SocketAddr,
    held: &Arc<Mutex<Held>>,
) -> Response<Body> {
    let trusted = &node.config().trusted_proxies;
    let client = client_ip(remote.ip(), request.headers(), trusted);
    {
        let mut held = held.lock();
        // A trusted proxy itself (no X-Forwarded-For) speaks for many clients: not limited.
        if held.slot.is_none() && !is_trusted(&client, trusted) {
            match door.admit(client) {
                Ok(slot) => held.slot = Some(slot),
                Err(refusal) => return too_many(node, &refusal),
            }
        }
    }
    if request.uri().path() != WS_PATH {
        if node.config().demo
            && let Some(response) =
                demo::respond(request.method(), request.uri().path(), request.headers())
        {
            return response;
        }
        return plain(
            StatusCode::NOT_FOUND,
            "not found: WebSocket clients connect to /ws",
        );
    }
    if request.method() != http::Method::GET {
        return refuse(
            node,
            "bad_request",
            StatusCode::METHOD_NOT_ALLOWED,
            "the WebSocket handshake is a GET",
        );
    }
    let headers = request.headers();
    let is_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return refuse(
            node,
            "bad_request",
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade request (Sec-WebSocket-Key missing)",
        );
    };
    if !is_upgrade {
        return refuse(
            node,
            "bad_request",
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade request (Connection: Upgrade and Upgrade: websocket expected)",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|version| version != "13")
    {
        let mut response = refuse(
            node,
            "bad_request",
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version: 13 expected",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    if node.is_draining() {
        return refuse(
            node,
            "draining",
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining: connect to another",
        );
    }
    if let Some(allowed) = &node.config().allowed_origins {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|origin| origin.to_str().ok())
            .map(|origin| origin.trim_end_matches('/'));
        if !origin.is_some_and(|origin| allowed.iter().any(|allowed| allowed == origin)) {
            return refuse(
                node,
                "forbidden_origin",
                StatusCode::FORBIDDEN,
                "origin not allowed",
            );
        }
    }
    let offered = match choose_codec(headers) {
        Ok(offered) => offered,
        Err(()) => {
            return refuse(
                node,
                "unsupported_protocol",
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer switchboard.v1.json or switchboard.v1.msgpack",
            );
        }
    };
    let query = request.uri().query();
    // An empty `?token=` is no token: it must not hide the Authorization header.
    let token = query_param(query, "token")
        .filter(|token| !token.is_empty())
        .or_else(|| bearer(headers).map(str::to_owned));
    let user = query_param(query, "user");
    let identity = match node.auth().authenticate(token.as_deref(), user.as_deref()) {
        Ok(identity) => identity,
        Err(error @ AuthError::BadUser) => {
            return refuse(
                node,
                "bad_request",
                StatusCode::BAD_REQUEST,
                &error.to_string(),
            );
        }
        Err(error) => {
            return refuse(
                node,
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                &error.to_string(),
            );
        }
    };
    let (permit, slot) = {
        let mut held = held.lock();
        (held.permit.take(), held.slot.take())
    };
    let Some(permit) = permit else {
        return refuse(
            node,
            "bad_request",
            StatusCode::BAD_REQUEST,
            "one upgrade per connection",
        );
    };

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(codec) = offered {
        response_headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(codec.protocol()),
        );
    }
    let admission = Admission {
        identity,
        codec: offered.unwrap_or(Codec::Json),
        remote,
        client,
    };
    let node = node.clone();
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _permit = permit;
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, %remote, "upgrade failed");
                return;
            }
        };
        node.metrics().handshakes.with_label_values(&["ok"]).inc();
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(websocket_config(node.config())),
        )
        .await;
        session::run(node, ws, admission).await;
    });
    response
}

/// Buffers set deliberately: a small read buffer keeps idle connections small; the write buffer
/// lets a session's batch of frames go out in a few socket writes instead of one write (and one
/// pass through the kernel's TCP stack) per frame, which is where a busy node spends most of its
/// CPU; the size limits make tungstenite refuse oversize frames before reading them. What is
/// handed to the socket is bounded by the session's batches, not by tungstenite.
pub fn websocket_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_size)
        .write_buffer_size(config.write_buffer_size)
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_peer_is_believed_about_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let headers = forwarded(&["203.0.113.7"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers, &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("192.0.2.1"), &headers, &trusted),
            ip("192.0.2.1"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers, &[]),
            ip("10.1.2.3"),
            "nobody is trusted by default"
        );
    }

    #[test]
    fn the_nearest_untrusted_address_is_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // A spoofed first entry, the client, then an inner proxy; over two header lines.
        let headers = forwarded(&["198.51.100.9, 203.0.113.7", "10.0.0.5"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers, &trusted),
            ip("203.0.113.7")
        );
        let all_proxies = forwarded(&["10.0.0.6, 10.0.0.5"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &all_proxies, &trusted),
            ip("10.0.0.6")
        );
        let malformed = forwarded(&["203.0.113.7, not-an-ip"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &malformed, &trusted),
            ip("10.1.2.3")
        );
        assert_eq!(
            client_ip(ip("10.1.2.3"), &HeaderMap::new(), &trusted),
            ip("10.1.2.3")
        );
    }
}
