"""The JSON Schema of every WebSocket frame, generated from hub/protocol.py.

``python -m hub.schema`` writes clients/js/protocol.schema.json, which the JS client's tests
check its types and frames against; ``--check`` only says whether that file is current.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec

from hub import protocol

SCHEMA_PATH: Final = Path(__file__).resolve().parent.parent / "clients/js/protocol.schema.json"
_REF: Final = "#/$defs/{name}"
_DESCRIPTION: Final = (
    "Every frame of the attendance-hub WebSocket protocol (attendance.v1), both directions: "
    "$defs.ClientFrame lists the frames a client sends, $defs.ServerFrame those the hub sends, "
    "one definition per frame, named as the Struct in hub/protocol.py. With "
    "attendance.v1.msgpack the same maps are msgpack. The hub leaves out server fields at "
    "their default (null, false, {}), so a client does not see null there. Generated from "
    "hub/protocol.py by `python -m hub.schema`: do not edit."
)
# Punch.__post_init__ checks these after decoding, where msgspec's schema cannot see them.
# A client never needs to send null for them, so the schema allows only the value.
_PUNCH_REQUIRED: Final = ("id", "kind", "at")
_PUNCH_ONE_OF: Final = ("employee", "badge")


def build() -> dict[str, Any]:
    """The schema, as a JSON-ready dict."""
    members: list[type[msgspec.Struct]] = []
    server = tuple(_encodable(frame, members) for frame in typing.get_args(protocol.ServerFrame))
    # A union built at run time has no `|` spelling.
    (client_union, server_union, *_), defs = msgspec.json.schema_components(
        [protocol.ClientFrame, typing.Union[server], *members],  # noqa: UP007
        ref_template=_REF,
    )
    defs["ClientFrame"] = {
        "title": "ClientFrame",
        "description": "A frame a client sends to the hub.",
        **client_union,
    }
    defs["ServerFrame"] = {
        "title": "ServerFrame",
        "description": "A frame the hub sends to a client.",
        **server_union,
    }
    for definition in defs.values():
        if "description" in definition:
            definition["description"] = inspect.cleandoc(definition["description"])
    _add_punch_rules(defs["Punch"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "attendance.v1 WebSocket frames",
        "description": _DESCRIPTION,
        "anyOf": [
            {"$ref": _REF.format(name="ClientFrame")},
            {"$ref": _REF.format(name="ServerFrame")},
        ],
        "$defs": defs,
    }


def render() -> str:
    """The schema as the committed file holds it: sorted keys, a trailing newline."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def _encodable(frame: type[msgspec.Struct], found: list[type[msgspec.Struct]]) -> Any:
    """``frame``, or a subclass of it whose fields msgspec can describe.

    msgspec describes only types it can decode, and some server fields are encode-only
    (``uuid.UUID | str``, a list of untagged member Structs): those become ``Any`` with the
    schema of their alternatives. The Structs among them are appended to ``found``.
    """
    fields: list[tuple[Any, ...]] = []
    for field in msgspec.structs.fields(frame):
        hint = _describable(field.type, found)
        if hint is field.type:
            continue
        if field.default is not msgspec.NODEFAULT:
            fields.append((field.name, hint, field.default))
        elif field.default_factory is not msgspec.NODEFAULT:
            fields.append((field.name, hint, msgspec.field(default_factory=field.default_factory)))
        else:
            fields.append((field.name, hint))
    if not fields:
        return frame
    config = frame.__struct_config__
    return msgspec.defstruct(
        frame.__name__,
        fields,
        bases=(frame,),
        tag=config.tag,
        tag_field=config.tag_field,
        module=frame.__module__,
        namespace={"__doc__": frame.__doc__},
    )


def _describable(hint: Any, found: list[type[msgspec.Struct]]) -> Any:
    try:
        msgspec.json.Decoder(hint)
    except TypeError:
        pass
    else:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return list[_describable(args[0], found)]  # type: ignore[misc]
    if origin in (typing.Union, types.UnionType):
        schemas, _ = msgspec.json.schema_components(args, ref_template=_REF)
        found.extend(
            arg for arg in args if isinstance(arg, type) and issubclass(arg, msgspec.Struct)
        )
        return Annotated[Any, msgspec.Meta(extra_json_schema={"anyOf": list(schemas)})]
    raise TypeError(f"no JSON Schema for {hint!r}")


def _add_punch_rules(punch: dict[str, Any]) -> None:
    properties = punch["properties"]
    for name in (*_PUNCH_REQUIRED, *_PUNCH_ONE_OF):
        (value,) = [s for s in properties[name]["anyOf"] if s != {"type": "null"}]
        properties[name] = value
    punch["required"] = [*punch["required"], *_PUNCH_REQUIRED]
    punch["oneOf"] = [{"required": [name]} for name in _PUNCH_ONE_OF]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.schema", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    parser.add_argument("--output", type=Path, default=SCHEMA_PATH, help="default: %(default)s")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(
                f"{args.output} does not match hub/protocol.py: run `python -m hub.schema`",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
