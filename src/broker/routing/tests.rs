//! Routing semantics, one table per exchange type, plus e2e bindings, alternate exchanges and
//! the cascades of deletes.

use super::*;
use crate::codec::LongStr;

fn s(value: &str) -> ShortStr {
    ShortStr::try_from(value).unwrap()
}

fn exchange(name: &str, kind: ExchangeKind) -> MetaOp {
    MetaOp::DeclareExchange(ExchangeDef {
        name: s(name),
        kind,
        durable: false,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::new(),
    })
}

fn queue(name: &str) -> MetaOp {
    MetaOp::DeclareQueue(QueueDef {
        name: s(name),
        owner: ShardId(0),
        durable: false,
        exclusive: None,
        auto_delete: false,
        arguments: FieldTable::new(),
    })
}

fn bind(source: &str, queue: &str, key: &str) -> MetaOp {
    bind_with(source, Destination::Queue(s(queue)), key, FieldTable::new())
}

fn bind_with(source: &str, destination: Destination, key: &str, arguments: FieldTable) -> MetaOp {
    MetaOp::Bind(BindingDef {
        source: s(source),
        destination,
        routing_key: s(key),
        arguments,
    })
}

fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
    entries.iter().map(|(k, v)| (s(k), v.clone())).collect()
}

fn text(value: &str) -> FieldValue {
    FieldValue::LongStr(LongStr::from(value))
}

fn routed(routing: &VhostRouting, exchange: &str, key: &str) -> Vec<String> {
    routed_with(routing, exchange, key, None)
}

fn routed_with(
    routing: &VhostRouting,
    exchange: &str,
    key: &str,
    headers: Option<&FieldTable>,
) -> Vec<String> {
    let mut out = Vec::new();
    routing.route(&s(exchange), &s(key), headers, &mut out);
    out.iter().map(|q| q.key.name.to_string()).collect()
}

fn setup(ops: &[MetaOp]) -> VhostRouting {
    let mut routing = VhostRouting::new(s("/"));
    for op in ops {
        routing.apply(op);
    }
    routing
}

#[test]
fn predeclared_exchanges_exist() {
    let routing = VhostRouting::new(s("/"));
    for name in [
        "amq.direct",
        "amq.fanout",
        "amq.topic",
        "amq.headers",
        "amq.match",
    ] {
        assert!(routing.exchange(&s(name)).is_some(), "{name}");
    }
}

#[test]
fn default_exchange_routes_by_queue_name() {
    let routing = setup(&[queue("q1")]);
    assert_eq!(routed(&routing, "", "q1"), vec!["q1"]);
    assert!(routed(&routing, "", "q2").is_empty());
}

#[test]
fn direct_routes_on_exact_keys() {
    let routing = setup(&[
        queue("a"),
        queue("b"),
        bind("amq.direct", "a", "k1"),
        bind("amq.direct", "b", "k1"),
        bind("amq.direct", "b", "k2"),
    ]);
    assert_eq!(routed(&routing, "amq.direct", "k1"), vec!["a", "b"]);
    assert_eq!(routed(&routing, "amq.direct", "k2"), vec!["b"]);
    assert!(routed(&routing, "amq.direct", "k3").is_empty());
}

#[test]
fn fanout_ignores_the_key() {
    let routing = setup(&[
        queue("a"),
        queue("b"),
        bind("amq.fanout", "a", ""),
        bind("amq.fanout", "b", "whatever"),
    ]);
    assert_eq!(routed(&routing, "amq.fanout", "x.y"), vec!["a", "b"]);
}

#[test]
fn topic_routes_by_pattern_and_deduplicates() {
    let routing = setup(&[
        queue("a"),
        queue("b"),
        bind("amq.topic", "a", "stock.#"),
        bind("amq.topic", "a", "*.nyse.*"),
        bind("amq.topic", "b", "stock.nyse.ibm"),
    ]);
    assert_eq!(
        routed(&routing, "amq.topic", "stock.nyse.ibm"),
        vec!["a", "b"]
    );
    assert_eq!(routed(&routing, "amq.topic", "stock"), vec!["a"]);
    assert!(routed(&routing, "amq.topic", "bond.lse.x").is_empty());
}

