"""The scripted scenarios the differential runner plays against RabbitMQ and shardmq.

Each function registered with @scenario takes an Observer (harness.py) and records what a client
sees. Names say what is exercised; the class of each group is in its heading comment. A scenario
must be deterministic on a correct broker: no timing-dependent counts, names from `o.name()`.
"""

import struct

import pika

from harness import PROTOCOL_HEADER, frame, method, shortstr

SCENARIOS = []


def scenario(function):
    SCENARIOS.append(function)
    return function


def props(**fields):
    return pika.BasicProperties(**fields)


def declare(o, ch, suffix="q", **options):
    queue = o.name(suffix)
    o.call(f"declare {suffix}", lambda: ch.queue_declare(queue, **options))
    return queue


def fill(o, ch, queue, count, prefix="m"):
    """Publishes `count` messages with confirms (on a channel of its own), so that the queue
    holds them before the scenario goes on: RabbitMQ counts asynchronously otherwise."""
    publisher = ch.connection.channel()
    publisher.confirm_delivery()
    for i in range(count):
        publisher.basic_publish("", queue, f"{prefix}{i}".encode())
    publisher.close()
    o.call("fill", lambda: ch.queue_declare(queue, passive=True))


# ---- connection -----------------------------------------------------------------------------

@scenario
def connection_open_and_close(o):
    connection = o.connect()
    capabilities = connection._impl.server_capabilities
    o.note("capabilities", {k: capabilities.get(k) for k in (
        "publisher_confirms", "exchange_exchange_bindings", "basic.nack",
        "consumer_cancel_notify", "connection.blocked", "authentication_failure_close",
        "per_consumer_qos")})
    o.call("close", connection.close)


@scenario
def connection_wrong_password_is_403(o):
    o.call("connect", lambda: o.connect(credentials=pika.PlainCredentials("guest", "nope")))


@scenario
def connection_unknown_user_is_403(o):
    o.call("connect", lambda: o.connect(credentials=pika.PlainCredentials("nobody", "x")))


@scenario
def connection_unknown_vhost_is_530(o):
    o.call("connect", lambda: o.connect(virtual_host="no-such-vhost"))


@scenario
def connection_tune_takes_the_smaller_limits(o):
    connection = o.connect(channel_max=10, frame_max=8192)
    params = connection._impl.params
    o.note("tuned", params.channel_max, params.frame_max)


@scenario
def connection_tune_server_limits_when_client_asks_more(o):
    connection = o.connect(channel_max=65535, frame_max=1 << 20)
    params = connection._impl.params
    o.note("tuned", params.channel_max, params.frame_max)


@scenario
def connection_heartbeat_is_negotiated(o):
    connection = o.connect(heartbeat=7)
    o.note("heartbeat", connection._impl.params.heartbeat)


@scenario
def connection_many_channels(o):
    connection = o.connect()
    channels = [connection.channel() for _ in range(20)]
    o.note("numbers", [c.channel_number for c in channels])
    for c in channels[::2]:
        o.call("close", c.close)
    o.call("reopen", lambda: connection.channel().channel_number)


@scenario
def connection_close_requeues_unacked(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    other = o.connect()
    och = other.channel()
    o.get(och, queue)
    o.get(och, queue)
    o.call("close", other.close)
    o.consume(o.connections[0], ch, queue, 3, ack=True)


@scenario
def connection_close_deletes_exclusive_queue(o):
    owner = o.connect()
    queue = o.name("excl")
    o.call("declare", lambda: owner.channel().queue_declare(queue, exclusive=True))
    o.call("close", owner.close)
    o.passive_counts(queue)


# ---- channel --------------------------------------------------------------------------------

@scenario
def channel_open_close_reopen_same_number(o):
    connection = o.connect()
    ch = connection.channel(channel_number=5)
    o.call("close", ch.close)
    ch = connection.channel(channel_number=5)
    o.note("reopened", ch.channel_number, ch.is_open)


@scenario
def channel_delivery_tags_restart_on_a_new_channel(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 4)
    o.get(ch, queue)
    o.get(ch, queue)
    ch2 = connection.channel()
    o.get(ch2, queue, label="second channel get")


@scenario
def channel_close_requeues_unacked_in_order(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 5)
    ch2 = connection.channel()
    for _ in range(3):
        o.get(ch2, queue)
    o.call("close", ch2.close)
    o.consume(connection, ch, queue, 5, ack=True)


@scenario
def channel_flow_off_and_on(o):
    connection = o.connect()
    ch = connection.channel()
    o.call("flow off", lambda: ch.flow(False))
    o.call("flow on", lambda: ch.flow(True) if ch.is_open else None)


@scenario
def channel_flow_on_is_acknowledged(o):
    ch = o.channel()
    o.call("flow on", lambda: ch.flow(True))


@scenario
def channel_error_keeps_other_channels(o):
    connection = o.connect()
    good = connection.channel()
    bad = connection.channel()
    o.call("bad", lambda: bad.queue_declare(o.name("missing"), passive=True))
    o.call("good", lambda: good.queue_declare(o.name("q")))


# ---- exchange -------------------------------------------------------------------------------

@scenario
def exchange_declare_every_type(o):
    ch = o.channel()
    for kind in ("direct", "fanout", "topic", "headers"):
        o.call(kind, lambda: ch.exchange_declare(o.name(kind), exchange_type=kind))


@scenario
def exchange_declare_unknown_type_is_503(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name(), exchange_type="x-no-such-type"))


@scenario
def exchange_redeclare_same_is_ok(o):
    ch = o.channel()
    for _ in range(2):
        o.call("declare", lambda: ch.exchange_declare(o.name(), exchange_type="topic"))


@scenario
def exchange_redeclare_other_type_is_406(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name(), exchange_type="direct"))
    o.call("redeclare", lambda: ch.exchange_declare(o.name(), exchange_type="fanout"))


@scenario
def exchange_redeclare_other_durability_is_406(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name(), durable=False))
    o.call("redeclare", lambda: ch.exchange_declare(o.name(), durable=True))


@scenario
def exchange_redeclare_other_auto_delete_is_406(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name()))
    o.call("redeclare", lambda: ch.exchange_declare(o.name(), auto_delete=True))


@scenario
def exchange_passive_missing_is_404(o):
    ch = o.channel()
    o.call("passive", lambda: ch.exchange_declare(o.name(), passive=True))


@scenario
def exchange_passive_existing_ignores_type(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name(), exchange_type="fanout"))
    o.call("passive", lambda: ch.exchange_declare(o.name(), exchange_type="direct", passive=True))


@scenario
def exchange_passive_builtin(o):
    ch = o.channel()
    for name in ("amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"):
        o.call(name, lambda: ch.exchange_declare(name, passive=True))


@scenario
def exchange_declare_amq_prefix_is_403(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare("amq.custom-" + o.scenario))


@scenario
def exchange_redeclare_builtin_is_403(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare("amq.direct", exchange_type="direct",
                                                  durable=True))


@scenario
def exchange_delete_then_passive(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name()))
    o.call("delete", lambda: ch.exchange_delete(o.name()))
    o.call("passive", lambda: ch.exchange_declare(o.name(), passive=True))


@scenario
def exchange_delete_missing(o):
    ch = o.channel()
    o.call("delete", lambda: ch.exchange_delete(o.name()))


@scenario
def exchange_delete_if_unused_with_binding_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("declare", lambda: ch.exchange_declare(o.name("x")))
    o.call("bind", lambda: ch.queue_bind(queue, o.name("x"), "k"))
    o.call("delete", lambda: ch.exchange_delete(o.name("x"), if_unused=True))


@scenario
def exchange_delete_if_unused_without_binding(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name("x")))
    o.call("delete", lambda: ch.exchange_delete(o.name("x"), if_unused=True))


@scenario
def exchange_delete_builtin_is_403(o):
    ch = o.channel()
    o.call("delete", lambda: ch.exchange_delete("amq.fanout"))


@scenario
def exchange_delete_default_is_403(o):
    ch = o.channel()
    o.call("delete", lambda: ch.exchange_delete(""))


@scenario
def exchange_declare_default_is_403(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare("", exchange_type="direct"))


