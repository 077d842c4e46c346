"""Locust users that speak the hub's WebSocket protocol: terminals that punch, supervisors that
watch a presence channel. Driven by ``capacity.py``; usable on its own against a running hub.

Each user holds one raw WebSocket (``websocket-client``, on the sockets gevent patched), bound
to a source address from 127.0.0.2 upwards (``--source-addresses``), so that 10,000 sockets
spread over many addresses: each address has its own ephemeral ports and its own per-address
connect allowance on the hub. It says ``hello`` with its own token.

* ``Terminal`` punches every ``--punch-interval`` seconds (0: never), at a random phase, whether
  or not it is connected, as a terminal at a door does. Every punch has a UUID and is kept
  until it is acked; every unacked punch is sent again after each reconnect, and after an
  ``unavailable``, ``rate_limited`` or ``internal`` error (1-2 s later). ``duplicate`` counts
  as success, as the protocol says.
* ``Supervisor`` subscribes to ``--channel`` and, after a reconnect, subscribes again with
  ``since`` (the last version it applied); it counts versions that skip one.
* Both answer the hub's WebSocket pings (the library does it on every read) and reconnect
  after a close: after ``drain``'s ``reconnect_after_ms``, otherwise (and after a refused or
  failed connection) with full-jitter backoff from 0.5 s up to ``--reconnect-max-s``, or
  after ``Retry-After`` for an HTTP 429.

Locust request events: ``connect`` (TCP connect to ``welcome``), ``punch`` (a punch's first
send to its ack), ``punch (resent)`` (a resend to its ack) and ``subscribe`` (``subscribe``
to ``subscribed``). Locust keeps response times in whole milliseconds; the histograms below
keep them to 1%.

With ``--capacity-dir``, each process that runs users writes there what ``capacity.py`` reads
while the run goes on: ``status-<pid>.json`` every second (users, connections, punches made,
acked, pending, errors, close codes, the latest welcome and subscription), ``hist-<pid>.json``
every 10 s and at the end (latencies per request name, per 10 s of wall-clock time, in 1%
buckets), and with ``--record-ids`` ``ids-<pid>.log`` (each punch made, and how it was
answered). It reads ``control.json`` there every 0.5 s: ``interval_s`` (a new punch interval),
``punching`` (false: make no new punches, still resend the pending ones) and ``mark`` (an epoch
time; ``welcomed_since_mark`` and ``subscribed_since_mark`` count connections newer than it).

Terminal n (numbered across processes through a counter file in ``--capacity-dir``; give a
fresh one per run) takes token n of ``--tokens-file``. With at least as many employees as
tokens, each terminal has employees of its own and punches each of them in, out, in... as a
real floor does (odd sequences cost the hub a second write for their flag).

Standalone, against a running hub, with one terminal token a line (``PUT /v1/devices``). A
Locust process holds at most 20,000 open files here and one core: 10,000 sockets want
``--processes 4`` (2,500 each; ``capacity.py`` takes one per 2,500 users):

    .venv/bin/locust -f benchmarks/locustfile.py --headless --host ws://127.0.0.1:8080/v1/ws \\
        --tokens-file terminals.txt --capacity-dir /tmp/locust-run1 --punch-interval 60 \\
        -u 10000 -r 200 --run-time 10m --processes 4 Terminal

Locust must run on this machine against a hub on 127.0.0.0/8: any other host is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import math
import os
import random
import resource
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.event
import websocket
from locust import User, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, Runner

SUBPROTOCOL = "attendance.v1.json"
BACKOFF_BASE_S = 0.5
RETRY_AFTER_ERROR_S = 1.0
# Errors whose punch was not stored and is to be sent again (docs/protocol.md).
RESEND_CODES = frozenset({"unavailable", "rate_limited", "internal"})
HIST_SLOT_S = 10


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("attendance-hub capacity")
    group.add_argument(
        "--tokens-file", default="", help="terminal tokens, one a line (one per terminal)"
    )
    group.add_argument("--supervisor-tokens-file", default="", help="supervisor tokens, one a line")
    group.add_argument("--supervisors", type=int, default=0, help="Supervisor users (fixed)")
    group.add_argument("--channel", default="presence:hq", help="what supervisors subscribe to")
    group.add_argument(
        "--punch-interval", type=float, default=0.0, help="seconds between a terminal's punches"
    )
    group.add_argument("--employees", type=int, default=1000, help="punch for e0..e{N-1}")
    group.add_argument(
        "--source-addresses",
        type=int,
        default=200,
        help="bind sockets to 127.0.0.2 .. 127.0.0.{N+1} (at most 253; 0: do not bind)",
    )
    group.add_argument("--reconnect-max-s", type=float, default=5.0, help="longest backoff")
    group.add_argument("--capacity-dir", default="", help="status, histograms, control file")
    group.add_argument(
        "--record-ids", action="store_true", help="log every punch id and its answer"
    )


@dataclass(slots=True)
class Pending:
    """A punch made and not yet acked."""

    payload: str
    sent: float = 0.0  # perf_counter of the last send; 0 if never sent
    sends: int = 0
    retry_at: float = 0.0  # monotonic time to send again after an error; 0: not asked


class Probe:
    """What this process's users do, and the files ``capacity.py`` reads and writes."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        self.environment = environment
        self.dir = Path(options.capacity_dir) if options.capacity_dir else None
        self.interval_s: float = options.punch_interval
        self.punching = True
        self.mark = 0.0
        self.employees = [f"e{n}" for n in range(max(1, options.employees))]
        self.source_addresses = max(0, min(253, options.source_addresses))
        self.reconnect_max_s = max(BACKOFF_BASE_S, options.reconnect_max_s)
        self.channel: str = options.channel
        self.terminal_tokens = _read_lines(options.tokens_file)
        self.supervisor_tokens = _read_lines(options.supervisor_tokens_file)
        self.terminals: set[Terminal] = set()
        self.supervisors: set[Supervisor] = set()
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        # name -> wall-clock slot (epoch s, a multiple of HIST_SLOT_S) -> 1% bucket -> count
        self.hist: dict[str, dict[int, Counter[int]]] = {}
        self._indices: Counter[str] = Counter()
        self._ids = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if options.record_ids:
                self._ids = (self.dir / f"ids-{os.getpid()}.log").open("a", buffering=1 << 16)

    # Users

    def claim(self, role: str) -> int:
        """The next index for a user of ``role``, unique across this run's processes."""
        if self.dir is None:
            self._indices[role] += 1
            runner = self.environment.runner
            return (getattr(runner, "worker_index", 0) or 0) * 1_000_003 + self._indices[role]
        # One counter file per role, shared by every worker process on this machine.
        with (self.dir / f"index-{role}").open("a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            index = int(counter.read().strip() or 0)
            counter.seek(0)
            counter.truncate()
            counter.write(str(index + 1))
        return index

    def source_for(self, index: int) -> str | None:
        if not self.source_addresses:
            return None
        return f"127.0.0.{2 + index % self.source_addresses}"

    # Measurements

    def request(self, name: str, seconds: float, exception: Exception | None = None) -> None:
        milliseconds = 1000 * seconds
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=milliseconds,
            response_length=0,
            exception=exception,
            context={},
        )
        if exception is None:
            slot = int(time.time() // HIST_SLOT_S) * HIST_SLOT_S
            bucket = round(100 * math.log(max(milliseconds, 0.01)))
            self.hist.setdefault(name, {}).setdefault(slot, Counter())[bucket] += 1

    def log_id(self, outcome: str, punch_id: str) -> None:
        if self._ids is not None:
            self._ids.write(f"{outcome} {punch_id}\n")

    # Files

    def status(self) -> dict[str, Any]:
        terminals = list(self.terminals)
        supervisors = list(self.supervisors)
        mark = self.mark
        welcomed = [t.welcomed_at for t in terminals if t.welcomed_at]
        subscribed = [s.subscribed_at for s in supervisors if s.subscribed_at]
        since_mark = [w for w in welcomed if mark and w >= mark]
        subscribed_since = [w for w in subscribed if mark and w >= mark]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_kib": usage.ru_maxrss,
            "mark": mark,
            "terminals": len(terminals),
            "welcomed": len(welcomed),
            "welcomed_since_mark": len(since_mark),
            "last_welcome": max(since_mark, default=0.0),
            "supervisors": len(supervisors),
            "subscribed": len(subscribed),
            "subscribed_since_mark": len(subscribed_since),
            "last_subscribed": max(subscribed_since, default=0.0),
            "pending": sum(len(t.pending) for t in terminals),
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "closes": dict(self.closes),
        }

    def write_status(self) -> None:
        if self.dir is not None:
            _write_json(self.dir / f"status-{os.getpid()}.json", self.status())
        if self._ids is not None:
            self._ids.flush()

    def write_hist(self) -> None:
        if self.dir is not None:
            hist = {
                name: {str(slot): dict(buckets) for slot, buckets in slots.items()}
                for name, slots in self.hist.items()
            }
            _write_json(self.dir / f"hist-{os.getpid()}.json", hist)

    def read_control(self) -> None:
        if self.dir is None:
            return
        try:
            control = json.loads((self.dir / "control.json").read_text())
        except (OSError, ValueError):
            return
        interval_s = float(control.get("interval_s", self.interval_s))
        punching = bool(control.get("punching", self.punching))
        self.mark = float(control.get("mark") or 0.0)
        if (interval_s, punching) != (self.interval_s, self.punching):
            self.interval_s, self.punching = interval_s, punching
            for terminal in list(self.terminals):
                terminal.nudge.set()

    def loop(self) -> None:
        """Every 0.5 s: read the control file; every 1 s the status, every 10 s histograms."""
        ticks = 0
        while True:
            self.read_control()
            if ticks % 2 == 0:
                self.write_status()
            if ticks % 20 == 0:
                self.write_hist()
            ticks += 1
            gevent.sleep(0.5)

    def close(self) -> None:
        self.write_status()
        self.write_hist()
        if self._ids is not None:
            self._ids.close()
            self._ids = None


