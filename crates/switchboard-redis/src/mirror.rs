//! The mirror of this node's sessions, links and presence: what is written again after Redis lost
//! it, and the writes that failed, retried.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use switchboard_broker::{BrokerResult, LinkRecord, SessionRecord};
use switchboard_protocol::Member;
use switchboard_protocol::api::NodeInfo;

use crate::writes::Write;
use crate::{Inner, MIN_BACKOFF, envelope, keys, millis};

/// Writes of this node's entries that failed, to be done when Redis answers again.
#[derive(Default)]
pub(crate) struct Pending {
    /// Closed sessions still in the registry, by session id.
    pub(crate) sessions: HashMap<String, SessionRecord>,
    /// Closed fallback sessions whose link may still be there, by session id.
    pub(crate) links: HashMap<String, LinkRecord>,
    /// (room, session) of members that joined but are not in the room's presence.
    pub(crate) joins: HashSet<(String, String)>,
    /// Members that left but may still be in the room's presence.
    pub(crate) leaves: HashMap<(String, String), Member>,
}

/// Entries written back per batch by `restore`.
pub(crate) const RESTORE_BATCH: usize = 500;
/// Tries of each restore batch before the restore gives up (the next reconnect or expired
/// heartbeat restores again).
const RESTORE_ATTEMPTS: u32 = 3;

impl Inner {
    /// The stored presence value: `node \n user \n packed member`.
    pub(crate) fn presence_value(&self, member: &Member) -> BrokerResult<Vec<u8>> {
        let packed = envelope::pack(member)?;
        Ok([
            self.node().as_bytes(),
            b"\n",
            member.user.as_bytes(),
            b"\n",
            &packed,
        ]
        .concat())
    }

    /// Writes again what this node keeps on `shard`: liveness, registry entries, links and
    /// presence.
    /// Members missing from presence are announced with a join if the node had been reaped
    /// (its leaves were published); after Redis merely lost them, nobody saw them go. The entries
    /// go through the shard's writer [`RESTORE_BATCH`] at a time, each batch tried up to
    /// [`RESTORE_ATTEMPTS`] times: one pipeline of everything would grow with the node and could
    /// not finish within the command timeout on a big one, and the writer keeps the order with
    /// the node's other writes (a session that closes meanwhile is not written back after its
    /// removal).
    pub(crate) async fn restore(
        &self,
        index: usize,
        node_info: Option<NodeInfo>,
    ) -> BrokerResult<()> {
        let shard = &self.shards[index];
        if let Some(info) = node_info {
            let packed = envelope::pack(&info)?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(keys::node_alive(self.node()))
                .arg(packed)
                .arg("PX")
                .arg(millis(self.config.node_ttl))
                .ignore();
            pipe.cmd("SADD").arg(keys::NODES).arg(self.node()).ignore();
            self.call(shard, "restore", async |connection| {
                pipe.query_async::<()>(connection).await
            })
            .await?;
        }
        let sessions: Vec<String> = self
            .sessions
            .lock()
            .values()
            .filter(|record| self.shard_index(&record.user) == index)
            .map(|record| record.session.clone())
            .collect();
        for chunk in sessions.chunks(RESTORE_BATCH) {
            self.restore_batch(index, || {
                let sessions = self.sessions.lock();
                chunk
                    .iter()
                    .filter_map(|session| sessions.get(session))
                    .map(|record| {
                        Ok(Write::Register {
                            user: record.user.clone(),
                            session: record.session.clone(),
                        })
                    })
                    .collect()
            })
            .await?;
        }
        let links: Vec<String> = self
            .links
            .lock()
            .keys()
            .filter(|session| self.shard_index(session) == index)
            .cloned()
            .collect();
        for chunk in links.chunks(RESTORE_BATCH) {
            self.restore_batch(index, || {
                let links = self.links.lock();
                Ok(chunk
                    .iter()
                    .filter_map(|session| links.get(session))
                    .map(|link| Write::Link {
                        session: link.session.clone(),
                        key_hash: link.key_hash.clone(),
                    })
                    .collect())
            })
            .await?;
        }
        let members: Vec<(String, String)> = self
            .members
            .lock()
            .keys()
            .filter(|(room, _)| self.shard_index(room) == index)
            .cloned()
            .collect();
        for chunk in members.chunks(RESTORE_BATCH) {
            self.restore_batch(index, || {
                let members = self.members.lock();
                chunk
                    .iter()
                    .filter_map(|key| Some((&key.0, members.get(key)?)))
                    .map(|(room, member)| {
                        Ok(Write::Restore {
                            room: room.clone(),
                            session: member.session.clone(),
                            value: self.presence_value(member)?,
                            event: envelope::presence_event(true, &member.session, &member.user),
                        })
                    })
                    .collect()
            })
            .await?;
        }
        self.call(shard, "restore", async |connection| {
            redis::cmd("DEL")
                .arg(keys::node_reaped(self.node()))
                .query_async::<()>(connection)
                .await
        })
        .await
    }

