"""Abuse limits against a real hub: frame rate and floods, connections per tenant, browser
origins, connection attempts and requests per client address."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from hub.ws import refuse_handshake
from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)

pytestmark = pytest.mark.postgres

RATE_PER_S = 10
RATE_BURST = 10
RATE_FLOOD = 20
TENANT_CAP = 3
DASHBOARD = "https://dash.example.com"


@pytest.fixture(scope="module")
def limited_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_RATE_PER_S": str(RATE_PER_S),
        "ATTENDANCE_RATE_BURST": str(RATE_BURST),
        "ATTENDANCE_RATE_FLOOD": str(RATE_FLOOD),
        "ATTENDANCE_MAX_CONNECTIONS_PER_TENANT": str(TENANT_CAP),
        "ATTENDANCE_ALLOWED_ORIGINS": f"{DASHBOARD}, capacitor://localhost",
    }
    with running_hub(tmp_path_factory.mktemp("limited-hub"), env) as process:
        yield process


@pytest.fixture
async def kit(limited_hub: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    async with provisioned_tenant(limited_hub.base_url, database, TEST_SECRET, "a") as tenant:
        yield tenant


async def refusal_count(base_url: str, limit: str) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    prefix = f'attendance_limit_refusals_total{{limit="{limit}"}} '
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def device_token(kit: TenantKit, name: str) -> str:
    """A terminal of its own (the hub remembers a flooder by its identity)."""
    response = await kit.http.put(f"/v1/devices/{name}", json={"site": "hq", "name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


async def frames_until_closed(client: Client) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame the hub sends from now on, and the close code it ends with."""
    frames = []
    try:
        while True:
            frames.append(await client.recv())
    except websockets.ConnectionClosed as closed:
        return frames, closed.rcvd.code if closed.rcvd else None


async def stored_once_committed(kit: TenantKit, ids: list[str], expected: int) -> set[str]:
    """The stored ids among ``ids`` once ``expected`` of them are (or 5 s have passed).

    A close does not wait for the batch that holds the punches let through before it.
    """
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        stored = set(await kit.stored(*ids))
        if len(stored) >= expected or asyncio.get_running_loop().time() > deadline:
            return stored
        await asyncio.sleep(0.05)


# -- frame rate --------------------------------------------------------------------------------


async def test_a_flood_is_refused_and_closed_4008_while_a_calm_client_gets_every_ack(
    kit: TenantKit, limited_hub: HubProcess
) -> None:
    flood_before = await refusal_count(limited_hub.base_url, "frame_flood")
    calm = await kit.connect()
    flooder = await kit.connect(await device_token(kit, "flooder"))
    sent: list[str] = []

    async def flood() -> None:
        # Far more than the burst, as fast as it goes, without reading anything.
        for n in range(10 * RATE_BURST + 2 * RATE_FLOOD):
            frame = punch_frame(f"e{n % 3 + 1}", ref=f"f{n}")
            try:
                await flooder.send(frame)
            except websockets.ConnectionClosed:
                return
            sent.append(frame["id"])

    async def calm_punches() -> list[dict[str, Any]]:
        # Fewer than its own burst: whatever the flood next door does, none is refused.
        return [await calm.punch(punch_frame("e1", ref=f"c{n}")) for n in range(RATE_BURST - 2)]

    _, calm_acks = await asyncio.gather(flood(), calm_punches())
    answers, close_code = await frames_until_closed(flooder)

    assert [ack["status"] for ack in calm_acks] == ["accepted"] * (RATE_BURST - 2)
    assert close_code == 4008
    errors = [f for f in answers if f["type"] == "error"]
    acked = {f["id"] for f in answers if f["type"] == "ack"}
    refused = {f["id"] for f in errors}
    assert {f["code"] for f in errors} == {"rate_limited"}
    assert len(refused) > RATE_FLOOD
    # Punches let through are committed, but their acks may lose the race with the close:
    # the client resends them after reconnecting and hears `duplicate`.
    assert not acked & refused and acked | refused <= set(sent)
    # Every refusal names the punch and its ref, so the client keeps it to resend.
    for error in errors:
        assert error["ref"] == f"f{sent.index(error['id'])}"
        assert error["id"] in error["message"]
    assert any("closed" in error["message"] for error in errors)
    # Nothing refused was stored; everything acked was.
    assert await kit.stored(*refused) == {}
    assert set(await kit.stored(*acked)) == acked
    assert set(await kit.stored(*(ack["id"] for ack in calm_acks))) == {
        ack["id"] for ack in calm_acks
    }
    assert await refusal_count(limited_hub.base_url, "frame_flood") == flood_before + 1
    # The calm client is still served.
    assert (await calm.punch(punch_frame("e2")))["status"] == "accepted"
    await calm.close()


