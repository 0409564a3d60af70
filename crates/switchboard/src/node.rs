//! The Node wires the Hub (local sessions) to the Broker (everything across nodes). It receives a
//! room from the broker only while a local session is subscribed to it, plus a short linger.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::Value;
use switchboard_broker::{Broker, BrokerError, BrokerResult};
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Codec, RoomMessage, Sender, ServerFrame};

use crate::auth::{Authenticator, unix_now_millis};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// At most one "broker call failed" warning per operation in this period: an outage fails every
/// session's calls at once, and `switchboard_broker_errors_total` counts each of them anyway.
const BROKER_WARNING_PERIOD: Duration = Duration::from_secs(1);

pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub auth: Authenticator,
    /// Rooms this node receives from the broker, with how many local subscriptions hold each.
    upstream: DashMap<Arc<str>, Arc<Upstream>>,
    /// Set on SIGTERM: `/readyz` fails (before the drain when there is a drain delay).
    leaving: AtomicBool,
    /// Set when the drain starts: new handshakes are refused.
    draining: AtomicBool,
    /// The public address clients reach this node at, as `GET /api/nodes` reports it.
    pub public_addr: SocketAddr,
    pub started_at: u64,
    broker_warnings: parking_lot::Mutex<WarningThrottle>,
}

