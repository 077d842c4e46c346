"""Live moves only through events that carry their own time: the same events, applied in two
processes (one of them after a msgpack round trip), give the same frames with the same versions.
That is what lets several hubs share channel versions by applying one ordered stream."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

import hub.live
from hub import protocol as p
from hub.events import (
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
from hub.live import Flag, Live
from hub.presence import Shift, me_channel_name
from hub.wsproto import Framed
from workers.persist import PunchOutcome, PunchRequest

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(PresenceEvent)


class Recorder:
    """A listener that keeps every frame it is sent, in order."""

    codec = p.Codec(p.JSON_SUBPROTOCOL)

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_framed(self, framed: Framed, tag: str) -> None:
        self.frames.extend(framed.payloads)

    def awaits_ack(self, punch_id: uuid.UUID) -> bool:
        return False


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def committed(employee: str, kind: str, minute: float, now: float) -> PunchesCommitted:
    moment = at(minute)
    request = PunchRequest(
        "acme", uuid.uuid5(uuid.NAMESPACE_URL, f"{employee}{kind}{minute}"), kind, moment,
        moment, "terminal", employee, None, "hq", "door",
    )  # fmt: skip
    outcome = PunchOutcome("accepted", moment, None, employee, "hq", f"Name {employee}")
    return PunchesCommitted([(request, outcome)], at(now))


EVENTS: list[PresenceEvent] = [
    DeviceKnown("acme", "door", "hq", "Door", at(-60)),
    TerminalConnected("acme", "door", "hq", "hub-a", at(-59)),
    GraceSet("acme", "hq", 0.0, at(-58)),
    ShiftsPlanned("acme", "e2", "Name e2", [Shift("hq", T0, at(480))], at(-57)),
    committed("e1", "in", -10, -10),
    committed("e1", "in", -5, -5),
    ClockTicked(at(0)),
    committed("e2", "in", 12, 12),
    committed("e1", "break_start", 120, 120),
    committed("e1", "in", 60, 121),
    EmployeeRenamed("acme", "e1", "Ann"),
    TerminalConnected("acme", "door", "hq", "hub-b", at(130)),
    TerminalDisconnected("acme", "door", "hub-a", at(200)),
    HubGone("hub-b", at(201)),
    HubSockets("hub-c", [("acme", "door", "hq", 2), ("acme", "dock", "plant", 1)], at(202)),
    HubSockets("hub-c", [("acme", "door", "hq", 1)], at(203)),
    ShiftsPlanned("acme", "e3", "Name e3", [Shift("hq", at(150), at(300))], at(201)),
    ClockTicked(at(300)),
    EmployeeErased("acme", "e2", "[erased]", at(301)),
    DeviceRemoved("acme", "door", at(302)),
]


def run(events: list[PresenceEvent]) -> tuple[list[bytes], list[Flag]]:
    live = Live(base_version=1_000)
    recorder = Recorder()
    frames: list[bytes] = []
    channels = ("presence:hq", "terminals:hq", me_channel_name("e1"), me_channel_name("e3"))
    for channel in channels:
        for frame in live.join(recorder, "acme", channel, None, None):
            frames.append(recorder.codec.encode(frame))
    flags = [flag for event in events for flag in live.apply(event)]
    return frames + recorder.frames, flags


def test_the_same_events_give_the_same_frames_wherever_they_are_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here, flags_here = run(EVENTS)
    travelled = [DECODER.decode(ENCODER.encode(event)) for event in EVENTS]
    assert travelled == EVENTS
    # The other process's clock reads something else entirely: applying events must not look.
    monkeypatch.setattr(hub.live, "_now", lambda: T0 + timedelta(days=1000))
    there, flags_there = run(travelled)
    assert here == there
    assert flags_here == flags_there
    # The sequence did move every kind of channel.
    decoded = [msgspec.json.decode(frame) for frame in here]
    channels = {frame["channel"] for frame in decoded if frame["type"] == "delta"}
    assert channels == {"presence:hq", "terminals:hq", "me"}
    late = [
        (frame["channel"], change["employee"])
        for frame in decoded
        if frame["type"] == "delta"
        for change in frame["changes"]
        if change.get("late")
    ]
    assert late == [("presence:hq", "e2"), ("presence:hq", "e3"), ("me", "e3")]
    assert [flag.flag for flag in flags_here] == ["in_while_in", "out_of_order"]


def test_a_process_restored_from_a_dump_goes_on_exactly_like_the_one_that_dumped() -> None:
    for split in range(len(EVENTS) + 1):
        dumped_by, restored = Live(base_version=1_000), Live(base_version=5_000_000)
        for event in EVENTS[:split]:
            dumped_by.apply(event)
        restored.restore(dumped_by.dump())
        here, there = Recorder(), Recorder()
        channels = ("presence:hq", "terminals:hq", me_channel_name("e1"), me_channel_name("e3"))
        for live, recorder in ((dumped_by, here), (restored, there)):
            for channel in channels:
                joined = live.join(recorder, "acme", channel, None, None)
                recorder.frames.extend(recorder.codec.encode(frame) for frame in joined)
            for event in EVENTS[split:]:
                live.apply(event)
        assert here.frames == there.frames, split
        assert restored.dump() == dumped_by.dump(), split
        assert restored.next_due() == dumped_by.next_due(), split
