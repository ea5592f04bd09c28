"""What aiohttp logs about a connection, replaced: no request byte ever reaches the log.

aiohttp's request handler logs a request its HTTP parser rejects (bad chunk framing, a control
byte in a header, an over-long line, ...) with ``logger.exception``: a traceback whose message
quotes the offending bytes, often the whole header line or body (the Authorization header,
base64 plaintext), about 900 bytes a time, once per request, before any authentication.  This
logger stands in for aiohttp's: it writes one ``http_requests_rejected`` warning a second at
most, with how many requests each error class refused since the last one, and counts every
refusal in ``xks_http_requests_rejected_total{kind}``.  No message, argument or traceback of
aiohttp's is written, only the class name of the error.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)
REPORT_EVERY = 1.0  # seconds between http_requests_rejected lines at most


class RejectLog:
    """Duck-types the ``logging.Logger`` aiohttp's RequestHandler takes (``debug``,
    ``exception`` and, should a version use them, the other levels)."""

    def __init__(
        self,
        count: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._clock = clock
        self._kinds: collections.Counter[str] = collections.Counter()
        self._next = 0.0

    def _note(self, exc_info: Any) -> None:
        if isinstance(exc_info, BaseException):
            exc: BaseException | None = exc_info
        elif isinstance(exc_info, tuple) and len(exc_info) == 3:
            exc = exc_info[1]
        else:
            exc = sys.exc_info()[1]
        kind = "none" if exc is None else type(exc).__name__
        if self._count is not None:
            self._count(kind)
        self._kinds[kind] += 1
        now = self._clock()
        if now >= self._next:
            self._next = now + REPORT_EVERY
            kinds, self._kinds = dict(self._kinds), collections.Counter()
            log.warning("http_requests_rejected", count=sum(kinds.values()), kinds=kinds)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kw: object) -> None:
        self._note(exc_info)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: object) -> None:
        self._note(exc_info)

    info = warning = error = critical = debug
