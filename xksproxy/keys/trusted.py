"""The channel ``keys replicate`` moves key versions through: an RSA key pair of the target HSM
whose public half the source HSM's security officer has marked trusted.

Why the security officer: every key version is ``CKA_WRAP_WITH_TRUSTED``
(:func:`xksproxy.keys.store.key_template`), so it may leave its HSM only wrapped under a key
with ``CKA_TRUSTED`` true, and only the security officer can set that attribute.  The user PIN
alone (what the proxy holds) can therefore never get a key out.

The steps, in this order because python-pkcs11 cannot log out and in within one session and
login state is per process and per token (``CKR_USER_ANOTHER_ALREADY_LOGGED_IN`` otherwise):

1. The target generates an ephemeral RSA-3072 pair as session objects in the caller's user
   session, which stays open for the whole run: the private half is sensitive, never
   extractable and allowed only to unwrap; it dies with that session.
2. A security officer session on the source removes transport keys left by an earlier run that
   crashed (harmless: their private halves died with that run) and stores the public half as a
   public token object labelled :data:`TRANSPORT_LABEL`, trusted, allowed only to wrap, with a
   random ``CKA_ID``; the session is closed again (which logs the officer out).
3. A user session on the source finds that object and wraps each version with it (RSA-OAEP);
   the target unwraps each blob into a token object.  At the end the trusted object is
   destroyed (a user session may) and the pair with the target's session.

OAEP parameters: SHA-256 with MGF1-SHA-256 first, SHA-1 with MGF1-SHA-1 if either HSM refuses
them (SoftHSM 2.6), as :mod:`xksproxy.keys.transport` does; the first pair both accept is kept
for the rest of the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import ArgumentsBad, MechanismParamInvalid

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError
from xksproxy.hsm import objects
from xksproxy.keys.sessions import admin_session, step
from xksproxy.keys.store import destroy_quietly
from xksproxy.keys.transport import OAEP_CHOICES, RSA_BITS, unwrap_only_private

TRANSPORT_LABEL = "xksproxy-transport"
_UNSUPPORTED = (ArgumentsBad, MechanismParamInvalid)


@dataclass
class Channel:
    """Wraps on the source, unwraps on the target; valid inside :func:`open_channel`."""

    source: str
    target: str
    wrapping: Any  # the trusted public key, a token object on the source
    unwrapping: Any  # the private half, a session object on the target
    oaep: tuple[str, Any] | None = None  # the OAEP parameters both HSMs accepted
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (self.oaep[0] if self.oaep else "RSA-3072 OAEP") + " under a trusted key"

    def carry(self, key: Any, key_id: str, version: int, template: dict[Attribute, Any]) -> Any:
        """Copy the source's *key* into the target as *version* of *key_id* (a token object
        with *template*), and return it.  Its check value is the caller's to compare."""
        for name, params in [self.oaep] if self.oaep else OAEP_CHOICES:
            with step(self.source, f"wrapping version {version} of {key_id!r}"):
                try:
                    blob = self.wrapping.wrap_key(
                        key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                    )
                except _UNSUPPORTED:
                    continue
            with step(self.target, f"unwrapping version {version} of {key_id!r}"):
                try:
                    copy = self.unwrapping.unwrap_key(
                        ObjectClass.SECRET_KEY,
                        KeyType.AES,
                        blob,
                        label=key_id,
                        # Always an xksproxy version id: the proxy accepts the CKA_VALUE_LEN
                        # of 0 SoftHSM gives an unwrapped key only on those (_aes256).
                        id=objects.version_id(version),
                        mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=params,
                        store=True,
                        template=template,
                    )
                except _UNSUPPORTED:
                    continue
            self.oaep = (name, params)
            return copy
        raise KeyAdminError(
            f"HSMs {self.source} and {self.target} share no RSA-OAEP parameters "
            f"({' or '.join(n for n, _ in OAEP_CHOICES)})"
        )


def _trust(config: HsmConfig, so_pin: str, modulus: bytes, exponent: bytes, marker: bytes) -> None:
    """As the source's security officer: remove leftover transport keys, store the new one."""
    with admin_session(config, so_pin) as so:
        with step(config.name, "removing transport keys left by an earlier run"):
            search = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: TRANSPORT_LABEL}
            for obj in list(so.get_objects(search)):
                obj.destroy()
        with step(config.name, "storing the trusted transport key"):
            so.create_object(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: KeyType.RSA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.TRUSTED: True,
                    Attribute.WRAP: True,
                    Attribute.ENCRYPT: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                    Attribute.LABEL: TRANSPORT_LABEL,
                    Attribute.ID: marker,
                    Attribute.MODULUS: modulus,
                    Attribute.PUBLIC_EXPONENT: exponent,
                }
            )


@contextlib.contextmanager
def open_channel(
    source: HsmConfig, so_pin: str, target: tuple[HsmConfig, pkcs11.Session]
) -> Iterator[tuple[pkcs11.Session, Channel]]:
    """A user session on *source* and a channel from it into *target*'s open user session.

    No session of this process may be logged in on *source* when it is entered.
    """
    dst_cfg, dst = target
    pair: list[Any] = []
    try:
        with step(dst_cfg.name, "generating the RSA transport key pair"):
            public, private = dst.generate_keypair(
                KeyType.RSA,
                RSA_BITS,
                store=False,
                public_template={Attribute.TOKEN: False},
                private_template=unwrap_only_private(token=False),
            )
            pair += [public, private]
            modulus, exponent = public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT]
        marker = os.urandom(16)
        _trust(source, so_pin, modulus, exponent, marker)
        with admin_session(source) as src:
            with step(source.name, "finding the trusted transport key"):
                found = list(
                    src.get_objects(
                        {
                            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                            Attribute.LABEL: TRANSPORT_LABEL,
                            Attribute.ID: marker,
                        }
                    )
                )
            if len(found) != 1:
                raise KeyAdminError(f"HSM {source.name}: the trusted transport key vanished")
            channel = Channel(source.name, dst_cfg.name, found[0], private)
            try:
                yield src, channel
            finally:
                if not destroy_quietly(found[0]):
                    channel.notes.append(
                        f"the public key labelled {TRANSPORT_LABEL!r} could not be removed "
                        f"from {source.name}: harmless (its private half is gone); the next "
                        "replicate removes it"
                    )
    finally:
        for obj in pair:  # they would also die with the target's session
            destroy_quietly(obj)
