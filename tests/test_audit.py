"""The audit hash chain, `audit verify`, redaction and `GET /v1/audit`, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub import audit, store
from hub.migrate import bundled_migrations, migrate
from tests.conftest import TEST_SECRET
from tests.support import HubProcess, TenantKit, provisioned_tenant

pytestmark = pytest.mark.postgres

# The rows `provisioned_tenant` leaves: the site, three employees and the terminal.
PROVISIONED = [
    ("site.put", "site:hq"),
    ("employee.put", "employee:e1"),
    ("employee.put", "employee:e2"),
    ("employee.put", "employee:e3"),
    ("device.put", "device:door"),
]


async def audit_verify(dsn: str, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run `attendance-hub audit verify` as an operator would; exit code, JSON lines, stderr."""
    env = {**os.environ, "ATTENDANCE_DATABASE_URL": dsn, "ATTENDANCE_SECRET": TEST_SECRET}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub.cli",
        "audit",
        "verify",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return (
        process.returncode,
        [json.loads(line) for line in out.decode().splitlines()],
        err.decode(),
    )


async def chain(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM audit_log WHERE tenant = $1 ORDER BY seq",
        tenant,
    )


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await store.init_connection(conn)
    return conn


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def scratch(scratch_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a migrated database of its own, for tests that verify every tenant."""
    conn = await connect(scratch_db)
    await migrate(conn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def other(hub_process: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    async with provisioned_tenant(hub_process.base_url, database, TEST_SECRET, "o") as kit:
        yield kit


async def append(conn: asyncpg.Connection, tenant: str, n: int, **fields: Any) -> int:
    """Append an audit row the way the REST handlers do, without a request."""
    row = {
        "actor": "ops",
        "role": "admin",
        "action": "site.put",
        "target": f"site:s{n}",
        "ip": "10.0.0.1",
        "user_agent": "test",
        "before": None,
        "after": {"id": f"s{n}", "name": f"Site {n}"},
    }
    row.update(fields)
    return await store.record_audit(conn, tenant=tenant, **row)


# -- the chain as REST writes it -----------------------------------------------------------


async def test_rest_changes_chain_per_tenant_even_when_concurrent(
    tenant: TenantKit, other: TenantKit, database: str, db: asyncpg.Connection
) -> None:
    # Open the connections first so that the changes really arrive together.
    await asyncio.gather(*(tenant.http.get("/healthz") for _ in range(18)))
    responses = await asyncio.gather(
        *(
            tenant.http.put(f"/v1/employees/c{n}", json={"name": f"C {n}", "site": "hq"})
            for n in range(12)
        ),
        *(
            tenant.http.post("/v1/tokens", json={"role": "admin", "sub": f"ops{n}"})
            for n in range(6)
        ),
        *(
            other.http.put(f"/v1/sites/s{n}", json={"name": "S", "timezone": "UTC"})
            for n in range(4)
        ),
    )
    assert [r.status_code for r in responses] == [201] * 22, [r.text for r in responses]

    for kit, expected in ((tenant, 5 + 18), (other, 5 + 4)):
        rows = await chain(db, kit.slug)
        assert [r["seq"] for r in rows] == list(range(1, expected + 1))
        # One line of descent: each row links to the one before it, none is linked twice.
        assert [r["prev_hash"] for r in rows] == [audit.GENESIS] + [r["hash"] for r in rows[:-1]]
        assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
        code, reports, err = await audit_verify(database, "--tenant", kit.slug)
        assert code == 0, err
        assert reports == [
            {
                "tenant": kit.slug,
                "ok": True,
                "entries": expected,
                "head_seq": expected,
                "head_hash": rows[-1]["hash"],
            }
        ]


async def test_concurrent_appends_on_many_connections_never_fork(scratch_db: str) -> None:
    conn = await connect(scratch_db)
    pool = await store.create_pool(scratch_db, min_size=8, max_size=8)
    try:
        await migrate(conn)
        for slug in ("a", "b"):
            await store.ensure_tenant(conn, slug, slug, "UTC")

        async def one(n: int) -> int:
            # As a REST handler appends: the application role, in its tenant's transaction.
            tenant = "ab"[n % 2]
            async with store.tenant_transaction(pool, tenant) as pooled:
                return await append(pooled, tenant, n)

        seqs = await asyncio.gather(*(one(n) for n in range(200)))
        assert sorted(seqs) == sorted([*range(1, 101), *range(1, 101)])
        for slug in ("a", "b"):
            report = await store.verify_audit(conn, slug)
            assert report.ok and report.entries == 100, report
    finally:
        await pool.close()
        await conn.close()


# -- tampering -----------------------------------------------------------------------------

TAMPERING = {
    "after edited": (
        """UPDATE audit_log SET after = jsonb_set(after, '{name}', '"Mallory"')
            WHERE tenant = $1 AND seq = 3""",
        3,
        "edited",
    ),
    "actor edited": (
        "UPDATE audit_log SET actor = 'someone-else' WHERE tenant = $1 AND seq = 2",
        2,
        "edited",
    ),
    "time edited": (
        "UPDATE audit_log SET at = at - interval '1 day' WHERE tenant = $1 AND seq = 4",
        4,
        "edited",
    ),
    "middle row deleted": ("DELETE FROM audit_log WHERE tenant = $1 AND seq = 3", 3, "gap"),
    "oldest row deleted": ("DELETE FROM audit_log WHERE tenant = $1 AND seq = 1", 1, "gap"),
    "newest row deleted": (
        "DELETE FROM audit_log WHERE tenant = $1 AND seq = 5",
        5,
        "head_mismatch",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
async def test_verify_names_the_tenant_and_the_first_bad_seq(
    case: str, tenant: TenantKit, database: str, db: asyncpg.Connection
) -> None:
    sql, seq, problem = TAMPERING[case]
    assert [(r["action"], r["target"]) for r in await chain(db, tenant.slug)] == PROVISIONED
    code, reports, _ = await audit_verify(database, "--tenant", tenant.slug)
    assert code == 0 and reports[0]["ok"] is True

    assert await db.execute(sql, tenant.slug) in ("UPDATE 1", "DELETE 1")
    code, reports, _ = await audit_verify(database, "--tenant", tenant.slug)
    assert code == 1
    [report] = reports
    assert (report["tenant"], report["ok"], report["seq"], report["problem"]) == (
        tenant.slug,
        False,
        seq,
        problem,
    )
    assert isinstance(report["message"], str) and report["message"]


async def test_a_row_rehashed_after_an_edit_breaks_the_link_to_the_next(
    tenant: TenantKit, db: asyncpg.Connection
) -> None:
    # Someone who knows the encoding edits row 2 and gives it a matching digest and hash.
    row = (await chain(db, tenant.slug))[1]
    after = {**row["after"], "name": "Mallory"}
    digest = audit.content_digest(row["content_salt"], row["before"], after)
    entry = audit.Entry(
        tenant=tenant.slug,
        seq=2,
        at=row["at"],
        actor=row["actor"],
        role=row["role"],
        action=row["action"],
        target=row["target"],
        ip=row["ip"],
        user_agent=row["user_agent"],
        content_digest=digest,
    )
    await db.execute(
        """UPDATE audit_log SET after = $2, content_digest = $3, hash = $4
            WHERE tenant = $1 AND seq = 2""",
        tenant.slug,
        after,
        digest,
        entry.hash(row["prev_hash"]),
    )
    report = await store.verify_audit(db, tenant.slug)
    assert (report.ok, report.seq, report.problem) == (False, 3, "broken_link")


async def test_verify_checks_every_tenant_and_reports_each(
    scratch: asyncpg.Connection, scratch_db: str
) -> None:
    for slug, rows in (("alpha", 3), ("beta", 4), ("gamma", 0)):
        await store.ensure_tenant(scratch, slug, slug, "UTC")
        for n in range(rows):
            await append(scratch, slug, n)
    code, reports, err = await audit_verify(scratch_db)
    assert code == 0, err
    assert [(r["tenant"], r["ok"], r["entries"]) for r in reports] == [
        ("alpha", True, 3),
        ("beta", True, 4),
        ("gamma", True, 0),
    ]
    assert reports[2]["head_seq"] == 0

    await scratch.execute(
        "UPDATE audit_log SET role = 'employee' WHERE tenant = 'beta' AND seq = 2"
    )
    code, reports, _ = await audit_verify(scratch_db)
    assert code == 1
    assert [(r["tenant"], r["ok"], r.get("seq"), r.get("problem")) for r in reports] == [
        ("alpha", True, None, None),
        ("beta", False, 2, "edited"),
        ("gamma", True, None, None),
    ]


async def test_verify_refuses_unknown_tenants_and_unmigrated_databases(
    scratch_db: str, database: str
) -> None:
    code, reports, err = await audit_verify(database, "--tenant", "no-such-tenant")
    assert (code, reports) == (2, []) and "no tenant 'no-such-tenant'" in err
    code, reports, err = await audit_verify(scratch_db)
    assert (code, reports) == (2, []) and "attendance-hub migrate" in err


# -- redaction -----------------------------------------------------------------------------


async def test_redaction_removes_personal_data_and_the_chain_still_verifies(
    tenant: TenantKit, database: str, db: asyncpg.Connection
) -> None:
    response = await tenant.http.put(
        "/v1/employees/e1", json={"name": "Ada Lovelace", "site": "hq", "badge": "b9"}
    )
    assert response.status_code == 200
    changed = await store.redact_audit(
        db, tenant.slug, target="employee:e1", fields=("name", "badge")
    )
    assert changed == 2

    rows = {r["seq"]: r for r in await chain(db, tenant.slug)}
    assert rows[2]["after"] == {
        "id": "e1",
        "name": audit.REDACTED,
        "site": "hq",
        "badge": audit.REDACTED,
    }
    assert rows[6]["before"] == rows[2]["after"]
    assert rows[6]["after"] == {
        "id": "e1",
        "name": audit.REDACTED,
        "site": "hq",
        "badge": audit.REDACTED,
    }
    for seq, row in rows.items():
        redacted = seq in (2, 6)
        assert (row["redacted_at"] is not None, row["content_salt"] is None) == (redacted, redacted)
    everything = json.dumps([dict(r) for r in rows.values()], default=str)
    assert "Employee 1" not in everything and "Ada Lovelace" not in everything
    assert "Employee 2" in everything
    assert await store.redact_audit(db, tenant.slug, target="employee:e1", fields=("name",)) == 0

    code, reports, err = await audit_verify(database, "--tenant", tenant.slug)
    assert code == 0 and reports[0]["entries"] == 6, (err, reports)

    # Redaction skips only the before/after check: the rest of a redacted row is still hashed.
    await db.execute(
        "UPDATE audit_log SET actor = 'someone-else' WHERE tenant = $1 AND seq = 6", tenant.slug
    )
    code, reports, _ = await audit_verify(database, "--tenant", tenant.slug)
    assert (code, reports[0]["seq"], reports[0]["problem"]) == (1, 6, "edited")


async def test_redacting_inside_a_transaction_that_rolls_back_changes_nothing(
    tenant: TenantKit, db: asyncpg.Connection
) -> None:
    before = await chain(db, tenant.slug)
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await store.redact_audit(db, tenant.slug, target="employee:e2", fields=("name",))
            raise RuntimeError("erasure failed later on")
    assert await chain(db, tenant.slug) == before


# -- the encoding --------------------------------------------------------------------------

# jsonb refuses NUL characters, and lone surrogates are not text.
JSON_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSON_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


def test_digests_survive_a_round_trip_through_jsonb(database: str) -> None:
    """The digest computed before the insert is the one verify computes from what comes back."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(connect(database))
    try:

        @settings(max_examples=300, deadline=None)
        @given(JSON_VALUES)
        def round_trip(value: Any) -> None:
            back = loop.run_until_complete(conn.fetchval("SELECT $1::jsonb", value))
            assert audit.content_digest(b"salt", back, None) == audit.content_digest(
                b"salt", value, None
            )

        round_trip()
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


@given(st.dictionaries(st.text(max_size=5), st.integers(), max_size=6))
def test_canonical_json_does_not_depend_on_key_order(value: dict[str, int]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert audit.canonical_json(value) == audit.canonical_json(reordered)


def make_chain(length: int) -> list[audit.StoredRow]:
    rows = []
    prev = audit.GENESIS
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, length + 1):
        after = {"id": f"e{seq}", "name": f"Name {seq}"}
        entry = audit.Entry(
            tenant="t",
            seq=seq,
            at=start + timedelta(seconds=seq),
            actor="ops",
            role="admin",
            action="employee.put",
            target=f"employee:e{seq}",
            ip=None,
            user_agent=None,
            content_digest=audit.content_digest(b"s", None, after),
        )
        row_hash = entry.hash(prev)
        rows.append(audit.StoredRow(entry, None, after, b"s", prev, row_hash, False))
        prev = row_hash
    return rows


def run_verifier(rows: list[audit.StoredRow], head: audit.Head) -> audit.ChainReport:
    verifier = audit.ChainVerifier("t", head)
    for row in rows:
        if not verifier.feed(row):
            break
    return verifier.finish()


@given(st.integers(min_value=1, max_value=12), st.data())
def test_the_verifier_finds_the_first_tampered_row(length: int, data: st.DataObject) -> None:
    rows = make_chain(length)
    head = audit.Head(length, rows[-1].hash or "", 0, audit.GENESIS)
    assert run_verifier(rows, head).ok
    index = data.draw(st.integers(min_value=0, max_value=length - 1))
    seq = index + 1
    kind = data.draw(st.sampled_from(["content", "field", "delete", "redacted content"]))
    row = rows[index]
    if kind == "content":
        rows[index] = replace(row, after={"id": "x"})
        expected: tuple[int, str] = (seq, "edited")
    elif kind == "field":
        rows[index] = replace(row, entry=replace(row.entry, actor="mallory"))
        expected = (seq, "edited")
    elif kind == "redacted content":
        # The trade-off of redaction: a redacted row's before/after are no longer checked.
        rows[index] = replace(row, after={"id": "x"}, content_salt=None, redacted=True)
        assert run_verifier(rows, head).ok
        return
    else:
        del rows[index]
        expected = (seq, "head_mismatch" if seq == length else "gap")
    report = run_verifier(rows, head)
    assert (report.seq, report.problem) == expected


def test_a_chain_verifies_from_its_anchor() -> None:
    rows = make_chain(6)
    anchor = rows[2]
    head = audit.Head(6, rows[-1].hash or "", anchor.entry.seq, anchor.hash or "")
    assert run_verifier(rows[3:], head).ok
    report = run_verifier(rows[4:], head)
    assert (report.seq, report.problem) == (4, "gap")
    wrong_anchor = replace(head, anchor_hash=audit.GENESIS)
    report = run_verifier(rows[3:], wrong_anchor)
    assert (report.seq, report.problem) == (4, "broken_link")


def test_a_head_that_is_missing_or_behind_is_a_mismatch() -> None:
    rows = make_chain(3)
    report = run_verifier(rows, audit.Head(2, rows[1].hash or "", 0, audit.GENESIS))
    assert (report.seq, report.problem) == (3, "head_mismatch")
    verifier = audit.ChainVerifier("t", None)
    for row in rows:
        verifier.feed(row)
    report = verifier.finish()
    assert (report.seq, report.problem) == (1, "head_mismatch")
    assert audit.ChainVerifier("t", None).finish().ok


# -- rows from before the chain -------------------------------------------------------------


async def test_rows_written_before_the_chain_are_renumbered_and_kept_outside_it(
    scratch_db: str,
) -> None:
    conn = await connect(scratch_db)
    try:
        old, new = bundled_migrations()[:2], bundled_migrations()[2:]
        await migrate(conn, old)
        for slug in ("a", "b"):
            await store.ensure_tenant(conn, slug, slug, "UTC")
        # The old identity counted across tenants: a gets 1, 3, 4 and b gets 2, 5.
        for slug, target in (("a", "x1"), ("b", "y1"), ("a", "x2"), ("a", "x3"), ("b", "y2")):
            await conn.execute(
                """INSERT INTO audit_log (tenant, actor, role, action, target, after)
                   VALUES ($1, 'ops', 'admin', 'site.put', $2, '{}')""",
                slug,
                target,
            )
        await migrate(conn, new)
        rows = await conn.fetch("SELECT tenant, seq, target FROM audit_log ORDER BY tenant, seq")
        assert [tuple(r) for r in rows] == [
            ("a", 1, "x1"),
            ("a", 2, "x2"),
            ("a", 3, "x3"),
            ("b", 1, "y1"),
            ("b", 2, "y2"),
        ]
        assert await append(conn, "a", 4) == 4
        assert await append(conn, "b", 3) == 3
        for slug in ("a", "b"):
            report = await store.verify_audit(conn, slug)
            assert report.ok and report.entries == 1, report
    finally:
        await conn.close()


# -- GET /v1/audit -------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


async def test_admins_read_the_log_oldest_first(tenant: TenantKit, db: asyncpg.Connection) -> None:
    response = await tenant.http.get("/v1/audit")
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["entries"]
    entries = body["entries"]
    assert [(e["action"], e["target"]) for e in entries] == PROVISIONED
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    stored = await chain(db, tenant.slug)
    assert [e["hash"] for e in entries] == [r["hash"] for r in stored]
    first = entries[1]
    assert sorted(first) == sorted(
        [
            "seq",
            "at",
            "actor",
            "role",
            "action",
            "target",
            "ip",
            "user_agent",
            "before",
            "after",
            "hash",
        ]
    )
    assert (first["actor"], first["role"], first["ip"]) == ("test-admin", "admin", "127.0.0.1")
    assert first["before"] is None
    assert first["after"] == {"id": "e1", "name": "Employee 1", "site": "hq", "badge": "b1"}
    assert first["at"].endswith("Z")
    at = datetime.fromisoformat(first["at"].replace("Z", "+00:00"))
    assert abs(at - stored[1]["at"]) < timedelta(milliseconds=1)


async def test_the_audit_cursor_pages_through_every_entry(tenant: TenantKit) -> None:
    for n in range(4):
        response = await tenant.http.put(f"/v1/sites/s{n}", json={"name": "S", "timezone": "UTC"})
        assert response.status_code == 201
    pages = []
    query: dict[str, Any] = {"limit": 2}
    while True:
        body = (await tenant.http.get("/v1/audit", params=query)).json()
        pages.append([e["seq"] for e in body["entries"]])
        if "next" not in body:
            break
        assert body["next"] == body["entries"][-1]["seq"]
        query["after"] = body["next"]
    assert pages == [[1, 2], [3, 4], [5, 6], [7, 8], [9]]
    everything = (await tenant.http.get("/v1/audit", params={"limit": 1000})).json()
    assert [e["seq"] for e in everything["entries"]] == list(range(1, 10))
    assert "next" not in everything


async def test_the_log_filters_by_action_target_and_time(
    tenant: TenantKit, db: asyncpg.Connection
) -> None:
    async def seqs(**query: Any) -> list[int]:
        response = await tenant.http.get("/v1/audit", params=query)
        assert response.status_code == 200, response.text
        return [e["seq"] for e in response.json()["entries"]]

    assert await seqs(action="employee.put") == [2, 3, 4]
    assert await seqs(target="employee:e2") == [3]
    assert await seqs(action="employee.put", after=2, limit=1) == [3]
    assert await seqs(action="token.issue") == []
    fourth = (await chain(db, tenant.slug))[3]["at"]
    assert await seqs(since=fourth.isoformat()) == [4, 5]
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert await seqs(since=later) == []
    assert await seqs(since="2000-01-01T00:00:00+01:00") == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"after": "-1"},
        {"after": "MjAyNg"},
        {"since": "yesterday"},
        {"since": "2026-01-01T00:00:00"},
        {"action": ""},
        {"target": "x" * 201},
    ],
)
async def test_bad_audit_queries_are_400(tenant: TenantKit, query: dict[str, str]) -> None:
    assert_error(await tenant.http.get("/v1/audit", params=query), 400, "invalid")


