"""The vendor profiles of the fault-injection module (xksproxy/dev/faultinject/README.md, "Vendor
profiles") over real SoftHSM tokens.

Every profile is a copy of the shim with its own xksfault.conf, over its own copy of
libsofthsm2.so and its own token, loaded in this process as ``copies`` in
tests/integration/test_faultinject.py does: a distinct file is a distinct dlopen() instance, and
SOFTHSM2_CONF is set just before each SoftHSM copy is initialised, so no SoftHSM instance of
another test collides with these.

Each token holds an AES-256 session key created with a value chosen here, so every output is
checked with ``cryptography``'s AESGCM as well as by decrypting through the shim.  CK_GCM_PARAMS
are packed with ctypes: handed to python-pkcs11 as raw ``bytes`` (the escape hatch the proxy uses),
or to the shim's exported C_* functions directly, where exact return codes, size queries and
buffer sizes are needed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    DeviceError,
    EncryptedDataInvalid,
    FunctionFailed,
    GeneralError,
    MechanismParamInvalid,
    PKCS11Error,
)
from pkcs11.mechanisms import GCMParams

from tests.support.faultlib import SOFTHSM, init_token, restore_environment_at_exit, softhsm_copy
from xksproxy.dev.faultinject import (
    CONF_NAME,
    ENV_CONTROL,
    ENV_PROFILE,
    ENV_REAL_MODULE,
    FAULT_LIBRARY_NAME,
    PROFILES,
    FaultControl,
    build_fault_module,
    install_copy,
)
from xksproxy.hsm.gcm import CkGcmParams, CkMechanism
from xksproxy.hsm.pkcs11_lib import ThreadSafeLib

TOKEN_LABEL = "vendor"
KEY_LABEL = "vendor-gcm"
USER_PIN = "1234"
SO_PIN = "12345678"
TOKEN = (TOKEN_LABEL, SO_PIN, USER_PIN)

CKM_AES_GCM = 0x1087
CKR_OK = 0x00
CKR_GENERAL_ERROR = 0x05
CKR_FUNCTION_FAILED = 0x06
CKR_ARGUMENTS_BAD = 0x07
CKR_ENCRYPTED_DATA_INVALID = 0x40
CKR_MECHANISM_PARAM_INVALID = 0x71
CKR_OPERATION_NOT_INITIALIZED = 0x91
CKR_BUFFER_TOO_SMALL = 0x150
ULONG_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_ulong)) - 1

PLAINTEXT = b"a data key, wrapped by the external key store"
AAD = b"xks-aad"
TAG = 16
ZERO12 = bytes(12)
ZERO16 = bytes(16)
IV12 = bytes(range(1, 13))
IV16 = bytes(range(0xA1, 0xB1))

VENDOR_PROFILES = [p for p in PROFILES if p != "softhsm"]


# --- CK_GCM_PARAMS with ctypes ------------------------------------------------------------


class Gcm:
    """A CK_GCM_PARAMS and the writable buffers it points at, alive as long as this object.

    *iv* None makes pIv NULL; *iv_len* and *iv_bits* default to the IV's length and 8 times it.
    """

    def __init__(
        self,
        iv: bytes | None,
        iv_len: int | None = None,
        iv_bits: int | None = None,
        *,
        aad: bytes | None = AAD,
        aad_len: int | None = None,
    ) -> None:
        self.iv_buffer = None if iv is None else ctypes.create_string_buffer(iv, len(iv))
        self.aad_buffer = None if aad is None else ctypes.create_string_buffer(aad, len(aad))
        if iv_len is None:
            iv_len = 0 if iv is None else len(iv)
        self.struct = CkGcmParams(
            None if self.iv_buffer is None else ctypes.addressof(self.iv_buffer),
            iv_len,
            iv_len * 8 % (ULONG_MAX + 1) if iv_bits is None else iv_bits,
            None if self.aad_buffer is None else ctypes.addressof(self.aad_buffer),
            (0 if aad is None else len(aad)) if aad_len is None else aad_len,
            128,
        )

    @property
    def iv(self) -> bytes:
        """What the caller's pIv buffer holds now."""
        assert self.iv_buffer is not None
        return self.iv_buffer.raw

    def raw(self) -> bytes:
        """The structure as python-pkcs11's raw ``mechanism_param``."""
        return bytes(self.struct)


def gcm_for(iv: bytes) -> Gcm:
    """Parameters to decrypt with *iv*, as the proxy passes them."""
    return Gcm(iv, len(iv), len(iv) * 8)


# --- the tokens -----------------------------------------------------------------------------


@dataclass
class Base:
    """One profile's copy of the shim, its SoftHSM and its key, for the whole module."""

    profile: str
    so: Path
    lib: ThreadSafeLib
    control: FaultControl
    key_value: bytes
    session: pkcs11.Session  # created the session key, so must stay open