async def test_a_client_over_its_rate_is_read_no_faster_than_the_rate(kit: TenantKit) -> None:
    flooder = await kit.connect(await device_token(kit, "runaway"))
    # All at once, more than it takes to be closed: they wait in the socket buffers.
    for n in range(RATE_BURST + 4 * RATE_FLOOD):
        await flooder.send({"type": "ping", "ref": f"p{n}"})
    frames, code = await frames_until_closed(flooder)
    assert code == 4008
    refusals = [n for n, frame in enumerate(frames) if frame.get("code") == "rate_limited"]
    assert len(refusals) == RATE_FLOOD + 1
    # After each refusal the hub reads nothing until the next frame would pass (1/rate s):
    # between the first and the last refusal, frames pass one at a time at the rate. Timed
    # by the hub's own clock (`server_time` of their pongs), not by when this client got
    # round to reading them. A hub that read on regardless would refuse every frame after the
    # burst within milliseconds, and none would pass in between.
    passed = [
        datetime.fromisoformat(frame["server_time"])
        for frame in frames[refusals[0] : refusals[-1]]
        if frame["type"] == "pong"
    ]
    # (A pause can end a hair before the token is whole, and that frame is refused again: so
    # not quite one pass per refusal.)
    assert len(passed) >= RATE_FLOOD // 2
    assert (passed[-1] - passed[0]).total_seconds() >= 0.75 * (len(passed) - 1) / RATE_PER_S


