"""The generator's engine: one process, raw asyncio, cheap per request.

Keep-alive HTTP/1.1 connections to 127.0.0.1, one request in flight per connection (no
pipelining).  Requests are pre-built bytes (:mod:`loadtest.presign`); a response is framed by
its status line and ``Content-Length`` only, and its JSON body is read only when the status is
not 200 (for ``errorName``).  Everything after a response happens in the protocol callback: no
task, future or coroutine per request.

- **closed loop**: every connection sends its next request as soon as a response arrives;
  latency is measured from the send.
- **open loop**: request *g* is due at ``start + g / rate``, whatever happened before; a due
  request goes out on a free connection or waits in the generator for one, and its latency is
  measured from the time it was due (coordinated omission is not hidden).

A connection the server closes is replaced; the request it carried counts as an error
(``ConnectionLost``).  Requests still unanswered ``grace`` seconds after the run count as
``NoResponse``.  uvloop is used when it can be imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from loadtest.presign import Pool
from loadtest.stats import Samples

clock = time.perf_counter
EARLY = 0.001  # open loop: a request may be sent this much before it is due (timer resolution)


class ProtocolError(Exception):
    """A response the engine cannot frame (no Content-Length, bytes after the body)."""


class ResponseParser:
    """Frames HTTP/1.1 responses fed in arbitrary pieces: (status, body) once one is whole."""

    __slots__ = ("_body_at", "_buf", "_end", "_status", "closes")

    def __init__(self) -> None:
        self._buf = b""
        self._end = -1  # offset just past the body, once the head has been read
        self._body_at = 0
        self._status = 0
        self.closes = False  # the last error response said "Connection: close"

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        buf = self._buf + data if self._buf else data
        if self._end < 0:
            head = buf.find(b"\r\n\r\n")
            if head < 0:
                self._buf = buf
                return None
            self._status = int(buf[9:12])
            # Only error responses are searched: cheap, and aiohttp keeps a 200's connection.
            self.closes = self._status != 200 and b"\r\nconnection: close" in buf[:head].lower()
            self._body_at = head + 4
            self._end = self._body_at + content_length(buf, head)
        if len(buf) < self._end:
            self._buf = buf
            return None
        if len(buf) > self._end:
            raise ProtocolError("bytes after the response, which was not asked for")
        out = (self._status, buf[self._body_at : self._end])
        self._buf = b""
        self._end = -1
        return out


def content_length(buf: bytes, head_end: int) -> int:
    """The Content-Length of the response head ending at *head_end*."""
    at = buf.find(b"\r\nContent-Length:", 0, head_end)
    if at < 0:
        at = buf[:head_end].lower().find(b"\r\ncontent-length:")
        if at < 0:
            raise ProtocolError("a response without Content-Length")
    start = at + 17
    return int(buf[start : buf.find(b"\r\n", start, head_end + 2)])


def error_name(status: int, body: bytes) -> str:
    """The errorName of an error response, else ``HTTP <status>``."""
    try:
        name = json.loads(body).get("errorName")
    except (ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) else f"HTTP {status}"


class _Conn(asyncio.Protocol):
    __slots__ = ("busy", "parser", "run", "t0", "tag", "transport")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.tag = 0  # API number, or the request's index when fetching
        self.t0 = 0.0  # when the request was sent (closed) or due (open)
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, tag: int, raw: bytes, t0: float) -> None:
        assert self.transport is not None
        self.tag = tag
        self.t0 = t0
        self.busy = True
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        try:
            got = self.parser.feed(data)
        except (ProtocolError, ValueError):
            self.run.fail(self, "BadResponse")
            return
        if got is not None:
            self.busy = False
            self.run.done(self, got[0], got[1])

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self)


class _Run:
    """Connections and the bookkeeping shared by every kind of run."""

    def __init__(self, host: str, port: int, pool: Pool) -> None:
        self.host = host
        self.port = port
        self.apis = pool.apis
        self.raws = pool.raws
        self.samples = Samples.empty(pool.names)
        self.conns: list[_Conn] = []
        self.busy = 0
        self.ending = False  # no new requests will be started
        self.reconnecting = 0
        self.closing = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
            self.conns.append(conn)

    def send(self, conn: _Conn, i: int, t0: float) -> None:
        self.busy += 1
        self.samples.sent += 1
        conn.send(self.apis[i], self.raws[i], t0)

    def done(self, conn: _Conn, status: int, body: bytes) -> None:
        now = clock()
        self.busy -= 1
        s = self.samples
        s.latencies[conn.tag].append(now - conn.t0)
        s.ended = now
        if status != 200:
            s.statuses[status] += 1
            s.errors[error_name(status, body)] += 1
            if conn.parser.closes:
                assert conn.transport is not None
                conn.transport.close()  # as the server asked: lost() replaces it
                return
        self.next(conn, now)

    def next(self, conn: _Conn, now: float) -> None:
        """Give a connection that is free again its next request, or let it rest."""
        raise NotImplementedError

    def check_finished(self) -> None:
        if self.ending and not self.busy and not self.reconnecting and not self.finished.done():
            self.finished.set_result(None)

    def fail(self, conn: _Conn, name: str) -> None:
        """The response on *conn* was unreadable: count it and drop the connection."""
        self._count_failure(conn, name)
        assert conn.transport is not None
        conn.transport.abort()

    def _count_failure(self, conn: _Conn, name: str) -> None:
        if conn.busy:
            conn.busy = False
            self.busy -= 1
            self.samples.statuses[0] += 1
            self.samples.errors[name] += 1

    def lost(self, conn: _Conn) -> None:
        self._count_failure(conn, "ConnectionLost")
        if conn in self.conns:
            self.conns.remove(conn)
            self.forget(conn)
        if self.closing:
            return
        self.reconnecting += 1
        task = asyncio.get_running_loop().create_task(self._replace())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, conn: _Conn) -> None:
        """Drop a lost connection from any list of free ones."""

    def unsent(self) -> int:
        """Requests still waiting in the generator for a connection."""
        return 0

    async def _replace(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.samples.errors["ConnectFailed"] += 1
        else:
            self.samples.reconnects += 1
            self.conns.append(conn)
            self.next(conn, clock())
        finally:
            self.reconnecting -= 1
            self.check_finished()

    async def finish(self, timeout: float) -> None:
        """Wait up to *timeout* for the requests in flight, then close every connection."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.finished), timeout)
        self.closing = True
        unanswered = self.busy + self.unsent()
        if unanswered:
            self.samples.statuses[0] += unanswered
            self.samples.errors["NoResponse"] += unanswered
            self.busy = 0
        for conn in self.conns:
            conn.busy = False  # counted above, not again when the connection is closed
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self._tasks):
            task.cancel()


