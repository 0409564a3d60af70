//! Durable direct messages and idempotency keys: the options and answers of persisted `send`
//! and keyed `publish`, and what the client tracks of the user's inbox. The wire fields are
//! `switchboard-protocol`'s.

use crate::ClientError;

/// The server's bound on an idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;

/// Where a user's inbox of persisted direct messages stands: `seq` of the latest message stored
/// (0: none), everything up to `acked` acknowledged, both counted in `epoch`, which changes when
/// the inbox's history is lost. The protocol crate's `InboxState`, the welcome's `inbox`.
pub use switchboard_protocol::InboxState as InboxPosition;

/// Options of [`Client::publish_with`](crate::Client::publish_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Idempotency key, 1 to 64 bytes: a repeat within the server's
    /// `--idempotency-window-secs` creates nothing and is answered with `duplicate: true`.
    pub key: Option<String>,
    /// Retry through a reconnect with the key (a generated one when `key` is `None`); `None`
    /// follows [`ConnectOptions::retry`](crate::ConnectOptions::retry).
    pub retry: Option<bool>,
}

/// Options of [`Client::send_persisted`](crate::Client::send_persisted): as for publish.
pub type SendOptions = PublishOptions;

/// The answer to a keyed publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub epoch: String,
    /// The key had been used within the window: this is the first publish's answer.
    pub duplicate: bool,
}

/// The answer to a persisted send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Sessions it reached now.
    pub sessions: u64,
    /// Its seq in the recipient's inbox.
    pub seq: u64,
    /// The key had been used within the window: this is the first send's answer.
    pub duplicate: bool,
}

/// The key to send: the caller's, checked, or a generated one when retrying without one.
pub(crate) fn key_for(key: Option<String>, retry: bool) -> Result<Option<String>, ClientError> {
    match key {
        Some(key) if key.is_empty() || key.len() > MAX_KEY_BYTES => {
            Err(ClientError::InvalidRequest(format!(
                "key {key:?}: must be 1 to {MAX_KEY_BYTES} bytes, not {}",
                key.len()
            )))
        }
        Some(key) => Ok(Some(key)),
        // 128 random bits: no two requests of any client share one within the window.
        None if retry => Ok(Some(format!("{:032x}", rand::random::<u128>()))),
        None => Ok(None),
    }
}

/// What the client knows of the inbox, and what it delivered and wants acknowledged.
#[derive(Debug, Default)]
pub(crate) struct InboxState {
    /// The latest welcome's, raised by persisted directs and acks.
    pub(crate) position: InboxPosition,
    /// The highest seq delivered as an event in the position's epoch.
    delivered: u64,
    /// The highest seq automatic acks should acknowledge.
    ack_wanted: u64,
    pub(crate) ack_in_flight: bool,
}

impl InboxState {
    /// Takes a welcome's position. In the same epoch what was delivered stays delivered (the
    /// redelivered unacknowledged messages are dropped up to it); a new epoch starts over.
    pub(crate) fn welcome(&mut self, announced: InboxPosition) {
        if self.position.epoch == announced.epoch {
            self.delivered = self.delivered.max(announced.acked);
        } else {
            self.delivered = announced.acked;
            self.ack_wanted = 0;
        }
        self.ack_in_flight = false;
        self.position = announced;
    }

    /// Whether a persisted direct with `seq` is new to this client.
    pub(crate) fn accept(&mut self, seq: u64) -> bool {
        if seq <= self.delivered {
            return false;
        }
        self.delivered = seq;
        self.position.seq = self.position.seq.max(seq);
        true
    }

    pub(crate) fn handled(&mut self, seq: u64) {
        self.ack_wanted = self.ack_wanted.max(seq);
    }

    /// The seq an automatic ack should acknowledge now, if any (none while one is in flight).
    pub(crate) fn ack_due(&self) -> Option<(u64, String)> {
        (!self.ack_in_flight && self.ack_wanted > self.position.acked)
            .then(|| (self.ack_wanted, self.position.epoch.clone()))
    }

    /// Records an ack the server accepted, unless the inbox changed epoch meanwhile.
    pub(crate) fn acked(&mut self, epoch: &str, seq: u64) {
        if self.position.epoch == epoch {
            self.position.acked = self.position.acked.max(seq);
        }
    }
}
