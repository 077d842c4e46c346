"""Settings, read once from the environment (``ATTENDANCE_*``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
    host: str
    port: int
    secret: str | None
    data_dir: Path
    batch_max: int
    batch_wait_ms: int
    batch_concurrency: int
    heartbeat_s: int
    hello_timeout_s: int
    max_frame_bytes: int
    max_body_bytes: int
    send_queue_frames: int
    db_pool_size: int
    # Days a punch (by `at`) and an audit row are kept; 0 keeps them for ever.
    retention_punches_days: int
    retention_audit_days: int

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
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            host=env.get("ATTENDANCE_HOST") or "127.0.0.1",
            port=_int(env, "ATTENDANCE_PORT", 8080),
            secret=env.get("ATTENDANCE_SECRET") or None,
            data_dir=Path(env.get("ATTENDANCE_DATA_DIR") or ".attendance"),
            batch_max=_int(env, "ATTENDANCE_BATCH_MAX", 512, minimum=1),
            batch_wait_ms=_int(env, "ATTENDANCE_BATCH_WAIT_MS", 1),
            batch_concurrency=_int(env, "ATTENDANCE_BATCH_CONCURRENCY", 3, minimum=1),
            heartbeat_s=_int(env, "ATTENDANCE_HEARTBEAT_S", 30, minimum=1),
            hello_timeout_s=_int(env, "ATTENDANCE_HELLO_TIMEOUT_S", 10, minimum=1),
            max_frame_bytes=_int(env, "ATTENDANCE_MAX_FRAME_BYTES", 64 * 1024, minimum=1024),
            max_body_bytes=_int(env, "ATTENDANCE_MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
            send_queue_frames=_int(env, "ATTENDANCE_SEND_QUEUE_FRAMES", 1024, minimum=16),
            db_pool_size=_int(env, "ATTENDANCE_DB_POOL_SIZE", 8, minimum=2),
            retention_punches_days=_days(env, "ATTENDANCE_RETENTION_PUNCHES_DAYS", 2557),
            retention_audit_days=_days(env, "ATTENDANCE_RETENTION_AUDIT_DAYS", 1096),
        )