@dataclass
class Hsm:
    """A profile as one test sees it: a fresh session (closed after the test) and the key."""

    base: Base
    session: Any  # python-pkcs11's stubs lack Session.handle
    key: Any  # python-pkcs11's stubs type SecretKey without the encrypt/decrypt mixins
    dll: ctypes.CDLL

    @property
    def profile(self) -> str:
        return self.base.profile

    @property
    def control(self) -> FaultControl:
        return self.base.control

    @property
    def aesgcm(self) -> AESGCM:
        return AESGCM(self.base.key_value)

    # Direct calls of the shim's exported functions, for exact codes and buffer sizes.

    def encrypt_init(self, gcm: Gcm | None, *, param_len: int | None = None) -> int:
        return self._init(self.dll.C_EncryptInit, gcm, param_len)

    def decrypt_init(self, gcm: Gcm | None, *, param_len: int | None = None) -> int:
        return self._init(self.dll.C_DecryptInit, gcm, param_len)

    def _init(self, fn: Any, gcm: Gcm | None, param_len: int | None) -> int:
        size = ctypes.sizeof(CkGcmParams) if param_len is None else param_len
        mechanism = CkMechanism(
            CKM_AES_GCM, None if gcm is None else ctypes.addressof(gcm.struct), size
        )
        rv: int = fn(self.session.handle, ctypes.byref(mechanism), self.key.handle)
        return rv

    def encrypt(self, data: bytes | None, capacity: int | None) -> tuple[int, int, bytes]:
        return self._crypt(self.dll.C_Encrypt, data, capacity)

    def decrypt(self, data: bytes | None, capacity: int | None) -> tuple[int, int, bytes]:
        return self._crypt(self.dll.C_Decrypt, data, capacity)

    def _crypt(self, fn: Any, data: bytes | None, capacity: int | None) -> tuple[int, int, bytes]:
        """(rv, the length the module reported, the whole output buffer).  *capacity* None is a
        size query (NULL output); the buffer starts filled with 0xAA, to see what was written."""
        out = (
            None if capacity is None else ctypes.create_string_buffer(b"\xaa" * capacity, capacity)
        )
        length = ctypes.c_ulong(0 if capacity is None else capacity)
        rv: int = fn(self.session.handle, data, len(data or b""), out, ctypes.byref(length))
        return rv, length.value, b"" if out is None else out.raw

    def encrypt_all(self, gcm: Gcm, plaintext: bytes = PLAINTEXT) -> bytes:
        """python-pkcs11's key.encrypt with raw parameters (init, size query, data), as the
        proxy does it."""
        out: bytes = self.key.encrypt(
            plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm.raw()
        )
        return out

    def decrypt_all(self, gcm: Gcm, ciphertext: bytes) -> bytes:
        out: bytes = self.key.decrypt(
            ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm.raw()
        )
        return out


def _load_dll(so: Path) -> ctypes.CDLL:
    """The shim's exported C_* functions (the same dlopen() handle python-pkcs11 holds)."""
    dll = ctypes.CDLL(str(so))
    ulong, ptr = ctypes.c_ulong, ctypes.c_void_p
    for name in ("C_EncryptInit", "C_DecryptInit"):
        getattr(dll, name).argtypes = [ulong, ptr, ulong]
        getattr(dll, name).restype = ulong
    for name in ("C_Encrypt", "C_Decrypt"):
        getattr(dll, name).argtypes = [ulong, ctypes.c_char_p, ulong, ptr, ptr]
        getattr(dll, name).restype = ulong
    return dll


def _open_copy(stack: ExitStack, so: Path, conf: Path) -> ThreadSafeLib:
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by this SoftHSM copy when initialised
    lib = ThreadSafeLib(str(so))
    stack.callback(lib.finalize_module)
    return lib


