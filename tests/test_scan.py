"""The overtime scan against a real PostgreSQL (workers/scan.py): after its first look it
reads only what was committed or changed since, and judges only who punched, whose record
or site changed, and whose quiet time is over."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from hub import store
from hub.events import Alert
from tests.test_alerts import afternoon_zone
from workers import scan as scan_module
from workers.scan import OvertimeScan

pytestmark = pytest.mark.postgres


@pytest.fixture
async def system(database: str, owner: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    pool = await store.create_system_pool(database)
    yield pool
    await pool.close()


@pytest.fixture
def judged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many employees each scan judged (calls of ``live_findings``)."""
    calls: list[int] = []
    real = scan_module.live_findings

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_module, "live_findings", counting)
    return calls


async def punch(
    conn: asyncpg.Connection, tenant: str, employee: str, kind: str, at: datetime
) -> None:
    await conn.execute(
        """INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, source)
           VALUES ($1, $2, $3, $4, $5, now(), 'hq', 'terminal')""",
        tenant,
        uuid.uuid4(),
        employee,
        kind,
        at,
    )


async def set_policy(conn: asyncpg.Connection, tenant: str, policy: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE sites SET timezone = $2, policy = $3, updated_at = now() "
        "WHERE tenant = $1 AND id = 'hq'",
        tenant,
        afternoon_zone(),
        policy,
    )


async def add_employee(conn: asyncpg.Connection, tenant: str, employee: str) -> None:
    await store.upsert_employee(
        conn, tenant, employee, {"name": employee, "site": "hq", "badge": None}
    )


class Scanner:
    """One scan object, asked at chosen times; what each look raised for the tenant."""

    def __init__(self, pool: asyncpg.Pool, tenant: str, judged: list[int]) -> None:
        self.scan = OvertimeScan(pool)
        self.tenant = tenant
        self.judged = judged

    async def at(self, now: datetime) -> tuple[list[tuple[str, str | None]], int]:
        heard: list[Alert] = []

        async def hear(alerts: list[Alert]) -> None:
            heard.extend(alerts)

        self.judged.clear()
        await self.scan.scan(hear, now)
        mine = sorted((a.kind, a.employee) for a in heard if a.tenant == self.tenant)
        return mine, len(self.judged)


async def test_the_scan_reads_what_came_since_and_judges_only_who_needs_it(
    system: asyncpg.Pool, owner: asyncpg.Connection, bare_tenant: str, judged: list[int]
) -> None:
    await set_policy(owner, bare_tenant, {"overtime": "california"})
    start = datetime.now(UTC)
    # Six and a half hours at work and no break: the meal break is missed; overtime comes
    # with the first minute past eight hours, an hour and a half from now.
    await punch(owner, bare_tenant, "e1", "in", start - timedelta(hours=6.5))
    scanner = Scanner(system, bare_tenant, judged)
    assert (await scanner.at(start))[0] == [("meal_break", "e1")]
    # Someone new punches after that look: the next one reads it and judges only them.
    await add_employee(owner, bare_tenant, "e2")
    await punch(owner, bare_tenant, "e2", "in", start - timedelta(hours=17))
    assert await scanner.at(start + timedelta(minutes=5)) == (
        [("meal_break", "e2"), ("missing_clock_out", "e2")],
        1,
    )
    # Nothing new and nobody's quiet time over: nobody is judged.
    assert await scanner.at(start + timedelta(minutes=10)) == ([], 0)
    raised, _ = await scanner.at(start + timedelta(minutes=40))
    assert raised == [("overtime_approaching", "e1")]
    assert (await scanner.at(start + timedelta(minutes=95)))[0] == [("overtime", "e1")]
    assert await scanner.at(start + timedelta(minutes=96)) == ([], 0)


