"""Presence as pure state (hub/presence.py): punches in any order, versions, snapshots, deltas."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.presence import (
    ALERT_LOG_LENGTH,
    DEFAULT_GRACE,
    LOG_LENGTH,
    STATE_AFTER,
    AlertBoard,
    AlertMember,
    Channel,
    Delta,
    Member,
    PresencePunch,
    Shift,
    Snapshot,
    TenantFloor,
    TerminalBoard,
    Ticked,
    flag_for,
    replay,
)

T0 = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
# When punches are applied: after all of them (nobody here is scheduled, so it matters little).
NOW = T0 + timedelta(hours=1)
BASE = 1_000_000
EMPLOYEES = ("e1", "e2", "e3", "e4")
SITES = ("hq", "plant", "depot")
KINDS = ("in", "out", "break_start", "break_end")


def punch(employee: str, kind: str, minute: int, site: str = "hq") -> PresencePunch:
    return PresencePunch(
        uuid.uuid4(), employee, f"Name {employee}", site, kind, T0 + timedelta(minutes=minute)
    )


punches = st.builds(
    PresencePunch,
    id=st.uuids(),
    employee=st.sampled_from(EMPLOYEES),
    name=st.just("Someone"),
    site=st.sampled_from(SITES),
    kind=st.sampled_from(KINDS),
    # Few distinct times, so that ties in `at` happen and are broken by id.
    at=st.integers(0, 20).map(lambda m: T0 + timedelta(minutes=m)),
)


def latest_by_at(sequence: list[PresencePunch]) -> dict[str, PresencePunch]:
    latest: dict[str, PresencePunch] = {}
    for p in sequence:
        if p.employee not in latest or (p.at, p.id) > (
            latest[p.employee].at,
            latest[p.employee].id,
        ):
            latest[p.employee] = p
    return latest


def expected_snapshot(sequence: list[PresencePunch], site: str) -> tuple[Member, ...]:
    return tuple(
        sorted(
            (
                Member(e, p.name, STATE_AFTER[p.kind], p.at, p.site)
                for e, p in latest_by_at(sequence).items()
                if p.site == site and STATE_AFTER[p.kind] != "out"
            ),
            key=lambda m: m.employee,
        )
    )


# -- state follows the latest punch by `at` ---------------------------------------------------


@settings(max_examples=300)
@given(st.lists(punches, max_size=40), st.randoms(use_true_random=False))
def test_in_any_arrival_order_the_state_is_that_of_the_latest_punch(
    sequence: list[PresencePunch], rng: object
) -> None:
    shuffled = list(sequence)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    floor = TenantFloor(BASE)
    for p in shuffled:
        floor.apply(p, NOW)
    latest = latest_by_at(sequence)
    for employee in EMPLOYEES:
        expected = STATE_AFTER[latest[employee].kind] if employee in latest else None
        assert floor.state_of(employee) == expected
    for site in SITES:
        assert floor.snapshot(site).members == expected_snapshot(sequence, site)


@settings(max_examples=300)
@given(st.lists(punches, max_size=40), st.lists(st.integers(0, 40), max_size=5))
def test_a_snapshot_plus_the_deltas_after_it_is_the_later_snapshot(
    sequence: list[PresencePunch], checkpoints: list[int]
) -> None:
    floor = TenantFloor(BASE)
    taken = {site: [floor.snapshot(site)] for site in SITES}
    deltas: dict[str, list[Delta]] = defaultdict(list)
    for n, p in enumerate(sequence):
        _, caused = floor.apply(p, NOW)
        for delta in caused:
            deltas[delta.channel].append(delta)
        if n in checkpoints:
            for site in SITES:
                taken[site].append(floor.snapshot(site))
    for site in SITES:
        final = floor.snapshot(site)
        for earlier in taken[site]:
            after = [d for d in deltas[final.channel] if d.version > earlier.version]
            assert replay(earlier.members, after) == final.members
            # The channel's own log gives the same deltas.
            assert floor.channel(site).since(earlier.version) == after


@settings(max_examples=200)
@given(st.lists(punches, max_size=60))
def test_each_channels_versions_are_gapless(sequence: list[PresencePunch]) -> None:
    floor = TenantFloor(BASE)
    last: dict[str, int] = defaultdict(lambda: BASE)
    for p in sequence:
        _, caused = floor.apply(p, NOW)
        for delta in caused:
            assert delta.version == last[delta.channel] + 1
            last[delta.channel] = delta.version
    for site in SITES:
        assert floor.snapshot(site).version == last[f"presence:{site}"]


def on_floors(deltas: list[Delta]) -> list[Delta]:
    """The deltas of ``presence:`` channels, leaving out the employee's own."""
    return [delta for delta in deltas if delta.channel.startswith("presence:")]


