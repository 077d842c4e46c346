"""Live channels in this process: every tenant's floors, who listens to what, and the fan-out.

Presence changes only after commit: the punch batcher hands over each batch's
stored punches once PostgreSQL has committed them, before any of them is
acked, and the deltas go out in the order the state changed. Each delta is
encoded and framed once per subprotocol, whatever the number of listeners.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final, NamedTuple, Protocol

from hub import protocol as p
from hub.presence import (
    Delta,
    Member,
    PresencePunch,
    Snapshot,
    TenantFloor,
    TerminalBoard,
    TerminalMember,
)
from hub.types import Conn
from hub.wsproto import Framed, frame_message
from workers.persist import PunchOutcome, PunchRequest

log = logging.getLogger(__name__)

# The latest punch of every employee who is not erased: the floor to start from.
LATEST_SQL: Final = """
SELECT DISTINCT ON (p.tenant, p.employee)
       p.tenant, p.id, p.employee, e.name, p.site, p.kind, p.at
  FROM punches p
  JOIN employees e ON e.tenant = p.tenant AND e.id = p.employee
 WHERE e.erased_at IS NULL
 ORDER BY p.tenant, p.employee, p.at DESC, p.id DESC
"""

# Every device that is not revoked, for the `terminals:` boards to start from.
DEVICES_SQL: Final = """
SELECT tenant, id, site, name FROM devices WHERE revoked_at IS NULL
"""

# Flags found by presence (odd sequences, late arrivals), added to the stored punches.
FLAG_SQL: Final = """
UPDATE punches p SET flags = array_append(p.flags, f.flag)
  FROM unnest($1::text[], $2::uuid[], $3::text[]) AS f(tenant, id, flag)
 WHERE p.tenant = f.tenant AND p.id = f.id AND NOT f.flag = ANY (p.flags)
