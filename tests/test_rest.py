"""The REST contract (PROTOCOL §3) against a real hub process and real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import pytest
import websockets

from tests.conftest import TEST_SECRET
from tests.support import Client, HubProcess, TenantKit, provisioned_tenant, punch_frame

pytestmark = pytest.mark.postgres

# Punches are placed at whole minutes a month back, so they are never "in the future".
BASE = (datetime.now(UTC) - timedelta(days=30)).replace(second=0, microsecond=0)
SITE = {"name": "Annex", "timezone": "Europe/Berlin"}


def at(minutes: float) -> str:
    return (BASE + timedelta(minutes=minutes)).isoformat()


def server_time(minutes: float) -> str:
    """``at(minutes)`` as the server writes it back."""
    return (BASE + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def punch_all(client: Client, frames: list[dict[str, Any]]) -> None:
    """Send every frame, then wait for every ack; all must be accepted."""
    for frame in frames:
        await client.send(frame)
    acks = [await client.recv() for _ in frames]
    assert sorted(a["id"] for a in acks) == sorted(f["id"] for f in frames)
    assert {a["status"] for a in acks} == {"accepted"}, acks


async def get_punches(http: httpx.AsyncClient, token: str | None = None, **query: Any) -> Any:
    headers = bearer(token) if token else None
    response = await http.get("/v1/punches", params=query, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def issue(tenant: TenantKit, **body: Any) -> str:
    response = await tenant.http.post("/v1/tokens", json=body)
    assert response.status_code in (200, 201), response.text
    token: str = response.json()["token"]
    return token


async def add_annex(tenant: TenantKit) -> str:
    """A second site `annex` with employee e4 and terminal `gate`; returns the terminal's token."""
    assert (await tenant.http.put("/v1/sites/annex", json=SITE)).status_code == 201
    response = await tenant.http.put("/v1/employees/e4", json={"name": "Four", "site": "annex"})
    assert response.status_code == 201, response.text
    response = await tenant.http.put("/v1/devices/gate", json={"site": "annex"})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


@pytest.fixture
async def other(hub_process: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    """A second tenant, provisioned with the very same ids as `tenant`."""
    async with provisioned_tenant(hub_process.base_url, database, TEST_SECRET, "o") as kit:
        yield kit


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    try:
        yield conn
    finally:
        await conn.close()


# -- sites -----------------------------------------------------------------------------------


async def test_put_site_creates_then_updates(tenant: TenantKit) -> None:
    body = {
        "name": "Annex",
        "timezone": "America/Los_Angeles",
        "lat": 37.77,
        "lon": -122.42,
        "radius_m": 150,
        "policy": {"overtime": "california", "workweek_start": "sunday", "rounding_minutes": 15,
                   "geofence": "enforce", "eu_wtd": False},
    }  # fmt: skip
    created = await tenant.http.put("/v1/sites/annex", json=body)
    assert created.status_code == 201, created.text
    site = created.json()
    assert site["id"] == "annex" and site["name"] == "Annex"
    assert (site["timezone"], site["lat"], site["lon"], site["radius_m"]) == (
        "America/Los_Angeles",
        37.77,
        -122.42,
        150,
    )
    assert site["policy"] == body["policy"]
    updated = await tenant.http.put("/v1/sites/annex", json={"name": "Annex 2", "timezone": "UTC"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["name"] == "Annex 2" and updated.json()["lat"] is None
    assert updated.json()["policy"] == {}
    fetched = await tenant.http.get("/v1/sites/annex")
    assert fetched.status_code == 200 and fetched.json() == updated.json()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "X"},
        {"timezone": "UTC"},
        {"name": "", "timezone": "UTC"},
        {"name": 5, "timezone": "UTC"},
        {"name": "X", "timezone": "UTC", "colour": "red"},
        {"name": "X", "timezone": "UTC", "lat": 10},
        {"name": "X", "timezone": "UTC", "lon": 10},
        {"name": "X", "timezone": "UTC", "lat": 91, "lon": 0},
        {"name": "X", "timezone": "UTC", "lat": 0, "lon": -181},
        {"name": "X", "timezone": "UTC", "lat": 0, "lon": 0, "radius_m": 0},
        {"name": "X", "timezone": "UTC", "policy": "flsa"},
        {"name": "X", "timezone": "UTC", "policy": {"overtime": "sometimes"}},
        {"name": "X", "timezone": "UTC", "policy": {"workweek_start": "funday"}},
        {"name": "X", "timezone": "UTC", "policy": {"rounding_minutes": 7}},
        {"name": "X", "timezone": "UTC", "policy": {"rounding_minutes": "15"}},
        {"name": "X", "timezone": "UTC", "policy": {"geofence": "strict"}},
        {"name": "X", "timezone": "UTC", "policy": {"eu_wtd": "yes"}},
        {"name": "X", "timezone": "UTC", "policy": {"overtme": "flsa"}},
        [],
        "site",
    ],
)
async def test_invalid_site_bodies_are_400(tenant: TenantKit, body: Any) -> None:
    assert_error(await tenant.http.put("/v1/sites/bad", json=body), 400, "invalid")
    assert_error(await tenant.http.get("/v1/sites/bad"), 404, "not_found")


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus_Mons", "utc+2", "", "../../etc/passwd", "/etc/localtime", "Europe"]
)
async def test_unknown_time_zones_are_400(tenant: TenantKit, zone: str) -> None:
    response = await tenant.http.put("/v1/sites/bad", json={"name": "X", "timezone": zone})
    assert_error(response, 400, "invalid")