def _session_with_key(
    stack: ExitStack, lib: ThreadSafeLib, control: FaultControl
) -> tuple[pkcs11.Session, bytes]:
    session = lib.get_token(token_label=TOKEN_LABEL).open(rw=True, user_pin=USER_PIN)
    stack.callback(session.close)
    stack.callback(control.ok)  # runs first: close and finalise with no fault active
    key_value = os.urandom(32)
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: key_value,
            Attribute.LABEL: KEY_LABEL,
            Attribute.TOKEN: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
        }
    )
    return session, key_value


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module, compiled once for this file."""
    return build_fault_module(tmp_path_factory.mktemp("vendor-build"))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, built: Path) -> Iterator[dict[str, Base]]:
    """One copy of the shim per profile, each over its own SoftHSM copy and token.

    The environment names a missing module, a control file that says "error" and an unknown
    profile: each copy must follow its own xksfault.conf.
    """
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    root = tmp_path_factory.mktemp("vendor-profiles")
    decoy = FaultControl(root / "env-control")
    decoy.error("CKR_GENERAL_ERROR")
    out: dict[str, Base] = {}
    with ExitStack() as stack:
        restore_environment_at_exit(
            stack, ("SOFTHSM2_CONF", ENV_REAL_MODULE, ENV_CONTROL, ENV_PROFILE)
        )
        os.environ[ENV_REAL_MODULE] = str(root / "no-such-module.so")
        os.environ[ENV_CONTROL] = str(decoy.path)
        os.environ[ENV_PROFILE] = "no-such-profile"
        for profile in PROFILES:
            so, conf, control = softhsm_copy(
                built, root / profile, root / f"control-{profile}", TOKEN, profile
            )
            lib = _open_copy(stack, so, conf)
            session, key_value = _session_with_key(stack, lib, control)
            out[profile] = Base(profile, so, lib, control, key_value, session)
        yield out


def _hsm(base: Base, stack: ExitStack) -> Hsm:
    session = base.lib.get_token(token_label=TOKEN_LABEL).open(rw=True)  # logged in already
    stack.callback(session.close)  # also ends any operation a test left active
    key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=KEY_LABEL)
    return Hsm(base, session, key, _load_dll(base.so))


@pytest.fixture
def hsm(request: pytest.FixtureRequest, rig: dict[str, Base]) -> Iterator[Hsm]:
    """The profile named by the test's parameter, with a fresh session, in mode "ok"."""
    base = rig[request.param]
    with ExitStack() as stack:
        base.control.ok()
        stack.callback(base.control.ok)  # runs first
        yield _hsm(base, stack)