async def test_only_admins_read_the_log(tenant: TenantKit) -> None:
    for token in (
        tenant.token("supervisor", "boss", sites=["*"]),
        tenant.terminal_token,
        tenant.token("employee", "e1", employee="e1"),
    ):
        response = await tenant.http.get("/v1/audit", headers={"authorization": f"Bearer {token}"})
        assert_error(response, 403, "forbidden")
    async with httpx.AsyncClient(base_url=tenant.base_url) as anonymous:
        assert_error(await anonymous.get("/v1/audit"), 401, "unauthorized")
        response = await anonymous.get("/v1/audit", headers={"authorization": "Bearer nonsense"})
        assert_error(response, 401, "unauthorized")


async def test_an_admin_reads_only_its_own_tenants_log(tenant: TenantKit, other: TenantKit) -> None:
    response = await tenant.http.put("/v1/sites/only-here", json={"name": "X", "timezone": "UTC"})
    assert response.status_code == 201
    mine = (await tenant.http.get("/v1/audit")).json()["entries"]
    theirs = (await other.http.get("/v1/audit")).json()["entries"]
    assert [(e["action"], e["target"]) for e in theirs] == PROVISIONED
    assert {e["hash"] for e in mine}.isdisjoint(e["hash"] for e in theirs)
    response = await other.http.get("/v1/audit", params={"target": "site:only-here"})
    assert response.json() == {"entries": []}
