"""The audit log's hash chain: canonical encoding, hashes and verification, no I/O.

Each tenant's audit rows form one chain. A row's ``hash`` is sha256 over the canonical
JSON of its fields and the previous row's hash; its before/after enter only as a salted
digest, so personal data can later be redacted without breaking the chain. The chain
detects a row that was edited, deleted or relinked. It does not detect a rewrite of the
whole chain together with its head by someone who can write to the database; keeping
the ``head_hash`` that ``audit verify`` prints somewhere else is what catches that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

GENESIS: Final = "0" * 64
REDACTED: Final = "[redacted]"
# Part of every hash, so that a future change of the encoding can be told apart.
ENCODING: Final = "attendance-audit-v1"

Problem = Literal["edited", "gap", "broken_link", "head_mismatch"]


def _normalized(value: Any) -> Any:
    # jsonb stores numbers as decimals: 150.0 comes back as 150.0, but 1e16 comes back as
    # an integer. Writing every integral float as that integer gives one encoding for both.
    if isinstance(value, float) and value.is_integer():
        return int(Decimal(repr(value)))
    if isinstance(value, Mapping):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(item) for item in value]
    return value


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, ASCII, integral floats as ints."""
    return json.dumps(
        _normalized(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    ).encode()


def content_digest(salt: bytes, before: Any, after: Any) -> str:
    """The digest of a row's before/after that its hash covers.

    The random salt is dropped when the row is redacted, so the digest that stays
    behind cannot be matched against guessed names or badges.
    """
    return hashlib.sha256(salt + canonical_json([before, after])).hexdigest()


def format_at(at: datetime) -> str:
    """The time as it is hashed: UTC, microseconds, ``Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Entry:
    """The hashed fields of one audit row."""

    tenant: str
    seq: int
    at: datetime
    actor: str
    role: str
    action: str
    target: str
    ip: str | None
    user_agent: str | None
    content_digest: str

    def hash(self, prev_hash: str) -> str:
        fields = [
            ENCODING,
            self.tenant,
            self.seq,
            format_at(self.at),
            self.actor,
            self.role,
            self.action,
            self.target,
            self.ip,
            self.user_agent,
            self.content_digest,
            prev_hash,
        ]
        return hashlib.sha256(canonical_json(fields)).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredRow:
    """An audit row as read back for verification."""

    entry: Entry
    before: Any
    after: Any
    content_salt: bytes | None
    prev_hash: str | None
    hash: str | None
    redacted: bool


@dataclass(frozen=True, slots=True)
class Head:
    """A tenant's newest row and the anchor its chain starts from."""

    seq: int
    hash: str
    anchor_seq: int
    anchor_hash: str


def redacted(value: Any, fields: Collection[str]) -> Any:
    """``value`` with each of ``fields`` that holds something replaced by ``REDACTED``."""
    if not isinstance(value, Mapping):
        return value
    return {
        key: REDACTED if key in fields and item is not None else item for key, item in value.items()
    }


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of verifying one tenant's chain."""

    tenant: str
    entries: int
    head_seq: int
    head_hash: str
    seq: int | None = None
    problem: Problem | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "tenant": self.tenant,
            "ok": self.ok,
            "entries": self.entries,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
        }
        if not self.ok:
            report.update(seq=self.seq, problem=self.problem, message=self.message)
        return report


class ChainVerifier:
    """Checks one tenant's rows, fed in seq order from just after the anchor.

    ``feed`` returns False at the first problem; everything after it is unchecked.
    """

    def __init__(self, tenant: str, head: Head | None) -> None:
        self.tenant = tenant
        self.head = head
        self._expected = head.anchor_seq + 1 if head else 1
        self._prev = head.anchor_hash if head else GENESIS
        self._entries = 0
        self._failure: tuple[int, Problem, str] | None = None

    def feed(self, row: StoredRow) -> bool:
        if self._failure is not None:
            return False
        entry = row.entry
        if entry.seq != self._expected:
            return self._fail(
                self._expected,
                "gap",
                f"seq {self._expected} is missing (deleted); the next row is seq {entry.seq}",
            )
        if row.hash is None or row.prev_hash is None:
            return self._fail(entry.seq, "edited", "the row has no hash")
        if not row.redacted and (
            row.content_salt is None
            or content_digest(row.content_salt, row.before, row.after) != entry.content_digest
        ):
            return self._fail(entry.seq, "edited", "before/after differ from what was recorded")
        if entry.hash(row.prev_hash) != row.hash:
            return self._fail(entry.seq, "edited", "the row differs from what was recorded")
        if row.prev_hash != self._prev:
            return self._fail(
                entry.seq, "broken_link", "prev_hash is not the hash of the row before it"
            )
        self._prev = row.hash
        self._expected += 1
        self._entries += 1
        return True

    def finish(self) -> ChainReport:
        head = self.head
        last = self._expected - 1
        if self._failure is None and head is None and self._entries:
            self._fail(1, "head_mismatch", "the tenant has audit rows but no head row")
        elif self._failure is None and head is not None:
            if head.seq > last:
                self._fail(
                    last + 1,
                    "head_mismatch",
                    f"the head is at seq {head.seq} but the rows end at seq {last}: "
                    "the newest rows were deleted",
                )
            elif head.seq < last:
                self._fail(
                    head.seq + 1, "head_mismatch", f"rows continue past the head at seq {head.seq}"
                )
            elif head.hash != self._prev:
                self._fail(last, "head_mismatch", "the head's hash is not the newest row's hash")
        failure = self._failure or (None, None, None)
        return ChainReport(
            tenant=self.tenant,
            entries=self._entries,
            head_seq=head.seq if head else 0,
            head_hash=head.hash if head else GENESIS,
            seq=failure[0],
            problem=failure[1],
            message=failure[2],
        )

    def _fail(self, seq: int, problem: Problem, message: str) -> bool:
        self._failure = (seq, problem, message)
        return False
