//! switchboard's codecs (`--codec`) as the harness speaks them over a WebSocket, and the bytes
//! each server frame took on the wire. The scenarios read JSON text; a [`CodecSocket`] turns a
//! msgpack or `json+deflate` server frame into that text and a client text frame into the
//! codec's form, so the publishers and subscribers run unchanged over every codec.

use std::io::Read as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::ws::Socket;

/// Largest JSON a `json+deflate` frame may inflate to: far above any frame of a run, so only a
/// broken or hostile server hits it.
const MAX_INFLATED_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Codec {
    /// Text frames of JSON (no `Sec-WebSocket-Protocol`, as before `--codec` existed).
    #[default]
    #[value(name = "json")]
    #[serde(rename = "json")]
    Json,
    /// `switchboard.v1.msgpack`: binary frames of MessagePack, both ways.
    #[value(name = "msgpack")]
    #[serde(rename = "msgpack")]
    Msgpack,
    /// `switchboard.v1.json+deflate`: server frames are binary, a flag byte (0 stored, 1 raw
    /// DEFLATE) then the JSON; client frames stay JSON text.
    #[value(name = "json+deflate")]
    #[serde(rename = "json+deflate")]
    JsonDeflate,
}

impl Codec {
    /// The subprotocol to offer, if any.
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Codec::Json => None,
            Codec::Msgpack => Some("switchboard.v1.msgpack"),
            Codec::JsonDeflate => Some("switchboard.v1.json+deflate"),
        }
    }

    /// The JSON text a server frame holds in this codec (pings, pongs and closes unchanged).
    pub fn decode(self, message: Message) -> Result<Message, WsError> {
        let bytes = match (self, message) {
            (Codec::Json, message) => return Ok(message),
            (_, Message::Binary(bytes)) => bytes,
            (_, message) => return Ok(message),
        };
        let json = match self {
            Codec::Msgpack => {
                let value: serde_json::Value =
                    rmp_serde::from_slice(&bytes).map_err(|error| bad_frame(&error))?;
                value.to_string()
            }
            _ => inflate(&bytes)?,
        };
        Ok(Message::text(json))
    }

    /// A client frame in this codec: msgpack turns JSON text into a binary MessagePack map;
    /// `json+deflate` and JSON send text as is.
    pub fn encode(self, message: Message) -> Result<Message, WsError> {
        match (self, message) {
            (Codec::Msgpack, Message::Text(text)) => {
                let value: serde_json::Value =
                    serde_json::from_str(text.as_str()).map_err(|error| bad_frame(&error))?;
                let bytes = rmp_serde::to_vec_named(&value).map_err(|error| bad_frame(&error))?;
                Ok(Message::binary(bytes))
            }
            (_, message) => Ok(message),
        }
    }
}

/// The JSON of a `json+deflate` server frame: flag byte 0, the JSON stored; 1, raw DEFLATE.
pub fn inflate(frame: &[u8]) -> Result<String, WsError> {
    let (flag, body) = frame
        .split_first()
        .ok_or_else(|| bad_frame(&"an empty json+deflate frame"))?;
    let bytes = match flag {
        0 => body.to_vec(),
        1 => {
            let mut out = Vec::with_capacity(body.len() * 4);
            flate2::read::DeflateDecoder::new(body)
                .take(MAX_INFLATED_BYTES + 1)
                .read_to_end(&mut out)
                .map_err(|error| bad_frame(&error))?;
            if out.len() as u64 > MAX_INFLATED_BYTES {
                return Err(bad_frame(&"a json+deflate frame inflates past 16 MiB"));
            }
            out
        }
        other => return Err(bad_frame(&format!("json+deflate flag byte {other}"))),
    };
    String::from_utf8(bytes).map_err(|error| bad_frame(&error))
}

fn bad_frame(error: &dyn std::fmt::Display) -> WsError {
    WsError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        error.to_string(),
    ))
}

/// The bytes a server frame of `payload` bytes took on the wire: the payload and the header of
/// an unmasked frame (2 bytes, 4 from 126, 10 from 65,536), as if it came in one frame
/// (tungstenite joins fragments before the harness sees them).
pub fn wire_bytes(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    (payload + header) as u64
}

/// A WebSocket that speaks `codec`, counting the wire bytes of the data frames it reads.
pub struct CodecSocket {
    pub socket: Socket,
    pub codec: Codec,
    /// Wire bytes ([`wire_bytes`]) of every text and binary frame read so far.
    pub received_wire_bytes: u64,
}

impl Stream for CodecSocket {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.socket.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(message))) => {
                if let Message::Text(_) | Message::Binary(_) = &message {
                    this.received_wire_bytes += wire_bytes(message.len());
                }
                Poll::Ready(Some(this.codec.decode(message)))
            }
            other => other,
        }
    }
}

impl Sink<Message> for CodecSocket {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().socket.poll_ready_unpin(cx)
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        let message = this.codec.encode(message)?;
        this.socket.start_send_unpin(message)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().socket.poll_flush_unpin(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().socket.poll_close_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn deflated(json: &str) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(vec![1u8], flate2::Compression::default());
        encoder.write_all(json.as_bytes()).expect("deflate");
        encoder.finish().expect("deflate")
    }

    #[test]
    fn json_deflate_frames_decode_stored_and_compressed() {
        let json = r#"{"type":"message","room":"r","offset":7,"data":{"t":1,"p":0,"s":7}}"#;
        let mut stored = vec![0u8];
        stored.extend_from_slice(json.as_bytes());
        for frame in [stored, deflated(json)] {
            let decoded = Codec::JsonDeflate
                .decode(Message::binary(frame))
                .expect("decodes");
            assert_eq!(decoded, Message::text(json));
        }
        // Text frames and control frames pass.
        assert_eq!(
            Codec::JsonDeflate
                .decode(Message::text("x"))
                .expect("passes"),
            Message::text("x")
        );
    }

    #[test]
    fn bad_json_deflate_frames_are_errors() {
        for frame in [
            vec![],
            vec![2, b'{'],
            vec![1, 0xff, 0xff, 0xff],
            vec![0, 0xff],
        ] {
            assert!(
                Codec::JsonDeflate
                    .decode(Message::binary(frame.clone()))
                    .is_err(),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_bound() {
        let zeros = "0".repeat(MAX_INFLATED_BYTES as usize + 10);
        let error = inflate(&deflated(&zeros)).expect_err("too large");
        assert!(error.to_string().contains("16 MiB"), "{error}");
    }

    #[test]
    fn msgpack_round_trips_through_json_text() {
        let json = r#"{"type":"publish","room":"r","data":{"t":5,"p":1,"s":2},"id":3}"#;
        let Message::Binary(bytes) = Codec::Msgpack.encode(Message::text(json)).expect("encodes")
        else {
            panic!("a binary frame");
        };
        let back: serde_json::Value = rmp_serde::from_slice(&bytes).expect("msgpack");
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
        let Message::Text(text) = Codec::Msgpack
            .decode(Message::binary(bytes))
            .expect("decodes")
        else {
            panic!("text");
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(text.as_str()).unwrap(),
            back
        );
    }

    #[test]
    fn wire_bytes_add_the_unmasked_header() {
        assert_eq!(wire_bytes(0), 2);
        assert_eq!(wire_bytes(125), 127);
        assert_eq!(wire_bytes(126), 130);
        assert_eq!(wire_bytes(65_535), 65_539);
        assert_eq!(wire_bytes(65_536), 65_546);
    }
}
