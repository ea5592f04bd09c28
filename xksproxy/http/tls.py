"""The server's TLS context: TLS 1.2+ with the cipher suites KMS supports (xks-api.md §3.1)."""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 suites from the spec's list (OpenSSL names); TLS 1.3 suites are OpenSSL's defaults,
# which include the spec's TLS_AES_256_GCM_SHA384 and TLS_CHACHA20_POLY1305_SHA256.
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context for *cert_file* (chain, PEM) and *key_file* (PEM)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
