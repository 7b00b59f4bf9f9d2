"""structlog, configured once per process: JSON lines by default (for log shippers),
readable console output on a terminal, context bound with ``structlog.contextvars`` or
``log.bind(asset=…, partition=…, model_version=…)``.

Secrets handed to a library (the SASL password, see :func:`mask_secret`) are replaced by
``***`` in every line written through this configuration, plantwatch's and the libraries'."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_configured = False
_secrets: set[str] = set()
MASK = "***"


def mask_secret(value: str) -> None:
    """From now on, write ``value`` as ``***`` wherever it would appear in a log line."""
    if value:
        _secrets.add(value)


def _scrub(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):  # a secret containing another goes first
        text = text.replace(secret, MASK)
    return text


def _scrub_event(_logger: object, _method: str, event: dict[str, object]) -> dict[str, object]:
    """structlog processor: mask secrets in every string value of the event."""
    if _secrets:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = _scrub(value)
            elif value is not None and not isinstance(value, (int, float, bool)):
                scrubbed = _scrub(str(value))
                if scrubbed != str(value):
                    event[key] = scrubbed
    return event


class _ScrubFilter(logging.Filter):
    """Masks secrets in the standard library's records (kafka-python logs its configuration at debug level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            message = record.getMessage()
            scrubbed = _scrub(message)
            if scrubbed != message:
                record.msg, record.args = scrubbed, None
            if record.exc_info and not record.exc_text:  # the handler's formatter reuses exc_text
                record.exc_text = _scrub(logging.Formatter().formatException(record.exc_info))
        return True


class _CurrentStderr:
    """``sys.stderr`` as it is at each write, not as it was when logging was configured (a test
    harness or a daemonising wrapper may replace it, and the old stream may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto",
                      stream: object = None) -> None:
    """Set up structlog and route the standard library's logging (kafka-python, TF) through it."""
    global _configured
    out = stream or _CurrentStderr()
    use_console = fmt == "console" or (fmt == "auto" and hasattr(out, "isatty") and out.isatty())
    renderer = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _scrub_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,  # a cached logger escapes structlog.testing.capture_logs
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ScrubFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # third-party chatter only when it matters
    logging.getLogger("kafka").setLevel(logging.ERROR)
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