@pytest.mark.parametrize("content", [b"", b"not json", b'{"name": "X", "timezone": "UTC"'])
async def test_a_body_that_is_not_json_is_400(tenant: TenantKit, content: bytes) -> None:
    response = await tenant.http.put(
        "/v1/sites/bad", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid")


@pytest.mark.parametrize("kind", ["sites", "employees", "devices"])
@pytest.mark.parametrize("entity", ["has%20space", "a" * 65, "caf%C3%A9", "semi%3Bcolon", "%2E%2A"])
async def test_bad_ids_in_the_path_are_400(tenant: TenantKit, kind: str, entity: str) -> None:
    body = {"name": "X", "timezone": "UTC", "site": "hq"}
    if kind != "sites":
        body.pop("timezone")
    if kind == "devices":
        body.pop("name")
    assert_error(await tenant.http.put(f"/v1/{kind}/{entity}", json=body), 400, "invalid")


async def test_ids_may_use_the_whole_alphabet(tenant: TenantKit) -> None:
    entity = "A-z_0.9" + "x" * 57
    assert len(entity) == 64
    response = await tenant.http.put(f"/v1/sites/{entity}", json={"name": "X", "timezone": "UTC"})
    assert response.status_code == 201 and response.json()["id"] == entity


# -- employees, devices --------------------------------------------------------------------


async def test_put_employee_creates_updates_and_needs_a_known_site(tenant: TenantKit) -> None:
    response = await tenant.http.put("/v1/employees/e9", json={"name": "Nine", "site": "hq"})
    assert response.status_code == 201, response.text
    assert response.json() == {"id": "e9", "name": "Nine", "site": "hq", "badge": None}
    response = await tenant.http.put(
        "/v1/employees/e9", json={"name": "Nine", "site": "hq", "badge": "b9"}
    )
    assert response.status_code == 200 and response.json()["badge"] == "b9"
    response = await tenant.http.put("/v1/employees/e8", json={"name": "Eight", "site": "mars"})
    assert_error(response, 400, "unknown_site")
    assert_error(await tenant.http.get("/v1/employees/e8"), 404, "not_found")


async def test_a_badge_belongs_to_one_employee(tenant: TenantKit) -> None:
    taken = {"name": "Nine", "site": "hq", "badge": "b1"}
    assert_error(await tenant.http.put("/v1/employees/e9", json=taken), 409, "conflict")
    assert_error(await tenant.http.get("/v1/employees/e9"), 404)
    # Re-saving e1 with its own badge is no conflict; once e1 lets go, e9 may have it.
    keep = await tenant.http.put(
        "/v1/employees/e1", json={"name": "One", "site": "hq", "badge": "b1"}
    )
    assert keep.status_code == 200
    release = await tenant.http.put("/v1/employees/e1", json={"name": "One", "site": "hq"})
    assert release.status_code == 200 and release.json()["badge"] is None
    assert (await tenant.http.put("/v1/employees/e9", json=taken)).status_code == 201


async def test_racing_puts_for_one_badge_give_one_winner_and_409s(tenant: TenantKit) -> None:
    racers = 12
    # Open the connections first so that the PUTs of a round really arrive together.
    await asyncio.gather(*(tenant.http.get("/healthz") for _ in range(racers)))
    for round_ in range(4):
        badge = f"hot-{round_}"
        results = await asyncio.gather(
            *(
                tenant.http.put(
                    f"/v1/employees/r{round_}-{n}", json={"name": "R", "site": "hq", "badge": badge}
                )
                for n in range(racers)
            ),
            return_exceptions=True,
        )
        statuses = sorted(
            r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results
        )
        assert statuses == [201] + [409] * (racers - 1), (round_, statuses)


async def test_put_device_returns_a_terminal_token_that_works(tenant: TenantKit) -> None:
    response = await tenant.http.put("/v1/devices/lobby", json={"site": "hq", "name": "Lobby"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert sorted(body) == ["device", "token"] and body["device"] == "lobby"
    client = await tenant.connect(body["token"])
    frame = punch_frame("e2", method="face")
    assert (await client.punch(frame))["status"] == "accepted"
    row = (await tenant.stored(frame["id"]))[frame["id"]]
    assert (row["device"], row["site"], row["source"]) == ("lobby", "hq", "terminal")
    await client.close()
    again = await tenant.http.put("/v1/devices/lobby", json={"site": "hq"})
    assert again.status_code == 200 and again.json()["device"] == "lobby"


async def test_a_device_token_says_who_it_is_in_welcome(tenant: TenantKit) -> None:
    response = await tenant.http.put("/v1/devices/lobby", json={"site": "hq"})
    async with websockets.connect(tenant.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "token": response.json()["token"]}))
        welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    assert (welcome["role"], welcome["sub"], welcome["tenant"]) == (
        "terminal",
        "lobby",
        tenant.slug,
    )


async def test_devices_need_a_known_site_and_a_unique_serial(tenant: TenantKit) -> None:
    assert_error(await tenant.http.put("/v1/devices/x", json={"site": "mars"}), 400, "unknown_site")
    sn = f"SN{uuid.uuid4().hex[:12]}"
    first = await tenant.http.put("/v1/devices/zk1", json={"site": "hq", "adms_sn": sn})
    assert first.status_code == 201
    assert_error(await tenant.http.put("/v1/devices/zk2", json={"site": "hq", "adms_sn": sn}), 409)
    assert (
        await tenant.http.put("/v1/devices/zk1", json={"site": "hq", "adms_sn": sn})
    ).status_code == 200


# -- tokens and roles ------------------------------------------------------------------------


async def test_post_tokens_answers_token_and_expiry(tenant: TenantKit) -> None:
    before = datetime.now(UTC)
    response = await tenant.http.post(
        "/v1/tokens", json={"role": "admin", "sub": "ops", "ttl_s": 3600}
    )
    assert response.status_code in (200, 201), response.text
    body = response.json()
    assert sorted(body) == ["expires_at", "token"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["expires_at"])
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert timedelta(seconds=3598) <= expires - before <= timedelta(seconds=3605)
    # The new admin token is a working admin token.
    response = await tenant.http.put(
        "/v1/sites/ops", json={"name": "Ops", "timezone": "UTC"}, headers=bearer(body["token"])
    )
    assert response.status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"role": "root", "sub": "x"},
        {"role": "admin"},
        {"role": "admin", "sub": ""},
        {"role": "admin", "sub": "x", "ttl_s": 10},
        {"role": "admin", "sub": "x", "ttl_s": 10**9},
        {"role": "terminal", "sub": "no-such-device"},
        {"role": "employee", "sub": "nobody"},
        {"role": "employee", "sub": "phone", "employee": "nobody"},
        {"role": "supervisor", "sub": "boss", "sites": ["mars"]},
        {"role": "supervisor", "sub": "boss", "sites": ["bad id"]},
    ],
)
async def test_invalid_token_requests_are_400(tenant: TenantKit, body: dict[str, Any]) -> None:
    assert_error(await tenant.http.post("/v1/tokens", json=body), 400)


