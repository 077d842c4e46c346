"""The wire frames (hub/protocol.py): both codecs, both directions, and hostile input."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub import protocol as p

PUNCH_ID = "6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70"
BOTH = [p.JSON_SUBPROTOCOL, p.MSGPACK_SUBPROTOCOL]
SERVER_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def encode_client(frame: Any, subprotocol: str) -> bytes | str:
    """What a client puts on the wire for ``frame`` under ``subprotocol``."""
    if subprotocol == p.MSGPACK_SUBPROTOCOL:
        return msgspec.msgpack.encode(frame)
    return json.dumps(frame)


def decode_server(data: bytes, subprotocol: str) -> Any:
    """What a client reads back from a server frame's bytes."""
    if subprotocol == p.MSGPACK_SUBPROTOCOL:
        return msgspec.msgpack.decode(data)
    return json.loads(data)


def decode_or_frame_error(codec: p.Codec, payload: bytes | str) -> p.ClientFrame | None:
    """Decode, allowing exactly one failure mode: ``FrameError``."""
    try:
        frame = codec.decode(payload)
    except p.FrameError as exc:
        assert str(exc)
        assert exc.ref is None or isinstance(exc.ref, str)
        return None
    assert isinstance(frame, p.ClientFrame)
    return frame


# -- client frames: both codecs decode what a client sends -------------------------------


@pytest.mark.parametrize("subprotocol", BOTH)
def test_hello_decodes(subprotocol: str) -> None:
    frame = {"type": "hello", "token": "tok.en", "client": "door-fw/1.2", "ref": "h1"}
    hello = p.Codec(subprotocol).decode(encode_client(frame, subprotocol))
    assert hello == p.Hello(token="tok.en", client="door-fw/1.2", ref="h1")


@pytest.mark.parametrize("subprotocol", BOTH)
def test_full_punch_decodes(subprotocol: str) -> None:
    frame = {
        "type": "punch",
        "id": PUNCH_ID,
        "employee": "e-1.x_y",
        "kind": "break_start",
        "at": "2026-03-29T03:30:00.250+02:00",
        "method": "fingerprint",
        "seq": 2**63 - 1,
        "geo": {"lat": -33.5, "lon": 151.25, "accuracy_m": 12.5},
        "offline": True,
        "ref": "r7",
    }
    punch = p.Codec(subprotocol).decode(encode_client(frame, subprotocol))
    assert isinstance(punch, p.Punch)
    assert punch.id == uuid.UUID(PUNCH_ID)
    assert punch.employee == "e-1.x_y" and punch.badge is None
    assert punch.kind == "break_start"
    assert punch.at == datetime(2026, 3, 29, 1, 30, 0, 250_000, tzinfo=UTC)
    assert punch.at.utcoffset() == timedelta(hours=2)
    assert (punch.method, punch.seq, punch.offline, punch.ref) == (
        "fingerprint",
        2**63 - 1,
        True,
        "r7",
    )
    assert punch.geo == p.Geo(lat=-33.5, lon=151.25, accuracy_m=12.5)


@pytest.mark.parametrize("subprotocol", BOTH)
def test_minimal_badge_punch_gets_defaults(subprotocol: str) -> None:
    frame = {
        "type": "punch",
        "id": PUNCH_ID,
        "badge": "0042",
        "kind": "out",
        "at": "2026-01-05T17:00:00Z",
    }
    punch = p.Codec(subprotocol).decode(encode_client(frame, subprotocol))
    assert isinstance(punch, p.Punch)
    assert (punch.badge, punch.employee, punch.kind) == ("0042", None, "out")
    assert punch.at == datetime(2026, 1, 5, 17, tzinfo=UTC)
    assert (punch.method, punch.seq, punch.geo, punch.offline, punch.ref) == (
        None,
        None,
        None,
        False,
        None,
    )


def test_msgpack_punch_may_carry_a_native_timestamp() -> None:
    at = datetime(2026, 1, 5, 8, 0, 0, 123_000, tzinfo=UTC)
    frame = {"type": "punch", "id": PUNCH_ID, "employee": "e1", "kind": "in", "at": at}
    punch = p.Codec(p.MSGPACK_SUBPROTOCOL).decode(msgspec.msgpack.encode(frame))
    assert isinstance(punch, p.Punch) and punch.at == at


