"""Timesheet rules as pure code (workers/timesheets.py): worked examples from the regulations,
then properties that hold for any punches."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.timesheets import Day, Punch, Rules, round_time, timesheet

UTC_RULES = Rules("UTC")
FAR_LATER = datetime(2030, 1, 1, tzinfo=UTC)


def shifts(*days: tuple[date, float, float], zone: str = "UTC", breaks: float = 0) -> list[Punch]:
    """A clock-in and a clock-out per (day, start hour, hours worked), in the zone's wall time;
    with ``breaks`` hours of break in the middle of each shift."""
    tz = ZoneInfo(zone)
    punches = []
    for day, start, hours in days:
        begin = datetime(day.year, day.month, day.day, tzinfo=tz) + timedelta(hours=start)
        if breaks:
            middle = begin + timedelta(hours=hours / 2)
            punches += [
                Punch(begin, "in"),
                Punch(middle, "break_start"),
                Punch(middle + timedelta(hours=breaks), "break_end"),
                Punch(begin + timedelta(hours=hours + breaks), "out"),
            ]
        else:
            punches += [Punch(begin, "in"), Punch(begin + timedelta(hours=hours), "out")]
    return punches


def totals(days: list[Day]) -> tuple[int, int, int, int]:
    return (
        sum(d.worked_minutes for d in days),
        sum(d.regular_minutes for d in days),
        sum(d.overtime_minutes for d in days),
        sum(d.double_time_minutes for d in days),
    )


MONDAY = date(2026, 11, 2)


def week(hours: list[float], start: date = MONDAY) -> list[tuple[date, float, float]]:
    return [(start + timedelta(days=n), 8.0, h) for n, h in enumerate(hours) if h]


# -- FLSA ------------------------------------------------------------------------------------


def test_flsa_a_46_hour_week_is_40_regular_and_6_overtime() -> None:
    # 29 CFR 778.110(a): an employee employed at $12 an hour who works 46 hours in a workweek
    # is entitled to 40 hours at the regular rate and 6 hours at time and a half.
    days = timesheet(shifts(*week([9, 9, 9, 9, 10])), Rules("UTC", "flsa"), FAR_LATER)
    assert totals(days) == (46 * 60, 40 * 60, 6 * 60, 0)
    # The overtime falls on the day the week crosses 40 hours, and after.
    assert [(d.regular_minutes, d.overtime_minutes) for d in days] == [
        (540, 0),
        (540, 0),
        (540, 0),
        (540, 0),
        (240, 360),
    ]


def test_flsa_counts_no_daily_overtime_and_weeks_start_where_the_policy_says() -> None:
    # 12 hours on each of Sunday and Monday: under FLSA no day is overtime by itself.
    punches = shifts((MONDAY - timedelta(days=1), 6.0, 12.0), (MONDAY, 6.0, 12.0))
    assert totals(timesheet(punches, Rules("UTC", "flsa"), FAR_LATER))[2] == 0
    # A workweek from Sunday: 40 hours Sunday to Thursday, then 5 more on Friday.
    sunday = MONDAY - timedelta(days=1)
    rules = Rules("UTC", "flsa", workweek_start=6)
    days = timesheet(shifts(*week([8, 8, 8, 8, 8, 5], start=sunday)), rules, FAR_LATER)
    assert totals(days) == (45 * 60, 40 * 60, 5 * 60, 0)
    # The same hours in a Monday workweek: Sunday falls in the week before.
    days = timesheet(
        shifts(*week([8, 8, 8, 8, 8, 5], start=sunday)), Rules("UTC", "flsa"), FAR_LATER
    )
    assert totals(days) == (45 * 60, 45 * 60, 0, 0)


# -- California --------------------------------------------------------------------------------


def test_california_a_13_hour_day_is_8_regular_4_overtime_1_double() -> None:
    # Cal. Labor Code 510(a): over 8 hours in a workday at 1.5x, over 12 at 2x.
    days = timesheet(shifts((MONDAY, 6.0, 13.0)), Rules("UTC", "california"), FAR_LATER)
    assert totals(days) == (13 * 60, 8 * 60, 4 * 60, 60)


def test_california_six_9_hour_days_are_40_regular_and_14_overtime_without_pyramiding() -> None:
    # DLSE Enforcement Policies and Interpretations Manual 48.1.4 (no pyramiding): the daily
    # hour over 8 on each of the first five days (5), then all 9 hours of the sixth day once
    # the week has 40 regular hours (9), and no hour is counted twice.
    days = timesheet(shifts(*week([9, 9, 9, 9, 9, 9])), Rules("UTC", "california"), FAR_LATER)
    assert totals(days) == (54 * 60, 40 * 60, 14 * 60, 0)


def test_california_the_seventh_consecutive_day_is_overtime_then_double_time() -> None:
    # Cal. Labor Code 510(a): the first 8 hours on the seventh consecutive day of work in a
    # workweek at 1.5x, beyond 8 at 2x.
    days = timesheet(shifts(*week([4, 4, 4, 4, 4, 4, 10])), Rules("UTC", "california"), FAR_LATER)
    seventh = days[-1]
    assert (seventh.regular_minutes, seventh.overtime_minutes, seventh.double_time_minutes) == (
        0,
        8 * 60,
        2 * 60,
    )
    # Six days and a day off: the sixth day is an ordinary day.
    days = timesheet(shifts(*week([4, 4, 4, 4, 4, 10])), Rules("UTC", "california"), FAR_LATER)
    assert totals(days) == (30 * 60, 28 * 60, 2 * 60, 0)


# -- rounding, days, DST -----------------------------------------------------------------------


def test_the_7_minute_rule() -> None:
    # 29 CFR 785.48(b): with 15-minute rounding, 8:07 counts as 8:00 and 8:08 as 8:15.
    zone = ZoneInfo("America/New_York")
    at = datetime(2026, 11, 2, 8, 7, 59, tzinfo=zone)
    assert round_time(at, 15, zone) == datetime(2026, 11, 2, 8, 0, tzinfo=zone)
    assert round_time(at + timedelta(seconds=1), 15, zone) == datetime(
        2026, 11, 2, 8, 15, tzinfo=zone
    )
    # Tenths of an hour: 3 minutes past goes up, 2 goes down.
    assert (
        round_time(datetime(2026, 11, 2, 8, 3, tzinfo=zone), 6, zone).astimezone(zone).minute == 6
    )
    assert (
        round_time(datetime(2026, 11, 2, 8, 2, tzinfo=zone), 6, zone).astimezone(zone).minute == 0
    )
    # In a zone 45 minutes off the hour, the wall clock rounds, not UTC.
    nepal = ZoneInfo("Asia/Kathmandu")
    rounded = round_time(datetime(2026, 11, 2, 8, 7, tzinfo=nepal), 6, nepal)
    assert rounded.astimezone(nepal).time() == time(8, 6)
    # A whole shift: in at 8:07, out at 16:08 -> 8:00 to 16:15.
    punches = [
        Punch(datetime(2026, 11, 2, 8, 7, tzinfo=zone), "in"),
        Punch(datetime(2026, 11, 2, 16, 8, tzinfo=zone), "out"),
    ]
    rules = Rules("America/New_York", rounding_minutes=15)
    assert totals(timesheet(punches, rules, FAR_LATER))[0] == 8 * 60 + 15


def test_a_night_shift_is_split_at_local_midnight() -> None:
    punches = shifts((MONDAY, 22.0, 8.0), zone="Europe/Berlin")
    days = timesheet(punches, Rules("Europe/Berlin"), FAR_LATER)
    assert [(d.date, d.worked_minutes) for d in days] == [
        (MONDAY, 120),
        (MONDAY + timedelta(days=1), 360),
    ]


def test_a_dst_night_lasts_as_long_as_it_really_did() -> None:
    # Berlin falls back on 2026-10-25 at 03:00 -> 02:00: 22:00 to 06:00 is nine hours.
    zone = ZoneInfo("Europe/Berlin")
    fall = [
        Punch(datetime(2026, 10, 24, 22, 0, tzinfo=zone), "in"),
        Punch(datetime(2026, 10, 25, 6, 0, tzinfo=zone), "out"),
    ]
    days = timesheet(fall, Rules("Europe/Berlin"), FAR_LATER)
    assert [(d.date.day, d.worked_minutes) for d in days] == [(24, 120), (25, 420)]
    # And springs forward on 2026-03-29 at 02:00 -> 03:00: the same wall times are 7 hours.
    spring = [
        Punch(datetime(2026, 3, 28, 22, 0, tzinfo=zone), "in"),
        Punch(datetime(2026, 3, 29, 6, 0, tzinfo=zone), "out"),
    ]
    days = timesheet(spring, Rules("Europe/Berlin"), FAR_LATER)
    assert [(d.date.day, d.worked_minutes) for d in days] == [(28, 120), (29, 300)]
    # California's 8-hour day counts real hours: a 9-hour day across the change is overtime.
    rules = Rules("America/Los_Angeles", "california")
    la = ZoneInfo("America/Los_Angeles")
    fall_la = [
        Punch(datetime(2026, 11, 1, 0, 30, tzinfo=la), "in"),
        Punch(datetime(2026, 11, 1, 8, 30, tzinfo=la), "out"),
    ]
    assert totals(timesheet(fall_la, rules, FAR_LATER)) == (9 * 60, 8 * 60, 60, 0)


# -- breaks and odd sequences ---------------------------------------------------------------


def test_breaks_are_counted_apart_from_work() -> None:
    days = timesheet(shifts((MONDAY, 8.0, 8.0), breaks=0.5), UTC_RULES, FAR_LATER)
    assert [(d.worked_minutes, d.break_minutes, d.flags) for d in days] == [(480, 30, [])]


def test_a_forgotten_clock_out_counts_nothing_and_is_flagged() -> None:
    start = datetime(2026, 11, 2, 8, tzinfo=UTC)
    forgotten = [Punch(start, "in")]
    [day] = timesheet(forgotten, UTC_RULES, FAR_LATER)
    assert (day.worked_minutes, day.flags) == (0, ["missing_clock_out"])
    # Still at work: counts up to now.
    [day] = timesheet(forgotten, UTC_RULES, start + timedelta(hours=3))
    assert (day.worked_minutes, day.flags) == (180, [])
    # Clocked in twice: the first clock-in holds, the day is flagged.
    twice = [
        forgotten[0],
        Punch(start + timedelta(hours=1), "in"),
        Punch(start + timedelta(hours=8), "out"),
    ]
    [day] = timesheet(twice, UTC_RULES, FAR_LATER)
    assert (day.worked_minutes, day.flags) == (480, ["missing_clock_out"])


def test_a_clock_out_without_a_clock_in_is_flagged() -> None:
    start = datetime(2026, 11, 2, 8, tzinfo=UTC)
    [day] = timesheet([Punch(start, "out")], UTC_RULES, FAR_LATER)
    assert (day.worked_minutes, day.flags) == (0, ["missing_clock_in"])


# -- properties --------------------------------------------------------------------------------

kinds = st.sampled_from(["in", "out", "break_start", "break_end"])
punch_lists = st.lists(st.tuples(st.integers(0, 21 * 24 * 60), kinds), max_size=60)


@settings(max_examples=300)
@given(
    punch_lists,
    st.sampled_from(["flsa", "california", "none"]),
    st.sampled_from([0, 5, 6, 15]),
    st.sampled_from(["UTC", "America/Los_Angeles", "Europe/Berlin", "Asia/Kathmandu"]),
    st.integers(0, 6),
)
def test_regular_overtime_and_double_time_always_add_up_to_worked_time(
    raw: list[tuple[int, str]], overtime: str, rounding: int, zone: str, week_start: int
) -> None:
    base = datetime(2026, 10, 19, tzinfo=UTC)
    punches = [Punch(base + timedelta(minutes=m), kind) for m, kind in raw]
    rules = Rules(zone, overtime, week_start, rounding)  # type: ignore[arg-type]
    days = timesheet(punches, rules, FAR_LATER)
    for day in days:
        parts = (day.regular_minutes, day.overtime_minutes, day.double_time_minutes)
        assert min(parts) >= 0 and sum(parts) == day.worked_minutes, day
        assert 0 <= day.worked_minutes + day.break_minutes <= 25 * 60, day
    assert [d.date for d in days] == sorted({d.date for d in days})
    if overtime == "none":
        assert totals(days)[2:] == (0, 0)
    # No week holds more than 40 regular hours.
    weeks: dict[date, int] = {}
    for day in days:
        start = day.date - timedelta(days=(day.date.weekday() - week_start) % 7)
        weeks[start] = weeks.get(start, 0) + day.regular_minutes
    if overtime != "none":
        assert max(weeks.values(), default=0) <= 40 * 60


def test_a_forgotten_clock_out_is_not_a_32_hour_shift_the_next_day() -> None:
    monday = datetime(2026, 11, 2, 8, tzinfo=UTC)
    punches = [
        Punch(monday, "in"),
        Punch(monday + timedelta(days=1), "in"),
        Punch(monday + timedelta(days=1, hours=9), "out"),
    ]
    days = timesheet(punches, Rules("UTC", "california"), FAR_LATER)
    assert [(d.date.day, d.worked_minutes, d.overtime_minutes, d.flags) for d in days] == [
        (2, 0, 0, ["missing_clock_out"]),
        (3, 540, 60, []),
    ]
    # An `in` and an `out` 33 hours apart: the `out` finds nobody in.
    far_apart = [Punch(monday, "in"), Punch(monday + timedelta(hours=33), "out")]
    days = timesheet(far_apart, Rules("UTC"), FAR_LATER)
    assert [(d.date.day, d.worked_minutes, d.flags) for d in days] == [
        (2, 0, ["missing_clock_out"]),
        (3, 0, ["missing_clock_in"]),
    ]
