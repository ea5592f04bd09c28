"""The transport of a secret from one HSM into another, under an ephemeral RSA-3072 key.

Used by :mod:`xksproxy.keys.create` (whose docstring says how the whole copy works).  The
target HSM generates a key pair for this one transfer: only its public half (modulus and
exponent) leaves the HSM, to be imported into the source HSM as a session object and to wrap
the secret with RSA-OAEP there; the private half is sensitive, never extractable, allowed only
to unwrap, and destroyed with the rest of the pair as soon as the unwrap is done.  So the secret
exists outside an HSM only as an RSA-OAEP blob in this process's memory.

OAEP parameters: SHA-256 with MGF1-SHA-256 first; if either HSM refuses them
(``CKR_ARGUMENTS_BAD`` or ``CKR_MECHANISM_PARAM_INVALID``: SoftHSM 2.6 accepts only SHA-1), SHA-1
with MGF1-SHA-1, which OAEP may still use (its security does not rest on collision resistance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import ArgumentsBad, MechanismParamInvalid

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError
from xksproxy.keys.sessions import step
from xksproxy.keys.store import destroy_quietly

RSA_BITS = 3072
#: OAEP parameters in order of preference, with the name reported for each.
OAEP_CHOICES: tuple[tuple[str, tuple[Mechanism, MGF, None]], ...] = (
    ("RSA-3072 OAEP SHA-256", (Mechanism.SHA256, MGF.SHA256, None)),
    ("RSA-3072 OAEP SHA-1", (Mechanism.SHA_1, MGF.SHA1, None)),
)
SESSION_ONLY = {Attribute.TOKEN: False, Attribute.PRIVATE: True}
NO_USE = {
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# An RSA public key only wraps; the private half only unwraps.
_WRAP_ONLY = {
    Attribute.ENCRYPT: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: True,
    Attribute.DERIVE: False,
}
_UNWRAP_ONLY = {
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.UNWRAP: True,
    Attribute.DERIVE: False,
}


def unwrap_only_private(token: bool) -> dict[Attribute, Any]:
    """The template of an RSA private key that only unwraps and never leaves its HSM."""
    return {
        Attribute.TOKEN: token,
        Attribute.PRIVATE: True,
        **_UNWRAP_ONLY,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
    }


def _unless_unsupported(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, or None when the HSM refuses its mechanism parameters."""
    try:
        return call(*args, **kwargs)
    except (ArgumentsBad, MechanismParamInvalid):
        return None


def transport(
    first: tuple[HsmConfig, pkcs11.Session],
    target: tuple[HsmConfig, pkcs11.Session],
    secret: Any,
    ephemeral: list[Any],
) -> tuple[Any, str]:
    """Copy *secret* from the *first* HSM into *target* as a session object.

    Returns (the copy, the transport's name).  Every object it creates is in *ephemeral* until
    destroyed, so that a failure half-way leaves them to the caller's clean-up.
    """
    (src_cfg, src), (dst_cfg, dst) = first, target
    public: Any
    private: Any
    with step(dst_cfg.name, "generating the RSA transport key pair"):
        public, private = dst.generate_keypair(
            KeyType.RSA,
            RSA_BITS,
            store=False,
            public_template={Attribute.TOKEN: False, **_WRAP_ONLY},
            private_template=unwrap_only_private(token=False),
        )
        ephemeral += [public, private]
        modulus, exponent = public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT]
    with step(src_cfg.name, f"importing the transport public key of {dst_cfg.name}"):
        imported: Any = src.create_object(
            {
                **_WRAP_ONLY,
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.TOKEN: False,
                Attribute.MODULUS: modulus,
                Attribute.PUBLIC_EXPONENT: exponent,
            }
        )
        ephemeral.append(imported)
    unwrap_template = {
        **SESSION_ONLY,
        **NO_USE,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True,  # for its KCV
        Attribute.DERIVE: True,
    }
    for name, params in OAEP_CHOICES:
        with step(src_cfg.name, f"wrapping the transport secret for {dst_cfg.name}"):
            blob = _unless_unsupported(
                imported.wrap_key,
                secret,
                mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=params,
            )
        if blob is None:
            continue
        with step(dst_cfg.name, "unwrapping the transport secret"):
            copy = _unless_unsupported(
                private.unwrap_key,
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                blob,
                mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=params,
                store=False,
                template=unwrap_template,
            )
        if copy is None:
            continue
        ephemeral.append(copy)
        for obj in (imported, private, public):  # the transport key pair has done its job
            ephemeral.remove(obj)
            destroy_quietly(obj)
        return copy, name
    raise KeyAdminError(
        f"HSMs {src_cfg.name} and {dst_cfg.name} share no RSA-OAEP parameters "
        f"({' or '.join(n for n, _ in OAEP_CHOICES)})"
    )
