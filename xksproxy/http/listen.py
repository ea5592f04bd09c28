"""The proxy's listening sockets other than the XKS API's own: binding them with one clear error,
and the /metrics endpoint (served by each process alone, or by the supervisor for all its
workers)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from aiohttp import web

from xksproxy.config import Config
from xksproxy.errors import OperatorError
from xksproxy.http.rejects import RejectLog
from xksproxy.metrics import MULTIPROC_ENV, Metrics, render, render_multiprocess


class ListenError(OperatorError):
    """A listener could not bind; the message names the address."""


async def listen(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def metrics_app(source: Callable[[], tuple[bytes, str]]) -> web.Application:
    """An aiohttp app serving GET /metrics only, without authentication; *source* renders
    the body and content type (``lambda: render(metrics)``)."""

    async def serve(request: web.Request) -> web.Response:
        # Rendering takes milliseconds (and reads files in multiprocess mode): off the loop.
        body, content_type = await asyncio.to_thread(source)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", serve, allow_head=False)
    return app


async def start_metrics_listener(config: Config, metrics: Metrics | None) -> web.AppRunner:
    """Serve /metrics: of *metrics*, or of every worker's files when *metrics* is None."""
    if metrics is not None:
        source = metrics

        def body() -> tuple[bytes, str]:
            return render(source)
    else:
        directory = os.environ[MULTIPROC_ENV]

        def body() -> tuple[bytes, str]:
            return render_multiprocess(directory)

    runner = web.AppRunner(
        metrics_app(body),
        access_log=None,
        handle_signals=False,
        logger=RejectLog(None if metrics is None else metrics.http_rejected),
    )
    await runner.setup()
    try:
        await listen(
            web.TCPSite(runner, config.metrics.host, config.metrics.port),
            config.metrics.host,
            config.metrics.port,
        )
    except ListenError:
        await runner.cleanup()
        raise
    return runner
