"""The Starlette application: routes, lifespan, and the hub that ties the parts together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub import logs, metrics, store
from hub import protocol as p
from hub.adms import AdmsEndpoints
from hub.auth import Authenticator, DeviceRegistry
from hub.broker import Broker, open_broker
from hub.config import Settings
from hub.events import HubGone, HubSockets, PresenceEvent
from hub.limits import (
    AddressLimiter,
    FloodMemory,
    OriginPolicy,
    TenantConnections,
    client_address,
)
from hub.live import FLAG_SQL, Flag, Live, LiveFloors
from hub.migrate import migrate
from hub.protocol import SUBPROTOCOLS, Codec
from hub.redis_keys import RedisKeys
from hub.rest import Api, ApiError, error_response
from hub.session import CLOSE_BAD_TOKEN
from hub.tokens import TokenError, TokenIssuer
from hub.ws import Connection, websocket_endpoint
from workers.checks import Checker
from workers.retention import RetentionJob
from workers.scan import OvertimeScan
from workers.stream import StreamWorker

log = logging.getLogger(__name__)


class Hub:
    """Everything a request or a session needs, created once per process."""

    def __init__(self, settings: Settings, dsn: str, secret: str, *, worker: bool = True) -> None:
        """``worker`` False leaves committing to separate ``attendance-hub worker`` processes
        (only with Redis: without it the hub always commits itself)."""
        self.settings = settings
        # Names this run of the hub to the workers that answer its punches.
        self.run_id = uuid.uuid4().hex
        self._run_worker = worker
        self.dsn = dsn
        self.tokens = TokenIssuer(secret, settings.secret_previous)
        self.devices = DeviceRegistry(self._retire_device)
        self.auth = Authenticator(self.tokens, self.devices)
        self.codecs = {name: Codec(name) for name in SUBPROTOCOLS}
        self.connections: set[Connection] = set()
        self.tenant_connections = TenantConnections(settings.max_connections_per_tenant)
        self.floods = FloodMemory()
        self.origins = OriginPolicy(settings.allowed_origins)
        self.connect_attempts = AddressLimiter(
            settings.connect_rate_per_ip, settings.connect_burst_per_ip
        )
        self.rest_requests = AddressLimiter(settings.rest_rate_per_ip, settings.rest_burst_per_ip)
        self.draining = False
        # Versions start at the start time in microseconds: above any an earlier run gave out.
        self.live = Live(base_version=time.time_ns() // 1000)
        self._sites: set[tuple[str, str]] = set()
        self._flagging: set[asyncio.Task[None]] = set()
        self._pool: asyncpg.Pool | None = None
        # As the DSN's user, not the application role: for work across tenants that no
        # request asks for, such as following device revocations.
        self._system_pool: asyncpg.Pool | None = None
        self._following: asyncio.Task[None] | None = None
        self._clock: asyncio.Task[None] | None = None
        # Tenants known to exist, so that a signed token of a missing tenant is refused.
        self._tenants: set[str] = set()
        self._broker: Broker | None = None
        self._worker: StreamWorker | None = None
        self._working: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._retention: RetentionJob | None = None
        # ZKTeco terminals pushing over HTTP, and the task that marks silent ones offline.
        self.adms = AdmsEndpoints(self)
        self._adms_watch: asyncio.Task[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the hub has not started"
        return self._pool

    @property
    def broker(self) -> Broker:
        assert self._broker is not None, "the hub has not started"
        return self._broker

    async def start(self) -> None:
        # Migrate as the connecting role, before the pool's connections take the
        # application role that the migrations create.
        owner = await asyncpg.connect(self.dsn)
        try:
            await migrate(owner)
        finally:
            await owner.close()
        self._pool = await store.create_pool(
            self.dsn, min_size=2, max_size=self.settings.db_pool_size
        )
        self._system_pool = await store.create_system_pool(self.dsn)
        metrics.watch_pool("app", self._pool)
        metrics.watch_pool("system", self._system_pool)
        async with self._system_pool.acquire() as conn:
            await self.devices.refresh(conn)
        self._broker = open_broker(self.settings, self._pool, self.dsn, self.run_id, self._apply)
        await self._broker.start(LiveFloors(self.live, self._system_pool))
        self._clock = asyncio.create_task(self.live.keep_time(self.presence), name="presence-clock")
        self._adms_watch = asyncio.create_task(self.adms.watch(), name="adms-terminals")
        self._following = asyncio.create_task(
            self.devices.follow(self._system_pool), name="device-revocations"
        )
        if self.settings.redis_url is not None and self._run_worker:
            # One process does it all, on Redis: a worker of its own besides any others.
            self._redis = aioredis.Redis.from_url(self.settings.redis_url)
            worker = self._worker = StreamWorker(
                self._redis,
                RedisKeys(self.settings.redis_prefix),
                self._pool,
                f"hub-{self.run_id}",
                batch_max=self.settings.batch_max,
                claim_idle_ms=self.settings.claim_idle_ms,
                max_deliveries=self.settings.max_deliveries,
                checker=Checker.from_settings(self._pool, self.settings),
                scan=OvertimeScan(self._system_pool, self.settings.scan_interval_s),
            )
            self._working = asyncio.create_task(worker.run(), name="stream-worker")
        # Retention deletes across tenants: the system pool, not the application role.
        self._retention = RetentionJob(self._system_pool, self.settings)
        self._retention.start()
        _tune_garbage_collector()

    async def drain(self) -> None:
        """Before a planned shutdown: answer every queued punch, then send clients away,
        a slice at a time over ``drain_window_s``, so that they do not all reconnect to the
        other hubs in the same moment (each also waits its own random 0.5-3 s)."""
        self.draining = True
        if self._retention is not None:
            await self._retention.stop()
        if self._broker is not None:
            await self._broker.flush()
        connections = list(self.connections)
        random.shuffle(connections)
        slices = max(1, min(len(connections), round(self.settings.drain_window_s * 10)))
        size = math.ceil(len(connections) / slices) if connections else 0
        leaving: list[asyncio.Task[None]] = []
        for start in range(0, len(connections), max(size, 1)):
            if start:
                await asyncio.sleep(self.settings.drain_window_s / slices)
            leaving += [asyncio.create_task(c.drain()) for c in connections[start : start + size]]
        await asyncio.gather(*leaving)

    async def stop(self) -> None:
        for task in (self._following, self._clock, self._adms_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._retention is not None:
            await self._retention.stop()
        if self._broker is not None:
            await self._broker.stop()
        if self._worker is not None and self._working is not None:
            self._worker.stop()
            await self._working
        if self._redis is not None:
            await self._redis.aclose()
        if self._flagging:
            await asyncio.gather(*self._flagging, return_exceptions=True)
        for name, pool in (("app", self._pool), ("system", self._system_pool)):
            if pool is not None:
                metrics.unwatch_pool(name, pool)
                await pool.close()

    def presence(self, event: PresenceEvent) -> None:
        """A presence event: every hub applies it (this one at once when it is alone)."""
        self.broker.publish(event)

    def _apply(self, event: PresenceEvent) -> None:
        """Apply a presence event here; keep the flags it finds on the punches."""
        flags = self.live.apply(event)
        if isinstance(event, HubGone) and event.hub == self.run_id:
            # Taken for dead (a long pause, say): tell the boards which sockets are still here.
            self.presence(self._sockets_held())
        if flags:
            task = asyncio.create_task(self._store_flags(flags))
            self._flagging.add(task)
            task.add_done_callback(self._flagging.discard)

    def _sockets_held(self) -> HubSockets:
        held = Counter(
            (announced.tenant, announced.device, announced.site)
            for connection in self.connections
            if (announced := connection.announcement()) is not None
        )
        # A ZKTeco terminal heard from lately counts as one socket here.
        held.update(self.adms.leases.held())
        sockets = [(tenant, device, site, n) for (tenant, device, site), n in held.items()]
        return HubSockets(self.run_id, sorted(sockets), datetime.now(UTC))

    async def _store_flags(self, flags: list[Flag]) -> None:
        try:
            async with self.pool.acquire() as conn:
                await store.act_for_tenants(conn, {flag.tenant for flag in flags})
                await conn.execute(
                    FLAG_SQL,
                    [flag.tenant for flag in flags],
                    [flag.id for flag in flags],
                    [flag.flag for flag in flags],
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not flag %d punches: %s", len(flags), exc)

    async def site_exists(self, tenant: str, site: str) -> bool:
        """Whether the tenant has this site; sites are never deleted."""
        if (tenant, site) in self._sites:
            return True
        async with store.tenant_transaction(self.pool, tenant) as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM sites WHERE tenant = $1 AND id = $2", tenant, site
            )
        if found is not None:
            self._sites.add((tenant, site))
        return found is not None

    async def tenant_exists(self, tenant: str) -> bool:
        """Whether the tenant a verified token names exists; tenants are never deleted."""
        if tenant in self._tenants:
            return True
        async with self.system_pool.acquire() as conn:
            found = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant)
        if found is not None:
            self._tenants.add(tenant)
        return found is not None

    @property
    def system_pool(self) -> asyncpg.Pool:
        assert self._system_pool is not None, "the hub has not started"
        return self._system_pool

    def _retire_device(self, tenant: str, device: str, version: int) -> None:
        """Close the sockets of a device whose tokens were just revoked or replaced."""
        for connection in list(self.connections):
            claims = connection.session.claims
            if claims is None or (claims.tenant, claims.role, claims.sub) != (
                tenant,
                "terminal",
                device,
            ):
                continue
            try:
                self.auth.check(claims)
            except TokenError as exc:
                connection.send(p.Error(code="token_revoked", message=str(exc)))
                connection.close(CLOSE_BAD_TOKEN, "token_revoked")

    async def readiness_problems(self) -> list[str]:
        if self.draining:
            # Out of the load balancer at once: new clients go to the other hubs.
            return ["draining: this hub is shutting down"]
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return [f"database unreachable: {exc or type(exc).__name__}"]
        problem = await self.broker.check()
        return [] if problem is None else [problem]


def _tune_garbage_collector() -> None:
    """Collect less often: each punch's objects live for one batch, long enough to be promoted.

    With the default thresholds that promotion runs a full collection every few seconds
    under load, a 20-40 ms pause for every socket. Freezing what start-up made keeps
    those objects out of every later collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


