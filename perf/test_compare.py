#!/usr/bin/env python3
"""The arithmetic of compare.py's report: medians over rounds, ratios paired by round, targets
met or not. Runs in a second, without brokers: `python3 perf/test_compare.py`."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402


def run(broker, scenario, round_number, rate, cpu, p99=500.0, errors=0):
    return {"broker": broker, "scenario": scenario, "round": round_number, "sent": rate * 10,
            "received": rate * 10, "send_rate": rate, "receive_rate": rate, "confirm_rate": 0.0,
            "latency_us": {"p50": p99 / 2, "p99": p99, "p999": p99 * 2, "max": p99 * 3},
            "broker_cpu_seconds_per_million": cpu, "broker_peak_rss_mib": 30.0,
            "broker_idle_rss_mib": 7.0, "loadgen_cpu_seconds": 5.0, "seconds": 10.0,
            "errors": errors}


# Three rounds, the brokers' order swapped in the second, as compare.py runs them.
RUNS = [
    run("shardmq", "1p-1c-16B", 1, 150_000, 2.5),
    run("rabbitmq", "1p-1c-16B", 1, 50_000, 30.0),
    run("rabbitmq", "1p-1c-16B", 2, 40_000, 20.0),
    run("shardmq", "1p-1c-16B", 2, 160_000, 2.5, errors=1),
    run("shardmq", "1p-1c-16B", 3, 100_000, 4.0),
    run("rabbitmq", "1p-1c-16B", 3, 45_000, 27.0),
]


class Medians(unittest.TestCase):
    def test_each_figure_is_its_median_over_the_rounds_and_errors_add_up(self):
        merged = compare.medians(RUNS)
        self.assertEqual([(r["broker"], r["scenario"]) for r in merged],
                         [("shardmq", "1p-1c-16B"), ("rabbitmq", "1p-1c-16B")])
        ours, theirs = merged
        self.assertEqual(ours["receive_rate"], 150_000)
        self.assertEqual(ours["broker_cpu_seconds_per_million"], 2.5)
        self.assertEqual(ours["errors"], 1)
        self.assertEqual(ours["rounds"], 3)
        self.assertEqual(ours["loadgen_cores"], 0.5)
        self.assertEqual(theirs["receive_rate"], 45_000)
        self.assertEqual(theirs["broker_cpu_seconds_per_million"], 27.0)

    def test_an_even_number_of_rounds_averages_the_middle_two_without_float_noise(self):
        merged = compare.medians([run("shardmq", "s", 1, 1, 2.46), run("shardmq", "s", 2, 1, 2.48)])
        self.assertEqual(merged[0]["broker_cpu_seconds_per_million"], 2.47)


class Targets(unittest.TestCase):
    def rows(self, runs):
        return compare.targets(compare.medians(runs), 1_000_000, runs)

    def test_ratios_are_paired_by_round_and_the_verdict_follows_the_medians(self):
        rate = compare.round_ratios(RUNS, "1p-1c-16B", lambda r: r["receive_rate"],
                                    lambda r: r["receive_rate"])
        self.assertEqual(rate, [3.0, 4.0, 100_000 / 45_000])
        rows = self.rows(RUNS)
        throughput = next(r for r in rows if r.startswith("| ≥ 5×"))
        # Median rates 150,000 against 45,000: 3.3×, not met.
        self.assertIn("| 3.3× (rounds: 3.0×, 4.0×, 2.2×)", throughput)
        self.assertTrue(throughput.endswith("| no |"))
        cpu = next(r for r in rows if r.startswith("| CPU per message"))
        # Median CPU 2.5 against 27.0 s per million: 1/10.8, met; the rounds 1/12, 1/8, 1/6.8.
        self.assertIn("| 1/10.8 (rounds: 1/12.0, 1/8.0, 1/6.8)", cpu)
        self.assertTrue(cpu.endswith("| yes |"))

    def test_a_run_from_before_rounds_reads_as_one_round(self):
        single = [dict(r) for r in RUNS[:2]]
        for r in single:
            del r["round"]
        rows = self.rows(single)
        self.assertFalse(any("rounds:" in r for r in rows))
        self.assertIn("| 3.0× |", next(r for r in rows if r.startswith("| ≥ 5×")))
        report = compare.report({"date": "then"}, single, "python3 perf/compare.py", 15, 1_000_000)
        self.assertIn("One round", report)


if __name__ == "__main__":
    unittest.main()
