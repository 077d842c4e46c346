"""The hub's WebSocket protocol (hub/wsproto.py): a transport the application can cork.

The transport tests wrap one end of a real socket pair and read what reaches
the other end; the last test runs the protocol under a real uvicorn.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
import websockets

from hub.wsproto import CORK_EXTENSION, CorkableTransport, HubWebSocketProtocol


class _Holder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport


@dataclass
class Pair:
    corkable: CorkableTransport
    inner: asyncio.Transport
    peer: socket.socket
    writes: list[bytes] = field(default_factory=list)

    async def read_all(self) -> bytes:
        """Everything the peer receives until our side closes."""
        loop = asyncio.get_running_loop()
        chunks = []
        while chunk := await loop.sock_recv(self.peer, 65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    holder = _Holder()
    await loop.connect_accepted_socket(lambda: holder, ours)
    inner = holder.transport
    assert inner is not None
    built = Pair(CorkableTransport(inner), inner, peer)
    real_write = inner.write

    def counted(data: bytes | bytearray | memoryview) -> None:
        built.writes.append(bytes(data))
        real_write(data)

    # Count what reaches the real transport (the selector transport is a Python object).
    inner.write = counted  # type: ignore[method-assign]
    yield built
    inner.abort()
    peer.close()


async def test_uncorked_writes_go_straight_through(pair: Pair) -> None:
    pair.corkable.write(b"one ")
    pair.corkable.write(b"two")
    assert pair.writes == [b"one ", b"two"]
    pair.corkable.close()
    assert await pair.read_all() == b"one two"


async def test_corked_writes_leave_in_one_write_on_uncork(pair: Pair) -> None:
    pair.corkable.cork()
    for frame in (b"one ", b"two ", b"three "):
        pair.corkable.write(frame)
    assert pair.writes == [] and pair.corkable.get_write_buffer_size() == len(b"one two three ")
    pair.corkable.uncork()
    assert pair.writes == [b"one two three "]
    pair.corkable.write(b"four")
    assert pair.writes == [b"one two three ", b"four"]
    pair.corkable.close()
    assert await pair.read_all() == b"one two three four"


async def test_close_sends_what_is_pending_first(pair: Pair) -> None:
    pair.corkable.cork()
    pair.corkable.write(b"last ack ")
    pair.corkable.write(b"close frame")
    pair.corkable.close()
    assert pair.corkable.is_closing()
    assert await pair.read_all() == b"last ack close frame"


async def test_abort_drops_what_is_pending(pair: Pair) -> None:
    pair.corkable.write(b"sent")
    pair.corkable.cork()
    pair.corkable.write(b"never sent")
    pair.corkable.abort()
    pair.corkable.uncork()
    assert pair.writes == [b"sent"]
    assert await pair.read_all() == b"sent"


async def test_what_is_pending_when_the_transport_closed_is_dropped(pair: Pair) -> None:
    pair.corkable.cork()
    pair.corkable.write(b"too late")
    pair.inner.close()
    pair.corkable.uncork()
    assert pair.writes == []
    assert await pair.read_all() == b""


async def test_uvicorn_hands_the_cork_to_the_application() -> None:
    seen: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        cork = scope["extensions"].get(CORK_EXTENSION)
        seen.append(cork is not None)
        await receive()
        await send({"type": "websocket.accept"})
        cork["cork"]()
        for n in range(3):
            await send({"type": "websocket.send", "text": f"frame {n}"})
        cork["uncork"]()
        await receive()

    # A socket already listening: the client's connect waits in its backlog until uvicorn runs.
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    config = uvicorn.Config(app, ws=HubWebSocketProtocol, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as client:
            assert [await client.recv() for _ in range(3)] == ["frame 0", "frame 1", "frame 2"]
        assert seen == [True]
    finally:
        server.should_exit = True
        await serving
