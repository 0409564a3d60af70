//! Registry, link and presence writes, coalesced per shard. A burst of sessions closing at once
//! (or of clients reconnecting after a node died) would otherwise cost one round trip each on the
//! shard's shared connection; under load those pile up past the command timeout. Instead each
//! shard has one writer task: it takes everything queued (up to [`MAX_BATCH`] writes), sends it
//! as one pipeline, answers every caller with its own write's outcome, and repeats. An idle
//! writer sends a lone write at once, so a quiet node pays no extra latency. Writes to a shard
//! reach Redis in the order they were queued.

use std::sync::Weak;

use redis::Value;
use switchboard_broker::{BrokerError, BrokerResult};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::{COMMAND_TIMEOUT, Inner, keys, scripts};

/// Most writes in one pipeline: bounds the request's size and how long one batch takes.
pub(crate) const MAX_BATCH: usize = 1000;

/// One registry, link or presence write of this node.
pub(crate) enum Write {
    /// The session into the user's registry hash and the node's session set.
    Register { user: String, session: String },
    /// The session out of the user's registry hash and the node's session set.
    Unregister { user: String, session: String },
    /// A fallback session's link, and its entry in the node's link set.
    Link { session: String, key_hash: String },
    /// The link and its entry out.
    Unlink { session: String },
    /// The JOIN script: the member into the room's presence, with its event.
    Join {
        room: String,
        session: String,
        value: Vec<u8>,
        event: Vec<u8>,
    },
    /// The RESTORE_MEMBER script: one of this node's members written back, with its join event
    /// if the node had been reaped.
    Restore {
        room: String,
        session: String,
        value: Vec<u8>,
        event: Vec<u8>,
    },
    /// The LEAVE script: the member out of the room's presence, with its event if it was there.
    Leave {
        room: String,
        session: String,
        event: Vec<u8>,
    },
}

pub(crate) struct Queued {
    write: Write,
    /// A write still queued past this is answered "timed out" and not sent: its caller has
    /// waited as long as one call may take.
    deadline: Instant,
    done: oneshot::Sender<BrokerResult<()>>,
}

/// The sending end of a shard's writer queue.
pub(crate) type Writer = mpsc::UnboundedSender<Queued>;

