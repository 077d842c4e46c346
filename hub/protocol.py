"""Every WebSocket frame, both directions, as msgspec Structs.

One tagged union per direction and one reusable decoder and encoder per
direction and subprotocol. New fields always get defaults, so older clients
keep decoding what newer servers send.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec

JSON_SUBPROTOCOL: Final = "attendance.v1.json"
MSGPACK_SUBPROTOCOL: Final = "attendance.v1.msgpack"
SUBPROTOCOLS: Final = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)

EntityId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Ref = Annotated[str, msgspec.Meta(max_length=128)]
Token = Annotated[str, msgspec.Meta(max_length=8192)]
AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]
PunchKind = Literal["in", "out", "break_start", "break_end"]
PunchMethod = Literal["badge", "pin", "face", "fingerprint", "mobile", "manual"]
AckStatus = Literal["accepted", "duplicate", "rejected"]
# PostgreSQL text cannot hold U+0000, and a badge is stored when it resolves nothing.
Badge = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[^\x00]+$")]


class Geo(msgspec.Struct, forbid_unknown_fields=True):
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)]
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)]
    accuracy_m: Annotated[float, msgspec.Meta(ge=0)] | None = None


class _ClientFrame(msgspec.Struct, tag_field="type", forbid_unknown_fields=False):
    ref: Ref | None = None


class Hello(_ClientFrame, tag="hello"):
    token: Token = ""
    client: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class Punch(_ClientFrame, tag="punch"):
    id: uuid.UUID | None = None
    kind: PunchKind | None = None
    at: AwareTime | None = None
    employee: EntityId | None = None
    badge: Badge | None = None
    method: PunchMethod | None = None
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    geo: Geo | None = None
    offline: bool = False

    def __post_init__(self) -> None:
        # Required fields are checked here rather than by position so that the
        # error names the field a terminal author has to fix.
        for name in ("id", "kind", "at"):
            if getattr(self, name) is None:
                raise ValueError(f"punch needs `{name}`")
        if (self.employee is None) == (self.badge is None):
            raise ValueError("punch needs exactly one of `employee` or `badge`")


class Subscribe(_ClientFrame, tag="subscribe"):
    channel: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = ""
    since: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Unsubscribe(_ClientFrame, tag="unsubscribe"):
    channel: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = ""


class Ping(_ClientFrame, tag="ping"):
    t: int | None = None


class Refresh(_ClientFrame, tag="refresh"):
    token: Token = ""


ClientFrame = Hello | Punch | Subscribe | Unsubscribe | Ping | Refresh


class _ServerFrame(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class Welcome(_ServerFrame, tag="welcome"):
    session: str
    server_time: str
    heartbeat_s: int
    role: str
    tenant: str
    sub: str
    ref: str | None = None


class Ack(_ServerFrame, tag="ack"):
    """The answer to a punch; on ``me``, news of the employee's own punch made elsewhere.

    The fields from ``channel`` on appear only on ``me``: they say what was stored.
    """

    # A punch's UUID as it was decoded: msgspec writes its canonical text itself.
    id: uuid.UUID | str
    status: AckStatus
    reason: str | None = None
    received_at: str | None = None
    ref: str | None = None
    channel: str | None = None
    employee: str | None = None
    kind: str | None = None
    at: str | None = None
    site: str | None = None
    source: str | None = None


class Pong(_ServerFrame, tag="pong"):
    server_time: str
    t: int | None = None
    ref: str | None = None


class Refreshed(_ServerFrame, tag="refreshed"):
    expires_at: str
    ref: str | None = None


class Error(_ServerFrame, tag="error"):
    code: str
    message: str
    ref: str | None = None
    # The punch this error is about, when it is about one that was not stored.
    id: uuid.UUID | str | None = None


class Drain(_ServerFrame, tag="drain"):
    reconnect_after_ms: int


class Subscribed(_ServerFrame, tag="subscribed"):
    channel: str
    version: int
    recovered: bool
    ref: str | None = None


class Unsubscribed(_ServerFrame, tag="unsubscribed"):
    channel: str
    ref: str | None = None


class PresenceMember(msgspec.Struct, omit_defaults=True):
    """A member of a ``presence:`` channel; ``late`` only appears when true."""

    employee: str
    name: str
    state: str
    since: str
    site: str
    late: bool = False


class TerminalMember(msgspec.Struct):
    """A member of a ``terminals:`` channel."""

    device: str
    name: str
    online: bool
    since: str


class AlertMember(msgspec.Struct, omit_defaults=True):
    """An alert in an ``alerts:`` snapshot: the ``alert`` frame's fields."""

    id: str
    kind: str
    severity: str
    at: str
    message: str
    detail: dict[str, Any]
    raised_at: str
    employee: str | None = None
    site: str | None = None


