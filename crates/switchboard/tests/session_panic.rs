//! A panic inside a session task (injected with `FaultyBroker::panic_once`) ends that session
//! cleanly: closed with 1011, gone from the hub, the session registry and presence, counted in
//! `switchboard_session_panics_total`; the node keeps serving everyone else.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchboard::Server;
use switchboard::config::Options;
use switchboard::node::Node;
use switchboard_broker::{Broker, DirectMessage, FaultyBroker, MemoryBus, MemoryConfig};
use switchboard_client::{Client, ConnectOptions, Event, ReconnectPolicy};
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(10);

struct Running {
    ws_url: String,
    node: Arc<Node>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(broker: Arc<dyn Broker>) -> Running {
    let config = Options {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        node_id: Some("n1".to_owned()),
        room_linger_ms: Some(50),
        drain_grace_ms: Some(0),
        ..Options::default()
    }
    .resolve()
    .unwrap();
    let server = Server::bind_with_broker(config, broker).await.unwrap();
    let ws_url = format!("ws://{}/ws", server.public_addr());
    let node = server.node();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        ws_url,
        node,
        stop,
        task,
    }
}

impl Running {
    async fn client(&self, user: &str) -> Client {
        Client::connect(
            &self.ws_url,
            ConnectOptions {
                user: Some(user.to_owned()),
                reconnect: ReconnectPolicy {
                    max_attempts: Some(0),
                    ..ReconnectPolicy::default()
                },
                ..ConnectOptions::default()
            },
        )
        .await
        .unwrap()
    }

    async fn wait_until(&self, what: &str, condition: impl Fn(&Node) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !condition(&self.node) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sessions of `user` in the cluster's registry, as a backend's `send` counts them.
    async fn registered_sessions(&self, user: &str) -> u64 {
        self.node
            .broker
            .send(DirectMessage {
                user: user.to_owned(),
                data: json!("probe"),
                from: None,
            })
            .await
            .unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("node stops")
            .expect("node task")
            .expect("node run");
    }
}

async fn disconnect_code(client: &Client) -> Option<u16> {
    loop {
        match tokio::time::timeout(DEADLINE, client.next_event()).await {
            Ok(Some(Event::Disconnected { code, .. })) => return code,
            Ok(Some(_)) => {}
            Ok(None) => panic!("client ended without a Disconnected event"),
            Err(_) => panic!("no disconnect in time"),
        }
    }
}

async fn next_data(client: &Client) -> serde_json::Value {
    loop {
        match tokio::time::timeout(DEADLINE, client.next_event()).await {
            Ok(Some(Event::Message(message))) => return message.data.clone(),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client closed"),
            Err(_) => panic!("no message in time"),
        }
    }
}

fn faulty_memory_broker() -> Arc<FaultyBroker> {
    Arc::new(FaultyBroker::new(Arc::new(
        MemoryBus::new(MemoryConfig::default()).broker("n1"),
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_serving_closes_with_1011_and_leaves_no_trace() {
    let faulty = faulty_memory_broker();
    let running = start(faulty.clone()).await;
    let bob = running.client("bob").await;
    bob.subscribe("room").await.unwrap();
    let alice = running.client("alice").await;
    alice.subscribe("room").await.unwrap();
    assert_eq!(bob.presence("room").await.unwrap().len(), 2);
    assert_eq!(running.registered_sessions("alice").await, 1);
    assert_eq!(running.node.hub.session_count(), 2);

    faulty.panic_once("publish");
    assert!(
        alice.publish("room", json!("boom")).await.is_err(),
        "the request that panicked gets no reply"
    );
    assert_eq!(disconnect_code(&alice).await, Some(1011));

    running
        .wait_until("the hub to forget alice", |node| {
            node.hub.session_count() == 1
        })
        .await;
    assert_eq!(running.registered_sessions("alice").await, 0);
    let members = bob.presence("room").await.unwrap();
    assert_eq!(
        members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );
    assert_eq!(running.node.metrics.session_panics.get(), 1);

    // The node keeps serving: bob publishes and receives, and newcomers are welcome.
    bob.publish("room", json!("still here")).await.unwrap();
    assert_eq!(next_data(&bob).await, json!("still here"));
    let carol = running.client("carol").await;
    carol.subscribe("room").await.unwrap();
    assert_eq!(running.registered_sessions("carol").await, 1);
    bob.close().await;
    carol.close().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_closing_still_removes_the_session() {
    let faulty = faulty_memory_broker();
    let running = start(faulty.clone()).await;
    let bob = running.client("bob").await;
    bob.subscribe("room").await.unwrap();
    let alice = running.client("alice").await;
    alice.subscribe("room").await.unwrap();
    assert_eq!(running.node.hub.session_count(), 2);

    faulty.panic_once("leave_presence");
    alice.close().await;

    running
        .wait_until("the hub to forget alice", |node| {
            node.hub.session_count() == 1
        })
        .await;
    assert_eq!(running.node.metrics.session_panics.get(), 1);
    assert_eq!(running.registered_sessions("alice").await, 0);
    let members = bob.presence("room").await.unwrap();
    assert_eq!(
        members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );
    assert_eq!(running.node.metrics.connections.get(), 1);

    bob.publish("room", json!("after")).await.unwrap();
    assert_eq!(next_data(&bob).await, json!("after"));
    bob.close().await;
    running.stop().await;
}
