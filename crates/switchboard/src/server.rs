//! The public port: an accept loop that takes a connection permit before `accept()`, an HTTP/1.1
//! handshake (hyper) bounded by a timeout, and the upgrade to a WebSocket session, or the
//! fallback transports' requests (`fallback.rs`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tower::{Layer, ServiceExt};
use tower_http::cors::CorsLayer;

use crate::admission::{self, AdmitContext, Refusal, WS_PATH, client_ip, is_trusted};
use crate::config::Config;
use crate::demo;
use crate::fallback::{self, Route};
use crate::frontdoor::{self, FrontDoor, IpSlot};
use crate::node::Node;
use crate::session::{self, Admission};

/// A connection refused for its address gets this long to send the request the 429 answers:
/// short, so that a flood of refused connections cannot hold many of `--max-connections`.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until `shutdown` is cancelled. A connection holds its permit from before
/// `accept()` until its session ends, so at most `max_connections` are open; the rest wait in the
/// kernel's backlog.
pub async fn serve_public(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(node.config().max_connections));
    let door = FrontDoor::new(node.config(), node.metrics().clone());
    let cors = Arc::new(fallback::cors(node.config()));
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
                    cors.clone(),
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
    /// Set once the request is read and its answer is an SSE stream or a waiting long poll:
    /// the connection then outlives the handshake timeout.
    lasting: bool,
}

