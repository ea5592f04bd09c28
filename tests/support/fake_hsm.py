"""A fake HSM behind the Hsm protocol, served by the real handler and service on 127.0.0.1:
for what a real HSM cannot be made to do on demand (raise every error class, fail with an
unexpected exception, take its time)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.xks_client import key_meta, sign
from xksproxy.consistency import KeyConsistency
from xksproxy.health import HealthBoard
from xksproxy.hsm.base import KeyInfo, KeyStatus, ProbeResult
from xksproxy.http.handler import XksHandler
from xksproxy.http.overload import LoadGuard
from xksproxy.models import Limits
from xksproxy.service import XksService
from xksproxy.sigv4 import SigV4Verifier
from xksproxy.tenancy import Tenancy

AKID, SECRET = "AKIDAKIDAKIDAKIDAKID", "s" * 44


@dataclass
class FakeHsm:
    """An HSM that raises ``failure`` from encrypt, or echoes plaintext XOR 1 plus a tag."""

    name: str = "fake-1"
    failure: BaseException | None = None

    @property
    def model(self) -> str:
        return "Fake HSM"

    @property
    def load(self) -> int:
        return 0

    async def kcv(self, key_id: str, version: int, deadline: float) -> str | None:
        return "E:000000"

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        return KeyInfo(key_id, KeyStatus.ENABLED, ("ENCRYPT", "DECRYPT"), 1, frozenset({1}))

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        if self.failure is not None:
            raise self.failure
        return bytes(12), bytes(b ^ 1 for b in plaintext) + bytes(16)

    async def decrypt(
        self, key_id: str, version: int, iv: bytes, data: bytes, aad: bytes, deadline: float
    ) -> bytes:
        return bytes(b ^ 1 for b in data[:-16])

    def accepts_iv_length(self, length: int) -> bool:
        return True

    async def probe(self, timeout: float) -> ProbeResult:
        return ProbeResult(True, 0.001, "ok")


async def serve_handler(hsm: FakeHsm, guard: LoadGuard | None = None) -> TestServer:
    """The real handler and service over *hsm*, on a test server on 127.0.0.1."""
    board = HealthBoard([hsm], degraded_latency_s=0.05, degraded_after=2, recover_after=2)
    board.record_probe(hsm.name, True, 0.001, "ok")
    service = XksService(
        [hsm],
        board=board,
        consistency=KeyConsistency([hsm]),
        health_keys=frozenset({"health"}),
        proxy_vendor="v",
        proxy_model="m",
        ekm_vendor="e",
        fleet_size=1,
    )
    tenancy = Tenancy({"/t/kms/xks/v1": "t"}, {"t": {AKID: SECRET}}, {"t": True})
    handler = XksHandler(
        service,
        SigV4Verifier(region="us-east-1"),
        lambda: tenancy,
        limits=Limits(8192, 8192),
        max_body=65536,
        deadline_s=0.2,
        guard=guard,
    )
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def post_encrypt(server: TestServer) -> tuple[int, str, dict[str, str]]:
    url = f"http://127.0.0.1:{server.port}/t/kms/xks/v1/keys/k/encrypt"
    body = json.dumps(
        {
            "requestMetadata": key_meta("Encrypt"),
            "plaintext": base64.b64encode(b"hello").decode(),
            "encryptionAlgorithm": "AES_GCM",
        }
    ).encode()
    headers = sign("POST", url, body, AKID, SECRET, region="us-east-1")
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.text(), dict(resp.headers)
