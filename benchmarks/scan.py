"""The overtime scan's cost per look (``workers/scan.py``): a look that reads everything
afresh (what every look did before the scan followed what changed, and what it still does
first, hourly and after a failure) against the looks that follow, in the same run on the
same database.

Builds a scratch database on ``--pg`` with ``--employees`` employees over four sites (no
overtime policy, FLSA, California, California with the EU working time rules) and their
punches, in one of two shapes:

* ``soak``: what ``capacity.py soak`` leaves after ``--minutes`` at ``--rate`` punches/s
  spread over everyone (at 1,500/s and 50,000 employees, a punch each every 33 s);
* ``week``: a working week and a day, a shift a day with a lunch break, some still at work.

Then, ``--rounds`` times: a new scan object's first look (``full``); ``--rate`` x 60 new
punches committed, as a minute of the soak brings, and the next look (``minute``); and a
look with nothing new (``quiet``). Each figure is the median over the rounds: the wall
time of the look and the benchmark process's CPU time in it (the rest is PostgreSQL and
the wire), and how many employees it judged.

    .venv/bin/python benchmarks/scan.py
    .venv/bin/python benchmarks/scan.py --shape week --employees 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from hub import store
from hub.migrate import migrate
from workers import scan as scan_module
from workers.scan import OvertimeScan

SITES = {
    "none": {},
    "flsa": {"overtime": "flsa"},
    "california": {"overtime": "california"},
    "eu": {"overtime": "california", "eu_wtd": True},
}
CYCLE = ("in", "break_start", "break_end", "out")
COLUMNS = ("tenant", "id", "employee", "kind", "at", "received_at", "site", "source")


def employees(count: int) -> Iterator[tuple[str, str]]:
    names = list(SITES)
    for n in range(count):
        yield f"e{n}", names[n % len(names)]


def soak_punches(
    count: int, rate: float, minutes: float, now: datetime
) -> Iterator[tuple[Any, ...]]:
    every = count / rate
    for name, site in employees(count):
        at = now - timedelta(minutes=minutes) + timedelta(seconds=random.uniform(0, every))
        step = 0
        while at < now:
            yield ("bench", uuid.uuid4(), name, CYCLE[step % 4], at, at, site, "terminal")
            at += timedelta(seconds=every)
            step += 1


def week_punches(count: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    for name, site in employees(count):
        for day in range(8, -1, -1):
            start = now - timedelta(days=day, hours=random.uniform(2, 9))
            times = [start, start + timedelta(hours=4), start + timedelta(hours=4.5)]
            times.append(start + timedelta(hours=random.uniform(7.5, 10)))
            for kind, at in zip(CYCLE, times, strict=True):
                if at < now:
                    yield ("bench", uuid.uuid4(), name, kind, at, at, site, "terminal")


def minute_punches(count: int, rate: float, now: datetime, step: int) -> list[tuple[Any, ...]]:
    chosen = random.sample(range(count), min(count, int(rate * 60)))
    names = list(SITES)
    return [
        (
            "bench",
            uuid.uuid4(),
            f"e{n}",
            CYCLE[step % 4],
            now - timedelta(seconds=random.uniform(0, 60)),
            now,
            names[n % len(names)],
            "terminal",
        )
        for n in chosen
    ]


async def build(dsn: str, args: argparse.Namespace, now: datetime) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await store.init_connection(conn)
        await migrate(conn)
        await store.ensure_tenant(conn, "bench", "Bench", "UTC")
        for site, policy in SITES.items():
            body = {"name": site, "timezone": "America/Los_Angeles", "lat": None, "lon": None}
            await store.upsert_site(
                conn, "bench", site, {**body, "radius_m": None, "policy": policy}
            )
        await conn.copy_records_to_table(
            "employees",
            records=[("bench", name, name, site) for name, site in employees(args.employees)],
            columns=("tenant", "id", "name", "site"),
        )
        rows = (
            soak_punches(args.employees, args.rate, args.minutes, now)
            if args.shape == "soak"
            else week_punches(args.employees, now)
        )
        await conn.copy_records_to_table("punches", records=list(rows), columns=COLUMNS)
        await conn.execute("ANALYZE")
        total = await conn.fetchval("SELECT count(*) FROM punches")
        print(f"{args.employees:,} employees, {total:,} punches ({args.shape})")
    finally:
        await conn.close()


class Counted:
    """Counts the employees a look judges."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = scan_module.live_findings
        scan_module.live_findings = self._count  # type: ignore[assignment]

    def _count(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._real(*args, **kwargs)


async def look(scan: OvertimeScan, counted: Counted) -> tuple[float, float, int]:
    async def announce(alerts: list[Any]) -> None:
        return None

    counted.calls = 0
    wall, cpu = time.perf_counter(), time.process_time()
    await scan.scan(announce, datetime.now(UTC))
    return time.perf_counter() - wall, time.process_time() - cpu, counted.calls


async def measure(dsn: str, args: argparse.Namespace) -> None:
    pool = await store.create_system_pool(dsn, max_size=2)
    counted = Counted()
    figures: dict[str, list[tuple[float, float, int]]] = {"full": [], "minute": [], "quiet": []}
    writer = await asyncpg.connect(dsn)
    try:
        for step in range(args.rounds):
            scan = OvertimeScan(pool)
            figures["full"].append(await look(scan, counted))
            rows = minute_punches(args.employees, args.rate, datetime.now(UTC), step)
            await writer.copy_records_to_table("punches", records=rows, columns=COLUMNS)
            figures["minute"].append(await look(scan, counted))
            figures["quiet"].append(await look(scan, counted))
    finally:
        await writer.close()
        await pool.close()
    full = statistics.median(f[0] for f in figures["full"])
    print(f"{'look':8} {'wall s':>8} {'cpu s':>8} {'judged':>8} {'wall/full':>10}")
    for name, rows in figures.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        judged = int(statistics.median(r[2] for r in rows))
        print(f"{name:8} {wall:8.3f} {cpu:8.3f} {judged:8,} {wall / full:10.3f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--employees", type=int, default=50_000)
    parser.add_argument("--shape", choices=("soak", "week"), default="soak")
    parser.add_argument("--rate", type=float, default=1500.0, help="punches/s")
    parser.add_argument("--minutes", type=float, default=30.0, help="of soak before")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    name = f"attendance_scan_bench_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(args.pg)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.pg.rsplit("/", 1)[0] + f"/{name}"
    try:
        await build(dsn, args, datetime.now(UTC))
        await measure(dsn, args)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
