"""The persistence worker: commits punches in batches, then answers each one.

Punches are collected until the batch is full or a few milliseconds have
passed, then resolved, inserted and committed in one transaction with one
multi-row ``INSERT ... ON CONFLICT``. Each punch is answered only
after the commit returned, which is what makes an ``accepted`` ack durable.
There is no per-punch round trip to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

import asyncpg

from hub import metrics
from hub.types import Conn

log = logging.getLogger(__name__)

Status = Literal["accepted", "duplicate", "rejected"]
Source = Literal["terminal", "mobile", "api", "adms", "manual"]


class StoreUnavailable(Exception):
    """The database could not commit the batch; nothing in it was stored or acked."""


@dataclass(slots=True)
class PunchRequest:
    tenant: str
    id: uuid.UUID
    kind: str
    at: datetime
    received_at: datetime
    source: Source
    employee: str | None = None
    badge: str | None = None
    # The terminal's site; None means the employee's home site.
    site: str | None = None
    device: str | None = None
    method: str | None = None
    seq: int | None = None
    lat: float | None = None
    lon: float | None = None
    accuracy_m: float | None = None
    offline: bool = False
    # Set for an employee's own token: the punch must resolve to this employee.
    only_employee: str | None = None
    reason: str | None = None
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class PunchOutcome:
    status: Status
    received_at: datetime
    reason: str | None = None
    employee: str | None = None
    site: str | None = None


Reply = Callable[[PunchOutcome | Exception], None]


@dataclass(slots=True)
class _Pending:
    request: PunchRequest
    reply: Reply
    employee: str | None = None
    site: str | None = None


_RESOLVE_SQL: Final = """
SELECT false AS by_badge, q.i, e.id, e.site
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(tenant, employee, i)
  JOIN employees e ON e.tenant = q.tenant AND e.id = q.employee AND e.erased_at IS NULL
UNION ALL
SELECT true, q.i, e.id, e.site
  FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS q(tenant, badge, i)
  JOIN employees e ON e.tenant = q.tenant AND e.badge = q.badge AND e.erased_at IS NULL
"""

_INSERT_SQL: Final = """
INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, device, method,
                     lat, lon, accuracy_m, offline, seq, source, reason, actor)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::float8[],
                     $11::float8[], $12::float8[], $13::bool[], $14::int8[], $15::text[],
                     $16::text[], $17::text[])
ON CONFLICT (tenant, id) DO NOTHING
RETURNING tenant, id
"""

_EXISTING_SQL: Final = """
SELECT p.tenant, p.id, p.employee, p.kind, p.at, p.received_at
  FROM unnest($1::text[], $2::uuid[]) AS q(tenant, id)
  JOIN punches p ON p.tenant = q.tenant AND p.id = q.id