@pytest.mark.parametrize("subprotocol", BOTH)
@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "subscribe", "channel": "presence:hq", "since": 41, "ref": "s"},
         p.Subscribe(channel="presence:hq", since=41, ref="s")),
        ({"type": "subscribe", "channel": "me"}, p.Subscribe(channel="me", since=None)),
        ({"type": "unsubscribe", "channel": "alerts:hq", "ref": "u"},
         p.Unsubscribe(channel="alerts:hq", ref="u")),
        ({"type": "ping", "t": 1767225600000, "ref": "p"}, p.Ping(t=1767225600000, ref="p")),
        ({"type": "ping"}, p.Ping(t=None, ref=None)),
        ({"type": "refresh", "token": "new.tok.en", "ref": "f"},
         p.Refresh(token="new.tok.en", ref="f")),
    ],
)  # fmt: skip
def test_other_client_frames_decode(subprotocol: str, frame: dict[str, Any], expected: Any) -> None:
    assert p.Codec(subprotocol).decode(encode_client(frame, subprotocol)) == expected


@pytest.mark.parametrize("subprotocol", BOTH)
def test_unknown_fields_are_ignored_so_newer_clients_still_work(subprotocol: str) -> None:
    frame = {"type": "ping", "t": 5, "battery": 0.8, "extra": {"nested": [1, 2]}}
    assert p.Codec(subprotocol).decode(encode_client(frame, subprotocol)) == p.Ping(t=5)


def test_each_codec_refuses_the_other_frame_kind() -> None:
    with pytest.raises(p.FrameError) as text_on_binary:
        p.Codec(p.MSGPACK_SUBPROTOCOL).decode('{"type": "ping", "ref": "x"}')
    assert "binary" in str(text_on_binary.value) and text_on_binary.value.ref is None
    with pytest.raises(p.FrameError) as binary_on_text:
        p.Codec(p.JSON_SUBPROTOCOL).decode(b'{"type": "ping"}')
    assert "text" in str(binary_on_text.value)


def test_unknown_subprotocol_is_refused() -> None:
    with pytest.raises(ValueError, match="subprotocol"):
        p.Codec("attendance.v2.json")


# -- invalid client frames: a FrameError that says what is wrong, with the ref when readable ---


@pytest.mark.parametrize("subprotocol", BOTH)
@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"type": "teleport", "ref": "a"}, "unknown frame `type`"),
        ({"ref": "a", "token": "x"}, "frame needs a `type` field"),
        ({"type": "punch", "ref": "a"}, "punch needs `id`"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1",
          "at": "2026-01-01T00:00:00Z"},
         "punch needs `kind`"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "in"},
         "punch needs `at`"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "kind": "in", "at": "2026-01-01T00:00:00Z"},
         "exactly one of `employee` or `badge`"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "badge": "b1",
          "kind": "in", "at": "2026-01-01T00:00:00Z"}, "exactly one of `employee` or `badge`"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "in",
          "at": "2026-01-01T00:00:00"}, "$.at"),
        ({"type": "punch", "ref": "a", "id": "not-a-uuid", "employee": "e1", "kind": "in",
          "at": "2026-01-01T00:00:00Z"}, "$.id"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e 1", "kind": "in",
          "at": "2026-01-01T00:00:00Z"}, "$.employee"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "sideways",
          "at": "2026-01-01T00:00:00Z"}, "$.kind"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "in",
          "at": "2026-01-01T00:00:00Z", "geo": {"lat": 91, "lon": 0}}, "$.geo.lat"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "in",
          "at": "2026-01-01T00:00:00Z", "geo": {"lat": 1, "lon": 2, "alt": 3}}, "$.geo"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "in",
          "at": "2026-01-01T00:00:00Z", "seq": -1}, "$.seq"),
        ({"type": "subscribe", "ref": "a", "channel": ""}, "$.channel"),
        ({"type": "subscribe", "ref": "a", "channel": "me", "since": -1}, "$.since"),
        ({"type": "punch", "ref": "a", "id": PUNCH_ID, "employee": "e1", "kind": "in",
          "at": "2026-01-01T00:00:00Z", "seq": 2**63}, "$.seq"),
        ({"type": "ping", "ref": "a", "t": "soon"}, "$.t"),
        ({"type": "hello", "ref": "a", "token": "x" * 8193}, "$.token"),
    ],
)  # fmt: skip
def test_invalid_frames_name_the_problem_and_keep_the_ref(
    subprotocol: str, frame: dict[str, Any], message: str
) -> None:
    with pytest.raises(p.FrameError) as caught:
        p.Codec(subprotocol).decode(encode_client(frame, subprotocol))
    assert message in str(caught.value)
    assert caught.value.ref == "a"


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "",
        "[1, 2]",
        '"hello"',
        '{"type": "teleport", "ref": 5}',
        '{"type": "teleport", "ref": null}',
        '{"type": "punch", "ref": ["x"]}',
        '{"type": "ping", "ref": "trunc',
    ],
)
def test_ref_is_none_when_it_cannot_be_read(payload: str) -> None:
    with pytest.raises(p.FrameError) as caught:
        p.Codec(p.JSON_SUBPROTOCOL).decode(payload)
    assert caught.value.ref is None