def test_a_late_older_punch_changes_nothing_and_is_flagged_out_of_order() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 10), NOW)
    flag, deltas = floor.apply(punch("e1", "out", 5), NOW)
    assert (flag, deltas) == ("out_of_order", [])
    assert floor.state_of("e1") == "in"


def test_moving_to_another_site_leaves_the_first_floor() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0, "hq"), NOW)
    flag, deltas = floor.apply(punch("e1", "in", 60, "plant"), NOW)
    assert flag == "in_while_in"
    assert [(d.channel, d.changes[0].state, d.changes[0].site) for d in on_floors(deltas)] == [
        ("presence:hq", "out", "hq"),
        ("presence:plant", "in", "plant"),
    ]
    assert floor.snapshot("hq").members == ()
    assert [m.employee for m in floor.snapshot("plant").members] == ["e1"]


def test_clocking_out_elsewhere_only_leaves_the_floor_one_was_on() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0, "hq"), NOW)
    _, deltas = floor.apply(punch("e1", "out", 60, "plant"), NOW)
    assert [(d.channel, d.changes[0].state) for d in on_floors(deltas)] == [("presence:hq", "out")]


def test_out_while_out_and_a_first_out_change_no_floor() -> None:
    floor = TenantFloor(BASE)
    for second in (0, 1):
        flag, deltas = floor.apply(punch("e1", "out", second), NOW)
        assert (flag, on_floors(deltas)) == ("out_while_out", [])
    assert floor.channel("hq").version == BASE


@pytest.mark.parametrize(
    ("found", "kind", "flag"),
    [
        (None, "in", None),
        ("out", "in", None),
        ("in", "in", "in_while_in"),
        ("break", "in", "in_while_break"),
        ("in", "out", None),
        ("break", "out", None),
        ("out", "out", "out_while_out"),
        (None, "out", "out_while_out"),
        ("in", "break_start", None),
        ("break", "break_start", "break_start_while_break"),
        ("out", "break_start", "break_start_while_out"),
        ("break", "break_end", None),
        ("in", "break_end", "break_end_while_in"),
        ("out", "break_end", "break_end_while_out"),
    ],
)
def test_odd_sequences_are_flagged_and_still_move_the_state(
    found: str | None, kind: str, flag: str | None
) -> None:
    assert flag_for(found, kind) == flag  # type: ignore[arg-type]
    floor = TenantFloor(BASE)
    if found is not None:
        first = {"in": "in", "break": "break_start", "out": "out"}[found]
        if found == "break":
            floor.apply(punch("e1", "in", 0), NOW)
        floor.apply(punch("e1", first, 1), NOW)
    got, _ = floor.apply(punch("e1", kind, 2), NOW)
    assert got == flag
    assert floor.state_of("e1") == STATE_AFTER[kind]


def test_loading_sets_the_state_without_deltas() -> None:
    floor = TenantFloor(BASE)
    floor.load([punch("e1", "in", 0), punch("e2", "break_start", 1), punch("e3", "out", 2)])
    snapshot = floor.snapshot("hq")
    assert snapshot.version == BASE
    assert [(m.employee, m.state) for m in snapshot.members] == [("e1", "in"), ("e2", "break")]


# -- the bounded log ------------------------------------------------------------------------


