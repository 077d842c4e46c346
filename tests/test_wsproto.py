"""The write-joining transport under the hub's WebSocket protocol (hub/wsproto.py).

Each test wraps one end of a real socket pair and reads what reaches the other end.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from hub.wsproto import CorkedTransport


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport


@dataclass
class Pair:
    corked: CorkedTransport
    inner: asyncio.Transport
    peer: socket.socket
    writes: list[bytes] = field(default_factory=list)

    async def read_all(self) -> bytes:
        """Everything the peer receives until the corked side closes."""
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
    recorder = _Recorder()
    await loop.connect_accepted_socket(lambda: recorder, ours)
    inner = recorder.transport
    assert inner is not None
    built = Pair(CorkedTransport(inner, loop), inner, peer)
    real_write = inner.write

    def counted(data: bytes | bytearray | memoryview) -> None:
        built.writes.append(bytes(data))
        real_write(data)

    # Count what reaches the real transport (the selector transport is a Python object).
    inner.write = counted  # type: ignore[method-assign]
    yield built
    inner.abort()
    peer.close()


async def test_writes_of_one_loop_turn_reach_the_socket_in_one_write(pair: Pair) -> None:
    for frame in (b"one ", b"two ", b"three "):
        pair.corked.write(frame)
    assert pair.writes == [] and pair.corked.get_write_buffer_size() == len(b"one two three ")
    await asyncio.sleep(0)
    assert pair.writes == [b"one two three "]

    pair.corked.write(b"four")
    await asyncio.sleep(0)
    assert pair.writes == [b"one two three ", b"four"]
    pair.corked.close()
    assert await pair.read_all() == b"one two three four"


async def test_close_sends_what_is_pending_first(pair: Pair) -> None:
    pair.corked.write(b"last ack ")
    pair.corked.write(b"close frame")
    pair.corked.close()
    assert pair.corked.is_closing()
    assert await pair.read_all() == b"last ack close frame"


async def test_abort_drops_what_is_pending(pair: Pair) -> None:
    pair.corked.write(b"sent")
    await asyncio.sleep(0)
    pair.corked.write(b"never sent")
    pair.corked.abort()
    await asyncio.sleep(0)
    assert pair.writes == [b"sent"]
    assert await pair.read_all() == b"sent"


async def test_a_write_after_the_transport_closed_is_dropped_quietly(pair: Pair) -> None:
    pair.inner.close()
    pair.corked.write(b"too late")
    await asyncio.sleep(0)
    assert pair.writes == []
    assert await pair.read_all() == b""


async def test_empty_writes_schedule_nothing(pair: Pair) -> None:
    pair.corked.write(b"")
    await asyncio.sleep(0)
    assert pair.writes == [] and pair.corked.get_write_buffer_size() == 0
