//! Direct reply-to, RabbitMQ's `amq.rabbitmq.reply-to`: RPC replies that go straight to the
//! requesting channel, with no queue.
//!
//! A requester consumes from the pseudo-queue `amq.rabbitmq.reply-to` (no-ack only, one such
//! consumer per channel) and publishes its requests with that name as their reply-to property;
//! the session rewrites it into the channel's address, `amq.rabbitmq.reply-to.<address>`. A
//! reply published to the default exchange with an address as its routing key is posted to the
//! requester's shard and written to its reply consumer as a basic.deliver; it is also routed as
//! usual (to no queue: no client can declare a queue named `amq.*`), so a mandatory reply comes
//! back with basic.return and a confirm is an ack, as RabbitMQ does.
//!
//! An address names the requester's shard, connection and channel, and a random key drawn when
//! the reply consumer was created, so that a reply to a consumer cancelled since (or to a
//! channel number reused) goes nowhere. Addresses come back from clients: `ReplyAddress::parse`
//! takes any bytes and checks the shard against the shard count before anything is posted.
//!
//! Declaring `amq.rabbitmq.reply-to` answers declare-ok with one consumer, as RabbitMQ does; a
//! passive declare of an address is answered 404 even while its consumer lives (RabbitMQ looks
//! the channel up; the session does not ask the requester's shard).

use crate::codec::ShortStr;
use shards::ShardId;

/// The pseudo-queue a requester consumes from, and names as its requests' reply-to.
pub const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";
const ADDRESS_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Where replies to one reply consumer go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyAddress {
    pub shard: ShardId,
    pub connection: u64,
    pub channel: u16,
    pub key: u64,
}

impl ReplyAddress {
    /// The routing key (and reply-to) that names this address.
    pub fn routing_key(&self) -> ShortStr {
        let text = format!(
            "{ADDRESS_PREFIX}{}.{}.{}.{:016x}",
            self.shard.index(),
            self.connection,
            self.channel,
            self.key
        );
        // At most 22 + 20 + 20 + 5 + 16 + 3 bytes: always a short string.
        ShortStr::truncating(&text)
    }

    /// The address a routing key names, if it is one of a broker with `shard_count` shards.
    pub fn parse(routing_key: &[u8], shard_count: usize) -> Option<ReplyAddress> {
        let rest = routing_key.strip_prefix(ADDRESS_PREFIX.as_bytes())?;
        let mut parts = std::str::from_utf8(rest).ok()?.split('.');
        let shard: usize = parts.next()?.parse().ok()?;
        let connection = parts.next()?.parse().ok()?;
        let channel = parts.next()?.parse().ok()?;
        let key = u64::from_str_radix(parts.next()?, 16).ok()?;
        if parts.next().is_some() || shard >= shard_count {
            return None;
        }
        Some(ReplyAddress {
            shard: ShardId(shard),
            connection,
            channel,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_reads_back_and_anything_else_is_none() {
        let address = ReplyAddress {
            shard: ShardId(1),
            connection: u64::MAX,
            channel: u16::MAX,
            key: 0xfeed,
        };
        let key = address.routing_key();
        assert!(key.as_bytes().starts_with(ADDRESS_PREFIX.as_bytes()));
        assert_eq!(ReplyAddress::parse(key.as_bytes(), 2), Some(address));
        assert_eq!(
            ReplyAddress::parse(key.as_bytes(), 1),
            None,
            "no such shard"
        );
        for hostile in [
            &b"amq.rabbitmq.reply-to"[..],
            b"amq.rabbitmq.reply-to.",
            b"amq.rabbitmq.reply-to.0.1.2",
            b"amq.rabbitmq.reply-to.0.1.2.zz",
            b"amq.rabbitmq.reply-to.0.1.70000.1",
            b"amq.rabbitmq.reply-to.0.1.2.3.4",
            b"amq.rabbitmq.reply-to.\xff.1.2.3",
            b"orders",
        ] {
            assert_eq!(ReplyAddress::parse(hostile, 2), None, "{hostile:?}");
        }
    }
}
