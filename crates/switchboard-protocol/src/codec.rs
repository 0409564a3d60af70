use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::deflate::{self, UnpackError};
use crate::msgpack::MAX_DATA_DEPTH;
use crate::{
    CLIENT_FRAME_TYPES, ClientFrame, ErrorCode, JSON_DEFLATE_PROTOCOL, JSON_PROTOCOL,
    MSGPACK_PROTOCOL,
};

/// How frames are written on one connection, chosen by the subprotocol at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// `switchboard.v1.json`: text frames, one JSON object each.
    Json,
    /// `switchboard.v1.msgpack`: binary frames, one MessagePack map (string keys) each.
    MsgPack,
    /// `switchboard.v1.json+deflate`: binary frames, a flag byte then the JSON stored or as raw
    /// DEFLATE (see [`deflate`](crate::deflate)); clients may also send plain JSON text frames.
    JsonDeflate,
}

/// One encoded frame: text for JSON, binary for MessagePack and deflate frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    Text(String),
    Binary(Vec<u8>),
}

impl Encoded {
    pub fn len(&self) -> usize {
        match self {
            Encoded::Text(text) => text.len(),
            Encoded::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a frame could not be encoded: a value serde cannot write in the codec.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    MsgPack(#[from] rmp_serde::encode::Error),
}

/// Why bytes did not decode as a value of the type asked for (the message is the codec's own).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    MsgPack(#[from] crate::msgpack::MsgPackError),
    #[error(transparent)]
    Deflate(#[from] UnpackError),
}

/// Why a client frame was refused, with the request id when it could still be read, so the
/// `error` frame can carry it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

/// The two fields every frame should have; read only when a frame fails to decode, to tell an
/// unknown type from a malformed frame and to echo the request id.
#[derive(serde::Deserialize)]
struct FrameProbe {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    id: Option<u64>,
}

impl Codec {
    /// Every codec, in the server's order of preference.
    pub const ALL: [Codec; 3] = [Codec::Json, Codec::MsgPack, Codec::JsonDeflate];

    /// The codec for a `Sec-WebSocket-Protocol` value, if it is one of ours.
    pub fn from_protocol(name: &str) -> Option<Codec> {
        match name.trim() {
            JSON_PROTOCOL => Some(Codec::Json),
            MSGPACK_PROTOCOL => Some(Codec::MsgPack),
            JSON_DEFLATE_PROTOCOL => Some(Codec::JsonDeflate),
            _ => None,
        }
    }

    pub fn protocol(self) -> &'static str {
        match self {
            Codec::Json => JSON_PROTOCOL,
            Codec::MsgPack => MSGPACK_PROTOCOL,
            Codec::JsonDeflate => JSON_DEFLATE_PROTOCOL,
        }
    }

    /// Small dense index, for per-codec caches.
    pub fn index(self) -> usize {
        match self {
            Codec::Json => 0,
            Codec::MsgPack => 1,
            Codec::JsonDeflate => 2,
        }
    }

    /// The codec of the bytes a frame carries once unwrapped: JSON inside a deflate frame.
    pub fn content(self) -> Codec {
        match self {
            Codec::JsonDeflate => Codec::Json,
            codec => codec,
        }
    }

    /// Whether frames of this codec travel as text (else binary).
    pub fn is_text(self) -> bool {
        self == Codec::Json
    }

    pub fn encode<T: Serialize + ?Sized>(self, frame: &T) -> Result<Encoded, EncodeError> {
        Ok(match self {
            Codec::Json => Encoded::Text(serde_json::to_string(frame)?),
            Codec::MsgPack => Encoded::Binary(rmp_serde::to_vec_named(frame)?),
            Codec::JsonDeflate => {
                let mut stored = vec![deflate::STORED];
                serde_json::to_writer(&mut stored, frame)?;
                Encoded::Binary(deflate::pack(stored))
            }
        })
    }

    /// Bytes `value` takes encoded with this codec, counted without building the encoding. For
    /// the deflate codec: the JSON's length, what a frame inflates to (the size limits apply to
    /// it); the frame on the wire is at most one byte more.
    pub fn encoded_len<T: Serialize + ?Sized>(self, value: &T) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        // A writer that never fails: the only errors left are values serde cannot encode, which
        // `encode` reports when the frame is really written.
        let _: Result<(), EncodeError> = match self {
            Codec::Json | Codec::JsonDeflate => {
                serde_json::to_writer(&mut count, value).map_err(Into::into)
            }
            Codec::MsgPack => rmp_serde::encode::write_named(&mut count, value).map_err(Into::into),
        };
        count.0
    }

    /// Decodes one frame; a deflate frame inflates to [`deflate::DEFAULT_INFLATE_LIMIT`] at most.
    pub fn decode<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, ParseError> {
        self.decode_within(payload, deflate::DEFAULT_INFLATE_LIMIT)
    }

    /// Decodes one frame; a deflate frame that inflates to more than `limit` bytes is refused
    /// before more is inflated.
    pub fn decode_within<T: DeserializeOwned>(
        self,
        payload: &[u8],
        limit: usize,
    ) -> Result<T, ParseError> {
        Ok(match self {
            Codec::Json => serde_json::from_slice(payload)?,
            Codec::MsgPack => crate::msgpack::from_slice(payload)?,
            Codec::JsonDeflate => serde_json::from_slice(&deflate::unpack(payload, limit)?)?,
        })
    }

    /// Decodes a client frame, classifying failures as `unknown_type` or `bad_frame` (and, for a
    /// deflate frame inflating past [`deflate::DEFAULT_INFLATE_LIMIT`], `too_large`). A server
    /// unpacks deflate frames itself, with its own limit, and decodes the JSON inside.
    pub fn decode_client(self, payload: &[u8]) -> Result<ClientFrame, DecodeError> {
        if self == Codec::JsonDeflate {
            let json =
                deflate::unpack(payload, deflate::DEFAULT_INFLATE_LIMIT).map_err(|error| {
                    DecodeError {
                        id: None,
                        code: match error {
                            UnpackError::TooLarge { .. } => ErrorCode::TooLarge,
                            _ => ErrorCode::BadFrame,
                        },
                        message: error.to_string(),
                    }
                })?;
            return Codec::Json.decode_client(&json);
        }
        let message = match self.decode::<ClientFrame>(payload) {
            Ok(frame) => return checked_data_depth(frame),
            Err(error) => error.to_string(),
        };
        match self.decode::<FrameProbe>(payload) {
            Ok(FrameProbe {
                kind: Some(kind),
                id,
            }) if !CLIENT_FRAME_TYPES.contains(&kind.as_str()) => Err(DecodeError {
                id,
                code: ErrorCode::UnknownType,
                message: format!("unknown frame type {kind:?}"),
            }),
            Ok(FrameProbe { kind: None, id }) => Err(DecodeError {
                id,
                code: ErrorCode::BadFrame,
                message: "frame has no \"type\" field".to_owned(),
            }),
            Ok(FrameProbe { id, .. }) => Err(DecodeError {
                id,
                code: ErrorCode::BadFrame,
                message,
            }),
            Err(_) => Err(DecodeError {
                id: None,
                code: ErrorCode::BadFrame,
                message,
            }),
        }
    }
}

/// Refuses a `publish` or `send` whose `data` nests deeper than [`MAX_DATA_DEPTH`].
fn checked_data_depth(frame: ClientFrame) -> Result<ClientFrame, DecodeError> {
    let (ClientFrame::Publish { data, id, .. } | ClientFrame::Send { data, id, .. }) = &frame
    else {
        return Ok(frame);
    };
    if deeper_than(data, MAX_DATA_DEPTH) {
        return Err(DecodeError {
            id: *id,
            code: ErrorCode::BadFrame,
            message: format!("data nested deeper than {MAX_DATA_DEPTH} arrays and maps"),
        });
    }
    Ok(frame)
}

/// Recursive, but only over values a codec decoded: those nest at most `MAX_DEPTH` deep.
fn deeper_than(value: &Value, levels: usize) -> bool {
    let mut inner = match value {
        Value::Array(items) => Box::new(items.iter()) as Box<dyn Iterator<Item = &Value>>,
        Value::Object(map) => Box::new(map.values()),
        _ => return false,
    };
    levels == 0 || inner.any(|item| deeper_than(item, levels - 1))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::*;

    fn position(offset: u64) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: "e1".into(),
        }
    }

    fn every_client_frame() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Subscribe {
                room: "chat".into(),
                id: Some(1),
                since: Some(position(4)),
                presence_events: true,
            },
            ClientFrame::Subscribe {
                room: "chat".into(),
                id: None,
                since: None,
                presence_events: false,
            },
            ClientFrame::Unsubscribe {
                room: "chat".into(),
                id: Some(2),
            },
            ClientFrame::Publish {
                room: "chat".into(),
                data: json!({"text": "hi", "n": [1, 2.5, null, true]}),
                id: Some(3),
                key: None,
            },
            ClientFrame::Publish {
                room: "chat".into(),
                data: json!(1),
                id: None,
                key: Some("k-1".into()),
            },
            ClientFrame::Send {
                to: "bob".into(),
                data: json!("hello"),
                id: None,
                persist: false,
                key: None,
            },
            ClientFrame::Send {
                to: "bob".into(),
                data: json!({"text": "kept"}),
                id: Some(4),
                persist: true,
                key: Some("k-2".into()),
            },
            ClientFrame::Ack {
                seq: 12,
                id: Some(5),
            },
            ClientFrame::Ack { seq: 0, id: None },
            ClientFrame::Presence {
                room: "chat".into(),
                id: 5,
            },
            ClientFrame::History {
                room: "chat".into(),
                id: 6,
                since: Some(position(1)),
                limit: Some(10),
            },
            ClientFrame::Ping { id: Some(u64::MAX) },
            ClientFrame::Ping { id: None },
        ]
    }

    fn every_server_frame() -> Vec<ServerFrame> {
        let sender = Sender {
            user: "alice".into(),
            session: "s1".into(),
        };
        let message = Arc::new(RoomMessage {
            room: "chat".into(),
            data: json!({"text": "hi"}),
            offset: 7,
            epoch: "e1".into(),
            from: Some(sender.clone()),
        });
        let notice = PresenceNotice {
            room: "chat".into(),
            user: "alice".into(),
            session: "s1".into(),
        };
        vec![
            ServerFrame::Welcome {
                session: "s1".into(),
                user: "alice".into(),
                node: "n1".into(),
                protocol: JSON_PROTOCOL.into(),
                heartbeat_ms: 25_000,
                inbox: InboxState {
                    seq: 9,
                    acked: 4,
                    epoch: "e2".into(),
                },
                transport: Some("sse".into()),
                session_key: Some("0f1e2d3c4b5a69788796a5b4c3d2e1f0".into()),
            },
            ServerFrame::Close {
                code: 1001,
                reason: "draining".into(),
            },
            ServerFrame::Message(message.clone()),
            ServerFrame::Message(Arc::new(RoomMessage {
                from: None,
                ..(*message).clone()
            })),
            ServerFrame::Direct {
                data: json!([1, 2]),
                from: Some(sender.clone()),
                seq: None,
            },
            ServerFrame::Direct {
                data: json!(null),
                from: None,
                seq: None,
            },
            ServerFrame::Direct {
                data: json!("kept"),
                from: Some(sender),
                seq: Some(u64::MAX),
            },
            ServerFrame::Broadcast {
                data: json!({"maintenance": true}),
            },
            ServerFrame::Join(notice.clone()),
            ServerFrame::Leave(notice),
            ServerFrame::Reply(Reply {
                id: 1,
                room: Some("chat".into()),
                offset: Some(7),
                epoch: Some("e1".into()),
                recovered: Some(true),
                ..Reply::default()
            }),
            ServerFrame::Reply(Reply {
                id: 2,
                sessions: Some(2),
                ..Reply::default()
            }),
            ServerFrame::Reply(Reply {
                id: 2,
                sessions: Some(0),
                seq: Some(3),
                duplicate: true,
                ..Reply::default()
            }),
            ServerFrame::Reply(Reply {
                id: 3,
                members: Some(vec![Member {
                    user: "alice".into(),
                    session: "s1".into(),
                    info: Some(json!({"name": "Alice"})),
                }]),
                ..Reply::default()
            }),
            ServerFrame::Reply(Reply {
                id: 4,
                messages: Some(vec![message]),
                offset: Some(7),
                epoch: Some("e1".into()),
                ..Reply::default()
            }),
            ServerFrame::error(Some(9), ErrorCode::Forbidden, "no"),
            ServerFrame::error(None, ErrorCode::BadFrame, "bad"),
            ServerFrame::Pong { id: Some(3) },
            ServerFrame::Pong { id: None },
        ]
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let frame = ServerFrame::Direct {
            data: json!({"text": "héllo", "n": [1, 2.5, null]}),
            from: None,
            seq: Some(1),
        };
        for codec in Codec::ALL {
            assert_eq!(
                codec.encoded_len(&frame),
                codec.content().encode(&frame).unwrap().len()
            );
        }
        // A small deflate frame goes stored: the flag byte, then the JSON.
        assert_eq!(
            Codec::JsonDeflate.encode(&frame).unwrap().len(),
            Codec::JsonDeflate.encoded_len(&frame) + 1
        );
    }

    fn binary(encoded: Encoded) -> Vec<u8> {
        match encoded {
            Encoded::Binary(bytes) => bytes,
            Encoded::Text(_) => panic!("deflate frames are binary"),
        }
    }

    #[test]
    fn deflate_frames_are_stored_when_small_and_compressed_when_large() {
        let small = ServerFrame::Pong { id: Some(1) };
        let bytes = binary(Codec::JsonDeflate.encode(&small).unwrap());
        assert_eq!(bytes[0], deflate::STORED);
        assert_eq!(bytes[1..], *serde_json::to_vec(&small).unwrap());

        let large = ServerFrame::Message(Arc::new(RoomMessage {
            room: "chat".into(),
            data: json!({"text": "market data: bid 101.25 ask 101.50; ".repeat(30)}),
            offset: 7,
            epoch: "e1".into(),
            from: None,
        }));
        let json = serde_json::to_vec(&large).unwrap();
        let bytes = binary(Codec::JsonDeflate.encode(&large).unwrap());
        assert_eq!(bytes[0], deflate::DEFLATED);
        assert!(
            bytes.len() * 3 < json.len(),
            "{} of {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(
            Codec::JsonDeflate.decode::<ServerFrame>(&bytes).unwrap(),
            large
        );
        // Too large for a smaller limit than the JSON: refused, not inflated.
        let error = Codec::JsonDeflate
            .decode_within::<ServerFrame>(&bytes, json.len() - 1)
            .unwrap_err();
        assert!(matches!(
            error,
            ParseError::Deflate(UnpackError::TooLarge { .. })
        ));
    }

    #[test]
    fn deflate_client_frames_decode_or_are_refused_with_a_code() {
        let publish = ClientFrame::Publish {
            room: "chat".into(),
            data: json!({"text": "hello hello hello hello ".repeat(40)}),
            id: Some(3),
            key: None,
        };
        let bytes = binary(Codec::JsonDeflate.encode(&publish).unwrap());
        assert_eq!(bytes[0], deflate::DEFLATED);
        assert_eq!(Codec::JsonDeflate.decode_client(&bytes).unwrap(), publish);

        let error = Codec::JsonDeflate
            .decode_client(&[deflate::DEFLATED, 0xff, 0xfe])
            .unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::BadFrame, None));
        let error = Codec::JsonDeflate.decode_client(b"\x07{}").unwrap_err();
        assert_eq!(error.code, ErrorCode::BadFrame);
        assert!(error.message.contains("flag"), "{}", error.message);
        // Stored JSON that is no frame: the JSON codec's own classification.
        let error = Codec::JsonDeflate
            .decode_client(b"\x00{\"type\":\"dance\",\"id\":4}")
            .unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::UnknownType, Some(4)));
    }

    #[test]
    fn every_client_frame_round_trips_in_both_codecs() {
        for codec in Codec::ALL {
            for frame in every_client_frame() {
                let encoded = codec.encode(&frame).unwrap();
                let bytes = match &encoded {
                    Encoded::Text(text) => {
                        assert!(codec.is_text());
                        text.as_bytes().to_vec()
                    }
                    Encoded::Binary(bytes) => {
                        assert!(!codec.is_text());
                        bytes.clone()
                    }
                };
                assert_eq!(codec.decode_client(&bytes).unwrap(), frame, "{codec:?}");
            }
        }
    }

    #[test]
    fn every_server_frame_round_trips_in_both_codecs() {
        for codec in Codec::ALL {
            for frame in every_server_frame() {
                let bytes = match codec.encode(&frame).unwrap() {
                    Encoded::Text(text) => text.into_bytes(),
                    Encoded::Binary(bytes) => bytes,
                };
                let decoded: ServerFrame = codec.decode(&bytes).unwrap();
                assert_eq!(decoded, frame, "{codec:?}");
            }
        }
    }

    #[test]
    fn json_wire_shape_matches_the_protocol() {
        let frame = ServerFrame::Message(Arc::new(RoomMessage {
            room: "chat".into(),
            data: json!({"x": 1}),
            offset: 1,
            epoch: "e".into(),
            from: None,
        }));
        let Encoded::Text(text) = Codec::Json.encode(&frame).unwrap() else {
            panic!("json is text")
        };
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"type": "message", "room": "chat", "data": {"x": 1}, "offset": 1, "epoch": "e"})
        );
        let subscribe = Codec::Json
            .decode_client(br#"{"type":"subscribe","room":"r","since":{"offset":3,"epoch":"e"}}"#)
            .unwrap();
        assert_eq!(
            subscribe,
            ClientFrame::Subscribe {
                room: "r".into(),
                id: None,
                since: Some(StreamPosition {
                    offset: 3,
                    epoch: "e".into()
                }),
                presence_events: false
            }
        );
    }

    #[test]
    fn inbox_fields_have_the_protocol_shape_and_are_left_out_when_unused() {
        let json = |frame: &ServerFrame| -> serde_json::Value {
            let Encoded::Text(text) = Codec::Json.encode(frame).unwrap() else {
                panic!("json is text")
            };
            serde_json::from_str(&text).unwrap()
        };
        let plain = ServerFrame::Direct {
            data: json!(1),
            from: None,
            seq: None,
        };
        assert_eq!(json(&plain), json!({"type": "direct", "data": 1}));
        let kept = ServerFrame::Direct {
            data: json!(1),
            from: None,
            seq: Some(7),
        };
        assert_eq!(json(&kept), json!({"type": "direct", "data": 1, "seq": 7}));
        let reply = ServerFrame::Reply(Reply {
            id: 1,
            sessions: Some(1),
            ..Reply::default()
        });
        assert_eq!(
            json(&reply),
            json!({"type": "reply", "id": 1, "sessions": 1})
        );
        let repeated = ServerFrame::Reply(Reply {
            id: 1,
            sessions: Some(1),
            seq: Some(2),
            duplicate: true,
            ..Reply::default()
        });
        assert_eq!(
            json(&repeated),
            json!({"type": "reply", "id": 1, "sessions": 1, "seq": 2, "duplicate": true})
        );
        for codec in Codec::ALL {
            let frame = |value: serde_json::Value| encode_value(codec, &value);
            let send = json!({"type": "send", "to": "bob", "data": 1, "persist": true, "key": "k"});
            assert_eq!(
                codec.decode_client(&frame(send)).unwrap(),
                ClientFrame::Send {
                    to: "bob".into(),
                    data: json!(1),
                    id: None,
                    persist: true,
                    key: Some("k".into()),
                }
            );
            let plain = json!({"type": "send", "to": "bob", "data": 1});
            assert!(matches!(
                codec.decode_client(&frame(plain)).unwrap(),
                ClientFrame::Send {
                    persist: false,
                    key: None,
                    ..
                }
            ));
            let ack = json!({"type": "ack", "seq": 3, "id": 9});
            assert_eq!(
                codec.decode_client(&frame(ack)).unwrap(),
                ClientFrame::Ack {
                    seq: 3,
                    id: Some(9)
                }
            );
            let error = codec
                .decode_client(&frame(json!({"type": "ack", "id": 4})))
                .unwrap_err();
            assert_eq!((error.code, error.id), (ErrorCode::BadFrame, Some(4)));
        }
    }

    #[test]
    fn msgpack_frames_are_maps_with_string_keys() {
        let Encoded::Binary(bytes) = Codec::MsgPack
            .encode(&ServerFrame::Pong { id: Some(1) })
            .unwrap()
        else {
            panic!("msgpack is binary")
        };
        // fixmap with 2 entries, then the fixstr "type".
        assert_eq!(bytes[0], 0x82);
        assert_eq!(&bytes[1..6], b"\xa4type");
    }

    #[test]
    fn unknown_type_is_told_apart_from_a_malformed_frame() {
        let error = Codec::Json
            .decode_client(br#"{"type":"dance","id":4}"#)
            .unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::UnknownType, Some(4)));

        let error = Codec::Json.decode_client(b"{not json").unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::BadFrame, None));

        let error = Codec::Json
            .decode_client(br#"{"type":"publish","id":8,"room":"r"}"#)
            .unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::BadFrame, Some(8)));
        assert!(error.message.contains("data"), "{}", error.message);

        let error = Codec::Json.decode_client(br#"{"id":2}"#).unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::BadFrame, Some(2)));

        let error = Codec::MsgPack
            .decode_client(&[0xc1, 0xff, 0x00])
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::BadFrame);

        let unknown = rmp_serde::to_vec_named(&json!({"type": "dance", "id": 1})).unwrap();
        let error = Codec::MsgPack.decode_client(&unknown).unwrap_err();
        assert_eq!((error.code, error.id), (ErrorCode::UnknownType, Some(1)));
    }

    fn nested(levels: usize) -> serde_json::Value {
        (1..levels).fold(json!([]), |inner, _| json!([inner]))
    }

    fn encode_value(codec: Codec, value: &serde_json::Value) -> Vec<u8> {
        // The encoders recurse without a limit; only decoding is bounded.
        match codec {
            Codec::Json => serde_json::to_vec(value).unwrap(),
            Codec::MsgPack => rmp_serde::to_vec_named(value).unwrap(),
            Codec::JsonDeflate => {
                let mut stored = vec![deflate::STORED];
                serde_json::to_writer(&mut stored, value).unwrap();
                deflate::pack(stored)
            }
        }
    }

    #[test]
    fn both_codecs_refuse_the_same_frame_depth() {
        use crate::msgpack::MAX_DEPTH;
        for codec in Codec::ALL {
            // An unknown field is ignored, but still parsed: the frame's map is one level more.
            let ping = |levels| json!({"type": "ping", "id": 7, "extra": nested(levels)});
            let frame = codec
                .decode_client(&encode_value(codec, &ping(MAX_DEPTH - 1)))
                .unwrap_or_else(|error| panic!("{codec:?}: {error}"));
            assert_eq!(frame, ClientFrame::Ping { id: Some(7) });
            let error = codec
                .decode_client(&encode_value(codec, &ping(MAX_DEPTH)))
                .unwrap_err();
            assert_eq!(error.code, ErrorCode::BadFrame, "{codec:?}");
        }
        let deep = json!({"type": "ping", "extra": nested(200)});
        let error = Codec::MsgPack
            .decode_client(&encode_value(Codec::MsgPack, &deep))
            .unwrap_err();
        assert!(
            error.message.contains("deeper than 127"),
            "{}",
            error.message
        );
    }

    #[test]
    fn data_may_nest_as_deep_as_a_history_reply_can_carry() {
        for codec in Codec::ALL {
            for kind in ["publish", "send"] {
                let frame = |levels| {
                    let frame = json!({"type": kind, "room": "r", "to": "u", "id": 7, "data": nested(levels)});
                    encode_value(codec, &frame)
                };
                codec
                    .decode_client(&frame(MAX_DATA_DEPTH))
                    .unwrap_or_else(|error| panic!("{codec:?} {kind}: {error}"));
                let error = codec.decode_client(&frame(MAX_DATA_DEPTH + 1)).unwrap_err();
                assert_eq!((error.code, error.id), (ErrorCode::BadFrame, Some(7)));
                assert!(
                    error.message.contains("deeper than 124"),
                    "{}",
                    error.message
                );
            }
            let reply = ServerFrame::Reply(Reply {
                id: 1,
                messages: Some(vec![Arc::new(RoomMessage {
                    room: "r".into(),
                    data: nested(MAX_DATA_DEPTH),
                    offset: 1,
                    epoch: "e".into(),
                    from: None,
                })]),
                ..Reply::default()
            });
            let bytes = match codec.encode(&reply).unwrap() {
                Encoded::Text(text) => text.into_bytes(),
                Encoded::Binary(bytes) => bytes,
            };
            assert_eq!(
                codec.decode::<ServerFrame>(&bytes).unwrap(),
                reply,
                "{codec:?}"
            );
        }
    }

    /// Found by the msgpack_frame fuzz target: without serde_json's exact float parsing, this
    /// float came back one unit in the last place off after MessagePack → JSON → decode.
    #[test]
    fn floats_cross_the_codecs_exactly() {
        let float = f64::from_bits(0x4004_006c_0000_0000);
        let frame = ClientFrame::Publish {
            room: "r".into(),
            data: json!([float, 0.1, 1e-300, f64::MAX, 5e-324]),
            id: None,
            key: None,
        };
        let msgpack = Codec::MsgPack.encode(&frame).unwrap();
        let Encoded::Binary(bytes) = msgpack else {
            panic!("msgpack is binary")
        };
        let from_msgpack = Codec::MsgPack.decode_client(&bytes).unwrap();
        let Encoded::Text(text) = Codec::Json.encode(&from_msgpack).unwrap() else {
            panic!("json is text")
        };
        assert_eq!(Codec::Json.decode_client(text.as_bytes()).unwrap(), frame);
    }

    #[test]
    fn msgpack_frames_declaring_more_than_they_hold_are_bad_frames() {
        // A map whose `data` claims 2^32 - 1 elements, in 16 bytes.
        let mut frame = vec![0x82, 0xa4];
        frame.extend_from_slice(b"type");
        frame.extend_from_slice(&[0xa4]);
        frame.extend_from_slice(b"data");
        frame.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        for bytes in [&[0xdd, 0xff, 0xff, 0xff, 0xff][..], &frame] {
            let error = Codec::MsgPack.decode_client(bytes).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadFrame);
            assert!(
                error.message.contains("declares 4294967295 items"),
                "{}",
                error.message
            );
        }
    }

    #[test]
    fn presence_and_history_need_an_id() {
        let error = Codec::Json
            .decode_client(br#"{"type":"presence","room":"r"}"#)
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::BadFrame);
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let frame = Codec::Json
            .decode_client(br#"{"type":"ping","id":1,"future":"field"}"#)
            .unwrap();
        assert_eq!(frame, ClientFrame::Ping { id: Some(1) });
        let error: ServerFrame = Codec::Json
            .decode(br#"{"type":"error","code":"some_new_code","message":"m"}"#)
            .unwrap();
        assert_eq!(
            error,
            ServerFrame::error(None, ErrorCode::Unknown, "m".to_owned())
        );
    }

    #[test]
    fn subprotocol_names_map_to_codecs() {
        assert_eq!(
            Codec::from_protocol("switchboard.v1.json"),
            Some(Codec::Json)
        );
        assert_eq!(
            Codec::from_protocol(" switchboard.v1.msgpack"),
            Some(Codec::MsgPack)
        );
        assert_eq!(
            Codec::from_protocol("switchboard.v1.json+deflate"),
            Some(Codec::JsonDeflate)
        );
        assert_eq!(Codec::from_protocol("mqtt"), None);
        for codec in Codec::ALL {
            assert_eq!(Codec::from_protocol(codec.protocol()), Some(codec));
        }
    }
}
