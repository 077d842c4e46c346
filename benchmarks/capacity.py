"""Capacity of one hub process: idle sockets, a reconnect storm, a soak, a latency sweep.

Each subcommand creates a scratch database ``capacity_<hex>`` on the machine's PostgreSQL,
starts the hub (``python -m hub.cli serve``) on a free port, provisions tenant ``bench`` over
REST (site ``hq``, employees e0.., one device and terminal token per socket, as ``run.py``
does), drives it with Locust (``locustfile.py``: raw WebSocket terminals and supervisors, one
source address per socket out of 127.0.0.2..) or with the project's own generator
(``loadgen.py``), samples the hub's RSS (``/proc/<pid>/status`` VmRSS) and CPU
(``/proc/<pid>/stat``), and stops everything and drops the database at the end, also on
Ctrl-C or SIGTERM. It writes ``result.json`` (and the PNG for a sweep) under ``--out`` and
prints a Markdown table for benchmarks/RESULTS.md.

    capacity.py idle --sockets 10000          memory per idle socket, idle CPU (heartbeat 5 s)
    capacity.py storm --sockets 10000         SIGTERM + a new hub: reconnects, punches vs rows
    capacity.py soak --rate 2000 --minutes 30 ack p50/p99 and hub RSS per minute
    capacity.py sweep --rates 500,1000,2000   ack p50/p99 against offered load, and a PNG
    capacity.py plot A/result.json B/result.json -o sweep.png

Needs locust, websocket-client (and matplotlib for the PNG) in the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import psutil
import run as bench
from loadgen import _pid_cpu_s, _pids_running, machine_busy_s
from pgwatch import PgWatch

from hub.config import Settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"
HIST_SLOT_S = 10  # as in locustfile.py
STORM_GOAL_S = 15.0
IDLE_GOAL_KIB = 14.0
# The hub's per-socket frame allowance (ATTENDANCE_RATE_PER_S); a terminal stays well below.
MAX_RATE_PER_TERMINAL = 40.0


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# The scratch database and the hub


@contextlib.contextmanager
def scratch_database(pg: str, keep: bool) -> Iterator[tuple[str, str]]:
    """A new database on ``pg``, dropped on the way out; yields (DSN, name)."""
    name = f"capacity_{secrets.token_hex(4)}"
    asyncio.run(bench._admin(pg, f'CREATE DATABASE "{name}"'))
    log(f"created database {name}")
    try:
        yield bench.with_database(pg, name), name
    finally:
        if keep:
            log(f"kept database {name}")
        else:
            asyncio.run(bench._admin(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            log(f"dropped database {name}")


@dataclass(slots=True)
class Hub:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    started: float  # time.time() of the start
    ready: float = 0.0  # time.time() when /readyz first answered 200

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def cpu_s(self) -> float:
        """The hub's CPU seconds and its checks process's (``workers/aside.py``)."""
        return _pid_cpu_s(self.pid) + sum(_pid_cpu_s(pid) for pid in self.checks_pids())

    def checks_pids(self) -> list[int]:
        return [pid for pid in _pids_running(r"-m workers\.aside") if _parent_pid(pid) == self.pid]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, timeout: float = 60.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def _parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def start_hub(name: str, env: dict[str, str], port: int, out: Path, timeout: float = 90) -> Hub:
    """``python -m hub.cli serve`` in a session of its own (Ctrl-C reaches only this script)."""
    path = out / f"{name}.log"
    with path.open("ab") as sink:
        popen = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve"],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    hub = Hub(name, popen, port, path, time.time())
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as http:
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{hub.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    hub.ready = time.time()
                    return hub
            if time.monotonic() > deadline:
                hub.stop(10)
                raise RuntimeError(f"{name} did not become ready:\n{hub.tail()}")
            time.sleep(0.05)


async def provision(
    base: str, admin: str, employees: int, terminals: int, supervisors: int
) -> tuple[list[str], list[str]]:
    """``run.py``'s site, employees and devices; then one supervisor token per supervisor."""
    terminal_tokens = await bench.provision_hub(base, admin, employees, terminals)
    supervisor_tokens = []
    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {admin}"}, timeout=30
    ) as http:
        for n in range(supervisors):
            response = await http.post(
                "/v1/tokens",
                json={"role": "supervisor", "sub": f"sup{n}", "sites": ["hq"], "ttl_s": 86400},
            )
            response.raise_for_status()
            supervisor_tokens.append(str(response.json()["token"]))
    return terminal_tokens, supervisor_tokens


async def stored_punches(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT id) AS ids FROM punches WHERE tenant = $1",
            bench.TENANT,
        )
    finally:
        await conn.close()
    return {"rows": int(row["rows"]), "distinct_ids": int(row["ids"])}


async def stored_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id::text FROM punches WHERE tenant = $1", bench.TENANT)
    finally:
        await conn.close()
    return {row[0] for row in rows}


# Locust


