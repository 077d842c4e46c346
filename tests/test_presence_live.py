"""Live presence against a real hub: subscriptions, deltas after commit, recovery, the REST
snapshot, flags on odd punches, and the floor rebuilt from PostgreSQL after a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from hub.presence import Delta as StateDelta
from hub.presence import Member, replay
from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    MSGPACK,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)

pytestmark = pytest.mark.postgres


def at(minutes_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()


async def subscribe(client: Client, channel: str, since: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "subscribe", "channel": channel, "ref": "sub"}
    if since is not None:
        frame["since"] = since
    await client.send(frame)
    answer = await client.recv()
    assert answer["type"] == "subscribed", answer
    assert (answer["channel"], answer["ref"]) == (channel, "sub")
    return answer


async def watcher(tenant: TenantKit, subprotocol: str = JSON) -> Client:
    supervisor = tenant.token("supervisor", "lead", sites=["hq"])
    return await tenant.connect(supervisor, subprotocol)


def members(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["employee"], m["state"]) for f in frames for m in f.get("changes", [])]


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_a_supervisor_sees_each_committed_punch_as_the_next_version(
    tenant: TenantKit, subprotocol: str
) -> None:
    watching = await watcher(tenant, subprotocol)
    subscribed = await subscribe(watching, "presence:hq")
    assert subscribed["recovered"] is False
    snapshot = await watching.recv()
    assert (snapshot["type"], snapshot["channel"], snapshot["members"]) == (
        "snapshot",
        "presence:hq",
        [],
    )
    assert snapshot["version"] == subscribed["version"]
    door = await tenant.connect()
    deltas = []
    for kind, minutes in (("in", 30), ("break_start", 20), ("break_end", 10), ("out", 1)):
        ack = await door.punch(punch_frame("e1", kind=kind, at=at(minutes)))
        assert ack["status"] == "accepted"
        deltas.append(await watching.recv())
    assert [d["type"] for d in deltas] == ["delta"] * 4
    assert [d["version"] for d in deltas] == [snapshot["version"] + n for n in (1, 2, 3, 4)]
    assert members(deltas) == [("e1", "in"), ("e1", "break"), ("e1", "in"), ("e1", "out")]
    first = deltas[0]["changes"][0]
    assert (first["name"], first["site"]) == ("Employee 1", "hq")
    assert first["since"].endswith("Z") and "late" not in first
    await door.close()
    await watching.close()


async def test_rejected_and_duplicate_punches_change_nothing(tenant: TenantKit) -> None:
    watching = await watcher(tenant)
    version = (await subscribe(watching, "presence:hq"))["version"]
    await watching.recv()
    door = await tenant.connect()
    frame = punch_frame("e1", at=at(5))
    assert (await door.punch(frame))["status"] == "accepted"
    assert (await door.punch(frame))["status"] == "duplicate"
    unknown = await door.punch(punch_frame("nobody", at=at(4)))
    assert unknown["reason"] == "unknown_employee"
    assert (await door.punch(punch_frame("e2", at=at(3))))["status"] == "accepted"
    # Exactly two deltas: e1, then e2; nothing for the duplicate or the rejected punch.
    got = [await watching.recv(), await watching.recv()]
    assert [(d["version"], *members([d])) for d in got] == [
        (version + 1, ("e1", "in")),
        (version + 2, ("e2", "in")),
    ]
    await watching.send({"type": "ping", "ref": "end"})
    assert (await watching.recv())["type"] == "pong"
    await door.close()
    await watching.close()


async def test_an_older_punch_from_an_offline_queue_does_not_move_the_floor_and_is_flagged(
    tenant: TenantKit,
) -> None:
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e1", at=at(10))))["status"] == "accepted"
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    [member] = (await watching.recv())["members"]
    assert (member["employee"], member["state"]) == ("e1", "in")
    old = punch_frame("e1", kind="out", at=at(60), offline=True)
    assert (await door.punch(old))["status"] == "accepted"
    odd = punch_frame("e1", kind="in", at=at(5))
    assert (await door.punch(odd))["status"] == "accepted"
    # Only the second `in` moves anything (its since); the old `out` is history.
    delta = await watching.recv()
    assert members([delta]) == [("e1", "in")]
    response = await tenant.http.get("/v1/presence/hq")
    assert [(m["employee"], m["state"]) for m in response.json()["members"]] == [("e1", "in")]
    flags = await stored_flags(tenant)
    assert flags[old["id"]] == ["out_of_order"]
    assert flags[odd["id"]] == ["in_while_in"]
    await door.close()
    await watching.close()


async def stored_flags(tenant: TenantKit) -> dict[str, list[str]]:
    conn = await asyncpg.connect(tenant.dsn)
    try:
        for _ in range(50):
            rows = await conn.fetch(
                "SELECT id::text, flags FROM punches WHERE tenant = $1", tenant.slug
            )
            found = {r["id"]: list(r["flags"]) for r in rows}
            # Flags are written after the commit, off the ack path.
            if sum(map(len, found.values())) >= 2:
                return found
            await asyncio.sleep(0.1)
        return found
    finally:
        await conn.close()


async def test_a_missed_range_is_replayed_and_adds_up_to_the_snapshot(tenant: TenantKit) -> None:
    watching = await watcher(tenant)
    subscribed = await subscribe(watching, "presence:hq")
    first = await watching.recv()
    await watching.close()
    door = await tenant.connect()
    for employee, kind, minutes in (("e1", "in", 9), ("e2", "in", 8), ("e1", "break_start", 7)):
        ack = await door.punch(punch_frame(employee, kind=kind, at=at(minutes)))
        assert ack["status"] == "accepted"
    back = await watcher(tenant)
    again = await subscribe(back, "presence:hq", since=subscribed["version"])
    assert again["recovered"] is True
    assert again["version"] == subscribed["version"] + 3
    missed = [await back.recv() for _ in range(3)]
    assert [d["version"] for d in missed] == [subscribed["version"] + n for n in (1, 2, 3)]
    current = (await tenant.http.get("/v1/presence/hq")).json()
    assert current["version"] == again["version"]
    assert as_members(replay_frames(first["members"], missed)) == as_members(current["members"])
    # Caught up: the next punch is the next delta.
    assert (await door.punch(punch_frame("e3", at=at(1))))["status"] == "accepted"
    assert (await back.recv())["version"] == again["version"] + 1
    await door.close()
    await back.close()


def replay_frames(start: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> list[Member]:
    def member(m: dict[str, Any]) -> Member:
        since = datetime.fromisoformat(m["since"])
        return Member(m["employee"], m["name"], m["state"], since, m["site"], m.get("late", False))

    return list(
        replay(
            [member(m) for m in start],
            [
                StateDelta(d["channel"], d["version"], tuple(member(c) for c in d["changes"]))
                for d in deltas
            ],
        )
    )


def as_members(found: list[Any]) -> list[tuple[str, str]]:
    return [
        (m.employee, m.state) if isinstance(m, Member) else (m["employee"], m["state"])
        for m in found
    ]


@pytest.mark.parametrize("since", [0, 10**18])
async def test_a_version_the_hub_cannot_replay_gets_a_snapshot(
    tenant: TenantKit, since: int
) -> None:
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e2", at=at(3))))["status"] == "accepted"
    watching = await watcher(tenant)
    answer = await subscribe(watching, "presence:hq", since=since)
    assert answer["recovered"] is False
    snapshot = await watching.recv()
    assert snapshot["type"] == "snapshot" and snapshot["version"] == answer["version"]
    assert [(m["employee"], m["state"]) for m in snapshot["members"]] == [("e2", "in")]
    await door.close()
    await watching.close()


async def test_the_rest_snapshot_is_the_subscribers_snapshot(tenant: TenantKit) -> None:
    door = await tenant.connect()
    await door.punch(punch_frame("e1", at=at(3)))
    await door.punch(punch_frame("e3", kind="break_start", at=at(2)))
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    snapshot = await watching.recv()
    response = await tenant.http.get("/v1/presence/hq")
    assert response.status_code == 200
    assert response.json() == snapshot
    await door.close()
    await watching.close()


@pytest.mark.parametrize(
    ("role", "claims", "channel", "code"),
    [
        ("terminal", None, "presence:hq", None),
        ("supervisor", {"sites": ["hq"]}, "presence:hq", None),
        ("supervisor", {"sites": ["*"]}, "presence:hq", None),
        ("admin", {}, "presence:hq", None),
        ("supervisor", {"sites": ["plant"]}, "presence:hq", "forbidden"),
        ("employee", {"employee": "e1"}, "presence:hq", "forbidden"),
        ("terminal", None, "alerts:hq", "forbidden"),
        ("employee", {"employee": "e1"}, "alerts:hq", "forbidden"),
        ("admin", {}, "presence:nowhere", "unknown_channel"),
        ("admin", {}, "weather:hq", "unknown_channel"),
        ("admin", {}, "presence:", "unknown_channel"),
        ("supervisor", {"sites": ["hq"]}, "me", "forbidden"),
        ("admin", {}, "me", "forbidden"),
        ("employee", {"employee": "e1"}, "me", None),
    ],
)
async def test_who_may_subscribe_to_what(
    tenant: TenantKit, role: str, claims: dict[str, Any] | None, channel: str, code: str | None
) -> None:
    token = tenant.terminal_token if claims is None else tenant.token(role, f"x-{role}", **claims)
    client = await tenant.connect(token)
    await client.send({"type": "subscribe", "channel": channel, "ref": "s"})
    answer = await client.recv()
    if code is None:
        assert (answer["type"], answer["channel"]) == ("subscribed", channel)
        assert (await client.recv())["type"] == "snapshot"
    else:
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", code, "s"), answer
    await client.close()


async def test_unsubscribing_stops_the_deltas(tenant: TenantKit) -> None:
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    await watching.recv()
    await watching.send({"type": "unsubscribe", "channel": "presence:hq", "ref": "u"})
    assert await watching.recv() == {
        "type": "unsubscribed",
        "channel": "presence:hq",
        "ref": "u",
    }
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e1", at=at(1))))["status"] == "accepted"
    await watching.send({"type": "ping", "ref": "after"})
    assert (await watching.recv())["type"] == "pong"
    await door.close()
    await watching.close()


async def test_a_correction_moves_the_floor_too(tenant: TenantKit) -> None:
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    await watching.recv()
    body = {
        **punch_frame("e2", at=at(15)),
        "reason": "badge reader was down",
    }
    del body["type"]
    response = await tenant.http.post("/v1/punches", json=body)
    assert response.status_code == 201, response.text
    assert members([await watching.recv()]) == [("e2", "in")]
    await watching.close()


async def test_a_rename_and_an_erasure_reach_the_floor(tenant: TenantKit) -> None:
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e1", at=at(5))))["status"] == "accepted"
    await door.close()
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    await watching.recv()
    response = await tenant.http.put(
        "/v1/employees/e1", json={"name": "Ann Lee", "site": "hq", "badge": "b1"}
    )
    assert response.status_code == 200, response.text
    renamed = (await watching.recv())["changes"][0]
    assert (renamed["name"], renamed["state"]) == ("Ann Lee", "in")
    assert (await tenant.http.delete("/v1/employees/e1")).status_code == 200
    erased = (await watching.recv())["changes"][0]
    assert (erased["employee"], erased["name"], erased["state"]) == ("e1", "[erased]", "out")
    snapshot = (await tenant.http.get("/v1/presence/hq")).json()
    assert snapshot["members"] == []
    assert "Ann" not in str(snapshot)
    await watching.close()


@pytest.fixture
def own_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET}
    with running_hub(tmp_path_factory.mktemp("presence-hub"), env) as process:
        yield process


async def test_a_restarted_hub_shows_the_same_floor(own_hub: HubProcess, database: str) -> None:
    async with provisioned_tenant(own_hub.base_url, database, TEST_SECRET, "p") as kit:
        door = await kit.connect()
        for employee, kind, minutes in (
            ("e1", "in", 50),
            ("e2", "in", 40),
            ("e2", "break_start", 30),
            ("e3", "in", 20),
            ("e3", "out", 10),
        ):
            await door.punch(punch_frame(employee, kind=kind, at=at(minutes)))
        await door.close()
        before = (await kit.http.get("/v1/presence/hq")).json()
        assert [(m["employee"], m["state"]) for m in before["members"]] == [
            ("e1", "in"),
            ("e2", "break"),
        ]
        own_hub.stop()
        own_hub.start()
        after = (await kit.http.get("/v1/presence/hq")).json()
        assert after["members"] == before["members"]
        # A new run's versions start above the old run's.
        assert after["version"] > before["version"]


# -- terminals:<site> -------------------------------------------------------------------------


async def test_the_terminals_board_shows_doors_going_online_and_offline(tenant: TenantKit) -> None:
    watching = await watcher(tenant)
    subscribed = await subscribe(watching, "terminals:hq")
    [door] = (await watching.recv())["members"]
    assert (door["device"], door["name"], door["online"]) == ("door", "Door", False)
    client = await tenant.connect()
    online = (await watching.recv())["changes"][0]
    assert (online["device"], online["online"]) == ("door", True)
    # A second socket of the same device changes nothing; closing the last one does.
    second = await tenant.connect()
    await second.close()
    await client.close()
    offline = await watching.recv()
    assert offline["version"] == subscribed["version"] + 2
    assert (offline["changes"][0]["device"], offline["changes"][0]["online"]) == ("door", False)
    assert offline["changes"][0]["since"] >= online["since"]
    # A new device appears offline; a revoked one leaves with a last offline change.
    response = await tenant.http.put("/v1/devices/gate", json={"site": "hq", "name": "Gate"})
    assert response.status_code == 201
    gate = (await watching.recv())["changes"][0]
    assert (gate["device"], gate["name"], gate["online"]) == ("gate", "Gate", False)
    assert (await tenant.http.delete("/v1/devices/gate")).status_code == 200
    assert (await watching.recv())["changes"][0]["device"] == "gate"
    await watching.send({"type": "subscribe", "channel": "terminals:hq", "ref": "again"})
    await watching.recv()
    assert [m["device"] for m in (await watching.recv())["members"]] == ["door"]
    await watching.close()


async def test_a_terminal_may_not_watch_the_terminals_board(tenant: TenantKit) -> None:
    client = await tenant.connect()
    await client.send({"type": "subscribe", "channel": "terminals:hq", "ref": "t"})
    assert (await client.recv())["code"] == "forbidden"
    await client.close()


@pytest.fixture
def quick_heartbeats(
    database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_HEARTBEAT_S": "1",
    }
    with running_hub(tmp_path_factory.mktemp("heartbeat-hub"), env) as process:
        yield process


async def test_a_terminal_that_stops_answering_heartbeats_goes_offline(
    quick_heartbeats: HubProcess, database: str
) -> None:
    async with provisioned_tenant(quick_heartbeats.base_url, database, TEST_SECRET, "h") as kit:
        watching = await watcher(kit)
        await subscribe(watching, "terminals:hq")
        await watching.recv()
        # A terminal that connects and then hangs: its socket stays open, it answers nothing.
        reader, writer = await asyncio.open_connection("127.0.0.1", quick_heartbeats.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        hello = json.dumps({"type": "hello", "token": kit.terminal_token}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(hello))
        writer.write(bytes([0x81, 0x80 | 126]) + len(hello).to_bytes(2, "big") + mask + masked)
        online = (await watching.recv())["changes"][0]
        assert (online["device"], online["online"]) == ("door", True)
        # The hub pings every second and gives up after another second without a pong.
        offline = (await watching.recv(timeout=15))["changes"][0]
        assert (offline["device"], offline["online"]) == ("door", False)
        writer.close()
        await watching.close()
