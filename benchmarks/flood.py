"""A flooding client beside calm terminals: do the calm terminals keep their ack latency?

Starts the hub with its default per-connection rate limit (the per-address limits are
raised, since every client here comes from 127.0.0.1), provisions it as run.py does, and
then, each round, runs the latency load (``--rate`` punches/s over ``--terminals``
terminals) twice, side by side: alone, and while ``--flooders`` connections send punches
as fast as they can, reconnecting whenever the hub closes them (4008).

    .venv/bin/python benchmarks/flood.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import run as bench
import websockets


async def flood(url: str, token: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Send punches without waiting for acks; count what the hub refuses and closes."""
    while not stop.is_set():
        try:
            async with websockets.connect(url, subprotocols=["attendance.v1.json"]) as ws:  # type: ignore[list-item]
                await ws.send(json.dumps({"type": "hello", "token": token}))
                await ws.recv()
                reader = asyncio.create_task(_drain(ws, counts))
                while not stop.is_set():
                    frame = {
                        "type": "punch",
                        "id": str(uuid.uuid4()),
                        "employee": "e1",
                        "kind": "in",
                        "at": datetime.now(UTC).isoformat(),
                    }
                    await ws.send(json.dumps(frame))
                    counts["sent"] += 1
                    if counts["sent"] % 64 == 0:
                        await asyncio.sleep(0)
                reader.cancel()
        except websockets.ConnectionClosed as closed:
            if closed.rcvd is not None and closed.rcvd.code == 4008:
                counts["closed_4008"] += 1


async def _drain(ws: websockets.ClientConnection, counts: dict[str, int]) -> None:
    try:
        async for raw in ws:
            if json.loads(raw).get("code") == "rate_limited":
                counts["rate_limited"] += 1
    except websockets.ConnectionClosed:
        return


def flooding(url: str, tokens: list[str], ready: Path, stop_file: Path) -> None:
    """Run the flooders until ``stop_file`` appears (in a child process of its own)."""

    async def main() -> None:
        stop = asyncio.Event()
        counts = {"sent": 0, "rate_limited": 0, "closed_4008": 0}
        tasks = [asyncio.create_task(flood(url, token, stop, counts)) for token in tokens]
        await asyncio.to_thread(ready.write_text, "ready")
        # The parent creates the stop file; poll for it (no event crosses processes).
        while not await asyncio.to_thread(stop_file.exists):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait(tasks, timeout=5)
        await asyncio.to_thread(stop_file.write_text, json.dumps(counts))

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=4000.0)
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--flooders", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, ready, stop_file = args.child
        tokens = Path(ready).with_suffix(".tokens").read_text().split()
        flooding(url, tokens, Path(ready), Path(stop_file))
        return
    options = bench.parse_args(
        [
            "--terminals", str(args.terminals + args.flooders),
            "--in-flight", "0",
            "--rate", str(args.rate),
            "--duration", str(args.duration),
            "--warmup", str(args.warmup),
        ]
    )  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="attendance-flood-"))
    results: dict[str, list[dict[str, float]]] = {"alone": [], "flooded": []}
    flood_counts = []
    with bench.fresh_database(options.pg, keep=False) as dsn:
        port = bench.free_port()
        env = dict(os.environ)
        env.update(
            {
                "ATTENDANCE_DATABASE_URL": dsn,
                "ATTENDANCE_SECRET": secrets.token_urlsafe(48),
                "ATTENDANCE_HOST": "127.0.0.1",
                "ATTENDANCE_PORT": str(port),
                # Every client here comes from 127.0.0.1: only the per-connection limits act.
                "ATTENDANCE_CONNECT_RATE_PER_IP": "1000000",
                "ATTENDANCE_CONNECT_BURST_PER_IP": "1000000",
                "ATTENDANCE_REST_RATE_PER_IP": "1000000",
                "ATTENDANCE_REST_BURST_PER_IP": "1000000",
            }
        )
        created = subprocess.run(
            [sys.executable, "-m", "hub.cli", "tenant", "create", bench.TENANT],
            env=env, cwd=bench.REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        admin = json.loads(created.stdout.strip().splitlines()[-1])["admin_token"]
        argv = [sys.executable, "-m", "hub.cli", "serve"]
        with bench.serving("hub", argv, env, port, "/readyz", logs) as server:
            all_tokens = asyncio.run(
                bench.provision_hub(
                    f"http://127.0.0.1:{port}", admin, options.employees, options.terminals
                )
            )
            calm, flooders = all_tokens[: args.terminals], all_tokens[args.terminals :]
            tokens = logs / "calm-tokens.txt"
            tokens.write_text("\n".join(calm) + "\n")
            database = urlsplit(dsn).path.lstrip("/")
            options = bench.parse_args(
                [
                    "--terminals", str(args.terminals),
                    "--in-flight", "0",
                    "--rate", str(args.rate),
                    "--duration", str(args.duration),
                    "--warmup", str(args.warmup),
                ]
            )  # fmt: skip
            # The flooders keep the machine busy on purpose: do not wait for it to go quiet.
            busy = dataclasses.replace(options, quiet_below=0)
            for n in range(args.rounds):
                results["alone"].append(bench.loadgen(options, server, tokens, args.rate, database))
                ready, stop = logs / f"flood-{n}.ready", logs / f"flood-{n}.stop"
                ready.with_suffix(".tokens").write_text("\n".join(flooders))
                child = subprocess.Popen(
                    [sys.executable, __file__, "--child", server.url, str(ready), str(stop)]
                )
                while not ready.exists():
                    if child.poll() is not None:
                        raise RuntimeError("the flooder exited early")
                    subprocess.run(["sleep", "0.1"], check=True)
                results["flooded"].append(bench.loadgen(busy, server, tokens, args.rate, database))
                stop.write_text("")
                child.wait(30)
                flood_counts.append(json.loads(stop.read_text()))
    print(f"\ncalm terminals: {args.terminals} at {args.rate:,.0f} punches/s; "
          f"flooders: {args.flooders}; {args.rounds} round(s), medians")  # fmt: skip
    for key in ("acked_per_s", "p50_ms", "p99_ms", "p999_ms", "errors"):
        alone = statistics.median(r[key] for r in results["alone"])
        flooded = statistics.median(r[key] for r in results["flooded"])
        ratio = f"{flooded / alone:5.2f} x" if alone else ""
        print(f"  {key:<12} alone {alone:10.2f}   flooded {flooded:10.2f}   {ratio}")
    for counts in flood_counts:
        print(f"  flooders: {counts}")


if __name__ == "__main__":
    main()