# The dashboard and kiosk pages, their scripts and styles; `lib` links to clients/js/src.
WEB = Path(__file__).parent / "web"
# A Host header fit to be written into the page policy: a name or address and a port.
_POLICY_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def web_headers(host: str | None) -> dict[str, str]:
    """Headers of every page and page file: nothing inline, nothing from another origin,
    and a check with the hub on every load so that a new version is picked up at once."""
    connect = "'self'"
    if host is not None and _POLICY_HOST.fullmatch(host):
        # Only CSP Level 3 browsers let 'self' cover the WebSocket of the page's own host.
        connect += f" ws://{host} wss://{host}"
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "content-security-policy": policy,
        "cache-control": "no-cache",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }


def web_file(name: str) -> Callable[[Request], Awaitable[Response]]:
    path = WEB / name

    async def endpoint(request: Request) -> Response:
        return FileResponse(path, headers=web_headers(request.headers.get("host")))

    return endpoint


class WebFiles:
    """Static files from a directory, with the pages' headers."""

    def __init__(self, directory: Path) -> None:
        # The library is a symbolic link out of the package in a source checkout.
        self.files = StaticFiles(directory=directory, follow_symlink=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extra = web_headers(Headers(scope=scope).get("host"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(extra)
            await send(message)

        await self.files(scope, receive, send_with_headers)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid")
    return error_response(ApiError(status, str(exc.detail), code))


async def _too_many_requests(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    metrics.refusals("rest_rate").inc()
    address = client_address(scope)
    wait = math.ceil(hub.rest_requests.retry_after(address, time.monotonic()))
    response = error_response(
        ApiError(429, f"too many requests from {address}; try again in {wait} s")
    )
    response.headers["retry-after"] = str(wait)
    await response(scope, receive, send)


def create_app(hub: Hub) -> ASGIApp:
    api = Api(hub)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    routes = [
        Route("/v1/sites", api.list_sites, methods=["GET"]),
        Route("/v1/sites/{site}", api.put_site, methods=["PUT"]),
        Route("/v1/sites/{site}", api.get_site, methods=["GET"]),
        Route("/v1/employees", api.list_employees, methods=["GET"]),
        Route("/v1/employees/{employee}", api.put_employee, methods=["PUT"]),
        Route("/v1/employees/{employee}", api.get_employee, methods=["GET"]),
        Route("/v1/employees/{employee}", api.delete_employee, methods=["DELETE"]),
        Route("/v1/devices", api.list_devices, methods=["GET"]),
        Route("/v1/devices/{device}", api.put_device, methods=["PUT"]),
        Route("/v1/devices/{device}", api.delete_device, methods=["DELETE"]),
        Route("/v1/tokens", api.post_token, methods=["POST"]),
        Route("/v1/punches", api.list_punches, methods=["GET"]),
        Route("/v1/punches", api.post_punch, methods=["POST"]),
        Route("/v1/audit", api.list_audit, methods=["GET"]),
        Route("/v1/timesheets", api.timesheets, methods=["GET"]),
        Route("/v1/alerts", api.list_alerts, methods=["GET"]),
        Route("/v1/presence/{site}", api.get_presence, methods=["GET"]),
        Route("/v1/schedules/{employee}", api.put_schedule, methods=["PUT"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        # ZKTeco terminals (PROTOCOL §5); older firmware asks for the .aspx names.
        *(
            route
            for path in ("/iclock/cdata", "/iclock/cdata.aspx")
            for route in (
                Route(path, hub.adms.cdata_get, methods=["GET"]),
                Route(path, hub.adms.cdata_post, methods=["POST"]),
            )
        ),
        *(
            Route(path, hub.adms.poll, methods=[method])
            for name, method in (("getrequest", "GET"), ("devicecmd", "POST"), ("ping", "GET"))
            for path in (f"/iclock/{name}", f"/iclock/{name}.aspx")
        ),
        Route("/", web_file("dashboard.html"), methods=["GET"]),
        Route("/kiosk", web_file("kiosk.html"), methods=["GET"]),
        # At the root, so that the worker may serve /kiosk itself while the hub is down.
        Route("/kiosk-worker.js", web_file("kiosk-worker.js"), methods=["GET"]),
        Mount("/js", app=WebFiles(WEB / "lib")),
        Mount("/static", app=WebFiles(WEB)),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.hub = hub
    metrics.CONNECTIONS.labels("anonymous").set(0)

    async def http_app(scope: Scope, receive: Receive, send: Send) -> None:
        if not hub.rest_requests.take(client_address(scope), time.monotonic()):
            await _too_many_requests(hub, scope, receive, send)
        else:
            await app(scope, receive, send)

    def hub_app(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Punch traffic goes straight to the WebSocket layer; see hub/ws.py for why. Not a
        # coroutine itself: each socket's task holds one frame less (uvicorn is told the
        # interface, `asgi3`, rather than guessing it from a coroutine function).
        if scope["type"] == "websocket" and scope["path"] == "/v1/ws":
            return websocket_endpoint(hub, scope, receive, send)
        if scope["type"] == "http":
            return _observed(http_app, scope, receive, send)
        return app(scope, receive, send)

    return hub_app


async def _observed(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve an HTTP request under its request id (X-Request-ID, taken or made, and returned)
    and count it by route template and status."""
    request_id = logs.request_id(scope["headers"])
    named = logs.REQUEST_ID.set(request_id)

    async def send_observed(message: Message) -> None:
        if message["type"] == "http.response.start":
            # Starlette's router leaves the route it matched in the scope: its template,
            # never the raw path, names the series.
            route = scope.get("route")
            template = getattr(route, "path", None) or metrics.UNMATCHED_ROUTE
            metrics.http_requests(template, message["status"]).inc()
            headers = [*message.get("headers", ()), (logs.REQUEST_ID_HEADER, request_id.encode())]
            message = {**message, "headers": headers}
        await send(message)

    try:
        await app(scope, receive, send_observed)
    finally:
        logs.REQUEST_ID.reset(named)
