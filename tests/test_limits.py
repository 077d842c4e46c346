"""Per-connection limits that need their own hub settings: hello timeout, slow consumers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import websockets

from tests.conftest import TEST_SECRET
from tests.support import HubProcess, TenantKit, provisioned_tenant, punch_frame, running_hub

# The hub under test, not the database, is what these exercise: one server is enough.
pytestmark = [pytest.mark.postgres, pytest.mark.one_server]


@pytest.fixture(scope="module")
def strict_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_HELLO_TIMEOUT_S": "1",
        "ATTENDANCE_SEND_QUEUE_FRAMES": "16",
    }
    with running_hub(tmp_path_factory.mktemp("strict-hub"), env) as process:
        yield process


@pytest.fixture
async def strict_tenant(strict_hub: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    async with provisioned_tenant(strict_hub.base_url, database, TEST_SECRET, "s") as kit:
        yield kit


async def test_no_hello_in_time_closes_4002(strict_tenant: TenantKit) -> None:
    ws = await websockets.connect(strict_tenant.ws_url)
    error = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert error["code"] == "hello_timeout"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002


def _stalled_client(port: int, token: str) -> socket.socket:
    """A WebSocket client that completes the handshake and hello, then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    _send_text(sock, json.dumps({"type": "hello", "token": token}))
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        header = bytes([0x81, 0x80 | len(payload)])
    else:
        header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    sock.sendall(header + mask + masked)


async def test_a_client_that_does_not_read_is_dropped_and_others_carry_on(
    strict_tenant: TenantKit, strict_hub: HubProcess
) -> None:
    stalled = _stalled_client(strict_hub.port, strict_tenant.terminal_token)
    healthy = await strict_tenant.connect()
    ping = json.dumps({"type": "ping", "t": 1, "ref": "x" * 60})
    dropped = False
    loop = asyncio.get_running_loop()
    # Every ping asks for a pong the stalled client never reads; its buffers and
    # then its outbound queue fill up, and the hub must let it go.
    deadline = loop.time() + 20
    batch = 0
    while loop.time() < deadline:
        batch += 1
        try:
            await loop.run_in_executor(None, _send_many, stalled, ping, 500)
        except OSError:
            dropped = True
            break
        if batch % 20 == 0:
            ack = await healthy.punch(punch_frame("e1"))
            assert ack["status"] == "accepted"
    stalled.close()
    assert dropped, "the hub kept a client that reads nothing"
    assert (await healthy.punch(punch_frame("e2")))["status"] == "accepted"
    await healthy.close()


def _send_many(sock: socket.socket, text: str, count: int) -> None:
    sock.settimeout(10)
    for _ in range(count):
        _send_text(sock, text)


async def test_frames_other_than_hello_do_not_extend_the_hello_deadline(
    strict_tenant: TenantKit,
) -> None:
    ws = await websockets.connect(strict_tenant.ws_url)
    codes = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(20):  # 20 x 0.25 s is far past the 1 s deadline
            await ws.send("garbage")
            codes.append(json.loads(await asyncio.wait_for(ws.recv(), 5))["code"])
            await asyncio.sleep(0.25)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002
    assert "bad_frame" in codes and len(codes) < 10
