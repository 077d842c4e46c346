"""Retention (workers/retention.py) on real PostgreSQL: what goes, what stays, and the anchor."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from hub import audit, store
from hub.config import ConfigError, Settings
from hub.migrate import migrate
from workers.retention import RetentionCounts, RetentionJob, enforce_retention

pytestmark = pytest.mark.postgres

SETTINGS = Settings.from_env({})


@pytest.fixture
async def pool(scratch_db: str) -> AsyncIterator[asyncpg.Pool]:
    """The hub's system pool (as the owner, as retention runs) on a migrated database of its
    own, with tenants `a` and `b`."""
    pool = await store.create_system_pool(scratch_db)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            for slug in ("a", "b"):
                await store.ensure_tenant(conn, slug, slug, "UTC")
        yield pool
    finally:
        await pool.close()


async def insert_punches(pool: asyncpg.Pool, tenant: str, *times: datetime) -> None:
    async with pool.acquire() as conn:
        await conn.executemany(
            """INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, source)
               VALUES ($1, $2, 'e1', 'in', $3, $3, 'hq', 'terminal')""",
            [(tenant, uuid.uuid4(), at) for at in times],
        )


async def punch_times(pool: asyncpg.Pool, tenant: str) -> list[datetime]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT at FROM punches WHERE tenant = $1 ORDER BY at", tenant)
    return [r["at"] for r in rows]


async def append(pool: asyncpg.Pool, tenant: str, count: int) -> None:
    async with pool.acquire() as conn:
        for n in range(count):
            await store.record_audit(
                conn,
                tenant=tenant,
                actor="ops",
                role="admin",
                action="employee.put",
                target=f"employee:e{n}",
                ip=None,
                user_agent=None,
                before=None,
                after={"id": f"e{n}", "name": f"Name {n}"},
            )


async def database_now(pool: asyncpg.Pool) -> datetime:
    """The server's clock, which stamps audit rows: rows appended before this are older."""
    moment: datetime = await pool.fetchval("SELECT clock_timestamp()")
    return moment


async def verify(pool: asyncpg.Pool, tenant: str) -> audit.ChainReport:
    async with pool.acquire() as conn:
        return await store.verify_audit(conn, tenant)


async def audit_seqs(pool: asyncpg.Pool, tenant: str) -> list[int]:
    rows = await pool.fetch("SELECT seq FROM audit_log WHERE tenant = $1 ORDER BY seq", tenant)
    return [r["seq"] for r in rows]


async def test_punches_older_than_the_limit_go_and_newer_ones_stay(pool: asyncpg.Pool) -> None:
    now = datetime.fromisoformat("2033-06-01T12:00:00+00:00")
    cutoff = now - timedelta(days=2557)
    old = [cutoff - timedelta(days=d) for d in (400, 30, 1)] + [cutoff - timedelta(microseconds=1)]
    kept = [cutoff, cutoff + timedelta(seconds=1), now - timedelta(days=1)]
    await insert_punches(pool, "a", *old, *kept)
    await insert_punches(pool, "b", *old[:2], *kept[:1])

    # Batches of 3 make tenant a's four old punches take two statements.
    counts = await enforce_retention(pool, now, SETTINGS, batch_rows=3)
    assert counts == RetentionCounts(punches=6, audit_rows=0)
    assert await punch_times(pool, "a") == kept
    assert await punch_times(pool, "b") == kept[:1]
    assert await enforce_retention(pool, now, SETTINGS, batch_rows=3) == RetentionCounts()


async def test_old_audit_rows_go_and_the_chain_verifies_from_the_anchor(
    pool: asyncpg.Pool,
) -> None:
    await append(pool, "a", 7)
    await append(pool, "b", 2)
    between = await database_now(pool)
    await append(pool, "a", 3)
    await append(pool, "b", 1)
    rows = await pool.fetch("SELECT seq, hash FROM audit_log WHERE tenant = 'a'")
    oldest = {r["seq"]: r["hash"] for r in rows}

    # As of three years after `between`, exactly the rows appended before it are expired.
    now = between + timedelta(days=1096)
    counts = await enforce_retention(pool, now, SETTINGS, batch_rows=3)
    assert counts == RetentionCounts(punches=0, audit_rows=9)
    assert await audit_seqs(pool, "a") == [8, 9, 10]
    assert await audit_seqs(pool, "b") == [3]
    head = await pool.fetchrow("SELECT * FROM audit_heads WHERE tenant = 'a'")
    assert (head["anchor_seq"], head["anchor_hash"]) == (7, oldest[7])
    for tenant, entries in (("a", 3), ("b", 1)):
        report = await verify(pool, tenant)
        assert report.ok and report.entries == entries, report

    assert await enforce_retention(pool, now, SETTINGS, batch_rows=3) == RetentionCounts()
    await append(pool, "a", 1)
    report = await verify(pool, "a")
    assert report.ok and (report.entries, report.head_seq) == (4, 11), report


