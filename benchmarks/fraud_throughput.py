"""Throughput of the fraud checks (``workers.fraud``) on one core, against a baseline.

Builds one large simulated stream with ``simulate.py``'s generator (``--employees`` over
``--weeks``, the four sites copied ``--site-copies`` times), converts it to ``Punches``
arrays once, picks ``--sample`` batches of ``--batch`` new punches (in the order the server
got them, spread evenly over the stream after the first ``--history-days``, so that every
employee has his full history), prepares everything a worker would have before the clock
starts, and then, pinned to one CPU, times:

* ``check()``: each batch with the pair history ``workers/checks.py`` passes
  (``simulate.pair_history``: each employee's punches a day around the batch, at most
  ``PAIR_MAX``, and the punches on its readers within ``buddy_gap_s``) and the usual-time
  fields filled in, as the worker has them from its cache;
* ``usual_times()``: for the same batches, the usual times of all the batch's employees
  from their last ``--history-days`` days (at most ``--history-max`` punches each, as
  ``simulate.usual_history`` picks them), grouped by (employee, kind): what the batch costs
  when every one of its employees misses the cache.

Beside each, in the same run and on the same arrays, the baseline: the one sort either
needs, ``np.lexsort((at, employee))`` over the rows handed to ``check()``, and
``np.lexsort((minutes, group))`` over the input of ``usual_times()``. Every figure is the
median over ``--rounds`` rounds. Punches/s counts the new punches of the batches (for
``usual_times()``: as if all its employees missed the cache); rows/s counts every row
handed to the call. Then each check alone, to show where the time goes, and the cost per
new punch at the cache misses a worker actually has: an employee whose usual times were
worked out less than ``USUAL_TTL_S`` before hits the cache, counted over the whole stream
in batches of ``--miss-batch`` (a batch of 4,096 spans hours of this floor, a worker's
batch far less). Fetching from PostgreSQL is not included.

    .venv/bin/python benchmarks/fraud_throughput.py
    .venv/bin/python benchmarks/fraud_throughput.py --employees 2000 --weeks 10 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from simulate import (
    DAY_S,
    Floats,
    Ints,
    Timeline,
    UsualCache,
    generate,
    pair_history,
    take,
    usual_history,
)

from workers import fraud
from workers.checks import USUAL_TTL_S
from workers.fraud import KINDS, Punches, Thresholds, arrays, check, usual_times

CHECKS: tuple[tuple[str, Callable[[Punches, Thresholds], list[fraud.Finding]]], ...] = (
    ("buddy_punch", fraud.buddy_punch),
    ("geofence", fraud.geofence),
    ("impossible_travel", fraud.impossible_travel),
    ("clock_skew", fraud.clock_skew),
    ("rapid_repeat", fraud.rapid_repeat),
    ("unusual_time", fraud.unusual_time),
)


def timed(call: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def check_base(p: Punches) -> Ints:
    """The baseline of ``check()``: the sort of (employee, at) any per-employee check needs."""
    return np.lexsort((p.at, p.employee))


def usual_base(group: Ints, minutes: Floats) -> Ints:
    """The baseline of ``usual_times()``: the sort of (group, minute) any median needs."""
    return np.lexsort((minutes, group))


def cache_misses(p: Punches, size: int, since: float, ttl_s: float) -> float:
    """Misses per new punch of a cache that keeps each employee's usual times ``ttl_s``
    (simulated), the stream checked in batches of ``size``, over those received from
    ``since``."""
    when = np.full(int(p.employee.max()) + 1, -np.inf)
    missed = checked = 0
    for start in range(0, p.size, size):
        stop = min(p.size, start + size)
        now = float(p.received[start:stop].max())
        employees = np.unique(p.employee[start:stop])
        stale = employees[~(now - when[employees] <= ttl_s)]
        when[stale] = now
        if p.received[start] >= since:
            missed, checked = missed + len(stale), checked + stop - start
    return missed / checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--employees", type=int, default=5000)
    parser.add_argument("--weeks", type=int, default=16)
    parser.add_argument("--site-copies", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--sample", type=int, default=40, help="batches timed per round")
    parser.add_argument("--history-days", type=float, default=56.0, help="for usual times")
    parser.add_argument("--history-max", type=int, default=240, help="for usual times")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--miss-batch", type=int, default=256, help="to count cache misses")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    started = time.perf_counter()
    stream = generate(args.seed, args.employees, args.weeks, site_copies=args.site_copies)
    generated = time.perf_counter() - started
    punches = arrays(stream.rows)
    del stream
    converted = time.perf_counter() - started - generated
    print(
        f"stream: {punches.size:,} punches, {args.employees} employees, {args.weeks} weeks, "
        f"{len(np.unique(punches.site))} sites, {len(np.unique(punches.device)) - 1} readers "
        f"(generated in {generated:.0f} s, arrays in {converted:.0f} s)"
    )
    print(f"pinned to CPU {cpu}; numpy {np.__version__}")

    thresholds = Thresholds()
    line = Timeline.of(punches)
    warm = float(punches.at.min()) + args.history_days * DAY_S
    starts = [
        start
        for start in range(0, punches.size - args.batch + 1, args.batch)
        if punches.received[start] >= warm
    ]
    step = max(1, len(starts) // args.sample)
    chosen = starts[::step][: args.sample]
    # Everything a worker has before it calls the checks, built before the clock starts.
    cache = UsualCache(int(punches.employee.max()) + 1, 0.0, args.history_days, args.history_max)
    prepared: list[Punches] = []
    inputs: list[tuple[Ints, Floats]] = []
    employees_seen = 0
    for start in chosen:
        stop = start + args.batch
        history = pair_history(punches, line, start, stop, thresholds.buddy_gap_s)
        cache.fill(punches, line, start, stop)
        idx = np.concatenate((history, np.arange(start, stop, dtype=np.int64)))
        new = np.zeros(len(idx), dtype=np.bool_)
        new[len(history) :] = True
        prepared.append(take(punches, idx, new))
        now = float(punches.received[start:stop].max())
        employees = np.unique(punches.employee[start:stop])
        employees_seen += len(employees)
        weeks = usual_history(
            punches, line, start, stop, employees, now, args.history_days, args.history_max
        )
        inputs.append(
            (
                punches.employee[weeks] * len(KINDS) + punches.kind[weeks],
                punches.local_minute[weeks],
            )
        )
    new_punches = args.batch * len(prepared)
    check_rows = sum(b.size for b in prepared)
    usual_rows = sum(len(group) for group, _ in inputs)
    per_employee = 1 / (employees_seen / len(prepared))
    missed = cache_misses(punches, args.miss_batch, warm, USUAL_TTL_S)
    # One call of each, untimed, to warm caches up.
    check(prepared[0], thresholds)
    usual_times(*inputs[0])

    runs: dict[str, list[float]] = {"check": [], "check_base": [], "usual": [], "usual_base": []}
    parts: dict[str, list[float]] = {name: [] for name, _ in CHECKS}
    for _ in range(args.rounds):
        gc.collect()
        runs["check"].append(sum(timed(check, b, thresholds) for b in prepared))
        runs["check_base"].append(sum(timed(check_base, b) for b in prepared))
        gc.collect()
        runs["usual"].append(sum(timed(usual_times, g, m) for g, m in inputs))
        runs["usual_base"].append(sum(timed(usual_base, g, m) for g, m in inputs))
        for name, function in CHECKS:
            parts[name].append(sum(timed(function, b, thresholds) for b in prepared))
    median = {k: statistics.median(v) for k, v in runs.items()}

    print()
    print(
        f"{len(prepared)} batches of {args.batch:,} new punches: pair history "
        f"{(check_rows - new_punches) / len(prepared):,.0f} rows a batch; "
        f"{employees_seen / len(prepared):,.0f} employees a batch, usual times from "
        f"{usual_rows / len(prepared):,.0f} punches of theirs ({args.history_days:g} days, "
        f"at most {args.history_max} each); median of {args.rounds} rounds, one core"
    )
    print()
    header = (
        f"{'call':<14} {'new punches/s':>13} {'rows/s':>12} {'lexsort rows/s':>15} "
        f"{'x lexsort':>10} {'ms per batch':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, label, rows in (
        ("check", "check()", check_rows),
        ("usual", "usual_times()", usual_rows),
    ):
        spent, baseline = median[name], median[name + "_base"]
        print(
            f"{label:<14} {new_punches / spent:>13,.0f} {rows / spent:>12,.0f} "
            f"{rows / baseline:>15,.0f} {spent / baseline:>9.1f}x "
            f"{spent / len(prepared) * 1000:>13.1f}"
        )
    # The cost per batch at the misses a worker has: usual_times() for so many employees.
    amortised = median["check"] + median["usual"] * per_employee * missed * args.batch
    print(
        f"{'both, cached':<14} {new_punches / amortised:>13,.0f} {'':>12} {'':>15} {'':>10} "
        f"{amortised / len(prepared) * 1000:>13.1f}"
    )
    print()
    print(
        f"both, cached: check() plus usual_times() for the employees a {USUAL_TTL_S:g} s cache "
        f"misses: {missed:.2f} per new punch over the stream in batches of {args.miss_batch} "
        f"(usual_times() costs {median['usual'] * per_employee / len(prepared) * 1e6:.0f} µs "
        f"an employee)"
    )
    print()
    print("check() on the batches, each check alone (median ms a batch, share of their sum):")
    total_parts = sum(statistics.median(v) for v in parts.values())
    for name, values in parts.items():
        spent = statistics.median(values)
        print(f"  {name:<18} {spent / len(prepared) * 1000:8.2f} ms  {spent / total_parts:5.1%}")
    print()
    print("goal: check() >= 200,000 new punches/s/core")


if __name__ == "__main__":
    main()
