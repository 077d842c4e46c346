"""Tenant isolation and token checks (PROTOCOL §2: nothing ever crosses tenants), end to end.

Two tenants, A and B, are provisioned with the very same ids: site `hq`, employees e1..e3
with badges b1..b3, terminal `door`. Every request a token of B makes therefore names A's
resources too, and only the database can say whose rows it touched: after each scenario
A's rows, read as the owner (outside row-level security), are exactly what they were, no
answer to B carries anything of A (A's names, slug and punch ids are unique markers), and
what B reads is exactly B's rows. Direct SQL under row-level security is tests/test_rls.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import websockets

from hub.tokens import TokenIssuer, key_id
from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    MSGPACK,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
)

pytestmark = pytest.mark.postgres

# Every table that holds a tenant's rows, with the column that orders them.
TENANT_TABLES = {
    "sites": "id",
    "employees": "id",
    "devices": "id",
    "punches": "id",
    "audit_log": "seq",
    "audit_heads": "tenant",
}
CHANNELS = ["presence:hq", "terminals:hq", "alerts:hq", "me"]


def ago(minutes: float) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def snapshot(dsn: str, tenant: str) -> dict[str, list[dict[str, Any]]]:
    """Every row the tenant owns, read as the owner so that row-level security hides nothing."""
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("SELECT * FROM tenants WHERE id = $1", tenant)
        rows = {"tenants": [dict(r) for r in found]}
        for table, order in TENANT_TABLES.items():
            found = await conn.fetch(
                f"SELECT * FROM {table} WHERE tenant = $1 ORDER BY {order}", tenant
            )
            rows[table] = [dict(r) for r in found]
        return rows
    finally:
        await conn.close()


async def owner_fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def punch_ids(kit: TenantKit, employee: str | None = None) -> set[str]:
    rows = await owner_fetch(
        kit.dsn,
        "SELECT id::text FROM punches WHERE tenant = $1 AND ($2::text IS NULL OR employee = $2)",
        kit.slug,
        employee,
    )
    return {r["id"] for r in rows}


async def stored_anywhere(dsn: str, punch_id: str) -> list[str]:
    """The tenants under which a punch with this id is stored."""
    rows = await owner_fetch(
        dsn, "SELECT tenant FROM punches WHERE id = $1 ORDER BY tenant", uuid.UUID(punch_id)
    )
    return [r["tenant"] for r in rows]


@dataclass
class Twins:
    """Tenant A (the victim, with unique names) and tenant B (the one whose tokens we use)."""

    a: TenantKit
    b: TenantKit
    marker: str
    a_punches: list[dict[str, Any]] = field(default_factory=list)
    b_punches: list[dict[str, Any]] = field(default_factory=list)

    def leaks(self, text: str) -> list[str]:
        """What of A's shows up in ``text``."""
        needles = [self.marker, self.a.slug, *(p["id"] for p in self.a_punches)]
        return [needle for needle in needles if needle in text]


async def punch_all(client: Client, frames: list[dict[str, Any]]) -> None:
    for frame in frames:
        ack = await client.punch(frame)
        assert (ack["type"], ack["id"], ack["status"]) == ("ack", frame["id"], "accepted"), ack


@pytest.fixture
async def twins(hub_process: HubProcess, database: str) -> AsyncIterator[Twins]:
    url = hub_process.base_url
    async with (
        provisioned_tenant(url, database, TEST_SECRET, "iso-a") as a,
        provisioned_tenant(url, database, TEST_SECRET, "iso-b") as b,
    ):
        marker = f"only-in-a-{uuid.uuid4().hex[:12]}"
        twins = Twins(a, b, marker)
        # A's names are unique, so any of them in an answer to B is a leak; the ids and
        # badges stay identical to B's.
        response = await a.http.put(
            "/v1/sites/hq", json={"name": f"{marker} site", "timezone": "Europe/Berlin"}
        )
        assert response.status_code == 200, response.text
        for n in (1, 2, 3):
            body = {"name": f"{marker} person {n}", "site": "hq", "badge": f"b{n}"}
            response = await a.http.put(f"/v1/employees/e{n}", json=body)
            assert response.status_code == 200, response.text
        body = {"site": "hq", "name": f"{marker} door", "adms_sn": f"{marker}-sn"}
        response = await a.http.put("/v1/devices/door", json=body)
        assert response.status_code == 200, response.text
        # A punches e3 twice and B never does, so that B's answers about e3 cannot borrow A's.
        twins.a_punches = [
            punch_frame("e1", at=ago(50)),
            punch_frame(badge="b2", kind="break_start", at=ago(40)),
            punch_frame("e3", at=ago(30)),
            punch_frame("e3", kind="out", at=ago(20)),
        ]
        door = await a.connect()
        await punch_all(door, twins.a_punches)
        await door.close()
        correction = {
            "id": str(uuid.uuid4()),
            "employee": "e1",
            "kind": "out",
            "at": ago(10),
            "reason": f"{marker} forgot to badge out",
        }
        response = await a.http.post("/v1/punches", json=correction)
        assert response.status_code == 201, response.text
        twins.a_punches.append(correction)

        twins.b_punches = [punch_frame("e1", at=ago(45)), punch_frame("e2", at=ago(35))]
        door = await b.connect()
        await punch_all(door, twins.b_punches)
        await door.close()
        yield twins


