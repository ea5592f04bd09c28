"""The one exception tree of xksproxy and the errorName -> HTTP status table.

Every error a client can see is an :class:`XksError`.  Lower layers (PKCS#11, JSON,
base64, SigV4) are translated into these at their edge with ``raise ... from exc``;
anything else that escapes a handler is rendered as ``InternalException`` and logged.
"""

from __future__ import annotations

from typing import ClassVar

MAX_MESSAGE_LEN = 511  # the spec: errorMessage < 512 printable ASCII characters


def sanitize_message(message: str) -> str:
    """Return *message* as printable ASCII (0x20-0x7E), at most 511 characters."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in message)
    return cleaned[:MAX_MESSAGE_LEN]


class XksError(Exception):
    """Base of every error with an XKS ``errorName`` and HTTP status."""

    error_name: ClassVar[str] = "InternalException"
    http_status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = sanitize_message(message or self.default_message)
        super().__init__(self.message)


class ValidationError(XksError):
    error_name = "ValidationException"
    http_status = 400
    default_message = "the request is not valid"


class InvalidStateError(XksError):
    error_name = "InvalidStateException"
    http_status = 400
    default_message = "the key or key store is not in a usable state"


class InvalidCiphertextError(XksError):
    error_name = "InvalidCiphertextException"
    http_status = 400
    # Never say which check failed (tag, IV, AAD, metadata): that is an oracle.
    default_message = "the ciphertext, its metadata or its additional data are not valid"


class InvalidKeyUsageError(XksError):
    error_name = "InvalidKeyUsageException"
    http_status = 400
    default_message = "the key is not permitted for this operation"


class AuthenticationFailedError(XksError):
    """SigV4 failure.  ``reason`` is for the log only; the client sees a fixed message."""

    error_name = "AuthenticationFailedException"
    http_status = 401
    default_message = "the request signature could not be verified"

    def __init__(self, reason: str) -> None:
        super().__init__(None)
        self.reason = reason


class AccessDeniedError(XksError):
    error_name = "AccessDeniedException"
    http_status = 403
    default_message = "access denied by the proxy's authorization policy"


class KeyNotFoundError(XksError):
    error_name = "KeyNotFoundException"
    http_status = 404
    default_message = "external key not found"


class InvalidUriPathError(XksError):
    error_name = "InvalidUriPathException"
    http_status = 404
    default_message = "invalid URI path"


class MethodNotAllowedError(XksError):
    """GET (or any non-POST) on an API URI: the spec requires 405."""

    error_name = "UnsupportedOperationException"
    http_status = 405
    default_message = "method not allowed: XKS APIs accept POST only"


class PayloadTooLargeError(XksError):
    """A body over the hard cap, refused before it is read in full."""

    error_name = "UnsupportedOperationException"
    http_status = 413
    default_message = "request body too large"


class ThrottlingError(XksError):
    error_name = "ThrottlingException"
    http_status = 429
    default_message = "the proxy is busy; retry"


class UnsupportedOperationError(XksError):
    error_name = "UnsupportedOperationException"
    http_status = 501
    default_message = "operation or input size not supported"


class InternalError(XksError):
    error_name = "InternalException"
    http_status = 500
    default_message = "internal error"


class DependencyTimeoutError(XksError):
    error_name = "DependencyTimeoutException"
    http_status = 503
    default_message = "the HSM did not answer in time"


# The spec's twelve errorNames and their statuses (docs/spec-notes.md §4), one row each.
ERROR_TABLE: dict[str, int] = {
    cls.error_name: cls.http_status
    for cls in (
        ValidationError,
        InvalidStateError,
        InvalidCiphertextError,
        InvalidKeyUsageError,
        AuthenticationFailedError,
        AccessDeniedError,
        KeyNotFoundError,
        InvalidUriPathError,
        ThrottlingError,
        UnsupportedOperationError,
        InternalError,
        DependencyTimeoutError,
    )
}


class OperatorError(Exception):
    """A failure the operator acts on, never seen by a client: the ``xksproxy`` command line
    prints :meth:`lines` on stderr, one each, and exits with :attr:`exit_code`.  Raised by the
    domain (key administration, rig setup, configuration, listening) without knowing the CLI.
    """

    exit_code: int = 1  # EX_FAIL; 2 bad usage, 78 invalid configuration (EX_CONFIG)

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def lines(self) -> list[str]:
        return [f"error: {self}"]


class KeyAdminError(OperatorError):
    """A key command cannot be done; the message is for the operator."""


class ConfigError(OperatorError):
    """The configuration is invalid; ``problems`` lists every problem with its key path."""

    exit_code = 78

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

    def lines(self) -> list[str]:
        return [f"config: {problem}" for problem in self.problems]
