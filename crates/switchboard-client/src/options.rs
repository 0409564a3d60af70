use std::fmt;
use std::time::Duration;

use switchboard_protocol::Codec;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, header};

use crate::{ClientError, ReconnectPolicy};

/// How to connect, authenticate and recover.
#[derive(Clone)]
pub struct ConnectOptions {
    /// A JWT, sent as `Authorization: Bearer …` (kept out of the URL, so out of access logs).
    pub token: Option<String>,
    /// The user id for servers with auth off, sent as the `?user=` query parameter.
    pub user: Option<String>,
    /// Wire codec, requested through `Sec-WebSocket-Protocol` (default JSON). `Codec::JsonDeflate`
    /// (`switchboard.v1.json+deflate`) receives large frames compressed, for slow or metered
    /// links; this client's own frames of 256 bytes of JSON or more go compressed too when that
    /// makes them smaller. A received frame inflates to 64 MiB at most
    /// (`switchboard_protocol::deflate::DEFAULT_INFLATE_LIMIT`), else it is dropped as
    /// undecodable.
    pub codec: Codec,
    /// How long a request waits for its answer, and the first connection for its welcome
    /// (default 10 s).
    pub request_timeout: Duration,
    /// Back-off between reconnect attempts.
    pub reconnect: ReconnectPolicy,
    /// `Origin` header, for servers with an origin allow-list.
    pub origin: Option<String>,
    /// Any other handshake headers, as (name, value).
    pub headers: Vec<(String, String)>,
    /// Acknowledge each persisted direct message once the application is done with it (default
    /// false): when it asks [`Client::next_event`](crate::Client::next_event) for the event after
    /// its [`Event::PersistedDirect`](crate::Event::PersistedDirect), as a `while let` loop does
    /// once the body handling it has run. One cumulative `ack` of the highest seq done with, at
    /// most one in flight; what is done with meanwhile goes in the next one.
    pub auto_ack: bool,
    /// Retry keyed publishes and persisted sends through a reconnect (default false): each
    /// carries an idempotency key (the caller's or a generated one) and is sent again with it
    /// after a reconnect when its connection dropped before the answer. Such a request fails
    /// with [`ClientError::Timeout`] once `retry_window` has passed, or
    /// [`ClientError::Closed`] when the client stops for good first.
    pub retry: bool,
    /// How long a retried request waits for its answer in all, reconnects included, instead of
    /// `request_timeout` (default 60 s). Keep it well below the server's
    /// `--idempotency-window-secs` (default 300 s).
    pub retry_window: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            token: None,
            user: None,
            codec: Codec::Json,
            request_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            origin: None,
            headers: Vec::new(),
            auto_ack: false,
            retry: false,
            retry_window: Duration::from_secs(60),
        }
    }
}

/// Hides the token, so options can be logged.
impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .field("codec", &self.codec)
            .field("request_timeout", &self.request_timeout)
            .field("reconnect", &self.reconnect)
            .field("origin", &self.origin)
            .field("headers", &self.headers)
            .field("auto_ack", &self.auto_ack)
            .field("retry", &self.retry)
            .field("retry_window", &self.retry_window)
            .finish()
    }
}

/// Everything the background task needs to (re)connect, validated once up front.
#[derive(Debug)]
pub(crate) struct Config {
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) codec: Codec,
    pub(crate) request_timeout: Duration,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) auto_ack: bool,
    pub(crate) retry: bool,
    pub(crate) retry_window: Duration,
}

impl Config {
    pub(crate) fn new(url: &str, options: ConnectOptions) -> Result<Self, ClientError> {
        let mut parsed = url::Url::parse(url)
            .map_err(|error| ClientError::InvalidOptions(format!("url {url:?}: {error}")))?;
        if !matches!(parsed.scheme(), "ws" | "wss") {
            return Err(ClientError::InvalidOptions(format!(
                "url {url:?}: the scheme must be ws or wss"
            )));
        }
        if let Some(user) = &options.user {
            parsed.query_pairs_mut().append_pair("user", user);
        }

        let mut headers = vec![(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(options.codec.protocol()),
        )];
        if let Some(token) = &options.token {
            let mut value = header_value(&format!("Bearer {token}"))?;
            value.set_sensitive(true);
            headers.push((header::AUTHORIZATION, value));
        }
        if let Some(origin) = &options.origin {
            headers.push((header::ORIGIN, header_value(origin)?));
        }
        for (name, value) in &options.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|error| {
                ClientError::InvalidOptions(format!("header name {name:?}: {error}"))
            })?;
            headers.push((name, header_value(value)?));
        }

        let config = Config {
            url: parsed.into(),
            headers,
            codec: options.codec,
            request_timeout: options.request_timeout,
            reconnect: options.reconnect,
            auto_ack: options.auto_ack,
            retry: options.retry,
            retry_window: options.retry_window,
        };
        config.request()?;
        Ok(config)
    }

    /// A fresh handshake request (a new `Sec-WebSocket-Key` each time).
    pub(crate) fn request(&self) -> Result<Request, ClientError> {
        let mut request =
            self.url.as_str().into_client_request().map_err(|error| {
                ClientError::InvalidOptions(format!("url {:?}: {error}", self.url))
            })?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(request)
    }
}

fn header_value(value: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(value)
        .map_err(|error| ClientError::InvalidOptions(format!("header value: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_identity_codec_and_headers() {
        let options = ConnectOptions {
            token: Some("t0k".into()),
            user: Some("al ice".into()),
            codec: Codec::MsgPack,
            origin: Some("https://app.example".into()),
            headers: vec![("x-trace".into(), "1".into())],
            ..ConnectOptions::default()
        };
        let config = Config::new("ws://127.0.0.1:8080/ws?v=1", options).expect("valid");
        let request = config.request().expect("valid");
        assert_eq!(
            request.uri().to_string(),
            "ws://127.0.0.1:8080/ws?v=1&user=al+ice"
        );
        let headers = request.headers();
        assert_eq!(headers["authorization"], "Bearer t0k");
        assert_eq!(headers["sec-websocket-protocol"], "switchboard.v1.msgpack");
        assert_eq!(headers["origin"], "https://app.example");
        assert_eq!(headers["x-trace"], "1");
    }

    #[test]
    fn bad_options_are_refused_up_front() {
        for url in ["http://example.com/ws", "not a url"] {
            let error = Config::new(url, ConnectOptions::default()).expect_err(url);
            assert!(matches!(error, ClientError::InvalidOptions(_)), "{error}");
        }
        let options = ConnectOptions {
            token: Some("line\nbreak".into()),
            ..ConnectOptions::default()
        };
        assert!(matches!(
            Config::new("ws://localhost/ws", options),
            Err(ClientError::InvalidOptions(_))
        ));
    }

    #[test]
    fn debug_output_hides_the_token() {
        let options = ConnectOptions {
            token: Some("secret-token".into()),
            ..ConnectOptions::default()
        };
        assert!(!format!("{options:?}").contains("secret-token"));
    }
}
