"""Nothing is lost: a real hub process is killed, terminated and cut off mid-stream.

Every test starts its own hub against the test database, so it can kill it.
The simulated terminals behave as the contract asks of a client: keep every
punch until it is acked, and on any disconnect reconnect and resend every
punch not yet acked. The accounting at the end compares what was sent with
what PostgreSQL holds.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import websockets
from websockets.typing import Subprotocol

from tests.conftest import TEST_SECRET
from tests.support import JSON, Client, HubProcess, TenantKit, free_port, punch_frame

# Several processes against one database: which server it is on tells nothing more.
pytestmark = [pytest.mark.postgres, pytest.mark.one_server]

# How long a whole stream may take, kill and restart included, before the test fails.
STREAM_DEADLINE_S = 45.0
# Reconnect backoff: full jitter between these bounds, doubling per failed attempt.
BACKOFF_MIN_S = 0.02
BACKOFF_MAX_S = 0.5
# After `error unavailable`: how long a terminal waits before sending that punch again.
UNAVAILABLE_BACKOFF_S = 0.25


async def _start_hub(database: str, log_path: Path) -> HubProcess:
    hub = HubProcess(
        port=free_port(),
        env={"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET},
        log_path=log_path,
    )
    await asyncio.to_thread(hub.start)
    return hub


async def _stop_hub(hub: HubProcess) -> None:
    """Stop what is left of the hub, however the test ended."""
    popen = hub.popen
    if popen is None or popen.poll() is not None:
        return
    popen.kill()
    await asyncio.to_thread(popen.wait, 10)


@pytest.fixture
async def hub(database: str, tmp_path: Path) -> AsyncIterator[HubProcess]:
    """A hub process of this test's own, on a free port, that the test may kill and restart."""
    process = await _start_hub(database, tmp_path / "hub.log")
    try:
        yield process
    finally:
        await _stop_hub(process)


