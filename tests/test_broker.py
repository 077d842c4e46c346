"""The broker contract: the in-process broker and the Redis one (with a stream worker) answer
punches alike; then what only the Redis one has: timeouts, restarts, reclaiming, dead letters.

Real PostgreSQL and real Redis, in this process: no hub, no WebSocket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

import hub.broker
from hub.broker import ENCODER, Broker, LocalBroker, RedisBroker
from hub.config import Settings
from hub.events import (
    AlertsRaised,
    ClockTicked,
    EmployeeRenamed,
    HubGone,
    PresenceEvent,
    PunchesCommitted,
    TerminalConnected,
)
from hub.live import Live, LiveFloors
from hub.presence import TerminalMember
from hub.redis_keys import WORKER_GROUP, RedisKeys
from tests.support import processes
from workers.checks import Checker
from workers.persist import PunchOutcome, PunchRequest, StoreUnavailable
from workers.stream import StreamWorker

pytestmark = pytest.mark.postgres


@pytest.fixture
def tenant(bare_tenant: str) -> str:
    return bare_tenant


def request(tenant: str, **fields: Any) -> PunchRequest:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "tenant": tenant,
        "id": uuid.uuid4(),
        "kind": "in",
        "at": now,
        "received_at": now,
        "source": "terminal",
        "employee": "e1",
        "device": "door",
    }
    values.update(fields)
    return PunchRequest(**values)


@dataclass
class Rig:
    """A broker, what it told presence, and (Redis only) its Redis, keys and worker runner."""

    broker: Broker
    events: list[PresenceEvent] = field(default_factory=list)

    @property
    def committed(self) -> list[tuple[PunchRequest, PunchOutcome]]:
        """The punches presence was told were committed, in order."""
        return [pair for e in self.events if isinstance(e, PunchesCommitted) for pair in e.stored]

    redis: aioredis.Redis | None = None
    keys: RedisKeys | None = None
    pool: asyncpg.Pool | None = None
    workers: list[tuple[StreamWorker, asyncio.Task[None]]] = field(default_factory=list)

    def worker(
        self, name: str, *, claim_idle_ms: int = 30_000, deliveries: int = 5
    ) -> StreamWorker:
        assert self.redis is not None and self.keys is not None and self.pool is not None
        return StreamWorker(
            self.redis,
            self.keys,
            self.pool,
            name,
            batch_max=64,
            claim_idle_ms=claim_idle_ms,
            max_deliveries=deliveries,
            checker=Checker.from_settings(self.pool, settings()),
        )

    async def add_entry(self, punch: PunchRequest, token: int) -> bytes:
        """A punch in the stream as a hub adds it, from a hub that is gone; the entry's id."""
        assert self.redis is not None and self.keys is not None
        fields = {b"hub": b"gone", b"token": token, b"punch": ENCODER.encode(punch)}
        entry: Any = await self.redis.xadd(self.keys.punches, fields)  # type: ignore[arg-type]
        return bytes(entry)

    def run_worker(self, name: str) -> None:
        worker = self.worker(name)
        self.workers.append((worker, asyncio.create_task(worker.run())))

    async def stop_workers(self) -> None:
        for worker, _ in self.workers:
            worker.stop()
        await asyncio.gather(*(task for _, task in self.workers))
        self.workers.clear()


async def submit(broker: Broker, punch: PunchRequest) -> PunchOutcome:
    future: asyncio.Future[PunchOutcome] = asyncio.get_running_loop().create_future()

    def reply(outcome: PunchOutcome | Exception) -> None:
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    broker.enqueue(punch, reply)
    return await asyncio.wait_for(future, 30)


def settings(**env: str) -> Settings:
    return Settings.from_env({"ATTENDANCE_BATCH_WAIT_MS": "0", **env})


