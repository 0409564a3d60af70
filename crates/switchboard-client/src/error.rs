use switchboard_protocol::ErrorCode;
use tokio_tungstenite::tungstenite;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL or a header in [`ConnectOptions`](crate::ConnectOptions) cannot be used.
    #[error("invalid connect options: {0}")]
    InvalidOptions(String),
    /// A request's arguments cannot be sent (an idempotency key that is not 1 to 64 bytes);
    /// nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The server answered the WebSocket handshake with an HTTP error (400 bad subprotocol, 401
    /// bad token, 403 disallowed origin, ...). `reason` is the response body.
    #[error("handshake refused with HTTP {status}: {reason}")]
    Refused { status: u16, reason: String },
    /// The server closed the connection before sending its `welcome` frame.
    #[error("connection closed before the welcome frame (code {code:?}): {reason}")]
    ClosedBeforeWelcome { code: Option<u16>, reason: String },
    /// A transport or WebSocket-level failure.
    #[error("websocket error: {0}")]
    WebSocket(Box<tungstenite::Error>),
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server answered the request with an `error` frame. `code`
    /// [`ErrorCode::UnknownOutcome`] on a `publish` means the message may have been published
    /// (Redis did not answer in time): a retry may publish it twice; `ErrorCode::Unavailable`
    /// means it was not.
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    /// No answer within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection dropped after the request was sent and before its answer arrived; whether
    /// the server acted on it is unknown.
    #[error("connection lost before the answer arrived")]
    Disconnected,
    /// The client is closed (by [`Client::close`](crate::Client::close), a policy close, or
    /// after giving up reconnecting).
    #[error("client is closed")]
    Closed,
}

impl ClientError {
    /// Whether retrying the same handshake is pointless: the server refused the request itself
    /// (bad subprotocol, credentials or origin) or closed it for policy.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            ClientError::Refused { status, .. } => matches!(status, 400 | 401 | 403),
            ClientError::ClosedBeforeWelcome { code, .. } => {
                *code == Some(switchboard_protocol::close::POLICY)
            }
            ClientError::InvalidOptions(_) => true,
            _ => false,
        }
    }

    /// The close code the server sent, when it closed before the welcome.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::ClosedBeforeWelcome { code, .. } => *code,
            _ => None,
        }
    }
}

impl From<tungstenite::Error> for ClientError {
    fn from(error: tungstenite::Error) -> Self {
        match error {
            tungstenite::Error::Http(response) => ClientError::Refused {
                status: response.status().as_u16(),
                reason: response
                    .body()
                    .as_deref()
                    .map(|body| String::from_utf8_lossy(body).trim().to_owned())
                    .unwrap_or_default(),
            },
            other => ClientError::WebSocket(Box::new(other)),
        }
    }
}