def test_ref_is_read_from_an_invalid_msgpack_frame() -> None:
    payload = msgspec.msgpack.encode({"type": "punch", "ref": "m-9", "id": 12})
    with pytest.raises(p.FrameError) as caught:
        p.Codec(p.MSGPACK_SUBPROTOCOL).decode(payload)
    assert caught.value.ref == "m-9"


@pytest.mark.parametrize("subprotocol", BOTH)
@pytest.mark.parametrize("depth", [1_000, 5_000])
def test_deeply_nested_frames_are_frame_errors(subprotocol: str, depth: int) -> None:
    # A 2 KiB frame, far under the 64 KiB limit, must not take the session down.
    if subprotocol == p.MSGPACK_SUBPROTOCOL:
        payload: bytes | str = b"\x82\xa4type\xa4ping\xa1x" + b"\x91" * depth + b"\xc0"
    else:
        payload = '{"type": "ping", "x": ' + "[" * depth + "]" * depth + "}"
    assert decode_or_frame_error(p.Codec(subprotocol), payload) is None


# -- server frames: what the server encodes, a client reads back --------------------------


@pytest.mark.parametrize("subprotocol", BOTH)
@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (p.Welcome(session="abc", server_time="2026-01-05T08:00:00.000Z", heartbeat_s=30,
                   role="terminal", tenant="acme", sub="door", ref="h"),
         {"type": "welcome", "session": "abc", "server_time": "2026-01-05T08:00:00.000Z",
          "heartbeat_s": 30, "role": "terminal", "tenant": "acme", "sub": "door", "ref": "h"}),
        (p.Welcome(session="abc", server_time="t", heartbeat_s=5, role="admin", tenant="acme",
                   sub="ops"),
         {"type": "welcome", "session": "abc", "server_time": "t", "heartbeat_s": 5,
          "role": "admin", "tenant": "acme", "sub": "ops"}),
        (p.Ack(id=PUNCH_ID, status="accepted", received_at="2026-01-05T08:00:00.001Z", ref="r"),
         {"type": "ack", "id": PUNCH_ID, "status": "accepted",
          "received_at": "2026-01-05T08:00:00.001Z", "ref": "r"}),
        (p.Ack(id=PUNCH_ID, status="rejected", reason="invalid_time"),
         {"type": "ack", "id": PUNCH_ID, "status": "rejected", "reason": "invalid_time"}),
        (p.Ack(id=PUNCH_ID, status="duplicate"),
         {"type": "ack", "id": PUNCH_ID, "status": "duplicate"}),
        (p.Pong(server_time="s", t=-(2**63), ref="p"),
         {"type": "pong", "server_time": "s", "t": -(2**63), "ref": "p"}),
        (p.Pong(server_time="s"), {"type": "pong", "server_time": "s"}),
        (p.Refreshed(expires_at="2026-01-06T08:00:00.000Z", ref="f"),
         {"type": "refreshed", "expires_at": "2026-01-06T08:00:00.000Z", "ref": "f"}),
        (p.Refreshed(expires_at="e"), {"type": "refreshed", "expires_at": "e"}),
        (p.Error(code="bad_frame", message="unknown frame `type`", ref="x"),
         {"type": "error", "code": "bad_frame", "message": "unknown frame `type`", "ref": "x"}),
        (p.Error(code="forbidden", message="no"),
         {"type": "error", "code": "forbidden", "message": "no"}),
        (p.Drain(reconnect_after_ms=1500), {"type": "drain", "reconnect_after_ms": 1500}),
        (p.Subscribed(channel="presence:hq", version=7, recovered=False, ref="s"),
         {"type": "subscribed", "channel": "presence:hq", "version": 7, "recovered": False,
          "ref": "s"}),
        (p.Subscribed(channel="me", version=1, recovered=True),
         {"type": "subscribed", "channel": "me", "version": 1, "recovered": True}),
        (p.Unsubscribed(channel="presence:hq"), {"type": "unsubscribed", "channel": "presence:hq"}),
        (p.Snapshot(channel="presence:hq", version=3, members=[
            p.PresenceMember(employee="e1", name="Ann", state="in", since="s", site="hq")]),
         {"type": "snapshot", "channel": "presence:hq", "version": 3, "members": [
             {"employee": "e1", "name": "Ann", "state": "in", "since": "s", "site": "hq"}]}),
        (p.Delta(channel="presence:hq", version=4, changes=[
            p.PresenceMember(employee="e2", name="Bo", state="out", since="s", site="hq",
                             late=True)]),
         {"type": "delta", "channel": "presence:hq", "version": 4, "changes": [
             {"employee": "e2", "name": "Bo", "state": "out", "since": "s", "site": "hq",
              "late": True}]}),
        (p.Ack(id=PUNCH_ID, status="accepted", received_at="r", channel="me", employee="e1",
               kind="in", at="a", site="hq", source="terminal"),
         {"type": "ack", "id": PUNCH_ID, "status": "accepted", "received_at": "r",
          "channel": "me", "employee": "e1", "kind": "in", "at": "a", "site": "hq",
          "source": "terminal"}),
        (p.Notice(channel="me", kind="late", at="a", message="m", detail={"site": "hq"}),
         {"type": "notice", "channel": "me", "kind": "late", "at": "a", "message": "m",
          "detail": {"site": "hq"}}),
        (p.Alert(channel="alerts:hq", id="x", kind="geofence", severity="warning", at="a",
                 message="m", detail={"reason": "outside"}, raised_at="r", employee="e1",
                 site="hq", version=9),
         {"type": "alert", "channel": "alerts:hq", "id": "x", "kind": "geofence",
          "severity": "warning", "at": "a", "message": "m", "detail": {"reason": "outside"},
          "raised_at": "r", "employee": "e1", "site": "hq", "version": 9}),
        (p.Alert(channel="me", id="x", kind="clock_skew", severity="warning", at="a",
                 message="m", detail={}, raised_at="r"),
         {"type": "alert", "channel": "me", "id": "x", "kind": "clock_skew",
          "severity": "warning", "at": "a", "message": "m", "detail": {}, "raised_at": "r"}),
    ],
)  # fmt: skip
def test_server_frames_encode_with_type_tag_and_omit_unset_optionals(
    subprotocol: str, frame: p.ServerFrame, expected: dict[str, Any]
) -> None:
    data = p.Codec(subprotocol).encode(frame)
    assert isinstance(data, bytes)
    assert decode_server(data, subprotocol) == expected


