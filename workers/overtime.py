"""Live overtime and break alerts as pure code: one employee's recent punches, their rules
and the time now in; what to alert about out.

These depend on time passing as much as on punches (an employee still clocked in crosses
eight hours without punching), so a periodic scan (``workers/scan.py``) asks, every minute,
for each employee who worked lately. Each finding has a ``key`` naming the occasion (the
day, or the shift), so that asking again finds the same finding, and the scan raises each
alert once.

* ``overtime``: today's work (local day) includes overtime or double time under the
  site's policy (``flsa``, ``california``), counting an open shift up to now.
* ``overtime_approaching``: clocked in, no overtime yet today, and there will be within
  the hour if the shift goes on.
* ``missing_clock_out``: a shift open for longer than any shift (``MAX_OPEN``).
* ``meal_break`` (``california``): a shift with more than five hours of work and no break of
  30 minutes or more starting by the end of the fifth hour. With ``eu_wtd``: more than six
  hours of work and no break of 15 minutes or more by then (``detail.rule`` says which).
* ``rest_period`` (``eu_wtd``): a shift that started less than 11 hours after the previous
  one ended.
* ``overtime`` with ``detail.rule`` ``eu_wtd_48h`` (``eu_wtd``): the average working week
  over the last 17 complete weeks is over 48 hours (``average_week``); once per week.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec

from workers.timesheets import (
    MAX_OPEN,
    Punch,
    Rules,
    Shift,
    round_time,
    shifts,
    timesheet,
    week_of,
)

# How far ahead ``overtime_approaching`` looks, and in what steps.
APPROACH: Final = timedelta(hours=1)
APPROACH_STEP: Final = timedelta(minutes=5)
# California: a meal break of 30 minutes, starting by the end of the fifth hour of work.
MEAL_AFTER: Final = timedelta(hours=5)
MEAL_BREAK: Final = timedelta(minutes=30)
# EU working time directive: a break after six hours (15 minutes, as most member states
# require at least), and 11 hours of rest between shifts.
EU_BREAK_AFTER: Final = timedelta(hours=6)
EU_BREAK: Final = timedelta(minutes=15)
EU_REST: Final = timedelta(hours=11)
# EU working time directive: at most 48 hours a week on average over 17 weeks.
EU_WEEK_LIMIT_MINUTES: Final = 48 * 60
EU_REFERENCE_WEEKS: Final = 17
# Shifts that ended longer ago than this are not looked at again.
LOOKBACK: Final = timedelta(hours=24)


class LiveFinding(msgspec.Struct, frozen=True):
    kind: str
    key: str
    at: datetime
    detail: dict[str, Any]


def _worked_by(shift: Shift, limit: timedelta) -> datetime | None:
    """When the shift's work reached ``limit``; None if it has not."""
    done = timedelta(0)
    for start, end in shift.work:
        if done + (end - start) >= limit:
            return start + (limit - done)
        done += end - start
    return None


def _missed_break(
    shift: Shift, after: timedelta, length: timedelta, now: datetime
) -> datetime | None:
    """When the shift's work passed ``after`` (strictly: a minute more) with no break of
    ``length`` begun by then; a break still going on is given the benefit of the doubt."""
    due = _worked_by(shift, after)
    if due is None or _worked_by(shift, after + timedelta(minutes=1)) is None:
        return None
    for start, end in shift.breaks:
        ongoing = shift.end is None and end == now
        if start <= due and (end - start >= length or ongoing):
            return None
    return due