def test_a_version_still_in_the_log_recovers_and_an_older_one_does_not() -> None:
    channel = Channel("presence:hq", BASE)
    member = Member("e1", "E", "in", T0, "hq")
    for _ in range(LOG_LENGTH + 10):
        channel.record((member,))
    assert channel.version == BASE + LOG_LENGTH + 10
    assert channel.since(channel.version) == []
    recent = channel.since(channel.version - 3)
    assert recent is not None and [d.version for d in recent] == [
        channel.version - 2,
        channel.version - 1,
        channel.version,
    ]
    oldest_kept = channel.version - LOG_LENGTH
    assert channel.since(oldest_kept) is not None
    assert channel.since(oldest_kept - 1) is None
    # From the future (another run of the hub, say): a snapshot, never a guess.
    assert channel.since(channel.version + 1) is None


def test_a_fresh_channel_recovers_only_its_own_version() -> None:
    channel = Channel("presence:hq", BASE)
    assert channel.since(BASE) == []
    assert channel.since(BASE - 1) is None


def test_a_rename_shows_on_the_floor_the_employee_is_on() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0), NOW)
    [delta] = on_floors(floor.rename("e1", "Ann Lee"))
    assert (delta.channel, delta.changes[0].name, delta.changes[0].state) == (
        "presence:hq",
        "Ann Lee",
        "in",
    )
    assert floor.snapshot("hq").members[0].name == "Ann Lee"
    assert floor.rename("e1", "Ann Lee") == []
    floor.apply(punch("e1", "out", 5), NOW)
    assert on_floors(floor.rename("e1", "Ann")) == []
    assert floor.rename("nobody", "X") == []


def test_forgetting_an_erased_employee_takes_them_off_the_floor_and_out_of_memory() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0), NOW)
    [delta] = on_floors(floor.forget("e1", "[erased]", NOW))
    assert (delta.changes[0].name, delta.changes[0].state) == ("[erased]", "out")
    assert floor.snapshot("hq").members == ()
    assert floor.state_of("e1") is None
    assert floor.forget("e1", "[erased]", NOW) == []


# -- schedules and the late -----------------------------------------------------------------

SHIFT = Shift("hq", T0, T0 + timedelta(hours=8))


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


def planned_floor(*shifts: Shift, now: datetime = T0 - timedelta(hours=1)) -> TenantFloor:
    floor = TenantFloor(BASE)
    assert floor.plan("e1", "Ann", shifts or (SHIFT,), now) == Ticked([], [])
    return floor


def test_a_scheduled_employee_not_in_becomes_late_when_the_grace_period_ends() -> None:
    floor = planned_floor()
    assert floor.next_due() == at(5)
    assert floor.tick(at(4)) == Ticked([], [])
    assert floor.snapshot("hq").members == ()
    ticked = floor.tick(at(5))
    late = Member("e1", "Ann", "out", T0, "hq", late=True)
    assert [d.changes for d in on_floors(ticked.deltas)] == [(late,)]
    assert on_floors(ticked.deltas)[0].version == BASE + 1
    assert ticked.late == [("e1", SHIFT)]
    assert floor.snapshot("hq").members == (late,)
    # Next look: when the shift ends.
    assert floor.next_due() == SHIFT.end


def test_clocking_in_late_replaces_the_late_entry() -> None:
    floor = planned_floor()
    floor.tick(at(5))
    _, deltas = floor.apply(punch("e1", "in", 12), at(12))
    assert [(d.channel, d.changes[0].state, d.changes[0].late) for d in on_floors(deltas)] == [
        ("presence:hq", "in", False)
    ]
    assert [m.state for m in floor.snapshot("hq").members] == ["in"]
    # Leaving mid-shift is leaving, not being late again.
    _, deltas = floor.apply(punch("e1", "out", 200), at(200))
    assert [(d.changes[0].state, d.changes[0].late) for d in on_floors(deltas)] == [("out", False)]
    assert floor.snapshot("hq").members == ()


def test_the_late_leave_the_floor_when_their_shift_ends() -> None:
    floor = planned_floor()
    floor.tick(at(5))
    ticked = floor.tick(SHIFT.end)
    assert [d.changes for d in on_floors(ticked.deltas)] == [
        (Member("e1", "Ann", "out", SHIFT.end, "hq"),)
    ]
    assert ticked.late == []
    assert floor.snapshot("hq").members == ()
    assert floor.next_due() is None


