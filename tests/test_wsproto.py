"""The hub's WebSocket protocol (hub/wsproto.py): a transport the application can cork,
input parsed no further ahead of the application than it must be, and flooders shut out.

The transport tests wrap one end of a real socket pair and read what reaches
the other end; the protocol tests run it under a real uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import uvicorn
import websockets

from hub.wsproto import (
    CORK_EXTENSION,
    PARSE_SLICE,
    SHUT_OUT_LINGER_S,
    CorkableTransport,
    HubWebSocketProtocol,
)


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


# -- parsing no further ahead than the application, shutting out flooders ---------------------

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class Recording(HubWebSocketProtocol):
    """The hub's protocol, counting the bytes it hands to the WebSocket parser."""

    made: ClassVar[list[Recording]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.parsed = 0
        parse = self.conn.receive_data

        def counted(data: bytes) -> None:
            self.parsed += len(data)
            parse(data)

        self.conn.receive_data = counted  # type: ignore[method-assign]
        Recording.made.append(self)


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[int]:
    Recording.made.clear()
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, ws=Recording, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def client_frame(text: str) -> bytes:
    """A masked text frame as a client sends it (RFC 6455 section 5.2), payload under 126 bytes."""
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def raw_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client by hand, so that it can do what well-behaved libraries refuse to."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


FRAMES = 3000


async def test_input_is_parsed_no_further_than_a_slice_ahead_of_the_application() -> None:
    reading = asyncio.Event()
    received: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        received.append((await receive())["text"])
        await reading.wait()
        while len(received) < FRAMES:
            received.append((await receive())["text"])
        await send({"type": "websocket.send", "text": f"got {len(received)}"})
        await receive()

    async with serving(app) as port:
        reader, writer = await raw_client(port)
        frames = [client_frame(f"frame {n:05}") for n in range(FRAMES)]
        # All at once, far more than a slice: they fit in the socket buffers.
        writer.write(b"".join(frames))
        await writer.drain()
        await asyncio.sleep(0.5)
        [protocol] = Recording.made
        # The handshake and one slice, no more: the rest waits unparsed (the server reads
        # up to 256 KiB at a time) until the application asks for it.
        assert protocol.parsed < 2 * PARSE_SLICE < len(frames[0]) * FRAMES
        assert 0 < protocol.queue.qsize() <= PARSE_SLICE // len(frames[0])
        reading.set()
        reply = await asyncio.wait_for(reader.readexactly(2 + len(f"got {FRAMES}")), 10)
        assert reply[2:] == f"got {FRAMES}".encode()
        # Every frame arrived, once and in order.
        assert received == [f"frame {n:05}" for n in range(FRAMES)]
        writer.close()


@pytest.mark.parametrize(("code", "shut_out"), [(4008, True), (4009, True), (1000, False)])
async def test_after_a_close_for_abuse_nothing_more_is_parsed_and_the_socket_closes(
    code: int, shut_out: bool
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": code})

    async with serving(app) as port:
        reader, writer = await raw_client(port)
        writer.write(client_frame("hello"))
        # The close frame: FIN + opcode 8, length 2, the code.
        assert await asyncio.wait_for(reader.readexactly(4), 10) == bytes(
            [0x88, 2, *code.to_bytes(2, "big")]
        )
        [protocol] = Recording.made
        parsed_at_close = protocol.parsed
        # A flooder ignores the close and keeps sending.
        flood = client_frame("more") * 20_000
        writer.write(flood)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if shut_out:
            # The hub sends a FIN after its close frame and parses nothing more.
            assert await asyncio.wait_for(reader.read(), SHUT_OUT_LINGER_S + 5) == b""
            await asyncio.sleep(SHUT_OUT_LINGER_S + 0.5 - (loop.time() - started))
            assert protocol.parsed == parsed_at_close
            assert protocol.transport.is_closing()
        else:
            # An ordinary close waits for the client's close frame, parsing what comes first.
            writer.write(client_frame("last") + bytes([0x88, 0x82]) + b"\0\0\0\0" + b"\x03\xe8")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert protocol.parsed >= parsed_at_close + len(flood)
        writer.close()