@pytest.fixture(params=["local", "redis"])
async def rig(
    request: pytest.FixtureRequest,
    pool: asyncpg.Pool,
    database: str,
    redis_server: str,
    redis_prefix: str,
) -> AsyncIterator[Rig]:
    found: list[PresenceEvent] = []
    if request.param == "local":
        made = Rig(LocalBroker(pool, database, settings(), found.append), found)
        await made.broker.start(LiveFloors(Live(1), pool))
        yield made
        await made.broker.stop()
        return
    keys = RedisKeys(redis_prefix)
    broker = RedisBroker(redis_server, keys, uuid.uuid4().hex, found.append, ack_timeout_s=5)
    client = aioredis.Redis.from_url(redis_server)
    made = Rig(broker, found, client, keys, pool)
    await broker.start(LiveFloors(Live(1), pool))
    made.run_worker("w1")
    yield made
    await made.stop_workers()
    await broker.stop()
    await client.aclose()


async def stored_count(owner: asyncpg.Connection, tenant: str) -> int:
    count: int = await owner.fetchval("SELECT count(*) FROM punches WHERE tenant = $1", tenant)
    return count


# -- the contract, on both --------------------------------------------------------------------


async def test_a_punch_is_stored_once_and_a_resend_is_a_duplicate(
    rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    punch = request(tenant)
    first = await submit(rig.broker, punch)
    assert (first.status, first.employee, first.site, first.name) == ("accepted", "e1", "hq", "One")
    again = await submit(rig.broker, punch._replace(received_at=datetime.now(UTC)))
    assert (again.status, again.received_at) == ("duplicate", first.received_at)
    assert await stored_count(owner, tenant) == 1
    # Presence heard of the stored punch once, and of nothing else.
    for _ in range(100):
        if rig.committed:
            break
        await asyncio.sleep(0.01)
    assert [(r.id, o.status) for r, o in rig.committed] == [(punch.id, "accepted")]


async def test_rejections_are_answered_and_store_nothing(
    rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    stored = request(tenant)
    assert (await submit(rig.broker, stored)).status == "accepted"
    outcomes = await asyncio.gather(
        submit(rig.broker, request(tenant, employee="nobody")),
        submit(rig.broker, request(tenant, employee=None, badge="b404")),
        submit(rig.broker, stored._replace(kind="out")),
        submit(rig.broker, request(tenant, only_employee="e2")),
    )
    assert [(o.status, o.reason) for o in outcomes] == [
        ("rejected", "unknown_employee"),
        ("rejected", "unknown_employee"),
        ("rejected", "id_conflict"),
        ("rejected", "forbidden"),
    ]
    assert await stored_count(owner, tenant) == 1


async def test_many_punches_at_once_each_get_their_own_answer(
    rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    punches = [request(tenant, kind=("in", "out")[n % 2]) for n in range(300)]
    outcomes = await asyncio.gather(*(submit(rig.broker, p) for p in punches))
    assert {o.status for o in outcomes} == {"accepted"}
    assert await stored_count(owner, tenant) == 300
    await rig.broker.flush()
    if rig.redis is not None and rig.keys is not None:
        # Answered entries are deleted (once checked, a moment after their answers): the
        # stream does not grow with the punches.
        for _ in range(500):
            if await rig.redis.xlen(rig.keys.punches) == 0:
                break
            await asyncio.sleep(0.01)
        assert await rig.redis.xlen(rig.keys.punches) == 0


async def test_published_events_come_back_to_be_applied_in_order(rig: Rig, tenant: str) -> None:
    punch = request(tenant, source="manual", reason="forgot")
    outcome = PunchOutcome("accepted", punch.received_at, None, "e1", "hq", "One")
    now = datetime.now(UTC)
    events: list[PresenceEvent] = [
        PunchesCommitted([(punch, outcome)], now),
        EmployeeRenamed(tenant, "e1", "Uno"),
        ClockTicked(now),
    ]
    for event in events:
        rig.broker.publish(event)
    for _ in range(200):
        if len(rig.events) >= len(events):
            break
        await asyncio.sleep(0.01)
    assert rig.events == events


async def test_committed_punches_are_checked_and_their_alerts_stored_once(
    rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    # The device's clock is an hour slow: clock skew.
    skewed = request(tenant, at=datetime.now(UTC) - timedelta(hours=1))
    assert (await submit(rig.broker, skewed)).status == "accepted"
    resent = skewed._replace(received_at=datetime.now(UTC))
    assert (await submit(rig.broker, resent)).status == "duplicate"
    for _ in range(500):
        if any(isinstance(e, AlertsRaised) for e in rig.events):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    raised = [a for e in rig.events if isinstance(e, AlertsRaised) for a in e.alerts]
    # The resend may announce it again (it could be a redelivered batch whose announcement
    # was lost); it is the same alert, which hubs show once.
    assert {(a.id, a.kind, a.employee, a.detail["punch"]) for a in raised} == {
        (raised[0].id, "clock_skew", "e1", str(skewed.id))
    }
    stored = await owner.fetch("SELECT kind FROM alerts WHERE tenant = $1", tenant)
    assert [r["kind"] for r in stored] == ["clock_skew"]


def checks_processes() -> list[int]:
    """The pids of this process's children running ``workers.aside``."""
    return [
        proc.pid
        for proc in processes()
        if proc.parent == os.getpid() and b"workers.aside" in proc.command
    ]


async def alerts_about(rig: Rig, punch: PunchRequest) -> list[str]:
    """The kinds of the alerts announced about ``punch``, once there are any (10 s at most)."""
    for _ in range(1000):
        kinds = [
            a.kind
            for e in rig.events
            if isinstance(e, AlertsRaised)
            for a in e.alerts
            if a.detail["punch"] == str(punch.id)
        ]
        if kinds:
            return kinds
        await asyncio.sleep(0.01)
    return []


async def test_a_checks_process_that_dies_is_replaced(
    pool: asyncpg.Pool, database: str, tenant: str
) -> None:
    found: list[PresenceEvent] = []
    rig = Rig(LocalBroker(pool, database, settings(), found.append), found)
    await rig.broker.start(LiveFloors(Live(1), pool))
    try:
        [first] = checks_processes()
        skewed = request(tenant, at=datetime.now(UTC) - timedelta(hours=1))
        assert (await submit(rig.broker, skewed)).status == "accepted"
        assert await alerts_about(rig, skewed) == ["clock_skew"]
        os.kill(first, signal.SIGKILL)
        for _ in range(500):
            if (now := checks_processes()) and now != [first]:
                break
            await asyncio.sleep(0.01)
        assert now != [first] and len(now) == 1
        # Punches are acked whether or not a checks process runs; the new one checks them.
        later = request(tenant, kind="out", at=datetime.now(UTC) - timedelta(hours=1))
        assert (await submit(rig.broker, later)).status == "accepted"
        assert await alerts_about(rig, later) == ["clock_skew"]
    finally:
        await rig.broker.stop()
    assert checks_processes() == []


async def test_the_checks_process_stops_cleanly_with_the_hub(
    pool: asyncpg.Pool, database: str, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    found: list[PresenceEvent] = []
    rig = Rig(LocalBroker(pool, database, settings(), found.append), found)
    await rig.broker.start(LiveFloors(Live(1), pool))
    skewed = request(tenant, at=datetime.now(UTC) - timedelta(hours=1))
    assert (await submit(rig.broker, skewed)).status == "accepted"
    with caplog.at_level(logging.ERROR, logger="workers.aside"):
        await rig.broker.stop()
    assert [r.getMessage() for r in caplog.records if r.name == "workers.aside"] == []
    assert checks_processes() == []
    # What it was handed before the stop was checked and announced.
    assert await alerts_about(rig, skewed) == ["clock_skew"]


async def test_stopping_answers_what_waits(rig: Rig, tenant: str) -> None:
    await rig.stop_workers()
    waiting = asyncio.ensure_future(submit(rig.broker, request(tenant)))
    await asyncio.sleep(0.05)
    await rig.broker.stop()
    try:
        outcome = await waiting
    except StoreUnavailable:
        return
    # The in-process broker commits what is queued before it stops.
    assert outcome.status == "accepted"
    assert isinstance(rig.broker, LocalBroker)


# -- Redis only -------------------------------------------------------------------------------


@pytest.fixture
async def redis_rig(pool: asyncpg.Pool, redis_server: str, redis_prefix: str) -> AsyncIterator[Rig]:
    found: list[PresenceEvent] = []
    keys = RedisKeys(redis_prefix)
    broker = RedisBroker(redis_server, keys, uuid.uuid4().hex, found.append, ack_timeout_s=1)
    client = aioredis.Redis.from_url(redis_server)
    made = Rig(broker, found, client, keys, pool)
    await broker.start(LiveFloors(Live(1), pool))
    yield made
    await made.stop_workers()
    await broker.stop()
    await client.aclose()


async def test_without_a_worker_a_punch_times_out_unanswered_and_is_stored_later(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    punch = request(tenant)
    with pytest.raises(StoreUnavailable, match="no worker answered"):
        await submit(redis_rig.broker, punch)
    assert await stored_count(owner, tenant) == 0
    # The entry waits in the stream: the first worker to come commits it.
    redis_rig.run_worker("late")
    for _ in range(300):
        if await stored_count(owner, tenant):
            break
        await asyncio.sleep(0.02)
    assert await stored_count(owner, tenant) == 1
    # The client resends (the hub stamps each copy's receipt): the punch is already there.
    resent = punch._replace(received_at=datetime.now(UTC))
    assert (await submit(redis_rig.broker, resent)).status == "duplicate"


async def test_a_worker_started_again_reads_its_own_unanswered_punches_first(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    assert redis_rig.redis is not None and redis_rig.keys is not None
    crashed = redis_rig.worker("steady-name")
    await crashed.ensure_group()
    punch = request(tenant)
    await redis_rig.add_entry(punch, 1)
    # Read, and then the worker "dies" before committing.
    taken = await redis_rig.redis.xreadgroup(
        WORKER_GROUP, "steady-name", {redis_rig.keys.punches: ">"}, count=10
    )
    assert len(taken[0][1]) == 1
    # Another consumer reading new entries does not see it.
    other = await redis_rig.redis.xreadgroup(
        WORKER_GROUP, "other", {redis_rig.keys.punches: ">"}, count=10
    )
    assert other == [] or other[0][1] == []
    redis_rig.run_worker("steady-name")
    for _ in range(300):
        if await stored_count(owner, tenant):
            break
        await asyncio.sleep(0.02)
    assert await stored_count(owner, tenant) == 1
    # Acknowledged once answered, a moment after the commit.
    for _ in range(300):
        pending = await redis_rig.redis.xpending(redis_rig.keys.punches, WORKER_GROUP)
        if not pending["pending"]:
            break
        await asyncio.sleep(0.02)
    assert pending["pending"] == 0


async def test_the_janitor_takes_over_a_dead_workers_punches(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    assert redis_rig.redis is not None and redis_rig.keys is not None
    janitor = redis_rig.worker("janitor", claim_idle_ms=2000)
    await janitor.ensure_group()
    punches = [request(tenant) for _ in range(5)]
    for n, punch in enumerate(punches):
        await redis_rig.add_entry(punch, n)
    await redis_rig.redis.xreadgroup(WORKER_GROUP, "dead", {redis_rig.keys.punches: ">"}, count=10)
    # Not idle long enough yet: left alone.
    assert await janitor.reclaim() == 0
    await asyncio.sleep(2.1)
    assert await janitor.reclaim() == 5
    assert await stored_count(owner, tenant) == 5
    pending = await redis_rig.redis.xpending(redis_rig.keys.punches, WORKER_GROUP)
    assert pending["pending"] == 0


async def test_an_entry_delivered_too_often_goes_to_the_dead_letters(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    assert redis_rig.redis is not None and redis_rig.keys is not None
    janitor = redis_rig.worker("janitor", claim_idle_ms=100, deliveries=3)
    await janitor.ensure_group()
    punch = request(tenant)
    entry = await redis_rig.add_entry(punch, 7)
    # Three workers take it in turn and die without answering.
    for name in ("a", "b", "c"):
        if name == "a":
            await redis_rig.redis.xreadgroup(
                WORKER_GROUP, name, {redis_rig.keys.punches: ">"}, count=1
            )
        else:
            await asyncio.sleep(0.15)
            await redis_rig.redis.xclaim(
                redis_rig.keys.punches, WORKER_GROUP, name, min_idle_time=100, message_ids=[entry]
            )
    await asyncio.sleep(0.15)
    assert await janitor.reclaim() == 0
    dead = await redis_rig.redis.xrange(redis_rig.keys.dead_letters)
    assert len(dead) == 1
    fields = dead[0][1]
    assert (fields[b"entry"], fields[b"punch"]) == (entry, ENCODER.encode(punch))
    assert b"delivered 3 times" in fields[b"why"]
    assert await stored_count(owner, tenant) == 0
    pending = await redis_rig.redis.xpending(redis_rig.keys.punches, WORKER_GROUP)
    assert pending["pending"] == 0


async def test_an_unreadable_entry_goes_to_the_dead_letters_and_the_rest_are_stored(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection
) -> None:
    assert redis_rig.redis is not None and redis_rig.keys is not None
    redis_rig.run_worker("w")
    await redis_rig.redis.xadd(redis_rig.keys.punches, {b"hub": b"x", b"punch": b"\xc1"})
    assert (await submit(redis_rig.broker, request(tenant))).status == "accepted"
    dead = await redis_rig.redis.xrange(redis_rig.keys.dead_letters)
    assert [fields[b"why"].startswith(b"unreadable entry") for _, fields in dead] == [True]


async def test_a_worker_survives_a_batch_that_fails_unexpectedly(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.stream

    real = workers.stream.commit_punches
    failures = [RuntimeError("a bug in the commit")]

    async def fail_once(pool: asyncpg.Pool, requests: list[PunchRequest], **options: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(pool, requests, **options)

    monkeypatch.setattr(workers.stream, "commit_punches", fail_once)
    redis_rig.run_worker("w")
    with pytest.raises(StoreUnavailable, match="internal error"):
        await submit(redis_rig.broker, request(tenant))
    # The same worker goes on storing.
    assert (await submit(redis_rig.broker, request(tenant))).status == "accepted"
    assert await stored_count(owner, tenant) == 1


async def test_every_hub_applies_every_event_in_one_order(
    redis_rig: Rig, redis_server: str, tenant: str
) -> None:
    other_events: list[PresenceEvent] = []
    assert redis_rig.keys is not None
    other = RedisBroker(
        redis_server, redis_rig.keys, uuid.uuid4().hex, other_events.append, ack_timeout_s=1
    )
    await other.start(LiveFloors(Live(1), redis_rig.pool))
    try:
        now = datetime.now(UTC)
        # Both publish at once: whatever the interleaving, both hubs apply the same sequence.
        for n in range(50):
            redis_rig.broker.publish(EmployeeRenamed(tenant, "e1", f"A{n}"))
            other.publish(EmployeeRenamed(tenant, "e1", f"B{n}"))
        other.publish(ClockTicked(now))
        for _ in range(300):
            if len(redis_rig.events) >= 101 and len(other_events) >= 101:
                break
            await asyncio.sleep(0.01)
        assert len(redis_rig.events) == 101
        assert redis_rig.events == other_events
    finally:
        await other.stop()


# -- Shared floors: checkpoints and hub liveness (Redis only) ---------------------------------


@pytest.fixture
async def redis_client(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server)
    yield client
    await client.aclose()


@pytest.fixture
def keys(redis_prefix: str) -> RedisKeys:
    return RedisKeys(redis_prefix)


class CountingFloors(LiveFloors):
    """A hub's real floors, counting how often they were built from PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.live = Live(base_version=time.time_ns() // 1000)
        super().__init__(self.live, pool)
        self.rebuilt = 0

    async def rebuild(self) -> None:
        self.rebuilt += 1
        await super().rebuild()


@dataclass
class LiveHub:
    """A Redis broker applying presence events to real floors, as a hub process does."""

    broker: RedisBroker
    floors: CountingFloors
    events: list[PresenceEvent]

    def versions(self, tenant: str) -> tuple[int, int, int]:
        live = self.floors.live
        floor, board = live.floor(tenant), live.board(tenant)
        return (
            floor.channel("hq").version,
            floor.me_channel("e1").version,
            board.channel("hq").version,
        )


@pytest.fixture
async def live_hubs(
    pool: asyncpg.Pool, redis_server: str, redis_prefix: str
) -> AsyncIterator[Callable[[], LiveHub]]:
    made: list[LiveHub] = []

    def make() -> LiveHub:
        floors = CountingFloors(pool)
        events: list[PresenceEvent] = []

        def apply(event: PresenceEvent) -> None:
            events.append(event)
            floors.live.apply(event)

        broker = RedisBroker(
            redis_server, RedisKeys(redis_prefix), uuid.uuid4().hex, apply, ack_timeout_s=1
        )
        made.append(LiveHub(broker, floors, events))
        return made[-1]

    yield make
    for live_hub in made:
        await live_hub.broker.stop()


def moves(tenant: str, n: int) -> list[PresenceEvent]:
    """Events that move all three kinds of channel: a rename, a punch, a terminal."""
    now = datetime.now(UTC)
    punch = request(tenant, at=now)
    outcome = PunchOutcome(status="accepted", received_at=now, employee="e1", site="hq", name="One")
    return [
        EmployeeRenamed(tenant, "e1", f"One {n}"),
        PunchesCommitted([(punch, outcome)], now),
        TerminalConnected(tenant, f"door-{n}", "hq", "some-hub", now),
    ]


async def applied(live_hub: LiveHub, count: int) -> None:
    for _ in range(500):
        if len(live_hub.events) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(live_hub.events)} events applied, not {count}")


async def test_a_hub_that_starts_later_counts_versions_on_from_the_others(
    live_hubs: Callable[[], LiveHub], tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub.broker, "CHECKPOINT_INTERVAL_S", 0.2)
    first = live_hubs()
    await first.broker.start(first.floors)
    for n in range(3):
        for event in moves(tenant, n):
            first.broker.publish(event)
    await applied(first, 9)
    # A checkpoint after some of the events, then more events before the second hub starts.
    await asyncio.sleep(0.5)
    for event in moves(tenant, 3):
        first.broker.publish(event)
    await applied(first, 12)
    second = live_hubs()
    await second.broker.start(second.floors)
    assert (first.floors.rebuilt, second.floors.rebuilt) == (1, 0)
    assert second.versions(tenant) == first.versions(tenant)
    for event in moves(tenant, 4):
        second.broker.publish(event)
    await applied(first, 15)
    await applied(second, 3)
    await asyncio.sleep(0.1)
    assert second.versions(tenant) == first.versions(tenant)
    assert second.floors.dump() == first.floors.dump()
    base = first.floors.live.floor(tenant).channel("elsewhere").version
    assert [v - base for v in first.versions(tenant)] == [9, 9, 5]


async def test_hubs_that_start_together_build_the_floors_once(
    live_hubs: Callable[[], LiveHub], tenant: str
) -> None:
    hubs = [live_hubs() for _ in range(3)]
    await asyncio.gather(*(h.broker.start(h.floors) for h in hubs))
    assert sorted(h.floors.rebuilt for h in hubs) == [0, 0, 1]
    for event in moves(tenant, 0):
        hubs[2].broker.publish(event)
    for h in hubs:
        await applied(h, 3)
    assert len({h.floors.dump() for h in hubs}) == 1


async def test_a_checkpoint_the_stream_has_moved_past_is_built_again(
    live_hubs: Callable[[], LiveHub], redis_client: aioredis.Redis, keys: RedisKeys, tenant: str
) -> None:
    first = live_hubs()
    await first.broker.start(first.floors)
    stale = await redis_client.get(keys.checkpoint)
    for event in moves(tenant, 0):
        first.broker.publish(event)
    await applied(first, 3)
    await first.broker.stop()
    # The entries after the checkpoint are trimmed away: it cannot be caught up from.
    await redis_client.xtrim(keys.presence, maxlen=1, approximate=False)
    await redis_client.set(keys.checkpoint, stale)
    second = live_hubs()
    await second.broker.start(second.floors)
    assert second.floors.rebuilt == 1
    assert await redis_client.get(keys.checkpoint) != stale


async def test_a_hub_that_stops_refreshing_its_key_has_its_terminals_taken_offline(
    live_hubs: Callable[[], LiveHub], tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub.broker, "HUB_TTL_S", 0.5)
    monkeypatch.setattr(hub.broker, "HUB_REFRESH_S", 0.05)
    watcher, other = live_hubs(), live_hubs()
    await watcher.broker.start(watcher.floors)
    await other.broker.start(other.floors)
    now = datetime.now(UTC)
    # A socket on a hub that never had a key, one on each live hub.
    for device, on in (
        ("d-dead", "dead-hub"),
        ("d1", watcher.broker.hub),
        ("d2", other.broker.hub),
    ):
        watcher.broker.publish(TerminalConnected(tenant, device, "hq", on, now))
    await applied(other, 3)
    for _ in range(200):
        if any(isinstance(e, HubGone) for e in other.events):
            break
        await asyncio.sleep(0.01)
    gone = [e.hub for e in other.events if isinstance(e, HubGone)]
    assert set(gone) == {"dead-hub"}
    online = {
        member.device: member.online
        for member in other.floors.live.board(tenant).snapshot("hq").members
        if isinstance(member, TerminalMember)
    }
    assert online == {"d-dead": False, "d1": True, "d2": True}
    # The other hub stops (as if killed: its key is left to expire).
    await other.broker.stop()
    for _ in range(300):
        if other.broker.hub in [e.hub for e in watcher.events if isinstance(e, HubGone)]:
            break
        await asyncio.sleep(0.01)
    board = watcher.floors.live.board(tenant).snapshot("hq")
    assert {m.device: m.online for m in board.members if isinstance(m, TerminalMember)} == {
        "d-dead": False,
        "d1": True,
        "d2": False,
    }


async def test_a_running_hub_writes_the_checkpoint_again_when_redis_lost_it(
    live_hubs: Callable[[], LiveHub],
    redis_client: aioredis.Redis,
    keys: RedisKeys,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub.broker, "HUB_REFRESH_S", 0.05)
    first = live_hubs()
    await first.broker.start(first.floors)
    for event in moves(tenant, 0):
        first.broker.publish(event)
    await applied(first, 3)
    # As if Redis came back empty (the stream too: new entries follow on anyway).
    await redis_client.delete(keys.checkpoint, keys.presence)
    for _ in range(200):
        if await redis_client.exists(keys.checkpoint):
            break
        await asyncio.sleep(0.01)
    second = live_hubs()
    await second.broker.start(second.floors)
    assert second.floors.rebuilt == 0
    assert second.versions(tenant) == first.versions(tenant)


async def test_a_hub_that_finds_a_stale_checkpoint_waits_for_the_running_hubs_fresh_one(
    live_hubs: Callable[[], LiveHub],
    redis_client: aioredis.Redis,
    keys: RedisKeys,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub.broker, "CHECKPOINT_INTERVAL_S", 0.5)
    running = live_hubs()
    await running.broker.start(running.floors)
    stale = await redis_client.get(keys.checkpoint)
    for event in moves(tenant, 0):
        running.broker.publish(event)
    await applied(running, 3)
    # The running hub's checkpoint is replaced by a stale one, whose entries are trimmed.
    await redis_client.xtrim(keys.presence, maxlen=1, approximate=False)
    await redis_client.set(keys.checkpoint, stale)
    starting = live_hubs()
    await starting.broker.start(starting.floors)
    # Not a second sequence built from PostgreSQL: the running hub's, taken over.
    assert starting.floors.rebuilt == 0
    assert starting.versions(tenant) == running.versions(tenant)


async def test_an_unreadable_checkpoint_is_built_again(
    live_hubs: Callable[[], LiveHub], redis_client: aioredis.Redis, keys: RedisKeys
) -> None:
    await redis_client.set(keys.checkpoint, b"\x93not a checkpoint")
    starting = live_hubs()
    await starting.broker.start(starting.floors)
    assert starting.floors.rebuilt == 1
    held = await redis_client.get(keys.checkpoint)
    assert held is not None and hub.broker.CHECKPOINT_DECODER.decode(held).state


async def test_redis_losing_its_data_does_not_make_live_hubs_look_dead(
    live_hubs: Callable[[], LiveHub],
    redis_client: aioredis.Redis,
    keys: RedisKeys,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub.broker, "HUB_TTL_S", 0.5)
    monkeypatch.setattr(hub.broker, "HUB_REFRESH_S", 0.05)
    watcher = live_hubs()
    await watcher.broker.start(watcher.floors)
    # Another hub, alive, holding a socket; it refreshes its key more slowly than the watcher.
    await redis_client.set(keys.hub("slow-hub"), b"1", px=60_000)
    watcher.broker.publish(TerminalConnected(tenant, "door", "hq", "slow-hub", datetime.now(UTC)))
    await applied(watcher, 1)
    await asyncio.sleep(0.7)
    # Redis comes back empty; the slow hub sets its key again 0.2 s later.
    await redis_client.delete(*[key async for key in redis_client.scan_iter(f"{keys.prefix}:*")])
    await asyncio.sleep(0.2)
    await redis_client.set(keys.hub("slow-hub"), b"1", px=60_000)
    await asyncio.sleep(0.7)
    assert not [e for e in watcher.events if isinstance(e, HubGone)]


async def test_a_batch_that_could_not_be_checked_is_checked_when_read_again(
    redis_rig: Rig, tenant: str, owner: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.checks

    real = workers.checks.Checker.check
    outages = [OSError("PostgreSQL went away")]

    async def flaky(self: Any, stored: Any) -> Any:
        if outages:
            raise outages.pop()
        return await real(self, stored)

    monkeypatch.setattr(workers.checks.Checker, "check", flaky)
    worker = redis_rig.worker("w", claim_idle_ms=300)
    redis_rig.workers.append((worker, asyncio.create_task(worker.run())))
    skewed = request(tenant, at=datetime.now(UTC) - timedelta(hours=1))
    # Stored and answered at once, checked only on the second reading.
    assert (await submit(redis_rig.broker, skewed)).status == "accepted"
    for _ in range(500):
        if any(isinstance(e, AlertsRaised) for e in redis_rig.events):
            break
        await asyncio.sleep(0.01)
    raised = [a for e in redis_rig.events if isinstance(e, AlertsRaised) for a in e.alerts]
    assert [a.kind for a in raised] == ["clock_skew"]
    assert outages == []
    assert redis_rig.redis is not None and redis_rig.keys is not None
    for _ in range(200):
        if (await redis_rig.redis.xpending(redis_rig.keys.punches, WORKER_GROUP))["pending"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await redis_rig.redis.xpending(redis_rig.keys.punches, WORKER_GROUP))["pending"] == 0
    assert await stored_count(owner, tenant) == 1