# -- REST: every B token on every route ------------------------------------------------------


@dataclass
class Call:
    """One request of the matrix, the roles that may make it, and what a success must show."""

    method: str
    path: str
    roles: frozenset[str]
    body: Any = None
    params: dict[str, str] | None = None
    status: int = 200
    check: Callable[[Twins, str, httpx.Response], Awaitable[None]] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.params or ''}"


READERS = frozenset({"admin", "supervisor"})
ADMIN = frozenset({"admin"})
PUNCH_READERS = frozenset({"admin", "supervisor", "employee"})


async def sites_are_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    mine = await owner_fetch(
        twins.b.dsn, "SELECT id, name FROM sites WHERE tenant = $1", twins.b.slug
    )
    assert {(s["id"], s["name"]) for s in response.json()["sites"]} == {tuple(r) for r in mine}


async def site_is_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    [mine] = await owner_fetch(
        twins.b.dsn, "SELECT name FROM sites WHERE tenant = $1 AND id = 'hq'", twins.b.slug
    )
    assert response.json()["name"] == mine["name"]


async def employees_are_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    mine = await owner_fetch(
        twins.b.dsn,
        "SELECT id, name FROM employees WHERE tenant = $1 AND erased_at IS NULL",
        twins.b.slug,
    )
    seen = {(e["id"], e["name"]) for e in response.json()["employees"]}
    assert seen == {tuple(r) for r in mine}


async def employee_is_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    assert response.json() == {"id": "e1", "name": "Employee 1", "site": "hq", "badge": "b1"}


async def devices_are_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    mine = await owner_fetch(
        twins.b.dsn, "SELECT id, name, adms_sn FROM devices WHERE tenant = $1", twins.b.slug
    )
    seen = {(d["id"], d["name"], d["adms_sn"]) for d in response.json()["devices"]}
    assert seen == {tuple(r) for r in mine}


def punches_are_bs(employee: str | None) -> Callable[[Twins, str, httpx.Response], Awaitable[None]]:
    async def check(twins: Twins, role: str, response: httpx.Response) -> None:
        # An employee token always reads its own punches, whatever the filter says.
        wanted = "e1" if role == "employee" else employee
        seen = [p["id"] for p in response.json()["punches"]]
        assert len(seen) == len(set(seen))
        assert set(seen) == await punch_ids(twins.b, wanted)
        assert not set(seen) & {p["id"] for p in twins.a_punches}

    return check


async def audit_is_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    mine = await owner_fetch(
        twins.b.dsn, "SELECT seq FROM audit_log WHERE tenant = $1 ORDER BY seq", twins.b.slug
    )
    assert [e["seq"] for e in response.json()["entries"]] == [r["seq"] for r in mine][:100]


async def audit_of_e1_is_bs(twins: Twins, role: str, response: httpx.Response) -> None:
    entries = response.json()["entries"]
    assert entries and {e["target"] for e in entries} == {"employee:e1"}
    names = [e["after"]["name"] for e in entries if e["action"] == "employee.put"]
    assert names == ["Employee 1"]


def token_is_bs(**expected: Any) -> Callable[[Twins, str, httpx.Response], Awaitable[None]]:
    async def check(twins: Twins, role: str, response: httpx.Response) -> None:
        token = response.json()["token"]
        claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
        assert claims["tenant"] == twins.b.slug
        assert {k: claims[k] for k in expected} == expected

    return check


