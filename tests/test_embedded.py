"""The embedded default: `serve` with no database settings, against a data dir of its own.

Each test gets a fresh data dir and runs the real CLI in subprocesses, with
`ATTENDANCE_DATABASE_URL` and `ATTENDANCE_SECRET` removed from the environment
so that the hub must start (or adopt) its own PostgreSQL and keep its own key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.typing import Subprotocol

from hub.embedded_pg import DataDirBusy, EmbeddedPostgres
from tests.support import JSON, Client, HubProcess, free_port, processes, punch_frame

pytestmark = pytest.mark.postgres

CLI_TIMEOUT_S = 90
DEMO_ROLES = ("admin", "supervisor", "terminal", "employee")


class Embedded:
    """One data dir and the hub processes started on it, all stopped at the end."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir.resolve() / "pg"
        self.log_dir = log_dir
        self.hubs: list[HubProcess] = []
        self.port = free_port()

    def hub(self, *args: str) -> HubProcess:
        hub = HubProcess(
            port=self.port,
            env={"ATTENDANCE_DATA_DIR": str(self.data_dir)},
            log_path=self.log_dir / f"serve-{len(self.hubs)}.log",
            args=["serve", *args],
        )
        self.hubs.append(hub)
        return hub

    async def serve(self, *args: str) -> HubProcess:
        hub = self.hub(*args)
        await asyncio.to_thread(hub.start)
        return hub

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hub.cli", *args],
            env=_env(self.data_dir),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )

    async def create_tenant(self) -> str:
        """`tenant create acme` through the CLI; returns the admin token it printed."""
        result = await self.cli(
            "tenant", "create", "acme", "--name", "Acme", "--timezone", "Europe/Berlin"
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1, f"expected one JSON line, got {result.stdout!r}"
        printed = json.loads(lines[0])
        assert set(printed) == {"tenant", "admin_token"} and printed["tenant"] == "acme", printed
        assert isinstance(printed["admin_token"], str) and printed["admin_token"]
        return str(printed["admin_token"])

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def socket_dir(self) -> Path:
        # Where hub.embedded_pg puts the server's Unix socket: a short directory
        # named after the data dir (socket paths are limited to about 107 bytes).
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"attendance-pg-{digest}"

    def server_processes(self) -> list[str]:
        """Live processes whose command line names this data dir (the postmaster, say)."""
        return _live_processes_mentioning(str(self.pgdata).encode())

    async def wait_until_no_server(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while left := self.server_processes():
            assert time.monotonic() < deadline, f"still running on the data dir: {left}"
            await asyncio.sleep(0.05)

    async def cleanup(self) -> None:
        for hub in self.hubs:
            if hub.popen is not None and hub.popen.poll() is None:
                hub.popen.kill()
                await asyncio.to_thread(hub.popen.wait, 10)
        if not self.data_dir.exists():
            return
        # The owner of the data dir stops its server; with every hub gone, that is us.
        embedded = EmbeddedPostgres(self.data_dir)
        try:
            embedded.claim_for_serving()
        except DataDirBusy:
            return
        try:
            await asyncio.to_thread(embedded.stop)
        finally:
            embedded.release()
        with contextlib.suppress(OSError):  # Not empty or already gone: leave it.
            self.socket_dir().rmdir()


def _env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ATTENDANCE_DATABASE_URL", "ATTENDANCE_SECRET")
    }
    env["ATTENDANCE_DATA_DIR"] = str(data_dir)
    return env


def _live_processes_mentioning(needle: bytes) -> list[str]:
    found = []
    for proc in processes():
        if needle in proc.command and proc.state != "Z":
            command = proc.command.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.pid}: {command}")
    return found


def _exists(pid: int) -> bool:
    """Whether the pid is in the process table at all, zombies included."""
    return Path(f"/proc/{pid}").exists()


