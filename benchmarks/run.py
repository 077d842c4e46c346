"""The punch benchmark: the hub against a no-storage ceiling and a one-commit-per-punch server.

One command starts each server in turn on a free port, drives it with the same load
(``loadgen.py``), and prints hub/ceiling and hub/naive. Scenarios: a closed loop of
``--terminals`` x ``--in-flight`` (throughput), and an open loop at ``--rate`` punches/s
(ack latency at a fixed offered load). The hub runs against a fresh database on the machine's
PostgreSQL, provisioned over its REST API, and every accepted ack is checked against the rows
in that database. The database is dropped at the end.

    .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --rounds 3 --hub-env ATTENDANCE_BATCH_WAIT_MS=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
from loadgen import machine_busy_s

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TENANT = "bench"
SERVERS = ("ceiling", "naive", "hub")

# Targets from the issue.
TARGET_VS_CEILING = 0.6
TARGET_VS_NAIVE = 4.0
TARGET_P99_MS = 10.0


@dataclass(slots=True)
class Options:
    terminals: int
    in_flight: int
    rate: float
    duration: float
    warmup: float
    employees: int
    processes: int
    rounds: int
    servers: list[str]
    pg: str
    naive_pool: int
    hub_env: dict[str, str]
    hub_pg_settings: dict[str, str]
    keep_db: bool
    json_out: Path | None
    quiet_below: float
    quiet_wait: float
    gc_probe: bool
    gc_freeze: bool
    gc_threshold: str | None


@dataclass(slots=True)
class Check:
    """Accepted acks against the rows the server's database holds."""

    server: str
    accepted: int
    rows: int
    unacked: int

    @property
    def ok(self) -> bool:
        # Unacked punches may or may not have been committed; acked ones must all be there.
        return self.accepted <= self.rows <= self.accepted + self.unacked


