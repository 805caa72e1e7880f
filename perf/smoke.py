#!/usr/bin/env python3
"""A smoke run of loadgen against shardmq: every kind of scenario compare.py uses, a couple of
seconds each, checked for what it must report (messages through, confirms for every publish, a
backlog drained to the last message, no errors).

It runs the debug binaries that `cargo test --workspace --all-targets` builds (building them if
missing) and installs Debian's librabbitmq4, which loadgen loads at run time, if it is missing.
CI runs it (`.ci/run`); `python3 perf/smoke.py`.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
import brokers  # noqa: E402

BACKLOG = 2000

# (name, loadgen arguments, what the JSON line must show)
SCENARIOS = [
    ("1 -> 1", ["--duration", "2"], lambda r: r["received"] > 0),
    ("4 x 4 over 4 queues, multi-ack", ["--producers", "4", "--consumers", "4", "--queues", "4",
                                        "--size", "1024", "--multi-ack", "10", "--duration", "2"],
     lambda r: r["received"] > 0),
    ("persistent with confirms", ["--persistent", "--confirm", "100", "--size", "1024",
                                  "--duration", "2"],
     lambda r: r["confirmed"] == r["sent"] > 0 and r["received"] > 0),
    ("fanout to 3 queues", ["--exchange", "fanout", "--queues", "3", "--consumers", "3",
                            "--duration", "2"],
     lambda r: r["sent"] > 0 and r["received"] > 0),
    ("topic, prefetch, auto-ack", ["--exchange", "topic", "--queues", "2", "--producers", "2",
                                   "--consumers", "2", "--prefetch", "50", "--auto-ack",
                                   "--duration", "2"],
     lambda r: r["received"] > 0),
    ("fixed rate with idle connections", ["--rate", "500", "--idle-connections", "20",
                                          "--exchange", "direct", "--duration", "2"],
     lambda r: 800 <= r["sent"] <= 1100 and r["received"] > 0),
    ("backlog publish", ["--queue-prefix", "smoke-backlog", "--consumers", "0", "--messages",
                         str(BACKLOG), "--confirm", "100", "--duration", "60"],
     lambda r: r["sent"] == r["confirmed"] == BACKLOG),
    ("backlog drain", ["--queue-prefix", "smoke-backlog", "--producers", "0", "--consume-limit",
                       str(BACKLOG), "--multi-ack", "100", "--prefetch", "1000", "--cleanup",
                       "--duration", "60"],
     lambda r: r["received"] == BACKLOG),
]


def main():
    brokers.ensure_rabbitmq_c()
    loadgen = os.path.join(ROOT, "target", "debug", "loadgen")
    if not os.path.exists(loadgen):
        subprocess.run(["cargo", "build", "-q", "-p", "shardmq-perf"], cwd=ROOT, check=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="shardmq-smoke-") as workdir:
        broker = brokers.start_shardmq_for_tests(workdir, ROOT)
        try:
            for name, args, check in SCENARIOS:
                cleanup = [] if "--queue-prefix" in args else ["--cleanup"]
                command = [loadgen, "--port", str(broker.port), "--json", "--label", name] + cleanup + args
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
                lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
                result = json.loads(lines[-1]) if lines else None
                ok = (done.returncode == 0 and result is not None and result["errors"] == 0
                      and check(result))
                failed += not ok
                summary = next((l for l in done.stdout.splitlines() if not l.startswith("{")), "")
                print(f"{'ok' if ok else 'FAILED':6} {summary}", flush=True)
                if not ok:
                    print(done.stderr.strip()[-2000:], flush=True)
        finally:
            broker.stop()
    print(f"{len(SCENARIOS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
