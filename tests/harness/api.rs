//! The node's internal HTTP port as the end-to-end tests call it: the server API (`/api/...`,
//! without an API key) and `/readyz`. Each call is one request that must be answered within
//! [`DEADLINE`], or within the `within` the `_within` variants take; none retries or waits for a
//! condition (poll with [`crate::wait_until`] for that).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchboard_protocol::api::{PresenceResponse, PublishResponse, SendResponse};

use crate::{DEADLINE, NodeProcess};

/// Calls `method` (`GET`, or `POST` with `body` as JSON) on `path`; returns the status and the
/// body as JSON (a JSON string when it is not JSON). The answer must come within `within`.
pub async fn api_within(
    node: &NodeProcess,
    method: &str,
    path: &str,
    body: Option<Value>,
    within: Duration,
) -> Result<(u16, Value)> {
    let http = reqwest::Client::new();
    let url = node.http_url(path);
    let request = match method {
        "GET" => http.get(url),
        "POST" => http.post(url).json(&body.unwrap_or(Value::Null)),
        other => bail!("no method {other}"),
    };
    let response = request
        .timeout(within)
        .send()
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

/// [`api_within`] with [`DEADLINE`].
pub async fn api(
    node: &NodeProcess,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    api_within(node, method, path, body, DEADLINE).await
}

/// Calls the API (as [`api_within`]); the answer must be 200 with a body that decodes as `T`.
pub async fn api_ok_within<T: DeserializeOwned>(
    node: &NodeProcess,
    method: &str,
    path: &str,
    body: Option<Value>,
    within: Duration,
) -> Result<T> {
    let (status, value) = api_within(node, method, path, body, within).await?;
    ensure!(status == 200, "{method} {path}: {status} {value}");
    serde_json::from_value(value).with_context(|| format!("{method} {path}"))
}

/// [`api_ok_within`] with [`DEADLINE`].
pub async fn api_ok<T: DeserializeOwned>(
    node: &NodeProcess,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<T> {
    api_ok_within(node, method, path, body, DEADLINE).await
}

/// `GET path`, which must answer 200 with a `T`, within [`DEADLINE`].
pub async fn api_get<T: DeserializeOwned>(node: &NodeProcess, path: &str) -> Result<T> {
    api_ok(node, "GET", path, None).await
}

/// `POST path` with `body`, which must answer 200 with a `T`, within [`DEADLINE`].
pub async fn api_post<B: Serialize + ?Sized, T: DeserializeOwned>(
    node: &NodeProcess,
    path: &str,
    body: &B,
) -> Result<T> {
    api_ok(node, "POST", path, Some(serde_json::to_value(body)?)).await
}

/// `POST /api/publish`, which must answer 200, within [`DEADLINE`].
pub async fn api_publish(node: &NodeProcess, room: &str, data: Value) -> Result<PublishResponse> {
    api_post(node, "/api/publish", &json!({"room": room, "data": data})).await
}

/// `POST /api/send` within `within`, which must answer 200; returns how many sessions it reached.
pub async fn api_send_within(
    node: &NodeProcess,
    user: &str,
    data: Value,
    within: Duration,
) -> Result<u64> {
    let body = json!({"user": user, "data": data});
    let answer: SendResponse = api_ok_within(node, "POST", "/api/send", Some(body), within).await?;
    Ok(answer.sessions)
}

/// [`api_send_within`] with [`DEADLINE`].
pub async fn api_send(node: &NodeProcess, user: &str, data: Value) -> Result<u64> {
    api_send_within(node, user, data, DEADLINE).await
}

/// `GET /api/presence/{room}` within `within`, which must answer 200; the (user, session) pairs.
pub async fn api_presence_within(
    node: &NodeProcess,
    room: &str,
    within: Duration,
) -> Result<BTreeSet<(String, String)>> {
    let path = format!("/api/presence/{room}");
    let answer: PresenceResponse = api_ok_within(node, "GET", &path, None, within).await?;
    Ok(answer
        .members
        .into_iter()
        .map(|member| (member.user, member.session))
        .collect())
}

/// [`api_presence_within`] with [`DEADLINE`].
pub async fn api_presence(node: &NodeProcess, room: &str) -> Result<BTreeSet<(String, String)>> {
    api_presence_within(node, room, DEADLINE).await
}

/// The status `/readyz` answers within `within`.
pub async fn readyz_within(node: &NodeProcess, within: Duration) -> Result<u16> {
    Ok(api_within(node, "GET", "/readyz", None, within).await?.0)
}

/// The status `/readyz` answers within [`DEADLINE`].
pub async fn readyz(node: &NodeProcess) -> Result<u16> {
    readyz_within(node, DEADLINE).await
}
