"""uvicorn's sans-I/O WebSocket protocol, letting the application cork its writes,
parsing no further ahead of the application than it must, and shutting out flooders.

Under ASGI every ``websocket.send`` becomes its own ``transport.write``, which
the transport turns into its own ``send()`` syscall while its buffer is empty.
A commit acks several punches of the same terminal at once, and one syscall
per ack was the largest single cost in the hub's profile. This protocol's
transport can be corked: while corked it collects what is written, and
uncorking hands it to the real transport in one piece. The application gets
``cork`` and ``uncork`` through the ASGI scope's extensions, under
``CORK_EXTENSION``, and ``write_frame``: it writes a message it framed itself
(``frame_message``), which spares uvicorn's framing of each message per socket.

uvicorn stops reading a socket while the application has a message it has not
taken, but it parses all of what one read returned (up to 256 KiB, thousands of
small frames) first, and once the application has sent a close frame it reads
and parses everything the client still sends while it waits for the client's
close frame. For a client the hub has stopped reading because it is over its
rate, or has closed for flooding, that is exactly the work the limit is meant to
spare. So this protocol hands the parser at most ``PARSE_SLICE`` bytes at a time
and keeps the rest until the application has taken what was parsed; and after a
close for abuse (``SHUT_OUT_CODES``) it sends the close frame and a FIN, reads
nothing more, and closes the socket after ``SHUT_OUT_LINGER_S``.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from hub.timers import Deadline, Deadlines

CORK_EXTENSION: Final = "attendance.cork"
# Bytes of input handed to the WebSocket parser at a time.
PARSE_SLICE: Final = 4 * 1024
# Closes for abuse (flood, slow consumer): nothing the client sends afterwards is parsed.
SHUT_OUT_CODES: Final = frozenset({4008, 4009})
# How long a shut-out client's socket stays open for the close frame to reach it.
SHUT_OUT_LINGER_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class Framed:
    """Encoded messages, and the same messages framed by ``frame_message`` and joined.

    A fan-out builds one for every socket of a codec: written as one piece.
    """

    payloads: tuple[bytes, ...]
    data: bytes


def frame_message(payload: bytes, binary: bool) -> bytes:
    """One whole, unmasked server frame (RFC 6455 section 5.2) carrying ``payload``.

    A server's frames are not masked, so one framed message can be written as it is
    to every socket that should get it: a fan-out frames a delta once, not per socket.
    Without RSV1 it is also valid on a connection that negotiated permessage-deflate
    (RFC 7692: such a message is simply not compressed).
    """
    opcode = 0x82 if binary else 0x81
    length = len(payload)
    if length < 126:
        header = bytes((opcode, length))
    elif length < 1 << 16:
        header = struct.pack("!BBH", opcode, 126, length)
    else:
        header = struct.pack("!BBQ", opcode, 127, length)
    return header + payload


class CorkableTransport(asyncio.Transport):
    """A transport that, while corked, collects its writes and joins them on uncork.

    Uncorked, writes go straight through. Closing sends what is pending first, so
    a close frame still follows everything written before it; aborting drops
    what is pending, as aborting a real transport drops its buffer.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._pending: list[bytes] = []
        self._corked = False

    def cork(self) -> None:
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        self._flush()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._corked:
            if data:
                self._pending.append(bytes(data))
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        pending = self._pending
        if not pending or self._transport.is_closing():
            pending.clear()
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class Inbox(asyncio.Queue[ASGIReceiveEvent]):
    """What the protocol uses of an ``asyncio.Queue`` (``put_nowait``, ``get``, ``empty``,
    ``qsize``), for its one reader, in a list and at most one future.

    An ``asyncio.Queue`` is four deques of 760 bytes from the start: 3 KiB of every idle
    socket, for a queue that holds a message or two (reading pauses while one waits).
    """

    def __init__(self) -> None:  # not the Queue's: its deques are what this spares
        self._items: list[ASGIReceiveEvent] = []
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> ASGIReceiveEvent:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Flag(asyncio.Event):
    """An ``asyncio.Event`` (set at first) whose waiters' list is made when one waits: the
    protocol's ``writable`` flag is waited on only while a socket's buffer is full."""

    def __init__(self) -> None:  # not the Event's: its deque is what this spares
        self._value = True
        self._waiting: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> Literal[True]:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
        return True


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol over a ``CorkableTransport``.

    Pass the class itself as uvicorn's ``ws`` option. The scope of every
    connection carries ``{"cork": ..., "uncork": ...}`` under ``CORK_EXTENSION``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()
        self.writable = Flag()
        # The next keepalive ping, among all sockets' (hub/timers.py), not a handle of its own.
        self.ping_deadline: Deadline | None = None

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        deadlines = Deadlines.of(self.loop)
        self.ping_deadline = deadlines.at(self.loop.time() + delay, self.send_keepalive_ping)

    def send_keepalive_ping(self) -> None:
        self.ping_deadline = None
        super().send_keepalive_ping()

    def stop_keepalive(self) -> None:
        if self.ping_deadline is not None:
            Deadlines.of(self.loop).cancel(self.ping_deadline)
            self.ping_deadline = None
        super().stop_keepalive()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.corkable = CorkableTransport(cast(asyncio.Transport, transport))
        # Input read from the socket but not parsed yet.
        self.backlog = bytearray()
        self.shut_out = False
        super().connection_made(self.corkable)

    def data_received(self, data: bytes) -> None:
        if self.shut_out:
            return
        if not self.backlog and len(data) <= PARSE_SLICE:
            super().data_received(data)
            return
        self.backlog += data
        self._parse_backlog()

    def _parse_backlog(self) -> None:
        """Parse slices of the backlog until a message waits for the application (or none is left).

        uvicorn sets ``read_paused`` and pauses the transport when it queues a message,
        so a backlog is left over only while the transport is paused: it stays bounded
        by one read.
        """
        backlog = self.backlog
        while backlog and not self.read_paused and not self.shut_out:
            piece = bytes(backlog[:PARSE_SLICE])
            del backlog[:PARSE_SLICE]
            super().data_received(piece)

    async def receive(self) -> ASGIReceiveEvent:
        message = await self.queue.get()
        if self.read_paused and self.queue.empty() and not self.shut_out:
            self.read_paused = False
            # What was read but not parsed comes first; it may queue a message and pause again.
            self._parse_backlog()
            if not self.read_paused:
                self.transport.resume_reading()
        return message

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if (
            message["type"] == "websocket.http.response.body"
            and not message.get("more_body", False)
            and self.close_sent
        ):
            # A handshake refused with a response of ours (503 while draining, 429, 403) is
            # over: uvicorn (0.54) would otherwise log "ASGI callable returned without
            # completing handshake" as an error, once per refusal.
            self.handshake_complete = True
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # What only the handshake needed, 1-3 KiB a socket for all of its life: the
            # request and response (and their headers), and the request's headers in the
            # scope (the application read what it wanted of them before accepting). The
            # request itself lives on in a local of websockets' parser (a generator that
            # parses frames from then on), so its headers are emptied in place.
            self.request.headers.clear()
            del self.request, self.response
            self.scope["headers"] = []
            # Nor what else of the scope only the handshake needed (uvicorn's own log lines
            # after it use the client and the path, which stay).
            scope = cast(dict[str, Any], self.scope)
            for key in ("asgi", "state", "subprotocols", "raw_path", "query_string", "extensions"):
                scope.pop(key, None)
        if (
            message["type"] == "websocket.close"
            and message.get("code") in SHUT_OUT_CODES
            and self.handshake_complete
            and self.close_sent
            and not self.shut_out
        ):
            self._shut_out()

    def _shut_out(self) -> None:
        """After a close for abuse: send a FIN, read nothing more, close the socket soon.

        Not reading keeps the client's flood in its own buffers, and TCP stops it.
        """
        self.shut_out = True
        self.backlog.clear()
        self.stop_keepalive()
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.read_paused = True
        transport.pause_reading()
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(SHUT_OUT_LINGER_S, transport.close)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            # The application task is created but has not run yet, so it sees this.
            cork: dict[str, Any] = {
                "cork": self.corkable.cork,
                "uncork": self.corkable.uncork,
                "write_frame": self.write_frame,
                "write_now": self.write_now,
            }
            scope["extensions"][CORK_EXTENSION] = cork

    def write_now(self, data: bytes) -> bool:
        """Write framed messages at once if the transport takes them without waiting.

        False (nothing written) while the transport's buffer is over its high-water
        mark, or once the connection is closing: then the caller queues them instead.
        """
        if (
            not self.writable.is_set()
            or self.disconnected
            or self.close_sent
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(data)
        return True

    async def write_frame(self, data: bytes) -> None:
        """Write a frame made by ``frame_message``, with the flow control ``send`` applies.

        Like ``send``, it waits while the transport's buffer is over its high-water mark,
        and raises ``ClientDisconnected`` once the client is gone.
        """
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if self.close_sent or self.transport.is_closing():
            return
        self.transport.write(data)
