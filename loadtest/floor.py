"""The floor: an aiohttp hello-world POST server, the fastest any aiohttp proxy could be here.

    python -m loadtest.floor --port 8300 --workers 2

Every POST (any path) has its body read and gets a small JSON answer; nothing is checked
(SigV4 neither), so the generator drives it with the proxy's own request bytes.  ``--workers
N`` runs N processes sharing the port with SO_REUSEPORT, as the proxy's workers do; no access
log.  SIGTERM or SIGINT stops every worker.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
from types import FrameType

from aiohttp import web

BODY = b'{"floor":true}'


async def answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def serve(host: str, port: int) -> None:
    """Serve on host:port (SO_REUSEPORT) until SIGTERM or SIGINT."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    web.run_app(
        app, host=host, port=port, reuse_port=True, access_log=None, print=None, handle_signals=True
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    if args.workers <= 1:
        serve(args.host, args.port)
        return 0
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=serve, args=(args.host, args.port), daemon=True)
        for _ in range(args.workers)
    ]

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    except KeyboardInterrupt:
        pass
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()  # SIGTERM: aiohttp shuts down cleanly
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
