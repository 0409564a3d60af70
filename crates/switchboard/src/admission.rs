//! The WebSocket handshake's decision, apart from its I/O: what a request asks for and whether
//! it is admitted. `server.rs` is the adapter that reads the request and writes the answer.

use std::net::IpAddr;

use http::{HeaderMap, header};
use switchboard_protocol::Codec;

use crate::auth::bearer_token;

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
    use http::HeaderValue;

    use super::*;

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
}
