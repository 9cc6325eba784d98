"""Logging: the X-Request-Id on every line about a request, and text or JSON lines (--log-format)."""

from __future__ import annotations

import itertools
import json
import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The id of the HTTP request being handled; set by FrontMiddleware (server/front.py) for the request's task, so every
# line logged while handling it (handlers, the access log, errors) carries it. The engine thread logs it
# through `extra={"request_id": ...}` (Request.trace_id).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def sanitise_request_id(value: str | None) -> str:
    """A client's X-Request-Id when it is safe to echo and log (letters, digits, . _ : -; up to 128), else
    a fresh one: a header value never breaks a log line or a response header."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return new_request_id()


_ID_PREFIX = uuid.uuid4().hex[:16]  # this process's; the counter makes each id unique within it
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A fresh id, 32 hex digits like a uuid4's: unique across processes by the random prefix, without a
    getrandom call per request (a system call that lets other threads take the GIL)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} [request_id={request_id}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (when about a request), exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Root handler for everything, uvicorn's loggers included (uvicorn is started with log_config=None)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # library warnings become log lines too (one format on the output)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
