//! The WebSocket handshake's decision, apart from its I/O: [`admit`] reads a request and says
//! whether it is admitted, and with what, or how it is refused. `server.rs` is the adapter that
//! reads the request, writes the answer and counts it.

use std::borrow::Cow;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use switchboard_protocol::Codec;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::auth::{AuthError, Authenticator, Identity, bearer_token};
use crate::config::Config;
use crate::frontdoor;

/// The path WebSocket clients connect to.
pub const WS_PATH: &str = "/ws";

/// What the decision needs besides the request.
pub struct AdmitContext<'a> {
    pub config: &'a Config,
    pub auth: &'a Authenticator,
    pub draining: bool,
}

/// An admitted handshake: who connects, in which codec, and the headers of the 101 that says so.
#[derive(Debug)]
pub struct Admitted {
    pub identity: Identity,
    pub codec: Codec,
    /// `Connection`, `Upgrade`, `Sec-WebSocket-Accept` and, when the client offered any,
    /// `Sec-WebSocket-Protocol`.
    pub headers: HeaderMap,
}

/// A refused request: its status, the text of its plain-text body, and how it is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub text: Cow<'static, str>,
    /// The `switchboard_handshakes_total` result; `None` for a request that is no handshake at
    /// all (another path), which is neither counted nor logged.
    pub result: Option<&'static str>,
    /// Sent besides the body: `Sec-WebSocket-Version` with a 426, `Retry-After` with a 429.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Refusal {
    fn new(result: &'static str, status: StatusCode, text: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            status,
            text: text.into(),
            result: Some(result),
            headers: Vec::new(),
        }
    }

    fn not_found() -> Self {
        Refusal {
            status: StatusCode::NOT_FOUND,
            text: Cow::Borrowed("not found: WebSocket clients connect to /ws"),
            result: None,
            headers: Vec::new(),
        }
    }

    /// A second upgrade request on a connection that has already upgraded or been refused one.
    pub fn second_upgrade() -> Self {
        Refusal::new(
            "bad_request",
            StatusCode::BAD_REQUEST,
            "one upgrade per connection",
        )
    }
}

/// The front door's refusal of a client address: a 429 with `Retry-After`.
impl From<frontdoor::Refusal> for Refusal {
    fn from(refusal: frontdoor::Refusal) -> Self {
        Refusal {
            headers: vec![(
                header::RETRY_AFTER,
                HeaderValue::from(refusal.retry_after_secs),
            )],
            ..Refusal::new(
                refusal.result,
                StatusCode::TOO_MANY_REQUESTS,
                refusal.message,
            )
        }
    }
}