def correction_is_bs(
    body: dict[str, Any],
) -> Callable[[Twins, str, httpx.Response], Awaitable[None]]:
    async def check(twins: Twins, role: str, response: httpx.Response) -> None:
        answer = response.json()
        assert (answer["status"], answer["employee"], answer["site"]) == ("accepted", "e1", "hq")
        assert await stored_anywhere(twins.b.dsn, body["id"]) == [twins.b.slug]

    return check


async def site_renamed_in_b(twins: Twins, role: str, response: httpx.Response) -> None:
    assert response.json()["name"] == "B renamed HQ"


async def employee_renamed_in_b(twins: Twins, role: str, response: httpx.Response) -> None:
    assert response.json() == {"id": "e2", "name": "B renamed two", "site": "hq", "badge": "b2"}


async def device_renamed_in_b(twins: Twins, role: str, response: httpx.Response) -> None:
    assert response.json()["device"] == "door"
    claims = jwt.decode(response.json()["token"], TEST_SECRET, algorithms=["HS256"])
    assert (claims["tenant"], claims["sub"], claims["site"]) == (twins.b.slug, "door", "hq")


async def e3_erased_in_b_only(twins: Twins, role: str, response: httpx.Response) -> None:
    # A has two punches for e3 and B none: the count must be B's.
    assert response.json() == {"employee": "e3", "erased": True, "punches_kept": 0}


async def door_revoked_in_b_only(twins: Twins, role: str, response: httpx.Response) -> None:
    assert response.json() == {"device": "door", "revoked": True}
    rows = await owner_fetch(
        twins.b.dsn,
        "SELECT tenant FROM devices WHERE id = 'door' AND tenant = ANY($1) "
        "AND revoked_at IS NOT NULL",
        [twins.a.slug, twins.b.slug],
    )
    assert [r["tenant"] for r in rows] == [twins.b.slug]


def correction(employee: str | None = None, badge: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "kind": "in",
        "at": ago(90),
        "reason": "matrix correction",
    }
    body.update({"employee": employee} if employee else {"badge": badge})
    return body


def matrix_calls() -> list[Call]:
    """Every route there is, naming ids that tenant A has too. Destructive calls come last."""
    by_id = correction(employee="e1")
    by_badge = correction(badge="b1")
    return [
        Call("GET", "/v1/sites", READERS, check=sites_are_bs),
        Call("GET", "/v1/sites/hq", READERS, check=site_is_bs),
        Call("GET", "/v1/employees", READERS, check=employees_are_bs),
        Call("GET", "/v1/employees/e1", READERS, check=employee_is_bs),
        Call("GET", "/v1/devices", READERS, check=devices_are_bs),
        Call("GET", "/v1/punches", PUNCH_READERS, check=punches_are_bs(None)),
        Call("GET", "/v1/punches", PUNCH_READERS, params={"employee": "e1"},
             check=punches_are_bs("e1")),
        Call("GET", "/v1/punches", PUNCH_READERS, params={"site": "hq"},
             check=punches_are_bs(None)),
        Call("GET", "/v1/audit", ADMIN, check=audit_is_bs),
        Call("GET", "/v1/audit", ADMIN, params={"target": "employee:e1"},
             check=audit_of_e1_is_bs),
        Call("POST", "/v1/tokens", ADMIN, body={"role": "terminal", "sub": "door"}, status=201,
             check=token_is_bs(role="terminal", sub="door", site="hq")),
        Call("POST", "/v1/tokens", ADMIN, body={"role": "employee", "sub": "e1"}, status=201,
             check=token_is_bs(role="employee", employee="e1")),
        Call("POST", "/v1/tokens", ADMIN, body={"role": "supervisor", "sub": "s", "sites": ["hq"]},
             status=201, check=token_is_bs(role="supervisor", sites=["hq"])),
        Call("POST", "/v1/punches", READERS, body=by_id, status=201,
             check=correction_is_bs(by_id)),
        Call("POST", "/v1/punches", READERS, body=by_badge, status=201,
             check=correction_is_bs(by_badge)),
        Call("PUT", "/v1/sites/hq", ADMIN, body={"name": "B renamed HQ", "timezone": "UTC"},
             check=site_renamed_in_b),
        Call("PUT", "/v1/employees/e2", ADMIN,
             body={"name": "B renamed two", "site": "hq", "badge": "b2"},
             check=employee_renamed_in_b),
        Call("PUT", "/v1/devices/door", ADMIN, body={"site": "hq", "name": "B renamed door"},
             check=device_renamed_in_b),
        Call("DELETE", "/v1/employees/e3", ADMIN, check=e3_erased_in_b_only),
        Call("DELETE", "/v1/devices/door", ADMIN, check=door_revoked_in_b_only),
    ]  # fmt: skip