@dataclass(slots=True)
class Outcome:
    closed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rate: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    gc: dict[str, dict[str, float]] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def _admin(pg: str, statement: str) -> None:
    conn = await asyncpg.connect(with_database(pg, "postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


# The rows each server has stored, to check its accepted acks against.
STORED_SQL: Final = {
    "hub": f"SELECT count(*) FROM punches WHERE tenant = '{TENANT}'",
    "naive": "SELECT count(*) FROM naive_punches",
}


async def _stored(dsn: str, server: str) -> int:
    if server not in STORED_SQL:
        return 0
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(STORED_SQL[server]))
    finally:
        await conn.close()


@contextmanager
def fresh_database(pg: str, keep: bool) -> Iterator[str]:
    name = f"bench_{secrets.token_hex(4)}"
    asyncio.run(_admin(pg, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(pg, name)
    finally:
        if keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            asyncio.run(_admin(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(slots=True)
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def serving(
    name: str, argv: Sequence[str], env: dict[str, str], port: int, ready_path: str, logs: Path
) -> Iterator[Server]:
    log = logs / f"{name}.log"
    with log.open("ab") as sink:
        popen = subprocess.Popen(argv, env=env, cwd=REPO, stdout=sink, stderr=sink)
    server = Server(name, popen, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{server.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready:\n{server.tail()}")
            time.sleep(0.1)
        yield server
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)


def wait_for_quiet(options: Options) -> float:
    """Wait until the rest of the machine is nearly idle; return its CPU use, % of one core.

    The machine is shared: other jobs come and go, and a run that starts while one of them
    is busy measures that job as much as the server. This waits, up to a limit, for a two
    second sample below ``--quiet-below``; the figures still report what else ran.
    """
    deadline = time.monotonic() + options.quiet_wait
    while True:
        before = machine_busy_s()
        time.sleep(2.0)
        busy = 100 * (machine_busy_s() - before) / 2.0
        if busy < options.quiet_below or time.monotonic() > deadline:
            return busy


def loadgen_argv(
    urls: Sequence[str],
    tokens: Path,
    terminals: int,
    in_flight: int,
    duration: float,
    warmup: float,
    employees: int,
    processes: int,
    watch: dict[str, str],
    database: str,
    rate: float | None,
) -> list[str]:
    """The ``loadgen.py`` command line; it watches ``watch`` (name: pid) and the database."""
    argv = [
        sys.executable,
        str(HERE / "loadgen.py"),
        *(part for url in urls for part in ("--url", url)),
        "--tokens-file",
        str(tokens),
        "--terminals",
        str(terminals),
        "--in-flight",
        str(in_flight),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--employees",
        str(employees),
        "--processes",
        str(processes),
        *(part for name, pid in watch.items() for part in ("--watch", f"{name}={pid}")),
        "--watch",
        # A PostgreSQL backend's title names its database: "postgres: 15/main: user db host".
        f"postgres=cmd:^postgres: .* {re.escape(database)} ",
        "--json",
    ]
    if rate is not None:
        argv += ["--rate", str(rate)]
    return argv


def loadgen(
    options: Options, server: Server, tokens: Path, rate: float | None, database: str
) -> dict[str, Any]:
    busy = wait_for_quiet(options) if options.quiet_below > 0 else float("nan")
    argv = loadgen_argv(
        [server.url],
        tokens,
        options.terminals,
        options.in_flight,
        options.duration,
        options.warmup,
        options.employees,
        options.processes,
        {"server": str(server.popen.pid)},
        database,
        rate,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"loadgen against {server.name} failed ({done.returncode}):\n{done.stderr[-3000:]}\n"
            f"server log:\n{server.tail()}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    # CPU time per acked punch, in microseconds: what each punch costs the server and PostgreSQL.
    acked = max(result["acked_per_s"], 1e-9)
    for name in ("server", "postgres"):
        result[f"{name}_us_per_punch"] = 1e4 * result["cpu_percent"].get(name, 0.0) / acked
    load = f"rate {rate:,.0f}/s" if rate else f"{options.terminals}x{options.in_flight}"
    print(
        f"  {server.name:<8} {load:<14} acked {result['acked_per_s']:>9,.0f}/s  "
        f"p50 {result['p50_ms']:7.2f}  p99 {result['p99_ms']:7.2f} ms  "
        f"errors {result['errors']}  unacked {result['unacked']}  busy before {busy:.0f}%  cpu "
        + " ".join(f"{k} {v:.0f}%" for k, v in result["cpu_percent"].items()),
        file=sys.stderr,
        flush=True,
    )
    return result


async def provision_hub(base: str, admin_token: str, employees: int, devices: int) -> list[str]:
    """Site ``hq``, employees e0.., devices t0..; returns one terminal token per device."""
    headers = {"authorization": f"Bearer {admin_token}"}
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:

        async def put(path: str, body: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                for attempt in range(3):
                    try:
                        response = await http.put(path, json=body)
                        break
                    except httpx.TransportError:
                        # A kept-alive connection the hub closed as this request left on
                        # it (seen once in 50,000): a PUT can be sent again.
                        if attempt == 2:
                            raise
                        await asyncio.sleep(0.5)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"PUT {path}: {response.status_code} {response.text}")
            answer: dict[str, Any] = response.json()
            return answer

        await put("/v1/sites/hq", {"name": "HQ", "timezone": "UTC"})
        await asyncio.gather(
            *(
                put(f"/v1/employees/e{n}", {"name": f"Employee {n}", "site": "hq", "badge": f"{n}"})
                for n in range(employees)
            )
        )
        answers = await asyncio.gather(
            *(put(f"/v1/devices/t{n}", {"site": "hq"}) for n in range(devices))
        )
    return [str(answer["token"]) for answer in answers]


def hub_env(database_url: str, port: int, settings: dict[str, str]) -> dict[str, str]:
    """The environment for ``hub.cli``: this process's, a fresh secret, and ``settings``."""
    env = dict(os.environ)
    env.update(
        {
            "ATTENDANCE_DATABASE_URL": database_url,
            "ATTENDANCE_SECRET": secrets.token_urlsafe(48),
            "ATTENDANCE_HOST": "127.0.0.1",
            "ATTENDANCE_PORT": str(port),
            **settings,
        }
    )
    return env


def create_tenant(env: dict[str, str]) -> str:
    """Create the benchmark tenant with ``attendance-hub tenant create``; its admin token."""
    created = subprocess.run(
        [sys.executable, "-m", "hub.cli", "tenant", "create", TENANT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return str(json.loads(created.stdout.strip().splitlines()[-1])["admin_token"])


def run_server(
    name: str, options: Options, logs: Path, dsn: str, outcome: Outcome, rounds: int
) -> None:
    port = free_port()
    python = sys.executable
    tokens = logs / f"{name}-tokens.txt"
    env = dict(os.environ)
    if name == "hub":
        env = hub_env(
            # asyncpg passes a DSN's unknown query parameters on as server settings.
            dsn + (f"?{urlencode(options.hub_pg_settings)}" if options.hub_pg_settings else ""),
            port,
            {
                # Every terminal here comes from one address and punches far faster than a
                # real one; limits this high stay in the measured path but never refuse.
                "ATTENDANCE_RATE_PER_S": "1000000",
                "ATTENDANCE_RATE_BURST": "1000000",
                "ATTENDANCE_CONNECT_RATE_PER_IP": "1000000",
                "ATTENDANCE_CONNECT_BURST_PER_IP": "1000000",
                "ATTENDANCE_REST_RATE_PER_IP": "1000000",
                "ATTENDANCE_REST_BURST_PER_IP": "1000000",
                **options.hub_env,
            },
        )
        argv = [python, "-m", "hub.cli", "serve"]
        if options.gc_probe:
            # The same server, with its garbage collector timed (and tuned, if asked).
            argv = [python, str(HERE / "gc_probe.py")]
            env["GC_PROBE_OUT"] = str(logs / "gc-probe.json")
            if options.gc_freeze:
                env["GC_PROBE_FREEZE"] = "1"
            if options.gc_threshold:
                env["GC_PROBE_THRESHOLD"] = options.gc_threshold
        ready = "/readyz"
        admin_token = create_tenant(env)
    else:
        argv = [python, str(HERE / "baselines.py"), name, "--port", str(port)]
        if name == "naive":
            argv += ["--dsn", dsn, "--pool-size", str(options.naive_pool)]
        ready = "/healthz"
    with serving(name, argv, env, port, ready, logs) as server:
        if name == "hub":
            base = f"http://127.0.0.1:{port}"
            terminal_tokens = asyncio.run(
                provision_hub(base, admin_token, options.employees, options.terminals)
            )
            tokens.write_text("\n".join(terminal_tokens) + "\n")
        else:
            tokens.write_text("unchecked\n")
        before = asyncio.run(_stored(dsn, name))
        accepted = unacked = 0
        for _ in range(rounds):
            # An in-flight of 0 skips the throughput scenario, a rate of 0 the latency one.
            scenarios = ((None,) if options.in_flight > 0 else ()) + (
                (options.rate,) if options.rate > 0 else ()
            )
            for rate in scenarios:
                result = loadgen(options, server, tokens, rate, urlsplit(dsn).path.lstrip("/"))
                (outcome.closed if rate is None else outcome.rate).setdefault(name, []).append(
                    result
                )
                accepted += result["total_accepted"]
                unacked += result["unacked"]
        if name != "ceiling":
            stored = asyncio.run(_stored(dsn, name)) - before
            outcome.checks.append(Check(name, accepted, stored, unacked))
    probe = logs / "gc-probe.json"
    if name == "hub" and options.gc_probe and probe.exists():
        outcome.gc = json.loads(probe.read_text())


def median(results: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def report(options: Options, outcome: Outcome) -> str:
    servers = [s for s in SERVERS if s in outcome.closed]
    width = 12
    lines = []
    closed_label = f"{options.terminals} x {options.in_flight} in flight"
    rate_label = f"{options.rate:,.0f}/s offered"
    header = f"{'':<34}" + "".join(f"{s:>{width}}" for s in servers)
    header += f"{'hub/ceiling':>{width}}{'hub/naive':>{width}}"
    lines.append(header)

    def row(label: str, table: dict[str, list[dict[str, Any]]], key: str, ratios: bool) -> None:
        if not table:
            return
        values = {s: median(table[s], key) for s in servers if s in table}
        text = f"{label:<34}" + "".join(
            f"{values.get(s, float('nan')):>{width},.2f}" for s in servers
        )
        if ratios and "hub" in values:
            for other in ("ceiling", "naive"):
                ratio = values["hub"] / values[other] if values.get(other) else float("nan")
                text += f"{ratio:>{width}.2f}"
        lines.append(text)

    row(f"{closed_label}: acked/s", outcome.closed, "acked_per_s", True)
    row(f"{closed_label}: ack p50 ms", outcome.closed, "p50_ms", False)
    row(f"{closed_label}: ack p99 ms", outcome.closed, "p99_ms", False)
    row(f"{closed_label}: server CPU us/punch", outcome.closed, "server_us_per_punch", False)
    row(f"{closed_label}: PG CPU us/punch", outcome.closed, "postgres_us_per_punch", False)
    row(f"{rate_label}: acked/s", outcome.rate, "acked_per_s", False)
    row(f"{rate_label}: ack p50 ms", outcome.rate, "p50_ms", False)
    row(f"{rate_label}: ack p99 ms", outcome.rate, "p99_ms", False)
    row(f"{rate_label}: ack p99.9 ms", outcome.rate, "p999_ms", False)
    row(f"{rate_label}: server CPU us/punch", outcome.rate, "server_us_per_punch", False)
    lines.append("")
    for label, table in ((closed_label, outcome.closed), (rate_label, outcome.rate)):
        for server in (s for s in servers if s in table):
            cpu: dict[str, list[float]] = {}
            for result in table.get(server, []):
                for name, value in result["cpu_percent"].items():
                    cpu.setdefault(name, []).append(value)
            lines.append(
                f"cpu % of one core, {label}, {server}: "
                + "  ".join(f"{k} {statistics.median(v):.0f}" for k, v in cpu.items())
            )
    lines.append("")
    for check in outcome.checks:
        verdict = "OK" if check.ok else "MISMATCH"
        lines.append(
            f"durability check {check.server}: accepted acks {check.accepted}, rows in database "
            f"{check.rows}, unacked at the end {check.unacked}: {verdict}"
        )
    if outcome.gc:
        lines.append("")
        lines.append(
            "hub garbage collection over all its runs (generation: collections, CPU, pauses):"
        )
        for generation, figures in outcome.gc.items():
            lines.append(
                f"  gen {generation}: {figures['collections']:.0f}, {figures['cpu_s']:.2f} s, "
                f"p50 {figures['pause_p50_ms']:.1f} ms, max {figures['pause_max_ms']:.1f} ms"
            )
    if "hub" in outcome.closed:
        lines.append("")
        lines.extend(targets(outcome))
    return "\n".join(lines)


def targets(outcome: Outcome) -> list[str]:
    hub = median(outcome.closed["hub"], "acked_per_s")
    lines = []
    for other, target in (("ceiling", TARGET_VS_CEILING), ("naive", TARGET_VS_NAIVE)):
        if other in outcome.closed:
            ratio = hub / median(outcome.closed[other], "acked_per_s")
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"target hub >= {target} x {other} throughput: {ratio:.2f} x, {verdict}")
    if "hub" in outcome.rate:
        p99 = median(outcome.rate["hub"], "p99_ms")
        verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
        lines.append(f"target hub ack p99 <= {TARGET_P99_MS:.0f} ms: {p99:.2f} ms, {verdict}")
    return lines


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument(
        "--rate", type=float, default=4000.0, help="offered punches/s (0: no latency scenario)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--employees", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--rounds", type=int, default=1, help="runs per scenario; medians shown")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--naive-pool", type=int, default=8, help="the hub's default pool size")
    parser.add_argument(
        "--hub-env", action="append", default=[], metavar="NAME=VALUE", help="hub settings"
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=30.0,
        help="before each run, wait for machine CPU use below this %% of one core (0: don't)",
    )
    parser.add_argument("--quiet-wait", type=float, default=180.0, help="longest wait, seconds")
    parser.add_argument(
        "--gc-probe", action="store_true", help="run the hub via gc_probe.py: time its collections"
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="with the probe: gc.freeze() after start-up"
    )
    parser.add_argument("--gc-threshold", metavar="A,B,C", help="with the probe: gc.set_threshold")
    parser.add_argument(
        "--hub-pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL setting for the hub's sessions, e.g. plan_cache_mode=force_custom_plan",
    )
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--json-out", type=Path, help="write every raw result here")
    args = parser.parse_args(argv)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(servers) - set(SERVERS):
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    if urlsplit(args.pg).hostname not in ("127.0.0.1", "localhost"):
        parser.error("the benchmark only uses the local PostgreSQL")
    hub_env = {}
    for item in args.hub_env:
        name, _, value = item.partition("=")
        if not name.startswith("ATTENDANCE_"):
            parser.error(f"--hub-env takes ATTENDANCE_*=VALUE, got {item!r}")
        hub_env[name] = value
    return Options(
        terminals=args.terminals,
        in_flight=args.in_flight,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        employees=args.employees,
        processes=args.processes,
        rounds=max(1, args.rounds),
        servers=servers,
        pg=args.pg,
        naive_pool=args.naive_pool,
        hub_env=hub_env,
        hub_pg_settings=dict(item.partition("=")[::2] for item in args.hub_pg_setting),
        keep_db=args.keep_db,
        json_out=args.json_out,
        quiet_below=args.quiet_below,
        quiet_wait=args.quiet_wait,
        gc_probe=args.gc_probe or args.gc_freeze or bool(args.gc_threshold),
        gc_freeze=args.gc_freeze,
        gc_threshold=args.gc_threshold,
    )


def hub_revision() -> str:
    """The commit the hub runs from, marked when hub/ or workers/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "hub", "workers"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head} with local changes" if changed else head or "unknown"


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    # `timeout` and CI stop a run with SIGTERM: unwind, so that the servers are stopped and
    # the database is dropped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    outcome = Outcome()
    revision = hub_revision()
    banner = (
        f"punch benchmark: {options.terminals} terminals x {options.in_flight} in flight"
        + (f", and {options.rate:,.0f}/s offered" if options.rate > 0 else "")
        + f"; {options.warmup:.0f} s warmup + {options.duration:.0f} s "
        f"measured, {options.rounds} round(s), medians shown; hub {revision}, settings "
        f"{options.hub_env or 'default'}"
        + (f", PostgreSQL {options.hub_pg_settings}" if options.hub_pg_settings else "")
        + (
            f", gc probe (freeze {options.gc_freeze}, threshold {options.gc_threshold})"
            if options.gc_probe
            else ""
        )
    )
    print(banner, file=sys.stderr, flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="punch-bench-") as scratch,
        fresh_database(options.pg, options.keep_db) as dsn,
    ):
        logs = Path(scratch)
        for name in (s for s in SERVERS if s in options.servers):
            run_server(name, options, logs, dsn, outcome, options.rounds)
    print(banner + "\n\n" + report(options, outcome), flush=True)
    if options.json_out is not None:
        options.json_out.write_text(
            json.dumps(
                {
                    "options": {**asdict(options), "json_out": None},
                    "hub_revision": revision,
                    "closed": outcome.closed,
                    "rate": outcome.rate,
                    "gc": outcome.gc,
                    "checks": [
                        {"server": c.server, "accepted": c.accepted, "rows": c.rows, "ok": c.ok}
                        for c in outcome.checks
                    ],
                },
                indent=1,
            )
        )
    if not all(check.ok for check in outcome.checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
