"""Row-level security (migration 0004), checked in SQL as the hub's application role."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from hub import store
from workers import persist
from workers.persist import PunchRequest

pytestmark = pytest.mark.postgres

TWINS = ("rls-a", "rls-b")


@pytest.fixture
async def twins(owner: asyncpg.Connection) -> AsyncIterator[tuple[str, str]]:
    """Two tenants with the same site, employee and device ids, and one punch each."""
    a, b = (f"{twin}-{uuid.uuid4().hex[:8]}" for twin in TWINS)
    now = datetime.now(UTC)
    for slug in (a, b):
        await store.ensure_tenant(owner, slug, slug, "UTC")
        await owner.execute(
            "INSERT INTO sites (tenant, id, name, timezone) VALUES ($1, 'hq', 'HQ', 'UTC')", slug
        )
        await owner.execute(
            """INSERT INTO employees (tenant, id, name, site, badge)
               VALUES ($1, 'e1', 'E', 'hq', 'b1')""",
            slug,
        )
        await owner.execute(
            "INSERT INTO devices (tenant, id, site, name) VALUES ($1, 'door', 'hq', 'Door')", slug
        )
        await owner.execute(
            """INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, source)
               VALUES ($1, $2, 'e1', 'in', $3, $3, 'hq', 'terminal')""",
            slug,
            uuid.uuid4(),
            now,
        )
        await owner.execute(
            """INSERT INTO schedules (tenant, employee, site, starts_at, ends_at)
               VALUES ($1, 'e1', 'hq', $2::timestamptz, $2::timestamptz + interval '8 hours')""",
            slug,
            now,
        )
        await owner.execute(
            """INSERT INTO alerts (tenant, id, kind, severity, employee, site, at, message)
               VALUES ($1, $2, 'rapid_repeat', 'info', 'e1', 'hq', $3, 'again')""",
            slug,
            uuid.uuid4(),
            now,
        )
        await store.record_audit(
            owner,
            tenant=slug,
            actor="admin",
            role="admin",
            action="site.put",
            target="site:hq",
            ip=None,
            user_agent=None,
            before=None,
            after={"id": "hq"},
        )
    yield a, b


@pytest.fixture
async def app_conn(owner: asyncpg.Connection, database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection exactly as the hub's pool makes them."""
    pool = await store.create_pool(database, min_size=1, max_size=1)
    async with pool.acquire() as conn:
        yield conn
    await pool.close()


async def tenant_tables(owner: asyncpg.Connection) -> list[str]:
    rows = await owner.fetch(
        """SELECT c.table_name FROM information_schema.columns c
             JOIN information_schema.tables t USING (table_schema, table_name)
            WHERE c.table_schema = 'public' AND c.column_name = 'tenant'
              AND t.table_type = 'BASE TABLE'
            ORDER BY 1"""
    )
    return [row["table_name"] for row in rows]


async def test_every_tenant_table_has_row_level_security(owner: asyncpg.Connection) -> None:
    tables = await tenant_tables(owner)
    assert {
        "sites",
        "employees",
        "devices",
        "punches",
        "audit_log",
        "schedules",
        "alerts",
    } <= set(tables)
    for table in [*tables, "tenants"]:
        enabled = await owner.fetchval(
            "SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass", table
        )
        policies = await owner.fetchval(
            "SELECT count(*) FROM pg_policies WHERE tablename = $1 AND $2 = ANY(roles)",
            table,
            store.APP_ROLE,
        )
        assert enabled and policies, f"{table} is not under row-level security"


async def test_the_application_role_cannot_bypass_it(
    owner: asyncpg.Connection, app_conn: asyncpg.Connection
) -> None:
    assert await app_conn.fetchval("SELECT current_user") == store.APP_ROLE
    role = await owner.fetchrow(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", store.APP_ROLE
    )
    assert role is not None and not role["rolsuper"] and not role["rolbypassrls"]
    owned = await owner.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = $1",
        store.APP_ROLE,
    )
    assert owned == 0


