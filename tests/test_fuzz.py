"""Hypothesis fuzzing against a real hub: every client frame type over a real WebSocket in both
subprotocols, and every REST body, each one invalid by construction.

A generated frame or body starts from a valid one with at least one field broken in a way the
contract forbids (wrong type, missing, out of range, too long, badly encoded...), plus noise
the hub must ignore. The answer must be an `error` with a stable code (REST: a 4xx with the
JSON error body), the socket must stay open, nothing may be stored or changed, and the hub must
neither crash nor log a traceback.

The hub here runs with the frame rate limit and the per-address limits off (set to 0), so
that thousands of cases fit in seconds; tests/test_abuse.py covers those limits. The limit on
malformed frames (more than 20 within 10 s closes with 4008) cannot be turned off, so each
example uses a socket of its own for at most that many. The module counts the cases it runs,
and its last test fails below `MIN_CASES`, so that a change to the settings cannot silently
shrink the fuzzing. Shapes the fuzzing found the hub mishandling are pinned down by plain
tests as well, so that each failure names its cause.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import websockets
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    MSGPACK,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    running_hub,
)

# The hub under test, not the database, is what these exercise: one server is enough.
pytestmark = [pytest.mark.postgres, pytest.mark.one_server]

MIN_CASES = 10_000
# One socket per example, with no more malformed frames than the hub tolerates in 10 s.
FRAMES_PER_SOCKET = 20
OPEN_SESSION_EXAMPLES = 250
BEFORE_HELLO_FRAMES = 5
BEFORE_HELLO_EXAMPLES = 60
REQUESTS_PER_EXAMPLE = 4
REST_EXAMPLES = 250
QUERY_EXAMPLES = 100

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    # No shrinking: every example goes through a real hub, and shrinking a batch of twenty
    # frames that way takes minutes. A failure names the offending frame or request itself.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

MAX_FRAME_BYTES = 64 * 1024
# The longest single value sent, so that a frame stays under the 64 KiB close (1009).
HUGE_BYTES = 60 * 1024
# A frame nested this deep is "nested too deeply" for msgspec, which then cannot read its `ref`.
DEEP_UNREADABLE = 3000
# Stands for a deeply nested array until the frame is encoded.
DEEP = "\ue000deep\ue000"
MISSING: Any = object()  # a field left out

TYPES = ("hello", "punch", "subscribe", "unsubscribe", "ping", "refresh")
KINDS = ("in", "out", "break_start", "break_end")
METHODS = ("badge", "pin", "face", "fingerprint", "mobile", "manual")
ROLES = ("admin", "supervisor", "terminal", "employee")
ENTITY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_INT64 = 2**63 - 1
BAD_FRAME = frozenset({"bad_frame"})
CHANNEL_CODES = frozenset({"bad_frame", "unknown_channel", "forbidden"})
REST_CODES = frozenset({"invalid", "unknown_site", "unknown_employee", "invalid_time", "conflict"})

# Cases run, per database (the module runs once per PostgreSQL backend), per test.
CASES: dict[str, Counter[str]] = {}


def count(database: str, test: str, n: int) -> None:
    CASES.setdefault(database, Counter())[test] += n


# Strategies are built once and reused: building them is far slower than drawing from them.
cached = functools.cache

# -- values ------------------------------------------------------------------------------------


# Any character, and more often than chance the ones that trip up storage and parsers.
ALPHABET = st.characters(codec="utf-8") | st.sampled_from(
    "\x00\x01\x1f\x7f\x85\u2028\ufeff\ufffe\U0010ffff"
)


@cached
def texts(max_size: int = 12, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(ALPHABET, min_size=min_size, max_size=max_size)


@cached
def huge(min_chars: int) -> st.SearchStrategy[str]:
    """One character repeated, up to HUGE_BYTES once encoded."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        char = draw(st.sampled_from('xZ9 é€😀"'))
        # Bytes per character in UTF-8 and in a JSON string, whichever is more.
        cost = max(len(char.encode()), len(json.dumps(char, ensure_ascii=False)) - 2)
        return char * draw(st.integers(min_chars, max(min_chars, HUGE_BYTES // cost)))

    return build()


@cached
def longer_than(limit: int) -> st.SearchStrategy[str]:
    if limit > 1000:
        return huge(limit + 1)
    return st.one_of(texts(limit + 8, min_size=limit + 1), huge(limit + 1))


@cached
def ids() -> st.SearchStrategy[str]:
    return st.from_regex(ENTITY_ID, fullmatch=True)


@cached
def unknown_ids(*known: str) -> st.SearchStrategy[str]:
    return ids().filter(lambda s: s not in known)


@cached
def bad_ids() -> st.SearchStrategy[str]:
    """Not ids: empty, too long, or with a character outside [A-Za-z0-9._-]."""
    return st.one_of(
        st.just(""),
        longer_than(64),
        texts(20, min_size=1).filter(lambda s: not ENTITY_ID.fullmatch(s)),
    )


@cached
def scalars(binary: bool) -> st.SearchStrategy[Any]:
    ints = st.integers(-(2**63), 2**64 - 1) if binary else st.integers()
    return st.one_of(st.none(), st.booleans(), ints, st.floats(), texts())


@cached
def wrong(binary: bool, *allowed: str) -> st.SearchStrategy[Any]:
    """A value of any type (JSON's, or msgpack's) except the ``allowed`` ones."""
    kinds: dict[str, st.SearchStrategy[Any]] = {
        "null": st.none(),
        "bool": st.booleans(),
        "int": st.integers(-(2**63), 2**64 - 1) if binary else st.integers(),
        # Integral floats too: an int field refuses 1.0.
        "float": st.floats().filter(lambda f: not f.is_integer()) | st.just(1.0),
        "str": texts(),
        "list": st.lists(scalars(binary), max_size=3),
        "dict": st.dictionaries(texts(6), scalars(binary), max_size=3),
        "deep": st.just(DEEP),
    }
    if binary:
        kinds["bytes"] = st.binary(max_size=16)
    return st.one_of([strategy for kind, strategy in kinds.items() if kind not in allowed])


@cached
def noise(binary: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Unknown top-level fields: the hub ignores them on frames (not in REST bodies)."""
    value = st.one_of(scalars(binary), huge(1), st.just(DEEP), st.lists(scalars(binary)))
    return st.dictionaries(texts(8).map(lambda k: f"x-{k}"), value, max_size=2)


def _offset(minutes: int) -> str:
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


@cached
def aware_times() -> st.SearchStrategy[str]:
    """RFC 3339 times with an offset, all in the past."""
    return st.builds(
        lambda moment, minutes: moment.isoformat() + ("Z" if minutes == 0 else _offset(minutes)),
        st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2025, 1, 1)),
        st.integers(-14 * 60, 14 * 60),
    )


@cached
def bad_times(long: bool = True) -> st.SearchStrategy[str]:
    """Not RFC 3339 times with an offset: no offset, half a time, impossible fields, prose."""
    naive = st.datetimes(min_value=datetime(2001, 1, 1)).map(lambda d: d.isoformat())
    return st.one_of(
        naive,
        naive.map(lambda s: s[:10]),
        naive.map(lambda s: s[11:] + "Z"),
        st.sampled_from(
            [
                "2026-13-01T00:00:00Z",
                "2026-02-30T00:00:00Z",
                "2026-01-01T25:00:00Z",
                "2026-01-01T00:60:00Z",
                "2026-01-01T00:00:00+25:00",
                "0000-01-01T00:00:00Z",
                "20260101T000000Z",
                "yesterday",
                "",
            ]
        ),
        texts().map(lambda s: "x" + s),
        huge(64) if long else st.just("x" * 65),
    )


def _not_a_uuid(text: str) -> bool:
    # Python's parser takes more forms than the hub's (braces, urn:uuid:), never fewer.
    try:
        uuid.UUID(text)
    except ValueError:
        return True
    return False


@cached
def bad_uuids() -> st.SearchStrategy[str]:
    canonical = st.uuids().map(str)
    return st.one_of(
        texts(40).filter(_not_a_uuid),
        canonical.map(lambda u: "{" + u + "}"),
        canonical.map(lambda u: "urn:uuid:" + u),
        canonical.map(lambda u: u[:-1]),
        canonical.map(lambda u: u[:-1] + "g"),
        huge(64),
    )


# -- frames --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One field of a frame or body: what a valid value and a broken one look like."""

    valid: st.SearchStrategy[Any]
    broken: st.SearchStrategy[Any]
    optional: bool = True


Who = st.SearchStrategy[dict[str, Any]]


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


@cached
def geo_fields(binary: bool) -> Field:
    geo = st.fixed_dictionaries(
        {"lat": st.floats(-90, 90), "lon": st.floats(-180, 180)},
        optional={"accuracy_m": st.floats(0, 1e6)},
    )
    number = wrong(binary, "int", "float")
    # NaN is out of every range; JSON cannot say it, so such a frame is not JSON at all.
    bad_lat = st.floats(allow_nan=True).filter(lambda f: not -90 <= f <= 90)
    bad_lon = st.floats(allow_nan=True).filter(lambda f: not -180 <= f <= 180)
    return Field(
        geo,
        st.one_of(
            wrong(binary, "dict", "null"),
            st.builds(_without, geo, st.sampled_from(["lat", "lon"])),
            st.builds(lambda g, v: {**g, "lat": v}, geo, bad_lat | number),
            st.builds(lambda g, v: {**g, "lon": v}, geo, bad_lon | number),
            st.builds(
                lambda g, v: {**g, "accuracy_m": v},
                geo,
                st.floats(max_value=-1e-9) | wrong(binary, "int", "float", "null"),
            ),
            st.builds(lambda g, k, v: {**g, f"x-{k}": v}, geo, texts(6), scalars(binary)),
        ),
    )


@cached
def punch_fields(binary: bool) -> dict[str, Field]:
    """A punch's fields other than `employee`/`badge` (see ``identities``)."""
    return {
        "id": Field(
            st.uuids().map(str),
            st.one_of(st.just(MISSING), wrong(binary, "str"), bad_uuids()),
            False,
        ),
        "kind": Field(
            st.sampled_from(KINDS),
            st.one_of(
                st.just(MISSING),
                wrong(binary, "str"),
                texts().filter(lambda s: s not in KINDS),
                st.sampled_from(["IN", "Out", "break-start", "in "]),
                huge(20),
            ),
            False,
        ),
        "at": Field(
            aware_times(), st.one_of(st.just(MISSING), wrong(binary, "str"), bad_times()), False
        ),
        "method": Field(
            st.sampled_from(METHODS),
            st.one_of(wrong(binary, "str", "null"), texts().filter(lambda s: s not in METHODS)),
        ),
        "seq": Field(
            st.integers(0, MAX_INT64),
            st.one_of(
                st.integers(-(2**63) if binary else None, -1),
                st.integers(MAX_INT64 + 1, 2**64 - 1 if binary else None),
                wrong(binary, "int", "null"),
            ),
        ),
        "geo": geo_fields(binary),
        "offline": Field(st.booleans(), wrong(binary, "bool")),
        "ref": ref_field(binary),
    }


@cached
def ref_field(binary: bool) -> Field:
    return Field(texts(10), st.one_of(wrong(binary, "str", "null"), longer_than(128)))


@cached
def identities(binary: bool, *, known_badges: bool = False) -> tuple[Who, Who]:
    """(valid, broken) `employee`/`badge`: exactly one of them is valid; both or neither not."""
    employee = st.sampled_from(["e1", "e2", "e3"])
    badge = st.sampled_from(["b1", "b2", "b3"]) if known_badges else texts(64).filter(bool)
    valid = st.one_of(
        employee.map(lambda e: {"employee": e}),
        badge.map(lambda b: {"badge": b}),
        employee.map(lambda e: {"employee": e, "badge": None}),
    )
    not_str = wrong(binary, "str", "null")
    neither = [{}, {"employee": None}, {"badge": None}, {"employee": None, "badge": None}]
    broken = st.one_of(
        st.builds(lambda e, b: {"employee": e, "badge": b}, employee, badge),
        st.sampled_from(neither),
        bad_ids().map(lambda e: {"employee": e}),
        not_str.map(lambda e: {"employee": e}),
        st.one_of(st.just(""), longer_than(64)).map(lambda b: {"badge": b}),
        not_str.map(lambda b: {"badge": b}),
    )
    return valid, broken


@cached
def frame_fields(binary: bool) -> dict[str, dict[str, Field]]:
    # Never a missing `token`: that decodes (as ""), and gets `bad_token` and 4001.
    token = Field(texts(20), st.one_of(wrong(binary, "str"), longer_than(8192)), False)
    # A missing `channel` decodes too, and gets `unknown_channel`. Valid text that could name
    # a real channel is left out: a terminal may subscribe to its floor, and leave any.
    channel = Field(
        texts(20).filter(lambda c: bool(c) and c != "me" and ":" not in c),
        st.one_of(wrong(binary, "str"), st.just(""), longer_than(200), st.just(MISSING)),
        False,
    )
    client = Field(texts(20), st.one_of(wrong(binary, "str", "null"), longer_than(256)))
    since = Field(
        st.integers(0, MAX_INT64),
        st.one_of(st.integers(-(2**63), -1), wrong(binary, "int", "null")),
    )
    # Any integer is a valid `t`, however large: only other types are broken.
    t = Field(st.integers(0, MAX_INT64), wrong(binary, "int", "null"))
    ref = ref_field(binary)
    return {
        "hello": {"token": token, "client": client, "ref": ref},
        "punch": punch_fields(binary),
        "subscribe": {"channel": channel, "since": since, "ref": ref},
        "unsubscribe": {"channel": channel, "ref": ref},
        "ping": {"t": t, "ref": ref},
        "refresh": {"token": token, "ref": ref},
    }


@st.composite
def _broken_fields(draw: st.DrawFn, fields: dict[str, Field]) -> dict[str, Any]:
    """At least one of ``fields`` broken; each of the others valid or (if optional) left out."""
    names = sorted(fields)
    broken = draw(st.sets(st.sampled_from(names), min_size=1, max_size=3))
    doc: dict[str, Any] = {}
    for name in names:
        field = fields[name]
        if name in broken:
            value = draw(field.broken)
        elif field.optional and draw(st.booleans()):
            continue
        else:
            value = draw(field.valid)
        if value is not MISSING:
            doc[name] = value
    return doc


@cached
def broken_frame_fields(binary: bool, kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return _broken_fields(frame_fields(binary)[kind])


@st.composite
def _typed_frame(draw: st.DrawFn, binary: bool) -> tuple[Any, frozenset[str]]:
    kind = draw(st.sampled_from(TYPES))
    doc = {"type": kind, **draw(broken_frame_fields(binary, kind))}
    if kind == "punch":
        valid, broken = identities(binary)
        doc.update(draw(st.one_of(valid, broken)))
    doc.update(draw(noise(binary)))
    return doc, CHANNEL_CODES if kind in ("subscribe", "unsubscribe") else BAD_FRAME


@st.composite
def _untyped_frame(draw: st.DrawFn, binary: bool) -> tuple[Any, frozenset[str]]:
    """A `type` that is missing, not a string, or not one a client sends."""
    doc = draw(st.dictionaries(texts(8), scalars(binary), max_size=3))
    doc.pop("type", None)
    doc.update(draw(noise(binary)))
    if draw(st.booleans()):
        doc["ref"] = draw(texts(10))
    kind = draw(
        st.one_of(
            st.just(MISSING),
            wrong(binary, "str"),
            st.sampled_from(["welcome", "ack", "pong", "error", "drain", "Hello", "PING", ""]),
            texts().filter(lambda s: s not in TYPES),
            huge(20),
        )
    )
    if kind is not MISSING:
        doc["type"] = kind
    if binary and draw(st.booleans()):
        # A msgpack map's keys need not be strings at all.
        doc[draw(st.integers(-5, 5) | st.binary(max_size=3))] = draw(scalars(binary))
    return doc, BAD_FRAME


@cached
def not_objects(binary: bool) -> st.SearchStrategy[tuple[Any, frozenset[str]]]:
    values = st.one_of(
        scalars(binary), st.lists(scalars(binary), max_size=4), st.just(DEEP), huge(1)
    )
    if binary:
        values = values | st.binary(max_size=32)
    return values.map(lambda v: (v, BAD_FRAME))


@dataclass(frozen=True)
class Sent:
    """A frame as sent, the codes its `error` may carry, and the `ref` that error must echo."""

    payload: str | bytes
    codes: frozenset[str]
    ref: str | None

    def __repr__(self) -> str:
        return f"Sent({self.payload[:500]!r}, codes={sorted(self.codes)}, ref={self.ref!r})"


def encode(doc: Any, binary: bool, depth: int) -> str | bytes:
    if binary:
        packed = msgspec.msgpack.encode(doc)
        return packed.replace(msgspec.msgpack.encode(DEEP), b"\x91" * depth + b"\xc0")
    text = json.dumps(doc, ensure_ascii=False)
    return text.replace(json.dumps(DEEP, ensure_ascii=False), "[" * depth + "]" * depth)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _leaves(item)
    else:
        yield value


def readable_ref(doc: Any, binary: bool, depth: int) -> str | None:
    """The `ref` the hub can read from a frame it cannot decode, and so must echo."""
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        return None
    ref = doc.get("ref")
    if not isinstance(ref, str) or ref == DEEP:
        return None
    leaves = list(_leaves(doc))
    if depth >= DEEP_UNREADABLE and DEEP in leaves:
        return None
    # JSON has no NaN or Infinity: a frame holding one is not JSON at all.
    if not binary and any(isinstance(v, float) and not math.isfinite(v) for v in leaves):
        return None
    return ref


VALID_FRAMES = [
    {"type": "ping", "ref": "r"},
    {"type": "ping", "t": 5},
    {"type": "subscribe", "channel": "me"},
    {"type": "punch", "id": "6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70", "employee": "e1",
     "kind": "in", "at": "2026-01-01T00:00:00Z"},
]  # fmt: skip


def _not_a_msgpack_map(raw: bytes) -> bool:
    try:
        return not isinstance(msgspec.msgpack.decode(raw), dict)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return True


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


def _fixstr(raw: bytes) -> bytes:
    return bytes([0xA0 | len(raw)]) + raw


@cached
def not_utf8_strings() -> st.SearchStrategy[bytes]:
    """msgpack maps holding a string that is not UTF-8, as the `type` or as a field.

    Not as an unknown field or key: the hub skips those unread, which is fine."""
    bad = st.binary(min_size=1, max_size=31).filter(_not_utf8).map(_fixstr)
    ping = _fixstr(b"type") + _fixstr(b"ping")
    return st.one_of(
        bad.map(lambda s: b"\x81" + _fixstr(b"type") + s),
        st.builds(
            lambda key, s: b"\x82" + ping + _fixstr(key) + s,
            st.sampled_from([b"ref", b"t"]),
            bad,
        ),
        bad.map(lambda s: b"\x85" + _fixstr(b"type") + _fixstr(b"punch") + _fixstr(b"badge") + s
                + b"".join(_fixstr(x) for x in [b"id", b"6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70",
                                                 b"kind", b"in", b"at", b"2026-01-01T00:00:00Z"])),
    )  # fmt: skip


@cached
def malformed(binary: bool) -> st.SearchStrategy[Sent]:
    """Not JSON (or not msgpack) at all, or the wrong kind of WebSocket message."""
    texts_of = [json.dumps(frame) for frame in VALID_FRAMES]
    packs = [msgspec.msgpack.encode(frame) for frame in VALID_FRAMES]
    if binary:
        raw = st.sampled_from(packs).flatmap(
            lambda packed: st.one_of(
                st.integers(0, len(packed) - 1).map(lambda n: packed[:n]),
                st.binary(min_size=1, max_size=4).map(lambda tail: packed + tail),
            )
        )
        payloads: st.SearchStrategy[str | bytes] = st.one_of(
            raw,
            not_utf8_strings(),
            st.just(b"\xc1"),
            st.binary(min_size=1, max_size=64).filter(_not_a_msgpack_map),
            # A text message on the msgpack subprotocol is the wrong kind, whatever it holds.
            st.sampled_from(texts_of),
            texts(40),
        )
    else:
        cut = st.sampled_from(texts_of).flatmap(
            lambda text: st.one_of(
                st.integers(0, len(text) - 1).map(lambda n: text[:n]),
                texts(4).map(lambda tail: text + " x" + tail),
                st.just("\ufeff" + text),
            )
        )
        payloads = st.one_of(
            cut,
            st.sampled_from(
                [
                    '{"type": "ping", "ref": "\\ud800"}',
                    '{"type": "ping", "t": NaN}',
                    '{"type": "ping", "t": Infinity}',
                    "{'type': 'ping'}",
                    '{"type": "ping",}',
                    '{"type" "ping"}',
                    "",
                ]
            ),
            texts(40).map(lambda s: "x" + s),
            # A binary message on the JSON subprotocol is the wrong kind, whatever it holds.
            st.sampled_from(packs),
            st.sampled_from(texts_of).map(str.encode),
        )
    return payloads.map(lambda payload: Sent(payload, BAD_FRAME, None))


@st.composite
def _invalid_frame(draw: st.DrawFn, binary: bool, decodes: bool) -> Sent:
    choice = draw(
        st.one_of(
            _typed_frame(binary), _untyped_frame(binary), not_objects(binary), malformed(binary)
        )
    )
    if isinstance(choice, Sent):
        return choice
    doc, codes = choice
    if not decodes and codes != BAD_FRAME:
        doc, codes = {**doc, "type": "ping", "t": "not a number"}, BAD_FRAME
    depth = draw(st.one_of(st.integers(1, 50), st.integers(DEEP_UNREADABLE, 15_000)))
    payload = encode(doc, binary, depth)
    assume(
        len(payload if isinstance(payload, bytes) else payload.encode()) < MAX_FRAME_BYTES - 1024
    )
    return Sent(payload, codes, readable_ref(doc, binary, depth))


@cached
def invalid_frames(binary: bool, *, decodes: bool = True) -> st.SearchStrategy[Sent]:
    """Frames the hub cannot accept. With ``decodes`` False only ones that fail to decode: no
    `subscribe` or `unsubscribe`, which may decode and get `unknown_channel`."""
    return _invalid_frame(binary, decodes)


@cached
def refused_frames(binary: bool, other_identity: str) -> st.SearchStrategy[Sent]:
    """Well-formed frames an open session refuses without closing."""
    channel = frozenset({"unknown_channel"})
    docs = st.sampled_from(
        [
            ({"type": "hello", "token": other_identity}, BAD_FRAME),
            ({"type": "hello"}, BAD_FRAME),
            ({"type": "subscribe", "channel": "weather:hq"}, channel),
            ({"type": "subscribe", "channel": "presence:elsewhere"}, frozenset({"forbidden"})),
            ({"type": "subscribe", "channel": "me", "since": 3}, frozenset({"forbidden"})),
            ({"type": "subscribe", "channel": "alerts:hq"}, frozenset({"forbidden"})),
            ({"type": "unsubscribe", "channel": "weather"}, channel),
            ({"type": "refresh", "token": other_identity}, frozenset({"forbidden"})),
        ]
    )

    def build(choice: tuple[dict[str, Any], frozenset[str]], ref: str | None) -> Sent:
        doc, codes = choice
        doc = doc if ref is None else {**doc, "ref": ref}
        return Sent(encode(doc, binary, 1), codes, ref)

    return st.builds(build, docs, st.none() | texts(10))


# -- REST bodies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content: bytes
    conflict: bool = False  # a 409 is a right answer too

    def __repr__(self) -> str:
        return f"{self.method} {self.path} {self.content[:500]!r}"


def as_body(doc: Any) -> bytes:
    return str(encode(doc, False, 20)).encode()


def _not_a_json_object(raw: bytes) -> bool:
    try:
        return not isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return True


@cached
def not_bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are not a JSON object at all."""
    return st.one_of(
        st.lists(scalars(False), max_size=3).map(lambda v: json.dumps(v).encode()),
        scalars(False).map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"{", b'{"name": "X",}', b"\xff\xfe", b"null", b"[]", b'"x"']),
        st.binary(max_size=32).filter(_not_a_json_object),
    )


@st.composite
def _broken_body(draw: st.DrawFn, fields: dict[str, Field]) -> dict[str, Any]:
    """Mostly a broken field; sometimes all valid plus an unknown field, which bodies refuse."""
    if draw(st.integers(0, 5)) > 0:
        return draw(_broken_fields(fields))
    doc = {}
    for name, field in sorted(fields.items()):
        if not (field.optional and draw(st.booleans())):
            doc[name] = draw(field.valid)
    extra = st.dictionaries(
        texts(8).map(lambda k: f"x-{k}"), scalars(False), min_size=1, max_size=2
    )
    return {**doc, **draw(extra)}


def required_text(limit: int) -> Field:
    return Field(
        texts(40).filter(lambda s: s and "\x00" not in s),
        st.one_of(st.just(MISSING), wrong(False, "str"), st.just(""), longer_than(limit)),
        False,
    )


def optional_text(limit: int, valid: st.SearchStrategy[str] | None = None) -> Field:
    return Field(
        texts(20).filter(lambda s: s and "\x00" not in s) if valid is None else valid,
        st.one_of(wrong(False, "str", "null"), st.just(""), longer_than(limit)),
    )


@cached
def site_ref() -> Field:
    return Field(
        st.just("hq"),
        st.one_of(st.just(MISSING), wrong(False, "str"), bad_ids(), unknown_ids("hq")),
        False,
    )


@cached
def site_bodies() -> st.SearchStrategy[bytes]:
    zone = st.sampled_from(["UTC", "Europe/Berlin", "America/Los_Angeles", "Asia/Kolkata"])
    bad_zone = st.one_of(
        st.just(MISSING),
        wrong(False, "str"),
        texts().map(lambda s: "Mars/" + s),
        st.sampled_from(["", "Europe", "utc+2", "../../etc/passwd", "/etc/localtime", "UTC\x00"]),
        huge(100),
    )
    policy = st.fixed_dictionaries(
        {},
        optional={
            "overtime": st.sampled_from(["flsa", "california", "none"]),
            "workweek_start": st.sampled_from(["monday", "sunday"]),
            "rounding_minutes": st.sampled_from([0, 5, 6, 15]),
            "geofence": st.sampled_from(["off", "flag", "enforce"]),
            "eu_wtd": st.booleans(),
            "grace_minutes": st.integers(0, 240),
        },
    )
    bad_policy = st.one_of(
        wrong(False, "dict"),
        st.builds(lambda p, k: {**p, k: "sometimes"}, policy,
                  st.sampled_from(["overtime", "workweek_start", "geofence"])),
        st.builds(lambda p, n: {**p, "rounding_minutes": n}, policy,
                  st.integers().filter(lambda n: n not in (0, 5, 6, 15))),
        st.builds(lambda p, v: {**p, "eu_wtd": v}, policy, wrong(False, "bool", "null")),
        st.builds(lambda p, n: {**p, "grace_minutes": n}, policy,
                  st.integers().filter(lambda n: not 0 <= n <= 240) | wrong(False, "int", "null")),
        st.builds(lambda p, k: {**p, f"x-{k}": 1}, policy, texts(6)),
    )  # fmt: skip
    fields = {
        "name": required_text(200),
        "timezone": Field(zone, bad_zone, False),
        "radius_m": Field(
            st.floats(1, 100_000),
            st.floats(max_value=0)
            | st.floats(min_value=100_000.001)
            | wrong(False, "int", "float", "null"),
        ),
        "policy": Field(policy, bad_policy),
    }  # fmt: skip
    lat, lon = st.floats(-90, 90), st.floats(-180, 180)
    bad_lat = st.floats().filter(lambda f: not -90 <= f <= 90) | wrong(
        False, "int", "float", "null"
    )
    bad_lon = st.floats().filter(lambda f: not -180 <= f <= 180) | wrong(
        False, "int", "float", "null"
    )
    # `lat` and `lon` come together or not at all, each in its range.
    position = st.one_of(
        st.just({}),
        st.builds(lambda a, b: {"lat": a, "lon": b}, lat, lon),
        lat.map(lambda a: {"lat": a}),
        lon.map(lambda b: {"lon": b}),
        st.builds(lambda a, b: {"lat": a, "lon": b}, bad_lat, lon),
        st.builds(lambda a, b: {"lat": a, "lon": b}, lat, bad_lon),
    )  # fmt: skip
    return st.builds(lambda doc, where: as_body({**doc, **where}), _broken_body(fields), position)


@cached
def employee_bodies(path: str) -> st.SearchStrategy[Request]:
    fields = {
        "name": required_text(200),
        "site": site_ref(),
        # Its own badge, or one nobody has.
        "badge": optional_text(64, st.sampled_from(["b1" if path.endswith("/e1") else "b9", "b9"])),
    }
    # Another employee's badge, the only thing wrong: a conflict.
    taken = Request("PUT", path, as_body({"name": "Taken", "site": "hq", "badge": "b2"}), True)
    return st.one_of(
        not_bodies().map(lambda body: Request("PUT", path, body)),
        st.just(taken),
        _broken_body(fields).map(lambda doc: Request("PUT", path, as_body(doc))),
    )


@cached
def device_bodies(path: str, taken_serial: str) -> st.SearchStrategy[Request]:
    fields = {
        "site": site_ref(),
        "name": optional_text(200),
        "adms_sn": optional_text(64, st.just(f"fz-{uuid.uuid4().hex}")),
    }
    # Another device's serial number, the only thing wrong: a conflict.
    body = as_body({"site": "hq", "adms_sn": taken_serial})
    return st.one_of(
        not_bodies().map(lambda content: Request("PUT", path, content)),
        st.just(Request("PUT", path, body, True)),
        _broken_body(fields).map(lambda doc: Request("PUT", path, as_body(doc))),
    )


@cached
def token_fields(role: str) -> dict[str, Field]:
    sub = texts(30, min_size=1)
    return {
        "role": Field(
            st.just(role),
            st.one_of(
                st.just(MISSING),
                wrong(False, "str"),
                texts().filter(lambda s: s not in ROLES),
                st.sampled_from(["Admin", "root", "admin "]),
            ),
            False,
        ),
        "sub": Field(
            st.just("door") if role == "terminal" else sub,
            st.one_of(st.just(MISSING), wrong(False, "str"), st.just(""), longer_than(200)),
            False,
        ),
        "employee": Field(
            st.just("e1"), wrong(False, "str", "null") | bad_ids(), role != "employee"
        ),
        "sites": Field(
            st.sampled_from([["hq"], ["*"], [], ["*", "hq"]]),
            st.one_of(
                wrong(False, "list", "null"),
                st.lists(
                    bad_ids().filter(lambda s: s != "*") | wrong(False, "str"),
                    min_size=1,
                    max_size=3,
                ),
            ),
        ),
        "ttl_s": Field(
            st.integers(60, 400 * 24 * 3600),
            st.one_of(
                st.integers(max_value=59),
                st.integers(min_value=400 * 24 * 3600 + 1),
                wrong(False, "int", "null"),
            ),
        ),
    }


@cached
def token_bodies() -> st.SearchStrategy[Request]:
    sub = texts(30, min_size=1)
    # Well-formed, but naming what the tenant does not have.
    employees = ("e1", "e2", "e3")
    unknown = st.one_of(
        st.fixed_dictionaries(
            {"role": st.just("terminal"), "sub": sub.filter(lambda s: s not in ("door", "gate"))}
        ),
        st.fixed_dictionaries(
            {"role": st.just("employee"), "sub": sub, "employee": unknown_ids(*employees)}
        ),
        st.fixed_dictionaries(
            {"role": st.just("employee"), "sub": sub.filter(lambda s: s not in employees)}
        ),
        st.fixed_dictionaries(
            {"role": st.just("supervisor"), "sub": sub,
             "sites": unknown_ids("hq").map(lambda s: ["hq", s])}
        ),
    )  # fmt: skip
    broken = st.sampled_from(ROLES).flatmap(lambda role: _broken_body(token_fields(role)))
    return st.one_of(
        not_bodies(), unknown.map(as_body), broken.map(as_body), broken.map(as_body)
    ).map(lambda body: Request("POST", "/v1/tokens", body))


@st.composite
def _future(draw: st.DrawFn) -> str:
    # Computed when drawn, so that "ahead of the server" stays true however long a run takes.
    return (datetime.now(UTC) + timedelta(minutes=draw(st.integers(30, 10**6)))).isoformat()


@cached
def correction_fields() -> dict[str, Field]:
    fields = {name: field for name, field in punch_fields(False).items() if name != "ref"}
    fields["at"] = Field(
        aware_times(),
        st.one_of(
            fields["at"].broken,
            # More than 5 minutes ahead of the server, or a local time with no UTC instant.
            _future(),
            st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"]),
        ),
        False,
    )
    fields["reason"] = required_text(500)
    fields["site"] = Field(
        st.just("hq"), st.one_of(wrong(False, "str", "null"), bad_ids(), unknown_ids("hq"))
    )
    fields["type"] = Field(
        st.just("punch"),
        st.one_of(wrong(False, "str", "null"), texts().filter(lambda s: s != "punch")),
    )
    return fields


@cached
def correction_bodies() -> st.SearchStrategy[Request]:
    fields = correction_fields()
    valid_identity, broken_identity = identities(False, known_badges=True)
    required = st.fixed_dictionaries(
        {name: field.valid for name, field in fields.items() if not field.optional}
    )
    # Everything valid but the employee, whom the tenant does not have.
    unknown = st.builds(
        lambda doc, who: {**doc, **who},
        required,
        st.one_of(
            unknown_ids("e1", "e2", "e3").map(lambda e: {"employee": e}),
            texts(64).filter(lambda s: s not in ("", "b1", "b2", "b3")).map(lambda b: {"badge": b}),
        ),
    )
    broken = st.one_of(
        # A broken field, whoever the punch is for.
        st.builds(lambda doc, who: {**doc, **who}, _broken_fields(fields),
                  valid_identity | broken_identity),
        # Every field fine but `employee`/`badge`.
        st.builds(lambda doc, who: {**doc, **who}, required, broken_identity),
        # Every field fine but one that bodies do not have.
        st.builds(lambda doc, who: {**doc, **who}, _broken_body(fields), valid_identity),
    )  # fmt: skip
    return st.one_of(not_bodies(), unknown.map(as_body), broken.map(as_body)).map(
        lambda body: Request("POST", "/v1/punches", body)
    )


# -- the hub and the tenant ---------------------------------------------------------------------

FINGERPRINT = """
SELECT (SELECT count(*) FROM tenants) AS tenants,
       (SELECT count(*) FROM punches WHERE committed_at >= $2) AS new_punches_anywhere,
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM sites t
         WHERE t.tenant = $1) AS sites,
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM employees t
         WHERE t.tenant = $1) AS employees,
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM devices t
         WHERE t.tenant = $1) AS devices,
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM punches t
         WHERE t.tenant = $1) AS punches,
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.seq), '')) FROM audit_log t
         WHERE t.tenant = $1) AS audit
