//! A JSON client frame: decoding never panics, and what decodes survives both encoders unchanged
//! (the node re-encodes a frame's `data` for peers of either codec).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::{Codec, Encoded};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Codec::Json.decode_client(data) else {
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
});
