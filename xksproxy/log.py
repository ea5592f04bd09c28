"""structlog set-up: one JSON object per line on stdout, with a redaction safety net.

Call sites never pass plaintext, AAD, key material, PINs or secrets; the redaction processor
is the second line of defence should one ever try (a test drives every API and scans the log).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from xksproxy.audit_chain import (
    CHAIN_CLOSED,
    CHAIN_STARTED,
    CHAINED_EVENTS,
    LOG_RECOVERED,
    AuditChain,
)

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


_sensitive_names: dict[str, bool] = {}  # field name -> whether it is sensitive (any case)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any sensitive field, whatever the call site passed."""
    known = _sensitive_names
    for name in event:
        sensitive = known.get(name)
        if sensitive is None:
            sensitive = name.lower() in SENSITIVE_FIELDS
            if len(known) < 1024:  # call sites use a fixed set of names; stay bounded anyway
                known[name] = sensitive
        if sensitive:
            event[name] = REDACTED
    return event


def _json_fallback(obj: Any) -> Any:
    return repr(obj)


# One encoder for every line: json.dumps with any non-default argument builds a new one per call.
_encode = json.JSONEncoder(default=_json_fallback, ensure_ascii=True).encode


def _serialize(obj: Any, **_: Any) -> str:
    return _encode(obj)


