#!/usr/bin/env python3
"""Differential conformance: every scenario against RabbitMQ and against shardmq, compared.

Run from the repository root (.ci/run does):

    python3 tests/differential/run.py               # every scenario
    python3 tests/differential/run.py -k queue_     # scenarios whose name contains queue_
    python3 tests/differential/run.py --show NAME   # print both logs of one scenario

It installs pika into target/client-venv and Debian's rabbitmq-server if missing, starts RabbitMQ
and target/debug/shardmq (2 shards, queues spread over both) on free loopback ports with fresh
data directories, plays each scenario (scenarios.py) against both, and compares what the client
observed. A difference fails unless DEVIATIONS.md lists the scenario with its reason; a listed
scenario that no longer differs fails too, so the table stays true. Both brokers are stopped by
PID at the end.
"""

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
import client_env  # noqa: E402

SCENARIO_SECONDS = 30


def deviations():
    """Scenario name -> reason, from the table in DEVIATIONS.md."""
    listed = {}
    with open(os.path.join(HERE, "DEVIATIONS.md")) as f:
        for line in f:
            match = re.match(r"\|\s*`([a-z0-9_]+)`\s*\|(.*)\|(.*)\|\s*$", line)
            if match:
                listed[match.group(1)] = match.group(3).strip()
    return listed


class Timeout(Exception):
    pass


def play(harness, function, port):
    observer = harness.Observer(port, function.__name__)

    def expire(*_):
        raise Timeout(f"{function.__name__} took more than {SCENARIO_SECONDS} s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(SCENARIO_SECONDS)
    try:
        function(observer)
    except Timeout as e:
        observer.note("harness", "timeout", str(e))
    except Exception as e:
        observer.note("harness", "exception", type(e).__name__, str(e))
        observer.texts.append(("traceback", traceback.format_exc()))
    finally:
        signal.alarm(0)
        observer.close_all()
    return observer


def first_difference(a, b):
    for index, (left, right) in enumerate(zip(a, b)):
        if left != right:
            return index, left, right
    if len(a) != len(b):
        index = min(len(a), len(b))
        return index, a[index] if index < len(a) else None, b[index] if index < len(b) else None
    return None


def main():
    client_env.reexec_in_venv(["pika==1.3.2"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only scenarios whose name contains this")
    parser.add_argument("--show", help="print both logs of this scenario")
    options = parser.parse_args()

    import brokers
    import harness
    import scenarios
    import logging
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    selected = [s for s in scenarios.SCENARIOS
                if options.k in s.__name__ and (not options.show or s.__name__ == options.show)]
    listed = deviations()
    unknown = set(listed) - {s.__name__ for s in scenarios.SCENARIOS}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="shardmq-diff-") as workdir:
        server, version = brokers.ensure_rabbitmq()
        rabbit = brokers.start_rabbitmq(workdir, server)
        try:
            shard = brokers.start_shardmq_for_tests(workdir, ROOT)
        except BaseException:
            rabbit.stop()
            raise
        same = differ_listed = 0
        failures = []
        try:
            print(f"RabbitMQ {version} on {rabbit.port}, shardmq on {shard.port}: "
                  f"{len(selected)} scenarios", flush=True)
            for function in selected:
                name = function.__name__
                expected = play(harness, function, rabbit.port)
                actual = play(harness, function, shard.port)
                difference = first_difference(expected.log, actual.log)
                if options.show:
                    for label, observer in (("rabbitmq", expected), ("shardmq", actual)):
                        print(f"--- {label}")
                        for line in observer.log:
                            print("   ", line)
                        for line in observer.texts:
                            print("    text:", line)
                if difference is None and name not in listed:
                    same += 1
                    print(f"same     {name}", flush=True)
                elif difference is not None and name in listed:
                    differ_listed += 1
                    print(f"listed   {name}: {listed[name]}", flush=True)
                elif difference is None:
                    failures.append(name)
                    print(f"STALE    {name}: listed in DEVIATIONS.md but no longer differs",
                          flush=True)
                else:
                    failures.append(name)
                    index, left, right = difference
                    print(f"DIFFERS  {name} at step {index}:\n"
                          f"           rabbitmq: {left}\n"
                          f"           shardmq:  {right}", flush=True)
                    for label, text in actual.texts:
                        if label == "traceback":
                            print(text)
        finally:
            shard.stop()
            rabbit.stop()
            if failures:
                with open(os.path.join(workdir, "shardmq.log")) as log:
                    tail = log.read()[-3000:]
                if tail:
                    print("shardmq log tail:\n" + tail)
    for name in sorted(unknown):
        failures.append(name)
        print(f"UNKNOWN  {name}: listed in DEVIATIONS.md but there is no such scenario")
    print(f"{len(selected)} scenarios in {time.time() - started:.0f} s: {same} the same, "
          f"{differ_listed} listed deviations, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
