"""The fraud checks on committed punches: history from PostgreSQL, the pure checks of
``workers/fraud.py``, and the alerts they raise stored once.

Run by whatever committed the batch (the in-process batcher's hub, or a stream worker),
after the punches are acked: checking never delays an ack. An alert's id is derived from
its kind and its punch, so a batch checked twice (a worker died before acknowledging its
stream entries, and another took them over) stores and announces nothing twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple
from zoneinfo import ZoneInfo

import asyncpg
import numpy as np

from hub import metrics, store
from hub.config import Settings
from hub.events import Alert
from hub.types import Conn
from workers.fraud import Finding, Row, Thresholds, arrays, check, usual_times
from workers.persist import PunchOutcome, PunchRequest

log = logging.getLogger(__name__)

# Alert ids: uuid5 of tenant, kind and punch in this namespace.
ALERT_NAMESPACE: Final = uuid.UUID("5d4c3b2a-1f0e-4d6c-9b8a-7f6e5d4c3b2a")

SEVERITY: Final = {
    "buddy_punch": "warning",
    "geofence": "warning",
    "impossible_travel": "critical",
    "clock_skew": "warning",
    "rapid_repeat": "info",
    "unusual_time": "info",
}

# The punches of the batch's employees that the pair checks compare with: those around the
# batch's (at most $5 each, the latest first).
HISTORY_SQL: Final = """
SELECT p.id, p.employee, p.kind, p.at, p.received_at, p.site, p.device, p.lat, p.lon,
       p.accuracy_m, p.offline, p.source
  FROM unnest($2::text[]) AS e(id)
  CROSS JOIN LATERAL (
        SELECT * FROM punches q
         WHERE q.tenant = $1 AND q.employee = e.id AND q.at >= $3 AND q.at <= $4
         ORDER BY q.at DESC
         LIMIT $5
  ) p
"""

# Punches on the batch's devices around each of its punches (a colleague's turn), the $5
# nearest of each. The limit also keeps the subquery a lookup per punch in `punches_by_device`:
# without it the planner may flatten it into a join, and on a table that grew faster than
# its statistics (a new tenant's first hour) it hashed every punch of the tenant instead,
# 200 ms a batch at 70,000 punches.
NEIGHBOURS_SQL: Final = """
SELECT p.id, p.employee, p.kind, p.at, p.received_at, p.site, p.device, p.lat, p.lon,
       p.accuracy_m, p.offline, p.source
  FROM unnest($2::text[], $3::timestamptz[]) AS n(device, at)
  CROSS JOIN LATERAL (
        SELECT * FROM punches q
         WHERE q.tenant = $1 AND q.device = n.device
           AND q.at BETWEEN n.at - $4::interval AND n.at + $4::interval
         ORDER BY abs(extract(epoch FROM q.at - n.at))
         LIMIT $5
  ) p
"""

# Weeks of the employees' punches, for their usual times of day.
USUAL_SQL: Final = """
SELECT p.id, p.employee, p.kind, p.at, s.timezone
  FROM unnest($2::text[]) AS e(id)
  CROSS JOIN LATERAL (
        SELECT q.id, q.employee, q.kind, q.at, q.site FROM punches q
         WHERE q.tenant = $1 AND q.employee = e.id AND q.at >= $3
         ORDER BY q.at DESC
         LIMIT $4
  ) p
  LEFT JOIN sites s ON s.tenant = $1 AND s.id = p.site
"""

# Planned shifts around the batch: a punch within one is never at an unusual time.
SCHEDULES_SQL: Final = """
SELECT employee, starts_at, ends_at FROM schedules
 WHERE tenant = $1 AND employee = ANY($2::text[]) AND ends_at >= $3 AND starts_at <= $4
"""

# How far around its punches a batch's pair history reaches, and at most how many
# punches of each employee it holds.
PAIR_WINDOW: Final = timedelta(days=1)
PAIR_MAX: Final = 16
# At most how many punches on a device around each of the batch's it looks at: a reader
# takes one every second or two.
NEIGHBOURS_MAX: Final = 16
# A clock-in this close to a planned shift's start (or a clock-out to its end) is planned.
SHIFT_MARGIN: Final = timedelta(hours=1)
# How long an employee's usual times of day are kept before they are worked out again: long
# once there is history enough to judge, short while it is still building up.
USUAL_TTL_S: Final = 12 * 3600.0
USUAL_YOUNG_TTL_S: Final = 3600.0

SITES_SQL: Final = """
SELECT id, timezone, lat, lon, radius_m, policy FROM sites WHERE tenant = $1 AND id = ANY($2)
"""

INSERT_SQL: Final = """
INSERT INTO alerts (tenant, id, kind, severity, employee, site, at, message, detail, punch,
                    raised_at)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::text[], $9::jsonb[], $10::uuid[], $11::timestamptz[])
