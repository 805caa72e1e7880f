#!/usr/bin/env python3
"""The durability issue's memory target, measured: a persistent backlog far larger than the
memory budget, with the broker's resident memory sampled throughout.

    python3 perf/paging.py                      # 5,000,000 x 1 KiB (about 5.4 GB on disk)
    python3 perf/paging.py --messages 500000    # a shorter run

It builds shardmq and loadgen in release mode, starts shardmq (default config, one shard per
CPU) on a free loopback port with a fresh data directory, and then:
1. publishes the backlog with confirms (window 1000) to one durable queue, no consumer;
2. stops the broker (SIGTERM) and starts it again on the same data directory: recovery time
   (first log line to "listening on", from the broker's own timestamps) and RSS after recovery;
3. drains the backlog (prefetch 1000, ack every 100) — bodies come back from the log.
Peak RSS is sampled every 100 ms in each phase. The report goes to
perf/results/<date>-<time>-paging/report.md and results.json. Everything started is stopped
by PID.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
import brokers  # noqa: E402  (the same broker and /proc helpers as compare.py)


def sampled(broker, run):
    """Runs `run()` while sampling the broker's RSS; returns (result, peak bytes)."""
    peak = [brokers.rss_bytes(broker.pids())]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], brokers.rss_bytes(broker.pids()))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run()
    finally:
        done.set()
        sampler.join()
    return result, peak[0]


def loadgen(port, args):
    command = [os.path.join(ROOT, "target", "release", "loadgen"), "--port", str(port), "--json",
               "--queue-prefix", "paging", "--persistent", "--size", "1024",
               "--duration", "7200"] + args
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [l for l in completed.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"loadgen failed: {completed.stderr[-2000:]}")
    return json.loads(lines[-1])


def start(workdir, port):
    binary = os.path.join(ROOT, "target", "release", "shardmq")
    data = os.path.join(workdir, "shardmq-data")
    started = time.monotonic()
    broker = brokers.Broker("shardmq", [binary, "--listen", f"127.0.0.1:{port}", "--data-dir", data,
                                        "--log-level", "info"], dict(os.environ), port, workdir)
    # The port is bound before the shards recover; the broker says when it serves.
    log = os.path.join(workdir, "shardmq.log")
    while True:
        with open(log) as f:
            for line in f:
                if "listening on" in line:
                    stamp = datetime.datetime.fromisoformat(line[1:25].replace("Z", "+00:00"))
                    return broker, stamp
        if time.monotonic() - started > 600:
            raise SystemExit("shardmq did not start serving within 10 minutes")
        time.sleep(0.05)


def first_stamp(workdir):
    with open(os.path.join(workdir, "shardmq.log")) as f:
        for line in f:
            if line.startswith("[20"):
                return datetime.datetime.fromisoformat(line[1:25].replace("Z", "+00:00"))
    return None


def disk_bytes(workdir):
    total = 0
    for base, _, files in os.walk(os.path.join(workdir, "shardmq-data")):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5_000_000)
    options = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shardmq", "-p", "shardmq-perf"],
                   cwd=ROOT, check=True)
    brokers.ensure_rabbitmq_c()
    n = options.messages
    mib = 2**20
    results = {"messages": n, "body_bytes": 1024}
    with tempfile.TemporaryDirectory(prefix="shardmq-paging-") as workdir:
        port = brokers.free_port()
        broker, _ = start(workdir, port)
        try:
            results["idle_rss_mib"] = round(brokers.rss_bytes(broker.pids()) / mib, 1)
            published, peak = sampled(broker, lambda: loadgen(port, [
                "--consumers", "0", "--messages", str(n), "--confirm", "1000"]))
            results["publish_rate"] = round(published.get("send_rate", 0))
            results["confirmed"] = published.get("confirmed", published.get("sent"))
            results["publish_peak_rss_mib"] = round(peak / mib, 1)
            results["disk_mib"] = round(disk_bytes(workdir) / mib)
            print(f"published {n} x 1 KiB: {results['publish_rate']}/s, peak RSS "
                  f"{results['publish_peak_rss_mib']} MiB, {results['disk_mib']} MiB on disk", flush=True)
        finally:
            broker.stop()
        broker, serving = start(workdir, port)
        try:
            # From the broker's first log line (process start) to "listening on".
            recovery = (serving - first_stamp(workdir)).total_seconds()
            results["recovery_seconds"] = round(recovery, 2)
            results["recovered_rss_mib"] = round(brokers.rss_bytes(broker.pids()) / mib, 1)
            print(f"recovered in {recovery:.2f} s; RSS {results['recovered_rss_mib']} MiB", flush=True)
            drained, peak = sampled(broker, lambda: loadgen(port, [
                "--producers", "0", "--consume-limit", str(n), "--prefetch", "1000",
                "--multi-ack", "100", "--cleanup"]))
            results["drain_rate"] = round(drained.get("receive_rate", 0))
            results["drained"] = drained.get("received")
            results["drain_peak_rss_mib"] = round(peak / mib, 1)
            print(f"drained {results['drained']}: {results['drain_rate']}/s, peak RSS "
                  f"{results['drain_peak_rss_mib']} MiB", flush=True)
        finally:
            broker.stop()
        with open(os.path.join(workdir, "shardmq.log")) as f:
            results["recovery_log"] = [l.strip() for l in f if "recovered" in l]

    now = datetime.datetime.now()
    out = os.path.join(ROOT, "perf", "results", now.strftime("%Y-%m-%d-%H%M") + "-paging")
    os.makedirs(out, exist_ok=True)
    results["date"] = now.isoformat(timespec="seconds")
    results["machine"] = f"{platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}"
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    target = "met" if max(results["publish_peak_rss_mib"], results["drain_peak_rss_mib"],
                          results["recovered_rss_mib"]) < 512 else "NOT met"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# Paging: {n:,} persistent 1 KiB messages ({results['date']})\n\n")
        f.write(f"Machine: {results['machine']}. Command: `python3 perf/paging.py --messages {n}`. "
                "shardmq with its default config (memory budget 64 MiB per shard).\n\n")
        f.write("| phase | rate (msg/s) | broker RSS (MiB) |\n|---|---|---|\n")
        f.write(f"| idle after start | | {results['idle_rss_mib']} |\n")
        f.write(f"| publish with confirms, no consumer | {results['publish_rate']:,} | peak {results['publish_peak_rss_mib']} |\n")
        f.write(f"| restart: recovery {results['recovery_seconds']} s | | after recovery {results['recovered_rss_mib']} |\n")
        f.write(f"| drain (prefetch 1000, ack every 100) | {results['drain_rate']:,} | peak {results['drain_peak_rss_mib']} |\n\n")
        f.write(f"Log on disk after publishing: {results['disk_mib']} MiB. "
                f"Target (RSS under 512 MiB throughout): {target}.\n")
    print(f"report: {out}/report.md (target {target})")


if __name__ == "__main__":
    main()
