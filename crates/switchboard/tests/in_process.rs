//! Nodes run in-process on loopback ports, on brokers the test controls: a `FaultyBroker` for the
//! failure paths, and two nodes sharing one `MemoryBus` for the cross-node room logic.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchboard::Server;
use switchboard::config::Options;
use switchboard_broker::{Broker, DirectMessage, FaultyBroker, MemoryBus, MemoryConfig};
use switchboard_client::{Client, ClientError, ConnectOptions, ErrorCode, Event, ReconnectPolicy};
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(10);

struct Running {
    ws_url: String,
    http_url: String,
    node: Arc<switchboard::node::Node>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(broker: Arc<dyn Broker>, node_id: &str) -> Running {
        let config = Options {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            internal_listen: Some("127.0.0.1:0".parse().unwrap()),
            node_id: Some(node_id.to_owned()),
            room_linger_ms: Some(50),
            drain_grace_ms: Some(0),
            ..Options::default()
        }
        .resolve()
        .unwrap();
        let server = Server::bind_with_broker(config, broker).await.unwrap();
        let ws_url = format!("ws://{}/ws", server.public_addr());
        let http_url = format!("http://{}", server.internal_addr().unwrap());
        let node = server.node();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Running {
            ws_url,
            http_url,
            node,
            stop: Some(stop),
            task,
        }
    }

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

    async fn wait_until(&self, what: &str, condition: impl Fn(&switchboard::node::Node) -> bool) {
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
            .send(DirectMessage {
                user: user.to_owned(),
                data: json!("probe"),
                from: None,
                seq: None,
            })
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("node stops")
            .expect("node task")
            .expect("node run");
    }
}

async fn next_message(client: &Client) -> Arc<switchboard_client::RoomMessage> {
    loop {
        match tokio::time::timeout(DEADLINE, client.next_event()).await {
            Ok(Some(Event::Message(message))) => return message,
            Ok(Some(_)) => {}
            Ok(None) => panic!("client closed"),
            Err(_) => panic!("no message in time"),
        }
    }
}

