"""The sessions of a key command: one read-write session per configured HSM, logged in as the
user (or the security officer), and the rule that turns a failed step into one line naming the
HSM and the step.

The key commands (:mod:`xksproxy.keys`) act through these; what they read and write in each
token is in :mod:`xksproxy.keys.store`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pkcs11
from pkcs11.exceptions import PKCS11Error

from xksproxy.config import HsmConfig
from xksproxy.errors import KeyAdminError, XksError
from xksproxy.hsm.pkcs11_errors import ckr_name
from xksproxy.hsm.pkcs11_lib import FunctionList, find_token, load_library

#: The open sessions of a key command, one per configured HSM.
Sessions = Sequence[tuple[HsmConfig, pkcs11.Session]]


@contextlib.contextmanager
def admin_session(config: HsmConfig, so_pin: str | None = None) -> Iterator[pkcs11.Session]:
    """A read-write session logged in as the user (or, given *so_pin*, as the security
    officer), closed (and logged out) afterwards.  Finding the token and logging in are done
    under the HSM's login lock (:func:`xksproxy.keys.locks.login_lock`)."""
    from xksproxy.keys.locks import login_lock

    with login_lock(config.name):
        session = _log_in(config, so_pin)
    try:
        yield session
    finally:
        # A failing close (a device that died meanwhile) must not hide what happened before.
        with contextlib.suppress(PKCS11Error), login_lock(config.name):
            session.close()


def _log_in(config: HsmConfig, so_pin: str | None) -> pkcs11.Session:
    try:
        lib = load_library(str(config.module), config.env, config.name)
        token = find_token(lib, config.token_label, config.token_serial)
    except PKCS11Error as exc:
        raise KeyAdminError(
            f"HSM {config.name}: {config.token_desc} not found ({ckr_name(exc)})"
        ) from exc
    except Exception as exc:
        raise KeyAdminError(f"HSM {config.name}: cannot load {config.module}: {exc}") from exc
    try:
        if so_pin is None:
            return token.open(user_pin=config.read_pin(), rw=True)
        return token.open(so_pin=so_pin, rw=True)
    except PKCS11Error as exc:
        if so_pin is None:
            raise KeyAdminError(f"HSM {config.name}: login failed ({ckr_name(exc)})") from exc
        raise KeyAdminError(
            f"HSM {config.name}: security officer login failed ({ckr_name(exc)}); "
            f"check {so_pin_source(config)}"
        ) from exc


def so_pin_source(config: HsmConfig) -> str:
    """Where *config* takes its security officer PIN from, for messages."""
    if config.so_pin_env is not None:
        return f"${config.so_pin_env} (so_pin_env)"
    return f"so_pin_file {config.so_pin_file}"


@contextlib.contextmanager
def step(hsm: str, what: str) -> Iterator[None]:
    """Turn a failure of one step on *hsm* into a KeyAdminError saying where and what."""
    try:
        yield
    except PKCS11Error as exc:
        name = ckr_name(exc)
        if name == "CKR_UNKNOWN":
            name = type(exc).__name__
        raise KeyAdminError(f"HSM {hsm}: {what} failed ({name})") from exc
    except XksError as exc:  # find_key_blocking: not an AES-256 key, a damaged key
        why = getattr(exc, "detail", None) or exc.message
        raise KeyAdminError(f"HSM {hsm}: {what} failed ({why})") from exc


def functions_of(config: HsmConfig) -> FunctionList:
    """The function list of *config*'s module (loaded already by :func:`admin_session`)."""
    return load_library(str(config.module), config.env, config.name).functions