def test_who_came_early_is_not_late_and_who_left_before_the_shift_is() -> None:
    early = planned_floor()
    early.apply(punch("e1", "in", -10), at(-10))
    assert on_floors(early.tick(at(5)).deltas) == []
    left = planned_floor()
    left.apply(punch("e1", "in", -60), at(-60))
    left.apply(punch("e1", "out", -30), at(-30))
    assert [m.late for m in on_floors(left.tick(at(5)).deltas)[0].changes] == [True]


def test_clocking_in_at_another_site_leaves_the_late_entry() -> None:
    floor = planned_floor()
    floor.tick(at(5))
    _, deltas = floor.apply(punch("e1", "in", 7, "plant"), at(7))
    assert [(d.channel, d.changes[0].state, d.changes[0].late) for d in on_floors(deltas)] == [
        ("presence:hq", "out", False),
        ("presence:plant", "in", False),
    ]


def test_an_offline_out_from_before_the_shift_makes_one_late_at_once() -> None:
    floor = planned_floor()
    floor.apply(punch("e1", "in", -600), at(-600))
    assert on_floors(floor.tick(at(5)).deltas) == []
    # Yesterday's `out`, queued on a terminal, arrives mid-shift.
    _, deltas = floor.apply(punch("e1", "out", -120), at(30))
    assert [(d.changes[0].state, d.changes[0].late) for d in on_floors(deltas)] == [("out", True)]


def test_the_site_grace_period_decides_and_changing_it_judges_again() -> None:
    floor = TenantFloor(BASE)
    floor.set_grace("hq", timedelta(0), at(-60))
    floor.plan("e1", "Ann", [SHIFT], at(-60))
    assert floor.next_due() == T0
    assert len(on_floors(floor.tick(T0).deltas)) == 1
    # A longer grace period, while late: no longer late until it is over.
    ticked = floor.set_grace("hq", timedelta(minutes=30), at(10))
    assert [(m.state, m.late) for d in on_floors(ticked.deltas) for m in d.changes] == [
        ("out", False)
    ]
    assert floor.next_due() == at(30)
    assert [m.late for d in on_floors(floor.tick(at(30)).deltas) for m in d.changes] == [True]
    # Other sites keep the default.
    floor.plan("e2", "Bo", [Shift("plant", T0, at(60))], at(1))
    assert floor.next_due() == at(5)


def test_replanning_or_forgetting_takes_the_late_off_the_floor() -> None:
    floor = planned_floor()
    floor.tick(at(5))
    ticked = floor.plan("e1", "Ann", [Shift("hq", at(120), at(300))], at(6))
    assert [(m.late, m.since) for d in on_floors(ticked.deltas) for m in d.changes] == [
        (False, at(6))
    ]
    assert floor.next_due() == at(125)
    floor.tick(at(125))
    [delta] = on_floors(floor.forget("e1", "[erased]", at(130)))
    assert delta.changes == (Member("e1", "[erased]", "out", at(130), "hq"),)
    assert floor.next_due() is None
    assert floor.snapshot("hq").members == ()


def test_a_rename_reaches_the_late_entry() -> None:
    floor = planned_floor()
    floor.tick(at(5))
    [delta] = on_floors(floor.rename("e1", "Ann Lee"))
    assert delta.changes == (Member("e1", "Ann Lee", "out", T0, "hq", late=True),)


def test_shifts_that_have_ended_are_dropped_and_the_next_one_counts() -> None:
    second = Shift("plant", at(600), at(900))
    floor = planned_floor(Shift("hq", at(-600), at(-300)), second, now=at(0))
    assert floor.next_due() == at(605)
    assert floor.tick(at(605)).late == [("e1", second)]


# Random schedules, punches, grace periods and clock ticks against a model of the rule.

plans = st.lists(st.tuples(st.integers(-120, 600), st.integers(1, 300), st.sampled_from(SITES)))


