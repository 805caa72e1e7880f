//! shard engine
