"""A proxy that runs out of file descriptors: while short, key lookups fail as an HSM fault
(never "no such key"), and once descriptors return it serves again by itself.

Real parts: a proxy on a SoftHSM rig, its open-file limit lowered and restored from outside with
prlimit(2) while it serves, requests on a keep-alive connection opened before the shortage (a
new one could not be accepted).  SoftHSM out of descriptors cannot open its object files, answers
every search with nothing, and keeps doing so after they return until it is initialised again.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import time
from pathlib import Path

from tests.support.proxies import start_server, stop_server
from tests.support.rigs import make_rig
from tests.support.waiting import until
from tests.support.xks_client import Response, XksClient, key_meta

SHORTAGE_SECONDS = 3.0


def test_a_descriptor_shortage_is_an_hsm_fault_and_heals_by_itself(tmp_path: Path) -> None:
    settings = {
        "server": {"workers": 1},  # the server process is the worker
        "health": {"interval_seconds": 0.5},
        # Entries expire fast, so requests during the shortage make the proxy look keys up.
        "hsms": {"key_cache_ttl_seconds": 0.2},
    }
    rig = make_rig(tmp_path / "rig", settings=settings)
    srv = start_server(rig.config, rig.port, tmp_path / "proxy.log")
    client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
    conn = http.client.HTTPConnection("127.0.0.1", rig.port, timeout=10)

    def metadata(key: str) -> Response:
        path = f"{client.base}/keys/{key}/metadata"
        body = json.dumps({"requestMetadata": key_meta("CreateKey")}).encode()
        conn.request("POST", path, body=body, headers=client.signed(path, body))
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})

    scrapes = http.client.HTTPConnection("127.0.0.1", rig.metrics_port, timeout=10)

    def descriptors() -> tuple[float, float]:
        scrapes.request("GET", "/metrics")
        text = scrapes.getresponse().read().decode()
        found = dict(re.findall(r"^(xks_process_(?:open|max)_fds) (\S+)$", text, re.M))
        return float(found["xks_process_open_fds"]), float(found["xks_process_max_fds"])

    pid = srv.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    answers: list[tuple[int, str | None]] = []
    try:
        assert metadata("enc-only").status == 200  # both connections are open and in use
        assert descriptors()[1] == soft
        log_before = srv.log.stat().st_size
        used = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used, hard))
        try:
            refused = 0
            for _ in range(200):  # new connections cannot be accepted: no log line each
                try:
                    fresh = client.metadata("enc-only")
                    answers.append((fresh.status, fresh.error_name))
                except OSError:
                    refused += 1
            end = time.monotonic() + SHORTAGE_SECONDS
            while time.monotonic() < end:
                r = metadata("enc-only")
                answers.append((r.status, r.error_name))
                time.sleep(0.1)
            until(lambda: descriptors()[0] >= used, "the shortage shown in the metrics", 5)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # The shortage was felt, as an HSM fault: the key was never reported missing.
        assert (500, "InternalException") in answers, answers
        assert all(status in (200, 500) for status, _ in answers), answers
        assert refused >= 190, refused
        with srv.log.open("rb") as f:
            f.seek(log_before)
            during = f.read().decode(errors="replace")
        # One request line per answer on the kept connection, none per refused one; the
        # reopens that fail meanwhile (reading the PIN file: EMFILE) are logged, backed off.
        assert "Traceback" not in during, during[-2000:]
        assert len(during.splitlines()) <= len(answers) + 30, during[-2000:]
        assert during.count('"hsm_recover_failed"') <= 8, during[-2000:]

        def served() -> bool:
            r = metadata("enc-only")
            answers.append((r.status, r.error_name))
            return r.status == 200

        until(served, "the key served again after the shortage", 30)
        assert all(status in (200, 500) for status, _ in answers), answers
        assert metadata("no-such-key").error_name == "KeyNotFoundException"  # still told apart
        log = srv.log_text()
        assert '"hsm_reopen"' in log
        assert "the token is unreadable" in log  # why, in the health details
    finally:
        conn.close()
        scrapes.close()
        stop_server(srv)