    /// Sends the writes `batch` makes (from the entries still held when it is called) through
    /// the shard's writer, and again, up to [`RESTORE_ATTEMPTS`] times, while any fails.
    async fn restore_batch(
        &self,
        index: usize,
        batch: impl Fn() -> BrokerResult<Vec<Write>>,
    ) -> BrokerResult<()> {
        let mut attempt = 1;
        loop {
            let writes = batch()?;
            let outcomes = futures_util::future::join_all(
                writes.into_iter().map(|write| self.write(index, write)),
            )
            .await;
            match outcomes.into_iter().find_map(Result::err) {
                None => return Ok(()),
                Some(error) if attempt >= RESTORE_ATTEMPTS => return Err(error),
                Some(_) => {
                    tokio::time::sleep(MIN_BACKOFF * attempt).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn unregister(&self, record: &SessionRecord) -> BrokerResult<()> {
        let write = Write::Unregister {
            user: record.user.clone(),
            session: record.session.clone(),
        };
        self.write(self.shard_index(&record.user), write).await
    }

    async fn unlink(&self, session: &str) -> BrokerResult<()> {
        let write = Write::Unlink {
            session: session.to_owned(),
        };
        self.write(self.shard_index(session), write).await
    }

    async fn join(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let write = Write::Join {
            room: room.to_owned(),
            session: member.session.clone(),
            value: self.presence_value(member)?,
            event: envelope::presence_event(true, &member.session, &member.user),
        };
        self.write(self.shard_index(room), write).await
    }

    async fn leave(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let write = Write::Leave {
            room: room.to_owned(),
            session: member.session.clone(),
            event: envelope::presence_event(false, &member.session, &member.user),
        };
        self.write(self.shard_index(room), write).await
    }

    /// Retries the registry, link and presence writes that failed (Redis unreachable or too
    /// slow): without this, a session that closed during an outage would stay listed in the
    /// registry and presence (and its link, which has no TTL) for as long as this node lives, if
    /// Redis kept its data. All are queued at once, so they go in as few batches as the writers
    /// make, and nothing is tried on a shard that is down.
    async fn retry_pending(&self) {
        let Pending {
            sessions,
            links,
            joins,
            leaves,
        } = std::mem::take(&mut *self.pending.lock());
        let up = |key: &str| self.shard(key).up.load(Ordering::SeqCst);
        let mut retry = Pending::default();
        let mut removals = Vec::new();
        for (id, record) in sessions {
            if up(&record.user) {
                removals.push(async move {
                    let result = self.unregister(&record).await;
                    (id, record, result)
                });
            } else {
                retry.sessions.insert(id, record);
            }
        }
        let mut unlinks = Vec::new();
        for (id, record) in links {
            if self.links.lock().contains_key(&id) {
                continue; // registered again since
            }
            if up(&id) {
                unlinks.push(async move {
                    let result = self.unlink(&id).await;
                    (id, record, result)
                });
            } else {
                retry.links.insert(id, record);
            }
        }
        let mut departures = Vec::new();
        for (key, member) in leaves {
            if self.members.lock().contains_key(&key) {
                continue; // joined the room again since
            }
            if up(&key.0) {
                departures.push(async move {
                    let result = self.leave(&key.0, &member).await;
                    (key, member, result)
                });
            } else {
                retry.leaves.insert(key, member);
            }
        }
        let mut arrivals = Vec::new();
        for key in joins {
            let Some(member) = self.members.lock().get(&key).cloned() else {
                continue; // left the room since
            };
            if up(&key.0) {
                arrivals.push(async move {
                    let result = self.join(&key.0, &member).await;
                    (key, result)
                });
            } else {
                retry.joins.insert(key);
            }
        }
        let (removals, unlinks, departures, arrivals) = futures_util::future::join4(
            futures_util::future::join_all(removals),
            futures_util::future::join_all(unlinks),
            futures_util::future::join_all(departures),
            futures_util::future::join_all(arrivals),
        )
        .await;
        for (id, record, result) in removals {
            if result.is_err() {
                retry.sessions.insert(id, record);
            }
        }
        for (id, record, result) in unlinks {
            if result.is_err() {
                retry.links.insert(id, record);
            }
        }
        for (key, member, result) in departures {
            if result.is_err() {
                retry.leaves.insert(key, member);
            }
        }
        for (key, result) in arrivals {
            if result.is_err() {
                retry.joins.insert(key);
            }
        }
        // Merge back, keeping what was recorded meanwhile.
        let mut pending = self.pending.lock();
        pending.sessions.extend(retry.sessions);
        for (id, record) in retry.links {
            if !self.links.lock().contains_key(&id) {
                pending.links.entry(id).or_insert(record);
            }
        }
        for (key, member) in retry.leaves {
            if !pending.joins.contains(&key) && !self.members.lock().contains_key(&key) {
                pending.leaves.entry(key).or_insert(member);
            }
        }
        for key in retry.joins {
            if !pending.leaves.contains_key(&key) && self.members.lock().contains_key(&key) {
                pending.joins.insert(key);
            }
        }
    }

    pub(crate) async fn register_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.sessions
            .lock()
            .insert(record.session.clone(), record.clone());
        // Awaited: the session's welcome, and so any send to it, comes after its entry.
        let result = self
            .write(
                self.shard_index(&record.user),
                Write::Register {
                    user: record.user.clone(),
                    session: record.session.clone(),
                },
            )
            .await;
        if result.is_err() {
            self.sessions.lock().remove(&record.session);
        }
        result
    }

    pub(crate) async fn unregister_session(&self, record: &SessionRecord) -> BrokerResult<()> {
        self.sessions.lock().remove(&record.session);
        let result = self.unregister(record).await;
        if result.is_err() {
            self.pending
                .lock()
                .sessions
                .insert(record.session.clone(), record.clone());
        }
        result
    }

    pub(crate) async fn register_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.links.lock().insert(link.session.clone(), link.clone());
        self.pending.lock().links.remove(&link.session);
        // Awaited: the session's welcome, and so any POST for it, comes after its link.
        let result = self
            .write(
                self.shard_index(&link.session),
                Write::Link {
                    session: link.session.clone(),
                    key_hash: link.key_hash.clone(),
                },
            )
            .await;
        if result.is_err() {
            self.links.lock().remove(&link.session);
        }
        result
    }

    pub(crate) async fn unregister_link(&self, link: &LinkRecord) -> BrokerResult<()> {
        self.links.lock().remove(&link.session);
        let result = self.unlink(&link.session).await;
        if result.is_err() {
            self.pending
                .lock()
                .links
                .insert(link.session.clone(), link.clone());
        }
        result
    }

    pub(crate) async fn join_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let key = (room.to_owned(), member.session.clone());
        self.members.lock().insert(key.clone(), member.clone());
        self.pending.lock().leaves.remove(&key);
        let result = self.join(room, member).await;
        if result.is_err() {
            self.pending.lock().joins.insert(key);
        }
        result
    }

    pub(crate) async fn leave_presence(&self, room: &str, member: &Member) -> BrokerResult<()> {
        let key = (room.to_owned(), member.session.clone());
        self.members.lock().remove(&key);
        self.pending.lock().joins.remove(&key);
        let result = self.leave(room, member).await;
        if result.is_err() {
            self.pending.lock().leaves.insert(key, member.clone());
        }
        result
    }

    pub(crate) async fn heartbeat(&self, node: &NodeInfo) -> BrokerResult<()> {
        *self.liveness.lock() = Some(node.clone());
        let packed = envelope::pack(node)?;
        let mut result = Ok(());
        for (index, shard) in self.shards.iter().enumerate() {
            let written = self
                .call(shard, "heartbeat", async |connection| {
                    redis::pipe()
                        .cmd("SET")
                        .arg(keys::node_alive(self.node()))
                        .arg(&packed)
                        .arg("PX")
                        .arg(millis(self.config.node_ttl))
                        .arg("GET")
                        .cmd("SADD")
                        .arg(keys::NODES)
                        .arg(self.node())
                        .ignore()
                        .query_async::<(Option<Vec<u8>>,)>(connection)
                        .await
                })
                .await;
            match written {
                // The key had expired: this node was silent past its TTL (paused, starved, cut
                // off) and the others may have reaped its sessions and presence, which nothing
                // else would ever write back. (After a lost connection, the pub/sub task
                // restores instead, once it is back.)
                Ok((None,))
                    if self.heartbeated.load(Ordering::SeqCst)
                        && shard.up.load(Ordering::SeqCst) =>
                {
                    tracing::warn!(shard = %shard.label, "this node's liveness had expired; writing its entries back");
                    if let Err(error) = self.restore(index, Some(node.clone())).await {
                        result = Err(error);
                    }
                }
                Ok(_) => {}
                Err(error) => result = Err(error),
            }
        }
        self.heartbeated.store(true, Ordering::SeqCst);
        self.retry_pending().await;
        result
    }
}