def profiles(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("hsm", names, indirect=True)


# --- encryption: what each profile accepts, and where the IV comes back ---------------------


@dataclass(frozen=True)
class Accepted:
    profile: str
    iv: bytes | None  # what the caller's pIv holds (None: pIv NULL)
    iv_len: int
    iv_bits: int
    where: str  # "caller", "written-back", "appended", "at-init" or "lost"
    length: int  # the length of the IV the module used

    def __str__(self) -> str:
        iv = "NULL" if self.iv is None else f"{'zero' if not any(self.iv) else 'set'}{len(self.iv)}"
        return f"{self.profile}-{iv}-{self.iv_len}-{self.iv_bits}"


ACCEPTED = [
    Accepted("softhsm", IV12, 12, 96, "caller", 12),
    Accepted("softhsm", IV16, 16, 128, "caller", 16),  # SoftHSM takes 16-byte IVs
    Accepted("cloudhsm", ZERO12, 12, 96, "written-back", 12),
    Accepted("cloudhsm", ZERO12, 0, 96, "written-back", 12),  # either field carries the length
    Accepted("cloudhsm", ZERO12, 12, 0, "written-back", 12),
    Accepted("nshield", ZERO12, 12, 96, "written-back", 12),
    Accepted("nshield", ZERO12, 0, 96, "written-back", 12),
    Accepted("luna-fips", None, 0, 0, "appended", 16),
    Accepted("luna-fips", IV12, 12, 96, "appended", 16),  # the caller's IV is ignored
    Accepted("luna-fips", ZERO16, 16, 128, "appended", 16),
    Accepted("luna", None, 0, 0, "appended", 16),
    Accepted("luna", None, 0, 128, "appended", 16),
    Accepted("luna", None, 0, 96, "appended", 12),
    Accepted("luna", IV16, 16, 96, "appended", 16),  # the caller's first 4 bytes + 12 made
    Accepted("protectserver-fips", ZERO12, 12, 96, "at-init", 12),
    Accepted("protectserver-fips", ZERO16, 16, 128, "at-init", 16),
    Accepted("protectserver-fips", ZERO12, 12, 0, "at-init", 12),  # ulIvBits not looked at
    Accepted("lost-iv", IV12, 12, 96, "lost", 12),
    Accepted("lost-iv", None, 0, 0, "lost", 12),
]


@pytest.mark.parametrize(
    ("hsm", "case"),
    [(c.profile, c) for c in ACCEPTED],
    indirect=["hsm"],
    ids=[str(c) for c in ACCEPTED],
)
def test_encrypt_returns_the_iv_where_the_vendor_does(hsm: Hsm, case: Accepted) -> None:
    gcm = Gcm(case.iv, case.iv_len, case.iv_bits)
    out = hsm.encrypt_all(gcm)  # python-pkcs11 with raw parameters, as the proxy calls it
    caller_after = None if case.iv is None else gcm.iv

    if case.where == "appended":
        assert len(out) == len(PLAINTEXT) + TAG + case.length  # ciphertext || tag || IV
        body, iv = out[: -case.length], out[-case.length :]
        assert caller_after == case.iv  # pIv untouched
        if case.iv_len == 16 and case.iv_bits == 96:  # Luna: 4 of the caller's, 12 made
            assert case.iv is not None
            assert iv[:4] == case.iv[:4]
            assert iv[4:] != case.iv[4:]
    else:
        assert len(out) == len(PLAINTEXT) + TAG  # ciphertext || tag
        body = out
        if case.where in ("written-back", "at-init"):
            assert caller_after is not None
            iv = caller_after
            assert len(iv) == case.length
            assert iv != bytes(case.length)
        elif case.where == "caller":
            assert case.iv is not None
            iv = case.iv
        else:  # "lost": nobody learns the IV
            assert caller_after == case.iv
            for guess in {case.iv or ZERO12, ZERO12, ZERO16}:
                with pytest.raises(InvalidTag):
                    hsm.aesgcm.decrypt(guess, body, AAD)
            with pytest.raises(GeneralError):  # SoftHSM's own code for a bad tag, unchanged
                hsm.decrypt_all(gcm_for(case.iv or ZERO12), body)
            return

    assert hsm.aesgcm.decrypt(iv, body, AAD) == PLAINTEXT  # the key's value is known here
    assert hsm.decrypt_all(gcm_for(iv), body) == PLAINTEXT  # and through the shim
    if case.where != "caller":  # a fresh IV every time
        again = hsm.encrypt_all(Gcm(case.iv, case.iv_len, case.iv_bits))
        assert again != out


@dataclass(frozen=True)
class Refused:
    profile: str
    name: str
    gcm: Gcm | None
    param_len: int | None = None
    rv: int = CKR_MECHANISM_PARAM_INVALID

    def __str__(self) -> str:
        return f"{self.profile}-{self.name}"


def valid(profile: str) -> Gcm:
    """Encryption parameters that *profile* accepts."""
    return Gcm(*VALID_ARGS[profile])


def _common_refusals(profile: str) -> list[Refused]:
    return [
        Refused(profile, "no-parameter", None, 0),
        Refused(profile, "40-byte-params", valid(profile), 40),  # the v2.40 prose's layout
        Refused(profile, "aad-null", Gcm(*VALID_ARGS[profile], aad=None, aad_len=8)),
        Refused(profile, "aad-ulong-max", Gcm(*VALID_ARGS[profile], aad_len=ULONG_MAX)),
    ]


VALID_ARGS: dict[str, tuple[bytes | None, int, int]] = {
    "softhsm": (IV12, 12, 96),
    "cloudhsm": (ZERO12, 12, 96),
    "luna-fips": (None, 0, 0),
    "luna": (None, 0, 0),
    "nshield": (ZERO12, 12, 96),
    "protectserver-fips": (ZERO12, 12, 96),
    "lost-iv": (IV12, 12, 96),
}

REFUSED = [
    # SoftHSM itself: its own codes, unchanged.
    Refused("softhsm", "no-parameter", None, 0, CKR_ARGUMENTS_BAD),
    Refused("softhsm", "40-byte-params", Gcm(IV12), 40, CKR_ARGUMENTS_BAD),
    *(r for p in VENDOR_PROFILES for r in _common_refusals(p)),
    *(
        r
        for p in ("cloudhsm", "nshield")
        for r in [
            Refused(p, "non-zero-iv", Gcm(IV12, 12, 96)),
            Refused(p, "no-length", Gcm(ZERO12, 0, 0)),
            Refused(p, "16-byte-iv", Gcm(ZERO16, 16, 128)),
            Refused(p, "8-byte-iv", Gcm(ZERO12, 8, 64)),
            Refused(p, "null-iv", Gcm(None, 12, 96)),
            Refused(p, "bits-not-bytes", Gcm(ZERO12, 0, 97)),
            Refused(p, "iv-len-ulong-max", Gcm(ZERO12, ULONG_MAX, 96)),
        ]
    ),
    Refused("luna-fips", "bits-zero", Gcm(IV12, 12, 0)),
    Refused("luna-fips", "bits-wrong", Gcm(IV12, 12, 128)),
    Refused("luna-fips", "bits-wrap-to-zero", Gcm(None, 2**61, 0)),  # 2**61 * 8 wraps to 0
    Refused("luna-fips", "iv-len-ulong-max", Gcm(None, ULONG_MAX)),  # bits: ULONG_MAX * 8 wrapped
    Refused("luna", "caller-iv-12-96", Gcm(IV12, 12, 96)),  # non-FIPS only
    Refused("luna", "caller-iv-16-128", Gcm(IV16, 16, 128)),  # non-FIPS only
    Refused("luna", "0-64", Gcm(None, 0, 64)),
    Refused("luna", "8-64", Gcm(IV12, 8, 64)),
    Refused("luna", "16-96-null-iv", Gcm(None, 16, 96)),
    Refused("luna", "iv-len-ulong-max", Gcm(IV16, ULONG_MAX, 96)),
    Refused("protectserver-fips", "null-iv", Gcm(None, 12, 96)),
    Refused("protectserver-fips", "non-zero-iv", Gcm(IV12, 12, 96)),
    Refused("protectserver-fips", "8-byte-iv", Gcm(ZERO12, 8, 64)),
    Refused("protectserver-fips", "no-length", Gcm(ZERO12, 0, 96)),
    Refused("protectserver-fips", "iv-len-ulong-max", Gcm(ZERO12, ULONG_MAX, 0)),
]


@pytest.mark.parametrize(
    ("hsm", "case"),
    [(r.profile, r) for r in REFUSED],
    indirect=["hsm"],
    ids=[str(c) for c in REFUSED],
)
def test_encrypt_init_refuses(hsm: Hsm, case: Refused) -> None:
    before = None if case.gcm is None or case.gcm.iv_buffer is None else case.gcm.iv
    assert hsm.encrypt_init(case.gcm, param_len=case.param_len) == case.rv
    if before is not None:
        assert case.gcm is not None
        assert case.gcm.iv == before  # nothing written into the caller's pIv
    # The refusal left no operation behind: the session can encrypt at once.
    assert hsm.encrypt(PLAINTEXT, 256)[0] == CKR_OPERATION_NOT_INITIALIZED
    out = hsm.encrypt_all(valid(hsm.profile))
    assert len(out) >= len(PLAINTEXT) + TAG


# --- decryption -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecryptCase:
    profile: str
    iv_size: int  # the IV the ciphertext was made with
    iv_len: int
    iv_bits: int
    rv: int  # of C_DecryptInit
    null_iv: bool = False

    def __str__(self) -> str:
        null = "-null" if self.null_iv else ""
        return f"{self.profile}-{self.iv_size}{null}-{self.iv_len}-{self.iv_bits}"


MPI = CKR_MECHANISM_PARAM_INVALID
DECRYPT_CASES = [
    DecryptCase("cloudhsm", 12, 12, 96, CKR_OK),
    DecryptCase("cloudhsm", 12, 0, 96, CKR_OK),  # either field carries the length
    DecryptCase("cloudhsm", 12, 12, 0, CKR_OK),
    DecryptCase("cloudhsm", 16, 16, 128, MPI),  # CloudHSM IVs are 12 bytes
    DecryptCase("cloudhsm", 8, 8, 64, MPI),
    *(
        c
        for p in ("luna-fips", "luna")
        for c in [
            DecryptCase(p, 12, 12, 96, CKR_OK),
            DecryptCase(p, 16, 16, 128, CKR_OK),
            DecryptCase(p, 8, 8, 64, CKR_OK),
            DecryptCase(p, 12, 12, 0, MPI),  # ulIvBits must be ulIvLen * 8
            DecryptCase(p, 16, 16, 96, MPI),
        ]
    ),
    *(
        c
        for p in ("softhsm", "nshield", "protectserver-fips", "lost-iv")
        for c in [  # any length SoftHSM takes
            DecryptCase(p, 12, 12, 96, CKR_OK),
            DecryptCase(p, 16, 16, 128, CKR_OK),
            DecryptCase(p, 8, 8, 64, CKR_OK),
            DecryptCase(p, 64, 64, 512, CKR_OK),
            DecryptCase(p, 12, 12, 0, CKR_OK),  # SoftHSM ignores ulIvBits
        ]
    ),
    *(
        c
        for p in VENDOR_PROFILES  # never a crash: refused before SoftHSM sees them
        for c in [
            DecryptCase(p, 12, ULONG_MAX, (ULONG_MAX * 8) % (ULONG_MAX + 1), MPI),
            DecryptCase(p, 12, 12, 96, MPI, null_iv=True),
            DecryptCase(p, 4097, 4097, 4097 * 8, MPI),  # the shim's limit (SoftHSM has none)
        ]
    ),
]


@pytest.mark.parametrize(
    ("hsm", "case"),
    [(c.profile, c) for c in DECRYPT_CASES],
    indirect=["hsm"],
    ids=[str(c) for c in DECRYPT_CASES],
)
def test_decrypt_iv_rules(hsm: Hsm, case: DecryptCase) -> None:
    iv = os.urandom(case.iv_size)
    if case.iv_size <= 128:  # the longest nonce cryptography's AESGCM takes
        ciphertext = hsm.aesgcm.encrypt(iv, PLAINTEXT, AAD)
    else:
        assert case.rv != CKR_OK
        ciphertext = os.urandom(len(PLAINTEXT) + TAG)
    gcm = Gcm(None if case.null_iv else iv, case.iv_len, case.iv_bits)
    assert hsm.decrypt_init(gcm) == case.rv
    if case.rv == CKR_OK:
        rv, length, out = hsm.decrypt(ciphertext, len(ciphertext))
        assert rv == CKR_OK
        assert out[:length] == PLAINTEXT
    else:  # no operation left behind
        assert hsm.decrypt(ciphertext, len(ciphertext))[0] == CKR_OPERATION_NOT_INITIALIZED


TAG_FAILURE = {
    "softhsm": CKR_GENERAL_ERROR,  # SoftHSM's own
    "cloudhsm": CKR_ENCRYPTED_DATA_INVALID,
    "luna-fips": CKR_ENCRYPTED_DATA_INVALID,
    "luna": CKR_ENCRYPTED_DATA_INVALID,
    "nshield": CKR_FUNCTION_FAILED,
    "protectserver-fips": CKR_ENCRYPTED_DATA_INVALID,
    "lost-iv": CKR_GENERAL_ERROR,  # unchanged
}


@pytest.mark.parametrize("hsm", PROFILES, indirect=True)
def test_tag_failure_code(hsm: Hsm) -> None:
    iv = os.urandom(12)
    tampered = bytearray(hsm.aesgcm.encrypt(iv, PLAINTEXT, AAD))
    tampered[-1] ^= 0x01
    assert hsm.decrypt_init(gcm_for(iv)) == CKR_OK
    rv, length, _ = hsm.decrypt(bytes(tampered), None)  # a size query does not check the tag
    assert (rv, length) == (CKR_OK, len(tampered))
    assert hsm.decrypt(bytes(tampered), len(tampered))[0] == TAG_FAILURE[hsm.profile]
    # The failure ended the operation, in SoftHSM and in the shim.
    assert hsm.decrypt(bytes(tampered), len(tampered))[0] == CKR_OPERATION_NOT_INITIALIZED
    # The session goes on: the next decryption succeeds.
    good = hsm.aesgcm.encrypt(iv, PLAINTEXT, AAD)
    assert hsm.decrypt_all(gcm_for(iv), good) == PLAINTEXT


@pytest.mark.parametrize(
    ("hsm", "error"),
    [
        ("luna", EncryptedDataInvalid),
        ("nshield", FunctionFailed),
        ("cloudhsm", EncryptedDataInvalid),
    ],
    indirect=["hsm"],
)
def test_tag_failure_through_python_pkcs11(hsm: Hsm, error: type[PKCS11Error]) -> None:
    iv = os.urandom(12)
    ciphertext = hsm.aesgcm.encrypt(iv, PLAINTEXT, b"other aad")
    with pytest.raises(error):
        hsm.decrypt_all(gcm_for(iv), ciphertext)


@profiles("cloudhsm", "nshield", "protectserver-fips")
def test_a_caller_iv_through_python_pkcs11_gcm_params_is_refused(hsm: Hsm) -> None:
    # What a proxy written for SoftHSM does: its own random IV, in python-pkcs11's GCMParams.
    with pytest.raises(MechanismParamInvalid):
        hsm.key.encrypt(
            PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(IV12, AAD, 128)
        )


@profiles(*PROFILES)
def test_encrypt_and_decrypt_without_init_are_forwarded(hsm: Hsm) -> None:
    assert hsm.encrypt(PLAINTEXT, 256)[0] == CKR_OPERATION_NOT_INITIALIZED
    assert hsm.decrypt(PLAINTEXT, 256)[0] == CKR_OPERATION_NOT_INITIALIZED
    assert hsm.encrypt(PLAINTEXT, None)[0] == CKR_OPERATION_NOT_INITIALIZED


# --- size queries, CKR_BUFFER_TOO_SMALL, and when the IV is written ---------------------------


@profiles("luna-fips", "luna")
def test_appended_iv_counts_in_size_queries_and_buffer_too_small(hsm: Hsm) -> None:
    assert hsm.encrypt_init(Gcm(None, 0, 0)) == CKR_OK
    total = len(PLAINTEXT) + TAG + 16
    assert hsm.encrypt(PLAINTEXT, None)[:2] == (CKR_OK, total)
    assert hsm.encrypt(PLAINTEXT, None)[:2] == (CKR_OK, total)  # asking again changes nothing
    rv, length, untouched = hsm.encrypt(PLAINTEXT, total - 1)
    assert (rv, length) == (CKR_BUFFER_TOO_SMALL, total)
    assert untouched == b"\xaa" * (total - 1)
    # Still active: the retry with room (and 8 bytes to spare) gets ciphertext || tag || IV.
    rv, length, out = hsm.encrypt(PLAINTEXT, total + 8)
    assert (rv, length) == (CKR_OK, total)
    assert out[total:] == b"\xaa" * 8  # nothing written past the output
    iv = out[total - 16 : total]
    assert hsm.aesgcm.decrypt(iv, out[: total - 16], AAD) == PLAINTEXT
    assert hsm.encrypt(PLAINTEXT, total)[0] == CKR_OPERATION_NOT_INITIALIZED  # over


@profiles("cloudhsm", "nshield")
def test_written_back_iv_arrives_with_the_data_only(hsm: Hsm) -> None:
    gcm = Gcm(ZERO12)
    assert hsm.encrypt_init(gcm) == CKR_OK
    assert gcm.iv == ZERO12  # not at init
    total = len(PLAINTEXT) + TAG
    assert hsm.encrypt(PLAINTEXT, None)[:2] == (CKR_OK, total)
    assert gcm.iv == ZERO12  # not on a size query
    assert hsm.encrypt(PLAINTEXT, total - 1)[:2] == (CKR_BUFFER_TOO_SMALL, total)
    assert gcm.iv == ZERO12  # nor on CKR_BUFFER_TOO_SMALL
    rv, length, out = hsm.encrypt(PLAINTEXT, total)
    assert (rv, length) == (CKR_OK, total)
    assert gcm.iv != ZERO12
    assert hsm.aesgcm.decrypt(gcm.iv, out, AAD) == PLAINTEXT


@profiles("protectserver-fips")
def test_protectserver_writes_the_iv_at_init(hsm: Hsm) -> None:
    gcm = Gcm(ZERO16)
    assert hsm.encrypt_init(gcm) == CKR_OK
    iv = gcm.iv
    assert iv != ZERO16
    total = len(PLAINTEXT) + TAG
    assert hsm.encrypt(PLAINTEXT, None)[:2] == (CKR_OK, total)
    rv, length, out = hsm.encrypt(PLAINTEXT, total)
    assert (rv, length) == (CKR_OK, total)
    assert gcm.iv == iv
    assert hsm.aesgcm.decrypt(iv, out, AAD) == PLAINTEXT


@profiles("cloudhsm", "luna-fips")
def test_a_null_argument_ends_the_operation(hsm: Hsm) -> None:
    gcm = Gcm(*VALID_ARGS[hsm.profile])
    assert hsm.encrypt_init(gcm) == CKR_OK
    assert hsm.encrypt(None, 256)[0] == CKR_ARGUMENTS_BAD
    if gcm.iv_buffer is not None:
        assert gcm.iv == ZERO12  # no IV for an encryption that did not happen
    # Ended in SoftHSM too (which would have kept it): no data, and a new init works.
    assert hsm.encrypt(PLAINTEXT, 256)[0] == CKR_OPERATION_NOT_INITIALIZED
    assert len(hsm.encrypt_all(Gcm(*VALID_ARGS[hsm.profile]))) >= len(PLAINTEXT) + TAG


@profiles("cloudhsm", "luna")
def test_operations_are_kept_per_session_across_threads(hsm: Hsm) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with ExitStack() as stack:
                mine = _hsm(hsm.base, stack)
                for _ in range(15):
                    gcm = Gcm(*VALID_ARGS[hsm.profile])
                    plaintext = os.urandom(40)
                    out = mine.encrypt_all(gcm, plaintext)
                    if hsm.profile == "cloudhsm":
                        iv, body = gcm.iv, out
                    else:
                        iv, body = out[-16:], out[:-16]
                    assert hsm.aesgcm.decrypt(iv, body, AAD) == plaintext
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


# --- the control file on a vendor profile ----------------------------------------------------


@profiles("luna-fips")
def test_slow_delays_each_application_call_once(hsm: Hsm) -> None:
    assert hsm.encrypt_init(Gcm(None)) == CKR_OK
    hsm.control.slow(200, ["C_Encrypt"])
    start = time.monotonic()
    # One application call; the shim makes two of SoftHSM's (a size query, then the data).
    rv, _, _ = hsm.encrypt(PLAINTEXT, 256)
    elapsed = time.monotonic() - start
    assert rv == CKR_OK
    assert 0.2 <= elapsed < 0.4
    # python-pkcs11 makes two calls (size query, data): two delays, not the shim's four calls.
    start = time.monotonic()
    hsm.encrypt_all(Gcm(None))
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 0.6


@profiles("cloudhsm")
def test_internal_random_is_neither_slowed_nor_faulted(hsm: Hsm) -> None:
    hsm.control.slow(200, ["C_EncryptInit", "C_GenerateRandom"])
    # Kept alive until the operation ends: the C_Encrypt that returns data writes the IV into
    # its pIv.  A temporary would be freed after C_EncryptInit, and CPython hands its memory to
    # the next Gcm, whose zero IV that write would then make non-zero (so refused).
    first = Gcm(ZERO12)
    start = time.monotonic()
    assert hsm.encrypt_init(first) == CKR_OK  # makes its IV with C_GenerateRandom
    assert 0.2 <= time.monotonic() - start < 0.4
    hsm.control.error("CKR_DEVICE_ERROR", ["C_GenerateRandom"])
    rv, length, out = hsm.encrypt(PLAINTEXT, 256)  # ends the operation started above
    assert rv == CKR_OK
    assert hsm.aesgcm.decrypt(first.iv, out[:length], AAD) == PLAINTEXT
    gcm = Gcm(ZERO12)
    out = hsm.encrypt_all(gcm)
    assert hsm.aesgcm.decrypt(gcm.iv, out, AAD) == PLAINTEXT
    with pytest.raises(DeviceError):  # the application's own call is faulted
        hsm.session.generate_random(16)


@profiles("nshield")
def test_error_fails_a_vendor_profile_call(hsm: Hsm) -> None:
    hsm.control.error("CKR_DEVICE_ERROR", ["C_EncryptInit"])
    gcm = Gcm(ZERO12)
    with pytest.raises(DeviceError):
        hsm.encrypt_all(gcm)
    assert gcm.iv == ZERO12
    hsm.control.ok()
    out = hsm.encrypt_all(gcm)
    assert hsm.aesgcm.decrypt(gcm.iv, out, AAD) == PLAINTEXT


@profiles("cloudhsm")
def test_mechanism_other_than_gcm_is_forwarded(hsm: Hsm) -> None:
    iv = os.urandom(16)
    out: bytes = hsm.key.encrypt(PLAINTEXT, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
    back: bytes = hsm.key.decrypt(out, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
    assert back == PLAINTEXT


# --- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["thales", "LUNA", "luna fips"])
def test_an_unknown_profile_line_loads_nothing(
    tmp_path: Path, built: Path, capfd: pytest.CaptureFixture[str], name: str
) -> None:
    so = install_copy(built, tmp_path / "copy", real_module=SOFTHSM, control=None)
    (so.parent / CONF_NAME).write_text(f"real_module = {SOFTHSM}\nprofile = {name}\n")
    with pytest.raises(PKCS11Error):
        ThreadSafeLib(str(so))
    assert f"unknown profile '{name}'" in capfd.readouterr().err


def test_an_unknown_profile_in_the_environment_loads_nothing(
    tmp_path: Path, built: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    if not SOFTHSM.exists():
        pytest.skip("SoftHSM2 is not installed")
    (tmp_path / "copy").mkdir()
    so = tmp_path / "copy" / FAULT_LIBRARY_NAME  # no xksfault.conf beside it
    shutil.copy2(built, so)
    with ExitStack() as stack:
        restore_environment_at_exit(stack, (ENV_REAL_MODULE, ENV_CONTROL, ENV_PROFILE))
        os.environ.pop(ENV_CONTROL, None)
        os.environ[ENV_REAL_MODULE] = str(SOFTHSM)  # never loaded: the profile is checked first
        os.environ[ENV_PROFILE] = "thales"
        with pytest.raises(PKCS11Error):
            ThreadSafeLib(str(so))
    assert "XKS_FAULT_PROFILE: unknown profile 'thales'" in capfd.readouterr().err


def test_the_environment_chooses_the_profile_without_a_conf_file(
    tmp_path: Path, built: Path
) -> None:
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    (tmp_path / "copy").mkdir()
    so = tmp_path / "copy" / FAULT_LIBRARY_NAME  # no xksfault.conf beside it
    shutil.copy2(built, so)
    real = tmp_path / "libsofthsm2.so"
    shutil.copy2(SOFTHSM, real)
    conf = init_token(TOKEN_LABEL, SO_PIN, USER_PIN, tmp_path / "home")
    control = FaultControl(tmp_path / "control")
    control.ok()
    with ExitStack() as stack:
        restore_environment_at_exit(
            stack, ("SOFTHSM2_CONF", ENV_REAL_MODULE, ENV_CONTROL, ENV_PROFILE)
        )
        os.environ[ENV_REAL_MODULE] = str(real)
        os.environ[ENV_CONTROL] = str(control.path)
        os.environ[ENV_PROFILE] = "luna-fips"
        lib = _open_copy(stack, so, conf)
        session, key_value = _session_with_key(stack, lib, control)
        key: Any = session.get_key(object_class=ObjectClass.SECRET_KEY, label=KEY_LABEL)
        out = key.encrypt(PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=Gcm(None).raw())
        assert len(out) == len(PLAINTEXT) + TAG + 16
        assert AESGCM(key_value).decrypt(out[-16:], out[:-16], AAD) == PLAINTEXT
