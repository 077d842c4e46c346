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
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec

from workers.timesheets import (
    DAY_REGULAR,
    MAX_OPEN,
    WEEK_REGULAR,
    Day,
    Punch,
    Rules,
    Shift,
    rounded,
    shifts,
    timesheet,
    timesheet_of_rounded,
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


class Judgement(msgspec.Struct, frozen=True):
    """What to alert about for one employee now, and until when nothing new can come of
    time passing alone: judged again before ``quiet_until`` with no other punch, the
    findings are these or fewer. ``NEVER`` when only a punch can change them."""

    findings: list[LiveFinding]
    quiet_until: datetime


NEVER: Final = datetime.max.replace(tzinfo=UTC)
# Worked minutes are whole, each rounded: what ``quiet_until`` allows for that.
QUIET_MARGIN: Final = timedelta(minutes=2)


def live_findings(
    punches: Sequence[Punch], rules: Rules, now: datetime, *, eu_wtd: bool = False
) -> Judgement:
    """What to alert about for one employee, now, and until when time alone changes nothing.

    Time adds findings only to an open shift: ``missing_clock_out`` when it passes
    ``MAX_OPEN``, and while at work (not on a break), ``meal_break`` when its work passes a
    break's deadline, ``overtime_approaching`` and ``overtime`` when the day's or the
    week's work nears a threshold (or a new local day begins, a seventh day in
    California). ``quiet_until`` is the earliest of those.
    """
    zone = ZoneInfo(rules.timezone)
    now = now.astimezone(UTC)
    ordered = rounded(punches, rules)
    found: list[LiveFinding] = []
    quiet = NEVER
    worked, _ = shifts(ordered, now)
    recent = [s for s in worked if s.end is None or now - s.end <= LOOKBACK]
    current = worked[-1] if worked and worked[-1].end is None else None
    at_work = current is not None and not current.on_break
    if current is not None:
        if now - current.start > MAX_OPEN:
            found.append(
                LiveFinding(
                    "missing_clock_out",
                    f"shift/{current.start.isoformat()}",
                    current.start,
                    {"open_hours": round((now - current.start).total_seconds() / 3600, 1)},
                )
            )
        else:
            quiet = current.start + MAX_OPEN
        if at_work:
            quiet = min(quiet, _break_deadline(current, rules, now, eu_wtd=eu_wtd))
    today = now.astimezone(zone).date()
    if rules.overtime != "none":
        days = {day.date: day for day in timesheet_of_rounded(ordered, rules, now)}
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
        else:
            crossing = _crossing(ordered, rules, now, today, current)
            if crossing is not None:
                found.append(
                    LiveFinding(
                        "overtime_approaching",
                        f"day/{today.isoformat()}",
                        now,
                        {"date": today.isoformat(), "within_minutes": crossing},
                    )
                )
            if at_work:
                quiet = min(quiet, _overtime_nears(days, rules, now, today))
        if at_work:
            # A new day: another day's overtime, or California's seventh day.
            midnight = datetime.combine(today + timedelta(days=1), time(0), zone)
            quiet = min(quiet, midnight.astimezone(UTC))
    breaks = [
        (limit, length, rule)
        for limit, length, rule, applies in (
            (MEAL_AFTER, MEAL_BREAK, "california", rules.overtime == "california"),
            (EU_BREAK_AFTER, EU_BREAK, "eu_wtd", eu_wtd),
        )
        if applies
    ]
    for shift in recent if breaks else ():
        for limit, length, rule in breaks:
            due = _missed_break(shift, limit, length, now)
            if due is not None:
                key = f"shift/{shift.start.isoformat()}"
                found.append(LiveFinding("meal_break", key, due, {"rule": rule}))
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
    return Judgement(found, max(quiet, now))


def _break_deadline(shift: Shift, rules: Rules, now: datetime, *, eu_wtd: bool) -> datetime:
    """When the open shift's work passes a break's deadline (``_missed_break``: a minute past
    it), if it has not yet; ``NEVER`` if no rule applies or it has."""
    done = sum((end - start for start, end in shift.work), timedelta(0))
    rules_due = ((MEAL_AFTER, rules.overtime == "california"), (EU_BREAK_AFTER, eu_wtd))
    deadlines = [
        now + after + timedelta(minutes=1) - done
        for after, applies in rules_due
        if applies and done < after + timedelta(minutes=1)
    ]
    return min(deadlines, default=NEVER)


def _overtime_nears(days: dict[date, Day], rules: Rules, now: datetime, today: date) -> datetime:
    """The earliest time today's work could be within the hour of overtime, at work from
    now on: its room under the week's 40 hours (and in California the day's 8), less the
    hour ``overtime_approaching`` looks ahead."""
    week = week_of(today, rules.workweek_start)
    room = WEEK_REGULAR - sum(d.worked_minutes for d in days.values() if week <= d.date <= today)
    if rules.overtime == "california":
        worked = {
            (d.date - week).days for d in days.values() if week <= d.date and d.worked_minutes
        }
        if (today - week).days == 6 and worked >= set(range(6)):
            # The seventh day after six with work: its first worked minute is overtime.
            return now
        room = min(room, DAY_REGULAR - (days[today].worked_minutes if today in days else 0))
    return now + timedelta(minutes=room) - APPROACH - timedelta(minutes=1) - QUIET_MARGIN


def _crossing(
    punches: list[Punch], rules: Rules, now: datetime, today: date, current: Shift | None
) -> int | None:
    """Minutes until today's work first includes overtime if the open shift, at work up
    to now, goes on; None if not within the hour, or not at work.

    Today's overtime only grows with today's work, so the steps are searched by halves.
    Work open for longer than ``MAX_OPEN`` counts nothing (``pair``), so no step past
    that can be overtime when now is not.
    """

    def over(step: timedelta) -> bool:
        # A minute past the step: overtime starts with the first minute over the threshold.
        then = now + step + timedelta(minutes=1)
        days = timesheet_of_rounded(punches, rules, then)
        day = next((d for d in days if d.date == today), None)
        return day is not None and day.overtime_minutes + day.double_time_minutes > 0

    if (
        current is None
        or now - current.start > MAX_OPEN
        or not current.work
        or current.work[-1][1] != now
        or current.open_since is None
    ):
        return None
    open_since = current.open_since
    steps = [
        APPROACH_STEP * n
        for n in range(1, APPROACH // APPROACH_STEP + 1)
        if now + APPROACH_STEP * n + timedelta(minutes=1) - open_since <= MAX_OPEN
    ]
    low, high = 0, len(steps)
    if not steps or not over(steps[-1]):
        return None
    high -= 1
    while low < high:
        middle = (low + high) // 2
        if over(steps[middle]):
            high = middle
        else:
            low = middle + 1
    return int(steps[low].total_seconds() // 60)


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