async def test_terminal_token_from_post_tokens_punches_at_the_devices_site(
    tenant: TenantKit,
) -> None:
    await add_annex(tenant)
    token = await issue(tenant, role="terminal", sub="gate")
    client = await tenant.connect(token)
    frame = punch_frame("e1")
    assert (await client.punch(frame))["status"] == "accepted"
    row = (await tenant.stored(frame["id"]))[frame["id"]]
    assert (row["site"], row["device"]) == ("annex", "gate")
    await client.close()
    assert_error(await tenant.http.get("/v1/punches", headers=bearer(token)), 403, "forbidden")


async def test_a_supervisor_reads_only_the_punches_of_its_sites(tenant: TenantKit) -> None:
    gate = await add_annex(tenant)
    door = await tenant.connect()
    hq_frames = [punch_frame("e1", at=at(1)), punch_frame("e2", at=at(2))]
    await punch_all(door, hq_frames)
    await door.close()
    gate_client = await tenant.connect(gate)
    annex_frames = [punch_frame("e4", at=at(3)), punch_frame("e1", at=at(4))]
    await punch_all(gate_client, annex_frames)
    await gate_client.close()

    annex_boss = await issue(tenant, role="supervisor", sub="boss", sites=["annex"])
    seen = await get_punches(tenant.http, annex_boss)
    assert [p["id"] for p in seen["punches"]] == [f["id"] for f in annex_frames]
    assert {p["site"] for p in seen["punches"]} == {"annex"}
    seen = await get_punches(tenant.http, annex_boss, employee="e1")
    assert [p["id"] for p in seen["punches"]] == [annex_frames[1]["id"]]
    response = await tenant.http.get(
        "/v1/punches", params={"site": "hq"}, headers=bearer(annex_boss)
    )
    assert_error(response, 403, "forbidden")

    nowhere = await issue(tenant, role="supervisor", sub="intern")
    assert (await get_punches(tenant.http, nowhere))["punches"] == []


