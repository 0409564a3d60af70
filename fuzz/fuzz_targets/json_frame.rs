//! A JSON client frame: decoding never panics, and what decodes survives both encoders unchanged
//! (the node re-encodes a frame's `data` for peers of either codec).
#![no_main]

mod round_trip;

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::Codec;

fuzz_target!(|data: &[u8]| round_trip::check(Codec::Json, data));
