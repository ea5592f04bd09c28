"""The one aiohttp handler behind every XKS URI, and the audit line it writes per request.

Order of checks: path (404) -> method (405) -> body size (413) -> SigV4 (401) -> prefix state
(400 InvalidState) -> body validation (400/501) -> secondary authorization (403, never for
GetHealthStatus) -> the operation.  Every outcome, success or
error, is rendered as single-line JSON and logged once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from xksproxy.authz import NOT_LISTED, Admission
from xksproxy.errors import (
    AccessDeniedError,
    AuthenticationFailedError,
    InternalError,
    InvalidStateError,
    InvalidUriPathError,
    KeyNotFoundError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    ThrottlingError,
    ValidationError,
    XksError,
)
from xksproxy.http.overload import LoadGuard
from xksproxy.http.paths import Route, parse_path
from xksproxy.log import AuditWriteError, audit_logger
from xksproxy.log import sink as log_sink
from xksproxy.metrics import Metrics
from xksproxy.models import (
    MAX_META_CHARS,
    Limits,
    RequestMetadata,
    WireResult,
    dumps,
    parse_body,
    parse_decrypt,
    parse_encrypt,
    parse_metadata,
)
from xksproxy.service import XksService
from xksproxy.sigv4 import SigV4Verifier
from xksproxy.tenancy import Tenancy

log = structlog.get_logger(__name__)
JSON = "application/json"
BODY_READ_TIMEOUT = 5.0  # seconds; KMS sends its small bodies at once
AUDIT_UNWRITABLE = "the audit log cannot be written"  # 500 while no audit line can be written


def json_response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type=JSON)


def error_response(err: XksError) -> web.Response:
    resp = json_response(
        err.http_status, {"errorName": err.error_name, "errorMessage": err.message}
    )
    if isinstance(err, MethodNotAllowedError):
        resp.headers["Allow"] = "POST"
    return resp


def peek_request_id(body: bytes) -> str | None:
    """requestMetadata.kmsRequestId of an unauthenticated body, best effort, for the log."""
    try:
        value = json.loads(body)["requestMetadata"]["kmsRequestId"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return value[:128] if isinstance(value, str) else None


class XksHandler:
    """Serves every API of every prefix."""

    def __init__(
        self,
        service: XksService,
        verifier: SigV4Verifier,
        tenancy: Callable[[], Tenancy],
        *,
        limits: Limits,
        max_body: int,
        deadline_s: float,
        metrics: Metrics | None = None,
        guard: LoadGuard | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.metrics = metrics
        self.guard = guard
        self.draining = draining
        # Bound once: a lazy proxy from get_logger would rebuild the logger on every line.  Not
        # filtered by the configured level: the audit trail is written at every level.
        self._audit = audit_logger().bind()
        self.service = service
        self.verifier = verifier
        self.tenancy = tenancy
        self.limits = limits
        self.max_body = max_body
        self.deadline_s = deadline_s

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = await self._handle(request)
        if self.draining():  # leaving the balancer: the client's next request goes elsewhere
            resp.force_close()
        return resp

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        guard = self.guard
        shed = None if guard is None else guard.overloaded()
        if shed is not None:
            # Before any costly work (SigV4, the HSM, the audit line): that is what makes
            # shedding help.  Counted in the metrics and in the guard's requests_shed line.
            refused = ThrottlingError(shed)
            if self.metrics is not None:
                self.metrics.request("", 429, refused.error_name, loop.time() - started)
            return error_response(refused)
        sink = log_sink()
        if sink is not None and sink.failing:
            # No audit line can be written: fail closed before any work (the key is not used
            # unaudited).  The sampler retries the log once a second.
            closed = InternalError(AUDIT_UNWRITABLE)
            if self.metrics is not None:
                self.metrics.request("", 500, closed.error_name, loop.time() - started)
            return error_response(closed)
        deadline = started + self.deadline_s
        fields: dict[str, Any] = {"path": request.rel_url.raw_path[:256]}
        error: XksError | None = None
        if guard is not None:
            guard.in_flight += 1
        try:
            result = await self._serve(request, deadline, fields)
            resp = json_response(200, result.wire())
        except XksError as exc:
            error = exc
            resp = error_response(exc)
        except Exception:
            log.exception("unexpected_error", **fields)
            error = InternalError()
            resp = error_response(error)
        finally:
            if guard is not None:
                guard.in_flight -= 1
        fields["status"] = resp.status
        fields["latency_ms"] = round((loop.time() - started) * 1000, 3)
        if error is not None:
            fields["error_name"] = error.error_name
            fields["error_message"] = error.message
            if isinstance(error, AuthenticationFailedError):
                fields["auth_failure"] = error.reason
        try:
            self._audit.info("xks_request", **fields)
        except AuditWriteError:
            # The answer (a ciphertext, a plaintext) is withheld: nothing leaves unaudited.
            error = InternalError(AUDIT_UNWRITABLE)
            resp = error_response(error)
        if self.metrics is not None:
            self.metrics.request(
                fields.get("api", ""),
                resp.status,
                None if error is None else error.error_name,
                loop.time() - started,
            )
            if isinstance(error, AuthenticationFailedError):
                self.metrics.auth_failure(error.reason)
        return resp

    async def _serve(
        self, request: web.Request, deadline: float, fields: dict[str, Any]
    ) -> WireResult:
        tenancy = self.tenancy()
        raw_path = request.rel_url.raw_path
        route = parse_path(raw_path, tenancy.bases)
        if route is None:
            raise InvalidUriPathError()
        fields.update(prefix=route.prefix, api=route.api, key_id=route.key_id)
        if request.method != "POST":
            raise MethodNotAllowedError()
        body = await self._read_body(request)
        try:
            fields["access_key_id"] = self.verifier.verify(
                method=request.method,
                path=raw_path,
                query=request.rel_url.raw_query_string,
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
                ],
                body=body,
                credentials=tenancy.credentials.get(route.prefix, {}),
                now=time.time(),
            )
        except AuthenticationFailedError:
            # So that a 401 can be matched to KMS's CloudTrail record; marked as unverified.
            fields["kms_request_id_unverified"] = peek_request_id(body)
            raise
        data = parse_body(body)
        meta = parse_metadata(data, route.api)
        fields.update(
            kms_request_id=meta.kms_request_id[:MAX_META_CHARS],
            kms_operation=meta.kms_operation,
            aws_principal_arn=meta.aws_principal_arn,
            kms_key_arn=meta.kms_key_arn,
            kms_via_service=meta.kms_via_service,
            aws_source_vpc=meta.aws_source_vpc,
            aws_source_vpce=meta.aws_source_vpce,
        )
        if not tenancy.is_enabled(route.prefix):
            raise InvalidStateError("this key store (URI path prefix) is disabled")
        if route.api == "health":  # exempt from secondary authorization (docs/spec-notes.md §6)
            return self.service.health_status()
        return await self._dispatch(
            route, data, deadline, meta, tenancy.admission(route.prefix), fields
        )

    async def _dispatch(
        self,
        route: Route,
        data: dict[str, Any],
        deadline: float,
        meta: RequestMetadata,
        admit: Admission,
        fields: dict[str, Any],
    ) -> WireResult:
        svc = self.service
        key_id = route.key_id
        assert key_id is not None
        # The whole body is validated before the key list and the policy are asked, and the
        # HSM only after.
        if route.api == "metadata":
            self._admit(admit, route, key_id, meta, fields)
            return await svc.get_key_metadata(key_id, deadline)
        if route.api == "encrypt":
            enc = parse_encrypt(data, self.limits)
            self._admit(admit, route, key_id, meta, fields)
            return await svc.encrypt(key_id, enc, deadline)
        dec = parse_decrypt(data, self.limits)
        self._admit(admit, route, key_id, meta, fields)
        return await svc.decrypt(key_id, dec, deadline)

    def _admit(
        self,
        admit: Admission,
        route: Route,
        key_id: str,
        meta: RequestMetadata,
        fields: dict[str, Any],
    ) -> None:
        """KeyNotFound for a key outside the prefix's key list (to this key store it does not
        exist); AccessDenied if the prefix's policy denies, with every (would-)deny logged."""
        prefix = route.prefix
        decision = admit.admit(key_id, meta, api=route.api)
        if decision is NOT_LISTED:
            fields["key_not_in_prefix"] = True
            raise KeyNotFoundError()
        policy = admit.policy
        if policy is None:
            return
        if self.metrics is not None:
            self.metrics.authz_decision(prefix, decision.decision)
        if decision.decision == "allow":
            return
        # The deciding statement goes to the log only: the client gets a generic message.
        fields.update(authz=decision.decision, authz_statement=decision.statement)
        try:
            self._audit.warning(
                "authz_deny" if decision.decision == "deny" else "authz_would_deny",
                statement=decision.statement,
                policy=policy.source,
                mode=policy.mode,
                prefix=prefix,
                key_id=key_id,
                kms_operation=meta.kms_operation,
                aws_principal_arn=meta.aws_principal_arn,
                kms_request_id=meta.kms_request_id,
            )
        except AuditWriteError:
            raise InternalError(AUDIT_UNWRITABLE) from None  # not served unaudited
        if not decision.allowed:
            raise AccessDeniedError()

    async def _read_body(self, request: web.Request) -> bytes:
        """The raw body, refusing (413) anything over the cap without reading it all."""
        length = request.content_length
        if length is not None and length > self.max_body:
            raise PayloadTooLargeError(f"request body exceeds {self.max_body} bytes")
        content = request.content
        if content.is_eof():  # the usual case: the whole (small) body came with the headers
            body = content.read_nowait()
            if len(body) > self.max_body:
                raise PayloadTooLargeError(f"request body exceeds {self.max_body} bytes")
            return body
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(BODY_READ_TIMEOUT):
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_body:
                        raise PayloadTooLargeError(f"request body exceeds {self.max_body} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise ValidationError("the request body was not received in time") from None
        return b"".join(chunks)
