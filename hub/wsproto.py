"""uvicorn's sans-I/O WebSocket protocol, letting the application cork its writes.

Under ASGI every ``websocket.send`` becomes its own ``transport.write``, which
the transport turns into its own ``send()`` syscall while its buffer is empty.
A commit acks several punches of the same terminal at once, and one syscall
per ack was the largest single cost in the hub's profile. This protocol's
transport can be corked: while corked it collects what is written, and
uncorking hands it to the real transport in one piece. The application gets
``cork`` and ``uncork`` through the ASGI scope's extensions, under
``CORK_EXTENSION``; nothing else about uvicorn's protocol changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

CORK_EXTENSION: Final = "attendance.cork"


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


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol over a ``CorkableTransport``.

    Pass the class itself as uvicorn's ``ws`` option. The scope of every
    connection carries ``{"cork": ..., "uncork": ...}`` under ``CORK_EXTENSION``.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.corkable = CorkableTransport(cast(asyncio.Transport, transport))
        super().connection_made(self.corkable)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            # The application task is created but has not run yet, so it sees this.
            cork: dict[str, Callable[[], None]] = {
                "cork": self.corkable.cork,
                "uncork": self.corkable.uncork,
            }
            scope["extensions"][CORK_EXTENSION] = cork
