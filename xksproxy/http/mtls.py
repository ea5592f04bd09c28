"""Mutual TLS: the client certificate's name is checked inside the handshake
(docs/spec-notes.md §3.4).

Python's ssl module verifies a client certificate's chain (``CERT_REQUIRED``) but cannot require
a name of it: a server-side socket takes no host name.  OpenSSL can.  A host name set on a
context's ``X509_VERIFY_PARAM`` is checked against every peer certificate verified with that
context, a client's included, and a mismatch fails the verification and so aborts the handshake,
as the spec requires.  This module sets it through ctypes on the ``SSL_CTX`` of a Python
``SSLContext``, calling the libssl the ssl module itself is linked with; wildcards are turned off
through the ssl module's own host flags, which it copies into every connection.

The ``SSL_CTX`` pointer is read where CPython keeps it, just after the object's header, and is
used only once the context's options and verify mode read through it equal the ones the ssl
module reports.  :func:`self_test` then proves the whole mechanism on this interpreter with an
in-memory handshake and certificates made on the spot: if a wrong name were let in, mutual TLS
is refused (:class:`MtlsUnavailable`) and the proxy does not start.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

# OpenSSL constants (openssl/ssl.h, openssl/x509_vfy.h); stable across 1.1.1 and 3.x.
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
X509_CHECK_FLAG_NO_WILDCARDS = 0x2
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_SESS_CACHE_OFF = 0

# OpenSSL's verification errors (openssl/x509_vfy.h), grouped for a bounded metric label.
REJECT_KINDS = {
    62: "name",  # X509_V_ERR_HOSTNAME_MISMATCH
    9: "expired",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    2: "untrusted",  # UNABLE_TO_GET_ISSUER_CERT
    18: "untrusted",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "untrusted",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "untrusted",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "untrusted",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    26: "purpose",  # INVALID_PURPOSE: not for TLS clients
}

# Told each rejected client certificate: its kind (REJECT_KINDS, else "other"), the reason in
# OpenSSL's words, and the certificate's subject.
RejectHook = Callable[[str, str, str], None]

_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class MtlsUnavailable(Exception):
    """This Python's ssl module cannot be made to check a client certificate's name."""


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl and libcrypto the ssl module uses (found through its extension module)."""
    if sys.implementation.name != "cpython":
        raise MtlsUnavailable(f"needs CPython, this is {sys.implementation.name}")
    import _ssl

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        signatures: dict[str, tuple[type | None, list[type]]] = {
            "SSL_CTX_get_options": (ctypes.c_uint64, [ctypes.c_void_p]),
            "SSL_CTX_get_verify_mode": (ctypes.c_int, [ctypes.c_void_p]),
            "SSL_CTX_get0_param": (ctypes.c_void_p, [ctypes.c_void_p]),
            "SSL_CTX_get_cert_store": (ctypes.c_void_p, [ctypes.c_void_p]),
            "SSL_CTX_set1_cert_store": (None, [ctypes.c_void_p, ctypes.c_void_p]),
            "SSL_CTX_ctrl": (
                ctypes.c_long,
                [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
            ),
            "SSL_CTX_set_verify": (None, [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]),
            "X509_VERIFY_PARAM_set1_host": (
                ctypes.c_int,
                [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t],
            ),
            "X509_STORE_CTX_get_error": (ctypes.c_int, [ctypes.c_void_p]),
            "X509_STORE_CTX_get_current_cert": (ctypes.c_void_p, [ctypes.c_void_p]),
            "X509_verify_cert_error_string": (ctypes.c_char_p, [ctypes.c_long]),
            "X509_get_subject_name": (ctypes.c_void_p, [ctypes.c_void_p]),
            "X509_NAME_oneline": (
                ctypes.c_char_p,
                [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int],
            ),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
    except (OSError, AttributeError) as exc:
        raise MtlsUnavailable(f"cannot reach the ssl module's OpenSSL: {exc}") from exc
    return lib


def _ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of *ctx*, checked against what the ssl module reports of it."""
    lib = _libssl()
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    expected_mode = {
        ssl.CERT_NONE: 0,
        ssl.CERT_OPTIONAL: SSL_VERIFY_PEER,
        ssl.CERT_REQUIRED: SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
    }[ctx.verify_mode]
    if (
        not pointer
        or lib.SSL_CTX_get_options(pointer) != int(ctx.options)
        or lib.SSL_CTX_get_verify_mode(pointer) != expected_mode
    ):
        raise MtlsUnavailable("this Python keeps its SSL contexts in an unexpected layout")
    return pointer


# A context's ctypes callback must live as long as the context (and so its handshakes).
_callbacks: weakref.WeakKeyDictionary[ssl.SSLContext, object] = weakref.WeakKeyDictionary()


def require_client(ctx: ssl.SSLContext, name: str, on_reject: RejectHook | None) -> None:
    """Make *ctx* demand a client certificate (the CAs are loaded by the caller) whose DNS name,
    or common name if it has none, is exactly *name*; tell *on_reject* of each one refused."""
    lib = _libssl()
    ctx.verify_mode = ssl.CERT_REQUIRED
    pointer = _ctx_pointer(ctx)
    # No session resumption: a resumed session skips the client certificate check, so a CA
    # or name taken away on reload would still let earlier clients in.  No stateless tickets
    # (OP_NO_TICKET) and no session cache, so nothing can be resumed.  TLS 1.3 still sends one
    # (stateful, so useless) ticket: with none, the server says nothing after the client's
    # last handshake flight, and a client without TCP_NODELAY holds its request back until a
    # delayed ACK, 40 ms on Linux (measured: loadtest/tls_handshakes.py, 1.8 ms -> 44 ms).
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 1
    lib.SSL_CTX_ctrl(pointer, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_OFF, None)
    set_client_name(ctx, name)

    def verified(ok: int, store: int) -> int:
        if not ok and on_reject is not None:
            code = lib.X509_STORE_CTX_get_error(store)
            reason = lib.X509_verify_cert_error_string(code)
            cert = lib.X509_STORE_CTX_get_current_cert(store)
            subject = b""
            if cert:
                buf = ctypes.create_string_buffer(256)
                subject = lib.X509_NAME_oneline(lib.X509_get_subject_name(cert), buf, 256) or b""
            on_reject(
                REJECT_KINDS.get(code, "other"),
                (reason or b"unknown").decode(errors="replace"),
                subject.decode("latin-1"),
            )
        return ok  # never turns a failure into a success

    callback = _VERIFY_CALLBACK(verified)
    _callbacks[ctx] = callback
    lib.SSL_CTX_set_verify(pointer, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, callback)


def set_client_name(ctx: ssl.SSLContext, name: str) -> None:
    """Require *name* of client certificates from the next handshake on (replaces the old)."""
    lib = _libssl()
    # Exactly *name*: a wildcard certificate does not match.  The ssl module copies its own
    # host flags into every connection, so they are set through it, not through OpenSSL.
    ctx._host_flags = X509_CHECK_FLAG_NO_WILDCARDS  # type: ignore[attr-defined]
    encoded = name.encode("ascii")
    param = lib.SSL_CTX_get0_param(_ctx_pointer(ctx))
    if lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded)) != 1:
        raise MtlsUnavailable(f"OpenSSL refused the client name {name!r}")


def adopt_client_cas(live: ssl.SSLContext, source: ssl.SSLContext) -> None:
    """Verify clients of *live* against *source*'s CA store from the next handshake on: the old
    CAs are dropped, not merged (``load_verify_locations`` could only add)."""
    lib = _libssl()
    lib.SSL_CTX_set1_cert_store(
        _ctx_pointer(live), lib.SSL_CTX_get_cert_store(_ctx_pointer(source))
    )


@functools.cache
def self_test() -> None:
    """Show, once per process, that a context made by :func:`require_client` accepts a client
    certificate of the required name and rejects one of another name and a wildcard one, in
    TLS 1.2 and 1.3; MtlsUnavailable if not."""
    from xksproxy.http.certs import Authority

    required, other = "cks.kms.us-east-1.amazonaws.com", "cks.kms.eu-west-1.amazonaws.com"
    with tempfile.TemporaryDirectory(prefix="xksproxy-mtls-") as tmp:
        ca = Authority.create("xksproxy self-test CA")
        server = ca.issue(Path(tmp), "server", "localhost")
        good = ca.issue(Path(tmp), "good", required)
        bad = ca.issue(Path(tmp), "bad", other)
        wildcard = ca.issue(Path(tmp), "wildcard", "*" + required[required.index(".") :])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*server)
        ctx.load_verify_locations(cadata=ca.pem.decode())
        require_client(ctx, required, None)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            if not _handshake(ctx, ca.pem, good, version):
                raise MtlsUnavailable("the self-test's right client certificate was refused")
            if _handshake(ctx, ca.pem, bad, version) or _handshake(ctx, ca.pem, wildcard, version):
                raise MtlsUnavailable(
                    "a client certificate of another name was let in: this Python's ssl "
                    "module cannot check client certificate names"
                )


def _handshake(
    server: ssl.SSLContext, ca: bytes, client: tuple[Path, Path], version: ssl.TLSVersion
) -> bool:
    """Whether an in-memory handshake of a client presenting *client* succeeds."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(*client)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(8):
        for i, (side, outbox, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
            peer_in.write(outbox.read())
        if all(done):
            return True
    return False
