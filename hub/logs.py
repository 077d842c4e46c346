"""Logging set-up: the plain format, or one JSON object per line (``ATTENDANCE_LOG_FORMAT``).

A JSON line has ``time`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger`` and
``message``; ``session`` on the lines logged about a WebSocket session or from within
it; ``request_id`` on the lines logged while an HTTP request is handled (uvicorn's
access line included); ``exception`` with the traceback, if there is one. uvicorn's
own loggers go through the same handler.

The ids travel in context variables, which asyncio copies into every task and callback
started from the request or session. A log call about another session than the one
running (a fan-out closing a slow reader, say) passes it in ``extra={"session": ...}``,
which wins.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, Literal

LogFormat = Literal["plain", "json"]
FORMATS: Final = ("plain", "json")
PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The WebSocket session (its id) and the HTTP request (its X-Request-ID) being served.
SESSION: ContextVar[str | None] = ContextVar("attendance_session", default=None)
REQUEST_ID: ContextVar[str | None] = ContextVar("attendance_request_id", default=None)

REQUEST_ID_HEADER: Final = b"x-request-id"
# A client's X-Request-ID is kept if it is printable ASCII without spaces and not too long;
# otherwise the hub makes its own, so that a log line never carries arbitrary bytes.
_USABLE_REQUEST_ID: Final = re.compile(r"[!-~]{1,128}")
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's X-Request-ID if it is usable, else a new one (32 hex digits)."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            given = value.decode("latin-1")
            if _USABLE_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session = getattr(record, "session", None) or SESSION.get()
        if session is not None:
            entry["session"] = session
        request = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request is not None:
            entry["request_id"] = request
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            _access_fields(entry, record.args)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _access_fields(entry: dict[str, Any], args: tuple[Any, ...]) -> None:
    """uvicorn's access line as fields: its arguments are address, method, path, version, status."""
    if len(args) == 5:
        client, method, path, version, status = args
        entry.update(client=client, method=method, path=path, http_version=version, status=status)


def configure(log_format: LogFormat) -> None:
    """Have the root logger write ``log_format`` lines to stderr at INFO and above."""
    if log_format == "plain":
        logging.basicConfig(level=logging.INFO, format=PLAIN_FORMAT)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in _UVICORN_LOGGERS:
        # Through the root's handler, not handlers of their own.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def uvicorn_options(log_format: LogFormat) -> dict[str, Any]:
    """The ``uvicorn.Config`` options for the log format.

    Plain keeps uvicorn's own format and no access log, as the hub always had. JSON
    leaves logging alone (``configure`` set it up) and turns the access log on: one
    line per HTTP request, with its ``request_id``.
    """
    if log_format == "plain":
        return {"access_log": False}
    return {"log_config": None, "access_log": True}