fn code_of(error: ClientError) -> ErrorCode {
    match error {
        ClientError::Server { code, .. } => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_gives_unavailable_errors_and_fails_readiness_without_taking_the_node_down()
{
    let faulty = Arc::new(FaultyBroker::new(Arc::new(
        MemoryBus::new(MemoryConfig::default()).broker("n1"),
    )));
    let running = Running::start(faulty.clone(), "n1").await;
    let client = running.client("alice").await;
    client.subscribe("room").await.unwrap();
    let http = reqwest::Client::new();
    let readyz = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(readyz(http.clone(), running.http_url.clone()).await, 200);

    faulty.set_down(true);
    assert_eq!(readyz(http.clone(), running.http_url.clone()).await, 503);
    for result in [
        client.publish("room", json!(1)).await.map(|_| ()),
        client.subscribe("other").await.map(|_| ()),
        client.send("bob", json!(1)).await.map(|_| ()),
        client.presence("room").await.map(|_| ()),
        client.history("room", None, None).await.map(|_| ()),
    ] {
        assert_eq!(code_of(result.unwrap_err()), ErrorCode::Unavailable);
    }
    let api = http
        .post(format!("{}/api/publish", running.http_url))
        .json(&json!({"room": "room", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status().as_u16(), 503);
    let body: serde_json::Value = api.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    client
        .ping()
        .await
        .expect("the session itself keeps working");

    faulty.set_down(false);
    assert_eq!(readyz(http.clone(), running.http_url.clone()).await, 200);
    let offset = client.publish("room", json!("back")).await.unwrap();
    assert_eq!(offset, 1, "the failed publish took no offset");
    assert_eq!(next_message(&client).await.data, json!("back"));
    client.close().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_receives_a_room_only_while_it_has_subscribers() {
    let bus = MemoryBus::new(MemoryConfig::default());
    let node_a = Running::start(Arc::new(bus.broker("a")), "a").await;
    let node_b = Running::start(Arc::new(bus.broker("b")), "b").await;
    let on_a = node_a.client("alice").await;
    let on_b = node_b.client("bob").await;

    on_a.subscribe("room").await.unwrap();
    assert_eq!(node_a.node.upstream_rooms(), 1);
    assert_eq!(node_b.node.upstream_rooms(), 0, "b has no subscriber");
    on_b.publish("room", json!("from b")).await.unwrap();
    assert_eq!(next_message(&on_a).await.data, json!("from b"));
    let b_deliveries = node_b.node.metrics().room_deliveries.get();
    assert_eq!(b_deliveries, 0, "b was not sent the room's message");

    on_b.subscribe("room").await.unwrap();
    on_a.publish("room", json!("to both")).await.unwrap();
    assert_eq!(next_message(&on_a).await.data, json!("to both"));
    assert_eq!(next_message(&on_b).await.data, json!("to both"));

    on_a.unsubscribe("room").await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while node_a.node.upstream_rooms() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a lets go after the linger"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = node_a.node.metrics().room_deliveries.get();
    on_b.publish("room", json!("only b")).await.unwrap();
    assert_eq!(next_message(&on_b).await.data, json!("only b"));
    assert_eq!(node_a.node.metrics().room_deliveries.get(), before);

    on_a.subscribe("room").await.unwrap();
    assert_eq!(node_a.node.upstream_rooms(), 1, "a subscribes again");
    on_b.publish("room", json!("again")).await.unwrap();
    assert_eq!(next_message(&on_a).await.data, json!("again"));

    on_a.close().await;
    on_b.close().await;
    node_a.stop().await;
    node_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_subscribers_share_one_upstream_subscription() {
    let running = Running::start(
        Arc::new(MemoryBus::new(MemoryConfig::default()).broker("n")),
        "n",
    )
    .await;
    let mut clients = Vec::new();
    for index in 0..8 {
        clients.push(running.client(&format!("user{index}")).await);
    }
    let joins = clients.iter().map(|client| client.subscribe("shared"));
    for result in futures_util::future::join_all(joins).await {
        result.unwrap();
    }
    assert_eq!(running.node.upstream_rooms(), 1);
    for client in clients.iter().take(7) {
        client.unsubscribe("shared").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        running.node.upstream_rooms(),
        1,
        "one subscriber left: the room stays past the linger"
    );
    clients[7]
        .publish("shared", json!("still here"))
        .await
        .unwrap();
    assert_eq!(next_message(&clients[7]).await.data, json!("still here"));
    for client in &clients {
        client.close().await;
    }
    running.stop().await;
}

// A panic inside a session task (injected with `FaultyBroker::panic_once`) ends that session
// cleanly: closed with 1011, gone from the hub, the session registry and presence, counted in
// `switchboard_session_panics_total`; the node keeps serving everyone else.

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
    let running = Running::start(faulty.clone(), "n1").await;
    let bob = running.client("bob").await;
    bob.subscribe("room").await.unwrap();
    let alice = running.client("alice").await;
    alice.subscribe("room").await.unwrap();
    assert_eq!(bob.presence("room").await.unwrap().len(), 2);
    assert_eq!(running.registered_sessions("alice").await, 1);
    assert_eq!(running.node.session_count(), 2);

    faulty.panic_once("publish");
    assert!(
        alice.publish("room", json!("boom")).await.is_err(),
        "the request that panicked gets no reply"
    );
    assert_eq!(disconnect_code(&alice).await, Some(1011));

    running
        .wait_until("the hub to forget alice", |node| node.session_count() == 1)
        .await;
    assert_eq!(running.registered_sessions("alice").await, 0);
    let members = bob.presence("room").await.unwrap();
    assert_eq!(
        members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );
    assert_eq!(running.node.metrics().session_panics.get(), 1);

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
    let running = Running::start(faulty.clone(), "n1").await;
    let bob = running.client("bob").await;
    bob.subscribe("room").await.unwrap();
    let alice = running.client("alice").await;
    alice.subscribe("room").await.unwrap();
    assert_eq!(running.node.session_count(), 2);

    faulty.panic_once("leave_presence");
    alice.close().await;

    running
        .wait_until("the hub to forget alice", |node| node.session_count() == 1)
        .await;
    assert_eq!(running.node.metrics().session_panics.get(), 1);
    assert_eq!(running.registered_sessions("alice").await, 0);
    let members = bob.presence("room").await.unwrap();
    assert_eq!(
        members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );
    assert_eq!(running.node.metrics().connections.get(), 1);

    bob.publish("room", json!("after")).await.unwrap();
    assert_eq!(next_data(&bob).await, json!("after"));
    bob.close().await;
    running.stop().await;
}
