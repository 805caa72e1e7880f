//! A message as queues hold it: one envelope buffer and the body, both refcounted.
//!
//! The envelope packs a 3-byte prefix (exchange length, routing key length, flags), the
//! exchange name, the routing key and the encoded content properties into one `Bytes`, so a
//! queued message is exactly two refcounted handles (64 bytes). Cloning a message (fanout to
//! several queues, a delivery crossing the mesh) copies no bytes.
//!
//! ```text
//! envelope: | exchange_len u8 | routing_key_len u8 | flags u8 | exchange | routing key | properties |
//! flags:    bit 0 = persistent (delivery-mode 2)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Prefix, exchange, routing key, encoded properties (see the module doc).
    envelope: Bytes,
    body: Bytes,
}

const PREFIX_BYTES: usize = 3;
const FLAG_PERSISTENT: u8 = 1;
/// What a queued message costs beyond its body and envelope: its 32-byte ready entry, its
/// 64-byte slab slot and the allocations behind its two handles (the `queue_memory` benchmark
/// measures about 122 bytes in all).
pub const BOOKKEEPING_BYTES: usize = 128;

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("exchange", &String::from_utf8_lossy(self.exchange()))
            .field("routing_key", &String::from_utf8_lossy(self.routing_key()))
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Message {
    /// `exchange` and `routing_key` are AMQP short strings (at most 255 bytes each).
    pub fn new(
        exchange: &[u8],
        routing_key: &[u8],
        properties: &[u8],
        body: Bytes,
        persistent: bool,
    ) -> Message {
        // Exactly the envelope's size: a message with a separate body may sit queued for long.
        let mut envelope =
            BytesMut::with_capacity(Self::envelope_len(exchange, routing_key, properties));
        Self::put_envelope(&mut envelope, exchange, routing_key, properties, persistent);
        Message {
            envelope: envelope.freeze(),
            body,
        }
    }

    /// Like `new`, but copies `body` into the envelope's buffer: one buffer for the message, where
    /// a separate body costs two, each with its shared header. Up to 1 KiB the buffer lives in
    /// its owner (one allocation); 1–10 KiB ones are recycled (see `buffer_pool`).
    pub fn with_copied_body(
        exchange: &[u8],
        routing_key: &[u8],
        properties: &[u8],
        body: &[u8],
        persistent: bool,
    ) -> Message {
        let envelope_len = Self::envelope_len(exchange, routing_key, properties);
        let buffer = crate::buffer_pool::build(envelope_len + body.len(), |mut buffer| {
            Self::put_envelope(&mut buffer, exchange, routing_key, properties, persistent);
            buffer.put_slice(body);
        });
        Message {
            envelope: buffer.slice(..envelope_len),
            body: buffer.slice(envelope_len..),
        }
    }

    fn envelope_len(exchange: &[u8], routing_key: &[u8], properties: &[u8]) -> usize {
        PREFIX_BYTES + exchange.len() + routing_key.len() + properties.len()
    }

    fn put_envelope(
        out: &mut impl BufMut,
        exchange: &[u8],
        routing_key: &[u8],
        properties: &[u8],
        persistent: bool,
    ) {
        assert!(exchange.len() <= 255 && routing_key.len() <= 255);
        out.put_u8(exchange.len() as u8);
        out.put_u8(routing_key.len() as u8);
        out.put_u8(if persistent { FLAG_PERSISTENT } else { 0 });
        out.put_slice(exchange);
        out.put_slice(routing_key);
        out.put_slice(properties);
    }

    /// Rebuilds a message from its envelope and body as logged; `None` if the envelope is
    /// inconsistent (it came from disk).
    pub fn from_parts(envelope: Bytes, body: Bytes) -> Option<Message> {
        if envelope.len() < PREFIX_BYTES
            || envelope.len() < PREFIX_BYTES + envelope[0] as usize + envelope[1] as usize
        {
            return None;
        }
        Some(Message { envelope, body })
    }

    /// The packed envelope (prefix, exchange, routing key, properties), for logging.
    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    fn exchange_len(&self) -> usize {
        self.envelope[0] as usize
    }

    fn routing_key_len(&self) -> usize {
        self.envelope[1] as usize
    }

    fn exchange_range(&self) -> std::ops::Range<usize> {
        PREFIX_BYTES..PREFIX_BYTES + self.exchange_len()
    }

    fn routing_key_range(&self) -> std::ops::Range<usize> {
        let start = PREFIX_BYTES + self.exchange_len();
        start..start + self.routing_key_len()
    }

    pub fn exchange(&self) -> &[u8] {
        &self.envelope[self.exchange_range()]
    }

    pub fn routing_key(&self) -> &[u8] {
        &self.envelope[self.routing_key_range()]
    }

    /// The exchange name as a handle on the envelope (no copy).
    pub fn exchange_shared(&self) -> Bytes {
        self.envelope.slice(self.exchange_range())
    }

    /// The routing key as a handle on the envelope (no copy).
    pub fn routing_key_shared(&self) -> Bytes {
        self.envelope.slice(self.routing_key_range())
    }

    /// The encoded content properties, ready to go into a content header frame.
    pub fn properties(&self) -> &[u8] {
        &self.envelope[self.routing_key_range().end..]
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// delivery-mode 2.
    pub fn is_persistent(&self) -> bool {
        self.envelope[2] & FLAG_PERSISTENT != 0
    }

    /// Bytes this message accounts for in a queue's memory: body, envelope, and the queue's
    /// bookkeeping for it (`BOOKKEEPING_BYTES`), so that budgets hold for small messages too.
    pub fn size_bytes(&self) -> usize {
        self.body.len() + self.envelope.len() + BOOKKEEPING_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_out() {
        let message = Message::new(
            b"ex",
            b"rk.1",
            &[0x10, 0, 2],
            Bytes::from_static(b"hi"),
            true,
        );
        assert_eq!(message.exchange(), b"ex");
        assert_eq!(message.routing_key(), b"rk.1");
        assert_eq!(message.properties(), &[0x10, 0, 2]);
        assert_eq!(&message.body()[..], b"hi");
        assert!(message.is_persistent());
        assert_eq!(message.size_bytes(), 2 + 3 + 2 + 4 + 3 + BOOKKEEPING_BYTES);
    }

    #[test]
    fn a_copied_body_shares_the_envelope_buffer() {
        let message = Message::with_copied_body(b"ex", b"rk", &[0x10, 0, 2], b"body", false);
        assert_eq!(message.exchange(), b"ex");
        assert_eq!(message.routing_key(), b"rk");
        assert_eq!(message.properties(), &[0x10, 0, 2]);
        assert_eq!(&message.body()[..], b"body");
        assert!(!message.is_persistent());
        assert_eq!(&message.exchange_shared()[..], b"ex");
        assert_eq!(&message.routing_key_shared()[..], b"rk");
        // Clones and drops in any order leave both parts intact.
        let copy = message.clone();
        drop(message);
        assert_eq!(&copy.body()[..], b"body");
        assert_eq!(copy.properties(), &[0x10, 0, 2]);
        let empty = Message::with_copied_body(b"", b"", &[], b"", true);
        assert!(empty.body().is_empty() && empty.exchange().is_empty());
    }

    #[test]
    fn a_message_is_small() {
        // Two Bytes handles and three small fields.
        assert!(
            std::mem::size_of::<Message>() <= 72,
            "{}",
            std::mem::size_of::<Message>()
        );
    }
}
