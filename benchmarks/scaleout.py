"""Scale-out: two hubs and their workers on Redis against the single process, same run.

Each setup in turn, on a fresh database of the machine's PostgreSQL, with the same load
generator (``loadgen.py``):

* ``single``: one ``attendance-hub serve``, everything in one process, no Redis;
* ``redis``: two ``attendance-hub serve --no-workers`` hubs and ``--workers`` worker
  processes on the machine's Redis (a prefix of their own), the terminals split between
  the two hubs.

Scenarios: a closed loop of ``--terminals`` x ``--in-flight`` (acked punches/s) and an open
loop at ``--rate`` punches/s (ack latency). Every accepted ack is checked against the rows
stored. Prints redis/single for each figure.

    .venv/bin/python benchmarks/scaleout.py
    .venv/bin/python benchmarks/scaleout.py --workers 1 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
from run import (
    REPO,
    Server,
    _stored,
    create_tenant,
    free_port,
    fresh_database,
    hub_env,
    loadgen_argv,
    provision_hub,
    serving,
)

# Every terminal comes from one address and punches far faster than a real one.
UNLIMITED = {
    "ATTENDANCE_RATE_PER_S": "1000000",
    "ATTENDANCE_RATE_BURST": "1000000",
    "ATTENDANCE_CONNECT_RATE_PER_IP": "1000000",
    "ATTENDANCE_CONNECT_BURST_PER_IP": "1000000",
    "ATTENDANCE_REST_RATE_PER_IP": "1000000",
    "ATTENDANCE_REST_BURST_PER_IP": "1000000",
}


@contextmanager
def worker(name: str, env: dict[str, str], logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = logs / f"{name}.log"
    with log.open("ab") as sink:
        popen = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "worker", "--name", name],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=sink,
        )
    try:
        yield popen
    finally:
        popen.terminate()
        popen.wait(30)


def load(
    args: argparse.Namespace,
    hubs: list[Server],
    watch: dict[str, int],
    tokens: Path,
    rate: float | None,
    database: str,
) -> dict[str, Any]:
    argv = loadgen_argv(
        [hub.url for hub in hubs],
        tokens,
        args.terminals,
        args.in_flight,
        args.duration,
        args.warmup,
        args.employees,
        1,
        {name: str(pid) for name, pid in watch.items()},
        database,
        rate,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        tails = "\n".join(hub.tail() for hub in hubs)
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr[-3000:]}\n{tails}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_setup(
    setup: str, args: argparse.Namespace, logs: Path, results: dict[str, list[dict[str, Any]]]
) -> str:
    with fresh_database(args.pg, keep=False) as dsn, ExitStack() as stack:
        settings = dict(UNLIMITED)
        prefix = f"bench-{secrets.token_hex(4)}"
        if setup == "redis":
            settings |= {"ATTENDANCE_REDIS_URL": args.redis, "ATTENDANCE_REDIS_PREFIX": prefix}
        ports = [free_port() for _ in range(2 if setup == "redis" else 1)]
        envs = [hub_env(dsn, port, settings) for port in ports]
        # One secret for every process of the setup.
        for env in envs[1:]:
            env["ATTENDANCE_SECRET"] = envs[0]["ATTENDANCE_SECRET"]
        admin = create_tenant(envs[0])
        argv = [sys.executable, "-m", "hub.cli", "serve"]
        if setup == "redis":
            argv.append("--no-workers")
        hubs = [
            stack.enter_context(serving(f"{setup}-hub{n}", argv, env, port, "/readyz", logs))
            for n, (env, port) in enumerate(zip(envs, ports, strict=True))
        ]
        watch = {f"hub{n}": hub.popen.pid for n, hub in enumerate(hubs)}
        if setup == "redis":
            for n in range(args.workers):
                popen = stack.enter_context(worker(f"worker{n}", envs[0], logs))
                watch[f"worker{n}"] = popen.pid
        tokens = logs / f"{setup}-tokens.txt"
        terminal_tokens = asyncio.run(
            provision_hub(f"http://127.0.0.1:{ports[0]}", admin, args.employees, args.terminals)
        )
        tokens.write_text("\n".join(terminal_tokens) + "\n")
        accepted = unacked = 0
        database = dsn.rsplit("/", 1)[1]
        for _ in range(args.rounds):
            for scenario, rate in (("closed", None), ("rate", args.rate)):
                result = load(args, hubs, watch, tokens, rate, database)
                results.setdefault(f"{setup} {scenario}", []).append(result)
                accepted += result["total_accepted"]
                unacked += result["unacked"]
                cpu = " ".join(f"{k} {v:.0f}%" for k, v in result["cpu_percent"].items())
                print(
                    f"  {setup:<6} {scenario:<6} acked {result['acked_per_s']:>8,.0f}/s  "
                    f"p50 {result['p50_ms']:7.2f}  p99 {result['p99_ms']:7.2f} ms  "
                    f"unacked {result['unacked']}  cpu {cpu}",
                    file=sys.stderr,
                    flush=True,
                )
        rows = asyncio.run(_stored(dsn, "hub"))
        if setup == "redis":
            client = redis.Redis.from_url(args.redis)
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)
            client.close()
        verdict = "OK" if accepted <= rows <= accepted + unacked else "MISMATCH"
        return f"durability {setup}: accepted {accepted}, rows {rows}, unacked {unacked}: {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--rate", type=float, default=2000.0, help="open loop, punches/s")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--employees", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        checks = [run_setup(setup, args, Path(tmp), results) for setup in ("single", "redis")]
    print()
    print(f"{'':<36}{'single':>10}{'redis':>10}{'redis/single':>14}")
    for scenario, label in (
        ("closed", f"{args.terminals} x {args.in_flight} in flight"),
        ("rate", f"{args.rate:,.0f}/s offered"),
    ):
        for key, name in (
            ("acked_per_s", "acked/s"),
            ("p50_ms", "ack p50 ms"),
            ("p99_ms", "ack p99 ms"),
        ):
            single = statistics.median(r[key] for r in results[f"single {scenario}"])
            scaled = statistics.median(r[key] for r in results[f"redis {scenario}"])
            print(
                f"{label + ': ' + name:<36}{single:>10,.2f}{scaled:>10,.2f}{scaled / single:>14.2f}"
            )
    print()
    for check in checks:
        print(check)


if __name__ == "__main__":
    main()
