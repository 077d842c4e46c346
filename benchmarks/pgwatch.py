"""What PostgreSQL and the hub's commits did in each minute of a soak.

A thread polls once a second, over its own connection to the soak's database:
what this database's busy backends and the autovacuum workers are waiting on, and the
server's cumulative counters (checkpoints, buffers written by whom, WAL volume and full-page
images, blocks read, the punches table's size). ``minute()`` returns the change since the
last call, with the hub's mean batch size and commit time from its ``/metrics``.

These are what tell a database-side slowdown (checkpoints, full-page-image WAL, a working set
that outgrew shared_buffers, autovacuum) from a hub-side one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

COUNTERS_SQL = """
SELECT b.checkpoints_timed, b.checkpoints_req, b.buffers_checkpoint, b.buffers_clean,
       b.buffers_backend, w.wal_fpi, w.wal_bytes::float8 AS wal_bytes, d.blks_read, d.blks_hit,
       coalesce(pg_total_relation_size(t.relid), 0) AS punches_bytes,
       coalesce(pg_indexes_size(t.relid), 0) AS indexes_bytes,
       coalesce(t.autovacuum_count, 0) AS autovacuums,
       coalesce(t.autoanalyze_count, 0) AS autoanalyzes
FROM pg_stat_bgwriter b, pg_stat_wal w, pg_stat_database d
LEFT JOIN pg_stat_user_tables t ON t.relname = 'punches'
WHERE d.datname = current_database()
"""

WAITS_SQL = """
SELECT backend_type, coalesce(wait_event, 'on CPU') AS event, count(*) AS n
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND ((datname = current_database() AND state = 'active')
       OR backend_type IN ('autovacuum worker', 'checkpointer'))
GROUP BY 1, 2
"""

# Cumulative counters reported as a change per minute; sizes are reported as they stand.
DELTAS = (
    "checkpoints_timed",
    "checkpoints_req",
    "buffers_checkpoint",
    "buffers_clean",
    "buffers_backend",
    "wal_fpi",
    "wal_bytes",
    "blks_read",
    "blks_hit",
    "autovacuums",
    "autoanalyzes",
)
# The hub's histograms whose _sum and _count give each minute's mean commit and batch.
COMMIT_SAMPLES = {
    "attendance_punch_commit_duration_seconds_sum": "commit_duration_seconds_sum",
    "attendance_punch_commit_duration_seconds_count": "commit_duration_seconds_count",
    "attendance_punch_batch_size_sum": "batch_size_sum",
}
# The checkpointer waits on this between writes while it spreads a checkpoint out.
CHECKPOINTER_IDLE = {"CheckpointerMain"}


class PgWatch:
    """Polls the soak's database once a second in a thread of its own."""

    def __init__(self, dsn: str, metrics_url: str, every_s: float = 1.0) -> None:
        self.dsn = dsn
        self.metrics_url = metrics_url
        self.every_s = every_s
        self._lock = threading.Lock()
        self._waits: Counter[str] = Counter()
        self._polls = 0
        self._counters: dict[str, float] = {}
        self._previous: dict[str, float] = {}
        self._commits: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgwatch", daemon=True)

    def __enter__(self) -> PgWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self._stop.is_set():
                counters = dict(await conn.fetchrow(COUNTERS_SQL) or {})
                waits = await conn.fetch(WAITS_SQL)
                with self._lock:
                    self._counters = {k: float(v) for k, v in counters.items()}
                    self._polls += 1
                    for row in waits:
                        if row["backend_type"] == "checkpointer":
                            if row["event"] in CHECKPOINTER_IDLE:
                                continue
                            key = f"checkpointer: {row['event']}"
                        elif row["backend_type"] == "autovacuum worker":
                            key = f"autovacuum: {row['event']}"
                        else:
                            key = row["event"]
                        self._waits[key] += row["n"]
                await asyncio.sleep(self.every_s)
        finally:
            await conn.close()

    def _hub_commits(self) -> dict[str, float]:
        try:
            text = httpx.get(self.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return {}
        return {
            COMMIT_SAMPLES[sample.name]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in COMMIT_SAMPLES
        }

    def minute(self) -> dict[str, Any]:
        """The change since the last call (the first call only sets the baseline)."""
        commits = self._hub_commits()
        with self._lock:
            counters, polls, waits = dict(self._counters), self._polls, self._waits
            self._waits, self._polls = Counter(), 0
        previous, self._previous = self._previous, counters
        before, self._commits = self._commits, commits
        if not previous:
            return {}
        row: dict[str, Any] = {k: counters.get(k, 0.0) - previous.get(k, 0.0) for k in DELTAS}
        row["punches_mib"] = counters.get("punches_bytes", 0.0) / 2**20
        row["indexes_mib"] = counters.get("indexes_bytes", 0.0) / 2**20
        # Mean number of backends in each state over the minute's polls.
        row["waits"] = {k: v / max(polls, 1) for k, v in waits.most_common()}
        batches = commits.get("commit_duration_seconds_count", 0.0) - before.get(
            "commit_duration_seconds_count", 0.0
        )
        if batches > 0:
            seconds = commits["commit_duration_seconds_sum"] - before.get(
                "commit_duration_seconds_sum", 0.0
            )
            punches = commits["batch_size_sum"] - before.get("batch_size_sum", 0.0)
            row["commit_ms_mean"] = 1000 * seconds / batches
            row["batch_mean"] = punches / batches
        return row

    @staticmethod
    def line(row: dict[str, Any]) -> str:
        """One log line for a minute's row."""
        if not row:
            return ""
        waits = ", ".join(f"{k} {v:.2f}" for k, v in list(row["waits"].items())[:4])
        commit = ""
        if "commit_ms_mean" in row:
            commit = f"commit {row['commit_ms_mean']:.1f} ms x{row['batch_mean']:.0f}; "
        return (
            f"{commit}ckpt {row['checkpoints_timed']:.0f}+{row['checkpoints_req']:.0f}, "
            f"writes ckpt/clean/backend {row['buffers_checkpoint']:.0f}/"
            f"{row['buffers_clean']:.0f}/{row['buffers_backend']:.0f}, "
            f"WAL {row['wal_bytes'] / 2**20:.0f} MiB ({row['wal_fpi']:.0f} FPI), "
            f"read {row['blks_read']:.0f}, table {row['punches_mib']:.0f} + idx "
            f"{row['indexes_mib']:.0f} MiB, autovac {row['autovacuums']:.0f}; waits: {waits}"
        )