async def test_when_every_audit_row_expired_the_anchor_is_the_head(pool: asyncpg.Pool) -> None:
    await append(pool, "a", 4)
    now = await database_now(pool) + timedelta(days=1096)
    assert await enforce_retention(pool, now, SETTINGS) == RetentionCounts(audit_rows=4)
    report = await verify(pool, "a")
    assert report.ok and (report.entries, report.head_seq) == (0, 4), report
    await append(pool, "a", 1)
    assert await audit_seqs(pool, "a") == [5]
    assert (await verify(pool, "a")).ok


async def test_retention_deletes_only_an_unbroken_run_of_the_oldest_rows(
    pool: asyncpg.Pool,
) -> None:
    await append(pool, "a", 2)
    between = await database_now(pool)
    await append(pool, "a", 2)
    # Row 4 claims to be old; behind the newer row 3 it can only be a forgery or a clock jump.
    await pool.execute(
        "UPDATE audit_log SET at = at - interval '10 years' WHERE tenant = 'a' AND seq = 4"
    )
    counts = await enforce_retention(pool, between + timedelta(days=1096), SETTINGS)
    assert counts.audit_rows == 2
    assert await audit_seqs(pool, "a") == [3, 4]
    report = await verify(pool, "a")
    assert (report.seq, report.problem) == (4, "edited")


async def test_zero_days_keeps_everything(pool: asyncpg.Pool) -> None:
    await insert_punches(pool, "a", datetime.fromisoformat("2001-01-01T00:00:00+00:00"))
    await append(pool, "a", 2)
    keep = Settings.from_env(
        {"ATTENDANCE_RETENTION_PUNCHES_DAYS": "0", "ATTENDANCE_RETENTION_AUDIT_DAYS": "0"}
    )
    far = await database_now(pool) + timedelta(days=100_000)
    assert await enforce_retention(pool, far, keep) == RetentionCounts()
    assert len(await punch_times(pool, "a")) == 1 and await audit_seqs(pool, "a") == [1, 2]


# -- the background job --------------------------------------------------------------------


class Timer:
    """Stands in for asyncio.sleep: records each wait and holds the job at the given one."""

    def __init__(self, hold_at: int) -> None:
        self.waits: list[float] = []
        self.hold_at = hold_at
        self.held = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) == self.hold_at:
            self.held.set()
            await asyncio.Event().wait()


async def test_the_job_runs_after_a_delay_then_every_interval_until_stopped(
    pool: asyncpg.Pool,
) -> None:
    await insert_punches(pool, "a", datetime.fromisoformat("2001-01-01T00:00:00+00:00"))
    timer = Timer(hold_at=3)
    job = RetentionJob(pool, SETTINGS, first_delay_s=5, interval_s=3600, sleep=timer.sleep)
    job.start()
    await asyncio.wait_for(timer.held.wait(), 30)
    assert timer.waits == [5, 3600, 3600]
    assert await punch_times(pool, "a") == []
    await asyncio.wait_for(job.stop(), 10)
    await job.stop()


async def test_the_job_survives_a_failed_run(
    scratch_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A database without the schema: every run fails.
    pool = await store.create_system_pool(scratch_db)
    try:
        timer = Timer(hold_at=3)
        job = RetentionJob(pool, SETTINGS, first_delay_s=0, interval_s=60, sleep=timer.sleep)
        with caplog.at_level(logging.ERROR, logger="workers.retention"):
            job.start()
            await asyncio.wait_for(timer.held.wait(), 30)
            await job.stop()
        failures = [r for r in caplog.records if "retention failed" in r.getMessage()]
        assert len(failures) == 2
    finally:
        await pool.close()


# -- settings ------------------------------------------------------------------------------


def test_retention_settings_default_to_seven_and_three_years() -> None:
    assert (SETTINGS.retention_punches_days, SETTINGS.retention_audit_days) == (2557, 1096)
    custom = Settings.from_env(
        {"ATTENDANCE_RETENTION_PUNCHES_DAYS": "30", "ATTENDANCE_RETENTION_AUDIT_DAYS": ""}
    )
    assert (custom.retention_punches_days, custom.retention_audit_days) == (30, 1096)


@pytest.mark.parametrize("value", ["-1", "seven", "1.5", "36526"])
@pytest.mark.parametrize(
    "name", ["ATTENDANCE_RETENTION_PUNCHES_DAYS", "ATTENDANCE_RETENTION_AUDIT_DAYS"]
)
def test_retention_settings_are_validated(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


async def test_alerts_go_with_the_punches_they_are_about(pool: asyncpg.Pool) -> None:
    now = datetime.fromisoformat("2033-06-01T12:00:00+00:00")
    cutoff = now - timedelta(days=2557)
    for at in (cutoff - timedelta(days=3), cutoff - timedelta(seconds=1), cutoff, now):
        await pool.execute(
            """INSERT INTO alerts (tenant, id, kind, severity, employee, site, at, message)
               VALUES ('a', $1, 'rapid_repeat', 'info', 'e1', 'hq', $2, 'again')""",
            uuid.uuid4(),
            at,
        )
    counts = await enforce_retention(pool, now, SETTINGS, batch_rows=1)
    assert counts == RetentionCounts(alerts=2)
    left = await pool.fetch("SELECT at FROM alerts WHERE tenant = 'a' ORDER BY at")
    assert [r["at"] for r in left] == [cutoff, now]
