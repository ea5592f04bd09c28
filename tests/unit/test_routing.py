"""Routing, failover, health hysteresis and key consistency, with fake HSMs behind the Protocol.

The same behaviours are exercised against real SoftHSM instances behind the fault-injection
module in tests/integration/test_failover.py; these pin down the rules one at a time.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest

from xksproxy.consistency import KeyConsistency
from xksproxy.errors import (
    DependencyTimeoutError,
    InternalError,
    InvalidCiphertextError,
    InvalidStateError,
    KeyNotFoundError,
    ThrottlingError,
    XksError,
)
from xksproxy.health import HealthBoard
from xksproxy.hsm.base import HealthState, KeyInfo, KeyStatus, ProbeResult
from xksproxy.models import DecryptRequest, EncryptRequest, RequestMetadata
from xksproxy.service import XksService, encode_cm

META = RequestMetadata("r", "Encrypt", "arn", "key", None, None, None)
_IVS = itertools.count()  # every fake HSM makes IVs from one counter: no two alike


@dataclass
class Fake:
    """A fake HSM: ``fail`` raises on crypto calls, ``keys`` maps key id -> KCV."""

    name: str
    keys: dict[str, str] = field(default_factory=lambda: {"k": "E:aaaaaa"})
    fail: XksError | None = None
    load: int = 0
    calls: list[str] = field(default_factory=list)
    ivs: list[bytes] = field(default_factory=list)
    probe_ok: bool = True
    iv16: bool = True  # takes 16-byte IVs to decrypt
    status: KeyStatus = KeyStatus.ENABLED

    @property
    def model(self) -> str:
        return "fake"

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        if key_id not in self.keys:
            raise KeyNotFoundError()
        return KeyInfo(key_id, self.status, ("ENCRYPT", "DECRYPT"), 1, frozenset({1}))

    async def kcv(self, key_id: str, version: int, deadline: float) -> str | None:
        if key_id not in self.keys:
            raise KeyNotFoundError()
        return self.keys[key_id]

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        self.calls.append("encrypt")
        iv = next(_IVS).to_bytes(12, "big")
        self.ivs.append(iv)
        if self.fail is not None:
            raise self.fail
        return iv, plaintext + bytes(16)

    async def decrypt(
        self, key_id: str, version: int, iv: bytes, data: bytes, aad: bytes, deadline: float
    ) -> bytes:
        self.calls.append("decrypt")
        if self.fail is not None:
            raise self.fail
        return data[:-16]

    def accepts_iv_length(self, length: int) -> bool:
        return length == 12 or self.iv16

    async def probe(self, timeout: float) -> ProbeResult:
        return ProbeResult(self.probe_ok, 0.001, "ok" if self.probe_ok else "failed")


def make(*hsms: Fake, failovers: list[tuple[str, str]] | None = None) -> XksService:
    board = HealthBoard(hsms, degraded_latency_s=0.05, degraded_after=2, recover_after=2)
    for h in hsms:
        board.record_probe(h.name, True, 0.001, "ok")
    return XksService(
        hsms,
        board=board,
        consistency=KeyConsistency(hsms),
        health_keys=frozenset({"health"}),
        proxy_vendor="v",
        proxy_model="m",
        ekm_vendor="e",
        fleet_size=1,
        on_failover=(lambda a, b: failovers.append((a, b))) if failovers is not None else None,
    )


def deadline() -> float:
    return asyncio.get_running_loop().time() + 1


def request() -> EncryptRequest:
    return EncryptRequest(META, b"hello", None, False)


async def test_active_hsms_come_before_degraded_and_unavailable() -> None:
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    svc = make(a, b, c)
    svc.board.record_probe("a", False, 1, "down")
    svc.board.suspect("b", "test")
    assert [h.name for h in svc.route()] == ["c", "b", "a"]


async def test_least_loaded_first_within_a_state() -> None:
    a, b = Fake("a", load=5), Fake("b", load=0)
    assert make(a, b).route()[0].name == "b"


async def test_equal_load_rotates() -> None:
    svc = make(Fake("a"), Fake("b"))
    firsts = {svc.route()[0].name for _ in range(4)}
    assert firsts == {"a", "b"}


@pytest.mark.parametrize("error", [InternalError(), DependencyTimeoutError()])
async def test_hsm_failure_is_retried_once_on_another_hsm(error: XksError) -> None:
    a, b = Fake("a", fail=error), Fake("b")
    failovers: list[tuple[str, str]] = []
    svc = make(a, b, failovers=failovers)
    svc._turn = 1  # a first
    a.load, b.load = 0, 1
    resp = await svc.encrypt("k", request(), deadline())
    assert resp.ciphertext == b"hello"
    assert a.calls == ["encrypt"] and b.calls == ["encrypt"]
    assert a.ivs[0] != b.ivs[0]  # a retry gets a fresh IV
    assert failovers == [("a", "b")]
    assert svc.board.state("a") is HealthState.DEGRADED  # suspect at once


async def test_only_one_retry() -> None:
    a, b, c = (Fake(n, fail=InternalError(), load=i) for i, n in enumerate("abc"))
    with pytest.raises(InternalError):
        await make(a, b, c).encrypt("k", request(), deadline())
    assert c.calls == []


async def test_caller_errors_are_not_retried() -> None:
    a, b = Fake("a", fail=InvalidCiphertextError()), Fake("b", load=1)
    with pytest.raises(InvalidCiphertextError):
        await make(a, b).encrypt("k", request(), deadline())
    assert b.calls == []


async def test_a_key_missing_on_one_hsm_is_served_by_another() -> None:
    a, b = Fake("a", keys={}), Fake("b", load=1)
    await make(a, b).encrypt("k", request(), deadline())
    assert b.calls == ["encrypt"]


async def test_a_key_missing_everywhere_is_not_found() -> None:
    with pytest.raises(KeyNotFoundError):
        await make(Fake("a", keys={}), Fake("b", keys={})).encrypt("k", request(), deadline())


async def test_a_differing_copy_is_never_used() -> None:
    a = Fake("a", keys={"k": "E:bad000"})
    b, c = Fake("b", load=1), Fake("c", load=2)
    svc = make(a, b, c)
    for _ in range(3):
        await svc.encrypt("k", request(), deadline())
    assert a.calls == []
    assert svc.consistency.excluded("a") == [("k", 1)]


async def test_without_a_majority_the_first_configured_hsm_is_the_reference() -> None:
    a, b = Fake("a", keys={"k": "E:111111"}, load=1), Fake("b", keys={"k": "E:222222"})
    svc = make(a, b)
    await svc.encrypt("k", request(), deadline())
    assert b.calls == [] and a.calls == ["encrypt"]


async def test_recheck_notices_a_copy_that_changed() -> None:
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    svc = make(a, b, c)
    await svc.encrypt("k", request(), deadline())
    a.keys["k"] = "E:changed"
    await svc.consistency.recheck(a, deadline())
    assert svc.consistency.excluded("a") == [("k", 1)]
    a.keys["k"] = "E:aaaaaa"
    await svc.consistency.recheck(a, deadline())
    assert svc.consistency.excluded("a") == []


async def test_health_key_is_never_served() -> None:
    with pytest.raises(KeyNotFoundError):
        await make(Fake("a", keys={"health": "E:aaaaaa"})).encrypt("health", request(), deadline())


# ---- health hysteresis ----------------------------------------------------------------------


def board(**kw: int) -> HealthBoard:
    b = HealthBoard(
        [Fake("a")],
        degraded_latency_s=0.05,
        degraded_after=kw.get("degraded_after", 2),
        recover_after=kw.get("recover_after", 2),
    )
    b.record_probe("a", True, 0.001, "ok")
    return b


def test_first_probe_decides_directly() -> None:
    b = HealthBoard([Fake("a")], degraded_latency_s=0.05, degraded_after=2, recover_after=2)
    assert b.state("a") is HealthState.UNAVAILABLE
    assert b.record_probe("a", True, 0.001, "ok") is HealthState.ACTIVE


def test_one_slow_probe_does_not_degrade() -> None:
    b = board()
    assert b.record_probe("a", True, 0.2, "ok") is HealthState.ACTIVE
    assert b.record_probe("a", True, 0.2, "ok") is HealthState.DEGRADED


def test_a_failed_probe_is_unavailable_at_once() -> None:
    assert board().record_probe("a", False, 0.001, "x") is HealthState.UNAVAILABLE


def test_recovery_needs_consecutive_good_probes() -> None:
    b = board()
    b.record_probe("a", False, 0.001, "x")
    assert b.record_probe("a", True, 0.001, "ok") is HealthState.DEGRADED
    assert b.record_probe("a", True, 0.001, "ok") is HealthState.ACTIVE


def test_a_recovering_hsm_that_is_slow_stays_degraded() -> None:
    b = board()
    b.record_probe("a", False, 0.001, "x")
    assert b.record_probe("a", True, 0.2, "ok") is HealthState.DEGRADED
    assert b.record_probe("a", True, 0.2, "ok") is HealthState.DEGRADED


async def test_no_answer_at_first_use_is_tried_again_at_the_next() -> None:
    a, b = Fake("a"), Fake("b", load=1)
    svc = make(a, b)
    real_kcv = a.kcv

    async def failing(key_id: str, version: int, deadline: float) -> str | None:
        raise DependencyTimeoutError()

    a.kcv = failing  # type: ignore[method-assign]
    b.kcv = failing  # type: ignore[method-assign]
    await svc.encrypt("k", request(), deadline())
    assert ("k", 1) not in svc.consistency._reference
    a.kcv = real_kcv  # type: ignore[method-assign]
    b.keys["k"] = "E:bbbbbb"
    b.kcv = Fake.kcv.__get__(b)  # type: ignore[method-assign]
    await svc.encrypt("k", request(), deadline())
    assert svc.consistency.excluded("b") == [("k", 1)]


def test_a_request_failure_makes_an_active_hsm_suspect() -> None:
    b = board()
    b.suspect("a", "DependencyTimeoutException")
    assert b.state("a") is HealthState.DEGRADED
    assert b.record_probe("a", True, 0.001, "ok") is HealthState.DEGRADED
    assert b.record_probe("a", True, 0.001, "ok") is HealthState.ACTIVE


def test_suspicion_never_raises_an_unavailable_hsm() -> None:
    b = board()
    b.record_probe("a", False, 0.001, "x")
    b.suspect("a", "x")
    assert b.state("a") is HealthState.UNAVAILABLE


def decrypt_request(iv_length: int) -> DecryptRequest:
    return DecryptRequest(META, b"hello", encode_cm(1), None, bytes(iv_length), bytes(16))


async def test_a_16_byte_iv_is_decrypted_only_where_it_is_taken() -> None:
    a, b = Fake("a", iv16=False), Fake("b")
    svc = make(a, b)
    svc._turn = 1  # a first
    for _ in range(2):
        resp = await svc.decrypt("k", decrypt_request(16), deadline())
        assert resp.plaintext == b"hello"
    assert a.calls == [] and b.calls == ["decrypt", "decrypt"]
    await svc.decrypt("k", decrypt_request(12), deadline())
    assert a.calls or b.calls.count("decrypt") == 3  # 12 bytes: any HSM


async def test_a_16_byte_iv_no_hsm_takes_is_an_invalid_ciphertext() -> None:
    a, b = Fake("a", iv16=False), Fake("b", iv16=False)
    with pytest.raises(InvalidCiphertextError):
        await make(a, b).decrypt("k", decrypt_request(16), deadline())
    assert a.calls == b.calls == []


async def test_the_key_checks_come_before_the_iv_length() -> None:
    a = Fake("a", iv16=False, status=KeyStatus.DISABLED)
    with pytest.raises(InvalidStateError):
        await make(a).decrypt("k", decrypt_request(16), deadline())
    with pytest.raises(KeyNotFoundError):
        await make(Fake("b", iv16=False)).decrypt("nope", decrypt_request(16), deadline())


async def test_a_16_byte_iv_goes_to_the_hsm_that_takes_it_even_when_it_fails() -> None:
    a, b = Fake("a", iv16=False), Fake("b", fail=DependencyTimeoutError())
    with pytest.raises(DependencyTimeoutError):  # retryable: the HSM that can is down
        await make(a, b).decrypt("k", decrypt_request(16), deadline())
    assert a.calls == []


@dataclass
class Changing(Fake):
    """A fake whose key loses its newest version between the view a request decides on and
    the call that uses it (a key command in between): version 2 is gone at the first use."""

    views: list[int] = field(default_factory=lambda: [2, 1])
    used: list[int] = field(default_factory=list)

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        current = self.views.pop(0) if len(self.views) > 1 else self.views[0]
        return KeyInfo(
            key_id, KeyStatus.ENABLED, ("ENCRYPT", "DECRYPT"), current, frozenset({1, current})
        )

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        self.used.append(version)
        if version == 2:
            raise KeyNotFoundError("this HSM holds no version 2 of the key")
        return await super().encrypt(key_id, version, plaintext, aad, deadline)


async def test_a_version_gone_between_view_and_use_is_decided_again_not_not_found() -> None:
    hsm = Changing("a")
    out = await make(hsm).encrypt("k", request(), deadline())
    assert hsm.used == [2, 1] and out.ciphertext_metadata[-1] == 1


async def test_a_key_gone_for_good_is_still_not_found() -> None:
    hsm = Changing("a", views=[2])  # every view names version 2, which never works
    with pytest.raises(KeyNotFoundError):
        await make(hsm).encrypt("k", request(), deadline())
    assert hsm.used == [2, 2]  # decided again once, then given up


class Busy(Fake):
    """An HSM whose every session is taken by requests: the probe gets the pool's 429."""

    async def probe(self, timeout: float) -> ProbeResult:
        raise ThrottlingError()


async def test_a_probe_that_finds_every_session_busy_keeps_the_state_fresh() -> None:
    hsm = Busy("a")
    b = HealthBoard([hsm], degraded_latency_s=0.05, degraded_after=2, recover_after=2)
    b.record_probe("a", True, 0.001, "ok")
    checked = b.snapshot()[0].checked_at
    seen = await b.probe_once(hsm, 0.1)
    assert seen.state is HealthState.ACTIVE and b.state("a") is HealthState.ACTIVE
    assert seen.checked_at > checked  # a result: the state does not go stale under load


async def test_a_first_probe_that_finds_every_session_busy_proves_nothing() -> None:
    hsm = Busy("a")
    b = HealthBoard([hsm], degraded_latency_s=0.05, degraded_after=2, recover_after=2)
    assert (await b.probe_once(hsm, 0.1)).state is HealthState.UNAVAILABLE
