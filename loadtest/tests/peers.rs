//! The two peer servers of the side-by-side benchmark, run for real and checked against the wire
//! contract in `loadtest/src/protocol.rs`: the raw ceiling server (`switchboard-raw-ceiling`) and
//! the Socket.IO 4 server (`loadtest/peers/socketio`, two processes sharing a real redis-server).
//! Every process started here is killed by pid when its guard is dropped, pass or fail.

mod common;

use std::time::Duration;

use anyhow::bail;
use common::{Server, start_raw, start_socketio, wait_for_socketio_adapters};
use futures_util::{SinkExt, StreamExt};
use switchboard_e2e::{RedisProcess, Socket};
use tokio_tungstenite::tungstenite::Message;

/// How long a frame may take to arrive.
const DEADLINE: Duration = Duration::from_secs(20);

async fn connect(url: &str) -> Socket {
    tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|error| panic!("connecting to {url}: {error}"))
        .0
}

async fn send(socket: &mut Socket, text: &str) {
    socket.send(Message::text(text)).await.expect("send");
}

/// The next text frame, answering Engine.IO pings (`2`) on the way.
async fn next_text(socket: &mut Socket) -> String {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) if text.as_str() == "2" => {
                    socket.send(Message::text("3")).await?;
                }
                Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => bail!("closed"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("no frame in time")
        .expect("reading a frame")
}

#[tokio::test]
async fn raw_server_routes_each_publish_to_its_room_once() {
    let server = start_raw(&[]).await;
    let url = format!("ws://{}/", server.addr);
    let mut first = connect(&url).await;
    let mut second = connect(&url).await;
    let mut other = connect(&url).await;
    let mut publisher = connect(&url).await;
    for (socket, room) in [(&mut first, "r"), (&mut second, "r"), (&mut other, "q")] {
        send(socket, &format!("sub {room}")).await;
        assert_eq!(next_text(socket).await, format!("ok {room}"));
    }

    send(&mut publisher, r#"pub r {"x":1} with spaces"#).await;
    send(&mut publisher, "pub q for-q").await;
    send(&mut publisher, "pub r end").await;
    // One publisher's frames arrive in order: whatever follows the first delivery shows there was
    // no second copy of it, and the other room's first frame shows it never saw room r's.
    for socket in [&mut first, &mut second] {
        assert_eq!(next_text(socket).await, r#"{"x":1} with spaces"#);
        assert_eq!(next_text(socket).await, "end");
    }
    assert_eq!(next_text(&mut other).await, "for-q");
}

#[tokio::test]
async fn raw_server_survives_a_client_that_vanishes() {
    let mut server = start_raw(&[]).await;
    let url = format!("ws://{}/", server.addr);
    let mut subscriber = connect(&url).await;
    let mut publisher = connect(&url).await;
    send(&mut subscriber, "sub r").await;
    assert_eq!(next_text(&mut subscriber).await, "ok r");

    // Subscribed, then gone without a close frame while messages are on their way to it.
    let mut vanishing = connect(&url).await;
    send(&mut vanishing, "sub r").await;
    assert_eq!(next_text(&mut vanishing).await, "ok r");
    send(&mut publisher, "pub r one").await;
    drop(vanishing);
    send(&mut publisher, "pub r two").await;

    assert_eq!(next_text(&mut subscriber).await, "one");
    assert_eq!(next_text(&mut subscriber).await, "two");
    let mut late = connect(&url).await;
    send(&mut late, "sub r").await;
    assert_eq!(next_text(&mut late).await, "ok r");
    send(&mut publisher, "pub r three").await;
    assert_eq!(next_text(&mut late).await, "three");
    assert_eq!(next_text(&mut subscriber).await, "three");
    server.assert_running();
}

#[tokio::test]
async fn raw_server_disconnects_a_subscriber_that_falls_behind() {
    const MESSAGES: usize = 1000;
    const LAG_LIMIT: usize = 16;
    let mut server = start_raw(&["--lag-limit", &LAG_LIMIT.to_string()]).await;
    let url = format!("ws://{}/", server.addr);
    let mut reader = connect(&url).await;
    let mut stalled = connect(&url).await;
    let mut publisher = connect(&url).await;
    for socket in [&mut reader, &mut stalled] {
        send(socket, "sub r").await;
        assert_eq!(next_text(socket).await, "ok r");
    }

    // 16 MB in all: far more than the kernel buffers for a subscriber that stopped reading. In
    // lockstep with the reader, so only the stalled subscriber falls behind.
    let padding = "x".repeat(16 << 10);
    for i in 0..MESSAGES {
        send(&mut publisher, &format!("pub r {i}:{padding}")).await;
        let text = next_text(&mut reader).await;
        assert!(
            text.starts_with(&format!("{i}:")),
            "message {i} out of order"
        );
    }

    // Reading again, it finds the server gave up on it: some messages, then the end.
    let drained = async {
        let mut received = 0;
        while let Some(Ok(frame)) = stalled.next().await {
            if frame.is_text() {
                received += 1;
            }
        }
        received
    };
    let received = tokio::time::timeout(DEADLINE, drained)
        .await
        .expect("the stalled subscriber was never disconnected");
    assert!(
        received < MESSAGES,
        "the stalled subscriber got all {received} messages"
    );
    server.assert_running();
}

/// Opens an Engine.IO 4 WebSocket and joins the default namespace.
async fn socketio_connect(server: &Server) -> Socket {
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", server.addr);
    let mut socket = connect(&url).await;
    let open = next_text(&mut socket).await;
    assert!(open.starts_with("0{"), "Engine.IO open: {open}");
    send(&mut socket, "40").await;
    let connected = next_text(&mut socket).await;
    assert!(
        connected.starts_with("40{"),
        "namespace connect: {connected}"
    );
    socket
}

async fn socketio_subscribe(socket: &mut Socket, room: &str) {
    send(socket, &format!(r#"421["subscribe","{room}"]"#)).await;
    assert_eq!(next_text(socket).await, r#"431["ok"]"#);
}

#[tokio::test]
async fn socketio_peer_delivers_across_nodes_through_redis() {
    let redis = RedisProcess::start().await.expect("starting redis-server");
    let mut one = start_socketio(&redis).await;
    let mut two = start_socketio(&redis).await;
    wait_for_socketio_adapters(&redis, 2).await;

    let mut remote = socketio_connect(&two).await;
    let mut local = socketio_connect(&one).await;
    let mut other = socketio_connect(&two).await;
    let mut publisher = socketio_connect(&one).await;
    socketio_subscribe(&mut remote, "r").await;
    socketio_subscribe(&mut local, "r").await;
    socketio_subscribe(&mut other, "q").await;

    send(&mut publisher, r#"42["publish","r",{"x":1}]"#).await;
    send(&mut publisher, r#"42["publish","q","for-q"]"#).await;
    send(&mut publisher, r#"42["publish","r","end"]"#).await;
    // In order from one publisher: the frame after the first delivery shows there was no second
    // copy, and the other room's first frame shows it never saw room r's.
    for socket in [&mut remote, &mut local] {
        assert_eq!(next_text(socket).await, r#"42["message",{"x":1}]"#);
        assert_eq!(next_text(socket).await, r#"42["message","end"]"#);
    }
    assert_eq!(next_text(&mut other).await, r#"42["message","for-q"]"#);
    one.assert_running();
    two.assert_running();
}
