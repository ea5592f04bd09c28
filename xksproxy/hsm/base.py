"""What the service needs from an HSM, independent of PKCS#11."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from xksproxy.hsm.pool import PoolStats

# keyUsage values the spec allows, in the order GetKeyMetadata lists them.
USAGE_NAMES = ("ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE")


class KeyStatus(enum.Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"


class HealthState(enum.Enum):
    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One external key as the HSM holds it: versions, usage and status."""

    key_id: str
    status: KeyStatus
    usages: tuple[str, ...]  # subset of USAGE_NAMES, in that order
    current_version: int  # the version Encrypt uses: the newest usable one it records
    versions: frozenset[int]  # the usable versions
    # What makes some of its objects unusable ("version 2 has 2 objects"): never served,
    # reported by `keys list`, `keys show` and `check`, and refused by the commands that add
    # a version.  The other versions serve on.
    damaged: tuple[str, ...] = ()
    # Versions whose objects exist but which the key's metadata does not record: left by a
    # rotate or import that did not finish (its metadata is written last, once every HSM has
    # the version).  They decrypt, never encrypt; `keys repair` (or re-running the command)
    # finishes or removes them.
    pending: frozenset[int] = frozenset()

    @property
    def problems(self) -> tuple[str, ...]:
        """What keeps the key from serving whole, one line each (``keys list``, ``check``)."""
        return (*self.damaged, *(unrecorded(v) for v in sorted(self.pending)))

    @property
    def can_encrypt(self) -> bool:
        return "ENCRYPT" in self.usages

    @property
    def can_decrypt(self) -> bool:
        return "DECRYPT" in self.usages


def unrecorded(version: int) -> str:
    """The problem of a version its key's metadata does not record (``KeyInfo.pending``)."""
    return (
        f"version {version} is not recorded (an interrupted command; keys repair finishes "
        "or removes it)"
    )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one known-answer test."""

    ok: bool
    latency_s: float
    detail: str


class Hsm(Protocol):
    """One HSM (a PKCS#11 module and token) as the service sees it.

    *deadline* is an absolute ``loop.time()``: every call answers by then or raises
    ThrottlingError / DependencyTimeoutError.
    """

    name: str

    @property
    def model(self) -> str:
        """Manufacturer and model of the token, for ekmFleetDetails."""
        ...

    @property
    def load(self) -> int:
        """Calls in flight or waiting for a session: the routing prefers the least loaded."""
        ...

    async def key_info(self, key_id: str, deadline: float, version: int = 0) -> KeyInfo:
        """The key's metadata (cached); KeyNotFoundError when absent.

        With *version*: a cached entry without that version is read again from the HSM first
        (at most once a second per key), so that a ciphertext of a version made since the
        entry was cached (a rotation, seen by another proxy first) still decrypts."""
        ...

    async def encrypt(
        self, key_id: str, version: int, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        """AES-256-GCM encrypt under a fresh IV, made by the proxy or the HSM as the HSM
        requires (xksproxy/hsm/gcm.py): returns (IV of 12 or 16 bytes, ciphertext || tag)."""
        ...

    async def decrypt(
        self, key_id: str, version: int, iv: bytes, data: bytes, aad: bytes, deadline: float
    ) -> bytes:
        """AES-256-GCM decrypt of ciphertext || tag; InvalidCiphertextError on failure."""
        ...

    def accepts_iv_length(self, length: int) -> bool:
        """Whether this HSM can decrypt with an IV of *length* bytes (12 always; 16 on most)."""
        ...

    async def kcv(self, key_id: str, version: int, deadline: float) -> str | None:
        """The key check value of a key version (xksproxy/hsm/kcv.py); None if it has none."""
        ...

    async def probe(self, timeout: float) -> ProbeResult:
        """Run the known-answer test on the health key."""
        ...


class ManagedHsm(Hsm, Protocol):
    """An HSM's life besides requests, as the application drives it: opened at start, its
    health key looked up before the first probe, mended on the prober's beat, its pool
    sampled and trimmed, looked over by ``xksproxy check``, closed at exit.  The application
    needs nothing else of an adapter, and writes none of its fields."""

    @property
    def health_key(self) -> str:
        """The label of the key the known-answer test uses."""
        ...

    async def open(self, pin: str, timeout: float | None = None) -> None:
        """Load the module, log in, open the session pool.  On failure (or after *timeout*
        seconds) raise HsmUnavailableError, whose detail is also why the HSM cannot serve
        until :meth:`recover` opens it."""
        ...

    async def warm(self, key_id: str) -> None:
        """Look *key_id* up before serving, with no time limit; errors are left for the
        probe."""
        ...

    async def recover(self) -> None:
        """Reopen the HSM if it needs it (with backoff), refill lost sessions otherwise;
        cheap when there is nothing to do."""
        ...

    @property
    def reopen_pending(self) -> bool:
        """Whether the next :meth:`recover` reopens the module, login and sessions."""
        ...

    def request_reopen(self) -> None:
        """Have the next :meth:`recover` reopen the HSM (it stayed UNAVAILABLE too long)."""
        ...

    def pool_stats(self) -> PoolStats:
        """Sessions idle, busy, stuck in a hung call, and callers waiting."""
        ...

    def trim_pool(self) -> None:
        """Close sessions the pool grew beyond its size for and no longer needs."""
        ...

    @property
    def gcm_detail(self) -> str:
        """The AES-GCM IV mode in use, or why there is none (``xksproxy check``)."""
        ...

    async def key_problems(self) -> dict[str, tuple[str, ...]]:
        """Every key of the token that cannot serve whole, and why (``xksproxy check``)."""
        ...

    async def close(self) -> None:
        """Close the sessions, log out, stop the HSM's threads."""
        ...


class HsmObserver(Protocol):
    """Where an HSM adapter and its session pool report their calls (xksproxy.metrics.Metrics
    is one): the adapter depends on this, not on the metrics it feeds."""

    def hsm_call(self, hsm: str, call: str, seconds: float) -> None:
        """Observe the duration of one PKCS#11 operation."""
        ...

    def hsm_error(self, hsm: str, ckr: str) -> None:
        """Count a failed HSM call by its CKR name (or TIMEOUT)."""
        ...

    def pool_acquire(self, hsm: str, seconds: float) -> None:
        """Observe the wait for a pooled session."""
        ...
