//! Feature tests: every test starts its own `switchboard` process and talks to it over real
//! sockets, with the Rust SDK, raw WebSocket frames and the server API on the internal port.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::FutureExt;
use serde_json::{Value, json};
use switchboard_client::{
    Client, ClientError, ConnectOptions, ErrorCode, Event, PresenceNotice, ReconnectPolicy,
    RoomMessage, Sender, StreamPosition, SubscribeOptions,
};
use switchboard_e2e::api::{api_get, api_post, api_publish};
use switchboard_e2e::client::{
    error_of, expect_reply, position, publish_frame, request, subscribe_frame,
};
use switchboard_e2e::{DEADLINE, NodeProcess, RawClient, wait_until};
use switchboard_protocol::api::{
    ApiError, BroadcastResponse, DisconnectRequest, DisconnectResponse, NodesResponse,
    PresenceResponse, PublishRequest, PublishResponse, SendRequest, SendResponse,
};
use switchboard_protocol::{ClientFrame, Codec, Reply, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

const ROOM_DELIVERIES: &str = r#"switchboard_deliveries_total{kind="room"}"#;
const QUEUE_WAITS: &str = "switchboard_queue_wait_seconds_count";
const MESSAGE_FRAMES_OUT: &str = r#"switchboard_frames_out_total{type="message"}"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn connect(node: &NodeProcess, user: &str, codec: Codec) -> Result<Client> {
    let options = ConnectOptions {
        user: Some(user.to_owned()),
        codec,
        ..ConnectOptions::default()
    };
    Ok(Client::connect(&node.ws_url(), options).await?)
}

/// A raw client for `user`; returns it with its session id.
async fn raw(node: &NodeProcess, user: &str, codec: Codec) -> Result<(RawClient, String)> {
    let url = format!("{}?user={user}", node.ws_url());
    let (client, welcome) = RawClient::connect(&url, codec).await?;
    let ServerFrame::Welcome {
        session,
        user: welcomed,
        ..
    } = welcome
    else {
        bail!("not a welcome: {welcome:?}");
    };
    ensure!(welcomed == user, "welcome for {welcomed}, expected {user}");
    Ok((client, session))
}

/// The next event that is not the `Connected` of the first connection, within [`DEADLINE`].
async fn next(client: &Client) -> Result<Event> {
    loop {
        let event = tokio::time::timeout(DEADLINE, client.next_event())
            .await
            .context("no event in time")?
            .context("event stream ended")?;
        if !matches!(event, Event::Connected { .. }) {
            return Ok(event);
        }
    }
}

/// The next event, which must be a room message.
async fn next_message(client: &Client) -> Result<Arc<RoomMessage>> {
    match next(client).await? {
        Event::Message(message) => Ok(message),
        other => bail!("expected a message, got {other:?}"),
    }
}

/// Asserts that nothing but lifecycle noise is waiting for `client`. A ping round trip is the
/// barrier: the server writes everything already queued for the session before it answers, and
/// the SDK emits events in the order the frames arrived, before it resolves the ping.
async fn assert_quiet(client: &Client, who: &str) -> Result<()> {
    client.ping().await?;
    while let Some(event) = client.next_event().now_or_never() {
        match event {
            Some(Event::Connected { .. }) => {}
            other => bail!("{who} should have received nothing, got {other:?}"),
        }
    }
    Ok(())
}

/// The next frame on a raw client, which must be a binary (MessagePack) frame.
async fn next_binary(client: &mut RawClient) -> Result<ServerFrame> {
    match client.next_message().await? {
        Message::Binary(bytes) => Codec::MsgPack
            .decode(&bytes)
            .map_err(|error| anyhow::anyhow!(error)),
        other => bail!("expected a binary frame, got {other:?}"),
    }
}

fn expect_room_message(frame: ServerFrame) -> Result<Arc<RoomMessage>> {
    match frame {
        ServerFrame::Message(message) => Ok(message),
        other => bail!("expected a message, got {other:?}"),
    }
}

fn sender(client: &Client) -> Option<Sender> {
    Some(Sender {
        user: client.user(),
        session: client.session(),
    })
}

/// The (user, session) pairs of a member list, sorted.
fn members_of(members: &[switchboard_client::Member]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = members
        .iter()
        .map(|member| (member.user.clone(), member.session.clone()))
        .collect();
    pairs.sort();
    pairs
}

fn pairs(clients: &[&Client]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = clients
        .iter()
        .map(|client| (client.user(), client.session()))
        .collect();
    pairs.sort();
    pairs
}

