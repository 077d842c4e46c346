"""The `attendance-hub` command: serve, migrate, tenant create, audit verify, worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import asyncpg
import prometheus_client
import redis.asyncio as aioredis
import uvicorn

from hub import audit, logs, store
from hub.app import Hub, create_app
from hub.config import ConfigError, Settings
from hub.embedded_pg import DataDirBusy, EmbeddedPostgres, EmbeddedStartError
from hub.migrate import migrate
from hub.redis_keys import RedisKeys
from hub.tokens import TokenIssuer, load_or_create_secret
from hub.wsproto import HubWebSocketProtocol
from workers.checks import Checker
from workers.scan import OvertimeScan
from workers.stream import StreamWorker

log = logging.getLogger("attendance_hub")

ADMIN_TOKEN_TTL_S = 30 * 24 * 3600
DRAIN_TIMEOUT_S = 10.0
# Connections waiting to be accepted (uvicorn's default is 2048); see `serve`.
LISTEN_BACKLOG = 16_384


class CliError(Exception):
    """A problem the operator can fix; printed without a traceback."""


@dataclass(slots=True)
class Database:
    dsn: str
    secret: str
    embedded: EmbeddedPostgres | None


@contextmanager
def open_database(settings: Settings, *, serving: bool) -> Iterator[Database]:
    """The DSN and signing secret for these settings, starting the embedded server if needed."""
    if settings.database_url is not None:
        if settings.secret is None:
            raise CliError(
                "ATTENDANCE_SECRET is required with ATTENDANCE_DATABASE_URL: every hub and "
                "worker must sign and verify tokens with the same key"
            )
        yield Database(settings.database_url, _checked(settings.secret), None)
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    if serving:
        try:
            embedded.claim_for_serving()
        except DataDirBusy as exc:
            raise CliError(str(exc)) from None
    try:
        try:
            dsn = embedded.start()
        except EmbeddedStartError as exc:
            raise CliError(str(exc)) from None
        secret = _checked(settings.secret or load_or_create_secret(settings.data_dir))
        yield Database(dsn, secret, embedded)
    finally:
        embedded.stop()
        embedded.release()
        embedded.remove_socket_dir()


def _checked(secret: str) -> str:
    try:
        TokenIssuer(secret)
    except ValueError as exc:
        raise CliError(f"ATTENDANCE_SECRET: {exc}") from None
    return secret


async def _migrate(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def create_tenant(dsn: str, secret: str, slug: str, name: str, timezone: str) -> str:
    """Create the tenant if needed and return a fresh admin token for it."""
    await _migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await store.init_connection(conn)
        await store.ensure_tenant(conn, slug, name, timezone)
    finally:
        await conn.close()
    token, _ = TokenIssuer(secret).issue(
        tenant=slug, role="admin", sub="cli", ttl_s=ADMIN_TOKEN_TTL_S
    )
    return token


async def verify_audit_chains(dsn: str, tenant: str | None) -> list[audit.ChainReport]:
    """Verify one tenant's audit chain, or every tenant's. Reads only; migrates nothing."""
    conn = await asyncpg.connect(dsn)
    try:
        await store.init_connection(conn)
        if not await conn.fetchval("SELECT to_regclass('audit_heads') IS NOT NULL"):
            raise CliError(
                "this database has no audit chain yet (migration 0003); "
                "run `attendance-hub migrate` or start the hub first"
            )
        if tenant is None:
            tenants = [r["id"] for r in await conn.fetch("SELECT id FROM tenants ORDER BY id")]
        elif await store.tenant_exists(conn, tenant):
            tenants = [tenant]
        else:
            raise CliError(f"no tenant {tenant!r}")
        return [await store.verify_audit(conn, slug) for slug in tenants]
    finally:
        await conn.close()


DEMO_EMPLOYEES = [
    ("ada", "Ada Lovelace", "1001"),
    ("grace", "Grace Hopper", "1002"),
    ("alan", "Alan Turing", "1003"),
    ("katherine", "Katherine Johnson", "1004"),
    ("edsger", "Edsger Dijkstra", "1005"),
]


async def provision_demo(dsn: str, secret: str) -> dict[str, str]:
    """A demo tenant with one site, five employees and a door terminal; returns tokens."""
    await create_tenant(dsn, secret, "demo", "Demo Factory", "Europe/Berlin")
    conn = await asyncpg.connect(dsn)
    try:
        await store.init_connection(conn)
        async with conn.transaction():
            await store.upsert_site(
                conn,
                "demo",
                "hq",
                {
                    "name": "Headquarters",
                    "timezone": "Europe/Berlin",
                    "lat": 52.52,
                    "lon": 13.405,
                    "radius_m": 200.0,
                    "policy": {"overtime": "flsa"},
                },
            )
            for employee, name, badge in DEMO_EMPLOYEES:
                await store.upsert_employee(
                    conn, "demo", employee, {"name": name, "site": "hq", "badge": badge}
                )
            await store.upsert_device(
                conn, "demo", "door-1", {"site": "hq", "name": "Front door", "adms_sn": None}
            )
            # Edsger's shift started half an hour ago and he has not come: the floor shows
            # him late. Alan's starts in a minute: he turns late while you watch.
            now = datetime.now(UTC).replace(second=0, microsecond=0)
            for employee, start in (
                ("edsger", now - timedelta(minutes=30)),
                ("alan", now + timedelta(minutes=1)),
            ):
                await store.replace_schedule(
                    conn, "demo", employee, [("hq", start, start + timedelta(hours=8))]
                )
    finally:
        await conn.close()
    issuer = TokenIssuer(secret)
    return {
        "admin": issuer.issue(
            tenant="demo", role="admin", sub="demo-admin", ttl_s=ADMIN_TOKEN_TTL_S
        )[0],
        "supervisor": issuer.issue(
            tenant="demo",
            role="supervisor",
            sub="demo-supervisor",
            sites=["hq"],
            ttl_s=ADMIN_TOKEN_TTL_S,
        )[0],
        "terminal": issuer.issue(
            tenant="demo", role="terminal", sub="door-1", site="hq", ttl_s=ADMIN_TOKEN_TTL_S
        )[0],
        "employee": issuer.issue(
            tenant="demo", role="employee", sub="ada", employee="ada", ttl_s=ADMIN_TOKEN_TTL_S
        )[0],
    }


class _HubServer(uvicorn.Server):
    """uvicorn's server, with a drain step before the first signal's shutdown."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        # The window to send clients away in, plus time to answer what is queued.
        limit = self.hub.settings.drain_window_s + DRAIN_TIMEOUT_S
        try:
            await asyncio.wait_for(self.hub.drain(), limit)
        except TimeoutError:
            log.warning("drain took longer than %.0f s; shutting down anyway", limit)
        self.should_exit = True


