"""Where a hub's punches go to be committed, and how presence events reach every hub.

Two brokers with one narrow interface, chosen in one place (``open_broker``):

* ``LocalBroker``, without ``ATTENDANCE_REDIS_URL``: the persistence worker runs in the
  hub's own process (``PunchBatcher``), and presence events are applied at once.
* ``RedisBroker``, with it: the hub adds each punch to a Redis stream
  (``RedisKeys.punches``); ``attendance-hub worker`` processes read it as a consumer
  group, commit, add the committed punches to the presence stream
  (``RedisKeys.presence``), publish each outcome to the hub that asked
  (``RedisKeys.acks``), and only then acknowledge the entries. A punch whose outcome
  does not come back in time is answered ``unavailable``: the client keeps it and
  resends, and a punch stored meanwhile is then answered ``duplicate``. Nothing is acked
  before it is committed. Every presence event (committed punches, renames, terminals,
  clock ticks...) goes through the presence stream, and every hub applies the events
  in the stream's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError, WatchError

from hub import metrics
from hub.config import Settings
from hub.events import HubGone, PresenceEvent, PunchesCommitted
from hub.redis_keys import WORKER_GROUP, RedisKeys
from workers.aside import Aside
from workers.persist import (
    PunchBatcher,
    PunchOutcome,
    PunchRequest,
    Reply,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

# Told every presence event, in the order every hub applies them.
OnEvent = Callable[[PresenceEvent], None]

# What travels through Redis, as msgpack.
# An outcome, or why the punch was not stored (the client resends it).
AckMessage = list[tuple[int, PunchOutcome | str]]

ENCODER: Final = msgspec.msgpack.Encoder()
PUNCH_DECODER: Final = msgspec.msgpack.Decoder(PunchRequest)
ACK_DECODER: Final = msgspec.msgpack.Decoder(AckMessage)
EVENT_DECODER: Final = msgspec.msgpack.Decoder(PresenceEvent)

# Most punches one XADD pipeline carries.
SEND_BATCH: Final = 512
# Workers delete what they have answered; this bounds the stream if none run for long. A
# punch trimmed before any worker read it was never acked: its client resends it.
STREAM_MAX: Final = 1_000_000
# Presence events kept in their stream (hubs read them within moments).
EVENTS_MAX: Final = 100_000
# Most presence events one read takes.
FOLLOW_BATCH: Final = 512
# How long the hub building the first checkpoint may take before another may try.
CHECKPOINT_LOCK_MS: Final = 120_000
# How often one hub (whichever holds the lease) writes the floors to Redis for hubs that
# start later. At most this long of the presence stream is replayed on a hub's start.
CHECKPOINT_INTERVAL_S: Final = 10.0
# How long a starting hub waits for running hubs to write a usable checkpoint, if any run.
CHECKPOINT_WAIT_S: Final = 2.5 * CHECKPOINT_INTERVAL_S
# How long a hub's liveness key outlives its last refresh, and how often it is refreshed.
# A hub that stopped refreshing is declared gone within TTL + period: its terminals go
# offline on every board well within 10 s.
HUB_TTL_S: Final = 5.0
HUB_REFRESH_S: Final = 1.0
# How often the punch stream's length, pending entries and dead letters are read for the
# metrics (three O(1) commands in one round trip).
STREAM_SAMPLE_S: Final = 2.0


def event_fields(event: PresenceEvent) -> dict[Any, Any]:
    """A presence event as the fields of its stream entry."""
    return {b"event": ENCODER.encode(event)}


class Floors(Protocol):
    """A hub's live channels, as its broker sets them up on start."""

    async def rebuild(self) -> None:
        """Start from what PostgreSQL holds."""
        ...

    def dump(self) -> bytes:
        """Everything there is, versions included, for another hub process to take over."""
        ...

    def restore(self, dumped: bytes) -> None: ...

    def hubs(self) -> set[str]:
        """The hub processes that hold a terminal's socket, as the boards say."""
        ...


