//! What a queue's x-arguments make its owning shard do once `queue_arguments` has accepted
//! them: message TTL (x-message-ttl, and each message's expiration property), length limits
//! (x-max-length, x-max-length-bytes, with x-overflow) and dead-lettering
//! (x-dead-letter-exchange, x-dead-letter-routing-key; the letter itself is `dead_letter`'s);
//! queue expiry (x-expires: the owning shard asks the coordinator to delete a queue unused for
//! that long); x-single-active-consumer, which `shards::Queue` applies when it picks a
//! consumer; and x-max-priority, by the message's priority lane (`priority_lane`), which
//! `shards::Queue` puts in its id so that id order is delivery order.
//!
//! As in RabbitMQ's classic queues:
//! - a message expires only at the head of its queue: one behind a message that lives longer
//!   waits for it (the queue is never scanned), and it is never delivered once its time is up;
//! - the limits count ready messages, not delivered ones; a full queue drops from its head
//!   (drop-head), or refuses the new message (reject-publish: a confirming publisher gets a
//!   basic.nack; reject-publish-dlx also dead-letters it).
//!
//! Invariant: every message published while its queue has a TTL, or carrying an expiration,
//! has its deadline in `Expiry` until it leaves the queue. Messages restored from the log have
//! none (the log does not keep publish times): their time counts from the moment the queue was
//! set up again.

use std::sync::LazyLock;
use std::time::Instant;

use ahash::HashMap;
use shards::{Message, MessageId};

use crate::codec::{
    BasicProperties, FieldTable, FieldValue, ShortStr, EXPIRATION_FLAG, PRIORITY_FLAG,
};

/// The x-arguments a queue acts on (the rest are accepted and ignored, with a warning).
/// x-queue-type and x-queue-mode name kinds of queue shardmq does not tell apart: every queue
/// pages its backlog out as a lazy one would.
pub const APPLIED_ARGUMENTS: &[&str] = &[
    "x-expires",
    "x-max-priority",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-mode",
];

/// What a full queue does with one more message (x-overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// Where the queue's dead letters go.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterTarget {
    pub exchange: ShortStr,
    /// Replaces the message's routing key, if set.
    pub routing_key: Option<ShortStr>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueuePolicy {
    /// Milliseconds a message may stay in the queue.
    pub message_ttl: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter: Option<DeadLetterTarget>,
    /// x-single-active-consumer (the queue itself applies it).
    pub single_active_consumer: bool,
    /// Milliseconds unused (no consumers, no basic.get, no declare) before the queue is
    /// deleted (x-expires).
    pub expires: Option<u64>,
    /// x-max-priority: messages go out by priority, capped at this.
    pub max_priority: Option<u8>,
}

impl QueuePolicy {
    /// The policy of arguments `queue_arguments::refusal` accepted (a value it would refuse is
    /// ignored here).
    pub fn from_arguments(arguments: &FieldTable) -> QueuePolicy {
        let count = |name: &str| {
            arguments
                .get(name)
                .and_then(FieldValue::as_i64)
                .and_then(|n| u64::try_from(n).ok())
        };
        let text = |name: &str| match arguments.get(name) {
            Some(FieldValue::LongStr(s)) => ShortStr::from_bytes(s.bytes().clone()).ok(),
            _ => None,
        };
        let overflow = match text("x-overflow").as_ref().map(ShortStr::as_bytes) {
            Some(b"reject-publish") => Overflow::RejectPublish,
            Some(b"reject-publish-dlx") => Overflow::RejectPublishDlx,
            _ => Overflow::DropHead,
        };
        QueuePolicy {
            message_ttl: count("x-message-ttl"),
            max_length: count("x-max-length"),
            max_length_bytes: count("x-max-length-bytes"),
            overflow,
            dead_letter: text("x-dead-letter-exchange").map(|exchange| DeadLetterTarget {
                exchange,
                routing_key: text("x-dead-letter-routing-key"),
            }),
            expires: count("x-expires").filter(|ms| *ms > 0),
            max_priority: count("x-max-priority").and_then(|max| u8::try_from(max).ok()),
            single_active_consumer: arguments
                .get("x-single-active-consumer")
                .and_then(FieldValue::as_bool)
                .unwrap_or(false),
        }
    }

    fn has_limit(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }

    /// Past its limits with `count` ready messages of `bytes`: drop-head drops from the head
    /// until it is not.
    pub fn over_limit(&self, count: u32, bytes: u64) -> bool {
        self.overflow == Overflow::DropHead
            && (self.max_length.is_some_and(|max| u64::from(count) > max)
                || self.max_length_bytes.is_some_and(|max| bytes > max))
    }