def serve(settings: Settings, *, demo: bool, no_workers: bool) -> None:
    if no_workers and settings.redis_url is None:
        raise CliError(
            "--no-workers hands punches to separate `attendance-hub worker` processes over "
            "Redis: set ATTENDANCE_REDIS_URL (and ATTENDANCE_DATABASE_URL), or start "
            "`attendance-hub serve` without --no-workers"
        )
    with open_database(settings, serving=True) as database:
        asyncio.run(_migrate(database.dsn))
        base = f"http://{settings.host}:{settings.port}"
        if demo:
            tokens = asyncio.run(provision_demo(database.dsn, database.secret))
            _print_demo(base, tokens)
        hub = Hub(settings, database.dsn, database.secret, worker=not no_workers)
        config = uvicorn.Config(
            create_app(hub),
            host=settings.host,
            port=settings.port,
            ws=HubWebSocketProtocol,
            interface="asgi3",
            # The queue of connections the kernel has accepted for us: after a restart
            # thousands of terminals connect at once, and a full queue drops their SYNs,
            # which they resend only after 1, 3, 7 s. The kernel caps it at
            # net.core.somaxconn (4096 by default).
            backlog=LISTEN_BACKLOG,
            ws_max_size=settings.max_frame_bytes,
            # Frames are small JSON and leave framed once for a whole fan-out (hub/wsproto.py),
            # uncompressed; a negotiated permessage-deflate would only cost every socket a
            # zlib context (about 120 KiB with a browser or the `websockets` client).
            ws_per_message_deflate=False,
            ws_ping_interval=settings.heartbeat_s,
            ws_ping_timeout=settings.heartbeat_s,
            lifespan="on",
            log_level="info",
            **logs.uvicorn_options(settings.log_format),
            timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S),
        )
        server = _HubServer(config, hub)
        print(
            f"attendance-hub serving on {base} (WebSocket {base.replace('http', 'ws')}/v1/ws)",
            flush=True,
        )
        server.run()


def run_worker(settings: Settings, name: str | None) -> None:
    """``attendance-hub worker``: commit punches from the hubs' Redis stream until stopped."""
    if settings.redis_url is None:
        raise CliError(
            "`attendance-hub worker` reads punches that hubs hand over through Redis: "
            "set ATTENDANCE_REDIS_URL (the same as the hubs')"
        )
    with open_database(settings, serving=False) as database:
        asyncio.run(_migrate(database.dsn))
        asyncio.run(_work(settings, settings.redis_url, database.dsn, name))


