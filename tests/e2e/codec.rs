//! The codecs against hostile frames, end to end: MessagePack nested deeper than JSON allows, or
//! declaring far more elements than the frame holds, is answered with `error bad_frame`, leaves the
//! connection open, and does not make the node reserve memory; both codecs accept the same depth,
//! so whatever one client may publish, a client of the other codec can read, in history too.

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::client::{expect_ping_pong, publish_frame, subscribe_frame};
use switchboard_e2e::memory::process_memory;
use switchboard_e2e::{NodeProcess, RawClient};
use switchboard_protocol::msgpack::MAX_DATA_DEPTH;
use switchboard_protocol::{ClientFrame, Codec, ErrorCode, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

/// A MessagePack `publish` frame (map of `type`, `room`, `id`, `data`) whose `data` is `data`.
fn msgpack_publish(id: u8, data: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x84, 0xa4];
    frame.extend_from_slice(b"type");
    frame.push(0xa7);
    frame.extend_from_slice(b"publish");
    frame.push(0xa4);
    frame.extend_from_slice(b"room");
    frame.extend_from_slice(&[0xa1, b'r', 0xa2, b'i', b'd', id, 0xa4]);
    frame.extend_from_slice(b"data");
    frame.extend_from_slice(data);
    frame
}

/// `levels` arrays, each holding the next, the innermost empty.
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!([]), |inner, _| json!([inner]))
}

async fn expect_bad_frame(client: &mut RawClient, needle: &str) -> Result<()> {
    match client.next_frame().await? {
        ServerFrame::Error(error) if error.code == ErrorCode::BadFrame => {
            ensure!(error.message.contains(needle), "message: {}", error.message);
            Ok(())
        }
        other => bail!("expected error bad_frame ({needle}), got {other:?}"),
    }
}

#[tokio::test]
async fn hostile_msgpack_frames_are_bad_frames_and_reserve_no_memory() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let (mut client, _) = RawClient::connect(&url, Codec::MsgPack).await?;
    expect_ping_pong(&mut client, 1).await?;
    let peak_before = process_memory(&node, "VmPeak")?;
    let rss_before = process_memory(&node, "VmHWM")?;

    // 1000 nested arrays, each declaring 2^32 - 1 elements: 5 KB, far under the message limit.
    // rmp-serde would reserve up to 1 MiB per level (about 1 GiB) before finding the frame short.
    let huge = msgpack_publish(2, &[0xdd, 0xff, 0xff, 0xff, 0xff].repeat(1000));
    // One map declaring 2^32 - 1 entries, and a string declaring 4 GiB.
    let wide = msgpack_publish(3, &[0xdf, 0xff, 0xff, 0xff, 0xff, 0x90]);
    let long = msgpack_publish(4, &[0xdb, 0xff, 0xff, 0xff, 0xff, b'x']);
    // Nested 1000 deep, every level complete: rmp-serde alone would accept up to 1022.
    let deep = msgpack_publish(5, &[[0x91].repeat(999), vec![0x90]].concat());
    for (frame, needle) in [
        (&huge, "declares 4294967295 items"),
        (&wide, "declares 8589934590 items"),
        (&long, "needs 4294967295 bytes"),
        (&deep, "deeper than 127"),
    ] {
        client
            .send_message(Message::Binary(frame.clone().into()))
            .await?;
        expect_bad_frame(&mut client, needle).await?;
    }
    expect_ping_pong(&mut client, 6).await?;

    let peak_growth = process_memory(&node, "VmPeak")?.saturating_sub(peak_before);
    let rss_growth = process_memory(&node, "VmHWM")?.saturating_sub(rss_before);
    ensure!(
        peak_growth < 64 << 20,
        "virtual memory peak grew by {} MiB",
        peak_growth >> 20
    );
    ensure!(
        rss_growth < 32 << 20,
        "peak RSS grew by {} MiB",
        rss_growth >> 20
    );
    Ok(())
}

#[tokio::test]
async fn both_codecs_accept_the_same_depth_and_forward_it() -> Result<()> {
    let node = NodeProcess::start(&[]).await?;
    let url = node.ws_url();
    let (mut reader, _) = RawClient::connect(&url, Codec::Json).await?;
    reader.send_frame(&subscribe_frame("deep", 1, None)).await?;
    ensure!(matches!(reader.next_frame().await?, ServerFrame::Reply(reply) if reply.id == 1));

    // As deep as a `history` reply (three levels around `data`) can carry, and no deeper.
    let deepest = nested(MAX_DATA_DEPTH);
    for codec in Codec::ALL {
        let (mut writer, _) = RawClient::connect(&url, codec).await?;
        writer
            .send_frame(&publish_frame("deep", nested(MAX_DATA_DEPTH + 1), 2))
            .await?;
        match writer.next_frame().await? {
            ServerFrame::Error(error) if error.code == ErrorCode::BadFrame => {}
            other => bail!("{codec:?}: expected bad_frame for data too deep, got {other:?}"),
        }
        writer
            .send_frame(&publish_frame("deep", deepest.clone(), 3))
            .await?;
        match writer.next_frame().await? {
            ServerFrame::Reply(reply) if reply.id == 3 => {}
            other => bail!("{codec:?}: expected the publish reply, got {other:?}"),
        }
        // The JSON reader (serde_json, as the Rust SDK) decodes what either codec published.
        match reader.next_frame().await? {
            ServerFrame::Message(message) if message.data == deepest => {}
            other => bail!("{codec:?}: expected the deep message, got {other:?}"),
        }
    }
    reader
        .send_frame(&ClientFrame::History {
            room: "deep".into(),
            id: 4,
            since: None,
            limit: Some(10),
        })
        .await?;
    match reader.next_frame().await? {
        ServerFrame::Reply(reply) if reply.id == 4 => {
            let messages = reply.messages.unwrap_or_default();
            ensure!(
                messages.len() == Codec::ALL.len()
                    && messages.iter().all(|message| message.data == deepest),
                "history: {} messages",
                messages.len()
            );
        }
        other => bail!("expected the history reply, got {other:?}"),
    }
    Ok(())
}
