"""Presence fan-out: one punch every ``--interval-ms`` into a site watched by many dashboards.

Each setup of ``--setups`` in turn, in the same run, on a fresh database of the machine's
PostgreSQL: ``single`` is the embedded default's code path (one process, in-process
fan-out); ``redis`` is two ``serve --no-workers`` hubs and ``--workers`` worker processes on
the machine's Redis, with the dashboards spread over both hubs and the terminals on the
first, so every delta travels through the workers and the presence stream. Opens
``--dashboards`` sockets
subscribed to ``presence:hq`` (spread over ``--processes`` listener processes that read
raw frames, so that the listeners cost the shared machine little), and has one terminal
punch employees in and out at a steady pace. Every punch changes the floor, so every
punch is one delta to every dashboard. Reported: the terminal's ack latency, and for each
(punch, dashboard) pair the time from the punch leaving the terminal, and from its ack
reaching the terminal, to the delta reaching the dashboard. The hub queues a commit's
deltas before its acks, so the second is often negative.

    .venv/bin/python benchmarks/fanout.py
    .venv/bin/python benchmarks/fanout.py --setups redis --interval-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import flood
import numpy as np
import redis
import run as bench
import scaleout
import websockets


async def listen(url: str, token: str, ready: asyncio.Event, seen: list[tuple[str, float]]) -> None:
    """One dashboard: subscribe, then note when each delta's change arrives (by its `since`)."""
    reader, writer = await flood.handshake(url, token)
    await read_frame(reader)  # welcome
    writer.write(flood.masked_frame(b'{"type": "subscribe", "channel": "presence:hq"}'))
    await read_frame(reader)  # subscribed
    await read_frame(reader)  # snapshot
    ready.set()
    buffer = b""
    while True:
        # Whole reads, parsed in a loop: a frame costs the listener a few microseconds.
        chunk = await reader.read(1 << 16)
        now = time.time()
        if not chunk:
            return
        buffer += chunk
        offset = 0
        while len(buffer) - offset >= 2:
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if len(buffer) - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                start = offset + 4
            if len(buffer) < start + length:
                break
            if buffer[offset] & 0x0F == 0x8:
                return
            payload = buffer[start : start + length]
            offset = start + length
            if payload.startswith(b'{"type":"delta"'):
                # One change per delta here; its `since` is found, not decoded, to keep the
                # listeners (which share the hub's two cores) cheap.
                at = payload.find(b'"since":"') + 9
                seen.append((payload[at : at + 24].decode(), now))
        buffer = buffer[offset:]


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next text frame's payload; None once the hub closes."""
    try:
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return None if first & 0x0F == 0x8 else payload


def listener(url: str, token: str, count: int, ready: Path, stop: Path, out: Path) -> None:
    """A child process holding ``count`` dashboards until ``stop`` appears."""

    async def main() -> None:
        seen: list[tuple[str, float]] = []
        events = [asyncio.Event() for _ in range(count)]
        tasks = []
        for event in events:
            tasks.append(asyncio.create_task(listen(url, token, event, seen)))
            await asyncio.sleep(0.002)
        await asyncio.gather(*(event.wait() for event in events))
        await asyncio.to_thread(ready.write_text, "ready")
        while not await asyncio.to_thread(stop.exists):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(out.write_text, json.dumps(seen))

    asyncio.run(main())


