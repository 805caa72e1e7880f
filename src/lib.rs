//! shardmq: an AMQP 0.9.1 broker built thread-per-core and shared-nothing on glommio.
//!
//! The crate is layered; each layer knows only the ones below it:
//! - [`codec`]: AMQP frames and methods as bytes ↔ values. No IO.
//! - [`config`]: config.toml and the command line.
//! - [`connection`]: one client connection — the protocol state machine (sans-IO) and the glommio
//!   task that drives it over a socket.
//! - [`runtime`]: the shards — one pinned glommio executor per core, the listener on each, the
//!   mesh between them, start-up and shutdown.
//!
//! The shard engine (queues, storage) lives in the `shards` crate.

pub mod broker;
pub mod cli;
pub mod codec;
pub mod config;
pub mod connection;
pub mod fuzzing;
pub mod runtime;