    /// A reject-publish queue with `count` ready messages of `bytes` refuses a message with a
    /// body of `body_bytes`.
    pub fn refuses(&self, count: u32, bytes: u64, body_bytes: usize) -> bool {
        self.overflow != Overflow::DropHead
            && (self.max_length.is_some_and(|max| u64::from(count) >= max)
                || self
                    .max_length_bytes
                    .is_some_and(|max| bytes.saturating_add(body_bytes as u64) > max))
    }

    /// Nothing to do past plain queueing (messages may still carry an expiration).
    pub fn is_plain(&self) -> bool {
        self.message_ttl.is_none() && !self.has_limit()
    }
}

/// The priority lane of `message` in a queue with `max_priority`: its priority property (0 if
/// it has none), capped at the maximum, as RabbitMQ caps it.
pub fn priority_lane(message: &Message, max_priority: Option<u8>) -> Option<u8> {
    let max = max_priority?;
    let properties = message.properties();
    let flags = u16::from_be_bytes([*properties.first()?, *properties.get(1)?]);
    let priority = if flags & PRIORITY_FLAG == 0 {
        0
    } else {
        BasicProperties::decode(&message.envelope().slice_ref(properties))
            .ok()
            .and_then(|p| p.priority)
            .unwrap_or(0)
    };
    Some(priority.min(max))
}

/// Milliseconds on a clock shared by every shard (deadlines only compare with each other).
pub fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A message's expiration property in milliseconds, if it has a valid one. Looks at the flags
/// word first, so that the usual message costs a two-byte read.
pub fn message_expiration(message: &Message) -> Option<u64> {
    let properties = message.properties();
    let flags = u16::from_be_bytes([*properties.first()?, *properties.get(1)?]);
    if flags & EXPIRATION_FLAG == 0 {
        return None;
    }
    let decoded = BasicProperties::decode(&message.envelope().slice_ref(properties)).ok()?;
    parse_expiration(decoded.expiration?.as_bytes()).ok()
}