/// Decides a handshake. The checks run in the order docs/protocol.md lists them; the first that
/// fails refuses the request. The front door's per-address limits and the demo's pages come
/// before this and are the adapter's, as is the one-upgrade-per-connection rule after it.
pub fn admit<B>(request: &Request<B>, context: &AdmitContext<'_>) -> Result<Admitted, Refusal> {
    if request.uri().path() != WS_PATH {
        return Err(Refusal::not_found());
    }
    if request.method() != Method::GET {
        return Err(Refusal::new(
            "bad_request",
            StatusCode::METHOD_NOT_ALLOWED,
            "the WebSocket handshake is a GET",
        ));
    }
    let headers = request.headers();
    let is_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(Refusal::new(
            "bad_request",
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade request (Sec-WebSocket-Key missing)",
        ));
    };
    if !is_upgrade {
        return Err(Refusal::new(
            "bad_request",
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade request (Connection: Upgrade and Upgrade: websocket expected)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|version| version != "13")
    {
        let mut refusal = Refusal::new(
            "bad_request",
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version: 13 expected",
        );
        refusal.headers.push((
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
        return Err(refusal);
    }
    check_node_and_origin(headers, context)?;
    let Ok(offered) = choose_codec(headers) else {
        return Err(Refusal::new(
            "unsupported_protocol",
            StatusCode::BAD_REQUEST,
            "unsupported subprotocol: offer switchboard.v1.json, switchboard.v1.msgpack or switchboard.v1.json+deflate",
        ));
    };
    let identity = identify(request, context)?;

    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(codec) = offered {
        response_headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(codec.protocol()),
        );
    }
    Ok(Admitted {
        identity,
        codec: offered.unwrap_or(Codec::Json),
        headers: response_headers,
    })
}

/// Decides the request that opens an SSE or long-poll session (`GET /sse`, `GET /poll`): the
/// handshake's checks, in its order, less the upgrade's and the subprotocol's (these transports
/// speak JSON). The path is the router's; the front door's limits come before, as for /ws.
pub fn admit_fallback<B>(
    request: &Request<B>,
    context: &AdmitContext<'_>,
) -> Result<Identity, Refusal> {
    if request.method() != Method::GET {
        return Err(Refusal::new(
            "bad_request",
            StatusCode::METHOD_NOT_ALLOWED,
            "a session opens with a GET",
        ));
    }
    check_node_and_origin(request.headers(), context)?;
    identify(request, context)
}

/// What every session opening checks first, whatever the transport: the node takes sessions
/// (503 while draining) and the page's Origin is allowed (403).
fn check_node_and_origin(headers: &HeaderMap, context: &AdmitContext<'_>) -> Result<(), Refusal> {
    if context.draining {
        return Err(Refusal::new(
            "draining",
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining: connect to another",
        ));
    }
    if let Some(allowed) = &context.config.allowed_origins {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|origin| origin.to_str().ok())
            .map(|origin| origin.trim_end_matches('/'));
        if !origin.is_some_and(|origin| allowed.iter().any(|allowed| allowed == origin)) {
            return Err(Refusal::new(
                "forbidden_origin",
                StatusCode::FORBIDDEN,
                "origin not allowed",
            ));
        }
    }
    Ok(())
}

/// Who opens the session: the token's user (401 when it is bad, expired or missing with auth
/// on), or `?user=` with auth off (400 when it is not a valid user id).
fn identify<B>(request: &Request<B>, context: &AdmitContext<'_>) -> Result<Identity, Refusal> {
    let query = request.uri().query();
    // An empty `?token=` is no token: it must not hide the Authorization header.
    let token = query_param(query, "token")
        .filter(|token| !token.is_empty())
        .or_else(|| bearer(request.headers()).map(str::to_owned));
    let user = query_param(query, "user");
    match context.auth.authenticate(token.as_deref(), user.as_deref()) {
        Ok(identity) => Ok(identity),
        Err(error @ AuthError::BadUser) => Err(Refusal::new(
            "bad_request",
            StatusCode::BAD_REQUEST,
            error.to_string(),
        )),
        Err(error) => Err(Refusal::new(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            error.to_string(),
        )),
    }
}

#[doc(hidden)]
pub fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// The codec for the offered subprotocols: none offered → JSON; else the first we support, in
/// the client's order; `Err` when only unknown ones are offered.
#[doc(hidden)]
#[allow(clippy::result_unit_err)]
pub fn choose_codec(headers: &HeaderMap) -> Result<Option<Codec>, ()> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|name| Codec::from_protocol(name))
        .map(Some)
        .ok_or(())
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the nearest
/// address in X-Forwarded-For (read from the right, as each proxy appends its peer) that is not a
/// trusted proxy itself. A malformed entry ends the search at the peer: nothing left of it can be
/// believed.
#[doc(hidden)]
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    if !is_trusted(&peer, trusted) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            return peer;
        };
        client = ip;
        if !is_trusted(&ip, trusted) {
            break;
        }
    }
    client
}

pub(crate) fn is_trusted(ip: &IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    trusted.iter().any(|network| network.contains(ip))
}

