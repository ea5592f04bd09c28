"""What the CLI cannot do to one HSM of a rig, done there alone for the replicate tests:
``python -m tests.support.replicate_hsm COMMAND CONFIG HSM KEY_ID`` (a subprocess, so that the
pytest process never loads SoftHSM)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pkcs11 import Attribute, KeyType, ObjectClass

from xksproxy.hsm import objects


def hsm_main(argv: Sequence[str]) -> None:
    """``COMMAND CONFIG HSM KEY_ID``, on that HSM alone (run in a subprocess by :func:`on_hsm`):

    add-version   the key's next version, generated there, recorded in its metadata
    old-key       version 1 as xksproxy made keys before replicate existed: not extractable
    foreign-key   version 1 as other tooling might make it: extractable, a CKA_ID of its own
    leftover      (KEY_ID unused) a trusted transport key as a crashed replicate leaves it
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    from xksproxy.configfile import load_config
    from xksproxy.hsm.keystore import find_key_blocking, read_meta_blocking
    from xksproxy.keys.create import add_version_everywhere
    from xksproxy.keys.sessions import admin_session
    from xksproxy.keys.store import key_template
    from xksproxy.keys.trusted import TRANSPORT_LABEL

    command, config_path, name, key_id = argv
    (hsm,) = [h for h in load_config(config_path).hsms if h.name == name]
    if command == "leftover":
        from xksproxy.hsm.pkcs11_lib import find_token, load_library

        token = find_token(load_library(str(hsm.module), hsm.env, name), hsm.token_label, None)
        numbers = rsa.generate_private_key(65537, 2048).public_key().public_numbers()
        so = token.open(so_pin=hsm.read_so_pin(), rw=True)
        so.create_object(
            {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.TRUSTED: True,
                Attribute.WRAP: True,
                Attribute.LABEL: TRANSPORT_LABEL,
                Attribute.MODULUS: numbers.n.to_bytes(256, "big"),
                Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes(3, "big"),
            }
        )
        so.close()
        return
    with admin_session(hsm) as session:
        if command == "add-version":
            info, _ = find_key_blocking(session, key_id)
            version = info.current_version + 1
            meta = read_meta_blocking(session, key_id).with_version(
                version, objects.now_utc(), "generated"
            )
            enc, dec = "ENCRYPT" in info.usages, "DECRYPT" in info.usages
            add_version_everywhere([(hsm, session)], key_id, version, enc, dec, {name: meta})
        elif command in ("old-key", "foreign-key"):
            template = key_template(True, True)
            if command == "old-key":
                template.update({Attribute.EXTRACTABLE: False, Attribute.WRAP_WITH_TRUSTED: False})
            cka_id = objects.version_id(1) if command == "old-key" else b"made-elsewhere"
            session.generate_key(
                KeyType.AES, 256, label=key_id, id=cka_id, store=True, template=template
            )
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    hsm_main(sys.argv[1:])