def shifts_of(raw: list[tuple[int, int, str]]) -> list[Shift]:
    """Non-overlapping shifts from (start, length, site) in minutes."""
    shifts: list[Shift] = []
    for start, length, site in sorted(raw):
        if shifts and at(start) < shifts[-1].end:
            continue
        shifts.append(Shift(site, at(start), at(start + length)))
    return shifts


# Punches spread over the hours around the shifts, each at a whole minute.
spread_punches = st.builds(
    PresencePunch,
    id=st.uuids(),
    employee=st.sampled_from(EMPLOYEES),
    name=st.just("Someone"),
    site=st.sampled_from(SITES),
    kind=st.sampled_from(KINDS),
    at=st.integers(-180, 900).map(at),
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("punch"), spread_punches),
        st.tuples(st.just("plan"), st.sampled_from(EMPLOYEES), plans),
        st.tuples(st.just("tick"), st.integers(0, 240)),
        st.tuples(st.just("grace"), st.sampled_from(SITES), st.integers(0, 60)),
    ),
    max_size=40,
)


def modelled_floor(
    now: datetime,
    punches_so_far: list[PresencePunch],
    planned: dict[str, list[Shift]],
    grace: dict[str, timedelta],
    site: str,
) -> tuple[Member, ...]:
    latest = latest_by_at(punches_so_far)
    shown = []
    for employee in EMPLOYEES:
        last = latest.get(employee)
        if last is not None and STATE_AFTER[last.kind] != "out":
            member = Member(employee, last.name, STATE_AFTER[last.kind], last.at, last.site)
            shown.append(member)
            continue
        current = next((s for s in planned.get(employee, []) if s.end > now), None)
        if (
            current is not None
            and current.start + grace.get(current.site, DEFAULT_GRACE) <= now
            and (last is None or last.at < current.start)
        ):
            shown.append(Member(employee, "Someone", "out", current.start, current.site, True))
    return tuple(sorted((m for m in shown if m.site == site), key=lambda m: m.employee))


@settings(max_examples=300)
@given(operations, st.lists(st.integers(0, 40), max_size=4))
def test_late_is_the_rule_at_every_step_and_deltas_add_up(
    steps: list[tuple[Any, ...]], checkpoints: list[int]
) -> None:
    floor = TenantFloor(BASE)
    now = at(-180)
    applied: list[PresencePunch] = []
    planned: dict[str, list[Shift]] = {}
    grace: dict[str, timedelta] = {}
    for employee in EMPLOYEES:
        floor.me_channel(employee)
    taken = [(floor.snapshot(site), site) for site in SITES]
    taken += [(floor.me_snapshot(employee), employee) for employee in EMPLOYEES]
    deltas: dict[str, list[Delta]] = defaultdict(list)
    for n, step in enumerate(steps):
        caused: list[Delta]
        match step:
            case ("punch", PresencePunch() as p):
                _, caused = floor.apply(p, now)
                applied.append(p)
            case ("plan", employee, raw):
                planned[employee] = shifts_of(raw)
                caused = floor.plan(employee, "Someone", planned[employee], now).deltas
            case ("tick", minutes):
                now += timedelta(minutes=minutes)
                caused = floor.tick(now).deltas
            case ("grace", site, minutes):
                grace[site] = timedelta(minutes=minutes)
                caused = floor.set_grace(site, grace[site], now).deltas
        for delta in caused:
            deltas[delta.channel].append(delta)
        for site in SITES:
            assert floor.snapshot(site).members == modelled_floor(
                now, applied, planned, grace, site
            )
        if n in checkpoints:
            taken += [(floor.snapshot(site), site) for site in SITES]
            taken += [(floor.me_snapshot(employee), employee) for employee in EMPLOYEES]
    for channel, in_order in deltas.items():
        versions = [d.version for d in in_order]
        assert versions == list(range(BASE + 1, BASE + 1 + len(versions))), channel
    for earlier, name in taken:
        if earlier.channel.startswith("me:"):
            final = floor.me_snapshot(name)
            after = [d for d in deltas[final.channel] if d.version > earlier.version]
            shown = after[-1].changes if after else earlier.members
            assert shown == final.members
        else:
            final = floor.snapshot(name)
            after = [d for d in deltas[final.channel] if d.version > earlier.version]
            assert replay(earlier.members, after) == final.members