class Locust:
    """A headless Locust run of ``locustfile.py``, in a session of its own."""

    def __init__(
        self,
        args: argparse.Namespace,
        out: Path,
        host: str,
        terminals: int,
        supervisors: int,
        interval_s: float,
        run_time_s: float,
        extra: list[str],
    ) -> None:
        self.dir = out / "locust"
        # An earlier run's status and histogram files would be read as this run's.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.terminals = terminals
        self.supervisors = supervisors
        users = terminals + supervisors
        processes = args.locust_processes or max(1, math.ceil(users / 2500))
        self.processes = processes
        self._stopped = False
        self.control({"interval_s": interval_s, "punching": True, "mark": 0})
        argv = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--host",
            host,
            "-u",
            str(users),
            "-r",
            str(args.spawn_rate),
            "--run-time",
            f"{math.ceil(run_time_s)}s",
            "--csv",
            str(self.dir / "locust"),
            "--only-summary",
            "--loglevel",
            "WARNING",
            "--logfile",
            str(self.dir / "locust.log"),
            "--exit-code-on-error",
            "0",
            "--capacity-dir",
            str(self.dir),
            "--punch-interval",
            str(interval_s),
            "--employees",
            str(args.employees),
            "--source-addresses",
            str(args.source_addresses),
            "--reconnect-max-s",
            str(args.reconnect_max_s),
            *extra,
        ]
        if processes > 1:
            port = bench.free_port()
            argv += ["--processes", str(processes), "--master-bind-host", "127.0.0.1"]
            argv += ["--master-bind-port", str(port), "--master-port", str(port)]
        argv += ["Terminal"] + (["Supervisor"] if supervisors else [])
        self.argv = argv
        with (self.dir / "locust.out").open("ab") as sink:
            self.popen = subprocess.Popen(
                argv, cwd=REPO, stdout=sink, stderr=sink, start_new_session=True
            )
        log(
            f"locust: {terminals} terminals + {supervisors} supervisors in {processes} "
            f"process(es), spawn rate {args.spawn_rate}/s, punch interval {interval_s:g} s"
        )

    def control(self, values: dict[str, Any]) -> None:
        path = self.dir / "control.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(values)
        part = path.with_name("control.json.part")
        part.write_text(json.dumps(current))
        part.replace(path)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            tail = (self.dir / "locust.out").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"locust exited with {self.popen.returncode}:\n{tail}")

    def status(self) -> dict[str, Any]:
        """The sum over the worker processes' status files."""
        total: dict[str, Any] = {
            "processes": 0,
            "cpu_s": 0.0,
            "last_welcome": 0.0,
            "last_subscribed": 0.0,
            "counts": Counter(),
            "errors": Counter(),
            "closes": Counter(),
        }
        summed = (
            "terminals",
            "welcomed",
            "welcomed_since_mark",
            "supervisors",
            "subscribed",
            "subscribed_since_mark",
            "pending",
        )
        for name in summed:
            total[name] = 0
        for path in self.dir.glob("status-*.json"):
            try:
                part = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            total["processes"] += 1
            total["cpu_s"] += part["cpu_s"]
            for name in summed:
                total[name] += part[name]
            for name in ("last_welcome", "last_subscribed"):
                total[name] = max(total[name], part[name])
            for name in ("counts", "errors", "closes"):
                total[name].update(part[name])
        return total

    def cpu_s(self) -> float:
        """CPU seconds of the Locust master and its worker processes so far."""
        try:
            parent = psutil.Process(self.popen.pid)
            processes = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        used = 0.0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                used += times.user + times.system
        return used

    def wait_connected(self, timeout: float) -> float:
        """Until every terminal is welcomed and every supervisor subscribed; seconds taken."""
        start = time.monotonic()
        last_report = 0.0
        while True:
            self.check()
            status = self.status()
            if status["welcomed"] >= self.terminals and status["subscribed"] >= self.supervisors:
                return time.monotonic() - start
            now = time.monotonic()
            if now - start > timeout:
                raise RuntimeError(f"not all connected after {timeout:.0f} s: {brief(status)}")
            if now - last_report >= 10:
                last_report = now
                log(f"  connecting: {brief(status)}")
            time.sleep(0.5)

    def wait_settled(self, timeout: float) -> bool:
        """Until no punch is pending (the door has stopped); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            # The status files are a second old at most: two quiet readings in a row.
            if self.status()["pending"] == 0:
                time.sleep(1.2)
                if self.status()["pending"] == 0:
                    return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        # Workers that outlived their master (they should not) go with its session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def histogram(self, names: tuple[str, ...], start: float, end: float) -> Counter[int]:
        """1% latency buckets of ``names`` acked in [start, end) (10 s slots)."""
        merged: Counter[int] = Counter()
        for path in self.dir.glob("hist-*.json"):
            hist = json.loads(path.read_text())
            for name in names:
                for slot, buckets in hist.get(name, {}).items():
                    if start <= int(slot) < end:
                        merged.update({int(b): n for b, n in buckets.items()})
        return merged

    def locust_stats(self) -> dict[str, dict[str, str]]:
        """Locust's own figures (whole milliseconds) from its CSV, by request name."""
        path = self.dir / "locust_stats.csv"
        if not path.exists():
            return {}
        with path.open() as handle:
            return {row["Name"]: row for row in csv.DictReader(handle)}

    def ids(self) -> dict[str, str]:
        """Every punch id made, with its last answer (M: none, A, D, R) from the id logs."""
        outcome: dict[str, str] = {}
        for path in self.dir.glob("ids-*.log"):
            for line in path.read_text().splitlines():
                kind, _, punch_id = line.partition(" ")
                if kind == "M":
                    outcome.setdefault(punch_id, "M")
                else:
                    outcome[punch_id] = kind
        return outcome


def brief(status: dict[str, Any]) -> str:
    counts = status["counts"]
    text = (
        f"terminals {status['welcomed']}/{status['terminals']} welcomed"
        f", supervisors {status['subscribed']}/{status['supervisors']} subscribed"
        f", made {counts.get('made', 0)}, pending {status['pending']}"
    )
    failures = {
        k[8:]: v for k, v in counts.items() if k.startswith("connect_") and k != "connect_ok"
    }
    if failures:
        text += f", failed connects {dict(failures)}"
    if status["errors"]:
        text += f", errors {dict(status['errors'])}"
    return text


def percentile(hist: Counter[int], fraction: float) -> float:
    """The latency (ms) at ``fraction`` of a 1%-bucket histogram."""
    total = sum(hist.values())
    if not total:
        return math.nan
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return math.exp(bucket / 100)
    return math.exp(max(hist) / 100)


# CPU


@dataclass(slots=True)
class CpuMeter:
    """CPU seconds of the hub(s), Locust, this database's PostgreSQL backends and the machine."""

    hubs: dict[str, Hub]
    database: str
    locust: Locust | None = None
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def sample(self) -> tuple[float, dict[str, float]]:
        values = {name: hub.cpu_s() for name, hub in self.hubs.items()}
        if self.locust is not None:
            values["locust"] = self.locust.cpu_s()
        pattern = f"^postgres: .* {re.escape(self.database)} "
        values["postgres"] = sum(_pid_cpu_s(pid) for pid in _pids_running(pattern))
        values["machine"] = machine_busy_s()
        return time.monotonic(), values

    @staticmethod
    def percent(
        start: tuple[float, dict[str, float]], end: tuple[float, dict[str, float]]
    ) -> dict[str, float]:
        """% of one core per part over the interval; ``other``: the rest of the machine."""
        seconds = max(end[0] - start[0], 1e-9)
        used = {k: max(0.0, v - start[1].get(k, 0.0)) for k, v in end[1].items()}
        percent = {k: 100 * v / seconds for k, v in used.items()}
        ours = sum(v for k, v in percent.items() if k != "machine")
        # PostgreSQL backends that came and went inside the interval are not counted as ours.
        percent["other"] = max(0.0, percent["machine"] - ours)
        return percent


