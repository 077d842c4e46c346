"""The presence checkpoint (hub/live.py ``Live.dump``/``Live.restore``): its size, and how long
writing and reading it take, for floors of ``--employees`` employees over ``--sites`` sites.

The writing hub encodes it on its event loop every 10 s; a starting hub decodes it once.
Each employee punches in, starts and ends a break and clocks out, so every presence channel
and every employee's ``me`` channel has deltas in its recovery log. No Redis, no database.

    .venv/bin/python benchmarks/checkpoint.py
    .venv/bin/python benchmarks/checkpoint.py --employees 50000 --sites 500
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

from hub.events import PunchesCommitted, TerminalConnected
from hub.live import Live
from workers.persist import PunchOutcome, PunchRequest

T0 = datetime(2026, 11, 30, 8, tzinfo=UTC)


def floors(employees: int, sites: int, devices: int) -> Live:
    live = Live(base_version=1)
    n = 0
    for kind in ("in", "break_start", "break_end", "out"):
        stored = []
        for e in range(employees):
            at = T0 + timedelta(seconds=n)
            n += 1
            site = f"s{e % sites}"
            request = PunchRequest(
                "acme", uuid.uuid4(), kind, at, at, "terminal", f"e{e}", None, site, "door"
            )
            outcome = PunchOutcome("accepted", at, None, f"e{e}", site, f"Employee {e}")
            stored.append((request, outcome))
        live.apply(PunchesCommitted(stored, T0))
    for d in range(devices):
        live.apply(TerminalConnected("acme", f"d{d}", f"s{d % sites}", "hub-a", T0))
    return live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--employees", type=int, default=10_000)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    live = floors(args.employees, args.sites, args.devices)
    dumps, restores = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        dumped = live.dump()
        dumps.append(time.perf_counter() - start)
        start = time.perf_counter()
        Live(base_version=2).restore(dumped)
        restores.append(time.perf_counter() - start)
    print(
        f"{args.employees:,} employees x 4 punches, {args.sites} sites, {args.devices} devices: "
        f"checkpoint {len(dumped) / 1e6:.1f} MB, dump median {statistics.median(dumps) * 1000:.0f}"
        f" ms, restore median {statistics.median(restores) * 1000:.0f} ms ({args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