"""


@dataclass
class FuzzKit:
    hub: HubProcess
    tenant: TenantKit
    database: str
    owner: asyncpg.Connection
    http: httpx.AsyncClient
    employee_token: str
    taken_serial: str
    started: datetime

    async def fingerprint(self) -> dict[str, Any]:
        """Everything of the tenant's, how many tenants there are, and how many punches any
        tenant has stored since the fuzzing began. (Not all punches: retention may delete old
        ones of other tests meanwhile.)"""
        row = await self.owner.fetchrow(FINGERPRINT, self.tenant.slug, self.started)
        assert row is not None
        return dict(row)

    async def socket(self, subprotocol: str) -> Client:
        offered: Any = [subprotocol]
        ws = await websockets.connect(
            self.tenant.ws_url, subprotocols=offered, max_size=2**20, open_timeout=10
        )
        return Client(ws, subprotocol)

    async def assert_healthy(self) -> None:
        """Still serving, still running, and not one traceback in its log."""
        response = await self.http.get("/healthz")
        assert response.status_code == 200, response.text
        assert self.hub.popen is not None and self.hub.popen.poll() is None
        log = self.hub.log_path.read_text(errors="replace")
        tracebacks = log.count("Traceback")
        first = log[log.find("Traceback") :][:4000]
        assert not tracebacks, f"{tracebacks} tracebacks in the hub's log; the first:\n{first}"


@pytest.fixture(scope="module")
def fuzz_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        # 0 turns these limits off; the one on malformed frames stays (see the module doc).
        "ATTENDANCE_RATE_PER_S": "0",
        "ATTENDANCE_CONNECT_RATE_PER_IP": "0",
        "ATTENDANCE_REST_RATE_PER_IP": "0",
    }
    with running_hub(tmp_path_factory.mktemp("fuzz-hub"), env) as process:
        yield process


@pytest.fixture(scope="module")
async def kit(fuzz_hub: HubProcess, database: str) -> AsyncIterator[FuzzKit]:
    async with provisioned_tenant(fuzz_hub.base_url, database, TEST_SECRET, "fz") as tenant:
        serial = f"SN-{tenant.slug}"
        response = await tenant.http.put("/v1/devices/gate", json={"site": "hq", "adms_sn": serial})
        assert response.status_code == 201, response.text
        owner = await asyncpg.connect(database)
        started = await owner.fetchval("SELECT now()")
        # No keep-alive: if the hub drops a connection after a 500, the next request must not
        # fail for that.
        http = httpx.AsyncClient(
            base_url=fuzz_hub.base_url,
            timeout=30,
            headers={"authorization": f"Bearer {tenant.admin_token}"},
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        try:
            yield FuzzKit(
                hub=fuzz_hub,
                tenant=tenant,
                database=database,
                owner=owner,
                http=http,
                employee_token=tenant.token("employee", "e1", employee="e1"),
                taken_serial=serial,
                started=started,
            )
        finally:
            await http.aclose()
            await owner.close()


# -- WebSocket ----------------------------------------------------------------------------------


async def answer_to(client: Client, sent: Sent) -> dict[str, Any]:
    try:
        return await client.recv()
    except websockets.ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else None
        message = f"the hub closed the socket ({code}) instead of answering {sent}"
        raise AssertionError(message) from None


def check_answer(answer: dict[str, Any], sent: Sent) -> None:
    assert answer.get("type") == "error", (answer, sent)
    assert answer.get("code") in sent.codes, (answer, sent)
    assert isinstance(answer.get("message"), str) and answer["message"], (answer, sent)
    assert answer.get("ref") == sent.ref, (answer.get("ref"), sent)


async def assert_open(client: Client) -> None:
    await client.send({"type": "ping", "ref": "alive"})
    pong = await client.recv()
    assert (pong["type"], pong.get("ref")) == ("pong", "alive"), pong


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
@settings(FUZZ, max_examples=OPEN_SESSION_EXAMPLES)
@given(data=st.data())
async def test_fuzz_frames_on_an_open_session(
    kit: FuzzKit, subprotocol: str, data: st.DataObject
) -> None:
    binary = subprotocol == MSGPACK
    frames = invalid_frames(binary) | refused_frames(binary, kit.employee_token)
    batch = data.draw(st.lists(frames, min_size=FRAMES_PER_SOCKET, max_size=FRAMES_PER_SOCKET))
    before = await kit.fingerprint()
    client = await kit.socket(subprotocol)
    welcome = await client.hello(kit.tenant.terminal_token)
    assert welcome["type"] == "welcome", welcome
    for sent in batch:
        await client.ws.send(sent.payload)
    for sent in batch:
        check_answer(await answer_to(client, sent), sent)
    await assert_open(client)
    await client.close()
    assert await kit.fingerprint() == before
    count(kit.database, f"open session {subprotocol}", len(batch))


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
@settings(FUZZ, max_examples=BEFORE_HELLO_EXAMPLES)
@given(data=st.data())
async def test_fuzz_frames_before_hello(
    kit: FuzzKit, subprotocol: str, data: st.DataObject
) -> None:
    """Frames that cannot be decoded (broken hellos among them) before `hello`: each gets
    `bad_frame`, and a proper `hello` afterwards still opens the session."""
    frames = invalid_frames(subprotocol == MSGPACK, decodes=False)
    batch = data.draw(st.lists(frames, min_size=BEFORE_HELLO_FRAMES, max_size=BEFORE_HELLO_FRAMES))
    before = await kit.fingerprint()
    client = await kit.socket(subprotocol)
    for sent in batch:
        await client.ws.send(sent.payload)
    for sent in batch:
        check_answer(await answer_to(client, sent), sent)
    welcome = await client.hello(kit.tenant.terminal_token)
    assert welcome["type"] == "welcome", welcome
    await assert_open(client)
    await client.close()
    assert await kit.fingerprint() == before
    count(kit.database, f"before hello {subprotocol}", len(batch))


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_a_nul_in_a_badge_is_refused_and_stores_nothing(
    kit: FuzzKit, subprotocol: str
) -> None:
    # PostgreSQL text cannot hold NUL. `bad_frame` or an ack `rejected` are both fine, as long
    # as nothing is stored and the socket stays up.
    before = await kit.fingerprint()
    client = await kit.socket(subprotocol)
    assert (await client.hello(kit.tenant.terminal_token))["type"] == "welcome"
    punch = {"type": "punch", "id": str(uuid.uuid4()), "badge": "b\x001", "kind": "in",
             "at": datetime.now(UTC).isoformat(), "ref": "nul"}  # fmt: skip
    answer = await client.punch(punch)
    assert answer.get("ref") == "nul", answer
    assert answer.get("code") == "bad_frame" or answer.get("status") == "rejected", answer
    await assert_open(client)
    await client.close()
    assert await kit.fingerprint() == before


@pytest.mark.parametrize(
    "payload",
    [
        b"\x81\xa4type\xa2\xff\xfe",
        b"\x82\xa4type\xa4ping\xa3ref\xa2\xff\xfe",
        b"\x82\xa4type\xa5hello\xa5token\xa1\xc3",
    ],
    ids=["type", "ref", "token"],
)
async def test_a_msgpack_string_that_is_not_utf8_is_a_bad_frame(
    kit: FuzzKit, payload: bytes
) -> None:
    client = await kit.socket(MSGPACK)
    assert (await client.hello(kit.tenant.terminal_token))["type"] == "welcome"
    await client.ws.send(payload)
    answer = await client.recv()
    assert (answer.get("type"), answer.get("code")) == ("error", "bad_frame"), answer
    await assert_open(client)
    await client.close()


async def test_the_hub_survived_the_socket_fuzzing(kit: FuzzKit) -> None:
    await kit.assert_healthy()


# -- REST ------------------------------------------------------------------------------------------


def rest_requests(kind: str, kit: FuzzKit) -> st.SearchStrategy[Request]:
    paths = {
        "sites": ["/v1/sites/hq", "/v1/sites/fz-new"],
        "employees": ["/v1/employees/e1", "/v1/employees/fz-new"],
        "devices": ["/v1/devices/door", "/v1/devices/fz-new"],
    }
    if kind == "sites":
        return st.builds(
            lambda path, body: Request("PUT", path, body),
            st.sampled_from(paths["sites"]),
            not_bodies() | site_bodies(),
        )
    if kind == "employees":
        return st.one_of([employee_bodies(path) for path in paths["employees"]])
    if kind == "devices":
        return st.one_of([device_bodies(path, kit.taken_serial) for path in paths["devices"]])
    return token_bodies() if kind == "tokens" else correction_bodies()


async def answer(kit: FuzzKit, request: Request) -> httpx.Response:
    return await kit.http.request(
        request.method,
        request.path,
        content=request.content,
        headers={"content-type": "application/json"},
    )


def check_refusal(request: Request, response: httpx.Response) -> None:
    allowed = {400, 409} if request.conflict else {400}
    assert response.status_code in allowed, (request, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), request
    body = response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] in REST_CODES, (request, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


@pytest.mark.parametrize("kind", ["sites", "employees", "devices", "tokens", "punches"])
@settings(FUZZ, max_examples=REST_EXAMPLES)
@given(data=st.data())
async def test_fuzz_rest_bodies(kit: FuzzKit, kind: str, data: st.DataObject) -> None:
    requests = rest_requests(kind, kit)
    batch = data.draw(
        st.lists(requests, min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE)
    )
    before = await kit.fingerprint()
    responses = await asyncio.gather(*(answer(kit, request) for request in batch))
    for request, response in zip(batch, responses, strict=True):
        check_refusal(request, response)
    assert await kit.fingerprint() == before
    count(kit.database, f"rest {kind}", len(batch))


# Instants at the ends of what a datetime holds: some have no UTC instant at all.
EDGE_TIMES = [
    "0001-01-01T00:00:00+05:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59-05:00",
    "9999-12-31T23:59:59.999999Z",
]


def _cursor(moment: str, punch: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{moment}|{punch}".encode()).decode().rstrip("=")


@cached
def query_strings(path: str) -> st.SearchStrategy[dict[str, str]]:
    """Each parameter of the route with values of its kind and of every other kind."""
    # Short texts only: a URL has its limits.
    times = st.one_of(aware_times(), bad_times(long=False), st.sampled_from(EDGE_TIMES))
    numbers = st.integers(-5, 20_000).map(str) | st.sampled_from(["1.5", "1e3", "+1", " 1", ""])
    anything = st.one_of(texts(), times, numbers, ids())
    cursors = st.builds(_cursor, times, st.uuids()) | anything
    kinds = {
        "employee": ids() | anything,
        "site": ids() | anything,
        "from": times | anything,
        "to": times | anything,
        "since": times | anything,
        "limit": numbers | anything,
        "after": (cursors if path == "/v1/punches" else numbers) | anything,
        "action": st.sampled_from(["site.put", "token.issue"]) | anything,
        "target": st.sampled_from(["site:hq", "employee:e1"]) | anything,
    }
    known = {name: kinds[name] for name in QUERY_KEYS[path]}
    junk = st.dictionaries(texts(5), anything, max_size=1)
    return st.builds(
        lambda q, extra: {**extra, **q}, st.fixed_dictionaries({}, optional=known), junk
    )


QUERY_KEYS = {
    "/v1/punches": ("employee", "site", "from", "to", "limit", "after"),
    "/v1/audit": ("since", "action", "target", "limit", "after"),
}


@settings(FUZZ, max_examples=QUERY_EXAMPLES)
@given(data=st.data())
async def test_fuzz_rest_queries(kit: FuzzKit, data: st.DataObject) -> None:
    """The reading routes' query strings: 200 or 400, never a 5xx, and nothing changes."""
    queries = st.sampled_from(sorted(QUERY_KEYS)).flatmap(
        lambda path: st.tuples(st.just(path), query_strings(path))
    )
    batch = data.draw(
        st.lists(queries, min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE)
    )
    before = await kit.fingerprint()
    responses = await asyncio.gather(*(kit.http.get(path, params=q) for path, q in batch))
    for (path, query), response in zip(batch, responses, strict=True):
        assert response.status_code in (200, 400), (path, query, response.status_code)
        if response.status_code == 400:
            assert response.json()["error"]["code"] == "invalid", (path, query, response.text)
    assert await kit.fingerprint() == before
    count(kit.database, "rest queries", len(batch))


