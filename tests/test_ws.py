"""The WebSocket contract against a real hub process and real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import websockets

from tests.support import MSGPACK, TenantKit, punch_frame

pytestmark = pytest.mark.postgres


async def test_hello_then_punch_is_acked_after_it_is_stored(tenant: TenantKit) -> None:
    client = await tenant.connect()
    frame = punch_frame(
        "e1", method="badge", seq=7, geo={"lat": 1.5, "lon": 2.5, "accuracy_m": 9}, ref="r1"
    )
    ack = await client.punch(frame)
    assert ack == {
        "type": "ack",
        "id": frame["id"],
        "status": "accepted",
        "received_at": ack["received_at"],
        "ref": "r1",
    }
    row = (await tenant.stored(frame["id"]))[frame["id"]]
    assert (row["employee"], row["kind"], row["site"], row["device"]) == ("e1", "in", "hq", "door")
    assert (row["method"], row["seq"], row["lat"], row["lon"], row["accuracy_m"]) == (
        "badge",
        7,
        1.5,
        2.5,
        9.0,
    )
    assert row["source"] == "terminal" and row["offline"] is False
    await client.close()


async def test_permessage_deflate_offered_by_the_client_is_declined(tenant: TenantKit) -> None:
    # Browsers and the `websockets` client offer it; a zlib context per socket is not worth
    # it for small frames (docs/operations.md, memory per connection).
    async with websockets.connect(
        tenant.ws_url, subprotocols=["attendance.v1.json"], compression="deflate"
    ) as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send(json.dumps({"type": "hello", "token": tenant.terminal_token}))
        assert json.loads(await ws.recv())["type"] == "welcome"


async def test_welcome_carries_identity(tenant: TenantKit) -> None:
    client = await tenant.connect()
    await client.send({"type": "ping", "t": 42, "ref": "p"})
    pong = await client.recv()
    assert pong["type"] == "pong" and pong["t"] == 42 and pong["ref"] == "p"
    assert pong["server_time"].endswith("Z") and len(pong["server_time"]) == 24
    await client.close()
    ws = await websockets.connect(tenant.ws_url)
    await ws.send(json.dumps({"type": "hello", "token": tenant.terminal_token, "ref": "h"}))
    welcome = json.loads(await ws.recv())
    assert welcome["role"] == "terminal" and welcome["tenant"] == tenant.slug
    assert welcome["sub"] == "door" and welcome["ref"] == "h" and welcome["heartbeat_s"] > 0
    assert ws.subprotocol is None  # JSON is the default when none is offered
    await ws.close()


async def test_badge_resolves_the_employee(tenant: TenantKit) -> None:
    client = await tenant.connect()
    frame = punch_frame(badge="b2", kind="break_start")
    assert (await client.punch(frame))["status"] == "accepted"
    assert (await tenant.stored(frame["id"]))[frame["id"]]["employee"] == "e2"
    await client.close()


async def test_resend_is_duplicate_and_changed_resend_is_id_conflict(tenant: TenantKit) -> None:
    client = await tenant.connect()
    frame = punch_frame("e1")
    assert (await client.punch(frame))["status"] == "accepted"
    assert (await client.punch(frame))["status"] == "duplicate"
    for change in (
        {"kind": "out"},
        {"employee": "e2"},
        {"at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat()},
    ):
        ack = await client.punch({**frame, **change})
        assert (ack["status"], ack["reason"]) == ("rejected", "id_conflict")
    row = (await tenant.stored(frame["id"]))[frame["id"]]
    assert (row["employee"], row["kind"]) == ("e1", "in")
    await client.close()


async def test_same_punch_from_many_sockets_at_once_is_stored_once(tenant: TenantKit) -> None:
    clients = [await tenant.connect() for _ in range(8)]
    frame = punch_frame("e3")
    acks = await asyncio.gather(*(c.punch(frame) for c in clients))
    statuses = sorted(a["status"] for a in acks)
    assert statuses == ["accepted"] + ["duplicate"] * 7
    assert await tenant.count_punches() == 1
    for c in clients:
        await c.close()


async def test_rejections_carry_reasons(tenant: TenantKit) -> None:
    client = await tenant.connect()
    unknown = punch_frame("nobody")
    ack = await client.punch(unknown)
    assert (ack["status"], ack["reason"]) == ("rejected", "unknown_employee")
    unknown_badge = punch_frame(badge="no-such-badge")
    assert (await client.punch(unknown_badge))["reason"] == "unknown_employee"
    future = punch_frame("e1", at=(datetime.now(UTC) + timedelta(minutes=6)).isoformat())
    ack = await client.punch(future)
    assert (ack["status"], ack["reason"]) == ("rejected", "invalid_time")
    near_future = punch_frame("e1", at=(datetime.now(UTC) + timedelta(minutes=4)).isoformat())
    assert (await client.punch(near_future))["status"] == "accepted"
    stored = await tenant.stored(
        unknown["id"], unknown_badge["id"], future["id"], near_future["id"]
    )
    assert list(stored) == [near_future["id"]]
    await client.close()


async def test_employee_token_punches_only_for_itself(tenant: TenantKit) -> None:
    phone = await tenant.connect(tenant.token("employee", "e1", employee="e1"))
    mine = punch_frame("e1", method="mobile")
    assert (await phone.punch(mine))["status"] == "accepted"
    assert (await tenant.stored(mine["id"]))[mine["id"]]["source"] == "mobile"
    for other in (punch_frame("e2"), punch_frame(badge="b2")):
        ack = await phone.punch(other)
        assert (ack["status"], ack["reason"]) == ("rejected", "forbidden")
    assert (await phone.punch(punch_frame(badge="b1")))["status"] == "accepted"
    await phone.close()


async def test_supervisor_may_not_punch_over_the_socket(tenant: TenantKit) -> None:
    client = await tenant.connect(tenant.token("supervisor", "boss", sites=["hq"]))
    ack = await client.punch(punch_frame("e1"))
    assert (ack["status"], ack["reason"]) == ("rejected", "forbidden")
    await client.close()


async def test_tenants_do_not_see_each_other(tenant: TenantKit, hub_process, database) -> None:
    from tests.conftest import TEST_SECRET

    other = TenantKit(hub_process.base_url, database, TEST_SECRET, f"o-{uuid.uuid4().hex[:8]}")
    await other.create()
    # The other tenant has no employee e1: a punch for it must not resolve to ours.
    client = await other.connect(other.token("terminal", "door", site="hq"))
    ack = await client.punch(punch_frame("e1"))
    assert ack["reason"] == "unknown_employee"
    await client.close()
    await other.close()


async def test_msgpack_subprotocol(tenant: TenantKit) -> None:
    client = await tenant.connect(subprotocol=MSGPACK)
    assert client.ws.subprotocol == MSGPACK
    frame = punch_frame("e2", ref="m")
    ack = await client.punch(frame)
    assert (ack["status"], ack["ref"]) == ("accepted", "m")
    await client.ws.send('{"type": "ping"}')  # text on the binary protocol
    assert (await client.recv())["code"] == "bad_frame"
    await client.close()


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[1, 2]",
        '{"type": "teleport"}',
        '{"no_type": 1}',
        '{"type": "punch", "ref": "x"}',
        '{"type": "punch", "id": "nope", "employee": "e1", "kind": "in", '
        '"at": "2026-01-01T00:00:00Z"}',
        '{"type": "punch", "id": "6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70", "employee": "e1", '
        '"kind": "in", "at": "2026-01-01T00:00:00"}',
        '{"type": "punch", "id": "6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70", "employee": "e1", '
        '"badge": "b1", "kind": "in", "at": "2026-01-01T00:00:00Z"}',
        '{"type": "punch", "id": "6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70", "employee": 5, '
        '"kind": "sideways", "at": "2026-01-01T00:00:00Z"}',
    ],
)
async def test_bad_frames_get_bad_frame_and_the_socket_stays_up(
    tenant: TenantKit, payload: str
) -> None:
    client = await tenant.connect()
    await client.ws.send(payload)
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "bad_frame" and error["message"]
    if '"ref": "x"' in payload:
        assert error["ref"] == "x"
    assert (await client.punch(punch_frame("e1")))["status"] == "accepted"
    await client.close()


async def test_a_flood_of_bad_frames_closes_4008(tenant: TenantKit) -> None:
    client = await tenant.connect()
    for _ in range(30):
        await client.ws.send("garbage")
    codes = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            codes.append((await client.recv())["code"])
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
    assert codes[-1] == "rate_limited" and set(codes[:-1]) == {"bad_frame"}


async def test_oversized_frame_closes_1009(tenant: TenantKit) -> None:
    client = await tenant.connect()
    await client.ws.send('{"type": "ping", "pad": "' + "x" * (65 * 1024) + '"}')
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.parametrize("token", ["garbage", ""])
async def test_bad_token_closes_4001(tenant: TenantKit, token: str) -> None:
    ws = await websockets.connect(tenant.ws_url)
    await ws.send(json.dumps({"type": "hello", "token": token}))
    error = json.loads(await ws.recv())
    assert error["type"] == "error" and error["code"] == "bad_token"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_expired_token_closes_4001(tenant: TenantKit) -> None:
    expired = tenant.issuer.issue(
        tenant=tenant.slug, role="terminal", sub="door", site="hq", ttl_s=-5
    )[0]
    ws = await websockets.connect(tenant.ws_url)
    await ws.send(json.dumps({"type": "hello", "token": expired}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_first_frame_must_be_hello(tenant: TenantKit) -> None:
    ws = await websockets.connect(tenant.ws_url)
    await ws.send('{"type": "ping"}')
    assert json.loads(await ws.recv())["code"] == "hello_required"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002


async def test_unknown_subprotocol_only_is_refused(tenant: TenantKit) -> None:
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(tenant.ws_url, subprotocols=["chat.v9"])  # type: ignore[list-item]


async def test_an_idle_socket_is_closed_when_its_token_expires(tenant: TenantKit) -> None:
    short = tenant.issuer.issue(
        tenant=tenant.slug, role="terminal", sub="door", site="hq", ttl_s=2
    )[0]
    client = await tenant.connect(short)
    error = await client.recv(timeout=10)
    assert error["code"] == "token_expired"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_refresh_keeps_the_socket_open_past_the_first_expiry(tenant: TenantKit) -> None:
    short = tenant.issuer.issue(
        tenant=tenant.slug, role="terminal", sub="door", site="hq", ttl_s=2
    )[0]
    client = await tenant.connect(short)
    await client.send({"type": "refresh", "token": tenant.terminal_token, "ref": "r"})
    refreshed = await client.recv()
    assert refreshed["type"] == "refreshed" and refreshed["ref"] == "r"
    assert refreshed["expires_at"] > datetime.now(UTC).isoformat()
    await asyncio.sleep(3)  # past the first token's expiry: the point of the test, not a wait
    assert (await client.punch(punch_frame("e1")))["status"] == "accepted"
    await client.close()


async def test_duplicate_ack_reports_when_the_punch_was_first_received(tenant: TenantKit) -> None:
    client = await tenant.connect()
    frame = punch_frame("e1")
    first = await client.punch(frame)
    again = await client.punch(frame)
    assert again["status"] == "duplicate" and again["received_at"] == first["received_at"]
    await client.close()
