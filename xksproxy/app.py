"""Composition root: builds HSMs, the service, the aiohttp app and its listener; runs them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web_response
import structlog
from aiohttp import web

from xksproxy import __version__, sdnotify
from xksproxy.config import Config, HsmConfig, TlsConfig, kms_client_name
from xksproxy.configfile import load_config
from xksproxy.consistency import KeyConsistency
from xksproxy.credentials import load_credentials
from xksproxy.errors import ConfigError
from xksproxy.hardening import open_files
from xksproxy.health import HealthBoard
from xksproxy.hsm.base import HealthState, ManagedHsm
from xksproxy.hsm.pkcs11_backend import Pkcs11Hsm
from xksproxy.http import mtls
from xksproxy.http.connections import BoundedSite, Bounds, connection_limit
from xksproxy.http.handler import XksHandler, json_response
from xksproxy.http.listen import listen, start_metrics_listener
from xksproxy.http.overload import LoadGuard
from xksproxy.http.rejects import RejectLog
from xksproxy.http.tls import (
    ClientCaError,
    EncryptedKeyError,
    certificate_expiry,
    load_server_cert,
    server_context,
)
from xksproxy.log import AuditWriteError, audit_logger, close_audit_chain, start_audit_chain
from xksproxy.log import reopen as reopen_log
from xksproxy.log import sink as log_sink
from xksproxy.metrics import Metrics
from xksproxy.models import Limits
from xksproxy.service import XksService
from xksproxy.sigv4 import SigV4Verifier
from xksproxy.tenancy import Tenancy, build_tenancy, check_credentials_kept
from xksproxy.workerlink import HEARTBEAT_INTERVAL, WorkerLink

log = structlog.get_logger(__name__)


@dataclass
class Proxy:
    """A running proxy: its HSMs, service and the state that SIGHUP replaces."""

    config: Config
    hsms: list[ManagedHsm]
    service: XksService
    tenancy: Tenancy
    metrics: Metrics
    guard: LoadGuard
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The listening socket's TLS context, None for plain HTTP (set by serve).
    ssl_context: ssl.SSLContext | None = None
    # Leaving: /ping says 503 and every response closes its connection (drain()).
    draining: bool = False
    _reloading: asyncio.Task[None] | None = None
    _reload_wanted: bool = False

    def current_tenancy(self) -> Tenancy:
        return self.tenancy

    def reload(self) -> None:
        """SIGHUP: reopen the log file, if there is one (logrotate renamed it), then reload
        the rest (:meth:`reload_now`) in the background: the files are read off the event
        loop.  A SIGHUP during a reload runs one more once it is done."""
        if (why := reopen_log()) is not None:
            log.error("log_reopen_failed", error=why)
        self._reload_wanted = True
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False
            await self.reload_now()

    async def reload_now(self) -> None:
        """Re-read credentials, prefix settings and policies, and the TLS certificate, key,
        client CAs and client name; keep all the old ones if anything new is bad.  Every file
        is read on a thread (each a regular file under a size cap), so a FIFO or a huge file
        named in the configuration never holds the event loop."""
        audit = audit_logger()
        sink = log_sink()
        if sink is not None and sink.failing:
            # The change would not be in the audit trail: keep what is in force.
            with contextlib.suppress(AuditWriteError):
                audit.error("reload_rejected", problems=["the audit log cannot be written"])
            return
        try:
            try:
                tenancy, fresh = await asyncio.to_thread(self._read_reload)
            except ConfigError:
                raise
            except Exception as exc:  # MemoryError and the like: a rejected reload, said so
                raise ConfigError(
                    [f"reading the configuration failed: {type(exc).__name__}"]
                ) from exc
            if fresh is not None and self.ssl_context is not None:
                # New handshakes use what is loaded here; connections already open keep what
                # they were made with.  Everything loaded once already, in *fresh*, just before.
                tls = fresh[1]
                try:
                    load_server_cert(self.ssl_context, tls)
                    if tls.client_subject_name is not None:
                        mtls.adopt_client_cas(self.ssl_context, fresh[0])
                        mtls.set_client_name(self.ssl_context, tls.client_subject_name)
                except (ssl.SSLError, OSError, mtls.MtlsUnavailable, EncryptedKeyError) as exc:
                    raise ConfigError([f"server.tls: changed while being reloaded: {exc}"]) from exc
                await self.note_certificate_expiry(tls)
        except ConfigError as exc:
            with contextlib.suppress(AuditWriteError):  # counted as a line lost
                audit.error("reload_rejected", problems=exc.problems)
            return
        self.tenancy = tenancy
        self._audit_reload(
            audit,
            tls=None if fresh is None else str(fresh[1].cert_file),
            tls_client_ca=None if fresh is None else _str_or_none(fresh[1].client_ca_file),
            tls_client_name=None if fresh is None else fresh[1].client_subject_name,
            **tenancy.summary(),
        )

    @staticmethod
    def _audit_reload(audit: Any, **fields: Any) -> None:
        """The audit line of an applied reload.  Should the log fail between the check above
        and here, the line is counted as lost and the chain says so (docs/audit.md)."""
        with contextlib.suppress(AuditWriteError):
            audit.info("reload_applied", **fields)

    def _read_reload(self) -> tuple[Tenancy, tuple[ssl.SSLContext, TlsConfig] | None]:
        """Everything a reload reads and checks, on a thread; ConfigError if anything is bad."""
        config = load_config(self.config.path)
        tenancy = build_tenancy(config)
        check_credentials_kept(config, self.tenancy, tenancy)
        return tenancy, self._new_tls(config)

    def _new_tls(self, config: Config) -> tuple[ssl.SSLContext, TlsConfig] | None:
        """A scratch context with the TLS files to serve from now on, once they are shown to
        load; ConfigError if they do not, or if TLS or mutual TLS would be switched on or off
        (a restart)."""
        tls, old = config.server.tls, self.config.server.tls
        if (tls is None) != (self.ssl_context is None):
            raise ConfigError(["server.tls: switching TLS on or off needs a restart"])
        if tls is None:
            return None
        if old is not None and tls.mutual != old.mutual:
            raise ConfigError(["server.tls: switching mutual TLS on or off needs a restart"])
        scratch = tls_context(config)
        assert scratch is not None
        return scratch, tls

    async def note_certificate_expiry(self, tls: TlsConfig) -> None:
        """Put the server certificate's expiry in the metrics (read on a thread)."""
        expiry = await asyncio.to_thread(certificate_expiry, tls.cert_file)
        if expiry is not None:
            self.metrics.tls_certificate_expiry(expiry)

    def tls_client_rejected(self, kind: str, reason: str, subject: str) -> None:
        """A client certificate failed verification: the handshake is being aborted."""
        with contextlib.suppress(AuditWriteError):  # aborted all the same; counted below
            audit_logger().warning("tls_client_rejected", kind=kind, reason=reason, subject=subject)
        self.metrics.tls_client_rejected(kind)


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