async def punch_steadily(
    url: str, tokens: list[str], interval_s: float, duration_s: float, employees: int
) -> dict[str, tuple[float, float]]:
    """Punch every ``interval_s``, round-robin over the terminals (each stays under its rate).

    Returns each punch's `since` text -> (sent, acked) wall times.
    """
    timings: dict[str, tuple[float, float]] = {}
    sent_at: dict[str, tuple[str, float]] = {}
    base = datetime.now(UTC) - timedelta(minutes=10)
    sockets = [
        await websockets.connect(url, subprotocols=["attendance.v1.json"])  # type: ignore[list-item]
        for _ in tokens
    ]
    for ws, token in zip(sockets, tokens, strict=True):
        await ws.send(json.dumps({"type": "hello", "token": token}))
        await ws.recv()

    async def acks(ws: websockets.ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame.get("type") == "ack" and frame["id"] in sent_at:
                since, sent = sent_at.pop(frame["id"])
                timings[since] = (sent, time.time())

    readers = [asyncio.create_task(acks(ws)) for ws in sockets]
    state: dict[int, str] = {}
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < duration_s:
        employee = n % employees
        kind = "out" if state.get(employee) == "in" else "in"
        state[employee] = kind
        # Distinct to the millisecond, so a delta's `since` names its punch.
        at = base + timedelta(milliseconds=10 * n)
        punch_id = str(uuid.uuid4())
        since = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        sent_at[punch_id] = (since, time.time())
        frame = {"type": "punch", "id": punch_id, "employee": f"e{employee}", "kind": kind}
        await sockets[n % len(sockets)].send(json.dumps({**frame, "at": at.isoformat()}))
        n += 1
        await asyncio.sleep(max(0.0, start + n * interval_s - time.monotonic()))
    await asyncio.sleep(2)
    for reader in readers:
        reader.cancel()
    for ws in sockets:
        await ws.close()
    if sent_at:
        raise RuntimeError(f"{len(sent_at)} punches were not acked")
    return timings


def percentiles(values: np.ndarray) -> str:
    if not len(values):
        return "no samples"
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return f"p50 {p50:7.2f}  p99 {p99:7.2f}  p99.9 {p999:7.2f}  max {values.max():7.2f} ms"


def run_setup(
    setup: str, args: argparse.Namespace, logs: Path
) -> tuple[dict[str, tuple[float, float]], list[tuple[str, float]]]:
    """One setup's punches (since -> sent, acked) and what the dashboards saw (since, when)."""
    with bench.fresh_database(args.pg, keep=False) as dsn, ExitStack() as stack:
        # Every dashboard comes from 127.0.0.1.
        settings = {"ATTENDANCE_CONNECT_RATE_PER_IP": "0", "ATTENDANCE_REST_RATE_PER_IP": "0"}
        prefix = f"bench-fanout-{secrets.token_hex(4)}"
        argv = [sys.executable, "-m", "hub.cli", "serve"]
        if setup == "redis":
            settings |= {"ATTENDANCE_REDIS_URL": args.redis, "ATTENDANCE_REDIS_PREFIX": prefix}
            argv.append("--no-workers")
        ports = [bench.free_port() for _ in range(2 if setup == "redis" else 1)]
        envs = [bench.hub_env(dsn, port, settings) for port in ports]
        for env in envs[1:]:
            env["ATTENDANCE_SECRET"] = envs[0]["ATTENDANCE_SECRET"]
        admin = bench.create_tenant(envs[0])
        servers = [
            stack.enter_context(bench.serving(f"{setup}-hub{n}", argv, env, port, "/readyz", logs))
            for n, (env, port) in enumerate(zip(envs, ports, strict=True))
        ]
        if setup == "redis":
            for n in range(args.workers):
                stack.enter_context(scaleout.worker(f"{setup}-worker{n}", envs[0], logs))
        terminals = asyncio.run(
            bench.provision_hub(
                f"http://127.0.0.1:{ports[0]}", admin, args.employees, args.terminals
            )
        )
        children: list[subprocess.Popen[bytes]] = []
        outs: list[Path] = []
        readies: list[Path] = []
        stop = logs / f"{setup}-stop"
        share = args.dashboards // args.processes
        for n in range(args.processes):
            count = share + (1 if n < args.dashboards % args.processes else 0)
            ready, out = logs / f"{setup}-ready-{n}", logs / f"{setup}-seen-{n}.json"
            # The dashboards spread over the hubs; the terminals all punch at the first.
            url = servers[n % len(servers)].url
            command = [sys.executable, __file__, "--child", url, admin, str(count)]
            children.append(subprocess.Popen([*command, str(ready), str(stop), str(out)]))
            outs.append(out)
            readies.append(ready)
        try:
            while not all(ready.exists() for ready in readies):
                if any(child.poll() is not None for child in children):
                    raise RuntimeError("a listener exited early")
                time.sleep(0.2)
            timings = asyncio.run(
                punch_steadily(
                    servers[0].url,
                    terminals,
                    args.interval_ms / 1000,
                    args.duration,
                    args.employees,
                )
            )
            stop.write_text("")
            for child in children:
                child.wait(60)
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
            if setup == "redis":
                client = redis.Redis.from_url(args.redis)
                for key in client.scan_iter(match=f"{prefix}:*"):
                    client.delete(key)
                client.close()
    seen = [(since, at) for out in outs for since, at in json.loads(out.read_text())]
    return timings, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboards", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="listener processes")
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--employees", type=int, default=50)
    parser.add_argument("--terminals", type=int, default=4)
    parser.add_argument(
        "--setups", default="single,redis", help="single (one process), redis (two hubs)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (redis)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, token, count, ready, stop, out = args.child
        listener(url, token, int(count), Path(ready), Path(stop), Path(out))
        return
    logs = Path(tempfile.mkdtemp(prefix="attendance-fanout-"))
    for setup in args.setups.split(","):
        timings, seen = run_setup(setup, args, logs)
        ack = np.array([(acked - sent) * 1000 for sent, acked in timings.values()])
        delivery = np.array(
            [(at - timings[since][1]) * 1000 for since, at in seen if since in timings]
        )
        from_send = np.array(
            [(at - timings[since][0]) * 1000 for since, at in seen if since in timings]
        )
        expected = len(timings) * args.dashboards
        hubs = "two hubs on Redis" if setup == "redis" else "one process"
        print(
            f"\n{setup}: {hubs}, {args.dashboards} dashboards on presence:hq, one punch every "
            f"{args.interval_ms:g} ms for {args.duration:g} s ({len(timings)} punches acked)"
        )
        print(f"  terminal ack, send -> ack:           {percentiles(ack)}")
        print(f"  delivery, send -> each dashboard:    {percentiles(from_send)}")
        print(f"  delivery, ack -> each dashboard:     {percentiles(delivery)}")
        print(f"  deltas received {len(delivery):,} of {expected:,} expected")


if __name__ == "__main__":
    main()
