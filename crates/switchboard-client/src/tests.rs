//! The client against a tiny scripted server: each test plays the server's side frame by frame.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use switchboard_protocol::{ClientFrame, Codec, Encoded, Reply, ServerFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::*;

/// How long any single expected thing may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting")
}

struct TestServer {
    url: String,
    accepted: mpsc::UnboundedReceiver<Peer>,
    listener: JoinHandle<()>,
    /// While set, handshakes are refused with HTTP 401, like a server rejecting a token.
    refuse: Arc<AtomicBool>,
}

/// One accepted connection, seen from the server.
struct Peer {
    ws: WebSocketStream<TcpStream>,
    uri: String,
    headers: HeaderMap,
    /// The codec the client asked for.
    codec: Codec,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("address"));
        let (sender, accepted) = mpsc::unbounded_channel();
        let refuse = Arc::new(AtomicBool::new(false));
        let refusing = Arc::clone(&refuse);
        let listener = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sender = sender.clone();
                let refusing = Arc::clone(&refusing);
                tokio::spawn(async move {
                    let mut seen = None;
                    // The callback's type, large error included, is tungstenite's.
                    #[allow(clippy::result_large_err)]
                    let callback = |request: &Request, mut response: Response| {
                        if refusing.load(Ordering::SeqCst) {
                            let mut refusal = ErrorResponse::new(Some("token expired".into()));
                            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                            return Err(refusal);
                        }
                        if let Some(protocol) = request.headers().get("sec-websocket-protocol") {
                            response
                                .headers_mut()
                                .insert("sec-websocket-protocol", protocol.clone());
                        }
                        seen = Some((request.uri().to_string(), request.headers().clone()));
                        Ok(response)
                    };
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                        let (uri, headers): (String, HeaderMap) = seen.expect("handshake seen");
                        let codec = headers
                            .get("sec-websocket-protocol")
                            .and_then(|value| value.to_str().ok())
                            .and_then(Codec::from_protocol)
                            .unwrap_or(Codec::Json);
                        let _ = sender.send(Peer {
                            ws,
                            uri,
                            headers,
                            codec,
                        });
                    }
                });
            }
        });
        TestServer {
            url,
            accepted,
            listener,
            refuse,
        }
    }

    async fn accept(&mut self) -> Peer {
        within(self.accepted.recv()).await.expect("listener alive")
    }

    /// Connects a client, playing the welcome as session `session`.
    async fn connect(&mut self, options: ConnectOptions, session: &str) -> (Client, Peer) {
        let url = self.url.clone();
        let (client, peer) = tokio::join!(Client::connect(&url, options), async {
            let mut peer = self.accept().await;
            peer.welcome(session, 25_000).await;
            peer
        });
        let client = client.expect("connected");
        assert_eq!(
            event(&client).await,
            Event::Connected {
                session: session.into(),
                node: "n1".into()
            }
        );
        (client, peer)
    }
}

impl Peer {
    async fn send(&mut self, frame: ServerFrame) {
        let message = match self.codec.encode(&frame).expect("encodable") {
            Encoded::Text(text) => Message::Text(text.into()),
            Encoded::Binary(bytes) => Message::Binary(bytes.into()),
        };
        within(self.ws.send(message)).await.expect("server send");
    }

    async fn welcome(&mut self, session: &str, heartbeat_ms: u64) {
        self.send(ServerFrame::Welcome {
            session: session.into(),
            user: "alice".into(),
            node: "n1".into(),
            protocol: self.codec.protocol().into(),
            heartbeat_ms,
            inbox: Default::default(),
            transport: None,
            session_key: None,
        })
        .await;
    }

    /// The next data or close message, skipping keepalive pings.
    async fn recv_message(&mut self) -> Message {
        loop {
            match within(self.ws.next()).await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => return message,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    async fn recv(&mut self) -> ClientFrame {
        let decoded = match self.recv_message().await {
            Message::Text(text) if self.codec.is_text() => {
                self.codec.decode_client(text.as_bytes())
            }
            Message::Binary(bytes) if !self.codec.is_text() => self.codec.decode_client(&bytes),
            other => panic!("expected a {:?} frame, got {other:?}", self.codec),
        };
        decoded.expect("client frame")
    }

    async fn reply(&mut self, reply: Reply) {
        self.send(ServerFrame::Reply(reply)).await;
    }

    async fn message(&mut self, room: &str, offset: u64, epoch: &str) {
        self.send(ServerFrame::Message(Arc::new(RoomMessage {
            room: room.into(),
            data: json!({"n": offset}),
            offset,
            epoch: epoch.into(),
            from: None,
        })))
        .await;
    }

    /// Closes like a real server: close frame, the client's answer, then the TCP connection.
    async fn close(mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        within(self.ws.close(Some(frame))).await.expect("close");
        while let Some(Ok(_)) = within(self.ws.next()).await {}
    }
}

async fn event(client: &Client) -> Event {
    within(client.next_event())
        .await
        .expect("event stream open")
}

/// The next event other than `Reconnecting`, whose delay is random.
async fn event_after_backoff(client: &Client) -> Event {
    loop {
        match event(client).await {
            Event::Reconnecting { .. } => {}
            other => return other,
        }
    }
}

fn quick_reconnect() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(200),
        try_again_later_delay: Duration::from_millis(50),
        ..ReconnectPolicy::default()
    }
}