class Broker(Protocol):
    """Hands punches over to be committed and answers each one once; spreads presence events."""

    async def start(self, floors: Floors) -> None:
        """Set the floors up (from PostgreSQL, or as the other hubs have them), then run."""
        ...

    async def stop(self) -> None:
        """Answer what is waiting (committed, or ``StoreUnavailable``), then stop."""
        ...

    def enqueue(self, request: PunchRequest, reply: Reply) -> None:
        """Hand a punch over; ``reply`` is called once, after its commit or its failure."""
        ...

    async def flush(self) -> None:
        """Wait until every punch handed over so far has been answered."""
        ...

    def publish(self, event: PresenceEvent) -> None:
        """Have every hub apply the event (this one included), in one order for all."""
        ...

    async def check(self) -> str | None:
        """Why the broker cannot take punches now, or None if it can."""
        ...


class LocalBroker:
    """The persistence worker in this process; the checks and the overtime scan beside it,
    in a child process (``workers/aside.py``)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, settings: Settings, on_event: OnEvent) -> None:
        self._on_event = on_event
        self._batcher = PunchBatcher(
            pool,
            max_batch=settings.batch_max,
            wait_ms=settings.batch_wait_ms,
            concurrency=settings.batch_concurrency,
            on_committed=self._committed,
            geofence_accuracy_m=settings.fraud.geofence_accuracy_m,
        )
        self._aside = Aside(dsn, settings, on_event)

    def _committed(self, stored: list[tuple[PunchRequest, PunchOutcome]]) -> None:
        self._on_event(PunchesCommitted(stored, datetime.now(UTC)))
        self._aside.check(stored)

    async def start(self, floors: Floors) -> None:
        await self._aside.start()
        self._batcher.start()
        await floors.rebuild()

    async def stop(self) -> None:
        await self._batcher.stop()
        await self._aside.stop()

    def enqueue(self, request: PunchRequest, reply: Reply) -> None:
        self._batcher.enqueue(request, reply)

    async def flush(self) -> None:
        await self._batcher.flush()

    def publish(self, event: PresenceEvent) -> None:
        self._on_event(event)

    async def check(self) -> str | None:
        return None


class _Checkpoint(msgspec.Struct, array_like=True):
    """The floors (``Floors.dump``) as they were after presence stream entry ``stream``."""

    stream: str
    state: bytes


CHECKPOINT_DECODER: Final = msgspec.msgpack.Decoder(_Checkpoint)


def _entry_id(entry: str | bytes) -> tuple[int, int]:
    """A stream entry id as numbers, to compare."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class _Waiting(msgspec.Struct):
    reply: Reply
    deadline: float


