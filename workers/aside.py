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
import time
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
# How long after a child died the hub starts another: at first RESTART_AFTER_S, doubling up
# to RESTART_MAX_S while children keep dying young (PostgreSQL is down, say), and back to
# the first after one lived RESTART_RESET_S.
RESTART_AFTER_S: Final = 1.0
RESTART_MAX_S: Final = 30.0
RESTART_RESET_S: Final = 60.0
# Most committed punches held for a checks process that is starting.
HOLD_MAX: Final = 100_000

Stored = list[tuple[PunchRequest, PunchOutcome]]
HEADER: Final = struct.Struct("!I")


class Raised(msgspec.Struct, array_like=True):
    """What one check or scan raised, and how many alerts of each kind it stored (for the
    hub's metrics: the child serves none)."""

    alerts: list[Alert]
    counted: dict[str, int]


# The settings' one type msgspec does not know. A hook raises NotImplementedError for any
# other type: that is msgspec's signal for "not mine", which it reports as an encode or
# decode error naming the type.
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
        # Batches committed while no child runs (one is starting), handed to the next one;
        # past HOLD_MAX punches they are counted in `_unchecked` instead, and logged.
        self._held: list[Stored] = []
        self._held_punches = 0
        self._unchecked = 0

    async def start(self) -> None:
        self._running = asyncio.create_task(self._run(), name="checks-process")
        await self._started.wait()

    def check(self, stored: Stored) -> None:
        """Have these committed punches checked."""
        child = self._child
        if child is not None and child.stdin is not None and not child.stdin.is_closing():
            child.stdin.write(_frame(stored))
        elif self._held_punches + len(stored) <= HOLD_MAX:
            self._held.append(stored)
            self._held_punches += len(stored)
        else:
            self._unchecked += len(stored)

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
        if self._held_punches or self._unchecked:
            log.error(
                "%d committed punches were not checked: the checks process was not running",
                self._held_punches + self._unchecked,
            )

    async def _run(self) -> None:
        """Run a child, and another whenever one dies, until the hub stops; a child that
        did not last ``RESTART_RESET_S`` is followed after a growing pause."""
        pause = RESTART_AFTER_S
        try:
            while not self._stopping:
                began = time.monotonic()
                try:
                    code = await self._life()
                except Exception:
                    log.exception("the checks process failed")
                    code = None
                self._started.set()
                if self._stopping:
                    if code:
                        log.error("the checks process exited with code %s as it stopped", code)
                    return
                if time.monotonic() - began > RESTART_RESET_S:
                    pause = RESTART_AFTER_S
                log.error("the checks process ended (exit code %s); another in %.0f s", code, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RESTART_MAX_S)
        finally:
            self._started.set()

    async def _life(self) -> int | None:
        """One child, from its start to its exit code."""
        child = await self._spawn()
        try:
            assert child.stdin is not None
            for stored in self._held:
                child.stdin.write(_frame(stored))
            self._held, self._held_punches = [], 0
            if self._unchecked:
                log.error(
                    "%d committed punches were not checked: no checks process was running",
                    self._unchecked,
                )
                self._unchecked = 0
            self._child = child
            self._started.set()
            if self._stopping:
                child.stdin.close()
            await self._follow(child)
            return await child.wait()
        finally:
            self._child = None
            if child.returncode is None:
                child.kill()
                await child.wait()

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
            try:
                raised = RAISED_DECODER.decode(data)
            except msgspec.DecodeError:
                log.exception("the checks process sent what is not a Raised message")
                continue
            for kind, count in raised.counted.items():
                metrics.alert_raised(kind, count)
            if raised.alerts:
                try:
                    self._on_event(AlertsRaised(raised.alerts))
                except Exception:
                    log.exception("announcing %d alerts failed", len(raised.alerts))


# The child


class _Child:
    def __init__(self, settings: Settings, writer: asyncio.StreamWriter) -> None:
        self._settings = settings
        self._writer = writer
        self._to_check: asyncio.Queue[Stored] = asyncio.Queue()

    def _send(self, alerts: list[Alert]) -> None:
        """Tell the hub what was raised, and what was stored since the last message."""
        counted = dict(metrics.ALERTS_TALLY)
        metrics.ALERTS_TALLY.clear()
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
            # The counts of what the last checks stored, then everything written reaches
            # the hub before the process goes (a pipe's writer has no `wait_closed`).
            self._send([])
            transport = self._writer.transport
            for _ in range(int(CHECK_DRAIN_S * 100)):
                if not transport.get_write_buffer_size() or transport.is_closing():
                    break
                await asyncio.sleep(0.01)
            self._writer.close()
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
