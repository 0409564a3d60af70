//! A MessagePack client frame: decoding never panics, and what decodes is something a JSON peer
//! can decode too (the same depth limit in both codecs).
#![no_main]

mod round_trip;

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::Codec;

fuzz_target!(|data: &[u8]| round_trip::check(Codec::MsgPack, data));
