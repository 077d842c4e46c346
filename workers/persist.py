"""The persistence worker: commits punches in batches, then answers each one.

Punches are collected until the batch is full or a few milliseconds have
passed, then resolved, inserted and committed in one statement with one
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
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, NamedTuple

import asyncpg
import msgspec

from hub import metrics
from hub.store import act_for_tenants
from hub.types import Conn
from workers.fraud import Thresholds

log = logging.getLogger(__name__)

Status = Literal["accepted", "duplicate", "rejected"]
# A punch's `at` may be this far ahead of the server's clock (device clocks drift).
FUTURE_TOLERANCE: Final = timedelta(minutes=5)
Source = Literal["terminal", "mobile", "api", "adms", "manual"]


class StoreUnavailable(Exception):
    """The database could not commit the batch; nothing in it was stored or acked."""


class PunchRequest(NamedTuple):
    """One punch to store. The field order is the `punch_input` type's (migration 0002)."""

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


class PunchOutcome(msgspec.Struct, frozen=True):
    """What became of one punch. A Struct, built in C: the hub makes one per punch."""

    status: Status
    received_at: datetime
    reason: str | None = None
    employee: str | None = None
    site: str | None = None
    # The employee's name, for an accepted punch (presence shows it).
    name: str | None = None


Reply = Callable[[PunchOutcome | Exception], None]
# Told, after each commit and before any punch of it is answered, which punches it stored.
Committed = Callable[[list[tuple[PunchRequest, PunchOutcome]]], None]


class _Pending(NamedTuple):
    request: PunchRequest
    reply: Reply


# One statement per batch: resolve each punch's employee (by id or badge) and insert the
# first copy of each new id. The lookup is LATERAL so that it can only be an index probe per
# punch: as a plain join the planner hashed all of `employees` for every batch, and its plan
# depended on the estimated batch size. It returns one row per input punch, in order: its resolved
# employee and site, and (the same on every row) how many punches were inserted.
# Positions less precise than this cannot tell in from out (ATTENDANCE_FRAUD_GEOFENCE_ACCURACY_M).
GEOFENCE_ACCURACY_M: Final = Thresholds().geofence_accuracy_m

_COMMIT_SQL: Final = """
WITH input AS (
    SELECT i.*, e.id AS resolved, COALESCE(i.site, e.site) AS resolved_site, e.name,
           COALESCE(g.fenced, false) AS fenced
      FROM unnest($1::punch_input[]) WITH ORDINALITY AS i
      LEFT JOIN LATERAL (
            SELECT by_id.id, by_id.site, by_id.name FROM employees by_id
             WHERE i.employee IS NOT NULL AND by_id.tenant = i.tenant
               AND by_id.id = i.employee AND by_id.erased_at IS NULL
             UNION ALL
            SELECT by_badge.id, by_badge.site, by_badge.name FROM employees by_badge
             WHERE i.employee IS NULL AND by_badge.tenant = i.tenant
               AND by_badge.badge = i.badge AND by_badge.erased_at IS NULL
      ) e ON true
      -- Punches with a position, and phone punches without one, at a site that enforces
      -- its geofence (never one entered by hand): refused when there is no position, it
      -- is too vague to tell ($2: the worst accuracy), or it is outside the radius by
      -- more than twice its accuracy (as the `geofence` check judges).
      LEFT JOIN LATERAL (
            SELECT i.lat IS NULL OR i.lon IS NULL OR i.accuracy_m > $2
                   OR 2 * 6371000 * asin(sqrt(least(1,
                       sin(radians(i.lat - s.lat) / 2) ^ 2
                       + cos(radians(s.lat)) * cos(radians(i.lat))
                         * sin(radians(i.lon - s.lon) / 2) ^ 2)))
                      - 2 * COALESCE(i.accuracy_m, 0) > s.radius_m AS fenced
              FROM sites s
             WHERE (i.lat IS NOT NULL OR i.source = 'mobile') AND i.source <> 'manual'
               AND s.tenant = i.tenant AND s.id = COALESCE(i.site, e.site)
               AND s.policy->>'geofence' = 'enforce' AND s.radius_m IS NOT NULL
               AND s.lat IS NOT NULL AND s.lon IS NOT NULL
      ) g ON true
), inserted AS (
    INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, device, method,
                         lat, lon, accuracy_m, offline, seq, source, reason, actor)
    SELECT DISTINCT ON (tenant, id)
           tenant, id, resolved, kind, at, received_at, resolved_site, device, method,
           lat, lon, accuracy_m, offline, seq, source, reason, actor
      FROM input
     WHERE resolved IS NOT NULL AND (only_employee IS NULL OR resolved = only_employee)
       AND NOT fenced
     ORDER BY tenant, id, ordinality
    ON CONFLICT (tenant, id) DO NOTHING
    RETURNING 1
)
SELECT resolved, resolved_site, name, fenced, (SELECT count(*) FROM inserted) AS inserted
  FROM input
 ORDER BY ordinality
"""

