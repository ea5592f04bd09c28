"""The raw HSM loop: AES-GCM encryptions straight on the rig's token, no HTTP, no proxy.

    python -m loadtest.hsm_loop --rig DIR [--seconds 5] [--threads 1] [--procs 1] [--payload 32]

The module is loaded exactly as the proxy loads it (:mod:`xksproxy.hsm.pkcs11_lib`, with the
rig's ``SOFTHSM2_CONF``, OS locking), the token found by label and logged into with the PIN
from the rig's configuration, and the key (``foo``) found as the proxy finds it
(``find_key_blocking``: its current version object).  Each thread has its own session and runs
``C_Encrypt`` (AES-GCM, fresh 12-byte IV, 128-bit tag, the proxy's 8-byte AAD for a ciphertext
without AAD) in a tight loop.  ``--procs`` runs that in several processes and adds them up.

Also measured, one thread each:

- ``session_copy``: ``C_CopyObject`` of the key into a session object (``CKA_TOKEN`` false);
  whether the HSM allows it for a sensitive, non-extractable key, and its ops/s.
- ``find_by_label``: the proxy's key lookup (``find_key_blocking``: the key objects and state
  object with that label) and a bare label search, in ms, with the token's object count.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

from loadtest.stats import report
from xksproxy.configfile import load_config
from xksproxy.hsm.keystore import find_key_blocking
from xksproxy.hsm.pkcs11_lib import find_token, load_library
from xksproxy.service import encode_cm, hsm_aad

FIND_BUDGET = 1.0  # seconds per lookup timing (at least 3 lookups)


@contextmanager
def login(rig: str) -> Iterator[pkcs11.Token]:
    """The rig's first HSM token, with a logged-in session held open meanwhile."""
    config = load_config(Path(rig) / "xksproxy.toml").hsms[0]
    lib = load_library(str(config.module), config.env, config.name)
    token = find_token(lib, config.token_label, config.token_serial)
    session = token.open(user_pin=config.read_pin(), rw=True)
    try:
        yield token
    finally:
        session.close()


def key_object(session: pkcs11.Session, key_id: str) -> Any:
    """The current version object of *key_id* in *session*, found as the proxy finds it."""
    info, handles = find_key_blocking(session, key_id)
    want = handles[info.current_version]
    for obj in session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_id}
    ):
        if obj.handle == want:
            return obj
    raise LookupError(f"key {key_id!r} vanished")


def gcm_loop(key: Any, payload: int, seconds: float, aad: bytes) -> int:
    """AES-GCM encryptions of *payload* bytes with *key* for *seconds*; how many."""
    data = os.urandom(payload)
    n = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for _ in range(100):
            params = GCMParams(os.urandom(12), aad, 128)
            key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        n += 100
    return n


def threaded(token: pkcs11.Token, key_id: str, threads: int, payload: int, seconds: float) -> float:
    """ops/s of *threads* threads, each with its own session."""
    aad = hsm_aad(None, encode_cm(1))
    counts = [0] * threads
    sessions = [token.open(rw=True) for _ in range(threads)]
    keys = [key_object(s, key_id) for s in sessions]

    def work(i: int) -> None:
        counts[i] = gcm_loop(keys[i], payload, seconds, aad)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    for s in sessions:
        s.close()
    return sum(counts) / elapsed


def session_copy(token: pkcs11.Token, key_id: str, payload: int, seconds: float) -> dict[str, Any]:
    """Copy the key into a session object and time AES-GCM with the copy."""
    with token.open(rw=True) as session:
        key = key_object(session, key_id)
        try:
            copy = key.copy({Attribute.TOKEN: False})
        except PKCS11Error as exc:
            return {"allowed": False, "error": type(exc).__name__}
        attrs = copy.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.TOKEN])
        aad = hsm_aad(None, encode_cm(1))
        started = time.perf_counter()
        n = gcm_loop(copy, payload, seconds, aad)
        rate = n / (time.perf_counter() - started)
        copy.destroy()
    return {
        "allowed": True,
        "copy_attributes": {Attribute(a).name.lower(): bool(v) for a, v in attrs.items()},
        "ops_per_s": round(rate),
    }


def _mean_ms(fn: Callable[[], object], budget: float) -> float:
    """Mean ms of *fn*, called at least 3 times and for about *budget* seconds."""
    rounds = 0
    started = time.perf_counter()
    while rounds < 3 or time.perf_counter() - started < budget:
        fn()
        rounds += 1
    return (time.perf_counter() - started) / rounds * 1000


def find_cost(token: pkcs11.Token, key_id: str) -> dict[str, Any]:
    """ms per lookup of *key_id*, and the number of objects in the token."""
    with token.open(rw=True) as session:
        objects = sum(1 for _ in session.get_objects())
        proxy_ms = _mean_ms(lambda: find_key_blocking(session, key_id), FIND_BUDGET)
        bare_ms = _mean_ms(
            lambda: list(session.get_objects({Attribute.LABEL: key_id})), FIND_BUDGET
        )
    return {
        "token_objects": objects,
        "find_key_blocking_ms": round(proxy_ms, 3),
        "label_search_ms": round(bare_ms, 3),
    }


def _one_proc(rig: str, key_id: str, threads: int, payload: int, seconds: float) -> float:
    with login(rig) as token:
        return threaded(token, key_id, threads, payload, seconds)


def measure(
    rig: str, key_id: str, threads: int, procs: int, payload: int, seconds: float, extras: bool
) -> dict[str, Any]:
    """The loop's figures (and the session-copy and find-by-label ones with *extras*)."""
    args = (rig, key_id, threads, payload, seconds)
    if procs > 1:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            rate = sum(pool.starmap(_one_proc, [args] * procs))
    else:
        rate = _one_proc(*args)
    out: dict[str, Any] = {
        "key": key_id,
        "payload_bytes": payload,
        "threads": threads,
        "procs": procs,
        "seconds": seconds,
        "ops_per_s": round(rate),
    }
    if extras:
        with login(rig) as token:
            out["session_copy"] = session_copy(token, key_id, payload, seconds)
            out["find_by_label"] = find_cost(token, key_id)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rig", default=".rig")
    p.add_argument("--key", default="foo")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--payload", type=int, default=32)
    p.add_argument("--no-extras", action="store_true", help="skip session copy and find timing")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure(
        args.rig,
        args.key,
        args.threads,
        args.procs,
        args.payload,
        args.seconds,
        not args.no_extras,
    )
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
