//! A structural check of MessagePack bytes, run before rmp-serde sees them.
//!
//! rmp-serde accepts nesting to depth 1022 (serde_json stops at 128, so a JSON peer could not
//! read what a MessagePack peer sent), and it trusts declared lengths: a few bytes declaring an
//! array of 2^32 elements make it reserve memory for them before it notices the frame is short.
//! This walk is iterative, allocates at most one counter per open container (≤ `MAX_DEPTH`), and
//! refuses a container or string whose declared length cannot fit in the bytes that remain.

use rmp::Marker;
use serde::de::DeserializeOwned;

/// Deepest nesting of arrays and maps accepted in a frame, the outer frame map included: the
/// deepest serde_json accepts (its recursion limit of 128 refuses the 128th level), so both codecs
/// accept the same values and a JSON peer can read whatever a MessagePack peer sent.
pub const MAX_DEPTH: usize = 127;

/// Deepest nesting of arrays and maps inside a client's `data`, in both codecs: a `history` reply
/// wraps each message's `data` in three more levels (the reply, its `messages` array, the
/// message), and must stay within [`MAX_DEPTH`] for clients to decode it.
pub const MAX_DATA_DEPTH: usize = MAX_DEPTH - 3;

/// Why untrusted MessagePack bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum MsgPackError {
    #[error("MessagePack nested deeper than {} arrays and maps", MAX_DEPTH)]
    TooDeep,
    /// A container declaring more items than there are bytes left (each takes at least one).
    #[error("MessagePack {kind} declares {items} items but only {left} bytes follow")]
    TooManyItems {
        kind: &'static str,
        items: u64,
        left: usize,
    },
    #[error("MessagePack value needs {wanted} bytes but only {left} follow")]
    Truncated { wanted: u64, left: usize },
    #[error("MessagePack marker 0xc1 is never used")]
    ReservedMarker,
    /// Well-formed MessagePack that is not a value of the type asked for.
    #[error(transparent)]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Decodes MessagePack from untrusted bytes: [`check`] first, then rmp-serde.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MsgPackError> {
    check(bytes)?;
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Checks that `bytes` start with one complete MessagePack value nested at most [`MAX_DEPTH`]
/// deep, whose every declared length fits in the bytes that follow it.
pub fn check(bytes: &[u8]) -> Result<(), MsgPackError> {
    let mut rest = bytes;
    // Items still to read in each open container, innermost last.
    let mut open: Vec<u64> = Vec::new();
    loop {
        let items = match read_header(&mut rest)? {
            Header::Scalar => 0,
            Header::Container(kind, items) => {
                if open.len() >= MAX_DEPTH {
                    return Err(MsgPackError::TooDeep);
                }
                // Every item takes at least one byte, so a longer declaration is a lie.
                if items > rest.len() as u64 {
                    return Err(MsgPackError::TooManyItems {
                        kind,
                        items,
                        left: rest.len(),
                    });
                }
                items
            }
        };
        if items > 0 {
            open.push(items);
            continue;
        }
        // A value is complete: count it against the containers it closes.
        loop {
            let Some(left) = open.last_mut() else {
                return Ok(());
            };
            *left -= 1;
            if *left > 0 {
                break;
            }
            open.pop();
        }
    }
}

enum Header {
    /// A value with no items (its payload, if any, already skipped).
    Scalar,
    /// An array or a map, and the number of values inside (a map's keys and values both count).
    Container(&'static str, u64),
}

fn read_header(rest: &mut &[u8]) -> Result<Header, MsgPackError> {
    let marker = Marker::from_u8(take(rest, 1)?[0]);
    let skip = match marker {
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => 0,
        Marker::Reserved => return Err(MsgPackError::ReservedMarker),
        Marker::U8 | Marker::I8 => 1,
        Marker::U16 | Marker::I16 => 2,
        Marker::U32 | Marker::I32 | Marker::F32 => 4,
        Marker::U64 | Marker::I64 | Marker::F64 => 8,
        Marker::FixStr(len) => u64::from(len),
        Marker::Str8 | Marker::Bin8 => length(rest, 1)?,
        Marker::Str16 | Marker::Bin16 => length(rest, 2)?,
        Marker::Str32 | Marker::Bin32 => length(rest, 4)?,
        // Extension payloads follow a one-byte type.
        Marker::FixExt1 => 2,
        Marker::FixExt2 => 3,
        Marker::FixExt4 => 5,
        Marker::FixExt8 => 9,
        Marker::FixExt16 => 17,
        Marker::Ext8 => length(rest, 1)? + 1,
        Marker::Ext16 => length(rest, 2)? + 1,
        Marker::Ext32 => length(rest, 4)? + 1,
        Marker::FixArray(len) => return Ok(Header::Container("array", u64::from(len))),
        Marker::Array16 => return Ok(Header::Container("array", length(rest, 2)?)),
        Marker::Array32 => return Ok(Header::Container("array", length(rest, 4)?)),
        Marker::FixMap(len) => return Ok(Header::Container("map", 2 * u64::from(len))),
        Marker::Map16 => return Ok(Header::Container("map", 2 * length(rest, 2)?)),
        Marker::Map32 => return Ok(Header::Container("map", 2 * length(rest, 4)?)),
    };
    let Ok(skip) = usize::try_from(skip) else {
        return Err(truncated(skip, rest.len()));
    };
    take(rest, skip)?;
    Ok(Header::Scalar)
}

/// A big-endian length of `width` bytes.
fn length(rest: &mut &[u8], width: usize) -> Result<u64, MsgPackError> {
    Ok(take(rest, width)?
        .iter()
        .fold(0, |length, byte| length << 8 | u64::from(*byte)))
}

fn take<'a>(rest: &mut &'a [u8], count: usize) -> Result<&'a [u8], MsgPackError> {
    if count > rest.len() {
        return Err(truncated(count as u64, rest.len()));
    }
    let (taken, left) = rest.split_at(count);
    *rest = left;
    Ok(taken)
}