"""


class Listener(Protocol):
    """A socket that hears channels: a ``Connection``."""

    codec: p.Codec

    def send_framed(self, framed: Framed, tag: str) -> None: ...


class Flag(NamedTuple):
    tenant: str
    id: uuid.UUID
    flag: str


class Live:
    """Floors, subscriptions and fan-out for every tenant served by this process.

    ``base_version`` starts every channel's version sequence (see ``TenantFloor``).
    """

    def __init__(self, base_version: int) -> None:
        self._base = base_version
        self._floors: dict[str, TenantFloor] = {}
        self._boards: dict[str, TerminalBoard] = {}
        self._listeners: dict[tuple[str, str], set[Listener]] = {}
        self._joined: dict[Listener, set[tuple[str, str]]] = {}

    def floor(self, tenant: str) -> TenantFloor:
        floor = self._floors.get(tenant)
        if floor is None:
            floor = self._floors[tenant] = TenantFloor(self._base)
        return floor

    def board(self, tenant: str) -> TerminalBoard:
        board = self._boards.get(tenant)
        if board is None:
            board = self._boards[tenant] = TerminalBoard(self._base)
        return board

    def device_known(self, tenant: str, device: str, site: str, name: str) -> None:
        self._send_all(tenant, self.board(tenant).known(device, site, name, _now()))

    def device_removed(self, tenant: str, device: str) -> None:
        self._send_all(tenant, self.board(tenant).removed(device, _now()))

    def terminal_connected(self, tenant: str, device: str, site: str) -> None:
        self._send_all(tenant, self.board(tenant).connected(device, site, _now()))

    def terminal_disconnected(self, tenant: str, device: str) -> None:
        self._send_all(tenant, self.board(tenant).disconnected(device, _now()))

    def _send_all(self, tenant: str, deltas: list[Delta]) -> None:
        for delta in deltas:
            self._publish(tenant, delta.channel, [delta])

    async def load(self, conn: Conn) -> int:
        """Rebuild every floor from PostgreSQL; returns how many employees it placed."""
        rows = await conn.fetch(LATEST_SQL)
        by_tenant: dict[str, list[PresencePunch]] = {}
        for row in rows:
            by_tenant.setdefault(row["tenant"], []).append(
                PresencePunch(
                    row["id"], row["employee"], row["name"], row["site"], row["kind"], row["at"]
                )
            )
        for tenant, punches in by_tenant.items():
            self.floor(tenant).load(punches)
        now = _now()
        for device in await conn.fetch(DEVICES_SQL):
            self.board(device["tenant"]).known(device["id"], device["site"], device["name"], now)
        return len(rows)

    def committed(self, stored: Iterable[tuple[PunchRequest, PunchOutcome]]) -> list[Flag]:
        """Punches just committed: move the floors, send the deltas, return the flags found."""
        flags = []
        # A commit's deltas go out per channel in one piece, in the order they happened.
        deltas: dict[tuple[str, str], list[Delta]] = {}
        for request, outcome in stored:
            assert outcome.employee is not None and outcome.site is not None
            punch = PresencePunch(
                request.id,
                outcome.employee,
                outcome.name or outcome.employee,
                outcome.site,
                request.kind,
                request.at,
            )
            flag, caused = self.floor(request.tenant).apply(punch)
            if flag is not None:
                flags.append(Flag(request.tenant, request.id, flag))
            for delta in caused:
                deltas.setdefault((request.tenant, delta.channel), []).append(delta)
        for (tenant, channel), in_order in deltas.items():
            self._publish(tenant, channel, in_order)
        return flags

    def rename(self, tenant: str, employee: str, name: str) -> None:
        self._send_all(tenant, self.floor(tenant).rename(employee, name))

    def forget(self, tenant: str, employee: str, name: str) -> None:
        self._send_all(tenant, self.floor(tenant).forget(employee, name))

    def join(
        self, listener: Listener, tenant: str, channel: str, since: int | None, ref: str | None
    ) -> list[p.ServerFrame]:
        """Subscribe; the frames to send now: ``subscribed``, then a snapshot or the missed deltas.

        The caller has checked that the role may subscribe and that the site exists.
        """
        kind, _, site = channel.partition(":")
        if kind not in ("presence", "terminals"):
            return [
                p.Error(
                    code="unknown_channel",
                    message=f"{channel} is not served by this hub yet",
                    ref=ref,
                )
            ]
        key = (tenant, channel)
        self._listeners.setdefault(key, set()).add(listener)
        self._joined.setdefault(listener, set()).add(key)
        state = self.floor(tenant) if kind == "presence" else self.board(tenant)
        missed = None if since is None else state.channel(site).since(since)
        if missed is not None:
            version = state.channel(site).version
            return [
                p.Subscribed(channel=channel, version=version, recovered=True, ref=ref),
                *(delta_frame(delta) for delta in missed),
            ]
        snapshot = state.snapshot(site)
        return [
            p.Subscribed(channel=channel, version=snapshot.version, recovered=False, ref=ref),
            snapshot_frame(snapshot),
        ]

    def leave(self, listener: Listener, tenant: str, channel: str) -> None:
        key = (tenant, channel)
        listeners = self._listeners.get(key)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[key]
        joined = self._joined.get(listener)
        if joined is not None:
            joined.discard(key)
            if not joined:
                del self._joined[listener]

    def drop(self, listener: Listener) -> None:
        """The socket closed: it hears nothing more."""
        for tenant, channel in list(self._joined.get(listener, ())):
            self.leave(listener, tenant, channel)

    def _publish(self, tenant: str, channel: str, deltas: list[Delta]) -> None:
        listeners = self._listeners.get((tenant, channel))
        if not listeners:
            return
        frames = [delta_frame(delta) for delta in deltas]
        encoded: dict[str, Framed] = {}
        for listener in list(listeners):
            codec = listener.codec
            framed = encoded.get(codec.subprotocol)
            if framed is None:
                payloads = tuple(codec.encode(frame) for frame in frames)
                data = b"".join(frame_message(payload, codec.binary) for payload in payloads)
                framed = encoded[codec.subprotocol] = Framed(payloads, data)
            listener.send_framed(framed, "delta")


def _now() -> datetime:
    return datetime.now(UTC)


def member_frame(member: Member | TerminalMember) -> p.PresenceMember | p.TerminalMember:
    if isinstance(member, TerminalMember):
        return p.TerminalMember(
            device=member.device,
            name=member.name,
            online=member.online,
            since=p.format_time(member.since),
        )
    return p.PresenceMember(
        employee=member.employee,
        name=member.name,
        state=member.state,
        since=p.format_time(member.since),
        site=member.site,
        late=member.late,
    )


def delta_frame(delta: Delta) -> p.Delta:
    return p.Delta(
        channel=delta.channel,
        version=delta.version,
        changes=[member_frame(m) for m in delta.changes],
    )


def snapshot_frame(snapshot: Snapshot) -> p.Snapshot:
    return p.Snapshot(
        channel=snapshot.channel,
        version=snapshot.version,
        members=[member_frame(m) for m in snapshot.members],
    )
