//! The shard engine: everything one core owns.
//!
//! A shard owns a set of queues (their messages, consumers' delivery state, and — with the
//! durability work — their write-ahead log and segment files) and talks to other shards only
//! through typed messages on the mesh. This crate knows messages, not sockets: it has no
//! networking and no AMQP framing, and it does not depend on glommio, so the engine can run under
//! a deterministic test harness as well as on a pinned executor.
//!
//! Invariants:
//! - A queue is owned by exactly one shard; only that shard mutates it.
//! - Shards share no mutable memory; everything that crosses cores is a [`mesh::MeshMessage`],
//!   plain data that is `Send` (bodies as refcounted `bytes::Bytes`, never copied).

pub mod mesh;

pub use mesh::{MeshMessage, ShardId};
