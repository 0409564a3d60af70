//! A WebSocket handshake request head, parsed as the node parses it: headers by httparse (as
//! hyper does), then the node's own reading of subprotocols, X-Forwarded-For, `?token=`,
//! `?user=` and `Authorization`, and the token itself. A `?claims=` parameter is signed with the
//! test key, so that the claims' decoding and validation is reached too, not only the signature
//! check. The whole decision, `admit`, is run on the request too, with authentication off and on,
//! with and without an origin allow-list, draining or not. Nothing may panic; a user that gets in
//! is a valid user id; a refusal is a 4xx or 5xx, counted unless it is the 404 of another path.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use switchboard::admission::{
    AdmitContext, admit, bearer, choose_codec, client_ip, header_has_token, query_param,
};
use switchboard::auth::{Authenticator, valid_user};
use switchboard::config::{Config, JwtAlgorithm, JwtConfig, JwtKey, Options};

const SECRET: &str = "fuzz-secret-0123456789abcdef";

static JWT: LazyLock<Authenticator> = LazyLock::new(|| {
    Authenticator::new(Some(&JwtConfig {
        key: JwtKey::Secret(SECRET.to_owned()),
        algorithm: JwtAlgorithm::Hs256,
        issuer: Some("https://issuer.test".to_owned()),
        audience: Some("switchboard".to_owned()),
        leeway: Duration::from_secs(60),
    }))
    .expect("the test key is valid")
});
static OPEN: LazyLock<Authenticator> =
    LazyLock::new(|| Authenticator::new(None).expect("no key is valid"));
static ANY_ORIGIN: LazyLock<Config> = LazyLock::new(|| {
    Options::default()
        .resolve()
        .expect("the defaults are valid")
});
static ONE_ORIGIN: LazyLock<Config> = LazyLock::new(|| {
    Options {
        allowed_origins: Some(vec!["https://app.test".to_owned()]),
        ..Options::default()
    }
    .resolve()
    .expect("one origin is valid")
});
static TRUSTED: LazyLock<Vec<ipnet::IpNet>> = LazyLock::new(|| {
    ["10.0.0.0/8", "::1/128"]
        .iter()
        .map(|net| net.parse().expect("a network"))
        .collect()
});

fn signed(claims: &str) -> String {
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{head}.{}", URL_SAFE_NO_PAD.encode(claims));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HS256 signs");
    format!("{message}.{signature}")
}

fuzz_target!(|data: &[u8]| {
    let mut parsed = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut parsed);
    let Ok(httparse::Status::Complete(_)) = request.parse(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for parsed in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(parsed.name.as_bytes()),
            HeaderValue::from_bytes(parsed.value),
        ) {
            headers.append(name, value);
        }
    }
    let query = request
        .path
        .and_then(|path| path.split_once('?'))
        .map(|(_, query)| query);

    header_has_token(&headers, header::CONNECTION, "upgrade");
    header_has_token(&headers, header::UPGRADE, "websocket");
    let _ = choose_codec(&headers);
    let outsider = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    assert_eq!(client_ip(outsider, &headers, &TRUSTED), outsider);
    let _ = client_ip(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), &headers, &TRUSTED);

    let token = query_param(query, "token").or_else(|| bearer(&headers).map(str::to_owned));
    let user = query_param(query, "user");
    for authenticator in [&*JWT, &*OPEN] {
        if let Ok(identity) = authenticator.authenticate(token.as_deref(), user.as_deref()) {
            assert!(valid_user(&identity.user), "{:?}", identity.user);
        }
    }
    if let Some(claims) = query_param(query, "claims")
        && let Ok(identity) = JWT.authenticate(Some(&signed(&claims)), None)
    {
        assert!(valid_user(&identity.user), "{:?}", identity.user);
    }

    let (Some(method), Some(path)) = (request.method, request.path) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(request_headers) = builder.headers_mut() {
        *request_headers = headers;
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    for (config, auth) in [(&*ANY_ORIGIN, &*OPEN), (&*ONE_ORIGIN, &*JWT)] {
        for draining in [false, true] {
            let context = AdmitContext {
                config,
                auth,
                draining,
            };
            match admit(&request, &context) {
                Ok(admitted) => {
                    assert!(!draining, "a draining node admitted a handshake");
                    assert!(
                        valid_user(&admitted.identity.user),
                        "{:?}",
                        admitted.identity.user
                    );
                    assert!(admitted.headers.contains_key(header::SEC_WEBSOCKET_ACCEPT));
                }
                Err(refusal) => {
                    assert!(
                        refusal.status.is_client_error() || refusal.status.is_server_error(),
                        "{refusal:?}"
                    );
                    assert_eq!(
                        refusal.result.is_none(),
                        refusal.status == StatusCode::NOT_FOUND,
                        "{refusal:?}"
                    );
                }
            }
        }
    }
});