@pytest.fixture
async def kit(hub: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    """A tenant on this test's hub: site `hq`, employees e1..e3, terminal `door`."""
    tenant = TenantKit(hub.base_url, database, TEST_SECRET, f"f-{uuid.uuid4().hex[:10]}")
    await tenant.create()
    await tenant.provision()
    try:
        yield tenant
    finally:
        await tenant.close()


async def _restart(hub: HubProcess, expected_returncode: int) -> None:
    """Wait for the hub process to exit, check how, and start it again on the same port."""
    returncode = await asyncio.to_thread(hub.wait, 30)
    assert returncode == expected_returncode, (returncode, hub.log())
    await asyncio.to_thread(hub.start)


async def _stored_rows(kit: TenantKit) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(kit.dsn)
    try:
        return list(
            await conn.fetch(
                "SELECT id::text AS id, employee, kind, at FROM punches WHERE tenant = $1",
                kit.slug,
            )
        )
    finally:
        await conn.close()


async def _poll(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        await asyncio.sleep(0.02)


def _punches(terminal: int, count: int, base: datetime) -> list[dict[str, Any]]:
    """A terminal's day: distinct events an hour ago, each with a client-chosen uuid."""
    kinds = ("in", "break_start", "break_end", "out")
    return [
        punch_frame(
            f"e{(terminal + n) % 3 + 1}",
            kind=kinds[n % 4],
            at=(base + timedelta(milliseconds=terminal * 10_000 + n)).isoformat(),
            method="badge",
            seq=n,
            ref=f"t{terminal}-{n}",
        )
        for n in range(count)
    ]


@dataclass
class Tally:
    """What all terminals of one test sent and heard; `on_ack` lets a test strike mid-stream."""

    on_ack: Callable[[int], None] = lambda acked: None
    acked: int = 0
    frames_sent: int = 0
    resent: int = 0
    connections: int = 0
    acks: dict[str, list[str]] = field(default_factory=dict)

    def ack(self, punch_id: str, status: str) -> None:
        self.acks.setdefault(punch_id, []).append(status)
        self.acked += 1
        self.on_ack(self.acked)


@dataclass
class Link:
    """One connection's story, for the drain checks."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    close_code: int | None = None
    # Punches to send on this connection, and not before when (after `unavailable`).
    to_send: deque[str] = field(default_factory=deque)
    hold_until: float = 0.0


class Terminal:
    """A punch clock: keeps every punch until acked, resends all unacked ones on reconnect.

    ``url`` may name several hubs (as a load balancer would spread them): a connection
    that cannot be made is tried at the next one.
    """

    def __init__(
        self,
        url: str | list[str],
        token: str,
        punches: list[dict[str, Any]],
        window: int,
        tally: Tally,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        self.token = token
        self.punches = punches
        self.unacked: dict[str, dict[str, Any]] = {p["id"]: p for p in punches}
        self.window = window
        self.tally = tally
        self.ever_sent: set[str] = set()
        self.links: list[Link] = []
        self.problems: list[str] = []
        self._not_before = 0.0

    async def run(self, deadline: float) -> None:
        while self.unacked:
            client = await self._connect(deadline)
            link = Link()
            self.links.append(link)
            try:
                await self._stream(client, link)
            except websockets.ConnectionClosed as closed:
                link.close_code = closed.rcvd.code if closed.rcvd is not None else None
                await self._read_leftovers(client, link)
            except (OSError, TimeoutError):
                pass  # The connection is gone either way: reconnect and resend.
            finally:
                await client.ws.close()

    async def _connect(self, deadline: float) -> Client:
        ceiling = BACKOFF_MIN_S
        while True:
            wait = self._not_before - time.monotonic()
            if wait > 0:
                # The hub asked us (drain) to stay away for a while.
                await asyncio.sleep(wait)
            assert time.monotonic() < deadline, "the hub did not come back before the deadline"
            try:
                ws = await websockets.connect(
                    self.urls[0], subprotocols=[Subprotocol(JSON)], open_timeout=5, max_size=2**20
                )
            except (OSError, TimeoutError, websockets.WebSocketException):
                self.urls.append(self.urls.pop(0))
                await asyncio.sleep(random.uniform(BACKOFF_MIN_S, ceiling))
                ceiling = min(ceiling * 2, BACKOFF_MAX_S)
                continue
            client = Client(ws, JSON)
            try:
                welcome = await client.hello(self.token)
            except (OSError, TimeoutError, websockets.WebSocketException):
                await ws.close()
                continue
            assert welcome["type"] == "welcome", welcome
            self.tally.connections += 1
            return client

    async def _stream(self, client: Client, link: Link) -> None:
        to_send = link.to_send
        to_send.extend(self.unacked)
        while self.unacked:
            holding = link.hold_until - time.monotonic()
            while holding <= 0 and to_send and len(link.in_flight) < self.window:
                punch_id = to_send.popleft()
                if punch_id not in self.unacked:
                    continue
                await client.send(self.unacked[punch_id])
                self.tally.frames_sent += 1
                if punch_id in self.ever_sent:
                    self.tally.resent += 1
                self.ever_sent.add(punch_id)
                link.in_flight.add(punch_id)
            if holding > 0 and to_send:
                # Waiting to resend what the hub could not store: hear acks meanwhile.
                try:
                    frame = await client.recv(timeout=holding)
                except TimeoutError:
                    continue
            else:
                frame = await client.recv(timeout=15)
            self._handle(frame, link)

    async def _read_leftovers(self, client: Client, link: Link) -> None:
        # A send can fail on a closed connection while frames the server sent
        # before closing (acks, `drain`) still wait unread in the buffer.
        while True:
            try:
                frame = await client.recv(timeout=5)
            except (websockets.ConnectionClosed, OSError, TimeoutError):
                return
            self._handle(frame, link)

    def _handle(self, frame: dict[str, Any], link: Link) -> None:
        link.frames.append(frame)
        match frame["type"]:
            case "ack":
                punch_id = frame["id"]
                if frame["status"] not in ("accepted", "duplicate"):
                    self.problems.append(f"{punch_id}: {frame}")
                self.unacked.pop(punch_id, None)
                link.in_flight.discard(punch_id)
                self.tally.ack(punch_id, frame["status"])
            case "drain":
                self._not_before = time.monotonic() + frame["reconnect_after_ms"] / 1000
            case "error" if frame["code"] == "unavailable":
                # Not stored: keep it, and send it again a moment later (or on the next
                # connection, if this one closes meanwhile).
                punch_id = frame.get("id") or self._id_of(frame.get("ref"))
                link.in_flight.discard(punch_id)
                link.to_send.append(punch_id)
                link.hold_until = time.monotonic() + UNAVAILABLE_BACKOFF_S
            case _:
                self.problems.append(f"unexpected frame {frame}")

    def _id_of(self, ref: str | None) -> str:
        for punch in self.punches:
            if punch["ref"] == ref:
                return str(punch["id"])
        raise AssertionError(f"an error frame about an unknown ref {ref!r}")


def _terminals(
    kit: TenantKit,
    count: int,
    per_terminal: int,
    window: int,
    tally: Tally,
    urls: list[str] | None = None,
) -> list[Terminal]:
    """``count`` terminals of the kit's device; each starts at a hub of ``urls`` in turn."""
    base = datetime.now(UTC) - timedelta(hours=1)
    hubs = urls or [kit.ws_url]
    return [
        Terminal(
            hubs[n % len(hubs) :] + hubs[: n % len(hubs)],
            kit.terminal_token,
            _punches(n, per_terminal, base),
            window,
            tally,
        )
        for n in range(count)
    ]


async def _account(kit: TenantKit, terminals: list[Terminal], tally: Tally) -> str:
    """Check every punch was acked and stored exactly once, as sent; return the numbers."""
    sent = {p["id"]: p for t in terminals for p in t.punches}
    rows = await _stored_rows(kit)
    stored = Counter(r["id"] for r in rows)
    numbers = (
        f"{len(sent)} distinct punches sent in {tally.frames_sent} frames "
        f"({tally.resent} resends over {tally.connections} connections), "
        f"{len(rows)} rows stored"
    )
    problems = [p for t in terminals for p in t.problems]
    assert not problems, f"{numbers}; bad replies: {problems[:5]}"
    unacked = [i for t in terminals for i in t.unacked]
    assert not unacked, f"{numbers}; {len(unacked)} never acked"
    assert set(tally.acks) == set(sent), numbers
    twice = [i for i, statuses in tally.acks.items() if statuses.count("accepted") > 1]
    assert not twice, f"{numbers}; accepted more than once: {twice[:5]}"
    lost = set(sent) - set(stored)
    assert not lost, f"{numbers}; {len(lost)} acked punches are not stored"
    assert len(rows) == len(sent), f"{numbers}; expected exactly one row per punch"
    assert set(stored.values()) == {1}, numbers
    for row in rows:
        punch = sent[row["id"]]
        assert (row["employee"], row["kind"], row["at"]) == (
            punch["employee"],
            punch["kind"],
            datetime.fromisoformat(punch["at"]),
        ), f"stored row differs from what was sent: {dict(row)} vs {punch}"
    return numbers


def _start(terminals: list[Terminal]) -> asyncio.Future[Any]:
    deadline = time.monotonic() + STREAM_DEADLINE_S
    return asyncio.gather(*(t.run(deadline) for t in terminals))


async def _until(stream: asyncio.Future[Any], strike: asyncio.Event) -> None:
    """Return once `strike` is set; fail if the stream ends first or it never comes."""
    struck: asyncio.Future[Any] = asyncio.ensure_future(strike.wait())
    done, _ = await asyncio.wait({stream, struck}, timeout=30, return_when="FIRST_COMPLETED")
    if struck in done:
        return
    struck.cancel()
    if stream.done():
        stream.result()  # Re-raises a terminal's failure, if that is why it ended.
        pytest.fail("the stream finished before the fault was injected")
    stream.cancel()
    pytest.fail("the fault was never injected")


@pytest.mark.timeout(90)
async def test_sigkill_mid_stream_from_many_terminals_loses_nothing(
    hub: HubProcess, kit: TenantKit
) -> None:
    terminals_n, per_terminal, window = 30, 60, 4
    total = terminals_n * per_terminal
    # Killed twice: a third of the way in, and again a third of the rest after the
    # restart, when resends and new punches are both under way.
    killed = [asyncio.Event(), asyncio.Event()]
    next_kill: list[int] = [total // 3]
    at_kill: list[tuple[int, int]] = []

    def kill_mid_stream(acked: int) -> None:
        if next_kill and acked >= next_kill[0]:
            next_kill.clear()
            hub.signal(signal.SIGKILL)
            at_kill.append((acked, sum(len(t.ever_sent) for t in terminals)))
            killed[len(at_kill) - 1].set()

    tally = Tally(on_ack=kill_mid_stream)
    terminals = _terminals(kit, terminals_n, per_terminal, window, tally)
    stream = _start(terminals)
    try:
        for strike in killed:
            await _until(stream, strike)
            await _restart(hub, -signal.SIGKILL)
            if len(at_kill) < len(killed):
                # Armed only now, so that no kill lands while the hub is still starting.
                next_kill.append(tally.acked + (total - tally.acked) // 3)
        await asyncio.wait_for(stream, STREAM_DEADLINE_S)
    finally:
        stream.cancel()
    numbers = await _account(kit, terminals, tally)
    for acked, sent in at_kill:
        assert acked < sent < total, f"a kill was not mid-stream: {acked} acked, {sent} sent"
    assert tally.resent > 0, f"nothing was resent after the kills: {numbers}"
    duplicates = sum(s.count("duplicate") for s in tally.acks.values())
    print(
        f"\nSIGKILL at (acks, distinct punches sent) {at_kill}: {numbers}; "
        f"{duplicates} resends answered duplicate (committed, ack lost)"
    )


@pytest.mark.timeout(90)
async def test_sigterm_drains_sends_1012_and_keeps_every_acked_punch(
    hub: HubProcess, kit: TenantKit
) -> None:
    terminals_n, per_terminal, window = 10, 60, 4
    total = terminals_n * per_terminal
    terminated = asyncio.Event()
    acked_before: set[str] = set()

    def terminate_a_third_of_the_way(acked: int) -> None:
        if acked == total // 3 and not terminated.is_set():
            hub.signal(signal.SIGTERM)
            terminated.set()

    tally = Tally(on_ack=terminate_a_third_of_the_way)
    terminals = _terminals(kit, terminals_n, per_terminal, window, tally)
    stream = _start(terminals)
    try:
        await _until(stream, terminated)
        returncode = await asyncio.to_thread(hub.wait, 30)
        assert returncode == 0, f"hub exited {returncode} after SIGTERM:\n{hub.log()}"
        # Everything acked so far was acked by the process that has just exited.
        acked_before = set(tally.acks)
        stored_now = {r["id"] for r in await _stored_rows(kit)}
        missing = acked_before - stored_now
        assert not missing, (
            f"{len(missing)} of {len(acked_before)} punches acked before the shutdown are "
            f"not stored ({len(stored_now)} rows)"
        )
        assert len(acked_before) < total, "every punch was acked before SIGTERM"
        for n, terminal in enumerate(terminals):
            drained = [link for link in terminal.links if link.close_code == 1012]
            assert drained, f"terminal {n} was not closed with 1012: {terminal.links}"
            last = drained[0].frames
            assert last and last[-1]["type"] == "drain", (
                f"terminal {n}: the last frame before 1012 is not `drain`: {last[-3:]}"
            )
            after_ms = last[-1]["reconnect_after_ms"]
            assert isinstance(after_ms, int) and after_ms > 0, last[-1]
        # The hub comes back; the terminals resend what was never acked.
        await asyncio.to_thread(hub.start)
        await asyncio.wait_for(stream, STREAM_DEADLINE_S)
    finally:
        stream.cancel()
    numbers = await _account(kit, terminals, tally)
    print(f"\nSIGTERM after {len(acked_before)} acks: {numbers}")


async def _send_and_lose_the_ack(
    kit: TenantKit, hub: HubProcess, punch: dict[str, Any], how: str
) -> None:
    client = await kit.connect()
    await client.send(punch)
    if how == "client_abort_after_commit":
        # The punch is committed, its ack is on the wire, and the connection dies unread.
        await _poll(
            lambda: _is_stored(kit, punch["id"]), "the punch to be committed before the cut"
        )
        client.ws.transport.abort()
    elif how == "client_abort_at_once":
        client.ws.transport.abort()
    else:
        hub.signal(signal.SIGKILL)
        await _restart(hub, -signal.SIGKILL)
    await client.ws.close()


async def _is_stored(kit: TenantKit, punch_id: str) -> bool:
    return bool(await kit.stored(punch_id))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["client_abort_after_commit", "client_abort_at_once", "sigkill"])
async def test_punch_whose_ack_was_lost_is_stored_once_when_resent(
    hub: HubProcess, kit: TenantKit, how: str
) -> None:
    punch = punch_frame("e2", kind="in", ref="lost")
    await _send_and_lose_the_ack(kit, hub, punch, how)
    client = await kit.connect()
    ack = await client.punch(punch)
    await client.close()
    assert ack["id"] == punch["id"] and ack["ref"] == "lost", ack
    if how == "client_abort_after_commit":
        assert ack["status"] == "duplicate", ack
    else:
        assert ack["status"] in ("accepted", "duplicate"), ack
    rows = await _stored_rows(kit)
    assert [r["id"] for r in rows] == [punch["id"]], f"1 punch sent, {len(rows)} rows stored"
    assert (rows[0]["employee"], rows[0]["kind"]) == ("e2", "in")
    assert rows[0]["at"] == datetime.fromisoformat(punch["at"])
