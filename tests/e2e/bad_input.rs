//! Bad input, end to end: every malformed frame, refused handshake and abusive client gets the
//! answer the protocol documents (an `error` code, an HTTP status or a close code), and in every
//! test the node keeps serving well-behaved clients afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_e2e::auth::{token_signed_with, unix_now};
use switchboard_e2e::client::{
    close_code, connect, connect_small_buffer, expect_error, expect_message, expect_ping_pong,
    open, publish, publish_frame, refused, subscribe, subscribe_frame, until_tcp_closed,
};
use switchboard_e2e::{DEADLINE, NodeProcess, RawClient, wait_until};
use switchboard_protocol::api::PublishResponse;
use switchboard_protocol::{
    ClientFrame, Codec, ErrorCode, JSON_PROTOCOL, MSGPACK_PROTOCOL, ServerFrame, close,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The HS256 secret of the nodes started with authentication on.
const SECRET: &str = "bad-input-e2e-secret-0123456789";

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

fn token(claims: &Value) -> String {
    token_signed_with(SECRET, claims)
}

/// A token that may subscribe and publish everywhere.
fn full_token(user: &str) -> String {
    token(&json!({"sub": user, "exp": unix_now() + 3600, "rooms": ["*"], "publish": ["*"]}))
}

/// Unpadded base64url, for hand-made tokens.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | u32::from(*byte) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn url_with_token(node: &NodeProcess, token: &str) -> String {
    format!("{}?token={token}", node.ws_url())
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn welcome_user(welcome: &ServerFrame) -> &str {
    match welcome {
        ServerFrame::Welcome { user, .. } => user,
        _ => "",
    }
}

fn welcome_protocol(welcome: &ServerFrame) -> &str {
    match welcome {
        ServerFrame::Welcome { protocol, .. } => protocol,
        _ => "",
    }
}

/// Proves the node still serves: the process runs, and two fresh clients (one per codec) connect,
/// subscribe, publish and receive in a new room.
async fn assert_serves(node: &mut NodeProcess, url: &str, headers: &[(&str, &str)]) -> Result<()> {
    static ROUND: AtomicU64 = AtomicU64::new(0);
    ensure!(node.is_running(), "the switchboard process exited");
    let round = ROUND.fetch_add(1, Ordering::Relaxed);
    let room = format!("healthy.{round}");
    let (mut subscriber, ..) = open(url, Some(MSGPACK_PROTOCOL), headers)
        .await
        .context("a fresh subscriber connects")?;
    let (mut publisher, ..) = open(url, Some(JSON_PROTOCOL), headers)
        .await
        .context("a fresh publisher connects")?;
    subscribe(&mut subscriber, &room, 1).await?;
    let data = json!({"healthy": round});
    let offset = publish(&mut publisher, &room, data.clone(), 2).await?;
    let received = expect_message(&mut subscriber, &room, &data).await?;
    ensure!(
        received == offset,
        "received offset {received}, published {offset}"
    );
    expect_ping_pong(&mut publisher, 3).await?;
    ensure!(node.is_running(), "the switchboard process exited");
    Ok(())
}

async fn connections(node: &NodeProcess) -> f64 {
    node.metric("switchboard_connections").await.unwrap_or(-1.0)
}

/// Polls `client` for `duration`, so tungstenite answers the server's pings; fails if the
/// connection closes meanwhile.
async fn keep_reading(client: &mut RawClient, duration: Duration) -> Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        match tokio::time::timeout_at(deadline, client.socket.next()).await {
            Err(_) => return Ok(()),
            Ok(Some(Ok(Message::Close(frame)))) => bail!("closed while reading: {frame:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => bail!("connection failed while reading: {error}"),
            Ok(None) => bail!("connection ended while reading"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-made WebSocket client over a bare TCP stream, for what tungstenite would never send
// (invalid UTF-8) or never fail to do (answer pings).
// ---------------------------------------------------------------------------------------------

struct TcpPeer {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl TcpPeer {
    /// Completes the WebSocket handshake by hand (JSON subprotocol).
    async fn open(addr: SocketAddr) -> Result<TcpPeer> {
        Self::handshake(addr, TcpStream::connect(addr).await?).await
    }

    /// Like [`open`](Self::open), over a socket with a small receive buffer, so the server's
    /// writes stall soon after the peer stops reading.
    async fn open_small_buffer(addr: SocketAddr) -> Result<TcpPeer> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(16 * 1024)?;
        Self::handshake(addr, socket.connect(addr).await?).await
    }

    async fn handshake(addr: SocketAddr, mut stream: TcpStream) -> Result<TcpPeer> {
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {JSON_PROTOCOL}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut peer = TcpPeer {
            stream,
            buffer: Vec::new(),
        };
        let deadline = Instant::now() + DEADLINE;
        let end = loop {
            if let Some(at) = peer.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            peer.read_more(deadline).await?;
        };
        let head = String::from_utf8_lossy(&peer.buffer[..end]).into_owned();
        ensure!(head.starts_with("HTTP/1.1 101"), "handshake failed: {head}");
        // The accept key RFC 6455 derives from the sample nonce above.
        ensure!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "wrong Sec-WebSocket-Accept: {head}"
        );
        peer.buffer.drain(..end);
        Ok(peer)
    }

    async fn read_more(&mut self, deadline: Instant) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
            .await
            .context("nothing read in time")??;
        ensure!(read > 0, "the server closed the TCP connection");
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(())
    }

    /// Writes one final, masked frame.
    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        self.write_frame(0x80 | opcode, Some([0x37, 0xfa, 0x21, 0x3d]), payload)
            .await
    }

    /// Writes a frame with this first byte (FIN, RSV and opcode), masked with `mask` if any.
    async fn write_frame(
        &mut self,
        first: u8,
        mask: Option<[u8; 4]>,
        payload: &[u8],
    ) -> Result<()> {
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let mut frame = vec![first];
        match payload.len() {
            len if len < 126 => frame.push(mask_bit | len as u8),
            len if len <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                frame.extend_from_slice(&mask);
                frame.extend(
                    payload
                        .iter()
                        .enumerate()
                        .map(|(i, byte)| byte ^ mask[i % 4]),
                );
            }
            None => frame.extend_from_slice(payload),
        }
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next frame the server sent: (opcode, payload).
    async fn next_frame(&mut self) -> Result<(u8, Vec<u8>)> {
        let deadline = Instant::now() + DEADLINE;
        while self.buffer.len() < 2 {
            self.read_more(deadline).await?;
        }
        ensure!(self.buffer[1] & 0x80 == 0, "a server frame is masked");
        let (header, len) = match self.buffer[1] & 0x7f {
            126 => (4, None),
            127 => (10, None),
            len => (2, Some(len as usize)),
        };
        while self.buffer.len() < header {
            self.read_more(deadline).await?;
        }
        let len = match len {
            Some(len) => len,
            None if header == 4 => u16::from_be_bytes([self.buffer[2], self.buffer[3]]) as usize,
            None => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.buffer[2..10]);
                u64::from_be_bytes(bytes) as usize
            }
        };
        while self.buffer.len() < header + len {
            self.read_more(deadline).await?;
        }
        let opcode = self.buffer[0] & 0x0f;
        let payload = self.buffer[header..header + len].to_vec();
        self.buffer.drain(..header + len);
        Ok((opcode, payload))
    }

    /// Reads until a close frame; returns its code. `texts` gets the text frames before it.
    async fn expect_close(&mut self, texts: &mut Vec<String>) -> Result<u16> {
        loop {
            let (opcode, payload) = self.next_frame().await?;
            match opcode {
                0x8 => {
                    ensure!(payload.len() >= 2, "close frame without a code");
                    return Ok(u16::from_be_bytes([payload[0], payload[1]]));
                }
                0x1 => texts.push(String::from_utf8(payload)?),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed frames
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_gets_bad_frame_and_the_connection_stays_open() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let mut client = connect(&url, Codec::Json).await?;

    client
        .send_message(Message::Text("{not json".into()))
        .await?;
    expect_error(&mut client, None, ErrorCode::BadFrame).await?;
    expect_ping_pong(&mut client, 1).await?;

    // Valid JSON of the wrong shape: a publish without data, with its id echoed.
    client
        .send_message(Message::Text(
            r#"{"type":"publish","id":8,"room":"r"}"#.into(),
        ))
        .await?;
    expect_error(&mut client, Some(8), ErrorCode::BadFrame).await?;
    // No type at all.
    client
        .send_message(Message::Text(r#"{"id":9}"#.into()))
        .await?;
    expect_error(&mut client, Some(9), ErrorCode::BadFrame).await?;
    expect_ping_pong(&mut client, 2).await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn unknown_type_gets_unknown_type_with_the_id_echoed() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let mut client = connect(&url, Codec::Json).await?;

    client
        .send_message(Message::Text(r#"{"type":"dance","id":7}"#.into()))
        .await?;
    let message = expect_error(&mut client, Some(7), ErrorCode::UnknownType).await?;
    ensure!(
        message.contains("dance"),
        "message should name the type: {message}"
    );
    expect_ping_pong(&mut client, 8).await?;

    // The same on the MessagePack subprotocol: {"type": "dance", "id": 5}.
    let mut packed = connect(&url, Codec::MsgPack).await?;
    let mut frame = vec![0x82, 0xa4];
    frame.extend_from_slice(b"type");
    frame.push(0xa5);
    frame.extend_from_slice(b"dance");
    frame.push(0xa2);
    frame.extend_from_slice(b"id");
    frame.push(0x05);
    packed.send_message(Message::Binary(frame.into())).await?;
    expect_error(&mut packed, Some(5), ErrorCode::UnknownType).await?;
    expect_ping_pong(&mut packed, 6).await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn garbage_msgpack_gets_bad_frame() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let mut client = connect(&url, Codec::MsgPack).await?;

    client
        .send_message(Message::Binary(vec![0xc1, 0xff, 0x00].into()))
        .await?;
    expect_error(&mut client, None, ErrorCode::BadFrame).await?;
    expect_ping_pong(&mut client, 1).await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn binary_frame_on_json_and_text_frame_on_msgpack_get_bad_frame() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();

    let mut json_client = connect(&url, Codec::Json).await?;
    json_client
        .send_message(Message::Binary(
            br#"{"type":"ping","id":1}"#.to_vec().into(),
        ))
        .await?;
    expect_error(&mut json_client, None, ErrorCode::BadFrame).await?;
    expect_ping_pong(&mut json_client, 2).await?;

    let mut msgpack_client = connect(&url, Codec::MsgPack).await?;
    msgpack_client
        .send_message(Message::Text(r#"{"type":"ping","id":1}"#.into()))
        .await?;
    expect_error(&mut msgpack_client, None, ErrorCode::BadFrame).await?;
    expect_ping_pong(&mut msgpack_client, 2).await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let mut peer = TcpPeer::open(node.public).await?;

    // Valid UTF-8 split inside a character, across two frames, is fine.
    let text = "{\"type\":\"ping\",\"id\":41,\"x\":\"\u{e9}t\u{e9}\"}".as_bytes();
    let split = text
        .iter()
        .position(|&byte| byte == 0xc3)
        .context("split")?
        + 1;
    let mask = Some([5, 6, 7, 8]);
    peer.write_frame(0x01, mask, &text[..split]).await?;
    peer.write_frame(0x80, mask, &text[split..]).await?;
    loop {
        let (opcode, payload) = peer.next_frame().await?;
        ensure!(
            opcode != 0x8,
            "valid fragmented UTF-8 closed the connection: {payload:?}"
        );
        if opcode == 0x1 && String::from_utf8(payload)?.contains(r#""pong""#) {
            break;
        }
    }

    peer.send_frame(0x1, b"{\"type\":\"ping\",\"id\":1,\"x\":\"\xff\xfe\xfd\"}")
        .await?;
    let mut texts = Vec::new();
    let code = peer.expect_close(&mut texts).await?;
    ensure!(
        code == close::INVALID_PAYLOAD,
        "closed with {code}, expected 1007 (frames before: {texts:?})"
    );
    ensure!(
        texts.iter().all(|text| !text.contains("pong")),
        "the invalid frame was answered: {texts:?}"
    );
    node.wait_metric("switchboard_closes_total{code=\"1007\"}", 1.0)
        .await?;

    let url = node.ws_url();
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() -> Result<()> {
    let mut node = NodeProcess::start(&["--max-message-size", "1024"]).await?;
    let url = node.ws_url();
    let mut client = connect(&url, Codec::Json).await?;
    // Under the limit, with the frame subscribers would get (and its history headroom): fine.
    publish(&mut client, "big", json!("x".repeat(600)), 1).await?;

    let frame = json!({"type": "publish", "room": "big", "id": 2, "data": "x".repeat(2048)});
    client
        .send_message(Message::Text(frame.to_string().into()))
        .await?;
    let code = close_code(&mut client).await?;
    ensure!(code == close::TOO_BIG, "closed with {code}, expected 1009");

    // A message over the limit in frames under it: 2 x 700 bytes.
    let mut peer = TcpPeer::open(node.public).await?;
    let mask = Some([1, 2, 3, 4]);
    peer.write_frame(0x01, mask, &[b'a'; 700]).await?;
    peer.write_frame(0x80, mask, &[b'a'; 700]).await?;
    let code = peer.expect_close(&mut Vec::new()).await?;
    ensure!(
        code == close::TOO_BIG,
        "fragmented message closed with {code}, expected 1009"
    );

    // A frame header announcing 1 GiB: refused from the header, without waiting for the payload.
    let mut peer = TcpPeer::open(node.public).await?;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header.extend_from_slice(b"{\"type\":");
    peer.stream.write_all(&header).await?;
    let code = peer.expect_close(&mut Vec::new()).await?;
    ensure!(
        code == close::TOO_BIG,
        "a 1 GiB frame header closed with {code}, expected 1009"
    );
    node.wait_metric("switchboard_closes_total{code=\"1009\"}", 3.0)
        .await?;

    assert_serves(&mut node, &url, &[]).await
}

// ---------------------------------------------------------------------------------------------
// Refused handshakes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn subprotocol_negotiation_refuses_only_unknown_protocols() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();

    let (status, body) = refused(&url, Some("mqtt"), &[]).await?;
    ensure!(
        status == 400,
        "unknown subprotocol: status {status}, expected 400"
    );
    ensure!(
        body.contains(JSON_PROTOCOL) && body.contains(MSGPACK_PROTOCOL),
        "the reason should name the supported subprotocols: {body:?}"
    );

    // No header at all: JSON.
    let (mut plain, welcome, chosen) = open(&url, None, &[]).await?;
    ensure!(
        chosen.is_none(),
        "no protocol offered, but {chosen:?} chosen"
    );
    ensure!(welcome_protocol(&welcome) == JSON_PROTOCOL, "{welcome:?}");
    expect_ping_pong(&mut plain, 1).await?;

    // One of ours among unknown ones: ours.
    let offer = format!("mqtt, {MSGPACK_PROTOCOL}, wamp");
    let (mut packed, welcome, chosen) = open(&url, Some(&offer), &[]).await?;
    ensure!(
        chosen.as_deref() == Some(MSGPACK_PROTOCOL),
        "chose {chosen:?}"
    );
    ensure!(
        welcome_protocol(&welcome) == MSGPACK_PROTOCOL,
        "{welcome:?}"
    );
    expect_ping_pong(&mut packed, 2).await?;

    let offer = format!("mqtt, {JSON_PROTOCOL}");
    let (mut json_client, _, chosen) = open(&url, Some(&offer), &[]).await?;
    ensure!(chosen.as_deref() == Some(JSON_PROTOCOL), "chose {chosen:?}");
    expect_ping_pong(&mut json_client, 3).await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn bad_expired_or_missing_tokens_are_refused_with_401() -> Result<()> {
    let mut node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let base = node.ws_url();
    let exp = unix_now() + 3600;

    let wrong_secret = token_signed_with(
        "another-secret-of-at-least-16-bytes",
        &json!({"sub": "mallory", "exp": exp}),
    );
    let expired = token(&json!({"sub": "alice", "exp": unix_now() - 3600}));
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &json!({"sub": "mallory", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let alg_none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(json!({"sub": "mallory", "exp": exp}).to_string().as_bytes())
    );
    let no_subject = token(&json!({"exp": exp, "rooms": ["*"]}));
    let cases = [
        ("wrong secret", url_with_token(&node, &wrong_secret)),
        ("HS512", url_with_token(&node, &hs512)),
        ("alg none", url_with_token(&node, &alg_none)),
        ("no sub", url_with_token(&node, &no_subject)),
        ("garbage", url_with_token(&node, "not-a-jwt")),
        ("garbage with dots", url_with_token(&node, "a.b.c")),
        ("expired", url_with_token(&node, &expired)),
        ("missing", base.clone()),
        ("empty", url_with_token(&node, "")),
    ];
    for (what, url) in &cases {
        let (status, body) = refused(url, Some(JSON_PROTOCOL), &[]).await?;
        ensure!(
            status == 401,
            "{what} token: status {status}, expected 401 ({body})"
        );
        ensure!(
            !body.trim().is_empty(),
            "{what} token: 401 without a reason"
        );
    }
    let (_, body) = refused(&url_with_token(&node, &expired), None, &[]).await?;
    ensure!(body.contains("expired"), "expired token reason: {body:?}");
    let bearer = format!("Bearer {wrong_secret}");
    let (status, _) = refused(&base, None, &[("Authorization", &bearer)]).await?;
    ensure!(
        status == 401,
        "wrong secret in Authorization: status {status}"
    );
    let bearer = format!("Bearer {expired}");
    let (status, _) = refused(&base, None, &[("Authorization", &bearer)]).await?;
    ensure!(
        status == 401,
        "expired token in Authorization: status {status}"
    );

    // Valid tokens, in the query and in the header.
    let alice = token(&json!({"sub": "alice", "exp": exp}));
    let (mut in_query, welcome, _) =
        open(&url_with_token(&node, &alice), Some(JSON_PROTOCOL), &[]).await?;
    ensure!(welcome_user(&welcome) == "alice", "{welcome:?}");
    expect_ping_pong(&mut in_query, 1).await?;
    let bob = format!("Bearer {}", token(&json!({"sub": "bob", "exp": exp})));
    let (mut in_header, welcome, _) =
        open(&base, Some(JSON_PROTOCOL), &[("Authorization", &bob)]).await?;
    ensure!(welcome_user(&welcome) == "bob", "{welcome:?}");
    expect_ping_pong(&mut in_header, 2).await?;

    let url = url_with_token(&node, &full_token("carol"));
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn a_room_outside_the_token_is_forbidden() -> Result<()> {
    let mut node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let limited = token(&json!({"sub": "dave", "exp": unix_now() + 3600, "rooms": ["chat.*"]}));
    let mut client = connect(&url_with_token(&node, &limited), Codec::Json).await?;

    client
        .send_frame(&subscribe_frame("admin", 1, None))
        .await?;
    expect_error(&mut client, Some(1), ErrorCode::Forbidden).await?;
    client
        .send_frame(&ClientFrame::History {
            room: "admin".into(),
            id: 2,
            since: None,
            limit: None,
        })
        .await?;
    expect_error(&mut client, Some(2), ErrorCode::Forbidden).await?;
    client
        .send_frame(&ClientFrame::Presence {
            room: "chat".into(),
            id: 3,
        })
        .await?;
    expect_error(&mut client, Some(3), ErrorCode::Forbidden).await?;

    // The allowed pattern works, on the same connection.
    subscribe(&mut client, "chat.lobby", 4).await?;
    let mut publisher = connect(&url_with_token(&node, &full_token("erin")), Codec::Json).await?;
    let data = json!({"hello": "dave"});
    publish(&mut publisher, "chat.lobby", data.clone(), 5).await?;
    expect_message(&mut client, "chat.lobby", &data).await?;

    let url = url_with_token(&node, &full_token("frank"));
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn publishing_outside_the_publish_claim_is_forbidden() -> Result<()> {
    let mut node = NodeProcess::start(&["--jwt-secret", SECRET]).await?;
    let exp = unix_now() + 3600;
    let reader = token(&json!({"sub": "reader", "exp": exp, "rooms": ["chat.*"]}));
    let writer =
        token(&json!({"sub": "writer", "exp": exp, "rooms": ["chat.*"], "publish": ["chat.news"]}));
    let mut reader = connect(&url_with_token(&node, &reader), Codec::Json).await?;
    let mut writer = connect(&url_with_token(&node, &writer), Codec::MsgPack).await?;
    subscribe(&mut reader, "chat.lobby", 1).await?;
    subscribe(&mut reader, "chat.news", 2).await?;

    // No publish claim at all: subscribing is allowed, publishing is not.
    reader
        .send_frame(&publish_frame("chat.lobby", json!("from reader"), 3))
        .await?;
    expect_error(&mut reader, Some(3), ErrorCode::Forbidden).await?;
    // A publish claim that does not match.
    writer
        .send_frame(&publish_frame("chat.lobby", json!("from writer"), 4))
        .await?;
    expect_error(&mut writer, Some(4), ErrorCode::Forbidden).await?;

    // The matching room works; the forbidden publishes reached nobody.
    let data = json!({"headline": "allowed"});
    let offset = publish(&mut writer, "chat.news", data.clone(), 5).await?;
    ensure!(
        offset == 1,
        "first message of chat.news has offset {offset}"
    );
    match reader.next_frame().await? {
        ServerFrame::Message(message)
            if message.room == "chat.news"
                && message.data == data
                && message
                    .from
                    .as_ref()
                    .is_some_and(|from| from.user == "writer") => {}
        other => bail!("expected the allowed publish first, got {other:?}"),
    }
    reader
        .send_frame(&ClientFrame::History {
            room: "chat.lobby".into(),
            id: 6,
            since: None,
            limit: None,
        })
        .await?;
    match reader.next_frame().await? {
        ServerFrame::Reply(reply)
            if reply.id == 6
                && reply.offset == Some(0)
                && reply.messages.as_ref().is_some_and(Vec::is_empty) => {}
        other => bail!("chat.lobby should be empty, got {other:?}"),
    }

    let url = url_with_token(&node, &full_token("grace"));
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn a_disallowed_origin_is_refused_with_403() -> Result<()> {
    let mut node = NodeProcess::start(&["--allowed-origins", "https://good.example"]).await?;
    let url = node.ws_url();

    for origin in [
        "https://evil.example",
        "http://good.example",
        "https://good.example.evil.example",
    ] {
        let (status, body) = refused(&url, Some(JSON_PROTOCOL), &[("Origin", origin)]).await?;
        ensure!(
            status == 403,
            "origin {origin}: status {status}, expected 403 ({body})"
        );
    }
    let (mut good, ..) = open(
        &url,
        Some(JSON_PROTOCOL),
        &[("Origin", "https://good.example")],
    )
    .await
    .context("the allowed origin is accepted")?;
    expect_ping_pong(&mut good, 1).await?;

    assert_serves(&mut node, &url, &[("Origin", "https://good.example")]).await
}

// ---------------------------------------------------------------------------------------------
// Abuse
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_ping_flood_is_rate_limited_then_closed_with_1008() -> Result<()> {
    let mut node = NodeProcess::start(&[
        "--rate-limit",
        "10",
        "--rate-limit-burst",
        "10",
        "--rate-limit-strikes",
        "20",
    ])
    .await?;
    let url = node.ws_url();
    let mut normal = connect(&url, Codec::Json).await?;
    subscribe(&mut normal, "calm", 1).await?;
    let mut flooder = connect(&url, Codec::Json).await?;

    // 60 pings in one write: 10 pass (the burst), 20 strikes are answered with rate_limited,
    // the next one closes the connection.
    const FLOOD: u64 = 60;
    for id in 1..=FLOOD {
        let text = serde_json::to_string(&ClientFrame::Ping { id: Some(id) })?;
        flooder.socket.feed(Message::Text(text.into())).await?;
    }
    flooder.socket.flush().await?;
    let (mut pongs, mut limited) = (0, 0);
    let code = loop {
        let next = tokio::time::timeout(DEADLINE, flooder.socket.next())
            .await
            .context("flood: nothing in time")?
            .context("flood: connection ended without a close frame")??;
        match next {
            Message::Text(text) => match Codec::Json.decode::<ServerFrame>(text.as_bytes()) {
                Ok(ServerFrame::Pong { .. }) => pongs += 1,
                Ok(ServerFrame::Error(error)) if error.code == ErrorCode::RateLimited => {
                    ensure!(error.id.is_some(), "rate_limited should echo the ping's id");
                    limited += 1;
                }
                other => bail!("flood: unexpected frame {other:?}"),
            },
            Message::Close(frame) => break frame.map(|frame| u16::from(frame.code)),
            _ => {}
        }
    };
    ensure!(
        code == Some(close::POLICY),
        "flood closed with {code:?}, expected 1008 ({pongs} pongs, {limited} rate_limited)"
    );
    ensure!(pongs >= 10, "only {pongs} pongs: the burst is 10");
    ensure!(
        limited >= 20,
        "only {limited} rate_limited frames before the close"
    );
    ensure!(
        pongs + limited < FLOOD,
        "every ping was answered: no close needed"
    );
    node.wait_metric("switchboard_errors_sent_total{code=\"rate_limited\"}", 20.0)
        .await?;

    // The normal client is unaffected.
    expect_ping_pong(&mut normal, 2).await?;
    let mut publisher = connect(&url, Codec::Json).await?;
    let data = json!("still calm");
    publish(&mut publisher, "calm", data.clone(), 3).await?;
    expect_message(&mut normal, "calm", &data).await?;
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn too_many_bad_frames_close_with_1008() -> Result<()> {
    let mut node = NodeProcess::start(&["--max-bad-frames", "3"]).await?;
    let url = node.ws_url();
    let mut client = connect(&url, Codec::Json).await?;

    client
        .send_message(Message::Text("{not json".into()))
        .await?;
    expect_error(&mut client, None, ErrorCode::BadFrame).await?;
    client
        .send_message(Message::Binary(b"binary".to_vec().into()))
        .await?;
    expect_error(&mut client, None, ErrorCode::BadFrame).await?;
    client.send_message(Message::Text("[]".into())).await?;
    expect_error(&mut client, None, ErrorCode::BadFrame).await?;
    // Good frames in between do not count.
    expect_ping_pong(&mut client, 1).await?;
    client.send_message(Message::Text("{{{".into())).await?;
    let code = close_code(&mut client).await?;
    ensure!(code == close::POLICY, "closed with {code}, expected 1008");
    node.wait_metric("switchboard_closes_total{code=\"1008\"}", 1.0)
        .await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_with_1013_and_a_fast_reader_gets_everything() -> Result<()> {
    const SLOW_CLOSES: &str = "switchboard_slow_consumer_closes_total";
    const MAX_MESSAGES: u64 = 2000;
    let mut node =
        NodeProcess::start(&["--max-message-size", "32768", "--max-queue-bytes", "65536"]).await?;
    let url = node.ws_url();
    let room = "firehose";
    let mut slow = connect_small_buffer(&node, &node.ws_url()).await?;
    subscribe(&mut slow, room, 1).await?;
    let mut fast = connect(&url, Codec::Json).await?;
    subscribe(&mut fast, room, 1).await?;

    // The slow client reads nothing from here on. The publisher goes through the server API; the
    // fast client reads each message as it comes.
    let http = reqwest::Client::new();
    let pad = "p".repeat(16 * 1024);
    let mut received = Vec::new();
    let mut published = 0;
    let mut slow_closed = false;
    while published < MAX_MESSAGES {
        published += 1;
        let response = http
            .post(node.http_url("/api/publish"))
            .json(&json!({"room": room, "data": {"seq": published, "pad": pad}}))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "publish: {}",
            response.status()
        );
        let response: PublishResponse = response.json().await?;
        ensure!(
            response.offset == published,
            "publish {published} got offset {}",
            response.offset
        );
        match fast.next_frame().await? {
            ServerFrame::Message(message) if message.room == room => {
                received.push((message.offset, message.data["seq"].as_u64()));
            }
            other => bail!("fast client: expected message {published}, got {other:?}"),
        }
        if published % 4 == 0 && node.metric(SLOW_CLOSES).await? >= 1.0 {
            slow_closed = true;
            break;
        }
    }
    ensure!(
        slow_closed,
        "{published} messages of 16 KiB published and the slow reader is still open"
    );
    node.wait_metric(SLOW_CLOSES, 1.0).await?;

    // The slow client resumes: a gap-free prefix of the messages, then a close with 1013.
    let mut slow_offsets = Vec::new();
    let code = loop {
        let next = tokio::time::timeout(DEADLINE, slow.socket.next())
            .await
            .context("slow client: no close in time")?
            .context("slow client: connection ended without a close frame")?
            .context("slow client: connection failed before a close frame")?;
        match next {
            Message::Text(text) => {
                if let Ok(ServerFrame::Message(message)) =
                    Codec::Json.decode::<ServerFrame>(text.as_bytes())
                {
                    slow_offsets.push(message.offset);
                }
            }
            Message::Close(frame) => break frame.map(|frame| u16::from(frame.code)),
            _ => {}
        }
    };
    ensure!(
        code == Some(close::TRY_AGAIN_LATER),
        "slow client closed with {code:?}, expected 1013"
    );
    let expected_prefix: Vec<u64> = (1..=slow_offsets.len() as u64).collect();
    ensure!(
        slow_offsets == expected_prefix,
        "the slow client's messages are not a gap-free prefix: {slow_offsets:?}"
    );
    ensure!(
        (slow_offsets.len() as u64) < published,
        "the slow client got every message, yet was closed as slow"
    );
    node.wait_metric("switchboard_closes_total{code=\"1013\"}", 1.0)
        .await?;

    // The fast client keeps receiving after the slow one is gone.
    for _ in 0..3 {
        published += 1;
        let response = http
            .post(node.http_url("/api/publish"))
            .json(&json!({"room": room, "data": {"seq": published, "pad": "after"}}))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "publish: {}",
            response.status()
        );
        match fast.next_frame().await? {
            ServerFrame::Message(message) if message.room == room => {
                received.push((message.offset, message.data["seq"].as_u64()));
            }
            other => bail!("fast client: expected message {published}, got {other:?}"),
        }
    }
    let expected: Vec<(u64, Option<u64>)> = (1..=published).map(|n| (n, Some(n))).collect();
    ensure!(
        received == expected,
        "the fast client missed or reordered messages: got {} of {published}",
        received.len()
    );
    expect_ping_pong(&mut fast, 2).await?;
    wait_until("the slow session to be gone", || async {
        connections(&node).await == 1.0
    })
    .await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_idle_timeout() -> Result<()> {
    const NORMAL_CLOSES: &str = "switchboard_closes_total{code=\"1000\"}";
    let mut node =
        NodeProcess::start(&["--heartbeat-ms", "200", "--idle-timeout-ms", "1000"]).await?;
    let url = node.ws_url();
    let mut live = connect(&url, Codec::Json).await?;
    subscribe(&mut live, "heartbeat", 1).await?;

    // Completes the handshake by hand, then never reads or answers a ping.
    let started = Instant::now();
    let mut silent = TcpPeer::open(node.public).await?;
    wait_until("both sessions to be open", || async {
        connections(&node).await == 2.0
    })
    .await?;

    // The live client keeps reading (tungstenite answers the pings) well past the idle timeout,
    // while the silent one is closed.
    let watch = async {
        node.wait_metric(NORMAL_CLOSES, 1.0).await?;
        let closed_after = started.elapsed();
        wait_until("the silent session to be gone", || async {
            connections(&node).await == 1.0
        })
        .await?;
        Ok::<_, anyhow::Error>(closed_after)
    };
    let (reading, closed_after) =
        tokio::join!(keep_reading(&mut live, Duration::from_millis(2500)), watch);
    reading.context("the live client was disturbed")?;
    let closed_after = closed_after?;
    ensure!(
        closed_after >= Duration::from_millis(900),
        "the silent peer was closed after {closed_after:?}, before the 1 s idle timeout"
    );
    ensure!(
        connections(&node).await == 1.0,
        "the live client was closed too"
    );

    // What the silent peer finds when it finally reads: welcome, pings, then a 1000 close.
    let mut texts = Vec::new();
    let code = silent.expect_close(&mut texts).await?;
    ensure!(
        code == close::NORMAL,
        "silent peer closed with {code}, expected 1000"
    );
    ensure!(
        texts.first().is_some_and(|text| text.contains("welcome")),
        "the silent peer's first frame: {texts:?}"
    );

    expect_ping_pong(&mut live, 2).await?;
    let mut publisher = connect(&url, Codec::Json).await?;
    let data = json!("still alive");
    publish(&mut publisher, "heartbeat", data.clone(), 3).await?;
    expect_message(&mut live, "heartbeat", &data).await?;
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_cut_off() -> Result<()> {
    let mut node = NodeProcess::start(&["--handshake-timeout-ms", "500"]).await?;
    let url = node.ws_url();

    let started = Instant::now();
    let mut half_line = TcpStream::connect(node.public).await?;
    half_line.write_all(b"GET /ws HTT").await?;
    let mut half_headers = TcpStream::connect(node.public).await?;
    half_headers
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConn")
        .await?;
    let mut nothing = TcpStream::connect(node.public).await?;

    until_tcp_closed(&mut half_line).await?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(400),
        "a half request line was cut off after {elapsed:?}, before the 500 ms timeout"
    );
    until_tcp_closed(&mut half_headers).await?;
    until_tcp_closed(&mut nothing).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "slow handshakes took {:?} to be cut off",
        started.elapsed()
    );
    node.wait_metric("switchboard_handshakes_total{result=\"timeout\"}", 2.0)
        .await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn plain_http_on_the_public_port_is_refused() -> Result<()> {
    // Without the demo page, `/ws` is all the public port serves (tests/e2e/demo.rs covers it).
    let mut node = NodeProcess::start(&["--demo", "false"]).await?;
    let public = |path: &str| format!("http://{}{path}", node.public);

    for path in ["/", "/metrics", "/api/nodes", "/healthz", "/ws/other"] {
        let status = reqwest::get(public(path)).await?.status().as_u16();
        ensure!(
            status == 404,
            "GET {path} on the public port: {status}, expected 404"
        );
    }
    let response = reqwest::get(public("/ws")).await?;
    let status = response.status().as_u16();
    let body = response.text().await?;
    ensure!(
        status == 400,
        "GET /ws without upgrade headers: {status}, expected 400"
    );
    ensure!(
        body.contains("WebSocket"),
        "the reason should say why: {body:?}"
    );

    let url = node.ws_url();
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn a_token_that_expires_during_the_session_closes_it_with_1008() -> Result<()> {
    let mut node = NodeProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-leeway-secs",
        "0",
        "--heartbeat-ms",
        "200",
        "--idle-timeout-ms",
        "10000",
    ])
    .await?;
    let url = url_with_token(&node, &full_token("long-lived"));
    let mut steady = connect(&url, Codec::Json).await?;
    subscribe(&mut steady, "expiry", 1).await?;

    let short = token(&json!({"sub": "short-lived", "exp": unix_now() + 2, "rooms": ["*"]}));
    let started = Instant::now();
    let mut expiring = connect(&url_with_token(&node, &short), Codec::Json).await?;
    subscribe(&mut expiring, "expiry", 1).await?;
    let code = close_code(&mut expiring).await?;
    ensure!(
        code == close::POLICY,
        "expired session closed with {code}, expected 1008"
    );
    ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before the token expired",
        started.elapsed()
    );

    expect_ping_pong(&mut steady, 2).await?;
    let mut publisher = connect(&url, Codec::Json).await?;
    let data = json!("after expiry");
    publish(&mut publisher, "expiry", data.clone(), 3).await?;
    expect_message(&mut steady, "expiry", &data).await?;
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn requests_with_bad_fields_get_their_error_codes() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let mut client = connect(&url, Codec::Json).await?;

    let long_room = "r".repeat(257);
    for (id, room) in [(1, ""), (2, long_room.as_str()), (3, "bad\nroom")] {
        client.send_frame(&subscribe_frame(room, id, None)).await?;
        expect_error(&mut client, Some(id), ErrorCode::BadFrame)
            .await
            .with_context(|| format!("subscribe to {room:?}"))?;
    }
    client.send_frame(&publish_frame("", json!(1), 4)).await?;
    expect_error(&mut client, Some(4), ErrorCode::BadFrame).await?;
    client
        .send_frame(&ClientFrame::Send {
            to: String::new(),
            data: json!(1),
            id: Some(5),
            persist: false,
            key: None,
        })
        .await?;
    expect_error(&mut client, Some(5), ErrorCode::BadFrame).await?;
    client
        .send_frame(&ClientFrame::Unsubscribe {
            room: "never".into(),
            id: Some(6),
        })
        .await?;
    expect_error(&mut client, Some(6), ErrorCode::NotSubscribed).await?;
    subscribe(&mut client, "twice", 7).await?;
    client
        .send_frame(&subscribe_frame("twice", 8, None))
        .await?;
    expect_error(&mut client, Some(8), ErrorCode::AlreadySubscribed).await?;
    // An id that is not an unsigned integer cannot be echoed.
    for frame in [
        r#"{"type":"ping","id":"abc"}"#,
        r#"{"type":"ping","id":-1}"#,
    ] {
        client.send_message(Message::Text(frame.into())).await?;
        expect_error(&mut client, None, ErrorCode::BadFrame)
            .await
            .with_context(|| format!("frame {frame}"))?;
    }
    expect_ping_pong(&mut client, 9).await?;

    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test]
async fn websocket_protocol_violations_close_with_1002() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let mask = Some([9, 8, 7, 6]);
    let cases = [
        (
            "unmasked client frame",
            0x81,
            None,
            br#"{"type":"ping"}"#.to_vec(),
        ),
        ("reserved opcode", 0x83, mask, b"x".to_vec()),
        (
            "RSV1 without an extension",
            0xc1,
            mask,
            br#"{"type":"ping"}"#.to_vec(),
        ),
        ("ping over 125 bytes", 0x89, mask, vec![b'p'; 126]),
        ("fragmented ping", 0x09, mask, b"p".to_vec()),
        ("continuation without a start", 0x80, mask, b"x".to_vec()),
    ];
    for (what, first, mask, payload) in cases {
        let mut peer = TcpPeer::open(node.public).await?;
        peer.write_frame(first, mask, &payload).await?;
        let code = peer
            .expect_close(&mut Vec::new())
            .await
            .with_context(|| format!("{what}: no close frame"))?;
        ensure!(code == 1002, "{what}: closed with {code}, expected 1002");
    }
    let url = node.ws_url();
    assert_serves(&mut node, &url, &[]).await
}

/// Sends a raw HTTP request to the public port; returns the status and the response head.
async fn raw_http(addr: SocketAddr, request: &[u8]) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + DEADLINE;
    let head = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break String::from_utf8_lossy(&received[..at]).into_owned();
        }
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .context("no HTTP response in time")??;
        ensure!(read > 0, "connection closed without an HTTP response");
        received.extend_from_slice(&chunk[..read]);
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, head))
}

#[tokio::test]
async fn malformed_upgrade_requests_are_refused() -> Result<()> {
    let mut node = NodeProcess::start(&[]).await?;
    let upgrade = |method: &str, target: &str, version: &str, key: bool| {
        let key = if key {
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        } else {
            ""
        };
        format!(
            "{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\n{key}Sec-WebSocket-Version: {version}\r\n\r\n"
        )
    };

    let (status, head) = raw_http(node.public, upgrade("GET", "/ws", "8", true).as_bytes()).await?;
    ensure!(status == 426, "WebSocket version 8: {status}, expected 426");
    ensure!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "426 should name the supported version: {head}"
    );
    let (status, _) = raw_http(node.public, upgrade("GET", "/ws", "13", false).as_bytes()).await?;
    ensure!(
        status == 400,
        "no Sec-WebSocket-Key: {status}, expected 400"
    );
    let (status, _) = raw_http(node.public, upgrade("POST", "/ws", "13", true).as_bytes()).await?;
    ensure!(status == 405, "POST /ws: {status}, expected 405");
    let long_user = format!("/ws?user={}", "u".repeat(200));
    let (status, _) = raw_http(
        node.public,
        upgrade("GET", &long_user, "13", true).as_bytes(),
    )
    .await?;
    ensure!(status == 400, "a 200-byte ?user=: {status}, expected 400");
    let mut huge = upgrade("GET", "/ws", "13", true);
    huge.insert_str(
        huge.len() - 2,
        &format!("X-Padding: {}\r\n", "p".repeat(32 * 1024)),
    );
    let (status, _) = raw_http(node.public, huge.as_bytes()).await?;
    ensure!(status == 431, "a 32 KiB header: {status}, expected 431");

    let url = node.ws_url();
    assert_serves(&mut node, &url, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_its_replies_is_still_closed() -> Result<()> {
    let mut node =
        NodeProcess::start(&["--heartbeat-ms", "200", "--idle-timeout-ms", "1000"]).await?;
    let url = node.ws_url();
    let http = reqwest::Client::new();
    let pad = "h".repeat(64 * 1024);
    for seq in 0..25 {
        let response = http
            .post(node.http_url("/api/publish"))
            .json(&json!({"room": "archive", "data": {"seq": seq, "pad": pad}}))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "publish: {}",
            response.status()
        );
    }
    let mut live = connect(&url, Codec::Json).await?;
    subscribe(&mut live, "archive.live", 1).await?;

    // Asks for ~16 MB of history (10 replies of 25 x 64 KiB), subscribes to nothing, and never
    // reads again: the server's writes stall on the full socket, and the peer sends nothing
    // more, not even a pong.
    let mut peer = TcpPeer::open_small_buffer(node.public).await?;
    for id in 1..=10u64 {
        let frame = json!({"type": "history", "room": "archive", "id": id, "limit": 25});
        peer.send_frame(0x1, frame.to_string().as_bytes()).await?;
    }
    wait_until("both sessions to be open", || async {
        connections(&node).await == 2.0
    })
    .await?;

    // The idle timeout (1 s) must still end it, whatever the server was writing; the close
    // frame may wait behind unread data for a while, so allow DEADLINE in all.
    let watch = wait_until("the stalled session to be closed", || async {
        connections(&node).await == 1.0
    });
    let closed = tokio::select! {
        closed = watch => closed,
        Err(error) = keep_reading(&mut live, 2 * DEADLINE) => {
            return Err(error.context("the live client was disturbed"));
        }
    };
    closed.context(
        "a peer that stopped reading its replies (and sent nothing for 10 s) is still connected",
    )?;

    // The server ended the TCP connection.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout_at(deadline, peer.stream.read(&mut chunk))
            .await
            .context("the server kept the stalled TCP connection open")?
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }

    expect_ping_pong(&mut live, 2).await?;
    assert_serves(&mut node, &url, &[]).await
}