/// (binding arguments, message headers, matches)
#[test]
fn headers_matching_table() {
    let cases: Vec<(FieldTable, FieldTable, bool)> = vec![
        // all (default): every non-x argument must match.
        (
            table(&[("a", text("1")), ("b", text("2"))]),
            table(&[("a", text("1")), ("b", text("2")), ("c", text("3"))]),
            true,
        ),
        (
            table(&[("a", text("1")), ("b", text("2"))]),
            table(&[("a", text("1"))]),
            false,
        ),
        (
            table(&[("x-match", text("all")), ("a", text("1"))]),
            table(&[("a", text("2"))]),
            false,
        ),
        // any: one is enough.
        (
            table(&[("x-match", text("any")), ("a", text("1")), ("b", text("2"))]),
            table(&[("b", text("2"))]),
            true,
        ),
        (
            table(&[("x-match", text("any")), ("a", text("1"))]),
            table(&[("b", text("1"))]),
            false,
        ),
        // Types matter: the integer 1 is not the string "1".
        (
            table(&[("a", FieldValue::I32(1))]),
            table(&[("a", text("1"))]),
            false,
        ),
        // Void matches presence with any value.
        (
            table(&[("a", FieldValue::Void)]),
            table(&[("a", text("anything"))]),
            true,
        ),
        // x- arguments are ignored by all/any...
        (
            table(&[("x-extra", text("1")), ("a", text("1"))]),
            table(&[("a", text("1"))]),
            true,
        ),
        // ...and considered by the -with-x modes.
        (
            table(&[("x-match", text("all-with-x")), ("x-extra", text("1"))]),
            table(&[("a", text("1"))]),
            false,
        ),
        (
            table(&[("x-match", text("all-with-x")), ("x-extra", text("1"))]),
            table(&[("x-extra", text("1"))]),
            true,
        ),
        (
            table(&[
                ("x-match", text("any-with-x")),
                ("x-extra", text("1")),
                ("a", text("9")),
            ]),
            table(&[("x-extra", text("1"))]),
            true,
        ),
        // No arguments: all matches everything, any matches nothing.
        (table(&[]), table(&[]), true),
        (
            table(&[("x-match", text("any"))]),
            table(&[("a", text("1"))]),
            false,
        ),
    ];
    for (index, (binding, headers, expected)) in cases.iter().enumerate() {
        assert_eq!(headers_match(binding, headers), *expected, "case {index}");
    }
}

#[test]
fn headers_exchange_routes_with_message_headers() {
    let routing = setup(&[
        queue("q"),
        bind_with(
            "amq.headers",
            Destination::Queue(s("q")),
            "",
            table(&[("format", text("pdf"))]),
        ),
    ]);
    let pdf = table(&[("format", text("pdf"))]);
    assert_eq!(
        routed_with(&routing, "amq.headers", "", Some(&pdf)),
        vec!["q"]
    );
    assert!(routed_with(&routing, "amq.headers", "", None).is_empty());
}

#[test]
fn exchange_to_exchange_bindings_route_through_and_cycles_end() {
    let routing = setup(&[
        exchange("e1", ExchangeKind::Fanout),
        exchange("e2", ExchangeKind::Direct),
        queue("q"),
        bind_with("e1", Destination::Exchange(s("e2")), "", FieldTable::new()),
        bind_with("e2", Destination::Exchange(s("e1")), "k", FieldTable::new()),
        bind("e2", "q", "k"),
    ]);
    assert_eq!(routed(&routing, "e1", "k"), vec!["q"]);
    assert!(routed(&routing, "e1", "other").is_empty());
}

