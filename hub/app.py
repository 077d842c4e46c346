"""The Starlette application: routes, lifespan, and the hub that ties the parts together."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from hub import metrics, store
from hub.config import Settings
from hub.migrate import migrate
from hub.protocol import SUBPROTOCOLS, Codec
from hub.rest import Api, ApiError, error_response
from hub.tokens import TokenIssuer
from hub.ws import Connection, websocket_endpoint
from workers.persist import PunchBatcher
from workers.retention import RetentionJob

log = logging.getLogger(__name__)


class Hub:
    """Everything a request or a session needs, created once per process."""

    def __init__(self, settings: Settings, dsn: str, secret: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.tokens = TokenIssuer(secret)
        self.codecs = {name: Codec(name) for name in SUBPROTOCOLS}
        self.connections: set[Connection] = set()
        self.draining = False
        self._pool: asyncpg.Pool | None = None
        self._batcher: PunchBatcher | None = None
        self._retention: RetentionJob | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the hub has not started"
        return self._pool

    @property
    def batcher(self) -> PunchBatcher:
        assert self._batcher is not None, "the hub has not started"
        return self._batcher

    async def start(self) -> None:
        self._pool = await store.create_pool(
            self.dsn, min_size=2, max_size=self.settings.db_pool_size
        )
        async with self._pool.acquire() as conn:
            await migrate(conn)
        self._batcher = PunchBatcher(
            self._pool,
            max_batch=self.settings.batch_max,
            wait_ms=self.settings.batch_wait_ms,
            concurrency=self.settings.batch_concurrency,
        )
        self._batcher.start()
        self._retention = RetentionJob(self._pool, self.settings)
        self._retention.start()
        _tune_garbage_collector()

    async def drain(self) -> None:
        """Before a planned shutdown: answer every queued punch, then send clients away."""
        self.draining = True
        if self._retention is not None:
            await self._retention.stop()
        if self._batcher is not None:
            await self._batcher.flush()
        await asyncio.gather(*(connection.drain() for connection in list(self.connections)))

    async def stop(self) -> None:
        if self._retention is not None:
            await self._retention.stop()
        if self._batcher is not None:
            await self._batcher.stop()
        if self._pool is not None:
            await self._pool.close()

    async def readiness_problems(self) -> list[str]:
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return [f"database unreachable: {exc or type(exc).__name__}"]
        return []


def _tune_garbage_collector() -> None:
    """Collect less often: each punch's objects live for one batch, long enough to be promoted.

    With the default thresholds that promotion runs a full collection every few seconds
    under load, a 20-40 ms pause for every socket. Freezing what start-up made keeps
    those objects out of every later collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


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
        Route("/v1/devices", api.list_devices, methods=["GET"]),
        Route("/v1/devices/{device}", api.put_device, methods=["PUT"]),
        Route("/v1/tokens", api.post_token, methods=["POST"]),
        Route("/v1/punches", api.list_punches, methods=["GET"]),
        Route("/v1/audit", api.list_audit, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.hub = hub
    metrics.CONNECTIONS.labels("anonymous").set(0)

    async def hub_app(scope: Scope, receive: Receive, send: Send) -> None:
        # Punch traffic goes straight to the WebSocket layer; see hub/ws.py for why.
        if scope["type"] == "websocket" and scope["path"] == "/v1/ws":
            await websocket_endpoint(hub, scope, receive, send)
        else:
            await app(scope, receive, send)

    return hub_app