OPEN_TIMEOUT = 10.0  # seconds for an HSM to load, log in and open its sessions at start


async def _open(hsm: ManagedHsm, config: HsmConfig) -> None:
    try:
        await hsm.open(config.read_pin(), OPEN_TIMEOUT)
    except Exception as exc:
        log.error("hsm_open_failed", hsm=hsm.name, error=getattr(exc, "detail", str(exc)))


async def open_proxy(config: Config) -> Proxy:
    """Open every HSM at once (one that fails is reported UNAVAILABLE and retried)."""
    metrics = Metrics(hsm_names=[h.name for h in config.hsms], version=__version__)
    guard = LoadGuard(config.server.shed_lag_ms / 1000, config.in_flight_limit)
    hsms: list[ManagedHsm] = [
        Pkcs11Hsm(h, metrics=metrics, overloaded=guard.short_of_cpu) for h in config.hsms
    ]
    await asyncio.gather(*(_open(h, c) for h, c in zip(hsms, config.hsms, strict=True)))
    board = HealthBoard(
        hsms,
        degraded_latency_s=config.health.degraded_latency_ms / 1000,
        degraded_after=config.health.degraded_after,
        recover_after=config.health.recover_after,
        on_change=lambda name, state: metrics.hsm_state(name, state.value),
    )
    consistency = KeyConsistency(
        hsms, on_mismatch=metrics.key_copy_mismatch, on_excluded=metrics.keys_excluded
    )
    service = XksService(
        hsms,
        board=board,
        consistency=consistency,
        on_failover=metrics.failover,
        health_keys=frozenset(h.health_key for h in config.hsms),
        proxy_vendor=config.health.proxy_vendor,
        proxy_model=config.health.proxy_model,
        ekm_vendor=config.health.ekm_vendor,
        fleet_size=config.server.fleet_size,
    )
    return Proxy(config, hsms, service, build_tenancy(config), metrics, guard)