class Snapshot(_ServerFrame, tag="snapshot"):
    channel: str
    version: int
    members: list[PresenceMember | TerminalMember | AlertMember]


class Delta(_ServerFrame, tag="delta"):
    channel: str
    version: int
    changes: list[PresenceMember | TerminalMember]


class Alert(_ServerFrame, tag="alert", omit_defaults=True):
    """An alert, on ``alerts:<site>`` (with that channel's ``version``) or on ``me``."""

    channel: str
    id: str
    kind: str
    severity: str
    at: str
    message: str
    detail: dict[str, Any]
    raised_at: str
    employee: str | None = None
    site: str | None = None
    version: int | None = None


class Notice(_ServerFrame, tag="notice"):
    """Something an employee's phone should tell its owner, on ``me`` (not stored)."""

    channel: str
    kind: str
    at: str
    message: str
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


ServerFrame = (
    Welcome
    | Ack
    | Pong
    | Refreshed
    | Error
    | Drain
    | Subscribed
    | Unsubscribed
    | Snapshot
    | Delta
    | Notice
    | Alert
)


class _RefOnly(msgspec.Struct):
    ref: str | None = None


class FrameError(ValueError):
    """A frame that could not be decoded; ``ref`` is the client's, when it could be read."""

    def __init__(self, message: str, ref: str | None) -> None:
        super().__init__(message)
        self.ref = ref


class Codec:
    """Decodes client frames and encodes server frames for one subprotocol."""

    def __init__(self, subprotocol: str) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(f"unknown subprotocol {subprotocol!r}")
        self.subprotocol = subprotocol
        self.binary = subprotocol == MSGPACK_SUBPROTOCOL
        if self.binary:
            self._decoder: Any = msgspec.msgpack.Decoder(ClientFrame)
            self._ref_decoder: Any = msgspec.msgpack.Decoder(_RefOnly)
            self._encoder: Any = msgspec.msgpack.Encoder()
        else:
            self._decoder = msgspec.json.Decoder(ClientFrame)
            self._ref_decoder = msgspec.json.Decoder(_RefOnly)
            self._encoder = msgspec.json.Encoder()

    def decode(self, payload: bytes | str) -> ClientFrame:
        if isinstance(payload, str) == self.binary:
            kind = "binary" if self.binary else "text"
            raise FrameError(f"{self.subprotocol} expects {kind} frames", None)
        try:
            frame: ClientFrame = self._decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise FrameError(_describe(exc), self._read_ref(payload)) from None
        except RecursionError:
            raise FrameError("the frame is nested too deeply", None) from None
        except UnicodeDecodeError:
            raise FrameError("strings must be valid UTF-8", None) from None
        return frame

    def encode(self, frame: ServerFrame) -> bytes:
        data: bytes = self._encoder.encode(frame)
        return data

    def _read_ref(self, payload: bytes | str) -> str | None:
        try:
            found: _RefOnly = self._ref_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
            return None
        return found.ref if isinstance(found.ref, str) else None


def _describe(exc: Exception) -> str:
    text = str(exc)
    if "Invalid value" in text and "$.type" in text:
        return "unknown frame `type`"
    if (
        "missing required field `type`" in text.lower()
        or "Object missing required field `type`" in text
    ):
        return "frame needs a `type` field"
    return text


def is_entity_id(value: str) -> bool:
    """Whether ``value`` is a valid id of a site, employee or device."""
    try:
        msgspec.convert(value, EntityId)
    except msgspec.ValidationError:
        return False
    return True


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, the form the server always writes."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # Every ack carries one of these, and a UTC isoformat always ends in "+00:00".
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
