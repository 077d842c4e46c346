"""SIGTERM: the hub leaves the load balancer at once and sends its clients away over the
drain window, not all in one moment (docs/operations.md, "Crashes and signals")."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import TEST_SECRET
from tests.support import Client, provisioned_tenant, running_hub

pytestmark = [pytest.mark.postgres, pytest.mark.one_server]

SOCKETS = 40
WINDOW_S = 2.0


async def _drain_time(client: Client) -> float:
    """When the client got `drain` (monotonic), after checking it is followed by 1012."""
    while True:
        frame = await client.recv(timeout=30)
        if frame["type"] == "drain":
            at = time.monotonic()
            assert 500 <= frame["reconnect_after_ms"] <= 3000, frame
            await client.ws.wait_closed()
            assert client.ws.close_code == 1012
            return at


@pytest.mark.timeout(90)
async def test_sigterm_fails_readyz_at_once_and_spreads_the_drain_over_the_window(
    database: str, tmp_path: Path
) -> None:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_DRAIN_WINDOW_S": str(WINDOW_S),
    }
    with running_hub(tmp_path, env) as hub:
        async with provisioned_tenant(hub.base_url, database, TEST_SECRET, "drain") as kit:
            clients = [await kit.connect() for _ in range(SOCKETS)]
            waiting = [asyncio.create_task(_drain_time(c)) for c in clients]
            async with httpx.AsyncClient(base_url=hub.base_url, timeout=5) as http:
                assert (await http.get("/readyz")).status_code == 200
                hub.signal(signal.SIGTERM)
                signalled = time.monotonic()
                # Out of the load balancer before the first client is sent away.
                while True:
                    try:
                        ready = await http.get("/readyz")
                    except httpx.ConnectError:
                        pytest.fail("the hub stopped listening before /readyz answered 503")
                    if ready.status_code == 503:
                        break
                    assert time.monotonic() - signalled < 1.0, "readyz still 200 after 1 s"
                assert "draining" in ready.json()["error"]["message"]
                # New sockets are refused before the handshake, not let in to be sent away.
                with pytest.raises(websockets.InvalidStatus) as refused:
                    await websockets.connect(kit.ws_url, open_timeout=5)
                response = refused.value.response
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "2"
                assert json.loads(response.body)["error"]["code"] == "draining"
            times = sorted(await asyncio.gather(*waiting))
            returncode = await asyncio.to_thread(hub.wait, 30)
            assert returncode == 0, hub.log()
            # Spread: the last client leaves most of a window after the first.
            spread = times[-1] - times[0]
            assert spread >= WINDOW_S / 2, f"all {SOCKETS} clients left within {spread:.2f} s"
            # Evenly: the middle client leaves in the middle, not in a burst at either end.
            middle = times[SOCKETS // 2] - times[0]
            assert 0.2 * spread < middle < 0.8 * spread, f"{middle:.2f} s of {spread:.2f} s"
