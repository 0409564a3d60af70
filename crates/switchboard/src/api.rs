//! The internal port: Prometheus metrics, health and readiness probes, and the server API.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use switchboard_broker::{BrokerError, DirectMessage};
use switchboard_protocol::api::{
    ApiError, BroadcastRequest, BroadcastResponse, DisconnectRequest, DisconnectResponse,
    InboxMessage, InboxResponse, NodesResponse, PresenceResponse, PublishRequest, PublishResponse,
    SendRequest, SendResponse,
};
use switchboard_protocol::close;

use crate::auth::{INVALID_USER, bearer_token, valid_user};
use crate::node::{INVALID_KEY, INVALID_ROOM, Node, TooLarge, valid_key, valid_room};

/// Most pending messages `GET /api/inbox/{user}` lists, and the stored bytes it stops before:
/// the answer stays bounded whatever the inbox size.
const API_INBOX_LIMIT: usize = 1000;
const API_INBOX_BYTES: usize = 4 << 20;

/// An API failure: a status and the `{code, message}` body.
pub struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// The frame recipients would get is over the message size limit.
    fn too_large(error: TooLarge) -> Self {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            error.to_string(),
        )
    }
}

impl From<BrokerError> for Failure {
    fn from(error: BrokerError) -> Self {
        // 504: the request went upstream and its answer did not come back, so it may have
        // been carried out; 503 says it certainly was not.
        let (status, code) = match error {
            BrokerError::UnknownOutcome(_) => (StatusCode::GATEWAY_TIMEOUT, "unknown_outcome"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        Failure::new(status, code, error.to_string())
    }
}

impl From<JsonRejection> for Failure {
    fn from(rejection: JsonRejection) -> Self {
        Failure::bad_request(rejection.body_text())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ApiError {
            code: self.code.to_owned(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, Failure>;

pub fn router(node: Arc<Node>) -> Router {
    // A published payload may be as large as a client's; the JSON around it needs a little more.
    let body_limit = node.config().max_message_size + 64 * 1024;
    let api = Router::new()
        .route("/publish", post(publish))
        .route("/send", post(send))
        .route("/broadcast", post(broadcast))
        .route("/disconnect", post(disconnect))
        .route("/presence/{room}", get(presence))
        .route("/inbox/{user}", get(inbox))
        .route("/nodes", get(nodes))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            require_api_key,
        ))
        .method_not_allowed_fallback(|| async {
            Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "wrong HTTP method for this endpoint",
            )
        });
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .nest("/api", api)
        .layer(DefaultBodyLimit::max(body_limit))
        .fallback(|| async { Failure::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(node)
}

/// Compares without an early exit, so response time says nothing about the key.
fn same_key(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn require_api_key(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    if let Some(expected) = &node.config().api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        if !given.is_some_and(|given| same_key(given.as_bytes(), expected.as_bytes())) {
            return Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.is_ready();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.metrics().render(),
    )
        .into_response()
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if node.is_leaving() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n").into_response()
    }
}

fn check_room(room: &str) -> Result<(), Failure> {
    if valid_room(room) {
        Ok(())
    } else {
        Err(Failure::bad_request(INVALID_ROOM))
    }
}

fn check_key(key: Option<&str>) -> Result<(), Failure> {
    if key.is_some_and(|key| !valid_key(key)) {
        Err(Failure::bad_request(INVALID_KEY))
    } else {
        Ok(())
    }
}

fn check_user(user: &str) -> Result<(), Failure> {
    if !valid_user(user) {
        Err(Failure::bad_request(INVALID_USER))
    } else {
        Ok(())
    }
}

async fn publish(
    State(node): State<Arc<Node>>,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> ApiResult<PublishResponse> {
    let Json(request) = body?;
    check_room(&request.room)?;
    node.check_room_frame(&request.room, &request.data, None)
        .map_err(Failure::too_large)?;
    check_key(request.key.as_deref())?;
    let (message, duplicate) = match &request.key {
        Some(key) => {
            let published = node
                .publish_keyed(&request.room, request.data, None, key)
                .await?;
            (published.message, published.duplicate)
        }
        None => (
            node.publish(&request.room, request.data, None).await?,
            false,
        ),
    };
    Ok(Json(PublishResponse {
        offset: message.offset,
        epoch: message.epoch.clone(),
        duplicate,
    }))
}

async fn send(
    State(node): State<Arc<Node>>,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> ApiResult<SendResponse> {
    let Json(request) = body?;
    check_user(&request.user)?;
    check_key(request.key.as_deref())?;
    if request.key.is_some() && !request.persist {
        return Err(Failure::bad_request("a key on send needs persist: true"));
    }
    node.check_direct_frame(&request.data, None, request.persist)
        .map_err(Failure::too_large)?;
    let message = DirectMessage {
        user: request.user,
        data: request.data,
        from: None,
        seq: None,
    };
    if request.persist {
        let sent = node.send_persisted(message, request.key.as_deref()).await?;
        return Ok(Json(SendResponse {
            sessions: sent.sessions,
            seq: Some(sent.seq),
            duplicate: sent.duplicate,
        }));
    }
    let sessions = node.send(message).await?;
    Ok(Json(SendResponse {
        sessions,
        seq: None,
        duplicate: false,
    }))
}

async fn inbox(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
) -> ApiResult<InboxResponse> {
    check_user(&user)?;
    let inbox = node
        .inbox(&user, 0, API_INBOX_LIMIT, API_INBOX_BYTES)
        .await?;
    let pending = inbox
        .pending
        .into_iter()
        .map(|entry| InboxMessage {
            seq: entry.seq,
            data: entry.data,
            from: entry.from,
            at: entry.at,
        })
        .collect();
    Ok(Json(InboxResponse {
        seq: inbox.position.seq,
        acked: inbox.position.acked,
        epoch: inbox.position.epoch,
        pending,
        more: inbox.more,
    }))
}

async fn broadcast(
    State(node): State<Arc<Node>>,
    body: Result<Json<BroadcastRequest>, JsonRejection>,
) -> ApiResult<BroadcastResponse> {
    let Json(request) = body?;
    node.check_broadcast_frame(&request.data)
        .map_err(Failure::too_large)?;
    let nodes = node.broadcast(request.data).await?;
    Ok(Json(BroadcastResponse { nodes }))
}

async fn disconnect(
    State(node): State<Arc<Node>>,
    body: Result<Json<DisconnectRequest>, JsonRejection>,
) -> ApiResult<DisconnectResponse> {
    let Json(request) = body?;
    check_user(&request.user)?;
    let code = request.code.unwrap_or(close::NORMAL);
    if !(code == close::NORMAL || code == close::POLICY || (3000..=4999).contains(&code)) {
        return Err(Failure::bad_request(
            "code must be 1000, 1008 or an application code 3000-4999",
        ));
    }
    let reason = request
        .reason
        .unwrap_or_else(|| "disconnected by the server".to_owned());
    let sessions = node.disconnect(&request.user, code, &reason).await?;
    Ok(Json(DisconnectResponse { sessions }))
}

async fn presence(
    State(node): State<Arc<Node>>,
    Path(room): Path<String>,
) -> ApiResult<PresenceResponse> {
    check_room(&room)?;
    let members = node.presence(&room).await?;
    Ok(Json(PresenceResponse { members }))
}

async fn nodes(State(node): State<Arc<Node>>) -> ApiResult<NodesResponse> {
    let nodes = node.nodes().await?;
    Ok(Json(NodesResponse { nodes }))
}
