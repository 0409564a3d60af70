//! Reaping: removing the sessions and presence of dead nodes and of this node's earlier
//! incarnations.

use std::collections::HashSet;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use switchboard_broker::BrokerResult;

use crate::shard::Shard;
use crate::subscriber::Control;
use crate::{Inner, MAX_BACKOFF, MIN_BACKOFF, keys, scripts};

/// Every node incarnation `shard` lists, alive or not yet reaped.
async fn listed_nodes(inner: &Inner, shard: &Shard) -> BrokerResult<Vec<String>> {
    inner
        .call(shard, "reap", async |connection| {
            redis::cmd("SMEMBERS")
                .arg(keys::NODES)
                .query_async(connection)
                .await
        })
        .await
}

/// Removes the sessions and presence of nodes whose liveness key expired, on every shard.
pub(crate) async fn reap_dead_nodes(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let period = inner.config.node_ttl;
        for shard in &inner.shards {
            if !shard.up.load(Ordering::SeqCst) {
                continue;
            }
            let nodes = listed_nodes(&inner, shard).await;
            for node in nodes.unwrap_or_default() {
                if node == inner.node() {
                    // Alive by definition; if its key expired, its next heartbeat fixes that.
                    continue;
                }
                let alive: BrokerResult<bool> = inner
                    .call(shard, "reap", async |connection| {
                        redis::cmd("EXISTS")
                            .arg(keys::node_alive(&node))
                            .query_async(connection)
                            .await
                    })
                    .await;
                if matches!(alive, Ok(false)) {
                    tracing::info!(shard = %shard.label, %node, "reaping a dead node's sessions and presence");
                    let _ = inner.reap(shard, &node, Reap::Dead).await;
                }
            }
        }
        drop(inner);
        tokio::time::sleep(period).await;
    }
}

/// Reaps, on every shard, the earlier incarnations of this node's id: a process restarted under
/// the same id (a container restart keeps the pod name) removes its predecessor's sessions and
/// presence at once rather than after the node TTL. One pass over the shards, skipping those in
/// `done` and adding those that answered.
pub(crate) async fn reap_predecessors_once(inner: &Inner, done: &mut HashSet<usize>) {
    for (index, shard) in inner.shards.iter().enumerate() {
        if done.contains(&index) {
            continue;
        }
        let nodes = listed_nodes(inner, shard).await;
        let Ok(nodes) = nodes else { continue };
        let mut reaped = true;
        for node in nodes {
            if node != inner.node() && keys::is_incarnation_of(&node, &inner.config.node_id) {
                tracing::info!(shard = %shard.label, %node, "reaping an earlier incarnation of this node");
                reaped &= inner.reap(shard, &node, Reap::Replaced).await.is_ok();
            }
        }
        if reaped {
            done.insert(index);
        }
    }
}

/// Repeats [`reap_predecessors_once`] with backoff until every shard has answered.
pub(crate) async fn reap_predecessors(weak: Weak<Inner>, mut done: HashSet<usize>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if done.len() == inner.shards.len() {
            return;
        }
        drop(inner);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let Some(inner) = weak.upgrade() else { return };
        reap_predecessors_once(&inner, &mut done).await;
    }
}

/// Why a node is reaped: the REAP script's modes.
#[derive(Clone, Copy)]
pub(crate) enum Reap {
    /// This node, leaving on purpose.
    Forced,
    /// A node whose liveness key expired (left alone if it heartbeated since).
    Dead,
    /// An earlier incarnation of this node's id.
    Replaced,
}

impl Inner {
    /// Removes `node`'s entries on `shard`, one bounded REAP call after another until they are
    /// gone (or, for a dead node, until it turns out to be alive).
    pub(crate) async fn reap(&self, shard: &Shard, node: &str, why: Reap) -> BrokerResult<()> {
        let mode = match why {
            Reap::Forced => "forced",
            Reap::Dead => "dead",
            Reap::Replaced => "replaced",
        };
        loop {
            let done: i64 = self
                .call(shard, "reap", async |connection| {
                    scripts::REAP
                        .arg(keys::PREFIX)
                        .arg(node)
                        .arg(mode)
                        .arg(keys::REAPED_MARK_TTL_MS)
                        .arg(scripts::REAP_BATCH)
                        .arg(scripts::REAP_LEGACY_BATCH)
                        .invoke_async(connection)
                        .await
                })
                .await?;
            if done != 0 {
                return Ok(());
            }
        }
    }

    pub(crate) async fn deregister_node(&self, node: &str) -> BrokerResult<()> {
        // This node is known to Redis by its incarnation.
        let node = if node == self.config.node_id {
            self.node()
        } else {
            node
        };
        let mut result = Ok(());
        for shard in &self.shards {
            if let Err(error) = self.reap(shard, node, Reap::Forced).await {
                result = Err(error);
            }
            let _ = shard.control.send(Control::Stop);
        }
        result
    }
}
