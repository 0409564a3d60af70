//! The `switchboard.v1.json+deflate` codec end to end: the handshake picks it, a room fan-out
//! reaches its subscribers compressed (large frames) or stored (small ones), compressed once for
//! all of them, decoding to what a JSON subscriber gets; clients may send compressed, stored or
//! text frames; a decompression bomb is closed with 1009 before it is inflated, corrupt data is
//! `error bad_frame`, and the node keeps serving everyone else. The Rust SDK speaks it too.

use std::io::Write;

use anyhow::{Context, Result, bail, ensure};
use flate2::Compression;
use flate2::write::DeflateEncoder;
use serde_json::{Value, json};
use switchboard_client::{Client, ConnectOptions, Event};
use switchboard_e2e::client::{expect_ping_pong, publish, publish_frame, subscribe};
use switchboard_e2e::memory::process_memory;
use switchboard_e2e::{DEADLINE, Handshake, NodeProcess, RawClient, raw_handshake};
use switchboard_protocol::deflate::{DEFLATED, STORED};
use switchboard_protocol::{Codec, Encoded, ErrorCode, JSON_DEFLATE_PROTOCOL, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

const COMPRESSED: &str = r#"switchboard_deflate_frames_total{result="compressed"}"#;

/// A market-data message of about 1 KiB of JSON.
fn market_data() -> Value {
    let quotes: Vec<Value> = (0..16)
        .map(|n| json!({"symbol": format!("SYM{n}"), "bid": 101.25 + f64::from(n), "ask": 101.5 + f64::from(n), "volume": 3000 + n}))
        .collect();
    json!({"feed": "equities", "quotes": quotes})
}

fn deflated(flag_and: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(vec![DEFLATED], Compression::best());
    encoder.write_all(flag_and).expect("writing to a Vec");
    encoder.finish().expect("writing to a Vec")
}

/// The next message must be binary in the deflate format with `flag`; returns it decoded.
async fn expect_deflate_frame(client: &mut RawClient, flag: u8) -> Result<ServerFrame> {
    match client.next_message().await? {
        Message::Binary(bytes) => {
            ensure!(
                bytes.first() == Some(&flag),
                "flag {:?}, expected {flag}",
                bytes.first()
            );
            Codec::JsonDeflate.decode(&bytes).map_err(Into::into)
        }
        other => bail!("expected a binary deflate frame, got {other:?}"),
    }
}

async fn deflate_client(node: &NodeProcess) -> Result<RawClient> {
    Ok(RawClient::connect(&node.ws_url(), Codec::JsonDeflate)
        .await?
        .0)
}

#[tokio::test]
async fn a_fan_out_is_compressed_once_and_reads_as_the_json_subscribers_frame() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let Handshake::Open(first, response) =
        raw_handshake(&node.ws_url(), Some(JSON_DEFLATE_PROTOCOL), &[]).await?
    else {
        bail!("the deflate handshake was refused");
    };
    let chosen = response.headers().get("sec-websocket-protocol");
    ensure!(
        chosen.is_some_and(|value| value == JSON_DEFLATE_PROTOCOL),
        "chosen subprotocol: {chosen:?}"
    );
    let mut subscribers = vec![*first];
    match expect_deflate_frame(&mut subscribers[0], STORED).await? {
        ServerFrame::Welcome { protocol, .. } if protocol == JSON_DEFLATE_PROTOCOL => {}
        other => bail!("expected the welcome, got {other:?}"),
    }
    for _ in 0..3 {
        subscribers.push(deflate_client(&node).await?);
    }
    for (n, client) in subscribers.iter_mut().enumerate() {
        subscribe(client, "quotes", n as u64 + 1).await?;
    }
    let (mut json_subscriber, _) = RawClient::connect(&node.ws_url(), Codec::Json).await?;
    subscribe(&mut json_subscriber, "quotes", 1).await?;
    let (mut publisher, _) = RawClient::connect(&node.ws_url(), Codec::Json).await?;
    let compressed_before = node.metric(COMPRESSED).await?;

    let data = market_data();
    let json_len = serde_json::to_vec(&data)?.len();
    ensure!(
        (900..2048).contains(&json_len),
        "payload of {json_len} bytes"
    );
    publish(&mut publisher, "quotes", data, 1).await?;
    let expected = json_subscriber.next_frame().await?;
    ensure!(matches!(expected, ServerFrame::Message(_)), "{expected:?}");
    let Message::Binary(first_bytes) = subscribers[0].next_message().await? else {
        bail!("the first deflate subscriber got a non-binary frame");
    };
    ensure!(first_bytes[0] == DEFLATED, "flag {}", first_bytes[0]);
    let plain = serde_json::to_vec(&expected)?;
    ensure!(
        first_bytes.len() * 2 < plain.len(),
        "{} compressed bytes for {} of JSON",
        first_bytes.len(),
        plain.len()
    );
    ensure!(Codec::JsonDeflate.decode::<ServerFrame>(&first_bytes)? == expected);
    for client in &mut subscribers[1..] {
        ensure!(expect_deflate_frame(client, DEFLATED).await? == expected);
    }
    // One compression for the four subscribers: no other frame of this test is large enough.
    let compressed = node.metric(COMPRESSED).await? - compressed_before;
    ensure!(
        compressed == 1.0,
        "{compressed} frames compressed for one fan-out"
    );

    publish(&mut publisher, "quotes", json!({"bid": 1}), 2).await?;
    let expected = json_subscriber.next_frame().await?;
    for client in &mut subscribers {
        ensure!(expect_deflate_frame(client, STORED).await? == expected);
    }
    Ok(())
}