async def _work(settings: Settings, redis_url: str, dsn: str, name: str | None) -> None:
    consumer = name or f"{socket.gethostname()}-{os.getpid()}"
    pool = await store.create_pool(dsn, min_size=1, max_size=settings.db_pool_size)
    # As the DSN's user: the overtime scan looks across tenants.
    system_pool = await store.create_system_pool(dsn)
    redis = aioredis.Redis.from_url(redis_url)
    worker = StreamWorker(
        redis,
        RedisKeys(settings.redis_prefix),
        pool,
        consumer,
        batch_max=settings.batch_max,
        claim_idle_ms=settings.claim_idle_ms,
        max_deliveries=settings.max_deliveries,
        checker=Checker.from_settings(pool, settings),
        scan=OvertimeScan(system_pool, settings.scan_interval_s),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The batch in hand is finished and answered first.
        loop.add_signal_handler(sig, worker.stop)
    print(f"attendance-hub worker {consumer} committing punches from Redis", flush=True)
    if settings.worker_metrics_port:
        # A worker serves no HTTP of its own: what it counts (batches, commits, alerts,
        # dead letters) is exported here for Prometheus.
        prometheus_client.start_http_server(settings.worker_metrics_port, addr=settings.host)
        print(
            f"metrics on http://{settings.host}:{settings.worker_metrics_port}/metrics",
            flush=True,
        )
    try:
        await worker.run()
        log.info("worker %s stopped", consumer)
    finally:
        await redis.aclose()
        await pool.close()
        await system_pool.close()


def _print_demo(base: str, tokens: dict[str, str]) -> None:
    print(
        "Demo tenant `demo`: site `hq`, employees ada grace alan katherine edsger "
        "(badges 1001-1005), terminal `door-1`. Edsger is late for his shift; Alan will be "
        "in six minutes unless he clocks in."
    )
    for role, token in tokens.items():
        print(f"  {role:<10} token: {token}")
    print(f"Open  {base}/        the supervisor dashboard: paste the supervisor token")
    print(f"      {base}/kiosk   the kiosk at the door: paste the terminal token")
    print(f"Try:  curl -H 'Authorization: Bearer {tokens['admin'][:12]}...' {base}/v1/employees")
    print(f"      curl -H 'Authorization: Bearer <supervisor token>' {base}/v1/presence/hq")
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="attendance-hub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the hub (embedded PostgreSQL by default)")
    serve_cmd.add_argument(
        "--no-workers", action="store_true", help="run no persistence worker here (scale-out mode)"
    )
    serve_cmd.add_argument(
        "--demo", action="store_true", help="create a demo tenant and print tokens to try it with"
    )
    commands.add_parser("migrate", help="apply database migrations and exit")
    tenant_cmd = commands.add_parser("tenant", help="manage tenants")
    tenant_sub = tenant_cmd.add_subparsers(dest="tenant_command", required=True)
    create_cmd = tenant_sub.add_parser("create", help="create a tenant, print an admin token")
    create_cmd.add_argument("slug")
    create_cmd.add_argument("--name")
    create_cmd.add_argument("--timezone", default="UTC")
    audit_cmd = commands.add_parser("audit", help="check the audit log")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    verify_cmd = audit_sub.add_parser(
        "verify", help="recompute each tenant's audit hash chain; exit 1 if any is broken"
    )
    verify_cmd.add_argument("--tenant", metavar="SLUG", help="only this tenant")
    worker_cmd = commands.add_parser("worker", help="run a persistence worker (needs Redis)")
    worker_cmd.add_argument(
        "--name",
        help="consumer name; a worker started again under its old name first re-reads the "
        "punches it had taken and not answered (default: host-pid)",
    )
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
        logs.configure(settings.log_format)
        if args.command == "serve":
            serve(settings, demo=args.demo, no_workers=args.no_workers)
        elif args.command == "migrate":
            with open_database(settings, serving=False) as database:
                applied = asyncio.run(_migrate(database.dsn))
            print(json.dumps({"applied": applied}))
        elif args.command == "tenant":
            _tenant_create(settings, args.slug, args.name or args.slug, args.timezone)
        elif args.command == "audit":
            _audit_verify(settings, args.tenant)
        elif args.command == "worker":
            run_worker(settings, args.name)
    except (CliError, ConfigError) as exc:
        print(f"attendance-hub: {exc}", file=sys.stderr)
        sys.exit(2)


def _tenant_create(settings: Settings, slug: str, name: str, timezone: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    import msgspec

    from hub.protocol import EntityId

    try:
        msgspec.convert(slug, EntityId)
    except msgspec.ValidationError:
        raise CliError("a tenant slug is 1-64 of A-Z a-z 0-9 . _ -") from None
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CliError(f"unknown time zone {timezone!r}") from None
    with open_database(settings, serving=False) as database:
        token = asyncio.run(create_tenant(database.dsn, database.secret, slug, name, timezone))
    print(json.dumps({"tenant": slug, "admin_token": token}), flush=True)


def _audit_verify(settings: Settings, tenant: str | None) -> None:
    with open_database(settings, serving=False) as database:
        reports = asyncio.run(verify_audit_chains(database.dsn, tenant))
    for report in reports:
        print(json.dumps(report.to_json()), flush=True)
    if not all(report.ok for report in reports):
        sys.exit(1)


if __name__ == "__main__":
    main()
