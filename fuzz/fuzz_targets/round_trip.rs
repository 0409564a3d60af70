//! The check both client-frame targets make: a frame that decodes survives both encoders
//! unchanged (the node re-encodes a frame's `data` for peers of either codec).

use switchboard_protocol::{Codec, Encoded};

pub fn check(codec: Codec, data: &[u8]) {
    let Ok(frame) = codec.decode_client(data) else {
        return;
    };
    for codec in Codec::ALL {
        let bytes = match codec.encode(&frame).expect("a decoded frame encodes") {
            Encoded::Text(text) => text.into_bytes(),
            Encoded::Binary(bytes) => bytes,
        };
        assert_eq!(
            codec.decode_client(&bytes).as_ref(),
            Ok(&frame),
            "{codec:?}"
        );
    }
}
