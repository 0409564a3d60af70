//! Rust client for switchboard, a WebSocket gateway.
//!
//! [`Client::connect`] opens a connection and waits for the server's `welcome`. Requests
//! ([`subscribe`](Client::subscribe), [`publish`](Client::publish), [`send`](Client::send),
//! [`presence`](Client::presence), [`history`](Client::history), [`ping`](Client::ping)) are
//! matched to their answers by id; everything else the server sends arrives as an [`Event`]
//! from [`Client::next_event`].
//!
//! Persisted direct messages ([`send_persisted`](Client::send_persisted)) are stored in the
//! recipient's inbox; the unacknowledged ones follow every `welcome` and arrive, like live ones,
//! as [`Event::PersistedDirect`] with their `seq`, until acknowledged with
//! [`ack`](Client::ack) or [`ConnectOptions::auto_ack`]. With [`ConnectOptions::retry`] a
//! publish or persisted send whose connection dropped before its answer is sent again after the
//! reconnect with the same idempotency key, so it is carried out once.
//!
//! [`ConnectOptions::codec`] picks the wire codec: JSON (the default), MessagePack, or JSON
//! compressed with raw DEFLATE (`Codec::JsonDeflate`), which the server compresses once per
//! fan-out for all of its subscribers.
//!
//! ```no_run
//! # async fn inbox() -> Result<(), switchboard_client::ClientError> {
//! use switchboard_client::{Client, ConnectOptions, Event, SendOptions};
//!
//! let options = ConnectOptions { auto_ack: true, retry: true, ..ConnectOptions::default() };
//! let client = Client::connect("ws://127.0.0.1:8080/ws", options).await?;
//! let sent = client
//!     .send_persisted("bob", serde_json::json!({"text": "hi"}), SendOptions::default())
//!     .await?;
//! println!("stored as #{} (reached {} sessions now)", sent.seq, sent.sessions);
//! while let Some(event) = client.next_event().await {
//!     if let Event::PersistedDirect { data, seq, .. } = event {
//!         // Acknowledged when the loop asks for the next event.
//!         println!("#{seq}: {data}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! When the connection drops the client reconnects with jittered exponential back-off
//! ([`ReconnectPolicy`]) and resubscribes every room from the last position it saw, so no
//! message is missed or delivered twice while history holds them. It stops for good after
//! [`Client::close`], a policy close (1008), a handshake refused for bad credentials or origin,
//! or `max_attempts` failed attempts; [`Event::Closed`] says so.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_client::ClientError> {
//! use switchboard_client::{Client, ConnectOptions, Event};
//!
//! let options = ConnectOptions { user: Some("alice".into()), ..ConnectOptions::default() };
//! let client = Client::connect("ws://127.0.0.1:8080/ws", options).await?;
//! client.subscribe("chat").await?;
//! client.publish("chat", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = client.next_event().await {
//!     if let Event::Message(message) = event {
//!         println!("{}: {}", message.offset, message.data);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod backoff;
mod client;
mod driver;
mod error;
mod event;
mod inbox;
mod options;
mod rooms;
#[cfg(test)]
mod tests;

pub use backoff::ReconnectPolicy;
pub use client::{Client, HistoryReply, SubscribeOptions, Subscription};
pub use error::ClientError;
pub use event::Event;
pub use inbox::{InboxPosition, MAX_KEY_BYTES, PublishOptions, Published, SendOptions, Sent};
pub use options::ConnectOptions;
pub use switchboard_protocol::{
    Codec, ErrorCode, ErrorFrame, Member, PresenceNotice, RoomMessage, Sender, StreamPosition,
    close,
};
/// The WebSocket library, for building [`Message`](tungstenite::Message)s for
/// [`Client::send_raw`].
pub use tokio_tungstenite::tungstenite;