async def test_a_wildcard_supervisor_token_is_issued_and_sees_every_site(tenant: TenantKit) -> None:
    gate = await add_annex(tenant)
    door = await tenant.connect()
    hq_frame = punch_frame("e1", at=at(1))
    await punch_all(door, [hq_frame])
    await door.close()
    gate_client = await tenant.connect(gate)
    annex_frame = punch_frame("e4", at=at(2))
    await punch_all(gate_client, [annex_frame])
    await gate_client.close()
    # PROTOCOL §2: a supervisor's `sites` is a list of site ids, or ["*"].
    everywhere = await issue(tenant, role="supervisor", sub="chief", sites=["*"])
    seen = await get_punches(tenant.http, everywhere)
    assert [p["id"] for p in seen["punches"]] == [hq_frame["id"], annex_frame["id"]]


async def test_an_employee_reads_only_its_own_punches(tenant: TenantKit) -> None:
    door = await tenant.connect()
    frames = [punch_frame("e1", at=at(1)), punch_frame("e2", at=at(2)), punch_frame("e1", at=at(3))]
    await punch_all(door, frames)
    await door.close()
    mine = await issue(tenant, role="employee", sub="e1")
    seen = await get_punches(tenant.http, mine)
    assert [p["id"] for p in seen["punches"]] == [frames[0]["id"], frames[2]["id"]]
    assert (await get_punches(tenant.http, mine, employee="e1")) == seen
    response = await tenant.http.get("/v1/punches", params={"employee": "e2"}, headers=bearer(mine))
    assert_error(response, 403, "forbidden")
    # A phone token whose `sub` is not the employee id still reads only its employee.
    phone = await issue(tenant, role="employee", sub="phone-7", employee="e2")
    seen = await get_punches(tenant.http, phone)
    assert [p["id"] for p in seen["punches"]] == [frames[1]["id"]]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": "Bearer garbage"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Token " + "x" * 20},
    ],
)
async def test_missing_or_bad_tokens_are_401(tenant: TenantKit, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=tenant.base_url, headers=headers) as anonymous:
        for method, path in [
            ("GET", "/v1/punches"),
            ("PUT", "/v1/sites/hq"),
            ("POST", "/v1/tokens"),
        ]:
            response = await anonymous.request(method, path, json={"name": "X", "timezone": "UTC"})
            assert_error(response, 401, "unauthorized")


async def test_expired_and_foreign_signed_tokens_are_401(tenant: TenantKit) -> None:
    from hub.tokens import TokenIssuer

    expired = tenant.issuer.issue(tenant=tenant.slug, role="admin", sub="x", ttl_s=-5)[0]
    forged = TokenIssuer("not-the-hub-secret-" + "y" * 32).issue(
        tenant=tenant.slug, role="admin", sub="x"
    )[0]
    for token in (expired, forged):
        assert_error(
            await tenant.http.get("/v1/punches", headers=bearer(token)), 401, "unauthorized"
        )


