"""Live overtime and break findings as pure code (workers/overtime.py): what the periodic
scan alerts about, for an employee still at work and for shifts just ended."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from workers.overtime import average_week, live_findings
from workers.timesheets import MAX_OPEN, Punch, Rules, rounded, shifts, timesheet

MONDAY = datetime(2026, 11, 2, tzinfo=UTC)
CALIFORNIA = Rules("UTC", "california")
FLSA = Rules("UTC", "flsa")


def at(hours: float, day: int = 0) -> datetime:
    return MONDAY + timedelta(days=day, hours=hours)


def kinds(punches: list[Punch], rules: Rules, now: datetime, **extra: bool) -> list[str]:
    return [f.kind for f in live_findings(punches, rules, now, **extra).findings]


def test_a_day_past_8_hours_in_california_is_overtime_and_the_hour_before_is_approaching() -> None:
    # In at 6:00, lunch from 10:30 to 11:00, still at work.
    clocked_in = [Punch(at(6), "in"), Punch(at(10.5), "break_start"), Punch(at(11), "break_end")]
    assert kinds(clocked_in, CALIFORNIA, at(12)) == []
    [approaching] = live_findings(clocked_in, CALIFORNIA, at(13.75)).findings
    assert (approaching.kind, approaching.key) == ("overtime_approaching", "day/2026-11-02")
    assert approaching.detail["within_minutes"] == 45
    [overtime] = live_findings(clocked_in, CALIFORNIA, at(15)).findings
    assert (overtime.kind, overtime.key, overtime.detail["overtime_minutes"]) == (
        "overtime",
        "day/2026-11-02",
        30,
    )
    # The same day asked again gives the same key: the scan raises it once.
    assert live_findings(clocked_in, CALIFORNIA, at(15.5)).findings[0].key == overtime.key
    # On a break, nothing is approaching: the shift is not going on.
    on_break = [*clocked_in, Punch(at(13.5), "break_start")]
    assert kinds(on_break, CALIFORNIA, at(13.75)) == []


def test_flsa_overtime_comes_with_the_41st_hour_of_the_week() -> None:
    week = [
        punch
        for day in range(4)
        for punch in (Punch(at(8, day), "in"), Punch(at(17.5, day), "out"))
    ]
    friday = [*week, Punch(at(8, 4), "in")]
    assert kinds(friday, FLSA, at(8.5, 4)) == []
    assert kinds(friday, FLSA, at(9.5, 4)) == ["overtime_approaching"]
    assert kinds(friday, FLSA, at(10.5, 4)) == ["overtime"]
    assert kinds(friday, Rules("UTC", "none"), at(10.5, 4)) == []


def test_a_shift_open_past_16_hours_is_a_missing_clock_out() -> None:
    [finding] = live_findings([Punch(at(6), "in")], Rules("UTC"), at(23)).findings
    assert (finding.kind, finding.key, finding.detail["open_hours"]) == (
        "missing_clock_out",
        f"shift/{at(6).isoformat()}",
        17.0,
    )


def test_california_meal_break_by_the_end_of_the_fifth_hour() -> None:
    late_lunch = [
        Punch(at(8), "in"),
        Punch(at(13.5), "break_start"),
        Punch(at(14), "break_end"),
    ]
    [finding] = live_findings(late_lunch, CALIFORNIA, at(14.5)).findings
    assert (finding.kind, finding.at, finding.detail) == (
        "meal_break",
        at(13),
        {"rule": "california"},
    )
    on_time = [Punch(at(8), "in"), Punch(at(12.5), "break_start"), Punch(at(13), "break_end")]
    assert kinds(on_time, CALIFORNIA, at(14.5)) == []
    # A short break does not count; under five hours nothing is due.
    short = [Punch(at(8), "in"), Punch(at(12), "break_start"), Punch(at(12.2), "break_end")]
    assert kinds(short, CALIFORNIA, at(13.5)) == ["meal_break"]
    assert kinds([Punch(at(8), "in")], CALIFORNIA, at(12.9)) == []


def test_eu_rest_between_shifts_and_a_break_after_six_hours() -> None:
    late_then_early = [
        Punch(at(14), "in"),
        Punch(at(23), "out"),
        Punch(at(6, 1), "in"),
    ]
    findings = live_findings(
        late_then_early, Rules("Europe/Berlin"), at(7, 1), eu_wtd=True
    ).findings
    assert [(f.kind, f.detail) for f in findings] == [
        ("meal_break", {"rule": "eu_wtd"}),
        ("rest_period", {"rest_hours": 7.0}),
    ]
    # The break after six hours was missed on the first shift; the second is young.
    assert findings[0].key == f"shift/{at(14).isoformat()}"
    assert kinds(late_then_early, Rules("Europe/Berlin"), at(7, 1)) == []


def test_the_eu_average_week_over_17_weeks() -> None:
    # Six ten-hour days a week (60 h) for 17 weeks before this one: 60 > 48 on average.
    monday = datetime(2026, 11, 2, tzinfo=UTC)
    long_weeks = [
        punch
        for week in range(1, 18)
        for day in range(6)
        for punch in (
            Punch(monday - timedelta(weeks=week) + timedelta(days=day, hours=7), "in"),
            Punch(monday - timedelta(weeks=week) + timedelta(days=day, hours=17), "out"),
        )
    ]
    finding = average_week(long_weeks, Rules("Europe/Berlin"), monday + timedelta(hours=9))
    assert finding is not None
    assert (finding.kind, finding.key) == ("overtime", "week/2026-11-02")
    assert finding.detail == {"rule": "eu_wtd_48h", "average_week_hours": 60.0, "weeks": 17}
    # Five eight-hour days (40 h): under the limit, even with one 60-hour week among them.
    normal = [
        punch
        for week in range(1, 18)
        for day in range(6 if week == 3 else 5)
        for punch in (
            Punch(monday - timedelta(weeks=week) + timedelta(days=day, hours=7), "in"),
            Punch(
                monday - timedelta(weeks=week) + timedelta(days=day, hours=17 if week == 3 else 15),
                "out",
            ),
        )
    ]
    assert average_week(normal, Rules("Europe/Berlin"), monday + timedelta(hours=9)) is None


def test_a_meal_break_is_due_only_past_five_hours_and_not_while_it_is_being_taken() -> None:
    five_hours = [Punch(at(8), "in"), Punch(at(13), "out")]
    assert kinds(five_hours, CALIFORNIA, at(14)) == []
    taking_it = [Punch(at(8), "in"), Punch(at(13), "break_start")]
    assert kinds(taking_it, CALIFORNIA, at(13 + 10 / 60)) == []
    # Back after ten minutes: that was no meal break.
    too_short = [*taking_it, Punch(at(13 + 10 / 60), "break_end")]
    assert kinds(too_short, CALIFORNIA, at(13.5)) == ["meal_break"]


def test_a_forgotten_clock_out_does_not_run_into_the_next_day() -> None:
    punches = [Punch(at(8), "in"), Punch(at(8, 1), "in")]
    assert kinds(punches, CALIFORNIA, at(12, 1)) == []


def naive_crossing(punches: list[Punch], rules: Rules, now: datetime) -> int | None:
    """The first five-minute step within the hour at which today has overtime, asked step
    by step: what ``overtime_approaching`` reports."""
    today = now.astimezone(ZoneInfo(rules.timezone)).date()
    for minutes in range(5, 61, 5):
        then = now + timedelta(minutes=minutes + 1)
        day = next((d for d in timesheet(punches, rules, then) if d.date == today), None)
        if day is not None and day.overtime_minutes + day.double_time_minutes > 0:
            return minutes
    return None


RULE_SETS = [
    (CALIFORNIA, False),
    (FLSA, False),
    (Rules("UTC", "none"), True),
    (Rules("America/Los_Angeles", "california", workweek_start=6, rounding_minutes=15), True),
    (Rules("Europe/Berlin", "flsa", rounding_minutes=6), True),
]


def random_punches(rng: random.Random, days: int) -> list[Punch]:
    """Shifts of a few random hours, with breaks, odd sequences and forgotten clock-outs."""
    punches = []
    clock = MONDAY + timedelta(hours=rng.uniform(0, 12))
    end = MONDAY + timedelta(days=days)
    while clock < end:
        kind = rng.choices(["in", "break_start", "break_end", "out"], [4, 2, 2, 3])[0]
        punches.append(Punch(clock, kind))
        clock += timedelta(minutes=rng.choice([7, 25, 45, 90, 180, 300, 600, 1100]))
    return punches


@pytest.mark.parametrize("seed", range(12))
def test_judging_only_once_quiet_ends_finds_what_judging_every_minute_finds(seed: int) -> None:
    """A scan that skips an employee until their ``quiet_until`` (or their next punch)
    raises every alert at the same minute as one that judges them every minute."""
    rng = random.Random(seed)
    rules, eu_wtd = RULE_SETS[seed % len(RULE_SETS)]
    punches = random_punches(rng, days=4)
    first_every: dict[tuple[str, str], datetime] = {}
    first_skipping: dict[tuple[str, str], datetime] = {}
    quiet_until = MONDAY
    seen = 0
    judged = 0
    now = MONDAY
    while now < MONDAY + timedelta(days=4, hours=20):
        known = [p for p in punches if p.at <= now]
        full = live_findings(known, rules, now, eu_wtd=eu_wtd)
        for finding in full.findings:
            first_every.setdefault((finding.kind, finding.key), now)
        if len(known) != seen or now >= quiet_until:
            seen, judged = len(known), judged + 1
            quiet_until = full.quiet_until
            for finding in full.findings:
                first_skipping.setdefault((finding.kind, finding.key), now)
        now += timedelta(minutes=1)
    assert first_skipping == first_every
    assert first_every, "no alert at all: the punches test nothing"
    # Judged far less often than every minute, or skipping saves nothing.
    assert judged < (now - MONDAY) / timedelta(minutes=1) / 3


def long_days(rng: random.Random, days: int) -> list[Punch]:
    """A shift a day of 6 to 12 hours, most with a break, some left open."""
    punches = []
    for day in range(days):
        start = MONDAY + timedelta(days=day, hours=rng.uniform(5, 9))
        hours = rng.uniform(6, 12)
        punches.append(Punch(start, "in"))
        if rng.random() < 0.7:
            lunch = start + timedelta(hours=rng.uniform(3, 5))
            punches.append(Punch(lunch, "break_start"))
            punches.append(Punch(lunch + timedelta(minutes=rng.choice([10, 30, 45])), "break_end"))
        if rng.random() < 0.9:
            punches.append(Punch(start + timedelta(hours=hours), "out"))
    return punches


@pytest.mark.parametrize("seed", range(6))
def test_overtime_approaching_is_the_first_step_with_overtime(seed: int) -> None:
    rng = random.Random(1000 + seed)
    rules = RULE_SETS[seed % len(RULE_SETS)][0]
    if rules.overtime == "none":
        rules = CALIFORNIA
    punches = long_days(rng, days=6)
    now = MONDAY
    approaching = 0
    while now < MONDAY + timedelta(days=6):
        known = [p for p in punches if p.at <= now]
        found = {f.kind: f for f in live_findings(known, rules, now).findings}
        worked, _ = shifts(rounded(known, rules), now)
        at_work = (
            worked
            and worked[-1].end is None
            and not worked[-1].on_break
            and now - worked[-1].start <= MAX_OPEN
        )
        if "overtime" not in found:
            expected = naive_crossing(known, rules, now) if at_work else None
            finding = found.get("overtime_approaching")
            within = None if finding is None else finding.detail["within_minutes"]
            assert within == expected, now
            approaching += within is not None
        now += timedelta(minutes=7)
    assert approaching, "never approaching: the punches test nothing"


def test_overtime_approaching_within_a_shift_about_to_count_as_a_missing_clock_out() -> None:
    # 24.5 hours by Wednesday; in since midnight on Thursday: the 40th hour ends at 15:30,
    # half an hour before the shift has been open 16 hours and stops counting.
    week = [
        punch
        for day in range(3)
        for punch in (Punch(at(8, day), "in"), Punch(at(16 + 10 / 60, day), "out"))
    ]
    thursday = [*week, Punch(at(0, 3), "in")]
    [finding] = live_findings(thursday, FLSA, at(15, 3)).findings
    assert (finding.kind, finding.detail["within_minutes"]) == ("overtime_approaching", 30)
    assert naive_crossing(thursday, FLSA, at(15, 3)) == 30


def test_the_seventh_day_in_california_is_watched_from_its_first_minute() -> None:
    # Six days with work, then in on Sunday (the seventh day of a Monday week).
    week = [
        punch for day in range(6) for punch in (Punch(at(8, day), "in"), Punch(at(12, day), "out"))
    ]
    sunday = [*week, Punch(at(8, 6), "in")]
    first = live_findings(sunday, CALIFORNIA, at(8, 6) + timedelta(seconds=10))
    # No worked minute yet, so no overtime yet (it is approaching): but the employee is to
    # be judged again at once, not hours later.
    assert [f.kind for f in first.findings] == ["overtime_approaching"]
    assert first.quiet_until <= at(8, 6) + timedelta(seconds=10)
    assert kinds(sunday, CALIFORNIA, at(8, 6) + timedelta(minutes=2)) == ["overtime"]