# The stored rows behind the ids of a batch that inserted fewer rows than it had punches to
# insert. A new statement, so it also sees rows that other transactions committed while the
# insert waited on them.
_STORED_SQL: Final = """
SELECT p.tenant, p.id, p.employee, p.kind, p.at, p.received_at
  FROM unnest($1::text[], $2::uuid[]) AS q(tenant, id)
  JOIN punches p ON p.tenant = q.tenant AND p.id = q.id
"""

CONNECTION_ERRORS: Final = (
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
        wait_ms: int = 1,
        concurrency: int = 3,
        on_committed: Committed | None = None,
        geofence_accuracy_m: float = GEOFENCE_ACCURACY_M,
    ) -> None:
        self._pool = pool
        self._geofence_accuracy_m = geofence_accuracy_m
        self._on_committed = on_committed
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
            try:
                outcomes = await commit_punches(
                    self._pool,
                    [p.request for p in batch],
                    geofence_accuracy_m=self._geofence_accuracy_m,
                )
            except StoreUnavailable as exc:
                for pending in batch:
                    pending.reply(exc)
                return
            except Exception as exc:
                # A bug, not an outage: answer every punch so no client waits forever.
                for pending in batch:
                    pending.reply(exc)
                return
            if self._on_committed is not None:
                stored = accepted([pending.request for pending in batch], outcomes)
                if stored:
                    try:
                        self._on_committed(stored)
                    except Exception:
                        # Presence is derived; the punches are committed and get their acks.
                        log.exception("presence update after a commit failed")
            for pending, outcome in zip(batch, outcomes, strict=True):
                pending.reply(outcome)
        finally:
            self._slots.release()


def accepted(
    requests: list[PunchRequest], outcomes: list[PunchOutcome | Exception]
) -> list[tuple[PunchRequest, PunchOutcome]]:
    """The punches of a batch that were stored by it."""
    return [
        (request, outcome)
        for request, outcome in zip(requests, outcomes, strict=True)
        if isinstance(outcome, PunchOutcome) and outcome.status == "accepted"
    ]


async def commit_punches(
    pool: asyncpg.Pool,
    requests: list[PunchRequest],
    *,
    geofence_accuracy_m: float = GEOFENCE_ACCURACY_M,
) -> list[PunchOutcome | Exception]:
    """Commit a batch of punches and say what became of each, in order; counted in metrics.

    One statement commits the whole batch. If the database refuses it, each punch is
    retried alone, so that one bad row does not sink its neighbours. Raises
    ``StoreUnavailable`` when the database cannot be reached: nothing was stored.
    """
    started = time.perf_counter()
    outcomes: list[PunchOutcome | Exception]
    try:
        outcomes = list(await _commit_batch(pool, requests, geofence_accuracy_m))
    except CONNECTION_ERRORS as exc:
        metrics.BATCH_FAILURES.labels("unavailable").inc()
        log.warning("punch batch of %d not committed: %s", len(requests), exc)
        raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
    except asyncpg.PostgresError as exc:
        metrics.BATCH_FAILURES.labels("split").inc()
        log.warning("punch batch of %d failed (%s); retrying one by one", len(requests), exc)
        outcomes = await _commit_singly(pool, requests, geofence_accuracy_m)
    except Exception:
        metrics.BATCH_FAILURES.labels("internal").inc()
        log.exception("punch batch of %d failed", len(requests))
        raise
    metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
    metrics.BATCH_SIZE.observe(len(requests))
    results = Counter(o.reason or o.status for o in outcomes if not isinstance(o, Exception))
    for result, count in results.items():
        metrics.punches(result).inc(count)
    return outcomes


async def _commit_singly(
    pool: asyncpg.Pool, requests: list[PunchRequest], geofence_accuracy_m: float
) -> list[PunchOutcome | Exception]:
    results: list[PunchOutcome | Exception] = []
    for request in requests:
        try:
            results.extend(await _commit_batch(pool, [request], geofence_accuracy_m))
        except CONNECTION_ERRORS as exc:
            results.append(StoreUnavailable(str(exc) or type(exc).__name__))
        except asyncpg.PostgresError as exc:
            log.error("punch %s cannot be stored: %s", request.id, exc)
            results.append(PunchOutcome("rejected", request.received_at, reason="invalid"))
    return results


