"""Key check values: the HSM's own computation on a fixed input, never the key material.

KCV = the first 3 bytes of AES-ECB of a zero block under the key (the customary AES KCV),
computed inside the HSM.  A key allowed only to decrypt gives the first 3 bytes of the ECB
*decryption* of the zero block instead, marked ``D:``, so the two kinds are never compared.
A key allowed neither gives no KCV.  Three bytes tell copies apart with probability
1 - 2^-24 and reveal nothing usable about the key.
"""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute, Mechanism

from xksproxy.hsm.gcm import CkMechanism, RawKey, crypt_blocking
from xksproxy.hsm.pkcs11_lib import read_flags_blocking

ZERO_BLOCK = bytes(16)
_ECB = CkMechanism(Mechanism.AES_ECB, None, 0)


def kcv_blocking(key: Any) -> str | None:
    """The KCV of a python-pkcs11 secret key object: ``E:a1b2c3``, ``D:a1b2c3`` or None."""
    attrs = key.get_attributes([Attribute.ENCRYPT, Attribute.DECRYPT])
    if attrs.get(Attribute.ENCRYPT):
        return "E:" + bytes(key.encrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB))[:3].hex()
    if attrs.get(Attribute.DECRYPT):
        return "D:" + bytes(key.decrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB))[:3].hex()
    return None


def kcv_raw_blocking(key: RawKey) -> str | None:
    """:func:`kcv_blocking` by handle, through the module's function list: no session has to
    find the key object first (hsm/gcm.py)."""
    encrypt, decrypt = read_flags_blocking(
        key.functions, key.session, key.handle, (Attribute.ENCRYPT, Attribute.DECRYPT)
    )
    if encrypt:
        return "E:" + crypt_blocking(key, False, _ECB, ZERO_BLOCK, 16)[:3].hex()
    if decrypt:
        return "D:" + crypt_blocking(key, True, _ECB, ZERO_BLOCK, 16)[:3].hex()
    return None