# -- me ---------------------------------------------------------------------------------------


def test_me_shows_the_employee_even_when_out_and_follows_every_change() -> None:
    floor = TenantFloor(BASE)
    assert floor.me_snapshot("e1") == Snapshot("me:e1", BASE, ())
    _, deltas = floor.apply(punch("e1", "in", 0), at(0))
    assert [d.channel for d in deltas] == ["presence:hq", "me:e1"]
    _, deltas = floor.apply(punch("e1", "out", 60), at(60))
    assert [(d.channel, d.changes[0].state) for d in deltas] == [
        ("presence:hq", "out"),
        ("me:e1", "out"),
    ]
    snapshot = floor.me_snapshot("e1")
    assert (snapshot.version, [m.state for m in snapshot.members]) == (BASE + 2, ["out"])
    # Out while out: the floors show nothing new, but `me` has a newer `since`.
    _, deltas = floor.apply(punch("e1", "out", 70), at(70))
    assert [d.channel for d in deltas] == ["me:e1"]
    # Erased: nothing left to show.
    [last] = floor.forget("e1", "[erased]", at(80))
    assert (last.channel, last.changes) == ("me:e1", ())


def test_after_an_erasure_no_delta_kept_for_recovery_names_the_employee() -> None:
    floor = TenantFloor(BASE)
    floor.me_channel("e1")
    floor.apply(punch("e1", "in", 0), at(0))
    floor.apply(punch("e2", "in", 1), at(1))
    floor.forget("e1", "[erased]", at(2))
    kept = floor.channel("hq").since(BASE)
    assert kept is not None and len(kept) == 3
    assert [(m.employee, m.name) for d in kept for m in d.changes] == [
        ("e1", "[erased]"),
        ("e2", "Name e2"),
        ("e1", "[erased]"),
    ]
    # `me` keeps its version but none of its deltas: a phone that held any version gets a
    # snapshot, which is empty.
    me = floor.me_channel("e1")
    assert me.version == BASE + 2
    assert me.since(BASE) is None and me.since(BASE + 1) is None
    assert floor.me_snapshot("e1") == Snapshot("me:e1", BASE + 2, ())


def test_late_for_names_the_shift() -> None:
    floor = planned_floor()
    assert floor.late_for("e1") is None
    floor.tick(at(5))
    assert floor.late_for("e1") == SHIFT


def test_me_counts_every_change_whether_or_not_anyone_asked_for_it() -> None:
    # Hub processes that apply the same punches count the same versions, wherever the
    # employee's phone happens to be connected.
    asked, unasked = TenantFloor(BASE), TenantFloor(BASE)
    asked.me_channel("e1")
    for floor in (asked, unasked):
        _, deltas = floor.apply(punch("e1", "in", 0), at(0))
        assert [d.channel for d in deltas] == ["presence:hq", "me:e1"]
        floor.apply(punch("e1", "out", 60), at(60))
    assert asked.me_snapshot("e1") == unasked.me_snapshot("e1")
    assert asked.me_snapshot("e1").version == BASE + 2


# -- terminals ------------------------------------------------------------------------------


def test_a_device_is_online_while_it_has_a_socket() -> None:
    board = TerminalBoard(BASE)
    assert [d.changes[0].online for d in board.known("door", "hq", "Door", T0)] == [False]
    assert [d.changes[0].online for d in board.connected("door", "hq", "hub-a", T0)] == [True]
    assert board.connected("door", "hq", "hub-a", T0) == []
    assert board.disconnected("door", "hub-a", T0) == []
    [offline] = board.disconnected("door", "hub-a", T0 + timedelta(minutes=1))
    assert (offline.version, offline.changes[0].online) == (BASE + 3, False)
    assert offline.changes[0].since == T0 + timedelta(minutes=1)
    assert board.disconnected("door", "hub-a", T0) == []


