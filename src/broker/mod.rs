//! The AMQP model on top of the shards: routing tables, metadata changes, and (as the messaging
//! work lands) the per-channel delivery state.
//!
//! - [`routing`]: one vhost's exchanges, bindings and queue placements, as every shard holds them.
//! - [`topic`]: the trie topic exchanges match with.
//! - [`queue_arguments`]: the x-arguments checks RabbitMQ makes at queue.declare.
//! - [`queue_policy`]: what the accepted ones make a queue do (TTL, length limits, where its
//!   dead letters go); [`dead_letter`]: the letters themselves.
//! - [`direct_reply`]: `amq.rabbitmq.reply-to` addresses.

pub mod coordinator;
pub mod dead_letter;
pub mod direct_reply;
pub mod messages;
pub mod meta_log;
pub mod oneshot;
pub mod queue_arguments;
pub mod queue_policy;
pub mod routing;
pub mod session;
pub mod shard;
pub mod storage;
pub mod topic;
pub mod unacked;
