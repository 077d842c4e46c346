"""Late arrivals and the `me` channel against a real hub: planned shifts put the late on the
floor without any punch and take them off again; an employee's phone hears its own punches
made elsewhere, its state, and notices meant for it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.conftest import TEST_SECRET
from tests.support import (
    MSGPACK,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)
from tests.test_presence_live import subscribe, watcher

pytestmark = pytest.mark.postgres


def iso(moment: datetime) -> str:
    return moment.isoformat()


def ms(moment: datetime) -> str:
    """A time as the hub writes it: UTC, milliseconds, Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def set_grace(tenant: TenantKit, minutes: int) -> None:
    response = await tenant.http.put(
        "/v1/sites/hq",
        json={"name": "HQ", "timezone": "UTC", "policy": {"grace_minutes": minutes}},
    )
    assert response.status_code == 200, response.text


async def plan(tenant: TenantKit, employee: str, *shifts: tuple[datetime, datetime]) -> None:
    body = [{"site": "hq", "start": iso(start), "end": iso(end)} for start, end in shifts]
    response = await tenant.http.put(f"/v1/schedules/{employee}", json=body)
    assert response.status_code == 200, response.text


async def phone(tenant: TenantKit, employee: str = "e1", subprotocol: str = "") -> Client:
    token = tenant.token("employee", f"phone-{employee}", employee=employee)
    if subprotocol:
        return await tenant.connect(token, subprotocol)
    return await tenant.connect(token)


async def frames(client: Client, count: int) -> list[dict[str, Any]]:
    return [await client.recv() for _ in range(count)]


async def nothing_more(client: Client) -> None:
    """Nothing is queued for the client ahead of the answer to a ping."""
    await client.send({"type": "ping", "ref": "quiet"})
    frame = await client.recv()
    assert (frame["type"], frame["ref"]) == ("pong", "quiet"), frame


# -- late -------------------------------------------------------------------------------------


async def test_a_late_employee_appears_without_any_punch_and_goes_when_the_shift_ends(
    tenant: TenantKit,
) -> None:
    await set_grace(tenant, 0)
    watching = await watcher(tenant)
    subscribed = await subscribe(watching, "presence:hq")
    assert (await watching.recv())["members"] == []
    start = datetime.now(UTC) + timedelta(seconds=2)
    end = start + timedelta(seconds=2)
    await plan(tenant, "e1", (start, end))
    late = await watching.recv()
    assert datetime.now(UTC) >= start
    assert late == {
        "type": "delta",
        "channel": "presence:hq",
        "version": subscribed["version"] + 1,
        "changes": [
            {
                "employee": "e1",
                "name": "Employee 1",
                "state": "out",
                "since": ms(start),
                "site": "hq",
                "late": True,
            }
        ],
    }
    # Subscribers and REST readers who come now get the same floor.
    snapshot = (await tenant.http.get("/v1/presence/hq")).json()
    assert snapshot["version"] == late["version"]
    assert snapshot["members"] == late["changes"]
    gone = await watching.recv()
    assert datetime.now(UTC) >= end
    assert gone["version"] == late["version"] + 1
    [change] = gone["changes"]
    assert (change["employee"], change["state"], "late" in change) == ("e1", "out", False)
    assert (await tenant.http.get("/v1/presence/hq")).json()["members"] == []
    await watching.close()


async def test_clocking_in_replaces_the_late_entry(tenant: TenantKit) -> None:
    now = datetime.now(UTC)
    # Started 10 minutes ago: late as soon as it is planned, with the default 5 minutes' grace.
    await plan(tenant, "e2", (now - timedelta(minutes=10), now + timedelta(hours=2)))
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    [member] = (await watching.recv())["members"]
    assert (member["employee"], member["state"], member["late"]) == ("e2", "out", True)
    door = await tenant.connect()
    arrived = punch_frame("e2")
    assert (await door.punch(arrived))["status"] == "accepted"
    [change] = (await watching.recv())["changes"]
    assert (change["employee"], change["state"], change["since"]) == (
        "e2",
        "in",
        ms(now_of(arrived)),
    )
    assert "late" not in change
    await door.close()
    await watching.close()


