"""Pre-signed XKS requests as raw HTTP/1.1 bytes, ready to be written to a socket.

Requests are signed with botocore's SigV4 signer (an implementation independent of the
proxy's), ahead of the run: a pool of distinct requests, each valid for the 5-minute SigV4
window, so the generator spends its CPU on HTTP, not on signing.  A pool is signed afresh for
every run and no run lasts longer than :data:`MAX_DURATION`.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

APIS = ("encrypt", "decrypt", "metadata", "health")
MAX_DURATION = 240.0  # a run, started right after signing, must end inside the SigV4 window
POOL = 512  # distinct requests per run (at least one per key)
CIPHERTEXT_FIELDS = (
    "ciphertext",
    "ciphertextMetadata",
    "initializationVector",
    "authenticationTag",
)


@dataclass(frozen=True)
class Target:
    """Where an XKS proxy listens and how to sign for it (plain HTTP on 127.0.0.1 only)."""

    host: str
    port: int
    base: str  # XksProxyUriPath, e.g. /example/xks/kms/xks/v1
    akid: str
    secret: str
    region: str

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_rig(cls, rig: str | Path) -> Target:
        """The target described by a rig's ``kms-xks-config.json`` (``xksproxy dev-setup``)."""
        kms = json.loads((Path(rig) / "kms-xks-config.json").read_text())
        url = urlsplit(kms["XksProxyUriEndpoint"])
        if url.scheme != "http" or url.hostname != "127.0.0.1" or url.port is None:
            raise SystemExit(f"the generator speaks plain HTTP to 127.0.0.1:PORT only, not {url}")
        cred = kms["XksProxyAuthenticationCredential"]
        return cls(
            host=url.hostname,
            port=url.port,
            base=kms["XksProxyUriPath"],
            akid=cred["AccessKeyId"],
            secret=cred["RawSecretAccessKey"],
            region=kms["Region"],
        )

    def with_port(self, port: int) -> Target:
        """The same requests aimed at another port (the floor server ignores SigV4)."""
        return Target(self.host, port, self.base, self.akid, self.secret, self.region)


@dataclass(frozen=True)
class Pool:
    """Pre-built requests: ``raws[i]`` is a whole request of API ``names[apis[i]]``."""

    names: tuple[str, ...]
    apis: list[int]
    raws: list[bytes]


def _meta(op: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/load",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/load",
        "kmsOperation": op,
        "kmsRequestId": str(uuid.uuid4()),
    }


def aad_field(aad: int) -> dict[str, str]:
    """``additionalAuthenticatedData`` of *aad* bytes (the same in every request of a run, so a
    decrypt carries what its ciphertext was made with), or nothing for 0."""
    return {"additionalAuthenticatedData": base64.b64encode(b"a" * aad).decode()} if aad else {}


def body(
    api: str, payload: int, ciphertext: Mapping[str, Any] | None = None, aad: int = 0
) -> dict[str, Any]:
    """The JSON body of one request (decrypt needs the output of an earlier encrypt, made with
    the same *aad* bytes of AAD)."""
    if api == "health":
        return {"requestMetadata": _meta("KmsHealthCheck")}
    if api == "metadata":
        return {"requestMetadata": _meta("CreateKey")}
    if api == "encrypt":
        return {
            "requestMetadata": _meta("Encrypt"),
            "encryptionAlgorithm": "AES_GCM",
            "plaintext": base64.b64encode(os.urandom(payload)).decode(),
            **aad_field(aad),
        }
    if api == "decrypt" and ciphertext is not None:
        meta = {"requestMetadata": _meta("Decrypt"), "encryptionAlgorithm": "AES_GCM"}
        return {**meta, **ciphertext, **aad_field(aad)}
    raise ValueError(f"cannot build a {api} request")


def path(api: str, key: str) -> str:
    """The path of *api* after the base path."""
    return "/health" if api == "health" else f"/keys/{key}/{api}"


def signed(target: Target, api_path: str, raw_body: bytes) -> bytes:
    """A whole HTTP/1.1 POST of *raw_body*, signed with SigV4 as KMS would sign it."""
    full = target.base + api_path
    req = AWSRequest(
        method="POST",
        url=f"http://{target.netloc}{full}",
        data=raw_body,
        headers={"Content-Type": "application/json"},
    )
    SigV4Auth(Credentials(target.akid, target.secret), "kms-xks-proxy", target.region).add_auth(req)
    lines = [f"POST {full} HTTP/1.1", f"Host: {target.netloc}"]
    lines += [f"{name}: {value}" for name, value in req.headers.items()]
    lines.append(f"Content-Length: {len(raw_body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw_body


def parse_weights(spec: str) -> dict[str, int]:
    """``encrypt=45,decrypt=45,metadata=9,health=1`` -> weights; a bare API name weighs 1."""
    weights: dict[str, int] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in APIS:
            raise ValueError(f"unknown API {name!r} (one of {', '.join(APIS)})")
        weights[name] = int(weight or 1)
        if weights[name] < 0:
            raise ValueError(f"negative weight for {name}")
    if not any(weights.values()):
        raise ValueError("all weights are zero")
    return weights


def interleave(weights: Mapping[str, int], n: int) -> list[str]:
    """*n* API names in the proportions of *weights*, spread evenly (smooth weighted
    round-robin), so any window of the pool carries about the same mix."""
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    out = []
    for _ in range(n):
        for name, weight in weights.items():
            current[name] += weight
        pick = max(current, key=lambda name: current[name])
        current[pick] -= total
        out.append(pick)
    return out


def key_names(key: str, count: int, prefix: str | None) -> list[str]:
    """The keys requests are spread over: *key* alone, or ``prefix0 .. prefix{count-1}``."""
    if prefix is None:
        return [key]
    return [f"{prefix}{i}" for i in range(count)]


@dataclass(frozen=True)
class Plan:
    """Which API and key each slot of a pool gets."""

    slots: list[tuple[str, str]]  # (api, key)

    @classmethod
    def make(cls, weights: Mapping[str, int], keys: Sequence[str], size: int = POOL) -> Plan:
        n = max(size, len(keys))
        apis = interleave(weights, n)
        return cls([(api, keys[i % len(keys)]) for i, api in enumerate(apis)])

    def decrypt_keys(self) -> list[str]:
        """The keys that decrypt slots use (each needs a ciphertext made by a real encrypt)."""
        return sorted({key for api, key in self.slots if api == "decrypt"})


def build_pool(
    target: Target,
    plan: Plan,
    payload: int,
    ciphertexts: Mapping[str, Sequence[Mapping[str, Any]]],
    aad: int = 0,
) -> Pool:
    """Sign every slot of *plan*; *ciphertexts* maps a key to encrypt outputs under it (made
    with *aad* bytes of AAD)."""
    apis, raws = [], []
    for i, (api, key) in enumerate(plan.slots):
        made = ciphertexts.get(key, ())
        ct = made[i % len(made)] if made else None
        raw = json.dumps(body(api, payload, ct, aad)).encode()
        apis.append(APIS.index(api))
        raws.append(signed(target, path(api, key), raw))
    return Pool(APIS, apis, raws)