async fn handle_connection(
    node: Arc<Node>,
    door: Arc<FrontDoor>,
    cors: Arc<CorsLayer>,
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
                    answer_refusal(node, stream, refusal.into()).await;
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
        lasting: false,
    }));
    let service_node = node.clone();
    let service_held = held.clone();
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let (node, door, held) = (service_node.clone(), door.clone(), service_held.clone());
        let cors = cors.clone();
        async move {
            if fallback::route(request.method(), request.uri().path()).is_none() {
                let response = handle_request(&node, &door, request, remote, &held).await;
                return Ok::<_, Infallible>(response);
            }
            // A preflight is answered by the CORS layer alone: the client is admitted first,
            // as for any other request.
            if request.method() == Method::OPTIONS
                && let Err(refusal) = admit_client(&node, &door, &request, remote, &held)
            {
                return Ok(refuse(&node, refusal.into()));
            }
            let handler = tower::service_fn(|request| async {
                Ok::<_, Infallible>(handle_request(&node, &door, request, remote, &held).await)
            });
            let Ok(mut response) = cors.layer(handler).oneshot(request).await;
            // The preflight's answer too: one request per connection.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let served = match tokio::time::timeout_at(deadline, connection.as_mut()).await {
        Err(_) if held.lock().lasting => Ok(connection.await),
        served => served,
    };
    match served {
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

/// Answers whatever the connection asks with the front door's refusal (a 429).
async fn answer_refusal(node: Arc<Node>, stream: crate::tls::Stream, refusal: Refusal) {
    let service = service_fn(move |_request| {
        let response = refuse(&node, refusal.clone());
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, connection).await;
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

/// Answers a refused request; a refused handshake is counted under its result and logged.
fn refuse(node: &Node, refusal: Refusal) -> Response<Body> {
    if let Some(result) = refusal.result {
        node.metrics().handshakes.with_label_values(&[result]).inc();
        let (status, text) = (refusal.status, &*refusal.text);
        tracing::debug!(result, %status, text, "handshake refused");
    }
    let mut response = plain(refusal.status, &refusal.text);
    response.headers_mut().extend(refusal.headers);
    response
}

/// The client behind the connection (the peer, or what a trusted proxy says), admitted by the
/// front door once per connection.
fn admit_client<B>(
    node: &Node,
    door: &Arc<FrontDoor>,
    request: &Request<B>,
    remote: SocketAddr,
    held: &Mutex<Held>,
) -> Result<IpAddr, frontdoor::Refusal> {
    let trusted = &node.config().trusted_proxies;
    let client = client_ip(remote.ip(), request.headers(), trusted);
    let mut held = held.lock();
    // A trusted proxy itself (no X-Forwarded-For) speaks for many clients: not limited.
    if held.slot.is_none() && !is_trusted(&client, trusted) {
        match door.admit(client) {
            Ok(slot) => held.slot = Some(slot),
            Err(refusal) => return Err(refusal),
        }
    }
    Ok(client)
}

async fn handle_request(
    node: &Arc<Node>,
    door: &Arc<FrontDoor>,
    mut request: Request<hyper::body::Incoming>,
    remote: SocketAddr,
    held: &Arc<Mutex<Held>>,
) -> Response<Body> {
    let client = match admit_client(node, door, &request, remote, held) {
        Ok(client) => client,
        Err(refusal) => return refuse(node, refusal.into()),
    };
    if node.config().demo
        && request.uri().path() != WS_PATH
        && let Some(response) =
            demo::respond(request.method(), request.uri().path(), request.headers())
    {
        return response;
    }
    let context = AdmitContext {
        config: node.config(),
        auth: node.auth(),
        draining: node.is_draining(),
    };
    let path = request.uri().path().to_owned();
    match fallback::route(request.method(), &path) {
        None => {}
        Some(Route::Open(kind)) => {
            let identity = match admission::admit_fallback(&request, &context) {
                Ok(identity) => identity,
                Err(refusal) => return refuse(node, refusal),
            };
            let (permit, slot) = {
                let mut held = held.lock();
                held.lasting = true;
                (held.permit.take(), held.slot.take())
            };
            let Some(permit) = permit else {
                return refuse(node, Refusal::second_upgrade());
            };
            let admission = Admission {
                identity,
                codec: switchboard_protocol::Codec::Json,
                remote,
                client,
            };
            // The session holds both until it ends, with or without this connection.
            return fallback::open(node, kind, admission, Box::new((permit, slot))).await;
        }
        Some(Route::Poll(session)) => {
            let lasting = || held.lock().lasting = true;
            return fallback::poll(node, session, request.headers(), lasting).await;
        }
        Some(Route::Post(session)) => return fallback::post(node, session, request).await,
        Some(Route::Delete(session)) => {
            let lasting = || held.lock().lasting = true;
            return fallback::delete(node, session, request.headers(), lasting).await;
        }
        Some(Route::NotAllowed(allow)) => return fallback::not_allowed(allow),
    }
    let admitted = match admission::admit(&request, &context) {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse(node, refusal),
    };
    let (permit, slot) = {
        let mut held = held.lock();
        (held.permit.take(), held.slot.take())
    };
    let Some(permit) = permit else {
        return refuse(node, Refusal::second_upgrade());
    };

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = admitted.headers;
    let admission = Admission {
        identity: admitted.identity,
        codec: admitted.codec,
        remote,
        client,
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(session_task(
        node.clone(),
        on_upgrade,
        admission,
        (permit, slot),
    ));
    response
}

/// A WebSocket connection's task: the upgrade, then the session, holding the connection's place
/// under `--max-connections` and its address's until the session ends. Two stages of one future
/// (`then`), not one `async` block: an `async` block keeps room for everything it captured (the
/// admission, the address, the upgrade) for as long as it runs, so every idle session's task was
/// about 350 bytes larger than the session needs.
fn session_task(
    node: Arc<Node>,
    on_upgrade: OnUpgrade,
    admission: Admission,
    held: (OwnedSemaphorePermit, Option<IpSlot>),
) -> impl Future<Output = ()> + Send {
    let remote = admission.remote;
    let config = websocket_config(node.config());
    let upgrade = async move {
        match on_upgrade.await {
            Ok(upgraded) => Some(
                WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await,
            ),
            Err(error) => {
                tracing::debug!(%error, %remote, "upgrade failed");
                None
            }
        }
    };
    upgrade.then(move |ws| {
        let session = ws.map(|ws| {
            node.metrics().handshakes.with_label_values(&["ok"]).inc();
            session::run(node, ws, admission)
        });
        OptionFuture::from(session).map(move |_| drop(held))
    })
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
    use hyper::upgrade::Upgraded;

    use super::*;

    /// The size of the future `f` returns, read from its type without calling it.
    fn future_size<A, B, C, D, F: Future>(_: &impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn session_size<A, B, C, F: Future>(_: &impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection holds one such future in its task (a cell rounded up to 128
    /// bytes): growing it grows every connection. The bounds sit just above today's sizes; a
    /// change that crosses them should find where the bytes went (docs/benchmarks.md, "Where
    /// an idle connection's bytes go") and move rarely used state behind a `Box`.
    #[test]
    fn a_sessions_task_stays_small() {
        let task = future_size(&session_task);
        let session = session_size(&session::run::<TokioIo<Upgraded>>);
        println!("session task future: {task} bytes; session::run's future: {session} bytes");
        assert!(
            session <= 1_700,
            "session::run's future grew to {session} bytes"
        );
        assert!(
            task <= session + 64,
            "the task holds {task} bytes around a session of {session}"
        );
    }
}