def now_of(frame: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(frame["at"])


async def test_the_site_grace_period_decides_who_is_late(tenant: TenantKit) -> None:
    await set_grace(tenant, 30)
    now = datetime.now(UTC)
    await plan(tenant, "e1", (now - timedelta(minutes=10), now + timedelta(hours=1)))
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    assert (await watching.recv())["members"] == []
    # Shorter grace: the ten minutes are over it, and the floor shows it at once.
    await set_grace(tenant, 5)
    [change] = (await watching.recv())["changes"]
    assert (change["employee"], change["late"]) == ("e1", True)
    await watching.close()


async def test_replanning_and_erasure_take_the_late_off_the_floor(tenant: TenantKit) -> None:
    now = datetime.now(UTC)
    shift = (now - timedelta(minutes=10), now + timedelta(hours=1))
    await plan(tenant, "e1", shift)
    await plan(tenant, "e2", shift)
    watching = await watcher(tenant)
    await subscribe(watching, "presence:hq")
    assert [m["employee"] for m in (await watching.recv())["members"]] == ["e1", "e2"]
    await plan(tenant, "e1")
    [change] = (await watching.recv())["changes"]
    assert (change["employee"], change["state"], "late" in change) == ("e1", "out", False)
    assert (await tenant.http.delete("/v1/employees/e2")).status_code == 200
    [change] = (await watching.recv())["changes"]
    assert (change["employee"], change["name"], "late" in change) == ("e2", "[erased]", False)
    assert (await tenant.http.get("/v1/presence/hq")).json()["members"] == []
    # Erasure drops the planned shifts with the rest of what is personal.
    conn = await asyncpg.connect(tenant.dsn)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM schedules WHERE tenant = $1 AND employee = 'e2'", tenant.slug
        )
    finally:
        await conn.close()
    assert count == 0
    await watching.close()


@pytest.fixture
def own_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET}
    with running_hub(tmp_path_factory.mktemp("late-hub"), env) as process:
        yield process


async def test_a_restarted_hub_still_knows_who_is_late_and_when_shifts_start(
    own_hub: HubProcess, database: str
) -> None:
    async with provisioned_tenant(own_hub.base_url, database, TEST_SECRET, "l") as kit:
        await set_grace(kit, 0)
        now = datetime.now(UTC)
        await plan(kit, "e1", (now - timedelta(minutes=30), now + timedelta(hours=1)))
        before = (await kit.http.get("/v1/presence/hq")).json()
        assert [(m["employee"], m["late"]) for m in before["members"]] == [("e1", True)]
        own_hub.stop()
        own_hub.start()
        after = (await kit.http.get("/v1/presence/hq")).json()
        assert after["members"] == before["members"]
        # A shift planned before the restart that starts after it still makes its employee late.
        start = datetime.now(UTC) + timedelta(seconds=2)
        await plan(kit, "e3", (start, start + timedelta(hours=1)))
        own_hub.stop()
        own_hub.start()
        watching = await watcher(kit)
        await subscribe(watching, "presence:hq")
        shown = {m["employee"] for m in (await watching.recv())["members"]}
        if shown == {"e1"}:
            [change] = (await watching.recv())["changes"]
            assert (change["employee"], change["late"]) == ("e3", True)
        else:
            # The restart took longer than the two seconds: e3 is in the snapshot already.
            assert shown == {"e1", "e3"}
        await watching.close()


# -- me ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ["", MSGPACK])
async def test_a_phone_hears_punches_made_for_its_owner_elsewhere(
    tenant: TenantKit, subprotocol: str
) -> None:
    mine = await phone(tenant, "e1", subprotocol)
    subscribed = await subscribe(mine, "me")
    assert (subscribed["channel"], subscribed["recovered"]) == ("me", False)
    snapshot = await mine.recv()
    assert snapshot == {
        "type": "snapshot",
        "channel": "me",
        "version": subscribed["version"],
        "members": [],
    }
    door = await tenant.connect()
    frame = punch_frame("e1")
    ack = await door.punch(frame)
    assert ack["status"] == "accepted"
    heard, state = await frames(mine, 2)
    assert heard == {
        "type": "ack",
        "id": frame["id"],
        "status": "accepted",
        "received_at": ack["received_at"],
        "channel": "me",
        "employee": "e1",
        "kind": "in",
        "at": ms(now_of(frame)),
        "site": "hq",
        "source": "terminal",
    }
    assert state["type"] == "delta" and state["version"] == subscribed["version"] + 1
    assert [(m["employee"], m["state"]) for m in state["changes"]] == [("e1", "in")]
    # Other employees' punches are not e1's business.
    assert (await door.punch(punch_frame("e2")))["status"] == "accepted"
    await nothing_more(mine)
    await door.close()
    await mine.close()


async def test_the_phone_that_punched_gets_one_ack_and_the_owners_other_phone_hears_of_it(
    tenant: TenantKit,
) -> None:
    first, second = await phone(tenant), await phone(tenant)
    for client in (first, second):
        await subscribe(client, "me")
        await client.recv()
    frame = punch_frame("e1", method="mobile")
    await first.send(frame)
    got = await frames(first, 2)
    acks = [f for f in got if f["type"] == "ack"]
    assert len(acks) == 1 and "channel" not in acks[0] and acks[0]["status"] == "accepted"
    assert [f["type"] for f in got if f["type"] != "ack"] == ["delta"]
    await nothing_more(first)
    heard, state = await frames(second, 2)
    assert (heard["type"], heard["channel"], heard["id"], heard["source"]) == (
        "ack",
        "me",
        frame["id"],
        "mobile",
    )
    assert state["type"] == "delta"
    # The same punch again changes nothing and tells nobody else.
    assert (await first.punch(frame))["status"] == "duplicate"
    await nothing_more(second)
    await first.close()
    await second.close()


