//! The consistent-hash ring: which shard holds a room or a user.

use crate::Inner;
use crate::shard::Shard;

/// Virtual nodes per shard on the ring: enough for an even spread over a few shards.
pub(crate) const VIRTUAL_NODES: u32 = 160;

#[derive(Hash, Clone, Debug, PartialEq)]
pub(crate) struct VirtualNode {
    pub(crate) url: String,
    pub(crate) replica: u32,
}

impl Inner {
    pub(crate) fn shard_index(&self, key: &str) -> usize {
        self.ring
            .get(&key)
            .and_then(|node| self.shard_of_url.get(&node.url).copied())
            .unwrap_or(0)
    }

    pub(crate) fn shard(&self, key: &str) -> &Shard {
        &self.shards[self.shard_index(key)]
    }
}
