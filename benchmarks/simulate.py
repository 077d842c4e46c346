"""Labelled floor simulation: precision and recall of every check in ``workers/fraud.py``.

Generates a few weeks of a realistic floor, independently of the detector (nothing here
reads ``Thresholds`` to decide what to inject): four sites in three cities and two time
zones (Chicago distribution centre and store, Milwaukee, Indianapolis), a few hundred
employees with a home site, a day/evening/night shift (store: early/late), five working
days a week, a commute, arrival and leaving jitter, lunch breaks, sick days and a week of
vacation now and then. Badge terminals (1-3 a site) serve a queue, one person at a time
(1.5 s plus a gamma-distributed handling time, mean 4 s, between two people in a queue);
a quarter of the employees punch on a phone instead, with a GPS fix whose error matches
its reported accuracy (68 % radius: 5-60 m, sometimes 100-200 m). Terminal clocks drift a
few seconds; terminals lose the network for a while (their punches arrive queued,
``offline``), phones sometimes too; supervisors enter forgotten "out" punches by hand the
next day. Honest irregularities that any floor has are in too, at modest rates: late
arrivals, overtime, leaving early for an appointment, covering a colleague's shift,
floaters who spend an afternoon at another site.

Fraud of every kind is injected at ``--fraud-rate`` (per kind, as a share of the honest
punches), and every injected punch is labelled with the kinds whose pattern it has:

* ``buddy_punch``: a colleague badges his friend in (or out) 0.3-1.5 s after himself on the
  same reader (the friend does not punch himself), or the same badge is used on a second
  reader of the site 0.5-20 s after the first. The second pattern is by construction also
  a ``rapid_repeat`` (same employee and kind again within moments under a new id), so it
  carries both labels.
* ``geofence``: a phone "in" or "out" from home (1-30 km away, accuracy 5-60 m), or with a
  position of accuracy 500-3000 m.
* ``impossible_travel``: the employee's badge clocks in at a site in another city 3-45
  minutes after he clocked in at his home site (a badge lent to someone working there).
* ``clock_skew``: a terminal whose clock is set 10-120 minutes off for 2-8 hours; every
  online punch it takes meanwhile is labelled (offline ones are not: the check does not
  look at them by design).
* ``rapid_repeat``: the same employee and kind punched again 5-60 s later (same reader or
  phone).
* ``unusual_time``: one punch moved 5-12 hours away from the employee's usual time, from
  the fifth week on (four weeks of history).

Every punch carries ``scheduled`` as ``workers/checks.py`` derives it from the schedules
table: a clock-in within an hour of a planned shift's start, a clock-out within an hour of
its end, a break within the shift. The planned
shifts are the employee's own shift on each working day (sick days included, vacation not)
and, on a day he covers a colleague's shift, the covered shift, which the supervisor plans.
Late arrivals, overtime, leaving early and the floaters' afternoons change nothing in the
plan: their punches count as scheduled only where that rule says (a late arrival or an
early leave within the hour does, overtime beyond an hour does not). Injected
``unusual_time`` punches are never scheduled (``in_planned_shift`` tags those that the
rule would have exempted); ``--no-schedules`` plays a tenant that plans no shifts.

The stream is then fed, in the order the server received it, in batches of ``--batch``
(``new``), as ``workers/checks.py`` feeds a worker's batch (its constants are imported,
``--history-days`` and ``--history-max`` are the settings' ``check_history_*``), from what
was received before (the batch's own punches in the database count against the limits,
as in SQL, and are then left out):

* pair history: each employee's latest ``PAIR_MAX`` punches from a day before the batch's
  first to a day after its last, and the punches on the batch's readers within
  ``buddy_gap_s`` either side of each of its punches (not entered by hand);
* usual times: for each of the batch's employees, ``usual_times`` grouped by (employee,
  kind) over his latest ``--history-max`` punches of the last ``--history-days`` days
  before the batch is checked (the latest ``received`` in it), kept for ``USUAL_TTL_S``
  (12 hours; one hour while a kind has under ``unusual_min_history`` punches) of simulated
  time like the worker's cache (``--usual-ttl 0``: afresh for every batch); history rows
  carry none.

Every finding is scored per kind: a true positive if the punch carries that kind's label.
Findings on a punch carrying another kind's label are shown separately ("FP fraud").
Prints, over ``--seeds`` seeds, a table per kind (sums, and precision and recall as min
and mean over seeds), then, worst kind first, what honest situations produced the false
positives and what the misses were.

    .venv/bin/python benchmarks/simulate.py
    .venv/bin/python benchmarks/simulate.py --weeks 10
    .venv/bin/python benchmarks/simulate.py --no-schedules --usual-ttl 0
    .venv/bin/python benchmarks/simulate.py --seeds 2 --weeks 8 --employees 500 --fraud-rate 0.01
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from workers.checks import PAIR_MAX, PAIR_WINDOW, SHIFT_MARGIN, USUAL_TTL_S, USUAL_YOUNG_TTL_S
from workers.fraud import KINDS, Punches, Row, Thresholds, arrays, check, usual_times

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

FRAUD_KINDS = (
    "buddy_punch",
    "geofence",
    "impossible_travel",
    "clock_skew",
    "rapid_repeat",
    "unusual_time",
)
DAY_S = 86_400.0
M_PER_DEG = 111_320.0
# An accuracy (Android, iOS) is the radius of 68 % confidence: sigma of a 2-D normal error.
ACCURACY_TO_SIGMA = 1 / 1.515

# Honest floor, per employee-day unless said otherwise.
SICK = 0.025
VACATION_SHARE = 0.25  # of employees, one week off during the run
LATE = 0.04
OVERTIME = 0.06
EARLY_LEAVE = 0.01
COVER = 0.005
FORGOT_OUT = 0.01
FORGOT_BREAK = 0.02
PHONE_SHARE = 0.25
STORE_PHONE_SHARE = 0.5
BREAK_SHARE = 0.85  # of employees who punch their lunch break
FLOATER_SHARE = 0.05  # of the distribution centre's day shift
OTHER_TERMINAL = 0.15  # a badge punch not on the employee's usual reader
POOR_FIX = 0.06  # of honest phone fixes: accuracy 100-200 m
PHONE_OFFLINE = 0.03
OUTAGE_PER_WEEK = 0.25  # per terminal
START = date(2025, 10, 6)  # a Monday; the run crosses the end of daylight saving time


@dataclass(frozen=True)
class Shift:
    start: int  # local minute of the day
    length: int  # minutes, lunch included
    break_after: int  # nominal minutes from the start to lunch


SHIFTS = {
    "day": Shift(7 * 60, 510, 240),
    "evening": Shift(15 * 60, 510, 240),
    "night": Shift(23 * 60, 510, 240),
    "store-early": Shift(8 * 60, 510, 240),
    "store-late": Shift(12 * 60 + 30, 510, 240),
}
PLANT_SHIFTS = (("day", 0.5), ("evening", 0.3), ("night", 0.2))
STORE_SHIFTS = (("store-early", 0.5), ("store-late", 0.5))
CHICAGO = "America/Chicago"
INDIANA = "America/Indiana/Indianapolis"


@dataclass(frozen=True)
class Site:
    name: str
    city: str
    lat: float
    lon: float
    tz: str
    radius_m: float
    geofence: str
    terminals: int
    shifts: tuple[tuple[str, float], ...]
    share: float  # of the employees


BASE_SITES = (
    Site("chi-dc", "Chicago", 41.8262, -87.6841, CHICAGO, 280, "flag", 3, PLANT_SHIFTS, 0.4),
    Site("chi-store", "Chicago", 41.8839, -87.6278, CHICAGO, 120, "enforce", 1, STORE_SHIFTS, 0.12),
    Site("mke", "Milwaukee", 42.9962, -87.9351, CHICAGO, 200, "flag", 2, PLANT_SHIFTS, 0.24),
    Site("ind", "Indianapolis", 39.7170, -86.2946, INDIANA, 220, "flag", 2, PLANT_SHIFTS, 0.24),
)


def make_sites(copies: int = 1) -> tuple[Site, ...]:
    """The four sites, or ``copies`` of each in its own city (a few km apart), for scale."""
    sites = list(BASE_SITES)
    for k in range(1, copies):
        for s in BASE_SITES:
            lat, lon = offset(s.lat, s.lon, 2_500.0 * k * math.cos(k), 2_500.0 * k * math.sin(k))
            sites.append(replace(s, name=f"{s.name}-{k}", lat=lat, lon=lon))
    total = sum(s.share for s in sites)
    return tuple(replace(s, share=s.share / total) for s in sites)


def offset(lat: float, lon: float, east_m: float, north_m: float) -> tuple[float, float]:
    return (
        lat + north_m / M_PER_DEG,
        lon + east_m / (M_PER_DEG * math.cos(math.radians(lat))),
    )


def km_between(a: Site, b: Site) -> float:
    phi1, phi2 = math.radians(a.lat), math.radians(b.lat)
    h = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(b.lon - a.lon) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(math.sqrt(h))


@dataclass(slots=True)
class Employee:
    name: str
    site: int
    shift: str
    phone: bool
    terminal: int  # usual reader (global index), -1 for phone users
    lead_min: float  # usually arrives this long before the shift starts
    lag_min: float  # usually leaves this long after it ends
    breaks: bool
    break_at: float  # minutes after the shift's start
    workdays: frozenset[int]
    home: tuple[float, float]
    commute_min: float
    floater_day: int  # weekday of an afternoon at another site, -1 if none
    vacation: range


@dataclass(slots=True)
class Follow:
    """A punch made because of another one: ``delay`` seconds after it."""

    emp: int
    kind: str
    delay: float
    site: int
    terminal: int
    immediate: bool  # right after on the same reader, before anyone else in the queue
    labels: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(slots=True)
class Intent:
    """A punch as planned: someone arrives at a reader (or takes out a phone) at ``t``."""

    emp: int
    kind: str
    t: float
    site: int
    terminal: int  # -1 phone, -2 entered by hand
    day: int
    tags: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    pos: tuple[float, float, float] | None = None
    follow: list[Follow] = field(default_factory=list)
    manual_received: float = 0.0
    cancelled: bool = False
    used: bool = False


@dataclass(slots=True)
class Record:
    """A punch as it happened, then as the server got it."""

    emp: int
    kind: str
    true: float
    site: int
    terminal: int
    labels: tuple[str, ...]
    tags: tuple[str, ...]
    pos: tuple[float, float, float] | None
    manual: bool = False
    at: float = 0.0
    received: float = 0.0
    offline: bool = False
    skew: float = 0.0
    scheduled: bool = False


@dataclass
class Stream:
    """The punches in the order the server received them, with labels and what-happened tags."""

    rows: list[Row]
    records: list[Record]
    honest: int
    sites: tuple[Site, ...]


def _gps(rnd: random.Random, lat: float, lon: float, accuracy: float) -> tuple[float, float]:
    sigma = accuracy * ACCURACY_TO_SIGMA
    r = sigma * math.sqrt(-2 * math.log(1 - rnd.random()))
    a = rnd.uniform(0, 2 * math.pi)
    return offset(lat, lon, r * math.cos(a), r * math.sin(a))


def _honest_accuracy(rnd: random.Random) -> float:
    if rnd.random() < POOR_FIX:
        return rnd.uniform(100, 200)
    return min(60.0, max(5.0, rnd.lognormvariate(math.log(15), 0.6)))


def _employees(
    rnd: random.Random, sites: tuple[Site, ...], count: int, first_terminal: list[int], days: int
) -> list[Employee]:
    people = []
    weights = [s.share for s in sites]
    for i in range(count):
        si = rnd.choices(range(len(sites)), weights)[0]
        site = sites[si]
        shift = rnd.choices([n for n, _ in site.shifts], [w for _, w in site.shifts])[0]
        phone = rnd.random() < (STORE_PHONE_SHARE if "store" in shift else PHONE_SHARE)
        terminal = -1 if phone else first_terminal[si] + rnd.randrange(site.terminals)
        pattern = rnd.random()
        workdays = frozenset(
            (0, 1, 2, 3, 4)
            if pattern < 0.8
            else (1, 2, 3, 4, 5)
            if pattern < 0.9
            else (6, 0, 1, 2, 3)
        )
        home_km = min(30.0, 1 + rnd.expovariate(1 / 9))
        a = rnd.uniform(0, 2 * math.pi)
        home = offset(
            site.lat, site.lon, home_km * 1000 * math.cos(a), home_km * 1000 * math.sin(a)
        )
        week = rnd.randrange(max(1, days // 7))
        vacation = range(week * 7, week * 7 + 7) if rnd.random() < VACATION_SHARE else range(0)
        floater = site.name.startswith("chi-dc") and shift == "day" and rnd.random() < FLOATER_SHARE
        people.append(
            Employee(
                name=f"e{i:05d}",
                site=si,
                shift=shift,
                phone=phone,
                terminal=terminal,
                lead_min=rnd.uniform(2, 15),
                lag_min=rnd.uniform(1, 8),
                breaks=floater or rnd.random() < BREAK_SHARE,
                break_at=SHIFTS[shift].break_after + rnd.uniform(-45, 45),
                workdays=workdays,
                home=home,
                commute_min=5 + home_km / 30 * 60,
                floater_day=rnd.choice(sorted(workdays)) if floater else -1,
                vacation=vacation,
            )
        )
    return people


def _plan(
    rnd: random.Random,
    sites: tuple[Site, ...],
    people: list[Employee],
    first_terminal: list[int],
    days: int,
    schedules: dict[int, list[tuple[float, float]]],
) -> list[Intent]:
    """Every honest punch as planned, with its day's irregularities as tags; ``schedules``
    gets each employee's planned shifts (start, end)."""
    zones = [ZoneInfo(s.tz) for s in sites]
    midnights: dict[tuple[int, int], datetime] = {}

    def epoch(si: int, day: int, minute: float) -> float:
        base = midnights.get((si, day))
        if base is None:
            d = START + timedelta(days=day)
            base = midnights[si, day] = datetime(d.year, d.month, d.day, tzinfo=zones[si])
        # Wall-clock arithmetic: a shift is so many hours on the clock, whatever DST does.
        return (base + timedelta(minutes=minute)).timestamp()

    def reader(e: Employee, si: int) -> int:
        if e.phone:
            return -1
        if si == e.site and rnd.random() > OTHER_TERMINAL:
            return e.terminal
        return first_terminal[si] + rnd.randrange(sites[si].terminals)

    same_city = {
        i: [j for j, s in enumerate(sites) if j != i and s.city == sites[i].city]
        for i in range(len(sites))
    }
    other_city = {
        i: [j for j, s in enumerate(sites) if s.city != sites[i].city and s.city == "Milwaukee"]
        for i in range(len(sites))
    }
    intents: list[Intent] = []
    for day in range(days):
        weekday = (START + timedelta(days=day)).weekday()
        for ei, e in enumerate(people):
            if weekday not in e.workdays or day in e.vacation:
                continue
            si = e.site
            shift_name = e.shift
            if rnd.random() < SICK:
                shift = SHIFTS[shift_name]
                schedules[ei].append(
                    (epoch(si, day, shift.start), epoch(si, day, shift.start + shift.length))
                )
                continue
            day_tags: tuple[str, ...] = ()
            if rnd.random() < COVER:
                # Planned by the supervisor: the covered shift is in the schedule.
                shift_name = rnd.choice([n for n, _ in sites[si].shifts if n != e.shift])
                day_tags = ("cover",)
            shift = SHIFTS[shift_name]
            schedules[ei].append(
                (epoch(si, day, shift.start), epoch(si, day, shift.start + shift.length))
            )
            commute = e.commute_min * (rnd.lognormvariate(0, 0.12) - 1)
            in_m = shift.start - e.lead_min + rnd.gauss(0, 2) + commute
            in_tags = day_tags
            if rnd.random() < LATE:
                in_m = shift.start + rnd.uniform(5, 30)
                in_tags += ("late",)
            end = shift.start + shift.length
            out_m = end + e.lag_min + rnd.expovariate(1 / 3)
            out_tags = day_tags
            chance = rnd.random()
            if chance < OVERTIME:
                out_m += rnd.uniform(30, 120)
                out_tags += ("overtime",)
            elif chance < OVERTIME + EARLY_LEAVE:
                out_m = end - rnd.uniform(60, 240)
                out_tags += ("early_leave",)
            intents.append(Intent(ei, "in", epoch(si, day, in_m), si, reader(e, si), day, in_tags))
            out_site = si
            b_m = shift.start + e.break_at + rnd.gauss(0, 8)
            e_m = b_m + 30 + rnd.expovariate(1 / 3)
            # No lunch when leaving before it is over.
            if e.breaks and rnd.random() > FORGOT_BREAK and e_m + 10 < out_m:
                end_site = si
                tags = day_tags
                if weekday == e.floater_day and not day_tags:
                    # An afternoon at another site: usually across town, sometimes Milwaukee.
                    far = bool(other_city[si]) and rnd.random() < 0.3
                    end_site = rnd.choice(other_city[si] if far else same_city[si] or [si])
                    km = km_between(sites[si], sites[end_site])
                    drive = 10 + km / rnd.uniform(70, 85) * 60 if far else 15 + km / 30 * 60
                    e_m = b_m + max(e_m - b_m, drive + rnd.uniform(3, 10))
                    out_m = max(out_m, e_m + 120)
                    tags += ("floater",)
                    out_site = end_site
                intents.append(
                    Intent(ei, "break_start", epoch(si, day, b_m), si, reader(e, si), day, tags)
                )
                intents.append(
                    Intent(
                        ei,
                        "break_end",
                        epoch(si, day, e_m),
                        end_site,
                        reader(e, end_site),
                        day,
                        tags,
                    )
                )
            if rnd.random() < FORGOT_OUT:
                # A supervisor types it in the next day, to the nearest five minutes.
                t = epoch(out_site, day, round(out_m / 5) * 5)
                intents.append(
                    Intent(
                        ei,
                        "out",
                        t,
                        out_site,
                        -2,
                        day,
                        (*out_tags, "manual_fix"),
                        manual_received=t + rnd.uniform(12, 30) * 3600,
                    )
                )
            else:
                intents.append(
                    Intent(
                        ei,
                        "out",
                        epoch(out_site, day, out_m),
                        out_site,
                        reader(e, out_site),
                        day,
                        out_tags,
                    )
                )
    return intents