@pytest.mark.parametrize(
    ("role", "claims", "method", "path"),
    [
        ("supervisor", {"sites": ["*"]}, "PUT", "/v1/sites/hq"),
        ("supervisor", {"sites": ["*"]}, "PUT", "/v1/employees/e1"),
        ("supervisor", {"sites": ["*"]}, "POST", "/v1/tokens"),
        ("employee", {"employee": "e1"}, "PUT", "/v1/employees/e1"),
        ("employee", {"employee": "e1"}, "GET", "/v1/employees"),
        ("terminal", {"site": "hq"}, "GET", "/v1/punches"),
        ("terminal", {"site": "hq"}, "PUT", "/v1/devices/door"),
    ],
)
async def test_the_wrong_role_is_403(
    tenant: TenantKit, role: str, claims: dict[str, Any], method: str, path: str
) -> None:
    token = tenant.token(role, "someone", **claims)
    body = {"name": "X", "timezone": "UTC", "site": "hq", "role": "admin", "sub": "me"}
    response = await tenant.http.request(method, path, json=body, headers=bearer(token))
    assert_error(response, 403, "forbidden")


# -- errors ----------------------------------------------------------------------------------


# `/` is the dashboard (docs/pages.md).
@pytest.mark.parametrize("path", ["/v1/nothing", "/v2/punches", "/nothing", "/v1/sites/hq/extra"])
async def test_unknown_routes_are_404_with_the_error_shape(tenant: TenantKit, path: str) -> None:
    assert_error(await tenant.http.get(path), 404, "not_found")


async def test_unknown_entities_are_404(tenant: TenantKit) -> None:
    assert_error(await tenant.http.get("/v1/sites/nowhere"), 404, "not_found")
    assert_error(await tenant.http.get("/v1/employees/nobody"), 404, "not_found")


