"""Every Prometheus metric the hub and its workers export, in one place."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The `_created` series double every counter's output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONNECTIONS = Gauge(
    "attendance_connections",
    "Open WebSocket sessions by role (unauthenticated until hello).",
    ["role"],
)
FRAMES = Counter(
    "attendance_frames_total", "WebSocket frames by direction and type.", ["direction", "type"]
)
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
HTTP_REQUESTS = Counter(
    "attendance_http_requests_total",
    "REST requests by route template and status.",
    ["route", "status"],
)


@functools.cache
def frames(direction: str, frame_type: str) -> Counter:
    """The child counter for one direction and frame type, looked up once (hot path)."""
    return FRAMES.labels(direction, frame_type)


@functools.cache
def punches(result: str) -> Counter:
    return PUNCHES.labels(result)