fn truncated(wanted: u64, left: usize) -> MsgPackError {
    MsgPackError::Truncated { wanted, left }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// `depth` arrays, each holding the next, the innermost empty.
    fn nested_arrays(depth: usize) -> Vec<u8> {
        vec![0x91; depth - 1].into_iter().chain([0x90]).collect()
    }

    #[test]
    fn depth_is_limited_like_serde_json() {
        assert!(check(&nested_arrays(MAX_DEPTH)).is_ok());
        let error = check(&nested_arrays(MAX_DEPTH + 1)).unwrap_err();
        assert!(matches!(error, MsgPackError::TooDeep), "{error:?}");
        assert!(error.to_string().contains("deeper than 127"), "{error}");

        for depth in 1..=200 {
            let text = "[".repeat(depth) + &"]".repeat(depth);
            assert_eq!(
                from_slice::<Value>(&nested_arrays(depth)).is_ok(),
                serde_json::from_str::<Value>(&text).is_ok(),
                "depth {depth}"
            );
        }
    }

    #[test]
    fn declared_lengths_must_fit_in_the_bytes_left() {
        for (bytes, needle) in [
            (
                &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01][..],
                "array declares 4294967295 items",
            ),
            (
                &[0xdf, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02],
                "map declares 8589934590 items",
            ),
            (
                &[0xdc, 0x00, 0x03, 0x01, 0x02],
                "array declares 3 items but only 2",
            ),
            (
                &[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
                "needs 4294967295 bytes",
            ),
            (&[0xc6, 0x00, 0x00, 0x01, 0x00], "needs 256 bytes"),
            (
                &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
                "needs 4294967296 bytes",
            ),
            (&[0xcf, 0x00], "needs 8 bytes but only 1"),
            (&[0x91], "array declares 1 items but only 0"),
            (&[0x92, 0x01, 0xcd, 0x01], "needs 2 bytes but only 1"),
            (&[], "needs 1 bytes"),
            (&[0xc1], "0xc1"),
        ] {
            let error = check(bytes).unwrap_err().to_string();
            assert!(error.contains(needle), "{bytes:x?}: {error}");
        }
    }

    #[test]
    fn every_kind_of_value_passes() {
        let value = json!({
            "type": "publish",
            "room": "r",
            "data": {"s": "x".repeat(300), "n": [0, -1, 255, -129, 70000, -70000, u64::MAX, i64::MIN, 1.5],
                     "b": [true, false, null], "e": [], "m": {}}
        });
        let bytes = rmp_serde::to_vec_named(&value).unwrap();
        check(&bytes).unwrap();
        assert_eq!(from_slice::<Value>(&bytes).unwrap(), value);
        // bin 8/16, fixext 1..16, ext 8: none of them come out of serde_json values.
        for bytes in [
            &[0xc4, 0x01, 0xaa][..],
            &[0xc5, 0x00, 0x01, 0xaa],
            &[0xd4, 0x01, 0xaa],
            &[0xd8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xc7, 0x02, 0x05, 0xaa, 0xbb],
            &[0x82, 0xa1, b'a', 0xc0, 0xa1, b'b', 0x91, 0x90],
        ] {
            check(bytes).unwrap_or_else(|error| panic!("{bytes:x?}: {error}"));
        }
    }
}