/// Per broker operation: when it was last warned about, and failures not warned about since.
#[derive(Default)]
struct WarningThrottle(HashMap<&'static str, (Instant, u64)>);

impl WarningThrottle {
    /// Whether a failure of `op` at `now` is warned about, and if so how many failures of `op`
    /// went unmentioned since the previous warning.
    fn should_warn(&mut self, op: &'static str, now: Instant) -> Option<u64> {
        match self.0.get_mut(op) {
            Some((last, unmentioned)) if now.duration_since(*last) < BROKER_WARNING_PERIOD => {
                *unmentioned += 1;
                None
            }
            Some((last, unmentioned)) => {
                *last = now;
                Some(std::mem::take(unmentioned))
            }
            None => {
                self.0.insert(op, (now, 0));
                Some(0)
            }
        }
    }
}

struct Upstream {
    /// Async so that concurrent first joins wait for the one broker subscription.
    state: tokio::sync::Mutex<UpstreamState>,
}

#[derive(Default)]
struct UpstreamState {
    local: usize,
    subscribed: bool,
    /// Taken out of the map: a joiner holding a stale `Arc` must look again.
    removed: bool,
}

impl Node {
    pub fn new(
        config: Config,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        auth: Authenticator,
        public_addr: SocketAddr,
    ) -> Self {
        Node {
            hub: Arc::new(Hub::new(metrics.clone())),
            config,
            broker,
            metrics,
            auth,
            upstream: DashMap::new(),
            leaving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            public_addr,
            started_at: unix_now_millis(),
            broker_warnings: parking_lot::Mutex::new(WarningThrottle::default()),
        }
    }

    pub fn id(&self) -> &str {
        &self.config.node_id
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether the node is shutting down, draining or about to: `/readyz` fails.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// `/readyz` fails from now on; the node still accepts and serves until `start_draining`.
    pub fn start_leaving(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    pub fn start_draining(&self) {
        self.start_leaving();
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        let ready = !self.is_leaving() && self.broker.is_healthy();
        self.metrics.ready.set(i64::from(ready));
        ready
    }

    /// Counts a failed broker call by operation and passes the error on.
    pub fn broker_error(&self, op: &'static str, error: BrokerError) -> BrokerError {
        self.metrics.broker_errors.with_label_values(&[op]).inc();
        let warn = self.broker_warnings.lock().should_warn(op, Instant::now());
        if let Some(also_failed) = warn {
            tracing::warn!(%error, op, also_failed, "broker call failed");
        }
        error
    }

    /// Makes sure the broker delivers `room` to this node, for one more local subscription.
    pub async fn acquire_room(&self, room: &str) -> BrokerResult<()> {
        loop {
            let upstream = self
                .upstream
                .entry(Arc::from(room))
                .or_insert_with(|| {
                    Arc::new(Upstream {
                        state: tokio::sync::Mutex::new(UpstreamState::default()),
                    })
                })
                .clone();
            let mut state = upstream.state.lock().await;
            if state.removed {
                continue;
            }
            if !state.subscribed {
                if let Err(error) = self.broker.subscribe_room(room).await {
                    if state.local == 0 {
                        state.removed = true;
                        self.upstream
                            .remove_if(room, |_, entry| Arc::ptr_eq(entry, &upstream));
                    }
                    return Err(self.broker_error("subscribe", error));
                }
                state.subscribed = true;
            }
            state.local += 1;
            return Ok(());
        }
    }

    /// One local subscription of `room` ended; after the linger, stop receiving it if none is left.
    pub async fn release_room(self: &Arc<Self>, room: &str) {
        let Some(upstream) = self.upstream.get(room).map(|entry| entry.clone()) else {
            return;
        };
        let mut state = upstream.state.lock().await;
        state.local = state.local.saturating_sub(1);
        if state.local > 0 {
            return;
        }
        drop(state);
        let node = self.clone();
        let room: Arc<str> = Arc::from(room);
        tokio::spawn(async move {
            tokio::time::sleep(node.config.room_linger).await;
            let mut state = upstream.state.lock().await;
            if state.local > 0 || state.removed {
                return;
            }
            // Unsubscribe before leaving the map: a joiner still finds this entry, waits for the
            // lock, sees `removed` and subscribes anew after this unsubscribe.
            if state.subscribed
                && let Err(error) = node.broker.unsubscribe_room(&room).await
            {
                node.broker_error("unsubscribe", error);
            }
            state.removed = true;
            node.upstream
                .remove_if(&room, |_, entry| Arc::ptr_eq(entry, &upstream));
        });
    }

    /// Rooms this node currently receives from the broker.
    pub fn upstream_rooms(&self) -> usize {
        self.upstream.len()
    }

    /// Publishes through the broker, timing it for the publish latency histogram.
    pub async fn publish(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>> {
        let started = Instant::now();
        let result = self.broker.publish(room, data, from).await;
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|error| self.broker_error("publish", error))
    }

    /// This node's figures, for the broker's node list.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.config.node_id.clone(),
            instance: self.config.instance.clone(),
            address: self.public_addr.to_string(),
            connections: self.hub.session_count() as u64,
            started_at: self.started_at,
            last_seen: unix_now_millis(),
        }
    }
}

/// What a frame carrying `data` would take, at most, over either codec: the frame measured with
/// `data` null, less the null, plus `data` itself.
fn frame_len_with(skeleton: &ServerFrame, data: &Value) -> usize {
    Codec::ALL
        .iter()
        .map(|codec| {
            let null = codec.encoded_len(&Value::Null);
            codec.encoded_len(skeleton) - null + codec.encoded_len(data)
        })
        .max()
        .unwrap_or(0)
}

/// An epoch as long as any a broker makes (16 hex digits), for measuring frames before publishing.
const EPOCH_BOUND: &str = "0000000000000000";

/// Why a frame was refused as too large for the message size limit.
pub fn too_large_message(bytes: usize, limit: usize) -> String {
    format!(
        "the frame recipients would receive is {bytes} bytes, over the {limit}-byte message size limit"
    )
}

impl Node {
    /// Checks that the `message` frame subscribers of `room` would get for `data` fits the
    /// message size limit, whatever their codec, with the largest offset and epoch. Room
    /// messages also travel inside `history` replies, which add a little more: see
    /// [`HISTORY_REPLY_HEADROOM`].
    pub fn check_room_frame(
        &self,
        room: &str,
        data: &Value,
        from: Option<&Sender>,
    ) -> Result<(), String> {
        let skeleton = ServerFrame::Message(Arc::new(RoomMessage {
            room: room.to_owned(),
            data: Value::Null,
            offset: u64::MAX,
            epoch: EPOCH_BOUND.to_owned(),
            from: from.cloned(),
        }));
        self.check_frame(&skeleton, data, HISTORY_REPLY_HEADROOM)
    }

    /// Checks that the `direct` frame for `data` fits the message size limit.
    pub fn check_direct_frame(&self, data: &Value, from: Option<&Sender>) -> Result<(), String> {
        let skeleton = ServerFrame::Direct {
            data: Value::Null,
            from: from.cloned(),
        };
        self.check_frame(&skeleton, data, 0)
    }

    /// Checks that the `broadcast` frame for `data` fits the message size limit.
    pub fn check_broadcast_frame(&self, data: &Value) -> Result<(), String> {
        let skeleton = ServerFrame::Broadcast { data: Value::Null };
        self.check_frame(&skeleton, data, 0)
    }

    fn check_frame(
        &self,
        skeleton: &ServerFrame,
        data: &Value,
        headroom: usize,
    ) -> Result<(), String> {
        let limit = self.config.max_message_size;
        let bytes = frame_len_with(skeleton, data) + headroom;
        if bytes <= limit {
            Ok(())
        } else {
            self.metrics
                .limit_refusals
                .with_label_values(&["message_size"])
                .inc();
            Err(too_large_message(bytes, limit))
        }
    }
}

/// Bytes a `history` reply adds around one room message (its type, id, position and `more`),
/// reserved when a message is published so that any message fits a reply of its own.
pub const HISTORY_REPLY_HEADROOM: usize = 128;

/// Longest room name accepted, to keep keys and frames bounded.
pub const MAX_ROOM_LEN: usize = 256;

/// Rooms whose names start with this are the nodes' own: clients may subscribe to them (as their
/// token allows) but never publish to them.
pub const SYSTEM_ROOM_PREFIX: &str = "$sys.";

/// Whether clients are refused publishing to `room`.
pub fn is_system_room(room: &str) -> bool {
    room.starts_with(SYSTEM_ROOM_PREFIX)
}

/// Room names are 1 to 256 bytes without control characters.
pub fn valid_room(room: &str) -> bool {
    !room.is_empty() && room.len() <= MAX_ROOM_LEN && !room.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_failures_are_warned_about_once_a_period_per_operation_with_a_count() {
        let mut throttle = WarningThrottle::default();
        let start = Instant::now();
        assert_eq!(throttle.should_warn("publish", start), Some(0));
        for millis in [1, 10, 999] {
            let at = start + Duration::from_millis(millis);
            assert_eq!(throttle.should_warn("publish", at), None);
        }
        assert_eq!(
            throttle.should_warn("subscribe", start + Duration::from_millis(5)),
            Some(0),
            "another operation has its own period"
        );
        let next = start + BROKER_WARNING_PERIOD;
        assert_eq!(throttle.should_warn("publish", next), Some(3));
        assert_eq!(throttle.should_warn("publish", next), None);
        assert_eq!(
            throttle.should_warn("publish", next + BROKER_WARNING_PERIOD),
            Some(1)
        );
    }
}
