"""The server's TLS context: TLS 1.2+ with the cipher suites KMS supports (docs/spec-notes.md §3.1),
and optionally mutual TLS (§3.4, :mod:`xksproxy.http.mtls`)."""

from __future__ import annotations

import ssl
from pathlib import Path

from xksproxy.config import TlsConfig
from xksproxy.http import mtls

# TLS 1.2 suites from the spec's list (OpenSSL names); TLS 1.3 suites are OpenSSL's defaults,
# which include the spec's TLS_AES_256_GCM_SHA384 and TLS_CHACHA20_POLY1305_SHA256.
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"


class ClientCaError(Exception):
    """The client CA file does not load (its message is OpenSSL's or the OS's)."""


class EncryptedKeyError(Exception):
    """The TLS private key is encrypted: the proxy takes no pass phrase (it would otherwise be
    asked for on the terminal, and a service has none)."""


def _no_pass_phrase() -> str:
    raise EncryptedKeyError(
        "the private key is encrypted; give the proxy an unencrypted key readable only by its"
        " user (openssl pkey -in KEY -out PLAIN)"
    )


def load_server_cert(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load the certificate chain and key of *tls* into *ctx*; an encrypted key is refused with
    EncryptedKeyError instead of a pass-phrase prompt."""
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=_no_pass_phrase)


def certificate_expiry(cert_file: Path) -> float | None:
    """When the first certificate of *cert_file* (the server's own) expires, as a Unix time;
    None if the file cannot be read or parsed (it loaded into the context all the same)."""
    from cryptography import x509

    try:
        first = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None
    return first.not_valid_after_utc.timestamp()


def server_context(tls: TlsConfig, on_reject: mtls.RejectHook | None = None) -> ssl.SSLContext:
    """A server context for *tls*; with mutual TLS, clients are held to its CA file and name and
    *on_reject* is told of each client certificate refused.  ClientCaError if the client CA
    file does not load, ssl.SSLError or OSError if another file does not; mtls.MtlsUnavailable
    if the client name cannot be enforced here."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    load_server_cert(ctx, tls)
    ctx.set_alpn_protocols(["http/1.1"])
    if tls.client_ca_file is not None and tls.client_subject_name is not None:
        mtls.self_test()
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ClientCaError(str(exc)) from exc
        mtls.require_client(ctx, tls.client_subject_name, on_reject)
    return ctx
