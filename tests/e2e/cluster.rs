//! The cluster: real redis-server processes and real switchboard nodes.

use serde_json::json;
use switchboard_client::{Client, ConnectOptions, Event};
use switchboard_e2e::*;

async fn client(node: &NodeProcess, user: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(
        &node.ws_url(),
        ConnectOptions {
            user: Some(user.into()),
            ..ConnectOptions::default()
        },
    )
    .await?)
}

async fn next_message(client: &Client) -> anyhow::Result<serde_json::Value> {
    loop {
        match tokio::time::timeout(DEADLINE, client.next_event()).await? {
            Some(Event::Message(message)) => return Ok(message.data.clone()),
            Some(Event::Direct { data, .. }) => return Ok(data),
            Some(_) => {}
            None => anyhow::bail!("closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let args = ["--redis", &redis.url(), "--node-ttl-ms", "1500"];
    let a = NodeProcess::start(&args).await?;
    let b = NodeProcess::start(&args).await?;
    let on_a = client(&a, "alice").await?;
    let on_b = client(&b, "bob").await?;
    on_b.subscribe("room").await?;
    on_a.publish("room", json!("hi")).await?;
    assert_eq!(next_message(&on_b).await?, json!("hi"));
    assert_eq!(on_a.send("bob", json!("direct")).await?, 1);
    assert_eq!(next_message(&on_b).await?, json!("direct"));
    let members = on_a.presence("room").await?;
    assert_eq!(members.len(), 1);
    Ok(())
}
