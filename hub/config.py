"""Settings, read once from the environment (``ATTENDANCE_*``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from hub.limits import FLOOD_WINDOW_S, normalize_origin
from hub.logs import FORMATS, LogFormat
from hub.redis_keys import DEFAULT_PREFIX
from workers.fraud import Thresholds


class ConfigError(ValueError):
    """A setting has a value the hub cannot use."""


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _origins(env: dict[str, str], name: str) -> tuple[str, ...]:
    origins = []
    for item in (env.get(name) or "").split(","):
        if not item.strip():
            continue
        if item.strip() == "*":
            origins.append("*")
            continue
        try:
            origins.append(normalize_origin(item))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}, e.g. https://dash.example.com") from None
    return tuple(origins)


def _seconds(env: dict[str, str], name: str, default: float, most: float = 300.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= most:
        raise ConfigError(f"{name} must be between 0 and {most:g} seconds, got {raw!r}")
    return value


MAX_RETENTION_DAYS = 36_525


def _days(env: dict[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value > MAX_RETENTION_DAYS:
        raise ConfigError(f"{name} must be at most {MAX_RETENTION_DAYS} (100 years), got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None
    redis_url: str | None
    # Starts every Redis key and channel name (hub/redis_keys.py).
    redis_prefix: str
    host: str
    port: int
    secret: str | None
    # Older signing keys still accepted for verification during a key rotation.
    secret_previous: tuple[str, ...]
    data_dir: Path
    batch_max: int
    batch_wait_ms: int
    batch_concurrency: int
    heartbeat_s: int
    hello_timeout_s: int
    max_frame_bytes: int
    max_body_bytes: int
    send_queue_frames: int
    send_queue_bytes: int
    db_pool_size: int
    allowed_origins: tuple[str, ...]
    rate_per_s: int
    rate_burst: int
    rate_flood: int
    max_connections_per_tenant: int
    connect_rate_per_ip: int
    connect_burst_per_ip: int
    rest_rate_per_ip: int
    rest_burst_per_ip: int
    # Days a punch (by `at`) and an audit row are kept; 0 keeps them for ever.
    retention_punches_days: int
    retention_audit_days: int
    # With Redis: how long a hub waits for a worker's answer before telling the client to
    # resend; how long a punch a worker took may go unanswered before another worker takes
    # it over; how many deliveries a punch gets before it goes to the dead letters.
    ack_timeout_s: int
    claim_idle_ms: int
    max_deliveries: int
    # The fraud checks: every threshold (ATTENDANCE_FRAUD_<NAME>), and how much of each
    # employee's history their usual times of day are worked out from.
    fraud: Thresholds
    check_history_days: int
    check_history_max: int
    # How often the overtime scan looks for alerts that time raises.
    scan_interval_s: int
    # ZKTeco (ADMS) terminals: how often they are told to poll (`Delay`), and how long a
    # silent one stays online on its site's terminal board.
    adms_delay_s: int
    adms_offline_after_s: int
    # SIGTERM: over how many seconds the hub's clients are sent away (docs/operations.md).
    drain_window_s: float
    # `attendance-hub worker`: the port of its /metrics (0: none).
    worker_metrics_port: int
    # `plain` lines, or one JSON object per line (hub/logs.py).
    log_format: LogFormat

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        database_url = env.get("ATTENDANCE_DATABASE_URL") or None
        if database_url is not None and not database_url.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ConfigError("ATTENDANCE_DATABASE_URL must start with postgresql://")
        redis_url = env.get("ATTENDANCE_REDIS_URL") or None
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("ATTENDANCE_REDIS_URL must start with redis://, rediss:// or unix://")
        rate_per_s = _int(env, "ATTENDANCE_RATE_PER_S", 50)
        rate_flood = _int(env, "ATTENDANCE_RATE_FLOOD", 100)
        if rate_per_s and rate_flood >= rate_per_s * FLOOD_WINDOW_S:
            # A connection over its rate is read no faster than the rate: a flood limit this
            # high would never be reached.
            raise ConfigError(
                f"ATTENDANCE_RATE_FLOOD ({rate_flood}) must be below ATTENDANCE_RATE_PER_S x "
                f"{FLOOD_WINDOW_S:g} ({rate_per_s * FLOOD_WINDOW_S:g}): a connection over its "
                "rate is read no faster than the rate, so it could never be refused that often "
                f"within {FLOOD_WINDOW_S:g} s"
            )
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=_redis_prefix(env),
            host=env.get("ATTENDANCE_HOST") or "127.0.0.1",
            port=_int(env, "ATTENDANCE_PORT", 8080),
            secret=env.get("ATTENDANCE_SECRET") or None,
            secret_previous=_keys(env, "ATTENDANCE_SECRET_PREVIOUS"),
            data_dir=Path(env.get("ATTENDANCE_DATA_DIR") or ".attendance"),
            batch_max=_int(env, "ATTENDANCE_BATCH_MAX", 512, minimum=1),
            batch_wait_ms=_int(env, "ATTENDANCE_BATCH_WAIT_MS", 1),
            batch_concurrency=_int(env, "ATTENDANCE_BATCH_CONCURRENCY", 3, minimum=1),
            heartbeat_s=_int(env, "ATTENDANCE_HEARTBEAT_S", 30, minimum=1),
            hello_timeout_s=_int(env, "ATTENDANCE_HELLO_TIMEOUT_S", 10, minimum=1),
            max_frame_bytes=_int(env, "ATTENDANCE_MAX_FRAME_BYTES", 64 * 1024, minimum=1024),
            max_body_bytes=_int(env, "ATTENDANCE_MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
            send_queue_frames=_int(env, "ATTENDANCE_SEND_QUEUE_FRAMES", 1024, minimum=16),
            send_queue_bytes=_int(
                env, "ATTENDANCE_SEND_QUEUE_BYTES", 4 * 1024 * 1024, minimum=64 * 1024
            ),
            db_pool_size=_int(env, "ATTENDANCE_DB_POOL_SIZE", 8, minimum=2),
            allowed_origins=_origins(env, "ATTENDANCE_ALLOWED_ORIGINS"),
            rate_per_s=rate_per_s,
            rate_burst=_int(env, "ATTENDANCE_RATE_BURST", 200, minimum=1),
            rate_flood=rate_flood,
            max_connections_per_tenant=_int(
                env, "ATTENDANCE_MAX_CONNECTIONS_PER_TENANT", 10_000, minimum=1
            ),
            connect_rate_per_ip=_int(env, "ATTENDANCE_CONNECT_RATE_PER_IP", 600),
            connect_burst_per_ip=_int(env, "ATTENDANCE_CONNECT_BURST_PER_IP", 300, minimum=1),
            rest_rate_per_ip=_int(env, "ATTENDANCE_REST_RATE_PER_IP", 6000),
            rest_burst_per_ip=_int(env, "ATTENDANCE_REST_BURST_PER_IP", 1000, minimum=1),
            retention_punches_days=_days(env, "ATTENDANCE_RETENTION_PUNCHES_DAYS", 2557),
            retention_audit_days=_days(env, "ATTENDANCE_RETENTION_AUDIT_DAYS", 1096),
            ack_timeout_s=_int(env, "ATTENDANCE_ACK_TIMEOUT_S", 10, minimum=1),
            claim_idle_ms=_int(env, "ATTENDANCE_CLAIM_IDLE_MS", 30_000, minimum=100),
            max_deliveries=_int(env, "ATTENDANCE_MAX_DELIVERIES", 5, minimum=1),
            fraud=_thresholds(env),
            check_history_days=_int(env, "ATTENDANCE_CHECK_HISTORY_DAYS", 56, minimum=1),
            check_history_max=_int(env, "ATTENDANCE_CHECK_HISTORY_MAX", 240, minimum=1),
            scan_interval_s=_int(env, "ATTENDANCE_SCAN_INTERVAL_S", 60, minimum=1),
            adms_delay_s=_int(env, "ATTENDANCE_ADMS_DELAY_S", 10, minimum=1),
            adms_offline_after_s=_int(env, "ATTENDANCE_ADMS_OFFLINE_AFTER_S", 60, minimum=1),
            # Several hubs take turns with the clients of one that drains; a hub on its own
            # has nowhere to send them, and a long window only delays its restart.
            drain_window_s=_seconds(
                env, "ATTENDANCE_DRAIN_WINDOW_S", 5.0 if redis_url is not None else 1.0
            ),
            worker_metrics_port=_int(env, "ATTENDANCE_WORKER_METRICS_PORT", 0),
            log_format=_log_format(env),
        )


def _thresholds(env: dict[str, str]) -> Thresholds:
    """Every field of ``Thresholds`` from ``ATTENDANCE_FRAUD_<FIELD>``, else its default."""
    values: dict[str, float | int] = {}
    for field in msgspec.structs.fields(Thresholds):
        name = f"ATTENDANCE_FRAUD_{field.name.upper()}"
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        if field.type is int:
            values[field.name] = _int(env, name, 0, minimum=1)
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not value > 0 or value == float("inf"):
            raise ConfigError(f"{name} must be a positive number, got {raw!r}")
        values[field.name] = value
    return Thresholds(**values)  # type: ignore[arg-type]


def _log_format(env: dict[str, str]) -> LogFormat:
    raw = (env.get("ATTENDANCE_LOG_FORMAT") or "plain").strip().lower()
    if raw == "plain":
        return "plain"
    if raw == "json":
        return "json"
    raise ConfigError(f"ATTENDANCE_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {raw!r}")


def _redis_prefix(env: dict[str, str]) -> str:
    prefix = env.get("ATTENDANCE_REDIS_PREFIX") or DEFAULT_PREFIX
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", prefix):
        raise ConfigError("ATTENDANCE_REDIS_PREFIX must be 1-64 of A-Z a-z 0-9 . _ -")
    return prefix


def _keys(env: dict[str, str], name: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in (env.get(name) or "").split(",") if key.strip())
    if any(len(key) < 32 for key in keys):
        raise ConfigError(f"{name}: every key must be at least 32 characters")
    return keys
