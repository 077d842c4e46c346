"""Every Prometheus metric the hub and its workers export, in one place.

No label takes a tenant, employee, device or session id: every label's values come from
a fixed set written here (or from the route table, for HTTP), and the series that
dashboards and alerts look at are created at 0 on import.

``serve`` runs one process per port, so the registry of that process is what
``GET /metrics`` shows; prometheus_client's multiprocess mode does not apply. An
``attendance-hub worker`` process serves no HTTP: what it counts (batches, dead
letters, alerts) is not exported; see docs/operations.md.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The `_created` series double every counter's output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Every role a WebSocket session has: `anonymous` until its `hello`.
ROLES: Final = ("anonymous", "admin", "supervisor", "terminal", "employee")
CONNECTIONS = Gauge(
    "attendance_connections",
    "Open WebSocket sessions by role (unauthenticated until hello).",
    ["role"],
)
for _role in ROLES:
    CONNECTIONS.labels(_role)


class _FrameCounts(Collector):
    """``attendance_frames_total``, counted in plain dicts and read when scraped.

    Every frame in and out is counted, and prometheus_client's ``Counter`` takes a
    lock per increment. These dicts are only touched from the event loop's thread.
    """

    def __init__(self) -> None:
        self.incoming: collections.Counter[str] = collections.Counter()
        self.outgoing: collections.Counter[str] = collections.Counter()
        REGISTRY.register(self)

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for direction, counts in (("in", self.incoming), ("out", self.outgoing)):
            for frame_type, count in sorted(counts.items()):
                family.add_metric([direction, frame_type], count)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "attendance_frames",
            "WebSocket frames by direction and type.",
            labels=["direction", "type"],
        )


_FRAMES = _FrameCounts()
# frames in by type ("invalid" for undecodable input); frames out by type
FRAMES_IN = _FRAMES.incoming
FRAMES_OUT = _FRAMES.outgoing


class LoopHistogram(Collector):
    """A histogram observed from the event loop's thread only, read when scraped.

    ``observe`` is a bisect and two additions: no lock, unlike prometheus_client's
    ``Histogram``, which takes two per observation. Meant for what happens per punch
    or per presence event. Nothing else may observe it from another thread.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(bound) for bound in buckets)
        self._les = [_le(bound) for bound in (*self._bounds, math.inf)]
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as a bucket's `le` says.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(self._les, self._counts, strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client writes it (``+Inf``, ``0.5``, ``1.0``)."""
    written: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return written


# Powers of two from half a millisecond: a commit takes milliseconds, an outage seconds.
_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
    2.0,
    5.0,
    10.0,
)

