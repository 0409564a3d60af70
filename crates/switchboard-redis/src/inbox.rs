//! The user inbox (persisted sends, acks, inbox pages) and keyed publishes: each one script on
//! one shard, in one round trip (lua/inbox_send.lua, lua/ack.lua, lua/inbox_read.lua and the
//! keyed path of lua/publish.lua).

use std::sync::Arc;

use serde_json::Value as Json;
use switchboard_broker::{
    Acked, BrokerError, BrokerResult, DirectMessage, Inbox, InboxEntry, InboxPosition, Published,
    Sent,
};
use switchboard_protocol::{RoomMessage, Sender};

use crate::{Inner, envelope, epoch_digits, keys, millis, scripts};

/// One inbox log entry as XRANGE answers it: id, then field names and values.
type LogEntry = (String, Vec<Vec<u8>>);

impl Inner {
    pub(crate) async fn publish_keyed(
        &self,
        room: &str,
        data: Json,
        from: Option<Sender>,
        key: &str,
    ) -> BrokerResult<Published> {
        let stored = envelope::Stored { data, from };
        let payload = envelope::pack(&stored)?;
        let shard = self.shard(room);
        let (offset, epoch, duplicate, first): (u64, String, u8, Option<Vec<u8>>) = self
            .call_write(shard, "publish_keyed", async |connection| {
                scripts::PUBLISH
                    .key(keys::room_meta(room))
                    .key(keys::room_log(room))
                    .key(keys::room_channel(room))
                    .key(keys::publish_key(room, key))
                    .arg(payload)
                    .arg(self.config.history_size)
                    .arg(millis(self.config.history_ttl))
                    .arg(millis(self.config.stream_ttl))
                    .arg(epoch_digits())
                    .arg(millis(self.config.idempotency_window))
                    .invoke_async(connection)
                    .await
            })
            .await?;
        // A duplicate answers the first publish's data and sender while history holds them;
        // after that, the repeat's own (a retry carries the same).
        let stored = match first {
            Some(first) => envelope::unpack(&first)?,
            None => stored,
        };
        Ok(Published {
            message: Arc::new(RoomMessage {
                room: room.to_owned(),
                data: stored.data,
                offset,
                epoch,
                from: stored.from,
            }),
            duplicate: duplicate == 1,
        })
    }

    pub(crate) async fn send_persisted(
        &self,
        message: DirectMessage,
        key: Option<&str>,
    ) -> BrokerResult<Sent> {
        let user = message.user;
        let direct =
            envelope::persisted_direct(user.clone(), message.data.clone(), message.from.clone())?;
        let payload = envelope::pack(&envelope::Stored {
            data: message.data,
            from: message.from,
        })?;
        let shard = self.shard(&user);
        let (sessions, seq, epoch, duplicate, dropped): (u64, u64, String, u8, u64) = self
            .call_write(shard, "send_persisted", async |connection| {
                let mut invocation = scripts::INBOX_SEND.prepare_invoke();
                invocation
                    .key(keys::user_inbox_meta(&user))
                    .key(keys::user_inbox_log(&user))
                    .key(keys::user_sessions(&user));
                if let Some(key) = key {
                    invocation.key(keys::send_key(&user, key));
                }
                invocation
                    .arg(direct)
                    .arg(payload)
                    .arg(self.config.inbox_size)
                    .arg(millis(self.config.inbox_ttl))
                    .arg(millis(self.config.idempotency_window))
                    .arg(epoch_digits())
                    .arg(keys::NODE_ALIVE_PREFIX)
                    .arg(keys::INBOX_PREFIX)
                    .invoke_async(connection)
                    .await
            })
            .await?;
        Ok(Sent {
            sessions,
            seq,
            epoch,
            duplicate: duplicate == 1,
            dropped,
        })
    }

    pub(crate) async fn ack(&self, user: &str, seq: u64) -> BrokerResult<Acked> {
        let shard = self.shard(user);
        let (inbox_seq, acked, epoch, done): (u64, u64, String, u8) = self
            .call_write(shard, "ack", async |connection| {
                scripts::ACK
                    .key(keys::user_inbox_meta(user))
                    .key(keys::user_inbox_log(user))
                    .arg(seq)
                    .arg(millis(self.config.inbox_ttl))
                    .arg(epoch_digits())
                    .invoke_async(connection)
                    .await
            })
            .await?;
        let position = InboxPosition {
            seq: inbox_seq,
            acked,
            epoch,
        };
        Ok(if done == 1 {
            Acked::Done(position)
        } else {
            Acked::BeyondSeq(position)
        })
    }

    pub(crate) async fn inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BrokerResult<Inbox> {
        let shard = self.shard(user);
        let (seq, acked, epoch, entries, more): (u64, u64, String, Vec<LogEntry>, u8) = self
            .call(shard, "inbox", async |connection| {
                scripts::INBOX_READ
                    .key(keys::user_inbox_meta(user))
                    .key(keys::user_inbox_log(user))
                    .arg(after)
                    .arg(limit)
                    .arg(max_bytes)
                    .arg(millis(self.config.inbox_ttl))
                    .arg(epoch_digits())
                    .invoke_async(connection)
                    .await
            })
            .await?;
        let pending = entries
            .into_iter()
            .map(parse_entry)
            .collect::<BrokerResult<Vec<_>>>()?;
        Ok(Inbox {
            position: InboxPosition { seq, acked, epoch },
            pending,
            more: more == 1,
        })
    }
}

fn parse_entry((id, fields): LogEntry) -> BrokerResult<InboxEntry> {
    let bad = |what: &str| BrokerError::Internal(format!("inbox entry {id}: {what}"));
    let seq = id
        .split_once('-')
        .and_then(|(seq, _)| seq.parse().ok())
        .ok_or_else(|| bad("bad id"))?;
    let field = |name: &[u8]| {
        fields.chunks(2).find_map(|pair| match pair {
            [field, value] if field == name => Some(value.as_slice()),
            _ => None,
        })
    };
    let stored: envelope::Stored = envelope::unpack(field(b"p").ok_or_else(|| bad("no payload"))?)?;
    let at = field(b"t")
        .and_then(|stamp| std::str::from_utf8(stamp).ok()?.parse().ok())
        .ok_or_else(|| bad("no time"))?;
    Ok(InboxEntry {
        seq,
        data: stored.data,
        from: stored.from,
        at,
    })
}
