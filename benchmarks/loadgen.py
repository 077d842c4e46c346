"""Punch load generator: many terminals over WebSocket, closed-loop or at an offered rate.

Closed loop (default): each terminal keeps ``--in-flight`` punches unacknowledged and sends a
new one as soon as one is acked, so the figure is the server's throughput. Open loop
(``--rate``): punches are sent on a fixed schedule spread over the terminals whatever the
server does, so the figure is the ack latency at that offered load.

The client side of RFC 6455 is written out here on an ``asyncio.Protocol`` instead of using
the ``websockets`` client: the generator shares a two-core machine with the server it
measures, and a library client spends several times more CPU per frame than this does.
It speaks only what the benchmark needs (text frames, ping, close) and does not verify
``Sec-WebSocket-Accept``. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec
import uvloop
from websockets.speedups import apply_mask

SUBPROTOCOL = "attendance.v1.json"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CLOSE_WAIT_S = 2.0

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

WARMUP, MEASURE, DRAIN = 0, 1, 2


class ServerFrame(msgspec.Struct):
    """The fields of the server frames the generator looks at (ack, welcome, error)."""

    type: str
    id: str = ""
    status: str = ""
    reason: str | None = None
    code: str = ""
    message: str = ""


_decode_frame = msgspec.json.Decoder(ServerFrame).decode


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (RFC 6455 §5.2), FIN set."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    mask = random.randbytes(4)
    return header + mask + apply_mask(payload, mask)


@dataclass(slots=True)
class Config:
    # Terminal n connects to urls[n % len(urls)]: several hubs share the terminals.
    urls: list[str]
    terminals: int
    in_flight: int
    rate: float | None
    duration: float
    warmup: float
    drain_timeout: float
    tokens: list[str]
    employees: list[str]
    processes: int
    watch_pids: dict[str, int] = field(default_factory=dict)
    watch_commands: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Stats:
    """What one generator process saw; merged across processes by ``merge``."""

    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    window: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    sent_window: int = 0
    sent_total: int = 0
    unacked: int = 0
    disconnects: int = 0
    cpu_s: float = 0.0


@dataclass(slots=True)
class Result:
    mode: str
    terminals: int
    in_flight: int
    rate: float | None
    duration_s: float
    processes: int
    acked_per_s: float
    sent_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    sched_lag_p99_ms: float | None
    accepted: int
    duplicate: int
    rejected: int
    errors: int
    total_sent: int
    total_accepted: int
    total_duplicate: int
    total_rejected: int
    total_errors: int
    unacked: int
    disconnects: int
    cpu_percent: dict[str, float]


class Run:
    """Per-process run state shared by every terminal of the process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.phase = WARMUP
        self.stats = Stats()
        self.closed_loop = config.rate is None
        self._employees = config.employees
        self._counter = random.randrange(len(config.employees))
        self._rng = random.Random(os.urandom(16))
        self.drained = asyncio.Event()
        self.outstanding = 0

    def punch_payload(self, now: float) -> tuple[str, bytes]:
        # Each punch its own `at`, and each employee in, out, in... as at a real door: the hub
        # flags odd sequences on the punch (a second write), which a real floor rarely has.
        at = datetime.now(UTC).isoformat(timespec="microseconds")
        # A version-4 UUID from a seeded PRNG: os.urandom per punch would cost a syscall.
        bits = self._rng.getrandbits(128)
        bits = (bits & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
        h = f"{bits:032x}"
        punch_id = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        self._counter += 1
        rounds, index = divmod(self._counter, len(self._employees))
        employee = self._employees[index]
        kind = "out" if rounds % 2 else "in"
        payload = (
            f'{{"type":"punch","id":"{punch_id}","employee":"{employee}",'
            f'"kind":"{kind}","at":"{at}"}}'
        ).encode()
        return punch_id, payload

    def count(self, bucket: str) -> None:
        total = self.stats.total
        total[bucket] = total.get(bucket, 0) + 1
        if self.phase == MEASURE:
            window = self.stats.window
            window[bucket] = window.get(bucket, 0) + 1

    def settle(self, n: int = 1) -> None:
        self.outstanding -= n
        if self.phase == DRAIN and self.outstanding <= 0:
            self.drained.set()


class Terminal(asyncio.Protocol):
    """One terminal: a WebSocket connection that punches and reads acks."""

    def __init__(self, run: Run, host: str, path: str, token: str) -> None:
        self.run = run
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.pending: dict[str, float] = {}
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._host = host
        self._path = path
        self._handshaking = True
        self._buffer = b""
        self._out: list[bytes] = []
        self._closing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self._path} HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self._handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status:
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self._handshaking = False
            self._send(OP_TEXT, json.dumps({"type": "hello", "token": self.token}).encode())
            data = data[end + 4 :]
        self._parse(data)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"connection lost before welcome: {exc}"))
        if not self._closing:
            self.run.stats.disconnects += 1
        if self.pending:
            self.run.stats.unacked += len(self.pending)
            self.run.settle(len(self.pending))
            self.pending.clear()

    # Frames

    def _parse(self, data: bytes) -> None:
        view = memoryview(data)
        size = len(data)
        pos = 0
        now = time.perf_counter()
        while size - pos >= 2:
            length = data[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                header = 10
            end = pos + header + length
            if end > size:
                break
            opcode = data[pos] & 0x0F
            payload = view[pos + header : end]
            pos = end
            if opcode == OP_TEXT:
                self._on_text(payload, now)
            elif opcode == OP_PING:
                self._send(OP_PONG, bytes(payload))
            elif opcode == OP_CLOSE:
                self._closing = True
                self._send(OP_CLOSE, bytes(payload[:2]))
        if pos < size:
            self._buffer = data[pos:]

    def _on_text(self, payload: memoryview, now: float) -> None:
        run = self.run
        frame = _decode_frame(payload)
        if frame.type == "ack":
            sent = self.pending.pop(frame.id, None)
            if sent is None:
                run.count("unknown_ack")
                return
            run.count(frame.status)
            if run.phase == MEASURE:
                run.stats.latencies.append(now - sent)
            if run.closed_loop and run.phase != DRAIN:
                self._punch(now)
            else:
                run.settle()
        elif frame.type == "welcome":
            if not self.welcomed.done():
                self.welcomed.set_result(None)
        elif frame.type == "error":
            # An error answers a punch without naming it (no `ref` is sent); it stays pending
            # and counts as unacked, and the closed loop sends another to keep its window.
            run.count("error")
            if frame.code in ("bad_token", "hello_required") and not self.welcomed.done():
                self.welcomed.set_exception(ConnectionError(f"{frame.code}: {frame.message}"))
            elif run.closed_loop and run.phase != DRAIN and self.welcomed.done():
                self._punch(now)

    def _punch(self, now: float) -> None:
        punch_id, payload = self.run.punch_payload(now)
        self.pending[punch_id] = now
        self.run.outstanding += 1
        self.run.stats.sent_total += 1
        if self.run.phase == MEASURE:
            self.run.stats.sent_window += 1
        self._send(OP_TEXT, payload)

    def _send(self, opcode: int, payload: bytes) -> None:
        self._out.append(encode_frame(opcode, payload))

    def _fail(self, message: str) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(message))
        if self.transport is not None:
            self.transport.close()

    # Called by the drivers

    def punch(self, now: float) -> None:
        self._punch(now)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            # One write per read: the acks of a read are answered by one syscall.
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        self._send(OP_CLOSE, (1000).to_bytes(2, "big"))
        self.flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), CLOSE_WAIT_S)
        except TimeoutError:
            self.transport.close()


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pid_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" closing `comm`.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _pids_running(pattern: str) -> list[int]:
    """Processes whose command line matches the regular expression ``pattern``."""
    matcher = re.compile(pattern)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if matcher.search(command.decode(errors="replace")):
            pids.append(int(entry.name))
    return pids


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS


