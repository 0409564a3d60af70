//! Raw WebSocket client steps the end-to-end tests share: connect and wait for the `welcome`,
//! request and wait for the answer, subscribe, publish, expect a frame, read until closed. Every
//! wait ends at [`DEADLINE`] (through [`RawClient::next_frame`] and [`RawClient::expect_close`]
//! unless it says otherwise) and fails with what came instead.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use switchboard_protocol::{ClientFrame, Codec, ErrorCode, Reply, ServerFrame, StreamPosition};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::{DEADLINE, Handshake, NodeProcess, RawClient, raw_handshake};

/// The node's WebSocket URL for `user` (nodes without authentication take `?user=`).
pub fn user_url(node: &NodeProcess, user: &str) -> String {
    format!("{}?user={user}", node.ws_url())
}

/// Connects with the codec's subprotocol; waits for the `welcome` (see [`RawClient::connect`]).
pub async fn connect(url: &str, codec: Codec) -> Result<RawClient> {
    Ok(RawClient::connect(url, codec).await?.0)
}

/// Connects to `node` as `user` with JSON; waits for the `welcome`.
pub async fn connect_user(node: &NodeProcess, user: &str) -> Result<RawClient> {
    connect(&user_url(node, user), Codec::Json).await
}

/// Opens a WebSocket that must be accepted and waits for its first frame, which must be the
/// `welcome`; returns the client, the welcome and the subprotocol the server chose.
pub async fn open(
    url: &str,
    protocol: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(RawClient, ServerFrame, Option<String>)> {
    match raw_handshake(url, protocol, headers).await? {
        Handshake::Open(client, response) => {
            let mut client = *client;
            let chosen = response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|value| value.to_str().unwrap_or_default().to_owned());
            let welcome = client.next_frame().await?;
            ensure!(
                matches!(welcome, ServerFrame::Welcome { .. }),
                "the first frame is not a welcome: {welcome:?}"
            );
            Ok((client, welcome, chosen))
        }
        Handshake::Refused { status, body } => bail!("handshake refused: {status} {body}"),
    }
}

/// Opens a WebSocket that must be refused; returns the HTTP status and body.
pub async fn refused(
    url: &str,
    protocol: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    match raw_handshake(url, protocol, headers).await? {
        Handshake::Open(..) => bail!("handshake to {url} accepted, expected a refusal"),
        Handshake::Refused { status, body } => Ok((status, body)),
    }
}

/// Connects to `url` (on `node`) over a socket with a 16 KiB receive buffer and waits for the
/// `welcome`: a reader that does not read really holds the node's writes back, as over a real
/// network. The handshake must finish within [`DEADLINE`].
pub async fn connect_small_buffer(node: &NodeProcess, url: &str) -> Result<RawClient> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(16 * 1024)?;
    let stream = socket.connect(node.public).await?;
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(Codec::Json.protocol()),
    );
    let (socket, _) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)),
    )
    .await??;
    let mut client = RawClient {
        socket,
        codec: Codec::Json,
    };
    match client.next_frame().await? {
        ServerFrame::Welcome { .. } => Ok(client),
        other => bail!("the first frame is not a welcome: {other:?}"),
    }
}

/// A `subscribe` frame with request id `id`, without presence events.
pub fn subscribe_frame(room: &str, id: u64, since: Option<StreamPosition>) -> ClientFrame {
    ClientFrame::Subscribe {
        room: room.to_owned(),
        id: Some(id),
        since,
        presence_events: false,
    }
}

/// A `publish` frame with request id `id`.
pub fn publish_frame(room: &str, data: Value, id: u64) -> ClientFrame {
    ClientFrame::Publish {
        room: room.to_owned(),
        data,
        id: Some(id),
        key: None,
    }
}

pub fn position(offset: u64, epoch: &str) -> StreamPosition {
    StreamPosition {
        offset,
        epoch: epoch.to_owned(),
    }
}

/// Sends a request and returns the very next frame, whatever it is.
pub async fn request(client: &mut RawClient, frame: ClientFrame) -> Result<ServerFrame> {
    client.send_frame(&frame).await?;
    client.next_frame().await
}

