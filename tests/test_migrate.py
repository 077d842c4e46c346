"""Schema migrations (hub/migrate.py) against fresh throwaway databases on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from hub.migrate import Migration, bundled_migrations, migrate

pytestmark = pytest.mark.postgres

FAKE = [
    Migration(1, "0001_shifts.sql", "CREATE TABLE shifts (id integer PRIMARY KEY, site text)"),
    # Each step needs the one before it, so running them out of order fails loudly.
    Migration(
        2,
        "0002_shift_notes.sql",
        "CREATE TABLE shift_notes (shift integer REFERENCES shifts (id), note text)",
    ),
    Migration(
        3,
        "0003_first_shift.sql",
        "INSERT INTO shifts VALUES (1, 'hq'); INSERT INTO shift_notes VALUES (1, 'opening')",
    ),
]


@pytest.fixture
async def conn(scratch_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(scratch_db)
    try:
        yield connection
    finally:
        await connection.close()


async def recorded(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


def test_bundled_migrations_are_numbered_in_order() -> None:
    found = bundled_migrations()
    assert found and found[0].version == 1 and found[0].name == "0001_initial.sql"
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert all(m.name.startswith(f"{m.version:04d}_") and m.sql.strip() for m in found)


async def test_bundled_migrations_apply_once_and_are_recorded(conn: asyncpg.Connection) -> None:
    bundled = bundled_migrations()
    assert await migrate(conn) == [m.name for m in bundled]
    assert await recorded(conn) == [(m.version, m.name) for m in bundled]
    assert {"tenants", "sites", "employees", "devices", "punches", "audit_log"} <= await tables(
        conn
    )
    assert await migrate(conn) == []
    assert await recorded(conn) == [(m.version, m.name) for m in bundled]


async def test_migrations_apply_in_order_and_only_what_is_missing(
    conn: asyncpg.Connection,
) -> None:
    assert await migrate(conn, FAKE[:2]) == ["0001_shifts.sql", "0002_shift_notes.sql"]
    assert await migrate(conn, FAKE) == ["0003_first_shift.sql"]
    assert await migrate(conn, FAKE) == []
    assert await recorded(conn) == [(m.version, m.name) for m in FAKE]
    assert await conn.fetchval("SELECT count(*) FROM shift_notes") == 1
    applied = await conn.fetch("SELECT applied_at FROM schema_migrations ORDER BY version")
    assert [r["applied_at"] for r in applied] == sorted(r["applied_at"] for r in applied)


async def test_a_failing_migration_is_rolled_back_and_releases_the_lock(
    conn: asyncpg.Connection, scratch_db: str
) -> None:
    broken = Migration(3, "0003_broken.sql", "CREATE TABLE half_done (x int); SELECT 1/0")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(conn, [*FAKE[:2], broken])
    assert await recorded(conn) == [(1, "0001_shifts.sql"), (2, "0002_shift_notes.sql")]
    assert "half_done" not in await tables(conn)
    # Another process can migrate at once: the lock was given back.
    other = await asyncpg.connect(scratch_db)
    try:
        assert await asyncio.wait_for(migrate(other, FAKE), 10) == ["0003_first_shift.sql"]
    finally:
        await other.close()


async def test_concurrent_migrations_apply_each_step_exactly_once(scratch_db: str) -> None:
    steps = [*bundled_migrations(), *(Migration(100 + m.version, m.name, m.sql) for m in FAKE)]
    connections = [await asyncpg.connect(scratch_db) for _ in range(6)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(migrate(c, steps) for c in connections)), 60
        )
        applied = [name for names in results for name in names]
        assert sorted(applied) == sorted(m.name for m in steps)
        # Each caller applied an unbroken run of the steps, in order.
        for names in results:
            if names:
                start = [m.name for m in steps].index(names[0])
                assert names == [m.name for m in steps][start : start + len(names)]
        check = connections[0]
        assert await recorded(check) == [(m.version, m.name) for m in steps]
        assert await check.fetchval("SELECT count(*) FROM shifts") == 1
        locks = await check.fetchval(
            """SELECT count(*) FROM pg_locks
                WHERE locktype = 'advisory'
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        )
        assert locks == 0
    finally:
        for connection in connections:
            await connection.close()
