//! The typed messages shards send each other over the mesh.
//!
//! The mesh is a full set of bounded single-producer single-consumer channels, one per ordered
//! pair of shards; the runtime builds it (on glommio's channel mesh) and delivers each message to
//! the receiving shard's mailbox. This module only defines what travels on it.

use std::fmt;

/// A shard's index: 0..shard_count, stable for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

impl ShardId {
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// One message between two shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshMessage {
    /// Asks the receiver to answer [`MeshMessage::Pong`] with the same nonce. Start-up uses it to
    /// check that every pair of shards can talk both ways before the broker accepts clients.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
}

// Everything on the mesh crosses threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<MeshMessage>();
};
