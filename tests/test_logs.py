"""Structured logs: ATTENDANCE_LOG_FORMAT=json makes a real hub write one JSON object per
line, with the request id of an HTTP request and the session of a WebSocket session."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets

from hub import logs
from hub.config import ConfigError, Settings
from tests.conftest import TEST_SECRET
from tests.support import JSON, Client, HubProcess, TenantKit, provisioned_tenant, running_hub

pytestmark = pytest.mark.postgres

# What `serve` prints (not logs) when it starts: the only lines that are not JSON.
BANNER = "attendance-hub serving on "


@pytest.fixture(scope="module")
def json_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_LOG_FORMAT": "json",
    }
    with running_hub(tmp_path_factory.mktemp("json-logs"), env) as process:
        yield process


@pytest.fixture
async def kit(json_hub: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    async with provisioned_tenant(json_hub.base_url, database, TEST_SECRET, "l") as tenant:
        yield tenant


def log_lines(hub: HubProcess) -> list[dict[str, Any]]:
    """Every line the hub wrote, parsed; fails on a line that is neither JSON nor the banner."""
    entries = []
    for line in hub.log_path.read_text().splitlines():
        if line.startswith(BANNER):
            continue
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


async def lines_with(
    hub: HubProcess, key: str, wanted: str, timeout: float = 10
) -> list[dict[str, Any]]:
    """The parsed lines whose ``key`` is ``wanted``, once there is one (or ``timeout`` s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [entry for entry in log_lines(hub) if entry.get(key) == wanted]
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_a_rest_request_is_logged_with_its_request_id(
    json_hub: HubProcess, kit: TenantKit
) -> None:
    given = f"test-{secrets.token_hex(6)}"
    response = await kit.http.get("/v1/sites", headers={"x-request-id": given})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == given
    [access] = await lines_with(json_hub, "request_id", given)
    assert access["logger"] == "uvicorn.access"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/v1/sites", 200)
    # Without one, the hub makes one and hands it back.
    response = await kit.http.get("/v1/employees/nobody")
    assert response.status_code == 404
    made = response.headers["x-request-id"]
    assert len(made) == 32 and made != given
    [access] = await lines_with(json_hub, "request_id", made)
    assert access["status"] == 404
    # One that could put anything in a log line is replaced.
    response = await kit.http.get("/healthz", headers={"x-request-id": "two words"})
    assert response.headers["x-request-id"] != "two words"


async def test_a_websocket_session_is_logged_with_its_session(
    json_hub: HubProcess, kit: TenantKit
) -> None:
    ws = await websockets.connect(kit.ws_url, subprotocols=[JSON])  # type: ignore[list-item]
    door = Client(ws, JSON)
    welcome = await door.hello(kit.terminal_token)
    assert welcome["type"] == "welcome"
    await door.send({"type": "ping", "ref": "p1"})
    assert (await door.recv())["type"] == "pong"
    await door.close()
    # The id `welcome` gave the client is on the lines logged within its session, from the
    # handshake's on.
    entries = await lines_with(json_hub, "session", welcome["session"])
    assert any("WebSocket /v1/ws" in entry["message"] for entry in entries), entries
    assert all("request_id" not in entry for entry in entries)


def test_the_json_formatter_writes_context_extra_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(f"attendance-test-{secrets.token_hex(3)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        request = logs.REQUEST_ID.set("req-1")
        session = logs.SESSION.set("running")
        try:
            logger.warning("about %s", "someone else", extra={"session": "other"})
            try:
                raise ValueError("broken")
            except ValueError:
                logger.exception("it failed: ünïcode")
        finally:
            logs.SESSION.reset(session)
            logs.REQUEST_ID.reset(request)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "about someone else"
    assert (first["session"], first["request_id"], first["level"]) == ("other", "req-1", "WARNING")
    assert second["session"] == "running" and "ValueError: broken" in second["exception"]
    assert second["message"] == "it failed: ünïcode"
    assert "session" not in third and "request_id" not in third
    assert third["time"].endswith("+00:00")


def test_the_log_format_setting() -> None:
    assert Settings.from_env({}).log_format == "plain"
    assert Settings.from_env({"ATTENDANCE_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="ATTENDANCE_LOG_FORMAT"):
        Settings.from_env({"ATTENDANCE_LOG_FORMAT": "xml"})
    assert logs.request_id([(b"x-request-id", b"abc-1")]) == "abc-1"
    assert logs.request_id([(b"x-request-id", b"x" * 129)]) != "x" * 129


def test_plain_stays_as_it_was() -> None:
    assert logs.uvicorn_options("plain") == {"access_log": False}
    assert logs.uvicorn_options("json") == {"log_config": None, "access_log": True}


async def test_metrics_scrapes_are_logged_too(json_hub: HubProcess) -> None:
    async with httpx.AsyncClient(base_url=json_hub.base_url, timeout=10) as http:
        response = await http.get("/metrics")
    made = response.headers["x-request-id"]
    [access] = await lines_with(json_hub, "request_id", made)
    assert access["path"] == "/metrics"