fn options() -> ConnectOptions {
    ConnectOptions {
        user: Some("alice".into()),
        reconnect: quick_reconnect(),
        ..ConnectOptions::default()
    }
}

fn subscribed(id: u64, offset: u64, epoch: &str, recovered: Option<bool>) -> Reply {
    Reply {
        id,
        room: Some("chat".into()),
        offset: Some(offset),
        epoch: Some(epoch.into()),
        recovered,
        ..Reply::default()
    }
}

fn request_id(frame: &ClientFrame) -> u64 {
    frame.id().expect("requests carry an id")
}

/// Subscribes the client to "chat" at (offset, epoch).
async fn subscribe_chat(client: &Client, peer: &mut Peer, offset: u64, epoch: &str) {
    let (subscription, ()) = tokio::join!(client.subscribe("chat"), async {
        let frame = peer.recv().await;
        assert!(
            matches!(&frame, ClientFrame::Subscribe { room, since: None, .. } if room == "chat"),
            "{frame:?}"
        );
        peer.reply(subscribed(request_id(&frame), offset, epoch, None))
            .await;
    });
    assert_eq!(
        subscription.expect("subscribed"),
        Subscription {
            offset,
            epoch: epoch.into(),
            recovered: false
        }
    );
}

fn offset_of(event: &Event) -> u64 {
    match event {
        Event::Message(message) => message.offset,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_carries_identity_and_the_welcome_is_exposed() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        token: Some("t0k".into()),
        origin: Some("https://app.example".into()),
        headers: vec![("x-trace".into(), "42".into())],
        ..options()
    };
    let (client, peer) = server.connect(options, "s1").await;
    assert_eq!(peer.uri, "/ws?user=alice");
    assert_eq!(peer.headers["authorization"], "Bearer t0k");
    assert_eq!(
        peer.headers["sec-websocket-protocol"],
        "switchboard.v1.json"
    );
    assert_eq!(peer.headers["origin"], "https://app.example");
    assert_eq!(peer.headers["x-trace"], "42");
    assert_eq!(
        (client.session(), client.user(), client.node()),
        ("s1".into(), "alice".into(), "n1".into())
    );
}

