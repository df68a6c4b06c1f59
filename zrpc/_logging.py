"""Log set-up for the CLI: text or one JSON object per line, with the current call's trace id.

The worker sets ``TRACE_ID`` around each handler it runs (thread or task), so a handler's own
``logging`` calls carry the trace id its client sent, and a call can be followed client →
broker → worker in shipped logs. Fields given as ``extra=`` (peer, reason, service…) become
JSON keys.
"""
from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

# The trace id of the call whose handler is running in this thread or task ("" outside one).
TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("zrpc_trace_id", default="")

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` or a filter.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class TraceFilter(logging.Filter):
    """Adds ``trace_id`` to records logged while a handler runs (unless the record has one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            trace_id = TRACE_ID.get()
            if trace_id:
                record.trace_id = trace_id
        return True


def extra_fields(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value if isinstance(value, (str, int, float, bool, type(None))) else str(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, then ``key=value`` for each extra field (trace_id included)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return line
        head, newline, tail = line.partition("\n")  # keep a traceback below the fields
        fields = " ".join(f"{key}={value}" for key, value in extras.items())
        return f"{head} {fields}{newline}{tail}"


def setup_logging(level: str = "INFO", log_format: str = "text", stream=None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``log_format``; returns the handler."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(TraceFilter())
    root = logging.getLogger()
    for old in list(root.handlers):  # a second call (tests) replaces, never duplicates, lines
        if getattr(old, "_zrpc", False):
            root.removeHandler(old)
    handler._zrpc = True
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