# CPU seconds so far, per watched name, per process id.
CpuSample = dict[str, dict[int, float]]


def sample_watched(config: Config) -> CpuSample:
    """CPU seconds so far of each watched process, group of processes, and the machine."""
    sample = {name: {pid: _pid_cpu_s(pid)} for name, pid in config.watch_pids.items()}
    for name, needle in config.watch_commands.items():
        sample[name] = {pid: _pid_cpu_s(pid) for pid in _pids_running(needle)}
    sample["machine"] = {0: machine_busy_s()}
    return sample


def cpu_between(start: CpuSample, end: CpuSample) -> dict[str, float]:
    """CPU seconds used between two samples; a process that ended meanwhile is not counted."""
    return {
        name: sum(max(0.0, used - start.get(name, {}).get(pid, 0.0)) for pid, used in pids.items())
        for name, pids in end.items()
    }


async def _connect(run: Run, index: int, tokens: Sequence[str]) -> Terminal:
    urls = run.config.urls
    parts = urlsplit(urls[index % len(urls)])
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    token = tokens[index % len(tokens)]
    _, terminal = await loop.create_connection(
        lambda: Terminal(run, f"{host}:{port}", parts.path or "/", token), host, port
    )
    await asyncio.wait_for(terminal.welcomed, 30)
    return terminal