def probe_timeout(config: Config) -> float:
    return max(h.call_timeout_ms for h in config.hsms) / 1000 * 4


async def start_prober(proxy: Proxy) -> None:
    """Probe every HSM once now (so health is real before we listen), then in the background."""
    cfg = proxy.config
    board, consistency = proxy.service.board, proxy.service.consistency
    timeout = probe_timeout(cfg)

    async def recover(hsm: ManagedHsm) -> None:
        # UNAVAILABLE for a while for a reason a reopen may mend (a token restored from backup,
        # a partition re-created, a client restarted): reopen it, and again with backoff until
        # it is back.  Not while a call is stuck in it: C_Finalize must not run under one.
        if (
            board.unavailable_for(hsm.name) >= cfg.health.reopen_unavailable_after_seconds
            and not hsm.pool_stats().stuck
            and not hsm.reopen_pending
        ):
            log.warning(
                "hsm_reopen_unavailable",
                hsm=hsm.name,
                seconds=round(board.unavailable_for(hsm.name)),
            )
            hsm.request_reopen()
        await hsm.recover()

    async def recheck(hsm: ManagedHsm) -> None:
        await consistency.recheck(hsm, asyncio.get_running_loop().time() + timeout)

    # Look the health keys up first, without the probe's time limit: in a big SoftHSM token a
    # search takes longer than a probe may (0.5 s with 10,000 keys), and the first probe must
    # be real.  warm() leaves any error for the probe to report.
    await asyncio.gather(*(h.warm(h.health_key) for h in proxy.hsms))
    await asyncio.gather(*(board.probe_once(h, timeout) for h in proxy.hsms))
    proxy.tasks.append(
        asyncio.create_task(
            board.run(proxy.hsms, cfg.health.interval_seconds, timeout, recover, recheck)
        )
    )
    proxy.tasks.append(asyncio.create_task(sample_pools(proxy)))
    proxy.guard.start()


POOL_SAMPLE_INTERVAL = 1.0


async def sample_pools(proxy: Proxy) -> None:
    """Copy session-pool gauges, HSM states, the log's state and the worker's open descriptors
    into the metrics once a second."""
    board = proxy.service.board
    while True:
        sink = log_sink()
        if sink is not None:
            if sink.failing:
                sink.try_recover()
            proxy.metrics.log_state(not sink.failing, sink.failures)
        files = open_files()
        if files is not None:
            proxy.metrics.open_files(*files)
        for hsm in proxy.hsms:
            hsm.trim_pool()
            s = hsm.pool_stats()
            proxy.metrics.pool_sample(hsm.name, s.idle, s.busy, s.stuck, s.waiting)
            # Also catches a state that went stale (no probe result for 60 s).
            proxy.metrics.hsm_state(hsm.name, board.state(hsm.name).value)
        await asyncio.sleep(POOL_SAMPLE_INTERVAL)


SERVER_HEADER = "xksproxy"  # not aiohttp's default, which names the Python and aiohttp versions

# The default every aiohttp answer takes when it sets no Server header: the app's answers and
# those aiohttp makes itself (a request its parser refused: 400).  aiohttp has no setting for
# it; tests/integration/test_rejected_requests.py checks both kinds of answer.
aiohttp.web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]