PUNCHES = Counter(
    "attendance_punches_total", "Punches answered, by ack status or rejection reason.", ["result"]
)
ACK_LATENCY = LoopHistogram(
    "attendance_punch_ack_latency_seconds",
    "WebSocket punches: time from the punch frame being read to its ack being queued to the "
    "socket (commit included; acks only, not errors).",
    _LATENCY_BUCKETS,
)
# Why a WebSocket punch got an error instead of an ack (the client keeps it and resends).
PUNCH_FAILURE_REASONS: Final = ("unavailable", "internal", "draining")
PUNCH_FAILURES = Counter(
    "attendance_punch_failures_total",
    "WebSocket punches answered with an error instead of an ack, by reason: unavailable "
    "(database or workers unreachable, or no answer in time), internal (a bug), draining "
    "(the hub is shutting down).",
    ["reason"],
)
BATCH_SIZE = Histogram(
    "attendance_punch_batch_size",
    "Punches committed per database transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
COMMIT_SECONDS = Histogram(
    "attendance_punch_commit_duration_seconds",
    "Time to resolve, insert and commit one batch of punches.",
    buckets=_LATENCY_BUCKETS,
)
BATCH_FAILURES = Counter(
    "attendance_punch_batch_failures_total",
    "Batches whose transaction failed; their punches were not acked.",
    ["reason"],
)
BATCH_FAILURE_REASONS: Final = ("unavailable", "split", "internal")
LIMIT_REFUSALS = Counter(
    "attendance_limit_refusals_total",
    "Frames, handshakes, hellos and requests refused by an abuse limit, by limit.",
    ["limit"],
)
RETENTION_DELETED = Counter(
    "attendance_retention_deleted_total",
    "Rows deleted by retention, by table (punches, audit_log, alerts).",
    ["table"],
)
HTTP_REQUESTS = Counter(
    "attendance_http_requests_total",
    "HTTP requests by route template (`unmatched` when no route matched or the request was "
    "refused before routing) and status.",
    ["route", "status"],
)
# The route label of a request that matched no route, or was refused before routing.
UNMATCHED_ROUTE: Final = "unmatched"


@functools.cache
def punches(result: str) -> Counter:
    return PUNCHES.labels(result)


for _result in ("accepted", "duplicate"):
    punches(_result)


@functools.cache
def punch_failures(reason: str) -> Counter:
    return PUNCH_FAILURES.labels(reason)


for _reason in PUNCH_FAILURE_REASONS:
    punch_failures(_reason)
for _reason in BATCH_FAILURE_REASONS:
    BATCH_FAILURES.labels(_reason)


@functools.cache
def http_requests(route: str, status: int) -> Counter:
    """The counter of one route template (never a raw path) and status."""
    return HTTP_REQUESTS.labels(route, str(status))


# Every value the `limit` label takes, so that each series exists (at 0) from the start.
LIMITS = ("frame_rate", "frame_flood", "tenant_connections", "origin", "connect_rate", "rest_rate")


@functools.cache
def refusals(limit: str) -> Counter:
    return LIMIT_REFUSALS.labels(limit)


for _limit in LIMITS:
    refusals(_limit)

# -- WebSocket sessions ending ----------------------------------------------------------------

# The close codes the hub sends or meets (docs/protocol.md); any other is counted as `other`.
DISCONNECT_CODES: Final = (
    1000,  # normal
    1001,  # going away (a browser tab closed)
    1002,  # protocol error
    1005,  # no code: the connection ended without a close frame
    1006,  # abnormal: lost before the handshake finished
    1008,  # policy
    1009,  # message too big (ATTENDANCE_MAX_FRAME_BYTES)
    1011,  # server error, or the heartbeat's pong came too late
    1012,  # planned restart, after `drain`
    1013,  # try again later: too many connections for the tenant
    4001,  # bad, expired or revoked token
    4002,  # hello missing or late
    4008,  # flood
    4009,  # slow consumer
)
DISCONNECTS = Counter(
    "attendance_ws_disconnects_total",
    "WebSocket sessions ended, by close code: the one the hub sent, else the client's "
    "(`other` for a code outside the documented set).",
    ["code"],
)
_DISCONNECTS: Final = {code: DISCONNECTS.labels(str(code)) for code in DISCONNECT_CODES}
_OTHER_DISCONNECT: Final = DISCONNECTS.labels("other")


def disconnected(code: int | None) -> None:
    """Count a session's end by its close code; None (never learnt) counts as `other`."""
    counter = _DISCONNECTS.get(code) if code is not None else None
    (counter or _OTHER_DISCONNECT).inc()


SLOW_CONSUMERS = Counter(
    "attendance_ws_slow_consumer_closes_total",
    "WebSocket sessions closed 4009 because the client did not read its frames, by the "
    "queue bound reached (frames: ATTENDANCE_SEND_QUEUE_FRAMES, bytes: "
    "ATTENDANCE_SEND_QUEUE_BYTES).",
    ["queue"],
)
SLOW_CONSUMER_FRAMES: Final = SLOW_CONSUMERS.labels("frames")
SLOW_CONSUMER_BYTES: Final = SLOW_CONSUMERS.labels("bytes")

# -- live channels ------------------------------------------------------------------------------

FANOUT_LATENCY = LoopHistogram(
    "attendance_fanout_latency_seconds",
    "Time from a presence event (committed punches, a terminal, a tick, alerts...) starting "
    "to be applied in this hub to one channel's frames being queued to every subscribed "
    "socket: one observation per channel with subscribers that the event reached.",
    (
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
    ),
)

# -- alerts ---------------------------------------------------------------------------------------

# Every alert kind (docs/fraud.md): the fraud checks, the scan of what time raises, and
# the ZKTeco uploads' records that became no punch.
ALERT_KINDS: Final = (
    "buddy_punch",
    "geofence",
    "impossible_travel",
    "clock_skew",
    "rapid_repeat",
    "unusual_time",
    "overtime",
    "overtime_approaching",
    "missing_clock_out",
    "meal_break",
    "rest_period",
    "late",
    "unknown_pin",
    "bad_record",
)
ALERTS = Counter(
    "attendance_alerts_raised_total",
    "Alerts stored for the first time, by kind (`other` for a kind outside the documented set).",
    ["kind"],
)
_ALERTS: Final = {kind: ALERTS.labels(kind) for kind in ALERT_KINDS}


# The same counts as a plain tally, for a process that hands its counts to the one serving
# the metrics (the one-process hub's checks process, workers/aside.py, takes and clears it).
ALERTS_TALLY: Final[collections.Counter[str]] = collections.Counter()


def alert_raised(kind: str, count: int = 1) -> None:
    counter = _ALERTS.get(kind)
    if counter is None:
        kind = "other"
        counter = ALERTS.labels(kind)
    counter.inc(count)
    ALERTS_TALLY[kind] += count


# -- the punch stream (Redis) ---------------------------------------------------------------------

RECLAIMED = Counter(
    "attendance_stream_reclaimed_total",
    "Punch stream entries a worker took over from one that left them unanswered.",
)
DEAD_LETTERS = Counter(
    "attendance_stream_dead_letters_total",
    "Punch stream entries moved to the dead letters after too many deliveries.",
)
# Sampled from Redis every few seconds by each hub on Redis: the same values on every hub.
STREAM_ENTRIES = Gauge(
    "attendance_stream_entries",
    "Entries in the punch stream (XLEN): handed over by hubs and not yet answered by a worker, "
    "read or not. 0 without Redis.",
)
STREAM_PENDING = Gauge(
    "attendance_stream_pending_entries",
    "Punch stream entries delivered to a worker and not yet acknowledged (XPENDING). "
    "0 without Redis.",
)
STREAM_DEAD_LETTER_ENTRIES = Gauge(
    "attendance_stream_dead_letter_entries",
    "Entries in the dead letters stream (XLEN): punches no worker could commit, kept until an "
    "operator deals with them. 0 without Redis.",
)

# -- database pools -------------------------------------------------------------------------------


class _Pool(Protocol):
    """What is read of an ``asyncpg.Pool``."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def get_max_size(self) -> int: ...


class _PoolGauges(Collector):
    """The asyncpg pools' sizes, read when scraped (counting a pool's holders, no I/O)."""

    def __init__(self) -> None:
        self.pools: dict[str, _Pool] = {}
        REGISTRY.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size, in_use, most = self._families()
        for name, pool in sorted(self.pools.items()):
            open_now = pool.get_size()
            size.add_metric([name], open_now)
            in_use.add_metric([name], open_now - pool.get_idle_size())
            most.add_metric([name], pool.get_max_size())
        yield from (size, in_use, most)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        about = " (app: REST, punches and /readyz as the application role; system: jobs across "
        return (
            GaugeMetricFamily(
                "attendance_db_pool_connections",
                "Connections open in an asyncpg pool" + about + "tenants).",
                labels=["pool"],
            ),
            GaugeMetricFamily(
                "attendance_db_pool_in_use_connections",
                "Connections of an asyncpg pool acquired right now" + about + "tenants).",
                labels=["pool"],
            ),
            GaugeMetricFamily(
                "attendance_db_pool_max_connections",
                "Most connections an asyncpg pool opens" + about + "tenants).",
                labels=["pool"],
            ),
        )


_POOLS = _PoolGauges()
# The values the `pool` label takes.
POOL_NAMES: Final = ("app", "system")


def watch_pool(name: str, pool: _Pool) -> None:
    """Export this pool's sizes under ``pool=name`` (one of ``POOL_NAMES``) until unwatched."""
    assert name in POOL_NAMES, name
    _POOLS.pools[name] = pool


def unwatch_pool(name: str, pool: _Pool) -> None:
    if _POOLS.pools.get(name) is pool:
        del _POOLS.pools[name]
