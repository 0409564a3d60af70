//! Frames of the `switchboard.v1.json+deflate` codec: one flag byte, then the JSON as is
//! ([`STORED`]) or as raw DEFLATE, RFC 1951 ([`DEFLATED`]). Each frame stands alone: no shared
//! dictionary and no context between frames, so a sender compresses a frame once for any number
//! of receivers and keeps no compressor state per connection.

use std::borrow::Cow;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;

/// Flag byte: the JSON follows as is.
pub const STORED: u8 = 0;
/// Flag byte: the JSON follows as raw DEFLATE.
pub const DEFLATED: u8 = 1;
/// JSON shorter than this goes stored: DEFLATE's block overhead and the CPU would buy nothing.
pub const COMPRESS_MIN_BYTES: usize = 256;
/// What [`Codec::decode`](crate::Codec::decode) inflates at most when the caller gives no limit
/// of its own: no deflate frame makes a decoder hold more than this.
pub const DEFAULT_INFLATE_LIMIT: usize = 64 << 20;

/// Why a deflate-codec frame did not unpack.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("empty frame: a deflate-codec frame starts with a flag byte")]
    Empty,
    #[error("unknown flag byte {0} (0 = stored, 1 = deflate)")]
    UnknownFlag(u8),
    /// The JSON inside is over the limit; nothing past the limit was inflated.
    #[error("the frame inflates to more than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("corrupt deflate data: {0}")]
    Corrupt(std::io::Error),
}

/// The frame for `json`: with a leading [`STORED`] byte when compressing would not make it
/// smaller (or it is under [`COMPRESS_MIN_BYTES`]), else the [`DEFLATED`] byte and the DEFLATE
/// stream. `stored` is the frame already laid out as stored: the flag byte, then the JSON.
pub fn pack(stored: Vec<u8>) -> Vec<u8> {
    debug_assert_eq!(stored.first(), Some(&STORED));
    let json = &stored[1..];
    if json.len() < COMPRESS_MIN_BYTES {
        return stored;
    }
    let mut frame = Vec::with_capacity(json.len() / 2);
    frame.push(DEFLATED);
    let mut encoder = DeflateEncoder::new(frame, Compression::default());
    // Writing into a Vec cannot fail.
    let compressed = encoder.write_all(json).and_then(|()| encoder.finish()).ok();
    match compressed {
        Some(frame) if frame.len() < stored.len() => frame,
        _ => stored,
    }
}

/// The JSON inside a frame, inflating at most `limit` bytes of it: a frame that inflates to
/// more is refused before more than `limit + 1` bytes are produced.
pub fn unpack(frame: &[u8], limit: usize) -> Result<Cow<'_, [u8]>, UnpackError> {
    match frame.split_first() {
        None => Err(UnpackError::Empty),
        Some((&STORED, json)) if json.len() > limit => Err(UnpackError::TooLarge { limit }),
        Some((&STORED, json)) => Ok(Cow::Borrowed(json)),
        Some((&DEFLATED, compressed)) => {
            let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
            let mut json = Vec::new();
            DeflateDecoder::new(compressed)
                .take(bound)
                .read_to_end(&mut json)
                .map_err(UnpackError::Corrupt)?;
            if json.len() > limit {
                return Err(UnpackError::TooLarge { limit });
            }
            Ok(Cow::Owned(json))
        }
        Some((&flag, _)) => Err(UnpackError::UnknownFlag(flag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(json: &[u8]) -> Vec<u8> {
        let mut frame = vec![STORED];
        frame.extend_from_slice(json);
        frame
    }

    fn chat_message() -> Vec<u8> {
        let text = "the quick brown fox jumps over the lazy dog; ".repeat(20);
        serde_json::to_vec(
            &serde_json::json!({"type": "message", "room": "chat", "data": {"text": text}}),
        )
        .unwrap()
    }

    #[test]
    fn small_frames_go_stored_and_large_ones_compressed() {
        let small = br#"{"type":"pong","id":1}"#;
        assert_eq!(pack(stored(small)), stored(small));
        let json = chat_message();
        assert!(json.len() > COMPRESS_MIN_BYTES);
        let frame = pack(stored(&json));
        assert_eq!(frame[0], DEFLATED);
        assert!(
            frame.len() * 3 < json.len(),
            "{} of {}",
            frame.len(),
            json.len()
        );
        assert_eq!(unpack(&frame, json.len()).unwrap(), json.as_slice());
    }

    #[test]
    fn incompressible_frames_go_stored() {
        // Uniformly random bytes: DEFLATE's stored blocks would only add overhead. (Any JSON
        // this long shrinks at least by Huffman coding: it uses under 128 byte values.)
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[3]
            })
            .collect();
        let frame = pack(stored(&noise));
        assert_eq!(frame, stored(&noise));
        assert_eq!(unpack(&frame, noise.len()).unwrap(), noise.as_slice());
    }

    #[test]
    fn a_decompression_bomb_is_refused_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let mut encoder = DeflateEncoder::new(vec![DEFLATED], Compression::best());
        encoder.write_all(&zeros).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let limit = 1 << 20;
        assert!(matches!(
            unpack(&bomb, limit),
            Err(UnpackError::TooLarge { limit: 1048576 })
        ));
        // Exactly at the limit is allowed.
        assert_eq!(unpack(&bomb, 10 << 20).unwrap().len(), 10 << 20);
        let json = chat_message();
        assert!(matches!(
            unpack(&stored(&json), json.len() - 1),
            Err(UnpackError::TooLarge { .. })
        ));
    }

    #[test]
    fn corrupt_data_unknown_flags_and_empty_frames_are_refused() {
        assert!(matches!(
            unpack(&[DEFLATED, 0xff, 0xff, 0xff], 1 << 20),
            Err(UnpackError::Corrupt(_))
        ));
        let frame = pack(stored(&chat_message()));
        let truncated = &frame[..frame.len() / 2];
        assert!(matches!(
            unpack(truncated, 1 << 20),
            Err(UnpackError::Corrupt(_))
        ));
        assert!(matches!(
            unpack(b"\x02{}", 1 << 20),
            Err(UnpackError::UnknownFlag(2))
        ));
        assert!(matches!(
            unpack(b"{}", 1 << 20),
            Err(UnpackError::UnknownFlag(b'{'))
        ));
        assert!(matches!(unpack(b"", 1 << 20), Err(UnpackError::Empty)));
    }
}