async def test_a_body_over_one_mebibyte_is_413(tenant: TenantKit) -> None:
    padding = "x" * (1024 * 1024)
    body = json.dumps({"name": "Big", "timezone": "UTC", "pad": padding}).encode()
    response = await tenant.http.put(
        "/v1/sites/big", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:
        # Without a Content-Length the hub must count what it reads.
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await tenant.http.put(
        "/v1/sites/big", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "too_large")
    assert_error(await tenant.http.get("/v1/sites/big"), 404)
    # Just under the limit is fine (and rejected only for the unknown field).
    small = json.dumps({"name": "Big", "timezone": "UTC", "pad": "x" * 1000}).encode()
    response = await tenant.http.put("/v1/sites/big", content=small)
    assert_error(response, 400, "invalid")


# -- punches ---------------------------------------------------------------------------------


async def test_punches_come_back_with_every_field_ordered_by_at(tenant: TenantKit) -> None:
    door = await tenant.connect()
    frames = [
        punch_frame("e1", at=at(30), kind="out", method="badge"),
        punch_frame("e1", at=at(10)),
        punch_frame(badge="b2", at=at(20), kind="break_start", offline=True),
    ]
    # One at a time, so that presence sees them in this order and flags them the same way
    # every run: e1's first punch is an `out`, its `in` is older than that `out`, e2's first
    # punch is a `break_start`.
    for frame in frames:
        assert (await door.punch(frame))["status"] == "accepted"
    await door.close()
    phone = await tenant.connect(tenant.token("employee", "p3", employee="e3"))
    mobile = punch_frame("e3", at=at(15))
    await punch_all(phone, [mobile])
    await phone.close()

    expected_flags = [["out_of_order"], [], ["break_start_while_out"], ["out_while_out"]]
    for _ in range(50):
        # Flags are written just after the commit, off the ack path.
        punches = (await get_punches(tenant.http))["punches"]
        if [p["flags"] for p in punches] == expected_flags:
            break
        await asyncio.sleep(0.1)
    assert [p["flags"] for p in punches] == expected_flags
    assert [p["id"] for p in punches] == [
        frames[1]["id"],
        mobile["id"],
        frames[2]["id"],
        frames[0]["id"],
    ]
    first = punches[0]
    assert first == {
        "id": frames[1]["id"],
        "employee": "e1",
        "kind": "in",
        "at": server_time(10),
        "received_at": first["received_at"],
        "site": "hq",
        "device": "door",
        "source": "terminal",
        "flags": ["out_of_order"],
    }
    received = datetime.fromisoformat(first["received_at"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - received) < timedelta(minutes=5)
    assert punches[3]["method"] == "badge" and punches[3]["kind"] == "out"
    assert punches[2]["employee"] == "e2"
    # A phone punch has no device: the field is left out rather than null.
    assert "device" not in punches[1] and "method" not in punches[1]
    assert (punches[1]["source"], punches[1]["site"]) == ("mobile", "hq")


async def test_punch_filters(tenant: TenantKit) -> None:
    gate = await add_annex(tenant)
    door = await tenant.connect()
    hq = [punch_frame("e1", at=at(0)), punch_frame("e2", at=at(10)), punch_frame("e1", at=at(20))]
    await punch_all(door, hq)
    await door.close()
    gate_client = await tenant.connect(gate)
    annex = [punch_frame("e4", at=at(5)), punch_frame("e1", at=at(25))]
    await punch_all(gate_client, annex)
    await gate_client.close()

    async def ids(**query: Any) -> list[str]:
        return [p["id"] for p in (await get_punches(tenant.http, **query))["punches"]]

    assert await ids(employee="e1") == [hq[0]["id"], hq[2]["id"], annex[1]["id"]]
    assert await ids(site="annex") == [annex[0]["id"], annex[1]["id"]]
    assert await ids(site="hq", employee="e1") == [hq[0]["id"], hq[2]["id"]]
    assert await ids(employee="e3") == []
    assert await ids(**{"from": at(7)}) == [hq[1]["id"], hq[2]["id"], annex[1]["id"]]
    assert await ids(to=at(7)) == [hq[0]["id"], annex[0]["id"]]
    assert await ids(**{"from": at(3), "to": at(22)}) == [annex[0]["id"], hq[1]["id"], hq[2]["id"]]
    # `from` is inclusive; any offset may be used.
    kolkata = (BASE + timedelta(minutes=10)).astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert kolkata.isoformat().endswith("+05:30")
    assert await ids(**{"from": kolkata.isoformat(), "employee": "e2"}) == [hq[1]["id"]]
    assert await ids(**{"from": server_time(20), "site": "hq"}) == [hq[2]["id"]]


@pytest.mark.parametrize(
    "query",
    [
        {"employee": "bad id"},
        {"site": "x" * 65},
        {"from": "yesterday"},
        {"from": "2026-01-05"},
        {"to": "2026-01-05T08:00:00"},
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"limit": "10001"},
        {"limit": "1.5"},
        {"limit": "²"},
    ],
)
async def test_bad_punch_queries_are_400(tenant: TenantKit, query: dict[str, str]) -> None:
    assert_error(await tenant.http.get("/v1/punches", params=query), 400, "invalid")


async def test_paging_walks_every_punch_once_in_order(tenant: TenantKit) -> None:
    door = await tenant.connect()
    # Several punches share an `at`, so the cursor must break ties by id.
    frames = [
        punch_frame(f"e{1 + n % 3}", at=at(n // 4), kind="in" if n % 2 else "out")
        for n in reversed(range(23))
    ]
    await punch_all(door, frames)
    await door.close()
    listed = await get_punches(tenant.http)
    assert "next" not in listed
    everything = listed["punches"]
    assert sorted(p["id"] for p in everything) == sorted(f["id"] for f in frames)
    order = [(p["at"], uuid.UUID(p["id"])) for p in everything]
    assert order == sorted(order)

    for limit in (1, 4, 5, 23, 1000):
        pages: list[list[str]] = []
        query: dict[str, Any] = {"limit": limit}
        while True:
            page = await get_punches(tenant.http, **query)
            pages.append([p["id"] for p in page["punches"]])
            assert len(pages[-1]) <= limit
            if "next" not in page:
                break
            query = {"limit": limit, "after": page["next"]}
            assert len(pages) < 30, "paging does not end"
        walked = [punch_id for page_ids in pages for punch_id in page_ids]
        assert walked == [p["id"] for p in everything], limit
        assert len(pages) == max(1, -(-23 // limit)), (limit, [len(p) for p in pages])


async def test_paging_keeps_the_filter(tenant: TenantKit) -> None:
    door = await tenant.connect()
    frames = [punch_frame("e1" if n % 3 else "e2", at=at(n)) for n in range(12)]
    await punch_all(door, frames)
    await door.close()
    wanted = [f["id"] for f in frames if f["employee"] == "e1"]
    walked: list[str] = []
    query: dict[str, Any] = {"employee": "e1", "limit": 3}
    while True:
        page = await get_punches(tenant.http, **query)
        walked += [p["id"] for p in page["punches"]]
        assert {p["employee"] for p in page["punches"]} <= {"e1"}
        if "next" not in page:
            break
        query["after"] = page["next"]
    assert walked == wanted


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "",
        _cursor("not a cursor"),
        _cursor("2026-01-05T08:00:00+00:00|not-a-uuid"),
        _cursor("yesterday|6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70"),
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),
    ],
)
async def test_a_bad_cursor_is_400(tenant: TenantKit, cursor: str) -> None:
    assert_error(await tenant.http.get("/v1/punches", params={"after": cursor}), 400, "invalid")


async def test_listed_times_are_rfc3339_whatever_the_year(tenant: TenantKit) -> None:
    # Only the future is refused, so a terminal with a dead clock battery can store year 5.
    door = await tenant.connect()
    ancient = punch_frame("e1", at="0005-01-01T00:00:00Z")
    await punch_all(door, [ancient])
    await door.close()
    [listed] = (await get_punches(tenant.http))["punches"]
    assert listed["at"] == "0005-01-01T00:00:00.000Z"


# -- health and metrics ----------------------------------------------------------------------


async def test_health_and_readiness(tenant: TenantKit) -> None:
    async with httpx.AsyncClient(base_url=tenant.base_url) as anonymous:
        health = await anonymous.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        ready = await anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when it is absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sample, _, label_text = series.partition("{")
        if sample != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == wanted:
            return float(value)
    return 0.0


async def until_metric(tenant: TenantKit, name: str, expected: float, **labels: str) -> None:
    """Poll until a gauge shows ``expected``: the hub updates it after the socket is gone,
    and nothing a client can await marks that moment."""
    for _ in range(100):
        if metric(await read_metrics(tenant), name, **labels) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never became {expected}")


async def read_metrics(tenant: TenantKit) -> str:
    async with httpx.AsyncClient(base_url=tenant.base_url) as anonymous:
        response = await anonymous.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_metrics_are_prometheus_text_and_count_each_punch_once(tenant: TenantKit) -> None:
    before = await read_metrics(tenant)
    # An admin socket: no other test holds one, so this gauge moves only here.
    admins = metric(before, "attendance_connections", role="admin")
    client = await tenant.connect(tenant.admin_token)
    connected = await read_metrics(tenant)
    assert metric(connected, "attendance_connections", role="admin") == admins + 1
    await client.punch(punch_frame("e1"))
    await client.punch(punch_frame("e1", at=(datetime.now(UTC) + timedelta(hours=1)).isoformat()))
    await client.ws.send("garbage")
    assert (await client.recv())["code"] == "bad_frame"
    after = await read_metrics(tenant)
    await client.close()
    await until_metric(tenant, "attendance_connections", admins, role="admin")

    for line in (
        "# TYPE attendance_punches_total counter",
        "# TYPE attendance_punch_batch_size histogram",
        "# TYPE attendance_punch_commit_duration_seconds histogram",
        "# TYPE attendance_connections gauge",
        "# TYPE attendance_frames_total counter",
    ):
        assert line in after.splitlines(), line
    assert "_created" not in after

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("attendance_punches_total", result="accepted") == 1
    assert grew("attendance_punches_total", result="invalid_time") == 1
    assert grew("attendance_frames_total", direction="in", type="punch") == 2
    assert grew("attendance_frames_total", direction="in", type="hello") == 1
    assert grew("attendance_frames_total", direction="in", type="invalid") == 1
    assert grew("attendance_frames_total", direction="out", type="ack") == 2
    assert grew("attendance_punch_batch_size_count") >= 1
    assert grew("attendance_punch_commit_duration_seconds_count") >= 1
    # No tenant ids in labels: they would be unbounded.
    assert tenant.slug not in after


# -- audit -----------------------------------------------------------------------------------


async def audit_rows(db: asyncpg.Connection, tenant: TenantKit) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT actor, role, action, target, before, after, ip FROM audit_log "
        "WHERE tenant = $1 ORDER BY seq",
        tenant.slug,
    )
    return [
        {
            **dict(r),
            "before": json.loads(r["before"]) if r["before"] else None,
            "after": json.loads(r["after"]) if r["after"] else None,
        }
        for r in rows
    ]


async def test_admin_changes_are_audited(tenant: TenantKit, db: asyncpg.Connection) -> None:
    provisioned = await audit_rows(db, tenant)
    assert [(r["action"], r["target"]) for r in provisioned] == [
        ("site.put", "site:hq"),
        ("employee.put", "employee:e1"),
        ("employee.put", "employee:e2"),
        ("employee.put", "employee:e3"),
        ("device.put", "device:door"),
    ]
    assert {(r["actor"], r["role"]) for r in provisioned} == {("test-admin", "admin")}
    assert all(r["before"] is None for r in provisioned)
    assert provisioned[1]["after"] == {
        "id": "e1",
        "name": "Employee 1",
        "site": "hq",
        "badge": "b1",
    }
    assert provisioned[0]["ip"] == "127.0.0.1"

    await tenant.http.put("/v1/employees/e1", json={"name": "Renamed", "site": "hq", "badge": "b1"})
    token = await issue(tenant, role="employee", sub="e1", ttl_s=600)
    # Refused changes leave no trace.
    taken = {"name": "X", "site": "hq", "badge": "b2"}
    assert_error(await tenant.http.put("/v1/employees/e9", json=taken), 409)
    nowhere = {"name": "X", "timezone": "Nowhere/Land"}
    assert_error(await tenant.http.put("/v1/sites/bad", json=nowhere), 400)
    unknown_site = {"name": "X", "site": "mars"}
    assert_error(await tenant.http.put("/v1/employees/e9", json=unknown_site), 400)

    rows = (await audit_rows(db, tenant))[len(provisioned) :]
    assert [(r["action"], r["target"]) for r in rows] == [
        ("employee.put", "employee:e1"),
        ("token.issue", "employee:e1"),
    ]
    update, issued = rows
    assert update["before"]["name"] == "Employee 1" and update["after"]["name"] == "Renamed"
    assert issued["after"]["role"] == "employee" and issued["after"]["ttl_s"] == 600
    # The audit log records that a token was issued, never the token itself.
    everything = json.dumps(await audit_rows(db, tenant), default=str)
    assert token not in everything and token.split(".")[2] not in everything
    assert tenant.terminal_token.split(".")[2] not in everything


# -- tenants ---------------------------------------------------------------------------------


async def test_tenants_do_not_read_each_others_data(tenant: TenantKit, other: TenantKit) -> None:
    door = await tenant.connect()
    mine = [punch_frame("e1", at=at(1)), punch_frame("e2", at=at(2))]
    await punch_all(door, mine)
    await door.close()
    theirs_door = await other.connect()
    theirs = [punch_frame("e1", at=at(3))]
    await punch_all(theirs_door, theirs)
    await theirs_door.close()

    for kit, expected in ((tenant, mine), (other, theirs)):
        seen = await get_punches(kit.http)
        assert [p["id"] for p in seen["punches"]] == [f["id"] for f in expected]
        seen = await get_punches(kit.http, employee="e1", site="hq")
        assert [p["id"] for p in seen["punches"]] == [expected[0]["id"]]

    # The other tenant renames its e1; ours keeps its name.
    await other.http.put("/v1/employees/e1", json={"name": "Theirs", "site": "hq"})
    assert (await tenant.http.get("/v1/employees/e1")).json()["name"] == "Employee 1"
    # Ids and badges are tenant-scoped: each tenant has its own e1 and badge b1.
    assert (await tenant.http.get("/v1/employees/e1")).json()["badge"] == "b1"

    # Entities that exist only in one tenant are invisible to the other.
    await add_annex(tenant)
    assert_error(await other.http.get("/v1/sites/annex"), 404)
    assert_error(await other.http.get("/v1/employees/e4"), 404)
    assert "annex" not in {s["id"] for s in (await other.http.get("/v1/sites")).json()["sites"]}
    assert "gate" not in {d["id"] for d in (await other.http.get("/v1/devices")).json()["devices"]}
    response = await other.http.put("/v1/employees/x", json={"name": "X", "site": "annex"})
    assert_error(response, 400, "unknown_site")
    assert_error(await other.http.put("/v1/devices/x", json={"site": "annex"}), 400, "unknown_site")
    assert_error(await other.http.post("/v1/tokens", json={"role": "terminal", "sub": "gate"}), 400)
    body = {"role": "employee", "sub": "e4"}
    assert_error(await other.http.post("/v1/tokens", json=body), 400, "unknown_employee")
    body = {"role": "supervisor", "sub": "s", "sites": ["annex"]}
    assert_error(await other.http.post("/v1/tokens", json=body), 400, "unknown_site")
    # A wildcard supervisor of the other tenant still sees only its own tenant.
    boss = other.token("supervisor", "boss", sites=["*"])
    seen = await get_punches(other.http, boss)
    assert [p["id"] for p in seen["punches"]] == [theirs[0]["id"]]
