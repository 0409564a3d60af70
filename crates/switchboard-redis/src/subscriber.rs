//! A shard's pub/sub task: subscriptions, delivery to the node, and replay after a reconnect.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{Msg, RedisError, Value};
use switchboard_broker::{
    BrokerError, BrokerHandler, BrokerResult, DirectMessage, PresenceChange, PresenceEvent,
};
use switchboard_protocol::{RoomMessage, StreamPosition};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::{self, Envelope, EnvelopeError};
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
const REPLAY_PAGE_BYTES: usize = 1 << 20;

impl Inner {
    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    /// Hands one pub/sub payload to the node. A room message of a room being replayed waits in
    /// `replaying` until the replay has delivered what came before it.
    fn dispatch(
        &self,
        rooms: &mut HashMap<String, Option<StreamPosition>>,
        replaying: &mut HashMap<String, Vec<Arc<RoomMessage>>>,
        channel: &str,
        payload: &[u8],
    ) -> Result<(), EnvelopeError> {
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
                seq: direct.seq,
            })),
            Envelope::Disconnect(disconnect) => {
                handler.disconnect(&disconnect.user, disconnect.code, &disconnect.reason)
            }
            Envelope::Broadcast(data) => handler.broadcast(Arc::new(data)),
            Envelope::Frames(frames) => handler.frames(&frames.session, frames.frames),
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
const REPLAY_CONCURRENCY: usize = 8;

