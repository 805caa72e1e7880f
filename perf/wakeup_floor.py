#!/usr/bin/env python3
"""The CPU floor of the low-rate scenarios: what the smallest broker that wakes for its input
costs per message on this machine (perf/wakeup_floor/relay.c, epoll, no protocol).

    python3 perf/wakeup_floor.py                       # 5,000 msg/s, intervals 0, 250, 500, 1000 us
    python3 perf/wakeup_floor.py --rate 1000 --intervals 0
    python3 perf/wakeup_floor.py --relay glommio       # the same relay on glommio (interval 0)

For each coalescing interval it runs a producer -> relay -> consumer (one 20-byte ack back per
message) at the fixed rate and prints the relay's CPU per message (user + system, getrusage, as
compare.py measures a broker's) and its wake-ups, then one JSON line per run. Interval 0 wakes
for every input, as shardmq does; a longer one takes in everything that arrived meanwhile, at the
cost of up to that much latency per message. `--relay glommio` runs examples/glommio_relay.rs
instead (built with cargo): the same relay on glommio, set up as shardmq's connections are, so
that what glommio's loop costs per wake-up is told apart from what shardmq's own code does.
Needs gcc; uses loopback on a free port; stops what it starts.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
from brokers import free_port  # noqa: E402

SOURCE = os.path.join(ROOT, "perf", "wakeup_floor", "relay.c")


def run(binary, relay_command, rate, duration, interval_us):
    port = free_port()
    relay = subprocess.Popen(relay_command(port, interval_us), stdout=subprocess.PIPE, text=True)
    producer = consumer = None
    try:
        producer = subprocess.Popen([binary, "produce", str(port), str(rate), str(duration)])
        # The relay takes the first connection as the producer's.
        time.sleep(0.3)
        consumer = subprocess.Popen([binary, "consume", str(port)])
        out, _ = relay.communicate(timeout=duration + 30)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for process in (producer, consumer, relay):
            if process and process.poll() is None:
                process.kill()
                process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=5000, help="messages per second (default 5000)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per run (default 10)")
    parser.add_argument("--intervals", default="0,250,500,1000",
                        help="coalescing intervals in microseconds, comma-separated")
    parser.add_argument("--relay", choices=["c", "glommio"], default="c",
                        help="the relay: C on epoll (default) or examples/glommio_relay.rs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wakeup-floor-") as work:
        binary = os.path.join(work, "relay")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, SOURCE], check=True)
        intervals = [int(i) for i in args.intervals.split(",")]
        if args.relay == "glommio":
            subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "glommio_relay"],
                           cwd=ROOT, check=True)
            glommio_relay = os.path.join(ROOT, "target", "release", "examples", "glommio_relay")
            intervals = [0]

            def relay_command(port, _interval):
                return [glommio_relay, str(port)]
        else:
            def relay_command(port, interval):
                return [binary, "relay", str(port), str(interval)]
        print(f"{args.relay} relay at {args.rate} msg/s for {args.duration:g} s "
              "(CPU per message: user + system)")
        for interval in intervals:
            result = run(binary, relay_command, args.rate, args.duration, interval)
            per_wakeup = result["messages"] / result["wakeups"] if result["wakeups"] else 0
            print(f"  interval {interval:>5} us: {result['us_per_message']:6.1f} us/message, "
                  f"{result['wakeups']} wake-ups ({per_wakeup:.2f} messages each), "
                  f"user {result['user_s']:.2f} s, system {result['sys_s']:.2f} s")
            print(json.dumps(dict(result, rate=args.rate)))


if __name__ == "__main__":
    main()