def test_json_server_frames_are_utf8_text() -> None:
    data = p.Codec(p.JSON_SUBPROTOCOL).encode(p.Error(code="x", message="Zeit überschritten ⏰"))
    assert json.loads(data.decode("utf-8"))["message"] == "Zeit überschritten ⏰"


def test_every_server_frame_type_is_covered() -> None:
    # If a frame type is added, the round-trip table above must grow with it.
    tags = {cls.__struct_config__.tag for cls in p.ServerFrame.__args__}  # type: ignore[attr-defined]
    assert tags == {
        "welcome",
        "ack",
        "pong",
        "refreshed",
        "error",
        "drain",
        "subscribed",
        "unsubscribed",
        "notice",
        "snapshot",
        "delta",
        "alert",
    }


# -- property tests: hostile input decodes or raises FrameError, nothing else ---------------

# Integers stay within what msgpack can carry, so one value can be sent in both codecs.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(max_size=40)
    | st.datetimes(timezones=st.just(UTC))
    | st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=16))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), children, max_size=5)
    ),
    max_leaves=30,
)

PUNCH_FIELDS = ("id", "employee", "badge", "kind", "at", "method", "seq", "geo", "offline", "ref")
punch_field_values = st.one_of(
    st.just(PUNCH_ID),
    st.uuids().map(str),
    st.sampled_from(["e1", "b1", "", "x" * 65, "in", "out", "break_start", "face", "mobile"]),
    st.datetimes(timezones=st.timezones() | st.none()).map(lambda d: d.isoformat()),
    st.fixed_dictionaries(
        {"lat": st.floats(-100, 100), "lon": st.floats(-200, 200)},
        optional={"accuracy_m": st.floats(-1, 1e6), "alt": st.integers(-(2**63), 2**63)},
    ),
    json_values,
)
punch_dicts = st.dictionaries(
    st.sampled_from(PUNCH_FIELDS) | st.text(max_size=8), punch_field_values, max_size=10
).map(lambda fields: {**fields, "type": "punch"})


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_frame_error(payload: bytes) -> None:
    decode_or_frame_error(p.Codec(p.MSGPACK_SUBPROTOCOL), payload)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_arbitrary_text_decodes_or_raises_frame_error(payload: str) -> None:
    decode_or_frame_error(p.Codec(p.JSON_SUBPROTOCOL), payload)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_decodes_or_raises_frame_error(value: Any) -> None:
    decode_or_frame_error(p.Codec(p.JSON_SUBPROTOCOL), json.dumps(value))
    decode_or_frame_error(p.Codec(p.MSGPACK_SUBPROTOCOL), msgspec.msgpack.encode(value))


