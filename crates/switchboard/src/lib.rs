//! A switchboard node: holds WebSocket sessions, joins them to rooms and users, and reaches the
//! rest of the cluster through a [`Broker`](switchboard_broker::Broker).
//!
//! [`Server::bind`] binds both ports (port 0 works, for tests) and [`Server::run`] serves until
//! the shutdown future resolves, then drains.

// Public: what the binary, the examples, the fuzz targets and the tests use.
pub mod admission;
mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod fallback;
mod feed;
mod frontdoor;
mod hub;
mod internal;
mod metered;
mod metrics;
pub mod node;
mod queue;
pub mod server;
pub mod session;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_broker::{Broker, MemoryBroker, MemoryConfig};
use switchboard_redis::{RedisBroker, RedisConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;

/// Sessions get this long past the drain grace period to finish closing.
const DRAIN_SLACK: Duration = Duration::from_secs(5);
/// Interval between drain batches.
const DRAIN_STEP: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work (exit 64).
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker: {0}")]
    Broker(String),
}

pub struct Server {
    node: Arc<Node>,
    public: TcpListener,
    internal: TcpListener,
}

impl Server {
    /// Binds both ports and builds the node with the broker the configuration names.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let metrics =
            Arc::new(Metrics::new().map_err(|error| StartError::Config(error.to_string()))?);
        let broker: Arc<dyn Broker> = match &config.redis {
            Some(shards) => Arc::new(
                RedisBroker::new(
                    RedisConfig {
                        shards: shards.clone(),
                        ca_pem: config.redis_ca.clone(),
                        node_id: config.node_id.clone(),
                        instance: config.instance.clone(),
                        history_size: config.history_size,
                        history_ttl: config.history_ttl,
                        stream_ttl: config.stream_ttl,
                        node_ttl: config.node_ttl,
                        inbox_size: config.inbox_size,
                        inbox_ttl: config.inbox_ttl,
                        idempotency_window: config.idempotency_window,
                    },
                    metrics.registry(),
                )
                .map_err(|error| StartError::Config(error.to_string()))?,
            ),
            None => Arc::new(MemoryBroker::new(
                &config.node_id,
                MemoryConfig {
                    history_size: config.history_size,
                    history_ttl: config.history_ttl,
                    stream_ttl: config.stream_ttl,
                    inbox_size: config.inbox_size,
                    inbox_ttl: config.inbox_ttl,
                    idempotency_window: config.idempotency_window,
                },
            )),
        };
        Server::start(config, broker, metrics).await
    }

    /// Binds both ports and builds the node on the given broker.
    pub async fn bind_with_broker(
        config: Config,
        broker: Arc<dyn Broker>,
    ) -> Result<Server, StartError> {
        let metrics =
            Arc::new(Metrics::new().map_err(|error| StartError::Config(error.to_string()))?);
        Server::start(config, broker, metrics).await
    }

    async fn start(
        config: Config,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
    ) -> Result<Server, StartError> {
        let auth = Authenticator::new(config.jwt.as_ref())
            .map_err(|error| StartError::Config(error.to_string()))?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let public = bind(config.listen).await?;
        let internal = bind(config.internal_listen).await?;
        let public_addr = public.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let node = Arc::new(Node::new(config, broker, metrics, auth, public_addr));
        node.start()
            .await
            .map_err(|error| StartError::Broker(error.to_string()))?;
        Ok(Server {
            node,
            public,
            internal,
        })
    }

    pub fn node(&self) -> Arc<Node> {
        self.node.clone()
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.node.public_addr()
    }

    pub fn internal_addr(&self) -> std::io::Result<SocketAddr> {
        self.internal.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` fails at once; after the drain
    /// delay (while the node still accepts and serves, so that load balancers see the 503
    /// before anything is refused) the listener closes, sessions are closed with 1001 in
    /// batches over the grace period, and the node leaves the cluster.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            node,
            public,
            internal,
        } = self;
        node.is_ready();
        let stop_accepting = CancellationToken::new();
        let stop_internal = CancellationToken::new();
        let public_task = tokio::spawn(server::serve_public(
            node.clone(),
            public,
            stop_accepting.clone(),
        ));
        let internal_task = tokio::spawn(internal::serve_internal(
            node.clone(),
            internal,
            stop_internal.clone(),
        ));
        let heartbeat_task = tokio::spawn(report_liveness(node.clone()));
        let stats_task = node
            .config()
            .demo
            .then(|| tokio::spawn(demo::stats::publish_stats(node.clone())));

        shutdown.await;
        let delay = node.config().drain_delay;
        if !delay.is_zero() {
            node.start_leaving();
            tracing::info!(
                sessions = node.session_count(),
                delay_ms = delay.as_millis() as u64,
                "not ready; serving until the drain starts"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!(
            sessions = node.session_count(),
            grace_ms = node.config().drain_grace.as_millis() as u64,
            "draining"
        );
        node.start_draining();
        if let Some(stats_task) = &stats_task {
            stats_task.abort();
        }
        stop_accepting.cancel();
        let _ = public_task.await;
        drain_sessions(&node).await;
        heartbeat_task.abort();
        // A failure is counted and warned about; the node list forgets this node after its TTL.
        let _ = node.leave_cluster().await;
        stop_internal.cancel();
        internal_task.await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Reports this node's liveness and figures to the broker every third of the node TTL.
async fn report_liveness(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config().node_ttl / 3);
    loop {
        tick.tick().await;
        // A failure is counted and warned about; the next tick tries again.
        let _ = node.heartbeat().await;
        node.is_ready();
    }
}

/// Closes every session with 1001, spread over the grace period so that clients do not all
/// reconnect to the other nodes at the same instant, then waits for them to finish.
async fn drain_sessions(node: &Node) {
    let sessions = node.sessions();
    let steps = (node.config().drain_grace.as_millis() / DRAIN_STEP.as_millis()).max(1) as usize;
    let per_step = sessions.len().div_ceil(steps).max(1);
    for (index, batch) in sessions.chunks(per_step).enumerate() {
        if index > 0 {
            tokio::time::sleep(DRAIN_STEP).await;
        }
        for session in batch {
            session.queue.close(
                switchboard_protocol::close::GOING_AWAY,
                "node draining: reconnect",
            );
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_SLACK;
    while node.session_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if node.session_count() > 0 {
        tracing::warn!(
            sessions = node.session_count(),
            "sessions still open after the drain"
        );
    }
}
