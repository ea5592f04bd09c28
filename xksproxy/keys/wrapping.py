"""The four KMS wrapping algorithms of ``keys import-params`` / ``keys import``: the HSM's
side (unwrap, checks, a self-test) and the customer's (for the self-test).
:mod:`xksproxy.keys.byok` says how an import goes; :mod:`xksproxy.keys.wrapping_keys` keeps the
RSA wrapping keys.

Algorithms (KMS's names; the customer wraps 32 bytes of AES key material):

- ``RSAES_OAEP_SHA_256`` / ``RSAES_OAEP_SHA_1``: RSA-OAEP (MGF1 with the same hash, no label)
  of the material.
- ``RSA_AES_KEY_WRAP_SHA_256`` / ``RSA_AES_KEY_WRAP_SHA_1``: RSA-OAEP of an ephemeral AES key,
  followed by the material wrapped under that key with AES key wrap with padding (RFC 5649).
  The HSM unwraps in the same two steps (``CKM_RSA_AES_KEY_WRAP`` is less widely supported;
  SoftHSM has none): the ephemeral key becomes a session object allowed only to unwrap,
  destroyed at once.  RFC 5649 is ``CKM_AES_KEY_WRAP_KWP`` in PKCS#11 3.0; SoftHSM 2.6 calls it
  ``CKM_AES_KEY_WRAP_PAD`` (which PKCS#11 2.40 defines as PKCS#7 padding), so KWP is tried
  first and PAD after a ``CKR_MECHANISM_INVALID``.  The self-test of ``import-params`` proves
  the choice right on each HSM before a token is issued.

SoftHSM 2.6 unwraps RSA-OAEP only with SHA-1 (SHA-256 gives ``CKR_ARGUMENTS_BAD``), leaves
``CKA_VALUE_LEN`` at 0 on unwrapped keys and accepts material of any length, so the length is
checked here (:func:`check_material`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    ArgumentsBad,
    DataInvalid,
    DataLenRange,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    FunctionFailed,
    GeneralError,
    KeyNotWrappable,
    KeySizeRange,
    KeyTypeInconsistent,
    MechanismInvalid,
    MechanismParamInvalid,
    PKCS11Error,
    WrappedKeyInvalid,
    WrappedKeyLenRange,
)

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError
from xksproxy.hsm.kcv import ZERO_BLOCK
from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.keys.import_names import WRAPPING_ALGORITHMS, WRAPPING_KEY_SPECS
from xksproxy.keys.sessions import step
from xksproxy.keys.store import destroy_quietly
from xksproxy.keys.transport import NO_USE, SESSION_ONLY

MATERIAL_BYTES = 32
_KWP_BYTES = MATERIAL_BYTES + 8  # RFC 5649 (and RFC 3394) output for 32 bytes of material
_REFUSED = (ArgumentsBad, MechanismParamInvalid, MechanismInvalid)
#: What an unwrap of a wrong wrapping key's or damaged material gives (SoftHSM: a general error;
#: nShield: function failed), as opposed to a device or session failure.
BAD_INPUT = (
    GeneralError,
    FunctionFailed,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    WrappedKeyInvalid,
    WrappedKeyLenRange,
    DataInvalid,
    DataLenRange,
)


@dataclass(frozen=True)
class Algorithm:
    name: str
    sha: str  # "SHA-1" | "SHA-256": OAEP's hash and MGF1's
    two_step: bool  # RSA_AES_KEY_WRAP: an RSA-wrapped AES key, then the RFC 5649 material

    @property
    def oaep_params(self) -> tuple[Mechanism, MGF, None]:
        if self.sha == "SHA-1":
            return (Mechanism.SHA_1, MGF.SHA1, None)
        return (Mechanism.SHA256, MGF.SHA256, None)

    def oaep(self) -> padding.OAEP:
        h = hashes.SHA1() if self.sha == "SHA-1" else hashes.SHA256()  # noqa: S303 (KMS offers it)
        return padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)


ALGORITHMS = {
    name: Algorithm(
        name,
        "SHA-1" if name.endswith("_SHA_1") else "SHA-256",
        name.startswith("RSA_AES_KEY_WRAP"),
    )
    for name in WRAPPING_ALGORITHMS
}
SPECS = WRAPPING_KEY_SPECS

# The checked material on the first HSM: a session object, extractable only to be wrapped
# under the length checker and the key-encryption key of the import (byok.py).
_MATERIAL = {
    **SESSION_ONLY,
    **NO_USE,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.ENCRYPT: True,  # its check values
    Attribute.DECRYPT: True,
}
_UNWRAP_ONLY_SESSION = {
    **SESSION_ONLY,
    **NO_USE,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.UNWRAP: True,
}


class RefusedError(Exception):
    """The HSM refused a mechanism, or its parameters, that an algorithm needs."""

    def __init__(self, what: str, exc: PKCS11Error) -> None:
        super().__init__(what)
        self.what = what
        self.ckr = ckr_name(exc)


def wrap_in_software(spki: bytes, algorithm: Algorithm, material: bytes) -> bytes:
    """*material* wrapped as a customer does (KMS's format): for the self-test."""
    public = serialization.load_der_public_key(spki)
    assert isinstance(public, rsa.RSAPublicKey)
    if not algorithm.two_step:
        return public.encrypt(material, algorithm.oaep())
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, algorithm.oaep()) + aes_key_wrap_with_padding(
        ephemeral, material
    )