async def _drive_rate(run: Run, terminals: list[Terminal], rate: float) -> None:
    """Send punches on the schedule ``k / rate`` until the drain phase, round-robin."""
    start = time.perf_counter()
    sent = 0
    touched: set[Terminal] = set()
    while run.phase != DRAIN:
        now = time.perf_counter()
        due = int((now - start) * rate)
        while sent < due:
            terminal = terminals[sent % len(terminals)]
            terminal.punch(now)
            touched.add(terminal)
            if run.phase == MEASURE:
                run.stats.lags.append(now - (start + sent / rate))
            sent += 1
        for terminal in touched:
            terminal.flush()
        touched.clear()
        # libuv timers have millisecond resolution; this wakes about once per millisecond.
        await asyncio.sleep(0.001)


async def generate(
    config: Config,
    indices: Sequence[int],
    rate: float | None,
    sync: Callable[[], object] | None = None,
) -> tuple[Stats, dict[str, float]]:
    """Connect the given terminals, run warmup + measurement + drain; stats of this process."""
    run = Run(config)
    terminals: list[Terminal] = []
    gate = asyncio.Semaphore(64)

    async def connect(index: int) -> None:
        async with gate:
            terminals.append(await _connect(run, index, config.tokens))

    await asyncio.gather(*(connect(i) for i in indices))
    if sync is not None:
        # Every process connects first, then all start together.
        await asyncio.get_running_loop().run_in_executor(None, sync)
    watched: dict[str, float] = {}
    driver: asyncio.Task[None] | None = None
    now = time.perf_counter()
    if rate is None:
        for terminal in terminals:
            for _ in range(config.in_flight):
                terminal.punch(now)
            terminal.flush()
    else:
        driver = asyncio.create_task(_drive_rate(run, terminals, rate))
    await asyncio.sleep(config.warmup)
    run.phase = MEASURE
    cpu_start = _process_cpu_s()
    watched_start: CpuSample = sample_watched(config) if sync is None else {}
    await asyncio.sleep(config.duration)
    run.stats.cpu_s = _process_cpu_s() - cpu_start
    if sync is None:
        watched = cpu_between(watched_start, sample_watched(config))
    run.phase = DRAIN
    if driver is not None:
        await driver
    if run.outstanding > 0:
        # Wait for every punch in flight to be answered, so that ack counts can be checked
        # against the database; what is not answered in time is reported as unacked.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.drained.wait(), config.drain_timeout)
    for terminal in terminals:
        run.stats.unacked += len(terminal.pending)
        terminal.pending.clear()
    await asyncio.gather(*(t.close() for t in terminals))
    return run.stats, watched


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def merge(config: Config, parts: Sequence[Stats], watched: dict[str, float]) -> Result:
    latencies = sorted(x for part in parts for x in part.latencies)
    lags = sorted(x for part in parts for x in part.lags)
    window: dict[str, int] = {}
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.window.items():
            window[key] = window.get(key, 0) + value
        for key, value in part.total.items():
            total[key] = total.get(key, 0) + value
    acked = sum(window.get(k, 0) for k in ("accepted", "duplicate", "rejected"))
    duration = config.duration
    cpu = {"loadgen": 100 * sum(p.cpu_s for p in parts) / duration}
    cpu.update({name: 100 * seconds / duration for name, seconds in watched.items()})
    if "machine" in cpu:
        # Whatever else ran on the machine meanwhile: on a shared host, the noise in the figures.
        ours = sum(value for name, value in cpu.items() if name != "machine")
        cpu["other"] = max(0.0, cpu["machine"] - ours)
    return Result(
        mode="closed" if config.rate is None else "rate",
        terminals=config.terminals,
        in_flight=config.in_flight if config.rate is None else 0,
        rate=config.rate,
        duration_s=duration,
        processes=config.processes,
        acked_per_s=acked / duration,
        sent_per_s=sum(p.sent_window for p in parts) / duration,
        p50_ms=1000 * _percentile(latencies, 0.50),
        p90_ms=1000 * _percentile(latencies, 0.90),
        p99_ms=1000 * _percentile(latencies, 0.99),
        p999_ms=1000 * _percentile(latencies, 0.999),
        max_ms=1000 * latencies[-1] if latencies else math.nan,
        sched_lag_p99_ms=1000 * _percentile(lags, 0.99) if config.rate is not None else None,
        accepted=window.get("accepted", 0),
        duplicate=window.get("duplicate", 0),
        rejected=window.get("rejected", 0),
        errors=window.get("error", 0) + window.get("unknown_ack", 0),
        total_sent=sum(p.sent_total for p in parts),
        total_accepted=total.get("accepted", 0),
        total_duplicate=total.get("duplicate", 0),
        total_rejected=total.get("rejected", 0),
        total_errors=total.get("error", 0) + total.get("unknown_ack", 0),
        unacked=sum(p.unacked for p in parts),
        disconnects=sum(p.disconnects for p in parts),
        cpu_percent=cpu,
    )


def _child(
    config: Config, indices: list[int], rate: float | None, barrier: Barrier, pipe: Connection
) -> None:
    try:
        stats, _ = uvloop.run(generate(config, indices, rate, barrier.wait))
    except BaseException as exc:
        barrier.abort()
        pipe.send(exc)
        raise
    pipe.send(stats)