class ClosedRun(_Run):
    """Each connection sends again as soon as its response is in, until the time is up."""

    def __init__(self, host: str, port: int, pool: Pool, first: int, budget: int) -> None:
        super().__init__(host, port, pool)
        self.index = first % len(pool.raws)
        self.budget = budget or -1  # -1: unlimited
        self.stop_at = 0.0

    def start(self, at: float, duration: float) -> None:
        self.samples.started = at
        self.stop_at = at + duration
        for conn in self.conns:
            self.next(conn, at)

    def next(self, conn: _Conn, now: float) -> None:
        if now >= self.stop_at or self.budget == 0:
            self.ending = True
            self.check_finished()
            return
        self.budget -= 1
        i = self.index
        self.index = i + 1 if i + 1 < len(self.raws) else 0
        self.send(conn, i, now)


class OpenRun(_Run):
    """Requests ``offset, offset + stride, ...`` of a fixed-rate schedule of *total*."""

    def __init__(
        self, host: str, port: int, pool: Pool, rate: float, total: int, offset: int, stride: int
    ) -> None:
        super().__init__(host, port, pool)
        self.rate = rate
        self.due = range(offset, total, stride)
        self.free: list[_Conn] = []
        self.waiting: deque[tuple[int, float]] = deque()  # (request number, due time)

    def forget(self, conn: _Conn) -> None:
        if conn in self.free:
            self.free.remove(conn)

    async def drive(self, at: float) -> None:
        """Issue every request when due (sleeping in between) until the schedule is done.

        The event loop's timers have a resolution of 1 ms, so a request may go out up to
        :data:`EARLY` before it is due rather than late.  Latency runs from ``min(due, sent)``:
        from the actual send of an early request (never shorter than the server's time), and
        from the due time of a late one (the wait, for a connection or the generator, counts).
        """
        self.samples.started = at + self.due.start / self.rate if self.due else at
        self.free = list(self.conns)
        s = self.samples
        rate = self.rate
        for g in self.due:
            due = at + g / rate
            now = clock()
            if due - now > EARLY:
                await asyncio.sleep(due - now - EARLY)
                now = clock()
            if now > due:
                lag = now - due
                s.lag_sum += lag
                if lag > s.lag_max:
                    s.lag_max = lag
            if self.free:
                self.send(self.free.pop(), g % len(self.raws), min(now, due))
            else:
                self.waiting.append((g, due))
        self.ending = True
        self.check_finished()

    def next(self, conn: _Conn, now: float) -> None:
        if self.waiting:
            g, due = self.waiting.popleft()
            self.send(conn, g % len(self.raws), min(now, due))
        else:
            self.free.append(conn)
            self.check_finished()

    def check_finished(self) -> None:
        if not self.waiting:
            super().check_finished()

    def unsent(self) -> int:
        return len(self.waiting)