async def _wait_until_reaped(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _exists(pid):
        assert time.monotonic() < deadline, f"process {pid} was not reaped in {timeout} s"
        await asyncio.sleep(0.05)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # HubProcess passes os.environ on; the embedded default needs neither setting.
    monkeypatch.delenv("ATTENDANCE_DATABASE_URL", raising=False)
    monkeypatch.delenv("ATTENDANCE_SECRET", raising=False)
    yield


@pytest.fixture
async def embedded(tmp_path: Path, clean_env: None) -> AsyncIterator[Embedded]:
    # Not under tmp_path: every pytest session makes its basetemp root private
    # (0700) when it starts, which would lock the server's own account out of a
    # data dir there while another session starts. A fresh dir in /tmp is safe.
    root = Path(tempfile.mkdtemp(prefix="attendance-test-"))
    setup = Embedded(root / "data", tmp_path)
    try:
        yield setup
    finally:
        try:
            await setup.cleanup()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _http(hub: HubProcess, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=hub.base_url, timeout=30, headers={"authorization": f"Bearer {token}"}
    )


async def _provision(hub: HubProcess, admin_token: str) -> str:
    """Site `x`, employee `ada`, device `door`; returns the terminal's token."""
    async with _http(hub, admin_token) as http:
        response = await http.put("/v1/sites/x", json={"name": "X", "timezone": "Europe/Berlin"})
        assert response.status_code == 201, response.text
        response = await http.put("/v1/employees/ada", json={"name": "Ada", "site": "x"})
        assert response.status_code == 201, response.text
        response = await http.put("/v1/devices/door", json={"site": "x"})
        assert response.status_code == 201, response.text
        return str(response.json()["token"])


async def _punch(hub: HubProcess, token: str, punch: dict[str, Any]) -> dict[str, Any]:
    ws = await websockets.connect(hub.ws_url, subprotocols=[Subprotocol(JSON)], open_timeout=10)
    client = Client(ws, JSON)
    try:
        welcome = await client.hello(token)
        assert welcome["type"] == "welcome", welcome
        return await client.punch(punch)
    finally:
        await client.close()


async def _stored_punch_ids(hub: HubProcess, admin_token: str) -> list[str]:
    async with _http(hub, admin_token) as http:
        response = await http.get("/v1/punches")
        assert response.status_code == 200, response.text
        return [p["id"] for p in response.json()["punches"]]


async def _terminate(embedded: Embedded, hub: HubProcess) -> None:
    """SIGTERM the hub: it exits 0 and leaves no PostgreSQL running on its data dir."""
    hub.signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(hub.wait, 30)
    assert returncode == 0, f"serve exited {returncode} after SIGTERM:\n{hub.log()}"
    await embedded.wait_until_no_server()


@pytest.mark.timeout(60)
async def test_tenant_create_while_serving_gives_a_working_admin_token(
    embedded: Embedded,
) -> None:
    hub = await embedded.serve()
    assert embedded.server_processes(), "serve is ready but no embedded postmaster runs"
    token = await embedded.create_tenant()
    async with _http(hub, token) as http:
        response = await http.put("/v1/sites/x", json={"name": "X", "timezone": "Europe/Berlin"})
        assert response.status_code == 201, response.text
        assert response.json()["timezone"] == "Europe/Berlin"
        # `tenant create` used the running server and left it running.
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/v1/sites/x")).status_code == 200
    # Creating it again is harmless and gives another working token.
    again = await embedded.create_tenant()
    async with _http(hub, again) as http:
        assert (await http.get("/v1/sites/x")).status_code == 200
    await _terminate(embedded, hub)


@pytest.mark.timeout(60)
async def test_acked_punch_survives_sigterm_and_restart(embedded: Embedded) -> None:
    hub = await embedded.serve()
    admin = await embedded.create_tenant()
    terminal = await _provision(hub, admin)
    punch = punch_frame("ada")
    assert (await _punch(hub, terminal, punch))["status"] == "accepted"
    await _terminate(embedded, hub)

    hub = await embedded.serve()
    assert await _stored_punch_ids(hub, admin) == [punch["id"]]
    # The secret was kept in the data dir: tokens from before the restart still work.
    assert (await _punch(hub, terminal, punch))["status"] == "duplicate"
    await _terminate(embedded, hub)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("also_kill_postmaster", [False, True], ids=["hub", "hub-and-postmaster"])
async def test_serve_after_sigkill_starts_without_cleanup(
    embedded: Embedded, also_kill_postmaster: bool
) -> None:
    hub = await embedded.serve()
    admin = await embedded.create_tenant()
    terminal = await _provision(hub, admin)
    punch = punch_frame("ada")
    assert (await _punch(hub, terminal, punch))["status"] == "accepted"
    postmaster = embedded.postmaster_pid()
    assert postmaster is not None
    hub.signal(signal.SIGKILL)
    assert await asyncio.to_thread(hub.wait, 10) == -signal.SIGKILL
    if also_kill_postmaster:
        # A power cut for the database too: a stale postmaster.pid stays behind.
        os.kill(postmaster, signal.SIGKILL)
        # Until init reaps it, the dead postmaster is a zombie that PostgreSQL's
        # lock-file check still counts as running; a crash is over once it is reaped.
        await _wait_until_reaped(postmaster)

    hub = await embedded.serve()
    assert await _stored_punch_ids(hub, admin) == [punch["id"]]
    assert (await _punch(hub, terminal, punch))["status"] == "duplicate"
    later = punch_frame("ada", kind="out")
    assert (await _punch(hub, terminal, later))["status"] == "accepted"
    await _terminate(embedded, hub)


@pytest.mark.timeout(60)
async def test_demo_prints_tokens_that_work(embedded: Embedded) -> None:
    hub = await embedded.serve("--demo")
    tokens: dict[str, str] = {}
    for line in hub.log_path.read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] in DEMO_ROLES and words[1] == "token:":
            tokens[words[0]] = words[2]
    assert sorted(tokens) == sorted(DEMO_ROLES), hub.log()

    async with _http(hub, tokens["admin"]) as http:
        response = await http.get("/v1/employees")
        assert response.status_code == 200, response.text
        assert len(response.json()["employees"]) == 5
    async with _http(hub, tokens["supervisor"]) as http:
        response = await http.get("/v1/sites")
        assert response.status_code == 200, response.text
        assert [s["id"] for s in response.json()["sites"]] == ["hq"]
        # The demo's floor has someone late on it from the start.
        response = await http.get("/v1/presence/hq")
        assert response.status_code == 200, response.text
        assert [(m["employee"], m["state"], m.get("late")) for m in response.json()["members"]] == [
            ("edsger", "out", True)
        ]
    at_the_door = punch_frame(badge="1002")
    assert (await _punch(hub, tokens["terminal"], at_the_door))["status"] == "accepted"
    on_the_phone = punch_frame("ada", method="mobile")
    assert (await _punch(hub, tokens["employee"], on_the_phone))["status"] == "accepted"
    async with _http(hub, tokens["employee"]) as http:
        response = await http.get("/v1/punches")
        assert response.status_code == 200, response.text
        assert [p["id"] for p in response.json()["punches"]] == [on_the_phone["id"]]
    await _terminate(embedded, hub)


