//! The checks RabbitMQ makes on a queue.declare's x-arguments before it creates the queue: each
//! known argument must have the right field type and a value in range, or the declaration is
//! refused with 406 PRECONDITION_FAILED (channel level), worded as RabbitMQ 3.10 words it
//! ("invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {value_negative,-5}"; compared
//! with RabbitMQ by `tests/differential`), since clients and their tests match on it. Unknown
//! arguments are accepted, as RabbitMQ does; so are the quorum- and stream-only ones (RabbitMQ
//! refuses those on a classic queue, but shardmq has one kind of queue for every x-queue-type).
//!
//! Checking is all this module does: what the accepted arguments make a queue do is
//! `queue_policy`'s (the coordinator warns about those it accepts without applying).

use crate::codec::{FieldTable, FieldValue};

/// Largest x-max-priority RabbitMQ accepts.
const PRIORITY_MAX: i64 = 255;

/// Why RabbitMQ refuses an argument.
enum Refusal {
    /// "invalid arg '<name>' for queue ...: <reason>"
    Invalid(String),
    /// "invalid type '<type>' for arg '<name>' in queue ..." (how it words a dead-letter
    /// exchange name of the wrong type).
    Type(&'static str),
}

/// RabbitMQ's reply text for the first argument of `arguments` it would refuse on a declaration
/// of `queue` in `vhost`; `None` if it would accept them all.
pub fn refusal(arguments: &FieldTable, queue: &str, vhost: &str) -> Option<String> {
    arguments.iter().find_map(|(name, value)| {
        let name = name.to_str_lossy();
        match check(&name, value, arguments).err()? {
            Refusal::Invalid(reason) => Some(format!(
                "invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {reason}"
            )),
            Refusal::Type(kind) => Some(format!(
                "invalid type '{kind}' for arg '{name}' in queue '{queue}' in vhost '{vhost}'"
            )),
        }
    })
}

/// RabbitMQ's reply text for the first basic.consume argument it would refuse on `queue` in
/// `vhost`: x-priority must be an integer, x-cancel-on-ha-failover a boolean.
pub fn consume_refusal(arguments: &FieldTable, queue: &str, vhost: &str) -> Option<String> {
    arguments.iter().find_map(|(name, value)| {
        let name = name.to_str_lossy();
        let reason = match &*name {
            "x-priority" => value.as_i64().is_none().then(|| expected_integer(value)),
            "x-cancel-on-ha-failover" => {
                value.as_bool().is_none().then(|| unacceptable_type(value))
            }
            _ => None,
        }?;
        Some(format!(
            "invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {reason}"
        ))
    })
}

fn check(name: &str, value: &FieldValue, arguments: &FieldTable) -> Result<(), Refusal> {
    match name {
        "x-expires" => match non_negative(integer(value)?)? {
            0 => Err(Refusal::Invalid("{value_zero,0}".to_string())),
            _ => Ok(()),
        },
        "x-message-ttl" | "x-max-length" | "x-max-length-bytes" => {
            non_negative(integer(value)?).map(drop)
        }
        "x-max-priority" => match non_negative(integer(value)?)? {
            n if n > PRIORITY_MAX => Err(Refusal::Invalid(format!("{{max_value_exceeded,{n}}}"))),
            _ => Ok(()),
        },
        "x-dead-letter-exchange" => match value {
            FieldValue::LongStr(_) => Ok(()),
            other => Err(Refusal::Type(other.type_name())),
        },
        "x-dead-letter-routing-key" => {
            string(value)?;
            if arguments.get("x-dead-letter-exchange").is_none() {
                return Err(Refusal::Invalid(
                    "routing_key_but_no_dlx_defined".to_string(),
                ));
            }
            Ok(())
        }
        "x-overflow" => match &*string(value)? {
            "drop-head" | "reject-publish" | "reject-publish-dlx" => Ok(()),
            _ => Err(Refusal::Invalid("invalid_overflow".to_string())),
        },
        "x-queue-mode" => match &*string(value)? {
            "default" | "lazy" => Ok(()),
            other => Err(unsupported("queue mode", other)),
        },
        "x-queue-type" => match &*string(value)? {
            "classic" | "quorum" | "stream" => Ok(()),
            other => Err(unsupported("queue type", other)),
        },
        "x-single-active-consumer" => match value {
            FieldValue::Bool(_) => Ok(()),
            other => Err(unacceptable(other)),
        },
        _ => Ok(()),
    }
}

/// An integer of any of the field types RabbitMQ takes as one.
fn integer(value: &FieldValue) -> Result<i64, Refusal> {
    value
        .as_i64()
        .ok_or_else(|| Refusal::Invalid(expected_integer(value)))
}

fn expected_integer(value: &FieldValue) -> String {
    format!("\"expected integer, got {}\"", value.type_name())
}

fn non_negative(n: i64) -> Result<i64, Refusal> {
    if n < 0 {
        Err(Refusal::Invalid(format!("{{value_negative,{n}}}")))
    } else {
        Ok(n)
    }
}

/// A long string's text (lossy: only compared with ASCII names).
fn string(value: &FieldValue) -> Result<std::borrow::Cow<'_, str>, Refusal> {
    match value {
        FieldValue::LongStr(s) => Ok(s.to_str_lossy()),
        other => Err(unacceptable(other)),
    }
}

