//! One client connection. Request handling (`core.rs`) takes decoded frames and knows nothing of
//! the transport; the abuse limits (`guards.rs`) count frames whatever carries them; the WebSocket
//! loop (`websocket.rs`) is one adapter around both. One task per session reads client frames,
//! answers requests and writes the session's outbound queue, so a request's reply and a `since`
//! recovery are written before any live message queued behind them, and per-room offsets drop
//! anything written already.

mod core;
mod fallback;
mod guards;
mod inbound;
mod websocket;

use std::net::{IpAddr, SocketAddr};

use switchboard_protocol::Codec;

pub use self::fallback::{Kind, PollAnswer, Started, json_array, key_hash, start};
pub use self::websocket::{read_error_close, run};
use crate::auth::Identity;
use crate::queue::CloseRequest;

/// What the handshake established about a connection.
pub struct Admission {
    pub identity: Identity,
    pub codec: Codec,
    /// The TCP peer (a load balancer, when there is one).
    pub remote: SocketAddr,
    /// The client: the peer, or what a trusted proxy's X-Forwarded-For says.
    pub client: IpAddr,
}

/// How a session ended.
enum Exit {
    /// The server closes the connection with this code.
    Close(CloseRequest),
    /// The peer closed or the connection broke.
    Gone,
}

fn close_with(code: u16, reason: &str) -> Exit {
    Exit::Close(CloseRequest {
        code,
        reason: reason.to_owned(),
    })
}

fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
