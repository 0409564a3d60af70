//! The switchboard wire protocol, version 1.
//!
//! Frames are plain serde types: one JSON object per text frame with the `switchboard.v1.json`
//! subprotocol, one MessagePack map (string keys) per binary frame with `switchboard.v1.msgpack`.
//! Both codecs carry the same field names and values, so a message published by a JSON client
//! reaches a MessagePack client unchanged. `switchboard.v1.json+deflate` carries the JSON in
//! binary frames, compressed when that makes them smaller (see [`deflate`]). The server and the Rust client share these types.

pub mod api;
mod codec;
pub mod deflate;
mod frames;
pub mod msgpack;

pub use codec::{Codec, DecodeError, EncodeError, Encoded, ParseError};
pub use frames::*;

/// Subprotocol name of the JSON codec.
pub const JSON_PROTOCOL: &str = "switchboard.v1.json";
/// Subprotocol name of the MessagePack codec.
pub const MSGPACK_PROTOCOL: &str = "switchboard.v1.msgpack";

/// Subprotocol name of the compressed JSON codec (see [`deflate`]).
pub const JSON_DEFLATE_PROTOCOL: &str = "switchboard.v1.json+deflate";

/// WebSocket close codes the server sends, and what a client should do about each.
pub mod close {
    /// Normal close (also: idle timeout, or `POST /api/disconnect` without a code).
    pub const NORMAL: u16 = 1000;
    /// The node is shutting down or draining: reconnect, to another node, and resume with `since`.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (e.g. an unmasked frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8 (RFC 6455 requires closing the connection).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: forbidden, token expired, too many bad frames, sustained rate-limit abuse. Do not retry
    /// with the same credentials.
    pub const POLICY: u16 = 1008;
    /// A frame or message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// Overloaded, or a reader too slow for its queue: retry later with back-off, resume with `since`.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}
