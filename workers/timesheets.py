"""Timesheets as pure rules: one employee's punches in, one row per local work day out.

No I/O and no clock of its own: the caller passes the punches, the site's time zone and
policy, and ``now`` (for a shift still open).

The steps, each a function below:

1. **Rounding** (``rounding_minutes`` 5, 6 or 15): each punch moves to the nearest multiple
   of the step on the local wall clock, in whole minutes, half up: with 15 that is the
   7-minute rule (8:07 -> 8:00, 8:08 -> 8:15; 29 CFR 785.48(b)).
2. **Pairing**: punches in order of time make work and break intervals. ``in`` and
   ``break_end`` start work, ``break_start`` ends work and starts a break, ``out`` ends
   either. Odd sequences follow presence (``break_end`` while out starts work); a day with
   one is flagged: ``missing_clock_in`` (an ``out`` or ``break_end`` while out) or
   ``missing_clock_out`` (an ``in`` while in, or work or a break open for longer than
   ``MAX_OPEN``, which then counts nothing: the next punch starts afresh).
   A shift still open at ``now`` and younger than ``MAX_OPEN`` counts up to ``now``. Flags
   stored on a punch are shown on its day too.
3. **Work days**: intervals are cut at local midnight, so a night shift counts on the days
   it really fell on, and a day is as long as it really was (23 or 25 hours across DST).
4. **Classification** into regular, overtime (1.5x) and double time (2x) minutes:
   ``none`` (all regular), ``flsa`` (over 40 hours in the workweek) or ``california`` (over 8
   hours a day, over 12 at double time, the 7th consecutive day of the workweek at overtime
   for its first 8 hours and double time beyond, and regular hours over 40 in the week at
   overtime; an hour is counted once, never paid twice over).

Minutes are whole: each day's worked and break seconds are rounded to the minute, and the
classification splits those whole minutes, so regular + overtime + double time is always
the worked minutes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Final, Literal
from zoneinfo import ZoneInfo

import msgspec

Overtime = Literal["flsa", "california", "none"]

WEEKDAYS: Final = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

# A shift open longer than this is a forgotten clock-out, not work: it counts nothing.
MAX_OPEN: Final = timedelta(hours=16)

# Thresholds, in minutes.
WEEK_REGULAR: Final = 40 * 60
DAY_REGULAR: Final = 8 * 60
DAY_DOUBLE: Final = 12 * 60
SEVENTH_DAY_OVERTIME: Final = 8 * 60


class Rules(msgspec.Struct, frozen=True):
    """A site's policy as the timesheet needs it."""

    timezone: str
    overtime: Overtime = "none"
    workweek_start: int = 0
    rounding_minutes: int = 0

    @classmethod
    def from_policy(cls, timezone: str, policy: dict[str, object]) -> Rules:
        overtime = policy.get("overtime") or "none"
        start = policy.get("workweek_start") or "monday"
        rounding = policy.get("rounding_minutes") or 0
        assert overtime in ("flsa", "california", "none") and isinstance(rounding, int)
        return cls(timezone, overtime, WEEKDAYS.index(str(start)), rounding)


class Punch(msgspec.Struct, frozen=True):
    at: datetime
    kind: str
    # Flags stored on the punch (odd sequences, fraud checks): shown on its day.
    flags: tuple[str, ...] = ()


class Day(msgspec.Struct):
    """One employee's local work day: PROTOCOL section 3, ``GET /v1/timesheets``."""

    date: date
    worked_minutes: int = 0
    regular_minutes: int = 0
    overtime_minutes: int = 0
    double_time_minutes: int = 0
    break_minutes: int = 0
    flags: list[str] = msgspec.field(default_factory=list)


Interval = tuple[datetime, datetime]


def round_time(at: datetime, minutes: int, zone: ZoneInfo) -> datetime:
    """``at`` (in UTC) moved to the nearest ``minutes`` step of the local wall clock (whole
    minutes, half up); unchanged when ``minutes`` is 0."""
    at = at.astimezone(UTC)
    if not minutes:
        return at
    local = at.astimezone(zone)
    offset = local.utcoffset()
    assert offset is not None
    wall = local.replace(tzinfo=None)
    whole = wall.replace(second=0, microsecond=0)
    past = (whole.hour * 60 + whole.minute) % minutes
    step = -past if 2 * past < minutes else minutes - past
    return (whole + timedelta(minutes=step) - offset).replace(tzinfo=UTC)


class Shift(msgspec.Struct):
    """From a clock-in (when out) to the clock-out; ``end`` None while open, and then
    ``open_since`` is when its last work or break (counted up to now) began, ``on_break``
    which of the two it is."""

    start: datetime
    end: datetime | None
    work: list[Interval]
    breaks: list[Interval]
    open_since: datetime | None = None
    on_break: bool = False


def shifts(
    punches: Iterable[Punch], now: datetime
) -> tuple[list[Shift], list[tuple[datetime, str]]]:
    """The shifts in punches ordered by time (work or a break still open counts up to
    ``now``), and (when, flag) for the odd places."""
    found: list[Shift] = []
    flags: list[tuple[datetime, str]] = []
    current: Shift | None = None
    state: Literal["in", "break", "out"] = "out"
    since = now
    for punch in punches:
        at, kind = punch.at, punch.kind
        if current is not None and at - since > MAX_OPEN:
            # Open longer than any shift: a forgotten clock-out. The shift ended at its
            # last punch, what was open counts nothing, and this punch starts afresh.
            flags.append((since, "missing_clock_out"))
            current.end = since
            found.append(current)
            current, state = None, "out"
        if current is None:
            if kind in ("out", "break_start"):
                flags.append((at, "missing_clock_in"))
                continue
            if kind == "break_end":
                flags.append((at, "missing_clock_in"))
            current = Shift(at, None, [], [])
            state, since = "in", at
            continue
        if state == "in":
            if kind == "in":
                # A clock-in without a clock-out before it: the work goes on from the first.
                flags.append((at, "missing_clock_out"))
                continue
            if kind == "break_end":
                continue
            current.work.append((since, at))
            state, since = ("break", at) if kind == "break_start" else ("out", at)
        else:
            if kind == "break_start":
                continue
            current.breaks.append((since, at))
            state, since = ("out", at) if kind == "out" else ("in", at)
        if state == "out":
            current.end = at
            found.append(current)
            current = None
    if current is not None:
        (current.work if state == "in" else current.breaks).append((since, max(since, now)))
        current.open_since, current.on_break = since, state == "break"
        found.append(current)
    return found, flags


