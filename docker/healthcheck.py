#!/usr/bin/python3 -I
"""The container's health check: exit 0 while the proxy can serve, 1 otherwise (docs/docker.md).

It asks ``GET /ping`` on the proxy's own port, which answers 200 while some HSM can serve and
503 when none can.  The port, and whether it speaks TLS, come from the configuration the
entrypoint serves, found by the same rule as ``docker/entrypoint.sh``: ``$XKSPROXY_CONFIG``,
else ``/etc/xksproxy/xksproxy.toml`` if it exists, else the rig's in ``$XKSPROXY_RIG_DIR``.
``$XKSPROXY_HEALTHCHECK_URL`` overrides all that: any http(s) URL that answers 200 when healthy.

With mutual TLS (``client_ca_file`` in ``[server.tls]``) the API port completes a handshake only
with KMS's client certificate, which this check does not have.  It then reads the metrics
listener instead and is healthy while ``xks_hsm_state`` shows some HSM ACTIVE or DEGRADED: the
meaning of /ping.  With mutual TLS and ``[metrics] enabled = false`` it has nothing to ask and
says so: set ``$XKSPROXY_HEALTHCHECK_URL``.

Standard library only, run by the system Python in isolated mode (``-I``): no dependency on the
proxy's virtualenv, no environment or working directory put on its import path.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOUNTED_CONFIG = Path("/etc/xksproxy/xksproxy.toml")
RIG_DIR = "/var/lib/xksproxy/rig"
TIMEOUT_SECONDS = 3.0  # below the Dockerfile's HEALTHCHECK --timeout
SERVING_STATES = ('state="ACTIVE"', 'state="DEGRADED"')


class Unhealthy(Exception):
    """The proxy cannot serve, or cannot be asked; the message says why."""


@dataclass(frozen=True)
class Target:
    url: str
    # True: a Prometheus page, healthy while some HSM is ACTIVE or DEGRADED; False: any 200.
    hsm_metrics: bool = False


def config_path(env: Mapping[str, str]) -> Path:
    """The configuration the entrypoint serves (its rule, kept in step with it)."""
    if env.get("XKSPROXY_CONFIG"):
        return Path(env["XKSPROXY_CONFIG"])
    if MOUNTED_CONFIG.is_file():
        return MOUNTED_CONFIG
    return Path(env.get("XKSPROXY_RIG_DIR") or RIG_DIR) / "xksproxy.toml"


def local_host(host: str) -> str:
    """The address to reach a listener bound to *host* from inside its container, URL-ready."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name: it resolves to one of our own addresses, or the bind would fail
    if address.is_unspecified:  # bound everywhere: loopback is one of them
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"[{address}]" if address.version == 6 else str(address)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    return value if isinstance(value, dict) else {}


def target(env: Mapping[str, str]) -> Target:
    """What to ask, from ``$XKSPROXY_HEALTHCHECK_URL`` or the served configuration."""
    url = env.get("XKSPROXY_HEALTHCHECK_URL")
    if url:
        return Target(url)
    path = config_path(env)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise Unhealthy(f"cannot read the configuration {path}: {exc}") from None
    server = _table(data, "server")
    tls = server.get("tls")
    if isinstance(tls, dict) and "client_ca_file" in tls:
        metrics = _table(data, "metrics")
        if metrics.get("enabled", True) is False:
            raise Unhealthy(
                "mutual TLS is on and [metrics] is disabled: nothing this check can ask; "
                "set XKSPROXY_HEALTHCHECK_URL"
            )
        host = local_host(str(metrics.get("host", "127.0.0.1")))
        return Target(f"http://{host}:{metrics.get('port', 9100)}/metrics", hsm_metrics=True)
    scheme = "https" if tls is not None else "http"
    host = local_host(str(server.get("host", "127.0.0.1")))
    return Target(f"{scheme}://{host}:{server.get('port', 8000)}/ping")


def _opener() -> urllib.request.OpenerDirector:
    # The check asks the proxy in its own container by a local address.  The certificate names
    # the host KMS calls (or is self-signed on a test set-up), so it can never verify against
    # 127.0.0.1: what is checked is that the proxy answers, not who it is, and nothing secret is
    # sent.  Never reuse this context for anything else.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # No proxies: an HTTP(S)_PROXY set for the container must not carry a local check away.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def _serving(page: str) -> bool:
    for line in page.splitlines():
        if line.startswith("xks_hsm_state{") and any(s in line for s in SERVING_STATES):
            try:
                if float(line.rsplit(None, 1)[-1]) >= 1:
                    return True
            except ValueError:
                continue
    return False


def check(env: Mapping[str, str]) -> str:
    """One line saying what answered; raises :class:`Unhealthy` otherwise."""
    what = target(env)
    if not what.url.startswith(("http://", "https://")):
        raise Unhealthy(f"{what.url}: only http:// and https:// URLs can be checked")
    try:
        with _opener().open(what.url, timeout=TIMEOUT_SECONDS) as response:
            status, body = response.status, response.read(1 << 20)
    except urllib.error.HTTPError as exc:  # 503 from /ping: no HSM can serve
        raise Unhealthy(f"GET {what.url}: {exc.code} {exc.reason}") from None
    except (OSError, ValueError) as exc:  # refused, timed out, TLS failed, bad URL
        raise Unhealthy(f"GET {what.url}: {exc}") from None
    if status != 200:
        raise Unhealthy(f"GET {what.url}: {status}")
    if what.hsm_metrics and not _serving(body.decode("utf-8", "replace")):
        raise Unhealthy(f"GET {what.url}: no HSM is ACTIVE or DEGRADED in xks_hsm_state")
    return f"ok: GET {what.url}: {status}"


def main() -> int:
    try:
        print(check(os.environ))
    except Unhealthy as exc:
        print(f"unhealthy: {exc}")
        return 1  # Docker: 0 healthy, 1 unhealthy (2 is reserved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
