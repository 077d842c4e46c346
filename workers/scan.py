"""The periodic scan for the alerts that time raises: overtime, overtime approaching, a
forgotten clock-out, missed breaks and short rests (the rules: ``workers/overtime.py``), and
lateness for a planned shift (the floors' rule, in SQL).

Every ``interval_s`` it judges the employees who punched in the last day, across tenants (as
the database's owner, like retention), by the punches of their last eight days and their
home site's rules, and stores the alerts not raised before: an alert's id is derived from
its kind, employee and occasion (the day or the shift).

It keeps those employees' punches in memory, and each scan reads only the punches
committed since the last (``NEW_SQL``) and the sites and employees changed since. It judges
only who punched since, whose site or record changed, and whose ``quiet_until`` has come
(the time before which nothing new can come of time passing alone: ``live_findings``). Every
``RELOAD_EVERY`` it reads everything again, as its first scan does.

With one process, the hub's checks process runs it; with Redis, every worker does, and a
lock in Redis lets one of them scan per interval: a worker's first turn in a while reads
what it missed.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import uuid
from array import array
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg

from hub.events import Alert
from hub.types import Conn
from workers.checks import store_alerts
from workers.overtime import (
    EU_REFERENCE_WEEKS,
    LiveFinding,
    average_week,
    live_findings,
)
from workers.timesheets import Punch, Rules

log = logging.getLogger(__name__)

# Tells every hub of new alerts (the hub's own presence, or the presence stream).
Announce = Callable[[list[Alert]], Awaitable[None]]

SCAN_NAMESPACE: Final = uuid.UUID("0b9a8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d")
# Who is looked at: anyone who punched within this, and their punches within the second.
ACTIVE: Final = timedelta(hours=26)
HISTORY: Final = timedelta(days=8)
# How often the 17-week averages of the EU working time directive are looked at.
AVERAGE_EVERY: Final = timedelta(hours=1)
# How often everything is read again, rather than what changed.
RELOAD_EVERY: Final = timedelta(hours=1)
# Employees judged between two looks at the event loop.
YIELD_EVERY: Final = 200
# A punch's `committed_at` is its transaction's start, and a transaction may commit after
# one that started later: what was committed within this of the latest seen is read again.
# A punch committed later still is found by the next reload.
RECHECK: Final = timedelta(seconds=60)

SEVERITY: Final = {
    "overtime": "warning",
    "overtime_approaching": "info",
    "missing_clock_out": "warning",
    "meal_break": "warning",
    "rest_period": "warning",
    "late": "info",
}

MESSAGES: Final = {
    "overtime": "{employee} is into overtime",
    "overtime_approaching": "{employee} will be into overtime within the hour",
    "missing_clock_out": "{employee} has been clocked in for {open_hours} hours",
    "meal_break": "{employee} has had no break in time",
    "rest_period": "{employee} started a shift after only {rest_hours} hours of rest",
    "late": "{employee} has not clocked in for the shift that started at {start}",
}

KINDS: Final = ("in", "out", "break_start", "break_end")
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

ACTIVE_SQL: Final = """
SELECT e.tenant, e.id AS employee, e.site, s.timezone, s.policy
  FROM employees e
  JOIN sites s ON s.tenant = e.tenant AND s.id = e.site
 WHERE e.erased_at IS NULL
   AND EXISTS (SELECT 1 FROM punches p
                WHERE p.tenant = e.tenant AND p.employee = e.id AND p.at >= $1)
"""

# The same, for the employees named.
EMPLOYEES_SQL: Final = """
SELECT e.tenant, e.id AS employee, e.site, s.timezone, s.policy
  FROM unnest($1::text[], $2::text[]) AS w(tenant, employee)
  JOIN employees e ON e.tenant = w.tenant AND e.id = w.employee
  JOIN sites s ON s.tenant = e.tenant AND s.id = e.site
 WHERE e.erased_at IS NULL
"""

# Planned shifts whose grace period is over, of employees who are out and have not punched
# since the shift began: the same rule as the floors' `late` (hub/presence.py).
LATE_SQL: Final = """
SELECT s.tenant, s.employee, s.site, s.starts_at, s.ends_at
  FROM schedules s
  JOIN sites t ON t.tenant = s.tenant AND t.id = s.site
  JOIN employees e ON e.tenant = s.tenant AND e.id = s.employee AND e.erased_at IS NULL
 WHERE s.starts_at + make_interval(mins => COALESCE((t.policy->>'grace_minutes')::int, 5)) <= $1
   AND s.ends_at > $1
   AND NOT EXISTS (SELECT 1 FROM punches p
                    WHERE p.tenant = s.tenant AND p.employee = s.employee
                      AND p.at >= s.starts_at)
   AND COALESCE((SELECT p.kind FROM punches p
                  WHERE p.tenant = s.tenant AND p.employee = s.employee AND p.at < s.starts_at
                  ORDER BY p.at DESC, p.id DESC LIMIT 1), 'out') = 'out'