/// After a reconnect: reads what each room published while the connection was down, outside
/// the shard's pub/sub task, and hands it to that task page by page, so live messages of every
/// other room keep flowing however slow the reads are. The task delivers the pages, then the
/// live messages of the room that came meanwhile: a room's messages stay in offset order.
async fn replay(
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
    let mut task = Subscriber {
        index,
        rooms: HashMap::new(),
        replaying: HashMap::new(),
        round: 0,
    };
    let mut replay_task: Option<tokio::task::AbortHandle> = None;
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let shard = &inner.shards[index];
        let (mut sink, mut stream) = match task.connect(&inner).await {
            Ok(connection) => connection,
            Err(error) => {
                if let Some(error) = error {
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
                if !wait_refusing(&mut control, &mut task.rooms, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if connected_before {
            replay_task = Some(task.resume(&weak, &inner).await);
        }
        connected_before = true;
        backoff = MIN_BACKOFF;
        shard.up.store(true, Ordering::SeqCst);
        inner.metrics.up.with_label_values(&[&shard.label]).set(1);
        let mut ping = tokio::time::interval(inner.config.node_ttl / 3);
        ping.tick().await;
        let stop = loop {
            let next = tokio::select! {
                biased;
                command = control.recv() => task.on_control(&inner, &mut sink, command).await,
                message = stream.next() => task.on_message(&inner, message),
                _ = ping.tick() => on_ping(&mut sink).await,
            };
            match next {
                Next::Continue => {}
                Next::Reconnect => break false,
                Next::Stop => break true,
            }
        };
        shard.up.store(false, Ordering::SeqCst);
        inner.metrics.up.with_label_values(&[&shard.label]).set(0);
        if let Some(task) = replay_task.take() {
            task.abort();
        }
        // Live messages held for an unfinished replay are dropped, not delivered ahead of what
        // came before them: the room's position was not moved, so the next replay reads them.
        task.replaying.clear();
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

/// What the connected loop of [`run_shard`] does after handling one event.
enum Next {
    Continue,
    /// The connection is lost or broken: reconnect.
    Reconnect,
    /// The broker is stopping.
    Stop,
}

/// The state of one shard's pub/sub task, kept across reconnects.
struct Subscriber {
    index: usize,
    /// The rooms subscribed, with the newest position received (for replay).
    rooms: HashMap<String, Option<StreamPosition>>,
    /// Rooms being replayed after a reconnect, with their live messages held until then.
    replaying: HashMap<String, Vec<Arc<RoomMessage>>>,
    /// The replay round: one per reconnect.
    round: u64,
}

impl Subscriber {
    /// Opens the pub/sub connection and subscribes everything the node needs. `Err(None)`: it
    /// did not finish within the command timeout.
    async fn connect(
        &self,
        inner: &Inner,
    ) -> Result<(PubSubSink, PubSubStream), Option<RedisError>> {
        let shard = &inner.shards[self.index];
        let connect = async {
            let pubsub = shard.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            let mut channels = vec![keys::inbox(inner.node()), keys::BROADCAST.to_owned()];
            channels.extend(self.rooms.keys().map(|room| keys::room_channel(room)));
            sink.subscribe(channels).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, connect).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(Some(error)),
            Err(_) => Err(None),
        }
    }

    /// After a reconnect: writes this node's entries back and starts replaying every room,
    /// holding the rooms' live messages until their replay is done. Returns the replay task.
    async fn resume(&mut self, weak: &Weak<Inner>, inner: &Inner) -> tokio::task::AbortHandle {
        let shard = &inner.shards[self.index];
        inner
            .metrics
            .reconnects
            .with_label_values(&[&shard.label])
            .inc();
        let info = inner.liveness.lock().clone();
        if let Err(error) = inner.restore(self.index, info).await {
            tracing::warn!(shard = %shard.label, %error, "cannot restore this node's entries");
        }
        self.round += 1;
        self.replaying = self
            .rooms
            .keys()
            .map(|room| (room.clone(), Vec::new()))
            .collect();
        let replay = tokio::spawn(replay(
            weak.clone(),
            self.index,
            self.round,
            self.rooms
                .iter()
                .map(|(room, position)| (room.clone(), position.clone()))
                .collect(),
        ));
        tracing::info!(shard = %shard.label, rooms = self.rooms.len(), "redis shard reconnected");
        replay.abort_handle()
    }

    async fn on_control(
        &mut self,
        inner: &Inner,
        sink: &mut PubSubSink,
        command: Option<Control>,
    ) -> Next {
        match command {
            None | Some(Control::Stop) => Next::Stop,
            Some(Control::Subscribe { room, done }) => self.on_subscribe(sink, room, done).await,
            Some(Control::Unsubscribe { room }) => self.on_unsubscribe(sink, room).await,
            Some(Control::Replayed {
                round,
                room,
                messages,
                done,
            }) => {
                self.on_replayed(inner, round, room, messages, done);
                Next::Continue
            }
        }
    }

    async fn on_subscribe(
        &mut self,
        sink: &mut PubSubSink,
        room: String,
        done: oneshot::Sender<BrokerResult<()>>,
    ) -> Next {
        if done.is_closed() {
            return Next::Continue; // the caller gave up waiting
        }
        let subscribed =
            tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(keys::room_channel(&room))).await;
        if !matches!(subscribed, Ok(Ok(()))) {
            let _ = done.send(Err(BrokerError::Unavailable(
                "redis shard connection lost".into(),
            )));
            return Next::Reconnect;
        }
        let new = !self.rooms.contains_key(&room);
        self.rooms.entry(room.clone()).or_insert(None);
        if done.send(Ok(())).is_err() && new {
            // The caller gave up meanwhile and counts the room as not subscribed: leave no
            // SUBSCRIBE behind that nothing would remove.
            self.rooms.remove(&room);
            return unsubscribe(sink, &room).await;
        }
        Next::Continue
    }

    async fn on_unsubscribe(&mut self, sink: &mut PubSubSink, room: String) -> Next {
        self.rooms.remove(&room);
        self.replaying.remove(&room);
        unsubscribe(sink, &room).await
    }

    /// A page of a room's replay: delivered, then, after its last, the live messages held.
    fn on_replayed(
        &mut self,
        inner: &Inner,
        round: u64,
        room: String,
        messages: Vec<Arc<RoomMessage>>,
        done: bool,
    ) {
        if round != self.round || !self.replaying.contains_key(&room) {
            return; // from an earlier connection, or unsubscribed since
        }
        for message in messages {
            inner.deliver(&mut self.rooms, message);
        }
        if done {
            for message in self.replaying.remove(&room).unwrap_or_default() {
                inner.deliver(&mut self.rooms, message);
            }
        }
    }

    fn on_message(&mut self, inner: &Inner, message: Option<Msg>) -> Next {
        let Some(message) = message else {
            return Next::Reconnect;
        };
        let shard = &inner.shards[self.index];
        inner
            .metrics
            .messages
            .with_label_values(&[&shard.label])
            .inc();
        if let Err(error) = inner.dispatch(
            &mut self.rooms,
            &mut self.replaying,
            message.get_channel_name(),
            message.get_payload_bytes(),
        ) {
            tracing::warn!(shard = %shard.label, %error, "undecodable pub/sub message");
        }
        Next::Continue
    }
}

async fn unsubscribe(sink: &mut PubSubSink, room: &str) -> Next {
    let unsubscribed =
        tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(keys::room_channel(room))).await;
    if matches!(unsubscribed, Ok(Ok(()))) {
        Next::Continue
    } else {
        Next::Reconnect
    }
}

/// Checks the connection is alive: on a subscribed RESP2 connection the answer is
/// `["pong", ""]`, not `PONG`: any answer will do.
async fn on_ping(sink: &mut PubSubSink) -> Next {
    let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await;
    if matches!(pong, Ok(Ok(_))) {
        Next::Continue
    } else {
        Next::Reconnect
    }
}

/// Waits out a back-off while the shard is down, answering subscribes with `Unavailable`.
/// Returns false when the broker is stopping.
async fn wait_refusing(
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