def _inject(
    rnd: random.Random,
    sites: tuple[Site, ...],
    people: list[Employee],
    first_terminal: list[int],
    intents: list[Intent],
    per_kind: int,
    days: int,
) -> None:
    """Every kind of fraud but clock skew, ``per_kind`` incidents each, on the planned punches."""

    def free(i: Intent) -> bool:
        return not (i.used or i.cancelled or i.terminal == -2 or "floater" in i.tags)

    order = list(range(len(intents)))
    rnd.shuffle(order)
    # Buddy punching, one reader: B badges in (out), then his friend A right after him.
    groups: dict[tuple[int, int, str, str], list[int]] = defaultdict(list)
    for n, i in enumerate(intents):
        if i.terminal >= 0 and i.kind in ("in", "out") and free(i):
            shift = people[i.emp].shift
            groups[i.site, i.day, shift, i.kind].append(n)
    one_device = int(per_kind * 0.6)
    done = 0
    for n in order:
        if done >= one_device:
            break
        b = intents[n]
        if b.terminal < 0 or b.kind not in ("in", "out") or not free(b):
            continue
        shift = people[b.emp].shift
        friends = [
            m
            for m in groups[b.site, b.day, shift, b.kind]
            if intents[m].emp != b.emp and free(intents[m])
        ]
        if not friends:
            continue
        a = intents[rnd.choice(friends)]
        a.cancelled = True  # late (left early), and does not punch himself
        b.used = True
        b.follow.append(
            Follow(
                emp=a.emp,
                kind=b.kind,
                delay=rnd.uniform(0.3, 1.5),
                site=b.site,
                terminal=b.terminal,
                immediate=True,
                labels=("buddy_punch",),
                tags=("one_reader",),
            )
        )
        done += 1
    # Buddy punching, one badge on two readers of a site almost at once.
    done = 0
    for n in order:
        if done >= per_kind - one_device:
            break
        i = intents[n]
        if i.terminal < 0 or i.kind not in ("in", "out") or not free(i):
            continue
        site = sites[i.site]
        if site.terminals < 2:
            continue
        other = first_terminal[i.site] + rnd.randrange(site.terminals)
        if other == i.terminal:
            continue
        i.used = True
        i.follow.append(
            Follow(
                emp=i.emp,
                kind=i.kind,
                delay=rnd.uniform(0.5, 20),
                site=i.site,
                terminal=other,
                immediate=False,
                labels=("buddy_punch", "rapid_repeat"),
                tags=("two_readers",),
            )
        )
        done += 1
    # Impossible travel: the badge used in another city minutes after a punch at home.
    done = 0
    for n in order:
        if done >= per_kind:
            break
        i = intents[n]
        if i.kind != "in" or not free(i) or i.site != people[i.emp].site:
            continue
        far_sites = [j for j, s in enumerate(sites) if s.city != sites[i.site].city]
        if not far_sites:
            continue
        far = rnd.choice(far_sites)
        minutes = rnd.uniform(3, 45)
        km = km_between(sites[i.site], sites[far])
        within = int(minutes // 15 * 15)
        i.used = True
        i.follow.append(
            Follow(
                emp=i.emp,
                kind="in",
                delay=minutes * 60,
                site=far,
                terminal=first_terminal[far] + rnd.randrange(sites[far].terminals),
                immediate=False,
                labels=("impossible_travel",),
                tags=(
                    f"{sites[i.site].city}->{sites[far].city} {km:.0f} km",
                    f"after {within}-{within + 15} min",
                ),
            )
        )
        done += 1
    # Geofence: a phone punch from home, or with a hopeless accuracy.
    done = 0
    for n in order:
        if done >= per_kind:
            break
        i = intents[n]
        if i.terminal != -1 or i.kind not in ("in", "out") or not free(i):
            continue
        if sites[i.site].geofence == "off":
            continue
        home = people[i.emp].home
        if rnd.random() < 0.5:
            accuracy = min(60.0, max(5.0, rnd.lognormvariate(math.log(15), 0.6)))
            i.tags += ("from_home",)
        else:
            accuracy = rnd.uniform(500, 3000)
            i.tags += ("hopeless_fix",)
        i.pos = (*_gps(rnd, home[0], home[1], accuracy), accuracy)
        i.labels += ("geofence",)
        i.used = True
        done += 1
    # Rapid repeat: the same punch again moments later, under a new id.
    done = 0
    for n in order:
        if done >= per_kind:
            break
        i = intents[n]
        if not free(i):
            continue
        i.used = True
        i.follow.append(
            Follow(
                i.emp,
                i.kind,
                rnd.uniform(5, 60),
                i.site,
                i.terminal,
                False,
                ("rapid_repeat",),
                ("phone" if i.terminal == -1 else "reader",),
            )
        )
        done += 1
    # Unusual time: a punch 5-12 hours away from the usual, once there are four weeks behind.
    done = 0
    first_day = min(28, days * 2 // 3)
    for n in order:
        if done >= per_kind:
            break
        i = intents[n]
        if i.day < first_day or not free(i):
            continue
        hours = rnd.uniform(5, 12) * rnd.choice((-1, 1))
        i.t += hours * 3600
        i.labels += ("unusual_time",)
        i.tags += (f"moved {hours:+.0f} h",)
        i.used = True
        done += 1


def _queue(rnd: random.Random, intents: list[Intent], terminals: int) -> list[Record]:
    """Readers serve one person at a time, in order of arrival: a discrete-event run."""
    free_at = [0.0] * terminals
    heap: list[tuple[float, int, Intent]] = []
    for seq, i in enumerate(intents):
        if not i.cancelled:
            heap.append((i.t, seq, i))
    heapq.heapify(heap)
    seq = len(intents)
    records: list[Record] = []

    def handling() -> float:
        return 1.5 + rnd.gammavariate(2.5, 1.0)

    while heap:
        t, _, i = heapq.heappop(heap)
        punch = t
        tags = i.tags
        if i.terminal >= 0:
            punch = max(t, free_at[i.terminal])
            if punch > t:
                tags += ("queued",)
            free_at[i.terminal] = punch + handling()
        record = Record(i.emp, i.kind, punch, i.site, i.terminal, i.labels, tags, i.pos)
        if i.terminal == -2:
            record.manual = True
            record.received = i.manual_received
        records.append(record)
        for f in i.follow:
            if f.immediate:
                p = punch + f.delay
                free_at[f.terminal] = p + handling()
                records.append(Record(f.emp, f.kind, p, f.site, f.terminal, f.labels, f.tags, None))
            else:
                seq += 1
                later = Intent(
                    f.emp, f.kind, punch + f.delay, f.site, f.terminal, i.day, f.tags, f.labels
                )
                heapq.heappush(heap, (later.t, seq, later))
    return records


def generate(
    seed: int,
    employees: int = 300,
    weeks: int = 6,
    fraud_rate: float = 0.005,
    site_copies: int = 1,
    planned_shifts: bool = True,
) -> Stream:
    """One labelled stream of punches, in the order the server received them;
    ``planned_shifts=False``: nobody's shifts are in the schedules table."""
    rnd = random.Random(seed)
    sites = make_sites(site_copies)
    days = weeks * 7
    first_terminal = []
    names: list[str] = []
    for s in sites:
        first_terminal.append(len(names))
        names.extend(f"{s.name}-t{k + 1}" for k in range(s.terminals))
    people = _employees(rnd, sites, employees, first_terminal, days)
    schedules: dict[int, list[tuple[float, float]]] = defaultdict(list)
    intents = _plan(rnd, sites, people, first_terminal, days, schedules)
    honest = len(intents)
    per_kind = round(fraud_rate * honest)
    _inject(rnd, sites, people, first_terminal, intents, per_kind, days)
    records = _queue(rnd, intents, len(names))
    del intents

    zones = [ZoneInfo(s.tz) for s in sites]
    week_drift: dict[tuple[int, int], float] = {}
    period_start = min(r.true for r in records)
    # Network outages of the readers: their punches wait in the reader's queue.
    outages: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for term in range(len(names)):
        for week in range(weeks):
            if rnd.random() < OUTAGE_PER_WEEK:
                start = period_start + (week + rnd.random()) * 7 * DAY_S
                length = min(10 * 3600, max(600, rnd.lognormvariate(math.log(5400), 0.8)))
                outages[term].append((start, start + length))
    for r in records:
        if r.manual:
            r.at = r.true
            continue
        if r.terminal >= 0:
            week = int((r.true - period_start) // (7 * DAY_S))
            drift = week_drift.get((r.terminal, week))
            if drift is None:
                drift = week_drift[r.terminal, week] = max(-8.0, min(8.0, rnd.gauss(0, 2)))
            r.at = r.true + drift
            r.received = r.true + 0.02 + rnd.expovariate(1 / 0.08)
            for start, end in outages.get(r.terminal, ()):
                if start <= r.true < end:
                    r.offline = True
                    r.received = end + rnd.uniform(0.5, 5)
                    r.tags += ("offline",)
        else:
            r.at = r.true + rnd.gauss(0, 0.3)
            r.received = r.true + 0.1 + rnd.expovariate(1 / 0.4)
            if rnd.random() < 0.02:
                r.received += rnd.uniform(5, 60)
                r.tags += ("slow_network",)
            if rnd.random() < PHONE_OFFLINE:
                r.offline = True
                r.received = r.true + rnd.uniform(60, 5400)
                r.tags += ("offline",)
            if r.pos is None:
                site = sites[r.site]
                rr = 0.6 * site.radius_m * math.sqrt(rnd.random())
                a = rnd.uniform(0, 2 * math.pi)
                lat, lon = offset(site.lat, site.lon, rr * math.cos(a), rr * math.sin(a))
                accuracy = _honest_accuracy(rnd)
                r.pos = (*_gps(rnd, lat, lon, accuracy), accuracy)
                if accuracy >= 100:
                    r.tags += ("poor_fix",)
    # Clock skew: a reader's clock set 10-120 minutes off for a few hours.
    by_terminal: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for n, r in enumerate(records):
        if r.terminal >= 0:
            by_terminal[r.terminal].append((r.true, n))
    for entries in by_terminal.values():
        entries.sort()
    skewed = 0
    period_end = max(r.true for r in records)
    for _ in range(100_000):
        if skewed >= per_kind or not by_terminal:
            break
        term = rnd.choice(sorted(by_terminal))
        start = rnd.uniform(period_start, period_end)
        end = start + rnd.uniform(2, 8) * 3600
        shift = rnd.uniform(600, 7200) * rnd.choice((-1, 1))
        entries = by_terminal[term]
        lo = bisect.bisect_left(entries, (start, -1))
        hi = bisect.bisect_left(entries, (end, -1))
        for _, n in entries[lo:hi]:
            r = records[n]
            if r.skew:
                continue
            r.skew = shift
            r.at += shift
            if r.offline:
                r.tags += ("skewed_offline",)
            else:
                r.labels += ("clock_skew",)
                skewed += 1

    if planned_shifts:
        _schedule(records, schedules)

    records.sort(key=lambda r: r.received)
    rows = []
    for r in records:
        site = sites[r.site]
        local = datetime.fromtimestamp(r.at, zones[r.site])
        pos = (None, None, None) if r.pos is None else r.pos
        rows.append(
            Row(
                employee=people[r.emp].name,
                kind=r.kind,
                at=r.at,
                received=r.received,
                site=site.name,
                local_minute=local.hour * 60
                + local.minute
                + (local.second + local.microsecond / 1e6) / 60,
                new=True,
                device=names[r.terminal] if r.terminal >= 0 else None,
                offline=r.offline,
                manual=r.manual,
                lat=pos[0],
                lon=pos[1],
                accuracy=pos[2],
                site_lat=site.lat,
                site_lon=site.lon,
                site_radius=site.radius_m,
                geofence=site.geofence,
                scheduled=r.scheduled,
            )
        )
    return Stream(rows, records, honest, sites)


def _schedule(records: list[Record], schedules: dict[int, list[tuple[float, float]]]) -> None:
    """``scheduled`` as ``workers/checks.py`` has it: a clock-in within ``SHIFT_MARGIN`` of
    a planned shift's start, a clock-out within it of the end, a break within the shift
    (by the punch's ``at``, the device's time). Injected unusual times are not planned:
    tagged if the rule would have exempted them, and left unscheduled."""
    margin = SHIFT_MARGIN.total_seconds()
    planned = {emp: sorted(shifts) for emp, shifts in schedules.items()}
    starts = {emp: [start for start, _ in shifts] for emp, shifts in planned.items()}
    for r in records:
        shifts = planned.get(r.emp, [])
        # The shifts that can hold it: those starting before it (with the margin), latest
        # few first (a cover next to one's own shift makes two).
        k = bisect.bisect_right(starts.get(r.emp, []), r.at + margin)
        inside = False
        for start, end in shifts[max(0, k - 3) : k]:
            if r.kind == "in":
                inside = inside or abs(r.at - start) <= margin
            elif r.kind == "out":
                inside = inside or abs(r.at - end) <= margin
            else:
                inside = inside or start <= r.at <= end
        if "unusual_time" in r.labels:
            if inside:
                r.tags += ("in_planned_shift",)
        else:
            r.scheduled = inside


def take(p: Punches, idx: Ints, new: Bools) -> Punches:
    """Punches ``idx`` of ``p`` (in that order), with ``new`` as given; the usual times and
    ``scheduled`` of the new ones only (a worker has them for its batch alone)."""
    return Punches(
        employee=p.employee[idx],
        device=p.device[idx],
        kind=p.kind[idx],
        at=p.at[idx],
        received=p.received[idx],
        offline=p.offline[idx],
        manual=p.manual[idx],
        lat=p.lat[idx],
        lon=p.lon[idx],
        accuracy=p.accuracy[idx],
        site=p.site[idx],
        site_lat=p.site_lat[idx],
        site_lon=p.site_lon[idx],
        site_radius=p.site_radius[idx],
        geofence=p.geofence[idx],
        local_minute=p.local_minute[idx],
        new=new,
        scheduled=p.scheduled[idx] & new,
        usual_minute=np.where(new, p.usual_minute[idx], np.nan),
        usual_spread=np.where(new, p.usual_spread[idx], np.nan),
        usual_count=np.where(new, p.usual_count[idx], 0),
    )


@dataclass(frozen=True)
class Timeline:
    """The punches' indices in order of ``at``, to find a window of time quickly."""

    by_at: Ints
    at: Floats

    @classmethod
    def of(cls, p: Punches) -> Timeline:
        by_at = np.argsort(p.at, kind="stable").astype(np.int64)
        return cls(by_at, p.at[by_at])

    def between(self, low: float, high: float) -> Ints:
        """Indices of the punches with ``low <= at <= high`` (in order of ``at``)."""
        lo = int(np.searchsorted(self.at, low, side="left"))
        hi = int(np.searchsorted(self.at, high, side="right"))
        return self.by_at[lo:hi]


def _latest(p: Punches, idx: Ints, most: int) -> Ints:
    """Of ``idx`` (in order of ``at``), each employee's latest ``most`` (``ORDER BY at DESC
    LIMIT most`` per employee)."""
    order = idx[np.argsort(p.employee[idx], kind="stable")]
    group = p.employee[order]
    n = len(order)
    last = np.ones(n, dtype=np.bool_)
    last[:-1] = group[1:] != group[:-1]
    # Index of the last element of each one's group, for every element.
    end = np.minimum.accumulate(np.where(last, np.arange(n), n)[::-1])[::-1]
    kept: Ints = order[end - np.arange(n) < most]
    return kept


def _wanted(p: Punches, employees: Ints) -> Bools:
    mask = np.zeros(int(p.employee.max()) + 1, dtype=np.bool_)
    mask[employees] = True
    return mask


def pair_history(
    p: Punches,
    line: Timeline,
    start: int,
    stop: int,
    gap_s: float,
    window_s: float = PAIR_WINDOW.total_seconds(),
    most: int = PAIR_MAX,
) -> Ints:
    """The history ``workers/checks.py`` passes with batch ``start:stop`` (received in
    that order; the database holds ``:stop``): each of the batch's employees' latest
    ``most`` punches from ``window_s`` before its first ``at`` to as long after its last
    (HISTORY_SQL), and the punches within ``gap_s`` either side of its punches on their
    readers (NEIGHBOURS_SQL); the batch's own left out. Sorted indices."""
    at = p.at[start:stop]
    around = line.between(float(at.min()) - window_s, float(at.max()) + window_s)
    around = around[around < stop]
    mine = around[_wanted(p, p.employee[start:stop])[p.employee[around]]]
    mine = _latest(p, mine, most)
    mine = mine[mine < start]
    on_reader = (p.device[start:stop] >= 0) & ~p.manual[start:stop]
    if not on_reader.any():
        return np.sort(mine)
    device, at = p.device[start:stop][on_reader], at[on_reader]
    origin = float(at.min()) - gap_s
    near = line.between(origin, float(at.max()) + gap_s)
    near = near[(near < start) & (p.device[near] >= 0)]
    # One number per (device, at), devices far enough apart that no gap spans two.
    span = float(at.max()) + gap_s - origin + 10 * gap_s + 1
    keys = np.sort(device * span + (at - origin))
    old = p.device[near] * span + (p.at[near] - origin)
    pos = np.searchsorted(keys, old)
    after = keys[np.minimum(pos, len(keys) - 1)] - old
    before = old - keys[np.maximum(pos - 1, 0)]
    close = ((pos < len(keys)) & (after <= gap_s)) | ((pos > 0) & (before <= gap_s))
    return np.union1d(mine, near[close]).astype(np.int64)


def usual_history(
    p: Punches,
    line: Timeline,
    start: int,
    stop: int,
    employees: Ints,
    now: float,
    days: float,
    most: int,
) -> Ints:
    """The punches ``workers/checks.py`` works ``employees``' usual times out from when it
    checks batch ``start:stop`` at ``now``: each one's latest ``most`` of ``at >= now -
    days`` (USUAL_SQL, over the database, ``:stop``), the batch's own left out."""
    # Nothing received by now is a day ahead of it, whatever its clock.
    recent = line.between(now - days * DAY_S, now + DAY_S)
    recent = recent[recent < stop]
    recent = recent[_wanted(p, employees)[p.employee[recent]]]
    kept = _latest(p, recent, most)
    return kept[kept < start]


class UsualCache:
    """Each employee's usual times, worked out with ``usual_times`` when a batch of his is
    checked, kept ``ttl_s`` of simulated time (the checked batch's latest ``received``),
    like ``workers.checks.Checker``'s cache."""

    def __init__(self, employees: int, ttl_s: float, days: float, most: int) -> None:
        self.ttl_s, self.days, self.most = ttl_s, days, most
        self.when = np.full(employees, -np.inf)
        self.minute = np.full(employees * len(KINDS), np.nan)
        self.spread = np.full(employees * len(KINDS), np.nan)
        self.count = np.zeros(employees * len(KINDS), dtype=np.int64)
        self.misses = 0

    def fill(self, p: Punches, line: Timeline, start: int, stop: int) -> None:
        """The usual-time fields of the punches of batch ``start:stop``."""
        now = float(p.received[start:stop].max())
        employees = np.unique(p.employee[start:stop])
        age = now - self.when[employees]
        # Like the worker's cache: kept long once every kind has history enough to judge.
        counts = self.count.reshape(-1, len(KINDS))[employees]
        enough = (counts >= Thresholds().unusual_min_history).all(axis=1)
        ttl = np.where(enough, self.ttl_s, min(self.ttl_s, USUAL_YOUNG_TTL_S))
        stale = employees[~(age <= ttl)] if self.ttl_s > 0 else employees
        if len(stale):
            self.misses += len(stale)
            idx = usual_history(p, line, start, stop, stale, now, self.days, self.most)
            slots = (stale[:, None] * len(KINDS) + np.arange(len(KINDS))).ravel()
            self.minute[slots], self.spread[slots], self.count[slots] = np.nan, np.nan, 0
            if len(idx):
                keys, minute, spread, count = usual_times(
                    p.employee[idx] * len(KINDS) + p.kind[idx], p.local_minute[idx]
                )
                self.minute[keys], self.spread[keys], self.count[keys] = minute, spread, count
            self.when[stale] = now
        key = p.employee[start:stop] * len(KINDS) + p.kind[start:stop]
        p.usual_minute[start:stop] = self.minute[key]
        p.usual_spread[start:stop] = self.spread[key]
        p.usual_count[start:stop] = self.count[key]


@dataclass
class Score:
    labelled: int = 0
    secondary: int = 0
    found: int = 0
    tp: int = 0
    fp_honest: int = 0
    fp_fraud: int = 0

    @property
    def precision(self) -> float:
        return self.tp / self.found if self.found else math.nan

    @property
    def precision_honest(self) -> float:
        """Findings on another kind's fraud left out."""
        return self.tp / (self.tp + self.fp_honest) if self.tp + self.fp_honest else math.nan

    @property
    def recall(self) -> float:
        return self.tp / self.labelled if self.labelled else math.nan


@dataclass
class Outcome:
    scores: dict[str, Score]
    fp_why: dict[str, Counter[str]]
    fn_why: dict[str, Counter[str]]
    punches: int
    seconds: float
    history_rows: float  # per batch, on average
    usual_misses: float  # employees whose usual times were worked out, per batch


def _bucket_gap(gap: float) -> str:
    for limit in (1.0, 1.5, 2.0, 3.0, 60.0):
        if gap < limit:
            return f"< {limit:g} s"
    return ">= 60 s"


def evaluate(
    stream: Stream,
    batch: int,
    t: Thresholds,
    history_days: float = 56.0,
    history_max: int = 240,
    usual_ttl_s: float = USUAL_TTL_S,
) -> Outcome:
    """Feeds the stream to ``check`` batch by batch as a worker does, and scores it."""
    p = arrays(stream.rows)
    records = stream.records
    found: dict[tuple[str, int], dict[str, float | int | str]] = {}
    line = Timeline.of(p)
    cache = UsualCache(int(p.employee.max()) + 1, usual_ttl_s, history_days, history_max)
    history_rows = 0
    started = time.perf_counter()
    for start in range(0, p.size, batch):
        stop = min(p.size, start + batch)
        hist_idx = pair_history(p, line, start, stop, t.buddy_gap_s)
        cache.fill(p, line, start, stop)
        idx = np.concatenate((hist_idx, np.arange(start, stop, dtype=np.int64)))
        new = np.zeros(len(idx), dtype=np.bool_)
        new[len(hist_idx) :] = True
        for f in check(take(p, idx, new), t):
            found.setdefault((f.kind, int(idx[f.index])), f.detail)
        history_rows += len(hist_idx)
    seconds = time.perf_counter() - started
    # The punch before each one on its device, and of its employee, in time order.
    prev_device = np.full(p.size, -1, dtype=np.int64)
    prev_employee = np.full(p.size, -1, dtype=np.int64)
    for key, prev in ((p.device, prev_device), (p.employee, prev_employee)):
        order = np.lexsort((p.at, key))
        same = key[order[1:]] == key[order[:-1]]
        prev[order[1:][same]] = order[:-1][same]

    scores = {k: Score() for k in FRAUD_KINDS}
    fp_why: dict[str, Counter[str]] = {k: Counter() for k in FRAUD_KINDS}
    fn_why: dict[str, Counter[str]] = {k: Counter() for k in FRAUD_KINDS}
    for n, r in enumerate(records):
        for k in r.labels:
            scores[k].labelled += 1
            if k != r.labels[0]:
                scores[k].secondary += 1
            if (k, n) not in found:
                fn_why[k][_missed(k, n, records, p, prev_device, prev_employee)] += 1
    for (k, n), detail in found.items():
        s = scores[k]
        s.found += 1
        r = records[n]
        if k in r.labels:
            s.tp += 1
        elif r.labels:
            s.fp_fraud += 1
            fp_why[k][f"on a {'+'.join(r.labels)} punch ({', '.join(r.tags) or '-'})"] += 1
        else:
            s.fp_honest += 1
            fp_why[k][_why(k, n, detail, records, p, prev_device, prev_employee)] += 1
    batches = math.ceil(p.size / batch)
    return Outcome(
        scores, fp_why, fn_why, p.size, seconds, history_rows / batches, cache.misses / batches
    )


# Honest situations that a punch may be unscheduled for, most telling first.
UNPLANNED = ("overtime", "early_leave", "late", "cover", "floater", "manual_fix")

SWAPPED = "two-reader pair, the copy first in time (reader clocks differ): genuine one flagged"


def _why(
    kind: str,
    n: int,
    detail: dict[str, float | int | str],
    records: list[Record],
    p: Punches,
    prev_device: Ints,
    prev_employee: Ints,
) -> str:
    """What honest situation a false positive came from."""
    r = records[n]
    tags = [t for t in r.tags if t != "queued"]
    if kind == "buddy_punch":
        one = detail.get("reason") == "one_device"
        m = int((prev_device if one else prev_employee)[n])
        other = records[m] if m >= 0 else None
        if other is not None and "two_readers" in other.tags:
            return f"{detail.get('reason')}: {SWAPPED}"
        if other is not None and other.labels:
            return f"{detail.get('reason')}: right after a {'+'.join(other.labels)} punch"
        if other is not None and other.skew != r.skew:
            return f"{detail.get('reason')}: reader clock set off/back, times interleave"
        queue = "in a queue" if "queued" in r.tags else "no queue"
        gap = _bucket_gap(float(detail.get("gap_s", 0)))
        return f"{detail.get('reason')}: honest turn-taking {queue}, gap {gap}"
    if kind == "geofence":
        accuracy = float(detail.get("accuracy_m", math.nan))
        over = float(detail.get("distance_m", 0)) - float(detail.get("radius_m", 0))
        band = "100-200 m" if accuracy >= 100 else "5-60 m"
        within = "within" if over <= accuracy else "beyond"
        return (
            f"{detail.get('reason')}: honest GPS error, accuracy {band}, "
            f"{within} the accuracy of the fence (radius {float(detail.get('radius_m', 0)):.0f} m)"
        )
    m = int(prev_employee[n])
    if kind == "impossible_travel" and m >= 0 and records[m].labels:
        return f"the way back after a {'+'.join(records[m].labels)} punch"
    if m >= 0 and "two_readers" in records[m].tags and kind != "unusual_time":
        return SWAPPED
    if kind == "unusual_time":
        return ", ".join(tags) or "a regular day"
    return ", ".join(tags) or "no special situation"


def _missed(
    kind: str,
    n: int,
    records: list[Record],
    p: Punches,
    prev_device: Ints,
    prev_employee: Ints,
) -> str:
    """Why a labelled punch was not found (as far as the simulation can tell)."""
    r = records[n]
    if r.skew:
        return "its reader's clock set off (clock_skew episode)"
    if kind == "unusual_time":
        have = int(p.usual_count[n])
        why = f"history of the kind: {have // 5 * 5}-{have // 5 * 5 + 4} punches"
        if have < Thresholds().unusual_min_history:
            return why
        tags = ", ".join(r.tags)
        return f"{why}, {r.kind} ({tags}), usual spread {float(p.usual_spread[n]):.0f} min"
    m = int(prev_employee[n])
    after = np.flatnonzero(prev_employee == n)
    q = int(after[0]) if len(after) else -1
    skewed = any(records[x].skew for x in (n, m, q) if x >= 0)
    if skewed:
        return "the other punch's reader clock set off (clock_skew episode)"
    if kind == "impossible_travel":
        return ", ".join(t for t in r.tags if t != "queued")
    if "two_readers" in r.tags:
        if q >= 0 and p.at[q] - p.at[n] < 60 and records[q].kind == r.kind:
            return SWAPPED
        if m >= 0 and records[m].received > r.received:
            return "the genuine punch was queued offline: it arrived after the copy was checked"
        gap = p.at[n] - p.at[m] if m >= 0 else math.nan
        return f"two readers, gap to the first {_bucket_gap(float(gap))}"
    if "one_reader" in r.tags:
        m = int(prev_device[n])
        tenths = math.floor((p.at[n] - p.at[m]) * 10) if m >= 0 else -1
        return (
            f"one reader, gap to the colleague's punch {tenths / 10:.1f}-{tenths / 10 + 0.1:.1f} s"
        )
    return ", ".join(r.tags) or "-"


def _fmt(values: list[float]) -> str:
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return "      -      "
    return f"{min(good):5.3f} {statistics.fmean(good):5.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs, seeds 1..N")
    parser.add_argument("--employees", type=int, default=300)
    parser.add_argument("--weeks", type=int, default=6)
    parser.add_argument("--fraud-rate", type=float, default=0.005, help="per kind, of punches")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--history-days", type=float, default=56.0, help="usual times from this many days"
    )
    parser.add_argument(
        "--history-max", type=int, default=240, help="usual times from at most so many punches"
    )
    parser.add_argument(
        "--usual-ttl",
        type=float,
        default=USUAL_TTL_S,
        help="seconds (simulated) an employee's usual times are kept; 0: afresh every batch",
    )
    parser.add_argument(
        "--no-schedules", action="store_true", help="no planned shifts: nothing is scheduled"
    )
    parser.add_argument("--why", type=int, default=6, help="lines of FP/FN causes per kind")
    args = parser.parse_args()

    thresholds = Thresholds()
    per_seed: list[dict[str, Score]] = []
    fp_why: dict[str, Counter[str]] = {k: Counter() for k in FRAUD_KINDS}
    fn_why: dict[str, Counter[str]] = {k: Counter() for k in FRAUD_KINDS}
    for seed in range(1, args.seeds + 1):
        t0 = time.perf_counter()
        stream = generate(
            seed, args.employees, args.weeks, args.fraud_rate, planned_shifts=not args.no_schedules
        )
        t1 = time.perf_counter()
        out = evaluate(
            stream, args.batch, thresholds, args.history_days, args.history_max, args.usual_ttl
        )
        per_seed.append(out.scores)
        for k in FRAUD_KINDS:
            fp_why[k].update(out.fp_why[k])
            fn_why[k].update(out.fn_why[k])
        print(
            f"seed {seed}: {out.punches} punches ({stream.honest} planned honest), "
            f"generated in {t1 - t0:.1f} s, checked in {out.seconds:.1f} s "
            f"({out.punches / out.seconds:,.0f} new punches/s with history and usual times; "
            f"{out.history_rows:.0f} history rows and {out.usual_misses:.0f} usual-time "
            f"misses a batch)"
        )
        honest = [r for r in stream.records if not r.labels]
        unplanned = Counter(
            next((t for t in UNPLANNED if t in r.tags), "other") for r in honest if not r.scheduled
        )
        unusual = [r for r in stream.records if "unusual_time" in r.labels]
        print(
            f"  unscheduled: {sum(unplanned.values())} of {len(honest)} honest punches "
            f"({', '.join(f'{k} {v}' for k, v in unplanned.most_common()) or '-'}); "
            f"{sum('in_planned_shift' in r.tags for r in unusual)} of {len(unusual)} "
            f"unusual_time punches fall within a planned shift (left unscheduled)"
        )
    print()
    print(
        f"{args.seeds} seeds x {args.employees} employees x {args.weeks} weeks, fraud rate "
        f"{args.fraud_rate:g} per kind, batches of {args.batch}, pair history as "
        f"workers/checks.py fetches it, usual times from {args.history_days:g} days (at most "
        f"{args.history_max}) kept {args.usual_ttl:g} s, "
        f"{'no planned shifts' if args.no_schedules else 'planned shifts'}"
    )
    print()
    header = (
        f"{'kind':<18} {'injected':>8} {'(2nd)':>6} {'found':>6} {'TP':>6} {'FP':>5} "
        f"{'FP fraud':>8}  {'precision min mean':>18}  {'excl. FP fraud':>14}  "
        f"{'recall min mean':>15}"
    )
    print(header)
    print("-" * len(header))
    worst: list[tuple[float, str]] = []
    for k in FRAUD_KINDS:
        s = [scores[k] for scores in per_seed]
        precision = [x.precision for x in s]
        recall = [x.recall for x in s]
        print(
            f"{k:<18} {sum(x.labelled for x in s):>8} {sum(x.secondary for x in s):>6} "
            f"{sum(x.found for x in s):>6} {sum(x.tp for x in s):>6} "
            f"{sum(x.fp_honest for x in s):>5} {sum(x.fp_fraud for x in s):>8}  "
            f"{_fmt(precision):>18}  {_fmt([x.precision_honest for x in s]):>14}  "
            f"{_fmt(recall):>15}"
        )
        lowest = min(0.0 if math.isnan(v) else v for v in precision + recall)
        if fp_why[k] or fn_why[k]:
            worst.append((lowest, k))
    print()
    print("(2nd): labelled because the injected pattern is also this kind's (see docstring);")
    print("FP: on honest punches; FP fraud: on punches injected as another kind.")
    # Worst kinds first: what produced their false positives, and what they missed.
    for lowest, k in sorted(worst):
        print()
        print(f"{k} (lowest precision or recall over seeds {lowest:.3f})")
        for title, why in (("false positives", fp_why[k]), ("misses", fn_why[k])):
            if why:
                print(f"  {title} by situation, {sum(why.values())} in all:")
                for cause, count in why.most_common(args.why):
                    print(f"    {count:6}  {cause}")


if __name__ == "__main__":
    main()
