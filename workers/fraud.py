"""Streaming fraud checks as pure, vectorised code: punches in (as arrays), findings out.

The caller (``workers/checks.py``) hands over one batch of committed punches together with
the recent history of the same employees and devices, all as ``Punches`` arrays, with
``new`` marking the batch. Every check looks at the whole, and reports what involves a
punch of the batch: a punch's own finding on it, a suspicious pair's on the one of the two
received later, even if that one is history (whichever of the two is checked first, and
whenever, the pair is reported on the same punch). A batch checked twice (a worker died
before acknowledging it) finds the same things again; history alone is never reported.

The checks, each a function below (thresholds in ``Thresholds``, settings in hub/config.py):

* ``buddy_punch``: one device punching different employees closer together than people can
  take turns at a reader, or one employee punched on two different devices at once.
* ``geofence``: a punch with a position (a phone) outside its site's radius, or with an
  accuracy too poor to tell; only at sites whose policy does not turn geofences off.
* ``impossible_travel``: one employee's consecutive punches further apart than any plausible
  speed allows (positions: the punch's own, else its site's).
* ``clock_skew``: an online punch (not queued offline, not entered by hand) whose device
  time is far from the server's.
* ``rapid_repeat``: the same employee and kind again within moments, under another id.
* ``unusual_time``: a punch far from the employee's own usual time of day for that kind, by
  robust statistics (circular median and median absolute deviation, from ``usual_times``
  over weeks of history, which the caller keeps); only once there is enough history, and
  never within a planned shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

KINDS: Final = ("in", "out", "break_start", "break_end")
GEOFENCE_MODES: Final = ("off", "flag", "enforce")
EARTH_RADIUS_M: Final = 6_371_000.0
DAY_MINUTES: Final = 1440.0
# MAD -> standard deviation for normally distributed data.
MAD_SCALE: Final = 1.4826


class Thresholds(msgspec.Struct, frozen=True):
    """Every threshold of the checks, with its default."""

    # One device, two different employees closer together than this: nobody takes turns
    # at a reader that fast (one steps away, the next presents a badge). Transit gates,
    # built for it, pass at most 30-40 people a minute at peak, 1.5 s or more each.
    buddy_gap_s: float = 1.5
    # One employee on two different devices within this.
    two_devices_s: float = 60.0
    # A position with an accuracy (radius, metres) worse than this cannot tell in from out.
    geofence_accuracy_m: float = 250.0
    # Faster than this between two punches of one employee, over more than the distance
    # below, is impossible travel: by road up to ``travel_flight_km``, by air beyond.
    travel_speed_kmh: float = 130.0
    travel_min_km: float = 20.0
    travel_flight_km: float = 800.0
    travel_flight_kmh: float = 900.0
    # An online punch whose device time is off the server's by more than this.
    clock_skew_s: float = 300.0
    # The same employee and kind again within this, under another id.
    repeat_s: float = 120.0
    # Time of day: history of at least this many punches of the kind, and a punch further
    # from the usual time than both of these.
    unusual_min_history: int = 15
    unusual_mads: float = 6.0
    unusual_min_minutes: float = 240.0


@dataclass
class Punches:
    """Punches as arrays, one element per punch. Codes are small integers: -1 means none.

    ``local_minute`` is the minute of the local day (in the site's time zone) of ``at``;
    ``site_*`` and ``geofence`` describe the punch's site. History needs only what the
    pair checks compare with: each employee's and each device's punches just before (and
    after) the new ones; the time-of-day statistics come with the new punches.
    """

    employee: Ints
    device: Ints
    kind: Ints
    at: Floats
    received: Floats
    offline: Bools
    manual: Bools
    lat: Floats
    lon: Floats
    accuracy: Floats
    site: Ints
    site_lat: Floats
    site_lon: Floats
    site_radius: Floats
    geofence: Ints
    local_minute: Floats
    new: Bools
    # Within a planned shift (an hour either side): never an unusual time.
    scheduled: Bools
    # The employee's usual time of day for the punch's kind (``usual_times``), its spread
    # and how many punches it comes from; NaN and 0 where not known.
    usual_minute: Floats
    usual_spread: Floats
    usual_count: Ints
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.at)


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One punch with what the checks need to know of it and its site, as Python values."""

    employee: str
    kind: str
    at: float
    received: float
    site: str
    local_minute: float
    new: bool
    device: str | None = None
    offline: bool = False
    manual: bool = False
    lat: float | None = None
    lon: float | None = None
    accuracy: float | None = None
    site_lat: float | None = None
    site_lon: float | None = None
    site_radius: float | None = None
    geofence: str = "flag"
    scheduled: bool = False
    usual_minute: float | None = None
    usual_spread: float | None = None
    usual_count: int = 0


def arrays(rows: list[Row]) -> Punches:
    """``rows`` as arrays, in the same order (names become codes)."""
    codes: dict[str, int] = {}

    def code(name: str | None) -> int:
        return -1 if name is None else codes.setdefault(name, len(codes))

    def floats(values: list[float | None]) -> Floats:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    return Punches(
        employee=np.array([code("e:" + r.employee) for r in rows], dtype=np.int64),
        device=np.array(
            [code(None if r.device is None else "d:" + r.device) for r in rows], dtype=np.int64
        ),
        kind=np.array([KINDS.index(r.kind) for r in rows], dtype=np.int64),
        at=np.array([r.at for r in rows], dtype=np.float64),
        received=np.array([r.received for r in rows], dtype=np.float64),
        offline=np.array([r.offline for r in rows], dtype=np.bool_),
        manual=np.array([r.manual for r in rows], dtype=np.bool_),
        lat=floats([r.lat for r in rows]),
        lon=floats([r.lon for r in rows]),
        accuracy=floats([r.accuracy for r in rows]),
        site=np.array([code("s:" + r.site) for r in rows], dtype=np.int64),
        site_lat=floats([r.site_lat for r in rows]),
        site_lon=floats([r.site_lon for r in rows]),
        site_radius=floats([r.site_radius for r in rows]),
        geofence=np.array([GEOFENCE_MODES.index(r.geofence) for r in rows], dtype=np.int64),
        local_minute=np.array([r.local_minute for r in rows], dtype=np.float64),
        new=np.array([r.new for r in rows], dtype=np.bool_),
        scheduled=np.array([r.scheduled for r in rows], dtype=np.bool_),
        usual_minute=floats([r.usual_minute for r in rows]),
        usual_spread=floats([r.usual_spread for r in rows]),
        usual_count=np.array([r.usual_count for r in rows], dtype=np.int64),
    )


class Finding(msgspec.Struct, frozen=True):
    """A check found punch ``index`` (of the arrays) suspicious; for a pair, ``other`` is
    the punch it was found with (-1 for a punch found alone)."""

    kind: str
    index: int
    detail: dict[str, float | int | str]
    other: int = -1


def check(punches: Punches, thresholds: Thresholds) -> list[Finding]:
    """Every finding about the new punches, in order of check, then of index."""
    return [
        *buddy_punch(punches, thresholds),
        *geofence(punches, thresholds),
        *impossible_travel(punches, thresholds),
        *clock_skew(punches, thresholds),
        *rapid_repeat(punches, thresholds),
        *unusual_time(punches, thresholds),
    ]


def _consecutive(first: Ints, at: Floats) -> tuple[Ints, Ints, Bools]:
    """Indices of each punch and of the one before it in (``first``, at) order, and whether
    they share ``first``."""
    order = np.lexsort((at, first))
    before, after = order[:-1], order[1:]
    same = first[before] == first[after]
    return before, after, same


def _reported(p: Punches, before: Ints, after: Ints) -> tuple[Ints, Ints]:
    """For pairs found suspicious: the punch to report, the one received later (the later
    one, or an earlier one arriving from an offline queue), new or not, and the other;
    pairs of history only are dropped.

    Whichever of the two is checked first, and whatever the other's state then, the pair
    is reported on the same punch.
    """
    later = p.received[after] >= p.received[before]
    chosen = np.where(later, after, before)
    other = np.where(later, before, after)
    keep = p.new[chosen] | p.new[other]
    return chosen[keep], other[keep]


def _by_receipt(
    p: Punches, first: Ints, second: Ints, where: Bools | None = None
) -> tuple[Ints, Ints]:
    """The pairs reordered (``where`` given, only there) so that the punch received later
    is second: with two devices' clocks, `at` cannot tell which came after."""
    swap = p.received[first] > p.received[second]
    if where is not None:
        swap &= where
    return np.where(swap, second, first), np.where(swap, first, second)


def _gap_findings(p: Punches, kind: str, chosen: Ints, other: Ints, **detail: str) -> list[Finding]:
    """A finding per pair, on ``chosen``, with the gap between the two punches."""
    return [
        Finding(kind, int(c), {**detail, "gap_s": round(float(abs(p.at[c] - p.at[o])), 3)}, int(o))
        for c, o in zip(chosen, other, strict=True)
    ]


def buddy_punch(p: Punches, t: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    if p.size < 2:
        return found
    # One device, different employees in quick succession (one clock: `at` orders them).
    before, after, same = _consecutive(p.device, p.at)
    gap = p.at[after] - p.at[before]
    hit = (
        same
        & (p.device[after] >= 0)
        & (p.employee[after] != p.employee[before])
        & (gap < t.buddy_gap_s)
        & (p.new[after] | p.new[before])
    )
    chosen, other = _reported(p, before[hit], after[hit])
    found += _gap_findings(p, "buddy_punch", chosen, other, reason="one_device")
    # One employee, two devices at once. Two clocks: the copy is the one received later.
    before, after, same = _consecutive(p.employee, p.at)
    gap = p.at[after] - p.at[before]
    hit = (
        same
        & (p.device[after] >= 0)
        & (p.device[before] >= 0)
        & (p.device[after] != p.device[before])
        & (gap < t.two_devices_s)
        & (p.new[after] | p.new[before])
    )
    first, second = _by_receipt(p, before[hit], after[hit])
    chosen, other = _reported(p, first, second)
    return found + _gap_findings(p, "buddy_punch", chosen, other, reason="two_devices")


def distance_m(lat1: Floats, lon1: Floats, lat2: Floats, lon2: Floats) -> Floats:
    """Great-circle distance (haversine), in metres; NaN where a position is missing."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    dphi, dlambda = phi2 - phi1, np.radians(lon2 - lon1)
    a = np.sin(dphi / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(dlambda / 2) ** 2
    result: Floats = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return result


def geofence_distance(p: Punches) -> Floats:
    """How far each punch's position is from its site's centre (NaN if either is missing)."""
    return distance_m(p.lat, p.lon, p.site_lat, p.site_lon)


def geofence(p: Punches, t: Thresholds) -> list[Finding]:
    watched = p.new & (p.geofence > 0) & ~np.isnan(p.lat) & ~np.isnan(p.site_radius)
    distance = geofence_distance(p)
    accuracy = np.nan_to_num(p.accuracy, nan=0.0)
    poor = watched & (accuracy > t.geofence_accuracy_m)
    # Outside only when even twice the accuracy (a phone's accuracy is the radius holding
    # the true position about two times in three; twice it, about 19 times in 20) is.
    outside = watched & ~poor & (distance - 2 * accuracy > p.site_radius)
    found = []
    for i in np.flatnonzero(poor | outside):
        found.append(
            Finding(
                "geofence",
                int(i),
                {
                    "reason": "poor_accuracy" if poor[i] else "outside",
                    "distance_m": round(float(distance[i]), 1),
                    "radius_m": float(p.site_radius[i]),
                    "accuracy_m": float(p.accuracy[i]),
                },
            )
        )
    return found


def impossible_travel(p: Punches, t: Thresholds) -> list[Finding]:
    if p.size < 2:
        return []
    # Where each punch was: its own position if it has one, else its site's centre.
    own = ~np.isnan(p.lat)
    lat = np.where(own, p.lat, p.site_lat)
    lon = np.where(own, p.lon, p.site_lon)
    before, after, same = _consecutive(p.employee, p.at)
    metres = distance_m(lat[before], lon[before], lat[after], lon[after])
    hours = np.maximum(p.at[after] - p.at[before], 1.0) / 3600
    speed = metres / 1000 / hours
    limit = np.where(metres > t.travel_flight_km * 1000, t.travel_flight_kmh, t.travel_speed_kmh)
    with np.errstate(invalid="ignore"):
        impossible = (
            same
            & ~p.manual[after]
            & ~p.manual[before]
            & (metres > t.travel_min_km * 1000)
            & (speed > limit)
        )
    # There and back again (home, far away, home): the trip away is the one to report,
    # not the punch back where the employee was before it.
    back = np.zeros_like(impossible)
    back[1:] = impossible[1:] & impossible[:-1] & same[:-1]
    outer = np.flatnonzero(back)
    if len(outer):
        home = distance_m(
            lat[before[outer - 1]], lon[before[outer - 1]], lat[after[outer]], lon[after[outer]]
        )
        with np.errstate(invalid="ignore"):
            back[outer] = home < t.travel_min_km * 1000
        # A leg that is itself a way back does not make the next one a way back: A, B, A,
        # B is two trips away (few such legs: a loop costs nothing).
        for k in outer:
            if back[k] and back[k - 1]:
                back[k] = False
    chosen, other = _reported(p, before[impossible & ~back], after[impossible & ~back])
    found = []
    for c, o in zip(chosen, other, strict=True):
        km = float(distance_m(lat[[o]], lon[[o]], lat[[c]], lon[[c]])[0]) / 1000
        taken_h = max(abs(float(p.at[c] - p.at[o])), 1.0) / 3600
        found.append(
            Finding(
                "impossible_travel",
                int(c),
                {"distance_km": round(km, 1), "speed_kmh": round(km / taken_h, 1)},
                int(o),
            )
        )
    return found


def clock_skew(p: Punches, t: Thresholds) -> list[Finding]:
    offset = p.received - p.at
    hit = p.new & ~p.offline & ~p.manual & (np.abs(offset) > t.clock_skew_s)
    return [
        Finding("clock_skew", int(i), {"offset_s": round(float(offset[i]), 3)})
        for i in np.flatnonzero(hit)
    ]


def rapid_repeat(p: Punches, t: Thresholds) -> list[Finding]:
    if p.size < 2:
        return []
    # Same employee and kind: one key for both.
    pair = p.employee * len(KINDS) + p.kind
    before, after, same = _consecutive(pair, p.at)
    gap = p.at[after] - p.at[before]
    hit = same & ~p.manual[after] & (gap < t.repeat_s) & (p.new[after] | p.new[before])
    first, second = before[hit], after[hit]
    # On two devices, two clocks: the repeat is the punch received later.
    swap = (p.device[first] != p.device[second]) & (p.received[first] > p.received[second])
    first, second = np.where(swap, second, first), np.where(swap, first, second)
    chosen, other = _reported(p, first, second)
    return [
        Finding("rapid_repeat", int(c), {"gap_s": round(float(abs(p.at[c] - p.at[o])), 3)}, int(o))
        for c, o in zip(chosen, other, strict=True)
    ]


def _wrapped(minutes: Floats) -> Floats:
    """Minutes of the day as a signed difference, in [-720, 720)."""
    result: Floats = (minutes + DAY_MINUTES / 2) % DAY_MINUTES - DAY_MINUTES / 2
    return result


def _group_medians(groups: Ints, values: Floats, count: int) -> Floats:
    """The median of ``values`` in each group 0..count-1 (NaN for an empty group)."""
    order = np.lexsort((values, groups))
    sizes = np.bincount(groups, minlength=count)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    sorted_values = values[order]
    medians = np.full(count, np.nan)
    has = sizes > 0
    low = starts[has] + (sizes[has] - 1) // 2
    high = starts[has] + sizes[has] // 2
    medians[has] = (sorted_values[low] + sorted_values[high]) / 2
    return medians


def usual_times(group: Ints, minutes: Floats) -> tuple[Ints, Floats, Floats, Ints]:
    """Each group's usual minute of the day, its spread and its size, from the history
    minutes of each (``group`` holds any integer key, such as employee and kind).

    The usual minute is the circular median: the median of the differences from the
    circular mean, so that a night shift around midnight has a usual time near midnight.
    The spread is the median absolute deviation from it, in minutes.
    """
    keys, index = np.unique(group, return_inverse=True)
    index = index.astype(np.int64)
    count = len(keys)
    angle = minutes / DAY_MINUTES * 2 * np.pi
    sizes = np.bincount(index, minlength=count)
    sin = np.bincount(index, weights=np.sin(angle), minlength=count)
    cos = np.bincount(index, weights=np.cos(angle), minlength=count)
    mean = (np.arctan2(sin, cos) % (2 * np.pi)) / (2 * np.pi) * DAY_MINUTES
    offsets = _wrapped(minutes - mean[index])
    centre = (mean + _group_medians(index, offsets, count)) % DAY_MINUTES
    deviation = np.abs(_wrapped(minutes - centre[index]))
    spread = _group_medians(index, deviation, count)
    return keys, centre, spread, sizes.astype(np.int64)


def unusual_time(p: Punches, t: Thresholds) -> list[Finding]:
    """Each new punch against its employee's usual time of day for its kind."""
    deviation = np.abs(_wrapped(p.local_minute - p.usual_minute))
    limit = np.maximum(t.unusual_min_minutes, t.unusual_mads * MAD_SCALE * p.usual_spread)
    with np.errstate(invalid="ignore"):
        hit = p.new & ~p.scheduled & (p.usual_count >= t.unusual_min_history) & (deviation > limit)
    return [
        Finding(
            "unusual_time",
            int(i),
            {
                "usual_minute": round(float(p.usual_minute[i]), 1),
                "minute": round(float(p.local_minute[i]), 1),
                "history": int(p.usual_count[i]),
            },
        )
        for i in np.flatnonzero(hit)
    ]
