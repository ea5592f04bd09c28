"""What mutual TLS costs a new connection: TLS against mutual TLS, rounds alternating.

    python -m loadtest.tls_handshakes [--connections 400] [--rounds 3] [--workers 1]

Makes a SoftHSM rig and certificates in a temporary directory, then serves it in turn with
``[server.tls]`` and with ``[server.tls]`` plus a client CA and name, and from one client thread
opens *connections* new connections one after another: handshake (TLS 1.3, ECDSA P-256 on both
sides), ``GET /ping``, close.  Printed per round and mode: median and p90 milliseconds per
connection and connections per second.  Mutual TLS also turns session resumption off, so both
modes do full handshakes here (this client offers no session).  Everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.servers import free_port, listening, proxy_cmd, running
from xksproxy.http.certs import Authority

CLIENT_NAME = "cks.kms.us-east-1.amazonaws.com"


def connect_times(port: int, ctx: ssl.SSLContext, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if not tls.recv(64).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("/ping did not answer 200")
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xks-tls-bench-") as tmp:
        d = Path(tmp)
        port = free_port()
        subprocess.run(
            [sys.executable, "-m", "xksproxy", "dev-setup", str(d / "rig"), "--port", str(port)],
            check=True,
            capture_output=True,
        )
        server_ca, client_ca = Authority.create("bench server CA"), Authority.create("bench CA")
        cert, key = server_ca.issue(d, "server", "localhost")
        client = client_ca.issue(d, "client", CLIENT_NAME)
        (d / "client-ca.pem").write_bytes(client_ca.pem)
        base = (d / "rig" / "xksproxy.toml").read_text()
        base += f'\n[metrics]\nport = {free_port()}\n\n[server.tls]\ncert_file = "{cert}"\n'
        base += f'key_file = "{key}"\n'
        configs = {"tls": d / "rig" / "tls.toml", "mtls": d / "rig" / "mtls.toml"}
        configs["tls"].write_text(base)
        configs["mtls"].write_text(
            base + f'client_ca_file = "{d / "client-ca.pem"}"\n'
            f'client_subject_name = "{CLIENT_NAME}"\n'
        )
        ctx = ssl.create_default_context(cadata=server_ca.pem.decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*client)  # offered to both; only the mtls server asks for it
        results: dict[str, list[dict[str, float]]] = {"tls": [], "mtls": []}
        for round_no in range(1, args.rounds + 1):
            for mode, config in configs.items():
                cmd = proxy_cmd(config, args.workers, with_flag=True)
                with running(cmd, d / f"{mode}.log", listening(port)):
                    connect_times(port, ctx, 20)  # warm up
                    start = time.perf_counter()
                    times = connect_times(port, ctx, args.connections)
                    wall = time.perf_counter() - start
                q = statistics.quantiles(times, n=10)
                row = {
                    "median_ms": statistics.median(times) * 1000,
                    "p90_ms": q[-1] * 1000,
                    "per_s": len(times) / wall,
                }
                results[mode].append(row)
                print(
                    f"round {round_no} {mode:4}: median {row['median_ms']:.2f} ms, "
                    f"p90 {row['p90_ms']:.2f} ms, {row['per_s']:.0f} connections/s",
                    flush=True,
                )
    summary = {
        mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for mode, rows in results.items()
    }
    summary["mtls/tls"] = {
        k: summary["mtls"][k] / summary["tls"][k] for k in ("median_ms", "per_s")
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
