//! The demo page on the public port: a chat room with presence, private conversations (persisted
//! direct messages with a delivered mark) and a live panel of the cluster, built on the JavaScript
//! SDK. Its files are compiled into the binary; the SDK is included from `clients/js` so there is
//! one copy of it. The cluster panel reads the `$sys.stats` room, which [`stats::publish_stats`]
//! feeds.

pub mod stats;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

/// One file of the page.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../static/index.html"),
    },
    Asset {
        path: "/demo.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/demo.js"),
    },
    Asset {
        path: "/demo.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/demo.css"),
    },
    Asset {
        path: "/switchboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../../../clients/js/switchboard.js"),
    },
];

/// The page talks to this node and to the nodes listed in `?ws=`, so its connections (WebSocket,
/// and the fallbacks' `fetch`, which the nodes allow by CORS) may go to any host; everything else
/// comes from this origin only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss: http: https:; \
     img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Entity tags of the assets, in `ASSETS` order. The files change only with the binary, so a
/// hash of the contents is a stable validator across restarts and nodes of one build.
fn etags() -> &'static [HeaderValue] {
    static ETAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let mut hasher = DefaultHasher::new();
                asset.body.hash(&mut hasher);
                HeaderValue::from_str(&format!("\"{:016x}\"", hasher.finish()))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
            })
            .collect()
    })
}

/// The demo page's URL for a node bound to `public` (serving TLS when `tls`), as a person
/// would open it.
pub fn page_url(public: SocketAddr, tls: bool) -> String {
    let mut addr = public;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{addr}/")
}

/// Answers a request for one of the page's files; `None` when `path` is not one of them.
pub fn respond(method: &Method, path: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    let index = ASSETS.iter().position(|asset| asset.path == path)?;
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let mut response = Response::new(Body::empty());
    let response_headers = response.headers_mut();
    // The public port serves one request per connection unless it upgrades.
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if method != Method::GET && method != Method::HEAD {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(response);
    }
    response_headers.insert(header::ETAG, etag.clone());
    // Revalidate every time: the URLs carry no version, and a new binary may bring new files.
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response_headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/").as_bytes() == etag.as_bytes()
        });
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return Some(response);
    }
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
    if asset.content_type.starts_with("text/html") {
        response_headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        response_headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    if method == Method::GET {
        *response.body_mut() = Body::from(asset.body);
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, headers: &HeaderMap) -> Option<Response<Body>> {
        respond(&Method::GET, path, headers)
    }

    #[test]
    fn every_asset_has_its_content_type_and_validators() {
        for asset in ASSETS {
            let response = get(asset.path, &HeaderMap::new()).expect("served");
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.path);
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
            assert!(headers.contains_key(header::ETAG));
        }
    }

    #[test]
    fn only_the_page_files_are_served() {
        for path in [
            "/ws",
            "/index.html",
            "/demo",
            "/demo.js/",
            "/favicon.ico",
            "//",
        ] {
            assert!(get(path, &HeaderMap::new()).is_none(), "{path}");
        }
    }

    #[test]
    fn a_matching_if_none_match_gets_304() {
        let etag = get("/demo.js", &HeaderMap::new())
            .expect("served")
            .headers()[header::ETAG]
            .clone();
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, etag);
        let response = get("/demo.js", &headers).expect("served");
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(
            get("/demo.js", &headers).expect("served").status(),
            StatusCode::OK
        );
    }

    #[test]
    fn other_methods_get_405_with_allow() {
        let response = respond(&Method::POST, "/", &HeaderMap::new()).expect("answered");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
        let head = respond(&Method::HEAD, "/", &HeaderMap::new()).expect("answered");
        assert_eq!(head.status(), StatusCode::OK);
    }

    #[test]
    fn the_page_url_is_openable() {
        assert_eq!(
            page_url("0.0.0.0:8080".parse().expect("addr"), false),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            page_url("127.0.0.2:81".parse().expect("addr"), false),
            "http://127.0.0.2:81/"
        );
        assert_eq!(
            page_url("127.0.0.2:8443".parse().expect("addr"), true),
            "https://127.0.0.2:8443/"
        );
    }
}