async def test_without_a_tenant_nothing_is_visible(
    owner: asyncpg.Connection, app_conn: asyncpg.Connection, twins: tuple[str, str]
) -> None:
    for table in [*await tenant_tables(owner), "tenants"]:
        assert await app_conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_one_tenant_sees_and_changes_only_its_own_rows(
    owner: asyncpg.Connection, app_conn: asyncpg.Connection, twins: tuple[str, str]
) -> None:
    a, b = twins
    async with app_conn.transaction():
        await app_conn.execute("SELECT set_config('attendance.tenants', $1, true)", a)
        for table in await tenant_tables(owner):
            tenants = {r["tenant"] for r in await app_conn.fetch(f"SELECT tenant FROM {table}")}
            assert tenants == {a}, table
        assert [r["id"] for r in await app_conn.fetch("SELECT id FROM tenants")] == [a]
        # Even naming B's rows outright finds nothing to read, change or delete.
        assert await app_conn.fetchval("SELECT count(*) FROM employees WHERE tenant = $1", b) == 0
        assert await app_conn.execute("UPDATE employees SET name = 'x' WHERE tenant = $1", b) == (
            "UPDATE 0"
        )
        assert await app_conn.execute("DELETE FROM punches WHERE tenant = $1", b) == "DELETE 0"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_conn.transaction():
            await app_conn.execute("SELECT set_config('attendance.tenants', $1, true)", a)
            await app_conn.execute(
                "INSERT INTO devices (tenant, id, site, name) VALUES ($1, 'new', 'hq', 'x')", b
            )
    # B's rows are untouched.
    assert await owner.fetchval("SELECT name FROM employees WHERE tenant = $1", b) == "E"
    assert await owner.fetchval("SELECT count(*) FROM punches WHERE tenant = $1", b) == 1


async def test_a_transaction_scoped_tenant_ends_with_the_transaction(
    app_conn: asyncpg.Connection, twins: tuple[str, str]
) -> None:
    a, _ = twins
    async with app_conn.transaction():
        await app_conn.execute("SELECT set_config('attendance.tenants', $1, true)", a)
        assert await app_conn.fetchval("SELECT count(*) FROM sites") == 1
    assert await app_conn.fetchval("SELECT count(*) FROM sites") == 0


async def test_the_pool_forgets_a_session_tenant_on_release(
    owner: asyncpg.Connection, database: str, twins: tuple[str, str]
) -> None:
    """The punch batcher names its tenants for the session; no later borrower inherits them."""
    a, b = twins
    pool = await store.create_pool(database, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await store.act_for_tenants(conn, [b, a, a])
            assert await conn.fetchval("SELECT count(*) FROM employees") == 2
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_user") == store.APP_ROLE
            assert await conn.fetchval("SELECT count(*) FROM employees") == 0
    finally:
        await pool.close()


async def test_the_batch_statement_probes_employees_by_index_under_the_policies(
    owner: asyncpg.Connection, app_conn: asyncpg.Connection
) -> None:
    """A policy written as `tenant = ANY (...)` made the planner scan `employees` per punch."""
    slug = f"rls-plan-{uuid.uuid4().hex[:8]}"
    await store.ensure_tenant(owner, slug, slug, "UTC")
    await owner.execute(
        "INSERT INTO sites (tenant, id, name, timezone) VALUES ($1, 'hq', 'HQ', 'UTC')", slug
    )
    await owner.execute(
        """INSERT INTO employees (tenant, id, name, site)
           SELECT $1, 'e' || n, 'E', 'hq' FROM generate_series(1, 1000) AS n""",
        slug,
    )
    now = datetime.now(UTC)
    batch = [
        PunchRequest(slug, uuid.uuid4(), "in", now, now, "terminal", employee=f"e{n}", site="hq")
        for n in range(1, 513)
    ]
    await store.act_for_tenants(app_conn, [slug])
    plan = await app_conn.fetchval(
        f"EXPLAIN (FORMAT JSON) {persist._COMMIT_SQL}", batch, persist.GEOFENCE_ACCURACY_M
    )
    scans = [
        (node["Node Type"], node.get("Index Name"))
        for node in _nodes(json.loads(plan)[0]["Plan"])
        if node.get("Relation Name") == "employees"
    ]
    assert scans and all(kind == "Index Scan" for kind, _ in scans), scans


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)
