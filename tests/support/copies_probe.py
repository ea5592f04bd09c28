"""Session copies of keys, seen from inside one Pkcs11Hsm: ``python -m
tests.support.copies_probe CONFIG KEY``.  Run as a subprocess by
tests/integration/test_session_copies.py (the pytest process never loads SoftHSM); prints one
JSON object.  It destroys KEY's token objects at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from xksproxy import log
from xksproxy.configfile import load_config
from xksproxy.errors import KeyNotFoundError
from xksproxy.hsm.pkcs11_backend import Pkcs11Hsm

AAD, PLAINTEXT = b"aad", b"thirty-two bytes of plaintext..."


def _objects(session: Any, key_id: str, token: bool) -> list[Any]:
    return list(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.LABEL: key_id,
                Attribute.TOKEN: token,
            }
        )
    )


async def probe(config_path: str, key_id: str) -> dict[str, Any]:
    config = load_config(config_path)
    out: dict[str, Any] = {}
    for copies in (False, True):
        hc = dataclasses.replace(config.hsms[0], session_key_copies=copies)
        hsm = Pkcs11Hsm(hc)
        await hsm.open(hc.read_pin())
        loop = asyncio.get_running_loop()
        try:
            info = await hsm.key_info(key_id, loop.time() + 5)
            used = hsm._cache.keys[key_id].handles[info.current_version]
            login = hsm._login
            assert login is not None
            (token_key,) = _objects(login, key_id, True)
            iv, got = await hsm.encrypt(
                key_id, info.current_version, PLAINTEXT, AAD, loop.time() + 5
            )
            expected = bytes(
                token_key.encrypt(
                    PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, AAD)
                )
            )
            entry: dict[str, Any] = {
                "uses_token_object": used == token_key.handle,
                "same_ciphertext": got == expected,
                "session_objects": len(_objects(login, key_id, False)),
            }
            if copies:
                (copy,) = _objects(login, key_id, False)
                attrs = copy.get_attributes(
                    [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.TOKEN]
                )
                entry["copy"] = {Attribute(a).name.lower(): bool(v) for a, v in attrs.items()}
                # Looked up again (the entry expired): the same copy is kept, no new one made.
                hsm._cache.keys.pop(key_id)
                await hsm.key_info(key_id, loop.time() + 5)
                entry["session_objects_after_second_lookup"] = len(_objects(login, key_id, False))
                # The key leaves the token: the next lookup fails and destroys the copy.
                token_key.destroy()
                hsm._cache.keys.pop(key_id)
                try:
                    await hsm.key_info(key_id, loop.time() + 5)
                    entry["lookup_after_delete"] = "found"
                except KeyNotFoundError:
                    entry["lookup_after_delete"] = "KeyNotFound"
                entry["session_objects_after_delete"] = len(_objects(login, key_id, False))
            out["copies" if copies else "token"] = entry
        finally:
            await hsm.close()
    return out


if __name__ == "__main__":
    log.configure("critical", sys.stderr)  # stdout carries the JSON answer alone
    print(json.dumps(asyncio.run(probe(sys.argv[1], sys.argv[2]))))
