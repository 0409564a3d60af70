//! The node's only handle on the broker: every call is timed in
//! `switchboard_broker_call_duration_seconds{op}`, and every call that fails is counted in
//! `switchboard_broker_errors_total{op}` and warned about (throttled) here, once for all callers,
//! so a new call cannot forget its metrics. Room delivery (broker → hub) does not pass through it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_broker::{
    Acked, Broker, BrokerError, BrokerHandler, BrokerResult, DirectMessage, History, HistoryQuery,
    Inbox, Published, Sent, SessionRecord,
};
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, RoomMessage, Sender, StreamPosition};

use crate::metrics::Metrics;

/// At most one "broker call failed" warning per operation in this period: an outage fails every
/// session's calls at once, and `switchboard_broker_errors_total` counts each of them anyway.
const BROKER_WARNING_PERIOD: Duration = Duration::from_secs(1);

pub struct MeteredBroker {
    inner: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    warnings: parking_lot::Mutex<WarningThrottle>,
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

impl MeteredBroker {
    pub fn new(inner: Arc<dyn Broker>, metrics: Arc<Metrics>) -> Self {
        MeteredBroker {
            inner,
            metrics,
            warnings: parking_lot::Mutex::new(WarningThrottle::default()),
        }
    }

    /// Times a call of `op`, counts it if it fails, and passes its result on.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = BrokerResult<T>>,
    ) -> BrokerResult<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .broker_call_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|error| self.failed(op, error))
    }

    fn failed(&self, op: &'static str, error: BrokerError) -> BrokerError {
        self.metrics.broker_errors.with_label_values(&[op]).inc();
        let warn = self.warnings.lock().should_warn(op, Instant::now());
        if let Some(also_failed) = warn {
            tracing::warn!(%error, op, also_failed, "broker call failed");
        }
        error
    }

    /// Not counted: a broker that cannot start stops the node, with its own message.
    pub async fn start(&self, handler: Arc<dyn BrokerHandler>) -> BrokerResult<()> {
        self.inner.start(handler).await
    }

    pub fn is_healthy(&self) -> bool {
        self.inner.is_healthy()
    }

    /// Also timed in the publish latency histogram, which predates the per-operation one.
    pub async fn publish(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>> {
        let started = Instant::now();
        let result = self
            .call("publish", self.inner.publish(room, data, from))
            .await;
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Timed in the publish latency histogram too, like `publish`.
    pub async fn publish_keyed(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published> {
        let started = Instant::now();
        let result = self
            .call(
                "publish_keyed",
                self.inner.publish_keyed(room, data, from, key),
            )
            .await;
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    pub async fn subscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.call("subscribe", self.inner.subscribe_room(room))
            .await
    }

    pub async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.call("unsubscribe", self.inner.unsubscribe_room(room))
            .await
    }

    pub async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        self.call("history", self.inner.history(room, query)).await
    }

    pub async fn position(&self, room: &str) -> BrokerResult<StreamPosition> {
        self.call("position", self.inner.position(room)).await
    }

    pub async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        self.call("send", self.inner.send(message)).await
    }

    pub async fn send_persisted(
        &self,
        message: DirectMessage,
        key: Option<&str>,
    ) -> BrokerResult<Sent> {
        self.call("send_persisted", self.inner.send_persisted(message, key))
            .await
    }

    pub async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked> {
        self.call("ack", self.inner.ack(user, seq)).await
    }

    pub async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox> {
        self.call("inbox", self.inner.inbox(user, after, limit, max_bytes))
            .await
    }

    pub async fn broadcast(&self, data: Value) -> BrokerResult<u64> {
        self.call("broadcast", self.inner.broadcast(data)).await
    }

    pub async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64> {
        self.call("disconnect", self.inner.disconnect(user, code, reason))
            .await
    }

    pub async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.call("register_session", self.inner.register_session(record))
            .await
    }

    pub async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.call("unregister_session", self.inner.unregister_session(record))
            .await
    }

    pub async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.call("join_presence", self.inner.join_presence(room, member))
            .await
    }

    pub async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.call("leave_presence", self.inner.leave_presence(room, member))
            .await
    }

    pub async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>> {
        self.call("presence", self.inner.presence(room)).await
    }

    pub async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()> {
        self.call("heartbeat", self.inner.heartbeat(node)).await
    }

    pub async fn register_link(&self, link: &switchboard_broker::LinkRecord) -> BrokerResult<()> {
        self.call("register_link", self.inner.register_link(link))
            .await
    }

    pub async fn unregister_link(&self, link: &switchboard_broker::LinkRecord) -> BrokerResult<()> {
        self.call("unregister_link", self.inner.unregister_link(link))
            .await
    }

    pub async fn forward(
        &self,
        session: &str,
        key_hash: &str,
        frames: Vec<String>,
    ) -> BrokerResult<switchboard_broker::Forwarded> {
        self.call("forward", self.inner.forward(session, key_hash, frames))
            .await
    }

    pub async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
        self.call("nodes", self.inner.nodes()).await
    }

    pub async fn deregister_node(&self, node: &str) -> BrokerResult<()> {
        self.call("deregister_node", self.inner.deregister_node(node))
            .await
    }
}

#[cfg(test)]
mod tests {
    use switchboard_broker::FaultyBroker;

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

    #[tokio::test]
    async fn every_failed_call_is_counted_by_operation() {
        let faulty = Arc::new(FaultyBroker::new(Arc::new(
            switchboard_broker::MemoryBroker::new("n", Default::default()),
        )));
        let metrics = Arc::new(Metrics::new().unwrap());
        let broker = MeteredBroker::new(faulty.clone(), metrics.clone());
        let count = |op: &str| metrics.broker_errors.with_label_values(&[op]).get();
        broker.subscribe_room("r").await.unwrap();
        assert_eq!(count("subscribe"), 0);
        faulty.set_down(true);
        assert!(broker.subscribe_room("r").await.is_err());
        assert!(broker.position("r").await.is_err());
        assert!(broker.position("r").await.is_err());
        assert!(broker.publish("r", Value::Null, None).await.is_err());
        assert_eq!(count("subscribe"), 1);
        assert_eq!(count("position"), 2);
        assert_eq!(count("publish"), 1);
        assert_eq!(metrics.publish_seconds.get_sample_count(), 1);
        let timed = |op: &str| {
            metrics
                .broker_call_seconds
                .with_label_values(&[op])
                .get_sample_count()
        };
        assert_eq!(timed("subscribe"), 2, "failed calls are timed too");
        assert_eq!(timed("position"), 2);
        assert_eq!(timed("publish"), 1);
    }
}
