"""``attendance-hub serve`` with its garbage collector timed, and optionally tuned, for profiling.

A drop-in for ``attendance-hub serve`` (same environment) that changes no hub code: it
times every collection with ``gc.callbacks`` and writes counts, CPU seconds and pauses per
generation as JSON at exit. Two experiments can be switched on from the environment:

    GC_PROBE_FREEZE=1           gc.freeze() once everything is imported, so that the
                                collector no longer walks the objects made at start-up
    GC_PROBE_THRESHOLD=a,b,c    gc.set_threshold(a, b, c)
    GC_PROBE_OUT=path           where the JSON goes (default gc-probe.json)

    python benchmarks/gc_probe.py
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from typing import Any

import hub.cli

_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_cpu: dict[int, float] = {0: 0.0, 1: 0.0, 2: 0.0}
_started = [0.0, 0.0]


def _timed(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0], _started[1] = time.perf_counter(), time.thread_time()
        return
    generation = int(info["generation"])
    _pauses[generation].append(time.perf_counter() - _started[0])
    _cpu[generation] += time.thread_time() - _started[1]


def summary() -> dict[str, dict[str, float]]:
    report = {}
    for generation, pauses in _pauses.items():
        ordered = sorted(pauses)
        report[str(generation)] = {
            "collections": len(ordered),
            "cpu_s": _cpu[generation],
            "pause_p50_ms": 1000 * ordered[len(ordered) // 2] if ordered else 0.0,
            "pause_max_ms": 1000 * ordered[-1] if ordered else 0.0,
        }
    return report


def _write_summary() -> None:
    with open(os.environ.get("GC_PROBE_OUT", "gc-probe.json"), "w") as out:
        json.dump(summary(), out)


def main() -> None:
    if os.environ.get("GC_PROBE_FREEZE"):
        gc.collect()
        gc.freeze()
    if threshold := os.environ.get("GC_PROBE_THRESHOLD"):
        first, second, third = (int(part) for part in threshold.split(","))
        gc.set_threshold(first, second, third)
    gc.callbacks.append(_timed)
    atexit.register(_write_summary)
    hub.cli.main(["serve"])


if __name__ == "__main__":
    main()