class RedisBroker:
    """Punches through a Redis stream to the workers, outcomes back by pub/sub, and presence
    events through a second stream that every hub reads in order.

    ``hub`` names this process for the workers' answers: a fresh one per run, so
    that answers meant for an earlier run of the hub reach nobody.
    ``ack_timeout_s`` is how long a punch may wait for its outcome.
    """

    def __init__(
        self,
        url: str,
        keys: RedisKeys,
        hub: str,
        on_event: OnEvent,
        *,
        ack_timeout_s: float,
    ) -> None:
        self.hub = hub
        self._keys = keys
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self._on_event = on_event
        self._events: list[PresenceEvent] = []
        # The last presence event applied here (the stream's end when this hub started).
        self._read_from = "$"
        self._ack_timeout_s = ack_timeout_s
        self._tokens = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
        self._outbox: list[tuple[int, PunchRequest]] = []
        self._has_mail = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        # Set whenever a punch is answered, for ``flush``.
        self._answered = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._caught_up = asyncio.Event()

    async def start(self, floors: Floors) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="broker-listen"),
            asyncio.create_task(self._send(), name="broker-send"),
            asyncio.create_task(self._expire(), name="broker-expire"),
            asyncio.create_task(self._sample_stream(), name="broker-stream-gauges"),
        ]
        # Answers can only be heard once subscribed: wait for that before taking punches.
        await asyncio.wait_for(self._listening.wait(), 30)
        await self._take_floors(floors)
        self._tasks += [
            asyncio.create_task(self._follow(), name="broker-follow"),
            asyncio.create_task(self._checkpoints(floors), name="broker-checkpoints"),
            asyncio.create_task(self._liveness(floors), name="broker-liveness"),
        ]
        # Serve once the floors have caught up with the other hubs.
        await asyncio.wait_for(self._caught_up.wait(), 60)

    async def _take_floors(self, floors: Floors) -> None:
        """Start as the other hubs are, from the checkpoint; the first hub builds it.

        Every hub applies the same presence events in the same order to the same
        checkpoint, so every channel has one version sequence across all hubs.
        """
        waiting_since = time.monotonic()
        while True:
            held: Any = await self._redis.get(self._keys.checkpoint)
            if held is not None:
                checkpoint = await self._usable(held)
                if checkpoint is not None:
                    floors.restore(checkpoint.state)
                    self._read_from = checkpoint.stream
                    log.info("presence taken over from the checkpoint at %s", checkpoint.stream)
                    return
            if time.monotonic() - waiting_since < CHECKPOINT_WAIT_S and await self._others_alive():
                # Running hubs write a usable one soon (within a second if Redis lost it):
                # building another would start a second version sequence beside theirs.
                await asyncio.sleep(0.2)
                continue
            lock = self._keys.checkpoint_lock
            if await self._redis.set(lock, self.hub, nx=True, px=CHECKPOINT_LOCK_MS):
                try:
                    # Events from here on are applied on top of what PostgreSQL holds
                    # (applying one twice changes nothing).
                    last: Any = await self._redis.xrevrange(self._keys.presence, count=1)
                    self._read_from = last[0][0].decode() if last else "0-0"
                    await floors.rebuild()
                    # Unless a running hub wrote one meanwhile (after Redis lost its data):
                    # then that one is taken over like any other.
                    if await self._replace_checkpoint(floors, replacing=held):
                        return
                finally:
                    if await self._redis.get(lock) == self.hub.encode():
                        await self._redis.delete(lock)
            else:
                # Another hub is building the first checkpoint.
                await asyncio.sleep(0.1)

    async def _usable(self, held: bytes) -> _Checkpoint | None:
        """The checkpoint, if it can be caught up from: readable, and not trimmed past."""
        try:
            checkpoint = CHECKPOINT_DECODER.decode(held)
        except msgspec.DecodeError as exc:
            log.warning("the presence checkpoint cannot be read (%s)", exc)
            return None
        if not await self._stream_holds_after(checkpoint.stream):
            log.warning("the presence checkpoint at %s is older than the stream", checkpoint.stream)
            return None
        return checkpoint

    async def _others_alive(self) -> bool:
        async for _ in self._redis.scan_iter(match=self._keys.hubs_pattern, count=1000):
            return True
        return False

    async def _stream_holds_after(self, entry: str) -> bool:
        """Whether the presence stream still holds every entry after ``entry``."""
        try:
            info: Any = await self._redis.xinfo_stream(self._keys.presence)
        except ResponseError:
            # No stream (yet): nothing was trimmed from it.
            return True
        if info["entries-added"] == info["length"]:
            return True
        # Trimming takes the oldest entries: those after ``entry`` are all there if the
        # oldest left is not after it.
        first = info["first-entry"]
        return first is not None and _entry_id(first[0]) <= _entry_id(entry)

    async def _save_checkpoint(self, floors: Floors) -> None:
        """Write the floors as they are after the entry read last."""
        checkpoint = _Checkpoint(self._read_from, floors.dump())
        await self._redis.set(self._keys.checkpoint, ENCODER.encode(checkpoint))

    async def _replace_checkpoint(self, floors: Floors, *, replacing: bytes | None) -> bool:
        """Write the floors as they are after the entry read last, if the checkpoint is still
        ``replacing`` (None: there is none); whether it was written."""
        key = self._keys.checkpoint
        checkpoint = ENCODER.encode(_Checkpoint(self._read_from, floors.dump()))
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.get(key) != replacing:
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, checkpoint)
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def _checkpoints(self, floors: Floors) -> None:
        """Write a checkpoint now and then, while this hub holds the writer's lease."""
        lease = self._keys.checkpoint_writer
        lease_ms = int(CHECKPOINT_INTERVAL_S * 2000)
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), CHECKPOINT_INTERVAL_S)
                return
            try:
                holds = await self._redis.set(lease, self.hub, nx=True, px=lease_ms)
                if not holds and await self._redis.get(lease) == self.hub.encode():
                    holds = await self._redis.pexpire(lease, lease_ms)
                if holds:
                    await self._save_checkpoint(floors)
            except (RedisError, OSError) as exc:
                log.warning("could not write the presence checkpoint: %s", exc)

    async def _liveness(self, floors: Floors) -> None:
        """Keep this hub's liveness key (and a checkpoint, if Redis lost it); declare gone the
        hubs whose keys expired.

        Only a hub that has kept its own key for a whole TTL judges others: after Redis
        comes back empty, every live hub has set its key again by then.
        """
        mine = self._keys.hub(self.hub)
        kept_since: float | None = None
        while not self._closing:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.set(mine, b"1", px=int(HUB_TTL_S * 1000), get=True)
                pipe.exists(self._keys.checkpoint)
                kept, checkpointed = await pipe.execute()
                if not checkpointed:
                    # Redis lost its data: a hub starting now must find these floors.
                    await self._replace_checkpoint(floors, replacing=None)
                if kept is None or kept_since is None:
                    # Just set, or set again after Redis lost it: others may not have yet.
                    kept_since = time.monotonic()
                if time.monotonic() - kept_since >= HUB_TTL_S:
                    await self._find_gone(floors)
            except (RedisError, OSError) as exc:
                kept_since = None
                log.warning("cannot refresh this hub's liveness key: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), HUB_REFRESH_S)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(mine)

    async def _find_gone(self, floors: Floors) -> None:
        others = sorted(floors.hubs() - {self.hub})
        if not others:
            return
        pipe = self._redis.pipeline(transaction=False)
        for hub in others:
            pipe.exists(self._keys.hub(hub))
        for hub, alive in zip(others, await pipe.execute(), strict=True):
            if not alive:
                log.warning("hub %s stopped refreshing its key: its terminals are offline", hub)
                self.publish(HubGone(hub, datetime.now(UTC)))

    async def stop(self) -> None:
        # The loops notice and end between Redis commands: cancelling one midway can leave
        # its connection half open.
        self._closing = True
        self._closed.set()
        self._has_mail.set()
        await asyncio.gather(*self._tasks)
        self._outbox.clear()
        self._fail(list(self._waiting), "the hub is shutting down")
        await self._redis.aclose()

    def enqueue(self, request: PunchRequest, reply: Reply) -> None:
        if self._closing:
            reply(StoreUnavailable("the hub is shutting down"))
            return
        token = next(self._tokens)
        self._waiting[token] = _Waiting(reply, time.monotonic() + self._ack_timeout_s)
        self._outbox.append((token, request))
        self._has_mail.set()

    async def flush(self) -> None:
        while self._waiting:
            self._answered.clear()
            await self._answered.wait()

    def publish(self, event: PresenceEvent) -> None:
        if self._closing:
            return
        self._events.append(event)
        self._has_mail.set()

    async def check(self) -> str | None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            return f"Redis does not answer: {exc}"
        if not self._listening.is_set():
            return "not subscribed to Redis for answers"
        return None

    def _fail(self, tokens: list[int], why: str) -> None:
        for token in tokens:
            waiting = self._waiting.pop(token, None)
            if waiting is not None:
                waiting.reply(StoreUnavailable(why))
        self._answered.set()

    async def _send(self) -> None:
        while not self._closing:
            await self._has_mail.wait()
            self._has_mail.clear()
            await self._send_events()
            while self._outbox and not self._closing:
                sending, self._outbox = self._outbox[:SEND_BATCH], self._outbox[SEND_BATCH:]
                pipe = self._redis.pipeline(transaction=False)
                hub = self.hub.encode()
                for token, request in sending:
                    fields: dict[bytes, bytes | int] = {
                        b"hub": hub,
                        b"token": token,
                        b"punch": ENCODER.encode(request),
                    }
                    pipe.xadd(
                        self._keys.punches,
                        fields,  # type: ignore[arg-type]
                        maxlen=STREAM_MAX,
                        approximate=True,
                    )
                try:
                    await pipe.execute()
                except (RedisError, OSError) as exc:
                    log.warning("could not hand %d punches to Redis: %s", len(sending), exc)
                    self._fail([token for token, _ in sending], "Redis is unavailable")

    async def _send_events(self) -> None:
        events, self._events = self._events, []
        if not events:
            return
        pipe = self._redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self._keys.presence, event_fields(event), maxlen=EVENTS_MAX, approximate=True)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            # The floors of every hub miss these until they start again (from PostgreSQL).
            log.warning("could not send %d presence events to Redis: %s", len(events), exc)

    async def _follow(self) -> None:
        """Apply every presence event of the stream, in its order."""
        while not self._closing:
            try:
                reply: Any = await self._redis.xread(
                    {self._keys.presence: self._read_from}, count=FOLLOW_BATCH, block=200
                )
            except (RedisError, OSError) as exc:
                log.warning("cannot read presence events from Redis: %s", exc)
                await asyncio.sleep(0.5)
                continue
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self._read_from = entry_id.decode()
                try:
                    self._on_event(EVENT_DECODER.decode(fields[b"event"]))
                except Exception:
                    log.exception("presence event %s could not be applied", self._read_from)
            if len(entries) < FOLLOW_BATCH:
                self._caught_up.set()

    async def _listen(self) -> None:
        channels = (self._keys.acks(self.hub),)
        while not self._closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                self._listening.set()
                while not self._closing:
                    message = await pubsub.get_message(timeout=0.2)
                    if message is not None:
                        self._heard(message["data"])
            except (RedisError, OSError) as exc:
                self._listening.clear()
                log.warning("lost the Redis subscription (%s); subscribing again", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _heard(self, data: bytes) -> None:
        for token, outcome in ACK_DECODER.decode(data):
            waiting = self._waiting.pop(token, None)
            if waiting is None:
                # Answered already (timed out, and the client resends), or another run's.
                continue
            if isinstance(outcome, str):
                waiting.reply(StoreUnavailable(outcome))
            else:
                waiting.reply(outcome)
        self._answered.set()

    async def _expire(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), min(1.0, self._ack_timeout_s / 4))
                return
            now = time.monotonic()
            late = [token for token, w in self._waiting.items() if w.deadline <= now]
            if late:
                log.warning("%d punches got no answer from the workers in time", len(late))
                self._fail(late, "no worker answered in time")

    async def _sample_stream(self) -> None:
        """Keep the stream gauges (``metrics.STREAM_*``) up to date while running."""
        keys = self._keys
        while not self._closing:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xlen(keys.punches)
            pipe.xpending(keys.punches, WORKER_GROUP)
            pipe.xlen(keys.dead_letters)
            try:
                length, pending, dead = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                # The liveness loop says so loudly already.
                log.debug("cannot read the punch stream's size: %s", exc)
            else:
                if not isinstance(length, Exception):
                    metrics.STREAM_ENTRIES.set(length)
                # An error here is NOGROUP: no worker has started yet, so nothing is pending.
                metrics.STREAM_PENDING.set(
                    0 if isinstance(pending, Exception) else pending["pending"]
                )
                if not isinstance(dead, Exception):
                    metrics.STREAM_DEAD_LETTER_ENTRIES.set(dead)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), STREAM_SAMPLE_S)


def open_broker(
    settings: Settings, pool: asyncpg.Pool, dsn: str, hub: str, on_event: OnEvent
) -> Broker:
    """The broker the settings ask for: Redis when ``ATTENDANCE_REDIS_URL`` is set."""
    if settings.redis_url is None:
        return LocalBroker(pool, dsn, settings, on_event)
    return RedisBroker(
        settings.redis_url,
        RedisKeys(settings.redis_prefix),
        hub,
        on_event,
        ack_timeout_s=settings.ack_timeout_s,
    )
