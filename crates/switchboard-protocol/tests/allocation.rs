//! Decoding a hostile MessagePack frame allocates no more than the frame's size suggests. Its own
//! test binary, because it counts every allocation of the process.

use std::alloc::System;

use serde_json::json;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use switchboard_protocol::{Codec, ErrorCode};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated (fresh or by growing) while `decode` runs: an upper bound of its peak.
fn allocated_by(decode: impl FnOnce()) -> usize {
    let region = Region::new(ALLOCATOR);
    decode();
    let stats = region.change();
    stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize
}

/// One test: the counts are process-wide, so tests running beside it would add to them.
#[test]
fn hostile_frames_allocate_little() {
    let header = |key: &str| {
        let mut bytes = vec![0x83, 0xa4];
        bytes.extend_from_slice(b"type");
        bytes.push(0xa7);
        bytes.extend_from_slice(b"publish");
        bytes.push(0xa0 | key.len() as u8);
        bytes.extend_from_slice(key.as_bytes());
        bytes
    };
    let frames: Vec<Vec<u8>> = vec![
        vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00],
        [header("data"), vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0x90]].concat(),
        [header("data"), vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0x90]].concat(),
        [header("room"), vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'r']].concat(),
        [header("data"), vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0x00]].concat(),
    ];
    for frame in frames {
        let mut code = None;
        let allocated =
            allocated_by(|| code = Some(Codec::MsgPack.decode_client(&frame).map_err(|e| e.code)));
        assert_eq!(code, Some(Err(ErrorCode::BadFrame)), "{frame:x?}");
        assert!(allocated < 4096, "{frame:x?}: {allocated} bytes allocated");
    }

    // The check itself costs little on the deepest frame accepted.
    let data = (1..switchboard_protocol::msgpack::MAX_DATA_DEPTH)
        .fold(json!([]), |inner, _| json!([inner]));
    let frame =
        rmp_serde::to_vec_named(&json!({"type": "publish", "room": "r", "data": data})).unwrap();
    let mut decoded = None;
    let allocated = allocated_by(|| decoded = Some(Codec::MsgPack.decode_client(&frame)));
    assert!(decoded.unwrap().is_ok());
    assert!(
        allocated < 64 * 1024,
        "{allocated} bytes for a {}-byte frame",
        frame.len()
    );
}
