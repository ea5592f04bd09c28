"""One HSM of a rig, seen from outside the proxy: ``python -m tests.support.hsm_tool CMD ...``.

The tests run it as a subprocess (the pytest process never loads SoftHSM outside
tests/integration/test_faultinject.py and test_vendor_emulation.py), and only ever open the
one HSM named, so that what it shows is what that HSM alone holds and can do.

    encrypt CONFIG HSM LABEL IV AAD PLAINTEXT    AES-256-GCM, all hex in, ciphertext||tag hex out
    decrypt CONFIG HSM LABEL IV AAD CIPHERTEXT   the reverse (exit 1 if the tag does not verify)
    objects CONFIG HSM LABEL                     JSON list of the classes of objects so labelled
    kcv CONFIG HSM LABEL                         the KCV of the secret key so labelled
    generate CONFIG HSM LABEL                    a new key of that label on this HSM alone
                                                 (material of its own: a copy that differs)
    duplicate CONFIG HSM LABEL N                 one more object for version N of the key, of
                                                 new material (as two commands that raced)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

from xksproxy.configfile import load_config
from xksproxy.hsm.kcv import kcv_blocking
from xksproxy.keys.sessions import admin_session
from xksproxy.keys.store import generate_version, set_status


def _key(session: Any, label: str) -> Any:
    keys = list(
        session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
    )
    if len(keys) != 1:
        raise SystemExit(f"{len(keys)} secret keys labelled {label!r}")
    return keys[0]


def run(argv: Sequence[str]) -> str:
    command, config_path, hsm_name, label, *rest = argv
    config = load_config(config_path)
    (hsm,) = [h for h in config.hsms if h.name == hsm_name]
    with admin_session(hsm) as session:
        if command == "objects":
            found = session.get_objects({Attribute.LABEL: label})
            return json.dumps(sorted(ObjectClass(o[Attribute.CLASS]).name for o in found))
        if command == "generate":
            generate_version(session, label, 1, True, True)
            set_status(session, label, "ENABLED")
            return "generated"
        if command == "duplicate":
            generate_version(session, label, int(rest[0]), True, True)
            return "duplicated"
        key = _key(session, label)
        if command == "kcv":
            return str(kcv_blocking(key))
        iv, aad, data = (bytes.fromhex(x) for x in rest)
        params = GCMParams(iv, aad, 128)
        if command == "encrypt":
            out = key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        elif command == "decrypt":
            try:
                out = key.decrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            except PKCS11Error as exc:
                raise SystemExit(f"decrypt failed: {type(exc).__name__}") from exc
        else:
            raise SystemExit(f"unknown command {command!r}")
        return bytes(out).hex()


if __name__ == "__main__":
    print(run(sys.argv[1:]))
