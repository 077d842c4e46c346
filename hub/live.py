"""Live channels in this process: every tenant's floors, who listens to what, and the fan-out.

Presence changes only after commit: the punch batcher hands over each batch's
stored punches once PostgreSQL has committed them, before any of them is
acked, and the deltas go out in the order the state changed. Each delta is
encoded and framed once per subprotocol, whatever the number of listeners.

The clock moves floors too: ``keep_time`` wakes when a planned shift's grace
period ends or the shift does, so the late appear (and go) without any punch.
An employee's ``me`` channel carries their own member, acks of their punches
made on other devices, and notices for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, Protocol

import asyncpg
import msgspec

from hub import metrics
from hub import protocol as p
from hub.events import (
    Alert,
    AlertsRaised,
    ClockTicked,
    DeviceKnown,
    DeviceRemoved,
    EmployeeErased,
    EmployeeRenamed,
    GraceSet,
    HubGone,
    HubSockets,
    PresenceEvent,
    PunchesCommitted,
    ShiftsPlanned,
    TerminalConnected,
    TerminalDisconnected,
)
from hub.presence import (
    AlertBoard,
    AlertMember,
    BoardDump,
    ChannelDump,
    Delta,
    FloorDump,
    Member,
    PresencePunch,
    Shift,
    Snapshot,
    TenantFloor,
    TerminalBoard,
    TerminalMember,
    Ticked,
    me_channel_name,
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

# Planned shifts that have not ended, of employees who are not erased.
SHIFTS_SQL: Final = """
SELECT s.tenant, s.employee, e.name, s.site, s.starts_at, s.ends_at
  FROM schedules s
  JOIN employees e ON e.tenant = s.tenant AND e.id = s.employee
 WHERE s.ends_at > now() AND e.erased_at IS NULL
 ORDER BY s.tenant, s.employee, s.starts_at
"""

# Sites whose policy sets its own grace period.
GRACE_SQL: Final = """
SELECT tenant, id, (policy->>'grace_minutes')::int AS minutes
  FROM sites WHERE policy ? 'grace_minutes'