#[test]
fn alternate_exchange_takes_what_the_exchange_cannot_route() {
    let mut ae_arguments = FieldTable::new();
    ae_arguments.insert(s("alternate-exchange"), text("ae"));
    let routing = setup(&[
        MetaOp::DeclareExchange(ExchangeDef {
            name: s("main"),
            kind: ExchangeKind::Direct,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: ae_arguments,
        }),
        exchange("ae", ExchangeKind::Fanout),
        queue("routed"),
        queue("unrouted"),
        bind("main", "routed", "k"),
        bind("ae", "unrouted", ""),
    ]);
    assert_eq!(routed(&routing, "main", "k"), vec!["routed"]);
    assert_eq!(routed(&routing, "main", "nope"), vec!["unrouted"]);
}

#[test]
fn deleting_a_queue_removes_its_bindings_and_auto_delete_exchanges_follow() {
    let mut routing = setup(&[
        MetaOp::DeclareExchange(ExchangeDef {
            name: s("temp"),
            kind: ExchangeKind::Topic,
            durable: false,
            auto_delete: true,
            internal: false,
            arguments: FieldTable::new(),
        }),
        queue("q"),
        bind("temp", "q", "#"),
        bind("amq.direct", "q", "k"),
    ]);
    assert_eq!(routed(&routing, "temp", "a"), vec!["q"]);
    routing.apply(&MetaOp::DeleteQueue { name: s("q") });
    assert!(
        routing.exchange(&s("temp")).is_none(),
        "auto-delete exchange went"
    );
    assert!(routing.exchange(&s("amq.direct")).is_some());
    assert!(!routing.exchange_has_bindings(&s("amq.direct")));
}

#[test]
fn unbind_is_exact_and_last_unbind_deletes_an_auto_delete_exchange() {
    let mut routing = setup(&[
        MetaOp::DeclareExchange(ExchangeDef {
            name: s("temp"),
            kind: ExchangeKind::Direct,
            durable: false,
            auto_delete: true,
            internal: false,
            arguments: FieldTable::new(),
        }),
        queue("q"),
        bind("temp", "q", "a"),
        bind("temp", "q", "b"),
    ]);
    routing.apply(&MetaOp::Unbind(BindingDef {
        source: s("temp"),
        destination: Destination::Queue(s("q")),
        routing_key: s("a"),
        arguments: FieldTable::new(),
    }));
    assert_eq!(routed(&routing, "temp", "b"), vec!["q"]);
    assert!(routed(&routing, "temp", "a").is_empty());
    routing.apply(&MetaOp::Unbind(BindingDef {
        source: s("temp"),
        destination: Destination::Queue(s("q")),
        routing_key: s("b"),
        arguments: FieldTable::new(),
    }));
    assert!(routing.exchange(&s("temp")).is_none());
}

#[test]
fn deleting_an_exchange_removes_bindings_to_it() {
    let mut routing = setup(&[
        exchange("src", ExchangeKind::Fanout),
        exchange("dst", ExchangeKind::Fanout),
        queue("q"),
        bind_with(
            "src",
            Destination::Exchange(s("dst")),
            "",
            FieldTable::new(),
        ),
        bind("dst", "q", ""),
    ]);
    assert_eq!(routed(&routing, "src", ""), vec!["q"]);
    routing.apply(&MetaOp::DeleteExchange { name: s("dst") });
    assert!(routed(&routing, "src", "").is_empty());
    assert!(!routing.exchange_has_bindings(&s("src")));
}

#[test]
fn equivalence_ignores_argument_order() {
    let a = table(&[("x", FieldValue::I32(1)), ("y", FieldValue::I32(2))]);
    let b = table(&[("y", FieldValue::I32(2)), ("x", FieldValue::I32(1))]);
    assert!(tables_equivalent(&a, &b));
    assert!(!tables_equivalent(&a, &table(&[("x", FieldValue::I32(1))])));
}