def b_tokens(b: TenantKit) -> list[tuple[str, str]]:
    """(role, token) for every role of tenant B; admin last, since its calls change B."""
    return [
        ("terminal", b.terminal_token),
        ("employee", b.token("employee", "e1", employee="e1")),
        ("supervisor", b.token("supervisor", "boss-hq", sites=["hq"])),
        ("supervisor", b.token("supervisor", "boss-all", sites=["*"])),
        ("admin", b.admin_token),
    ]


async def test_every_b_token_on_every_route_sees_and_changes_only_b(twins: Twins) -> None:
    a_before = await snapshot(twins.a.dsn, twins.a.slug)
    # A's terminal stays connected throughout: B revoking its own `door` must not touch it.
    a_door = await twins.a.connect()
    http = twins.b.http
    for role, token in b_tokens(twins.b):
        for call in matrix_calls():
            response = await http.request(
                call.method, call.path, json=call.body, params=call.params, headers=bearer(token)
            )
            where = f"{role} {call}"
            assert not twins.leaks(response.text), (where, response.text)
            if role not in call.roles:
                assert_error(response, 403, "forbidden")
                continue
            assert response.status_code == call.status, (where, response.text)
            if call.check is not None:
                await call.check(twins, role, response)

    assert await snapshot(twins.a.dsn, twins.a.slug) == a_before
    await a_door.send({"type": "ping", "ref": "still-here"})
    assert (await a_door.recv())["ref"] == "still-here"
    ack = await a_door.punch(punch_frame("e3"))
    assert ack["status"] == "accepted", ack
    await a_door.close()


async def test_a_twins_serial_number_is_refused_without_touching_either_device(
    twins: Twins,
) -> None:
    # Serial numbers are unique across tenants (a real terminal has one), so this is the one
    # documented way B learns that a value is taken somewhere; it must change nothing.
    a_before = await snapshot(twins.a.dsn, twins.a.slug)
    b_before = await snapshot(twins.b.dsn, twins.b.slug)
    body = {"site": "hq", "name": "Copy", "adms_sn": f"{twins.marker}-sn"}
    response = await twins.b.http.put("/v1/devices/door", json=body)
    assert_error(response, 409, "conflict")
    assert not twins.leaks(response.text.replace(body["adms_sn"], "")), response.text
    assert await snapshot(twins.a.dsn, twins.a.slug) == a_before
    assert await snapshot(twins.b.dsn, twins.b.slug) == b_before


# -- punches: ids, badges and employees resolve in the token's tenant only -------------------


