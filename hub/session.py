"""One WebSocket session as a state machine: frames in, actions out, no I/O.

The asyncio layer in ``hub/ws.py`` feeds decoded frames to ``Session.receive``
and carries out what comes back: send a frame, hand a punch to the
persistence worker, or close the socket.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec

from hub import protocol as p
from hub.auth import Authenticator
from hub.limits import FLOOD_WINDOW_S, FloodMemory, FrameLimiter, TenantConnections, Verdict
from hub.tokens import Claims, TokenError
from workers.persist import FUTURE_TOLERANCE, PunchRequest, Source

# Close codes (RFC 6455 reserves 4000-4999 for applications).
CLOSE_BAD_TOKEN: Final = 4001
CLOSE_HELLO_REQUIRED: Final = 4002
CLOSE_FLOOD: Final = 4008
CLOSE_SLOW_CONSUMER: Final = 4009
CLOSE_TOO_BIG: Final = 1009
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_RESTART: Final = 1012

# More bad frames than this within the window closes the socket with 4008.
BAD_FRAME_LIMIT: Final = 20
BAD_FRAME_WINDOW: Final = timedelta(seconds=10)


_SOURCES: Final[dict[str, Source]] = {"terminal": "terminal", "employee": "mobile", "admin": "api"}


def _identity(claims: Claims) -> tuple[str | None, ...]:
    return (claims.tenant, claims.role, claims.sub, claims.site, claims.employee)


class SessionState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


class IllegalTransition(RuntimeError):
    pass


# Actions are msgspec Structs rather than frozen dataclasses: every punch makes at least
# one, and a Struct is built in C where a frozen dataclass calls object.__setattr__ per field.
class Send(msgspec.Struct, frozen=True):
    frame: p.ServerFrame


class SubmitPunch(msgspec.Struct, frozen=True):
    request: PunchRequest
    ref: str | None


class Close(msgspec.Struct, frozen=True):
    code: int
    reason: str


class LimitReached(msgspec.Struct, frozen=True):
    """An abuse limit refused something; ``limit`` names it for the metrics."""

    limit: str


class Pause(msgspec.Struct, frozen=True):
    """Read nothing more from this client for ``seconds``: it is over its rate until then."""

    seconds: float


class Join(msgspec.Struct, frozen=True):
    """Subscribe this session to ``channel`` (its role may): answer ``subscribed`` and catch up."""

    channel: str
    since: int | None
    ref: str | None


class Leave(msgspec.Struct, frozen=True):
    channel: str
    ref: str | None


Action = Send | SubmitPunch | Close | LimitReached | Pause | Join | Leave

# Channels with a site after the colon; `me` has none.
SITE_CHANNELS: Final = ("presence", "terminals", "alerts")


class Session:
    """One connection's protocol state.

    ``limiter`` (optional) caps this session's frame rate. ``floods`` (optional) remembers
    the limiters of sessions closed for flooding, so that the same identity reconnecting
    carries on with it instead of a fresh one. ``tenants`` (optional) caps the sessions
    per tenant: a slot is taken at ``hello`` and given back by ``closed``, so the
    transport must call ``closed`` however the connection ends.
    """

    __slots__ = (
        "_bad_frames",
        "_floods",
        "_heartbeat_s",
        "_limiter",
        "_tenant_slot",
        "_tenants",
        "_tokens",
        "claims",
        "id",
        "state",
    )

    def __init__(
        self,
        tokens: Authenticator,
        *,
        heartbeat_s: int,
        limiter: FrameLimiter | None = None,
        floods: FloodMemory | None = None,
        tenants: TenantConnections | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.state = SessionState.AWAITING_HELLO
        self.claims: Claims | None = None
        self._tokens = tokens
        self._heartbeat_s = heartbeat_s
        # Lists, here and in FrameLimiter: rarely used, and a deque is 760 bytes however empty.
        self._bad_frames: list[datetime] = []
        self._limiter = limiter
        self._floods = floods
        self._tenants = tenants
        self._tenant_slot: str | None = None

    def receive(self, frame: p.ClientFrame, now: datetime) -> list[Action]:
        if self.state is SessionState.CLOSED:
            raise IllegalTransition("a closed session received a frame")
        limiter = self._limiter
        if limiter is not None:
            verdict = limiter.check(now.timestamp())
            if verdict is not Verdict.PASS:
                punch_id = frame.id if isinstance(frame, p.Punch) else None
                return self._rate_limited(limiter, verdict, frame.ref, punch_id, now)
        if self.state is SessionState.AWAITING_HELLO:
            if not isinstance(frame, p.Hello):
                return self._close(
                    CLOSE_HELLO_REQUIRED,
                    "hello_required",
                    "the first frame must be `hello` with a token",
                    frame.ref,
                )
            return self._hello(frame, now)
        claims = self.claims
        assert claims is not None
        if claims.exp <= now.timestamp():
            return self._close(CLOSE_BAD_TOKEN, "token_expired", "the token has expired", None)
        try:
            self._tokens.check(claims)
        except TokenError as exc:
            return self._close(CLOSE_BAD_TOKEN, "token_revoked", str(exc), frame.ref)
        match frame:
            case p.Punch():
                return self._punch(frame, claims, now)
            case p.Ping(t=t, ref=ref):
                return [Send(p.Pong(server_time=p.format_time(now), t=t, ref=ref))]
            case p.Refresh():
                return self._refresh(frame, claims)
            case p.Subscribe(channel=channel, since=since, ref=ref):
                refusal = channel_refusal(claims, channel)
                if refusal is not None:
                    return [Send(p.Error(code=refusal[0], message=refusal[1], ref=ref))]
                return [Join(channel, since, ref)]
            case p.Unsubscribe(channel=channel, ref=ref):
                refusal = channel_refusal(claims, channel)
                if refusal is not None and refusal[0] == "unknown_channel":
                    return [Send(p.Error(code=refusal[0], message=refusal[1], ref=ref))]
                # Leaving what one never joined (or may not join) is harmless: done.
                return [Leave(channel, ref)]
            case p.Hello():
                return [
                    Send(p.Error(code="bad_frame", message="already said hello", ref=frame.ref))
                ]
        raise AssertionError(f"unhandled frame {frame!r}")

    def bad_frame(self, message: str, ref: str | None, now: datetime) -> list[Action]:
        """A frame that failed to decode: answer it, and close on a flood of them."""
        if self.state is SessionState.CLOSED:
            raise IllegalTransition("a closed session received a frame")
        limiter = self._limiter
        if limiter is not None:
            verdict = limiter.check(now.timestamp())
            if verdict is not Verdict.PASS:
                return self._rate_limited(limiter, verdict, ref, None, now)
        self._bad_frames.append(now)
        while self._bad_frames and now - self._bad_frames[0] > BAD_FRAME_WINDOW:
            self._bad_frames.pop(0)
        if len(self._bad_frames) > BAD_FRAME_LIMIT:
            return self._close(
                CLOSE_FLOOD, "rate_limited", "too many malformed frames; slow down", ref
            )
        return [Send(p.Error(code="bad_frame", message=message, ref=ref))]

    def closed(self) -> None:
        """The connection has ended: give back the tenant slot, refuse further frames."""
        self.state = SessionState.CLOSED
        if self._tenant_slot is not None and self._tenants is not None:
            self._tenants.release(self._tenant_slot)
            self._tenant_slot = None

    def _rate_limited(
        self,
        limiter: FrameLimiter,
        verdict: Verdict,
        ref: str | None,
        punch_id: uuid.UUID | None,
        now: datetime,
    ) -> list[Action]:
        """Refuse a frame over the rate; a punch's error carries its id, so it is resent later.

        The transport then reads nothing from this client until the next frame would
        pass: a client sending faster than that is slowed by TCP, at no cost to the hub.
        """
        pace = f"send at most {limiter.rate_per_s} frames per second (bursts of {limiter.burst})"
        subject = "frame" if punch_id is None else f"punch {punch_id}"
        if verdict is Verdict.FLOOD:
            self.state = SessionState.CLOSED
            if self._floods is not None and self.claims is not None:
                self._floods.remember(_identity(self.claims), limiter, now.timestamp())
            message = (
                f"{subject} not processed and the connection closed: more than "
                f"{limiter.flood} frames over the rate limit within {FLOOD_WINDOW_S:g} s; "
                f"reconnect later and {pace}"
            )
            return [
                LimitReached("frame_flood"),
                Send(p.Error(code="rate_limited", message=message, ref=ref, id=punch_id)),
                Close(CLOSE_FLOOD, "rate_limited"),
            ]
        message = f"{subject} not processed: over the rate limit; resend it later and {pace}"
        return [
            LimitReached("frame_rate"),
            Send(p.Error(code="rate_limited", message=message, ref=ref, id=punch_id)),
            Pause(limiter.retry_after(now.timestamp())),
        ]

    def _hello(self, hello: p.Hello, now: datetime) -> list[Action]:
        try:
            claims = self._tokens.verify(hello.token)
        except TokenError as exc:
            return self._close(CLOSE_BAD_TOKEN, "bad_token", str(exc), hello.ref)
        tenants = self._tenants
        if tenants is not None:
            if not tenants.acquire(claims.tenant):
                return [
                    LimitReached("tenant_connections"),
                    *self._close(
                        CLOSE_TRY_AGAIN_LATER,
                        "too_many_connections",
                        f"tenant {claims.tenant} already has {tenants.cap} connections to this "
                        "hub; try again later",
                        hello.ref,
                    ),
                ]
            self._tenant_slot = claims.tenant
        if self._floods is not None:
            # Closed for flooding a moment ago: carry on from where that connection stopped.
            recalled = self._floods.recall(_identity(claims), now.timestamp())
            if recalled is not None:
                self._limiter = recalled
        self.claims = claims
        self.state = SessionState.OPEN
        welcome = p.Welcome(
            session=self.id,
            server_time=p.format_time(now),
            heartbeat_s=self._heartbeat_s,
            role=claims.role,
            tenant=claims.tenant,
            sub=claims.sub,
            ref=hello.ref,
        )
        return [Send(welcome)]

    def _punch(self, punch: p.Punch, claims: Claims, now: datetime) -> list[Action]:
        assert punch.id is not None and punch.kind is not None and punch.at is not None
        if claims.role == "supervisor":
            return _reject(punch, "forbidden", now)
        if claims.role == "employee" and punch.employee not in (None, claims.employee):
            return _reject(punch, "forbidden", now)
        try:
            at = punch.at.astimezone(UTC)
        except OverflowError:
            # A local time like 0001-01-01T00:00+05:00 has no UTC instant.
            return _reject(punch, "invalid_time", now)
        if at - now > FUTURE_TOLERANCE:
            return _reject(punch, "invalid_time", now)
        geo = punch.geo
        request = PunchRequest(
            tenant=claims.tenant,
            id=punch.id,
            kind=punch.kind,
            at=punch.at,
            received_at=now,
            source=_SOURCES[claims.role],
            employee=punch.employee,
            badge=punch.badge,
            site=claims.site if claims.role == "terminal" else None,
            device=claims.sub if claims.role == "terminal" else None,
            method=punch.method,
            seq=punch.seq,
            lat=geo.lat if geo else None,
            lon=geo.lon if geo else None,
            accuracy_m=geo.accuracy_m if geo else None,
            offline=punch.offline,
            only_employee=claims.employee if claims.role == "employee" else None,
        )
        return [SubmitPunch(request, punch.ref)]

    def _refresh(self, refresh: p.Refresh, claims: Claims) -> list[Action]:
        try:
            fresh = self._tokens.verify(refresh.token)
        except TokenError as exc:
            return self._close(CLOSE_BAD_TOKEN, "bad_token", str(exc), refresh.ref)
        if _identity(fresh) != _identity(claims):
            return [
                Send(
                    p.Error(
                        code="forbidden",
                        message="a refresh token must be for the same identity (tenant, role, "
                        "subject, site and employee)",
                        ref=refresh.ref,
                    )
                )
            ]
        self.claims = fresh
        expires = datetime.fromtimestamp(fresh.exp).astimezone()
        return [Send(p.Refreshed(expires_at=p.format_time(expires), ref=refresh.ref))]

    def _close(self, code: int, error_code: str, message: str, ref: str | None) -> list[Action]:
        self.state = SessionState.CLOSED
        return [Send(p.Error(code=error_code, message=message, ref=ref)), Close(code, error_code)]


def channel_refusal(claims: Claims, channel: str) -> tuple[str, str] | None:
    """Why ``claims`` may not subscribe to ``channel`` (an error code and message), or None.

    Admins may subscribe to every channel of their tenant, supervisors to those of
    their sites, terminals to ``presence:`` of their own site, employees to ``me``.
    """
    kind, colon, site = channel.partition(":")
    if channel == "me":
        if claims.role == "employee":
            return None
        return "forbidden", "`me` is an employee's own channel"
    if not colon or kind not in SITE_CHANNELS or not p.is_entity_id(site):
        return (
            "unknown_channel",
            f"no channel {channel!r}: channels are `presence:<site>`, `terminals:<site>`, "
            "`alerts:<site>` and `me`",
        )
    if claims.role == "terminal" and kind != "presence":
        return "forbidden", f"a terminal may subscribe only to presence:{claims.site}"
    if not claims.sees_site(site):
        return "forbidden", f"this token may not subscribe to {channel}"
    return None


def _reject(punch: p.Punch, reason: str, now: datetime) -> list[Action]:
    assert punch.id is not None
    ack = p.Ack(
        id=punch.id, status="rejected", reason=reason, received_at=p.format_time(now), ref=punch.ref
    )
    return [Send(ack)]
