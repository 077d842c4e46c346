"""The JavaScript client's own tests (`node --test` in clients/js), run against real hubs.

The Node tests start and stop `attendance-hub serve` themselves (clients/js/test/hub.js);
this test gives them a fresh database, the signing secret and the Python to run the hub
with, and fails with their output when any of them fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_SECRET, missing_service

JS = Path(__file__).resolve().parents[1] / "clients" / "js"

pytestmark = [pytest.mark.postgres, pytest.mark.one_server]


def _node() -> str:
    node = shutil.which("node")
    ready = (JS / "node_modules" / "ws").is_dir()
    if node is None or not ready:
        missing_service("node is not installed" if node is None else "run `make install` (npm ci)")
    return node


@pytest.mark.timeout(300)
def test_the_js_client_suite(scratch_db: str) -> None:
    env = {
        **os.environ,
        "ATTENDANCE_JS_PYTHON": sys.executable,
        "ATTENDANCE_JS_DATABASE_URL": scratch_db,
        "ATTENDANCE_JS_SECRET": TEST_SECRET,
    }
    try:
        done = subprocess.run(
            [
                _node(),
                "--test",
                "--test-force-exit",
                "--test-concurrency=1",
                "--test-reporter=tap",
                "test/",
            ],
            cwd=JS,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node --test ran over {exc.timeout} s:\n{_text(exc.stdout)[-12000:]}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-12000:]
    # Every test ran: none was skipped for want of the hub's variables.
    assert "# skipped 0" in output, output[-3000:]


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""