class FetchRun(_Run):
    """Send each request of the pool once; keep every response (status, body) in order."""

    def __init__(self, host: str, port: int, pool: Pool) -> None:
        super().__init__(host, port, pool)
        self.index = 0
        self.responses: list[tuple[int, bytes]] = [(0, b"")] * len(pool.raws)

    def start(self) -> None:
        for conn in list(self.conns):
            self.next(conn, clock())

    def done(self, conn: _Conn, status: int, body: bytes) -> None:
        self.responses[conn.tag] = (status, body)
        self.busy -= 1
        self.next(conn, clock())

    def next(self, conn: _Conn, now: float) -> None:
        if self.index >= len(self.raws):
            self.ending = True
            self.check_finished()
            return
        i = self.index
        self.index += 1
        self.busy += 1
        conn.send(i, self.raws[i], now)


@dataclass(frozen=True)
class Share:
    """One generator process's part of a run."""

    mode: str  # "closed" | "open"
    connections: int
    duration: float
    rate: float = 0.0  # open: the whole run's rate (requests per second)
    total: int = 0  # open: requests in the whole run's schedule
    offset: int = 0  # open: this share's first request number; closed: first pool slot
    stride: int = 1  # open: number of shares
    requests: int = 0  # closed: this share's budget (0: unlimited)
    grace: float = 5.0


async def run_share(
    host: str, port: int, pool: Pool, share: Share, sync: Callable[[], float]
) -> Samples:
    """Open the connections, call *sync* for the start time, run, and return the samples."""
    run: ClosedRun | OpenRun
    if share.mode == "closed":
        run = ClosedRun(host, port, pool, share.offset, share.requests)
    else:
        run = OpenRun(host, port, pool, share.rate, share.total, share.offset, share.stride)
    try:
        await run.connect(share.connections)
        at = sync()
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu = time.process_time()
        if isinstance(run, ClosedRun):
            run.start(at, share.duration)
            await run.finish(share.duration + share.grace)
        else:
            await run.drive(at)
            await run.finish(share.grace)
        run.samples.cpu = time.process_time() - cpu
    finally:
        run.closing = True
        for conn in run.conns:
            if conn.transport is not None:
                conn.transport.close()
    return run.samples


async def fetch(host: str, port: int, pool: Pool, connections: int) -> list[tuple[int, bytes]]:
    """Send every request of *pool* once; the responses in pool order."""
    if not pool.raws:
        return []
    run = FetchRun(host, port, pool)
    await run.connect(min(connections, len(pool.raws)))
    run.start()
    await run.finish(60.0)
    return run.responses


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else asyncio's default."""
    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
