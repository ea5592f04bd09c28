"""Bounds on every connection, before any request is authenticated.

aiohttp alone holds a silent connection, or one trickling its headers a byte every few
seconds, for as long as the client likes, and asyncio gives a TLS handshake 60 s: a few
thousand such connections cost the real requests their latency (1,500 stalled handshakes made
the next request take 1.19 s, against KMS's 250 ms).  So each worker's listening site
(:class:`BoundedSite`):

- gives a TLS handshake ``handshake_timeout_seconds`` (asyncio's ``ssl_handshake_timeout``);
- gives each request's headers ``header_timeout_seconds`` from the first byte of the request
  (from the connection, for the first): :class:`Deadlines` wraps aiohttp's protocol and watches
  the bytes for the blank line that ends a header block, a request's body being bounded
  by the handler's own body timeout;
- closes a connection idle between requests after ``idle_timeout_seconds`` (aiohttp's
  keep-alive timeout);
- takes at most ``max_connections`` connections at once, and never more than the open-file
  limit less :data:`RESERVED_FDS` (:func:`connection_limit`): one more is closed as soon as it
  is made (after its handshake, with TLS), without a byte read, so ``accept()`` never runs out
  of descriptors and nothing else does (the HSM module's files, the log).

Each connection closed for one of these reasons is counted in
``xks_connections_closed_total{reason}``; none is logged one by one (they come unauthenticated).
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

HEADER_END = b"\r\n\r\n"
# Descriptors kept for everything but client connections: the HSM module's files and sockets,
# the log, the metrics files, pipes.  Connections get the rest of the open-file limit at most.
RESERVED_FDS = 256
MIN_CONNECTIONS = 16


def connection_limit(configured: int) -> tuple[int, int]:
    """The connections a worker may hold: *configured*, or fewer so that accepting one never
    fails for want of a descriptor (an EMFILE outage); and the open-file limit it came from."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured, soft
    return min(configured, max(MIN_CONNECTIONS, soft - RESERVED_FDS)), soft


@dataclass(frozen=True)
class Bounds:
    header_timeout: float
    handshake_timeout: float
    max_connections: int


class Deadlines(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a header deadline and a connection cap."""

    def __init__(self, inner: asyncio.Protocol, site: BoundedSite) -> None:
        self._inner = inner
        self._site = site
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a blank line split across reads
        self._counted = False

    # ---- the deadline ----------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._site.bounds.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._site.closed("header_timeout")
        if self._transport is not None:
            self._transport.abort()

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have abort().
        self._transport = cast(asyncio.Transport, transport)
        if self._site.active >= self._site.bounds.max_connections:
            self._site.closed("too_many_connections")
            self._transport.abort()
            return
        self._site.active += 1
        self._counted = True
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # Where the last header block in these bytes ends (a blank line may straddle the
        # previous read: only its last 3 bytes are joined on, never the whole buffer, which
        # may be a 256 KB body).
        tail = self._tail
        end = data.rfind(HEADER_END)
        if end >= 0:
            end += len(HEADER_END)
        else:
            joint = tail + data[:3]
            at = joint.rfind(HEADER_END)
            end = at + len(HEADER_END) - len(tail) if at >= 0 else -1
        if end < 0:
            self._arm()
        else:
            self._disarm()  # a header block ended; bytes after it arm the next deadline
            if end < len(data):
                self._arm()
        self._tail = data[-3:] if len(data) >= 3 else (tail + data)[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._site.active -= 1
            self._counted = False
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class BoundedSite(web.TCPSite):
    """aiohttp's TCPSite, with the bounds above on every connection."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        bounds: Bounds,
        on_close: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.bounds = bounds
        self.active = 0  # connections made and not yet lost
        self._on_close = on_close

    def closed(self, reason: str) -> None:
        if self._on_close is not None:
            self._on_close(reason)

    async def start(self) -> None:
        # TCPSite.start, with the protocol wrapped and the TLS handshake bounded.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            return Deadlines(server(), self)

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.bounds.handshake_timeout
            if self._ssl_context is not None
            else None,
        )