async def test_punch_ids_are_per_tenant_so_b_reusing_as_ids_is_neither_duplicate_nor_conflict(
    twins: Twins,
) -> None:
    a_before = await snapshot(twins.a.dsn, twins.a.slug)
    same, changed, reused = twins.a_punches[0], twins.a_punches[2], twins.a_punches[3]
    door = await twins.b.connect()
    # Exactly A's punch: in B it is new, so `accepted` (a `duplicate` would leak A's punch).
    ack = await door.punch({**same, "ref": "same"})
    assert (ack["status"], ack["ref"]) == ("accepted", "same"), ack
    # A's id with other details: `accepted` in B, not `id_conflict`.
    ack = await door.punch({**changed, "kind": "break_end", "employee": "e2"})
    assert ack["status"] == "accepted", ack
    await door.close()
    body = {
        "id": reused["id"],
        "employee": "e1",
        "kind": "in",
        "at": ago(5),
        "reason": "B reuses an id",
    }
    response = await twins.b.http.post("/v1/punches", json=body)
    assert response.status_code == 201 and response.json()["status"] == "accepted", response.text
    for punch in (same, changed, reused):
        assert sorted(await stored_anywhere(twins.a.dsn, punch["id"])) == sorted(
            [twins.a.slug, twins.b.slug]
        )
    b_rows = {
        r["id"]: r
        for r in await owner_fetch(
            twins.b.dsn,
            "SELECT id::text, employee, kind, reason FROM punches WHERE tenant = $1",
            twins.b.slug,
        )
    }
    assert (b_rows[changed["id"]]["employee"], b_rows[changed["id"]]["kind"]) == ("e2", "break_end")
    assert b_rows[reused["id"]]["reason"] == "B reuses an id"
    assert await snapshot(twins.a.dsn, twins.a.slug) == a_before


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_b_sockets_punch_for_e1_into_b_only(twins: Twins, subprotocol: str) -> None:
    a_before = await snapshot(twins.a.dsn, twins.a.slug)
    b = twins.b
    sent: list[tuple[dict[str, Any], str]] = []
    for role, token, frames in [
        ("terminal", b.terminal_token, [punch_frame("e1"), punch_frame(badge="b1", kind="out")]),
        ("employee", b.token("employee", "e1", employee="e1"),
         [punch_frame("e1", kind="break_start"), punch_frame(badge="b1", kind="break_end")]),
        ("admin", b.admin_token, [punch_frame("e1"), punch_frame(badge="b1", kind="out")]),
    ]:  # fmt: skip
        client = await b.connect(token, subprotocol)
        for frame in frames:
            ack = await client.punch(frame)
            assert (ack["id"], ack["status"]) == (frame["id"], "accepted"), (role, ack)
            assert not twins.leaks(json.dumps(ack)), ack
            sent.append((frame, role))
        await client.close()

    rows = {
        r["id"]: r
        for r in await owner_fetch(
            b.dsn,
            "SELECT id::text, tenant, employee, site, device, source FROM punches "
            "WHERE id = ANY($1::uuid[])",
            [uuid.UUID(frame["id"]) for frame, _ in sent],
        )
    }
    sources = {"terminal": ("terminal", "door"), "employee": ("mobile", None),
               "admin": ("api", None)}  # fmt: skip
    for frame, role in sent:
        row = rows[frame["id"]]
        assert (row["tenant"], row["employee"], row["site"]) == (b.slug, "e1", "hq"), role
        assert (row["source"], row["device"]) == sources[role]
    assert await snapshot(twins.a.dsn, twins.a.slug) == a_before


async def test_b_reads_of_punches_over_rest_hold_only_bs(twins: Twins) -> None:
    supervisor = twins.b.token("supervisor", "boss", sites=["*"])
    employee = twins.b.token("employee", "e1", employee="e1")
    for token, expected in [
        (twins.b.admin_token, [p["id"] for p in twins.b_punches]),
        (supervisor, [p["id"] for p in twins.b_punches]),
        (employee, [twins.b_punches[0]["id"]]),
    ]:
        for params in ({}, {"employee": "e1"}, {"site": "hq"}, {"from": ago(600), "limit": "1"}):
            response = await twins.b.http.get("/v1/punches", params=params, headers=bearer(token))
            assert response.status_code == 200, response.text
            assert not twins.leaks(response.text), response.text
            seen = [p["id"] for p in response.json()["punches"]]
            if token != employee and params.get("employee") == "e1":
                assert seen == [twins.b_punches[0]["id"]]
            elif "limit" in params:
                assert seen == expected[:1] and ("next" in response.json()) == (len(expected) > 1)
            else:
                assert seen == expected


