//! Dead letters: the message a queue republishes to its dead-letter exchange when one of its
//! messages is rejected without requeue, expires, or is pushed out by a length limit. Built as
//! RabbitMQ 3.10 builds it, since applications read its headers:
//! - published to the dead-letter exchange, with the queue's x-dead-letter-routing-key or else
//!   the message's own routing key;
//! - the expiration property removed (kept as `original-expiration` in the death record), so
//!   that the letter does not expire again for the same reason;
//! - `x-death` headers: an array of death records, most recent first, one per (queue, reason),
//!   each with a count; the first death also sets `x-first-death-reason`, `-queue` and
//!   `-exchange`.
//!
//! A letter that would come back to a queue it already died in, with no rejection on the way
//! (an automatic loop of expiries or overflows), is not delivered there (`cycles_back_to`).

use bytes::Bytes;
use shards::Message;

use super::queue_policy::DeadLetterTarget;
use crate::codec::{BasicProperties, FieldTable, FieldValue, LongStr, ShortStr};

/// Why a message was dead-lettered, as the death record names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rejected,
    Expired,
    MaxLen,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
        }
    }
}

/// A dead-lettered message, ready to route.
#[derive(Debug)]
pub struct Letter {
    pub message: Message,
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    pub headers: FieldTable,
    reason: Reason,
}

const X_DEATH: &str = "x-death";

/// The letter for `message`, which died in `queue` for `reason` at `now_secs` (Unix time).
/// None if its properties cannot be read (they were checked when it was published).
pub fn letter(
    message: &Message,
    queue: &ShortStr,
    reason: Reason,
    target: &DeadLetterTarget,
    now_secs: u64,
) -> Option<Letter> {
    let raw = message.envelope().slice_ref(message.properties());
    let mut properties = BasicProperties::decode(&raw).ok()?;
    let original_key = ShortStr::from_bytes(message.routing_key_shared()).ok()?;
    let exchange = ShortStr::from_bytes(message.exchange_shared()).ok()?;
    let mut death = vec![
        (name("reason"), text(reason.as_str().as_bytes())),
        (name("queue"), text(queue.as_bytes())),
        (name("time"), FieldValue::Timestamp(now_secs)),
        (name("exchange"), text(exchange.as_bytes())),
        (
            name("routing-keys"),
            FieldValue::Array(vec![text(original_key.as_bytes())]),
        ),
    ];
    if let Some(expiration) = properties.expiration.take() {
        death.push((name("original-expiration"), text(expiration.as_bytes())));
    }
    let mut headers = properties.headers.take().unwrap_or_default();
    record_death(&mut headers, death, queue, reason, &exchange);
    if target.routing_key.is_some() {
        // RabbitMQ routes by the one key given and drops the CC list.
        headers = headers
            .iter()
            .filter(|(n, _)| n.as_bytes() != b"CC")
            .cloned()
            .collect();
    }
    properties.headers = Some(headers.clone());
    let routing_key = target.routing_key.clone().unwrap_or(original_key);
    let message = Message::new(
        target.exchange.as_bytes(),
        routing_key.as_bytes(),
        &properties.to_bytes(),
        message.body().clone(),
        message.is_persistent(),
    );
    Some(Letter {
        message,
        exchange: target.exchange.clone(),
        routing_key,
        headers,
        reason,
    })
}

/// Adds this death to `x-death`: a record with count 1 in front, or, if the message died in
/// this queue for this reason before, that record with its count raised, moved to the front.
fn record_death(
    headers: &mut FieldTable,
    death: Vec<(ShortStr, FieldValue)>,
    queue: &ShortStr,
    reason: Reason,
    exchange: &ShortStr,
) {
    let mut deaths = match headers.get(X_DEATH) {
        Some(FieldValue::Array(deaths)) => deaths.clone(),
        _ => {
            headers.insert(
                name("x-first-death-reason"),
                text(reason.as_str().as_bytes()),
            );
            headers.insert(name("x-first-death-queue"), text(queue.as_bytes()));
            headers.insert(name("x-first-death-exchange"), text(exchange.as_bytes()));
            Vec::new()
        }
    };
    let earlier = deaths.iter().position(|d| {
        record_field(d, "queue") == Some(queue.as_bytes())
            && record_field(d, "reason") == Some(reason.as_str().as_bytes())
    });
    let record = match earlier.map(|i| deaths.remove(i)) {
        Some(FieldValue::Table(earlier)) => {
            let count = earlier
                .get("count")
                .and_then(FieldValue::as_i64)
                .unwrap_or(0);
            let mut record = earlier;
            record.insert(name("count"), FieldValue::I64(count.saturating_add(1)));
            record
        }
        _ => {
            let mut fields = vec![(name("count"), FieldValue::I64(1))];
            fields.extend(death);
            fields.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            fields.into_iter().collect()
        }
    };
    deaths.insert(0, FieldValue::Table(record));
    headers.insert(name(X_DEATH), FieldValue::Array(deaths));
}

