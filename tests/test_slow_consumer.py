"""A dashboard that stops reading: closed with 4009, while punches keep being acked."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import websockets

from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)

pytestmark = pytest.mark.postgres

ON_THE_FLOOR = 300
WINDOW = 100


@pytest.fixture
def small_queues(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_SEND_QUEUE_BYTES": str(64 * 1024),
        # The terminal and the dashboard send far more than real ones would, on purpose.
        "ATTENDANCE_RATE_PER_S": "0",
    }
    with running_hub(tmp_path_factory.mktemp("slow-consumer"), env) as process:
        yield process


async def punch_in_windows(door: Client, frames: list[dict[str, object]]) -> list[str]:
    """Punches with a window in flight, as a terminal replaying its queue keeps; their statuses."""
    statuses = []
    for start in range(0, len(frames), WINDOW):
        window = frames[start : start + WINDOW]
        for frame in window:
            await door.send(frame)
        statuses += [(await door.recv(timeout=30))["status"] for _ in window]
    return statuses


async def crowd_the_floor(kit: TenantKit) -> None:
    """Employees with long names, so that every snapshot of the floor is large."""
    conn = await asyncpg.connect(kit.dsn)
    try:
        await conn.execute(
            "INSERT INTO employees (tenant, id, name, site) "
            "SELECT $1, 'w' || n, repeat('N', 200), 'hq' FROM generate_series(1, $2) AS n",
            kit.slug,
            ON_THE_FLOOR,
        )
    finally:
        await conn.close()


async def test_a_dashboard_that_stops_reading_is_closed_and_slows_no_punch(
    small_queues: HubProcess, database: str
) -> None:
    async with provisioned_tenant(small_queues.base_url, database, TEST_SECRET, "s") as kit:
        await crowd_the_floor(kit)
        door = await kit.connect()
        base = datetime.now(UTC) - timedelta(hours=5)
        arrivals = [
            punch_frame(f"w{n}", at=(base + timedelta(seconds=n)).isoformat())
            for n in range(1, ON_THE_FLOOR + 1)
        ]
        assert await punch_in_windows(door, arrivals) == ["accepted"] * ON_THE_FLOOR
        supervisor = kit.token("supervisor", "lead", sites=["hq"])
        # A small receive buffer and a one-message client queue: what the hub writes backs up
        # into the hub soon, not into megabytes of kernel buffers on loopback.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", small_queues.port))
        sock.setblocking(False)
        ws = await websockets.connect(
            kit.ws_url,
            sock=sock,
            subprotocols=[JSON],  # type: ignore[list-item]
            max_queue=1,
            max_size=2**24,
        )
        dashboard = Client(ws, JSON)
        assert (await dashboard.hello(supervisor))["type"] == "welcome"
        await dashboard.send({"type": "subscribe", "channel": "presence:hq"})
        assert (await dashboard.recv())["type"] == "subscribed"
        snapshot = await dashboard.recv()
        assert len(snapshot["members"]) == ON_THE_FLOOR
        # From here on it reads nothing, and asks for a large snapshot again and again.
        for _ in range(200):
            await dashboard.send({"type": "subscribe", "channel": "presence:hq"})
        # Meanwhile the door punches on; every punch is also a delta for the dashboard.
        leavings = [
            punch_frame(f"w{n}", kind="out", at=(base + timedelta(hours=1, seconds=n)).isoformat())
            for n in range(1, ON_THE_FLOOR + 1)
        ]
        assert await punch_in_windows(door, leavings) == ["accepted"] * ON_THE_FLOOR
        await door.close()
        # Now read: whatever was in the buffers, then the end. The close frame arrives if it
        # could be written within 2 s of the decision; otherwise the hub aborted the
        # connection, as documented.
        code = None
        try:
            while True:
                await asyncio.wait_for(dashboard.ws.recv(), 20)
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
        assert code in (4009, None)
        assert "does not read its frames" in small_queues.log()
        assert await kit.count_punches() == 2 * ON_THE_FLOOR