#[tokio::test]
async fn compressed_stored_and_text_client_frames_are_all_understood() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut reader = deflate_client(&node).await?;
    subscribe(&mut reader, "chat", 1).await?;
    let mut writer = deflate_client(&node).await?;

    // The harness encodes with the codec: a ~1 KiB publish goes compressed.
    let frame = publish_frame("chat", market_data(), 2);
    let Encoded::Binary(bytes) = Codec::JsonDeflate.encode(&frame)? else {
        bail!("deflate frames are binary");
    };
    ensure!(bytes[0] == DEFLATED, "the publish went stored");
    writer.send_message(Message::Binary(bytes.into())).await?;
    match writer.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == 2 => {}
        other => bail!("expected the publish reply, got {other:?}"),
    }
    match expect_deflate_frame(&mut reader, DEFLATED).await? {
        ServerFrame::Message(message) if message.data == market_data() => {}
        other => bail!("expected the market data, got {other:?}"),
    }

    // A plain JSON text frame and a stored binary frame.
    writer
        .send_message(Message::Text(r#"{"type":"ping","id":3}"#.into()))
        .await?;
    ensure!(matches!(
        writer.next_frame().await?,
        ServerFrame::Pong { id: Some(3) }
    ));
    let mut stored = vec![STORED];
    stored.extend_from_slice(br#"{"type":"ping","id":4}"#);
    writer.send_message(Message::Binary(stored.into())).await?;
    ensure!(matches!(
        writer.next_frame().await?,
        ServerFrame::Pong { id: Some(4) }
    ));
    // Compressed although small: the flag, not the size, says how to read it.
    writer
        .send_message(Message::Binary(
            deflated(br#"{"type":"ping","id":5}"#).into(),
        ))
        .await?;
    ensure!(matches!(
        writer.next_frame().await?,
        ServerFrame::Pong { id: Some(5) }
    ));
    Ok(())
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_with_1009_before_it_is_inflated() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let mut bystander = deflate_client(&node).await?;
    let mut attacker = deflate_client(&node).await?;
    expect_ping_pong(&mut attacker, 1).await?;
    let high_water = process_memory(&node, "VmHWM")?;

    // A publish of 10 MiB of zeros (ten times the default 1 MiB limit) in about 10 KiB.
    let mut json = br#"{"type":"publish","room":"r","id":2,"data":""#.to_vec();
    json.resize(json.len() + (10 << 20), b'0');
    json.extend_from_slice(br#""}"#);
    let bomb = deflated(&json);
    ensure!(bomb.len() < 64 << 10, "bomb of {} bytes", bomb.len());
    attacker.send_message(Message::Binary(bomb.into())).await?;
    let close = attacker.expect_close().await?.context("a close frame")?;
    ensure!(u16::from(close.code) == 1009, "closed with {close:?}");

    expect_ping_pong(&mut bystander, 3).await?;
    let grown = process_memory(&node, "VmHWM")?.saturating_sub(high_water);
    // Inflating all of it would touch 10 MiB; the bounded reader stops past the 1 MiB limit.
    ensure!(grown < 6 << 20, "the node's peak RSS grew by {grown} bytes");
    let closes = node
        .wait_metric(r#"switchboard_closes_total{code="1009"}"#, 1.0)
        .await?;
    ensure!(closes == 1.0, "{closes} closes with 1009");
    Ok(())
}

#[tokio::test]
async fn corrupt_data_and_unknown_flags_are_bad_frames_counted_toward_the_limit() -> Result<()> {
    let node = NodeProcess::start(&["--max-bad-frames", "3"]).await?;
    let mut client = deflate_client(&node).await?;
    let full = match Codec::JsonDeflate.encode(&publish_frame("r", market_data(), 9))? {
        Encoded::Binary(bytes) => bytes,
        Encoded::Text(_) => bail!("deflate frames are binary"),
    };
    let bad: [(Vec<u8>, &str); 3] = [
        (vec![DEFLATED, 0xff, 0xff, 0xff], "corrupt deflate data"),
        (full[..full.len() / 2].to_vec(), "corrupt deflate data"),
        (b"\x07{\"type\":\"ping\"}".to_vec(), "unknown flag byte 7"),
    ];
    for (n, (frame, needle)) in bad.into_iter().enumerate() {
        client.send_message(Message::Binary(frame.into())).await?;
        match client.next_frame().await? {
            ServerFrame::Error(error) if error.code == ErrorCode::BadFrame => {
                ensure!(error.message.contains(needle), "{n}: {}", error.message);
            }
            other => bail!("{n}: expected bad_frame ({needle}), got {other:?}"),
        }
        expect_ping_pong(&mut client, n as u64 + 10).await?;
    }
    client
        .send_message(Message::Binary(vec![DEFLATED, 0xfe].into()))
        .await?;
    let close = client.expect_close().await?.context("a close frame")?;
    ensure!(u16::from(close.code) == 1008, "closed with {close:?}");
    Ok(())
}

#[tokio::test]
async fn the_rust_client_speaks_the_deflate_codec() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let options = |user: &str| ConnectOptions {
        user: Some(user.to_owned()),
        codec: Codec::JsonDeflate,
        ..ConnectOptions::default()
    };
    let reader = Client::connect(&node.ws_url(), options("reader")).await?;
    let writer = Client::connect(&node.ws_url(), options("writer")).await?;
    reader.subscribe("quotes").await?;
    let compressed_before = node.metric(COMPRESSED).await?;
    writer.publish("quotes", market_data()).await?;
    writer.publish("quotes", json!({"bid": 1})).await?;
    for expected in [market_data(), json!({"bid": 1})] {
        loop {
            match tokio::time::timeout(DEADLINE, reader.next_event()).await? {
                Some(Event::Connected { .. }) => {}
                Some(Event::Message(message)) => {
                    ensure!(message.data == expected, "{message:?}");
                    break;
                }
                other => bail!("expected {expected}, got {other:?}"),
            }
        }
    }
    let compressed = node.metric(COMPRESSED).await? - compressed_before;
    ensure!(compressed == 1.0, "{compressed} frames compressed");
    Ok(())
}
