"""Presence as pure state (hub/presence.py): punches in any order, versions, snapshots, deltas."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.presence import (
    LOG_LENGTH,
    STATE_AFTER,
    Channel,
    Delta,
    Member,
    PresencePunch,
    TenantFloor,
    TerminalBoard,
    flag_for,
    replay,
)

T0 = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
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
        floor.apply(p)
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
        _, caused = floor.apply(p)
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
        _, caused = floor.apply(p)
        for delta in caused:
            assert delta.version == last[delta.channel] + 1
            last[delta.channel] = delta.version
    for site in SITES:
        assert floor.snapshot(site).version == last[f"presence:{site}"]


def test_a_late_older_punch_changes_nothing_and_is_flagged_out_of_order() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 10))
    flag, deltas = floor.apply(punch("e1", "out", 5))
    assert (flag, deltas) == ("out_of_order", [])
    assert floor.state_of("e1") == "in"


def test_moving_to_another_site_leaves_the_first_floor() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0, "hq"))
    flag, deltas = floor.apply(punch("e1", "in", 60, "plant"))
    assert flag == "in_while_in"
    assert [(d.channel, d.changes[0].state, d.changes[0].site) for d in deltas] == [
        ("presence:hq", "out", "hq"),
        ("presence:plant", "in", "plant"),
    ]
    assert floor.snapshot("hq").members == ()
    assert [m.employee for m in floor.snapshot("plant").members] == ["e1"]


def test_clocking_out_elsewhere_only_leaves_the_floor_one_was_on() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0, "hq"))
    _, deltas = floor.apply(punch("e1", "out", 60, "plant"))
    assert [(d.channel, d.changes[0].state) for d in deltas] == [("presence:hq", "out")]


def test_out_while_out_and_a_first_out_change_no_floor() -> None:
    floor = TenantFloor(BASE)
    assert floor.apply(punch("e1", "out", 0)) == ("out_while_out", [])
    assert floor.apply(punch("e1", "out", 1)) == ("out_while_out", [])
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
            floor.apply(punch("e1", "in", 0))
        floor.apply(punch("e1", first, 1))
    got, _ = floor.apply(punch("e1", kind, 2))
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
    floor.apply(punch("e1", "in", 0))
    [delta] = floor.rename("e1", "Ann Lee")
    assert (delta.channel, delta.changes[0].name, delta.changes[0].state) == (
        "presence:hq",
        "Ann Lee",
        "in",
    )
    assert floor.snapshot("hq").members[0].name == "Ann Lee"
    assert floor.rename("e1", "Ann Lee") == []
    floor.apply(punch("e1", "out", 5))
    assert floor.rename("e1", "Ann") == []
    assert floor.rename("nobody", "X") == []


def test_forgetting_an_erased_employee_takes_them_off_the_floor_and_out_of_memory() -> None:
    floor = TenantFloor(BASE)
    floor.apply(punch("e1", "in", 0))
    [delta] = floor.forget("e1", "[erased]")
    assert (delta.changes[0].name, delta.changes[0].state) == ("[erased]", "out")
    assert floor.snapshot("hq").members == ()
    assert floor.state_of("e1") is None
    assert floor.forget("e1", "[erased]") == []


# -- terminals ------------------------------------------------------------------------------


def test_a_device_is_online_while_it_has_a_socket() -> None:
    board = TerminalBoard(BASE)
    assert [d.changes[0].online for d in board.known("door", "hq", "Door", T0)] == [False]
    assert [d.changes[0].online for d in board.connected("door", "hq", T0)] == [True]
    assert board.connected("door", "hq", T0) == []
    assert board.disconnected("door", T0) == []
    [offline] = board.disconnected("door", T0 + timedelta(minutes=1))
    assert (offline.version, offline.changes[0].online) == (BASE + 3, False)
    assert offline.changes[0].since == T0 + timedelta(minutes=1)
    assert board.disconnected("door", T0) == []


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
    board.connected("door", "hq", T0)
    [gone] = board.removed("door", T0)
    assert (gone.channel, gone.changes[0].online) == ("terminals:hq", False)
    assert board.snapshot("hq").members == ()
    assert board.removed("door", T0) == []