@settings(max_examples=300)
@given(msgpack_values)
def test_arbitrary_msgpack_decodes_or_raises_frame_error(value: Any) -> None:
    decode_or_frame_error(p.Codec(p.MSGPACK_SUBPROTOCOL), msgspec.msgpack.encode(value))


@settings(max_examples=500)
@given(punch_dicts, st.sampled_from(BOTH))
def test_random_punch_fields_decode_to_a_valid_punch_or_raise_frame_error(
    frame: dict[str, Any], subprotocol: str
) -> None:
    punch = decode_or_frame_error(p.Codec(subprotocol), encode_client(frame, subprotocol))
    if punch is None:
        return
    # Whatever gets through must satisfy everything the session relies on.
    assert isinstance(punch, p.Punch)
    assert isinstance(punch.id, uuid.UUID) and punch.kind in (
        "in",
        "out",
        "break_start",
        "break_end",
    )
    assert punch.at is not None and punch.at.utcoffset() is not None
    assert (punch.employee is None) != (punch.badge is None)
    if punch.geo is not None:
        assert -90 <= punch.geo.lat <= 90 and -180 <= punch.geo.lon <= 180


@given(
    st.dictionaries(st.sampled_from(PUNCH_FIELDS), json_values, max_size=6), st.text(max_size=20)
)
def test_a_readable_string_ref_is_echoed_on_failure(fields: dict[str, Any], ref: str) -> None:
    frame = {**fields, "type": "punch", "ref": ref, "kind": "sideways"}
    with pytest.raises(p.FrameError) as caught:
        p.Codec(p.JSON_SUBPROTOCOL).decode(json.dumps(frame))
    assert caught.value.ref == ref


# -- format_time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 1, 5, 8, 0, tzinfo=UTC), "2026-01-05T08:00:00.000Z"),
        (datetime(2026, 3, 29, 3, 30, 0, 123_999, tzinfo=ZoneInfo("Europe/Berlin")),
         "2026-03-29T01:30:00.123Z"),
        (datetime(2025, 12, 31, 20, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=-5))),
         "2026-01-01T01:00:00.999Z"),
        (datetime(2026, 7, 1, 9, 15, 30, 4_000, tzinfo=ZoneInfo("Asia/Kolkata")),
         "2026-07-01T03:45:30.004Z"),
    ],
)  # fmt: skip
def test_format_time_writes_utc_with_milliseconds_and_z(moment: datetime, expected: str) -> None:
    assert p.format_time(moment) == expected


@pytest.mark.parametrize("year", [5, 999])
def test_format_time_pads_the_year_to_four_digits(year: int) -> None:
    # A terminal may send any past `at`; the stored punch is listed back through format_time.
    assert p.format_time(datetime(year, 6, 1, 12, tzinfo=UTC)) == f"{year:04d}-06-01T12:00:00.000Z"


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.timezones(),
        allow_imaginary=False,
    )
)
def test_format_time_is_rfc3339_utc_and_parses_back_to_the_millisecond(moment: datetime) -> None:
    text = p.format_time(moment)
    assert SERVER_TIME.match(text), text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    # Compare in UTC: an ambiguous local time never equals a time in another zone (PEP 495).
    utc = moment.astimezone(UTC)
    assert parsed == utc.replace(microsecond=utc.microsecond // 1000 * 1000)
    assert moment - parsed < timedelta(milliseconds=1)
