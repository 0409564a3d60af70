//! A shard's pub/sub task: subscriptions, delivery to the node, and replay after a reconnect.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{RedisError, Value};
use switchboard_broker::{
    BrokerError, BrokerHandler, BrokerResult, DirectMessage, PresenceChange, PresenceEvent,
};
use switchboard_protocol::{RoomMessage, StreamPosition};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::{self, Envelope};
use crate::{COMMAND_TIMEOUT, Inner, MAX_BACKOFF, MIN_BACKOFF, keys};

pub(crate) enum Control {
    Subscribe {
        room: String,
        done: oneshot::Sender<BrokerResult<()>>,
    },
    Unsubscribe {
        room: String,
    },
    /// A page of a room's replay after a reconnect (see [`replay`]), from replay round `round`;
    /// `done` on the room's last.
    Replayed {
        round: u64,
        room: String,
        messages: Vec<Arc<RoomMessage>>,
        done: bool,
    },
    Stop,
}

/// Payload bytes read per page when replaying a room after a reconnect.
pub(crate) const REPLAY_PAGE_BYTES: usize = 1 << 20;

impl Inner {
    pub(crate) fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    /// Hands one pub/sub payload to the node. A room message of a room being replayed waits in
    /// `replaying` until the replay has delivered what came before it.
    pub(crate) fn dispatch(
        &self,
        rooms: &mut HashMap<String, Option<StreamPosition>>,
        replaying: &mut HashMap<String, Vec<Arc<RoomMessage>>>,
        channel: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let Some(handler) = self.handler() else {
            return Ok(());
        };
        let room = keys::room_of_channel(channel);
        match envelope::decode(room, payload)? {
            Envelope::Room(message) => match replaying.get_mut(&message.room) {
                Some(waiting) => waiting.push(Arc::new(message)),
                None => self.deliver(rooms, Arc::new(message)),
            },
            Envelope::Join(notice) => handler.presence(PresenceEvent {
                change: PresenceChange::Join,
                notice,
            }),
            Envelope::Leave(notice) => handler.presence(PresenceEvent {
                change: PresenceChange::Leave,
                notice,
            }),
            Envelope::Direct(direct) => handler.direct(Arc::new(DirectMessage {
                user: direct.user,
                data: direct.data,
                from: direct.from,
            })),
            Envelope::Disconnect(disconnect) => {
                handler.disconnect(&disconnect.user, disconnect.code, &disconnect.reason)
            }
            Envelope::Broadcast(data) => handler.broadcast(Arc::new(data)),
        }
        Ok(())
    }

    /// Hands a room message to the node; remembers each room's newest offset for replay.
    pub(crate) fn deliver(
        &self,
        rooms: &mut HashMap<String, Option<StreamPosition>>,
        message: Arc<RoomMessage>,
    ) {
        let Some(handler) = self.handler() else {
            return;
        };
        if let Some(position) = rooms.get_mut(&message.room) {
            *position = Some(StreamPosition {
                offset: message.offset,
                epoch: message.epoch.clone(),
            });
        }
        handler.room_message(message);
    }

    /// Reads, page by page, what `room` published after `position` (the newest message this node
    /// received), handing each page to `page`. Sessions drop what they already have by offset.
    pub(crate) async fn replay_room(
        &self,
        room: &str,
        position: Option<StreamPosition>,
        mut page: impl FnMut(Vec<Arc<RoomMessage>>),
    ) {
        let mut since = position.as_ref().map_or(0, |position| position.offset);
        let mut first = true;
        loop {
            let mut read = self
                .read(room, Some(since), -1, Some(REPLAY_PAGE_BYTES))
                .await;
            if let (true, Ok(read_page), Some(seen)) = (first, &read, position.as_ref())
                && read_page.position.epoch != seen.epoch
                && since > 0
            {
                // The room started a new epoch (Redis restarted, failed over, or lost it): every
                // message of the new epoch, even those published before this connection was
                // back, is new to this node.
                since = 0;
                read = self.read(room, Some(0), -1, Some(REPLAY_PAGE_BYTES)).await;
            }
            first = false;
            match read {
                Ok(read_page) => {
                    if let Some(last) = read_page.messages.last() {
                        since = last.offset;
                    }
                    let more = read_page.more;
                    page(read_page.messages);
                    if !more {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%room, %error, "cannot replay a room after a reconnect");
                    break;
                }
            }
        }
    }
}

/// Rooms replayed at once after a reconnect: enough to hide round trips, few enough that a
/// reconnect of a node with many rooms does not flood the shard.
pub(crate) const REPLAY_CONCURRENCY: usize = 8;

