"""The per-connection state machine (hub/session.py), fed values; no sockets, no sleeps."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hub import protocol as p
from hub.auth import Authenticator, DeviceRegistry, DeviceState
from hub.limits import FLOOD_WINDOW_S, FloodMemory, FrameLimiter, TenantConnections
from hub.session import (
    BAD_FRAME_LIMIT,
    BAD_FRAME_WINDOW,
    CLOSE_BAD_TOKEN,
    CLOSE_FLOOD,
    CLOSE_HELLO_REQUIRED,
    CLOSE_TRY_AGAIN_LATER,
    Close,
    IllegalTransition,
    LimitReached,
    Pause,
    Send,
    Session,
    SessionState,
    SubmitPunch,
)
from hub.tokens import TokenIssuer
from workers.persist import PunchRequest

SECRET = "session-test-secret-" + "s" * 32
ISSUER = TokenIssuer(SECRET)
# Devices whose tokens were revoked, by (tenant, device), as the hub would learn of them.
RETIRED: list[tuple[str, str, int]] = []
DEVICES = DeviceRegistry(lambda tenant, device, version: RETIRED.append((tenant, device, version)))
AUTH = Authenticator(ISSUER, DEVICES)
TENANT = "acme"
HEARTBEAT_S = 25
PUNCH_ID = uuid.UUID("6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70")
CODECS = [p.Codec(name) for name in p.SUBPROTOCOLS]


def token(role: Any, sub: str, *, tenant: str = TENANT, ttl_s: int = 3600, **claims: Any) -> str:
    return ISSUER.issue(tenant=tenant, role=role, sub=sub, ttl_s=ttl_s, **claims)[0]


TERMINAL = token("terminal", "door", site="hq")
EMPLOYEE = token("employee", "phone-e1", employee="e1")
SUPERVISOR = token("supervisor", "boss", sites=["*"])
ADMIN = token("admin", "ops")


def now() -> datetime:
    # Tokens carry real expiry times, so the session clock starts at the real time.
    return datetime.now(UTC)


def opened(hello_token: str, at: datetime, **limits: Any) -> Session:
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S, **limits)
    actions = session.receive(p.Hello(token=hello_token), at)
    assert [type(a) for a in actions] == [Send], actions
    assert isinstance(actions[0], Send) and isinstance(actions[0].frame, p.Welcome)
    assert session.state is SessionState.OPEN
    return session


def punch(at: datetime, **fields: Any) -> p.Punch:
    fields.setdefault("employee", None if "badge" in fields else "e1")
    return p.Punch(id=fields.pop("id", PUNCH_ID), kind=fields.pop("kind", "in"), at=at, **fields)


def closing(actions: list[Any], error_code: str, close_code: int, ref: str | None = None) -> None:
    """Assert the actions are exactly: an error frame, then a close."""
    assert len(actions) == 2, actions
    send, close = actions
    assert isinstance(send, Send) and isinstance(send.frame, p.Error)
    assert (send.frame.code, send.frame.ref) == (error_code, ref)
    assert send.frame.message
    assert close == Close(close_code, error_code)


def rejected(
    actions: list[Any], reason: str, received_at: datetime, ref: str | None = None
) -> None:
    [action] = actions
    assert isinstance(action, Send) and isinstance(action.frame, p.Ack)
    # What the client reads: the punch's id in canonical form, whatever type holds it here.
    expected = {
        "type": "ack",
        "id": str(PUNCH_ID),
        "status": "rejected",
        "reason": reason,
        "received_at": p.format_time(received_at),
    }
    if ref is not None:
        expected["ref"] = ref
    assert msgspec.json.decode(p.Codec(p.JSON_SUBPROTOCOL).encode(action.frame)) == expected


# -- hello ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        p.Ping(t=1, ref="first"),
        p.Subscribe(channel="presence:hq", ref="first"),
        p.Unsubscribe(channel="presence:hq", ref="first"),
        p.Refresh(token=TERMINAL, ref="first"),
        p.Punch(id=PUNCH_ID, kind="in", at=datetime(2026, 1, 5, tzinfo=UTC), employee="e1",
                ref="first"),
    ],
)  # fmt: skip
def test_the_first_frame_must_be_hello(first: p.ClientFrame) -> None:
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    closing(session.receive(first, now()), "hello_required", CLOSE_HELLO_REQUIRED, "first")
    assert session.state is SessionState.CLOSED and session.claims is None


def test_welcome_carries_session_time_heartbeat_and_identity() -> None:
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    moment = datetime(2026, 1, 5, 8, 0, 0, 123_456, tzinfo=UTC)
    live = token("terminal", "door", site="hq", ttl_s=10**9)
    actions = session.receive(p.Hello(token=live, client="fw/2", ref="h"), moment)
    assert actions == [
        Send(
            p.Welcome(
                session=session.id,
                server_time="2026-01-05T08:00:00.123Z",
                heartbeat_s=HEARTBEAT_S,
                role="terminal",
                tenant=TENANT,
                sub="door",
                ref="h",
            )
        )
    ]
    assert session.claims is not None and session.claims.site == "hq"
    assert Session(AUTH, heartbeat_s=1).id != session.id


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "",
        "a.b.c",
        TokenIssuer("another-secret-" + "z" * 32).issue(tenant=TENANT, role="admin", sub="x")[0],
        token("terminal", "door"),  # a terminal token without a site
        token("employee", "phone"),  # an employee token without an employee
    ],
)
def test_a_bad_token_is_refused_with_bad_token_and_close_4001(bad: str) -> None:
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    closing(session.receive(p.Hello(token=bad, ref="h"), now()), "bad_token", CLOSE_BAD_TOKEN, "h")
    assert session.state is SessionState.CLOSED and session.claims is None


def test_an_expired_token_is_refused_at_hello() -> None:
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    actions = session.receive(p.Hello(token=token("admin", "ops", ttl_s=-5)), now())
    closing(actions, "bad_token", CLOSE_BAD_TOKEN)
    assert "expired" in actions[0].frame.message


def test_a_token_that_expires_during_the_session_closes_it_4001() -> None:
    start = now()
    session = opened(token("terminal", "door", site="hq", ttl_s=60), start)
    assert isinstance(session.receive(p.Ping(), start + timedelta(seconds=50))[0].frame, p.Pong)
    actions = session.receive(p.Ping(ref="late"), start + timedelta(seconds=61))
    closing(actions, "token_expired", CLOSE_BAD_TOKEN)
    assert session.state is SessionState.CLOSED


def test_a_second_hello_is_a_bad_frame_and_changes_nothing() -> None:
    session = opened(TERMINAL, now())
    actions = session.receive(p.Hello(token=ADMIN, ref="again"), now())
    assert len(actions) == 1 and isinstance(actions[0], Send)
    assert isinstance(actions[0].frame, p.Error)
    assert (actions[0].frame.code, actions[0].frame.ref) == ("bad_frame", "again")
    assert session.claims is not None and session.claims.role == "terminal"
    assert session.state is SessionState.OPEN


# -- punch ---------------------------------------------------------------------------------


def test_a_terminal_punch_is_submitted_with_its_site_and_device() -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    at = moment - timedelta(minutes=3)
    frame = punch(at, method="badge", seq=7, geo=p.Geo(lat=1.5, lon=2.5, accuracy_m=9.0),
                  offline=True, ref="r1")  # fmt: skip
    actions = session.receive(frame, moment)
    assert actions == [
        SubmitPunch(
            PunchRequest(
                tenant=TENANT,
                id=PUNCH_ID,
                kind="in",
                at=at,
                received_at=moment,
                source="terminal",
                employee="e1",
                badge=None,
                site="hq",
                device="door",
                method="badge",
                seq=7,
                lat=1.5,
                lon=2.5,
                accuracy_m=9.0,
                offline=True,
                only_employee=None,
            ),
            "r1",
        )
    ]


def test_a_terminal_badge_punch_leaves_the_employee_to_be_resolved() -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    [action] = session.receive(punch(moment, badge="b7", kind="break_end"), moment)
    assert isinstance(action, SubmitPunch) and action.ref is None
    request = action.request
    assert (request.employee, request.badge, request.kind) == (None, "b7", "break_end")
    assert (request.lat, request.lon, request.accuracy_m, request.offline) == (
        None,
        None,
        None,
        False,
    )


@pytest.mark.parametrize("fields", [{"employee": "e1"}, {"badge": "b1"}])
def test_an_employee_punches_for_itself_from_mobile(fields: dict[str, str]) -> None:
    moment = now()
    session = opened(EMPLOYEE, moment)
    [action] = session.receive(punch(moment, method="mobile", **fields), moment)
    assert isinstance(action, SubmitPunch)
    request = action.request
    assert request.only_employee == "e1" and request.source == "mobile"
    assert (request.site, request.device) == (None, None)
    assert (request.employee, request.badge) == (fields.get("employee"), fields.get("badge"))


def test_an_employee_may_not_punch_for_another() -> None:
    moment = now()
    session = opened(EMPLOYEE, moment)
    rejected(
        session.receive(punch(moment, employee="e2", ref="x"), moment), "forbidden", moment, "x"
    )
    assert session.state is SessionState.OPEN


@pytest.mark.parametrize("sites", [["hq"], ["*"], []])
def test_a_supervisor_may_not_punch(sites: list[str]) -> None:
    moment = now()
    session = opened(token("supervisor", "boss", sites=sites), moment)
    rejected(session.receive(punch(moment), moment), "forbidden", moment)


def test_an_admin_punch_is_an_api_punch_at_the_home_site() -> None:
    moment = now()
    session = opened(ADMIN, moment)
    [action] = session.receive(punch(moment), moment)
    assert isinstance(action, SubmitPunch)
    assert (action.request.source, action.request.site, action.request.device) == (
        "api",
        None,
        None,
    )
    assert action.request.only_employee is None


@pytest.mark.parametrize(
    ("ahead", "accepted"),
    [
        (timedelta(minutes=-600), True),
        (timedelta(minutes=4), True),
        (timedelta(minutes=5), True),
        (timedelta(minutes=5, milliseconds=1), False),
        (timedelta(minutes=6), False),
        (timedelta(days=400), False),
    ],
)
def test_punches_more_than_five_minutes_ahead_are_invalid_time(
    ahead: timedelta, accepted: bool
) -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    actions = session.receive(punch(moment + ahead, ref="t"), moment)
    if accepted:
        assert [type(a) for a in actions] == [SubmitPunch]
    else:
        rejected(actions, "invalid_time", moment, "t")


def test_the_future_limit_holds_across_offsets() -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    # Six minutes ahead, written in a zone 10 hours behind UTC.
    at = (moment + timedelta(minutes=6)).astimezone(timezone(timedelta(hours=-10)))
    rejected(session.receive(punch(at), moment), "invalid_time", moment)


# -- ping, refresh -------------------------------------------------------------------------


def test_ping_gets_pong_with_server_time_and_the_clients_t() -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    assert session.receive(p.Ping(t=1767225600000, ref="p"), moment) == [
        Send(p.Pong(server_time=p.format_time(moment), t=1767225600000, ref="p"))
    ]
    assert session.receive(p.Ping(), moment) == [Send(p.Pong(server_time=p.format_time(moment)))]


def test_refresh_with_the_same_identity_extends_the_session() -> None:
    start = now()
    session = opened(token("employee", "phone-e1", employee="e1", ttl_s=60), start)
    fresh = token("employee", "phone-e1", employee="e1", ttl_s=7200)
    expires = ISSUER.verify(fresh).exp
    actions = session.receive(p.Refresh(token=fresh, ref="f"), start + timedelta(seconds=30))
    expected = p.format_time(datetime.fromtimestamp(expires, UTC))
    assert actions == [Send(p.Refreshed(expires_at=expected, ref="f"))]
    # The old token's expiry has passed; the refreshed one keeps the session up.
    later = start + timedelta(minutes=30)
    assert session.receive(p.Ping(), later) == [Send(p.Pong(server_time=p.format_time(later)))]


@pytest.mark.parametrize(
    "other",
    [
        token("terminal", "back-door", site="hq"),
        token("terminal", "door", tenant="other", site="hq"),
        token("admin", "door"),
    ],
)
def test_refresh_for_another_identity_is_forbidden_and_keeps_the_old_one(other: str) -> None:
    start = now()
    session = opened(token("terminal", "door", site="hq", ttl_s=60), start)
    actions = session.receive(p.Refresh(token=other, ref="f"), start)
    assert len(actions) == 1 and isinstance(actions[0], Send)
    assert isinstance(actions[0].frame, p.Error)
    assert (actions[0].frame.code, actions[0].frame.ref) == ("forbidden", "f")
    assert session.state is SessionState.OPEN
    assert session.claims is not None and (session.claims.tenant, session.claims.sub) == (
        TENANT,
        "door",
    )
    # The refused token did not extend the session either.
    closing(session.receive(p.Ping(), start + timedelta(seconds=61)), "token_expired", 4001)


@pytest.mark.parametrize("bad", ["garbage", token("terminal", "door", site="hq", ttl_s=-1)])
def test_refresh_with_a_bad_token_closes_4001(bad: str) -> None:
    session = opened(TERMINAL, now())
    closing(
        session.receive(p.Refresh(token=bad, ref="f"), now()), "bad_token", CLOSE_BAD_TOKEN, "f"
    )
    assert session.state is SessionState.CLOSED


# -- bad frames ----------------------------------------------------------------------------


def test_bad_frames_are_answered_and_a_flood_closes_4008() -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    for n in range(BAD_FRAME_LIMIT):
        actions = session.bad_frame("frame needs a `type` field", f"b{n}", moment)
        assert actions == [
            Send(p.Error(code="bad_frame", message="frame needs a `type` field", ref=f"b{n}"))
        ]
    closing(session.bad_frame("again", "last", moment), "rate_limited", CLOSE_FLOOD, "last")
    assert session.state is SessionState.CLOSED


def test_the_flood_limit_counts_only_the_window() -> None:
    start = now()
    session = opened(TERMINAL, start)
    for _ in range(BAD_FRAME_LIMIT):
        assert len(session.bad_frame("bad", None, start)) == 1
    # Just after the window the earlier ones no longer count ...
    after = start + BAD_FRAME_WINDOW + timedelta(milliseconds=1)
    assert len(session.bad_frame("bad", None, after)) == 1
    # ... but one more just inside the same window as the first burst would have closed.
    inside = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    for _ in range(BAD_FRAME_LIMIT):
        inside.bad_frame("bad", None, start)
    closing(inside.bad_frame("bad", None, start + BAD_FRAME_WINDOW), "rate_limited", CLOSE_FLOOD)


def test_bad_frames_spread_out_in_time_never_close() -> None:
    start = now()
    session = opened(TERMINAL, start)
    spacing = BAD_FRAME_WINDOW / (BAD_FRAME_LIMIT - 3)
    for n in range(10 * BAD_FRAME_LIMIT):
        actions = session.bad_frame("bad", None, start + n * spacing)
        assert [type(a) for a in actions] == [Send], n
    assert session.state is SessionState.OPEN


def test_good_frames_do_not_reset_the_flood_count() -> None:
    moment = now()
    session = opened(TERMINAL, moment)
    for _ in range(BAD_FRAME_LIMIT):
        session.bad_frame("bad", None, moment)
        session.receive(p.Ping(), moment)
    closing(session.bad_frame("bad", None, moment), "rate_limited", CLOSE_FLOOD)


# -- frame rate ----------------------------------------------------------------------------


def limited(rate_per_s: int = 1, burst: int = 3, flood: int = 5) -> FrameLimiter:
    return FrameLimiter(rate_per_s=rate_per_s, burst=burst, flood=flood)


def refused(
    actions: list[Any],
    ref: str | None = None,
    punch_id: uuid.UUID | None = None,
    pause: float = 1.0,
    rate: int = 1,
) -> None:
    """Assert the actions are exactly: count a refusal, send `rate_limited`, stop reading.

    Nothing is processed. With a rate of 1 frame/s and an empty bucket, the next
    frame passes in 1 s, so the transport is told to read nothing for ``pause`` s.
    """
    assert len(actions) == 3, actions
    assert actions[0] == LimitReached("frame_rate")
    assert isinstance(actions[1], Send) and isinstance(actions[1].frame, p.Error)
    error = actions[1].frame
    assert (error.code, error.ref, error.id) == ("rate_limited", ref, punch_id)
    assert f"{rate} frames per second" in error.message
    assert isinstance(actions[2], Pause)
    assert actions[2].seconds == pytest.approx(pause, abs=1e-5)


def test_frames_over_the_rate_get_rate_limited_and_are_not_processed() -> None:
    moment = now()
    session = opened(TERMINAL, moment, limiter=limited(burst=3))
    assert [type(a) for a in session.receive(p.Ping(ref="a"), moment)] == [Send]
    assert [type(a) for a in session.receive(punch(moment, ref="b"), moment)] == [SubmitPunch]
    refused(session.receive(p.Ping(ref="c"), moment), "c")
    assert session.state is SessionState.OPEN


def test_a_rate_limited_punch_carries_its_id_and_is_taken_once_the_rate_allows() -> None:
    moment = now()
    session = opened(TERMINAL, moment, limiter=limited(burst=1))
    actions = session.receive(punch(moment, ref="p1"), moment)
    refused(actions, "p1", PUNCH_ID)
    assert str(PUNCH_ID) in actions[1].frame.message
    later = moment + timedelta(seconds=1)
    [submit] = session.receive(punch(moment, ref="p1"), later)
    assert isinstance(submit, SubmitPunch) and submit.request.id == PUNCH_ID


def test_malformed_frames_count_against_the_rate_too() -> None:
    moment = now()
    session = opened(TERMINAL, moment, limiter=limited(burst=2))
    assert session.bad_frame("bad", "x", moment) == [
        Send(p.Error(code="bad_frame", message="bad", ref="x"))
    ]
    refused(session.bad_frame("bad", "y", moment), "y")
    refused(session.receive(p.Ping(ref="z"), moment), "z")


def test_a_flood_of_refused_frames_closes_4008_with_the_punch_id() -> None:
    moment = now()
    session = opened(TERMINAL, moment, limiter=limited(burst=1, flood=3))
    for n in range(3):
        refused(session.receive(p.Ping(ref=f"r{n}"), moment), f"r{n}")
    actions = session.receive(punch(moment, ref="last"), moment)
    assert len(actions) == 3, actions
    count, send, close = actions
    assert count == LimitReached("frame_flood")
    assert isinstance(send, Send) and isinstance(send.frame, p.Error)
    assert (send.frame.code, send.frame.ref, send.frame.id) == ("rate_limited", "last", PUNCH_ID)
    assert "more than 3 frames" in send.frame.message
    assert close == Close(CLOSE_FLOOD, "rate_limited")
    assert session.state is SessionState.CLOSED


def test_frames_at_the_sustained_rate_are_never_refused() -> None:
    start = now()
    session = opened(TERMINAL, start, limiter=limited(rate_per_s=5, burst=1, flood=0))
    for n in range(1, 500):
        at = start + timedelta(milliseconds=200 * n)
        assert [type(a) for a in session.receive(punch(at), at)] == [SubmitPunch], n


def test_the_pause_lasts_until_the_next_frame_would_pass() -> None:
    moment = now()
    session = opened(TERMINAL, moment, limiter=limited(rate_per_s=4, burst=1))
    quarter = timedelta(seconds=0.25)
    refused(session.receive(p.Ping(), moment), pause=0.25, rate=4)
    refused(session.receive(p.Ping(), moment + quarter * 0.6), pause=0.1, rate=4)
    # A client that waited out the pause gets its next frame through.
    assert [type(a) for a in session.receive(p.Ping(), moment + quarter)] == [Send]


def flooded(session: Session, at: datetime) -> None:
    """Send pings until the session closes for flooding."""
    for _ in range(1000):
        actions = session.receive(p.Ping(), at)
        if session.state is SessionState.CLOSED:
            assert actions[0] == LimitReached("frame_flood")
            assert actions[-1] == Close(CLOSE_FLOOD, "rate_limited")
            return
    raise AssertionError("the session never closed")


def test_reconnecting_after_a_flood_carries_on_with_the_closed_connections_limiter() -> None:
    moment = now()
    floods = FloodMemory()
    first = opened(TERMINAL, moment, limiter=limited(burst=3, flood=5), floods=floods)
    flooded(first, moment)
    first.closed()
    # A fresh connection would get a full bucket; this one is refused and closed at once.
    again = opened(TERMINAL, moment, limiter=limited(burst=3, flood=5), floods=floods)
    actions = again.receive(punch(moment, ref="p"), moment)
    assert actions[0] == LimitReached("frame_flood")
    assert again.state is SessionState.CLOSED
    # Other identities are not affected.
    other = opened(EMPLOYEE, moment, limiter=limited(burst=3, flood=5), floods=floods)
    assert [type(a) for a in other.receive(p.Ping(), moment)] == [Send]


def test_a_flooder_that_stays_away_until_its_limiter_settles_starts_afresh() -> None:
    moment = now()
    floods = FloodMemory()
    flooded(opened(TERMINAL, moment, limiter=limited(burst=3, flood=5), floods=floods), moment)
    assert len(floods) == 1
    # The bucket (3 tokens at 1/s) is full after 3 s; the refusals leave the window later.
    early = moment + timedelta(seconds=FLOOD_WINDOW_S - 1)
    probation = opened(TERMINAL, early, limiter=limited(burst=3, flood=5), floods=floods)
    for _ in range(3):
        assert [type(a) for a in probation.receive(p.Ping(), early)] == [Send]
    assert probation.receive(p.Ping(), early)[0] == LimitReached("frame_flood")
    # That refusal is remembered in turn; once it too has left the window, all is forgotten.
    settled = early + timedelta(seconds=FLOOD_WINDOW_S + 0.1)
    fresh = opened(TERMINAL, settled, limiter=limited(burst=3, flood=5), floods=floods)
    assert len(floods) == 0
    # Its own bucket, of which hello took one token.
    for _ in range(2):
        assert [type(a) for a in fresh.receive(p.Ping(), settled)] == [Send]
    refused(fresh.receive(p.Ping(), settled))
    assert fresh.state is SessionState.OPEN


def test_the_rate_applies_before_hello_too() -> None:
    moment = now()
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S, limiter=limited(burst=1))
    assert session.bad_frame("bad", None, moment)[0] == Send(
        p.Error(code="bad_frame", message="bad", ref=None)
    )
    refused(session.receive(p.Hello(token=TERMINAL, ref="h"), moment), "h")
    assert session.state is SessionState.AWAITING_HELLO


# -- connections per tenant ----------------------------------------------------------------


def test_a_hello_over_the_tenant_cap_is_refused_and_closed_1013() -> None:
    tenants = TenantConnections(cap=2)
    first = opened(TERMINAL, now(), tenants=tenants)
    opened(EMPLOYEE, now(), tenants=tenants)
    third = Session(AUTH, heartbeat_s=HEARTBEAT_S, tenants=tenants)
    actions = third.receive(p.Hello(token=ADMIN, ref="h"), now())
    assert actions[0] == LimitReached("tenant_connections")
    closing(actions[1:], "too_many_connections", CLOSE_TRY_AGAIN_LATER, "h")
    assert third.claims is None and third.state is SessionState.CLOSED
    # Giving back a slot lets the next one in.
    third.closed()
    assert tenants.count(TENANT) == 2
    first.closed()
    assert tenants.count(TENANT) == 1
    opened(ADMIN, now(), tenants=tenants)
    assert tenants.count(TENANT) == 2


def test_the_cap_is_per_tenant() -> None:
    tenants = TenantConnections(cap=1)
    opened(TERMINAL, now(), tenants=tenants)
    opened(token("terminal", "door", tenant="other", site="hq"), now(), tenants=tenants)
    assert (tenants.count(TENANT), tenants.count("other")) == (1, 1)


def test_a_session_gives_its_slot_back_once_however_it_closed() -> None:
    tenants = TenantConnections(cap=5)
    by_transport = opened(TERMINAL, now(), tenants=tenants)
    by_bad_refresh = opened(TERMINAL, now(), tenants=tenants)
    by_flood = opened(TERMINAL, now(), tenants=tenants, limiter=limited(burst=1, flood=0))
    never_opened = Session(AUTH, heartbeat_s=HEARTBEAT_S, tenants=tenants)
    never_opened.receive(p.Hello(token="garbage"), now())
    assert tenants.count(TENANT) == 3
    by_bad_refresh.receive(p.Refresh(token="garbage"), now())
    by_flood.receive(p.Ping(), now())
    # Closed by the protocol, the slot stays held until the transport has really closed.
    assert tenants.count(TENANT) == 3
    for session in (by_transport, by_bad_refresh, by_flood, never_opened):
        session.closed()
        session.closed()
    assert tenants.count(TENANT) == 0


# -- after close ---------------------------------------------------------------------------


def test_a_closed_session_refuses_every_frame() -> None:
    session = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    session.receive(p.Ping(), now())
    with pytest.raises(IllegalTransition):
        session.receive(p.Hello(token=TERMINAL), now())
    with pytest.raises(IllegalTransition):
        session.bad_frame("bad", None, now())


def test_a_session_closed_by_the_transport_refuses_frames() -> None:
    session = opened(TERMINAL, now())
    session.closed()
    assert session.state is SessionState.CLOSED
    with pytest.raises(IllegalTransition):
        session.receive(p.Ping(), now())


# -- any sequence of frames ----------------------------------------------------------------

START = now()
TOKENS = [
    TERMINAL,
    EMPLOYEE,
    SUPERVISOR,
    ADMIN,
    token("terminal", "door", site="hq", ttl_s=120),
    token("employee", "phone-e1", employee="e1", ttl_s=300),
    token("terminal", "door", tenant="other", site="hq"),
    token("admin", "ops", ttl_s=-5),
    "garbage",
    "",
]

refs = st.none() | st.text(max_size=20)
times = st.one_of(
    st.timedeltas(min_value=timedelta(hours=-2), max_value=timedelta(minutes=30)).map(
        lambda delta: START + delta
    ),
    st.datetimes(timezones=st.timezones()),
)
people = st.one_of(
    st.tuples(st.sampled_from(["e1", "e2", "x"]), st.none()),
    st.tuples(st.none(), st.sampled_from(["b1", "b2"])),
)
geos = st.none() | st.builds(
    p.Geo,
    lat=st.floats(-90, 90),
    lon=st.floats(-180, 180),
    accuracy_m=st.none() | st.floats(0, 1e6),
)
punches = st.builds(
    lambda who, **fields: p.Punch(employee=who[0], badge=who[1], **fields),
    who=people,
    id=st.uuids(),
    kind=st.sampled_from(["in", "out", "break_start", "break_end"]),
    at=times,
    method=st.none() | st.sampled_from(["badge", "pin", "face", "fingerprint", "mobile", "manual"]),
    seq=st.none() | st.integers(0, 2**63 - 1),
    geo=geos,
    offline=st.booleans(),
    ref=refs,
)
client_frames = st.one_of(
    st.builds(p.Hello, token=st.sampled_from(TOKENS), ref=refs),
    punches,
    st.builds(p.Ping, t=st.none() | st.integers(-(2**63), 2**63 - 1), ref=refs),
    st.builds(p.Refresh, token=st.sampled_from(TOKENS), ref=refs),
    st.builds(p.Subscribe, channel=st.sampled_from(["presence:hq", "me", "x"]), ref=refs),
    st.builds(p.Unsubscribe, channel=st.sampled_from(["presence:hq", "me"]), ref=refs),
)
steps = st.timedeltas(min_value=timedelta(0), max_value=timedelta(seconds=20))


class SessionMachine(RuleBasedStateMachine):
    """Any frames, bad frames and transport closes, in any order: only what the contract allows."""

    def __init__(self) -> None:
        super().__init__()
        self.tenants = TenantConnections(cap=1)
        self.session = Session(
            AUTH, heartbeat_s=HEARTBEAT_S, limiter=limited(rate_per_s=2, burst=4, flood=6),
            tenants=self.tenants,
        )  # fmt: skip
        self.clock = START
        self.saw_welcome = False
        self.transport_gone = False

    def step(self, call: Any, frame: p.ClientFrame | None) -> None:
        before = self.session.state
        actions = call()
        assert actions, "every frame gets an answer"
        closes = [a for a in actions if isinstance(a, Close)]
        if closes:
            assert len(closes) == 1 and actions[-1] is closes[0]
            assert self.session.state is SessionState.CLOSED
            assert isinstance(actions[-2], Send) and isinstance(actions[-2].frame, p.Error)
        else:
            assert self.session.state is not SessionState.CLOSED
        for action in actions:
            if isinstance(action, Send):
                for codec in CODECS:
                    codec.encode(action.frame)
                if isinstance(action.frame, p.Error) and action.frame.code == "rate_limited":
                    # A punch is never dropped without its id, so the client knows to resend it.
                    assert action.frame.id == (frame.id if isinstance(frame, p.Punch) else None)
                if isinstance(action.frame, p.Welcome):
                    assert not self.saw_welcome and isinstance(frame, p.Hello)
                    self.saw_welcome = True
            if isinstance(action, SubmitPunch):
                claims = self.session.claims
                assert before is SessionState.OPEN and claims is not None
                assert isinstance(frame, p.Punch) and action.ref == frame.ref
                request = action.request
                assert request.tenant == claims.tenant and claims.role != "supervisor"
                assert request.at - self.clock <= timedelta(minutes=5)
                assert request.received_at == self.clock
                if claims.role == "employee":
                    assert request.only_employee == claims.employee
                    assert request.employee in (None, claims.employee)
                if claims.role == "terminal":
                    assert (request.site, request.device) == (claims.site, claims.sub)

    @precondition(lambda self: self.session.state is not SessionState.CLOSED)
    @rule(frame=client_frames, advance=steps)
    def receive(self, frame: p.ClientFrame, advance: timedelta) -> None:
        self.clock += advance
        self.step(lambda: self.session.receive(frame, self.clock), frame)

    @precondition(lambda self: self.session.state is not SessionState.CLOSED)
    @rule(message=st.text(min_size=1, max_size=30), ref=refs, advance=steps)
    def bad_frame(self, message: str, ref: str | None, advance: timedelta) -> None:
        self.clock += advance
        self.step(lambda: self.session.bad_frame(message, ref, self.clock), None)

    @precondition(lambda self: self.session.state is SessionState.AWAITING_HELLO)
    @rule(hello_token=st.sampled_from(TOKENS[:6]))
    def good_hello(self, hello_token: str) -> None:
        hello = p.Hello(token=hello_token)
        self.step(lambda: self.session.receive(hello, self.clock), hello)

    @precondition(lambda self: self.session.state is not SessionState.CLOSED)
    @rule()
    def transport_closed(self) -> None:
        self.session.closed()
        self.transport_gone = True

    @precondition(lambda self: self.session.state is SessionState.CLOSED)
    @rule(frame=client_frames, message=st.text(max_size=10))
    def after_close(self, frame: p.ClientFrame, message: str) -> None:
        with pytest.raises(IllegalTransition):
            self.session.receive(frame, self.clock)
        with pytest.raises(IllegalTransition):
            self.session.bad_frame(message, None, self.clock)

    @invariant()
    def open_means_authenticated(self) -> None:
        if self.session.state is SessionState.OPEN:
            assert self.session.claims is not None

    @invariant()
    def a_tenant_slot_is_held_from_welcome_until_the_transport_closes(self) -> None:
        held = self.tenants.count(TENANT) + self.tenants.count("other")
        assert held == (self.session.claims is not None and not self.transport_gone)


SessionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSessionMachine = SessionMachine.TestCase


# -- revoked devices ----------------------------------------------------------------------


def test_a_revoked_device_is_closed_on_its_next_frame_and_cannot_say_hello_again() -> None:
    device = f"door-{uuid.uuid4().hex[:6]}"
    live = token("terminal", device, site="hq")
    session = opened(live, now())
    DEVICES.apply(TENANT, device, DeviceState(2, revoked=True))
    assert RETIRED[-1] == (TENANT, device, 2)
    closing(session.receive(p.Ping(ref="after"), now()), "token_revoked", CLOSE_BAD_TOKEN, "after")
    fresh = Session(AUTH, heartbeat_s=HEARTBEAT_S)
    closing(fresh.receive(p.Hello(token=live, ref="h"), now()), "bad_token", CLOSE_BAD_TOKEN, "h")


def test_a_replaced_device_token_stops_working_and_the_new_one_works() -> None:
    device = f"door-{uuid.uuid4().hex[:6]}"
    old = token("terminal", device, site="hq")
    DEVICES.apply(TENANT, device, DeviceState(3, revoked=False))
    closing(
        Session(AUTH, heartbeat_s=HEARTBEAT_S).receive(p.Hello(token=old), now()),
        "bad_token",
        CLOSE_BAD_TOKEN,
    )
    current = token("terminal", device, site="hq", version=3)
    session = opened(current, now())
    assert session.state is SessionState.OPEN
    [pong] = session.receive(p.Ping(), now())
    assert isinstance(pong, Send) and isinstance(pong.frame, p.Pong)


def test_other_tenants_and_roles_are_untouched_by_a_revocation() -> None:
    device = f"door-{uuid.uuid4().hex[:6]}"
    DEVICES.apply("other-tenant", device, DeviceState(9, revoked=True))
    session = opened(token("terminal", device, site="hq"), now())
    employee = opened(token("employee", device, employee="e1"), now())
    for open_session in (session, employee):
        [pong] = open_session.receive(p.Ping(), now())
        assert isinstance(pong, Send) and isinstance(pong.frame, p.Pong)