async def test_a_changed_policy_reaches_employees_the_scan_already_follows(
    system: asyncpg.Pool, owner: asyncpg.Connection, bare_tenant: str, judged: list[int]
) -> None:
    await set_policy(owner, bare_tenant, {})
    start = datetime.now(UTC)
    await punch(owner, bare_tenant, "e1", "in", start - timedelta(hours=6))
    scanner = Scanner(system, bare_tenant, judged)
    assert (await scanner.at(start))[0] == []
    assert await scanner.at(start + timedelta(minutes=1)) == ([], 0)
    await set_policy(owner, bare_tenant, {"overtime": "california"})
    assert (await scanner.at(start + timedelta(minutes=2)))[0] == [("meal_break", "e1")]


async def test_an_erased_employee_is_no_longer_judged(
    system: asyncpg.Pool, owner: asyncpg.Connection, bare_tenant: str, judged: list[int]
) -> None:
    await set_policy(owner, bare_tenant, {})
    start = datetime.now(UTC)
    # Clocked in for 15 hours 50 minutes: a missing clock-out in ten minutes.
    await punch(owner, bare_tenant, "e1", "in", start - timedelta(hours=15, minutes=50))
    await add_employee(owner, bare_tenant, "e2")
    await punch(owner, bare_tenant, "e2", "in", start - timedelta(hours=15, minutes=50))
    scanner = Scanner(system, bare_tenant, judged)
    assert (await scanner.at(start))[0] == []
    await owner.execute(
        "UPDATE employees SET erased_at = now(), updated_at = now() "
        "WHERE tenant = $1 AND id = 'e1'",
        bare_tenant,
    )
    later = start + timedelta(minutes=15)
    assert (await scanner.at(later))[0] == [("missing_clock_out", "e2")]


async def test_a_punch_committed_after_a_later_one_is_still_read(
    system: asyncpg.Pool,
    owner: asyncpg.Connection,
    database: str,
    bare_tenant: str,
    judged: list[int],
) -> None:
    """A punch's ``committed_at`` is when its transaction began: one that commits after a
    punch that began later is read by the next look all the same."""
    await set_policy(owner, bare_tenant, {})
    start = datetime.now(UTC)
    for employee in ("e2", "e3"):
        await add_employee(owner, bare_tenant, employee)
    scanner = Scanner(system, bare_tenant, judged)
    assert (await scanner.at(start))[0] == []
    slow = await asyncpg.connect(database)
    try:
        async with slow.transaction():
            await slow.execute("SELECT now()")
            await punch(owner, bare_tenant, "e2", "in", start - timedelta(hours=17))
            # The scan sees e2's punch, committed later than this transaction began.
            assert (await scanner.at(start + timedelta(minutes=1)))[0] == [
                ("missing_clock_out", "e2")
            ]
            await punch(slow, bare_tenant, "e3", "in", start - timedelta(hours=17))
        assert (await scanner.at(start + timedelta(minutes=2)))[0] == [("missing_clock_out", "e3")]
    finally:
        await slow.close()


async def test_the_eu_average_week_is_read_from_the_database(
    system: asyncpg.Pool, owner: asyncpg.Connection, bare_tenant: str, judged: list[int]
) -> None:
    await set_policy(owner, bare_tenant, {"eu_wtd": True})
    start = datetime.now(UTC)
    # Six ten-hour days a week for twenty weeks: 60 hours, over the 48 allowed on average.
    for days in range(1, 140):
        day = (start - timedelta(days=days)).replace(hour=6, minute=0)
        if day.weekday() < 6:
            await punch(owner, bare_tenant, "e1", "in", day)
            await punch(owner, bare_tenant, "e1", "out", day + timedelta(hours=10))
    scanner = Scanner(system, bare_tenant, judged)
    raised, _ = await scanner.at(start)
    assert ("overtime", "e1") in raised
    alerts = await owner.fetch(
        "SELECT detail->>'rule' AS rule FROM alerts WHERE tenant = $1 AND kind = 'overtime'",
        bare_tenant,
    )
    assert [a["rule"] for a in alerts] == ["eu_wtd_48h"]
