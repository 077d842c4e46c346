"""The protocol's JSON Schema (hub/schema.py) and the committed clients/js/protocol.schema.json."""

from __future__ import annotations

import difflib
import json
import re
import typing
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hub import protocol as p
from hub import schema

SCHEMA = json.loads(schema.render())
DEFS: dict[str, Any] = SCHEMA["$defs"]
NOW = p.format_time(datetime(2026, 11, 28, 12, 28, 6, 572000, tzinfo=UTC))
PUNCH_ID = "8ec12a5b-d9e2-4913-b72a-69974daa23cc"

# Keywords that do not constrain a value; any other keyword the validator does not know fails
# the test, so that a schema using one is not waved through.
_ANNOTATIONS = {"$schema", "title", "description", "default", "discriminator", "$defs"}
_FORMATS = {
    "uuid": re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"),
    "date-time": re.compile(
        r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
    ),
}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def errors(value: Any, node: dict[str, Any], path: str = "$") -> list[str]:
    """Why ``value`` does not match ``node`` (a part of SCHEMA): the keywords SCHEMA uses."""
    found: list[str] = []
    for keyword, arg in node.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "$ref":
            found += errors(value, DEFS[arg.removeprefix("#/$defs/")], path)
        elif keyword in ("anyOf", "oneOf"):
            matches = sum(not errors(value, alternative, path) for alternative in arg)
            if matches == 0 or (keyword == "oneOf" and matches > 1):
                found.append(f"{path}: {matches} of the {keyword} alternatives match")
        elif keyword == "enum":
            if value not in arg:
                found.append(f"{path}: {value!r} is not one of {arg}")
        elif keyword == "type":
            if not _TYPES[arg](value):
                found.append(f"{path}: {value!r} is not of type {arg}")
        elif keyword == "required":
            if isinstance(value, dict):
                found += [f"{path}: missing `{name}`" for name in arg if name not in value]
        elif keyword == "properties":
            if isinstance(value, dict):
                for name, sub in arg.items():
                    if name in value:
                        found += errors(value[name], sub, f"{path}.{name}")
        elif keyword == "additionalProperties":
            assert arg is False, arg
            if isinstance(value, dict):
                extra = set(value) - set(node.get("properties", {}))
                found += [f"{path}: unexpected `{name}`" for name in sorted(extra)]
        elif keyword == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    found += errors(item, arg, f"{path}[{i}]")
        elif keyword in ("minimum", "maximum"):
            if _TYPES["number"](value) and (value < arg if keyword == "minimum" else value > arg):
                found.append(f"{path}: {value} is out of range ({keyword} {arg})")
        elif keyword in ("minLength", "maxLength"):
            if isinstance(value, str) and (
                len(value) < arg if keyword == "minLength" else len(value) > arg
            ):
                found.append(f"{path}: the length of {value!r} breaks {keyword} {arg}")
        elif keyword == "pattern":
            if isinstance(value, str) and not re.search(arg, value):
                found.append(f"{path}: {value!r} does not match {arg!r}")
        elif keyword == "format":
            if isinstance(value, str) and not _FORMATS[arg].match(value):
                found.append(f"{path}: {value!r} is not a {arg}")
        else:
            raise AssertionError(f"the test's validator does not know `{keyword}`")
    return found


def definition_of(frame: type[msgspec.Struct]) -> dict[str, Any]:
    return DEFS[frame.__name__]


def test_the_committed_schema_is_current() -> None:
    committed = schema.SCHEMA_PATH.read_text(encoding="utf-8")
    generated = schema.render()
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm=""
        )
        pytest.fail(
            f"{schema.SCHEMA_PATH} differs from what hub/protocol.py gives now: "
            "run `python -m hub.schema` and commit the file\n" + "\n".join(list(diff)[:40])
        )