#[tokio::test]
async fn answers_are_matched_by_id_and_errors_are_mapped() {
    let mut server = TestServer::start().await;
    let (client, mut peer) = server.connect(options(), "s1").await;

    // Two requests in flight, answered in the opposite order.
    let (published, sent, ()) = tokio::join!(
        client.publish("chat", json!({"text": "hi"})),
        client.send("bob", json!("psst")),
        async {
            let first = peer.recv().await;
            let second = peer.recv().await;
            let (publish, send) = match (&first, &second) {
                (ClientFrame::Publish { .. }, ClientFrame::Send { .. }) => (first, second),
                (ClientFrame::Send { .. }, ClientFrame::Publish { .. }) => (second, first),
                other => panic!("unexpected frames {other:?}"),
            };
            assert_ne!(request_id(&publish), request_id(&send));
            peer.reply(Reply {
                id: request_id(&send),
                sessions: Some(2),
                ..Reply::default()
            })
            .await;
            peer.reply(Reply {
                id: request_id(&publish),
                offset: Some(17),
                ..Reply::default()
            })
            .await;
        }
    );
    assert_eq!(published.expect("published"), 17);
    assert_eq!(sent.expect("sent"), 2);

    // An error frame with the request's id fails that request.
    let (presence, ()) = tokio::join!(client.presence("vault"), async {
        let frame = peer.recv().await;
        assert!(matches!(frame, ClientFrame::Presence { .. }), "{frame:?}");
        peer.send(ServerFrame::error(
            Some(request_id(&frame)),
            ErrorCode::Forbidden,
            "not your room",
        ))
        .await;
    });
    match presence {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(
                (code, message.as_str()),
                (ErrorCode::Forbidden, "not your room")
            );
        }
        other => panic!("expected a server error, got {other:?}"),
    }

    // History and ping parse their own answers.
    let (history, rtt, ()) = tokio::join!(
        client.history(
            "chat",
            Some(StreamPosition {
                offset: 1,
                epoch: "e1".into()
            }),
            Some(10)
        ),
        client.ping(),
        async {
            for _ in 0..2 {
                match peer.recv().await {
                    ClientFrame::History {
                        id, since, limit, ..
                    } => {
                        assert_eq!(
                            (since.map(|since| since.offset), limit),
                            (Some(1), Some(10))
                        );
                        let message = Arc::new(RoomMessage {
                            room: "chat".into(),
                            data: json!(2),
                            offset: 2,
                            epoch: "e1".into(),
                            from: None,
                        });
                        peer.reply(Reply {
                            id,
                            messages: Some(vec![message]),
                            offset: Some(2),
                            epoch: Some("e1".into()),
                            ..Reply::default()
                        })
                        .await;
                    }
                    ClientFrame::Ping { id } => peer.send(ServerFrame::Pong { id }).await,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    );
    let history = history.expect("history");
    assert_eq!((history.offset, history.messages.len()), (2, 1));
    assert!(rtt.expect("pong") < WAIT);

    // Errors nobody waits for become events.
    peer.send(ServerFrame::error(None, ErrorCode::BadFrame, "what?"))
        .await;
    peer.send(ServerFrame::error(
        Some(9_999),
        ErrorCode::RateLimited,
        "slow down",
    ))
    .await;
    assert!(
        matches!(event(&client).await, Event::Error(error) if error.code == ErrorCode::BadFrame)
    );
    assert!(matches!(event(&client).await, Event::Error(error) if error.id == Some(9_999)));

    // Raw frames go out untouched.
    client
        .send_raw(Message::Text("{garbage".into()))
        .await
        .expect("queued");
    assert_eq!(peer.recv_message().await, Message::Text("{garbage".into()));
}

#[tokio::test]
async fn unanswered_requests_time_out_and_late_answers_are_ignored() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        request_timeout: Duration::from_millis(100),
        ..options()
    };
    let (client, mut peer) = server.connect(options, "s1").await;

    let (pinged, frame) = tokio::join!(client.ping(), peer.recv());
    assert!(matches!(pinged, Err(ClientError::Timeout)), "{pinged:?}");

    // The late answer matches nothing: it is neither an event nor a later request's answer.
    peer.send(ServerFrame::Pong { id: frame.id() }).await;
    peer.send(ServerFrame::error(frame.id(), ErrorCode::Internal, "late"))
        .await;
    let (published, ()) = tokio::join!(client.publish("chat", json!(1)), async {
        let frame = peer.recv().await;
        peer.reply(Reply {
            id: request_id(&frame),
            offset: Some(1),
            ..Reply::default()
        })
        .await;
    });
    assert_eq!(published.expect("published"), 1);
    // The late error has an id nobody waits for any more, so it surfaces as an event.
    assert!(matches!(event(&client).await, Event::Error(error) if error.message == "late"));
}