def pair(
    punches: Iterable[Punch], now: datetime
) -> tuple[list[Interval], list[Interval], list[tuple[datetime, str]]]:
    """Work intervals, break intervals, and (when, flag) for the odd places, from punches in
    order of time. What is still open counts up to ``now``, unless it has been open for
    longer than ``MAX_OPEN``: then it counts nothing, and is flagged."""
    found, flags = shifts(punches, now)
    last = found[-1] if found else None
    if last is not None and last.open_since is not None and now - last.open_since > MAX_OPEN:
        (last.breaks if last.on_break else last.work).pop()
        flags.append((last.open_since, "missing_clock_out"))
    work = [interval for shift in found for interval in shift.work]
    breaks = [interval for shift in found for interval in shift.breaks]
    return work, breaks, flags


END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)


def split_days(intervals: Iterable[Interval], zone: ZoneInfo) -> dict[date, float]:
    """Seconds per local day, each interval (in UTC) cut at local midnights."""
    seconds: dict[date, float] = {}
    # The last day looked up: an instant in it and its end. Intervals come in time order,
    # most within a day already looked up.
    day, known, midnight = date.min, END_OF_TIME, END_OF_TIME
    for start, end in intervals:
        while start < end:
            if not known <= start < midnight:
                day, known = start.astimezone(zone).date(), start
                # In UTC: datetimes sharing a zone subtract as wall clocks, an hour off
                # across DST.
                midnight = datetime.combine(day + timedelta(days=1), time(0), zone).astimezone(UTC)
            cut = min(end, midnight)
            seconds[day] = seconds.get(day, 0.0) + (cut - start).total_seconds()
            start = cut
    return seconds


def week_of(day: date, workweek_start: int) -> date:
    """The first day of the workweek holding ``day``."""
    return day - timedelta(days=(day.weekday() - workweek_start) % 7)


def classify(days: Sequence[Day], rules: Rules) -> None:
    """Split each day's worked minutes into regular, overtime and double time (in place).

    ``days`` must hold every day with work of the workweeks concerned, in order.
    """
    weekly_regular: dict[date, int] = {}
    worked_days: dict[date, set[int]] = {}
    for day in days:
        if day.worked_minutes:
            week = week_of(day.date, rules.workweek_start)
            worked_days.setdefault(week, set()).add((day.date - week).days)
    for day in days:
        worked = day.worked_minutes
        week = week_of(day.date, rules.workweek_start)
        regular, overtime, double = worked, 0, 0
        if rules.overtime == "california":
            seventh = (day.date - week).days == 6 and worked_days.get(week, set()) >= set(range(7))
            if seventh:
                regular = 0
                overtime = min(worked, SEVENTH_DAY_OVERTIME)
                double = worked - overtime
            else:
                regular = min(worked, DAY_REGULAR)
                double = max(0, worked - DAY_DOUBLE)
                overtime = worked - regular - double
        if rules.overtime in ("flsa", "california"):
            # Regular hours past 40 in the week become overtime; overtime already counted
            # by the day does not count again.
            room = max(0, WEEK_REGULAR - weekly_regular.get(week, 0))
            moved = max(0, regular - room)
            regular -= moved
            overtime += moved
            weekly_regular[week] = weekly_regular.get(week, 0) + regular
        day.regular_minutes, day.overtime_minutes, day.double_time_minutes = (
            regular,
            overtime,
            double,
        )


def rounded(punches: Iterable[Punch], rules: Rules) -> list[Punch]:
    """The punches rounded (step 1), in order of time."""
    zone = ZoneInfo(rules.timezone)
    return sorted(
        (Punch(round_time(p.at, rules.rounding_minutes, zone), p.kind, p.flags) for p in punches),
        key=lambda p: p.at,
    )


def timesheet(punches: Sequence[Punch], rules: Rules, now: datetime) -> list[Day]:
    """Every local day with work, a break or a flag, in order, classified."""
    return timesheet_of_rounded(rounded(punches, rules), rules, now)


def timesheet_of_rounded(ordered: Sequence[Punch], rules: Rules, now: datetime) -> list[Day]:
    """``timesheet`` of punches already ``rounded``."""
    zone = ZoneInfo(rules.timezone)
    now = now.astimezone(UTC)
    work, breaks, flags = pair(ordered, now)
    worked = split_days(work, zone)
    rested = split_days(breaks, zone)
    flagged: dict[date, set[str]] = {}
    for at, flag in flags:
        flagged.setdefault(at.astimezone(zone).date(), set()).add(flag)
    for punch in ordered:
        if punch.flags:
            flagged.setdefault(punch.at.astimezone(zone).date(), set()).update(punch.flags)
    days = [
        Day(
            date=day,
            worked_minutes=round(worked.get(day, 0.0) / 60),
            break_minutes=round(rested.get(day, 0.0) / 60),
            flags=sorted(flagged.get(day, ())),
        )
        for day in sorted({*worked, *rested, *flagged})
    ]
    classify(days, rules)
    return days
