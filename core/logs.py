"""Logging for the long-running commands: text or JSON lines, message context, secrets never shown.

* ``text`` (default): ``<time> <LEVEL> <logger> <message>`` as before.
* ``json`` (``--log-format json`` / ``EMOFLEET_OBSERVABILITY_LOG_FORMAT=json``): one JSON object per line
  with ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, ``thread``, ``exc`` (a traceback, when
  there is one) and, where known, the Kafka position and clip of the message being worked on:
  ``topic``, ``partition``, ``offset``, ``audio_id``. Context comes from ``extra={...}`` on the log
  call or from :func:`log_context` / :func:`with_log_context` around the work on one message.
* Secrets: every ``Secret`` setting (secret Kafka / Schema Registry client properties included, see
  ``core.config.is_secret_property``) and every password inside a URL setting (``redis://:pw@host``) is
  replaced by ``***`` in every formatted line, whatever logged it (exceptions included). librdkafka's
  own log lines go through the same handler (:func:`kafka_logger`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar

from emofleet.core.config import ConfigError, Secret, url_password

LOG_FORMATS = ("text", "json")
CONTEXT_FIELDS = ("topic", "partition", "offset", "audio_id", "request_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

_context: ContextVar[dict[str, Any] | None] = ContextVar("emofleet_log_context", default=None)
T = TypeVar("T")


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Attach fields to every log line of this thread (or task) inside the block."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield _context.get()  # type: ignore[misc]
    finally:
        _context.reset(token)


def add_log_context(**fields: Any) -> None:
    """Add fields to the innermost :func:`log_context` (no-op outside one)."""
    current = _context.get()
    if current is not None:
        current.update(fields)


def with_log_context(fn: Callable[..., T], **fields: Any) -> Callable[..., T]:
    """``fn`` wrapped so that it runs inside ``log_context(**fields)`` (for thread-pool submissions)."""
    def run(*args: Any, **kwargs: Any) -> T:
        with log_context(**fields):
            return fn(*args, **kwargs)
    return run


def secret_values(settings: Any) -> set[str]:
    """Every secret in a settings object: Secret fields and passwords inside URLs."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                walk(getattr(value, item.name))
        elif isinstance(value, Secret):
            if value:
                found.add(str(value))
        elif isinstance(value, str) and (password := url_password(value)):
            found.add(password)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(settings)
    return found


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then masks every secret in the finished line."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line = self._inner.format(record)
        for secret in self._secrets:
            line = line.replace(secret, "***")
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        context = _context.get() or {}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, context.get(name))
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    """One stderr handler on the root logger (replacing any), in ``fmt``, with ``secrets`` masked."""
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(inner, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def kafka_logger() -> logging.Logger:
    """Pass as librdkafka's ``logger`` so its lines share the format and the masking."""
    return logging.getLogger("emofleet.kafka")
