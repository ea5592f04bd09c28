"""TLS for a test rig: certificates made by the test, and a proxy serving over TLS."""

from __future__ import annotations

import http.client
import json
import ssl
import warnings
from pathlib import Path

from tests.support.proxies import Server, start_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import health_meta, sign
from xksproxy.http.certs import Authority


def make_cert(directory: Path, kind: str, name: str = "xks.example.com") -> tuple[Path, Path]:
    """A self-signed server certificate for *name* and 127.0.0.1, RSA-2048 or ECDSA P-256."""
    authority = Authority.create(name, ca=False, use_rsa=kind == "rsa", ip_addresses=("127.0.0.1",))
    return authority.write(directory, kind)


def signed_health(rig: Rig, port: int, ctx: ssl.SSLContext) -> int:
    """The status of a signed GetHealthStatus over TLS with the client context *ctx*."""
    path = "/example/xks/kms/xks/v1/health"
    url = f"https://127.0.0.1:{port}{path}"
    body = json.dumps({"requestMetadata": health_meta()}).encode()
    headers = sign("POST", url, body, rig.akid, rig.secret, region=rig.region)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


class TlsRig:
    """The suite's rig serving over TLS with a self-signed certificate of *kind*; started."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.cert, key = make_cert(directory, kind)
        tls = {"cert_file": str(self.cert), "key_file": str(key)}
        self.rig = make_rig(directory / "rig", settings={"server": {"tls": tls}})
        self.port = self.rig.port
        self.server: Server = start_server(self.rig.config, self.port, directory / "proxy.log")

    def health(self, ctx: ssl.SSLContext) -> int:
        return signed_health(self.rig, self.port, ctx)

    def client(self, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
        """A client pinned to one TLS version (a TLS 1.1 client of this kind does connect to
        a server that allows TLS 1.1: checked by hand with OpenSSL 3.0, SECLEVEL=0)."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
            ctx.minimum_version = ctx.maximum_version = version
        if ciphers:
            ctx.set_ciphers(ciphers)
        return ctx
