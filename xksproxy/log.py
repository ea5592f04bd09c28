"""structlog set-up: one JSON object per line on stdout, with a redaction safety net.

Call sites never pass plaintext, AAD, key material, PINs or secrets; the redaction processor
is the second line of defence should one ever try (a test drives every API and scans the log).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Field names that must never carry a value into a log line.
SENSITIVE_FIELDS = frozenset(
    {
        "plaintext",
        "aad",
        "additionalauthenticateddata",
        "ciphertext",
        "secret",
        "rawsecretaccesskey",
        "pin",
        "user_pin",
        "so_pin",
        "key_material",
        "authorization",
        "signature",
    }
)
REDACTED = "[redacted]"


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any sensitive field, whatever the call site passed."""
    for name in list(event):
        if name.lower() in SENSITIVE_FIELDS:
            event[name] = REDACTED
    return event


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and the standard library's logging to JSON lines on *stream*."""
    out = stream or sys.stdout
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").disabled = True  # the audit line replaces it