async def test_a_correction_reaches_the_owners_phone(tenant: TenantKit) -> None:
    mine = await phone(tenant, "e2")
    await subscribe(mine, "me")
    await mine.recv()
    body = {**punch_frame("e2"), "reason": "forgot to badge"}
    del body["type"]
    assert (await tenant.http.post("/v1/punches", json=body)).status_code == 201
    heard, _ = await frames(mine, 2)
    assert (heard["type"], heard["id"], heard["source"]) == ("ack", body["id"], "manual")
    await mine.close()


async def test_notices_for_the_owner_late_schedule_and_odd_punches(tenant: TenantKit) -> None:
    await set_grace(tenant, 0)
    mine = await phone(tenant, "e3")
    subscribed = await subscribe(mine, "me")
    await mine.recv()
    start = datetime.now(UTC) + timedelta(seconds=1)
    await plan(tenant, "e3", (start, start + timedelta(hours=1)))
    # The plan changed, then the shift starts: a notice of each, and the phone's own state.
    got = await frames(mine, 3)
    notices = {f["kind"]: f for f in got if f["type"] == "notice"}
    assert notices["schedule"]["detail"] == {
        "shifts": 1,
        "next": {"site": "hq", "start": ms(start), "end": ms(start + timedelta(hours=1))},
    }
    assert notices["late"]["detail"]["start"] == ms(start)
    assert "have not clocked in" in notices["late"]["message"]
    assert {f["channel"] for f in got} == {"me"}
    [state] = [f for f in got if f["type"] == "delta"]
    assert state["version"] == subscribed["version"] + 1
    assert [(m["state"], m["late"]) for m in state["changes"]] == [("out", True)]
    # Two `in`s in a row: both stored, the second flagged, and the owner told.
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e3")))["status"] == "accepted"
    await frames(mine, 2)
    odd = punch_frame("e3")
    assert (await door.punch(odd))["status"] == "accepted"
    got = await frames(mine, 3)
    notice = next(f for f in got if f["type"] == "notice")
    assert (notice["kind"], notice["detail"]["id"], notice["detail"]["flag"]) == (
        "punch_flagged",
        odd["id"],
        "in_while_in",
    )
    await door.close()
    await mine.close()


async def test_an_offline_out_from_before_the_shift_makes_its_owner_late_and_tells_them(
    tenant: TenantKit,
) -> None:
    now = datetime.now(UTC)
    door = await tenant.connect()
    # Queued too: sent online an hour late it would be a clock_skew alert, which reaches
    # `me` whenever the checks process gets to it (here, or before the subscription).
    came = punch_frame("e2", at=iso(now - timedelta(minutes=60)), offline=True)
    assert (await door.punch(came))["status"] == "accepted"
    await plan(tenant, "e2", (now - timedelta(minutes=20), now + timedelta(hours=1)))
    mine = await phone(tenant, "e2")
    await subscribe(mine, "me")
    [member] = (await mine.recv())["members"]
    assert (member["state"], "late" in member) == ("in", False)
    # Queued on a terminal: e2 had left before the shift began.
    left = punch_frame("e2", kind="out", at=iso(now - timedelta(minutes=30)), offline=True)
    assert (await door.punch(left))["status"] == "accepted"
    got = await frames(mine, 3)
    assert [f["type"] for f in got if f["type"] != "notice"] == ["ack", "delta"]
    [notice] = [f for f in got if f["type"] == "notice"]
    assert (notice["kind"], notice["detail"]["site"]) == ("late", "hq")
    [state] = [f for f in got if f["type"] == "delta"]
    assert [(m["state"], m["late"]) for m in state["changes"]] == [("out", True)]
    await door.close()
    await mine.close()


async def test_me_recovers_missed_changes_and_unsubscribes(tenant: TenantKit) -> None:
    mine = await phone(tenant)
    subscribed = await subscribe(mine, "me")
    await mine.recv()
    await mine.close()
    door = await tenant.connect()
    for kind in ("in", "break_start"):
        assert (await door.punch(punch_frame("e1", kind=kind)))["status"] == "accepted"
    back = await phone(tenant)
    again = await subscribe(back, "me", since=subscribed["version"])
    assert (again["recovered"], again["version"]) == (True, subscribed["version"] + 2)
    replayed = await frames(back, 2)
    assert [f["changes"][0]["state"] for f in replayed] == ["in", "break"]
    await back.send({"type": "unsubscribe", "channel": "me", "ref": "u"})
    assert await back.recv() == {"type": "unsubscribed", "channel": "me", "ref": "u"}
    assert (await door.punch(punch_frame("e1", kind="break_end")))["status"] == "accepted"
    await nothing_more(back)
    await door.close()
    await back.close()


async def test_an_employee_token_hears_only_its_own_me(tenant: TenantKit) -> None:
    one, two = await phone(tenant, "e1"), await phone(tenant, "e2")
    for client in (one, two):
        await subscribe(client, "me")
        await client.recv()
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e2")))["status"] == "accepted"
    assert [f["type"] for f in await frames(two, 2)] == ["ack", "delta"]
    await nothing_more(one)
    await asyncio.gather(door.close(), one.close(), two.close())