@pytest.mark.timeout(60)
async def test_migrate_on_the_embedded_dir(embedded: Embedded) -> None:
    first = await embedded.cli("migrate")
    assert first.returncode == 0, first.stderr
    applied = json.loads(first.stdout.splitlines()[-1])["applied"]
    assert applied, f"a fresh data dir got no migrations: {first.stdout!r}"
    # It started the server for itself, so it stopped it again.
    await embedded.wait_until_no_server()
    second = await embedded.cli("migrate")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.splitlines()[-1]) == {"applied": []}

    hub = await embedded.serve()
    while_serving = await embedded.cli("migrate")
    assert while_serving.returncode == 0, while_serving.stderr
    assert json.loads(while_serving.stdout.splitlines()[-1]) == {"applied": []}
    # The serving hub's server was used, not stopped.
    async with httpx.AsyncClient(base_url=hub.base_url, timeout=10) as http:
        assert (await http.get("/readyz")).status_code == 200
    await _terminate(embedded, hub)


@pytest.mark.timeout(60)
async def test_second_serve_on_the_same_data_dir_is_refused(embedded: Embedded) -> None:
    hub = await embedded.serve()
    other = embedded.hub()
    other.port = free_port()
    with pytest.raises(RuntimeError, match="already serving"):
        await asyncio.to_thread(other.start)
    assert other.popen is not None and other.popen.returncode == 2
    async with httpx.AsyncClient(base_url=hub.base_url, timeout=10) as http:
        assert (await http.get("/readyz")).status_code == 200
    await _terminate(embedded, hub)
