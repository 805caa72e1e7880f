#!/usr/bin/env python3
"""Scenarios driven by Python's pika, a client from another ecosystem, against a real shardmq.

Run from the repository root (.ci/run does): `python3 tests/clients/pika_scenarios.py`. It
installs pika into target/client-venv if needed, starts target/debug/shardmq on a free loopback
port with a temporary data directory (2 shards, queues spread over both), runs every scenario,
stops the broker by PID, and prints one line per scenario and a closing "N passed, N failed".
"""

import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
import brokers  # noqa: E402
import client_env  # noqa: E402


def scenarios(pika, port):
    params = pika.ConnectionParameters(host="127.0.0.1", port=port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       blocked_connection_timeout=10)

    def connect():
        return pika.BlockingConnection(params)

    def declare_bind_publish_get():
        with connect() as c:
            ch = c.channel()
            ch.exchange_declare("py.topic", exchange_type="topic")
            q = ch.queue_declare("py.q1").method.queue
            ch.queue_bind(q, "py.topic", routing_key="a.*")
            ch.basic_publish("py.topic", "a.b", b"hello",
                             pika.BasicProperties(content_type="text/plain", headers={"k": 1}))
            for _ in range(50):
                method, props, body = ch.basic_get(q, auto_ack=True)
                if method:
                    break
                time.sleep(0.02)
            assert body == b"hello", body
            assert props.content_type == "text/plain" and props.headers == {"k": 1}, props

    def publisher_confirms():
        with connect() as c:
            ch = c.channel()
            ch.confirm_delivery()
            ch.queue_declare("py.confirm", durable=True)
            for i in range(200):
                ch.basic_publish("", "py.confirm", str(i).encode(),
                                 pika.BasicProperties(delivery_mode=2), mandatory=True)
            assert ch.queue_declare("py.confirm", passive=True).method.message_count == 200

    def consume_with_acks_and_prefetch():
        with connect() as c:
            ch = c.channel()
            ch.queue_declare("py.work")
            for i in range(30):
                ch.basic_publish("", "py.work", str(i).encode())
            ch.basic_qos(prefetch_count=5)
            received = []
            for method, _, body in ch.consume("py.work", inactivity_timeout=2):
                if method is None:
                    break
                received.append(int(body))
                ch.basic_ack(method.delivery_tag)
                if len(received) == 30:
                    break
            ch.cancel()
            assert received == list(range(30)), received

    def nack_requeue_redelivers():
        with connect() as c:
            ch = c.channel()
            ch.queue_declare("py.nack")
            ch.basic_publish("", "py.nack", b"again")
            time.sleep(0.1)
            method, _, _ = ch.basic_get("py.nack")
            ch.basic_nack(method.delivery_tag, requeue=True)
            method, _, body = ch.basic_get("py.nack", auto_ack=True)
            assert body == b"again" and method.redelivered

    def transactions():
        with connect() as c:
            ch = c.channel()
            ch.queue_declare("py.tx")
            ch.tx_select()
            ch.basic_publish("", "py.tx", b"dropped")
            ch.tx_rollback()
            ch.basic_publish("", "py.tx", b"kept")
            ch.tx_commit()
            assert ch.queue_declare("py.tx", passive=True).method.message_count == 1

    def exclusive_queue_is_locked():
        with connect() as owner, connect() as other:
            q = owner.channel().queue_declare("", exclusive=True).method.queue
            assert q.startswith("amq.gen-"), q
            try:
                other.channel().basic_consume(q, lambda *a: None)
                raise AssertionError("consume on another connection's exclusive queue succeeded")
            except pika.exceptions.ChannelClosedByBroker as e:
                assert e.reply_code == 405, e

    def mandatory_return():
        with connect() as c:
            ch = c.channel()
            ch.confirm_delivery()
            try:
                ch.basic_publish("amq.direct", "nowhere", b"x", mandatory=True)
                raise AssertionError("an unroutable mandatory publish was not returned")
            except pika.exceptions.UnroutableError:
                pass

    def large_message():
        body = os.urandom(10 * 1024 * 1024)
        with connect() as c:
            ch = c.channel()
            ch.queue_declare("py.large")
            ch.basic_publish("", "py.large", body)
            for _ in range(100):
                method, _, got = ch.basic_get("py.large", auto_ack=True)
                if method:
                    break
                time.sleep(0.05)
            assert got == body, "10 MiB body differs"

    def errors_close_the_channel_with_codes():
        with connect() as c:
            try:
                c.channel().queue_declare("py.missing", passive=True)
                raise AssertionError("passive declare of a missing queue succeeded")
            except pika.exceptions.ChannelClosedByBroker as e:
                assert e.reply_code == 404, e
            ch = c.channel()
            ch.queue_declare("py.ok")
            assert ch.is_open

    def dead_letter_retry_through_a_ttl_queue():
        # py.jobs --(rejected)--> py.retry (TTL 200 ms) --(expired)--> py.jobs again.
        with connect() as c:
            ch = c.channel()
            ch.queue_declare("py.jobs", arguments={"x-dead-letter-exchange": "",
                                                   "x-dead-letter-routing-key": "py.retry"})
            ch.queue_declare("py.retry", arguments={"x-message-ttl": 200,
                                                    "x-dead-letter-exchange": "",
                                                    "x-dead-letter-routing-key": "py.jobs"})
            ch.basic_publish("", "py.jobs", b"job")
            deliveries = []
            ch.basic_qos(prefetch_count=1)

            def on_job(channel, method, properties, body):
                deliveries.append((time.time(), properties.headers))
                if len(deliveries) == 1:
                    channel.basic_reject(method.delivery_tag, requeue=False)
                else:
                    channel.basic_ack(method.delivery_tag)

            ch.basic_consume("py.jobs", on_job)
            deadline = time.time() + 10
            while len(deliveries) < 2 and time.time() < deadline:
                c.process_data_events(time_limit=0.05)
            assert len(deliveries) == 2, deliveries
            assert deliveries[1][0] - deliveries[0][0] >= 0.15, "waited out the TTL"
            deaths = deliveries[1][1]["x-death"]
            assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
                ("py.retry", "expired", 1), ("py.jobs", "rejected", 1)], deaths

    def priorities_and_a_length_limit():
        with connect() as c:
            ch = c.channel()
            ch.confirm_delivery()
            ch.queue_declare("py.prio", arguments={"x-max-priority": 9, "x-max-length": 3,
                                                   "x-overflow": "reject-publish"})
            for body, priority in ((b"low", 1), (b"high", 9), (b"mid", 5)):
                ch.basic_publish("", "py.prio", body, pika.BasicProperties(priority=priority))
            try:
                ch.basic_publish("", "py.prio", b"one too many")
                raise AssertionError("a full reject-publish queue took a fourth message")
            except pika.exceptions.NackError:
                pass
            got = [ch.basic_get("py.prio", auto_ack=True)[2] for _ in range(3)]
            assert got == [b"high", b"mid", b"low"], got

    return [declare_bind_publish_get, publisher_confirms, consume_with_acks_and_prefetch,
            nack_requeue_redelivers, transactions, exclusive_queue_is_locked, mandatory_return,
            large_message, errors_close_the_channel_with_codes,
            dead_letter_retry_through_a_ttl_queue, priorities_and_a_length_limit]


