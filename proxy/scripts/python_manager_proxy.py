#!/usr/bin/env python3
"""The small call of `ctx bench proxy` (call_small_idle: add(u64, 16-byte str)) through Python's
multiprocessing manager proxies, beside a direct call under a threading.Lock measured in the same run.

Usage: python3 proxy/scripts/python_manager_proxy.py [--quick] [--json FILE]

Prints the median nanoseconds per call of each and their ratio. Compare the manager proxy figure
with `ctx bench proxy` (call_small_idle) run on the same machine; the proxy README explains how.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from multiprocessing.managers import BaseManager

TAG = "sixteen-byte-tag"


class Tally:
    def __init__(self):
        self.total = 0
        self.tag_bytes = 0

    def add(self, n, tag):
        self.total += n
        self.tag_bytes += len(tag)
        return self.total


class TallyManager(BaseManager):
    pass


TallyManager.register("Tally", Tally)


def per_call_ns(fn, calls, trials):
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn(5, TAG)
        samples.append((time.perf_counter_ns() - t0) / calls)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and trials")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    trials = 3 if args.quick else 9
    proxy_calls = 300 if args.quick else 3000

    local = Tally()
    lock = threading.Lock()

    def direct(n, tag):
        with lock:
            return local.add(n, tag)

    with TallyManager() as manager:
        remote = manager.Tally()
        remote.add(0, TAG)  # connect before timing
        # Interleave: a proxy trial, then a direct trial, so both see the same machine.
        proxy_samples, direct_samples = [], []
        for _ in range(trials):
            proxy_samples.append(per_call_ns(remote.add, proxy_calls, 1))
            direct_samples.append(per_call_ns(direct, proxy_calls * 100, 1))
        proxy_ns = statistics.median(proxy_samples)
        direct_ns = statistics.median(direct_samples)

    result = {
        "python": sys.version.split()[0],
        "case": "python_manager_proxy_call",
        "ns_per_call": proxy_ns,
        "baseline": "python_direct_call_lock",
        "baseline_ns_per_call": direct_ns,
        "ratio": proxy_ns / direct_ns if direct_ns else 0.0,
        "trials": trials,
    }
    print(f"python {result['python']}")
    print(f"manager proxy call  add(5, {TAG!r}): {proxy_ns:10.0f} ns/call")
    print(f"direct call under threading.Lock:    {direct_ns:10.0f} ns/call")
    print(f"ratio proxy / direct:                {result['ratio']:10.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
