"""The asyncio layer around ``Session``: reads frames, writes frames, hands punches on.

Each connection has one bounded outbound queue drained by its own writer task,
so a client that stops reading fills only its own queue and is then closed
with 4009 instead of slowing the acks of everyone else.

This is a plain ASGI application rather than a Starlette route: every punch
crosses it twice (frame in, ack out), and the router, middleware and
``WebSocket`` wrappers cost more per frame than the session itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.types import Receive, Scope
from starlette.types import Send as AsgiSend

from hub import logs, metrics
from hub import protocol as p
from hub.events import TerminalConnected, TerminalDisconnected
from hub.limits import FrameLimiter, client_address
from hub.presence import me_channel_name
from hub.session import (
    CLOSE_BAD_TOKEN,
    CLOSE_HELLO_REQUIRED,
    CLOSE_RESTART,
    CLOSE_SLOW_CONSUMER,
    Action,
    Close,
    Join,
    Leave,
    LimitReached,
    Pause,
    Send,
    Session,
    SubmitPunch,
)
from hub.timers import Deadline, Deadlines
from hub.tokens import Claims, TokenError
from hub.wsproto import CORK_EXTENSION, Framed, frame_message
from workers.persist import PunchOutcome, StoreUnavailable

if TYPE_CHECKING:
    from hub.app import Hub

log = logging.getLogger(__name__)

# How long a stalled client gets to take its close frame before the socket is dropped.
ABORT_AFTER_S = 2.0
# A connection handing in a burst gives the event loop to the others after this many frames.
YIELD_EVERY_FRAMES = 16


class Connection:
    __slots__ = (
        "_asgi_send",
        "_awaiting",
        "_close_code",
        "_closing",
        "_cork",
        "_done_writing",
        "_expiry",
        "_flush_due",
        "_outbox",
        "_outbox_bytes",
        "_outbox_bytes_limit",
        "_outbox_limit",
        "_paused_until",
        "_receive",
        "_role",
        "_uncork",
        "_write_frame",
        "_write_now",
        "_writer",
        "codec",
        "hub",
        "session",
    )

    def __init__(
        self,
        hub: Hub,
        receive: Receive,
        send: AsgiSend,
        codec: p.Codec,
        cork: dict[str, Any] | None = None,
    ) -> None:
        self.hub = hub
        self._receive = receive
        self._asgi_send = send
        # The server's write corking and raw frame writes (hub/wsproto.py), when it offers them.
        self._cork: Callable[[], None] = cork["cork"] if cork else _nothing
        self._uncork: Callable[[], None] = cork["uncork"] if cork else _nothing
        self._write_frame: Callable[[bytes], Awaitable[None]] | None = (
            cork.get("write_frame") if cork else None
        )
        self._write_now: Callable[[bytes], bool] | None = cork.get("write_now") if cork else None
        self.codec = codec
        settings = hub.settings
        limiter = (
            FrameLimiter(settings.rate_per_s, settings.rate_burst, settings.rate_flood)
            if settings.rate_per_s
            else None
        )
        self.session = Session(
            hub.auth,
            heartbeat_s=settings.heartbeat_s,
            limiter=limiter,
            floods=hub.floods,
            tenants=hub.tenant_connections,
        )
        # A list, not a deque: a deque is 760 bytes however empty, and an outbox holds a
        # frame or two (a slow consumer's holds at most `send_queue_frames`).
        self._outbox: list[bytes | Framed | tuple[int, str]] = []
        self._outbox_limit = hub.settings.send_queue_frames
        self._outbox_bytes_limit = hub.settings.send_queue_bytes
        self._outbox_bytes = 0
        self._closing = False
        self._role = "anonymous"
        # Only while something waits to be written that could not be written at once: an
        # idle socket has no task of its own besides its reader. `_flush_due` while a
        # flush is scheduled; `_done_writing` once a close frame has gone, or the peer.
        self._writer: asyncio.Task[None] | None = None
        self._flush_due = False
        # When the token expires (hub/timers.py): a close with 4001 then, unless refreshed.
        self._expiry: Deadline | None = None
        self._done_writing = False
        # While the client is over its rate, nothing is read from it until this (loop time).
        self._paused_until = 0.0
        # Punches this socket sent that are still to be answered, with how many copies.
        self._awaiting: Counter[uuid.UUID] = Counter()
        # The close code the hub sent, or else the client's: for the metrics.
        self._close_code: int | None = None

    async def run(self) -> None:
        metrics.CONNECTIONS.labels(self._role).inc()
        self.hub.connections.add(self)
        if self.hub.draining:
            # Connected after the drain began: send it on its way like everyone else.
            self._send_away()
        try:
            await self._read()
        finally:
            if self._expiry is not None:
                # Else the deadline would keep this connection alive until the token expires.
                Deadlines.of(asyncio.get_running_loop()).cancel(self._expiry)
                self._expiry = None
            self.hub.connections.discard(self)
            self.hub.live.drop(self)
            claims = self.session.claims
            if self._role == "terminal" and claims is not None:
                self.hub.presence(
                    TerminalDisconnected(
                        claims.tenant, claims.sub, self.hub.run_id, datetime.now(UTC)
                    )
                )
            metrics.CONNECTIONS.labels(self._role).dec()
            metrics.disconnected(self._close_code)
            self.session.closed()
            self._closing = True
            if not self._done_writing:
                # What is queued goes first, then the close frame.
                self._push((1000, ""))
            writer = self._writer
            if writer is not None:
                try:
                    await asyncio.wait_for(writer, timeout=5)
                except (TimeoutError, asyncio.CancelledError):
                    writer.cancel()

    async def drain(self) -> None:
        """Tell the client to reconnect elsewhere soon, close with 1012, wait until that is sent."""
        self._send_away()
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=ABORT_AFTER_S)

    def _send_away(self) -> None:
        self.send(p.Drain(reconnect_after_ms=random.randint(500, 3000)))
        self.close(CLOSE_RESTART, "server restart")

    def send(self, frame: p.ServerFrame) -> None:
        if not self._closing:
            self.send_encoded(self.codec.encode(frame), str(frame.__struct_config__.tag))

    def send_framed(self, framed: Framed, tag: str) -> None:
        """Send messages a fan-out encoded and framed once for every socket of this codec.

        When nothing is queued they are written at once, in one piece: a delta to a
        thousand dashboards is a thousand writes, not a thousand scheduled flushes as
        well. Otherwise they join the queue behind what is there.
        """
        write_now = self._write_now
        if (
            not self._outbox
            and self._writer is None
            and not self._closing
            and write_now is not None
            and write_now(framed.data)
        ):
            metrics.FRAMES_OUT[tag] += len(framed.payloads)
            return
        self.send_encoded(framed, tag)

    def send_encoded(self, payload: bytes | Framed, tag: str) -> None:
        """Queue a frame already encoded with this connection's codec (or a fan-out's)."""
        if self._closing:
            return
        size = len(payload.data) if isinstance(payload, Framed) else len(payload)
        # The byte limit is on what has piled up: a large frame (a snapshot) can still join
        # a queue below it.
        if (
            len(self._outbox) >= self._outbox_limit
            or self._outbox_bytes >= self._outbox_bytes_limit
        ):
            log.info(
                "closing session %s: it does not read its frames",
                self.session.id,
                extra={"session": self.session.id},
            )
            if len(self._outbox) >= self._outbox_limit:
                metrics.SLOW_CONSUMER_FRAMES.inc()
            else:
                metrics.SLOW_CONSUMER_BYTES.inc()
            self._closing = True
            self._jump_close(CLOSE_SLOW_CONSUMER, "slow_consumer")
            return
        self._outbox_bytes += size
        self._push(payload)
        metrics.FRAMES_OUT[tag] += len(payload.payloads) if isinstance(payload, Framed) else 1

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        if self._close_code is None:
            self._close_code = code
        if len(self._outbox) >= self._outbox_limit:
            self._jump_close(code, reason)
        else:
            self._push((code, reason))

    def _push(self, item: bytes | Framed | tuple[int, str]) -> None:
        """Queue the item. Frames leave together at the end of this turn of the event loop
        (a commit acks several punches of this client at once); a close needs the writer,
        at once, so that whoever waits for it has a task to wait on."""
        self._outbox.append(item)
        if self._writer is not None or self._done_writing:
            return
        if isinstance(item, tuple):
            self._start_writer()
        elif not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write what is queued in one piece if the socket takes it now; else the writer
        waits until it can."""
        self._flush_due = False
        outbox = self._outbox
        if self._writer is not None or not outbox or self._done_writing:
            return
        write_now = self._write_now
        if write_now is not None and not any(isinstance(item, tuple) for item in outbox):
            binary = self.codec.binary
            data = b"".join(
                item.data if isinstance(item, Framed) else frame_message(item, binary)
                for item in outbox
                if not isinstance(item, tuple)
            )
            if write_now(data):
                outbox.clear()
                self._outbox_bytes = 0
                return
        self._start_writer()

    def _start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"ws-writer-{self.session.id}")

    def _jump_close(self, code: int, reason: str) -> None:
        # The queue is full of frames the client is not reading: drop them and close.
        if self._close_code is None:
            self._close_code = code
        self._outbox.clear()
        self._outbox_bytes = 0
        self._push((code, reason))
        asyncio.get_running_loop().call_later(ABORT_AFTER_S, self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        """Drop the TCP connection of a client whose buffers are too full even for a close frame.

        A graceful close waits for the peer to read what is buffered, which a
        stalled client never does; only aborting the transport frees the socket.
        ASGI gives no handle on the transport, so this reaches for uvicorn's.
        """
        if self._writer is None or self._writer.done():
            return
        protocol = getattr(self._asgi_send, "__self__", None)
        transport = getattr(protocol, "transport", None)
        if isinstance(transport, asyncio.Transport):
            log.info(
                "aborting session %s: its close frame could not be sent",
                self.session.id,
                extra={"session": self.session.id},
            )
            transport.abort()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        hello_deadline: float | None = loop.time() + self.hub.settings.hello_timeout_s
        receive = self._receive
        frames = 0
        while not self._closing:
            pause = self._paused_until - loop.time()
            if pause > 0:
                # Its frames wait in the socket buffers meanwhile, and then TCP slows it down.
                await asyncio.sleep(pause)
                continue
            frames += 1
            if frames % YIELD_EVERY_FRAMES == 0:
                # receive() does not suspend while frames are waiting: let the others in.
                await asyncio.sleep(0)
            try:
                if hello_deadline is None:
                    message = await receive()
                else:
                    remaining = max(0.0, hello_deadline - loop.time())
                    message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                self.send(
                    p.Error(
                        code="hello_timeout",
                        message="send `hello` within "
                        f"{self.hub.settings.hello_timeout_s} s of connecting",
                    )
                )
                self.close(CLOSE_HELLO_REQUIRED, "hello_timeout")
                return
            if message["type"] != "websocket.receive":
                if self._close_code is None:
                    # The client's code (uvicorn's 1005 or 1006 when there was none).
                    self._close_code = message.get("code", 1005)
                return
            payload = message.get("text")
            if payload is None:
                payload = message.get("bytes") or b""
            now = datetime.now(UTC)
            try:
                frame = self.codec.decode(payload)
            except p.FrameError as exc:
                metrics.FRAMES_IN["invalid"] += 1
                self._act(self.session.bad_frame(str(exc), exc.ref, now))
                continue
            metrics.FRAMES_IN[str(frame.__struct_config__.tag)] += 1
            if (
                hello_deadline is not None
                and isinstance(frame, p.Hello)
                and not await self._tenant_exists(frame.token)
            ):
                missing = "the token's tenant does not exist"
                self.send(p.Error(code="bad_token", message=missing, ref=frame.ref))
                self.close(CLOSE_BAD_TOKEN, "bad_token")
                return
            actions = self.session.receive(frame, now)
            self._act(actions)
            for action in actions:
                if isinstance(action, Join):
                    await self._join(action)
            if self.session.claims is not None and hello_deadline is not None:
                hello_deadline = None
                self._role = self.session.claims.role
                announced = self.announcement()
                if announced is not None:
                    self.hub.presence(announced)
                metrics.CONNECTIONS.labels("anonymous").dec()
                metrics.CONNECTIONS.labels(self._role).inc()
                self._watch_expiry()
            # Not kept while this waits for the next frame, which for an idle terminal is
            # its next punch: the last frame and its text are half a KiB or more.
            del message, payload, frame, actions

    def announcement(self) -> TerminalConnected | None:
        """What tells the boards this socket is a terminal's, online here; None for others."""
        claims = self.session.claims
        if self._role != "terminal" or claims is None:
            return None
        assert claims.site is not None
        return TerminalConnected(
            claims.tenant, claims.sub, claims.site, self.hub.run_id, datetime.now(UTC)
        )

    async def _join(self, join: Join) -> None:
        claims = self.session.claims
        assert claims is not None
        _, _, site = join.channel.partition(":")
        if site and not await self.hub.site_exists(claims.tenant, site):
            self.send(
                p.Error(
                    code="unknown_channel",
                    message=f"no channel {join.channel}: there is no site {site!r}",
                    ref=join.ref,
                )
            )
            return
        channel = _internal_channel(join.channel, claims)
        for frame in self.hub.live.join(self, claims.tenant, channel, join.since, join.ref):
            self.send(frame)

    def awaits_ack(self, punch_id: uuid.UUID) -> bool:
        return punch_id in self._awaiting

    async def _tenant_exists(self, token: str) -> bool:
        """False only for a valid token whose tenant does not exist; the session judges the rest."""
        try:
            claims = self.hub.tokens.verify(token)
        except TokenError:
            return True
        return await self.hub.tenant_exists(claims.tenant)

    def _watch_expiry(self) -> None:
        """Close with 4001 when the token expires, unless a `refresh` extended it meanwhile."""
        claims = self.session.claims
        if claims is None or self._closing:
            return
        remaining = claims.exp - time.time()
        if remaining > 0:
            loop = asyncio.get_running_loop()
            self._expiry = Deadlines.of(loop).at(loop.time() + remaining, self._watch_expiry)
            return
        self.send(
            p.Error(code="token_expired", message="the token expired; connect again with a new one")
        )
        self.close(CLOSE_BAD_TOKEN, "token_expired")

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Send(frame=frame):
                    if isinstance(frame, p.Ack):
                        metrics.punches(frame.reason or frame.status).inc()
                    self.send(frame)
                case SubmitPunch():
                    self._submit(action)
                case Close(code=code, reason=reason):
                    self.close(code, reason)
                case LimitReached(limit=limit):
                    metrics.refusals(limit).inc()
                case Pause(seconds=seconds):
                    self._paused_until = asyncio.get_running_loop().time() + seconds
                case Leave(channel=channel, ref=ref):
                    claims = self.session.claims
                    assert claims is not None
                    self.hub.live.leave(self, claims.tenant, _internal_channel(channel, claims))
                    self.send(p.Unsubscribed(channel=channel, ref=ref))
                case Join():
                    # Needs the database (does the site exist?): _read awaits it.
                    pass

    def _submit(self, action: SubmitPunch) -> None:
        punch_id = action.request.id
        # Read off the socket a moment ago: decoding and the session's checks take microseconds.
        started = time.perf_counter()
        if self.hub.draining:
            metrics.punch_failures("draining").inc()
            self.send(
                p.Error(
                    code="unavailable",
                    message="the hub is restarting; resend after reconnecting",
                    ref=action.ref,
                    id=punch_id,
                )
            )
            return

        def reply(outcome: PunchOutcome | Exception) -> None:
            awaiting = self._awaiting
            awaiting[punch_id] -= 1
            if not awaiting[punch_id]:
                del awaiting[punch_id]
            if isinstance(outcome, StoreUnavailable):
                metrics.punch_failures("unavailable").inc()
                self.send(
                    p.Error(
                        code="unavailable",
                        message=f"punch {punch_id} was not stored (database unavailable); "
                        "keep it and resend",
                        ref=action.ref,
                        id=punch_id,
                    )
                )
                return
            if isinstance(outcome, Exception):
                metrics.punch_failures("internal").inc()
                log.error(
                    "punch %s failed: %r", punch_id, outcome, extra={"session": self.session.id}
                )
                self.send(
                    p.Error(
                        code="internal",
                        message="punch not stored; resend",
                        ref=action.ref,
                        id=punch_id,
                    )
                )
                return
            self.send(
                p.Ack(
                    id=punch_id,
                    status=outcome.status,
                    reason=outcome.reason,
                    received_at=p.format_time(outcome.received_at),
                    ref=action.ref,
                )
            )
            metrics.ACK_LATENCY.observe(time.perf_counter() - started)

        self._awaiting[punch_id] += 1
        self.hub.broker.enqueue(action.request, reply)

    async def _write(self) -> None:
        """Write what is queued, waiting while the socket's buffer is full, until nothing is
        left or a close frame has gone."""
        try:
            await self._write_queued()
        finally:
            self._writer = None

    async def _write_queued(self) -> None:
        send = self._asgi_send
        write_frame = self._write_frame
        outbox = self._outbox
        binary = self.codec.binary
        while outbox:
            # Everything queued now leaves in one write.
            self._cork()
            try:
                while outbox:
                    item = outbox.pop(0)
                    if isinstance(item, Framed):
                        self._outbox_bytes -= len(item.data)
                    elif isinstance(item, bytes):
                        self._outbox_bytes -= len(item)
                    if isinstance(item, tuple):
                        self._done_writing = True
                        close = {"type": "websocket.close", "code": item[0], "reason": item[1]}
                        await send(close)
                        return
                    if write_frame is not None:
                        # Framed here (or once for a whole fan-out), written as it is.
                        if isinstance(item, Framed):
                            await write_frame(item.data)
                        else:
                            await write_frame(frame_message(item, binary))
                        continue
                    for payload in item.payloads if isinstance(item, Framed) else (item,):
                        message: dict[str, Any]
                        if binary:
                            message = {"type": "websocket.send", "bytes": payload}
                        else:
                            message = {"type": "websocket.send", "text": payload.decode()}
                        await send(message)
            except (OSError, RuntimeError):
                # The peer is gone; the reader notices too and ends the session.
                self._done_writing = True
                return
            finally:
                self._uncork()


def choose_subprotocol(offered: list[str]) -> str | None:
    """The first of ours the client offered; JSON when it offered none."""
    for name in offered:
        if name in p.SUBPROTOCOLS:
            return name
    return None


async def websocket_endpoint(hub: Hub, scope: Scope, receive: Receive, send: AsgiSend) -> None:
    """The ASGI application behind ``GET /v1/ws``."""
    if (await receive())["type"] != "websocket.connect":
        return
    if hub.draining:
        # Shutting down: a client let in now would only be sent away again. It retries, and
        # the load balancer (whose /readyz check fails from now on) sends it to another hub.
        await refuse_handshake(
            scope,
            send,
            503,
            "draining",
            "this hub is shutting down; connect again in a few seconds",
            [(b"retry-after", b"2")],
        )
        return
    address = client_address(scope)
    now = time.monotonic()
    if not hub.connect_attempts.take(address, now):
        metrics.refusals("connect_rate").inc()
        wait = math.ceil(hub.connect_attempts.retry_after(address, now))
        await refuse_handshake(
            scope,
            send,
            429,
            "rate_limited",
            f"too many connection attempts from {address}; try again in {wait} s",
            [(b"retry-after", str(wait).encode())],
        )
        return
    origin = _header(scope, b"origin")
    if origin is not None and not hub.origins.allows(origin, _header(scope, b"host")):
        metrics.refusals("origin").inc()
        await refuse_handshake(
            scope,
            send,
            403,
            "origin_not_allowed",
            f"pages from {origin} may not open WebSockets to this hub; the operator can allow "
            "that origin in ATTENDANCE_ALLOWED_ORIGINS",
        )
        return
    offered = list(scope.get("subprotocols") or [])
    chosen = choose_subprotocol(offered)
    if offered and chosen is None:
        # Refuse before the handshake: the client asked only for protocols we do not speak.
        await send({"type": "websocket.close", "code": 1002, "reason": ""})
        return
    codec = hub.codecs[chosen or p.JSON_SUBPROTOCOL]
    cork = scope.get("extensions", {}).get(CORK_EXTENSION)
    connection = Connection(hub, receive, send, codec, cork)
    # Every log line of this session's task (uvicorn's "accepted" too) names the session.
    named = logs.SESSION.set(connection.session.id)
    try:
        await send({"type": "websocket.accept", "subprotocol": chosen, "headers": []})
        await connection.run()
    finally:
        logs.SESSION.reset(named)


async def refuse_handshake(
    scope: Scope,
    send: AsgiSend,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a handshake with an HTTP error and the REST error body instead of accepting it.

    That needs the ASGI "websocket.http.response" extension (uvicorn has it). Without
    it, closing before accepting is the only refusal there is, and servers send 403.
    """
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": ""})
        return
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _internal_channel(channel: str, claims: Claims) -> str:
    """The name ``Live`` knows a channel by: ``me`` is the employee's own."""
    if channel == "me" and claims.employee is not None:
        return me_channel_name(claims.employee)
    return channel


def _nothing() -> None:
    pass
