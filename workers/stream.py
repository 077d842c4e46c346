"""The persistence worker on Redis: reads punches from the hubs' stream, commits, answers.

Each ``attendance-hub worker`` is one consumer in the stream's consumer group. It reads
a batch (``XREADGROUP``), commits it with the same statement the in-process worker
uses, publishes every outcome to the hub that handed the punch over and the stored
punches to every hub's presence, and only then acknowledges the entries (``XACK``). A
worker that dies between reading and acknowledging leaves its entries pending:

* started again under the same name, it first re-reads its own pending entries;
* otherwise a janitor in any worker claims entries idle for longer than
  ``claim_idle_ms`` (``XAUTOCLAIM``), which should be well above the slowest batch.

Committing an entry twice stores nothing twice (punch ids are unique per tenant), and
the second answer is the same as the first. An entry delivered ``max_deliveries``
times without being acknowledged (it crashes whoever reads it, say) goes to the dead
letters stream with a log line and a metric, and is acknowledged.

If PostgreSQL is down, the batch's punches are answered ``unavailable`` and
acknowledged: the clients keep them and resend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from hub import metrics
from hub.broker import ENCODER, EVENTS_MAX, PUNCH_DECODER, AckMessage, event_fields
from hub.events import Alert, AlertsRaised, PunchesCommitted
from hub.redis_keys import WORKER_GROUP, RedisKeys
from workers.checks import Checker
from workers.persist import (
    CONNECTION_ERRORS,
    PunchOutcome,
    PunchRequest,
    StoreUnavailable,
    accepted,
    commit_punches,
)
from workers.scan import OvertimeScan

log = logging.getLogger(__name__)

# How long one read waits for new punches before looking around again.
BLOCK_MS: Final = 1000


class _Entry(msgspec.Struct):
    id: bytes
    hub: str
    token: int
    request: PunchRequest


class StreamWorker:
    """One consumer of the punch stream, named ``name``; ``run`` until cancelled."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        pool: asyncpg.Pool,
        name: str,
        *,
        batch_max: int,
        claim_idle_ms: int,
        max_deliveries: int,
        checker: Checker,
        scan: OvertimeScan | None = None,
    ) -> None:
        self.name = name
        self._checker = checker
        self._scan = scan
        self._redis = redis
        self._keys = keys
        self._pool = pool
        self._batch_max = batch_max
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Commit punches until ``stop``; returns within about a second of it."""
        await self.ensure_group()
        janitor = asyncio.create_task(self._janitor(), name="stream-janitor")
        scanning = asyncio.create_task(self._scanning(), name="overtime-scan")
        try:
            # Entries this consumer read before a crash come first (unless they have been
            # read too often: one of them may be what crashed it).
            await self._bury(idle_ms=0, consumer=self.name)
            while not self._stopping.is_set() and await self._read("0"):
                pass
            while not self._stopping.is_set():
                try:
                    await self._read(">")
                except Exception:
                    # Whatever it was, the worker must go on: without one, nothing is stored.
                    log.exception("the stream worker failed on a batch; carrying on")
                    await asyncio.sleep(0.5)
        finally:
            self._stopping.set()
            await janitor
            await scanning

    def stop(self) -> None:
        """Finish the batch in hand and stop. (Cancelling a Redis command midway can leave
        its connection half open, so the worker is stopped between commands instead.)"""
        self._stopping.set()

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; it starts from the beginning."""
        try:
            await self._redis.xgroup_create(self._keys.punches, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, start: str) -> int:
        """Read and handle one batch; how many entries it held."""
        reply: Any
        try:
            reply = await self._redis.xreadgroup(
                WORKER_GROUP,
                self.name,
                {self._keys.punches: start},
                count=self._batch_max,
                block=BLOCK_MS if start == ">" else None,
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                # Redis lost the stream (restarted without persistence): start it again.
                await self.ensure_group()
                return 0
            raise
        except (RedisError, OSError) as exc:
            log.warning("cannot read punches from Redis: %s", exc)
            await asyncio.sleep(0.5)
            return 0
        entries = reply[0][1] if reply else []
        await self.handle(entries)
        return len(entries)

    async def handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Commit the entries' punches, answer the hubs, then acknowledge the entries."""
        if not entries:
            return
        good: list[_Entry] = []
        for entry_id, fields in entries:
            try:
                good.append(
                    _Entry(
                        entry_id,
                        fields[b"hub"].decode(),
                        int(fields[b"token"]),
                        PUNCH_DECODER.decode(fields[b"punch"]),
                    )
                )
            except (KeyError, ValueError, msgspec.DecodeError) as exc:
                await self._dead_letter(entry_id, fields, f"unreadable entry: {exc}")
        if not good:
            return
        requests = [entry.request for entry in good]
        outcomes: list[PunchOutcome | Exception]
        try:
            outcomes = await commit_punches(
                self._pool,
                requests,
                geofence_accuracy_m=self._checker.thresholds.geofence_accuracy_m,
            )
        except Exception as exc:
            # Unavailable, or a bug: either way not stored, and the clients resend.
            outcomes = [exc] * len(good)
        by_hub: dict[str, AckMessage] = defaultdict(list)
        for entry, outcome in zip(good, outcomes, strict=True):
            answer: PunchOutcome | str = (
                outcome if isinstance(outcome, PunchOutcome) else _why(outcome)
            )
            by_hub[entry.hub].append((entry.token, answer))
        stored = accepted(requests, outcomes)
        try:
            pipe = self._redis.pipeline(transaction=False)
            if stored:
                committed = PunchesCommitted(stored, datetime.now(UTC))
                pipe.xadd(
                    self._keys.presence,
                    event_fields(committed),
                    maxlen=EVENTS_MAX,
                    approximate=True,
                )
            for hub, answers in by_hub.items():
                pipe.publish(self._keys.acks(hub), ENCODER.encode(answers))
            await pipe.execute()
            # Answered; checked after, so that checking never delays an ack, and before
            # the entries are acknowledged, so that a worker dying in between leaves them
            # to be checked again.
            alerts = await self._check(requests, outcomes)
            if alerts is None:
                # Left pending: taken again (by the janitor, after the idle time), committed
                # again as a no-op, and checked then.
                return
            pipe = self._redis.pipeline(transaction=False)
            if alerts:
                pipe.xadd(
                    self._keys.presence,
                    event_fields(AlertsRaised(alerts)),
                    maxlen=EVENTS_MAX,
                    approximate=True,
                )
            done = [entry.id for entry in good]
            pipe.xack(self._keys.punches, WORKER_GROUP, *done)
            # Answered: nobody needs them any more, and the stream stays small.
            pipe.xdel(self._keys.punches, *done)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            # Not acknowledged: read again later (by this worker or the janitor), committed
            # again as a no-op, and answered then.
            log.warning("committed %d punches but could not answer: %s", len(good), exc)

    async def _check(
        self, requests: list[PunchRequest], outcomes: list[PunchOutcome | Exception]
    ) -> list[Alert] | None:
        """The batch's alerts; None if PostgreSQL could not be reached to check it (the
        entries are then left to be read and checked again)."""
        committed = [
            (request, outcome)
            for request, outcome in zip(requests, outcomes, strict=True)
            if isinstance(outcome, PunchOutcome)
        ]
        try:
            return await self._checker.check(committed)
        except CONNECTION_ERRORS as exc:
            log.warning(
                "committed and answered %d punches but could not check them (%s): they are "
                "checked when read again",
                len(committed),
                exc,
            )
            return None
        except Exception:
            # A bug: the punches are stored and answered; only their alerts are missing.
            log.exception("the fraud checks failed on a batch of %d punches", len(committed))
            return []

    async def _janitor(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._claim_idle_ms / 2000)
                return
            try:
                await self.reclaim()
            except (RedisError, OSError) as exc:
                log.warning("the stream janitor could not look at pending punches: %s", exc)

    async def _scanning(self) -> None:
        """The periodic overtime scan: one worker per interval (whoever takes the lock)."""
        scan = self._scan
        if scan is None:
            return
        lock_ms = int(scan.interval_s * 900)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), scan.interval_s)
                return
            try:
                if not await self._redis.set(self._keys.scan_lock, self.name, nx=True, px=lock_ms):
                    continue
                await scan.scan(self._announce)
            except Exception:
                log.exception("the overtime scan failed; it runs again in %.0f s", scan.interval_s)

    async def _announce(self, alerts: list[Alert]) -> None:
        await self._redis.xadd(
            self._keys.presence,
            event_fields(AlertsRaised(alerts)),
            maxlen=EVENTS_MAX,
            approximate=True,
        )

    async def reclaim(self) -> int:
        """Take over entries other consumers left unacknowledged; how many were handled."""
        await self._bury(idle_ms=self._claim_idle_ms)
        reply: Any = await self._redis.xautoclaim(
            self._keys.punches,
            WORKER_GROUP,
            self.name,
            min_idle_time=self._claim_idle_ms,
            start_id="0-0",
            count=self._batch_max,
        )
        # Entries deleted meanwhile come back as None.
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]
        if claimed:
            metrics.RECLAIMED.inc(len(claimed))
            log.warning("took over %d punches another worker left unanswered", len(claimed))
            await self.handle(claimed)
        return len(claimed)

    async def _bury(self, idle_ms: int, consumer: str | None = None) -> None:
        """Move pending entries delivered too often to the dead letters."""
        stale: list[dict[str, Any]] = await self._redis.xpending_range(
            self._keys.punches,
            WORKER_GROUP,
            min="-",
            max="+",
            count=self._batch_max,
            consumername=consumer,
            idle=idle_ms or None,
        )
        for pending in stale:
            if pending["times_delivered"] >= self._max_deliveries:
                entry_id = pending["message_id"]
                found: Any = await self._redis.xrange(self._keys.punches, entry_id, entry_id)
                fields = found[0][1] if found else {}
                await self._dead_letter(
                    entry_id, fields, f"delivered {pending['times_delivered']} times"
                )

    async def _dead_letter(self, entry_id: bytes, fields: dict[Any, Any], why: str) -> None:
        metrics.DEAD_LETTERS.inc()
        log.error("punch stream entry %r moved to the dead letters: %s", entry_id, why)
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(self._keys.dead_letters, {**fields, b"entry": entry_id, b"why": why.encode()})
        pipe.xack(self._keys.punches, WORKER_GROUP, entry_id)
        pipe.xdel(self._keys.punches, entry_id)
        await pipe.execute()


def _why(error: Exception) -> str:
    if isinstance(error, StoreUnavailable):
        return f"not stored (database unavailable: {error}); keep it and resend"
    return "not stored (internal error); resend"
