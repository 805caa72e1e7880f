//! The AMQP model on top of the shards: routing tables, metadata changes, and (as the messaging
//! work lands) the per-channel delivery state.
//!
//! - [`routing`]: one vhost's exchanges, bindings and queue placements, as every shard holds them.
//! - [`topic`]: the trie topic exchanges match with.
//! - [`queue_arguments`]: the x-arguments checks RabbitMQ makes at queue.declare.

pub mod coordinator;
pub mod messages;
pub mod meta_log;
pub mod oneshot;
pub mod queue_arguments;
pub mod routing;
pub mod session;
pub mod shard;
pub mod storage;
pub mod topic;
pub mod unacked;