def live_findings(
    punches: Sequence[Punch], rules: Rules, now: datetime, *, eu_wtd: bool = False
) -> list[LiveFinding]:
    """What to alert about for one employee, now."""
    zone = ZoneInfo(rules.timezone)
    now = now.astimezone(UTC)
    ordered = sorted(
        (Punch(round_time(p.at, rules.rounding_minutes, zone), p.kind) for p in punches),
        key=lambda p: p.at,
    )
    found: list[LiveFinding] = []
    worked, _ = shifts(ordered, now)
    recent = [s for s in worked if s.end is None or now - s.end <= LOOKBACK]
    current = worked[-1] if worked and worked[-1].end is None else None
    if current is not None and now - current.start > MAX_OPEN:
        found.append(
            LiveFinding(
                "missing_clock_out",
                f"shift/{current.start.isoformat()}",
                current.start,
                {"open_hours": round((now - current.start).total_seconds() / 3600, 1)},
            )
        )
        current = None
    today = now.astimezone(zone).date()
    days = {day.date: day for day in timesheet(ordered, rules, now)}
    if rules.overtime != "none":
        day = days.get(today)
        if day is not None and day.overtime_minutes + day.double_time_minutes > 0:
            found.append(
                LiveFinding(
                    "overtime",
                    f"day/{today.isoformat()}",
                    now,
                    {
                        "date": today.isoformat(),
                        "worked_minutes": day.worked_minutes,
                        "overtime_minutes": day.overtime_minutes,
                        "double_time_minutes": day.double_time_minutes,
                    },
                )
            )
        elif current is not None and current.work and current.work[-1][1] == now:
            crossing = _crossing(ordered, rules, now, today)
            if crossing is not None:
                found.append(
                    LiveFinding(
                        "overtime_approaching",
                        f"day/{today.isoformat()}",
                        now,
                        {"date": today.isoformat(), "within_minutes": crossing},
                    )
                )
    for shift in recent:
        key = f"shift/{shift.start.isoformat()}"
        if rules.overtime == "california":
            due = _missed_break(shift, MEAL_AFTER, MEAL_BREAK, now)
            if due is not None:
                found.append(LiveFinding("meal_break", key, due, {"rule": "california"}))
        if eu_wtd:
            due = _missed_break(shift, EU_BREAK_AFTER, EU_BREAK, now)
            if due is not None:
                found.append(LiveFinding("meal_break", key, due, {"rule": "eu_wtd"}))
    if eu_wtd:
        for before, after in itertools.pairwise(worked):
            if before.end is None or (after.end is not None and now - after.end > LOOKBACK):
                continue
            rest = after.start - before.end
            if rest < EU_REST:
                found.append(
                    LiveFinding(
                        "rest_period",
                        f"shift/{after.start.isoformat()}",
                        after.start,
                        {"rest_hours": round(rest.total_seconds() / 3600, 2)},
                    )
                )
    return found


def _crossing(punches: list[Punch], rules: Rules, now: datetime, today: Any) -> int | None:
    """Minutes until today's work first includes overtime if the open shift goes on; None
    if not within the hour."""
    step = APPROACH_STEP
    while step <= APPROACH:
        # A minute past the step: overtime starts with the first minute over the threshold.
        then = now + step + timedelta(minutes=1)
        day = next((d for d in timesheet(punches, rules, then) if d.date == today), None)
        if day is not None and day.overtime_minutes + day.double_time_minutes > 0:
            return int(step.total_seconds() // 60)
        step += APPROACH_STEP
    return None


def average_week(punches: Sequence[Punch], rules: Rules, now: datetime) -> LiveFinding | None:
    """An ``overtime`` finding if the employee's average week over the last
    ``EU_REFERENCE_WEEKS`` complete workweeks is over 48 hours; None otherwise."""
    zone = ZoneInfo(rules.timezone)
    this_week = week_of(now.astimezone(zone).date(), rules.workweek_start)
    first = this_week - timedelta(weeks=EU_REFERENCE_WEEKS)
    minutes = sum(
        day.worked_minutes
        for day in timesheet(punches, rules, now)
        if first <= day.date < this_week
    )
    average = minutes / EU_REFERENCE_WEEKS
    if average <= EU_WEEK_LIMIT_MINUTES:
        return None
    return LiveFinding(
        "overtime",
        f"week/{this_week.isoformat()}",
        now,
        {
            "rule": "eu_wtd_48h",
            "average_week_hours": round(average / 60, 1),
            "weeks": EU_REFERENCE_WEEKS,
        },
    )
