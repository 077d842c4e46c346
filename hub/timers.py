"""Many deadlines under one timer of the event loop.

Every socket has two deadlines for all of its life: its next keepalive ping and its token's
expiry. As ``loop.call_later`` handles they cost about half a KiB each (the handle, a copy of
the context, the bound method), a tenth of an idle socket. Here each is a three-item list
in one heap, and the loop holds a single handle for the earliest of them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable
from typing import Any, Final

# A deadline: [when (loop time), sequence number, callback, or None once cancelled].
Deadline = list[Any]
CLOCK_RESOLUTION_S: Final = 0.001

_BY_LOOP: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines]] = (
    weakref.WeakKeyDictionary()
)


class Deadlines:
    """Callbacks to run at given loop times, in order; cancelled ones are skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Deadline] = []
        self._order = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._cancelled = 0
        self._firing = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Deadlines:
        """The loop's own."""
        deadlines = _BY_LOOP.get(loop)
        if deadlines is None:
            deadlines = _BY_LOOP[loop] = cls(loop)
        return deadlines

    def at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Run ``callback`` at loop time ``when``; the result can be ``cancel``led."""
        deadline: Deadline = [when, next(self._order), callback]
        heapq.heappush(self._heap, deadline)
        if self._heap[0] is deadline:
            self._arm()
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        if deadline[2] is None:
            return
        deadline[2] = None
        self._cancelled += 1
        # Far deadlines (a token's, days away) of sockets long gone would pile up. Not while
        # firing: that walks the heap.
        if not self._firing and self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            self._heap = [d for d in self._heap if d[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
            self._arm()

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._heap:
            self._handle = self._loop.call_at(self._heap[0][0], self._fire)

    def _fire(self) -> None:
        self._handle = None
        heap = self._heap
        # A loop's timer may fire up to its clock's resolution early (uvloop's: 1 ms); what
        # falls due within it runs now rather than in another turn of the loop.
        now = self._loop.time() + CLOCK_RESOLUTION_S
        self._firing = True
        try:
            while heap and heap[0][0] <= now:
                deadline = heapq.heappop(heap)
                callback, deadline[2] = deadline[2], None
                if callback is None:
                    self._cancelled -= 1
                else:
                    callback()
        finally:
            self._firing = False
            self._arm()