def wait_for_quiet(below: float, longest: float) -> float:
    """Wait for a 2 s sample of the machine under ``below`` % of a core; the last sample."""
    deadline = time.monotonic() + longest
    while True:
        before = machine_busy_s()
        time.sleep(2.0)
        busy = 100 * (machine_busy_s() - before) / 2.0
        if below <= 0 or busy < below or time.monotonic() > deadline:
            return busy


def sleep_until(moment: float) -> None:
    """Sleep until the wall-clock time ``moment``."""
    time.sleep(max(0.0, moment - time.time()))


def next_slot(moment: float) -> float:
    return math.ceil(moment / HIST_SLOT_S) * HIST_SLOT_S


# A run: database, hub(s), tokens, cleanup


@dataclass(slots=True)
class Setup:
    args: argparse.Namespace
    out: Path
    dsn: str
    database: str
    env: dict[str, str]
    hubs: dict[str, Hub]
    tokens: Path
    supervisor_tokens: Path
    provision_s: float
    stack: contextlib.ExitStack

    @property
    def hub(self) -> Hub:
        return self.hubs["hub"]


def setup(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    terminals: int,
    supervisors: int,
    settings: dict[str, str],
    baseline: bool = False,
) -> Setup:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dsn, database = stack.enter_context(scratch_database(args.pg, args.keep_db))
    port = bench.free_port()
    env = bench.hub_env(
        dsn,
        port,
        {
            # Provisioning thousands of devices from 127.0.0.1 is not what is measured.
            "ATTENDANCE_REST_RATE_PER_IP": "0",
            "ATTENDANCE_MAX_CONNECTIONS_PER_TENANT": str(terminals + supervisors + 100),
            # The project's generator connects from 127.0.0.1 only (Locust spreads its
            # sockets over 127.0.0.x and meets the default per-address limits).
            **(
                {
                    "ATTENDANCE_CONNECT_RATE_PER_IP": "1000000",
                    "ATTENDANCE_CONNECT_BURST_PER_IP": "1000000",
                }
                if getattr(args, "driver", "locust") == "loadgen"
                else {}
            ),
            **settings,
            **args.hub_env,
        },
    )
    admin = bench.create_tenant(env)
    hubs: dict[str, Hub] = {}
    hub = start_hub("hub", env, port, out)
    stack.callback(lambda: hubs["hub"].stop())
    hubs["hub"] = hub
    log(f"hub pid {hub.pid} ready on port {port} in {hub.ready - hub.started:.1f} s")
    if baseline:
        # The same hub with no sockets, side by side: what the loaded hub's RSS does anyway.
        base_env = {**env, "ATTENDANCE_PORT": str(bench.free_port())}
        hubs["baseline"] = start_hub("baseline", base_env, int(base_env["ATTENDANCE_PORT"]), out)
        stack.callback(hubs["baseline"].stop)
        log(f"baseline hub pid {hubs['baseline'].pid}")
    started = time.monotonic()
    terminal_tokens, sup_tokens = asyncio.run(
        provision(f"http://127.0.0.1:{port}", admin, args.employees, terminals, supervisors)
    )
    provision_s = time.monotonic() - started
    log(f"provisioned {terminals} terminals, {supervisors} supervisors in {provision_s:.1f} s")
    tokens = out / "terminal-tokens.txt"
    tokens.write_text("\n".join(terminal_tokens) + "\n")
    supervisor_tokens = out / "supervisor-tokens.txt"
    supervisor_tokens.write_text("\n".join(sup_tokens) + "\n")
    return Setup(args, out, dsn, database, env, hubs, tokens, supervisor_tokens, provision_s, stack)