def check_size(algorithm: Algorithm, bits: int, wrapped: bytes) -> None:
    """Refuse a file that cannot be *algorithm*'s wrapping of 32 bytes under an RSA-*bits* key."""
    rsa_part = bits // 8
    want = rsa_part + _KWP_BYTES if algorithm.two_step else rsa_part
    if len(wrapped) != want:
        how = (
            f"{rsa_part} bytes of RSA-wrapped AES key, then {_KWP_BYTES} bytes of "
            "RFC 5649-wrapped key material"
            if algorithm.two_step
            else "one RSA-OAEP block"
        )
        raise KeyAdminError(
            f"the wrapped key material is {len(wrapped)} bytes; {algorithm.name} with RSA_{bits} "
            f"wrapping {MATERIAL_BYTES} bytes of key material (an AES-256 key) gives {want} "
            f"({how})"
        )


def unwrap(
    session: pkcs11.Session, private: Any, algorithm: Algorithm, wrapped: bytes, bits: int
) -> Any:
    """Unwrap the customer's material inside the HSM: a session object (:data:`_MATERIAL`).

    RefusedError if the HSM refuses a mechanism or its parameters; other PKCS11Errors as they
    come (a wrong wrapping key or damaged material: CKR_GENERAL_ERROR on SoftHSM).
    """
    rsa_part = wrapped[: bits // 8] if algorithm.two_step else wrapped
    target = _UNWRAP_ONLY_SESSION if algorithm.two_step else _MATERIAL
    try:
        first = private.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            rsa_part,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=algorithm.oaep_params,
            store=False,
            template=target,
        )
    except _REFUSED as exc:
        raise RefusedError(f"RSA-OAEP with {algorithm.sha}", exc) from exc
    if not algorithm.two_step:
        return first
    try:
        return _unwrap_kwp(first, wrapped[bits // 8 :])
    finally:
        destroy_quietly(first)


def _unwrap_kwp(ephemeral: Any, blob: bytes) -> Any:
    refused: PKCS11Error | None = None
    for mechanism in (Mechanism.AES_KEY_WRAP_KWP, Mechanism.AES_KEY_WRAP_PAD):
        try:
            return ephemeral.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                blob,
                mechanism=mechanism,
                store=False,
                template=_MATERIAL,
            )
        except MechanismInvalid as exc:
            refused = exc
    assert refused is not None
    raise RefusedError("AES key wrap with padding (RFC 5649)", refused)


def check_material(session: pkcs11.Session, material: Any) -> tuple[str, str]:
    """The material's check values (``E:…``, ``D:…``), once it is shown to be 32 bytes.

    The length cannot be read (``CKA_VALUE_LEN`` is 0 after an unwrap on SoftHSM), so it is
    measured: AES-ECB works only for a 16-, 24- or 32-byte key, and the key wrapped (RFC 3394)
    under an ephemeral key is 40 bytes only for 25-32 bytes of key (SoftHSM pads), so both
    together mean exactly 32.  The wrapped bytes are discarded with the ephemeral key.
    """
    checker: Any = session.generate_key(
        KeyType.AES,
        256,
        store=False,
        template={**_UNWRAP_ONLY_SESSION, Attribute.UNWRAP: False, Attribute.WRAP: True},
    )
    try:
        encrypted = bytes(material.encrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB))
        decrypted = bytes(material.decrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB))
        size = len(checker.wrap_key(material, mechanism=Mechanism.AES_KEY_WRAP))
    except (MechanismInvalid, KeySizeRange, KeyNotWrappable, KeyTypeInconsistent):
        size = 0
    finally:
        destroy_quietly(checker)
    if size != _KWP_BYTES:
        raise KeyAdminError(
            f"the key material is not {MATERIAL_BYTES} bytes: an external key is AES-256, "
            f"so wrap exactly {MATERIAL_BYTES} bytes of key material"
        )
    return "E:" + encrypted[:3].hex(), "D:" + decrypted[:3].hex()


def software_kcv(material: bytes) -> str:
    """The ``E:`` check value of material known in software (the self-test's)."""
    enc = Cipher(algorithms.AES(material), modes.ECB()).encryptor()  # noqa: S305 (a KCV)
    return "E:" + (enc.update(ZERO_BLOCK) + enc.finalize())[:3].hex()


def self_test(
    config: HsmConfig,
    session: pkcs11.Session,
    private: Any,
    alg: Algorithm,
    bits: int,
    spki: bytes,
) -> None:
    """Prove that the HSM unwraps *alg* right with this wrapping key: 32 random bytes wrapped
    in software must unwrap to the same check value.  KeyAdminError otherwise, naming the
    algorithms to use instead when the HSM refuses a mechanism or its parameters."""
    sample = os.urandom(MATERIAL_BYTES)
    try:
        with step(config.name, f"the {alg.name} self-test"):
            material = unwrap(session, private, alg, wrap_in_software(spki, alg, sample), bits)
            try:
                seen, _ = check_material(session, material)
            finally:
                destroy_quietly(material)
    except RefusedError as exc:
        softhsm_sha256 = config.vendor == "softhsm" and "SHA-256" in exc.what
        hint = "; SoftHSM 2.6 supports SHA-1 only" if softhsm_sha256 else ""
        usable = [
            a.name
            for a in ALGORITHMS.values()
            if (a.sha != alg.sha if "RSA-OAEP" in exc.what else not a.two_step)
        ]
        raise KeyAdminError(
            f"HSM {config.name} cannot unwrap {alg.name}: it refused {exc.what} "
            f"({exc.ckr}{hint}); use {' or '.join(usable)} with this HSM"
        ) from exc
    if seen != software_kcv(sample):
        raise KeyAdminError(f"HSM {config.name} unwrapped the {alg.name} self-test wrongly")
