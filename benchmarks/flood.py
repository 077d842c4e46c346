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
import base64
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import run as bench

# Frames per write: enough that the flooder spends its time in the kernel, not in Python.
FRAMES_PER_WRITE = 256
# Distinct punch ids per flooder; after that they repeat (and are answered `duplicate`).
DISTINCT_WRITES = 64


def masked_frame(payload: bytes) -> bytes:
    """One client-to-server text frame (RFC 6455 section 5.2): FIN, opcode 1, masked."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x81, 0x80 | length])
    elif length < 1 << 16:
        header = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def punch_writes() -> list[bytes]:
    """Blocks of encoded punch frames, built once, so that sending costs almost nothing."""
    at = datetime.now(UTC).isoformat()

    def punch() -> bytes:
        frame = {"type": "punch", "id": str(uuid.uuid4()), "employee": "e1", "kind": "in", "at": at}
        return masked_frame(json.dumps(frame).encode())

    return [b"".join(punch() for _ in range(FRAMES_PER_WRITE)) for _ in range(DISTINCT_WRITES)]


async def handshake(url: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: attendance.v1.json\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    writer.write(masked_frame(json.dumps({"type": "hello", "token": token}).encode()))
    return reader, writer


async def server_frames(reader: asyncio.StreamReader, counts: dict[str, int]) -> None:
    """Read the hub's frames until it closes: count `rate_limited` errors and 4008 closes."""
    while True:
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(length)
        opcode = first & 0x0F
        if opcode == 0x8:
            if int.from_bytes(payload[:2], "big") == 4008:
                counts["closed_4008"] += 1
            return
        if b'"rate_limited"' in payload:
            counts["rate_limited"] += 1


async def flood(
    url: str, token: str, stop: asyncio.Event, counts: dict[str, int], pause: float
) -> None:
    """Send punches as fast as the socket takes them, reconnecting whenever the hub closes.

    The frames are encoded once and written in blocks straight to the socket, so the
    flooding process costs the shared machine little CPU of its own: what the calm
    terminals feel is the hub's handling of the flood, not the flooder's Python.
    """
    writes = punch_writes()
    while not stop.is_set():
        try:
            reader, writer = await handshake(url, token)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.01)
            continue
        counts["connections"] += 1
        closed = asyncio.create_task(server_frames(reader, counts))
        n = 0
        try:
            while not stop.is_set() and not closed.done():
                writer.write(writes[n % DISTINCT_WRITES])
                n += 1
                counts["sent"] += FRAMES_PER_WRITE
                # Blocks while the hub is not reading: TCP backpressure.
                drained = asyncio.create_task(drain(writer))
                await asyncio.wait({drained, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not drained.done():
                    drained.cancel()
                elif not drained.result():
                    break
        finally:
            closed.cancel()
            writer.close()
        if pause:
            await asyncio.sleep(pause)


async def drain(writer: asyncio.StreamWriter) -> bool:
    """False once the hub has closed the socket."""
    try:
        await writer.drain()
    except (OSError, ConnectionError):
        return False
    return True


def flooding(url: str, tokens: list[str], ready: Path, stop_file: Path, pause: float) -> None:
    """Run the flooders until ``stop_file`` appears (in a child process of its own)."""

    async def main() -> None:
        stop = asyncio.Event()
        counts = {"connections": 0, "sent": 0, "rate_limited": 0, "closed_4008": 0}
        tasks = [asyncio.create_task(flood(url, token, stop, counts, pause)) for token in tokens]
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
    parser.add_argument(
        "--reconnect-after",
        type=float,
        default=0.0,
        help="seconds a flooder waits after the hub closes it (0: reconnects at once)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, ready, stop_file = args.child
        flood_tokens = Path(ready).with_suffix(".tokens").read_text().split()
        flooding(url, flood_tokens, Path(ready), Path(stop_file), args.reconnect_after)
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
        env = bench.hub_env(
            dsn,
            port,
            {
                # Every client here comes from 127.0.0.1: only the per-connection limits act.
                "ATTENDANCE_CONNECT_RATE_PER_IP": "1000000",
                "ATTENDANCE_CONNECT_BURST_PER_IP": "1000000",
                "ATTENDANCE_REST_RATE_PER_IP": "1000000",
                "ATTENDANCE_REST_BURST_PER_IP": "1000000",
            },
        )
        admin = bench.create_tenant(env)
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
                child_argv = [sys.executable, __file__, "--child", server.url, str(ready)]
                child_argv += [str(stop), "--reconnect-after", str(args.reconnect_after)]
                child = subprocess.Popen(child_argv)
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