# This process's audit chain (docs/audit.md), once start_audit_chain has run.
_chain: AuditChain | None = None
_worker: int | None = None  # this worker's index (configure)
_TIMESTAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _add_worker(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add this worker's index to a line (structlog's lines, and the recovery line)."""
    if _worker is not None:
        event["worker"] = _worker
    return event


# The audit logger: the same lines and output as every other, whatever the level (configure).
_audit: Any = None


def audit_logger() -> Any:
    """The logger of the audit trail (``xks_request`` and the chain's own lines): written at
    every configured level.  Before :func:`configure`, structlog's default logger."""
    return _audit if _audit is not None else structlog.get_logger("xksproxy.audit")


@dataclass(frozen=True)
class _ToSeal:
    """A chained event on its way to the sink, which seals and writes it under one lock: the
    chain's order is the file's order, whichever thread logs."""

    chain: AuditChain
    event: MutableMapping[str, Any]


def _render(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> str | tuple[tuple[_ToSeal], dict[str, Any]]:
    """The line: JSON; for an audit event of a process with a chain, the event to seal (the
    logger is then called with it alone)."""
    chain = _chain
    if chain is not None and event.get("event") in CHAINED_EVENTS:
        return (_ToSeal(chain, event),), {}
    return _encode(event)


def start_audit_chain(key: bytes) -> None:
    """Chain this process's audit lines from now on; the first is ``audit_chain_started``.

    Call on the event loop's thread: chained lines are written from it alone, so a line's MAC
    and its write are never separated by another chained line.
    """
    global _chain
    chain = AuditChain(key, encode=_encode)
    _chain = chain
    audit_logger().info(CHAIN_STARTED, **chain.started_fields())


def close_audit_chain() -> None:
    """Write the signed ``audit_chain_closed`` line of an orderly stop (the end is intact)."""
    global _chain
    chain = _chain
    if chain is not None:
        audit_logger().info(CHAIN_CLOSED, lines=chain.seq + 1)
        _chain = None


class AuditWriteError(Exception):
    """An audit line could not be written (ENOSPC, EIO, ...): the request must fail closed."""


class LineSink:
    """The file descriptor every log line goes to, one ``os.write`` a line, and whether the
    last line got there.

    Unbuffered on purpose: a buffered stream keeps what a full disk refused and writes it
    later, out of order, behind the lines that followed.  While writes fail the sink is
    *failing* (``failing_since``); audit lines then raise :class:`AuditWriteError`, other lines
    are dropped and counted.  :meth:`try_recover` (once a second) writes a line saying the log
    is writable again, after a newline that ends a line the full disk may have torn.
    """

    def __init__(self, put: Callable[[bytes], None]) -> None:
        self._put = put  # writes all of the bytes or raises OSError
        self.path: Path | None = None  # the log file, when lines go to one (reopen)
        self._fd: int | None = None
        self.failing_since: float | None = None
        self.failures = 0  # lines not written since start
        # The chained line whose write failed (its seq), until the recovery line says so.
        self.chain_lost: int | None = None
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def write(self, line: str) -> bool:
        """Write one line; False (counted) if it could not be written whole."""
        data = (line + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                self._put(data)
            except OSError:
                self._failed()
                return False
        return True

    def write_sealed(self, chain: AuditChain, event: MutableMapping[str, Any]) -> bool:
        """Seal *event* in *chain* and write it, under the lock.  While the log is failing a
        chained line is not even tried: the chain has lost a line, and only the recovery line
        (:meth:`try_recover`), which says which one, may follow it."""
        with self._lock:
            if self.failing_since is not None and self.chain_lost is not None:
                self.failures += 1
                return False
            line = chain.seal(event)
            try:
                self._put((line + "\n").encode("utf-8", "replace"))
            except OSError:
                self._failed()
                self.chain_lost = chain.seq
                return False
        return True

    def _failed(self) -> None:
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def open_file(self, path: Path) -> None:
        """Send every line to *path* (appended; created 0640) from now on, closing the file
        used before: at start, and on SIGHUP after logrotate renamed it.  OSError if it cannot
        be opened (the lines then keep going where they went)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        with self._lock:
            old, self._fd, self.path = self._fd, fd, path
            self._put = fd_writer(fd)
        if old is not None:
            os.close(old)

    def try_recover(self) -> bool:
        """While failing: write the recovery line; True once the log is writable again.  With
        an audit chain it is chained, and names the chained line that was lost (its seq, and
        the MAC the chain resumes from: docs/audit.md)."""
        if self.failing_since is None:
            return True
        event: dict[str, Any] = {
            "event": LOG_RECOVERED,
            "level": "warning",
            "lines_lost": self.failures,
            "seconds": round(time.monotonic() - self.failing_since, 1),
        }
        _add_worker(None, "", _TIMESTAMP(None, "", event))  # as structlog's lines have them
        with self._lock:
            chain = _chain
            if chain is not None and self.chain_lost is not None:
                event.update(chain_lost=self.chain_lost, chain_resume=chain.last_mac)
            state = None if chain is None else chain.state()
            line = _encode(event) if chain is None else chain.seal(event)
            try:
                self._put(("\n" + line + "\n").encode())
            except OSError:
                if chain is not None and state is not None:
                    chain.restore(state)  # tried again, as the same line, next time
                return False
            self.failing_since = None
            self.chain_lost = None
        return True


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """Write all of some bytes to *fd*, unbuffered (one write a line, unless the kernel cuts)."""

    def put(data: bytes) -> None:
        while data:
            data = data[os.write(fd, data) :]

    return put


def stream_writer(stream: TextIO) -> Callable[[bytes], None]:
    """Write to a text stream without a file descriptor (a test's StringIO), flushed."""

    def put(data: bytes) -> None:
        stream.write(data.decode("utf-8"))
        stream.flush()

    return put


class _SinkLogger:
    """structlog's logger interface (every level calls ``msg``) over a :class:`LineSink`."""

    def __init__(self, sink: LineSink, audit: bool) -> None:
        self._sink = sink
        self._audit = audit

    def msg(self, message: str | _ToSeal) -> None:
        if isinstance(message, _ToSeal):
            written = self._sink.write_sealed(message.chain, message.event)
        else:
            written = self._sink.write(message)
        if not written and self._audit:
            raise AuditWriteError("the audit log cannot be written")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _SinkStream:
    """A text stream for the standard library's logging handler, over the sink."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def write(self, text: str) -> int:
        if text.strip():
            self._sink.write(text.rstrip("\n"))
        return len(text)

    def flush(self) -> None:
        pass


_sink: LineSink | None = None


def reopen() -> str | None:
    """Reopen the log file (SIGHUP, after logrotate renamed it); why not, or None.  Without
    a log file there is nothing to reopen."""
    current = _sink
    if current is None or current.path is None:
        return None
    try:
        current.open_file(current.path)
    except OSError as exc:
        return f"{current.path}: {exc.strerror}"
    return None


def sink() -> LineSink | None:
    """The sink of this process's log lines, once :func:`configure` has run."""
    return _sink


def configure(
    level: str = "info",
    stream: TextIO | None = None,
    worker: int | None = None,
    file: Path | None = None,
) -> None:
    """Route structlog and the standard library's logging to JSON lines on *stream*; a
    *worker* process adds its index to every line.

    Each line is written and flushed as it is made (the audit line of a request reaches the
    file or pipe before its response is sent).  The chain is kept short: the audit line is
    on every request's path.
    """
    out = stream or sys.stdout
    out.flush()  # what was written through the stream goes first: lines go by fd from here
    global _sink
    try:
        put = fd_writer(out.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation: no descriptor (a StringIO)
        put = stream_writer(out)
    _sink = LineSink(put)
    if file is not None:
        _sink.open_file(file)  # OSError: the caller reports it
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [structlog.processors.add_log_level, _TIMESTAMP, redact]
    global _worker
    _worker = worker
    if worker is not None:
        shared.append(_add_worker)
    processors = [*shared, structlog.processors.format_exc_info, _render]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _SinkLogger(_sink, audit=False),
        cache_logger_on_first_use=False,
    )
    # The audit trail is not subject to the level (a "warning" level must not silence it), and
    # a line it cannot write fails the request (AuditWriteError).
    global _audit
    _audit = structlog.wrap_logger(
        _SinkLogger(_sink, audit=True),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    # A record logging cannot write must not print a traceback to stderr in turn.
    logging.raiseExceptions = False
    handler = logging.StreamHandler(_SinkStream(_sink))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=_serialize),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").disabled = True  # the audit line replaces it