impl Inner {
    /// Queues `write` for the writer of shard `index` (started on first use) and waits for its
    /// outcome: at most the command timeout in the queue plus one batch's command timeout.
    pub(crate) async fn write(&self, index: usize, write: Write) -> BrokerResult<()> {
        let writer = self.shards[index].writer.get_or_init(|| {
            let (writer, queue) = mpsc::unbounded_channel();
            tokio::spawn(run(self.this.clone(), index, queue));
            writer
        });
        let (done, outcome) = oneshot::channel();
        let stopped = || BrokerError::Unavailable("redis writer stopped".into());
        writer
            .send(Queued {
                write,
                deadline: Instant::now() + COMMAND_TIMEOUT,
                done,
            })
            .map_err(|_| stopped())?;
        outcome.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Sends one batch as one pipeline and answers each write. Failures are logged once for the
    /// whole batch, with their count: a burst must not log one line per write.
    async fn write_batch(&self, index: usize, batch: Vec<Queued>) {
        let shard = &self.shards[index];
        let now = Instant::now();
        let (due, late): (Vec<Queued>, Vec<Queued>) =
            batch.into_iter().partition(|queued| queued.deadline > now);
        let mut failed = late.len();
        let mut first_error = None;
        for queued in late {
            let error = BrokerError::Unavailable("redis write timed out in the queue".into());
            first_error.get_or_insert_with(|| error.clone());
            let _ = queued.done.send(Err(error));
        }
        if !due.is_empty() {
            self.metrics
                .write_batch_size
                .with_label_values(&[&shard.label])
                .observe(due.len() as f64);
            let mut pipe = redis::pipe();
            // Each write's own replies, so that one failing command fails only its write.
            pipe.ignore_errors();
            // EVALSHA fails on a Redis that has not loaded the script (e.g. restarted).
            if due
                .iter()
                .any(|queued| matches!(queued.write, Write::Join { .. }))
            {
                pipe.load_script(&scripts::JOIN).ignore();
            }
            if due
                .iter()
                .any(|queued| matches!(queued.write, Write::Leave { .. }))
            {
                pipe.load_script(&scripts::LEAVE).ignore();
            }
            if due
                .iter()
                .any(|queued| matches!(queued.write, Write::Restore { .. }))
            {
                pipe.load_script(&scripts::RESTORE_MEMBER).ignore();
            }
            let replies_per_write: Vec<usize> = due
                .iter()
                .map(|queued| self.add_write(&mut pipe, &queued.write))
                .collect();
            let sent = self
                .call(shard, "registry and presence writes", async |connection| {
                    pipe.query_async::<Vec<Value>>(connection).await
                })
                .await;
            match sent {
                Ok(replies) => {
                    let mut replies = replies.into_iter();
                    for (queued, count) in due.into_iter().zip(replies_per_write) {
                        let mut outcome = Ok(());
                        for reply in replies.by_ref().take(count) {
                            if let Value::ServerError(error) = reply {
                                outcome = Err(BrokerError::Internal(error.to_string()));
                            }
                        }
                        if let Err(error) = &outcome {
                            failed += 1;
                            first_error.get_or_insert_with(|| error.clone());
                        }
                        let _ = queued.done.send(outcome);
                    }
                }
                Err(error) => {
                    failed += due.len();
                    for queued in due {
                        let _ = queued.done.send(Err(error.clone()));
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            tracing::warn!(shard = %shard.label, failed, %error, "registry and presence writes failed");
        }
    }

    /// Adds one write's commands to the pipeline; returns how many replies they give.
    fn add_write(&self, pipe: &mut redis::Pipeline, write: &Write) -> usize {
        match write {
            Write::Register { user, session } => {
                pipe.cmd("SADD")
                    .arg(keys::node_sessions(self.node()))
                    .arg(keys::node_entry(session, user));
                pipe.cmd("HSET")
                    .arg(keys::user_sessions(user))
                    .arg(session)
                    .arg(self.node());
                2
            }
            Write::Unregister { user, session } => {
                pipe.cmd("HDEL").arg(keys::user_sessions(user)).arg(session);
                pipe.cmd("SREM")
                    .arg(keys::node_sessions(self.node()))
                    .arg(keys::node_entry(session, user));
                2
            }
            Write::Link { session, key_hash } => {
                // The set entry first, as for sessions: the reaper finds the link through it.
                pipe.cmd("SADD")
                    .arg(keys::node_links(self.node()))
                    .arg(session);
                pipe.cmd("HSET")
                    .arg(keys::link(session))
                    .arg("n")
                    .arg(self.node())
                    .arg("k")
                    .arg(key_hash);
                2
            }
            Write::Unlink { session } => {
                pipe.cmd("DEL").arg(keys::link(session));
                pipe.cmd("SREM")
                    .arg(keys::node_links(self.node()))
                    .arg(session);
                2
            }
            Write::Join {
                room,
                session,
                value,
                event,
            } => {
                let mut invocation = scripts::JOIN.prepare_invoke();
                invocation
                    .key(keys::room_presence(room))
                    .key(keys::room_channel(room))
                    .key(keys::node_members(self.node()))
                    .arg(session)
                    .arg(value)
                    .arg(event)
                    .arg(keys::node_entry(session, room));
                pipe.invoke_script(&invocation);
                1
            }
            Write::Restore {
                room,
                session,
                value,
                event,
            } => {
                let mut invocation = scripts::RESTORE_MEMBER.prepare_invoke();
                invocation
                    .key(keys::room_presence(room))
                    .key(keys::room_channel(room))
                    .key(keys::node_members(self.node()))
                    .key(keys::node_reaped(self.node()))
                    .arg(session)
                    .arg(value)
                    .arg(event)
                    .arg(keys::node_entry(session, room));
                pipe.invoke_script(&invocation);
                1
            }
            Write::Leave {
                room,
                session,
                event,
            } => {
                let mut invocation = scripts::LEAVE.prepare_invoke();
                invocation
                    .key(keys::room_presence(room))
                    .key(keys::room_channel(room))
                    .key(keys::node_members(self.node()))
                    .arg(session)
                    .arg(event)
                    .arg(keys::node_entry(session, room));
                pipe.invoke_script(&invocation);
                1
            }
        }
    }
}

/// A shard's writer: batches until the broker is gone (its queue's sender goes with it).
async fn run(weak: Weak<Inner>, index: usize, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Some(inner) = weak.upgrade() else { return };
        inner
            .write_batch(
                index,
                std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH)),
            )
            .await;
    }
}
