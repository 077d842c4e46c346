"""Who is on which floor, as pure state: committed punches in, versioned deltas out.

No I/O and no clock: the hub feeds in punches after they are committed (and,
on start, the latest punch of every employee from PostgreSQL), and carries
out what comes back.

The rules (PROTOCOL section 4):

* A punch moves its employee to a state: ``in`` and ``break_end`` to ``in``,
  ``break_start`` to ``break``, ``out`` to ``out``.
* An employee's state, ``since`` and site are those of their latest punch by
  ``at`` (ties broken by punch id), whatever order punches arrive in: an older
  punch arriving late from an offline queue never overwrites a newer state.
* Odd sequences (``in`` while in, ``out`` while out, ``break_end`` without a
  ``break_start``...) still move the state, as the punch says; they are only
  flagged on the punch, never refused.

Each site's floor is a channel, ``presence:<site>``, with one gapless version
sequence. Every change to the floor is a delta carrying exactly the next
version; a bounded log of recent deltas lets a client that missed a range
catch up, and otherwise it gets a snapshot. Snapshots and deltas come from the
same state, so a snapshot at version v plus the deltas after v always equals
the snapshot at the later version.
"""

from __future__ import annotations

import heapq
import uuid
from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Final, Literal, NamedTuple

import msgspec

State = Literal["in", "break", "out"]

STATE_AFTER: Final[dict[str, State]] = {
    "in": "in",
    "break_end": "in",
    "break_start": "break",
    "out": "out",
}

# A punch that makes sense after the state it finds leaves no flag.
_EXPECTED: Final[dict[str, frozenset[State]]] = {
    "in": frozenset({"out"}),
    "out": frozenset({"in", "break"}),
    "break_start": frozenset({"in"}),
    "break_end": frozenset({"break"}),
}

# How long after a shift starts its employee counts as late, unless the site's policy says.
DEFAULT_GRACE: Final = timedelta(minutes=5)

# Deltas kept per channel for clients that reconnect with `since`.
LOG_LENGTH: Final = 1024
# Deltas kept per employee's own channel (each employee has one once anything changes).
# Few: a delta on `me` holds all it shows, so the snapshot a phone that missed more gets
# costs no more than a delta. At 64, 50,000 employees' logs grew the hub by 40 MiB a minute
# for half an hour under load (and by as much over a fortnight of a real floor).
ME_LOG_LENGTH: Final = 4
# Alerts kept per `alerts:` channel for recovery, and how many a snapshot shows.
ALERT_LOG_LENGTH: Final = 256
ALERT_SNAPSHOT: Final = 50


class PresencePunch(msgspec.Struct, frozen=True):
    """A committed punch, as presence needs it."""

    id: uuid.UUID
    employee: str
    name: str
    site: str
    kind: str
    at: datetime


class Member(msgspec.Struct, frozen=True, omit_defaults=True, tag=True, array_like=True):
    """One employee as a ``presence:`` channel shows them (PROTOCOL section 4).

    In a delta, a member whose ``state`` is ``out`` (and not ``late``) has left
    this floor: the client removes them.
    """

    employee: str
    name: str
    state: State
    since: datetime
    site: str
    late: bool = False