/// Waits for the answer to request `id` (its `reply` or `error`), skipping every other frame.
pub async fn answer(client: &mut RawClient, id: u64) -> Result<ServerFrame> {
    loop {
        match client.next_frame().await? {
            ServerFrame::Reply(reply) if reply.id == id => return Ok(ServerFrame::Reply(reply)),
            ServerFrame::Error(error) if error.id == Some(id) => {
                return Ok(ServerFrame::Error(error));
            }
            _ => {}
        }
    }
}

/// Sends a request (which must carry an id) and waits for its [`answer`], skipping other frames.
pub async fn request_answer(client: &mut RawClient, frame: ClientFrame) -> Result<ServerFrame> {
    let id = frame.id().context("requests carry an id")?;
    client.send_frame(&frame).await?;
    answer(client, id).await
}

/// The frame must be a `reply`.
pub fn expect_reply(frame: ServerFrame) -> Result<Reply> {
    match frame {
        ServerFrame::Reply(reply) => Ok(reply),
        other => bail!("expected a reply, got {other:?}"),
    }
}

/// The frame must be an `error` with this code and id and a message; returns the message.
pub fn error_of(frame: ServerFrame, id: Option<u64>, code: ErrorCode) -> Result<String> {
    match frame {
        ServerFrame::Error(error) => {
            ensure!(
                error.id == id && error.code == code,
                "expected error {code} with id {id:?}, got {error:?}"
            );
            ensure!(!error.message.is_empty(), "empty error message");
            Ok(error.message)
        }
        other => bail!("expected error {code} with id {id:?}, got {other:?}"),
    }
}

/// The next frame must be an `error` with this code and id (see [`error_of`]).
pub async fn expect_error(
    client: &mut RawClient,
    id: Option<u64>,
    code: ErrorCode,
) -> Result<String> {
    error_of(client.next_frame().await?, id, code)
}

/// Sends a `ping` and expects its `pong` as the next frame: the connection is open, answering,
/// and had nothing else queued.
pub async fn expect_ping_pong(client: &mut RawClient, id: u64) -> Result<()> {
    client
        .send_frame(&ClientFrame::Ping { id: Some(id) })
        .await?;
    match client.next_frame().await? {
        ServerFrame::Pong { id: Some(got) } if got == id => Ok(()),
        other => bail!("expected pong {id}, got {other:?}"),
    }
}

/// Subscribes to `room`; the next frame must be the reply to `id` for that room.
pub async fn subscribe(client: &mut RawClient, room: &str, id: u64) -> Result<Reply> {
    client.send_frame(&subscribe_frame(room, id, None)).await?;
    match client.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == id && reply.room.as_deref() == Some(room) => {
            Ok(reply)
        }
        other => bail!("expected the subscribe reply {id} for {room}, got {other:?}"),
    }
}

/// Publishes `data` to `room`; the next frame must be the reply to `id`, and it must carry the
/// message's offset, which is returned.
pub async fn publish(client: &mut RawClient, room: &str, data: Value, id: u64) -> Result<u64> {
    client.send_frame(&publish_frame(room, data, id)).await?;
    match client.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == id => reply.offset.context("publish reply offset"),
        other => bail!("expected the publish reply {id}, got {other:?}"),
    }
}

/// The next frame must be a room message in `room` with `data`; returns its offset.
pub async fn expect_message(client: &mut RawClient, room: &str, data: &Value) -> Result<u64> {
    match client.next_frame().await? {
        ServerFrame::Message(message) if message.room == room && &message.data == data => {
            Ok(message.offset)
        }
        other => bail!("expected a message {data} in {room}, got {other:?}"),
    }
}

/// Waits for the server's close frame (skipping data frames) and returns its code; fails when the
/// frame carries none.
pub async fn close_code(client: &mut RawClient) -> Result<u16> {
    let frame = client
        .expect_close()
        .await?
        .context("close frame without a code")?;
    Ok(frame.code.into())
}

/// Reads until the server ends the TCP connection (EOF or reset), ignoring what it sends; fails
/// when it stays silent and open for [`DEADLINE`].
pub async fn until_tcp_closed(stream: &mut TcpStream) -> Result<()> {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .context("the server kept the connection open")?
        {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}