"""

# Which of these alerts are stored already.
KNOWN_SQL: Final = """
SELECT a.tenant, a.id
  FROM unnest($1::text[], $2::uuid[]) AS k(tenant, id)
  JOIN alerts a ON a.tenant = k.tenant AND a.id = k.id
"""

PUNCHES_SQL: Final = """
SELECT p.tenant, p.employee, p.id, p.kind, p.at, p.committed_at
  FROM unnest($1::text[], $2::text[]) AS w(tenant, employee)
  JOIN punches p ON p.tenant = w.tenant AND p.employee = w.employee
 WHERE p.at >= $3
"""

# Punches committed since, within the history (index punches_by_commit).
NEW_SQL: Final = """
SELECT p.tenant, p.employee, p.id, p.kind, p.at, p.committed_at
  FROM punches p
 WHERE p.committed_at > $1 AND p.at >= $2
"""

# Employees whose record or site changed since: their site, rules or erasure.
CHANGED_SQL: Final = """
SELECT e.tenant, e.id AS employee, greatest(e.updated_at, s.updated_at) AS updated_at
  FROM employees e
  JOIN sites s ON s.tenant = e.tenant AND s.id = e.site
 WHERE e.updated_at > $1 OR s.updated_at > $1
"""

# The database's clock, and the tenants (those deleted took their rows with them).
CLOCK_SQL: Final = "SELECT now() AS now, array(SELECT id FROM tenants) AS tenants"

Key = tuple[str, str]


class Watched:
    """An employee the scan follows: their punches of the last ``HISTORY`` (microseconds
    since the epoch and an index into ``KINDS``, in time order: some ten bytes a punch),
    their home site and rules, when they next need judging without a punch, and the ids
    of their alerts known to be stored."""

    __slots__ = (
        "employee",
        "eu_wtd",
        "kinds",
        "quiet_until",
        "raised",
        "rules",
        "site",
        "tenant",
        "times",
    )

    def __init__(self, tenant: str, employee: str) -> None:
        self.tenant = tenant
        self.employee = employee
        self.site = ""
        self.rules = Rules("UTC")
        self.eu_wtd = False
        self.times = array("q")
        self.kinds = bytearray()
        self.quiet_until = EPOCH
        self.raised: set[uuid.UUID] = set()

    def place(self, record: asyncpg.Record) -> None:
        """Take the home site and its rules from an ``EMPLOYEES_SQL`` row."""
        policy = record["policy"] or {}
        self.site = record["site"]
        self.rules = Rules.from_policy(record["timezone"], policy)
        self.eu_wtd = bool(policy.get("eu_wtd"))

    def add(self, at: datetime, kind: str) -> None:
        stamp = _micros(at)
        index = bisect.bisect_right(self.times, stamp)
        self.times.insert(index, stamp)
        self.kinds.insert(index, KINDS.index(kind))

    def forget_before(self, horizon: datetime) -> None:
        cut = bisect.bisect_left(self.times, _micros(horizon))
        if cut:
            del self.times[:cut]
            del self.kinds[:cut]

    def last(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.times[-1]) if self.times else EPOCH

    def punches(self) -> list[Punch]:
        return [
            Punch(EPOCH + timedelta(microseconds=stamp), KINDS[kind])
            for stamp, kind in zip(self.times, self.kinds, strict=True)
        ]


def _micros(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


class OvertimeScan:
    """Finds and stores the alerts time raises; ``pool`` acts as the database's owner."""

    def __init__(self, pool: asyncpg.Pool, interval_s: float = 60.0) -> None:
        self._pool = pool
        self.interval_s = interval_s
        # When the 17-week averages were last looked at (they change slowly).
        self._averaged: datetime | None = None
        # Who is followed, when all of it was last read (None: read it all next time), and
        # the latest commit seen since.
        self._watched: dict[Key, Watched] = {}
        self._loaded: datetime | None = None
        self._since = EPOCH
        # When sites and employees were last looked at for changes, and the changes seen
        # within RECHECK of that (read again, as punches are).
        self._checked = EPOCH
        self._changed: dict[Key, datetime] = {}
        # Punches committed within RECHECK of the latest seen, read again by the next scan.
        self._recent: dict[uuid.UUID, datetime] = {}

    async def scan(self, announce: Announce, now: datetime | None = None) -> list[Alert]:
        """Find the alerts due now that were not raised before: ``announce`` them, then
        store them; returns them.

        Announced first: if announcing fails nothing is stored, and the next scan reads
        everything again and finds them again; if storing fails after, the next scan
        announces them again, and hubs skip what they still show.
        """
        now = now or datetime.now(UTC)
        try:
            return await self._scan(announce, now)
        except BaseException:
            self._loaded = None
            raise

    async def _scan(self, announce: Announce, now: datetime) -> list[Alert]:
        async with self._pool.acquire() as conn:
            alerts = [_late(shift, now) for shift in await conn.fetch(LATE_SQL, now)]
            if self._loaded is None or now - self._loaded >= RELOAD_EVERY:
                judged = await self._load(conn, now)
            else:
                judged = await self._catch_up(conn, now)
            for count, watched in enumerate(judged, 1):
                if not count % YIELD_EVERY:
                    # Tens of thousands to judge take seconds: let the checks go on between.
                    await asyncio.sleep(0)
                judgement = live_findings(
                    watched.punches(), watched.rules, now, eu_wtd=watched.eu_wtd
                )
                watched.quiet_until = judgement.quiet_until
                alerts += [_alert(watched, finding, now) for finding in judgement.findings]
            if self._averaged is None or now - self._averaged >= AVERAGE_EVERY:
                self._averaged = now
                alerts += await self._averages(conn, now)
            alerts = [a for a in alerts if not self._known(a)]
            if not alerts:
                return []
            known = await conn.fetch(KNOWN_SQL, [a.tenant for a in alerts], [a.id for a in alerts])
            raised = {(r["tenant"], r["id"]) for r in known}
            fresh = [a for a in alerts if (a.tenant, a.id) not in raised]
            if fresh:
                await announce(fresh)
                await store_alerts(conn, fresh, [None] * len(fresh))
            for alert in alerts:
                owner = self._watched.get((alert.tenant, alert.employee or ""))
                if owner is not None:
                    owner.raised.add(alert.id)
            return fresh

    def _known(self, alert: Alert) -> bool:
        watched = self._watched.get((alert.tenant, alert.employee or ""))
        return watched is not None and alert.id in watched.raised

    async def _load(self, conn: Conn, now: datetime) -> list[Watched]:
        """Read everyone active and their history afresh; all of them are to be judged."""
        # Punches committed from here on are read by the next scan, or by this one.
        self._watched, self._recent = {}, {}
        self._since = self._checked = await conn.fetchval("SELECT now()")
        self._changed = {}
        await self._changes(conn, self._checked)
        for record in await conn.fetch(ACTIVE_SQL, now - ACTIVE):
            watched = Watched(record["tenant"], record["employee"])
            watched.place(record)
            self._watched[watched.tenant, watched.employee] = watched
        self._take(await self._history(conn, self._watched, now - HISTORY))
        self._loaded = now
        return list(self._watched.values())

    async def _catch_up(self, conn: Conn, now: datetime) -> list[Watched]:
        """Read what was committed or changed since the last scan; returns who is to be
        judged."""
        clock = await conn.fetchrow(CLOCK_SQL)
        assert clock is not None
        tenants = set(clock["tenants"])
        since = self._since - RECHECK
        rows = [
            r
            for r in await conn.fetch(NEW_SQL, since, now - HISTORY)
            if r["id"] not in self._recent
        ]
        judge = {key for key, watched in self._watched.items() if watched.quiet_until <= now}
        # Someone not followed yet whose new punch makes them active: their history too.
        arrived = {
            (r["tenant"], r["employee"])
            for r in rows
            if (r["tenant"], r["employee"]) not in self._watched and r["at"] >= now - ACTIVE
        }
        for key in arrived:
            self._watched[key] = Watched(*key)
        self._take(row for row in rows if (row["tenant"], row["employee"]) not in arrived)
        self._take(await self._history(conn, arrived, now - HISTORY))
        judge.update((r["tenant"], r["employee"]) for r in rows)
        changed = await self._changes(conn, clock["now"])
        changed.intersection_update(self._watched)
        await self._place(conn, changed | arrived)
        judge |= changed
        judged = []
        for key in judge:
            watched = self._watched.get(key)
            if watched is None:
                continue
            if watched.tenant not in tenants or watched.last() < now - ACTIVE:
                del self._watched[key]
                continue
            watched.forget_before(now - HISTORY)
            judged.append(watched)
        self._forget_recent()
        return judged

    async def _changes(self, conn: Conn, now: datetime) -> set[Key]:
        """Employees whose record or site changed since the last look."""
        changed = set()
        for record in await conn.fetch(CHANGED_SQL, self._checked - RECHECK):
            key = (record["tenant"], record["employee"])
            if self._changed.get(key) != record["updated_at"]:
                self._changed[key] = record["updated_at"]
                changed.add(key)
        self._checked = now
        horizon = now - RECHECK
        self._changed = {k: v for k, v in self._changed.items() if v > horizon}
        return changed

    async def _history(
        self, conn: Conn, keys: Iterable[Key], since: datetime
    ) -> list[asyncpg.Record]:
        """The employees' punches from ``since`` on."""
        keys = list(keys)
        if not keys:
            return []
        return await conn.fetch(PUNCHES_SQL, [k[0] for k in keys], [k[1] for k in keys], since)

    def _take(self, rows: Iterable[asyncpg.Record]) -> None:
        """Add punches to whom they belong (if followed), noting how late a commit has
        been seen and what was committed close to it."""
        for row in rows:
            watched = self._watched.get((row["tenant"], row["employee"]))
            if watched is None:
                continue
            watched.add(row["at"], row["kind"])
            committed = row["committed_at"]
            self._since = max(self._since, committed)
            self._recent[row["id"]] = committed
        self._forget_recent()

    def _forget_recent(self) -> None:
        horizon = self._since - RECHECK
        if any(committed <= horizon for committed in self._recent.values()):
            self._recent = {k: v for k, v in self._recent.items() if v > horizon}

    async def _place(self, conn: Conn, keys: set[Key]) -> None:
        """Read the employees' home sites and rules; forget those erased or gone."""
        if not keys:
            return
        found = await conn.fetch(EMPLOYEES_SQL, [k[0] for k in keys], [k[1] for k in keys])
        for record in found:
            self._watched[record["tenant"], record["employee"]].place(record)
        for key in keys - {(r["tenant"], r["employee"]) for r in found}:
            del self._watched[key]

    async def _averages(self, conn: Conn, now: datetime) -> list[Alert]:
        """The EU 48-hour average week, for the active employees of ``eu_wtd`` sites."""
        watched = [w for w in self._watched.values() if w.eu_wtd]
        if not watched:
            return []
        since = now - timedelta(weeks=EU_REFERENCE_WEEKS + 2)
        rows: dict[Key, list[Punch]] = {}
        for row in await self._history(conn, ((w.tenant, w.employee) for w in watched), since):
            rows.setdefault((row["tenant"], row["employee"]), []).append(
                Punch(row["at"], row["kind"])
            )
        alerts = []
        for employee in watched:
            finding = average_week(
                rows.get((employee.tenant, employee.employee), []), employee.rules, now
            )
            if finding is not None:
                alerts.append(_alert(employee, finding, now))
        return alerts


def _late(shift: asyncpg.Record, now: datetime) -> Alert:
    tenant, who, start = shift["tenant"], shift["employee"], shift["starts_at"]
    return Alert(
        tenant=tenant,
        id=uuid.uuid5(SCAN_NAMESPACE, f"{tenant}/late/{who}/shift/{start.isoformat()}"),
        kind="late",
        severity=SEVERITY["late"],
        employee=who,
        site=shift["site"],
        at=start,
        message=MESSAGES["late"].format(employee=who, start=start.isoformat()),
        detail={"start": start.isoformat(), "end": shift["ends_at"].isoformat()},
        raised_at=now,
    )


def _alert(employee: Watched, finding: LiveFinding, now: datetime) -> Alert:
    tenant, who = employee.tenant, employee.employee
    return Alert(
        tenant=tenant,
        id=uuid.uuid5(SCAN_NAMESPACE, f"{tenant}/{finding.kind}/{who}/{finding.key}"),
        kind=finding.kind,
        severity=SEVERITY[finding.kind],
        employee=who,
        site=employee.site,
        at=finding.at,
        message=MESSAGES[finding.kind].format(employee=who, **finding.detail),
        detail=finding.detail,
        raised_at=now,
    )
