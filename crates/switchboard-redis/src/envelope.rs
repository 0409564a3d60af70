//! What travels on the pub/sub channels, version 1. Every payload starts with `1` and a kind
//! letter; room messages are built by the publish script, so their header is plain text.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_broker::BrokerError;
use switchboard_protocol::msgpack::MsgPackError;
use switchboard_protocol::{PresenceNotice, RoomMessage, Sender};

/// A room message's data and sender, as stored in history and published (MessagePack).
#[derive(Serialize, Deserialize)]
pub struct Stored {
    pub data: Value,
    #[serde(default)]
    pub from: Option<Sender>,
}

#[derive(Serialize, Deserialize)]
pub struct Direct {
    pub user: String,
    pub data: Value,
    #[serde(default)]
    pub from: Option<Sender>,
    /// The inbox seq of a persisted send. Absent from a plain send's envelope, so that one
    /// is as before and an envelope of an earlier version decodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub struct Disconnect {
    pub user: String,
    pub code: u16,
    pub reason: String,
}

/// Client frames POSTed on one node for a fallback session of another (`Broker::forward`).
#[derive(Serialize, Deserialize)]
pub struct Frames {
    pub session: String,
    /// JSON text, one client frame each.
    pub frames: Vec<String>,
}

/// A decoded channel payload.
pub enum Envelope {
    Room(RoomMessage),
    Join(PresenceNotice),
    Leave(PresenceNotice),
    Direct(Direct),
    Disconnect(Disconnect),
    Broadcast(Value),
    Frames(Frames),
}