#[doc(hidden)]
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[doc(hidden)]
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;
    use crate::auth::{MAX_USER_LEN, unix_now_secs};
    use crate::config::Options;

    const SECRET: &str = "0123456789abcdef-admission-secret";
    /// The sample key of RFC 6455 section 1.3 and the accept value it derives.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// A node's configuration and authenticator, with what `admit` is given besides the request.
    struct Node {
        config: Config,
        auth: Authenticator,
        draining: bool,
    }

    impl Node {
        fn new(options: Options) -> Self {
            let config = options.resolve().expect("valid options");
            let auth = Authenticator::new(config.jwt.as_ref()).expect("a valid key");
            Node {
                config,
                auth,
                draining: false,
            }
        }

        fn open() -> Self {
            Node::new(Options::default())
        }

        fn with_auth() -> Self {
            Node::new(Options {
                jwt_secret: Some(SECRET.to_owned()),
                ..Options::default()
            })
        }

        fn admit(&self, request: &Request<()>) -> Result<Admitted, Refusal> {
            admit(
                request,
                &AdmitContext {
                    config: &self.config,
                    auth: &self.auth,
                    draining: self.draining,
                },
            )
        }

        fn refuse(&self, request: &Request<()>) -> Refusal {
            self.admit(request).expect_err("refused")
        }
    }

    /// A complete, valid handshake request for `uri`, with `extra` headers appended.
    fn handshake(uri: &str, extra: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get(uri)
            .header(header::HOST, "node.test")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, KEY);
        for (name, value) in extra {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    /// `request` with header `name` removed or replaced by `value`.
    fn with_header(
        mut request: Request<()>,
        name: header::HeaderName,
        value: Option<&str>,
    ) -> Request<()> {
        match value {
            Some(value) => {
                request
                    .headers_mut()
                    .insert(name, HeaderValue::from_str(value).unwrap());
            }
            None => {
                request.headers_mut().remove(name);
            }
        }
        request
    }

    fn token(exp: u64, sub: &str) -> String {
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn header<'a>(refusal: &'a Refusal, name: &header::HeaderName) -> Option<&'a HeaderValue> {
        refusal
            .headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value)
    }

    fn assert_refused(refusal: &Refusal, status: u16, result: &str, text: &str) {
        assert_eq!(refusal.status.as_u16(), status, "{refusal:?}");
        assert_eq!(refusal.result, Some(result), "{refusal:?}");
        assert_eq!(refusal.text, text, "{refusal:?}");
    }

    #[test]
    fn another_path_is_not_found_and_not_counted() {
        let node = Node::open();
        for uri in ["/", "/ws/", "/wss", "/index.html?x=/ws"] {
            let refusal = node.refuse(&handshake(uri, &[]));
            assert_eq!(refusal.status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(refusal.result, None, "{uri}");
            assert_eq!(refusal.text, "not found: WebSocket clients connect to /ws");
        }
        assert!(node.admit(&handshake("/ws?user=a", &[])).is_ok());
    }

    #[test]
    fn a_method_other_than_get_is_refused_with_405() {
        let node = Node::open();
        for method in [Method::POST, Method::HEAD, Method::PUT] {
            let mut request = handshake("/ws", &[]);
            *request.method_mut() = method.clone();
            assert_refused(
                &node.refuse(&request),
                405,
                "bad_request",
                "the WebSocket handshake is a GET",
            );
        }
    }

    #[test]
    fn a_missing_key_is_refused_before_the_upgrade_headers_are() {
        let node = Node::open();
        let no_key = with_header(handshake("/ws", &[]), header::SEC_WEBSOCKET_KEY, None);
        assert_refused(
            &node.refuse(&no_key),
            400,
            "bad_request",
            "not a WebSocket upgrade request (Sec-WebSocket-Key missing)",
        );
        let neither = with_header(no_key, header::CONNECTION, None);
        assert_refused(
            &node.refuse(&neither),
            400,
            "bad_request",
            "not a WebSocket upgrade request (Sec-WebSocket-Key missing)",
        );
    }

    #[test]
    fn missing_or_wrong_upgrade_headers_are_refused() {
        let node = Node::open();
        let expected =
            "not a WebSocket upgrade request (Connection: Upgrade and Upgrade: websocket expected)";
        for (name, value) in [
            (header::CONNECTION, None),
            (header::CONNECTION, Some("keep-alive")),
            (header::CONNECTION, Some("upgraded")),
            (header::UPGRADE, None),
            (header::UPGRADE, Some("h2c")),
        ] {
            let request = with_header(handshake("/ws", &[]), name.clone(), value);
            assert_refused(&node.refuse(&request), 400, "bad_request", expected);
        }
    }

    #[test]
    fn upgrade_tokens_are_matched_in_lists_and_in_any_case() {
        let node = Node::open();
        let request = with_header(
            with_header(
                handshake("/ws", &[]),
                header::CONNECTION,
                Some("keep-alive, UPGRADE"),
            ),
            header::UPGRADE,
            Some("WebSocket"),
        );
        assert!(node.admit(&request).is_ok());
    }

    #[test]
    fn a_version_other_than_13_is_refused_with_426_naming_13() {
        let node = Node::open();
        for version in [None, Some("8"), Some("13, 8"), Some("")] {
            let request = with_header(
                handshake("/ws", &[]),
                header::SEC_WEBSOCKET_VERSION,
                version,
            );
            let refusal = node.refuse(&request);
            assert_refused(
                &refusal,
                426,
                "bad_request",
                "unsupported WebSocket version: 13 expected",
            );
            assert_eq!(
                header(&refusal, &header::SEC_WEBSOCKET_VERSION).unwrap(),
                "13",
                "{version:?}"
            );
        }
    }

    #[test]
    fn a_draining_node_refuses_valid_handshakes_with_503() {
        let mut node = Node::open();
        node.draining = true;
        assert_refused(
            &node.refuse(&handshake("/ws", &[])),
            503,
            "draining",
            "this node is draining: connect to another",
        );
        // Requests that are no usable handshake are told so first.
        let bad_version = with_header(
            handshake("/ws", &[]),
            header::SEC_WEBSOCKET_VERSION,
            Some("8"),
        );
        assert_eq!(node.refuse(&bad_version).status.as_u16(), 426);
    }

    #[test]
    fn an_origin_outside_the_allow_list_is_refused_with_403() {
        let node = Node::new(Options {
            allowed_origins: Some(vec!["https://app.example".into()]),
            ..Options::default()
        });
        for origin in [
            None,
            Some("https://evil.example"),
            Some("https://app.example.evil"),
            Some("http://app.example"),
            Some("null"),
        ] {
            let request = with_header(handshake("/ws", &[]), header::ORIGIN, origin);
            assert_refused(
                &node.refuse(&request),
                403,
                "forbidden_origin",
                "origin not allowed",
            );
        }
        for origin in ["https://app.example", "https://app.example/"] {
            let request = handshake("/ws", &[("origin", origin)]);
            assert!(node.admit(&request).is_ok(), "{origin}");
        }
        // The draining refusal comes before the origin's.
        let mut draining = node;
        draining.draining = true;
        let request = handshake("/ws", &[("origin", "https://evil.example")]);
        assert_eq!(draining.refuse(&request).result, Some("draining"));
    }

    #[test]
    fn without_an_allow_list_any_origin_is_admitted() {
        let node = Node::open();
        for request in [
            handshake("/ws", &[("origin", "https://anywhere.example")]),
            handshake("/ws", &[]),
        ] {
            assert!(node.admit(&request).is_ok());
        }
    }

    #[test]
    fn only_unknown_subprotocols_are_refused() {
        let node = Node::open();
        for offered in ["chat", "switchboard.v2.json, mqtt", "switchboard.v1.JSON"] {
            let request = handshake("/ws", &[("sec-websocket-protocol", offered)]);
            assert_refused(
                &node.refuse(&request),
                400,
                "unsupported_protocol",
                "unsupported subprotocol: offer switchboard.v1.json, switchboard.v1.msgpack or switchboard.v1.json+deflate",
            );
        }
        // The subprotocol is checked before the token.
        let request = handshake("/ws", &[("sec-websocket-protocol", "chat")]);
        assert_eq!(
            Node::with_auth().refuse(&request).result,
            Some("unsupported_protocol")
        );
    }

    #[test]
    fn success_with_each_codec_answers_with_the_accept_key_and_the_chosen_subprotocol() {
        let node = Node::open();
        for (offered, codec, answered) in [
            (None, Codec::Json, None),
            (
                Some("switchboard.v1.json"),
                Codec::Json,
                Some("switchboard.v1.json"),
            ),
            (
                Some("switchboard.v1.msgpack"),
                Codec::MsgPack,
                Some("switchboard.v1.msgpack"),
            ),
            (
                Some("chat, switchboard.v1.msgpack, switchboard.v1.json"),
                Codec::MsgPack,
                Some("switchboard.v1.msgpack"),
            ),
        ] {
            let mut request = handshake("/ws?user=alice", &[]);
            if let Some(offered) = offered {
                request = with_header(request, header::SEC_WEBSOCKET_PROTOCOL, Some(offered));
            }
            let admitted = node.admit(&request).expect("admitted");
            assert_eq!(admitted.codec, codec, "{offered:?}");
            assert_eq!(admitted.identity.user, "alice");
            let headers = &admitted.headers;
            assert_eq!(headers.get(header::CONNECTION).unwrap(), "Upgrade");
            assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
            assert_eq!(headers.get(header::SEC_WEBSOCKET_ACCEPT).unwrap(), ACCEPT);
            assert_eq!(
                headers
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .map(|value| value.to_str().unwrap()),
                answered,
                "{offered:?}"
            );
        }
    }

    #[test]
    fn with_auth_off_the_user_comes_from_the_query_and_a_bad_one_is_a_400() {
        let node = Node::open();
        let admitted = node.admit(&handshake("/ws?user=bob", &[])).unwrap();
        assert_eq!(admitted.identity.user, "bob");
        assert!(
            node.admit(&handshake("/ws", &[]))
                .unwrap()
                .identity
                .user
                .starts_with("anon-")
        );
        let too_long = format!("/ws?user={}", "x".repeat(MAX_USER_LEN + 1));
        for uri in ["/ws?user=", "/ws?user=a%0Ab", too_long.as_str()] {
            assert_refused(
                &node.refuse(&handshake(uri, &[])),
                400,
                "bad_request",
                "invalid user id: must be 1 to 128 bytes without control characters",
            );
        }
    }

    #[test]
    fn with_auth_on_a_missing_token_is_a_401() {
        let node = Node::with_auth();
        for request in [
            handshake("/ws", &[]),
            handshake("/ws?token=", &[]),
            handshake("/ws?user=alice", &[]),
            handshake("/ws", &[("authorization", "Bearer ")]),
            handshake("/ws", &[("authorization", "Basic YTpi")]),
        ] {
            assert_refused(
                &node.refuse(&request),
                401,
                "unauthorized",
                "a token is required (?token= or Authorization: Bearer)",
            );
        }
    }

    #[test]
    fn a_bad_token_is_a_401_saying_why() {
        let node = Node::with_auth();
        let forged = encode(
            &Header::default(),
            &json!({"sub": "a", "exp": unix_now_secs() + 600}),
            &EncodingKey::from_secret(b"another-secret-of-16-bytes"),
        )
        .unwrap();
        for token in [forged.as_str(), "not.a.jwt"] {
            let refusal = node.refuse(&handshake(&format!("/ws?token={token}"), &[]));
            assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
            assert_eq!(refusal.result, Some("unauthorized"));
            assert!(refusal.text.starts_with("invalid token: "), "{refusal:?}");
        }
        let long_sub = token(unix_now_secs() + 600, &"x".repeat(MAX_USER_LEN + 1));
        assert_refused(
            &node.refuse(&handshake(&format!("/ws?token={long_sub}"), &[])),
            401,
            "unauthorized",
            "invalid token: sub must be 1 to 128 bytes without control characters",
        );
    }

    #[test]
    fn an_expired_token_is_a_401() {
        let node = Node::with_auth();
        // An hour past `exp`, far beyond the default 30 s leeway.
        let expired = token(unix_now_secs() - 3600, "alice");
        for request in [
            handshake(&format!("/ws?token={expired}"), &[]),
            handshake("/ws", &[("authorization", &format!("Bearer {expired}"))]),
        ] {
            assert_refused(
                &node.refuse(&request),
                401,
                "unauthorized",
                "the token has expired",
            );
        }
    }

    #[test]
    fn a_token_is_read_from_the_query_or_a_bearer_header_in_any_case() {
        let node = Node::with_auth();
        let exp = unix_now_secs() + 600;
        let alice = token(exp, "alice");
        let bob = token(exp, "bob");
        let admitted = node
            .admit(&handshake(&format!("/ws?token={alice}"), &[]))
            .unwrap();
        assert_eq!(admitted.identity.user, "alice");
        assert_eq!(admitted.identity.expires_at, Some(exp));
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let request = handshake("/ws", &[("authorization", &format!("{scheme} {alice}"))]);
            assert_eq!(
                node.admit(&request).unwrap().identity.user,
                "alice",
                "{scheme}"
            );
        }
        let both = handshake(
            &format!("/ws?token={alice}"),
            &[("authorization", &format!("Bearer {bob}"))],
        );
        assert_eq!(
            node.admit(&both).unwrap().identity.user,
            "alice",
            "the query wins"
        );
        let empty_query = handshake("/ws?token=", &[("authorization", &format!("Bearer {bob}"))]);
        assert_eq!(
            node.admit(&empty_query).unwrap().identity.user,
            "bob",
            "an empty ?token= does not hide the header"
        );
        // With a token, `?user=` is ignored: the identity is the token's.
        let spoof = handshake(&format!("/ws?token={alice}&user=bob"), &[]);
        assert_eq!(node.admit(&spoof).unwrap().identity.user, "alice");
    }

    #[test]
    fn the_front_doors_refusal_is_a_429_with_retry_after() {
        let refusal = Refusal::from(frontdoor::Refusal {
            result: "ip_rate",
            message: "too many connections from this address: retry later",
            retry_after_secs: 3,
        });
        assert_refused(
            &refusal,
            429,
            "ip_rate",
            "too many connections from this address: retry later",
        );
        assert_eq!(header(&refusal, &header::RETRY_AFTER).unwrap(), "3");
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_peer_is_believed_about_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let headers = forwarded(&["203.0.113.7"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers, &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("192.0.2.1"), &headers, &trusted),
            ip("192.0.2.1"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers, &[]),
            ip("10.1.2.3"),
            "nobody is trusted by default"
        );
    }

    #[test]
    fn the_nearest_untrusted_address_is_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // A spoofed first entry, the client, then an inner proxy; over two header lines.
        let headers = forwarded(&["198.51.100.9, 203.0.113.7", "10.0.0.5"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers, &trusted),
            ip("203.0.113.7")
        );
        let all_proxies = forwarded(&["10.0.0.6, 10.0.0.5"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &all_proxies, &trusted),
            ip("10.0.0.6")
        );
        let malformed = forwarded(&["203.0.113.7, not-an-ip"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &malformed, &trusted),
            ip("10.1.2.3")
        );
        assert_eq!(
            client_ip(ip("10.1.2.3"), &HeaderMap::new(), &trusted),
            ip("10.1.2.3")
        );
    }

    impl Node {
        fn open_fallback(&self, request: &Request<()>) -> Result<Identity, Refusal> {
            admit_fallback(
                request,
                &AdmitContext {
                    config: &self.config,
                    auth: &self.auth,
                    draining: self.draining,
                },
            )
        }
    }

    /// A plain GET, as EventSource or `curl -N` sends it: no upgrade headers at all.
    fn plain_get(uri: &str, extra: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get(uri).header(header::HOST, "node.test");
        for (name, value) in extra {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_fallback_session_opens_with_a_plain_get_and_the_same_identity_rules() {
        let node = Node::open();
        let identity = node
            .open_fallback(&plain_get("/sse?user=carol", &[]))
            .unwrap();
        assert_eq!(identity.user, "carol");
        // Subprotocol headers mean nothing here: the fallback transports speak JSON.
        let offered = plain_get("/poll", &[("sec-websocket-protocol", "chat")]);
        assert!(
            node.open_fallback(&offered)
                .unwrap()
                .user
                .starts_with("anon-")
        );
        let bad_user = plain_get(&format!("/sse?user={}", "u".repeat(MAX_USER_LEN + 1)), &[]);
        let refusal = node.open_fallback(&bad_user).unwrap_err();
        assert_eq!(
            (refusal.status.as_u16(), refusal.result),
            (400, Some("bad_request"))
        );
        let mut post = plain_get("/sse", &[]);
        *post.method_mut() = Method::POST;
        assert_refused(
            &node.open_fallback(&post).unwrap_err(),
            405,
            "bad_request",
            "a session opens with a GET",
        );
    }

    #[test]
    fn a_fallback_session_needs_a_valid_token_when_auth_is_on() {
        let node = Node::with_auth();
        for request in [
            plain_get("/sse", &[]),
            plain_get("/poll?user=alice", &[]),
            plain_get("/sse?token=not-a-jwt", &[]),
            plain_get(
                &format!("/poll?token={}", token(unix_now_secs() - 3600, "bob")),
                &[],
            ),
        ] {
            let refusal = node.open_fallback(&request).unwrap_err();
            assert_eq!(
                (refusal.status.as_u16(), refusal.result),
                (401, Some("unauthorized"))
            );
        }
        let valid = token(unix_now_secs() + 3600, "bob");
        let by_query = plain_get(&format!("/sse?token={valid}"), &[]);
        assert_eq!(node.open_fallback(&by_query).unwrap().user, "bob");
        let bearer = format!("Bearer {valid}");
        let by_header = plain_get("/poll", &[("authorization", bearer.as_str())]);
        assert_eq!(node.open_fallback(&by_header).unwrap().user, "bob");
    }

    #[test]
    fn a_fallback_session_is_refused_while_draining_then_for_its_origin() {
        let mut node = Node::new(Options {
            allowed_origins: Some(vec!["https://app.example".into()]),
            ..Options::default()
        });
        let allowed = plain_get("/sse", &[("origin", "https://app.example")]);
        assert!(node.open_fallback(&allowed).is_ok());
        for origin in [None, Some("https://evil.example")] {
            let request = with_header(plain_get("/poll", &[]), header::ORIGIN, origin);
            assert_refused(
                &node.open_fallback(&request).unwrap_err(),
                403,
                "forbidden_origin",
                "origin not allowed",
            );
        }
        node.draining = true;
        let evil = plain_get("/sse", &[("origin", "https://evil.example")]);
        assert_refused(
            &node.open_fallback(&evil).unwrap_err(),
            503,
            "draining",
            "this node is draining: connect to another",
        );
    }
}