# -- channels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_subscribing_answers_an_error_and_delivers_nothing_of_a(
    twins: Twins, subprotocol: str
) -> None:
    b = twins.b
    tokens = [
        b.terminal_token,
        b.token("employee", "e1", employee="e1"),
        b.token("supervisor", "boss", sites=["*"]),
        b.admin_token,
    ]
    clients = [await b.connect(token, subprotocol) for token in tokens]
    for client in clients:
        for n, channel in enumerate([*CHANNELS, f"presence:{twins.a.slug}"]):
            await client.send({"type": "subscribe", "channel": channel, "ref": f"s{n}"})
            answer = await client.recv()
            while "ref" not in answer:
                # News of B's own floor, on a channel subscribed before (its door coming
                # online can reach a supervisor after the snapshot that lacked it).
                assert answer["type"] in ("delta", "alert"), answer
                assert not twins.leaks(json.dumps(answer, default=str)), answer
                answer = await client.recv()
            assert answer["ref"] == f"s{n}", answer
            if answer["type"] == "subscribed":
                # B's own floor of the same name: whatever it holds, nothing of A's.
                snapshot = await client.recv()
                assert snapshot["type"] == "snapshot", snapshot
                assert not twins.leaks(json.dumps(snapshot, default=str))
            else:
                assert (answer["type"], answer["code"]) in {
                    ("error", "unknown_channel"),
                    ("error", "forbidden"),
                }, answer
        # Stay subscribed to whatever was allowed, and listen.
    # A's floor changes while B listens: A punches, its admin renames an employee.
    a_door = await twins.a.connect()
    await punch_all(a_door, [punch_frame("e1", ref="a1"), punch_frame(badge="b2", ref="a2")])
    await a_door.close()
    response = await twins.a.http.put(
        "/v1/employees/e3", json={"name": f"{twins.marker} renamed", "site": "hq"}
    )
    assert response.status_code == 200, response.text
    # What the hub queued for B before its pong would come first: there is nothing. (All are
    # asked before any closes: B's own door closing is news on B's `terminals:hq`.)
    for client in clients:
        await client.send({"type": "ping", "ref": "after"})
        frame = await client.recv()
        assert (frame["type"], frame["ref"]) == ("pong", "after"), frame
    for client in clients:
        await client.close()


# -- the token matrix --------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _flip(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] == "A" else "A") + text[index + 1 :]


def signed(
    claims: dict[str, Any], key: str = TEST_SECRET, alg: str = "HS256", kid: str | None = None
) -> str:
    """A JWT signed by hand, so that any `alg` and `kid` can be put in the header."""
    header = {"alg": alg, "typ": "JWT", "kid": kid or key_id(key)}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(key.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(mac)}"


def unsigned(claims: dict[str, Any], **header: Any) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", **header}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def bad_tokens(a: TenantKit, b: TenantKit) -> dict[str, str]:
    """Tokens that must never be accepted, most of them in B's name and one in A's."""
    exp = int((datetime.now(UTC) + timedelta(hours=1)).timestamp())
    admin = {"tenant": b.slug, "role": "admin", "sub": "intruder", "exp": exp}
    good = b.admin_token
    head, payload, signature = good.split(".")
    as_a = _b64(json.dumps({**admin, "tenant": a.slug}).encode())
    return {
        "signature flipped": f"{head}.{payload}.{_flip(signature, len(signature) // 2)}",
        "payload flipped": f"{head}.{_flip(payload, len(payload) // 2)}.{signature}",
        "payload swapped for tenant A": f"{head}.{as_a}.{signature}",
        "header flipped": f"{_flip(head, len(head) // 2)}.{payload}.{signature}",
        "expired": b.issuer.issue(tenant=b.slug, role="admin", sub="x", ttl_s=-5)[0],
        "wrong key": TokenIssuer("not-the-hub-secret-" + "k" * 32).issue(
            tenant=b.slug, role="admin", sub="x"
        )[0],
        "wrong key claiming the hub's kid": signed(
            admin, key="not-the-hub-secret-" + "k" * 32, kid=key_id(TEST_SECRET)
        ),
        "alg none": unsigned(admin),
        "alg none with the hub's kid": unsigned(admin, kid=key_id(TEST_SECRET)),
        "alg none for tenant A": unsigned({**admin, "tenant": a.slug}),
        "HS512 with the hub's key": signed(admin, alg="HS512"),
        "no tenant": signed({k: v for k, v in admin.items() if k != "tenant"}),
        "no role": signed({k: v for k, v in admin.items() if k != "role"}),
        "no sub": signed({k: v for k, v in admin.items() if k != "sub"}),
        "no exp": signed({k: v for k, v in admin.items() if k != "exp"}),
        "terminal without site": signed({**admin, "role": "terminal", "sub": "door"}),
        "employee without employee": signed({**admin, "role": "employee", "sub": "e1"}),
        "unknown role": signed({**admin, "role": "root"}),
        "tenant not a string": signed({**admin, "tenant": [b.slug, a.slug]}),
        "sites not a list": signed({**admin, "role": "supervisor", "sites": "*"}),
        "ver zero": signed({**admin, "role": "terminal", "sub": "door", "site": "hq", "ver": 0}),
        "not a jwt": "garbage",
        "empty segments": "..",
    }