#[tokio::test]
async fn reconnects_and_resumes_every_room_from_the_last_position() {
    let mut server = TestServer::start().await;
    let (client, mut peer) = server.connect(options(), "s1").await;
    subscribe_chat(&client, &mut peer, 3, "e1").await;

    // A presence-events room, unsubscribed during the outage below.
    let (news, ()) = tokio::join!(
        client.subscribe_with(
            "news",
            SubscribeOptions {
                since: None,
                presence_events: true
            }
        ),
        async {
            let frame = peer.recv().await;
            peer.reply(Reply {
                id: request_id(&frame),
                offset: Some(0),
                epoch: Some("n".into()),
                ..Reply::default()
            })
            .await;
        }
    );
    news.expect("subscribed");

    for offset in [4, 5, 5, 3] {
        peer.message("chat", offset, "e1").await;
    }
    assert_eq!(offset_of(&event(&client).await), 4);
    assert_eq!(offset_of(&event(&client).await), 5);

    // In flight when the node goes away: it fails, it is not silently retried.
    let (in_flight, ()) = tokio::join!(client.publish("chat", json!("lost?")), async {
        assert!(matches!(peer.recv().await, ClientFrame::Publish { .. }));
        peer.close(close::GOING_AWAY, "draining").await;
    });
    assert!(
        matches!(in_flight, Err(ClientError::Disconnected)),
        "{in_flight:?}"
    );
    assert_eq!(
        event(&client).await,
        Event::Disconnected {
            code: Some(close::GOING_AWAY),
            reason: "draining".into()
        }
    );
    assert!(matches!(
        event(&client).await,
        Event::Reconnecting { attempt: 1, .. }
    ));

    // During the outage: unsubscribing is answered locally, a publish is held back.
    client.unsubscribe("news").await.expect("local unsubscribe");
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.publish("chat", json!("after")).await }
    });

    let mut peer = server.accept().await;
    peer.welcome("s2", 25_000).await;
    assert_eq!(
        event_after_backoff(&client).await,
        Event::Connected {
            session: "s2".into(),
            node: "n1".into()
        }
    );
    assert_eq!(client.session(), "s2");

    let resubscribe = peer.recv().await;
    let ClientFrame::Subscribe {
        room,
        id: Some(id),
        since: Some(since),
        presence_events: false,
    } = resubscribe
    else {
        panic!("expected a resubscribe, got {resubscribe:?}");
    };
    assert_eq!(
        (room.as_str(), since),
        (
            "chat",
            StreamPosition {
                offset: 5,
                epoch: "e1".into()
            }
        )
    );
    let ClientFrame::Publish { id: publish_id, .. } = peer.recv().await else {
        panic!("expected the held-back publish");
    };
    peer.reply(subscribed(id, 7, "e1", Some(true))).await;
    // The replay overlaps what the client already has; then live messages follow.
    for offset in [5, 6, 7, 7, 8] {
        peer.message("chat", offset, "e1").await;
    }
    peer.reply(Reply {
        id: publish_id.expect("id"),
        offset: Some(9),
        ..Reply::default()
    })
    .await;

    assert_eq!(
        event(&client).await,
        Event::Resubscribed {
            room: "chat".into(),
            recovered: true
        }
    );
    for expected in [6, 7, 8] {
        assert_eq!(offset_of(&event(&client).await), expected);
    }
    assert_eq!(within(held).await.expect("task").expect("published"), 9);
}

#[tokio::test]
async fn failed_resubscribe_is_reported_and_the_room_dropped() {
    let mut server = TestServer::start().await;
    let (client, mut peer) = server.connect(options(), "s1").await;
    subscribe_chat(&client, &mut peer, 0, "e1").await;
    drop(peer);
    assert!(matches!(
        event(&client).await,
        Event::Disconnected { code: None, .. }
    ));

    let mut peer = server.accept().await;
    peer.welcome("s2", 25_000).await;
    assert!(matches!(
        event_after_backoff(&client).await,
        Event::Connected { .. }
    ));
    let frame = peer.recv().await;
    peer.send(ServerFrame::error(
        frame.id(),
        ErrorCode::Forbidden,
        "token changed",
    ))
    .await;
    match event(&client).await {
        Event::ResubscribeFailed { room, error } => {
            assert_eq!((room.as_str(), error.code), ("chat", ErrorCode::Forbidden));
        }
        other => panic!("expected ResubscribeFailed, got {other:?}"),
    }

    // No longer tracked: the next outage resubscribes nothing, so the first frame after the
    // reconnect is the application's own.
    peer.close(close::INTERNAL, "oops").await;
    let mut peer = server.accept().await;
    peer.welcome("s3", 25_000).await;
    let (pinged, ()) = tokio::join!(client.ping(), async {
        let frame = peer.recv().await;
        assert!(matches!(frame, ClientFrame::Ping { .. }), "{frame:?}");
        peer.send(ServerFrame::Pong { id: frame.id() }).await;
    });
    pinged.expect("pong");
}