/// A long-string field of a death record.
fn record_field<'a>(record: &'a FieldValue, field: &str) -> Option<&'a [u8]> {
    match record {
        FieldValue::Table(table) => match table.get(field)? {
            FieldValue::LongStr(s) => Some(s.as_bytes()),
            _ => None,
        },
        _ => None,
    }
}

impl Letter {
    /// Whether routing the letter to `queue` closes a loop with no rejection in it: `queue` is
    /// in its deaths, and neither that death nor any since was a rejection. A rejected message
    /// may always go round again (a client decided each time).
    pub fn cycles_back_to(&self, queue: &ShortStr) -> bool {
        if self.reason == Reason::Rejected {
            return false;
        }
        let Some(FieldValue::Array(deaths)) = self.headers.get(X_DEATH) else {
            return false;
        };
        for death in deaths {
            if record_field(death, "reason") == Some(b"rejected") {
                return false;
            }
            if record_field(death, "queue") == Some(queue.as_bytes()) {
                return true;
            }
        }
        false
    }
}

fn name(text: &'static str) -> ShortStr {
    ShortStr::from_static(text)
}

fn text(bytes: &[u8]) -> FieldValue {
    FieldValue::LongStr(LongStr::from_bytes(Bytes::copy_from_slice(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(routing_key: Option<&'static str>) -> DeadLetterTarget {
        DeadLetterTarget {
            exchange: ShortStr::from_static("dlx"),
            routing_key: routing_key.map(ShortStr::from_static),
        }
    }

    fn published(expiration: Option<&'static str>) -> Message {
        let properties = BasicProperties {
            expiration: expiration.map(ShortStr::from_static),
            delivery_mode: Some(2),
            ..Default::default()
        };
        Message::new(
            b"orders",
            b"new",
            &properties.to_bytes(),
            Bytes::from_static(b"body"),
            true,
        )
    }

    fn properties(letter: &Letter) -> BasicProperties {
        BasicProperties::decode(
            &letter
                .message
                .envelope()
                .slice_ref(letter.message.properties()),
        )
        .unwrap()
    }

    fn deaths(letter: &Letter) -> Vec<FieldTable> {
        match letter.headers.get(X_DEATH) {
            Some(FieldValue::Array(deaths)) => deaths
                .iter()
                .map(|d| match d {
                    FieldValue::Table(t) => t.clone(),
                    other => panic!("a death record that is not a table: {other:?}"),
                })
                .collect(),
            other => panic!("no x-death: {other:?}"),
        }
    }

    fn long_str(table: &FieldTable, field: &str) -> String {
        match table.get(field) {
            Some(FieldValue::LongStr(s)) => s.to_str_lossy().into_owned(),
            other => panic!("{field}: {other:?}"),
        }
    }

    #[test]
    fn a_first_death_is_recorded_as_rabbitmq_records_it() {
        let q = ShortStr::from_static("work");
        let letter = letter(
            &published(Some("5000")),
            &q,
            Reason::Expired,
            &target(None),
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(letter.message.exchange(), b"dlx");
        assert_eq!(
            letter.message.routing_key(),
            b"new",
            "its own key without a DL key"
        );
        assert!(letter.message.is_persistent());
        assert_eq!(letter.message.body().as_ref(), b"body");
        let props = properties(&letter);
        assert_eq!(props.expiration, None, "expiration is dropped");
        assert_eq!(props.delivery_mode, Some(2));
        assert_eq!(props.headers.as_ref(), Some(&letter.headers));
        let deaths = deaths(&letter);
        assert_eq!(deaths.len(), 1);
        let death = &deaths[0];
        let names: Vec<&[u8]> = death.iter().map(|(n, _)| n.as_bytes()).collect();
        assert_eq!(
            names,
            [
                &b"count"[..],
                b"exchange",
                b"original-expiration",
                b"queue",
                b"reason",
                b"routing-keys",
                b"time"
            ]
        );
        assert_eq!(death.get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(long_str(death, "reason"), "expired");
        assert_eq!(long_str(death, "queue"), "work");
        assert_eq!(long_str(death, "exchange"), "orders");
        assert_eq!(long_str(death, "original-expiration"), "5000");
        assert_eq!(
            death.get("time"),
            Some(&FieldValue::Timestamp(1_700_000_000))
        );
        assert_eq!(long_str(&letter.headers, "x-first-death-reason"), "expired");
        assert_eq!(long_str(&letter.headers, "x-first-death-queue"), "work");
        assert_eq!(
            long_str(&letter.headers, "x-first-death-exchange"),
            "orders"
        );
    }

    #[test]
    fn deaths_accumulate_per_queue_and_reason() {
        let work = ShortStr::from_static("work");
        let retry = ShortStr::from_static("retry");
        let first = letter(
            &published(None),
            &work,
            Reason::Rejected,
            &target(Some("r")),
            1,
        )
        .unwrap();
        assert_eq!(first.message.routing_key(), b"r");
        let second = letter(&first.message, &retry, Reason::Expired, &target(None), 2).unwrap();
        assert_eq!(
            second.message.routing_key(),
            b"r",
            "the letter's key routes it on"
        );
        let third = letter(
            &second.message,
            &work,
            Reason::Rejected,
            &target(Some("r")),
            3,
        )
        .unwrap();
        let deaths = deaths(&third);
        assert_eq!(deaths.len(), 2);
        assert_eq!(long_str(&deaths[0], "queue"), "work");
        assert_eq!(deaths[0].get("count"), Some(&FieldValue::I64(2)));
        assert_eq!(long_str(&deaths[1], "queue"), "retry");
        assert_eq!(deaths[1].get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(
            long_str(&third.headers, "x-first-death-queue"),
            "work",
            "the first death stays the first"
        );
    }

    #[test]
    fn deaths_a_client_made_up_are_survived() {
        let q = ShortStr::from_static("work");
        let forged = |x_death: FieldValue| {
            let headers: FieldTable = [(name(X_DEATH), x_death)].into_iter().collect();
            let properties = BasicProperties {
                headers: Some(headers),
                ..Default::default()
            };
            Message::new(b"", b"k", &properties.to_bytes(), Bytes::new(), false)
        };
        let junk = [
            text(b"not an array"),
            FieldValue::Array(vec![FieldValue::I8(1), text(b"x")]),
            FieldValue::Array(vec![FieldValue::Table(
                [
                    (name("queue"), text(b"work")),
                    (name("reason"), text(b"expired")),
                    (name("count"), text(b"many")),
                ]
                .into_iter()
                .collect(),
            )]),
        ];
        for x_death in junk {
            let letter =
                letter(&forged(x_death), &q, Reason::Expired, &target(None), 1).expect("a letter");
            let deaths = match letter.headers.get(X_DEATH) {
                Some(FieldValue::Array(deaths)) => deaths.clone(),
                other => panic!("{other:?}"),
            };
            let FieldValue::Table(first) = &deaths[0] else {
                panic!("the new death comes first: {deaths:?}");
            };
            assert_eq!(record_field(&deaths[0], "queue"), Some(&b"work"[..]));
            assert!(matches!(first.get("count"), Some(FieldValue::I64(1 | 2))));
        }
        let unreadable = Message::new(b"", b"k", b"\xff", Bytes::new(), false);
        assert!(letter(&unreadable, &q, Reason::Rejected, &target(None), 1).is_none());
    }

    #[test]
    fn automatic_loops_are_cut_and_rejections_are_not() {
        let work = ShortStr::from_static("work");
        let retry = ShortStr::from_static("retry");
        // work -(expired)-> retry -(expired)-> back to work: a loop no client decided.
        let once = letter(&published(None), &work, Reason::Expired, &target(None), 1).unwrap();
        assert!(
            once.cycles_back_to(&work),
            "straight back to the queue it expired in"
        );
        assert!(!once.cycles_back_to(&retry));
        let twice = letter(&once.message, &retry, Reason::Expired, &target(None), 2).unwrap();
        assert!(twice.cycles_back_to(&work));
        // work -(rejected)-> retry -(expired)-> work: the usual retry loop goes on.
        let rejected = letter(&published(None), &work, Reason::Rejected, &target(None), 1).unwrap();
        assert!(!rejected.cycles_back_to(&work));
        let expired = letter(&rejected.message, &retry, Reason::Expired, &target(None), 2).unwrap();
        assert!(!expired.cycles_back_to(&work));
    }
}
