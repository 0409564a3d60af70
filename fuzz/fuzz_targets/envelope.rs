//! A payload from a Redis pub/sub channel or history entry: decoding never panics, whoever wrote it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_redis::envelope;

fuzz_target!(|data: &[u8]| {
    let _ = envelope::decode(Some("room"), data);
    let _ = envelope::decode(None, data);
    let _ = envelope::unpack::<envelope::Stored>(data);
});
