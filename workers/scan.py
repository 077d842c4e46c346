"""The periodic scan for the alerts that time raises: overtime, overtime approaching, a
forgotten clock-out, missed breaks and short rests (the rules: ``workers/overtime.py``), and
lateness for a planned shift (the floors' rule, in SQL).

Every ``interval_s`` it looks at every employee who punched in the last day, across
tenants (as the database's owner, like retention), with the punches of their last eight
days and their home site's rules, and stores the alerts not raised before: an alert's id
is derived from its kind, employee and occasion (the day or the shift).

With one process, the hub runs it; with Redis, every worker does, and a lock in Redis lets
one of them scan per interval.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg

from hub.events import Alert
from hub.types import Conn
from workers.checks import store_alerts
from workers.overtime import EU_REFERENCE_WEEKS, LiveFinding, average_week, live_findings
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

ACTIVE_SQL: Final = """
SELECT e.tenant, e.id AS employee, e.site, s.timezone, s.policy
  FROM employees e
  JOIN sites s ON s.tenant = e.tenant AND s.id = e.site
 WHERE e.erased_at IS NULL
   AND EXISTS (SELECT 1 FROM punches p
                WHERE p.tenant = e.tenant AND p.employee = e.id AND p.at >= $1)
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
SELECT p.tenant, p.employee, p.kind, p.at
  FROM unnest($1::text[], $2::text[]) AS w(tenant, employee)
  JOIN punches p ON p.tenant = w.tenant AND p.employee = w.employee
 WHERE p.at >= $3
 ORDER BY p.tenant, p.employee, p.at, p.id
"""


class OvertimeScan:
    """Finds and stores the alerts time raises; ``pool`` acts as the database's owner."""

    def __init__(self, pool: asyncpg.Pool, interval_s: float = 60.0) -> None:
        self._pool = pool
        self.interval_s = interval_s
        # When the 17-week averages were last looked at (they change slowly).
        self._averaged: datetime | None = None

    async def scan(self, announce: Announce, now: datetime | None = None) -> list[Alert]:
        """Find the alerts due now that were not raised before: ``announce`` them, then
        store them; returns them.

        Announced first: if announcing fails nothing is stored, and the next scan finds
        them again; if storing fails after, the next scan announces them again, and hubs
        skip what they still show.
        """
        now = now or datetime.now(UTC)
        async with self._pool.acquire() as conn:
            alerts = [_late(shift, now) for shift in await conn.fetch(LATE_SQL, now)]
            active = await conn.fetch(ACTIVE_SQL, now - ACTIVE)
            punches = await _punches_of(conn, active, now - HISTORY)
            for employee in active:
                policy = employee["policy"] or {}
                rules = Rules.from_policy(employee["timezone"], policy)
                key = (employee["tenant"], employee["employee"])
                for finding in live_findings(
                    punches.get(key, []), rules, now, eu_wtd=bool(policy.get("eu_wtd"))
                ):
                    alerts.append(_alert(employee, finding, now))
            if self._averaged is None or now - self._averaged >= AVERAGE_EVERY:
                self._averaged = now
                alerts += await self._averages(conn, active, now)
            if not alerts:
                return []
            known = await conn.fetch(KNOWN_SQL, [a.tenant for a in alerts], [a.id for a in alerts])
            raised = {(r["tenant"], r["id"]) for r in known}
            fresh = [a for a in alerts if (a.tenant, a.id) not in raised]
            if fresh:
                await announce(fresh)
                await store_alerts(conn, fresh, [None] * len(fresh))
            return fresh

    async def _averages(
        self, conn: Conn, active: list[asyncpg.Record], now: datetime
    ) -> list[Alert]:
        """The EU 48-hour average week, for the active employees of ``eu_wtd`` sites."""
        watched = [a for a in active if (a["policy"] or {}).get("eu_wtd")]
        if not watched:
            return []
        punches = await _punches_of(conn, watched, now - timedelta(weeks=EU_REFERENCE_WEEKS + 2))
        alerts = []
        for employee in watched:
            rules = Rules.from_policy(employee["timezone"], employee["policy"])
            key = (employee["tenant"], employee["employee"])
            finding = average_week(punches.get(key, []), rules, now)
            if finding is not None:
                alerts.append(_alert(employee, finding, now))
        return alerts


async def _punches_of(
    conn: Conn, employees: list[asyncpg.Record], since: datetime
) -> dict[tuple[str, str], list[Punch]]:
    """The employees' punches since ``since``, in time order, by (tenant, employee)."""
    rows = await conn.fetch(
        PUNCHES_SQL,
        [e["tenant"] for e in employees],
        [e["employee"] for e in employees],
        since,
    )
    punches: dict[tuple[str, str], list[Punch]] = {}
    for row in rows:
        punches.setdefault((row["tenant"], row["employee"]), []).append(
            Punch(row["at"], row["kind"])
        )
    return punches


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


def _alert(employee: asyncpg.Record, finding: LiveFinding, now: datetime) -> Alert:
    tenant, who = employee["tenant"], employee["employee"]
    return Alert(
        tenant=tenant,
        id=uuid.uuid5(SCAN_NAMESPACE, f"{tenant}/{finding.kind}/{who}/{finding.key}"),
        kind=finding.kind,
        severity=SEVERITY[finding.kind],
        employee=who,
        site=employee["site"],
        at=finding.at,
        message=MESSAGES[finding.kind].format(employee=who, **finding.detail),
        detail=finding.detail,
        raised_at=now,
    )
