//! One client connection: the protocol state machine and the tasks that drive it.
//!
//! - [`machine`]: the connection and channel lifecycles as a sans-IO state machine.
//! - [`driver`]: the glommio tasks that move bytes between the socket and the machine.
//! - [`coalescing`]: which clients stream, and what ends the wait before their next read.
//! - [`auth`]: SASL PLAIN/AMQPLAIN and vhost access.
//! - [`error`]: AMQP errors with their reply code and scope.
//!
//! Invariant: a broken invariant or hostile input here closes this connection (or channel) with
//! a reply code; it never panics the shard, so every other connection keeps working.

pub mod auth;
pub mod coalescing;
pub mod driver;
pub mod error;
pub mod machine;

pub use driver::Connection;
pub use machine::{ConnectionMachine, ConnectionSettings, Phase};