#[tokio::test]
async fn policy_close_is_final() {
    let mut server = TestServer::start().await;
    let (client, peer) = server.connect(options(), "s1").await;
    peer.close(close::POLICY, "token expired").await;
    assert_eq!(
        event(&client).await,
        Event::Disconnected {
            code: Some(close::POLICY),
            reason: "token expired".into()
        }
    );
    assert_eq!(event(&client).await, Event::Closed);
    assert_eq!(within(client.next_event()).await, None);
    assert!(matches!(
        client.publish("chat", json!(1)).await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn close_sends_a_normal_close_and_stops() {
    let mut server = TestServer::start().await;
    let (client, mut peer) = server.connect(options(), "s1").await;
    let ((), ()) = tokio::join!(client.close(), async move {
        match peer.recv_message().await {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), close::NORMAL),
            other => panic!("expected a close frame, got {other:?}"),
        }
        // Reading on lets the server complete the close handshake; then it hangs up.
        assert!(within(peer.ws.next()).await.is_none());
    });
    assert!(matches!(
        event(&client).await,
        Event::Disconnected {
            code: Some(close::NORMAL),
            ..
        }
    ));
    assert_eq!(event(&client).await, Event::Closed);
    assert_eq!(within(client.next_event()).await, None);
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
    // Closing twice is harmless.
    within(client.close()).await;
}

#[tokio::test]
async fn try_again_later_waits_at_least_the_longer_delay() {
    let mut server = TestServer::start().await;
    let (client, peer) = server.connect(options(), "s1").await;
    peer.close(close::TRY_AGAIN_LATER, "overloaded").await;
    assert!(matches!(
        event(&client).await,
        Event::Disconnected {
            code: Some(close::TRY_AGAIN_LATER),
            ..
        }
    ));
    match event(&client).await {
        Event::Reconnecting { attempt: 1, delay } => {
            assert!(
                delay >= quick_reconnect().try_again_later_delay,
                "{delay:?}"
            );
        }
        other => panic!("expected Reconnecting, got {other:?}"),
    }
    let mut peer = server.accept().await;
    peer.welcome("s2", 25_000).await;
    assert!(matches!(event(&client).await, Event::Connected { .. }));
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        reconnect: ReconnectPolicy {
            max_attempts: Some(2),
            ..quick_reconnect()
        },
        ..options()
    };
    let (client, peer) = server.connect(options, "s1").await;
    server.listener.abort();
    let _ = server.listener.await;
    drop(peer);
    assert!(matches!(event(&client).await, Event::Disconnected { .. }));
    for expected in 1..=2 {
        assert!(matches!(
            event(&client).await,
            Event::Reconnecting { attempt, .. } if attempt == expected
        ));
    }
    assert_eq!(event(&client).await, Event::Closed);
    assert_eq!(within(client.next_event()).await, None);
}

#[tokio::test]
async fn a_silent_connection_is_noticed_and_replaced() {
    let mut server = TestServer::start().await;
    let url = server.url.clone();
    let (client, _silent) = tokio::join!(Client::connect(&url, options()), async {
        let mut peer = server.accept().await;
        // A short heartbeat, then this side never reads again, so pings go unanswered.
        peer.welcome("s1", 50).await;
        peer
    });
    let client = client.expect("connected");
    assert!(matches!(event(&client).await, Event::Connected { .. }));
    match event(&client).await {
        Event::Disconnected { code: None, reason } => assert!(reason.contains("nothing heard")),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let mut peer = server.accept().await;
    peer.welcome("s2", 25_000).await;
    assert_eq!(
        event_after_backoff(&client).await,
        Event::Connected {
            session: "s2".into(),
            node: "n1".into()
        }
    );
}

#[tokio::test]
async fn first_connect_failures_are_reported_not_retried() {
    let mut server = TestServer::start().await;
    let url = server.url.clone();
    let (result, ()) = tokio::join!(Client::connect(&url, options()), async {
        let mut peer = server.accept().await;
        peer.send(ServerFrame::Pong { id: None }).await;
    });
    assert!(
        matches!(result, Err(ClientError::Protocol(_))),
        "{result:?}"
    );

    let (result, ()) = tokio::join!(Client::connect(&url, options()), async {
        let peer = server.accept().await;
        peer.close(close::TRY_AGAIN_LATER, "busy").await;
    });
    assert!(
        matches!(
            result,
            Err(ClientError::ClosedBeforeWelcome {
                code: Some(close::TRY_AGAIN_LATER),
                ..
            })
        ),
        "{result:?}"
    );

    let quick = ConnectOptions {
        request_timeout: Duration::from_millis(100),
        ..options()
    };
    let (result, _peer) = tokio::join!(Client::connect(&url, quick), server.accept());
    assert!(matches!(result, Err(ClientError::Timeout)), "{result:?}");
}

#[tokio::test]
async fn msgpack_codec_speaks_binary_frames() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        codec: Codec::MsgPack,
        ..options()
    };
    let (client, mut peer) = server.connect(options, "s1").await;
    assert_eq!(
        peer.headers["sec-websocket-protocol"],
        "switchboard.v1.msgpack"
    );
    let (published, ()) = tokio::join!(client.publish("chat", json!({"n": [1, 2.5]})), async {
        let frame = peer.recv().await;
        let ClientFrame::Publish { data, id, .. } = frame else {
            panic!("expected a publish, got {frame:?}");
        };
        assert_eq!(data, json!({"n": [1, 2.5]}));
        peer.reply(Reply {
            id: id.expect("id"),
            offset: Some(1),
            ..Reply::default()
        })
        .await;
    });
    assert_eq!(published.expect("published"), 1);
    peer.send(ServerFrame::Broadcast { data: json!("all") })
        .await;
    assert_eq!(
        event(&client).await,
        Event::Broadcast { data: json!("all") }
    );
}