class TerminalMember(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """One device as a ``terminals:`` channel shows it."""

    device: str
    name: str
    online: bool
    since: datetime


class AlertMember(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """One alert as an ``alerts:`` channel shows it."""

    id: uuid.UUID
    kind: str
    severity: str
    employee: str | None
    site: str | None
    at: datetime
    message: str
    detail: dict[str, Any]
    raised_at: datetime


class Delta(msgspec.Struct, frozen=True, array_like=True):
    channel: str
    version: int
    changes: tuple[Member | TerminalMember | AlertMember, ...]


class Snapshot(msgspec.Struct, frozen=True):
    channel: str
    version: int
    members: tuple[Member | TerminalMember | AlertMember, ...]


class _Latest(msgspec.Struct, array_like=True):
    """An employee's latest punch by (at, id): it decides their state."""

    at: datetime
    id: uuid.UUID
    state: State
    site: str
    name: str


def flag_for(previous: State | None, kind: str) -> str | None:
    """The flag an odd punch gets, given the state it found; None if it is not odd.

    An employee with no punch yet counts as ``out``.
    """
    found: State = previous or "out"
    if found in _EXPECTED[kind]:
        return None
    return f"{kind}_while_{found}"


def channel_name(site: str) -> str:
    return f"presence:{site}"


def board_name(site: str) -> str:
    return f"terminals:{site}"


def me_channel_name(employee: str) -> str:
    """How this process names an employee's ``me`` channel; clients only ever see ``me``."""
    return f"me:{employee}"


class ChannelDump(msgspec.Struct, array_like=True):
    """A channel as it travels to another hub process: its version and its log."""

    version: int
    log: list[Delta]


class Channel:
    """One channel's version, and the recent deltas that led to it (``log_length`` at most)."""

    def __init__(self, name: str, version: int, log_length: int = LOG_LENGTH) -> None:
        self.name = name
        self.version = version
        self._log: deque[Delta] = deque(maxlen=log_length)

    @classmethod
    def restored(cls, name: str, dump: ChannelDump, log_length: int = LOG_LENGTH) -> Channel:
        channel = cls(name, dump.version, log_length)
        channel._log.extend(dump.log)
        return channel

    def dump(self) -> ChannelDump:
        return ChannelDump(self.version, list(self._log))

    def record(self, changes: tuple[Member | TerminalMember | AlertMember, ...]) -> Delta:
        self.version += 1
        delta = Delta(self.name, self.version, changes)
        self._log.append(delta)
        return delta

    def redact(self, employee: str, name: str) -> None:
        """Show ``name`` for the employee in every delta still in the log (after an erasure)."""
        self._log = deque(
            (
                Delta(
                    delta.channel,
                    delta.version,
                    tuple(
                        msgspec.structs.replace(change, name=name)
                        if isinstance(change, Member) and change.employee == employee
                        else change
                        for change in delta.changes
                    ),
                )
                for delta in self._log
            ),
            maxlen=self._log.maxlen,
        )

    @property
    def oldest_logged(self) -> int:
        """The version of the oldest delta still in the log (``version + 1`` if none)."""
        return self.version - len(self._log) + 1

    def logged(self) -> list[Delta]:
        """Every delta still in the log, oldest first."""
        return list(self._log)

    def clear(self) -> None:
        """Forget the log, keep the version: a client behind it gets a snapshot."""
        self._log.clear()

    def since(self, version: int) -> list[Delta] | None:
        """The deltas after ``version``, or None if they are not all in the log any more."""
        if version == self.version:
            return []
        if version > self.version or not self._log:
            return None
        first = self._log[0].version
        if version < first - 1:
            return None
        return list(self._log)[version - first + 1 :]


class Shift(msgspec.Struct, frozen=True):
    """A planned shift: the employee is expected on ``site`` from ``start`` to ``end``."""

    site: str
    start: datetime
    end: datetime


class Ticked(NamedTuple):
    """What the clock moved: the deltas, and who just became late for which shift."""

    deltas: list[Delta]
    late: list[tuple[str, Shift]]


class FloorDump(msgspec.Struct):
    latest: dict[str, _Latest]
    channels: dict[str, ChannelDump]
    shifts: dict[str, list[Shift]]
    names: dict[str, str]
    grace: dict[str, timedelta]
    late: dict[str, Shift]
    next: dict[str, datetime]
    me: dict[str, ChannelDump]


class TenantFloor:
    """Every site's floor of one tenant, and each employee's own ``me`` channel.

    ``base_version`` starts every channel's sequence: pick one larger than any
    version handed out before (the hub uses the time of start in microseconds),
    so a client holding a version from an earlier run gets a snapshot rather
    than deltas that do not follow from what it has.

    Floors show everyone ``in`` or on ``break``, and the late: employees whose
    planned shift started more than the site's grace period ago, who are out and
    have not punched since the shift started. Lateness is state like the rest,
    moved by punches and by ``tick``: the owner calls ``tick(now)`` at
    ``next_due()``, so a snapshot only changes along with a delta.
    """

    def __init__(self, base_version: int) -> None:
        self._base = base_version
        self._latest: dict[str, _Latest] = {}
        self._channels: dict[str, Channel] = {}
        # Planned shifts that have not ended, by employee, in order of start.
        self._shifts: dict[str, list[Shift]] = {}
        # Names of scheduled employees (one who never punched can be late).
        self._names: dict[str, str] = {}
        self._grace: dict[str, timedelta] = {}
        # Employees shown late, with the shift they are late for.
        self._late: dict[str, Shift] = {}
        # When each scheduled employee's lateness may next change; the heap holds
        # stale entries too, recognised by not matching ``_next``.
        self._due: list[tuple[datetime, str]] = []
        self._next: dict[str, datetime] = {}
        self._me: dict[str, Channel] = {}

    @classmethod
    def restored(cls, base_version: int, dump: FloorDump) -> TenantFloor:
        """The floor another hub process dumped (see ``dump``)."""
        floor = cls(base_version)
        floor._latest = dump.latest
        floor._channels = {
            site: Channel.restored(channel_name(site), held) for site, held in dump.channels.items()
        }
        floor._shifts = dump.shifts
        floor._names = dump.names
        floor._grace = dump.grace
        floor._late = dump.late
        floor._next = dump.next
        floor._due = [(at, employee) for employee, at in dump.next.items()]
        heapq.heapify(floor._due)
        floor._me = {
            employee: Channel.restored(me_channel_name(employee), held, ME_LOG_LENGTH)
            for employee, held in dump.me.items()
        }
        return floor

    def dump(self) -> FloorDump:
        """All there is to this floor, to be encoded at once (it shares the floor's objects)."""
        return FloorDump(
            latest=self._latest,
            channels={site: channel.dump() for site, channel in self._channels.items()},
            shifts=self._shifts,
            names=self._names,
            grace=self._grace,
            late=self._late,
            next=self._next,
            me={employee: channel.dump() for employee, channel in self._me.items()},
        )

    def channel(self, site: str) -> Channel:
        channel = self._channels.get(site)
        if channel is None:
            channel = self._channels[site] = Channel(channel_name(site), self._base)
        return channel

    def me_channel(self, employee: str) -> Channel:
        """The employee's own channel; it records changes from the first time it is asked for."""
        channel = self._me.get(employee)
        if channel is None:
            channel = self._me[employee] = Channel(
                me_channel_name(employee), self._base, ME_LOG_LENGTH
            )
        return channel

    def late_for(self, employee: str) -> Shift | None:
        """The shift the employee is shown late for, if any."""
        return self._late.get(employee)

    def state_of(self, employee: str) -> State | None:
        latest = self._latest.get(employee)
        return None if latest is None else latest.state

    def load(self, punches: Iterable[PresencePunch]) -> None:
        """Take punches as the state to start from: no deltas, no flags."""
        for punch in punches:
            self._take(punch)

    def apply(self, punch: PresencePunch, now: datetime) -> tuple[str | None, list[Delta]]:
        """A committed punch: its flag (None if not odd) and the deltas it causes, in order.

        A punch older than the employee's latest changes nothing: no deltas, and the
        flag ``out_of_order``.
        """
        employee = punch.employee
        before = self._latest.get(employee)
        if before is not None and (punch.at, punch.id) <= (before.at, before.id):
            if punch.id == before.id:
                return None, []
            return "out_of_order", []
        flag = flag_for(None if before is None else before.state, punch.kind)
        shown, own = self._shown(employee), self._own(employee)
        self._take(punch)
        self._judge(employee, now)
        return flag, self._changes(employee, shown, own, punch.at)

    def rename(self, employee: str, name: str) -> list[Delta]:
        """The employee's name changed: a delta where they are shown."""
        shown, own = self._shown(employee), self._own(employee)
        latest = self._latest.get(employee)
        if latest is not None:
            latest.name = name
        if employee in self._names:
            self._names[employee] = name
        return self._changes(employee, shown, own, None)

    def forget(self, employee: str, name: str, now: datetime) -> list[Delta]:
        """The employee was erased: off every floor, and nothing kept of them here.

        ``name`` is what the last deltas show instead of their name, and what the
        deltas still kept for recovery show from now on.
        """
        shown, own = self._shown(employee), self._own(employee)
        self._latest.pop(employee, None)
        self._shifts.pop(employee, None)
        self._names.pop(employee, None)
        self._late.pop(employee, None)
        self._next.pop(employee, None)
        deltas = self._changes(employee, shown, own, now, name)
        for channel in self._channels.values():
            channel.redact(employee, name)
        me = self._me.get(employee)
        if me is not None:
            # Its version stays, so that a phone that held the old one gets a snapshot.
            me.clear()
        return deltas

    def plan(self, employee: str, name: str, shifts: Iterable[Shift], now: datetime) -> Ticked:
        """Replace the employee's planned shifts (those that ended are dropped)."""
        kept = sorted((s for s in shifts if s.end > now), key=lambda s: s.start)
        if kept:
            self._shifts[employee] = kept
            self._names[employee] = name
        else:
            self._shifts.pop(employee, None)
            self._names.pop(employee, None)
        return self._rejudge([employee], now)

    def set_grace(self, site: str, grace: timedelta, now: datetime) -> Ticked:
        """A site's grace period: how long after a shift starts its employee is late."""
        if self._grace.get(site, DEFAULT_GRACE) == grace:
            return Ticked([], [])
        self._grace[site] = grace
        planned_here = [
            e for e, shifts in self._shifts.items() if any(s.site == site for s in shifts)
        ]
        return self._rejudge(planned_here, now)

    def next_due(self) -> datetime | None:
        """When ``tick`` next has something to do; None if nobody is scheduled."""
        due, next_ = self._due, self._next
        while due and next_.get(due[0][1]) != due[0][0]:
            heapq.heappop(due)
        return due[0][0] if due else None

    def tick(self, now: datetime) -> Ticked:
        """The clock reached ``now``: shifts that started or ended move the floors."""
        due, next_ = self._due, self._next
        employees = []
        while due and due[0][0] <= now:
            at, employee = heapq.heappop(due)
            if next_.get(employee) == at:
                del next_[employee]
                employees.append(employee)
        return self._rejudge(employees, now)

    def snapshot(self, site: str) -> Snapshot:
        channel = self.channel(site)
        shown = (self._shown(employee) for employee in {*self._latest, *self._late})
        members = tuple(
            sorted(
                (member for member in shown if member is not None and member.site == site),
                key=lambda m: m.employee,
            )
        )
        return Snapshot(channel.name, channel.version, members)

    def me_snapshot(self, employee: str) -> Snapshot:
        """The employee as their own channel shows them: state and lateness, even when out."""
        channel = self.me_channel(employee)
        own = self._own(employee)
        return Snapshot(channel.name, channel.version, () if own is None else (own,))

    def _shown(self, employee: str) -> Member | None:
        """The employee as the floors show them, or None where no floor does."""
        latest = self._latest.get(employee)
        if latest is not None and latest.state != "out":
            return _member(employee, latest)
        shift = self._late.get(employee)
        if shift is not None:
            return Member(employee, self._name(employee), "out", shift.start, shift.site, True)
        return None

    def _own(self, employee: str) -> Member | None:
        shown = self._shown(employee)
        if shown is not None:
            return shown
        latest = self._latest.get(employee)
        return None if latest is None else _member(employee, latest)

    def _name(self, employee: str) -> str:
        latest = self._latest.get(employee)
        return latest.name if latest is not None else self._names.get(employee, employee)

    def _changes(
        self,
        employee: str,
        shown: Member | None,
        own: Member | None,
        when: datetime | None,
        gone_name: str | None = None,
    ) -> list[Delta]:
        """The deltas that take clients from ``shown`` and ``own`` to what they are now.

        A member who leaves a floor is shown there a last time as ``out`` (not late),
        since ``when`` (the last ``since`` it had there when that is None).
        """
        deltas = []
        after = self._shown(employee)
        if shown is not None and (after is None or after.site != shown.site):
            gone = Member(employee, gone_name or shown.name, "out", when or shown.since, shown.site)
            deltas.append(self.channel(shown.site).record((gone,)))
        if after is not None and after != shown:
            deltas.append(self.channel(after.site).record((after,)))
        own_after = self._own(employee)
        if own_after != own:
            # On `me` a delta holds all there is to show: the member, or nothing. Recorded
            # whether or not anyone listens, so that every hub process counts alike.
            me = self.me_channel(employee)
            deltas.append(me.record(() if own_after is None else (own_after,)))
        return deltas

    def _rejudge(self, employees: Iterable[str], now: datetime) -> Ticked:
        deltas: list[Delta] = []
        late = []
        for employee in employees:
            shown, own = self._shown(employee), self._own(employee)
            was = self._late.get(employee)
            self._judge(employee, now)
            shift = self._late.get(employee)
            if shift is not None and shift != was:
                late.append((employee, shift))
            deltas.extend(self._changes(employee, shown, own, now))
        return Ticked(deltas, late)

    def _judge(self, employee: str, now: datetime) -> None:
        """Decide whether the employee is late at ``now``, and when to look again."""
        shifts = self._shifts.get(employee, [])
        while shifts and shifts[0].end <= now:
            shifts.pop(0)
        if not shifts:
            self._shifts.pop(employee, None)
            self._names.pop(employee, None)
            self._late.pop(employee, None)
            self._next.pop(employee, None)
            return
        latest = self._latest.get(employee)
        current, grace = shifts[0], self._grace.get(shifts[0].site, DEFAULT_GRACE)
        due = current.start + grace
        if due <= now < current.end and (
            latest is None or (latest.state == "out" and latest.at < current.start)
        ):
            self._late[employee] = current
        else:
            self._late.pop(employee, None)
        # Looked at again when the grace period is over, then when the shift ends.
        wake = due if now < due < current.end else current.end
        if self._next.get(employee) != wake:
            self._next[employee] = wake
            heapq.heappush(self._due, (wake, employee))

    def _take(self, punch: PresencePunch) -> None:
        latest = _Latest(punch.at, punch.id, STATE_AFTER[punch.kind], punch.site, punch.name)
        before = self._latest.get(punch.employee)
        if before is None or (latest.at, latest.id) > (before.at, before.id):
            self._latest[punch.employee] = latest


class _Device(msgspec.Struct, array_like=True):
    site: str
    name: str
    since: datetime
    # Open sockets of this device, by the hub process holding them; online while any is.
    sockets: dict[str, int] = msgspec.field(default_factory=dict)


class BoardDump(msgspec.Struct):
    devices: dict[str, _Device]
    channels: dict[str, ChannelDump]


class TerminalBoard:
    """Every device of one tenant, online or not, and a ``terminals:<site>`` channel per site.

    A device is online while it has an open socket on any hub; it goes offline when
    its last one closes, however that happens (the client closed it, or it stopped
    answering heartbeats and the hub dropped it). ``since`` is when that last changed.
    Sockets are counted per hub process (``hub``), so that the sockets of a hub that
    died can be told apart from the others'.
    """

    def __init__(self, base_version: int) -> None:
        self._base = base_version
        self._devices: dict[str, _Device] = {}
        self._channels: dict[str, Channel] = {}

    @classmethod
    def restored(cls, base_version: int, dump: BoardDump) -> TerminalBoard:
        board = cls(base_version)
        board._devices = dump.devices
        board._channels = {
            site: Channel.restored(board_name(site), held) for site, held in dump.channels.items()
        }
        return board

    def dump(self) -> BoardDump:
        return BoardDump(
            devices=self._devices,
            channels={site: channel.dump() for site, channel in self._channels.items()},
        )

    def hubs(self) -> set[str]:
        """The hub processes holding a socket of any of these devices."""
        return {hub for held in self._devices.values() for hub in held.sockets}

    def channel(self, site: str) -> Channel:
        channel = self._channels.get(site)
        if channel is None:
            channel = self._channels[site] = Channel(board_name(site), self._base)
        return channel

    def known(self, device: str, site: str, name: str, now: datetime) -> list[Delta]:
        """A device was created or changed; a new one is offline until it connects."""
        held = self._devices.get(device)
        if held is None:
            held = self._devices[device] = _Device(site, name, now)
            return [self._record(device, held)]
        deltas = []
        if held.site != site:
            # Moved: gone from the old site's board (shown offline there), on the new one.
            gone = TerminalMember(device, held.name, False, now)
            deltas.append(self.channel(held.site).record((gone,)))
            held.site = site
        elif held.name == name:
            return []
        held.name = name
        deltas.append(self._record(device, held))
        return deltas

    def connected(self, device: str, site: str, hub: str, now: datetime) -> list[Delta]:
        held = self._devices.get(device)
        if held is None:
            held = self._devices[device] = _Device(site, device, now)
        was_online = bool(held.sockets)
        held.sockets[hub] = held.sockets.get(hub, 0) + 1
        if was_online:
            return []
        held.since = now
        return [self._record(device, held)]

    def disconnected(self, device: str, hub: str, now: datetime) -> list[Delta]:
        held = self._devices.get(device)
        if held is None or hub not in held.sockets:
            return []
        held.sockets[hub] -= 1
        if not held.sockets[hub]:
            del held.sockets[hub]
        if held.sockets:
            return []
        held.since = now
        return [self._record(device, held)]

    def hub_holds(
        self, hub: str, sockets: dict[str, tuple[str, int]], now: datetime
    ) -> list[Delta]:
        """Hub process ``hub`` holds exactly ``sockets`` (device -> site, open sockets) of these
        devices, and none of the others: an empty dict when it died."""
        deltas = []
        for device in sorted({*self._devices, *sockets}):
            site, count = sockets.get(device, ("", 0))
            held = self._devices.get(device)
            if held is None:
                if not count:
                    continue
                held = self._devices[device] = _Device(site, device, now)
            was_online = bool(held.sockets)
            if count:
                held.sockets[hub] = count
            else:
                held.sockets.pop(hub, None)
            if bool(held.sockets) != was_online:
                held.since = now
                deltas.append(self._record(device, held))
        return deltas

    def removed(self, device: str, now: datetime) -> list[Delta]:
        """Revoked: off its site's board (a last change shows it offline)."""
        held = self._devices.pop(device, None)
        if held is None:
            return []
        gone = TerminalMember(device, held.name, False, now)
        return [self.channel(held.site).record((gone,))]

    def snapshot(self, site: str) -> Snapshot:
        channel = self.channel(site)
        members = tuple(
            _terminal(device, held)
            for device, held in sorted(self._devices.items())
            if held.site == site
        )
        return Snapshot(channel.name, channel.version, members)

    def _record(self, device: str, held: _Device) -> Delta:
        return self.channel(held.site).record((_terminal(device, held),))


class AlertBoard:
    """Every site's ``alerts:<site>`` channel of one tenant: each alert is the next version,
    and the last ``ALERT_LOG_LENGTH`` stay for snapshots and recovery."""

    def __init__(self, base_version: int) -> None:
        self._base = base_version
        self._channels: dict[str, Channel] = {}
        # Per site, the version each alert id was recorded at: an id is still in the log
        # when that version is, found without reading the log (alerts can come in floods).
        self._recorded: dict[str, dict[uuid.UUID, int]] = {}

    @classmethod
    def restored(cls, base_version: int, dump: dict[str, ChannelDump]) -> AlertBoard:
        board = cls(base_version)
        board._channels = {
            site: Channel.restored(alerts_name(site), held, ALERT_LOG_LENGTH)
            for site, held in dump.items()
        }
        for site, channel in board._channels.items():
            board._recorded[site] = {
                change.id: delta.version
                for delta in channel.logged()
                for change in delta.changes
                if isinstance(change, AlertMember)
            }
        return board

    def dump(self) -> dict[str, ChannelDump]:
        return {site: channel.dump() for site, channel in self._channels.items()}

    def channel(self, site: str) -> Channel:
        channel = self._channels.get(site)
        if channel is None:
            channel = self._channels[site] = Channel(
                alerts_name(site), self._base, ALERT_LOG_LENGTH
            )
        return channel

    def raised(self, alert: AlertMember) -> Delta | None:
        """The alert as its site's next version; None for an alert of no site, or one that
        the channel still shows (announced again after a worker died)."""
        if alert.site is None:
            return None
        channel = self.channel(alert.site)
        recorded = self._recorded.setdefault(alert.site, {})
        version = recorded.get(alert.id)
        if version is not None and version >= channel.oldest_logged:
            return None
        delta = channel.record((alert,))
        recorded[alert.id] = delta.version
        if len(recorded) > 2 * ALERT_LOG_LENGTH:
            # Forget the ids that have left the log.
            oldest = channel.oldest_logged
            self._recorded[alert.site] = {i: v for i, v in recorded.items() if v >= oldest}
        return delta

    def snapshot(self, site: str) -> Snapshot:
        """The most recent alerts of the site, oldest first."""
        channel = self.channel(site)
        recent = channel.since(max(channel.version - ALERT_SNAPSHOT, self._base)) or []
        members = tuple(m for delta in recent for m in delta.changes)
        return Snapshot(channel.name, channel.version, members)


def alerts_name(site: str) -> str:
    return f"alerts:{site}"


def _terminal(device: str, held: _Device) -> TerminalMember:
    return TerminalMember(device, held.name, bool(held.sockets), held.since)


def _member(employee: str, latest: _Latest) -> Member:
    return Member(employee, latest.name, latest.state, latest.at, latest.site)


def replay(members: Iterable[Member], deltas: Iterable[Delta]) -> tuple[Member, ...]:
    """What a client shows after a snapshot's members and then the deltas that follow it.

    A change replaces the employee's entry; one that says ``out`` (and not late)
    removes it. Used by clients, and by the tests to check snapshots against deltas.
    """
    shown = {member.employee: member for member in members}
    for delta in deltas:
        for change in delta.changes:
            if not isinstance(change, Member):
                raise TypeError(f"{delta.channel} is not a presence channel")
            if change.state == "out" and not change.late:
                shown.pop(change.employee, None)
            else:
                shown[change.employee] = change
    return tuple(sorted(shown.values(), key=lambda m: m.employee))
