"""Every Prometheus metric of the proxy, on a registry passed in (never the global one).

Label values are bounded: HSM names come from the configuration (capped at
``MAX_HSM_LABELS`` distinct values), and every other label is a fixed set, anything outside
it counted as ``other`` (``CKR_OTHER`` for PKCS#11 return codes).  No key id is ever a label.

Multiprocess mode (several workers on one port): prometheus-client decides at import time,
from the environment variable ``PROMETHEUS_MULTIPROC_DIR``, whether values live in memory or
in per-process files in that directory.  So the variable must be set before the process
starts (or before anything imports ``prometheus_client``), and the directory must be emptied
at service start (:func:`prepare_multiprocess_dir`), or counts of an earlier run are added
in.  :func:`render` then sums the files of all processes.  Two :class:`Metrics` objects in
one process share their values in this mode, as the files are keyed by process only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from xksproxy.errors import ERROR_TABLE

if TYPE_CHECKING:
    pass

__all__ = [
    "APIS",
    "AUTH_REASONS",
    "BUCKETS",
    "CKR_NAMES",
    "CONTENT_TYPE",
    "HSM_CALLS",
    "HSM_STATES",
    "MAX_HSM_LABELS",
    "MULTIPROC_ENV",
    "Metrics",
    "mark_worker_dead",
    "prepare_multiprocess_dir",
    "render",
    "render_multiprocess",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format: every Prometheus 2.x and 3.x parses it.  Newer prometheus-client
# announces version=1.0.0, which older scrapers and proxies may not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# KMS allows 250 ms per call: fine steps below 10 ms (SoftHSM answers in tens of µs), and
# enough steps around the 150-250 ms deadline to see requests crowding it.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0)

OTHER = "other"
CONNECTION_CLOSE_REASONS = ("header_timeout", "too_many_connections")
# aiohttp.http_exceptions' classes, and what else its request handler logs a connection for.
HTTP_REJECT_KINDS = frozenset(
    {
        "BadHttpMessage",
        "BadHttpMethod",
        "BadStatusLine",
        "LineTooLong",
        "InvalidHeader",
        "InvalidURLError",
        "TransferEncodingError",
        "ContentLengthError",
        "ContentEncodingError",
        "PayloadEncodingError",
        "HttpProcessingError",
        "HTTPException",
        "ConnectionError",
        "ConnectionResetError",
        "none",
    }
)
CKR_OTHER = "CKR_OTHER"
NO_ERROR = "none"  # error_name of a successful request
MAX_HSM_LABELS = 32  # config allows 10; room for renames across reloads, still bounded

APIS = ("metadata", "encrypt", "decrypt", "health")
HSM_CALLS = (
    "encrypt",
    "decrypt",
    "find_key",
    "gcm_probe",
    "index",
    "kat",
    "kcv",
    "open_session",
)
HSM_STATES = ("ACTIVE", "DEGRADED", "UNAVAILABLE")
POOL_STATES = ("idle", "busy", "stuck")
AUTHZ_DECISIONS = frozenset({"allow", "deny", "would_deny"})
TLS_REJECT_KINDS = ("name", "expired", "untrusted", "purpose", OTHER)
STATUSES = frozenset({200, 400, 401, 403, 404, 405, 413, 429, 500, 501, 503})
ERROR_NAMES = frozenset(ERROR_TABLE)
# The reasons xksproxy.sigv4 gives (a test keeps this in step with that module).
AUTH_REASONS = frozenset(
    {
        "bad_x_amz_date",
        "clock_skew",
        "host_not_signed",
        "malformed_authorization",
        "malformed_request",
        "missing_authorization",
        "missing_x_amz_date",
        "multiple_authorization",
        "scope_date_mismatch",
        "signature_mismatch",
        "signed_header_missing",
        "signed_headers_not_canonical",
        "unknown_access_key",
        "unsupported_algorithm",
        "wrong_region",
        "wrong_service",
        "x_amz_date_not_signed",
    }
)
# Every return value PKCS#11 3.0 names (not only those xksproxy.hsm.pkcs11_errors maps today,
# so adding a row there needs no change here), plus the proxy's own TIMEOUT.
_PKCS11_RETURN_VALUES = """
    CANCEL HOST_MEMORY SLOT_ID_INVALID GENERAL_ERROR FUNCTION_FAILED ARGUMENTS_BAD NO_EVENT
    NEED_TO_CREATE_THREADS CANT_LOCK ATTRIBUTE_READ_ONLY ATTRIBUTE_SENSITIVE
    ATTRIBUTE_TYPE_INVALID ATTRIBUTE_VALUE_INVALID ACTION_PROHIBITED DATA_INVALID
    DATA_LEN_RANGE DEVICE_ERROR DEVICE_MEMORY DEVICE_REMOVED ENCRYPTED_DATA_INVALID
    ENCRYPTED_DATA_LEN_RANGE FUNCTION_CANCELED FUNCTION_NOT_PARALLEL FUNCTION_NOT_SUPPORTED
    KEY_HANDLE_INVALID KEY_SIZE_RANGE KEY_TYPE_INCONSISTENT KEY_NOT_NEEDED KEY_CHANGED
    KEY_NEEDED KEY_INDIGESTIBLE KEY_FUNCTION_NOT_PERMITTED KEY_NOT_WRAPPABLE KEY_UNEXTRACTABLE
    MECHANISM_INVALID MECHANISM_PARAM_INVALID OBJECT_HANDLE_INVALID OPERATION_ACTIVE
    OPERATION_NOT_INITIALIZED PIN_INCORRECT PIN_INVALID PIN_LEN_RANGE PIN_EXPIRED PIN_LOCKED
    SESSION_CLOSED SESSION_COUNT SESSION_HANDLE_INVALID SESSION_PARALLEL_NOT_SUPPORTED
    SESSION_READ_ONLY SESSION_EXISTS SESSION_READ_ONLY_EXISTS SESSION_READ_WRITE_SO_EXISTS
    SIGNATURE_INVALID SIGNATURE_LEN_RANGE TEMPLATE_INCOMPLETE TEMPLATE_INCONSISTENT
    TOKEN_NOT_PRESENT TOKEN_NOT_RECOGNIZED TOKEN_WRITE_PROTECTED UNWRAPPING_KEY_HANDLE_INVALID
    UNWRAPPING_KEY_SIZE_RANGE UNWRAPPING_KEY_TYPE_INCONSISTENT USER_ALREADY_LOGGED_IN
    USER_NOT_LOGGED_IN USER_PIN_NOT_INITIALIZED USER_TYPE_INVALID
    USER_ANOTHER_ALREADY_LOGGED_IN USER_TOO_MANY_TYPES WRAPPED_KEY_INVALID
    WRAPPED_KEY_LEN_RANGE WRAPPING_KEY_HANDLE_INVALID WRAPPING_KEY_SIZE_RANGE
    WRAPPING_KEY_TYPE_INCONSISTENT RANDOM_SEED_NOT_SUPPORTED RANDOM_NO_RNG
    DOMAIN_PARAMS_INVALID CURVE_NOT_SUPPORTED BUFFER_TOO_SMALL SAVED_STATE_INVALID
    INFORMATION_SENSITIVE STATE_UNSAVEABLE CRYPTOKI_NOT_INITIALIZED
    CRYPTOKI_ALREADY_INITIALIZED MUTEX_BAD MUTEX_NOT_LOCKED NEW_PIN_MODE NEXT_OTP
    EXCEEDED_MAX_ITERATIONS FIPS_SELF_TEST_FAILED LIBRARY_LOAD_FAILED PIN_TOO_WEAK
    PUBLIC_KEY_INVALID FUNCTION_REJECTED TOKEN_RESOURCE_EXCEEDED OPERATION_CANCEL_FAILED
    """
CKR_NAMES = frozenset(["TIMEOUT", *("CKR_" + name for name in _PKCS11_RETURN_VALUES.split())])

# The hot path pays one dict.get per metric instead of labels() (a lock, validation and
# string conversion).  Caches are keyed by the caller's raw values, so they are capped: junk
# input still lands in a bounded set of series, and only the lookup gets slower.
_CACHE_LIMIT = 4096
_K = TypeVar("_K")
_V = TypeVar("_V")


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    if len(cache) < _CACHE_LIMIT:
        cache[key] = value
    return value


class Metrics:
    """The proxy's metrics; one object per process, passed to whatever records them."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        hsm_names: Sequence[str] = (),
        version: str = "",
    ) -> None:
        self.multiprocess_dir = _multiprocess_dir()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._build_info = Gauge(
            "xks_build_info",
            "Always 1; the proxy version as a label.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._requests = Counter(
            "xks_requests_total",
            "XKS API requests answered, by API, HTTP status and errorName.",
            ["api", "status", "error_name"],
            registry=r,
        )
        self._request_seconds = Histogram(
            "xks_request_duration_seconds",
            "Time from request received to response ready, by API.",
            ["api"],
            buckets=BUCKETS,
            registry=r,
        )
        self._hsm_call_seconds = Histogram(
            "xks_hsm_call_duration_seconds",
            "Duration of one PKCS#11 operation, by HSM and call.",
            ["hsm", "call"],
            buckets=BUCKETS,
            registry=r,
        )
        self._hsm_errors = Counter(
            "xks_hsm_errors_total",
            "Failed HSM calls, by HSM and PKCS#11 return code (or TIMEOUT).",
            ["hsm", "ckr"],
            registry=r,
        )
        # Each worker probes on its own: livemax reads "some live worker sees this state".
        self._hsm_state = Gauge(
            "xks_hsm_state",
            "1 for the HSM's current health state, 0 for the others.",
            ["hsm", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._pool_acquire_seconds = Histogram(
            "xks_pool_acquire_seconds",
            "Time spent waiting for a pooled HSM session.",
            ["hsm"],
            buckets=BUCKETS,
            registry=r,
        )
        # Every worker has its own pool: the host's total is the sum over live workers.
        self._pool_sessions = Gauge(
            "xks_pool_sessions",
            "Pooled HSM sessions by state (stuck: abandoned in an overrunning call).",
            ["hsm", "state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._pool_waiters = Gauge(
            "xks_pool_waiters",
            "Requests waiting for a pooled HSM session.",
            ["hsm"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._failovers = Counter(
            "xks_failovers_total",
            "Requests served by another HSM after a failure or timeout on the first.",
            ["from_hsm", "to_hsm"],
            registry=r,
        )
        self._key_copy_mismatches = Counter(
            "xks_key_copy_mismatches_total",
            "Key copies found to differ (key-check value) from the other HSMs' copies.",
            ["hsm"],
            registry=r,
        )
        self._keys_excluded = Gauge(
            "xks_keys_excluded",
            "Key versions in use not served from this HSM: its copy is missing or differs.",
            ["hsm"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._auth_failures = Counter(
            "xks_auth_failures_total",
            "Requests refused by SigV4 verification, by reason.",
            ["reason"],
            registry=r,
        )
        self._authz_decisions = Counter(
            "xks_authz_decisions_total",
            "Secondary authorization decisions of prefixes with a policy, by prefix and decision"
            " (allow, deny, would_deny: denied by an audit-only policy and let through).",
            ["prefix", "decision"],
            registry=r,
        )
        self._tls_rejected = Counter(
            "xks_tls_client_rejected_total",
            "Handshakes aborted because the client certificate failed mutual-TLS verification,"
            " by kind (name, expired, untrusted, purpose, other).",
            ["kind"],
            registry=r,
        )
        # livemin: every worker loads the same file; the earliest date is the one to act on.
        self._tls_cert_expiry = Gauge(
            "xks_tls_certificate_expiry_timestamp_seconds",
            "When the server's TLS certificate (the first of server.tls.cert_file) expires, as"
            " a Unix time; set at start and on every reload, absent without TLS.",
            registry=r,
            multiprocess_mode="livemin",
        )

        # livemin: 0 as soon as one worker cannot write its log.
        self._log_writable = Gauge(
            "xks_log_writable",
            "1 while the log (the audit trail) can be written, 0 while writes fail: requests"
            " then get 500 and /ping 503.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self._log_writable.set(1)
        # liveall: one series per worker (label pid), so that used / limit pairs up.
        self._open_fds = Gauge(
            "xks_process_open_fds",
            "Open file descriptors of each worker (connections, HSM sessions, logs); at"
            " xks_process_max_fds new connections are refused and the HSM module may fail.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self._max_fds = Gauge(
            "xks_process_max_fds",
            "Each worker's soft limit on open file descriptors.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self._log_lines_lost = Counter(
            "xks_log_lines_lost_total",
            "Log lines that could not be written (a full disk, an I/O error).",
            registry=r,
        )
        self._lines_lost_seen = 0
        self._connections_closed = Counter(
            "xks_connections_closed_total",
            "Connections the proxy closed before a request: headers too slow, or one"
            " connection too many for the worker.",
            ["reason"],
            registry=r,
        )
        for reason in CONNECTION_CLOSE_REASONS:
            self._connections_closed.labels(reason)
        self._http_rejected = Counter(
            "xks_http_requests_rejected_total",
            "Requests refused by the HTTP parser before any handler ran (malformed framing,"
            " headers or request line), by the parser's error class.",
            ["kind"],
            registry=r,
        )
        self._hsm_lock = threading.Lock()
        self._hsm_labels: set[str] = set()
        self._request_cache: dict[tuple[str, int, str | None], tuple[Counter, Histogram]] = {}
        self._hsm_call_cache: dict[tuple[str, str], Histogram] = {}
        self._hsm_error_cache: dict[tuple[str, str], Counter] = {}
        self._acquire_cache: dict[str, Histogram] = {}
        self._pool_cache: dict[str, tuple[Gauge, Gauge, Gauge, Gauge]] = {}
        self._failover_cache: dict[tuple[str, str], Counter] = {}
        self._auth_cache: dict[str, Counter] = {}
        self._authz_cache: dict[tuple[str, str], Counter] = {}

        self._build_info.labels(version).set(1)
        for kind in TLS_REJECT_KINDS:
            self._tls_rejected.labels(kind)
        for api in APIS:
            self._request_seconds.labels(api)
        # Series that exist from the start, so rate() and absent() work before the first event.
        for hsm in hsm_names:
            for call in HSM_CALLS:
                self._hsm_call_child(hsm, call)
            self._acquire_child(hsm)
            self._key_copy_mismatches.labels(self._hsm(hsm))
            self._keys_excluded.labels(self._hsm(hsm)).set(0)

    # --- hot path: one dict lookup per metric -------------------------------------------------

    def request(self, api: str, status: int, error_name: str | None, seconds: float) -> None:
        """Count one answered XKS request and observe its duration."""
        pair = self._request_cache.get((api, status, error_name))
        if pair is None:
            pair = self._request_child(api, status, error_name)
        pair[0].inc()
        pair[1].observe(seconds)

    def hsm_call(self, hsm: str, call: str, seconds: float) -> None:
        """Observe the duration of one PKCS#11 operation."""
        child = self._hsm_call_cache.get((hsm, call))
        if child is None:
            child = self._hsm_call_child(hsm, call)
        child.observe(seconds)

    def pool_acquire(self, hsm: str, seconds: float) -> None:
        """Observe the wait for a pooled session."""
        child = self._acquire_cache.get(hsm)
        if child is None:
            child = self._acquire_child(hsm)
        child.observe(seconds)

    # --- events ---------------------------------------------------------------------------

    def hsm_error(self, hsm: str, ckr: str) -> None:
        """Count a failed HSM call by its CKR name (or TIMEOUT); unknown names as CKR_OTHER."""
        child = self._hsm_error_cache.get((hsm, ckr))
        if child is None:
            label = ckr if ckr in CKR_NAMES else CKR_OTHER
            child = self._hsm_errors.labels(self._hsm(hsm), label)
            _remember(self._hsm_error_cache, (hsm, ckr), child)
        child.inc()

    def hsm_state(self, hsm: str, state: str) -> None:
        """Set the HSM's health state: ACTIVE, DEGRADED or UNAVAILABLE."""
        if state not in HSM_STATES:
            raise ValueError(f"unknown HSM state {state!r}; expected one of {HSM_STATES}")
        label = self._hsm(hsm)
        for s in HSM_STATES:
            self._hsm_state.labels(label, s).set(1 if s == state else 0)

    def pool_sample(self, hsm: str, idle: int, busy: int, stuck: int, waiters: int) -> None:
        """Record the pool's current session counts and waiters (called by a periodic sampler)."""
        children = self._pool_cache.get(hsm)
        if children is None:
            label = self._hsm(hsm)
            idle_g, busy_g, stuck_g = (self._pool_sessions.labels(label, s) for s in POOL_STATES)
            children = (idle_g, busy_g, stuck_g, self._pool_waiters.labels(label))
            _remember(self._pool_cache, hsm, children)
        children[0].set(idle)
        children[1].set(busy)
        children[2].set(stuck)
        children[3].set(waiters)

    def failover(self, from_hsm: str, to_hsm: str) -> None:
        """Count a call retried on another HSM."""
        child = self._failover_cache.get((from_hsm, to_hsm))
        if child is None:
            child = self._failovers.labels(self._hsm(from_hsm), self._hsm(to_hsm))
            _remember(self._failover_cache, (from_hsm, to_hsm), child)
        child.inc()

    def key_copy_mismatch(self, hsm: str) -> None:
        """Count a key copy on this HSM whose key-check value differs from the others'."""
        self._key_copy_mismatches.labels(self._hsm(hsm)).inc()

    def keys_excluded(self, hsm: str, count: int) -> None:
        """Set how many keys this HSM does not serve because its copy is missing or differs."""
        self._keys_excluded.labels(self._hsm(hsm)).set(count)

    def auth_failure(self, reason: str) -> None:
        """Count a SigV4 failure by reason; reasons outside AUTH_REASONS count as ``other``."""
        child = self._auth_cache.get(reason)
        if child is None:
            child = self._auth_failures.labels(reason if reason in AUTH_REASONS else OTHER)
            _remember(self._auth_cache, reason, child)
        child.inc()

    def authz_decision(self, prefix: str, decision: str) -> None:
        """Count an authorization decision; prefixes are configured ones (a bounded set)."""
        child = self._authz_cache.get((prefix, decision))
        if child is None:
            label = decision if decision in AUTHZ_DECISIONS else OTHER
            child = self._authz_decisions.labels(prefix, label)
            _remember(self._authz_cache, (prefix, decision), child)
        child.inc()

    def log_state(self, writable: bool, lost: int) -> None:
        """Record whether the log can be written, and its lines lost so far (a running total)."""
        self._log_writable.set(1 if writable else 0)
        if lost > self._lines_lost_seen:
            self._log_lines_lost.inc(lost - self._lines_lost_seen)
            self._lines_lost_seen = lost

    def open_files(self, used: int, limit: int) -> None:
        """Record this worker's open descriptors and its limit on them."""
        self._open_fds.set(used)
        self._max_fds.set(limit)

    def connection_closed(self, reason: str) -> None:
        """Count a connection closed by a bound (xksproxy/http/connections.py)."""
        label = reason if reason in CONNECTION_CLOSE_REASONS else OTHER
        self._connections_closed.labels(label).inc()

    def http_rejected(self, kind: str) -> None:
        """Count a request the HTTP parser refused; kinds outside HTTP_REJECT_KINDS: other."""
        self._http_rejected.labels(kind if kind in HTTP_REJECT_KINDS else OTHER).inc()

    def tls_certificate_expiry(self, when: float) -> None:
        """Record when the server certificate in use expires (Unix time)."""
        self._tls_cert_expiry.set(when)

    def tls_client_rejected(self, kind: str) -> None:
        """Count a client certificate refused in the handshake (kinds outside the set: other)."""
        self._tls_rejected.labels(kind if kind in TLS_REJECT_KINDS else OTHER).inc()

    # --- label bounding -----------------------------------------------------------------

    def _hsm(self, name: str) -> str:
        """The label for an HSM name: itself, or ``other`` once MAX_HSM_LABELS are in use."""
        if name in self._hsm_labels:
            return name
        with self._hsm_lock:  # HSM-layer calls may come from executor threads
            if name in self._hsm_labels or len(self._hsm_labels) < MAX_HSM_LABELS:
                self._hsm_labels.add(name)
                return name
        return OTHER

    def _request_child(
        self, api: str, status: int, error_name: str | None
    ) -> tuple[Counter, Histogram]:
        api_label = api if api in APIS else OTHER
        status_label = str(status) if status in STATUSES else OTHER
        if error_name is None:
            error_label = NO_ERROR
        else:
            error_label = error_name if error_name in ERROR_NAMES else OTHER
        pair = (
            self._requests.labels(api_label, status_label, error_label),
            self._request_seconds.labels(api_label),
        )
        return _remember(self._request_cache, (api, status, error_name), pair)

    def _hsm_call_child(self, hsm: str, call: str) -> Histogram:
        child = self._hsm_call_seconds.labels(self._hsm(hsm), call if call in HSM_CALLS else OTHER)
        return _remember(self._hsm_call_cache, (hsm, call), child)

    def _acquire_child(self, hsm: str) -> Histogram:
        child = self._pool_acquire_seconds.labels(self._hsm(hsm))
        return _remember(self._acquire_cache, hsm, child)


def _multiprocess_dir() -> str | None:
    """The multiprocess directory in use, after checking prometheus-client agrees."""
    path = os.environ.get(MULTIPROC_ENV)
    active = values.ValueClass is not values.MutexValue
    if path is not None and not active:
        raise RuntimeError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
            "set it in the environment before the process starts"
        )
    if active and not path:
        raise RuntimeError(
            f"prometheus_client is in multiprocess mode but {MULTIPROC_ENV} is not set "
            "(it was removed, or only the lower-case name is set)"
        )
    if path is not None and not os.path.isdir(path):
        raise RuntimeError(f"{MULTIPROC_ENV}={path} is not a directory")
    return path


def render(metrics: Metrics) -> tuple[bytes, str]:
    """The exposition body and its content type; in multiprocess mode, of all processes."""
    if metrics.multiprocess_dir is None:
        return generate_latest(metrics.registry), CONTENT_TYPE
    return render_multiprocess(metrics.multiprocess_dir)


def render_multiprocess(path: str | Path) -> tuple[bytes, str]:
    """The exposition of every process that wrote metric files into *path*."""
    registry = CollectorRegistry()
    # prometheus_client.multiprocess has no annotations.
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE


def prepare_multiprocess_dir(path: str | Path) -> None:
    """Create *path* if needed and delete its metric files; call once before workers start."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Only prometheus-client's files: a mistyped path must not cost anyone other data.
    for file in directory.glob("*.db"):
        file.unlink()


def mark_worker_dead(path: str | Path, pid: int) -> None:
    """Drop an exited worker's live gauges (pool, state); its counters stay in the sums."""
    mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
