use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use async_trait::async_trait;
use serde_json::Value;
use switchboard_protocol::api::NodeInfo;
use switchboard_protocol::{Member, RoomMessage, Sender, StreamPosition};

use crate::{
    Acked, Broker, BrokerError, BrokerHandler, BrokerResult, DirectMessage, History, HistoryQuery,
    Inbox, Published, Sent, SessionRecord,
};

/// Wraps a broker and, while `set_down(true)`, fails every call with `Unavailable` and reports
/// itself unhealthy, as a broker whose Redis vanished would; or panics once in a chosen call
/// (`panic_once`), as a bug would. For tests of failure paths.
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    down: AtomicBool,
    panic_in: Mutex<Option<&'static str>>,
}

impl FaultyBroker {
    pub fn new(inner: Arc<dyn Broker>) -> Self {
        FaultyBroker {
            inner,
            down: AtomicBool::new(false),
            panic_in: Mutex::new(None),
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The next call of the method named `op` (e.g. `"join_presence"`) panics; later ones don't.
    pub fn panic_once(&self, op: &'static str) {
        *self.panic_in.lock() = Some(op);
    }

    fn check(&self, op: &str) -> BrokerResult<()> {
        if self.panic_in.lock().take_if(|armed| *armed == op).is_some() {
            panic!("injected panic in {op}");
        }
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
        self.check("publish")?;
        self.inner.publish(room, data, from).await
    }

    async fn subscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.check("subscribe_room")?;
        self.inner.subscribe_room(room).await
    }

    async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.check("unsubscribe_room")?;
        self.inner.unsubscribe_room(room).await
    }