async def test_a_flooder_that_reconnects_carries_on_where_it_was_closed(kit: TenantKit) -> None:
    token = await device_token(kit, "reconnecting")
    flooder = await kit.connect(token)
    for n in range(RATE_BURST + 2 * RATE_FLOOD):
        await flooder.send({"type": "ping", "ref": f"p{n}"})
    _, code = await frames_until_closed(flooder)
    assert code == 4008
    # Straight back, with one frame fewer than a fresh connection's burst after hello. A
    # fresh bucket would pass them all; the recalled one has refilled only for the time the
    # reconnection took (under 0.9 s here), so one of them is refused, and with the earlier
    # refusals still in the flood window that closes the connection again.
    again = await kit.connect(token)
    frames = [punch_frame("e1", ref=f"again{n}") for n in range(RATE_BURST - 1)]
    for frame in frames:
        await again.send(frame)
    answers, code = await frames_until_closed(again)
    assert code == 4008
    sent = [f["id"] for f in frames]
    errors = [a for a in answers if a["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]
    refused_at = sent.index(errors[0]["id"])
    # The punches before the refused one were let through and committed (an ack may lose
    # the race with the close, as above); the refused one and those after it were not.
    acked = {a["id"] for a in answers if a["type"] == "ack"}
    assert acked <= set(sent[:refused_at])
    assert await stored_once_committed(kit, sent, refused_at) == set(sent[:refused_at])
    # Another terminal of the same tenant is not affected.
    other = await kit.connect(await device_token(kit, "neighbour"))
    assert (await other.punch(punch_frame("e2")))["status"] == "accepted"
    await other.close()


async def test_a_frame_over_the_rate_keeps_the_connection(kit: TenantKit) -> None:
    client = await kit.connect()
    # Fewer refusals than a flood even if none of them would have been refused.
    count = RATE_BURST + RATE_FLOOD // 2
    for n in range(count):
        await client.send({"type": "ping", "ref": f"p{n}"})
    answers = [await client.recv() for _ in range(count)]
    # hello took one token: the rest of the burst is answered, the others refused.
    assert [a["type"] for a in answers[: RATE_BURST - 1]] == ["pong"] * (RATE_BURST - 1)
    assert "rate_limited" in [a.get("code") for a in answers[RATE_BURST - 1 :]]
    assert all("id" not in a for a in answers)
    # Still open: a refusal is not a close.
    await client.send({"type": "ping", "ref": "again"})
    assert (await client.recv())["ref"] == "again"
    await client.close()


# -- connections per tenant ---------------------------------------------------------------------


async def hello(kit: TenantKit, token: str) -> tuple[Client, dict[str, Any]]:
    ws = await websockets.connect(kit.ws_url, subprotocols=[JSON])
    client = Client(ws, JSON)
    return client, await client.hello(token)


async def admitted_once_a_slot_is_free(kit: TenantKit, token: str) -> Client:
    """Hello until welcomed: a client's close reaches the hub's session a moment after it
    has been answered, so the slot comes back a moment later too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        client, answer = await hello(kit, token)
        if answer["type"] == "welcome":
            return client
        assert answer["code"] == "too_many_connections", answer
        await frames_until_closed(client)
        assert loop.time() < deadline, "the closed connection's slot never came back"
        await asyncio.sleep(0.05)


async def test_a_hello_over_the_tenant_cap_is_refused_1013_until_one_closes(
    kit: TenantKit, limited_hub: HubProcess
) -> None:
    before = await refusal_count(limited_hub.base_url, "tenant_connections")
    clients = [await kit.connect() for _ in range(TENANT_CAP)]

    over, answer = await hello(kit, kit.terminal_token)
    assert answer["type"] == "error" and answer["code"] == "too_many_connections"
    assert "try again later" in answer["message"]
    assert await frames_until_closed(over) == ([], 1013)
    assert await refusal_count(limited_hub.base_url, "tenant_connections") == before + 1

    # Another tenant on the same hub is not affected.
    async with provisioned_tenant(
        limited_hub.base_url, kit.dsn, TEST_SECRET, "other"
    ) as other_tenant:
        other = await other_tenant.connect()
        await other.close()

    # Closed by the hub (a bad refresh token): the slot is back before the close frame is sent.
    await clients[0].send({"type": "refresh", "token": "garbage"})
    assert (await frames_until_closed(clients[0]))[1] == 4001
    replacement = await kit.connect()

    # Closed by the client.
    await clients[1].close()
    clients[1] = await admitted_once_a_slot_is_free(kit, kit.terminal_token)

    over, answer = await hello(kit, kit.terminal_token)
    assert answer["code"] == "too_many_connections"
    for client in (replacement, *clients[1:]):
        await client.close()


async def test_a_refused_hello_does_not_take_a_slot(kit: TenantKit) -> None:
    for _ in range(TENANT_CAP + 2):
        bad, answer = await hello(kit, "garbage")
        assert answer["code"] == "bad_token"
        await frames_until_closed(bad)
    clients = [await kit.connect() for _ in range(TENANT_CAP)]
    for client in clients:
        await client.close()


# -- browser origins ----------------------------------------------------------------------------


async def test_a_handshake_from_another_origin_is_refused_403_before_any_frame(
    kit: TenantKit, limited_hub: HubProcess
) -> None:
    before = await refusal_count(limited_hub.base_url, "origin")
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(kit.ws_url, origin="https://evil.example")
    response = refused.value.response
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    error = json.loads(response.body)["error"]
    assert error["code"] == "origin_not_allowed"
    assert "https://evil.example" in error["message"]
    assert await refusal_count(limited_hub.base_url, "origin") == before + 1
    # A refusal is no error of the hub's.
    assert "without completing handshake" not in limited_hub.log_path.read_text()


@pytest.mark.parametrize(
    "origin",
    [DASHBOARD, "capacitor://localhost", "own host", None],
    ids=["listed", "listed-app", "own-host", "none"],
)
async def test_listed_own_host_and_absent_origins_are_accepted(
    kit: TenantKit, limited_hub: HubProcess, origin: str | None
) -> None:
    if origin == "own host":
        origin = limited_hub.base_url
    ws = await websockets.connect(
        kit.ws_url,
        origin=origin,
        subprotocols=[JSON],
    )
    client = Client(ws, JSON)
    assert (await client.hello(kit.terminal_token))["type"] == "welcome"
    assert (await client.punch(punch_frame("e1")))["status"] == "accepted"
    await client.close()


async def test_a_server_without_http_responses_for_websockets_refuses_by_closing() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    full = {"type": "websocket", "extensions": {"websocket.http.response": {}}}
    await refuse_handshake(full, send, 429, "rate_limited", "slow down", [(b"retry-after", b"7")])
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 429 and (b"retry-after", b"7") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {
        "error": {"code": "rate_limited", "message": "slow down"}
    }
    sent.clear()
    # Closing before accepting is the one refusal every ASGI server understands (as a 403).
    await refuse_handshake({"type": "websocket"}, send, 429, "rate_limited", "slow down")
    assert [m["type"] for m in sent] == ["websocket.close"]


# -- attempts per client address ----------------------------------------------------------------

CONNECT_BURST = 5
REST_BURST = 8


@pytest.fixture(scope="module")
def tight_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    # One attempt a minute after the burst: no test here runs long enough to see a refill matter.
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_CONNECT_RATE_PER_IP": "1",
        "ATTENDANCE_CONNECT_BURST_PER_IP": str(CONNECT_BURST),
        "ATTENDANCE_REST_RATE_PER_IP": "1",
        "ATTENDANCE_REST_BURST_PER_IP": str(REST_BURST),
    }
    with running_hub(tmp_path_factory.mktemp("tight-hub"), env) as process:
        yield process


async def test_handshakes_over_the_address_limit_get_429_with_the_error_body(
    tight_hub: HubProcess,
) -> None:
    accepted = 0
    with pytest.raises(InvalidStatus) as refused:
        for _ in range(3 * CONNECT_BURST):
            ws = await websockets.connect(tight_hub.ws_url)
            accepted += 1
            await ws.close()
    assert CONNECT_BURST <= accepted < 2 * CONNECT_BURST
    response = refused.value.response
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    error = json.loads(response.body)["error"]
    assert error["code"] == "rate_limited"
    assert "127.0.0.1" in error["message"]


async def test_requests_over_the_address_limit_get_429_with_the_error_body(
    tight_hub: HubProcess,
) -> None:
    statuses = []
    async with httpx.AsyncClient(base_url=tight_hub.base_url, timeout=10) as http:
        for _ in range(3 * REST_BURST):
            response = await http.get("/healthz")
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
    # The hub's readiness probe at start-up took one request from the same address.
    assert REST_BURST - 1 <= statuses.count(200) < 2 * REST_BURST
    assert statuses[-1] == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json() == {
        "error": {"code": "rate_limited", "message": response.json()["error"]["message"]}
    }
    assert "try again in" in response.json()["error"]["message"]