"""

_CONNECTION_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)


class PunchBatcher:
    """Collects punches from every session and commits them in batches.

    ``submit`` returns once the punch's fate is committed. It raises
    ``StoreUnavailable`` when the database is unreachable; the caller must not
    ack, and the client resends later.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 512,
        wait_ms: int = 2,
        concurrency: int = 3,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._wait_s = wait_ms / 1000
        self._slots = asyncio.Semaphore(concurrency)
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._closing = False

    def start(self) -> None:
        self._collector = asyncio.create_task(self._collect(), name="punch-batcher")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._arrived.set()
        if self._collector is not None:
            await self._collector
        if self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)

    def enqueue(self, request: PunchRequest, reply: Reply) -> None:
        """Queue a punch; ``reply`` is called once, after its batch committed or failed."""
        if self._closing:
            reply(StoreUnavailable("the hub is shutting down"))
            return
        self._queue.append(_Pending(request, reply))
        self._arrived.set()
        if len(self._queue) >= self._max_batch:
            self._full.set()

    async def submit(self, request: PunchRequest) -> PunchOutcome:
        future: asyncio.Future[PunchOutcome] = asyncio.get_running_loop().create_future()

        def reply(outcome: PunchOutcome | Exception) -> None:
            if future.done():
                return
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.enqueue(request, reply)
        return await future

    async def flush(self) -> None:
        """Wait until every punch queued so far has been answered."""
        while self._queue or self._commits:
            if self._commits:
                await asyncio.gather(*self._commits, return_exceptions=True)
            else:
                await asyncio.sleep(self._wait_s)

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()
            while not self._queue:
                if self._closing:
                    self._slots.release()
                    return
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._queue) < self._max_batch and not self._closing:
                # Linger briefly so that punches arriving together share a commit.
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._wait_s)
            take = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(take)]
            task = asyncio.create_task(self._commit(batch))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            started = time.perf_counter()
            outcomes: list[PunchOutcome | Exception]
            try:
                outcomes = list(await self._commit_batch(batch))
            except _CONNECTION_ERRORS as exc:
                metrics.BATCH_FAILURES.labels("unavailable").inc()
                log.warning("punch batch of %d not committed: %s", len(batch), exc)
                for pending in batch:
                    pending.reply(StoreUnavailable(str(exc) or type(exc).__name__))
                return
            except asyncpg.PostgresError as exc:
                # One bad row must not sink its neighbours: retry each punch alone.
                metrics.BATCH_FAILURES.labels("split").inc()
                log.warning("punch batch of %d failed (%s); retrying one by one", len(batch), exc)
                outcomes = await self._commit_singly(batch)
            except Exception as exc:
                # A bug, not an outage: answer every punch so no client waits forever.
                metrics.BATCH_FAILURES.labels("internal").inc()
                log.exception("punch batch of %d failed", len(batch))
                for pending in batch:
                    pending.reply(exc)
                return
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.observe(len(batch))
            for pending, outcome in zip(batch, outcomes, strict=True):
                if not isinstance(outcome, Exception):
                    metrics.punches(outcome.reason or outcome.status).inc()
                pending.reply(outcome)
        finally:
            self._slots.release()

    async def _commit_singly(self, batch: list[_Pending]) -> list[PunchOutcome | Exception]:
        results: list[PunchOutcome | Exception] = []
        for pending in batch:
            try:
                results.extend(await self._commit_batch([pending]))
            except _CONNECTION_ERRORS as exc:
                results.append(StoreUnavailable(str(exc) or type(exc).__name__))
            except asyncpg.PostgresError as exc:
                log.error("punch %s cannot be stored: %s", pending.request.id, exc)
                results.append(
                    PunchOutcome("rejected", pending.request.received_at, reason="invalid")
                )
        return results

    async def _commit_batch(self, batch: list[_Pending]) -> list[PunchOutcome]:
        outcomes: list[PunchOutcome | None] = [None] * len(batch)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._resolve(conn, batch)
            first_of: dict[tuple[str, uuid.UUID], int] = {}
            to_insert: list[int] = []
            for i, pending in enumerate(batch):
                request = pending.request
                if pending.employee is None:
                    outcomes[i] = PunchOutcome(
                        "rejected", request.received_at, reason="unknown_employee"
                    )
                elif (
                    request.only_employee is not None and pending.employee != request.only_employee
                ):
                    outcomes[i] = PunchOutcome("rejected", request.received_at, reason="forbidden")
                elif (request.tenant, request.id) not in first_of:
                    first_of[(request.tenant, request.id)] = i
                    to_insert.append(i)
            inserted = await self._insert(conn, [batch[i] for i in to_insert])
            stored: dict[tuple[str, uuid.UUID], _Stored] = {
                key: _Stored.of(batch[first_of[key]]) for key in inserted
            }
            missing = [key for key in first_of if key not in inserted]
            if missing:
                rows = await conn.fetch(
                    _EXISTING_SQL, [k[0] for k in missing], [k[1] for k in missing]
                )
                for row in rows:
                    stored[(row["tenant"], row["id"])] = _Stored(
                        row["employee"], row["kind"], row["at"], row["received_at"], fresh=False
                    )
        for i, pending in enumerate(batch):
            if outcomes[i] is not None:
                continue
            request = pending.request
            key = (request.tenant, request.id)
            previous = stored[key]
            if previous.fresh and first_of[key] == i:
                status: Status = "accepted"
                reason = None
            elif previous.matches(pending):
                status, reason = "duplicate", None
            else:
                status, reason = "rejected", "id_conflict"
            # A duplicate reports when the stored punch was first received.
            received_at = request.received_at if status == "accepted" else previous.received_at
            outcomes[i] = PunchOutcome(
                status, received_at, reason, employee=pending.employee, site=pending.site
            )
        return [o for o in outcomes if o is not None]

    async def _resolve(self, conn: Conn, batch: list[_Pending]) -> None:
        by_id = [p for p in batch if p.request.employee is not None]
        by_badge = [p for p in batch if p.request.employee is None]
        rows = await conn.fetch(
            _RESOLVE_SQL,
            [p.request.tenant for p in by_id],
            [p.request.employee for p in by_id],
            [p.request.tenant for p in by_badge],
            [p.request.badge for p in by_badge],
        )
        found_id = {r["i"]: r for r in rows if not r["by_badge"]}
        found_badge = {r["i"]: r for r in rows if r["by_badge"]}
        for group, found in ((by_id, found_id), (by_badge, found_badge)):
            for i, pending in enumerate(group, start=1):
                row = found.get(i)
                if row is not None:
                    pending.employee = row["id"]
                    pending.site = pending.request.site or row["site"]

    async def _insert(self, conn: Conn, batch: Sequence[_Pending]) -> set[tuple[str, uuid.UUID]]:
        if not batch:
            return set()
        requests = [p.request for p in batch]
        rows = await conn.fetch(
            _INSERT_SQL,
            [r.tenant for r in requests],
            [r.id for r in requests],
            [p.employee for p in batch],
            [r.kind for r in requests],
            [r.at for r in requests],
            [r.received_at for r in requests],
            [p.site for p in batch],
            [r.device for r in requests],
            [r.method for r in requests],
            [r.lat for r in requests],
            [r.lon for r in requests],
            [r.accuracy_m for r in requests],
            [r.offline for r in requests],
            [r.seq for r in requests],
            [r.source for r in requests],
            [r.reason for r in requests],
            [r.actor for r in requests],
        )
        return {(row["tenant"], row["id"]) for row in rows}


@dataclass(frozen=True, slots=True)
class _Stored:
    employee: str
    kind: str
    at: datetime
    received_at: datetime
    fresh: bool = field(default=True)

    @classmethod
    def of(cls, pending: _Pending) -> _Stored:
        assert pending.employee is not None
        request = pending.request
        return cls(pending.employee, request.kind, request.at, request.received_at)

    def matches(self, pending: _Pending) -> bool:
        return (
            self.employee == pending.employee
            and self.kind == pending.request.kind
            and self.at.astimezone(UTC) == pending.request.at.astimezone(UTC)
        )
