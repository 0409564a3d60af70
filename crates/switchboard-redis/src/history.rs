//! History reads: the READ script and its answer.

use std::sync::Arc;

use redis::{ParsingError, Value};
use switchboard_broker::{BrokerError, BrokerResult, History, HistoryQuery};
use switchboard_protocol::{RoomMessage, StreamPosition};

use crate::{Inner, envelope, epoch_digits, keys, millis, scripts};

/// One history entry as read: offset, stored payload.
type LogEntry = (u64, Vec<u8>);

/// One page of history as [`Inner::read`] returns it.
pub(crate) struct ReadPage {
    pub(crate) position: StreamPosition,
    pub(crate) messages: Vec<Arc<RoomMessage>>,
    /// Entries after the requested offset had passed the history TTL (so the page may not start
    /// the gap).
    pub(crate) expired: bool,
    pub(crate) more: bool,
}

impl Inner {
    /// One page of a room's history (see the READ script).
    pub(crate) async fn read(
        &self,
        room: &str,
        since: Option<u64>,
        count: i64,
        max_bytes: Option<usize>,
    ) -> BrokerResult<ReadPage> {
        let shard = self.shard(room);
        let budget = max_bytes.map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX));
        let mode = if since.is_some() { "since" } else { "newest" };
        let value: Value = self
            .call(shard, "read", async |connection| {
                scripts::READ
                    .key(keys::room_meta(room))
                    .key(keys::room_log(room))
                    .arg(millis(self.config.stream_ttl))
                    .arg(mode)
                    .arg(since.unwrap_or(0))
                    .arg(count)
                    .arg(budget)
                    .arg(millis(self.config.history_ttl))
                    .invoke_async(connection)
                    .await
            })
            .await?;
        let (mut position, entries, more, expired) = parse_read(value)?;
        if position.offset == 0 && position.epoch.len() == 8 {
            // A room without state: an epoch of the shard's generation, stored nowhere (reads
            // create nothing).
            position.epoch.push_str(&epoch_digits());
        }
        let mut messages = Vec::with_capacity(entries.len());
        for (offset, payload) in entries {
            let stored: envelope::Stored = envelope::unpack(&payload)?;
            messages.push(Arc::new(RoomMessage {
                room: room.to_owned(),
                data: stored.data,
                offset,
                epoch: position.epoch.clone(),
                from: stored.from,
            }));
        }
        Ok(ReadPage {
            position,
            messages,
            expired,
            more,
        })
    }
}

/// Why the READ script's answer could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("READ: not an array")]
    NotAnArray,
    #[error("READ: expected 5 parts")]
    Parts,
    #[error("READ: entries not an array")]
    EntriesNotAnArray,
    #[error("READ: entry not an array")]
    EntryNotAnArray,
    #[error("READ: bad entry id")]
    BadEntryId,
    #[error("READ: entry without payload")]
    NoPayload,
    #[error(transparent)]
    Value(#[from] ParsingError),
}

impl From<ReadError> for BrokerError {
    fn from(error: ReadError) -> Self {
        BrokerError::Internal(error.to_string())
    }
}

/// Parses the READ script's `{offset, epoch, entries, more, expired}`.
fn parse_read(value: Value) -> Result<(StreamPosition, Vec<LogEntry>, bool, bool), ReadError> {
    let Value::Array(mut parts) = value else {
        return Err(ReadError::NotAnArray);
    };
    if parts.len() != 5 {
        return Err(ReadError::Parts);
    }
    let expired: i64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))?;
    let more: i64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))?;
    let entries = parts.pop().unwrap_or(Value::Nil);
    let epoch: String = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))?;
    let offset: u64 = redis::from_redis_value(parts.pop().unwrap_or(Value::Nil))?;
    let entries = match entries {
        Value::Array(entries) => entries,
        // What a range with COUNT 0 answers; the script avoids it, but it means "none".
        Value::Nil => Vec::new(),
        _ => return Err(ReadError::EntriesNotAnArray),
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut entry) = entry else {
            return Err(ReadError::EntryNotAnArray);
        };
        let fields = entry.pop().unwrap_or(Value::Nil);
        let id: String = redis::from_redis_value(entry.pop().unwrap_or(Value::Nil))?;
        let offset = id
            .split_once('-')
            .and_then(|(offset, _)| offset.parse().ok())
            .ok_or(ReadError::BadEntryId)?;
        let fields: Vec<Vec<u8>> = redis::from_redis_value(fields)?;
        let payload = fields
            .chunks(2)
            .find_map(|pair| match pair {
                [name, value] if name == b"p" => Some(value.clone()),
                _ => None,
            })
            .ok_or(ReadError::NoPayload)?;
        parsed.push((offset, payload));
    }
    Ok((
        StreamPosition { offset, epoch },
        parsed,
        more == 1,
        expired == 1,
    ))
}

impl Inner {
    pub(crate) async fn history(&self, room: &str, query: HistoryQuery) -> BrokerResult<History> {
        let count = query.limit.map_or(-1, |limit| limit as i64);
        match &query.since {
            None => {
                let count = query.limit.unwrap_or(self.config.history_size) as i64;
                let page = self.read(room, None, count, query.max_bytes).await?;
                Ok(History {
                    messages: page.messages,
                    position: page.position,
                    recovered: false,
                    more: page.more,
                })
            }
            Some(since) => {
                let page = self
                    .read(room, Some(since.offset), count, query.max_bytes)
                    .await?;
                let position = page.position;
                // Offset 0 is "nothing seen yet": any epoch of the shard's generation recovers from
                // the room's first message.
                if !switchboard_broker::resumable(since, &position) {
                    return Ok(History {
                        messages: Vec::new(),
                        position,
                        recovered: false,
                        more: false,
                    });
                }
                // An expired entry skipped on the way may have been the next one.
                let next_held = if page.expired {
                    None
                } else {
                    page.messages.first().map(|message| message.offset)
                };
                let recovered = switchboard_broker::recovered(since, &position, next_held);
                Ok(History {
                    messages: page.messages,
                    position,
                    recovered,
                    more: page.more,
                })
            }
        }
    }
}