/// After a reconnect: reads what each room published while the connection was down, outside
/// the shard's pub/sub task, and hands it to that task page by page, so live messages of every
/// other room keep flowing however slow the reads are. The task delivers the pages, then the
/// live messages of the room that came meanwhile: a room's messages stay in offset order.
pub(crate) async fn replay(
    weak: Weak<Inner>,
    index: usize,
    round: u64,
    rooms: Vec<(String, Option<StreamPosition>)>,
) {
    futures_util::stream::iter(rooms)
        .for_each_concurrent(REPLAY_CONCURRENCY, |(room, position)| {
            let weak = weak.clone();
            async move {
                let Some(inner) = weak.upgrade() else { return };
                let control = inner.shards[index].control.clone();
                inner
                    .replay_room(&room, position, |messages| {
                        let _ = control.send(Control::Replayed {
                            round,
                            room: room.clone(),
                            messages,
                            done: false,
                        });
                    })
                    .await;
                let _ = control.send(Control::Replayed {
                    round,
                    room,
                    messages: Vec::new(),
                    done: true,
                });
            }
        })
        .await;
}

/// Keeps one shard's pub/sub connection: (re)connects with back-off, subscribes the node's inbox,
/// the broadcast channel and every room it needs, restores and replays after a loss, and hands
/// every message to the node.
pub(crate) async fn run_shard(
    weak: Weak<Inner>,
    index: usize,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut rooms: HashMap<String, Option<StreamPosition>> = HashMap::new();
    // Rooms being replayed after a reconnect, with their live messages held until then.
    let mut replaying: HashMap<String, Vec<Arc<RoomMessage>>> = HashMap::new();
    let mut round = 0;
    let mut replay_task: Option<tokio::task::AbortHandle> = None;
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let shard = &inner.shards[index];
        let connect = async {
            let pubsub = shard.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            let mut channels = vec![keys::inbox(inner.node()), keys::BROADCAST.to_owned()];
            channels.extend(rooms.keys().map(|room| keys::room_channel(room)));
            sink.subscribe(channels).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let (mut sink, mut stream) = match tokio::time::timeout(COMMAND_TIMEOUT, connect).await {
            Ok(Ok(connection)) => connection,
            failed => {
                if let Ok(Err(error)) = failed {
                    // Once per outage at warn (e.g. a certificate that does not verify), then
                    // quieter while the back-off retries.
                    if backoff == MIN_BACKOFF {
                        tracing::warn!(shard = %shard.label, %error, "cannot connect to redis shard; retrying");
                    } else {
                        tracing::debug!(shard = %shard.label, %error, "redis pub/sub connect failed");
                    }
                }
                inner
                    .metrics
                    .errors
                    .with_label_values(&[&shard.label])
                    .inc();
                drop(inner);
                if !wait_refusing(&mut control, &mut rooms, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if connected_before {
            inner
                .metrics
                .reconnects
                .with_label_values(&[&shard.label])
                .inc();
            let info = inner.liveness.lock().clone();
            if let Err(error) = inner.restore(index, info).await {
                tracing::warn!(shard = %shard.label, %error, "cannot restore this node's entries");
            }
            round += 1;
            replaying = rooms
                .keys()
                .map(|room| (room.clone(), Vec::new()))
                .collect();
            let replay = tokio::spawn(replay(
                weak.clone(),
                index,
                round,
                rooms
                    .iter()
                    .map(|(room, position)| (room.clone(), position.clone()))
                    .collect(),
            ));
            replay_task = Some(replay.abort_handle());
            tracing::info!(shard = %shard.label, rooms = rooms.len(), "redis shard reconnected");
        }
        connected_before = true;
        backoff = MIN_BACKOFF;
        shard.up.store(true, Ordering::SeqCst);
        inner.metrics.up.with_label_values(&[&shard.label]).set(1);
        let mut ping = tokio::time::interval(inner.config.node_ttl / 3);
        ping.tick().await;
        let stop = loop {
            tokio::select! {
                biased;
                command = control.recv() => match command {
                    None | Some(Control::Stop) => break true,
                    Some(Control::Subscribe { room, done }) => {
                        if done.is_closed() {
                            continue; // the caller gave up waiting
                        }
                        let subscribed = tokio::time::timeout(
                            COMMAND_TIMEOUT,
                            sink.subscribe(keys::room_channel(&room)),
                        )
                        .await;
                        if matches!(subscribed, Ok(Ok(()))) {
                            let new = !rooms.contains_key(&room);
                            rooms.entry(room.clone()).or_insert(None);
                            if done.send(Ok(())).is_err() && new {
                                // The caller gave up meanwhile and counts the room as not
                                // subscribed: leave no SUBSCRIBE behind that nothing would remove.
                                rooms.remove(&room);
                                let unsubscribed = tokio::time::timeout(
                                    COMMAND_TIMEOUT,
                                    sink.unsubscribe(keys::room_channel(&room)),
                                )
                                .await;
                                if !matches!(unsubscribed, Ok(Ok(()))) {
                                    break false;
                                }
                            }
                        } else {
                            let _ = done.send(Err(BrokerError::Unavailable(
                                "redis shard connection lost".into(),
                            )));
                            break false;
                        }
                    }
                    Some(Control::Unsubscribe { room }) => {
                        rooms.remove(&room);
                        replaying.remove(&room);
                        let unsubscribed = tokio::time::timeout(
                            COMMAND_TIMEOUT,
                            sink.unsubscribe(keys::room_channel(&room)),
                        )
                        .await;
                        if !matches!(unsubscribed, Ok(Ok(()))) {
                            break false;
                        }
                    }
                    Some(Control::Replayed { round: of, room, messages, done }) => {
                        if of != round || !replaying.contains_key(&room) {
                            continue; // from an earlier connection, or unsubscribed since
                        }
                        for message in messages {
                            inner.deliver(&mut rooms, message);
                        }
                        if done {
                            for message in replaying.remove(&room).unwrap_or_default() {
                                inner.deliver(&mut rooms, message);
                            }
                        }
                    }
                },
                message = stream.next() => {
                    let Some(message) = message else { break false };
                    inner.metrics.messages.with_label_values(&[&shard.label]).inc();
                    if let Err(error) =
                        inner.dispatch(&mut rooms, &mut replaying, message.get_channel_name(), message.get_payload_bytes())
                    {
                        tracing::warn!(shard = %shard.label, %error, "undecodable pub/sub message");
                    }
                }
                _ = ping.tick() => {
                    // On a subscribed RESP2 connection the answer is `["pong", ""]`, not `PONG`:
                    // any answer will do.
                    let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break false;
                    }
                }
            }
        };
        shard.up.store(false, Ordering::SeqCst);
        inner.metrics.up.with_label_values(&[&shard.label]).set(0);
        if let Some(task) = replay_task.take() {
            task.abort();
        }
        // Live messages held for an unfinished replay are dropped, not delivered ahead of what
        // came before them: the room's position was not moved, so the next replay reads them.
        replaying.clear();
        if stop {
            return;
        }
        inner
            .metrics
            .errors
            .with_label_values(&[&shard.label])
            .inc();
        tracing::warn!(shard = %shard.label, "redis pub/sub connection lost; reconnecting");
    }
}

/// Waits out a back-off while the shard is down, answering subscribes with `Unavailable`.
/// Returns false when the broker is stopping.
pub(crate) async fn wait_refusing(
    control: &mut mpsc::UnboundedReceiver<Control>,
    rooms: &mut HashMap<String, Option<StreamPosition>>,
    backoff: Duration,
) -> bool {
    let deadline = tokio::time::sleep(backoff);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return true,
            command = control.recv() => match command {
                None | Some(Control::Stop) => return false,
                Some(Control::Subscribe { done, .. }) => {
                    let _ = done.send(Err(BrokerError::Unavailable("redis shard is down".into())));
                }
                Some(Control::Unsubscribe { room }) => {
                    rooms.remove(&room);
                }
                Some(Control::Replayed { .. }) => {} // of an aborted replay
            },
        }
    }
}

impl Inner {
    pub(crate) async fn subscribe_room(&self, room: &str) -> BrokerResult<()> {
        let shard = self.shard(room);
        let (done, answer) = oneshot::channel();
        shard
            .control
            .send(Control::Subscribe {
                room: room.to_owned(),
                done,
            })
            .map_err(|_| BrokerError::Unavailable("broker stopped".into()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, answer).await {
            Ok(Ok(result)) => result,
            _ => Err(BrokerError::Unavailable("redis subscribe timed out".into())),
        }
    }

    pub(crate) async fn unsubscribe_room(&self, room: &str) -> BrokerResult<()> {
        self.shard(room)
            .control
            .send(Control::Unsubscribe {
                room: room.to_owned(),
            })
            .map_err(|_| BrokerError::Unavailable("broker stopped".into()))
    }
}
