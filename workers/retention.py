"""Retention: delete punches and audit rows older than the configured limits.

Deletes run tenant by tenant in statements of at most ``BATCH_ROWS`` rows, each its own
transaction, so none holds its locks for long and punches keep committing meanwhile.
Every hub process runs the job; two runs at once delete each row once and move the
audit anchor forward only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg

from hub import metrics
from hub.config import Settings
from hub.types import Conn

log = logging.getLogger(__name__)

BATCH_ROWS: Final = 10_000
FIRST_RUN_DELAY_S: Final = 60.0
INTERVAL_S: Final = 3600.0

_DELETE_PUNCHES: Final = """
DELETE FROM punches
 WHERE tenant = $1
   AND id IN (SELECT id FROM punches WHERE tenant = $1 AND at < $2 ORDER BY at LIMIT $3)"""

# Alerts go with the punches they are about: by the same limit, on their `at`.
_DELETE_ALERTS: Final = """
DELETE FROM alerts
 WHERE tenant = $1
   AND id IN (SELECT id FROM alerts WHERE tenant = $1 AND at < $2 ORDER BY at LIMIT $3)"""

# Only an unbroken run of the oldest rows goes, so that what is left is still one chain
# from the anchor; the anchor becomes the last row deleted, in the same transaction. The
# `>` keeps a run that lost a race with another from moving the anchor back.
_DELETE_AUDIT: Final = """
WITH oldest AS (
    SELECT seq, at < $2 AS expired FROM audit_log WHERE tenant = $1 ORDER BY seq LIMIT $3
), expired AS (
    SELECT seq FROM oldest
     WHERE seq < coalesce((SELECT min(seq) FROM oldest WHERE NOT expired), 9223372036854775807)
), deleted AS (
    DELETE FROM audit_log AS a USING expired AS e
     WHERE a.tenant = $1 AND a.seq = e.seq
    RETURNING a.seq, a.hash
), anchored AS (
    UPDATE audit_heads AS h SET anchor_seq = last.seq, anchor_hash = last.hash
      FROM (SELECT seq, hash FROM deleted ORDER BY seq DESC LIMIT 1) AS last
     WHERE h.tenant = $1 AND last.seq > h.anchor_seq
)
SELECT count(*) FROM deleted"""


@dataclass(frozen=True, slots=True)
class RetentionCounts:
    punches: int = 0
    audit_rows: int = 0
    alerts: int = 0


async def enforce_retention(
    pool: asyncpg.Pool, now: datetime, settings: Settings, *, batch_rows: int = BATCH_ROWS
) -> RetentionCounts:
    """Delete what is older than the limits as of ``now``; return how many rows went."""
    punches = audit_rows = alerts = 0
    async with pool.acquire() as conn:
        tenants = [r["id"] for r in await conn.fetch("SELECT id FROM tenants ORDER BY id")]
        for tenant in tenants:
            if settings.retention_punches_days:
                cutoff = now - timedelta(days=settings.retention_punches_days)
                punches += await _delete_rows(conn, _DELETE_PUNCHES, tenant, cutoff, batch_rows)
                alerts += await _delete_rows(conn, _DELETE_ALERTS, tenant, cutoff, batch_rows)
            if settings.retention_audit_days:
                cutoff = now - timedelta(days=settings.retention_audit_days)
                audit_rows += await _delete_audit(conn, tenant, cutoff, batch_rows)
    metrics.RETENTION_DELETED.labels("punches").inc(punches)
    metrics.RETENTION_DELETED.labels("audit_log").inc(audit_rows)
    metrics.RETENTION_DELETED.labels("alerts").inc(alerts)
    return RetentionCounts(punches=punches, audit_rows=audit_rows, alerts=alerts)


async def _delete_rows(conn: Conn, sql: str, tenant: str, cutoff: datetime, batch_rows: int) -> int:
    total = 0
    while True:
        status = await conn.execute(sql, tenant, cutoff, batch_rows)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch_rows:
            return total


async def _delete_audit(conn: Conn, tenant: str, cutoff: datetime, batch_rows: int) -> int:
    total = 0
    while True:
        deleted = int(await conn.fetchval(_DELETE_AUDIT, tenant, cutoff, batch_rows))
        total += deleted
        if deleted < batch_rows:
            return total


Sleep = Callable[[float], Awaitable[None]]


class RetentionJob:
    """Runs ``enforce_retention`` shortly after ``start`` and then every interval."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        first_delay_s: float = FIRST_RUN_DELAY_S,
        interval_s: float = INTERVAL_S,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._first_delay_s = first_delay_s
        self._interval_s = interval_s
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        """Cancel the job; a batch in flight is rolled back and deleted by the next run."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await self._sleep(self._first_delay_s)
        while True:
            try:
                counts = await enforce_retention(self._pool, datetime.now(UTC), self._settings)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("retention failed; trying again in %.0f s", self._interval_s)
            else:
                if counts.punches or counts.audit_rows:
                    log.info(
                        "retention deleted %d punches and %d audit rows",
                        counts.punches,
                        counts.audit_rows,
                    )
            await self._sleep(self._interval_s)