/// Why a payload could not be packed, or a payload from Redis could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error(transparent)]
    Pack(#[from] rmp_serde::encode::Error),
    #[error(transparent)]
    Unpack(#[from] MsgPackError),
    #[error("unknown envelope version")]
    UnknownVersion,
    #[error("unexpected envelope kind {0:?}")]
    UnexpectedKind(char),
    #[error("truncated envelope")]
    Truncated,
    #[error("bad offset")]
    BadOffset,
    #[error("bad presence event")]
    BadPresenceEvent,
    #[error(transparent)]
    Utf8(#[from] std::str::Utf8Error),
}

/// What this node packed or read from Redis not being what it should be is the broker's own
/// failure, as before these errors had types.
impl From<EnvelopeError> for BrokerError {
    fn from(error: EnvelopeError) -> Self {
        BrokerError::Internal(error.to_string())
    }
}

pub fn pack<T: Serialize>(value: &T) -> Result<Vec<u8>, EnvelopeError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// With the clients' depth and length checks: whoever can write to Redis can send these bytes.
pub fn unpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, EnvelopeError> {
    Ok(switchboard_protocol::msgpack::from_slice(bytes)?)
}

/// `1j<session>\n<user>` or `1l…`: built by the presence scripts too.
pub fn presence_event(join: bool, session: &str, user: &str) -> Vec<u8> {
    format!("1{}{session}\n{user}", if join { 'j' } else { 'l' }).into_bytes()
}

pub fn direct(message: &Direct) -> Result<Vec<u8>, EnvelopeError> {
    Ok([b"1d".as_slice(), &pack(message)?].concat())
}

/// The seq a persisted send's envelope is packed with: MessagePack writes it as `0xcf` and 8
/// bytes, big-endian, at the very end (`seq` is the last field), and lua/inbox_send.lua writes
/// the seq it assigns over those 8 bytes.
const SEQ_PLACEHOLDER: u64 = u64::MAX;

/// The envelope of a persisted send, its seq left for the inbox script to write in.
pub fn persisted_direct(
    user: String,
    data: Value,
    from: Option<Sender>,
) -> Result<Vec<u8>, EnvelopeError> {
    direct(&Direct {
        user,
        data,
        from,
        seq: Some(SEQ_PLACEHOLDER),
    })
}

pub fn disconnect(message: &Disconnect) -> Result<Vec<u8>, EnvelopeError> {
    Ok([b"1x".as_slice(), &pack(message)?].concat())
}

pub fn broadcast(data: &Value) -> Result<Vec<u8>, EnvelopeError> {
    Ok([b"1b".as_slice(), &pack(data)?].concat())
}

pub fn frames(message: &Frames) -> Result<Vec<u8>, EnvelopeError> {
    Ok([b"1f".as_slice(), &pack(message)?].concat())
}

/// Decodes a payload received on `room`'s channel (`room` is `None` on other channels).
pub fn decode(room: Option<&str>, payload: &[u8]) -> Result<Envelope, EnvelopeError> {
    let [b'1', kind, rest @ ..] = payload else {
        return Err(EnvelopeError::UnknownVersion);
    };
    match (kind, room) {
        (b'm', Some(room)) => {
            let (offset, rest) = split_once(rest, b':')?;
            let (epoch, stored) = split_once(rest, b':')?;
            let offset = std::str::from_utf8(offset)
                .ok()
                .and_then(|offset| offset.parse().ok())
                .ok_or(EnvelopeError::BadOffset)?;
            let epoch = std::str::from_utf8(epoch)?.to_owned();
            let stored: Stored = unpack(stored)?;
            Ok(Envelope::Room(RoomMessage {
                room: room.to_owned(),
                data: stored.data,
                offset,
                epoch,
                from: stored.from,
            }))
        }
        (b'j' | b'l', Some(room)) => {
            let text = std::str::from_utf8(rest)?;
            let (session, user) = text
                .split_once('\n')
                .ok_or(EnvelopeError::BadPresenceEvent)?;
            let notice = PresenceNotice {
                room: room.to_owned(),
                user: user.to_owned(),
                session: session.to_owned(),
            };
            Ok(if *kind == b'j' {
                Envelope::Join(notice)
            } else {
                Envelope::Leave(notice)
            })
        }
        (b'd', None) => Ok(Envelope::Direct(unpack(rest)?)),
        (b'x', None) => Ok(Envelope::Disconnect(unpack(rest)?)),
        (b'b', None) => Ok(Envelope::Broadcast(unpack(rest)?)),
        (b'f', None) => Ok(Envelope::Frames(unpack(rest)?)),
        _ => Err(EnvelopeError::UnexpectedKind(*kind as char)),
    }
}

fn split_once(bytes: &[u8], separator: u8) -> Result<(&[u8], &[u8]), EnvelopeError> {
    let index = bytes
        .iter()
        .position(|byte| *byte == separator)
        .ok_or(EnvelopeError::Truncated)?;
    Ok((&bytes[..index], &bytes[index + 1..]))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn room_messages_decode_from_the_script_format() {
        let stored = pack(&Stored {
            data: json!({"a": [1, "b"]}),
            from: Some(Sender {
                user: "u".into(),
                session: "s".into(),
            }),
        })
        .unwrap();
        let payload = [b"1m42:ep0ch:".as_slice(), &stored].concat();
        let Envelope::Room(message) = decode(Some("room"), &payload).unwrap() else {
            panic!("a room message")
        };
        assert_eq!((message.offset, message.epoch.as_str()), (42, "ep0ch"));
        assert_eq!(message.data, json!({"a": [1, "b"]}));
        assert_eq!(message.from.unwrap().user, "u");
    }

    #[test]
    fn presence_and_inbox_envelopes_round_trip() {
        let Envelope::Leave(notice) =
            decode(Some("r"), &presence_event(false, "s1", "alice")).unwrap()
        else {
            panic!("a leave")
        };
        assert_eq!(
            (notice.session.as_str(), notice.user.as_str()),
            ("s1", "alice")
        );
        let payload = direct(&Direct {
            user: "bob".into(),
            data: json!(1),
            from: None,
            seq: None,
        })
        .unwrap();
        assert!(matches!(decode(None, &payload).unwrap(), Envelope::Direct(d) if d.user == "bob"));
        let payload = broadcast(&json!("all")).unwrap();
        assert!(
            matches!(decode(None, &payload).unwrap(), Envelope::Broadcast(v) if v == json!("all"))
        );
    }

    #[test]
    fn frames_envelopes_round_trip_on_inbox_channels_only() {
        let sent = [r#"{"type":"ping","id":1}"#, "not json: sent as is"];
        let payload = frames(&Frames {
            session: "0123abcd".into(),
            frames: sent.iter().map(|frame| (*frame).to_owned()).collect(),
        })
        .unwrap();
        assert!(payload.starts_with(b"1f"));
        let Envelope::Frames(received) = decode(None, &payload).unwrap() else {
            panic!("frames")
        };
        assert_eq!(received.session, "0123abcd");
        assert_eq!(received.frames, sent);
        assert!(matches!(
            decode(Some("room"), &payload),
            Err(EnvelopeError::UnexpectedKind('f'))
        ));
    }

    #[test]
    fn a_persisted_sends_seq_is_written_over_the_last_eight_bytes() {
        let sender = Sender {
            user: "carol".into(),
            session: "s9".into(),
        };
        let payload = persisted_direct("bob".into(), json!({"x": 1}), Some(sender)).unwrap();
        assert_eq!(
            payload[payload.len() - 9..],
            [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        // What lua/inbox_send.lua does.
        let seq: u64 = 70_000;
        let patched = [&payload[..payload.len() - 8], &seq.to_be_bytes()].concat();
        let Envelope::Direct(direct) = decode(None, &patched).unwrap() else {
            panic!("a direct message")
        };
        assert_eq!(
            (
                direct.user.as_str(),
                direct.data,
                direct.from.map(|from| from.user),
                direct.seq
            ),
            (
                "bob",
                json!({"x": 1}),
                Some("carol".to_owned()),
                Some(70_000)
            )
        );
    }

    #[test]
    fn a_direct_envelope_without_seq_decodes_and_a_plain_one_has_none() {
        #[derive(Serialize)]
        struct Earlier {
            user: String,
            data: Value,
            from: Option<Sender>,
        }
        let earlier = [
            b"1d".as_slice(),
            &pack(&Earlier {
                user: "bob".into(),
                data: json!(1),
                from: None,
            })
            .unwrap(),
        ]
        .concat();
        let plain = direct(&Direct {
            user: "bob".into(),
            data: json!(1),
            from: None,
            seq: None,
        })
        .unwrap();
        assert_eq!(plain, earlier, "a plain send's envelope is as before");
        let Envelope::Direct(direct) = decode(None, &earlier).unwrap() else {
            panic!("a direct message")
        };
        assert_eq!(direct.seq, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for payload in [
            &b""[..],
            b"2m1:e:",
            b"1m",
            b"1mx:e:",
            b"1m1",
            b"1z",
            b"1d\xff",
            b"1f\x92",
            b"1b\xdd\xff\xff\xff\xff",
        ] {
            assert!(decode(Some("r"), payload).is_err() || decode(None, payload).is_err());
        }
        let deep = [b"1b".as_slice(), &[0x91; 200]].concat();
        let Err(error) = decode(None, &deep) else {
            panic!("too deep")
        };
        assert!(
            matches!(error, EnvelopeError::Unpack(MsgPackError::TooDeep)),
            "{error:?}"
        );
        assert!(error.to_string().contains("deeper than"), "{error}");
    }
}
