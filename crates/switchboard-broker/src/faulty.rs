use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde_json::Value;
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, RoomMessage, Sender, StreamPosition};

use crate::{
    Broker, BrokerError, BrokerHandler, BrokerResult, DirectMessage, History, HistoryQuery,
    SessionRecord,
};

/// Wraps a broker and, while `set_down(true)`, fails every call with `Unavailable` and reports
/// itself unhealthy, as a broker whose Redis vanished would. For tests of failure paths.
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    down: AtomicBool,
}

impl FaultyBroker {
    pub fn new(inner: Arc<dyn Broker>) -> Self {
        FaultyBroker {
            inner,
            down: AtomicBool::new(false),
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> BrokerResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(BrokerError::Unavailable("injected fault".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Broker for FaultyBroker {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> BrokerResult<()> {
        self.inner.start(handler).await
    }

    async fn publish(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
    ) -> BrokerResult<Arc<RoomMessage>> {
        self.check()?;
        self.inner.publish(room, data, from).await
    }

    async fn subscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.check()?;
        self.inner.subscribe_room(room).await
    }

    async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.inner.unsubscribe_room(room).await
    }

    async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        self.check()?;
        self.inner.history(room, query).await
    }

    async fn position(&self, room: &str) -> BrokerResult<StreamPosition> {
        self.check()?;
        self.inner.position(room).await
    }

    async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        self.check()?;
        self.inner.send(message).await
    }

    async fn broadcast(&self, data: Value) -> BrokerResult<u64> {
        self.check()?;
        self.inner.broadcast(data).await
    }

    async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64> {
        self.check()?;
        self.inner.disconnect(user, code, reason).await
    }

    async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.check()?;
        self.inner.register_session(record).await
    }

    async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.check()?;
        self.inner.unregister_session(record).await
    }

    async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.check()?;
        self.inner.join_presence(room, member).await
    }

    async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.check()?;
        self.inner.leave_presence(room, member).await
    }

    async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>> {
        self.check()?;
        self.inner.presence(room).await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()> {
        self.check()?;
        self.inner.heartbeat(node).await
    }

    async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
        self.check()?;
        self.inner.nodes().await
    }

    async fn deregister_node(&self, node: &str) -> BrokerResult<()> {
        self.check()?;
        self.inner.deregister_node(node).await
    }

    fn is_healthy(&self) -> bool {
        !self.down.load(Ordering::SeqCst) && self.inner.is_healthy()
    }
}
