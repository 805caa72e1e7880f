//! The shard engine: everything one core owns.
//!
//! A shard owns a set of queues (their messages and their consumers' delivery state, and — with
//! the durability work — their write-ahead log and segment files). This crate knows messages,
//! not sockets: it has no networking, no AMQP framing and no glommio, so the engine runs the same
//! under unit tests and a deterministic harness as on a pinned executor.
//!
//! Invariants:
//! - A queue is owned by exactly one shard; only that shard mutates it.
//! - Everything that crosses cores is plain `Send` data; bodies are refcounted `bytes::Bytes`,
//!   never copied.

pub mod buffer_pool;
pub mod frozen_run;
pub mod id_map;
pub mod message;
pub mod queue;
pub mod record;
pub mod wal;

use std::fmt;

pub use message::Message;
pub use queue::{
    ChannelKey, ConsumerKey, Credit, Delivery, Location, MemoryMeter, MessageId, Queue,
};

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