fn unsupported(what: &str, value: &str) -> Refusal {
    Refusal::Invalid(format!("\"unsupported {what} '{value}'\""))
}

fn unacceptable(value: &FieldValue) -> Refusal {
    Refusal::Invalid(unacceptable_type(value))
}

fn unacceptable_type(value: &FieldValue) -> String {
    format!("{{unacceptable_type,{}}}", value.type_name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{LongStr, ShortStr};

    fn text(s: &str) -> FieldValue {
        FieldValue::LongStr(LongStr::from(s.as_bytes().to_vec()))
    }

    /// The reason (or whole text, for a type refusal) given for `entries` on queue 'q'.
    fn refused(entries: &[(&str, FieldValue)]) -> Option<String> {
        let mut table = FieldTable::new();
        for (name, value) in entries {
            table.insert(ShortStr::try_from(*name).unwrap(), value.clone());
        }
        refusal(&table, "q", "/")
    }

    fn invalid(name: &str, reason: &str) -> Option<String> {
        Some(format!(
            "invalid arg '{name}' for queue 'q' in vhost '/': {reason}"
        ))
    }

    #[test]
    fn consume_arguments_are_checked_as_rabbitmq_checks_them() {
        let table = |name: &str, value: FieldValue| -> FieldTable {
            [(ShortStr::try_from(name).unwrap(), value)]
                .into_iter()
                .collect()
        };
        let refused = |t: &FieldTable| consume_refusal(t, "q", "/");
        assert_eq!(refused(&table("x-priority", FieldValue::I32(-3))), None);
        assert_eq!(
            refused(&table("x-priority", text("high"))),
            invalid("x-priority", "\"expected integer, got longstr\"")
        );
        assert_eq!(
            refused(&table("x-cancel-on-ha-failover", FieldValue::I8(1))),
            invalid("x-cancel-on-ha-failover", "{unacceptable_type,byte}")
        );
        assert_eq!(refused(&table("x-whatever", text("x"))), None);
    }

    #[test]
    fn valid_arguments_and_unknown_ones_are_accepted() {
        assert_eq!(
            refused(&[
                ("x-message-ttl", FieldValue::I64(4_294_967_296)),
                ("x-expires", FieldValue::I64(1000)),
                ("x-max-length", FieldValue::U8(0)),
                ("x-max-length-bytes", FieldValue::I64(1 << 40)),
                ("x-max-priority", FieldValue::I16(255)),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text("dead")),
                ("x-overflow", text("reject-publish")),
                ("x-queue-mode", text("lazy")),
                ("x-queue-type", text("quorum")),
                ("x-single-active-consumer", FieldValue::Bool(true)),
                ("x-max-in-memory-length", FieldValue::I32(-1)),
                ("x-shardmq-unknown", FieldValue::F64(1.5)),
                ("no-prefix", text("anything")),
            ]),
            None
        );
    }

    #[test]
    fn out_of_range_integers_are_refused_in_rabbitmqs_words() {
        let cases = [
            ("x-message-ttl", FieldValue::I32(-5), "{value_negative,-5}"),
            ("x-expires", FieldValue::I32(0), "{value_zero,0}"),
            ("x-expires", FieldValue::I32(-1), "{value_negative,-1}"),
            ("x-max-length", FieldValue::I64(-1), "{value_negative,-1}"),
            (
                "x-max-priority",
                FieldValue::I32(256),
                "{max_value_exceeded,256}",
            ),
            ("x-max-priority", FieldValue::I8(-1), "{value_negative,-1}"),
        ];
        for (name, value, reason) in cases {
            assert_eq!(refused(&[(name, value)]), invalid(name, reason), "{name}");
        }
    }

    #[test]
    fn wrong_types_and_values_are_refused_in_rabbitmqs_words() {
        let cases = [
            (
                "x-message-ttl",
                text("100"),
                "\"expected integer, got longstr\"",
            ),
            (
                "x-max-length-bytes",
                FieldValue::Array(vec![]),
                "\"expected integer, got array\"",
            ),
            ("x-overflow", text("drop-tail"), "invalid_overflow"),
            (
                "x-overflow",
                FieldValue::I32(7),
                "{unacceptable_type,signedint}",
            ),
            (
                "x-queue-mode",
                text("eager"),
                "\"unsupported queue mode 'eager'\"",
            ),
            (
                "x-queue-type",
                text("nope"),
                "\"unsupported queue type 'nope'\"",
            ),
            (
                "x-single-active-consumer",
                text("yes"),
                "{unacceptable_type,longstr}",
            ),
        ];
        for (name, value, reason) in cases {
            assert_eq!(refused(&[(name, value)]), invalid(name, reason), "{name}");
        }
        assert_eq!(
            refused(&[("x-dead-letter-exchange", FieldValue::I32(7))]).as_deref(),
            Some("invalid type 'signedint' for arg 'x-dead-letter-exchange' in queue 'q' in vhost '/'")
        );
    }

    #[test]
    fn a_dead_letter_routing_key_needs_a_dead_letter_exchange() {
        assert_eq!(
            refused(&[("x-dead-letter-routing-key", text("dead"))]),
            invalid(
                "x-dead-letter-routing-key",
                "routing_key_but_no_dlx_defined"
            )
        );
    }
}