ON CONFLICT (tenant, id) DO NOTHING
RETURNING id
"""


async def store_alerts(
    conn: Conn, alerts: list[Alert], punches: Sequence[uuid.UUID | None]
) -> list[Alert]:
    """Store the alerts (each about the punch beside it, if any); those not stored before."""
    inserted = await conn.fetch(
        INSERT_SQL,
        [a.tenant for a in alerts],
        [a.id for a in alerts],
        [a.kind for a in alerts],
        [a.severity for a in alerts],
        [a.employee for a in alerts],
        [a.site for a in alerts],
        [a.at for a in alerts],
        [a.message for a in alerts],
        [a.detail for a in alerts],
        list(punches),
        [a.raised_at for a in alerts],
    )
    kept = {record["id"] for record in inserted}
    stored = [a for a in alerts if a.id in kept]
    # Counted where stored, which happens once per alert however many processes see it.
    for alert in stored:
        metrics.alert_raised(alert.kind)
    return stored


class Checker:
    """Checks committed batches; ``history_days`` and ``history_max`` bound what each
    punch is compared with."""

    @classmethod
    def from_settings(cls, pool: asyncpg.Pool, settings: Settings) -> Checker:
        return cls(
            pool,
            settings.fraud,
            history_days=settings.check_history_days,
            history_max=settings.check_history_max,
        )

    def __init__(
        self,
        pool: asyncpg.Pool,
        thresholds: Thresholds,
        *,
        history_days: float = 56.0,
        history_max: int = 240,
    ) -> None:
        self._pool = pool
        self.thresholds = thresholds
        self._history = timedelta(days=history_days)
        self._history_max = history_max
        # (tenant, employee) -> (when worked out, {kind: (usual minute, spread, count)}).
        self._usual: dict[tuple[str, str], tuple[float, dict[str, tuple[float, float, int]]]]
        self._usual = {}

    async def check(self, stored: Sequence[tuple[PunchRequest, PunchOutcome]]) -> list[Alert]:
        """The alerts newly raised by these committed punches.

        Duplicates are checked again: one may be the redelivery of a batch whose checks
        never ran (its worker died after answering). What they raise was stored already
        if the checks did run, and is not raised again.
        """
        fresh: dict[str, list[tuple[PunchRequest, PunchOutcome]]] = {}
        seen: set[tuple[str, uuid.UUID]] = set()
        for request, outcome in stored:
            # One copy of each punch (a client may resend one through two hubs at once).
            key = (request.tenant, request.id)
            if outcome.status in ("accepted", "duplicate") and key not in seen:
                seen.add(key)
                fresh.setdefault(request.tenant, []).append((request, outcome))
        raised: list[Alert] = []
        for tenant, batch in fresh.items():
            async with store.tenant_transaction(self._pool, tenant) as conn:
                raised += await self._check_tenant(conn, tenant, batch)
        return raised

    async def _check_tenant(
        self, conn: Conn, tenant: str, batch: list[tuple[PunchRequest, PunchOutcome]]
    ) -> list[Alert]:
        ats = [request.at for request, _ in batch]
        first, last = min(ats), max(ats)
        employees = sorted({outcome.employee for _, outcome in batch if outcome.employee})
        history = await conn.fetch(
            HISTORY_SQL, tenant, employees, first - PAIR_WINDOW, last + PAIR_WINDOW, PAIR_MAX
        )
        devices = [
            (r.device, r.at) for r, _ in batch if r.device is not None and r.source != "manual"
        ]
        neighbours = await conn.fetch(
            NEIGHBOURS_SQL,
            tenant,
            [device for device, _ in devices],
            [at for _, at in devices],
            timedelta(seconds=self.thresholds.buddy_gap_s),
            NEIGHBOURS_MAX,
        )
        new_ids = {request.id for request, _ in batch}
        past: dict[uuid.UUID, asyncpg.Record] = {}
        for record in [*history, *neighbours]:
            if record["id"] not in new_ids:
                past[record["id"]] = record
        site_ids = sorted(
            {str(o.site) for _, o in batch} | {record["site"] for record in past.values()}
        )
        sites = {s["id"]: s for s in await conn.fetch(SITES_SQL, tenant, site_ids)}
        usual = await self._usual_times(conn, tenant, employees, new_ids)
        shifts: dict[str, list[tuple[datetime, datetime]]] = {}
        for shift in await conn.fetch(
            SCHEDULES_SQL, tenant, employees, first - SHIFT_MARGIN, last + SHIFT_MARGIN
        ):
            shifts.setdefault(shift["employee"], []).append((shift["starts_at"], shift["ends_at"]))
        rows = [_row_of(record, sites, new=False) for record in past.values()]
        rows += [_new_row(request, outcome, sites, usual, shifts) for request, outcome in batch]
        findings = check(arrays(rows), self.thresholds)
        if not findings:
            return []
        now = datetime.now(UTC)
        # What each row is about: history's from its record, the batch's from its request.
        subjects = [_subject_of(record) for record in past.values()]
        subjects += [_subject(request, outcome) for request, outcome in batch]
        made: dict[uuid.UUID, tuple[Alert, uuid.UUID]] = {}
        for f in findings:
            subject = subjects[f.index]
            # A pair's alert is the pair's, whichever of the two is checked.
            about = (
                sorted((subject.punch, subjects[f.other].punch))
                if f.other >= 0
                else [subject.punch]
            )
            alert = _alert(tenant, f, subject, about, now)
            made.setdefault(alert.id, (alert, subject.punch))
        alerts = [alert for alert, _ in made.values()]
        # A batch with duplicates may be a worker's batch delivered again: what it raised
        # before may never have been announced, so it is announced again (hubs skip what
        # they have shown).
        again = any(outcome.status == "duplicate" for _, outcome in batch)
        stored = await store_alerts(conn, alerts, [punch for _, punch in made.values()])
        return alerts if again else stored

    async def _usual_times(
        self, conn: Conn, tenant: str, employees: list[str], leave_out: set[uuid.UUID]
    ) -> dict[tuple[str, str], tuple[float, float, int]]:
        """(employee, kind) -> usual minute, spread and count, worked out anew for those
        not known (or known for over ``USUAL_TTL_S``) from weeks of their punches (those of
        ``leave_out`` left out)."""
        clock = time.monotonic()
        stale = [e for e in employees if self._expired(tenant, e, clock)]
        if stale:
            records = [
                r
                for r in await conn.fetch(
                    USUAL_SQL,
                    tenant,
                    stale,
                    datetime.now(UTC) - self._history,
                    self._history_max,
                )
                if r["id"] not in leave_out
            ]
            pairs = sorted({(r["employee"], r["kind"]) for r in records})
            code = {pair: n for n, pair in enumerate(pairs)}
            keys, centre, spread, count = usual_times(
                np.array([code[(r["employee"], r["kind"])] for r in records], dtype=np.int64),
                np.array(
                    [_local_minute(r["at"], r["timezone"] or "UTC") for r in records],
                    dtype=np.float64,
                ),
            )
            fresh: dict[str, dict[str, tuple[float, float, int]]] = {e: {} for e in stale}
            for key, minute, deviation, size in zip(keys, centre, spread, count, strict=True):
                employee, kind = pairs[int(key)]
                fresh[employee][kind] = (float(minute), float(deviation), int(size))
            for employee, kinds in fresh.items():
                self._usual[(tenant, employee)] = (clock, kinds)
        return {
            (employee, kind): stats
            for employee in employees
            for kind, stats in self._usual[(tenant, employee)][1].items()
        }

    def _expired(self, tenant: str, employee: str, clock: float) -> bool:
        held = self._usual.get((tenant, employee))
        if held is None:
            return True
        worked_out, kinds = held
        enough = kinds and all(
            count >= self.thresholds.unusual_min_history for _, _, count in kinds.values()
        )
        return clock - worked_out > (USUAL_TTL_S if enough else USUAL_YOUNG_TTL_S)


def _local_minute(at: datetime, timezone: str) -> float:
    local = at.astimezone(ZoneInfo(timezone))
    return local.hour * 60 + local.minute + local.second / 60


def _site_fields(site: asyncpg.Record | None) -> dict[str, Any]:
    if site is None:
        return {"geofence": "off"}
    policy = site["policy"] or {}
    return {
        "site_lat": site["lat"],
        "site_lon": site["lon"],
        "site_radius": site["radius_m"],
        "geofence": policy.get("geofence") or "flag",
    }


def _row_of(record: asyncpg.Record, sites: dict[str, asyncpg.Record], *, new: bool) -> Row:
    site = sites.get(record["site"])
    timezone = "UTC" if site is None else site["timezone"]
    return Row(
        employee=record["employee"],
        kind=record["kind"],
        at=record["at"].timestamp(),
        received=record["received_at"].timestamp(),
        site=record["site"],
        local_minute=_local_minute(record["at"], timezone),
        new=new,
        device=None if record["source"] == "manual" else record["device"],
        offline=record["offline"],
        manual=record["source"] == "manual",
        lat=record["lat"],
        lon=record["lon"],
        accuracy=record["accuracy_m"],
        **_site_fields(site),
    )


def _new_row(
    request: PunchRequest,
    outcome: PunchOutcome,
    sites: dict[str, Any],
    usual: dict[tuple[str, str], tuple[float, float, int]],
    shifts: dict[str, list[tuple[datetime, datetime]]],
) -> Row:
    assert outcome.employee is not None and outcome.site is not None
    minute, spread, count = usual.get((outcome.employee, request.kind), (None, None, 0))
    scheduled = any(
        _planned(request.kind, request.at, start, end)
        for start, end in shifts.get(outcome.employee, ())
    )
    site = sites.get(outcome.site)
    timezone = "UTC" if site is None else site["timezone"]
    manual = request.source == "manual"
    return Row(
        employee=outcome.employee,
        kind=request.kind,
        at=request.at.timestamp(),
        # The first receipt (a resent punch's own is later, and no sign of its clock).
        received=outcome.received_at.timestamp(),
        site=outcome.site,
        local_minute=_local_minute(request.at, timezone),
        new=True,
        device=None if manual else request.device,
        offline=request.offline,
        manual=manual,
        lat=request.lat,
        lon=request.lon,
        accuracy=request.accuracy_m,
        scheduled=scheduled,
        usual_minute=minute,
        usual_spread=spread,
        usual_count=count,
        **_site_fields(site),
    )


def _planned(kind: str, at: datetime, start: datetime, end: datetime) -> bool:
    """Whether a punch of ``kind`` at ``at`` is where a planned shift puts one: a clock-in
    near its start, a clock-out near its end, a break within it."""
    if kind == "in":
        return abs(at - start) <= SHIFT_MARGIN
    if kind == "out":
        return abs(at - end) <= SHIFT_MARGIN
    return start <= at <= end


MESSAGES: Final = {
    "buddy_punch": "{employee} was punched {gap_s} s after another punch ({reason})",
    "geofence": "{employee} punched {distance_m} m from the site's centre ({reason})",
    "impossible_travel": "{employee} would have travelled {distance_km} km at {speed_kmh} km/h",
    "clock_skew": "the device's clock is {offset_s} s off the server's",
    "rapid_repeat": "{employee} punched the same again after {gap_s} s",
    "unusual_time": "{employee} punched far from their usual time of day",
}


class _Subject(NamedTuple):
    """The punch an alert is about."""

    punch: uuid.UUID
    employee: str | None
    kind: str
    at: datetime
    site: str | None
    device: str | None


def _subject(request: PunchRequest, outcome: PunchOutcome) -> _Subject:
    return _Subject(
        request.id, outcome.employee, request.kind, request.at, outcome.site, request.device
    )


def _subject_of(record: asyncpg.Record) -> _Subject:
    return _Subject(
        record["id"],
        record["employee"],
        record["kind"],
        record["at"],
        record["site"],
        record["device"],
    )


def _alert(
    tenant: str, finding: Finding, subject: _Subject, about: list[uuid.UUID], now: datetime
) -> Alert:
    detail: dict[str, Any] = {**finding.detail, "punch": str(subject.punch), "kind": subject.kind}
    if subject.device is not None:
        detail["device"] = subject.device
    message = MESSAGES[finding.kind].format(employee=subject.employee, **finding.detail)
    return Alert(
        tenant=tenant,
        id=uuid.uuid5(ALERT_NAMESPACE, "/".join([tenant, finding.kind, *map(str, about)])),
        kind=finding.kind,
        severity=SEVERITY[finding.kind],
        employee=subject.employee,
        site=subject.site,
        at=subject.at,
        message=message,
        detail=detail,
        raised_at=now,
    )
