"""Two reference servers speaking the hello/punch/ack subset of the hub's WebSocket protocol.

``ceiling``  decodes each punch and acks it at once, storing nothing: the most any server on
             this stack (uvicorn, Starlette, msgspec) can do on this machine.
``naive``    the same endpoint, but each punch is one ``INSERT ... ON CONFLICT DO NOTHING`` in
             autocommit through an asyncpg pool, awaited before the ack: the obvious way to
             make an ack durable, one commit per punch.

Neither checks tokens or employees; both answer ``hello`` with ``welcome``. They run under
uvicorn with the options the hub uses (websockets-sansio, httptools, uvloop).

    python benchmarks/baselines.py ceiling --port 9001
    python benchmarks/baselines.py naive --port 9002 --dsn postgresql://postgres@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

SUBPROTOCOL = "attendance.v1.json"
MAX_FRAME_BYTES = 64 * 1024
HEARTBEAT_S = 30

NAIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_punches (
    id          uuid PRIMARY KEY,
    employee    text NOT NULL,
    kind        text NOT NULL,
    at          timestamptz NOT NULL,
    received_at timestamptz NOT NULL
)
"""
NAIVE_INSERT = """
INSERT INTO naive_punches (id, employee, kind, at, received_at) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO NOTHING
"""


class Hello(msgspec.Struct, tag="hello", tag_field="type"):
    token: str = ""


class Punch(msgspec.Struct, tag="punch", tag_field="type"):
    id: uuid.UUID
    employee: str
    kind: str
    at: datetime


class Welcome(msgspec.Struct, tag="welcome", tag_field="type"):
    session: str
    server_time: str
    heartbeat_s: int


class Ack(msgspec.Struct, tag="ack", tag_field="type", omit_defaults=True):
    id: str
    status: str
    received_at: str | None = None


decode_frame = msgspec.json.Decoder(Hello | Punch).decode
encode_frame = msgspec.json.Encoder().encode

# Decides a punch's ack status; the ceiling's accepts at once, the naive one inserts first.
Store = Callable[[Punch, datetime], Awaitable[str]]


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


async def accept_at_once(punch: Punch, received_at: datetime) -> str:
    return "accepted"


def insert_each(pool: asyncpg.Pool) -> Store:
    async def store(punch: Punch, received_at: datetime) -> str:
        status = await pool.execute(
            NAIVE_INSERT, punch.id, punch.employee, punch.kind, punch.at, received_at
        )
        # The command tag is "INSERT 0 <rows>": 0 rows means the id was already there.
        return "accepted" if status.endswith(" 1") else "duplicate"

    return store


def create_app(kind: str, dsn: str | None, pool_size: int) -> Starlette:
    state: dict[str, Store] = {"store": accept_at_once}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if kind != "naive":
            yield
            return
        assert dsn is not None, "the naive server needs --dsn"
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        assert pool is not None
        await pool.execute(NAIVE_SCHEMA)
        state["store"] = insert_each(pool)
        try:
            yield
        finally:
            await pool.close()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol=SUBPROTOCOL)
        store = state["store"]
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            now = datetime.now(UTC)
            frame = decode_frame(message["text"])
            if isinstance(frame, Punch):
                status = await store(frame, now)
                reply = encode_frame(
                    Ack(id=str(frame.id), status=status, received_at=format_time(now))
                )
            else:
                reply = encode_frame(
                    Welcome(
                        session=uuid.uuid4().hex,
                        server_time=format_time(now),
                        heartbeat_s=HEARTBEAT_S,
                    )
                )
            await websocket.send({"type": "websocket.send", "text": reply.decode()})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[WebSocketRoute("/v1/ws", endpoint), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("ceiling", "naive"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--dsn", help="PostgreSQL for the naive server")
    parser.add_argument("--pool-size", type=int, default=8, help="naive: asyncpg connections")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.kind, args.dsn, args.pool_size),
        host=args.host,
        port=args.port,
        ws="websockets-sansio",
        http="httptools",
        loop="uvloop",
        ws_max_size=MAX_FRAME_BYTES,
        ws_ping_interval=HEARTBEAT_S,
        ws_ping_timeout=HEARTBEAT_S,
        lifespan="on",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