def route_table() -> list[tuple[str, str, Any]]:
    """Every REST route with an authenticated caller (method, path, a body that would do)."""
    return [
        ("GET", "/v1/sites", None),
        ("GET", "/v1/sites/hq", None),
        ("PUT", "/v1/sites/hq", {"name": "Taken over", "timezone": "UTC"}),
        ("GET", "/v1/employees", None),
        ("GET", "/v1/employees/e1", None),
        ("PUT", "/v1/employees/e1", {"name": "Taken over", "site": "hq"}),
        ("DELETE", "/v1/employees/e1", None),
        ("GET", "/v1/devices", None),
        ("PUT", "/v1/devices/door", {"site": "hq", "name": "Taken over"}),
        ("DELETE", "/v1/devices/door", None),
        ("POST", "/v1/tokens", {"role": "admin", "sub": "taken-over"}),
        ("GET", "/v1/punches", None),
        ("POST", "/v1/punches", correction(employee="e1")),
        ("GET", "/v1/audit", None),
    ]


async def test_bad_tokens_are_401_on_every_route_and_change_nothing(twins: Twins) -> None:
    before = [await snapshot(k.dsn, k.slug) for k in (twins.a, twins.b)]
    async with httpx.AsyncClient(base_url=twins.b.base_url, timeout=30) as anonymous:
        # The hand-made tokens are refused for what is wrong with them: made the same way
        # with nothing wrong, one works.
        control = signed({"tenant": twins.b.slug, "role": "admin", "sub": "x", "exp": 2**40})
        assert (await anonymous.get("/v1/sites", headers=bearer(control))).status_code == 200
        for name, token in bad_tokens(twins.a, twins.b).items():
            for method, path, body in route_table():
                response = await anonymous.request(method, path, json=body, headers=bearer(token))
                assert response.status_code == 401, (name, method, path, response.text)
                assert_error(response, 401, "unauthorized")
                assert not twins.leaks(response.text), (name, response.text)
    assert [await snapshot(k.dsn, k.slug) for k in (twins.a, twins.b)] == before


@pytest.mark.parametrize(
    ("role", "claims", "method", "path", "body"),
    [
        ("terminal", {"site": "hq"}, "PUT", "/v1/sites/hq", {"name": "X", "timezone": "UTC"}),
        ("terminal", {"site": "hq"}, "PUT", "/v1/employees/e1", {"name": "X", "site": "hq"}),
        ("terminal", {"site": "hq"}, "DELETE", "/v1/employees/e1", None),
        ("terminal", {"site": "hq"}, "DELETE", "/v1/devices/door", None),
        ("terminal", {"site": "hq"}, "POST", "/v1/tokens", {"role": "admin", "sub": "me"}),
        ("terminal", {"site": "hq"}, "GET", "/v1/audit", None),
        ("terminal", {"site": "hq"}, "POST", "/v1/punches", None),
        ("supervisor", {"sites": ["*"]}, "POST", "/v1/tokens", {"role": "admin", "sub": "me"}),
        ("supervisor", {"sites": ["*"]}, "DELETE", "/v1/employees/e1", None),
        ("supervisor", {"sites": ["*"]}, "DELETE", "/v1/devices/door", None),
        ("supervisor", {"sites": ["*"]}, "PUT", "/v1/devices/door", {"site": "hq"}),
        ("supervisor", {"sites": ["*"]}, "GET", "/v1/audit", None),
        ("employee", {"employee": "e1"}, "GET", "/v1/sites", None),
        ("employee", {"employee": "e1"}, "POST", "/v1/punches", None),
        ("employee", {"employee": "e1"}, "POST", "/v1/tokens", {"role": "employee", "sub": "e1"}),
        ("employee", {"employee": "e1"}, "DELETE", "/v1/employees/e1", None),
    ],
)
async def test_the_wrong_role_is_403_and_changes_nothing(
    twins: Twins, role: str, claims: dict[str, Any], method: str, path: str, body: Any
) -> None:
    before = [await snapshot(k.dsn, k.slug) for k in (twins.a, twins.b)]
    if body is None and method == "POST":
        body = correction(employee="e1")
    token = twins.b.token(role, "someone", **claims)
    response = await twins.b.http.request(method, path, json=body, headers=bearer(token))
    assert_error(response, 403, "forbidden")
    assert [await snapshot(k.dsn, k.slug) for k in (twins.a, twins.b)] == before


