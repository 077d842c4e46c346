"""Live overtime and break findings as pure code (workers/overtime.py): what the periodic
scan alerts about, for an employee still at work and for shifts just ended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from workers.overtime import average_week, live_findings
from workers.timesheets import Punch, Rules

MONDAY = datetime(2026, 11, 2, tzinfo=UTC)
CALIFORNIA = Rules("UTC", "california")
FLSA = Rules("UTC", "flsa")


def at(hours: float, day: int = 0) -> datetime:
    return MONDAY + timedelta(days=day, hours=hours)


def kinds(punches: list[Punch], rules: Rules, now: datetime, **extra: bool) -> list[str]:
    return [f.kind for f in live_findings(punches, rules, now, **extra)]


def test_a_day_past_8_hours_in_california_is_overtime_and_the_hour_before_is_approaching() -> None:
    # In at 6:00, lunch from 10:30 to 11:00, still at work.
    clocked_in = [Punch(at(6), "in"), Punch(at(10.5), "break_start"), Punch(at(11), "break_end")]
    assert kinds(clocked_in, CALIFORNIA, at(12)) == []
    [approaching] = live_findings(clocked_in, CALIFORNIA, at(13.75))
    assert (approaching.kind, approaching.key) == ("overtime_approaching", "day/2026-11-02")
    assert approaching.detail["within_minutes"] == 45
    [overtime] = live_findings(clocked_in, CALIFORNIA, at(15))
    assert (overtime.kind, overtime.key, overtime.detail["overtime_minutes"]) == (
        "overtime",
        "day/2026-11-02",
        30,
    )
    # The same day asked again gives the same key: the scan raises it once.
    assert live_findings(clocked_in, CALIFORNIA, at(15.5))[0].key == overtime.key
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
    [finding] = live_findings([Punch(at(6), "in")], Rules("UTC"), at(23))
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
    [finding] = live_findings(late_lunch, CALIFORNIA, at(14.5))
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
    findings = live_findings(late_then_early, Rules("Europe/Berlin"), at(7, 1), eu_wtd=True)
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