def make_app(proxy: Proxy) -> web.Application:
    cfg = proxy.config
    handler = XksHandler(
        proxy.service,
        SigV4Verifier(region=cfg.sigv4.region, max_skew_seconds=cfg.sigv4.max_skew_seconds),
        proxy.current_tenancy,
        limits=Limits(cfg.server.max_plaintext_bytes, cfg.server.max_aad_bytes),
        max_body=cfg.server.max_body_bytes,
        deadline_s=cfg.server.request_deadline_ms / 1000,
        metrics=proxy.metrics,
        guard=proxy.guard,
        draining=lambda: proxy.draining,
    )

    async def ping(request: web.Request) -> web.Response:
        """Load-balancer check: 200 while some HSM can serve and the audit log can be written,
        503 otherwise, and while draining before a stop."""
        board = proxy.service.board
        if proxy.draining:
            resp = json_response(503, {"status": "draining"})
            resp.force_close()
            return resp
        sink = log_sink()
        if sink is not None and sink.failing:
            return json_response(503, {"status": "audit log not writable"})
        serving = any(board.state(h.name) is not HealthState.UNAVAILABLE for h in proxy.hsms)
        return json_response(200 if serving else 503, {"status": "ok" if serving else "no HSM"})

    app = web.Application(client_max_size=cfg.server.max_body_bytes)
    app.router.add_route("GET", "/ping", ping)
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    return app


async def close_proxy(proxy: Proxy) -> None:
    await proxy.guard.stop()
    for task in proxy.tasks:
        task.cancel()
    for task in proxy.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for hsm in proxy.hsms:
        await hsm.close()


CLOSE_TIMEOUT = 5.0  # seconds to close HSM sessions at stop; a hung HSM must not block it


def tls_context(config: Config, on_reject: mtls.RejectHook | None = None) -> ssl.SSLContext | None:
    """The server's TLS context, or None without [server.tls]; ConfigError if unusable."""
    tls = config.server.tls
    if tls is None:
        return None
    try:
        return server_context(tls, on_reject)
    except ClientCaError as exc:
        raise ConfigError(
            [f"server.tls.client_ca_file: cannot load CA certificates from it: {exc}"]
        ) from exc
    except EncryptedKeyError as exc:
        raise ConfigError([f"server.tls.key_file: {exc}"]) from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError([f"server.tls: cannot load the certificate or key: {exc}"]) from exc
    except mtls.MtlsUnavailable as exc:
        raise ConfigError([f"server.tls: mutual TLS cannot be enforced here: {exc}"]) from exc


async def serve(
    config: Config, ready: asyncio.Event | None = None, worker: WorkerLink | None = None
) -> bool:
    """Run the proxy until SIGTERM or SIGINT; SIGHUP reloads credentials and prefixes.

    As one of several *worker* processes it shares the port (SO_REUSEPORT), leaves /metrics
    to the supervisor, reports when it listens, and stops when the supervisor goes away.
    Returns False when HSM calls were still hung at the end: the caller must then exit without
    waiting for their threads.
    """
    tls_context(config)  # fail before opening HSMs; the listener's context is made below
    tls = config.server.tls
    kms_name = kms_client_name(config.sigv4.region)
    if tls and tls.client_subject_name not in (None, kms_name) and not (worker and worker.index):
        log.warning(
            "tls_client_name_not_kms",
            client_subject_name=tls.client_subject_name,
            kms_presents=kms_name,
            note="KMS's client certificate will be refused; fine for a test rig",
        )
    if config.server.fleet_size > 1 and not config.server.drain_seconds and not worker:
        log.warning(
            "no_drain_in_fleet",
            fleet_size=config.server.fleet_size,
            note="server.drain_seconds = 0: a restart fails the requests the load balancer "
            "still sends here; set it above the balancer's time to take a proxy out",
        )
    chain_key = config.logging.read_chain_key()
    if chain_key is not None:
        start_audit_chain(chain_key)  # before any request line; ConfigError if unusable
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    proxy = await open_proxy(config)
    proxy.ssl_context = ssl_context = tls_context(config, proxy.tls_client_rejected)
    if tls is not None:
        await proxy.note_certificate_expiry(tls)
    # Before listening: a signal that comes while the proxy starts must not kill it.
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    runners: list[web.AppRunner] = []
    try:
        await start_prober(proxy)
        runner = web.AppRunner(
            make_app(proxy),
            access_log=None,
            handle_signals=False,
            logger=RejectLog(proxy.metrics.http_rejected),
            keepalive_timeout=config.server.idle_timeout_seconds,
        )
        await runner.setup()
        runners.append(runner)
        max_connections, files = connection_limit(config.server.max_connections)
        if max_connections < config.server.max_connections:
            log.warning(
                "max_connections_lowered",
                configured=config.server.max_connections,
                max_connections=max_connections,
                open_file_limit=files,
            )
        site = BoundedSite(
            runner,
            config.server.host,
            config.server.port,
            Bounds(
                header_timeout=config.server.header_timeout_seconds,
                handshake_timeout=config.server.handshake_timeout_seconds,
                max_connections=max_connections,
            ),
            on_close=proxy.metrics.connection_closed,
            backlog=1024,
            ssl_context=ssl_context,
            reuse_port=worker is not None,
        )
        await listen(site, config.server.host, config.server.port)
        if config.metrics.enabled and worker is None:
            runners.append(await start_metrics_listener(config, proxy.metrics))
        if worker is None:
            log.info(
                "listening",
                metrics=f"{config.metrics.host}:{config.metrics.port}"
                if config.metrics.enabled
                else None,
                tls=ssl_context is not None,
                host=config.server.host,
                port=config.server.port,
                prefixes=sorted(proxy.tenancy.credentials),
            )
            sdnotify.notify("READY=1", f"STATUS=serving on {config.server.port}")
        else:
            _follow_supervisor(loop, worker, stop)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
        if worker is None:
            sdnotify.notify("STOPPING=1")
        await drain(proxy, config.server.drain_seconds)
    finally:
        for r in runners:
            await r.cleanup()
        close_audit_chain()  # after the last request line: in-flight requests have drained
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(close_proxy(proxy), CLOSE_TIMEOUT)
        clean = all(h.pool_stats().stuck == 0 for h in proxy.hsms)
        if not clean:
            log.warning(
                "hsm_calls_still_hung_at_exit",
                hsms=[h.name for h in proxy.hsms if h.pool_stats().stuck],
            )
    return clean