/// RabbitMQ's reading of an expiration (Erlang's `string:to_integer`, then a sign check): an
/// integer of milliseconds in decimal, optionally signed. The error is RabbitMQ's reason, as its
/// refusal of the publish prints it (`no_integer`, `{value_negative,-1}`,
/// `{leftover_string,"x"}`).
pub fn parse_expiration(text: &[u8]) -> Result<u64, String> {
    let unsigned = text.strip_prefix(b"+").or_else(|| text.strip_prefix(b"-"));
    let digits_start = text.len() - unsigned.map_or(text.len(), <[u8]>::len);
    let digits_end = digits_start
        + text[digits_start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
    if digits_end == digits_start {
        return Err("no_integer".to_string());
    }
    if digits_end < text.len() {
        let rest = String::from_utf8_lossy(&text[digits_end..]);
        return Err(format!("{{leftover_string,{rest:?}}}"));
    }
    let magnitude = std::str::from_utf8(&text[digits_start..digits_end])
        .ok()
        .and_then(|digits| digits.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if text[0] == b'-' && magnitude != 0 {
        return Err(format!("{{value_negative,-{magnitude}}}"));
    }
    Ok(magnitude)
}

/// The deadlines of a queue's messages.
#[derive(Debug)]
pub struct Expiry {
    deadlines: HashMap<MessageId, u64>,
    /// When the queue was set up: restored messages count their time from here.
    since: u64,
}

impl Expiry {
    pub fn new(now: u64) -> Expiry {
        Expiry {
            deadlines: HashMap::default(),
            since: now,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// Records the deadline of a message just published as `id`, if it has one (`now` is
    /// read only then).
    pub fn published(
        &mut self,
        id: MessageId,
        message: &Message,
        ttl: Option<u64>,
        now: impl FnOnce() -> u64,
    ) {
        if let Some(ttl) = effective_ttl(message, ttl) {
            self.deadlines.insert(id, now().saturating_add(ttl));
        }
    }

    /// When message `id` expires. `message` is its body if in memory; without it a restored
    /// message's own expiration is not known yet, and only the queue's TTL counts.
    pub fn deadline(
        &self,
        id: MessageId,
        message: Option<&Message>,
        ttl: Option<u64>,
    ) -> Option<u64> {
        if let Some(deadline) = self.deadlines.get(&id) {
            return Some(*deadline);
        }
        let ttl = match message {
            Some(message) => effective_ttl(message, ttl),
            None => ttl,
        };
        ttl.map(|ttl| self.since.saturating_add(ttl))
    }

    /// Message `id` left the queue.
    pub fn forget(&mut self, id: MessageId) {
        if !self.deadlines.is_empty() {
            self.deadlines.remove(&id);
        }
    }

    /// Keeps only the deadlines `keep` names (a purge keeps the delivered messages').
    pub fn retain(&mut self, keep: impl Fn(MessageId) -> bool) {
        self.deadlines.retain(|id, _| keep(*id));
    }
}

/// The shorter of the queue's TTL and the message's own.
fn effective_ttl(message: &Message, ttl: Option<u64>) -> Option<u64> {
    match (ttl, message_expiration(message)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::LongStr;
    use bytes::Bytes;

    fn arguments(entries: &[(&str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(name, value)| (ShortStr::try_from(*name).unwrap(), value.clone()))
            .collect()
    }

    fn text(s: &str) -> FieldValue {
        FieldValue::LongStr(LongStr::from(s))
    }

    fn message(expiration: Option<&str>) -> Message {
        let properties = BasicProperties {
            expiration: expiration.map(|e| ShortStr::try_from(e).unwrap()),
            ..Default::default()
        }
        .to_bytes();
        Message::new(b"", b"q", &properties, Bytes::from_static(b"body"), false)
    }

    #[test]
    fn arguments_become_a_policy() {
        let policy = QueuePolicy::from_arguments(&arguments(&[
            ("x-message-ttl", FieldValue::I32(1500)),
            ("x-max-length", FieldValue::I64(3)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("dead")),
            ("x-single-active-consumer", FieldValue::Bool(true)),
            ("x-expires", FieldValue::U32(60_000)),
            ("x-max-priority", FieldValue::U8(10)),
        ]));
        assert_eq!(policy.message_ttl, Some(1500));
        assert_eq!(policy.max_length, Some(3));
        assert_eq!(policy.overflow, Overflow::RejectPublishDlx);
        let target = policy.dead_letter.clone().unwrap();
        assert_eq!(target.exchange.as_bytes(), b"dlx");
        assert_eq!(target.routing_key.unwrap().as_bytes(), b"dead");
        assert!(policy.single_active_consumer);
        assert_eq!(policy.expires, Some(60_000));
        assert_eq!(policy.max_priority, Some(10));
        assert!(!policy.is_plain());
        assert!(QueuePolicy::from_arguments(&FieldTable::new()).is_plain());
    }

    #[test]
    fn limits_count_messages_and_bytes() {
        let drop_head = QueuePolicy {
            max_length: Some(2),
            max_length_bytes: Some(100),
            ..Default::default()
        };
        assert!(!drop_head.over_limit(2, 100));
        assert!(drop_head.over_limit(3, 10));
        assert!(drop_head.over_limit(1, 101));
        assert!(!drop_head.refuses(5, 500, 1), "drop-head never refuses");
        let reject = QueuePolicy {
            overflow: Overflow::RejectPublish,
            ..drop_head
        };
        assert!(!reject.over_limit(5, 500), "reject-publish never drops");
        assert!(!reject.refuses(1, 90, 10));
        assert!(reject.refuses(2, 0, 1));
        assert!(reject.refuses(1, 90, 11));
    }

    #[test]
    fn the_shorter_ttl_wins_and_restored_messages_count_from_setup() {
        let mut expiry = Expiry::new(1_000);
        let now = || 5_000;
        expiry.published(1, &message(Some("50")), Some(200), now);
        expiry.published(2, &message(None), Some(200), now);
        expiry.published(3, &message(Some("900")), None, now);
        expiry.published(4, &message(None), None, || {
            unreachable!("no deadline to compute")
        });
        assert_eq!(expiry.deadline(1, None, Some(200)), Some(5_050));
        assert_eq!(expiry.deadline(2, None, Some(200)), Some(5_200));
        assert_eq!(expiry.deadline(3, None, None), Some(5_900));
        assert_eq!(expiry.deadline(4, None, None), None);
        // Id 9 was restored from the log: its own expiration, once its body is back, or the
        // queue's TTL, from when the queue was set up.
        assert_eq!(expiry.deadline(9, None, Some(200)), Some(1_200));
        assert_eq!(
            expiry.deadline(9, Some(&message(Some("70"))), Some(200)),
            Some(1_070)
        );
        expiry.forget(1);
        assert_eq!(expiry.deadline(1, None, None), None);
    }

    #[test]
    fn expirations_read_as_rabbitmq_reads_them() {
        assert_eq!(parse_expiration(b"0"), Ok(0));
        assert_eq!(parse_expiration(b"60000"), Ok(60_000));
        assert_eq!(parse_expiration(b"+7"), Ok(7));
        assert_eq!(parse_expiration(b"-0"), Ok(0));
        let refused = |text: &[u8]| parse_expiration(text).unwrap_err();
        assert_eq!(refused(b"-1"), "{value_negative,-1}");
        assert_eq!(refused(b"soon"), "no_integer");
        assert_eq!(refused(b""), "no_integer");
        assert_eq!(refused(b"-"), "no_integer");
        assert_eq!(refused(b"10s"), "{leftover_string,\"s\"}");
        assert_eq!(message_expiration(&message(Some("25"))), Some(25));
        assert_eq!(message_expiration(&message(None)), None);
    }
}
