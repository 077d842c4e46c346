"""The fraud checks as pure code (workers/fraud.py): each check on the case it is for, the
honest cases next to it that it must leave alone, and history never reported."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.fraud import Finding, Row, Thresholds, arrays, check, distance_m, usual_times

T0 = 1_795_000_000.0
HQ = {"site": "hq", "site_lat": 52.52, "site_lon": 13.405, "site_radius": 200.0}
# Hamburg, 255 km from Berlin.
PORT = {"site": "port", "site_lat": 53.55, "site_lon": 9.99, "site_radius": 200.0}


def row(employee: str, at: float, kind: str = "in", new: bool = True, **extra: Any) -> Row:
    values: dict[str, Any] = {
        **HQ,
        "employee": employee,
        "kind": kind,
        "at": T0 + at,
        "received": T0 + at + 0.2,
        "local_minute": 480.0,
        "new": new,
        "device": "door",
    }
    values.update(extra)
    return Row(**values)


def found(rows: list[Row], **thresholds: Any) -> list[tuple[str, int, str]]:
    """(kind, index, reason or '') of every finding."""
    findings: list[Finding] = check(arrays(rows), Thresholds(**thresholds))
    return [(f.kind, f.index, str(f.detail.get("reason", ""))) for f in findings]


def test_turns_at_a_reader_are_honest_and_a_colleague_right_behind_is_not() -> None:
    queue = [row(f"e{n}", 6.0 * n) for n in range(5)]
    assert found(queue) == []
    buddy = [row("e1", 0.0), row("e2", 0.8)]
    assert found(buddy) == [("buddy_punch", 1, "one_device")]
    # The default: people pass a reader at most 40 a minute, 1.5 s each.
    assert found([row("e1", 0.0), row("e2", 1.6)]) == []
    assert found([row("e1", 0.0), row("e2", 1.4)]) == [("buddy_punch", 1, "one_device")]
    # The same employee twice on one reader is not a buddy punch (it is a rapid repeat).
    assert [f[0] for f in found([row("e1", 0.0), row("e1", 0.8)])] == ["rapid_repeat"]


def test_one_employee_on_two_devices_at_once() -> None:
    rows = [row("e1", 0.0, device="door"), row("e1", 20.0, device="gate", kind="out")]
    assert found(rows) == [("buddy_punch", 1, "two_devices")]
    # An hour later on the other device is a normal day.
    assert found([rows[0], row("e1", 3600.0, device="gate", kind="out")]) == []


def test_geofence_outside_the_radius_or_too_vague_and_not_where_turned_off() -> None:
    phone = {"device": None, "accuracy": 20.0}
    inside = row("e1", 0, lat=52.5205, lon=13.405, **phone)
    outside = row("e2", 0, lat=52.55, lon=13.405, **phone)
    vague = row("e3", 0, lat=52.52, lon=13.405, **{**phone, "accuracy": 900.0})
    assert found([inside]) == []
    assert found([outside]) == [("geofence", 0, "outside")]
    assert found([vague]) == [("geofence", 0, "poor_accuracy")]
    off = row("e2", 0, lat=52.55, lon=13.405, geofence="off", **phone)
    assert found([off]) == []
    # A site without a radius has no fence.
    assert found([row("e2", 0, lat=52.55, lon=13.405, site_radius=None, **phone)]) == []


def test_impossible_travel_between_cities_but_not_a_day_apart() -> None:
    rows = [row("e1", 0.0), row("e1", 1800.0, kind="out", device="quay", **PORT)]
    [(kind, index, _)] = found(rows)
    assert (kind, index) == ("impossible_travel", 1)
    # Driving there takes three hours: fine.
    assert found([rows[0], row("e1", 3 * 3600.0, kind="out", device="quay", **PORT)]) == []
    # The distance is the real one.
    berlin_hamburg = distance_m(
        np.array([52.52]), np.array([13.405]), np.array([53.55]), np.array([9.99])
    )
    assert 250_000 < berlin_hamburg[0] < 260_000


def test_clock_skew_only_for_online_punches_not_entered_by_hand() -> None:
    skewed = row("e1", 0.0, received=T0 + 1800.0)
    assert found([skewed]) == [("clock_skew", 0, "")]
    assert found([row("e1", 0.0, received=T0 + 1800.0, offline=True)]) == []
    assert found([row("e1", 0.0, received=T0 + 1800.0, manual=True, device=None)]) == []
    assert found([row("e1", 0.0, received=T0 + 30.0)]) == []


def test_rapid_repeat_of_the_same_kind_only() -> None:
    assert [f[:2] for f in found([row("e1", 0.0), row("e1", 40.0)])] == [("rapid_repeat", 1)]
    assert found([row("e1", 0.0), row("e1", 40.0, kind="break_start")]) == []
    assert found([row("e1", 0.0), row("e1", 400.0)]) == []


def usual(minutes: list[float]) -> dict[str, Any]:
    """The Row fields of a usual time worked out from ``minutes``."""
    _, centre, spread, count = usual_times(
        np.zeros(len(minutes), dtype=np.int64), np.array(minutes, dtype=np.float64)
    )
    return {
        "usual_minute": float(centre[0]),
        "usual_spread": float(spread[0]),
        "usual_count": int(count[0]),
    }


def test_unusual_time_needs_history_and_is_robust_around_midnight() -> None:
    # A night worker who clocks in around 23:50, give or take ten minutes (crossing midnight).
    night = usual([(1430 + (n % 5) * 5) % 1440 for n in range(30)])
    # Midnight, not noon (the mean of the minutes) nor 23:50 (their plain median).
    assert min(night["usual_minute"], 1440 - night["usual_minute"]) < 1
    assert night["usual_spread"] <= 10
    assert found([row("e1", 0.0, local_minute=5.0, **night)]) == []
    assert found([row("e1", 0.0, local_minute=1425.0, **night)]) == []
    [(kind, index, _)] = found([row("e1", 0.0, local_minute=14 * 60.0, **night)])
    assert (kind, index) == ("unusual_time", 0)
    # Not enough history: no opinion.
    few = usual([(1430 + (n % 5) * 5) % 1440 for n in range(5)])
    assert found([row("e1", 0.0, local_minute=14 * 60.0, **few)]) == []
    # Within a planned shift (covering for a colleague, say): not unusual.
    assert found([row("e1", 0.0, local_minute=14 * 60.0, scheduled=True, **night)]) == []


def test_a_pair_is_reported_on_its_new_punch_even_the_earlier_one() -> None:
    # The buddy's punch came first from an offline queue, after the friend's was stored.
    stored = row("e1", 0.8, new=False)
    late = row("e2", 0.0, offline=True, received=T0 + 3600.0)
    assert found([stored, late]) == [("buddy_punch", 1, "one_device")]


def test_two_readers_at_once_reports_the_copy_received_later() -> None:
    # The second reader's clock is 5 s slow: by `at` the copy looks first.
    genuine = row("e1", 10.0, device="door", received=T0 + 10.2)
    copy = row("e1", 5.5, device="gate", received=T0 + 12.0)
    assert [f[:2] for f in found([genuine, copy]) if f[0] == "buddy_punch"] == [("buddy_punch", 1)]


def test_geofence_gives_a_vague_position_the_benefit_of_the_doubt() -> None:
    # 250 m from the centre of a 200 m fence, but only known to 150 m: it may be inside.
    near = row("e1", 0, lat=52.52225, lon=13.405, device=None, accuracy=150.0)
    assert found([near]) == []
    sure = row("e1", 0, lat=52.52225, lon=13.405, device=None, accuracy=10.0)
    assert found([sure]) == [("geofence", 0, "outside")]


def test_history_is_never_reported_and_a_batch_checked_twice_finds_the_same() -> None:
    history = [row("e1", 0.0, new=False), row("e2", 0.8, new=False)]
    assert found(history) == []
    batch = [*history, row("e3", 1.5), row("e3", 30.0, received=T0 + 4000.0)]
    first = found(batch)
    assert first == found(batch)
    assert {index for _, index, _ in first} == {2, 3}


def test_a_trip_there_and_back_reports_the_trip_not_the_return() -> None:
    home, away, back = (
        row("e1", 0.0),
        row("e1", 1800.0, kind="out", device="quay", **PORT),
        row("e1", 3600.0, kind="in"),
    )
    assert [f[:2] for f in found([home, away, back])] == [("impossible_travel", 1)]
    # Moving on to a third city is a second impossible leg, reported too.
    munich = {"site": "mun", "site_lat": 48.14, "site_lon": 11.58, "site_radius": 200.0}
    onward = row("e1", 3600.0, kind="in", device="gate", **munich)
    assert [f[:2] for f in found([home, away, onward])] == [
        ("impossible_travel", 1),
        ("impossible_travel", 2),
    ]


def test_a_repeat_on_another_reader_is_the_punch_received_later() -> None:
    genuine = row("e1", 10.0, device="door", received=T0 + 10.2)
    copy = row("e1", 5.5, device="gate", received=T0 + 40.0)
    repeats = [f[:2] for f in found([genuine, copy], two_devices_s=1.0)]
    assert repeats == [("rapid_repeat", 1)]


def test_a_badge_shuttled_between_two_cities_is_reported_each_way_out() -> None:
    legs = [
        row("e1", 0.0),
        row("e1", 600.0, kind="out", device="quay", **PORT),
        row("e1", 1200.0, kind="in"),
        row("e1", 1800.0, kind="out", device="quay", **PORT),
    ]
    assert [f[:2] for f in found(legs)] == [("impossible_travel", 1), ("impossible_travel", 3)]


def test_an_offline_punch_is_checked_against_what_came_after_it() -> None:
    stored_later = row("e1", 1800.0, kind="out", device="quay", new=False, **PORT)
    queued = row("e1", 0.0, offline=True, received=T0 + 7200.0)
    assert [f[:2] for f in found([stored_later, queued])] == [("impossible_travel", 1)]