"""

# The longest the clock sleeps without looking again, whatever the schedules say.
CLOCK_MAX_SLEEP_S: Final = 60.0

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

    def awaits_ack(self, punch_id: uuid.UUID) -> bool:
        """Whether this socket sent that punch and is still to be answered."""
        ...


class LiveDump(msgspec.Struct, array_like=True):
    base: int
    floors: dict[str, FloorDump]
    boards: dict[str, BoardDump]
    alerts: dict[str, dict[str, ChannelDump]]


_DUMP_ENCODER: Final = msgspec.msgpack.Encoder()
_DUMP_DECODER: Final = msgspec.msgpack.Decoder(LiveDump)


class Flag(NamedTuple):
    tenant: str
    id: uuid.UUID
    flag: str


class Live:
    """Floors, subscriptions and fan-out for every tenant served by this process.

    ``base_version`` starts every channel's version sequence (see ``TenantFloor``).
    Channels are keyed by their name in this process: ``me`` is ``me:<employee>``.
    """

    def __init__(self, base_version: int) -> None:
        self._base = base_version
        self._floors: dict[str, TenantFloor] = {}
        self._boards: dict[str, TerminalBoard] = {}
        self._alerts: dict[str, AlertBoard] = {}
        self._listeners: dict[tuple[str, str], set[Listener]] = {}
        self._joined: dict[Listener, set[tuple[str, str]]] = {}
        # Set when a schedule or a grace period changed: the clock looks again.
        self._replanned = asyncio.Event()
        # When the event being applied began to be (perf_counter), for the fan-out latency.
        self._applying_since = 0.0

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

    def alerts(self, tenant: str) -> AlertBoard:
        board = self._alerts.get(tenant)
        if board is None:
            board = self._alerts[tenant] = AlertBoard(self._base)
        return board

    def apply(self, event: PresenceEvent) -> list[Flag]:
        """Move the channels as the event says and send the deltas; flags of committed punches."""
        self._applying_since = time.perf_counter()
        match event:
            case PunchesCommitted(stored=stored, now=now):
                return self._committed(stored, now)
            case EmployeeRenamed(tenant=tenant, employee=employee, name=name):
                self._send_all(tenant, self.floor(tenant).rename(employee, name))
            case EmployeeErased(tenant=tenant, employee=employee, name=name, now=now):
                self._send_all(tenant, self.floor(tenant).forget(employee, name, now))
            case ShiftsPlanned(tenant=tenant, employee=employee, name=name, shifts=shifts):
                self._plan(tenant, employee, name, shifts, event.now)
            case GraceSet(tenant=tenant, site=site, grace_s=grace_s, now=now):
                grace = timedelta(seconds=grace_s)
                self._moved(tenant, self.floor(tenant).set_grace(site, grace, now), now)
                self._replanned.set()
            case ClockTicked(now=now):
                for tenant, floor in list(self._floors.items()):
                    self._moved(tenant, floor.tick(now), now)
            case DeviceKnown(tenant=tenant, device=device, site=site, name=name, now=now):
                self._send_all(tenant, self.board(tenant).known(device, site, name, now))
            case DeviceRemoved(tenant=tenant, device=device, now=now):
                self._send_all(tenant, self.board(tenant).removed(device, now))
            case TerminalConnected(tenant=tenant, device=device, site=site, hub=hub, now=now):
                self._send_all(tenant, self.board(tenant).connected(device, site, hub, now))
            case TerminalDisconnected(tenant=tenant, device=device, hub=hub, now=now):
                self._send_all(tenant, self.board(tenant).disconnected(device, hub, now))
            case HubGone(hub=hub, now=now):
                for tenant, board in list(self._boards.items()):
                    self._send_all(tenant, board.hub_holds(hub, {}, now))
            case AlertsRaised(alerts=alerts):
                for alert in alerts:
                    self._raised(alert)
            case HubSockets(hub=hub, sockets=sockets, now=now):
                held: dict[str, dict[str, tuple[str, int]]] = {}
                for tenant, device, site, count in sockets:
                    held.setdefault(tenant, {})[device] = (site, count)
                for tenant in sorted({*self._boards, *held}):
                    board = self.board(tenant)
                    self._send_all(tenant, board.hub_holds(hub, held.get(tenant, {}), now))
        return []

    def _raised(self, alert: Alert) -> None:
        member = AlertMember(
            alert.id,
            alert.kind,
            alert.severity,
            alert.employee,
            alert.site,
            alert.at,
            alert.message,
            alert.detail,
            alert.raised_at,
        )
        delta = self.alerts(alert.tenant).raised(member)
        if delta is None and alert.site is not None:
            return
        if delta is not None:
            self._publish(alert.tenant, delta.channel, [delta])
        if alert.employee is not None:
            me = (alert.tenant, me_channel_name(alert.employee))
            if me in self._listeners:
                self._deliver(me, [alert_frame(member, "me", None)], "alert")

    def dump(self) -> bytes:
        """Every floor and board with their versions and logs, for another hub process."""
        return _DUMP_ENCODER.encode(
            LiveDump(
                self._base,
                {tenant: floor.dump() for tenant, floor in self._floors.items()},
                {tenant: board.dump() for tenant, board in self._boards.items()},
                {tenant: board.dump() for tenant, board in self._alerts.items()},
            )
        )

    def restore(self, dumped: bytes) -> None:
        """Take over what ``dump`` gave, in place of every floor and board held here.

        Versions then follow the same sequence as in the process that dumped, provided
        both apply the same events from there on.
        """
        held = _DUMP_DECODER.decode(dumped)
        self._base = held.base
        self._floors = {
            tenant: TenantFloor.restored(held.base, floor) for tenant, floor in held.floors.items()
        }
        self._boards = {
            tenant: TerminalBoard.restored(held.base, board)
            for tenant, board in held.boards.items()
        }
        self._alerts = {
            tenant: AlertBoard.restored(held.base, board) for tenant, board in held.alerts.items()
        }
        self._replanned.set()

    def hubs(self) -> set[str]:
        """The hub processes (run ids) that hold a terminal's socket, as the boards say."""
        return {hub for board in self._boards.values() for hub in board.hubs()}

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
        for site in await conn.fetch(GRACE_SQL):
            self.floor(site["tenant"]).set_grace(
                site["id"], timedelta(minutes=site["minutes"]), now
            )
        plans: dict[tuple[str, str, str], list[Shift]] = {}
        for shift in await conn.fetch(SHIFTS_SQL):
            plans.setdefault((shift["tenant"], shift["employee"], shift["name"]), []).append(
                Shift(shift["site"], shift["starts_at"], shift["ends_at"])
            )
        for (tenant, employee, name), shifts in plans.items():
            self.floor(tenant).plan(employee, name, shifts, now)
        return len(rows)

    def _committed(
        self, stored: Iterable[tuple[PunchRequest, PunchOutcome]], now: datetime
    ) -> list[Flag]:
        """Punches just committed: move the floors, send the deltas, return the flags found.

        An employee's ``me`` hears of each punch stored for them, except on the
        socket that sent it (that one gets its own ack).
        """
        flags = []
        # A commit's deltas go out per channel in one piece, in the order they happened.
        deltas: dict[tuple[str, str], list[Delta]] = {}
        for request, outcome in stored:
            employee = outcome.employee
            assert employee is not None and outcome.site is not None
            punch = PresencePunch(
                request.id,
                employee,
                outcome.name or employee,
                outcome.site,
                request.kind,
                request.at,
            )
            floor = self.floor(request.tenant)
            was_late = floor.late_for(employee)
            flag, caused = floor.apply(punch, now)
            me = (request.tenant, me_channel_name(employee))
            late = floor.late_for(employee)
            if late is not None and late != was_late and me in self._listeners:
                # Late through a punch: an `out` from before the shift, from an offline queue.
                self._deliver(me, [_late_notice(late, now)], "notice")
            if me in self._listeners:
                made = p.Ack(
                    id=request.id,
                    status=outcome.status,
                    received_at=p.format_time(outcome.received_at),
                    channel="me",
                    employee=employee,
                    kind=request.kind,
                    at=p.format_time(request.at),
                    site=outcome.site,
                    source=request.source,
                )
                self._deliver(me, [made], "ack", sent_by=request.id)
            if flag is not None:
                flags.append(Flag(request.tenant, request.id, flag))
                if me in self._listeners:
                    self._deliver(me, [_flag_notice(punch, flag, now)], "notice")
            for delta in caused:
                deltas.setdefault((request.tenant, delta.channel), []).append(delta)
        for (tenant, channel), in_order in deltas.items():
            self._publish(tenant, channel, in_order)
        return flags

    def _plan(
        self, tenant: str, employee: str, name: str, shifts: Iterable[Shift], now: datetime
    ) -> None:
        planned = tuple(shifts)
        self._moved(tenant, self.floor(tenant).plan(employee, name, planned, now), now)
        self._replanned.set()
        me = (tenant, me_channel_name(employee))
        if me in self._listeners:
            self._deliver(me, [_schedule_notice(planned, now)], "notice")

    def next_due(self) -> datetime | None:
        dues = [due for floor in self._floors.values() if (due := floor.next_due()) is not None]
        return min(dues, default=None)

    async def keep_time(self, emit: Callable[[PresenceEvent], None]) -> None:
        """Run for the life of the process: ``emit`` a tick whenever a shift may make someone
        late or no longer late (the tick moves the floors once applied)."""
        while True:
            try:
                self._replanned.clear()
                due = self.next_due()
                sleep = CLOCK_MAX_SLEEP_S
                if due is not None:
                    # At least 10 ms: a tick that has not been applied yet (it may travel
                    # first) leaves the same due time, which must not spin the loop.
                    sleep = min(sleep, max(0.01, (due - _now()).total_seconds()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._replanned.wait(), sleep)
                due = self.next_due()
                now = _now()
                if due is not None and due <= now:
                    emit(ClockTicked(now))
            except Exception:
                log.exception("the presence clock failed; it carries on within a minute")
                await asyncio.sleep(1)

    def _moved(self, tenant: str, ticked: Ticked, now: datetime) -> None:
        self._send_all(tenant, ticked.deltas)
        for employee, shift in ticked.late:
            me = (tenant, me_channel_name(employee))
            if me in self._listeners:
                self._deliver(me, [_late_notice(shift, now)], "notice")

    def join(
        self, listener: Listener, tenant: str, channel: str, since: int | None, ref: str | None
    ) -> list[p.ServerFrame]:
        """Subscribe; the frames to send now: ``subscribed``, then a snapshot or the missed deltas.

        ``channel`` is the name in this process (``me:<employee>`` for ``me``). The
        caller has checked that the role may subscribe and that the site exists.
        """
        kind, _, name = channel.partition(":")
        if kind not in ("presence", "terminals", "me", "alerts"):
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
        public = public_channel(channel)
        floor, board, alerts = self.floor(tenant), self.board(tenant), self.alerts(tenant)
        held = {
            "presence": floor.channel,
            "terminals": board.channel,
            "me": floor.me_channel,
            "alerts": alerts.channel,
        }[kind](name)
        missed = None if since is None else held.since(since)
        if missed is not None:
            return [
                p.Subscribed(channel=public, version=held.version, recovered=True, ref=ref),
                *(delta_frame(delta) for delta in missed),
            ]
        taken = {
            "presence": floor.snapshot,
            "terminals": board.snapshot,
            "me": floor.me_snapshot,
            "alerts": alerts.snapshot,
        }[kind](name)
        return [
            p.Subscribed(channel=public, version=taken.version, recovered=False, ref=ref),
            snapshot_frame(taken),
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
        if (tenant, channel) in self._listeners:
            tag = "alert" if channel.startswith("alerts:") else "delta"
            self._deliver((tenant, channel), [delta_frame(delta) for delta in deltas], tag)

    def _deliver(
        self,
        key: tuple[str, str],
        frames: list[p.ServerFrame],
        tag: str,
        sent_by: uuid.UUID | None = None,
    ) -> None:
        """Send ``frames`` to a channel's listeners, encoded and framed once per subprotocol.

        A listener still awaiting the ack of punch ``sent_by`` is left out.
        """
        listeners = self._listeners.get(key)
        if not listeners:
            return
        encoded: dict[str, Framed] = {}
        for listener in list(listeners):
            if sent_by is not None and listener.awaits_ack(sent_by):
                continue
            codec = listener.codec
            framed = encoded.get(codec.subprotocol)
            if framed is None:
                payloads = tuple(codec.encode(frame) for frame in frames)
                data = b"".join(frame_message(payload, codec.binary) for payload in payloads)
                framed = encoded[codec.subprotocol] = Framed(payloads, data)
            listener.send_framed(framed, tag)
        if encoded:
            # Every frame is sent from within ``apply``: this channel's share of the event is out.
            metrics.FANOUT_LATENCY.observe(time.perf_counter() - self._applying_since)


class LiveFloors:
    """A hub's live channels as its broker sets them up (``hub.broker.Floors``)."""

    def __init__(self, live: Live, pool: asyncpg.Pool) -> None:
        self._live = live
        self._pool = pool

    async def rebuild(self) -> None:
        async with self._pool.acquire() as conn:
            placed = await self._live.load(conn)
        log.info("presence rebuilt from PostgreSQL: %d employees placed", placed)

    def dump(self) -> bytes:
        return self._live.dump()

    def restore(self, dumped: bytes) -> None:
        self._live.restore(dumped)

    def hubs(self) -> set[str]:
        return self._live.hubs()


def public_channel(name: str) -> str:
    """The channel's name as clients know it: every employee's own channel is ``me``."""
    return "me" if name.startswith("me:") else name


def _flag_notice(punch: PresencePunch, flag: str, now: datetime) -> p.Notice:
    at = p.format_time(punch.at)
    if flag == "out_of_order":
        message = (
            f"your {punch.kind} punch at {at} arrived after a later one; it is stored, "
            "and your status follows the later one"
        )
    else:
        message = f"your {punch.kind} punch at {at} did not follow from your status; it is stored"
    return p.Notice(
        channel="me",
        kind="punch_flagged",
        at=p.format_time(now),
        message=message,
        detail={"id": str(punch.id), "flag": flag, "kind": punch.kind, "punch_at": at},
    )


def _late_notice(shift: Shift, now: datetime) -> p.Notice:
    start = p.format_time(shift.start)
    return p.Notice(
        channel="me",
        kind="late",
        at=p.format_time(now),
        message=f"your shift at {shift.site} started at {start} and you have not clocked in",
        detail=_shift_detail(shift),
    )


def _schedule_notice(shifts: tuple[Shift, ...], now: datetime) -> p.Notice:
    upcoming = sorted((s for s in shifts if s.end > now), key=lambda s: s.start)
    detail: dict[str, Any] = {"shifts": len(upcoming)}
    if upcoming:
        detail["next"] = _shift_detail(upcoming[0])
        message = (
            f"your planned shifts changed; next: {upcoming[0].site} "
            f"from {p.format_time(upcoming[0].start)}"
        )
    else:
        message = "your planned shifts changed; none are planned now"
    return p.Notice(
        channel="me", kind="schedule", at=p.format_time(now), message=message, detail=detail
    )


def _shift_detail(shift: Shift) -> dict[str, str]:
    return {
        "site": shift.site,
        "start": p.format_time(shift.start),
        "end": p.format_time(shift.end),
    }


def _now() -> datetime:
    return datetime.now(UTC)


def alert_member(member: AlertMember) -> p.AlertMember:
    return p.AlertMember(
        id=str(member.id),
        kind=member.kind,
        severity=member.severity,
        at=p.format_time(member.at),
        message=member.message,
        detail=member.detail,
        raised_at=p.format_time(member.raised_at),
        employee=member.employee,
        site=member.site,
    )


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


def delta_frame(delta: Delta) -> p.Delta | p.Alert:
    """A delta as its frame: on an ``alerts:`` channel, the alert it carries."""
    if delta.changes and isinstance(delta.changes[0], AlertMember):
        return alert_frame(delta.changes[0], delta.channel, delta.version)
    return p.Delta(
        channel=public_channel(delta.channel),
        version=delta.version,
        changes=[member_frame(m) for m in delta.changes if not isinstance(m, AlertMember)],
    )


def alert_frame(alert: AlertMember, channel: str, version: int | None) -> p.Alert:
    return p.Alert(channel=channel, version=version, **msgspec.structs.asdict(alert_member(alert)))


def snapshot_frame(snapshot: Snapshot) -> p.Snapshot:
    return p.Snapshot(
        channel=public_channel(snapshot.channel),
        version=snapshot.version,
        members=[
            alert_member(m) if isinstance(m, AlertMember) else member_frame(m)
            for m in snapshot.members
        ],
    )