# -- what the fuzzing found, pinned down -------------------------------------------------------

CORRECTION = {"id": "6f1c2a7e-8d1b-4f5e-9a1c-2b3c4d5e6f70", "kind": "in",
              "at": "2026-01-01T00:00:00Z", "reason": "r"}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/sites/fz-nul", {"name": "N\x00L", "timezone": "UTC"}),
        ("PUT", "/v1/employees/fz-nul", {"name": "N\x00L", "site": "hq"}),
        ("PUT", "/v1/employees/fz-nul", {"name": "NUL", "site": "hq", "badge": "b\x00"}),
        ("PUT", "/v1/devices/fz-nul", {"site": "hq", "name": "N\x00L"}),
        ("PUT", "/v1/devices/fz-nul", {"site": "hq", "adms_sn": "S\x00N"}),
        ("POST", "/v1/tokens", {"role": "admin", "sub": "\x00"}),
        ("POST", "/v1/tokens", {"role": "employee", "sub": "e\x00"}),
        ("POST", "/v1/tokens", {"role": "terminal", "sub": "d\x00"}),
        ("POST", "/v1/punches", {**CORRECTION, "employee": "e1", "reason": "\x00"}),
        ("POST", "/v1/punches", {**CORRECTION, "badge": "\x00"}),
    ],
)
async def test_a_nul_character_in_a_body_is_a_400_not_a_500(
    kit: FuzzKit, method: str, path: str, body: dict[str, Any]
) -> None:
    before = await kit.fingerprint()
    response = await kit.http.request(method, path, json=body)
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.json()["error"]["code"] in REST_CODES
    assert await kit.fingerprint() == before