@scenario
def exchange_to_exchange_routing(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("source", lambda: ch.exchange_declare(o.name("src"), exchange_type="topic"))
    o.call("dest", lambda: ch.exchange_declare(o.name("dst"), exchange_type="direct"))
    o.call("e2e", lambda: ch.exchange_bind(o.name("dst"), o.name("src"), "a.*"))
    o.call("bind", lambda: ch.queue_bind(queue, o.name("dst"), "a.b"))
    for key in ("a.b", "a.c", "b.b"):
        ch.basic_publish(o.name("src"), key, key.encode())
    o.consume(connection, ch, queue, 1, ack=True)
    o.call("unbind", lambda: ch.exchange_unbind(o.name("dst"), o.name("src"), "a.*"))
    ch.confirm_delivery()
    ch.basic_publish(o.name("src"), "a.b", b"after")
    o.call("count", lambda: ch.queue_declare(queue, passive=True))


@scenario
def exchange_bind_missing_source_is_404(o):
    ch = o.channel()
    o.call("dest", lambda: ch.exchange_declare(o.name("dst")))
    o.call("e2e", lambda: ch.exchange_bind(o.name("dst"), o.name("nosrc"), "k"))


@scenario
def exchange_bind_missing_destination_is_404(o):
    ch = o.channel()
    o.call("src", lambda: ch.exchange_declare(o.name("src")))
    o.call("e2e", lambda: ch.exchange_bind(o.name("nodst"), o.name("src"), "k"))


@scenario
def exchange_cycle_delivers_once(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("a", lambda: ch.exchange_declare(o.name("a"), exchange_type="fanout"))
    o.call("b", lambda: ch.exchange_declare(o.name("b"), exchange_type="fanout"))
    o.call("a->b", lambda: ch.exchange_bind(o.name("b"), o.name("a")))
    o.call("b->a", lambda: ch.exchange_bind(o.name("a"), o.name("b")))
    o.call("bind", lambda: ch.queue_bind(queue, o.name("b")))
    ch.basic_publish(o.name("a"), "", b"once")
    o.consume(connection, ch, queue, 2, ack=True, wait=0.5)


@scenario
def exchange_internal_refuses_publish_403(o):
    ch = o.channel()
    o.call("declare", lambda: ch.exchange_declare(o.name(), internal=True))
    o.publish(ch, b"x", "k", exchange=o.name())
    o.call("after", lambda: ch.queue_declare(o.name("q")))


@scenario
def exchange_auto_delete_goes_with_last_binding(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("declare", lambda: ch.exchange_declare(o.name("x"), auto_delete=True))
    o.call("bind", lambda: ch.queue_bind(queue, o.name("x"), "k"))
    o.call("unbind", lambda: ch.queue_unbind(queue, o.name("x"), "k"))
    o.call("passive", lambda: ch.exchange_declare(o.name("x"), passive=True))


@scenario
def exchange_alternate_exchange_takes_unroutable(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("ae", lambda: ch.exchange_declare(o.name("ae"), exchange_type="fanout"))
    o.call("main", lambda: ch.exchange_declare(
        o.name("main"), arguments={"alternate-exchange": o.name("ae")}))
    o.call("bind", lambda: ch.queue_bind(queue, o.name("ae")))
    ch.confirm_delivery()
    o.publish(ch, b"lost", "nowhere", exchange=o.name("main"), mandatory=True)
    o.get(ch, queue)


@scenario
def exchange_publish_to_missing_is_404(o):
    ch = o.channel()
    o.publish(ch, b"x", "k", exchange=o.name("missing"))
    o.call("after", lambda: ch.queue_declare(o.name("q")))


@scenario
def exchange_publish_to_missing_with_confirms_is_404(o):
    ch = o.channel()
    ch.confirm_delivery()
    o.publish(ch, b"x", "k", exchange=o.name("missing"))


# ---- queue ----------------------------------------------------------------------------------

@scenario
def queue_declare_server_named(o):
    ch = o.channel()
    o.call("declare", lambda: ch.queue_declare("", exclusive=True))


@scenario
def queue_declare_named_reports_counts(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    o.call("again", lambda: ch.queue_declare(queue))


@scenario
def queue_redeclare_other_durability_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("redeclare", lambda: ch.queue_declare(queue, durable=True))


@scenario
def queue_redeclare_other_auto_delete_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("redeclare", lambda: ch.queue_declare(queue, auto_delete=True))


@scenario
def queue_redeclare_exclusive_from_owner_differs_is_406(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    o.call("redeclare", lambda: ch.queue_declare(queue, exclusive=False))


@scenario
def queue_passive_missing_is_404(o):
    ch = o.channel()
    o.call("passive", lambda: ch.queue_declare(o.name("missing"), passive=True))


@scenario
def queue_passive_ignores_other_flags(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("passive", lambda: ch.queue_declare(queue, passive=True, durable=True,
                                               auto_delete=True))


@scenario
def queue_declare_amq_prefix_is_403(o):
    ch = o.channel()
    o.call("declare", lambda: ch.queue_declare("amq." + o.scenario))


@scenario
def queue_passive_amq_prefix_missing_is_404(o):
    ch = o.channel()
    o.call("passive", lambda: ch.queue_declare("amq." + o.scenario, passive=True))


@scenario
def queue_name_of_255_bytes(o):
    ch = o.channel()
    name = (o.name() + "-" * 255)[:255]
    o.call("declare", lambda: ch.queue_declare(name))
    o.call("delete", lambda: ch.queue_delete(name))


@scenario
def queue_exclusive_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    other = o.channel()
    o.call("declare", lambda: other.queue_declare(queue))


@scenario
def queue_exclusive_passive_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    other = o.channel()
    o.call("passive", lambda: other.queue_declare(queue, passive=True))


@scenario
def queue_exclusive_get_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    o.get(o.channel(), queue)


@scenario
def queue_exclusive_consume_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    other = o.channel()
    o.call("consume", lambda: other.basic_consume(queue, lambda *a: None))


@scenario
def queue_exclusive_delete_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    other = o.channel()
    o.call("delete", lambda: other.queue_delete(queue))


@scenario
def queue_exclusive_purge_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    other = o.channel()
    o.call("purge", lambda: other.queue_purge(queue))


@scenario
def queue_exclusive_bind_from_other_connection_is_405(o):
    ch = o.channel()
    queue = declare(o, ch, exclusive=True)
    other = o.channel()
    o.call("bind", lambda: other.queue_bind(queue, "amq.direct", "k"))


@scenario
def queue_exclusive_usable_from_other_channel_of_owner(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, exclusive=True)
    ch2 = connection.channel()
    o.call("publish", lambda: ch2.basic_publish("", queue, b"x"))
    o.get(ch2, queue, auto_ack=True)


@scenario
def queue_bind_missing_exchange_is_404(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("bind", lambda: ch.queue_bind(queue, o.name("nox"), "k"))


@scenario
def queue_bind_missing_queue_is_404(o):
    ch = o.channel()
    o.call("bind", lambda: ch.queue_bind(o.name("noq"), "amq.direct", "k"))


@scenario
def queue_bind_to_default_exchange_is_403(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("bind", lambda: ch.queue_bind(queue, "", "k"))


@scenario
def queue_bind_twice_is_idempotent(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("bind", lambda: ch.queue_bind(queue, "amq.direct", o.name()))
    o.call("bind again", lambda: ch.queue_bind(queue, "amq.direct", o.name()))
    ch.basic_publish("amq.direct", o.name(), b"one")
    o.consume(connection, ch, queue, 2, ack=True, wait=0.5)


@scenario
def queue_unbind_missing_binding(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("unbind", lambda: ch.queue_unbind(queue, "amq.direct", "never-bound"))


@scenario
def queue_unbind_missing_queue(o):
    ch = o.channel()
    o.call("unbind", lambda: ch.queue_unbind(o.name("noq"), "amq.direct", "k"))


@scenario
def queue_unbind_missing_exchange(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("unbind", lambda: ch.queue_unbind(queue, o.name("nox"), "k"))


@scenario
def queue_purge_reports_count(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 7)
    o.call("purge", lambda: ch.queue_purge(queue))
    o.call("after", lambda: ch.queue_declare(queue, passive=True))


@scenario
def queue_purge_keeps_unacked(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 4)
    o.get(ch, queue)
    o.call("purge", lambda: ch.queue_purge(queue))
    o.call("reject", lambda: ch.basic_reject(1, requeue=True))
    # A get on the same channel follows the reject in RabbitMQ too; a passive declare may not.
    o.get(ch, queue)
    o.get(ch, queue)


@scenario
def queue_purge_missing_is_404(o):
    ch = o.channel()
    o.call("purge", lambda: ch.queue_purge(o.name("missing")))


@scenario
def queue_delete_reports_count(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 5)
    o.call("delete", lambda: ch.queue_delete(queue))
    o.call("passive", lambda: ch.queue_declare(queue, passive=True))


@scenario
def queue_delete_missing(o):
    ch = o.channel()
    o.call("delete", lambda: ch.queue_delete(o.name("missing")))


@scenario
def queue_delete_if_empty_on_nonempty_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.call("delete", lambda: ch.queue_delete(queue, if_empty=True))


@scenario
def queue_delete_if_unused_with_consumer_is_406(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("consume", lambda: ch.basic_consume(queue, lambda *a: None, consumer_tag="c1"))
    o.call("delete", lambda: connection.channel().queue_delete(queue, if_unused=True))


@scenario
def queue_delete_if_unused_and_if_empty_when_both_hold(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("delete", lambda: ch.queue_delete(queue, if_unused=True, if_empty=True))


@scenario
def queue_auto_delete_after_last_consumer_cancels(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, auto_delete=True)
    o.call("consume", lambda: ch.basic_consume(queue, lambda *a: None, consumer_tag="c1"))
    o.call("cancel", lambda: ch.basic_cancel("c1"))
    o.passive_counts(queue)


@scenario
def queue_auto_delete_without_consumers_stays(o):
    ch = o.channel()
    queue = declare(o, ch, auto_delete=True)
    fill(o, ch, queue, 1)
    o.passive_counts(queue)


@scenario
def queue_declare_reports_consumer_count(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    for tag in ("a", "b"):
        o.call("consume", lambda: ch.basic_consume(queue, lambda *a: None, consumer_tag=tag))
    o.passive_counts(queue)
    o.call("cancel", lambda: ch.basic_cancel("a"))
    o.passive_counts(queue)


@scenario
def queue_default_binding_routes_by_name(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.publish(ch, b"direct", queue)
    o.get(ch, queue, auto_ack=True)


@scenario
def queue_unbind_from_default_exchange_is_403(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("unbind", lambda: ch.queue_unbind(queue, "", queue))


# ---- durability flags (the restart itself is covered by the Rust crash/restart tests) -------

@scenario
def durable_queue_and_persistent_message(o):
    ch = o.channel()
    queue = declare(o, ch, durable=True)
    ch.confirm_delivery()
    o.publish(ch, b"kept", queue, properties=props(delivery_mode=2))
    o.get(ch, queue, auto_ack=True)
    o.call("delete", lambda: ch.queue_delete(queue))


@scenario
def durable_exchange_bound_to_durable_queue(o):
    ch = o.channel()
    queue = declare(o, ch, durable=True)
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="topic", durable=True))
    o.call("bind", lambda: ch.queue_bind(queue, o.name("x"), "#"))
    ch.confirm_delivery()
    o.publish(ch, b"p", "a.b", exchange=o.name("x"), properties=props(delivery_mode=2))
    o.get(ch, queue, auto_ack=True)
    o.call("delete x", lambda: ch.exchange_delete(o.name("x")))
    o.call("delete q", lambda: ch.queue_delete(queue))


@scenario
def persistent_message_on_transient_queue(o):
    ch = o.channel()
    queue = declare(o, ch)
    ch.confirm_delivery()
    o.publish(ch, b"p", queue, properties=props(delivery_mode=2))
    o.get(ch, queue, auto_ack=True)


@scenario
def durable_queue_requeue_keeps_persistent_flag(o):
    ch = o.channel()
    queue = declare(o, ch, durable=True)
    ch.confirm_delivery()
    o.publish(ch, b"p", queue, properties=props(delivery_mode=2, message_id="m"))
    o.get(ch, queue)
    o.call("nack", lambda: ch.basic_nack(1, requeue=True))
    o.get(ch, queue, auto_ack=True)
    o.call("delete", lambda: ch.queue_delete(queue))


# ---- queue arguments (RabbitMQ extensions) --------------------------------------------------

@scenario
def queue_argument_message_ttl(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-message-ttl": 100})
    ch.confirm_delivery()
    o.publish(ch, b"expires", queue)
    o.settle(connection, 0.4)
    o.get(ch, queue)


@scenario
def queue_argument_max_length_drops_head(o):
    ch = o.channel()
    queue = declare(o, ch, arguments={"x-max-length": 2})
    ch.confirm_delivery()
    for i in range(4):
        o.publish(ch, f"m{i}".encode(), queue)
    o.get(ch, queue, auto_ack=True)
    o.get(ch, queue, auto_ack=True)
    o.get(ch, queue, auto_ack=True)


def dead_letters(o, ch, queue, count, label="dead"):
    """Takes `count` messages off `queue` with basic.get and records each with its headers, the
    x-death records' times (which differ by when the scenario ran) replaced by whether they are
    set."""
    for n in range(count):
        method, properties, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            o.note(f"{label}{n}", "get-empty")
            continue
        headers = dict(properties.headers or {})
        deaths = [dict(d, time=d.get("time") is not None) for d in headers.pop("x-death", [])]
        o.note(f"{label}{n}", method.exchange, method.routing_key, method.redelivered, body,
               properties.expiration, properties.delivery_mode, headers, deaths)


def dead_letter_setup(o, ch, arguments, routing_key="#"):
    """A topic exchange `dlx` with queue `dead` bound to it by `routing_key`, and queue `work`
    declared with `arguments` (its x-dead-letter-exchange set to `dlx` unless given)."""
    dlx, dead = o.name("dlx"), o.name("dead")
    o.call("dlx", lambda: ch.exchange_declare(dlx, exchange_type="topic"))
    o.call("dead", lambda: ch.queue_declare(dead))
    o.call("bind", lambda: ch.queue_bind(dead, dlx, routing_key))
    work = o.name("work")
    arguments = {"x-dead-letter-exchange": dlx, **arguments}
    o.call("work", lambda: ch.queue_declare(work, arguments=arguments))
    return work, dead


def reject_next(o, connection, ch, queue):
    """Gets the next message of `queue` and rejects it without requeue, then lets its dead
    letter land. Records the body only: a dead letter's headers carry its time."""
    method, _, body = ch.basic_get(queue)
    o.note("rejected", body)
    ch.basic_reject(method.delivery_tag, requeue=False)
    o.settle(connection, 0.3)


@scenario
def dead_letter_on_reject_and_nack_without_requeue(o):
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {})
    ch.confirm_delivery()
    o.publish(ch, b"r", work, properties=props(headers={"app": "kept"}, expiration="60000",
                                                delivery_mode=2))
    o.publish(ch, b"n", work)
    o.publish(ch, b"q", work)
    first = ch.basic_get(work)[0]
    ch.basic_reject(first.delivery_tag, requeue=False)
    second = ch.basic_get(work)[0]
    ch.basic_nack(second.delivery_tag, requeue=False)
    third = ch.basic_get(work)[0]
    ch.basic_reject(third.delivery_tag, requeue=True)
    o.settle(connection, 0.3)
    o.passive_counts(work, "work counts")
    o.passive_counts(dead, "dead counts")
    dead_letters(o, ch, dead, 2)


@scenario
def dead_letter_routing_key_replaces_the_messages_own(o):
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {"x-dead-letter-routing-key": "retry.later"},
                                   routing_key="retry.*")
    o.publish(ch, b"m", work)
    reject_next(o, connection, ch, work)
    dead_letters(o, ch, dead, 1)


@scenario
def dead_letter_counts_deaths_per_queue_and_reason(o):
    # work -> (rejected) -> dlx -> dead, then dead -> (rejected) -> work again, twice round.
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {})
    back = o.name("back")
    o.call("back", lambda: ch.exchange_declare(back, exchange_type="fanout"))
    o.call("rebind", lambda: ch.queue_bind(work, back))
    o.call("dead again", lambda: ch.queue_delete(dead))
    o.call("dead'", lambda: ch.queue_declare(dead, arguments={"x-dead-letter-exchange": back}))
    o.call("bind'", lambda: ch.queue_bind(dead, o.name("dlx"), "#"))
    o.publish(ch, b"round", work)
    for queue in (work, dead, work):
        reject_next(o, connection, ch, queue)
    dead_letters(o, ch, dead, 1)


@scenario
def message_ttl_expires_into_the_dead_letter_exchange(o):
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {"x-message-ttl": 100})
    ch.confirm_delivery()
    for i in range(3):
        o.publish(ch, f"m{i}".encode(), work, properties=props(expiration="50000"))
    o.settle(connection, 0.5)
    o.passive_counts(work, "work counts")
    dead_letters(o, ch, dead, 3)


@scenario
def per_message_expiration_and_the_head(o):
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {})
    ch.confirm_delivery()
    # Expires at once: nobody is consuming.
    o.publish(ch, b"now", work, properties=props(expiration="0"))
    # Lives long, and keeps the short-lived one behind it in the queue past its time.
    o.publish(ch, b"long", work, properties=props(expiration="60000"))
    o.publish(ch, b"short", work, properties=props(expiration="50"))
    o.settle(connection, 0.4)
    o.passive_counts(work, "work counts")
    dead_letters(o, ch, dead, 1)
    o.get(ch, work, auto_ack=True)
    # Now at the head and long expired: never delivered.
    o.get(ch, work, auto_ack=True)
    o.settle(connection, 0.2)
    dead_letters(o, ch, dead, 1, label="later")


@scenario
def message_ttl_zero_reaches_only_a_waiting_consumer(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-message-ttl": 0})
    ch.confirm_delivery()
    o.publish(ch, b"nobody waits", queue)
    o.passive_counts(queue, "counts")
    consumer = connection.channel()
    received = []
    consumer.basic_consume(queue, lambda c, m, p, b: received.append(b), auto_ack=True)
    o.publish(ch, b"delivered", queue)
    o.settle(connection, 0.3)
    o.note("received", received)


@scenario
def max_length_drop_head_dead_letters_the_oldest(o):
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {"x-max-length": 2})
    ch.confirm_delivery()
    for i in range(5):
        o.publish(ch, f"m{i}".encode(), work)
    o.settle(connection, 0.3)
    o.passive_counts(work, "work counts")
    dead_letters(o, ch, dead, 3)
    o.get(ch, work, auto_ack=True)


@scenario
def max_length_bytes_counts_bodies(o):
    ch = o.channel()
    queue = declare(o, ch, arguments={"x-max-length-bytes": 10})
    ch.confirm_delivery()
    for body in (b"aaaa", b"bbbb", b"cccc", b"dd"):
        o.publish(ch, body, queue)
    o.passive_counts(queue)
    for n in range(3):
        o.get(ch, queue, label=f"get{n}", auto_ack=True)


@scenario
def max_length_reject_publish_nacks_the_publisher(o):
    ch = o.channel()
    queue = declare(o, ch, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    for i in range(4):
        o.publish(ch, f"m{i}".encode(), queue, label=f"publish{i}")
    o.passive_counts(queue)
    o.get(ch, queue, auto_ack=True)
    o.publish(ch, b"room again", queue, label="after a get")
    o.passive_counts(queue, "counts after")


@scenario
def max_length_reject_publish_dlx_dead_letters_the_refused(o):
    connection = o.connect()
    ch = connection.channel()
    work, dead = dead_letter_setup(o, ch, {"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    ch.confirm_delivery()
    for i in range(3):
        o.publish(ch, f"m{i}".encode(), work, label=f"publish{i}")
    o.settle(connection, 0.3)
    dead_letters(o, ch, dead, 2)


@scenario
def single_active_consumer_takes_over_in_order(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-single-active-consumer": True})
    received = []
    consumers = []
    for name in ("first", "second", "third"):
        channel = connection.channel()
        tag = channel.basic_consume(
            queue, lambda c, m, p, b, name=name: received.append([name, b]), auto_ack=True)
        consumers.append((channel, tag))
    o.passive_counts(queue)
    for i in range(3):
        ch.basic_publish("", queue, f"m{i}".encode())
    o.settle(connection, 0.3)
    o.call("cancel first", lambda: consumers[0][0].basic_cancel(consumers[0][1]))
    for i in range(3, 5):
        ch.basic_publish("", queue, f"m{i}".encode())
    o.settle(connection, 0.3)
    o.note("received", received)


@scenario
def queue_expires_when_unused(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-expires": 200})
    fill(o, ch, queue, 2)
    o.settle(connection, 0.6)
    o.passive_counts(queue, "after the lease")


@scenario
def queue_expiry_waits_for_consumers_and_gets(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-expires": 400})
    tag = ch.basic_consume(queue, lambda *a: None, auto_ack=True)
    o.settle(connection, 0.8)
    o.passive_counts(queue, "consumed")
    o.call("cancel", lambda: ch.basic_cancel(tag))
    for n in range(4):
        o.settle(connection, 0.2)
        o.get(ch, queue, label=f"get{n}")
    o.settle(connection, 0.8)
    o.passive_counts(queue, "unused")


@scenario
def priority_queue_delivers_highest_first(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-max-priority": 5})
    ch.confirm_delivery()
    # None counts as 0; above the maximum counts as the maximum.
    for body, priority in (("a0", None), ("b3", 3), ("c9", 9), ("d5", 5), ("e3", 3), ("f1", 1)):
        o.publish(ch, body.encode(), queue, properties=props(priority=priority))
    first = o.get(ch, queue)[0]
    ch.basic_reject(first.delivery_tag, requeue=True)
    o.passive_counts(queue)
    for n in range(7):
        o.get(ch, queue, label=f"get{n}", auto_ack=True)


@scenario
def consumer_priorities_serve_the_highest_with_credit_first(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    received = []
    high = connection.channel()
    high.basic_qos(prefetch_count=2)
    high.basic_consume(queue, lambda c, m, p, b: received.append(["high", b]),
                       arguments={"x-priority": 10})
    low = connection.channel()
    low.basic_consume(queue, lambda c, m, p, b: received.append(["low", b]), auto_ack=True)
    for i in range(5):
        ch.basic_publish("", queue, f"m{i}".encode())
    o.settle(connection, 0.4)
    o.note("received", received)
    bad = connection.channel()
    o.call("not an integer", lambda: bad.basic_consume(
        queue, lambda *a: None, arguments={"x-priority": "high"}))


def reply_address(name):
    """Whether `name` is a direct reply-to address (their form differs between brokers)."""
    return name.startswith("amq.rabbitmq.reply-to.") and len(name) > len("amq.rabbitmq.reply-to.")


@scenario
def direct_reply_to_round_trip(o):
    connection = o.connect()
    ch = connection.channel()
    requests = declare(o, ch, "rpc")
    replies = []
    o.call("reply consumer", lambda: ch.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda c, m, p, b: replies.append(
            [m.exchange, reply_address(m.routing_key), m.redelivered, p.correlation_id, b]),
        auto_ack=True, consumer_tag="replies"))
    ch.confirm_delivery()
    o.publish(ch, b"request", requests,
              properties=props(reply_to="amq.rabbitmq.reply-to", correlation_id="c1"))
    server = o.connect().channel()
    server.confirm_delivery()
    method, properties, body = server.basic_get(requests, auto_ack=True)
    o.note("request", body, reply_address(properties.reply_to), properties.correlation_id)
    o.publish(server, b"reply", properties.reply_to, label="reply",
              properties=props(correlation_id=properties.correlation_id))
    o.publish(server, b"lost", "amq.rabbitmq.reply-to.nobody", label="reply to nobody")
    o.publish(server, b"returned", properties.reply_to, label="mandatory reply", mandatory=True)
    o.settle(connection, 0.4)
    o.note("replies", replies)
    o.call("cancel", lambda: ch.basic_cancel("replies"))
    o.publish(server, b"after cancel", properties.reply_to, label="reply after cancel")
    o.settle(connection, 0.3)
    o.note("replies after cancel", len(replies))


@scenario
def direct_reply_to_refusals(o):
    ch = o.channel()
    o.call("consume with acks", lambda: ch.basic_consume(
        "amq.rabbitmq.reply-to", lambda *a: None, auto_ack=False))
    ch = o.channel()
    o.call("publish without a reply consumer", lambda: o.publish(
        ch, b"m", "anything", properties=props(reply_to="amq.rabbitmq.reply-to")) or
        ch.basic_qos(prefetch_count=1))
    ch = o.channel()
    ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
    o.call("a second reply consumer", lambda: ch.basic_consume(
        "amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True))
    o.passive_counts("amq.rabbitmq.reply-to", "passive declare of the pseudo-queue")
    ch = o.channel()
    o.call("declare of the pseudo-queue", lambda: ch.queue_declare("amq.rabbitmq.reply-to"))
    o.call("passive declare of an address", lambda: ch.queue_declare(
        "amq.rabbitmq.reply-to.nobody", passive=True))


@scenario
def dead_letter_loop_of_expiries_is_cut(o):
    # A queue dead-lettering its expired messages back to itself: RabbitMQ drops them.
    connection = o.connect()
    ch = connection.channel()
    queue = o.name("loop")
    o.call("declare", lambda: ch.queue_declare(queue, arguments={
        "x-message-ttl": 50, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}))
    ch.confirm_delivery()
    o.publish(ch, b"round and round", queue)
    o.settle(connection, 0.5)
    o.passive_counts(queue)


@scenario
def dead_letter_exchange_missing_drops_the_letter(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch, arguments={"x-dead-letter-exchange": o.name("nowhere")})
    o.publish(ch, b"m", queue)
    reject_next(o, connection, ch, queue)
    o.passive_counts(queue)


@scenario
def invalid_expiration_is_406(o):
    for n, expiration in enumerate(("soon", "-1", "10s", "", "+5")):
        ch = o.channel()
        queue = declare(o, ch, f"q{n}")
        ch.confirm_delivery()
        o.publish(ch, b"m", queue, label=f"publish{n}", properties=props(expiration=expiration))


@scenario
def queue_argument_invalid_ttl_is_406(o):
    ch = o.channel()
    o.call("declare", lambda: ch.queue_declare(o.name(), arguments={"x-message-ttl": -5}))


@scenario
def queue_argument_checks_are_rabbitmqs(o):
    # Each refused on a channel of its own, with RabbitMQ's reply text.
    refused = [
        {"x-message-ttl": "100"},
        {"x-expires": 0},
        {"x-max-length": -1},
        {"x-max-length-bytes": [1]},
        {"x-max-priority": 256},
        {"x-dead-letter-exchange": 7},
        {"x-dead-letter-routing-key": "dead"},
        {"x-overflow": "drop-tail"},
        {"x-queue-mode": "eager"},
        {"x-single-active-consumer": "yes"},
        {"x-dead-letter-exchange": "d", "x-dead-letter-routing-key": 7},
        {"x-overflow": 7},
        {"x-expires": "x"},
        {"x-max-priority": -1},
        {"x-queue-type": "nope"},
        {"x-queue-type": 7},
    ]
    for n, arguments in enumerate(refused):
        ch = o.channel()
        o.call(f"declare{n}", lambda: ch.queue_declare(o.name(f"q{n}"), arguments=arguments))
    accepted = {"x-message-ttl": 4294967296, "x-expires": 1000, "x-max-length": 0, "x-max-priority": 255,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead",
                "x-overflow": "reject-publish", "x-queue-mode": "lazy",
                "x-single-active-consumer": True}
    ch = o.channel()
    o.call("valid", lambda: ch.queue_declare(o.name("ok"), arguments=accepted))
    o.call("delete", lambda: ch.queue_delete(o.name("ok")))


@scenario
def queue_argument_unknown_x_argument_is_accepted(o):
    ch = o.channel()
    o.call("declare", lambda: ch.queue_declare(o.name(), arguments={"x-shardmq-unknown": 1}))


# ---- routing --------------------------------------------------------------------------------

@scenario
def routing_direct_by_key(o):
    connection = o.connect()
    ch = connection.channel()
    q1, q2 = declare(o, ch, "q1"), declare(o, ch, "q2")
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="direct"))
    o.call("b1", lambda: ch.queue_bind(q1, o.name("x"), "red"))
    o.call("b2", lambda: ch.queue_bind(q2, o.name("x"), "blue"))
    o.call("b3", lambda: ch.queue_bind(q2, o.name("x"), "red"))
    for key in ("red", "blue", "green"):
        ch.basic_publish(o.name("x"), key, key.encode())
    o.consume(connection, ch, q1, 1, label="q1", ack=True)
    o.consume(connection, ch, q2, 2, label="q2", ack=True)


@scenario
def routing_fanout_ignores_key(o):
    connection = o.connect()
    ch = connection.channel()
    queues = [declare(o, ch, f"q{i}") for i in range(3)]
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="fanout"))
    for q in queues:
        o.call("bind", lambda: ch.queue_bind(q, o.name("x"), "ignored"))
    ch.basic_publish(o.name("x"), "anything", b"all")
    for q in queues:
        o.get(ch, q, auto_ack=True)


@scenario
def routing_topic_wildcards(o):
    ch = o.channel()
    ch.confirm_delivery()  # counts below must see every publish
    patterns = ["a.*", "a.#", "#", "*.b.*", "a.b.c", "#.c", "*", "a.*.#"]
    queues = []
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="topic"))
    for i, pattern in enumerate(patterns):
        q = declare(o, ch, f"q{i}")
        queues.append(q)
        o.call("bind " + pattern, lambda: ch.queue_bind(q, o.name("x"), pattern))
    for key in ["a", "a.b", "a.b.c", "x.b.y", "c", "", "a..c", "b.c"]:
        ch.basic_publish(o.name("x"), key, key.encode())
    for pattern, q in zip(patterns, queues):
        o.call("count " + pattern, lambda: ch.queue_declare(q, passive=True))


@scenario
def routing_headers_all_and_any(o):
    ch = o.channel()
    ch.confirm_delivery()  # counts below must see every publish
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="headers"))
    q_all, q_any = declare(o, ch, "all"), declare(o, ch, "any")
    o.call("all", lambda: ch.queue_bind(q_all, o.name("x"), "", {"x-match": "all", "a": 1,
                                                                  "b": "two"}))
    o.call("any", lambda: ch.queue_bind(q_any, o.name("x"), "", {"x-match": "any", "a": 1,
                                                                  "b": "two"}))
    for headers in ({"a": 1, "b": "two"}, {"a": 1}, {"b": "two", "c": 3}, {"a": 2}, None):
        ch.basic_publish(o.name("x"), "", repr(headers).encode(), props(headers=headers))
    o.call("all count", lambda: ch.queue_declare(q_all, passive=True))
    o.call("any count", lambda: ch.queue_declare(q_any, passive=True))


@scenario
def routing_headers_default_is_all(o):
    ch = o.channel()
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="headers"))
    q = declare(o, ch)
    o.call("bind", lambda: ch.queue_bind(q, o.name("x"), "", {"a": "1", "b": "2"}))
    ch.basic_publish(o.name("x"), "", b"one", props(headers={"a": "1"}))
    ch.basic_publish(o.name("x"), "", b"both", props(headers={"a": "1", "b": "2"}))
    o.get(ch, q, auto_ack=True)
    o.get(ch, q, auto_ack=True)


@scenario
def routing_amq_topic_builtin(o):
    ch = o.channel()
    q = declare(o, ch)
    o.call("bind", lambda: ch.queue_bind(q, "amq.topic", o.name() + ".#"))
    ch.basic_publish("amq.topic", o.name() + ".x.y", b"t")
    o.get(ch, q, auto_ack=True)


@scenario
def routing_one_queue_bound_twice_gets_one_copy(o):
    ch = o.channel()
    ch.confirm_delivery()  # counts below must see every publish
    q = declare(o, ch)
    o.call("x", lambda: ch.exchange_declare(o.name("x"), exchange_type="topic"))
    o.call("b1", lambda: ch.queue_bind(q, o.name("x"), "a.*"))
    o.call("b2", lambda: ch.queue_bind(q, o.name("x"), "*.b"))
    ch.basic_publish(o.name("x"), "a.b", b"x")
    o.call("count", lambda: ch.queue_declare(q, passive=True))


# ---- basic: publish and get -----------------------------------------------------------------

@scenario
def basic_get_empty(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.get(ch, queue)


@scenario
def basic_get_reports_remaining_count(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    for _ in range(4):
        o.get(ch, queue, auto_ack=True)


@scenario
def basic_get_missing_queue_is_404(o):
    ch = o.channel()
    o.get(ch, o.name("missing"))


@scenario
def basic_properties_round_trip(o):
    ch = o.channel()
    queue = declare(o, ch)
    properties = props(
        content_type="application/json", content_encoding="gzip",
        headers={"s": "text", "i": 42, "neg": -7, "big": 1 << 40, "f": 1.5, "t": True,
                 "n": None, "l": [1, "two", [3]], "d": {"inner": {"deep": b"bytes"}}},
        delivery_mode=2, priority=5, correlation_id="corr", reply_to="reply",
        expiration="60000", message_id="mid", timestamp=1700000000, type="kind",
        user_id="guest", app_id="app", cluster_id="cid")
    o.publish(ch, b"{}", queue, properties=properties)
    o.get(ch, queue, auto_ack=True)


@scenario
def basic_empty_body(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.publish(ch, b"", queue)
    o.get(ch, queue, auto_ack=True)


@scenario
def basic_body_spanning_many_frames(o):
    ch = o.channel(o.connect(frame_max=4096))
    queue = declare(o, ch)
    body = bytes(range(256)) * 100
    o.publish(ch, body, queue)
    result = ch.basic_get(queue, auto_ack=True)
    o.note("body intact", result[2] == body, len(result[2]))


@scenario
def basic_ten_megabyte_message(o):
    ch = o.channel()
    queue = declare(o, ch)
    body = (b"0123456789abcdef" * 65536) * 10
    ch.confirm_delivery()
    o.publish(ch, body, queue)
    result = ch.basic_get(queue, auto_ack=True)
    o.note("body intact", result[2] == body, len(result[2]))


@scenario
def basic_user_id_mismatch_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.publish(ch, b"x", queue, properties=props(user_id="somebody-else"))
    o.call("after", lambda: ch.queue_declare(queue, passive=True))


@scenario
def basic_publish_unroutable_without_mandatory_is_dropped(o):
    ch = o.channel()
    ch.confirm_delivery()
    o.publish(ch, b"x", o.name("nobody"))


@scenario
def basic_mandatory_unroutable_is_returned_312(o):
    ch = o.channel()
    ch.confirm_delivery()
    o.publish(ch, b"back", o.name("nobody"), mandatory=True)


@scenario
def basic_mandatory_routed_is_not_returned(o):
    ch = o.channel()
    queue = declare(o, ch)
    ch.confirm_delivery()
    o.publish(ch, b"routed", queue, mandatory=True)
    o.get(ch, queue, auto_ack=True)


@scenario
def basic_mandatory_to_deleted_queue_is_returned(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("delete", lambda: ch.queue_delete(queue))
    ch.confirm_delivery()
    o.publish(ch, b"late", queue, mandatory=True)


@scenario
def basic_immediate_is_540(o):
    client = o.raw()
    client.send(method(1, 20, 10, b"\0"))
    o.note("channel.open", client.answer())
    # basic.publish: reserved short, exchange "", routing key, bits mandatory=0 immediate=1
    client.send(method(1, 60, 40, b"\0\0" + shortstr("") + shortstr("q") + b"\x02"))
    o.note("publish immediate", client.answer())


@scenario
def basic_publish_order_is_kept(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 50)
    o.consume(connection, ch, queue, 50, ack=True)


# ---- basic: consume, qos, ack ---------------------------------------------------------------

@scenario
def consume_with_acks(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    o.consume(connection, ch, queue, 3, ack=True)
    o.settle(connection)
    o.call("count", lambda: ch.queue_declare(queue, passive=True))


@scenario
def consume_auto_ack(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    o.consume(connection, ch, queue, 3, auto_ack=True)
    o.call("count", lambda: ch.queue_declare(queue, passive=True))


@scenario
def consume_prefetch_limits_unacked(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 5)
    o.call("qos", lambda: ch.basic_qos(prefetch_count=2))
    o.consume(connection, ch, queue, 5, wait=0.5)


@scenario
def consume_prefetch_refills_on_ack(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 6)
    o.call("qos", lambda: ch.basic_qos(prefetch_count=2))
    o.consume(connection, ch, queue, 6, ack=True)


@scenario
def consume_global_prefetch_shared_by_consumers(o):
    connection = o.connect()
    ch = connection.channel()
    q1, q2 = declare(o, ch, "q1"), declare(o, ch, "q2")
    fill(o, ch, q1, 3)
    fill(o, ch, q2, 3)
    o.call("qos", lambda: ch.basic_qos(prefetch_count=3, global_qos=True))
    got = []
    ch.basic_consume(q1, lambda c, m, p, b: got.append(b))
    ch.basic_consume(q2, lambda c, m, p, b: got.append(b))
    o.settle(connection, 0.5)
    o.note("delivered", len(got))


@scenario
def consume_qos_prefetch_size_is_540(o):
    ch = o.channel()
    o.call("qos", lambda: ch.basic_qos(prefetch_size=1000))


@scenario
def consume_missing_queue_is_404(o):
    ch = o.channel()
    o.call("consume", lambda: ch.basic_consume(o.name("missing"), lambda *a: None))


@scenario
def consume_duplicate_tag_is_530(o):
    name = o.name()
    consume = method(1, 60, 20, b"\0\0" + shortstr(name) + shortstr("dup") + b"\0" + b"\0\0\0\0")
    client = o.raw()
    client.send(method(1, 20, 10, b"\0"))
    o.note("channel.open", client.answer())
    client.send(method(1, 50, 10, b"\0\0" + shortstr(name) + b"\0" + b"\0\0\0\0"))
    o.note("declare", client.answer())
    client.send(consume)
    o.note("consume", client.answer())
    client.send(consume)
    o.note("consume again", client.answer())


@scenario
def consume_exclusive_refused_while_another_consumes_403(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("plain", lambda: ch.basic_consume(queue, lambda *a: None, consumer_tag="a"))
    other = o.channel()
    o.call("exclusive", lambda: other.basic_consume(queue, lambda *a: None, exclusive=True))


@scenario
def consume_refused_while_exclusive_consumer_holds_403(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("exclusive", lambda: ch.basic_consume(queue, lambda *a: None, exclusive=True,
                                                  consumer_tag="a"))
    other = o.channel()
    o.call("plain", lambda: other.basic_consume(queue, lambda *a: None))


@scenario
def consume_exclusive_released_by_cancel(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("exclusive", lambda: ch.basic_consume(queue, lambda *a: None, exclusive=True,
                                                  consumer_tag="a"))
    o.call("cancel", lambda: ch.basic_cancel("a"))
    o.call("again", lambda: o.channel().basic_consume(queue, lambda *a: None, exclusive=True,
                                                       consumer_tag="b"))


@scenario
def consume_server_named_tag(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    o.call("consume", lambda: ch.basic_consume(queue, lambda *a: None))


@scenario
def consume_cancel_unknown_tag(o):
    ch = o.channel()
    o.call("cancel", lambda: ch.basic_cancel("never-existed"))
    o.call("after", lambda: ch.queue_declare(o.name("q")))


@scenario
def consume_cancel_keeps_unacked_until_ack(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 2)
    o.consume(connection, ch, queue, 2, consumer_tag="c")
    o.call("cancel", lambda: ch.basic_cancel("c"))
    o.call("count", lambda: ch.queue_declare(queue, passive=True))
    o.call("ack", lambda: ch.basic_ack(2, multiple=True))
    o.call("count after ack", lambda: ch.queue_declare(queue, passive=True))


@scenario
def consume_server_cancel_when_queue_deleted(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    o.call("consume", lambda: ch.basic_consume(queue, lambda *a: None, consumer_tag="c"))
    o.call("delete", lambda: o.channel().queue_delete(queue))
    o.settle(connection, 0.3)
    o.note("cancelled", cancelled)


@scenario
def consume_round_robin_between_consumers(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    got = []
    ch.basic_consume(queue, lambda c, m, p, b: got.append((m.consumer_tag, b)), auto_ack=True,
                     consumer_tag="a")
    ch.basic_consume(queue, lambda c, m, p, b: got.append((m.consumer_tag, b)), auto_ack=True,
                     consumer_tag="b")
    for i in range(4):
        ch.basic_publish("", queue, f"m{i}".encode())
    o.settle(connection, 0.4)
    o.note("per consumer", sorted(got))


# ---- basic: ack, nack, reject, recover ------------------------------------------------------

@scenario
def ack_unknown_tag_is_406(o):
    ch = o.channel()
    o.call("ack", lambda: ch.basic_ack(99))
    o.call("after", lambda: ch.queue_declare(o.name("q")))


@scenario
def ack_twice_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.get(ch, queue)
    o.call("ack", lambda: ch.basic_ack(1))
    o.call("ack again", lambda: ch.basic_ack(1))
    o.call("after", lambda: ch.queue_declare(queue, passive=True))


@scenario
def ack_multiple(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 4)
    for _ in range(4):
        o.get(ch, queue)
    o.call("ack", lambda: ch.basic_ack(3, multiple=True))
    o.call("count", lambda: ch.queue_declare(queue, passive=True))
    o.call("close", ch.close)
    o.passive_counts(queue)


@scenario
def ack_multiple_zero_acks_everything(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    for _ in range(3):
        o.get(ch, queue)
    o.call("ack", lambda: ch.basic_ack(0, multiple=True))
    o.call("close", ch.close)
    o.passive_counts(queue)


@scenario
def ack_of_auto_acked_delivery_is_406(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.get(ch, queue, auto_ack=True)
    o.call("ack", lambda: ch.basic_ack(1))
    o.call("after", lambda: ch.queue_declare(queue, passive=True))


@scenario
def nack_requeue_puts_back_at_head(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 3)
    o.get(ch, queue)
    o.call("nack", lambda: ch.basic_nack(1, requeue=True))
    o.consume(connection, ch, queue, 3, ack=True)


@scenario
def nack_without_requeue_drops(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 2)
    o.get(ch, queue)
    o.call("nack", lambda: ch.basic_nack(1, requeue=False))
    o.get(ch, queue)
    o.get(ch, queue)


@scenario
def nack_multiple_requeues_in_order(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 4)
    for _ in range(3):
        o.get(ch, queue)
    o.call("nack", lambda: ch.basic_nack(3, multiple=True, requeue=True))
    o.consume(connection, ch, queue, 4, ack=True)


@scenario
def nack_unknown_tag_is_406(o):
    ch = o.channel()
    o.call("nack", lambda: ch.basic_nack(7))
    o.call("after", lambda: ch.queue_declare(o.name("q")))


@scenario
def reject_requeue(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.get(ch, queue)
    o.call("reject", lambda: ch.basic_reject(1, requeue=True))
    o.get(ch, queue, auto_ack=True)


@scenario
def reject_without_requeue_drops(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.get(ch, queue)
    o.call("reject", lambda: ch.basic_reject(1, requeue=False))
    o.get(ch, queue)


@scenario
def reject_unknown_tag_is_406(o):
    ch = o.channel()
    o.call("reject", lambda: ch.basic_reject(3))
    o.call("after", lambda: ch.queue_declare(o.name("q")))


@scenario
def recover_requeue_redelivers(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 2)
    o.get(ch, queue)
    o.get(ch, queue)
    o.call("recover", lambda: ch.basic_recover(requeue=True))
    o.consume(connection, ch, queue, 2, ack=True)


@scenario
def recover_to_consumer_redelivers(o):
    connection = o.connect()
    ch = connection.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 2)
    o.consume(connection, ch, queue, 2, consumer_tag="c")
    o.call("recover", lambda: ch.basic_recover(requeue=True))
    o.settle(connection, 0.3)
    o.call("count", lambda: ch.queue_declare(queue, passive=True))


@scenario
def redelivered_flag_after_requeue_on_get(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.get(ch, queue)
    o.call("reject", lambda: ch.basic_reject(1, requeue=True))
    o.get(ch, queue)
    o.call("reject", lambda: ch.basic_reject(2, requeue=True))
    o.get(ch, queue, auto_ack=True)


# ---- confirms and transactions --------------------------------------------------------------

@scenario
def confirm_select_and_publish(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("select", ch.confirm_delivery)
    for i in range(3):
        o.publish(ch, f"c{i}".encode(), queue)
    o.call("count", lambda: ch.queue_declare(queue, passive=True))


@scenario
def confirm_then_tx_is_406(o):
    ch = o.channel()
    o.call("confirm", ch.confirm_delivery)
    o.call("tx", ch.tx_select)


@scenario
def tx_then_confirm_is_406(o):
    ch = o.channel()
    o.call("tx", ch.tx_select)
    o.call("confirm", ch.confirm_delivery)


@scenario
def tx_commit_without_select_is_406(o):
    ch = o.channel()
    o.call("commit", ch.tx_commit)


@scenario
def tx_rollback_without_select_is_406(o):
    ch = o.channel()
    o.call("rollback", ch.tx_rollback)


@scenario
def tx_publish_commit(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("select", ch.tx_select)
    ch.basic_publish("", queue, b"t1")
    ch.basic_publish("", queue, b"t2")
    o.call("before commit", lambda: ch.queue_declare(queue, passive=True))
    o.call("commit", ch.tx_commit)
    o.call("after commit", lambda: ch.queue_declare(queue, passive=True))


@scenario
def tx_publish_rollback(o):
    ch = o.channel()
    queue = declare(o, ch)
    o.call("select", ch.tx_select)
    ch.basic_publish("", queue, b"t1")
    o.call("rollback", ch.tx_rollback)
    o.call("after", lambda: ch.queue_declare(queue, passive=True))
    o.call("commit empty", ch.tx_commit)


@scenario
def tx_ack_rollback_keeps_message_unacked(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 1)
    o.call("select", ch.tx_select)
    o.get(ch, queue)
    o.call("ack", lambda: ch.basic_ack(1))
    o.call("rollback", ch.tx_rollback)
    o.call("close", ch.close)
    o.passive_counts(queue)


@scenario
def tx_ack_commit(o):
    ch = o.channel()
    queue = declare(o, ch)
    fill(o, ch, queue, 2)
    o.call("select", ch.tx_select)
    o.get(ch, queue)
    o.call("ack", lambda: ch.basic_ack(1))
    o.call("commit", ch.tx_commit)
    o.call("close", ch.close)
    o.passive_counts(queue)


@scenario
def tx_mandatory_unroutable_returned_at_commit(o):
    connection = o.connect()
    ch = connection.channel()
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append([m.reply_code, b]))
    o.call("select", ch.tx_select)
    ch.basic_publish("", o.name("nobody"), b"r", mandatory=True)
    o.call("commit", ch.tx_commit)
    o.settle(connection)
    o.note("returned", returned)


@scenario
def tx_select_twice_is_ok(o):
    ch = o.channel()
    o.call("select", ch.tx_select)
    o.call("select again", ch.tx_select)


@scenario
def confirm_select_twice_is_ok(o):
    ch = o.channel()
    o.call("select", lambda: ch._impl.confirm_delivery(lambda *a: None))
    o.call("sync", lambda: ch.queue_declare(o.name("q")))


# ---- raw frames: what no client library sends ------------------------------------------------

def raw_answer(o, label, data, open_channel=True, **handshake):
    client = o.raw(**handshake)
    if open_channel:
        client.send(method(1, 20, 10, b"\0"))
        o.note("channel.open", client.answer())
    client.send(data)
    o.note(label, client.answer())
    # When the socket closes after a hard error is timing, not protocol: RabbitMQ closes
    # sometimes before and sometimes after a few seconds. Not compared.


@scenario
def raw_bad_protocol_header(o):
    client = o.raw(open=False)
    client.send(b"AMQP\x00\x00\x08\x00")
    header = client._read(8)
    o.note("header back", header)
    o.note("then", "closed" if client.closed() else "open")


@scenario
def raw_http_instead_of_amqp(o):
    client = o.raw(open=False)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    o.note("header back", client._read(8))
    o.note("then", "closed" if client.closed() else "open")


@scenario
def raw_unknown_frame_type_is_501(o):
    raw_answer(o, "type 9", frame(9, 0, b""))


@scenario
def raw_bad_frame_end_is_501(o):
    data = bytearray(method(1, 50, 10, b"\0\0" + shortstr("q") + b"\0\0\0\0\0"))
    data[-1] = 0
    raw_answer(o, "bad end", bytes(data))


@scenario
def raw_frame_larger_than_frame_max_is_501(o):
    raw_answer(o, "oversized", frame(3, 1, b"\0" * 9000), frame_max=4096)


@scenario
def raw_method_on_unopened_channel_is_504(o):
    raw_answer(o, "declare on 3", method(3, 50, 10, b"\0\0" + shortstr("q") + b"\0"
                                         + b"\0\0\0\0"), open_channel=False)


@scenario
def raw_channel_open_twice_is_504(o):
    raw_answer(o, "open again", method(1, 20, 10, b"\0"))


@scenario
def raw_channel_above_channel_max_is_530(o):
    raw_answer(o, "open 11", method(11, 20, 10, b"\0"), open_channel=False, channel_max=10)


@scenario
def raw_content_header_without_publish_is_505(o):
    raw_answer(o, "header", frame(2, 1, struct.pack(">HHQH", 60, 0, 3, 0)))


@scenario
def raw_body_without_publish_is_505(o):
    raw_answer(o, "body", frame(3, 1, b"abc"))


@scenario
def raw_method_instead_of_content_header_is_505(o):
    publish = method(1, 60, 40, b"\0\0" + shortstr("") + shortstr("q") + b"\0")
    raw_answer(o, "publish then declare", publish + method(1, 50, 10, b"\0\0" + shortstr("q")
                                                           + b"\0" + b"\0\0\0\0"))


@scenario
def raw_body_longer_than_declared_is_501(o):
    publish = method(1, 60, 40, b"\0\0" + shortstr("") + shortstr("q") + b"\0")
    header = frame(2, 1, struct.pack(">HHQH", 60, 0, 3, 0))
    raw_answer(o, "long body", publish + header + frame(3, 1, b"abcdef"))


@scenario
def raw_content_header_with_wrong_class_is_505(o):
    publish = method(1, 60, 40, b"\0\0" + shortstr("") + shortstr("q") + b"\0")
    header = frame(2, 1, struct.pack(">HHQH", 50, 0, 3, 0))
    raw_answer(o, "class 50 header", publish + header)


@scenario
def raw_heartbeat_on_a_channel_is_501(o):
    raw_answer(o, "heartbeat on 1", frame(8, 1, b""))


@scenario
def raw_unknown_method_is_540(o):
    raw_answer(o, "class 99", method(1, 99, 1, b""))


@scenario
def raw_unknown_method_in_known_class_is_540(o):
    raw_answer(o, "basic.99", method(1, 60, 99, b""))


@scenario
def raw_truncated_method_arguments(o):
    raw_answer(o, "short declare", method(1, 50, 10, b"\0\0\x05ab"))


@scenario
def raw_long_string_declared_4gb(o):
    arguments = b"\0\0" + shortstr("q") + b"\0" + b"\xff\xff\xff\xf0" + b"x" * 8
    raw_answer(o, "4 GB table", method(1, 50, 10, arguments))


@scenario
def raw_unknown_field_type_in_table(o):
    table = shortstr("k") + b"Z" + b"\0"
    arguments = b"\0\0" + shortstr(o.name()) + b"\0" + struct.pack(">I", len(table)) + table
    raw_answer(o, "bad field type", method(1, 50, 10, arguments))


@scenario
def raw_connection_method_on_a_channel_is_503(o):
    raw_answer(o, "connection.close on 1", method(1, 10, 50, b"\0\xc8" + shortstr("") + b"\0\0\0\0"))


@scenario
def raw_channel_method_on_channel_zero_is_503(o):
    raw_answer(o, "channel.open on 0", method(0, 20, 10, b"\0"), open_channel=False)


@scenario
def raw_client_only_method_from_client_is_540(o):
    # basic.deliver is a server method.
    deliver = shortstr("tag") + struct.pack(">Q", 1) + b"\0" + shortstr("") + shortstr("q")
    raw_answer(o, "basic.deliver", method(1, 60, 60, deliver))


@scenario
def raw_header_declaring_a_terabyte_body(o):
    publish = method(1, 60, 40, b"\0\0" + shortstr("") + shortstr(o.name()) + b"\0")
    header = frame(2, 1, struct.pack(">HHQH", 60, 0, 1 << 40, 0))
    raw_answer(o, "1 TB header", publish + header)


@scenario
def raw_close_before_open_ok_answer(o):
    client = o.raw(open=False)
    client.send(PROTOCOL_HEADER)
    o.note("start", client.answer())
    client.send(method(0, 10, 50, b"\0\xc8" + shortstr("bye") + b"\0\0\0\0"))
    o.note("close", client.answer())
    o.note("then", "closed" if client.closed() else "open")


@scenario
def raw_publish_with_bad_exchange_name(o):
    publish = method(1, 60, 40, b"\0\0" + shortstr("bad name!") + shortstr("q") + b"\0")
    header = frame(2, 1, struct.pack(">HHQH", 60, 0, 0, 0))
    raw_answer(o, "publish", publish + header)


@scenario
def raw_queue_name_with_invalid_characters(o):
    arguments = b"\0\0" + shortstr("bad name\x00!") + b"\0" + b"\0\0\0\0"
    raw_answer(o, "declare", method(1, 50, 10, arguments))


@scenario
def raw_queue_declare_no_wait(o):
    name = o.name()
    declare_nowait = method(1, 50, 10, b"\0\0" + shortstr(name) + b"\x10" + b"\0\0\0\0")
    passive = method(1, 50, 10, b"\0\0" + shortstr(name) + b"\x01" + b"\0\0\0\0")
    raw_answer(o, "nowait then passive", declare_nowait + passive)


@scenario
def raw_bind_empty_queue_name_uses_last_declared(o):
    name = o.name()
    declare_q = method(1, 50, 10, b"\0\0" + shortstr(name) + b"\0" + b"\0\0\0\0")
    bind = method(1, 50, 20, b"\0\0" + shortstr("") + shortstr("amq.direct") + shortstr(name)
                  + b"\0" + b"\0\0\0\0")
    client = o.raw()
    client.send(method(1, 20, 10, b"\0"))
    o.note("channel.open", client.answer())
    client.send(declare_q)
    o.note("declare", client.answer())
    client.send(bind)
    o.note("bind with empty queue", client.answer())


@scenario
def raw_bind_empty_queue_name_without_declare_is_404(o):
    bind = method(1, 50, 20, b"\0\0" + shortstr("") + shortstr("amq.direct") + shortstr("k")
                  + b"\0" + b"\0\0\0\0")
    raw_answer(o, "bind", bind)


@scenario
def raw_consume_empty_queue_name_without_declare_is_404(o):
    consume = method(1, 60, 20, b"\0\0" + shortstr("") + shortstr("") + b"\0" + b"\0\0\0\0")
    raw_answer(o, "consume", consume)


@scenario
def raw_frame_on_closed_channel_after_channel_close(o):
    client = o.raw()
    client.send(method(1, 20, 10, b"\0"))
    o.note("channel.open", client.answer())
    # Cause a channel error, then keep talking on the channel before close-ok.
    client.send(method(1, 50, 10, b"\0\0" + shortstr(o.name("missing")) + b"\x01" + b"\0\0\0\0"))
    got = client.read_method()
    o.note("channel.close", got[1:3] if got else None)
    client.send(method(1, 50, 10, b"\0\0" + shortstr(o.name("q")) + b"\0" + b"\0\0\0\0"))
    client.send(method(1, 20, 41))
    client.send(method(1, 20, 10, b"\0"))
    o.note("reopen", client.answer())


@scenario
def raw_short_string_255_bytes_routing_key(o):
    name = o.name()
    key = "k" * 255
    client = o.raw()
    client.send(method(1, 20, 10, b"\0"))
    o.note("channel.open", client.answer())
    client.send(method(1, 50, 10, b"\0\0" + shortstr(name) + b"\0" + b"\0\0\0\0"))
    o.note("declare", client.answer())
    client.send(method(1, 50, 20, b"\0\0" + shortstr(name) + shortstr("amq.direct")
                       + shortstr(key) + b"\0" + b"\0\0\0\0"))
    o.note("bind 255-byte key", client.answer())
