//! The internal port's server: the [`api`](crate::api) router on hyper connections that must
//! send their request heads in time (which also bounds idle keep-alive), at most
//! `--internal-max-connections` at once, and a shutdown no client can hold up.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::metrics::GaugeGuard;
use crate::node::Node;

/// On shutdown, requests in flight get this long to finish; then every connection is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Request heads (method, path, headers) larger than this end the connection: the internal
/// port's requests are small; bodies are not limited by this.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves the internal port until `stop` is cancelled, then lets requests in flight finish for
/// at most [`CLOSE_GRACE`] and drops whatever connections remain.
pub async fn serve_internal(node: Arc<Node>, listener: TcpListener, stop: CancellationToken) {
    let app = api::router(node.clone());
    let places = Arc::new(Semaphore::new(node.config().internal_max_connections));
    let connections = TaskTracker::new();
    let force = CancellationToken::new();
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(1);
                stream
            }
            Err(error) => {
                tracing::warn!(%error, "internal port: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // Closed at once rather than queued: a probe gets a fast failure, not a hang, and the
        // connections holding the places end within the header timeout once idle.
        let Ok(place) = places.clone().try_acquire_owned() else {
            node.metrics().internal_refused.inc();
            drop(stream);
            continue;
        };
        connections.spawn(serve_connection(
            node.clone(),
            app.clone(),
            stream,
            place,
            stop.clone(),
            force.clone(),
        ));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(CLOSE_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            open = connections.len(),
            "internal port: dropping connections still open"
        );
        force.cancel();
        connections.wait().await;
    }
}

async fn serve_connection(
    node: Arc<Node>,
    app: axum::Router,
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    stop: CancellationToken,
    force: CancellationToken,
) {
    let _open = GaugeGuard::new(&node.metrics().internal_connections);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config().internal_header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = force.cancelled() => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "internal port: connection ended");
    }
}