    async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        self.check("history")?;
        self.inner.history(room, query).await
    }

    async fn position(&self, room: &str) -> BrokerResult<StreamPosition> {
        self.check("position")?;
        self.inner.position(room).await
    }

    async fn send(&self, message: DirectMessage) -> BrokerResult<u64> {
        self.check("send")?;
        self.inner.send(message).await
    }

    async fn publish_keyed(
        &self,
        room: &str,
        data: Value,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published> {
        self.check("publish_keyed")?;
        self.inner.publish_keyed(room, data, from, key).await
    }

    async fn send_persisted(
        &self,
        message: DirectMessage,
        key: Option<&str>,
    ) -> BrokerResult<Sent> {
        self.check("send_persisted")?;
        self.inner.send_persisted(message, key).await
    }

    async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked> {
        self.check("ack")?;
        self.inner.ack(user, seq).await
    }

    async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox> {
        self.check("inbox")?;
        self.inner.inbox(user, after, limit, max_bytes).await
    }

    async fn broadcast(&self, data: Value) -> BrokerResult<u64> {
        self.check("broadcast")?;
        self.inner.broadcast(data).await
    }

    async fn disconnect(&self, user: &str, code: u16, reason: &str) -> BrokerResult<u64> {
        self.check("disconnect")?;
        self.inner.disconnect(user, code, reason).await
    }

    async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.check("register_session")?;
        self.inner.register_session(record).await
    }

    async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.check("unregister_session")?;
        self.inner.unregister_session(record).await
    }

    async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.check("join_presence")?;
        self.inner.join_presence(room, member).await
    }

    async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        self.check("leave_presence")?;
        self.inner.leave_presence(room, member).await
    }

    async fn presence(&self, room: &str) -> BrokerResult<Vec<Member>> {
        self.check("presence")?;
        self.inner.presence(room).await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()> {
        self.check("heartbeat")?;
        self.inner.heartbeat(node).await
    }

    async fn register_link(&self, link: &crate::LinkRecord) -> BrokerResult<()> {
        self.check("register_link")?;
        self.inner.register_link(link).await
    }

    async fn unregister_link(&self, link: &crate::LinkRecord) -> BrokerResult<()> {
        self.check("unregister_link")?;
        self.inner.unregister_link(link).await
    }

    async fn forward(
        &self,
        session: &str,
        key_hash: &str,
        frames: Vec<String>,
    ) -> BrokerResult<crate::Forwarded> {
        self.check("forward")?;
        self.inner.forward(session, key_hash, frames).await
    }

    async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
        self.check("nodes")?;
        self.inner.nodes().await
    }

    async fn deregister_node(&self, node: &str) -> BrokerResult<()> {
        self.check("deregister_node")?;
        self.inner.deregister_node(node).await
    }

    fn is_healthy(&self) -> bool {
        !self.down.load(Ordering::SeqCst) && self.inner.is_healthy()
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use serde_json::json;

    use super::*;
    use crate::{MemoryBroker, MemoryConfig, PresenceEvent};

    #[derive(Default)]
    struct Recorder {
        rooms: Mutex<Vec<u64>>,
        other: Mutex<usize>,
    }

    impl BrokerHandler for Recorder {
        fn room_message(&self, message: Arc<RoomMessage>) {
            self.rooms.lock().push(message.offset);
        }
        fn presence(&self, _event: PresenceEvent) {
            *self.other.lock() += 1;
        }
        fn direct(&self, _message: Arc<DirectMessage>) {
            *self.other.lock() += 1;
        }
        fn broadcast(&self, _data: Arc<Value>) {
            *self.other.lock() += 1;
        }
        fn frames(&self, _session: &str, _frames: Vec<String>) {
            *self.other.lock() += 1;
        }
        fn disconnect(&self, _user: &str, _code: u16, _reason: &str) {
            *self.other.lock() += 1;
        }
    }

    fn member() -> Member {
        Member {
            user: "alice".into(),
            session: "s1".into(),
            info: None,
        }
    }

    fn record() -> SessionRecord {
        SessionRecord {
            session: "s1".into(),
            user: "alice".into(),
            node: "n1".into(),
            connected_at: 0,
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            id: "n1".into(),
            instance: "1".into(),
            address: "n1:8080".into(),
            connections: 1,
            started_at: 1,
            last_seen: 2,
        }
    }

    fn direct() -> DirectMessage {
        DirectMessage {
            user: "alice".into(),
            data: json!("hi"),
            from: None,
            seq: None,
        }
    }

    async fn faulty() -> (FaultyBroker, Arc<Recorder>) {
        let broker = FaultyBroker::new(Arc::new(MemoryBroker::new("n1", MemoryConfig::default())));
        let recorder = Arc::new(Recorder::default());
        broker.start(recorder.clone()).await.unwrap();
        (broker, recorder)
    }

    fn assert_unavailable<T: std::fmt::Debug>(result: BrokerResult<T>) {
        match result {
            Err(BrokerError::Unavailable(reason)) => assert_eq!(reason, "injected fault"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn passes_through_while_up() {
        let (broker, recorder) = faulty().await;
        assert!(broker.is_healthy());

        broker.subscribe_room("r").await.unwrap();
        let message = broker.publish("r", json!(1), None).await.unwrap();
        assert_eq!(message.offset, 1);
        assert_eq!(*recorder.rooms.lock(), vec![1]);
        let position = broker.position("r").await.unwrap();
        assert_eq!(position.offset, 1);
        assert_eq!(position.epoch, message.epoch);
        let history = broker.history("r", HistoryQuery::default()).await.unwrap();
        assert_eq!(history.messages, vec![message]);

        broker.register_session(&record()).await.unwrap();
        assert_eq!(broker.send(direct()).await.unwrap(), 1);
        assert_eq!(broker.disconnect("alice", 1000, "").await.unwrap(), 1);
        assert_eq!(broker.broadcast(json!(0)).await.unwrap(), 1);
        broker.join_presence("r", &member()).await.unwrap();
        assert_eq!(broker.presence("r").await.unwrap(), vec![member()]);
        broker.leave_presence("r", &member()).await.unwrap();
        assert!(broker.presence("r").await.unwrap().is_empty());
        // direct, disconnect, broadcast, join, leave
        assert_eq!(*recorder.other.lock(), 5);
        broker.unregister_session(&record()).await.unwrap();
        assert_eq!(broker.send(direct()).await.unwrap(), 0);

        broker.heartbeat(&node()).await.unwrap();
        assert_eq!(broker.nodes().await.unwrap(), vec![node()]);
        broker.unsubscribe_room("r").await.unwrap();
        broker.publish("r", json!(2), None).await.unwrap();
        assert_eq!(*recorder.rooms.lock(), vec![1]);
        broker.deregister_node("n1").await.unwrap();
        assert!(broker.nodes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn fails_while_down_without_side_effects_then_recovers() {
        let (broker, recorder) = faulty().await;
        broker.subscribe_room("r").await.unwrap();
        broker.publish("r", json!(1), None).await.unwrap();
        broker.register_session(&record()).await.unwrap();
        broker.join_presence("r", &member()).await.unwrap();
        broker.heartbeat(&node()).await.unwrap();
        recorder.rooms.lock().clear();
        *recorder.other.lock() = 0;

        broker.set_down(true);
        assert!(!broker.is_healthy());
        assert_unavailable(broker.publish("r", json!(2), None).await);
        assert_unavailable(broker.subscribe_room("q").await);
        assert_unavailable(broker.history("r", HistoryQuery::default()).await);
        assert_unavailable(broker.position("r").await);
        assert_unavailable(broker.send(direct()).await);
        assert_unavailable(broker.publish_keyed("r", json!(2), None, "k").await);
        assert_unavailable(broker.send_persisted(direct(), Some("k")).await);
        assert_unavailable(broker.ack("alice", 0).await);
        assert_unavailable(broker.inbox("alice", 0, 10, 1000).await);
        assert_unavailable(broker.broadcast(json!(0)).await);
        assert_unavailable(broker.disconnect("alice", 1000, "").await);
        assert_unavailable(broker.register_session(&record()).await);
        assert_unavailable(broker.unregister_session(&record()).await);
        assert_unavailable(broker.join_presence("q", &member()).await);
        assert_unavailable(broker.leave_presence("r", &member()).await);
        assert_unavailable(broker.presence("r").await);
        assert_unavailable(broker.heartbeat(&node()).await);
        assert_unavailable(broker.nodes().await);
        assert_unavailable(broker.deregister_node("n1").await);
        // Nothing reached the handler.
        assert!(recorder.rooms.lock().is_empty());
        assert_eq!(*recorder.other.lock(), 0);

        broker.set_down(false);
        assert!(broker.is_healthy());
        // Nothing the failed calls asked for happened.
        assert_eq!(broker.position("r").await.unwrap().offset, 1);
        assert_eq!(broker.presence("r").await.unwrap(), vec![member()]);
        assert!(broker.presence("q").await.unwrap().is_empty());
        assert_eq!(broker.send(direct()).await.unwrap(), 1);
        assert!(
            broker
                .inbox("alice", 0, 10, 1000)
                .await
                .unwrap()
                .pending
                .is_empty()
        );
        assert_eq!(broker.nodes().await.unwrap(), vec![node()]);
        // "q" was not subscribed; "r" still is.
        broker.publish("q", json!(1), None).await.unwrap();
        let message = broker.publish("r", json!(3), None).await.unwrap();
        assert_eq!(message.offset, 2);
        assert_eq!(*recorder.rooms.lock(), vec![2]);
    }

    #[tokio::test]
    async fn panics_once_in_the_chosen_call_only() {
        let (broker, _recorder) = faulty().await;
        let broker = Arc::new(broker);
        broker.panic_once("presence");
        broker.position("r").await.unwrap();
        let task = broker.clone();
        let panicked = tokio::spawn(async move { task.presence("r").await }).await;
        assert!(panicked.unwrap_err().is_panic());
        assert!(broker.presence("r").await.unwrap().is_empty(), "only once");
    }

    #[tokio::test]
    async fn reports_the_inner_brokers_health() {
        struct Sick;

        #[async_trait]
        impl Broker for Sick {
            async fn start(&self, _handler: Arc<dyn BrokerHandler>) -> BrokerResult<()> {
                Ok(())
            }
            async fn publish(
                &self,
                _room: &str,
                _data: Value,
                _from: Option<Sender>,
            ) -> BrokerResult<Arc<RoomMessage>> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn subscribe_room(&self, _room: &str) -> BrokerResult<()> {
                Ok(())
            }
            async fn unsubscribe_room(&self, _room: &str) -> BrokerResult<()> {
                Ok(())
            }
            async fn history(&self, _room: &str, _query: HistoryQuery) -> BrokerResult<History> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn position(&self, _room: &str) -> BrokerResult<StreamPosition> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn send(&self, _message: DirectMessage) -> BrokerResult<u64> {
                Ok(0)
            }
            async fn publish_keyed(
                &self,
                _room: &str,
                _data: Value,
                _from: Option<Sender>,
                _key: &str,
            ) -> BrokerResult<Published> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn send_persisted(
                &self,
                _message: DirectMessage,
                _key: Option<&str>,
            ) -> BrokerResult<Sent> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn ack(&self, _user: &str, _seq: u64) -> BrokerResult<Acked> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn inbox(
                &self,
                _user: &str,
                _after: u64,
                _limit: usize,
                _max_bytes: usize,
            ) -> BrokerResult<Inbox> {
                Err(BrokerError::Internal("sick".into()))
            }
            async fn broadcast(&self, _data: Value) -> BrokerResult<u64> {
                Ok(0)
            }
            async fn disconnect(
                &self,
                _user: &str,
                _code: u16,
                _reason: &str,
            ) -> BrokerResult<u64> {
                Ok(0)
            }
            async fn register_session(&self, _record: &SessionRecord) -> BrokerResult<()> {
                Ok(())
            }
            async fn unregister_session(&self, _record: &SessionRecord) -> BrokerResult<()> {
                Ok(())
            }
            async fn join_presence(&self, _room: &str, _member: &Member) -> BrokerResult<()> {
                Ok(())
            }
            async fn leave_presence(&self, _room: &str, _member: &Member) -> BrokerResult<()> {
                Ok(())
            }
            async fn presence(&self, _room: &str) -> BrokerResult<Vec<Member>> {
                Ok(Vec::new())
            }
            async fn heartbeat(&self, _node: &NodeInfo) -> BrokerResult<()> {
                Ok(())
            }
            async fn register_link(&self, _link: &crate::LinkRecord) -> BrokerResult<()> {
                Ok(())
            }
            async fn unregister_link(&self, _link: &crate::LinkRecord) -> BrokerResult<()> {
                Ok(())
            }
            async fn forward(
                &self,
                _session: &str,
                _key_hash: &str,
                _frames: Vec<String>,
            ) -> BrokerResult<crate::Forwarded> {
                Ok(crate::Forwarded::UnknownSession)
            }
            async fn nodes(&self) -> BrokerResult<Vec<NodeInfo>> {
                Ok(Vec::new())
            }
            async fn deregister_node(&self, _node: &str) -> BrokerResult<()> {
                Ok(())
            }
            fn is_healthy(&self) -> bool {
                false
            }
        }

        let broker = FaultyBroker::new(Arc::new(Sick));
        assert!(!broker.is_healthy());
        // Up, errors of the inner broker pass through unchanged.
        assert_eq!(
            broker.position("r").await,
            Err(BrokerError::Internal("sick".into()))
        );
        broker.set_down(true);
        assert_unavailable(broker.position("r").await);
    }
}