def test_sockets_are_counted_per_hub() -> None:
    board = TerminalBoard(BASE)
    board.connected("door", "hq", "hub-a", T0)
    assert board.connected("door", "hq", "hub-b", T0) == []
    # A hub that never held a socket of this device cannot close one.
    assert board.disconnected("door", "hub-c", T0) == []
    assert board.disconnected("door", "hub-a", T0) == []
    assert [m.online for m in board.snapshot("hq").members] == [True]
    [offline] = board.disconnected("door", "hub-b", T0)
    assert offline.changes[0].online is False


def test_a_device_that_moves_leaves_the_old_board() -> None:
    board = TerminalBoard(BASE)
    board.known("door", "hq", "Door", T0)
    deltas = board.known("door", "plant", "Door", T0)
    assert [(d.channel, d.changes[0].online) for d in deltas] == [
        ("terminals:hq", False),
        ("terminals:plant", False),
    ]
    assert board.snapshot("hq").members == ()
    assert [m.device for m in board.snapshot("plant").members] == ["door"]
    assert board.known("door", "plant", "Door", T0) == []


def test_a_removed_device_leaves_the_board() -> None:
    board = TerminalBoard(BASE)
    board.connected("door", "hq", "hub-a", T0)
    [gone] = board.removed("door", T0)
    assert (gone.channel, gone.changes[0].online) == ("terminals:hq", False)
    assert board.snapshot("hq").members == ()
    assert board.removed("door", T0) == []


def test_what_a_hub_says_it_holds_replaces_what_the_board_counted_for_it() -> None:
    board = TerminalBoard(BASE)
    later = T0 + timedelta(minutes=1)
    # The door's socket on hub-a was counted twice (say its connect event came twice).
    board.connected("door", "hq", "hub-a", T0)
    board.connected("door", "hq", "hub-a", T0)
    board.connected("gate", "hq", "hub-b", T0)
    deltas = board.hub_holds("hub-a", {"door": ("hq", 1), "dock": ("plant", 1)}, later)
    assert [(d.channel, d.changes[0].device, d.changes[0].online) for d in deltas] == [
        ("terminals:plant", "dock", True)
    ]
    [offline] = board.disconnected("door", "hub-a", later)
    assert (offline.changes[0].device, offline.changes[0].online) == ("door", False)
    # A hub that died holds nothing: its devices with no other socket go offline.
    board.connected("gate", "hq", "hub-a", T0)
    assert board.hub_holds("hub-b", {}, later) == []
    gone = board.hub_holds("hub-a", {}, later)
    assert [(d.changes[0].device, d.changes[0].online, d.changes[0].since) for d in gone] == [
        ("dock", False, later),
        ("gate", False, later),
    ]
    assert board.hub_holds("hub-a", {}, later) == []
    assert board.hubs() == set()


def _alert(n: int, site: str = "hq") -> AlertMember:
    at = datetime(2026, 11, 29, 8, tzinfo=UTC)
    return AlertMember(uuid.UUID(int=n), "rapid_repeat", "warning", "e1", site, at, "again", {}, at)


def test_an_alert_announced_again_is_shown_once_while_its_channel_still_logs_it() -> None:
    board = AlertBoard(base_version=100)
    first = board.raised(_alert(1))
    assert first is not None and first.version == 101
    assert board.raised(_alert(1)) is None
    assert board.raised(_alert(1, site="annex")) is not None, "another site's channel"
    # The same after a dump and restore (a hub that took the checkpoint over).
    restored = AlertBoard.restored(100, board.dump())
    assert restored.raised(_alert(1)) is None
    # Once the log has moved on past it, the alert counts as new again.
    for n in range(2, ALERT_LOG_LENGTH + 2):
        assert restored.raised(_alert(n)) is not None
    again = restored.raised(_alert(1))
    assert again is not None and again.version == 100 + ALERT_LOG_LENGTH + 2
    # Ids that left the log are forgotten, and those still in it are kept.
    for n in range(2 * ALERT_LOG_LENGTH):
        restored.raised(_alert(1_000 + n))
    assert restored.raised(_alert(1_000 + 2 * ALERT_LOG_LENGTH - 1)) is None