async def _commit_batch(
    pool: asyncpg.Pool, requests: list[PunchRequest], geofence_accuracy_m: float
) -> list[PunchOutcome]:
    async with pool.acquire() as conn:
        # Row-level security lets this session touch only the batch's tenants. Set for
        # the session, not a transaction, so that the batch statement needs no
        # transaction block; the pool's reset clears it on release.
        await act_for_tenants(conn, {request.tenant for request in requests})
        # One statement outside a transaction block is its own transaction, committed at
        # the protocol's Sync; asyncpg hands back the rows only at the ReadyForQuery that
        # follows the commit. So no BEGIN and COMMIT round trips, and no ack before commit.
        return await store_punches(conn, requests, geofence_accuracy_m=geofence_accuracy_m)


async def store_punches(
    conn: Conn, requests: list[PunchRequest], *, geofence_accuracy_m: float = GEOFENCE_ACCURACY_M
) -> list[PunchOutcome]:
    """Resolve, insert and answer punches with one statement on ``conn``.

    At a site whose policy enforces its geofence, a punch with a position outside the
    radius (by more than twice its accuracy), with an accuracy worse than
    ``geofence_accuracy_m``, or a phone's punch with no position, is refused (reason
    ``geofence``); a manual correction never is.

    Outside a transaction block the statement commits by itself; inside one (a
    REST correction, audited in the same transaction) it commits with it. The
    connection must be allowed to act for the requests' tenants.
    """
    outcomes: list[PunchOutcome] = []
    # Indexes of the punches that resolved to an employee they may punch for.
    eligible: list[int] = []
    rows = await conn.fetch(_COMMIT_SQL, requests, geofence_accuracy_m)
    for index, (request, row) in enumerate(zip(requests, rows, strict=True)):
        employee = row["resolved"]
        if employee is None:
            outcomes.append(_rejected(request, "unknown_employee"))
        elif request.only_employee is not None and employee != request.only_employee:
            outcomes.append(_rejected(request, "forbidden"))
        elif row["fenced"]:
            outcomes.append(_rejected(request, "geofence"))
        else:
            eligible.append(index)
            outcomes.append(
                PunchOutcome(
                    "accepted",
                    request.received_at,
                    None,
                    employee,
                    row["resolved_site"],
                    row["name"],
                )
            )
    # As many rows inserted as eligible punches means every one was new. Fewer means some
    # repeat an id, within the batch or one stored before: settle those.
    if eligible and rows[0]["inserted"] < len(eligible):
        await _settle_repeats(conn, requests, rows, eligible, outcomes)
    return outcomes


async def _settle_repeats(
    conn: Conn,
    batch: list[PunchRequest],
    rows: list[asyncpg.Record],
    eligible: list[int],
    outcomes: list[PunchOutcome],
) -> None:
    requests = [batch[i] for i in eligible]
    found = await conn.fetch(_STORED_SQL, [r.tenant for r in requests], [r.id for r in requests])
    stored = {
        (row["tenant"], row["id"]): _Stored(
            row["employee"], row["kind"], row["at"], row["received_at"]
        )
        for row in found
    }
    seen: set[tuple[str, uuid.UUID]] = set()
    for i, request in zip(eligible, requests, strict=True):
        key = (request.tenant, request.id)
        # A row holds every eligible id: this batch inserted it, or ON CONFLICT found it.
        previous = stored[key]
        employee = rows[i]["resolved"]
        first = key not in seen
        seen.add(key)
        if (
            first
            and previous.received_at == request.received_at
            and previous.same(employee, request)
        ):
            # The row is this copy's: every copy has its own receipt time to the
            # microsecond. Its `accepted` stands.
            continue
        outcomes[i] = previous.answer(employee, request, rows[i]["resolved_site"])


@dataclass(frozen=True, slots=True)
class _Stored:
    employee: str
    kind: str
    at: datetime
    received_at: datetime

    def same(self, employee: str, request: PunchRequest) -> bool:
        return (
            self.employee == employee
            and self.kind == request.kind
            and self.at.astimezone(UTC) == request.at.astimezone(UTC)
        )

    def answer(self, employee: str, request: PunchRequest, site: str | None) -> PunchOutcome:
        """A later copy of a stored id: the same punch again, or a different one under its id."""
        if self.same(employee, request):
            # A duplicate reports when the stored punch was first received.
            return PunchOutcome("duplicate", self.received_at, None, employee, site)
        return PunchOutcome("rejected", request.received_at, "id_conflict", employee, site)


def _rejected(request: PunchRequest, reason: str) -> PunchOutcome:
    return PunchOutcome("rejected", request.received_at, reason)