#[tokio::test]
async fn refused_handshakes_report_the_status_and_stop_reconnecting() {
    let mut server = TestServer::start().await;
    server.refuse.store(true, Ordering::SeqCst);
    match Client::connect(&server.url, options()).await {
        Err(ClientError::Refused { status, reason }) => {
            assert_eq!((status, reason.as_str()), (401, "token expired"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    server.refuse.store(false, Ordering::SeqCst);
    let (client, peer) = server.connect(options(), "s1").await;
    server.refuse.store(true, Ordering::SeqCst);
    peer.close(close::INTERNAL, "crash").await;
    assert!(matches!(event(&client).await, Event::Disconnected { .. }));
    assert!(matches!(
        event(&client).await,
        Event::Reconnecting { attempt: 1, .. }
    ));
    // The token will not get better by retrying it.
    assert_eq!(event(&client).await, Event::Closed);
    assert_eq!(within(client.next_event()).await, None);
}

// ---------------------------------------------------------------------------------------------
// Persisted direct messages, acks and retry with a key. The peer speaks these frames as JSON
// values, so the tests check the exact wire fields rather than the types both sides share.

impl Peer {
    async fn send_json(&mut self, frame: serde_json::Value) {
        within(self.ws.send(Message::Text(frame.to_string().into())))
            .await
            .expect("server send");
    }

    async fn recv_json(&mut self) -> serde_json::Value {
        match self.recv_message().await {
            Message::Text(text) => serde_json::from_str(&text).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

impl TestServer {
    /// Accepts the next connection and welcomes it as `session` with an inbox position.
    async fn accept_with_inbox(&mut self, session: &str, inbox: serde_json::Value) -> Peer {
        let mut peer = self.accept().await;
        peer.send_json(json!({
            "type": "welcome", "session": session, "user": "alice", "node": "n1",
            "protocol": "switchboard.v1.json", "heartbeat_ms": 25_000, "inbox": inbox,
        }))
        .await;
        peer
    }
}

fn persisted(seq: u64) -> serde_json::Value {
    json!({"type": "direct", "data": {"n": seq}, "from": {"user": "bob", "session": "b1"}, "seq": seq})
}

fn persisted_event(seq: u64) -> Event {
    Event::PersistedDirect {
        data: json!({"n": seq}),
        from: Some(Sender {
            user: "bob".into(),
            session: "b1".into(),
        }),
        seq,
    }
}

/// Drops the connection like a draining node, and waits for the client to notice.
async fn drop_connection(client: &Client, peer: Peer) {
    peer.close(close::GOING_AWAY, "draining").await;
    assert!(matches!(
        event(client).await,
        Event::Disconnected {
            code: Some(close::GOING_AWAY),
            ..
        }
    ));
}

#[tokio::test]
async fn a_keyed_publish_and_send_dropped_before_the_answer_are_retried_once_with_their_key() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        retry: true,
        ..options()
    };
    let (client, mut peer) = server.connect(options, "s1").await;

    let publish = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .publish_with("chat", json!("once"), PublishOptions::default())
                .await
        }
    });
    let first_publish = peer.recv_json().await;
    let key = first_publish["key"].as_str().expect("a generated key");
    assert!(
        key.len() == 32 && key.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "{key}"
    );
    let send = tokio::spawn({
        let client = client.clone();
        async move {
            let options = SendOptions {
                key: Some("mine-1".into()),
                retry: None,
            };
            client.send_persisted("bob", json!("hi"), options).await
        }
    });
    let first_send = peer.recv_json().await;
    assert_eq!(
        first_send,
        json!({"type": "send", "to": "bob", "data": "hi", "id": first_send["id"], "persist": true, "key": "mine-1"})
    );

    // The server read both; the connection dropped before it answered.
    drop_connection(&client, peer).await;
    assert!(!publish.is_finished() && !send.is_finished());
    let mut peer = server.accept().await;
    peer.welcome("s2", 25_000).await;
    assert!(matches!(
        event_after_backoff(&client).await,
        Event::Connected { .. }
    ));
    // Each is sent again once, in the order first sent, with its id and key.
    assert_eq!(peer.recv_json().await, first_publish);
    assert_eq!(peer.recv_json().await, first_send);
    // The publish had landed the first time; the send had not.
    peer.send_json(json!({"type": "reply", "id": first_publish["id"], "offset": 7, "epoch": "e1", "duplicate": true}))
        .await;
    peer.send_json(json!({"type": "reply", "id": first_send["id"], "sessions": 2, "seq": 5}))
        .await;
    assert_eq!(
        within(publish).await.expect("task").expect("published"),
        Published {
            offset: 7,
            epoch: "e1".into(),
            duplicate: true
        }
    );
    assert_eq!(
        within(send).await.expect("task").expect("sent"),
        Sent {
            sessions: 2,
            seq: 5,
            duplicate: false
        }
    );

    // Without retry (the default), a drop fails the request as before.
    let (plain, ()) = tokio::join!(
        client.publish_with(
            "chat",
            json!(1),
            PublishOptions {
                key: Some("k".into()),
                retry: Some(false)
            }
        ),
        async {
            assert_eq!(peer.recv_json().await["key"], "k");
            drop_connection(&client, peer).await;
        }
    );
    assert!(matches!(plain, Err(ClientError::Disconnected)), "{plain:?}");
}

#[tokio::test]
async fn the_inbox_after_welcome_is_handed_out_once_and_auto_acked_one_at_a_time() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        auto_ack: true,
        ..options()
    };
    let url = server.url.clone();
    let (client, mut peer) = tokio::join!(Client::connect(&url, options), async {
        server
            .accept_with_inbox("s1", json!({"seq": 3, "acked": 1, "epoch": "i1"}))
            .await
    });
    let client = client.expect("connected");
    assert!(matches!(event(&client).await, Event::Connected { .. }));
    let position = |seq, acked, epoch: &str| InboxPosition {
        seq,
        acked,
        epoch: epoch.into(),
    };
    assert_eq!(client.inbox(), Some(position(3, 1, "i1")));

    // The two unacknowledged, a live one, a plain direct, a repeat.
    for frame in [persisted(2), persisted(3), persisted(4)] {
        peer.send_json(frame).await;
    }
    peer.send_json(json!({"type": "direct", "data": "plain"}))
        .await;
    peer.send_json(persisted(3)).await;
    // Each is acknowledged once the test asks for the event after it: it is done with it.
    for seq in [2, 3, 4] {
        assert_eq!(event(&client).await, persisted_event(seq));
    }
    assert_eq!(
        event(&client).await,
        Event::Direct {
            data: json!("plain"),
            from: None
        }
    );
    // One ack in flight: the next frame after it is the ping, not another ack.
    let ack = peer.recv_json().await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(2))
    );
    let (pinged, ()) = tokio::join!(client.ping(), async {
        let ping = peer.recv_json().await;
        assert_eq!(ping["type"], "ping", "{ping}");
        peer.send_json(json!({"type": "pong", "id": ping["id"]}))
            .await;
    });
    pinged.expect("pong");
    peer.send_json(json!({"type": "reply", "id": ack["id"]}))
        .await;
    // 3 and 4 go as one.
    let ack = peer.recv_json().await;
    assert_eq!(ack["seq"], 4, "{ack}");
    assert_eq!(client.inbox(), Some(position(4, 2, "i1")));

    // Dropped before that ack's answer: the server still holds 3 and 4.
    drop_connection(&client, peer).await;
    let mut peer = server
        .accept_with_inbox("s2", json!({"seq": 4, "acked": 2, "epoch": "i1"}))
        .await;
    assert!(matches!(
        event_after_backoff(&client).await,
        Event::Connected { .. }
    ));
    let ack = peer.recv_json().await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("ack"), Some(4))
    );
    peer.send_json(persisted(3)).await;
    peer.send_json(persisted(4)).await;
    peer.send_json(json!({"type": "reply", "id": ack["id"]}))
        .await;
    peer.send_json(json!({"type": "direct", "data": "marker"}))
        .await;
    // The redelivered ones were handed out already.
    assert_eq!(
        event(&client).await,
        Event::Direct {
            data: json!("marker"),
            from: None
        }
    );
    assert_eq!(client.inbox(), Some(position(4, 4, "i1")));

    // Not acknowledged while the application has not asked for the next event.
    peer.send_json(persisted(5)).await;
    assert_eq!(event(&client).await, persisted_event(5));
    let (pinged, ()) = tokio::join!(client.ping(), async {
        let ping = peer.recv_json().await;
        assert_eq!(ping["type"], "ping", "{ping}");
        peer.send_json(json!({"type": "pong", "id": ping["id"]}))
            .await;
    });
    pinged.expect("pong");
    // An ack the server refuses is an error event.
    let (refused, ()) = tokio::join!(event(&client), async {
        let ack = peer.recv_json().await;
        assert_eq!(ack["seq"], 5, "{ack}");
        peer.send_json(json!({"type": "error", "id": ack["id"], "code": "bad_frame", "message": "ack 5 beyond seq 4"}))
            .await;
    });
    assert!(
        matches!(
            refused,
            Event::Error(ErrorFrame {
                code: ErrorCode::BadFrame,
                ..
            })
        ),
        "{refused:?}"
    );

    // A new epoch starts over from its own acked.
    drop_connection(&client, peer).await;
    let mut peer = server
        .accept_with_inbox("s3", json!({"seq": 1, "acked": 0, "epoch": "i2"}))
        .await;
    assert!(matches!(
        event_after_backoff(&client).await,
        Event::Connected { .. }
    ));
    peer.send_json(persisted(1)).await;
    assert_eq!(event(&client).await, persisted_event(1));
    let (marker, ()) = tokio::join!(event(&client), async {
        let ack = peer.recv_json().await;
        assert_eq!(
            (ack["type"].as_str(), ack["seq"].as_u64()),
            (Some("ack"), Some(1))
        );
        peer.send_json(json!({"type": "direct", "data": "end"}))
            .await;
    });
    assert_eq!(
        marker,
        Event::Direct {
            data: json!("end"),
            from: None
        }
    );
}