def memory_alarm_scenarios(pika, port):
    """Run against a broker with a 1 MiB memory budget per shard."""
    params = pika.ConnectionParameters(host="127.0.0.1", port=port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       blocked_connection_timeout=30)

    def memory_alarm_blocks_and_unblocks_publisher():
        # A consumer without a prefetch limit that does not ack holds its deliveries in the
        # broker's memory (they cannot be paged): past twice the budget, the publisher is
        # blocked with connection.blocked; once the consumer acks, it gets connection.unblocked.
        # Nothing is lost.
        size, count = 4096, 2000
        events = []
        with pika.BlockingConnection(params) as consumer_connection, \
                pika.BlockingConnection(params) as c:
            c.add_on_connection_blocked_callback(lambda _c, frame: events.append(
                ("blocked", frame.method.reason)))
            c.add_on_connection_unblocked_callback(lambda _c, _f: events.append(("unblocked",)))
            ch = c.channel()
            ch.queue_declare("py.alarm")
            held = []
            consumer = consumer_connection.channel()
            consumer.basic_consume("py.alarm", lambda _ch, method, _p, _b: held.append(method))
            body = b"x" * size
            for _ in range(count):
                ch.basic_publish("", "py.alarm", body)
                if events:
                    break
            deadline = time.time() + 30
            while not events and time.time() < deadline:
                c.process_data_events(time_limit=0.1)
                consumer_connection.process_data_events(time_limit=0.1)
            assert ("blocked", "low on memory") in events, events
            # Take and ack every delivery until the publisher is let go.
            deadline = time.time() + 30
            while events[-1] != ("unblocked",) and time.time() < deadline:
                consumer_connection.process_data_events(time_limit=0.1)
                if held:
                    consumer.basic_ack(held[-1].delivery_tag, multiple=True)
                    held.clear()
                c.process_data_events(time_limit=0.05)
            assert events[-1] == ("unblocked",), events

    return [memory_alarm_blocks_and_unblocks_publisher]


def run_all(pika, config_extra, make_scenarios):
    passed = failed = 0
    with tempfile.TemporaryDirectory() as data_dir:
        broker = brokers.start_shardmq_for_tests(data_dir, ROOT, config_extra)
        try:
            for scenario in make_scenarios(pika, broker.port):
                try:
                    scenario()
                    passed += 1
                    print(f"pika {scenario.__name__} ... ok", flush=True)
                except Exception:
                    failed += 1
                    print(f"pika {scenario.__name__} ... FAILED", flush=True)
                    traceback.print_exc()
        finally:
            broker.stop()
            if failed:
                with open(os.path.join(data_dir, "shardmq.log")) as log:
                    print(log.read()[-4000:])
    return passed, failed


def main():
    client_env.reexec_in_venv(["pika==1.3.2"])
    import pika
    passed, failed = run_all(pika, "", scenarios)
    alarm_passed, alarm_failed = run_all(pika, "memory_budget_bytes = 1048576\n",
                                         memory_alarm_scenarios)
    passed += alarm_passed
    failed += alarm_failed
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
