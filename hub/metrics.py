"""Every Prometheus metric the hub and its workers export, in one place."""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# The `_created` series double every counter's output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONNECTIONS = Gauge(
    "attendance_connections",
    "Open WebSocket sessions by role (unauthenticated until hello).",
    ["role"],
)


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
PUNCHES = Counter(
    "attendance_punches_total", "Punches answered, by ack status or rejection reason.", ["result"]
)
BATCH_SIZE = Histogram(
    "attendance_punch_batch_size",
    "Punches committed per database transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
COMMIT_SECONDS = Histogram(
    "attendance_punch_commit_duration_seconds",
    "Time to resolve, insert and commit one batch of punches.",
    buckets=(
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
    ),
)
BATCH_FAILURES = Counter(
    "attendance_punch_batch_failures_total",
    "Batches whose transaction failed; their punches were not acked.",
    ["reason"],
)
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
    "REST requests by route template and status.",
    ["route", "status"],
)


@functools.cache
def punches(result: str) -> Counter:
    return PUNCHES.labels(result)


# Every value the `limit` label takes, so that each series exists (at 0) from the start.
LIMITS = ("frame_rate", "frame_flood", "tenant_connections", "origin", "connect_rate", "rest_rate")


@functools.cache
def refusals(limit: str) -> Counter:
    return LIMIT_REFUSALS.labels(limit)


for _limit in LIMITS:
    refusals(_limit)

RECLAIMED = Counter(
    "attendance_stream_reclaimed_total",
    "Punch stream entries a worker took over from one that left them unanswered.",
)
DEAD_LETTERS = Counter(
    "attendance_stream_dead_letters_total",
    "Punch stream entries moved to the dead letters after too many deliveries.",
)