PROBE: Probe | None = None


@events.init.add_listener
def _init(environment: Environment, runner: Runner | None = None, **_: Any) -> None:
    global PROBE
    Supervisor.fixed_count = max(0, environment.parsed_options.supervisors)
    if isinstance(runner, MasterRunner):
        return
    PROBE = Probe(environment)
    gevent.spawn(PROBE.loop)


@events.quitting.add_listener
def _quitting(**_: Any) -> None:
    if PROBE is not None:
        PROBE.close()


def _probe() -> Probe:
    if PROBE is None:
        raise RuntimeError("the locustfile's init listener has not run in this process")
    return PROBE


def _read_lines(path: str) -> list[str]:
    if not path:
        return []
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _write_json(path: Path, value: Any) -> None:
    # Written aside and renamed, so that a reader never sees half a file.
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value))
    part.replace(path)


class ConnectFailed(Exception):
    """A connection that did not get as far as ``welcome``; ``delay_s``: when to try again."""

    def __init__(self, reason: str, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class HubSocket(User):
    """One WebSocket to the hub, kept open: connect, serve until it closes, wait, again."""

    abstract = True
    # Only between restarts of the task after an unexpected exception.
    wait_time = constant(1)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.probe = _probe()
        self.ws: websocket.WebSocket | None = None
        self.welcomed_at = 0.0  # epoch of the open connection's welcome; 0 while there is none
        self.failures = 0
        self.drain_ms: int | None = None
        self.index = 0
        self.token = ""
        parts = urlsplit(self.host or "")
        if parts.scheme != "ws" or not _is_loopback(parts.hostname or ""):
            raise ValueError(f"--host must be ws:// on this machine (127.0.0.0/8), not {self.host}")
        self.url = self.host or ""
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)

    @task
    def keep_connected(self) -> None:
        while True:
            gevent.sleep(self._connection())

    def _connection(self) -> float:
        """One connection from connect to close; returns how long to wait before the next."""
        started = time.perf_counter()
        try:
            ws = self._open()
        except ConnectFailed as failed:
            self.probe.counts[f"connect_{failed.reason}"] += 1
            self.probe.request("connect", time.perf_counter() - started, failed)
            return failed.delay_s if failed.delay_s is not None else self._backoff()
        self.probe.counts["connect_ok"] += 1
        self.probe.request("connect", time.perf_counter() - started)
        self.failures = 0
        self.ws = ws
        self.welcomed_at = time.time()
        try:
            self.opened()
            self._read(ws)
        finally:
            self.welcomed_at = 0.0
            self.ws = None
            self.closed()
            with contextlib.suppress(Exception):
                ws.shutdown()
        if self.drain_ms is not None:
            delay, self.drain_ms = self.drain_ms / 1000, None
            return delay
        return self._backoff()

    def _backoff(self) -> float:
        # Full jitter (as centrifuge-js): anywhere from 0 to a ceiling that doubles per failure.
        self.failures += 1
        ceiling = min(self.probe.reconnect_max_s, BACKOFF_BASE_S * 2 ** (self.failures - 1))
        return random.uniform(0, ceiling)

    def _open(self) -> websocket.WebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            source = self.probe.source_for(self.index)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(30)
            sock.connect(self.address)
            ws = websocket.create_connection(
                self.url,
                socket=sock,
                subprotocols=[SUBPROTOCOL],
                timeout=30,
                skip_utf8_validation=True,
            )
        except websocket.WebSocketBadStatusException as refused:
            sock.close()
            if refused.status_code == 429:
                headers = refused.resp_headers or {}
                retry_after = float(headers.get("retry-after", 1))
                raise ConnectFailed("http_429", retry_after + random.uniform(0, 1)) from None
            raise ConnectFailed(f"http_{refused.status_code}") from None
        except ConnectionRefusedError:
            sock.close()
            raise ConnectFailed("refused") from None
        except (OSError, websocket.WebSocketException) as error:
            sock.close()
            raise ConnectFailed(type(error).__name__) from None
        try:
            ws.send(json.dumps({"type": "hello", "token": self.token, "client": "locust"}))
            while True:
                opcode, frame = ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise ConnectFailed(f"closed_{_close_code(frame.data)}", self.drain_delay())
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                message = json.loads(frame.data)
                kind = message.get("type")
                if kind == "welcome":
                    ws.settimeout(None)
                    return ws
                if kind == "drain":
                    # Reached a hub that is shutting down: it closes at once.
                    self.drain_ms = int(message.get("reconnect_after_ms", 1000))
                elif kind == "error":
                    code = message.get("code", "error")
                    self.probe.errors[code] += 1
                    raise ConnectFailed(code)
        except (OSError, websocket.WebSocketException, ValueError) as error:
            ws.shutdown()
            raise ConnectFailed(type(error).__name__, self.drain_delay()) from None
        except ConnectFailed:
            ws.shutdown()
            raise

    def drain_delay(self) -> float | None:
        if self.drain_ms is None:
            return None
        delay, self.drain_ms = self.drain_ms / 1000, None
        return delay

    def _read(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                opcode, frame = ws.recv_data_frame(True)
            except (OSError, websocket.WebSocketException):
                self.probe.closes["abnormal"] += 1
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                message = json.loads(frame.data)
                if message.get("type") == "drain":
                    self.probe.counts["drains"] += 1
                    self.drain_ms = int(message.get("reconnect_after_ms", 1000))
                else:
                    self.received(message)
            elif opcode == websocket.ABNF.OPCODE_PING:
                # recv_data_frame has already answered it with a pong.
                self.probe.counts["pings"] += 1
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                self.probe.closes[str(_close_code(frame.data))] += 1
                return

    def send(self, text: str) -> bool:
        ws = self.ws
        if ws is None:
            return False
        try:
            ws.send(text)
        except (OSError, websocket.WebSocketException):
            return False
        return True

    def on_stop(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.shutdown()

    # For the roles

    def opened(self) -> None:
        """Just after ``welcome``."""

    def received(self, message: dict[str, Any]) -> None:
        """Each text frame after ``welcome`` but ``drain``."""

    def closed(self) -> None:
        """After the connection has ended."""


class Terminal(HubSocket):
    """A clock-in terminal: punches on a schedule, keeps each punch until it is acked."""

    def on_start(self) -> None:
        tokens = self.probe.terminal_tokens
        if not tokens:
            raise RuntimeError("Terminal users need --tokens-file")
        self.index = self.probe.claim("terminal")
        self.token = tokens[self.index % len(tokens)]
        self.pending: dict[str, Pending] = {}
        self.made = 0
        # With at least as many employees as terminals (one token a terminal), each terminal
        # has employees of its own and punches each in, out, in...: a floor without the odd
        # sequences that the hub flags with a second write. Otherwise terminals share them.
        employees, terminals = self.probe.employees, len(tokens)
        if len(employees) >= terminals:
            self.employees = employees[self.index % terminals :: terminals]
        else:
            self.employees = [employees[self.index % len(employees)]]
        self.probe.terminals.add(self)
        # Wakes the door before its time: a new interval, or a punch to send again.
        self.nudge = gevent.event.Event()
        self.door = gevent.spawn(self._door)

    def on_stop(self) -> None:
        self.door.kill(block=False)
        self.probe.terminals.discard(self)
        super().on_stop()

    def _door(self) -> None:
        """Make punches every ``interval_s`` (at a random phase), connected or not."""
        next_at = 0.0
        while True:
            # Cleared first: a nudge that comes while this pass sends is not missed.
            self.nudge.clear()
            now = time.monotonic()
            interval = self.probe.interval_s if self.probe.punching else 0.0
            if interval <= 0:
                next_at = 0.0
            else:
                if not next_at or next_at > now + interval:
                    # The first punch, or a shorter interval: a random phase, so that the
                    # terminals do not punch in step.
                    next_at = now + random.uniform(0, interval)
                while next_at <= now:
                    self._make_punch()
                    next_at += interval
            wake = next_at or math.inf
            for punch_id, pending in list(self.pending.items()):
                if not pending.retry_at:
                    continue
                if pending.retry_at <= now and self.ws is not None:
                    self._send_punch(punch_id, pending)
                else:
                    # Not connected: the reconnect sends it; otherwise look again then.
                    wake = min(wake, max(pending.retry_at, now + RETRY_AFTER_ERROR_S))
            # Idle terminals sleep until nudged: 10,000 of them cost Locust nothing.
            self.nudge.wait(None if wake == math.inf else max(wake - now, 0.001))

    def _make_punch(self) -> None:
        rounds, turn = divmod(self.made, len(self.employees))
        self.made += 1
        punch_id = str(uuid.uuid4())
        employee = self.employees[turn]
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        # The id doubles as `ref`: an error that names only the ref still finds its punch.
        payload = (
            f'{{"type":"punch","ref":"{punch_id}","id":"{punch_id}","employee":"{employee}",'
            f'"kind":"{"out" if rounds % 2 else "in"}","at":"{at}","method":"badge"}}'
        )
        pending = self.pending[punch_id] = Pending(payload)
        self.probe.counts["made"] += 1
        self.probe.log_id("M", punch_id)
        if self.ws is not None:
            self._send_punch(punch_id, pending)

    def _send_punch(self, punch_id: str, pending: Pending) -> None:
        pending.retry_at = 0.0
        pending.sent = time.perf_counter()
        pending.sends += 1
        self.probe.counts["sent" if pending.sends == 1 else "resent"] += 1
        self.send(pending.payload)

    def opened(self) -> None:
        # Every punch not acked yet, oldest first: sent on the last connection, refused, or
        # made while there was none.
        for punch_id, pending in list(self.pending.items()):
            if self.ws is None:
                return
            self._send_punch(punch_id, pending)

    def received(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ack":
            punch_id = message.get("id", "")
            pending = self.pending.pop(punch_id, None)
            if pending is None:
                self.probe.counts["unknown_ack"] += 1
                return
            status = message.get("status", "")
            self.probe.counts[status] += 1
            self.probe.log_id(status[:1].upper(), punch_id)
            name = "punch" if pending.sends == 1 else "punch (resent)"
            failure = None
            if status == "rejected":
                failure = RuntimeError(f"rejected: {message.get('reason')}")
            self.probe.request(name, time.perf_counter() - pending.sent, failure)
        elif kind == "error":
            code = message.get("code", "error")
            self.probe.errors[code] += 1
            pending = self.pending.get(message.get("id") or message.get("ref") or "")
            if pending is not None and code in RESEND_CODES:
                pending.retry_at = time.monotonic() + RETRY_AFTER_ERROR_S * random.uniform(1, 2)
                self.nudge.set()


class Supervisor(HubSocket):
    """A supervisor's dashboard: subscribes to a channel, recovers with ``since``."""

    # Set from --supervisors when Locust starts.
    fixed_count = 0

    def on_start(self) -> None:
        tokens = self.probe.supervisor_tokens
        if not tokens:
            raise RuntimeError("Supervisor users need --supervisor-tokens-file")
        claimed = self.probe.claim("supervisor")
        self.token = tokens[claimed % len(tokens)]
        # Spread over the source addresses from the other end from the terminals.
        self.index = -1 - claimed
        self.version: int | None = None
        self.subscribed_at = 0.0
        self.asked = 0.0
        self.probe.supervisors.add(self)

    def on_stop(self) -> None:
        self.probe.supervisors.discard(self)
        super().on_stop()

    def opened(self) -> None:
        frame: dict[str, Any] = {"type": "subscribe", "channel": self.probe.channel, "ref": "s"}
        if self.version is not None:
            frame["since"] = self.version
        self.asked = time.perf_counter()
        self.send(json.dumps(frame))

    def received(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "delta":
            version = int(message["version"])
            if self.version is not None and version != self.version + 1:
                self.probe.counts["version_gaps"] += 1
            self.version = version
            self.probe.counts["deltas"] += 1
        elif kind == "snapshot":
            self.version = int(message["version"])
            self.probe.counts["snapshots"] += 1
        elif kind == "subscribed":
            self.subscribed_at = time.time()
            recovered = bool(message.get("recovered"))
            self.probe.counts["recovered" if recovered else "not_recovered"] += 1
            self.probe.request("subscribe", time.perf_counter() - self.asked)
        elif kind == "error":
            self.probe.errors[message.get("code", "error")] += 1

    def closed(self) -> None:
        self.subscribed_at = 0.0


def _close_code(data: bytes) -> int:
    return int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
