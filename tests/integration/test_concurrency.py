"""Many concurrent signed requests against the real proxy: every one answered, 200 or 429 only,
encrypt results that decrypt, and a proxy still alive and serving afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.support.proxies import Server
from tests.support.rigs import Rig
from tests.support.xks_client import XksClient, decrypt_fields, health_meta, key_meta, sign

CONCURRENCY = 128  # requests in flight at once (the brief: at least 64)
ROUND_TIMEOUT = 60.0  # bound the wait, never assert on speed


@dataclass(frozen=True)
class Call:
    kind: str  # health | metadata | encrypt | decrypt
    path: str
    body: bytes
    plaintext: bytes | None = None  # what encrypt sent / decrypt must return
    aad: str | None = None


@dataclass
class Outcome:
    call: Call
    status: int | None = None
    body: Any = None
    error: str | None = None  # transport failure: no HTTP answer at all


@dataclass
class Burst:
    outcomes: list[Outcome] = field(default_factory=list)
    round_trips: list[tuple[Outcome, Outcome]] = field(default_factory=list)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt_call(client: XksClient, plaintext: bytes, aad: str | None, cdiv: bool) -> Call:
    body: dict[str, Any] = {
        "requestMetadata": key_meta("Encrypt") | {"kmsRequestId": secrets.token_hex(8)},
        "encryptionAlgorithm": "AES_GCM",
        "plaintext": b64(plaintext),
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = aad
    if cdiv:
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
    return Call(
        "encrypt", client.base + "/keys/foo/encrypt", json.dumps(body).encode(), plaintext, aad
    )


def decrypt_call(client: XksClient, enc: dict[str, Any], plaintext: bytes, aad: str | None) -> Call:
    body: dict[str, Any] = {
        "requestMetadata": key_meta("Decrypt") | {"kmsRequestId": secrets.token_hex(8)},
        "encryptionAlgorithm": "AES_GCM",
        **decrypt_fields(enc, aad),
    }
    return Call(
        "decrypt", client.base + "/keys/foo/decrypt", json.dumps(body).encode(), plaintext, aad
    )


def mixed_calls(
    client: XksClient, material: list[tuple[dict[str, Any], bytes, str | None]]
) -> list[Call]:
    calls: list[Call] = []
    for i in range(CONCURRENCY):
        kind = ("encrypt", "decrypt", "metadata", "health")[i % 4]
        if kind == "encrypt":
            aad = b64(secrets.token_bytes(32)) if i % 8 == 0 else None
            calls.append(encrypt_call(client, secrets.token_bytes(1 + i * 7), aad, cdiv=i % 3 == 0))
        elif kind == "decrypt":
            enc, plaintext, aad = material[i % len(material)]
            calls.append(decrypt_call(client, enc, plaintext, aad))
        elif kind == "metadata":
            body = {"requestMetadata": key_meta("CreateKey")}
            calls.append(Call(kind, client.base + "/keys/foo/metadata", json.dumps(body).encode()))
        else:
            body = {"requestMetadata": health_meta()}
            calls.append(Call(kind, client.base + "/health", json.dumps(body).encode()))
    return calls


async def fire(client: XksClient, calls: list[Call]) -> list[Outcome]:
    """Send every call at once (signatures made beforehand, all released together)."""
    signed = [
        (
            call,
            sign(
                "POST",
                client.url(call.path),
                call.body,
                client.akid,
                client.secret,
                region=client.region,
                headers={"Content-Type": "application/json"},
            ),
        )
        for call in calls
    ]
    go = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=ROUND_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(call: Call, headers: dict[str, str]) -> Outcome:
            await go.wait()
            try:
                async with session.post(
                    client.url(call.path), data=call.body, headers=headers
                ) as resp:
                    raw = await resp.read()
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw
                    return Outcome(call, resp.status, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return Outcome(call, error=repr(exc))

        tasks = [asyncio.create_task(one(call, headers)) for call, headers in signed]
        await asyncio.sleep(0)
        go.set()
        return list(await asyncio.gather(*tasks))


async def run_burst(client: XksClient) -> Burst:
    burst = Burst()
    material = []
    for i in range(8):  # ciphertexts for the decrypts in the burst, made one by one
        plaintext = secrets.token_bytes(16 + i)
        aad = b64(secrets.token_bytes(8)) if i % 2 else None
        fields: dict[str, Any] = {"plaintext": b64(plaintext)}
        if aad is not None:
            fields["additionalAuthenticatedData"] = aad
        resp = client.encrypt("foo", **fields)
        assert resp.status == 200, resp.body
        material.append((resp.json, plaintext, aad))
    burst.outcomes = await fire(client, mixed_calls(client, material))
    encrypted = [o for o in burst.outcomes if o.call.kind == "encrypt" and o.status == 200]
    back = await fire(
        client,
        [decrypt_call(client, o.body, o.call.plaintext or b"", o.call.aad) for o in encrypted],
    )
    burst.round_trips = list(zip(encrypted, back, strict=True))
    return burst


@pytest.fixture(scope="module")
def burst(rig: Rig, server: Server) -> Burst:
    client = XksClient("127.0.0.1", server.port, rig.prefix, rig.akid, rig.secret, rig.region)
    return asyncio.run(run_burst(client))


def test_burst_is_concurrent_enough(burst: Burst) -> None:
    assert len(burst.outcomes) >= 64
    assert {o.call.kind for o in burst.outcomes} == {"health", "metadata", "encrypt", "decrypt"}


def test_every_request_is_answered(burst: Burst) -> None:
    failed = [o.error for o in burst.outcomes if o.status is None]
    assert not failed, failed


def test_every_answer_is_200_or_throttling(burst: Burst) -> None:
    bad = [
        (o.call.kind, o.status, o.body)
        for o in burst.outcomes
        if not (
            o.status == 200
            or (
                o.status == 429
                and isinstance(o.body, dict)
                and o.body.get("errorName") == "ThrottlingException"
            )
        )
    ]
    assert not bad, bad


def test_crypto_requests_succeed_under_load(burst: Burst) -> None:
    """Throttling may shed some load, but the proxy must not shed everything."""
    assert any(o.status == 200 for o in burst.outcomes if o.call.kind in ("encrypt", "decrypt"))


def test_concurrent_decrypts_return_their_plaintext(burst: Burst) -> None:
    wrong = [
        o.call.kind
        for o in burst.outcomes
        if o.call.kind == "decrypt"
        and o.status == 200
        and base64.b64decode(o.body["plaintext"]) != o.call.plaintext
    ]
    assert not wrong


def test_concurrent_encrypt_results_decrypt(burst: Burst) -> None:
    assert burst.round_trips
    mismatched = [
        (dec.status, dec.body)
        for enc, dec in burst.round_trips
        if dec.status == 200 and base64.b64decode(dec.body["plaintext"]) != enc.call.plaintext
    ]
    assert not mismatched, mismatched
    unexpected = [
        (dec.status, dec.body)
        for _, dec in burst.round_trips
        if dec.status != 200
        and not (isinstance(dec.body, dict) and dec.body.get("errorName") == "ThrottlingException")
    ]
    assert not unexpected, unexpected


def test_concurrent_encrypts_use_fresh_ivs(burst: Burst) -> None:
    ivs = [
        o.body["initializationVector"]
        for o in burst.outcomes
        if o.call.kind == "encrypt" and o.status == 200
    ]
    assert len(ivs) == len(set(ivs))


def test_cdiv_returned_exactly_when_requested(burst: Burst) -> None:
    for o in burst.outcomes:
        if o.call.kind == "encrypt" and o.status == 200:
            asked = b"ciphertextDataIntegrityValueAlgorithm" in o.call.body
            assert ("ciphertextDataIntegrityValue" in o.body) == asked


def test_server_alive_after_the_burst(burst: Burst, server: Server) -> None:
    assert server.proc.poll() is None


def test_server_still_answers_after_the_burst(burst: Burst, client: XksClient) -> None:
    health = client.health()
    assert health.status == 200, health.body
    assert health.json["ekmFleetDetails"][0]["healthStatus"] in ("ACTIVE", "DEGRADED")
    enc = client.encrypt("foo", plaintext=b64(b"after the burst"))
    assert enc.status == 200, enc.body
    dec = client.decrypt("foo", **decrypt_fields(enc.json))
    assert dec.json == {"plaintext": b64(b"after the burst")}