// ---------------------------------------------------------------------------------------------
// 1. JSON and MessagePack clients in one room
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_and_msgpack_clients_see_the_same_messages() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let alice = connect(&node, "alice", Codec::Json).await?;
    let bob = connect(&node, "bob", Codec::MsgPack).await?;
    let carol = connect(&node, "carol", Codec::Json).await?; // never subscribes
    let dave = connect(&node, "dave", Codec::MsgPack).await?; // publishes without subscribing
    let (mut erin, _) = raw(&node, "erin", Codec::MsgPack).await?; // raw MessagePack subscriber

    let first = alice.subscribe("lobby").await?;
    assert_eq!((first.offset, first.recovered), (0, false));
    let second = bob.subscribe("lobby").await?;
    // The room has no state yet, so no stored epoch: only the offset is the same.
    assert_eq!((second.offset, second.recovered), (0, false));
    erin.send_frame(&subscribe_frame("lobby", 1, None)).await?;
    let reply = expect_reply(next_binary(&mut erin).await?)?;
    assert_eq!(reply.id, 1);
    assert_eq!(reply.room.as_deref(), Some("lobby"));
    assert_eq!(reply.offset, Some(0));
    assert!(reply.epoch.is_some());

    let payloads = [
        (
            &alice,
            json!({"text": "héllo ✓", "n": [1, -2, 2.5, null, true], "nested": {"k": "v"}}),
        ),
        (&bob, json!({"big": u64::MAX, "neg": i64::MIN, "s": ""})),
        (&dave, json!(["from", "dave", 3])),
    ];
    // Every message carries the epoch the first publish made.
    let mut epoch = None;
    for (index, (publisher, data)) in payloads.iter().enumerate() {
        let expected_offset = index as u64 + 1;
        let offset = publisher.publish("lobby", data.clone()).await?;
        assert_eq!(offset, expected_offset);
        let at_alice = next_message(&alice).await?;
        let expected = RoomMessage {
            room: "lobby".into(),
            data: data.clone(),
            offset: expected_offset,
            epoch: epoch.get_or_insert_with(|| at_alice.epoch.clone()).clone(),
            from: sender(publisher),
        };
        let at_bob = next_message(&bob).await?;
        assert_eq!(*at_alice, expected, "alice (json)");
        assert_eq!(*at_bob, expected, "bob (msgpack)");
        let at_erin = expect_room_message(next_binary(&mut erin).await?)?;
        assert_eq!(*at_erin, expected, "erin (raw msgpack)");
        // Neither the non-subscriber nor the non-subscribed publisher gets a copy.
        assert_quiet(&carol, "carol (not subscribed)").await?;
        assert_quiet(&dave, "dave (publisher, not subscribed)").await?;
    }
    assert_quiet(&alice, "alice").await?;
    assert_quiet(&bob, "bob").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Directed send
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_reaches_every_session_of_the_user() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let alice = connect(&node, "alice", Codec::Json).await?;
    let bob_json = connect(&node, "bob", Codec::Json).await?;
    let bob_msgpack = connect(&node, "bob", Codec::MsgPack).await?;
    let carol = connect(&node, "carol", Codec::Json).await?;
    assert_ne!(bob_json.session(), bob_msgpack.session());
    assert_eq!(bob_json.user(), "bob");
    assert_eq!(bob_msgpack.user(), "bob");

    let data = json!({"secret": 42, "list": [1.5, "x"]});
    assert_eq!(alice.send("bob", data.clone()).await?, 2);
    let expected = Event::Direct {
        data: data.clone(),
        from: sender(&alice),
    };
    assert_eq!(next(&bob_json).await?, expected);
    assert_eq!(next(&bob_msgpack).await?, expected);
    assert_quiet(&alice, "alice (sender)").await?;
    assert_quiet(&carol, "carol (bystander)").await?;

    // The other way round: one session, `from` names bob's msgpack session.
    assert_eq!(bob_msgpack.send("alice", json!("hi")).await?, 1);
    assert_eq!(
        next(&alice).await?,
        Event::Direct {
            data: json!("hi"),
            from: sender(&bob_msgpack),
        }
    );

    assert_eq!(alice.send("nobody-home", json!(1)).await?, 0);
    for (client, who) in [
        (&alice, "alice"),
        (&bob_json, "bob (json)"),
        (&bob_msgpack, "bob (msgpack)"),
        (&carol, "carol"),
    ] {
        assert_quiet(client, who).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Presence
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_lists_members_and_announces_joins_and_leaves() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let watching = SubscribeOptions {
        since: None,
        presence_events: true,
    };
    let alice = connect(&node, "alice", Codec::Json).await?;
    let bob = connect(&node, "bob", Codec::MsgPack).await?;
    let carol = connect(&node, "carol", Codec::MsgPack).await?;
    let dave = connect(&node, "dave", Codec::Json).await?;

    alice.subscribe_with("stage", watching.clone()).await?;
    // Alice hears nothing about herself.
    assert_quiet(&alice, "alice after her own join").await?;
    assert_eq!(
        members_of(&alice.presence("stage").await?),
        pairs(&[&alice])
    );

    bob.subscribe("stage").await?; // no presence events
    let bob_notice = PresenceNotice {
        room: "stage".into(),
        user: "bob".into(),
        session: bob.session(),
    };
    assert_eq!(next(&alice).await?, Event::Join(bob_notice.clone()));

    carol.subscribe_with("stage", watching.clone()).await?;
    let carol_notice = PresenceNotice {
        room: "stage".into(),
        user: "carol".into(),
        session: carol.session(),
    };
    assert_eq!(next(&alice).await?, Event::Join(carol_notice));
    // Bob did not ask for presence events; carol hears nothing about herself (nor about those
    // who were there before her: `presence` is how she learns them).
    assert_quiet(&bob, "bob (no presence_events)").await?;
    assert_quiet(&carol, "carol after her own join").await?;

    // Everyone may ask, subscribed or not; members carry user and session, no info without auth.
    let members = dave.presence("stage").await?;
    assert_eq!(members_of(&members), pairs(&[&alice, &bob, &carol]));
    assert!(
        members.iter().all(|member| member.info.is_none()),
        "{members:?}"
    );
    assert!(dave.presence("empty-room").await?.is_empty());

    // Leave on unsubscribe.
    bob.unsubscribe("stage").await?;
    assert_eq!(next(&alice).await?, Event::Leave(bob_notice.clone()));
    assert_eq!(next(&carol).await?, Event::Leave(bob_notice));
    assert_quiet(&bob, "bob after unsubscribing").await?;
    assert_eq!(
        members_of(&dave.presence("stage").await?),
        pairs(&[&alice, &carol])
    );

    // Leave on disconnect.
    let carol_notice = PresenceNotice {
        room: "stage".into(),
        user: "carol".into(),
        session: carol.session(),
    };
    carol.close().await;
    assert_eq!(next(&alice).await?, Event::Leave(carol_notice));
    assert_eq!(members_of(&dave.presence("stage").await?), pairs(&[&alice]));

    // Alice leaving hears nothing about herself; dave (not subscribed) never heard a thing.
    alice.unsubscribe("stage").await?;
    assert_quiet(&alice, "alice after her own leave").await?;
    assert_quiet(&dave, "dave (not subscribed)").await?;
    assert!(dave.presence("stage").await?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. History
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_returns_the_newest_or_the_later_messages() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let alice = connect(&node, "alice", Codec::Json).await?;
    let bob = connect(&node, "bob", Codec::MsgPack).await?;

    // A room nothing was published to: offset 0, nothing stored.
    let empty = alice.history("archive", None, None).await?;
    assert_eq!((empty.offset, empty.messages.len()), (0, 0));

    // Reading the empty room stored no epoch: the first publish makes the room's own.
    let mut epoch = None;
    for n in 1..=10u64 {
        let data = json!({"n": n});
        if n % 2 == 0 {
            let published = api_publish(&node, "archive", data).await?;
            assert_eq!(published.offset, n);
            assert_eq!(
                epoch.get_or_insert_with(|| published.epoch.clone()),
                &published.epoch
            );
        } else {
            assert_eq!(bob.publish("archive", data).await?, n);
        }
    }
    let epoch = epoch.context("an epoch")?;
    let offsets = |messages: &[Arc<RoomMessage>]| -> Vec<u64> {
        messages.iter().map(|message| message.offset).collect()
    };
    let check = |messages: &[Arc<RoomMessage>]| {
        for message in messages {
            assert_eq!(message.room, "archive");
            assert_eq!(message.epoch, epoch);
            assert_eq!(message.data, json!({"n": message.offset}));
            if message.offset % 2 == 0 {
                assert_eq!(message.from, None, "published by the API");
            } else {
                assert_eq!(message.from, sender(&bob), "published by bob");
            }
        }
    };

    for client in [&alice, &bob] {
        let all = client.history("archive", None, None).await?;
        assert_eq!((all.offset, &all.epoch), (10, &epoch));
        assert_eq!(offsets(&all.messages), (1..=10).collect::<Vec<_>>());
        check(&all.messages);

        let newest = client.history("archive", None, Some(3)).await?;
        assert_eq!((newest.offset, &newest.epoch), (10, &epoch));
        assert_eq!(offsets(&newest.messages), [8, 9, 10]);
        check(&newest.messages);

        let later = client
            .history("archive", Some(position(6, &epoch)), None)
            .await?;
        assert_eq!((later.offset, &later.epoch), (10, &epoch));
        assert_eq!(offsets(&later.messages), [7, 8, 9, 10]);
        check(&later.messages);

        let later_limited = client
            .history("archive", Some(position(6, &epoch)), Some(2))
            .await?;
        assert_eq!(offsets(&later_limited.messages), [7, 8]);
        assert_eq!(later_limited.offset, 10);

        let none_after = client
            .history("archive", Some(position(10, &epoch)), None)
            .await?;
        assert!(none_after.messages.is_empty());
        assert_eq!(none_after.offset, 10);
    }

    // The subscribe reply agrees with history about the room's position.
    let subscription = alice.subscribe("archive").await?;
    assert_eq!((subscription.offset, &subscription.epoch), (10, &epoch));
    // History is not a subscription: reading it delivered nothing.
    assert_quiet(&alice, "alice").await?;
    assert_quiet(&bob, "bob").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. `since` recovery
// ---------------------------------------------------------------------------------------------

/// Publishes through the API, as fast as it can, `count` messages tagged `{"p": publisher, "i": i}`;
/// records which offset each got in `published` and counts them in `progress`.
fn spawn_publisher(
    http: reqwest::Client,
    url: String,
    publisher: u64,
    count: u64,
    published: Arc<Mutex<HashMap<u64, Value>>>,
    progress: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut last = 0;
        for i in 0..count {
            let data = json!({"p": publisher, "i": i});
            let body = PublishRequest {
                room: SEAM_ROOM.to_owned(),
                data: data.clone(),
                key: None,
            };
            let response = http.post(&url).json(&body).send().await?;
            ensure!(response.status() == 200, "publish: {}", response.status());
            let answer: PublishResponse = response.json().await?;
            ensure!(answer.offset > last, "offsets of one publisher grow");
            last = answer.offset;
            let previous = published.lock().expect("lock").insert(answer.offset, data);
            ensure!(previous.is_none(), "offset {} given twice", answer.offset);
            progress.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    })
}

const SEAM_ROOM: &str = "feed";

/// Subscribes with `since: {5, epoch}` once `progress` reaches `threshold`, then reads every
/// message up to `last`. Returns the reply's offset and the messages read.
async fn resume_during_publishing(
    mut client: RawClient,
    epoch: String,
    threshold: u64,
    progress: Arc<AtomicU64>,
    last: u64,
) -> Result<(u64, Vec<Arc<RoomMessage>>)> {
    wait_until("the publishers to make progress", || {
        let progress = progress.clone();
        async move { progress.load(Ordering::SeqCst) >= threshold }
    })
    .await?;
    client
        .send_frame(&subscribe_frame(SEAM_ROOM, 77, Some(position(5, &epoch))))
        .await?;
    // The reply first …
    let reply = expect_reply(client.next_frame().await?)?;
    ensure!(reply.id == 77, "{reply:?}");
    ensure!(reply.room.as_deref() == Some(SEAM_ROOM), "{reply:?}");
    ensure!(reply.epoch.as_deref() == Some(epoch.as_str()), "{reply:?}");
    ensure!(reply.recovered == Some(true), "not recovered: {reply:?}");
    let latest = reply.offset.context("reply without offset")?;
    // … then every message after 5, missed and live, each once and in order.
    let mut messages = Vec::new();
    for expected in 6..=last {
        let message = expect_room_message(client.next_frame().await?)
            .with_context(|| format!("waiting for offset {expected} (reply at {latest})"))?;
        ensure!(
            message.offset == expected && message.epoch == epoch,
            "expected offset {expected}, got {} of epoch {} (reply at {latest})",
            message.offset,
            message.epoch
        );
        messages.push(message);
    }
    // Nothing more.
    let pong = request(&mut client, ClientFrame::Ping { id: Some(5) }).await?;
    ensure!(
        pong == ServerFrame::Pong { id: Some(5) },
        "after {last}: {pong:?}"
    );
    Ok((latest, messages))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn since_recovery_delivers_every_missed_message_once_at_the_seam() -> Result<()> {
    const PUBLISHERS: u64 = 8;
    const PER_PUBLISHER: u64 = 250;
    const RESUMERS: u64 = 64;
    const LAST: u64 = 15 + PUBLISHERS * PER_PUBLISHER;
    // History must hold everything from offset 6 on, or recovery is (rightly) refused.
    let node = NodeProcess::start(&["--history-size", "5000"]).await?;
    let http = reqwest::Client::new();

    // A first client sees 1..=5, then goes away.
    let first = connect(&node, "reader", Codec::Json).await?;
    assert_eq!(first.subscribe(SEAM_ROOM).await?.offset, 0);
    // The room's epoch is made by its first publish.
    let mut epoch = None;
    let published = Arc::new(Mutex::new(HashMap::new()));
    for n in 1..=5u64 {
        let answer = api_publish(&node, SEAM_ROOM, json!({"n": n})).await?;
        assert_eq!(answer.offset, n);
        assert_eq!(
            epoch.get_or_insert_with(|| answer.epoch.clone()),
            &answer.epoch
        );
        published.lock().expect("lock").insert(n, json!({"n": n}));
    }
    let epoch = epoch.context("an epoch")?;
    for n in 1..=5u64 {
        let message = next_message(&first).await?;
        assert_eq!((message.offset, &message.data), (n, &json!({"n": n})));
    }
    first.close().await;

    // Missed while away.
    for n in 6..=15u64 {
        api_publish(&node, SEAM_ROOM, json!({"n": n})).await?;
        published.lock().expect("lock").insert(n, json!({"n": n}));
    }

    // New clients resume from offset 5 at different moments while several publishers go on.
    let mut resumers = Vec::new();
    for index in 0..RESUMERS {
        let codec = if index % 2 == 0 {
            Codec::Json
        } else {
            Codec::MsgPack
        };
        let (client, _) = raw(&node, &format!("resumer-{index}"), codec).await?;
        resumers.push(client);
    }
    let progress = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|publisher| {
            spawn_publisher(
                http.clone(),
                node.http_url("/api/publish"),
                publisher,
                PER_PUBLISHER,
                published.clone(),
                progress.clone(),
            )
        })
        .collect();
    let readers: Vec<_> = resumers
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            let threshold = index as u64 * PUBLISHERS * PER_PUBLISHER / RESUMERS;
            tokio::spawn(resume_during_publishing(
                client,
                epoch.clone(),
                threshold,
                progress.clone(),
                LAST,
            ))
        })
        .collect();
    for publisher in publishers {
        publisher.await??;
    }
    let published = published.lock().expect("lock").clone();
    assert_eq!(published.len() as u64, LAST);
    let mut replies = Vec::new();
    for (index, reader) in readers.into_iter().enumerate() {
        let (latest, messages) = reader.await?.with_context(|| format!("resumer {index}"))?;
        replies.push(latest);
        for message in messages {
            assert_eq!(Some(&message.data), published.get(&message.offset));
            assert_eq!(message.from, None);
        }
    }
    eprintln!("resubscribe replies were at offsets {replies:?}");
    // Most resumes must have raced the publishers, or the seam went untested.
    let raced = replies.iter().filter(|latest| **latest < LAST).count();
    assert!(
        raced >= RESUMERS as usize / 2,
        "only {raced} resumes raced the publishers"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_resubscribes_and_recovers_after_a_server_disconnect() -> Result<()> {
    const ROOM: &str = "ticker";
    let node = NodeProcess::start(&[]).await?;
    let options = ConnectOptions {
        user: Some("rita".into()),
        codec: Codec::MsgPack,
        reconnect: ReconnectPolicy {
            initial_delay: Duration::from_millis(800),
            jitter: false,
            ..ReconnectPolicy::default()
        },
        ..ConnectOptions::default()
    };
    let client = Client::connect(&node.ws_url(), options).await?;
    let first_session = client.session();
    assert_eq!(
        next_connected(&client).await?,
        (first_session.clone(), node.node_id.clone())
    );
    assert_eq!(client.subscribe(ROOM).await?.offset, 0);
    // The room's epoch is made by its first publish.
    let mut epoch = String::new();
    for n in 1..=3u64 {
        api_publish(&node, ROOM, json!({"n": n})).await?;
        let message = next_message(&client).await?;
        assert_eq!((message.offset, &message.data), (n, &json!({"n": n})));
        epoch.clone_from(&message.epoch);
    }

    let disconnect = DisconnectRequest {
        user: "rita".into(),
        code: Some(3000),
        reason: Some("kicked for a test".into()),
    };
    let answer: DisconnectResponse = api_post(&node, "/api/disconnect", &disconnect).await?;
    assert_eq!(answer.sessions, 1);
    assert_eq!(
        next(&client).await?,
        Event::Disconnected {
            code: Some(3000),
            reason: "kicked for a test".into()
        }
    );
    // Published during the outage (the client waits 800 ms before reconnecting).
    for n in 4..=8u64 {
        api_publish(&node, ROOM, json!({"n": n})).await?;
    }
    assert_eq!(
        next(&client).await?,
        Event::Reconnecting {
            attempt: 1,
            delay: Duration::from_millis(800)
        }
    );
    let (session, node_id) = next_connected(&client).await?;
    assert_ne!(session, first_session, "a new session after the reconnect");
    assert_eq!(node_id, node.node_id);
    assert_eq!(client.session(), session);
    assert_eq!(
        next(&client).await?,
        Event::Resubscribed {
            room: ROOM.into(),
            recovered: true
        }
    );
    for n in 4..=8u64 {
        let message = next_message(&client).await?;
        assert_eq!(message.offset, n);
        assert_eq!(message.epoch, epoch);
        assert_eq!(message.data, json!({"n": n}));
    }
    api_publish(&node, ROOM, json!({"n": 9})).await?;
    assert_eq!(next_message(&client).await?.offset, 9);
    assert_quiet(&client, "rita").await?;
    Ok(())
}

/// The next event, which must be `Connected`; returns (session, node).
async fn next_connected(client: &Client) -> Result<(String, String)> {
    let event = tokio::time::timeout(DEADLINE, client.next_event())
        .await
        .context("no event in time")?
        .context("event stream ended")?;
    match event {
        Event::Connected { session, node } => Ok((session, node)),
        other => bail!("expected Connected, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 6. `recovered: false`
// ---------------------------------------------------------------------------------------------

/// Subscribes a raw client with `since`; returns the reply and asserts that the frames after it
/// are exactly `expected` messages (checked with a ping barrier).
async fn resume(
    node: &NodeProcess,
    user: &str,
    since: StreamPosition,
    expected: &[u64],
) -> Result<(RawClient, Reply)> {
    let (mut client, _) = raw(node, user, Codec::Json).await?;
    let reply =
        expect_reply(request(&mut client, subscribe_frame("short", 3, Some(since))).await?)?;
    assert_eq!(reply.id, 3);
    for offset in expected {
        let message = expect_room_message(client.next_frame().await?)?;
        assert_eq!(message.offset, *offset, "{user}");
        assert_eq!(message.data, json!({"n": offset}));
    }
    let pong = request(&mut client, ClientFrame::Ping { id: Some(4) }).await?;
    assert_eq!(
        pong,
        ServerFrame::Pong { id: Some(4) },
        "{user}: nothing else"
    );
    Ok((client, reply))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_fails_for_a_too_old_offset_or_a_wrong_epoch() -> Result<()> {
    let node = NodeProcess::start(&["--history-size", "5"]).await?;
    let mut epoch = String::new();
    for n in 1..=20u64 {
        let published = api_publish(&node, "short", json!({"n": n})).await?;
        assert_eq!(published.offset, n);
        epoch = published.epoch;
    }

    // Offset 1 is long gone: recovered false, nothing replayed, live messages still flow.
    let (mut old, reply) = resume(&node, "old", position(1, &epoch), &[]).await?;
    assert_eq!(reply.recovered, Some(false));
    assert_eq!(reply.offset, Some(20));
    assert_eq!(reply.epoch.as_deref(), Some(epoch.as_str()));
    api_publish(&node, "short", json!({"n": 21})).await?;
    assert_eq!(expect_room_message(old.next_frame().await?)?.offset, 21);

    // A wrong epoch: recovered false, nothing replayed, the reply carries the real epoch.
    let (_, reply) = resume(&node, "stranger", position(18, "not-the-epoch"), &[]).await?;
    assert_eq!(reply.recovered, Some(false));
    assert_eq!(reply.offset, Some(21));
    assert_eq!(reply.epoch.as_deref(), Some(epoch.as_str()));

    // History holds 17..=21: just old enough from 16, one too few from 15.
    let (_, reply) = resume(&node, "edge", position(16, &epoch), &[17, 18, 19, 20, 21]).await?;
    assert_eq!(reply.recovered, Some(true));
    assert_eq!(reply.offset, Some(21));
    let (_, reply) = resume(&node, "beyond", position(15, &epoch), &[]).await?;
    assert_eq!(reply.recovered, Some(false));

    // Up to date: recovered, nothing to replay.
    let (_, reply) = resume(&node, "current", position(21, &epoch), &[]).await?;
    assert_eq!(reply.recovered, Some(true));

    let client = connect(&node, "reader", Codec::Json).await?;
    let history = client.history("short", None, None).await?;
    let offsets: Vec<u64> = history.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [17, 18, 19, 20, 21]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_fails_once_history_expired() -> Result<()> {
    let node = NodeProcess::start(&["--history-ttl-secs", "1"]).await?;
    let client = connect(&node, "reader", Codec::Json).await?;
    let mut epoch = String::new();
    for n in 1..=3u64 {
        epoch = api_publish(&node, "brief", json!({"n": n})).await?.epoch;
    }
    assert_eq!(client.history("brief", None, None).await?.messages.len(), 3);
    wait_until("history to expire", || {
        let client = client.clone();
        async move {
            client
                .history("brief", None, None)
                .await
                .is_ok_and(|history| history.messages.is_empty() && history.offset == 3)
        }
    })
    .await?;
    let options = SubscribeOptions {
        since: Some(position(1, &epoch)),
        presence_events: false,
    };
    let subscription = client.subscribe_with("brief", options).await?;
    assert_eq!(
        subscription,
        switchboard_client::Subscription {
            offset: 3,
            epoch,
            recovered: false
        }
    );
    assert_quiet(&client, "reader").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Server API
// ---------------------------------------------------------------------------------------------

/// Waits until `GET /api/nodes` lists this node, and only it, with `connections` sessions.
async fn wait_node_connections(node: &NodeProcess, connections: u64) -> Result<()> {
    let result = wait_until(&format!("/api/nodes to report {connections}"), || async {
        api_get::<NodesResponse>(node, "/api/nodes")
            .await
            .is_ok_and(|answer| {
                answer.nodes.len() == 1 && answer.nodes[0].connections == connections
            })
    })
    .await;
    if result.is_err() {
        // The node heartbeats every 5 s; DEADLINE (10 s) covers two of them.
        let answer: NodesResponse = api_get(node, "/api/nodes").await?;
        bail!("/api/nodes never reported {connections} connections: {answer:?}");
    }
    let answer: NodesResponse = api_get(node, "/api/nodes").await?;
    let [info] = answer.nodes.as_slice() else {
        bail!("expected one node: {answer:?}");
    };
    assert_eq!(info.id, node.node_id);
    assert_eq!(info.address, node.public.to_string());
    assert!(
        info.started_at > 0 && info.started_at <= info.last_seen,
        "{info:?}"
    );
    Ok(())
}

async fn expect_api_error(response: reqwest::Response, status: u16, code: &str) -> Result<()> {
    let actual = response.status().as_u16();
    let text = response.text().await?;
    ensure!(
        actual == status,
        "expected {status} {code}, got {actual}: {text}"
    );
    let error: ApiError =
        serde_json::from_str(&text).with_context(|| format!("not an API error: {text}"))?;
    ensure!(error.code == code, "expected code {code}, got {error:?}");
    ensure!(!error.message.is_empty(), "empty message: {error:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_api_publishes_sends_broadcasts_and_disconnects() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let http = reqwest::Client::new();
    let alice = connect(&node, "alice", Codec::Json).await?;
    let bob = connect(&node, "bob", Codec::MsgPack).await?;
    let carol = connect(&node, "carol", Codec::Json).await?; // subscribes to nothing
    assert_eq!(alice.subscribe("news").await?.offset, 0);
    bob.subscribe("news").await?;

    // Publish: subscribers get it without `from`.
    let data = json!({"headline": "switchboard ships", "tags": ["rust", 1]});
    let published = api_publish(&node, "news", data.clone()).await?;
    assert_eq!(published.offset, 1);
    let expected = RoomMessage {
        room: "news".into(),
        data,
        offset: 1,
        epoch: published.epoch.clone(),
        from: None,
    };
    assert_eq!(*next_message(&alice).await?, expected);
    assert_eq!(*next_message(&bob).await?, expected);
    assert_quiet(&carol, "carol (not subscribed)").await?;

    // Send: `direct` without `from`.
    let send = SendRequest {
        user: "bob".into(),
        data: json!({"dm": true}),
        persist: false,
        key: None,
    };
    let answer: SendResponse = api_post(&node, "/api/send", &send).await?;
    assert_eq!(answer.sessions, 1);
    assert_eq!(
        next(&bob).await?,
        Event::Direct {
            data: json!({"dm": true}),
            from: None
        }
    );
    let nobody = SendRequest {
        user: "nobody".into(),
        data: json!(null),
        persist: false,
        key: None,
    };
    let answer: SendResponse = api_post(&node, "/api/send", &nobody).await?;
    assert_eq!(answer.sessions, 0);
    assert_quiet(&alice, "alice (send was for bob)").await?;

    // Broadcast: every session, subscribed or not.
    let answer: BroadcastResponse = api_post(
        &node,
        "/api/broadcast",
        &json!({"data": {"notice": "maintenance"}}),
    )
    .await?;
    assert_eq!(answer.nodes, 1);
    for client in [&alice, &bob, &carol] {
        assert_eq!(
            next(client).await?,
            Event::Broadcast {
                data: json!({"notice": "maintenance"})
            }
        );
    }

    // Presence over the API.
    let members: PresenceResponse = api_get(&node, "/api/presence/news").await?;
    assert_eq!(members_of(&members.members), pairs(&[&alice, &bob]));
    let members: PresenceResponse = api_get(&node, "/api/presence/quiet-room").await?;
    assert!(members.members.is_empty());

    // Nodes: this node with its connection count (refreshed by a 5 s heartbeat).
    let (mut dan_one, _) = raw(&node, "dan", Codec::Json).await?;
    let (mut dan_two, _) = raw(&node, "dan", Codec::MsgPack).await?;
    let (mut erin, _) = raw(&node, "erin", Codec::Json).await?;
    wait_node_connections(&node, 6).await?;

    // Disconnect: every session of the user, with the given code and reason.
    let request = DisconnectRequest {
        user: "dan".into(),
        code: Some(4000),
        reason: Some("bye dan".into()),
    };
    let answer: DisconnectResponse = api_post(&node, "/api/disconnect", &request).await?;
    assert_eq!(answer.sessions, 2);
    for client in [&mut dan_one, &mut dan_two] {
        let frame = client.expect_close().await?.context("no close frame")?;
        assert_eq!(u16::from(frame.code), 4000);
        assert_eq!(frame.reason.as_str(), "bye dan");
    }
    // Without a code: a normal close.
    let request = DisconnectRequest {
        user: "erin".into(),
        code: None,
        reason: None,
    };
    let answer: DisconnectResponse = api_post(&node, "/api/disconnect", &request).await?;
    assert_eq!(answer.sessions, 1);
    let frame = erin.expect_close().await?.context("no close frame")?;
    assert_eq!(u16::from(frame.code), 1000);
    let request = DisconnectRequest {
        user: "nobody".into(),
        code: Some(4001),
        reason: None,
    };
    let answer: DisconnectResponse = api_post(&node, "/api/disconnect", &request).await?;
    assert_eq!(answer.sessions, 0);
    // Only 1000, 1008 and 3000-4999 may be asked for.
    let response = http
        .post(node.http_url("/api/disconnect"))
        .json(&json!({"user": "alice", "code": 1001}))
        .send()
        .await?;
    expect_api_error(response, 400, "bad_request").await?;
    assert_quiet(&alice, "alice (not disconnected)").await?;

    wait_until("switchboard_connections to drop to 3", || async {
        node.metric("switchboard_connections")
            .await
            .is_ok_and(|value| value == 3.0)
    })
    .await?;
    wait_node_connections(&node, 3).await?;

    // Probes and metrics.
    for path in ["/healthz", "/readyz"] {
        let response = http.get(node.http_url(path)).send().await?;
        assert_eq!(response.status(), 200, "{path}");
    }
    let metrics = http.get(node.http_url("/metrics")).send().await?;
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await?;
    assert!(text.contains("switchboard_connections 3"), "{text}");

    // Bad requests: invalid JSON, a missing field, a bad room; unknown paths.
    let response = http
        .post(node.http_url("/api/publish"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    expect_api_error(response, 400, "bad_request").await?;
    let response = http
        .post(node.http_url("/api/publish"))
        .json(&json!({"room": "news"}))
        .send()
        .await?;
    expect_api_error(response, 400, "bad_request").await?;
    let response = http
        .post(node.http_url("/api/publish"))
        .json(&json!({"room": "", "data": 1}))
        .send()
        .await?;
    expect_api_error(response, 400, "bad_request").await?;
    let response = http
        .post(node.http_url("/api/send"))
        .json(&json!({"user": "", "data": 1}))
        .send()
        .await?;
    expect_api_error(response, 400, "bad_request").await?;
    let response = http.get(node.http_url("/api/nope")).send().await?;
    expect_api_error(response, 404, "not_found").await?;
    // None of the rejected publishes happened.
    assert_quiet(&alice, "alice after rejected publishes").await?;
    assert_eq!(alice.history("news", None, None).await?.offset, 1);

    // The API is not served on the public port.
    let response = http
        .get(format!("http://{}/api/nodes", node.public))
        .send()
        .await?;
    assert_eq!(response.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_key_guards_the_api_but_not_the_probes() -> Result<()> {
    const KEY: &str = "s3cret-key";
    let node = NodeProcess::start(&["--api-key", KEY]).await?;
    let http = reqwest::Client::new();
    let watcher = connect(&node, "watcher", Codec::Json).await?;
    watcher.subscribe("guarded").await?;

    let calls: Vec<(&str, &str, Option<Value>)> = vec![
        (
            "POST",
            "/api/publish",
            Some(json!({"room": "guarded", "data": 1})),
        ),
        (
            "POST",
            "/api/send",
            Some(json!({"user": "watcher", "data": 2})),
        ),
        ("POST", "/api/broadcast", Some(json!({"data": 3}))),
        ("POST", "/api/disconnect", Some(json!({"user": "nobody"}))),
        ("GET", "/api/presence/guarded", None),
        ("GET", "/api/nodes", None),
    ];
    let build = |method: &str, path: &str, body: &Option<Value>| {
        let builder = match method {
            "POST" => http.post(node.http_url(path)),
            _ => http.get(node.http_url(path)),
        };
        match body {
            Some(body) => builder.json(body),
            None => builder,
        }
    };
    let wrong = [
        None,
        Some("Bearer wrong-key!"),
        Some("Bearer s3cret-kez"),
        Some("Bearer s3cret-key-longer"),
        Some("Bearer "),
        Some("Basic s3cret-key"),
        Some("s3cret-key"),
    ];
    for (method, path, body) in &calls {
        for authorization in wrong {
            let mut builder = build(method, path, body);
            if let Some(value) = authorization {
                builder = builder.header("authorization", value);
            }
            let response = builder.send().await?;
            expect_api_error(response, 401, "unauthorized")
                .await
                .with_context(|| format!("{method} {path} with {authorization:?}"))?;
        }
    }
    // Nothing the refused calls asked for happened.
    assert_quiet(&watcher, "watcher after refused calls").await?;

    for (method, path, body) in &calls {
        let response = build(method, path, body).bearer_auth(KEY).send().await?;
        let status = response.status();
        let text = response.text().await?;
        assert_eq!(status, 200, "{method} {path}: {text}");
        let _: Value = serde_json::from_str(&text)?;
    }
    // The authorized calls did happen: a message at offset 1, a direct, a broadcast.
    let message = next_message(&watcher).await?;
    assert_eq!((message.offset, &message.data), (1, &json!(1)));
    assert_eq!(
        next(&watcher).await?,
        Event::Direct {
            data: json!(2),
            from: None
        }
    );
    assert_eq!(next(&watcher).await?, Event::Broadcast { data: json!(3) });

    // Probes and metrics stay open, with or without a (wrong) key.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = http.get(node.http_url(path)).send().await?;
        assert_eq!(response.status(), 200, "{path} without a key");
        let response = http
            .get(node.http_url(path))
            .bearer_auth("wrong")
            .send()
            .await?;
        assert_eq!(response.status(), 200, "{path} with a wrong key");
    }
    let metrics = http
        .get(node.http_url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("switchboard_connections"), "{metrics}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Ping and request ids
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ping_pongs_and_request_ids_are_echoed() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    for codec in [Codec::Json, Codec::MsgPack] {
        let user = format!("ider-{}", codec.index());
        let (mut client, session) = raw(&node, &user, codec).await?;
        let other_room = format!("elsewhere-{}", codec.index());

        for id in [Some(42), None, Some(0), Some(u64::MAX)] {
            let pong = request(&mut client, ClientFrame::Ping { id }).await?;
            assert_eq!(pong, ServerFrame::Pong { id }, "{codec:?}");
        }

        let frame = request(
            &mut client,
            ClientFrame::Unsubscribe {
                room: "here".into(),
                id: Some(7),
            },
        )
        .await?;
        error_of(frame, Some(7), ErrorCode::NotSubscribed)?;

        let reply = expect_reply(request(&mut client, subscribe_frame("here", 8, None)).await?)?;
        assert_eq!((reply.id, reply.room.as_deref()), (8, Some("here")));
        assert_eq!(reply.offset, Some(0));
        assert!(reply.epoch.is_some());

        let frame = request(&mut client, subscribe_frame("here", 9, None)).await?;
        error_of(frame, Some(9), ErrorCode::AlreadySubscribed)?;

        let reply =
            expect_reply(request(&mut client, publish_frame(&other_room, json!("x"), 10)).await?)?;
        assert_eq!((reply.id, reply.offset), (10, Some(1)));

        let reply = expect_reply(
            request(
                &mut client,
                ClientFrame::Send {
                    to: "nobody".into(),
                    data: json!(1),
                    id: Some(11),
                    persist: false,
                    key: None,
                },
            )
            .await?,
        )?;
        assert_eq!((reply.id, reply.sessions), (11, Some(0)));

        let reply = expect_reply(
            request(
                &mut client,
                ClientFrame::Presence {
                    room: "here".into(),
                    id: 12,
                },
            )
            .await?,
        )?;
        assert_eq!(reply.id, 12);
        let members = reply.members.context("presence without members")?;
        assert_eq!(members.len(), 1, "{members:?}");
        assert_eq!((&members[0].user, &members[0].session), (&user, &session));

        let reply = expect_reply(
            request(
                &mut client,
                ClientFrame::History {
                    room: other_room.clone(),
                    id: 13,
                    since: None,
                    limit: Some(10),
                },
            )
            .await?,
        )?;
        assert_eq!((reply.id, reply.offset), (13, Some(1)));
        assert_eq!(reply.messages.map(|messages| messages.len()), Some(1));

        let reply = expect_reply(
            request(
                &mut client,
                ClientFrame::Unsubscribe {
                    room: "here".into(),
                    id: Some(14),
                },
            )
            .await?,
        )?;
        assert_eq!(reply.id, 14);
        let frame = request(
            &mut client,
            ClientFrame::Unsubscribe {
                room: "here".into(),
                id: Some(15),
            },
        )
        .await?;
        error_of(frame, Some(15), ErrorCode::NotSubscribed)?;

        // An unknown type still gets its id back.
        let dance = match codec.encode(&json!({"type": "dance", "id": 16})) {
            Ok(switchboard_protocol::Encoded::Text(text)) => Message::Text(text.into()),
            Ok(switchboard_protocol::Encoded::Binary(bytes)) => Message::Binary(bytes.into()),
            Err(error) => bail!(error),
        };
        client.send_message(dance).await?;
        error_of(client.next_frame().await?, Some(16), ErrorCode::UnknownType)?;

        // A successful request without an id gets no answer: the next frame is the pong of
        // the following ping.
        client
            .send_frame(&ClientFrame::Publish {
                room: other_room.clone(),
                data: json!("no id"),
                id: None,
                key: None,
            })
            .await?;
        client
            .send_frame(&ClientFrame::Subscribe {
                room: "there".into(),
                id: None,
                since: None,
                presence_events: false,
            })
            .await?;
        client
            .send_frame(&ClientFrame::Unsubscribe {
                room: "there".into(),
                id: None,
            })
            .await?;
        let pong = request(&mut client, ClientFrame::Ping { id: Some(17) }).await?;
        assert_eq!(pong, ServerFrame::Pong { id: Some(17) }, "{codec:?}");
        // The publish without an id did happen.
        let reply = expect_reply(
            request(
                &mut client,
                ClientFrame::History {
                    room: other_room,
                    id: 18,
                    since: None,
                    limit: None,
                },
            )
            .await?,
        )?;
        assert_eq!((reply.id, reply.offset), (18, Some(2)));
        // A failed request without an id gets an error without an id.
        client
            .send_frame(&ClientFrame::Unsubscribe {
                room: "there".into(),
                id: None,
            })
            .await?;
        error_of(client.next_frame().await?, None, ErrorCode::NotSubscribed)?;
    }

    // The SDK surfaces the same errors.
    let client = connect(&node, "sdk", Codec::Json).await?;
    client.ping().await?;
    match client.unsubscribe("never").await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::NotSubscribed),
        other => bail!("expected not_subscribed, got {other:?}"),
    }
    client.subscribe("twice").await?;
    match client.subscribe("twice").await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::AlreadySubscribed),
        other => bail!("expected already_subscribed, got {other:?}"),
    }
    assert_quiet(&client, "sdk").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 9. Deliveries are counted once per subscriber
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_are_counted_once_per_subscriber() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let subscribers = [
        connect(&node, "s1", Codec::Json).await?,
        connect(&node, "s2", Codec::Json).await?,
        connect(&node, "s3", Codec::MsgPack).await?,
        connect(&node, "s4", Codec::MsgPack).await?,
    ];
    let outsider = connect(&node, "s1", Codec::MsgPack).await?; // second session of s1
    for subscriber in &subscribers {
        subscriber.subscribe("counted").await?;
    }
    assert_eq!(node.metric(ROOM_DELIVERIES).await?, 0.0);
    assert_eq!(node.metric(MESSAGE_FRAMES_OUT).await?, 0.0);

    for n in 1..=5u64 {
        if n % 2 == 0 {
            outsider.publish("counted", json!({"n": n})).await?;
        } else {
            api_publish(&node, "counted", json!({"n": n})).await?;
        }
    }
    for subscriber in &subscribers {
        for n in 1..=5u64 {
            assert_eq!(next_message(subscriber).await?.offset, n);
        }
    }
    assert_quiet(&outsider, "outsider").await?;
    assert_eq!(node.metric(ROOM_DELIVERIES).await?, 20.0);
    assert_eq!(node.metric(MESSAGE_FRAMES_OUT).await?, 20.0);
    // Every written batch records how long its oldest frame waited: at least one batch per
    // subscriber, at most one per frame.
    wait_until("queue waits recorded", || async {
        node.metric(QUEUE_WAITS)
            .await
            .is_ok_and(|count| count >= 4.0)
    })
    .await?;
    let batches = node.metric(QUEUE_WAITS).await?;
    ensure!(batches <= 20.0, "{batches} batches for 20 frames");
    ensure!(node.metric("switchboard_queue_wait_seconds_sum").await? > 0.0);

    // A room with one subscriber counts one more per message.
    subscribers[0].subscribe("solo").await?;
    api_publish(&node, "solo", json!("one")).await?;
    assert_eq!(next_message(&subscribers[0]).await?.room, "solo");
    assert_eq!(node.metric(ROOM_DELIVERIES).await?, 21.0);

    // Direct and broadcast deliveries are counted per session too.
    assert_eq!(subscribers[1].send("s1", json!("dm")).await?, 2);
    for client in [&subscribers[0], &outsider] {
        assert!(matches!(next(client).await?, Event::Direct { .. }));
    }
    assert_eq!(
        node.metric(r#"switchboard_deliveries_total{kind="direct"}"#)
            .await?,
        2.0
    );
    let answer: BroadcastResponse =
        api_post(&node, "/api/broadcast", &json!({"data": "all"})).await?;
    assert_eq!(answer.nodes, 1);
    for client in subscribers.iter().chain([&outsider]) {
        assert_eq!(next(client).await?, Event::Broadcast { data: json!("all") });
    }
    assert_eq!(
        node.metric(r#"switchboard_deliveries_total{kind="broadcast"}"#)
            .await?,
        5.0
    );
    assert_eq!(node.metric(ROOM_DELIVERIES).await?, 21.0);
    Ok(())
}