def run_load(config: Config) -> Result:
    """Run the whole load (in ``config.processes`` processes) and return the merged result."""
    if config.processes <= 1:
        stats, watched = uvloop.run(generate(config, range(config.terminals), config.rate))
        return merge(config, [stats], watched)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(config.processes + 1)
    children = []
    for n in range(config.processes):
        indices = list(range(n, config.terminals, config.processes))
        share = None if config.rate is None else config.rate * len(indices) / config.terminals
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_child, args=(config, indices, share, barrier, sender), daemon=True
        )
        process.start()
        children.append((process, receiver))
    # The parent samples the watched processes over the same window as the children.
    barrier.wait(timeout=120)
    time.sleep(config.warmup)
    before = sample_watched(config)
    time.sleep(config.duration)
    watched = cpu_between(before, sample_watched(config))
    parts: list[Stats] = []
    for process, receiver in children:
        outcome: Any = receiver.recv()
        process.join(30)
        if isinstance(outcome, BaseException):
            raise RuntimeError(f"a generator process failed: {outcome!r}") from outcome
        parts.append(outcome)
    return merge(config, parts, watched)


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _watch(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, _, target = value.partition("=")
        if not target:
            raise SystemExit(f"--watch needs NAME=PID or NAME=cmd:REGEX, got {value!r}")
        pairs[name] = target
    return pairs


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The run's configuration, and whether to print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        action="append",
        help="a hub's WebSocket URL (default ws://127.0.0.1:8080/v1/ws); give several to "
        "spread the terminals over several hubs",
    )
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=8, help="closed loop: punches in flight")
    parser.add_argument("--rate", type=float, help="open loop: punches/s offered in total")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--drain-timeout", type=float, default=15.0)
    parser.add_argument("--token", help="one token shared by every terminal")
    parser.add_argument("--tokens-file", help="one token a line, used round-robin")
    parser.add_argument("--employees", type=int, default=1000, help="employee ids e0..e{N-1}")
    parser.add_argument("--employees-file", help="one employee id a line (instead of e0..)")
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="NAME=PID|NAME=cmd:REGEX",
        help="report the CPU use of a process, or of every process whose command line matches",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be above 0 (leave it out for the closed loop)")
    urls = args.url or ["ws://127.0.0.1:8080/v1/ws"]
    if any(urlsplit(url).hostname not in LOCAL_HOSTS for url in urls):
        parser.error("the generator only talks to 127.0.0.1")
    if args.tokens_file:
        tokens = _read_lines(args.tokens_file)
    elif args.token:
        tokens = [args.token]
    else:
        parser.error("give --token or --tokens-file")
    if args.employees_file:
        employees = _read_lines(args.employees_file)
    else:
        employees = [f"e{n}" for n in range(args.employees)]
    watched = _watch(args.watch)
    config = Config(
        urls=urls,
        terminals=args.terminals,
        in_flight=args.in_flight,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        drain_timeout=args.drain_timeout,
        tokens=tokens,
        employees=employees,
        processes=max(1, args.processes),
        watch_pids={k: int(v) for k, v in watched.items() if not v.startswith("cmd:")},
        watch_commands={k: v[4:] for k, v in watched.items() if v.startswith("cmd:")},
    )
    return config, args.json


def describe(result: Result) -> str:
    load = (
        f"{result.terminals} terminals x {result.in_flight} in flight"
        if result.mode == "closed"
        else f"{result.rate:,.0f} punches/s offered over {result.terminals} terminals"
    )
    lines = [
        f"{load}, {result.duration_s:.0f} s measured",
        f"  acked {result.acked_per_s:,.0f}/s (sent {result.sent_per_s:,.0f}/s)",
        f"  ack latency ms: p50 {result.p50_ms:.2f}  p90 {result.p90_ms:.2f}  "
        f"p99 {result.p99_ms:.2f}  p99.9 {result.p999_ms:.2f}  max {result.max_ms:.2f}",
        f"  window: accepted {result.accepted}  duplicate {result.duplicate}  "
        f"rejected {result.rejected}  errors {result.errors}",
        f"  whole run: sent {result.total_sent}  accepted {result.total_accepted}  "
        f"unacked {result.unacked}  disconnects {result.disconnects}",
        "  cpu % of one core: "
        + "  ".join(f"{name} {value:.0f}" for name, value in result.cpu_percent.items()),
    ]
    if result.sched_lag_p99_ms is not None:
        lines.append(f"  generator schedule lag p99 {result.sched_lag_p99_ms:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    config, as_json = parse_args(argv)
    result = run_load(config)
    if as_json:
        print(json.dumps(asdict(result)), flush=True)
    else:
        print(describe(result), flush=True)
    if result.acked_per_s == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
