//! A `switchboard.v1.json+deflate` client frame (flag byte, then JSON stored or raw DEFLATE):
//! unpacking never panics nor yields more than its limit, and what decodes survives every
//! encoder unchanged.
#![no_main]

mod round_trip;

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::Codec;
use switchboard_protocol::deflate::unpack;

/// Small, so that inputs inflating past it (bombs) are common.
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = unpack(data, LIMIT) {
        assert!(json.len() <= LIMIT);
    }
    round_trip::check(Codec::JsonDeflate, data);
});
