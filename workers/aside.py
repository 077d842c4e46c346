"""What a one-process hub does beside answering: the fraud checks of committed punches and
the periodic overtime scan, on an event loop of their own in a thread, with pools of their own.

On the hub's event loop they held up every ack behind them: a checked batch builds its rows
and runs numpy between its queries, and a scan works through every active employee's week.
Here they take the processor in the interpreter's switch intervals (5 ms) at most, and
their queries wait on connections the acks do not need. What they raise comes back to the
hub's loop as one ``AlertsRaised`` per checked batch or scan.

With Redis, stream workers run the same checks and scan (``workers/stream.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Final

import asyncpg

from hub import store
from hub.config import Settings
from hub.events import Alert, AlertsRaised, PresenceEvent
from workers.checks import Checker
from workers.persist import PunchOutcome, PunchRequest
from workers.scan import OvertimeScan

log = logging.getLogger(__name__)

# Most committed punches one check takes at once, and how long a stopping hub waits for
# the checks of what it committed.
CHECK_BATCH_MAX: Final = 4096
CHECK_DRAIN_S: Final = 5.0

Stored = list[tuple[PunchRequest, PunchOutcome]]


class Aside:
    """The checks and (``scan``) the overtime scan in a thread, telling ``on_event`` (on
    the loop that called ``start``) of the alerts they raise."""

    def __init__(
        self,
        dsn: str,
        settings: Settings,
        on_event: Callable[[PresenceEvent], None],
        *,
        scan: bool = True,
    ) -> None:
        self._dsn = dsn
        self._settings = settings
        self._on_event = on_event
        self._scan_too = scan
        self._hub_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._to_check: asyncio.Queue[Stored] | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Run the thread; return once its pools are open (raise if they cannot be)."""
        self._hub_loop = asyncio.get_running_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._run(started),), name="checks", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(started)

    def check(self, stored: Stored) -> None:
        """Have these committed punches checked (call from the hub's loop)."""
        if self._loop is not None and self._to_check is not None:
            self._loop.call_soon_threadsafe(self._to_check.put_nowait, stored)

    async def stop(self) -> None:
        """Check what was handed over (unless that takes over ``CHECK_DRAIN_S``), then stop."""
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the thread's loop ended on its own
            self._loop.call_soon_threadsafe(self._stopping.set)
        await asyncio.to_thread(self._thread.join)

    def _announce(self, alerts: list[Alert]) -> None:
        assert self._hub_loop is not None
        self._hub_loop.call_soon_threadsafe(self._on_event, AlertsRaised(alerts))

    async def _run(self, started: concurrent.futures.Future[None]) -> None:
        try:
            pool = await store.create_pool(self._dsn, min_size=1, max_size=2)
        except BaseException as error:
            started.set_exception(error)
            return
        system: asyncpg.Pool | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            if self._scan_too:
                system = await store.create_system_pool(self._dsn, max_size=1)
            self._loop = asyncio.get_running_loop()
            self._to_check = asyncio.Queue()
            self._stopping = asyncio.Event()
            checker = Checker.from_settings(pool, self._settings)
            tasks.append(asyncio.create_task(self._checks(checker)))
            if system is not None:
                scan = OvertimeScan(system, self._settings.scan_interval_s)
                tasks.append(asyncio.create_task(self._scans(scan)))
            started.set_result(None)
            await self._stopping.wait()
            # What was committed is checked before the process goes, unless that takes long.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_check.join(), CHECK_DRAIN_S)
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
            else:
                log.exception("the checks' thread failed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for made in (pool, system):
                if made is not None:
                    await made.close()

    async def _checks(self, checker: Checker) -> None:
        """Check committed batches as they come (those waiting together), after their acks."""
        assert self._to_check is not None
        while True:
            batch = await self._to_check.get()
            taken = 1
            while not self._to_check.empty() and len(batch) < CHECK_BATCH_MAX:
                batch = batch + self._to_check.get_nowait()
                taken += 1
            try:
                alerts = await checker.check(batch)
                if alerts:
                    self._announce(alerts)
            except Exception:
                log.exception("the fraud checks failed on a batch of %d punches", len(batch))
            for _ in range(taken):
                self._to_check.task_done()

    async def _scans(self, scan: OvertimeScan) -> None:
        async def announce(alerts: list[Alert]) -> None:
            self._announce(alerts)

        while True:
            await asyncio.sleep(scan.interval_s)
            try:
                await scan.scan(announce)
            except Exception:
                log.exception("the overtime scan failed; it runs again in %.0f s", scan.interval_s)