def test_check_says_whether_the_file_is_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "protocol.schema.json"
    assert schema.main(["--check", "--output", str(target)]) == 1
    assert schema.main(["--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == schema.render()
    assert schema.main(["--check", "--output", str(target)]) == 0
    target.write_text(schema.render().replace('"ack"', '"acknowledged"'), encoding="utf-8")
    assert schema.main(["--check", "--output", str(target)]) == 1
    assert "run `python -m hub.schema`" in capsys.readouterr().err


def test_the_output_is_stable() -> None:
    text = schema.render()
    assert text == schema.render()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_each_frame_is_a_definition_named_by_its_struct() -> None:
    for union_name, union in (("ClientFrame", p.ClientFrame), ("ServerFrame", p.ServerFrame)):
        frames = typing.get_args(union)
        mapping = DEFS[union_name]["discriminator"]["mapping"]
        assert mapping == {
            frame.__struct_config__.tag: f"#/$defs/{frame.__name__}" for frame in frames
        }
        for frame in frames:
            definition = definition_of(frame)
            assert definition["title"] == frame.__name__
            assert definition["properties"]["type"] == {"enum": [frame.__struct_config__.tag]}


@pytest.mark.parametrize(
    "struct",
    [
        *typing.get_args(p.ClientFrame),
        *typing.get_args(p.ServerFrame),
        p.Geo,
        p.PresenceMember,
        p.TerminalMember,
        p.AlertMember,
    ],
    ids=lambda struct: struct.__name__,
)
def test_properties_and_required_are_the_structs_fields(struct: type[msgspec.Struct]) -> None:
    definition = definition_of(struct)
    fields = msgspec.structs.fields(struct)
    tag = [struct.__struct_config__.tag_field] if struct.__struct_config__.tag_field else []
    assert set(definition["properties"]) == {f.encode_name for f in fields} | set(tag)
    required = {f.encode_name for f in fields if f.required} | set(tag)
    if struct is p.Punch:
        # Checked by Punch.__post_init__: see the client frames below.
        required |= {"id", "kind", "at"}
    assert set(definition["required"]) == required


def test_every_definition_is_a_frame_a_union_or_a_struct_of_the_protocol() -> None:
    structs = {
        name
        for name, value in vars(p).items()
        if isinstance(value, type) and issubclass(value, msgspec.Struct)
    }
    assert set(DEFS) - {"ClientFrame", "ServerFrame"} <= structs


SERVER_FRAMES: list[p.ServerFrame] = [
    p.Welcome(
        session=uuid.uuid4().hex,
        server_time=NOW,
        heartbeat_s=30,
        role="terminal",
        tenant="demo",
        sub="door-1",
        ref="h",
    ),
    p.Ack(id=uuid.UUID(PUNCH_ID), status="accepted", received_at=NOW, ref="p1"),
    p.Ack(id=PUNCH_ID, status="rejected", reason="invalid_time", received_at=NOW),
    p.Ack(
        id=uuid.UUID(PUNCH_ID),
        status="accepted",
        received_at=NOW,
        channel="me",
        employee="e1",
        kind="in",
        at=NOW,
        site="hq",
        source="terminal",
    ),
    p.Pong(server_time=NOW, t=1764332886000, ref="x"),
    p.Pong(server_time=NOW),
    p.Refreshed(expires_at=NOW, ref="r"),
    p.Error(code="bad_frame", message="punch needs `at`", ref="p2"),
    p.Error(code="unavailable", message="not stored", ref="p9", id=uuid.UUID(PUNCH_ID)),
    p.Drain(reconnect_after_ms=1500),
    p.Subscribed(channel="presence:hq", version=1764340000000000, recovered=False, ref="s"),
    p.Unsubscribed(channel="presence:hq", ref="u"),
    p.Snapshot(
        channel="presence:hq",
        version=1764340000000000,
        members=[
            p.PresenceMember(employee="e1", name="Ann", state="in", since=NOW, site="hq"),
            p.PresenceMember(
                employee="e3", name="Ed", state="out", since=NOW, site="hq", late=True
            ),
        ],
    ),
    p.Snapshot(
        channel="terminals:hq",
        version=7,
        members=[p.TerminalMember(device="door-1", name="Door", online=True, since=NOW)],
    ),
    p.Snapshot(
        channel="alerts:hq",
        version=7,
        members=[
            p.AlertMember(
                id="a1",
                kind="buddy_punch",
                severity="warning",
                at=NOW,
                message="grace was punched 0.5 s after another punch",
                detail={"gap_s": 0.5},
                raised_at=NOW,
                employee="grace",
                site="hq",
            )
        ],
    ),
    p.Delta(
        channel="terminals:hq",
        version=8,
        changes=[p.TerminalMember(device="door-1", name="Door", online=False, since=NOW)],
    ),
    p.Notice(channel="me", kind="late", at=NOW, message="you are late", detail={"site": "hq"}),
    p.Notice(channel="me", kind="schedule", at=NOW, message="your shifts changed"),
    p.Alert(
        channel="alerts:hq",
        id="a2",
        kind="geofence",
        severity="critical",
        at=NOW,
        message="outside the site",
        detail={},
        raised_at=NOW,
        site="hq",
        version=9,
    ),
]


def test_the_samples_cover_every_server_frame() -> None:
    assert {type(frame) for frame in SERVER_FRAMES} == set(typing.get_args(p.ServerFrame))


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda frame: type(frame).__name__)
def test_frames_the_hub_sends_validate(frame: p.ServerFrame) -> None:
    sent = json.loads(p.Codec(p.JSON_SUBPROTOCOL).encode(frame))
    assert errors(sent, DEFS["ServerFrame"]) == []
    assert errors(sent, definition_of(type(frame))) == []


@pytest.mark.parametrize(
    ("struct", "frame", "why"),
    [
        (p.Welcome, {"type": "welcome", "server_time": NOW}, "missing `session`"),
        (p.Ack, {"type": "ack", "id": PUNCH_ID, "status": "ok"}, "is not one of"),
        (p.Drain, {"type": "drain", "reconnect_after_ms": "soon"}, "is not of type integer"),
        (p.Snapshot, {"type": "snapshot", "channel": "x", "version": 1, "members": [{}]}, "match"),
    ],
)
def test_the_validator_refuses_what_the_hub_never_sends(
    struct: type[msgspec.Struct], frame: dict[str, Any], why: str
) -> None:
    found = errors(frame, definition_of(struct))
    assert any(why in reason for reason in found), found


PUNCH: dict[str, Any] = {
    "type": "punch",
    "ref": "p1",
    "id": PUNCH_ID,
    "badge": "1001",
    "kind": "in",
    "at": "2026-11-28T13:28:06.100+01:00",
    "method": "badge",
    "seq": 7,
    "geo": {"lat": 52.52, "lon": 13.405, "accuracy_m": 9},
    "offline": False,
}


def _without(frame: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in frame.items() if key not in names}


CLIENT_FRAMES: list[dict[str, Any]] = [
    {"type": "hello", "token": "eyJ.x.y", "client": "door-1 fw 2.3", "ref": "h"},
    {"type": "hello", "token": "eyJ.x.y", "future_field": 1},
    PUNCH,
    {**_without(PUNCH, "badge"), "employee": "e1"},
    _without(PUNCH, "ref", "method", "seq", "geo", "offline"),
    _without(PUNCH, "id"),
    _without(PUNCH, "kind"),
    _without(PUNCH, "at"),
    {**PUNCH, "at": None},
    {**PUNCH, "at": "2026-11-28T13:28:06.100"},
    {**PUNCH, "employee": "e1"},
    _without(PUNCH, "badge"),
    {**PUNCH, "kind": "lunch"},
    {**PUNCH, "method": "telepathy"},
    {**PUNCH, "seq": -1},
    {**PUNCH, "geo": {"lat": 91, "lon": 0}},
    {**PUNCH, "geo": {"lat": 1, "lon": 2, "alt": 3}},
    {**_without(PUNCH, "badge"), "employee": "not an id"},
    {"type": "subscribe", "channel": "presence:hq", "since": 1764340000000000, "ref": "s"},
    {"type": "subscribe", "channel": ""},
    {"type": "unsubscribe", "channel": "presence:hq"},
    {"type": "ping", "t": 1764332886000, "ref": "x"},
    {"type": "ping", "t": 1.5},
    {"type": "refresh", "token": "eyJ.x.y", "ref": "r"},
    {"type": "refresh", "token": "x" * 8193},
    {"type": "teleport"},
    {"token": "eyJ.x.y"},
]


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda frame: json.dumps(frame)[:90])
def test_the_schema_accepts_the_client_frames_the_hub_decodes(frame: dict[str, Any]) -> None:
    """For these frames the schema and the hub's decoder (with __post_init__) agree."""
    try:
        p.Codec(p.JSON_SUBPROTOCOL).decode(json.dumps(frame))
    except p.FrameError as exc:
        decoded, why = False, str(exc)
    else:
        decoded, why = True, ""
    found = errors(frame, DEFS["ClientFrame"])
    assert (not found) == decoded, f"hub: {why or 'decodes it'}; schema: {found or 'accepts it'}"
