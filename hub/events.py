"""Everything that moves live channels, as events: the only way into ``Live``.

Each event carries whatever it depends on, the time included (``now``): ``Live``
reads no clock of its own. The same events in the same order therefore give the
same deltas with the same versions, wherever they are applied. Events are msgspec
Structs, so they travel as msgpack as they are.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from hub.presence import Shift
from workers.persist import PunchOutcome, PunchRequest


class _Event(msgspec.Struct, tag_field="event"):
    pass


class Alert(msgspec.Struct, frozen=True):
    """An alert as stored and pushed (PROTOCOL section 4, the ``alert`` frame)."""

    tenant: str
    id: uuid.UUID
    kind: str
    severity: str
    employee: str | None
    site: str | None
    at: datetime
    message: str
    detail: dict[str, Any]
    raised_at: datetime


class PunchesCommitted(_Event, tag="committed"):
    """Punches PostgreSQL has just committed (a batch, or a correction)."""

    stored: list[tuple[PunchRequest, PunchOutcome]]
    now: datetime


class EmployeeRenamed(_Event, tag="renamed"):
    tenant: str
    employee: str
    name: str


class EmployeeErased(_Event, tag="erased"):
    tenant: str
    employee: str
    # What the last deltas show instead of the name.
    name: str
    now: datetime


class ShiftsPlanned(_Event, tag="planned"):
    """The employee's planned shifts were replaced."""

    tenant: str
    employee: str
    name: str
    shifts: list[Shift]
    now: datetime


class GraceSet(_Event, tag="grace"):
    """A site's grace period (its policy was written)."""

    tenant: str
    site: str
    grace_s: float
    now: datetime


class ClockTicked(_Event, tag="tick"):
    """Time has reached ``now``: shifts whose grace period or end has come move the floors."""

    now: datetime


class DeviceKnown(_Event, tag="device"):
    """A device was created or changed."""

    tenant: str
    device: str
    site: str
    name: str
    now: datetime


class DeviceRemoved(_Event, tag="device_removed"):
    tenant: str
    device: str
    now: datetime


class TerminalConnected(_Event, tag="connected"):
    """A terminal's socket opened on hub process ``hub`` (its run id)."""

    tenant: str
    device: str
    site: str
    hub: str
    now: datetime


class TerminalDisconnected(_Event, tag="disconnected"):
    """A terminal's socket on hub process ``hub`` closed (or stopped answering heartbeats)."""

    tenant: str
    device: str
    hub: str
    now: datetime


class HubGone(_Event, tag="hub_gone"):
    """Hub process ``hub`` stopped refreshing its liveness key: its sockets are gone."""

    hub: str
    now: datetime


class HubSockets(_Event, tag="hub_sockets"):
    """Every terminal socket hub process ``hub`` holds, as (tenant, device, site, count): what
    the boards count for that hub from now on (sent by a hub that was taken for dead)."""

    hub: str
    sockets: list[tuple[str, str, str, int]]
    now: datetime


class AlertsRaised(_Event, tag="alerts"):
    """Alerts just stored: on their site's ``alerts:`` channel and their employee's ``me``."""

    alerts: list[Alert]


PresenceEvent = (
    PunchesCommitted
    | EmployeeRenamed
    | EmployeeErased
    | ShiftsPlanned
    | GraceSet
    | ClockTicked
    | DeviceKnown
    | DeviceRemoved
    | TerminalConnected
    | TerminalDisconnected
    | HubGone
    | HubSockets
    | AlertsRaised
)
