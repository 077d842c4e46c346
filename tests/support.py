"""Helpers for tests that drive a real hub process over HTTP and WebSocket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import websockets

from hub import store
from hub.tokens import TokenIssuer

JSON = "attendance.v1.json"
MSGPACK = "attendance.v1.msgpack"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_dsn(server_dsn: str, database: str) -> str:
    parts = urlsplit(server_dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def punch_frame(
    employee: str | None = None,
    *,
    badge: str | None = None,
    kind: str = "in",
    at: str | None = None,
    punch_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "punch",
        "id": punch_id or str(uuid.uuid4()),
        "kind": kind,
        "at": at or now_iso(),
    }
    if employee is not None:
        frame["employee"] = employee
    if badge is not None:
        frame["badge"] = badge
    frame.update(extra)
    return frame


@dataclass
class HubProcess:
    """`attendance-hub serve` in a subprocess, so tests can signal and kill it."""

    port: int
    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=lambda: ["serve"])
    popen: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self, timeout: float = 60) -> None:
        env = {
            **os.environ,
            "ATTENDANCE_PORT": str(self.port),
            "ATTENDANCE_HOST": "127.0.0.1",
            **self.env,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", *self.args], env=env, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"hub exited with {self.popen.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"hub did not become ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self) -> None:
        stop_process(self.popen)


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    parent: int
    state: str
    command: bytes  # /proc/<pid>/cmdline: the arguments, each ended by a NUL


def processes() -> Iterator[ProcessEntry]:
    """The processes of the machine, from /proc (those that go while it looks are skipped)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        yield ProcessEntry(int(proc.name), int(fields[1]), fields[0], command)


def stop_process(popen: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a child that may still run, and SIGKILL it if it takes more than 20 s."""
    if popen is None or popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(20)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(10)


class TenantKit:
    """One test tenant: its tokens, an HTTP client, and WebSocket helpers."""

    def __init__(self, base_url: str, dsn: str, secret: str, slug: str) -> None:
        self.base_url = base_url
        self.ws_url = base_url.replace("http://", "ws://") + "/v1/ws"
        self.dsn = dsn
        self.slug = slug
        self.issuer = TokenIssuer(secret)
        self.admin_token = self.token("admin", "test-admin")
        self.http = httpx.AsyncClient(
            base_url=base_url, timeout=30, headers={"authorization": f"Bearer {self.admin_token}"}
        )
        self.terminal_token = ""

    def token(self, role: Any, sub: str, **claims: Any) -> str:
        return self.issuer.issue(tenant=self.slug, role=role, sub=sub, **claims)[0]

    async def create(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await store.ensure_tenant(conn, self.slug, self.slug, "UTC")
        finally:
            await conn.close()

    async def provision(self) -> None:
        response = await self.http.put("/v1/sites/hq", json={"name": "HQ", "timezone": "UTC"})
        assert response.status_code == 201, response.text
        for n in (1, 2, 3):
            response = await self.http.put(
                f"/v1/employees/e{n}",
                json={"name": f"Employee {n}", "site": "hq", "badge": f"b{n}"},
            )
            assert response.status_code == 201, response.text
        response = await self.http.put("/v1/devices/door", json={"site": "hq", "name": "Door"})
        assert response.status_code == 201, response.text
        self.terminal_token = response.json()["token"]

    async def connect(self, token: str | None = None, subprotocol: str = JSON) -> Client:
        ws = await websockets.connect(
            self.ws_url,
            subprotocols=[subprotocol],  # type: ignore[list-item]
            max_size=2**20,
            open_timeout=10,
        )
        client = Client(ws, subprotocol)
        welcome = await client.hello(token or self.terminal_token)
        assert welcome["type"] == "welcome", welcome
        return client

    async def stored(self, *ids: str) -> dict[str, asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT * FROM punches WHERE tenant = $1 AND id = ANY($2::uuid[])",
                self.slug,
                [uuid.UUID(i) for i in ids],
            )
        finally:
            await conn.close()
        return {str(r["id"]): r for r in rows}

    async def count_punches(self) -> int:
        conn = await asyncpg.connect(self.dsn)
        try:
            return int(
                await conn.fetchval("SELECT count(*) FROM punches WHERE tenant = $1", self.slug)
            )
        finally:
            await conn.close()

    async def close(self) -> None:
        await self.http.aclose()


@contextmanager
def running_hub(log_dir: Path, env: dict[str, str]) -> Iterator[HubProcess]:
    """`attendance-hub serve` on a free port with these settings, stopped afterwards."""
    process = HubProcess(port=free_port(), env=env, log_path=log_dir / "hub.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def provisioned_tenant(
    base_url: str, dsn: str, secret: str, prefix: str
) -> AsyncIterator[TenantKit]:
    """A new tenant with a site `hq`, employees e1..e3 (badges b1..b3) and terminal `door`."""
    kit = TenantKit(base_url, dsn, secret, f"{prefix}-{uuid.uuid4().hex[:10]}")
    await kit.create()
    await kit.provision()
    try:
        yield kit
    finally:
        await kit.close()


class Client:
    """A WebSocket client speaking either subprotocol with dict frames."""

    def __init__(self, ws: Any, subprotocol: str) -> None:
        self.ws = ws
        self.subprotocol = subprotocol

    async def send(self, frame: dict[str, Any]) -> None:
        if self.subprotocol == MSGPACK:
            import msgspec

            await self.ws.send(msgspec.msgpack.encode(frame))
        else:
            await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        import asyncio

        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(raw, bytes):
            import msgspec

            frame: dict[str, Any] = msgspec.msgpack.decode(raw)
            return frame
        decoded: dict[str, Any] = json.loads(raw)
        return decoded

    async def hello(self, token: str) -> dict[str, Any]:
        await self.send({"type": "hello", "token": token})
        return await self.recv()

    async def punch(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()