#[tokio::test]
async fn manual_ack_and_bad_keys() {
    let mut server = TestServer::start().await;
    let (client, mut peer) = server.connect(options(), "s1").await;

    let (acked, ()) = tokio::join!(client.ack(5), async {
        let ack = peer.recv_json().await;
        assert_eq!(ack, json!({"type": "ack", "seq": 5, "id": ack["id"]}));
        peer.send_json(json!({"type": "reply", "id": ack["id"]}))
            .await;
    });
    acked.expect("acked");
    let (refused, ()) = tokio::join!(client.ack(9), async {
        let ack = peer.recv_json().await;
        peer.send_json(json!({"type": "error", "id": ack["id"], "code": "bad_frame", "message": "ack 9 beyond seq 5"}))
            .await;
    });
    assert!(
        matches!(&refused, Err(ClientError::Server { code: ErrorCode::BadFrame, message }) if message.contains("9")),
        "{refused:?}"
    );

    for key in [String::new(), "k".repeat(MAX_KEY_BYTES + 1)] {
        let options = PublishOptions {
            key: Some(key),
            retry: None,
        };
        let result = client.publish_with("chat", json!(1), options).await;
        assert!(
            matches!(result, Err(ClientError::InvalidRequest(_))),
            "{result:?}"
        );
    }
    // Neither was sent: the next frame is this plain publish, without a key.
    let (published, ()) = tokio::join!(
        client.publish_with("chat", json!(2), PublishOptions::default()),
        async {
            let publish = peer.recv_json().await;
            assert_eq!(
                publish,
                json!({"type": "publish", "room": "chat", "data": 2, "id": publish["id"]})
            );
            peer.send_json(
                json!({"type": "reply", "id": publish["id"], "offset": 3, "epoch": "e"}),
            )
            .await;
        }
    );
    assert_eq!(
        published.expect("published"),
        Published {
            offset: 3,
            epoch: "e".into(),
            duplicate: false
        }
    );
}

#[tokio::test]
async fn a_retried_request_gives_up_after_the_retry_window_and_is_not_sent_again() {
    let mut server = TestServer::start().await;
    let options = ConnectOptions {
        retry: true,
        retry_window: Duration::from_millis(300),
        ..options()
    };
    let (client, mut peer) = server.connect(options, "s1").await;
    let (result, ()) = tokio::join!(
        client.publish_with("chat", json!(1), PublishOptions::default()),
        async {
            assert_eq!(peer.recv_json().await["type"], "publish");
            drop_connection(&client, peer).await;
            // The next node takes the connection but stays silent past the window.
            let mut peer = server.accept().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            peer.welcome("s2", 25_000).await;
            let (pinged, ()) = tokio::join!(client.ping(), async {
                let next = peer.recv_json().await;
                assert_eq!(next["type"], "ping", "given up, so not re-sent: {next}");
                peer.send_json(json!({"type": "pong", "id": next["id"]}))
                    .await;
            });
            pinged.expect("pong");
        }
    );
    assert!(matches!(result, Err(ClientError::Timeout)), "{result:?}");
}
