//! The consistent-hash ring: which shard holds a room or a user.

use std::collections::HashMap;

use hashring::HashRing;

use crate::Inner;
use crate::shard::Shard;

/// Virtual nodes per shard on the ring: enough for an even spread over a few shards.
const VIRTUAL_NODES: u32 = 160;

#[derive(Hash, Clone, Debug, PartialEq)]
struct VirtualNode {
    url: String,
    replica: u32,
}

/// Shard URLs on the ring (virtual nodes keyed by URL, so the order shards are listed in does
/// not matter), and each URL's shard index.
pub(crate) struct Ring {
    ring: HashRing<VirtualNode>,
    shard_of_url: HashMap<String, usize>,
}

impl Ring {
    pub(crate) fn new() -> Ring {
        Ring {
            ring: HashRing::new(),
            shard_of_url: HashMap::new(),
        }
    }

    /// Puts shard `index` at `url` on the ring; false if `url` is on it already.
    pub(crate) fn add(&mut self, url: &str, index: usize) -> bool {
        if self.shard_of_url.insert(url.to_owned(), index).is_some() {
            return false;
        }
        for replica in 0..VIRTUAL_NODES {
            self.ring.add(VirtualNode {
                url: url.to_owned(),
                replica,
            });
        }
        true
    }

    /// The index of the shard that holds `key`.
    pub(crate) fn index(&self, key: &str) -> usize {
        self.ring
            .get(&key)
            .and_then(|node| self.shard_of_url.get(&node.url).copied())
            .unwrap_or(0)
    }
}

impl Inner {
    pub(crate) fn shard_index(&self, key: &str) -> usize {
        self.ring.index(key)
    }

    pub(crate) fn shard(&self, key: &str) -> &Shard {
        &self.shards[self.shard_index(key)]
    }
}
