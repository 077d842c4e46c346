"""What a one-process hub does beside answering: the fraud checks of committed punches and
the periodic overtime scan, in a child process with pools of its own.

On the hub's event loop they held up every ack behind them: a checked batch builds its rows
and runs numpy between its queries, and a scan works through every active employee's week.
In a thread they still took the interpreter's lock from the loop that acks, for up to 5 ms
each time it let go of it for a system call. In a process of their own they share only the
processor, and with two cores or more not even that.

The hub (``Aside``) writes each committed batch to the child's stdin; the child
(``python -m workers.aside``) answers on its stdout with the alerts each check or scan
raised, which the hub announces as one ``AlertsRaised``. Each message is a 4-byte length
and msgpack. The first message to the child is the hub's settings. The child stops when
its stdin closes (the hub stopped, or died): it checks what it has been handed, for up to
``CHECK_DRAIN_S``, and exits. A child that dies is started again; the checks of what it had
been handed are lost, the punches themselves are stored (as when a hub is killed).

With Redis, stream workers run the same checks and scan (``workers/stream.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from hub import logs, metrics, store
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
# How long after a child died the hub starts another.
RESTART_AFTER_S: Final = 1.0

Stored = list[tuple[PunchRequest, PunchOutcome]]
HEADER: Final = struct.Struct("!I")


class Raised(msgspec.Struct, array_like=True):
    """What one check or scan raised, and how many alerts of each kind it stored (for the
    hub's metrics: the child serves none)."""

    alerts: list[Alert]
    counted: dict[str, int]


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(type(value))


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(kind)


ENCODER: Final = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
SETTINGS_DECODER: Final = msgspec.msgpack.Decoder(Settings, dec_hook=_dec_hook)
BATCH_DECODER: Final = msgspec.msgpack.Decoder(Stored)
RAISED_DECODER: Final = msgspec.msgpack.Decoder(Raised)


def _frame(message: object) -> bytes:
    payload = ENCODER.encode(message)
    return HEADER.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next message's bytes, or None at the end of the stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        return await reader.readexactly(HEADER.unpack(header)[0])
    except asyncio.IncompleteReadError:
        return None


class Aside:
    """The hub's side: runs the child, hands it committed batches, tells ``on_event`` (on
    the hub's loop) of the alerts it raises."""

    def __init__(
        self, dsn: str, settings: Settings, on_event: Callable[[PresenceEvent], None]
    ) -> None:
        self._dsn = dsn
        self._settings = settings
        self._on_event = on_event
        self._child: asyncio.subprocess.Process | None = None
        self._running: asyncio.Task[None] | None = None
        self._stopping = False
        # Set once a child has started (or starting failed), for ``start`` to wait on.
        self._started = asyncio.Event()

    async def start(self) -> None:
        self._running = asyncio.create_task(self._run(), name="checks-process")
        await self._started.wait()

    def check(self, stored: Stored) -> None:
        """Have these committed punches checked."""
        child = self._child
        if child is not None and child.stdin is not None and not child.stdin.is_closing():
            child.stdin.write(_frame(stored))

    async def stop(self) -> None:
        """Let the child check what it was handed (up to ``CHECK_DRAIN_S``), then stop it."""
        self._stopping = True
        child = self._child
        if child is not None and child.stdin is not None:
            child.stdin.close()
        if self._running is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._running), CHECK_DRAIN_S + 5)
            except TimeoutError:
                log.error("the checks process did not stop in time; killing it")
                child = self._child
                if child is not None and child.returncode is None:
                    child.kill()
                await self._running

    async def _run(self) -> None:
        """Run a child, and another whenever one dies, until the hub stops."""
        while not self._stopping:
            try:
                child = await self._spawn()
            except OSError:
                log.exception("the checks process could not be started")
            else:
                self._child = child
                self._started.set()
                if self._stopping:
                    assert child.stdin is not None
                    child.stdin.close()
                await self._follow(child)
                code = await child.wait()
                self._child = None
                if self._stopping:
                    return
                log.error("the checks process exited with code %s; starting another", code)
            self._started.set()
            await asyncio.sleep(RESTART_AFTER_S)

    async def _spawn(self) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers.aside",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "ATTENDANCE_DATABASE_URL": self._dsn},
        )
        assert child.stdin is not None
        child.stdin.write(_frame(self._settings))
        return child

    async def _follow(self, child: asyncio.subprocess.Process) -> None:
        """Announce what the child raises, until its stdout ends."""
        assert child.stdout is not None
        while (data := await _read_frame(child.stdout)) is not None:
            raised = RAISED_DECODER.decode(data)
            for kind, count in raised.counted.items():
                for _ in range(count):
                    metrics.alert_raised(kind)
            if raised.alerts:
                self._on_event(AlertsRaised(raised.alerts))


# The child


class _Child:
    def __init__(self, settings: Settings, writer: asyncio.StreamWriter) -> None:
        self._settings = settings
        self._writer = writer
        self._to_check: asyncio.Queue[Stored] = asyncio.Queue()
        # metrics.ALERTS_TALLY as last told to the hub.
        self._counted: dict[str, int] = {}

    def _send(self, alerts: list[Alert]) -> None:
        """Tell the hub what was raised, and what was stored since the last message."""
        counted = {
            kind: count - self._counted.get(kind, 0)
            for kind, count in metrics.ALERTS_TALLY.items()
            if count > self._counted.get(kind, 0)
        }
        if counted:
            self._counted = dict(metrics.ALERTS_TALLY)
        if alerts or counted:
            self._writer.write(_frame(Raised(alerts, counted)))

    async def run(self, reader: asyncio.StreamReader, dsn: str) -> None:
        pool = await store.create_pool(dsn, min_size=1, max_size=2)
        system = await store.create_system_pool(dsn, max_size=1)
        tasks = [
            asyncio.create_task(self._checks(Checker.from_settings(pool, self._settings))),
            asyncio.create_task(self._scans(OvertimeScan(system, self._settings.scan_interval_s))),
        ]
        try:
            while (data := await _read_frame(reader)) is not None:
                self._to_check.put_nowait(BATCH_DECODER.decode(data))
            # The hub is stopping: check what it handed over, unless that takes long.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_check.join(), CHECK_DRAIN_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
            await pool.close()
            await system.close()

    async def _checks(self, checker: Checker) -> None:
        """Check committed batches as they come (those waiting together)."""
        while True:
            batch = await self._to_check.get()
            taken = 1
            while not self._to_check.empty() and len(batch) < CHECK_BATCH_MAX:
                batch = batch + self._to_check.get_nowait()
                taken += 1
            try:
                self._send(await checker.check(batch))
            except Exception:
                log.exception("the fraud checks failed on a batch of %d punches", len(batch))
            for _ in range(taken):
                self._to_check.task_done()

    async def _scans(self, scan: OvertimeScan) -> None:
        async def announce(alerts: list[Alert]) -> None:
            self._send(alerts)

        while True:
            await asyncio.sleep(scan.interval_s)
            try:
                await scan.scan(announce)
                self._send([])
            except Exception:
                log.exception("the overtime scan failed; it runs again in %.0f s", scan.interval_s)


async def _child_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**31 - 1)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    first = await _read_frame(reader)
    if first is None:
        return
    settings = SETTINGS_DECODER.decode(first)
    logs.configure(settings.log_format)
    await _Child(settings, writer).run(reader, os.environ["ATTENDANCE_DATABASE_URL"])


if __name__ == "__main__":
    # The hub stops it by closing its stdin: a Ctrl-C for the hub's process group is the
    # hub's to handle, not a reason to drop the checks of what it committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_child_main())
