"""Alerts on a real hub: punches that the fraud checks find suspicious raise alerts that are
stored once, listed by `GET /v1/alerts`, and pushed on `alerts:<site>` and the employee's
`me`, as versions a reconnecting supervisor can recover."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.conftest import TEST_SECRET
from tests.support import (
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)
from tests.test_presence_live import subscribe, watcher

pytestmark = pytest.mark.postgres


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


async def next_alert(client: Client, timeout: float = 10) -> dict[str, Any]:
    """The next `alert` frame (acks and other frames on the way are passed over)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        frame = await client.recv(timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
        if frame["type"] == "alert":
            return frame


async def test_a_buddy_punch_is_stored_listed_and_pushed(tenant: TenantKit) -> None:
    lead = await watcher(tenant)
    subscribed = await subscribe(lead, "alerts:hq")
    snapshot = await lead.recv()
    assert (snapshot["type"], snapshot["members"]) == ("snapshot", [])
    phone = await tenant.connect(tenant.token("employee", "phone-e2", employee="e2"))
    await subscribe(phone, "me")
    await phone.recv()
    door = await tenant.connect()
    # e2 badged half a second after e1 on the same reader.
    first = punch_frame("e1", at=ago(10.5))
    second = punch_frame("e2", at=ago(10.0))
    assert (await door.punch(first))["status"] == "accepted"
    assert (await door.punch(second))["status"] == "accepted"
    alert = await next_alert(lead)
    assert alert == {
        "type": "alert",
        "channel": "alerts:hq",
        "version": subscribed["version"] + 1,
        "id": alert["id"],
        "kind": "buddy_punch",
        "severity": "warning",
        "employee": "e2",
        "site": "hq",
        "at": alert["at"],
        "message": alert["message"],
        "detail": {
            "reason": "one_device",
            "gap_s": 0.5,
            "punch": second["id"],
            "kind": "in",
            "device": "door",
        },
        "raised_at": alert["raised_at"],
    }
    # The employee's phone hears it too.
    mine = await next_alert(phone)
    assert (mine["channel"], mine["id"], mine.get("version")) == ("me", alert["id"], None)
    # Either punch of the pair resent: the same pair, nothing new (not even on the other).
    assert (await door.punch(first))["status"] == "duplicate"
    assert (await door.punch(second))["status"] == "duplicate"
    with pytest.raises(TimeoutError):
        await next_alert(lead, timeout=1.5)
    # Listed, newest first, for the roles that may see it.
    listed = (await tenant.http.get("/v1/alerts", params={"site": "hq"})).json()["alerts"]
    assert listed[0]["id"] == alert["id"]
    assert {k: v for k, v in listed[0].items()} == {
        k: v for k, v in alert.items() if k not in ("type", "channel", "version")
    }
    own = tenant.token("employee", "phone-e1", employee="e1")
    response = await tenant.http.get("/v1/alerts", headers={"authorization": f"Bearer {own}"})
    assert response.status_code == 200 and response.json()["alerts"] == []
    elsewhere = tenant.token("supervisor", "lead", sites=["plant"])
    response = await tenant.http.get(
        "/v1/alerts", params={"site": "hq"}, headers={"authorization": f"Bearer {elsewhere}"}
    )
    assert response.status_code == 403
    # A supervisor who missed it recovers it by version.
    await lead.close()
    again = await watcher(tenant)
    recovered = await subscribe(again, "alerts:hq", since=subscribed["version"])
    assert (recovered["recovered"], recovered["version"]) == (True, alert["version"])
    assert (await again.recv())["id"] == alert["id"]
    # A fresh subscriber sees it in the snapshot.
    fresh = await watcher(tenant)
    await subscribe(fresh, "alerts:hq")
    assert [m["id"] for m in (await fresh.recv())["members"]] == [alert["id"]]
    for client in (again, fresh, phone, door):
        await client.close()


async def test_a_resent_punch_raises_nothing_twice_and_its_clock_offset_is_kept(
    tenant: TenantKit,
) -> None:
    lead = await watcher(tenant)
    await subscribe(lead, "alerts:hq")
    await lead.recv()
    door = await tenant.connect()
    # The terminal's clock is half an hour slow.
    skewed = punch_frame("e3", at=ago(1800))
    assert (await door.punch(skewed))["status"] == "accepted"
    alert = await next_alert(lead)
    assert (alert["kind"], alert["employee"]) == ("clock_skew", "e3")
    assert 1790 < alert["detail"]["offset_s"] < 1830
    assert (await door.punch(skewed))["status"] == "duplicate"
    with pytest.raises(TimeoutError):
        await next_alert(lead, timeout=1.5)
    listed = (await tenant.http.get("/v1/alerts")).json()["alerts"]
    assert [a["kind"] for a in listed] == ["clock_skew"]
    conn = await asyncpg.connect(tenant.dsn)
    try:
        offset = await conn.fetchval(
            "SELECT clock_offset_ms FROM punches WHERE tenant = $1 AND id = $2::uuid",
            tenant.slug,
            skewed["id"],
        )
    finally:
        await conn.close()
    assert 1_790_000 < offset < 1_830_000
    # Queued offline: the offset is not the clock's, and nothing is raised.
    queued = punch_frame("e3", kind="out", at=ago(900), offline=True)
    assert (await door.punch(queued))["status"] == "accepted"
    with pytest.raises(TimeoutError):
        await next_alert(lead, timeout=1.5)
    await door.close()
    await lead.close()


async def test_geofence_flags_a_phone_punch_from_outside_the_site(tenant: TenantKit) -> None:
    site = {"name": "HQ", "timezone": "UTC", "lat": 52.52, "lon": 13.405, "radius_m": 150}
    assert (await tenant.http.put("/v1/sites/hq", json=site)).status_code == 200
    lead = await watcher(tenant)
    await subscribe(lead, "alerts:hq")
    await lead.recv()
    phone = await tenant.connect(tenant.token("employee", "phone-e1", employee="e1"))
    at_home = punch_frame("e1", geo={"lat": 52.60, "lon": 13.405, "accuracy_m": 15})
    assert (await phone.punch(at_home))["status"] == "accepted"
    alert = await next_alert(lead)
    assert (alert["kind"], alert["detail"]["reason"]) == ("geofence", "outside")
    assert 8_000 < alert["detail"]["distance_m"] < 9_500
    await phone.close()
    await lead.close()


@pytest.mark.parametrize(
    ("params", "status"),
    [({"since": "yesterday"}, 400), ({"limit": "0"}, 400), ({"site": "no such!"}, 400)],
)
async def test_bad_alert_queries_are_refused(
    tenant: TenantKit, params: dict[str, str], status: int
) -> None:
    response = await tenant.http.get("/v1/alerts", params=params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == "invalid"


async def test_an_enforced_geofence_refuses_a_phone_punch_from_outside(tenant: TenantKit) -> None:
    site = {
        "name": "HQ",
        "timezone": "UTC",
        "lat": 52.52,
        "lon": 13.405,
        "radius_m": 150,
        "policy": {"geofence": "enforce"},
    }
    assert (await tenant.http.put("/v1/sites/hq", json=site)).status_code == 200
    phone = await tenant.connect(tenant.token("employee", "phone-e1", employee="e1"))
    at_home = punch_frame("e1", geo={"lat": 52.60, "lon": 13.405, "accuracy_m": 15})
    ack = await phone.punch(at_home)
    assert (ack["status"], ack["reason"]) == ("rejected", "geofence")
    vague = punch_frame("e1", geo={"lat": 52.52, "lon": 13.405, "accuracy_m": 2000})
    ack = await phone.punch(vague)
    assert (ack["status"], ack["reason"]) == ("rejected", "geofence")
    # A phone that gives no position cannot show it is inside.
    nowhere = punch_frame("e1")
    ack = await phone.punch(nowhere)
    assert (ack["status"], ack["reason"]) == ("rejected", "geofence")
    at_work = punch_frame("e1", geo={"lat": 52.5205, "lon": 13.4052, "accuracy_m": 15})
    assert (await phone.punch(at_work))["status"] == "accepted"
    assert set(await tenant.stored(at_home["id"], vague["id"], at_work["id"])) == {at_work["id"]}
    # A terminal's punch has no position: the fence does not apply.
    door = await tenant.connect()
    assert (await door.punch(punch_frame("e2")))["status"] == "accepted"
    # Neither does a supervisor's correction, which may place a punch anywhere.
    correction = {
        "id": str(uuid.uuid4()),
        "employee": "e1",
        "kind": "out",
        "at": ago(5),
        "reason": "left from the car park",
        "geo": {"lat": 52.60, "lon": 13.405, "accuracy_m": 15},
    }
    response = await tenant.http.post("/v1/punches", json=correction)
    assert response.status_code == 201, response.text
    await phone.close()
    await door.close()


def afternoon_zone() -> str:
    """A fixed-offset zone where the local time now is between 13:00 and 14:00."""
    offset = (13 - datetime.now(UTC).hour + 12) % 24 - 12
    # The Etc zones count the other way: Etc/GMT-3 is three hours ahead of UTC.
    return "Etc/GMT" + (f"{-offset:+d}" if offset else "")


@pytest.fixture
def scanning_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """A hub of its own whose overtime scan runs every second."""
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_SCAN_INTERVAL_S": "1",
    }
    with running_hub(tmp_path_factory.mktemp("scanning-hub"), env) as process:
        yield process


async def test_the_scan_raises_overtime_a_missed_meal_break_and_lateness_once(
    scanning_hub: HubProcess, database: str
) -> None:
    async with provisioned_tenant(scanning_hub.base_url, database, TEST_SECRET, "ot") as kit:
        # A site where it is early afternoon now, so that the shift is all on today.
        site = {"name": "HQ", "timezone": afternoon_zone(), "policy": {"overtime": "california"}}
        assert (await kit.http.put("/v1/sites/hq", json=site)).status_code == 200
        lead = await watcher(kit)
        await subscribe(lead, "alerts:hq")
        await lead.recv()
        door = await kit.connect()
        # Clocked in eight and a half hours ago (queued offline), no break since.
        early = punch_frame("e1", at=ago(8.5 * 3600), offline=True)
        assert (await door.punch(early))["status"] == "accepted"
        raised = [await next_alert(lead, timeout=5), await next_alert(lead, timeout=5)]
        assert sorted((a["kind"], a["employee"]) for a in raised) == [
            ("meal_break", "e1"),
            ("overtime", "e1"),
        ]
        overtime = next(a for a in raised if a["kind"] == "overtime")
        assert 25 <= overtime["detail"]["overtime_minutes"] <= 35
        # Scanned again every second: nothing new.
        with pytest.raises(TimeoutError):
            await next_alert(lead, timeout=2.5)
        listed = (await kit.http.get("/v1/alerts")).json()["alerts"]
        assert sorted(a["kind"] for a in listed) == ["meal_break", "overtime"]
        # e2's shift began ten minutes ago, five minutes of grace are over, and no punch.
        start = datetime.now(UTC) - timedelta(minutes=10)
        shift = [{"site": "hq", "start": start.isoformat(), "end": ago(-8 * 3600)}]
        assert (await kit.http.put("/v1/schedules/e2", json=shift)).status_code == 200
        late = await next_alert(lead, timeout=5)
        assert (late["kind"], late["employee"], late["severity"]) == ("late", "e2", "info")
        assert datetime.fromisoformat(late["at"]) == start.replace(
            microsecond=start.microsecond // 1000 * 1000
        )
        with pytest.raises(TimeoutError):
            await next_alert(lead, timeout=2.5)
        await door.close()
        await lead.close()


async def test_the_scan_announces_before_it_stores_and_a_failed_announcement_is_retried(
    database: str, bare_tenant: str, owner: asyncpg.Connection
) -> None:
    from hub import store
    from workers.scan import OvertimeScan

    await owner.execute(
        'UPDATE sites SET timezone = $2, policy = \'{"overtime": "california"}\' '
        "WHERE tenant = $1 AND id = 'hq'",
        bare_tenant,
        afternoon_zone(),
    )
    await owner.execute(
        """INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, source)
           VALUES ($1, $2, 'e1', 'in', now() - interval '8 hours 30 minutes', now(), 'hq',
                   'terminal')""",
        bare_tenant,
        uuid.uuid4(),
    )
    pool = await store.create_system_pool(database)
    try:
        scan = OvertimeScan(pool)

        async def fail(alerts: list[Any]) -> None:
            raise ConnectionError("Redis went away")

        with pytest.raises(ConnectionError):
            await scan.scan(fail)
        stored = "SELECT kind FROM alerts WHERE tenant = $1 ORDER BY kind"
        assert await owner.fetch(stored, bare_tenant) == []
        heard: list[Any] = []

        async def hear(alerts: list[Any]) -> None:
            heard.extend(alerts)

        await scan.scan(hear)
        mine = sorted(a.kind for a in heard if a.tenant == bare_tenant)
        assert mine == ["meal_break", "overtime"]
        assert [r["kind"] for r in await owner.fetch(stored, bare_tenant)] == mine
        heard.clear()
        await scan.scan(hear)
        assert [a for a in heard if a.tenant == bare_tenant] == []
    finally:
        await pool.close()