def start_locust(
    s: Setup, terminals: int, supervisors: int, interval_s: float, run_time_s: float, extra=()
) -> Locust:
    locust = Locust(
        s.args,
        s.out,
        s.hub.ws_url,
        terminals,
        supervisors,
        interval_s,
        run_time_s,
        [
            *("--tokens-file", str(s.tokens)),
            *("--supervisor-tokens-file", str(s.supervisor_tokens)),
            *("--supervisors", str(supervisors)),
            *extra,
        ],
    )
    s.stack.callback(locust.stop)
    return locust


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("locust", "websocket-client", "gevent", "uvicorn", "matplotlib"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "versions": versions,
        "hub_revision": bench.hub_revision(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


def write_result(out: Path, result: dict[str, Any]) -> Path:
    path = out / "result.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {path}")
    return path


def ms(value: float) -> str:
    return "-" if math.isnan(value) else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def check_rows(made: int, pending: int, stored: dict[str, int]) -> dict[str, Any]:
    """Punches made against rows: none lost (each made and acked is there), none doubled."""
    return {
        "made": made,
        "pending_at_end": pending,
        **stored,
        "lost": made - pending - stored["distinct_ids"],
        "doubled": stored["rows"] - stored["distinct_ids"],
        "ok": pending == 0 and stored["rows"] == stored["distinct_ids"] == made,
    }


# idle


def cmd_idle(args: argparse.Namespace) -> dict[str, Any]:
    n = args.sockets
    settings = {"ATTENDANCE_HEARTBEAT_S": str(args.heartbeat_s)}
    with contextlib.ExitStack() as stack:
        s = setup(args, stack, n, 0, settings, baseline=args.baseline)
        busy = wait_for_quiet(args.quiet_below, args.quiet_wait)
        time.sleep(args.before_s)
        before = {name: hub.rss_kib() for name, hub in s.hubs.items()}
        log(f"RSS before: {before} KiB; machine {busy:.0f}% busy")
        run_time = n / args.spawn_rate + args.settle_s + args.idle_s + 300
        locust = start_locust(s, n, 0, 0.0, run_time)
        meter = CpuMeter(s.hubs, s.database, locust)
        ramp_s = locust.wait_connected(timeout=n / args.spawn_rate + 120)
        connected = {name: hub.rss_kib() for name, hub in s.hubs.items()}
        log(f"{n} sockets connected in {ramp_s:.1f} s; RSS {connected} KiB; idle {args.settle_s} s")
        time.sleep(args.settle_s)
        settled = {name: hub.rss_kib() for name, hub in s.hubs.items()}
        status_start = locust.status()
        cpu_start = meter.sample()
        log(f"RSS after settling: {settled} KiB; measuring CPU over {args.idle_s} s")
        time.sleep(args.idle_s)
        cpu_end = meter.sample()
        status_end = locust.status()
        after = {name: hub.rss_kib() for name, hub in s.hubs.items()}
        hwm = proc_status_kib(s.hub.pid, "VmHWM")
        locust.stop()
    cpu = CpuMeter.percent(cpu_start, cpu_end)
    idle_s = cpu_end[0] - cpu_start[0]
    pings = status_end["counts"].get("pings", 0) - status_start["counts"].get("pings", 0)
    per_socket = (after["hub"] - before["hub"]) / n
    net = per_socket
    if "baseline" in after:
        net = ((after["hub"] - before["hub"]) - (after["baseline"] - before["baseline"])) / n
    result = {
        "scenario": "idle",
        "options": vars(args),
        "machine": machine(),
        "sockets": n,
        "heartbeat_s": args.heartbeat_s,
        "provision_s": s.provision_s,
        "connect_s": ramp_s,
        "rss_kib": {"before": before, "connected": connected, "settled": settled, "after": after},
        "hub_vmhwm_kib": hwm,
        "kib_per_socket": per_socket,
        "kib_per_socket_net_of_baseline": net,
        "idle_window_s": idle_s,
        "cpu_percent": cpu,
        "hub_cpu_s_per_idle_minute": cpu["hub"] * 60 / 100,
        "pings_answered": pings,
        "pings_expected": n * idle_s / args.heartbeat_s,
        "closes": dict(status_end["closes"]),
        "locust_stats": locust.locust_stats(),
        "machine_busy_before_percent": busy,
    }
    write_result(args.out, result)
    goal = "met" if net <= IDLE_GOAL_KIB else "NOT met"
    rows = [
        (f"sockets (terminals, idle, heartbeat every {args.heartbeat_s} s)", f"{n:,}"),
        ("connected in", f"{ramp_s:.0f} s (spawn rate {args.spawn_rate}/s)"),
        (
            "hub RSS before / connected / after settling / after idle window",
            f"{before['hub'] / 1024:.1f} / {connected['hub'] / 1024:.1f} / "
            f"{settled['hub'] / 1024:.1f} / {after['hub'] / 1024:.1f} MiB",
        ),
    ]
    if "baseline" in after:
        rows.append(
            (
                "baseline hub (no sockets) RSS before / after",
                f"{before['baseline'] / 1024:.1f} / {after['baseline'] / 1024:.1f} MiB",
            )
        )
    rows += [
        (
            "**memory per idle socket**",
            f"**{net:.1f} KiB** ({per_socket:.1f} KiB before subtracting the baseline); "
            f"goal ≤ {IDLE_GOAL_KIB:.0f} KiB: {goal}",
        ),
        (
            f"hub CPU over {idle_s:.0f} s idle",
            f"{cpu['hub']:.1f}% of one core ({cpu['hub'] * 60 / 100:.1f} CPU s per minute)",
        ),
        (
            "pongs sent (answered pings) in that window",
            f"{pings:,} (expected about {n * idle_s / args.heartbeat_s:,.0f})",
        ),
        (
            "CPU % of one core in that window",
            "  ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "hub"),
        ),
        ("closes seen by the clients", str(dict(status_end["closes"]) or "none")),
    ]
    print(markdown(f"Idle sockets, `capacity.py idle --sockets {n}`", rows))
    return result


# storm


def cmd_storm(args: argparse.Namespace) -> dict[str, Any]:
    n, sups = args.sockets, args.supervisors
    settings = {}
    if args.heartbeat_s:
        settings["ATTENDANCE_HEARTBEAT_S"] = str(args.heartbeat_s)
    with contextlib.ExitStack() as stack:
        s = setup(args, stack, n, sups, settings)
        busy = wait_for_quiet(args.quiet_below, args.quiet_wait)
        run_time = n / args.spawn_rate + args.settle_s + args.timeout_s + args.after_s + 600
        locust = start_locust(s, n, sups, args.punch_interval_s, run_time, ["--record-ids"])
        ramp_s = locust.wait_connected(timeout=n / args.spawn_rate + 120)
        log(f"all connected in {ramp_s:.1f} s; punching for {args.settle_s} s before the restart")
        time.sleep(args.settle_s)
        before = locust.status()
        mark = time.time()
        locust.control({"mark": mark})
        old = s.hub
        log(f"SIGTERM to hub pid {old.pid}")
        old.popen.send_signal(signal.SIGTERM)
        drain_window = Settings.from_env(s.env).drain_window_s
        try:
            old.popen.wait(drain_window + 40)
        except subprocess.TimeoutExpired:
            log("the old hub did not exit after its drain; killing it")
            old.popen.kill()
            old.popen.wait(10)
        old_exit = time.time()
        log(f"old hub exited {old_exit - mark:.2f} s after SIGTERM (code {old.popen.returncode})")
        new = None
        for attempt in range(5):
            try:
                new = start_hub("hub-restarted", s.env, old.port, s.out)
                break
            except RuntimeError as error:
                # The port can stay taken for a moment after the old process has gone.
                if attempt == 4:
                    raise
                log(f"new hub failed to start ({str(error).splitlines()[0]}); again")
                time.sleep(0.5)
        assert new is not None
        s.hubs["hub"] = new
        log(f"new hub pid {new.pid} ready {new.ready - mark:.2f} s after SIGTERM")
        deadline = time.monotonic() + args.timeout_s
        last = 0.0
        while True:
            locust.check()
            status = locust.status()
            if (
                status["welcomed_since_mark"] >= n
                and status["subscribed_since_mark"] >= sups
                and status["welcomed"] >= n
            ):
                back_status = status
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all back after {args.timeout_s} s: {brief(status)}")
            if time.monotonic() - last > 2:
                last = time.monotonic()
                log(
                    f"  back: terminals {status['welcomed_since_mark']}/{n}, supervisors "
                    f"{status['subscribed_since_mark']}/{sups}, pending {status['pending']}"
                )
            time.sleep(0.25)
        log(f"all back; punching {args.after_s} s more, then settling the pending punches")
        time.sleep(args.after_s)
        locust.control({"punching": False})
        settled = locust.wait_settled(args.settle_timeout_s)
        after = locust.status()
        locust.stop()
        stored = asyncio.run(stored_punches(s.dsn))
        ids = locust.ids()
        in_db = asyncio.run(stored_ids(s.dsn))
    counts = after["counts"]
    made_ids = set(ids)
    acked = {i for i, kind in ids.items() if kind in ("A", "D")}
    check = check_rows(counts.get("made", 0), after["pending"], stored)
    check.update(
        {
            "settled": settled,
            "ids_logged": len(made_ids),
            "acked_not_stored": len(acked - in_db),
            "made_not_stored": len(made_ids - in_db),
            "stored_not_made": len(in_db - made_ids),
            "accepted": counts.get("accepted", 0),
            "duplicate": counts.get("duplicate", 0),
            "rejected": counts.get("rejected", 0),
        }
    )
    check["ok"] = check["ok"] and not (
        check["acked_not_stored"] or check["made_not_stored"] or check["stored_not_made"]
    )
    delta = Counter(after["counts"])
    delta.subtract(before["counts"])
    # The moment all were back, not later: a reconnect after it would move these.
    last_welcome, last_sub = back_status["last_welcome"], back_status["last_subscribed"]
    result = {
        "scenario": "storm",
        "options": vars(args),
        "machine": machine(),
        "sockets": n,
        "supervisors": sups,
        "punch_interval_s": args.punch_interval_s,
        "provision_s": s.provision_s,
        "connect_s": ramp_s,
        "sigterm": mark,
        "old_hub_exit_s": old_exit - mark,
        "new_hub_ready_s": new.ready - mark,
        "new_hub_start_to_ready_s": new.ready - new.started,
        "terminals_back_s": last_welcome - mark,
        "terminals_back_after_ready_s": last_welcome - new.ready,
        "supervisors_back_s": (last_sub - mark) if sups else None,
        "supervisors_back_after_ready_s": (last_sub - new.ready) if sups else None,
        "during_storm": {k: v for k, v in delta.items() if v},
        "errors": dict(after["errors"]),
        "closes": dict(after["closes"]),
        "punches": check,
        "locust_stats": locust.locust_stats(),
        "machine_busy_before_percent": busy,
    }
    write_result(args.out, result)
    back = max(last_welcome, last_sub if sups else 0) - mark
    goal = "met" if back < STORM_GOAL_S else "NOT met"
    failed = {k[8:]: v for k, v in delta.items() if k.startswith("connect_") and k != "connect_ok"}
    rows = [
        ("terminals / supervisors (on `presence:hq`)", f"{n:,} / {sups}"),
        (
            "punching",
            f"every {args.punch_interval_s:g} s per terminal "
            f"({n / args.punch_interval_s:,.0f}/s in all)"
            if args.punch_interval_s
            else "no",
        ),
        ("old hub: SIGTERM to exit (drain)", f"{old_exit - mark:.2f} s"),
        (
            "new hub: start to ready / SIGTERM to ready",
            f"{new.ready - new.started:.2f} s / {new.ready - mark:.2f} s",
        ),
        (
            "**last terminal welcomed**: from SIGTERM / from new hub ready",
            f"**{last_welcome - mark:.2f} s** / {last_welcome - new.ready:.2f} s",
        ),
    ]
    if sups:
        rows.append(
            (
                "**last supervisor subscribed**: from SIGTERM / from new hub ready",
                f"**{last_sub - mark:.2f} s** / {last_sub - new.ready:.2f} s "
                f"(recovered {delta.get('recovered', 0)}, "
                f"snapshot {delta.get('not_recovered', 0)}, "
                f"version gaps {delta.get('version_gaps', 0)})",
            )
        )
    rows += [
        (f"goal: all back within {STORM_GOAL_S:.0f} s", f"{back:.2f} s: {goal}"),
        (
            "during the storm: drains, connects ok, failed connects",
            f"{delta.get('drains', 0):,}, {delta.get('connect_ok', 0):,}, {failed or 'none'}",
        ),
        (
            "punches made / acked accepted + duplicate / rejected / pending",
            f"{check['made']:,} / {check['accepted']:,} + {check['duplicate']:,} / "
            f"{check['rejected']} / {check['pending_at_end']}",
        ),
        ("resent after reconnect or error", f"{counts.get('resent', 0):,}"),
        ("rows: count(*) / count(DISTINCT id)", f"{stored['rows']:,} / {stored['distinct_ids']:,}"),
        (
            "**lost / doubled**",
            f"**{check['lost']} / {check['doubled']}** (ids made not stored "
            f"{check['made_not_stored']}, stored not made {check['stored_not_made']}): "
            f"{'OK' if check['ok'] else 'MISMATCH'}",
        ),
    ]
    print(markdown(f"Reconnect storm, `capacity.py storm --sockets {n}`", rows))
    return result


# soak


def check_per_terminal(args: argparse.Namespace, rate: float) -> None:
    """Refuse a rate that the hub's per-socket frame limit would refuse in part."""
    if rate / args.sockets > MAX_RATE_PER_TERMINAL and "ATTENDANCE_RATE_PER_S" not in args.hub_env:
        raise SystemExit(
            f"{rate / args.sockets:.0f} punches/s per socket is near the hub's limit of 50 a "
            "socket: use more --sockets (or --hub-env ATTENDANCE_RATE_PER_S=0)"
        )


def soak_rate(args: argparse.Namespace) -> float:
    if args.rate:
        return float(args.rate)
    if args.from_sweep:
        sweep = json.loads(Path(args.from_sweep).read_text())
        maximum = sweep.get("max_sustained_per_s")
        if maximum:
            log(f"rate: half the sweep's maximum of {maximum:,.0f}/s")
            return float(maximum) / 2
    raise SystemExit("soak: give --rate, or --from-sweep with a sweep's result.json")


def cmd_soak(args: argparse.Namespace) -> dict[str, Any]:
    rate = soak_rate(args)
    n = args.sockets
    check_per_terminal(args, rate)
    minutes: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        s = setup(args, stack, n, 0, {})
        busy = wait_for_quiet(args.quiet_below, args.quiet_wait)
        locust = None
        if args.driver == "locust":
            run_time = n / args.spawn_rate + args.warmup_s + 60 * args.minutes + 600
            locust = start_locust(s, n, 0, n / rate, run_time)
            locust.wait_connected(timeout=n / args.spawn_rate + 120)
            time.sleep(args.warmup_s)
        meter = CpuMeter(s.hubs, s.database, locust)
        watch = stack.enter_context(PgWatch(s.dsn, f"http://127.0.0.1:{s.hub.port}/metrics"))
        start = next_slot(time.time())
        sleep_until(start)
        previous = meter.sample()
        watch.minute()
        previous_status = locust.status() if locust else None
        for minute in range(args.minutes):
            end = start + 60 * (minute + 1)
            row: dict[str, Any] = {"minute": minute + 1}
            if locust is None:
                row.update(loadgen_minute(s, rate, args))
            else:
                sleep_until(end)
            sample = meter.sample()
            row["rss_mib"] = s.hub.rss_kib() / 1024
            cpu = row["cpu_percent"] = CpuMeter.percent(previous, sample)
            if locust is not None:
                cpu["driver"] = cpu.pop("locust")
            else:
                # loadgen is not among the metered processes: take it out of "other".
                cpu["driver"] = row.pop("loadgen_cpu_percent")
                cpu["other"] = max(0.0, cpu["other"] - cpu["driver"])
            if locust is not None:
                status = locust.status()
                assert previous_status is not None
                made = status["counts"].get("made", 0) - previous_status["counts"].get("made", 0)
                row["made_per_s"] = made / 60
                row["window"] = (end - 60, end)
                previous_status = status
            previous = sample
            row["postgres"] = watch.minute()
            minutes.append(row)
            latency = ""
            if "p99_ms" in row:
                latency = f", p50 {ms(row['p50_ms'])} p99 {ms(row['p99_ms'])} ms"
            elif locust is not None and minute:
                # The minute before is complete in the histogram files by now (written
                # every 10 s); this one is reported at the end.
                punch = locust.histogram(("punch",), end - 120, end - 60)
                latency = (
                    f", minute {minute}: p50 {ms(percentile(punch, 0.5))} "
                    f"p99 {ms(percentile(punch, 0.99))} ms"
                )
            log(
                f"  minute {minute + 1}: RSS {row['rss_mib']:.1f} MiB, hub CPU "
                f"{cpu['hub']:.0f}%, driver {cpu['driver']:.0f}%, other {cpu['other']:.0f}%"
                + latency
            )
            log(f"    {PgWatch.line(row['postgres'])}")
        if locust is not None:
            locust.control({"punching": False})
            locust.wait_settled(args.settle_timeout_s)
            final = locust.status()
            locust.stop()
            # The histograms are complete once Locust has quit.
            for row in minutes:
                first, last = row.pop("window")
                punch = locust.histogram(("punch",), first, last)
                every = locust.histogram(("punch", "punch (resent)"), first, last)
                row["acked_per_s"] = sum(every.values()) / 60
                row["p50_ms"] = percentile(punch, 0.50)
                row["p99_ms"] = percentile(punch, 0.99)
                row["p999_ms"] = percentile(punch, 0.999)
            stored = asyncio.run(stored_punches(s.dsn))
            check = check_rows(final["counts"].get("made", 0), final["pending"], stored)
            check["errors"] = dict(final["errors"])
            check["closes"] = dict(final["closes"])
            stats = locust.locust_stats()
        else:
            stored = asyncio.run(stored_punches(s.dsn))
            accepted = sum(row["accepted"] for row in minutes)
            unacked = sum(row["unacked"] for row in minutes)
            check = {
                "accepted": accepted,
                "unacked": unacked,
                **stored,
                "ok": accepted <= stored["rows"] <= accepted + unacked,
            }
            stats = {}
    p99s = [row["p99_ms"] for row in minutes if not math.isnan(row["p99_ms"])]
    rss = [row["rss_mib"] for row in minutes]
    slope = linear_slope(rss[1:]) if len(rss) > 2 else math.nan
    result = {
        "scenario": "soak",
        "options": vars(args),
        "machine": machine(),
        "driver": args.driver,
        "rate_per_s": rate,
        "sockets": n,
        "minutes": minutes,
        "p99_ms_min_median_max": [min(p99s), statistics.median(p99s), max(p99s)] if p99s else [],
        "rss_mib_first_last": [rss[0], rss[-1]] if rss else [],
        "rss_slope_mib_per_minute": slope,
        "punches": check,
        "locust_stats": stats,
        "machine_busy_before_percent": busy,
    }
    write_result(args.out, result)
    header = (
        "| minute | acked/s | ack p50 ms | ack p99 ms | hub RSS MiB "
        "| CPU % hub / PG / driver / other |"
    )
    lines = [
        f"### Soak: {rate:,.0f} punches/s over {n:,} sockets ({args.driver}), {args.minutes} min",
        "",
        header,
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in minutes:
        cpu = row["cpu_percent"]
        driver = cpu["driver"]
        lines.append(
            f"| {row['minute']} | {row['acked_per_s']:,.0f} | {ms(row['p50_ms'])} | "
            f"{ms(row['p99_ms'])} | {row['rss_mib']:.1f} | {cpu['hub']:.0f} / "
            f"{cpu['postgres']:.0f} / {driver:.0f} / {cpu['other']:.0f} |"
        )
    lines.append("")
    if p99s:
        lines.append(
            f"p99 per minute: min {ms(min(p99s))}, median {ms(statistics.median(p99s))}, "
            f"max {ms(max(p99s))} ms. Hub RSS {rss[0]:.1f} → {rss[-1]:.1f} MiB "
            f"(slope from minute 2 on: {slope:+.2f} MiB/min)."
        )
    lines.append(f"Punches against rows: {check}")
    print("\n".join(lines))
    return result


def loadgen_minute(s: Setup, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """One minute of ``loadgen.py`` at ``rate`` (it reconnects its terminals for each)."""
    figures = run_loadgen(s, rate, args.sockets, 60.0, 0.0, args)
    return {
        "acked_per_s": figures["acked_per_s"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "p999_ms": figures["p999_ms"],
        "accepted": figures["total_accepted"],
        "unacked": figures["unacked"],
        "loadgen_cpu_percent": figures["cpu_percent"].get("loadgen", math.nan),
    }


def run_loadgen(
    s: Setup, rate: float, terminals: int, duration: float, warmup: float, args: argparse.Namespace
) -> dict[str, Any]:
    argv = bench.loadgen_argv(
        [s.hub.ws_url],
        s.tokens,
        terminals,
        1,
        duration,
        warmup,
        args.employees,
        args.loadgen_processes,
        {"hub": str(s.hub.pid)},
        s.database,
        rate,
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + warmup + 300, check=False
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def linear_slope(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    xs = range(len(values))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den


# sweep


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    n = args.sockets
    check_per_terminal(args, max(rates))
    step_s = max(HIST_SLOT_S, round(args.step_s / HIST_SLOT_S) * HIST_SLOT_S)
    steps: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        s = setup(args, stack, n, 0, {})
        busy = wait_for_quiet(args.quiet_below, args.quiet_wait)
        if args.driver == "loadgen":
            meter = CpuMeter(s.hubs, s.database)
            for rate in rates:
                start = meter.sample()
                figures = run_loadgen(s, rate, n, step_s, args.warmup_s, args)
                cpu = CpuMeter.percent(start, meter.sample())
                steps.append(
                    {
                        "offered_per_s": rate,
                        "made_per_s": figures["sent_per_s"],
                        "acked_per_s": figures["acked_per_s"],
                        "p50_ms": figures["p50_ms"],
                        "p90_ms": figures["p90_ms"],
                        "p99_ms": figures["p99_ms"],
                        "p999_ms": figures["p999_ms"],
                        # loadgen's own window: the hub, PostgreSQL, itself and the rest.
                        "cpu_percent": {
                            "hub": figures["cpu_percent"].get("hub", cpu["hub"]),
                            "postgres": figures["cpu_percent"].get("postgres", math.nan),
                            "driver": figures["cpu_percent"].get("loadgen", math.nan),
                            "other": figures["cpu_percent"].get("other", math.nan),
                        },
                        "rss_mib": s.hub.rss_kib() / 1024,
                        "unacked": figures["unacked"],
                        "accepted": figures["total_accepted"],
                    }
                )
                log_step(steps[-1])
            stored = asyncio.run(stored_punches(s.dsn))
            accepted = sum(step["accepted"] for step in steps)
            unacked = sum(step["unacked"] for step in steps)
            check: dict[str, Any] = {
                "accepted": accepted,
                "unacked": unacked,
                **stored,
                "ok": accepted <= stored["rows"] <= accepted + unacked,
            }
            stats: dict[str, Any] = {}
        else:
            run_time = n / args.spawn_rate + len(rates) * (step_s + args.warmup_s + 20) + 600
            locust = start_locust(s, n, 0, n / rates[0], run_time)
            locust.wait_connected(timeout=n / args.spawn_rate + 120)
            meter = CpuMeter(s.hubs, s.database, locust)
            for rate in rates:
                locust.control({"interval_s": n / rate})
                start = next_slot(time.time() + args.warmup_s)
                sleep_until(start)
                first, status_first = meter.sample(), locust.status()
                sleep_until(start + step_s)
                last, status_last = meter.sample(), locust.status()
                cpu = CpuMeter.percent(first, last)
                cpu["driver"] = cpu.pop("locust")
                made = status_last["counts"].get("made", 0) - status_first["counts"].get("made", 0)
                steps.append(
                    {
                        "offered_per_s": rate,
                        "made_per_s": made / step_s,
                        "window": (start, start + step_s),
                        "cpu_percent": cpu,
                        "rss_mib": s.hub.rss_kib() / 1024,
                    }
                )
                log(
                    f"  {rate:,.0f}/s offered: made {made / step_s:,.0f}/s, hub CPU "
                    f"{cpu['hub']:.0f}%, locust {cpu['driver']:.0f}%, other {cpu['other']:.0f}%"
                )
            locust.control({"punching": False})
            locust.wait_settled(args.settle_timeout_s)
            final = locust.status()
            locust.stop()
            for step in steps:
                first_s, last_s = step.pop("window")
                punch = locust.histogram(("punch",), first_s, last_s)
                every = locust.histogram(("punch", "punch (resent)"), first_s, last_s)
                step["acked_per_s"] = sum(every.values()) / step_s
                for key, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
                    step[f"{key}_ms"] = percentile(punch, fraction)
                log_step(step)
            stored = asyncio.run(stored_punches(s.dsn))
            check = check_rows(final["counts"].get("made", 0), final["pending"], stored)
            check["errors"] = dict(final["errors"])
            stats = locust.locust_stats()
    # The maximum: the highest rate acked as fast as it was offered (at least 95% of it);
    # and the highest of those with the ack p99 within the limit.
    sustained = [
        step["offered_per_s"]
        for step in steps
        if step["acked_per_s"] >= 0.95 * step["offered_per_s"]
    ]
    prompt = [
        step["offered_per_s"]
        for step in steps
        if step["offered_per_s"] in sustained and step["p99_ms"] <= args.p99_limit_ms
    ]
    result = {
        "scenario": "sweep",
        "options": vars(args),
        "machine": machine(),
        "driver": args.driver,
        "sockets": n,
        "step_s": step_s,
        "steps": steps,
        "max_sustained_per_s": max(sustained) if sustained else None,
        "saturated": not sustained or max(sustained) < max(rates),
        "max_within_p99_per_s": max(prompt) if prompt else None,
        "punches": check,
        "locust_stats": stats,
        "machine_busy_before_percent": busy,
    }
    path = write_result(args.out, result)
    png = args.out / "sweep.png"
    plotted = plot([path], png)
    lines = [
        f"### Ack latency against offered load ({args.driver}, {n:,} sockets, {step_s} s per step)",
        "",
        "| offered/s | made/s | acked/s | p50 ms | p90 ms | p99 ms | p99.9 ms | "
        "CPU % hub / PG / driver / other | hub RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for step in steps:
        cpu = step["cpu_percent"]
        lines.append(
            f"| {step['offered_per_s']:,.0f} | {step['made_per_s']:,.0f} | "
            f"{step['acked_per_s']:,.0f} | {ms(step['p50_ms'])} | {ms(step['p90_ms'])} | "
            f"{ms(step['p99_ms'])} | {ms(step['p999_ms'])} | {cpu['hub']:.0f} / "
            f"{cpu['postgres']:.0f} / {cpu['driver']:.0f} / {cpu['other']:.0f} | "
            f"{step['rss_mib']:.1f} |"
        )
    lines.append("")
    top, within = result["max_sustained_per_s"], result["max_within_p99_per_s"]
    lines.append(
        f"Highest rate acked at ≥ 95% of offered: {f'{top:,.0f}/s' if top else 'none'}"
        + ("" if result["saturated"] else " (every step did: a lower bound)")
        + f"; of those, with p99 ≤ {args.p99_limit_ms:g} ms: "
        + (f"{within:,.0f}/s" if within else "none")
        + f". Punches against rows: {check}"
    )
    lines.append(f"Plot: {png if plotted else 'not drawn (pip install matplotlib)'}")
    print("\n".join(lines))
    return result


def log_step(step: dict[str, Any]) -> None:
    log(
        f"  {step['offered_per_s']:,.0f}/s offered: acked {step['acked_per_s']:,.0f}/s, "
        f"p50 {ms(step['p50_ms'])} p99 {ms(step['p99_ms'])} ms"
    )


def plot(results: list[Path], png: Path) -> bool:
    """Ack p50 and p99 against offered load, one pair of lines per sweep result."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for path in results:
        sweep = json.loads(path.read_text())
        steps = sweep["steps"]
        label = f"{sweep['driver']}, {sweep['sockets']:,} sockets"
        offered = [step["offered_per_s"] for step in steps]
        (line,) = axes.plot(
            offered, [s["p50_ms"] for s in steps], marker="o", label=f"p50 ({label})"
        )
        axes.plot(
            offered,
            [s["p99_ms"] for s in steps],
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"p99 ({label})",
        )
    axes.set_xlabel("offered load, punches/s")
    axes.set_ylabel("punch → ack latency, ms")
    axes.set_yscale("log")
    # Plain numbers at 1-2-5 steps on the log axis; unlabelled minor ticks between.
    axes.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    when = json.loads(results[0].read_text())["machine"]["when"]
    axes.set_title(f"attendance-hub: ack latency against offered load ({when})")
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    log(f"wrote {png}")
    return True


def markdown(title: str, rows: list[tuple[str, str]]) -> str:
    lines = [f"### {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, sockets: int) -> None:
        sub.add_argument("--sockets", type=int, default=sockets, help="terminal sockets")
        sub.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
        sub.add_argument("--out", type=Path, help="where result.json and logs go")
        sub.add_argument("--employees", type=int, default=1000)
        sub.add_argument(
            "--hub-env", action="append", default=[], metavar="NAME=VALUE", help="hub settings"
        )
        sub.add_argument("--spawn-rate", type=float, default=200, help="Locust users/s")
        sub.add_argument(
            "--locust-processes", type=int, default=0, help="default: one per 2,500 users"
        )
        sub.add_argument(
            "--source-addresses", type=int, default=200, help="127.0.0.2.. (at most 253)"
        )
        sub.add_argument("--reconnect-max-s", type=float, default=5.0)
        sub.add_argument("--settle-timeout-s", type=float, default=60.0)
        sub.add_argument(
            "--quiet-below",
            type=float,
            default=30.0,
            help="first wait for machine CPU use below this %% of one core (0: don't)",
        )
        sub.add_argument("--quiet-wait", type=float, default=180.0)
        sub.add_argument("--keep-db", action="store_true")

    idle = commands.add_parser("idle", help="memory and CPU of idle sockets")
    common(idle, 10_000)
    idle.add_argument("--heartbeat-s", type=int, default=5, help="ATTENDANCE_HEARTBEAT_S")
    idle.add_argument("--before-s", type=float, default=5.0, help="wait before the first RSS")
    idle.add_argument("--settle-s", type=float, default=60.0, help="idle before measuring")
    idle.add_argument("--idle-s", type=float, default=60.0, help="the measured idle window")
    idle.add_argument("--no-baseline", dest="baseline", action="store_false")

    storm = commands.add_parser("storm", help="SIGTERM and restart with everyone connected")
    common(storm, 10_000)
    storm.add_argument("--supervisors", type=int, default=20)
    storm.add_argument("--punch-interval-s", type=float, default=60.0, help="per terminal")
    storm.add_argument("--heartbeat-s", type=int, default=0, help="0: the hub's default")
    storm.add_argument("--settle-s", type=float, default=30.0, help="punching before SIGTERM")
    storm.add_argument("--after-s", type=float, default=15.0, help="punching after all are back")
    storm.add_argument("--timeout-s", type=float, default=180.0, help="longest wait for all")

    soak = commands.add_parser("soak", help="a fixed punch rate for minutes")
    common(soak, 1000)
    soak.add_argument("--rate", type=float, help="punches/s in all")
    soak.add_argument("--from-sweep", help="a sweep's result.json: half its maximum")
    soak.add_argument("--minutes", type=int, default=30)
    soak.add_argument("--warmup-s", type=float, default=30.0)
    soak.add_argument("--driver", choices=("locust", "loadgen"), default="locust")
    soak.add_argument("--loadgen-processes", type=int, default=1)

    sweep = commands.add_parser("sweep", help="ack latency against offered load")
    common(sweep, 1000)
    sweep.add_argument("--rates", required=True, help="punches/s, comma-separated")
    sweep.add_argument(
        "--step-s", type=float, default=30.0, help="measured per rate (a multiple of 10 s)"
    )
    sweep.add_argument("--warmup-s", type=float, default=10.0, help="before each step")
    sweep.add_argument("--driver", choices=("locust", "loadgen"), default="locust")
    sweep.add_argument("--loadgen-processes", type=int, default=1)
    sweep.add_argument("--p99-limit-ms", type=float, default=50.0)

    plot_cmd = commands.add_parser("plot", help="the PNG from sweep results")
    plot_cmd.add_argument("results", nargs="+", type=Path)
    plot_cmd.add_argument("-o", "--output", type=Path, default=Path("sweep.png"))

    args = parser.parse_args(argv)
    if args.command == "plot":
        return args
    if urlsplit(args.pg).hostname not in ("127.0.0.1", "localhost"):
        parser.error("only the local PostgreSQL")
    settings = {}
    for item in args.hub_env:
        name, _, value = item.partition("=")
        if not name.startswith("ATTENDANCE_"):
            parser.error(f"--hub-env takes ATTENDANCE_*=VALUE, got {item!r}")
        settings[name] = value
    args.hub_env = settings
    if args.out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        args.out = Path("/tmp/attendance-capacity") / f"{args.command}-{stamp}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "plot":
        sys.exit(0 if plot(args.results, args.output) else 1)
    # `timeout` and CI stop a run with SIGTERM: unwind, so that everything started is stopped
    # and the database is dropped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    log(f"{args.command}: output in {args.out}")
    commands = {"idle": cmd_idle, "storm": cmd_storm, "soak": cmd_soak, "sweep": cmd_sweep}
    try:
        result = commands[args.command](args)
    except KeyboardInterrupt:
        # The with-blocks have stopped Locust and the hubs and dropped the database by now.
        log("interrupted")
        sys.exit(130)
    ok = result.get("punches", {}).get("ok", True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