async def drain(proxy: Proxy, seconds: float) -> None:
    """Leave the load balancer before stopping: for *seconds*, /ping says 503 (the balancer
    takes the proxy out) and every response carries ``Connection: close`` (keep-alive clients
    reconnect, through the balancer, elsewhere), while every request is still served.  A
    second SIGTERM or SIGINT ends it at once.  The listener closes after it, and requests in
    flight are answered then."""
    if seconds <= 0:
        return
    proxy.draining = True
    cut = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cut.set)
    log.info("draining", seconds=seconds)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(cut.wait(), seconds)
    log.info("drained", cut_short=cut.is_set())


def _follow_supervisor(
    loop: asyncio.AbstractEventLoop, worker: WorkerLink, stop: asyncio.Event
) -> None:
    """Report readiness, then beat once a second from this event loop (the supervisor's
    watchdog); stop when the supervisor's end of the life pipe closes."""

    def supervisor_gone() -> None:
        if not os.read(worker.life_fd, 64):  # end of file: the supervisor exited
            loop.remove_reader(worker.life_fd)
            log.error("supervisor_gone")
            stop.set()

    os.set_blocking(worker.life_fd, False)
    loop.add_reader(worker.life_fd, supervisor_gone)
    if not worker.report_ready():
        log.error("supervisor_gone")
        stop.set()
        return

    def beat() -> None:
        worker.beat()
        loop.call_later(HEARTBEAT_INTERVAL, beat)

    beat()


@dataclass(frozen=True)
class HsmCheck:
    """What ``xksproxy check`` found of one HSM."""

    name: str
    model: str
    state: str  # HealthState's value
    detail: str
    gcm_detail: str
    key_problems: dict[str, tuple[str, ...]]  # keys that cannot serve whole, and why


async def check(config: Config) -> list[HsmCheck]:
    """Open every HSM as the proxy would, probe each once and look over its keys (``xksproxy
    check``); the credentials file and every PIN are read first (ConfigError if one cannot)."""
    load_credentials(config.sigv4.credentials_file)
    for hsm_config in config.hsms:
        hsm_config.read_pin()
    proxy = await open_proxy(config)
    found = []
    try:
        for hsm in proxy.hsms:
            rec = await proxy.service.board.probe_once(hsm, probe_timeout(config))
            state = rec.state.value
            problems = {} if state == "UNAVAILABLE" else await hsm.key_problems()
            found.append(HsmCheck(hsm.name, hsm.model, state, rec.detail, hsm.gcm_detail, problems))
    finally:
        await close_proxy(proxy)
    return found