async def hello_is_refused(ws_url: str, subprotocol: str, token: str) -> str:
    """Send `hello` and, without waiting, a punch; expect `bad_token`, close 4001. Returns the
    punch's id, which must not be stored."""
    offered: Any = [subprotocol]
    client = Client(
        await websockets.connect(ws_url, subprotocols=offered, open_timeout=10), subprotocol
    )
    frame = punch_frame("e1", ref="p")
    await client.send({"type": "hello", "token": token, "ref": "h"})
    await client.send(frame)
    error = await client.recv()
    assert (error["type"], error.get("code"), error.get("ref")) == ("error", "bad_token", "h"), (
        error
    )
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    return str(frame["id"])


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_bad_tokens_on_the_socket_get_bad_token_and_4001_and_store_nothing(
    twins: Twins, subprotocol: str
) -> None:
    before = [await snapshot(k.dsn, k.slug) for k in (twins.a, twins.b)]
    refused = []
    for name, token in bad_tokens(twins.a, twins.b).items():
        try:
            refused.append(await hello_is_refused(twins.b.ws_url, subprotocol, token))
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    for punch_id in refused:
        assert await stored_anywhere(twins.a.dsn, punch_id) == []
    assert [await snapshot(k.dsn, k.slug) for k in (twins.a, twins.b)] == before


# -- a tenant that does not exist --------------------------------------------------------------


async def nothing_of(dsn: str, tenant: str) -> dict[str, list[dict[str, Any]]]:
    found = await snapshot(dsn, tenant)
    return {table: rows for table, rows in found.items() if rows}


async def test_a_token_of_a_tenant_that_does_not_exist_is_401_on_every_route(
    twins: Twins,
) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:10]}"
    token = twins.b.issuer.issue(tenant=ghost, role="admin", sub="nobody")[0]
    answers = []
    # No keep-alive: a connection the hub drops after a 500 must not fail the next request.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=twins.b.base_url, timeout=30, limits=fresh) as http:
        for method, path, body in route_table():
            try:
                response = await http.request(method, path, json=body, headers=bearer(token))
            except httpx.TransportError as exc:
                answers.append(f"{method} {path} -> {type(exc).__name__}")
                continue
            answers.append(f"{method} {path} -> {response.status_code}")
            if response.status_code == 401:
                assert_error(response, 401, "unauthorized")
    # Gathered first, so that the failure lists every route at once.
    wrong = [answer for answer in answers if not answer.endswith("-> 401")]
    assert not wrong, "not refused with 401:\n" + "\n".join(wrong)
    assert await nothing_of(twins.a.dsn, ghost) == {}


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_a_token_of_a_tenant_that_does_not_exist_gets_bad_token_on_the_socket(
    twins: Twins, subprotocol: str
) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:10]}"
    token = twins.b.issuer.issue(tenant=ghost, role="terminal", sub="door", site="hq")[0]
    punch_id = await hello_is_refused(twins.b.ws_url, subprotocol, token)
    assert await stored_anywhere(twins.a.dsn, punch_id) == []
    assert await nothing_of(twins.a.dsn, ghost) == {}


async def test_twin_terminals_punching_at_once_each_hear_only_their_own_acks(
    twins: Twins,
) -> None:
    """A's and B's terminals punch for the same employee ids at the same time; each hears
    exactly its own acks, and each punch lands in its own tenant."""
    a_frames = [punch_frame(f"e{n % 3 + 1}", ref=f"a{n}") for n in range(30)]
    b_frames = [punch_frame(f"e{n % 3 + 1}", ref=f"b{n}") for n in range(30)]

    async def run(kit: TenantKit, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        client = await kit.connect()
        for frame in frames:
            await client.send(frame)
        acks = [await client.recv() for _ in frames]
        await client.close()
        return acks

    a_acks, b_acks = await asyncio.gather(run(twins.a, a_frames), run(twins.b, b_frames))
    for frames, acks, kit in ((a_frames, a_acks, twins.a), (b_frames, b_acks, twins.b)):
        assert sorted(a["ref"] for a in acks) == sorted(f["ref"] for f in frames)
        assert {a["status"] for a in acks} == {"accepted"}
        for frame in frames:
            assert await stored_anywhere(kit.dsn, frame["id"]) == [kit.slug]