# The cursor of a punch at 0001-01-01T00:00:00+05:00: a local time with no UTC instant.
FAR_CURSOR = "MDAwMS0wMS0wMVQwMDowMDowMCswNTowMHw2ZjFjMmE3ZS04ZDFiLTRmNWUtOWExYy0yYjNjNGQ1ZTZmNzA"


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/punches", {"from": "0001-01-01T00:00:00+05:00"}),
        ("/v1/punches", {"to": "9999-12-31T23:59:59-05:00"}),
        ("/v1/punches", {"after": FAR_CURSOR}),
        ("/v1/audit", {"since": "0001-01-01T00:00:00+05:00"}),
        ("/v1/audit", {"action": "site.put\x00"}),
        ("/v1/audit", {"target": "\x00"}),
    ],
)
async def test_query_values_the_database_cannot_take_are_a_400_not_a_500(
    kit: FuzzKit, path: str, query: dict[str, str]
) -> None:
    response = await kit.http.get(path, params=query)
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.json()["error"]["code"] == "invalid"


# -- the end -------------------------------------------------------------------------------------


async def test_enough_cases_ran_and_the_hub_survived_them(
    kit: FuzzKit, request: pytest.FixtureRequest
) -> None:
    """Last in the module: at least MIN_CASES ran against this database, and the hub is fine."""
    backend = request.node.callspec.params["pg_server"]
    selected = {
        item.originalname
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is request.module
        and item.callspec.params.get("pg_server") == backend
    }
    fuzz_tests = {name for name in dir(request.module) if name.startswith("test_fuzz_")}
    if not fuzz_tests <= selected:
        pytest.skip("only some of the fuzz tests were selected; the count needs all of them")
    ran = CASES.get(kit.database, Counter())
    assert sum(ran.values()) >= MIN_CASES, dict(ran)
    await kit.assert_healthy()
