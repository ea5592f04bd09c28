"""The fault-injection PKCS#11 module (xksproxy/dev/faultinject/) over a real SoftHSM token.

A PKCS#11 module is loaded and initialised once per process, so every test that loads the shim
is in this file and shares module-scoped fixtures.  The shim forwards to a private copy of
libsofthsm2.so: a distinct file is a distinct dlopen() instance, so this SoftHSM (and the
SOFTHSM2_CONF it reads when initialised) cannot collide with any other SoftHSM instance that
code elsewhere in the test process might load.  The ``copies`` fixture loads two more copies
of the shim, each configured by the xksfault.conf beside it, over two more SoftHSM copies.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import KeyType, Mechanism
from pkcs11.exceptions import DeviceError, GeneralError, PKCS11Error
from pkcs11.mechanisms import GCMParams

from tests.support.faultlib import (
    CFLAGS,
    CONF_NAME,
    ENV_CONTROL,
    ENV_REAL_MODULE,
    FAULT_HEADER,
    FAULT_SOURCE,
    LDLIBS,
    SOFTHSM,
    FaultControl,
    build_fault_module,
    init_token,
    install_copy,
    restore_environment_at_exit,
    softhsm_copy,
)
from xksproxy.hsm.pkcs11_lib import ThreadSafeLib

TOKEN_LABEL = "fault"
USER_PIN = "1234"
SO_PIN = "12345678"

# The 68 PKCS#11 v2.40 functions in CK_FUNCTION_LIST order, as the shim's header lists them.
FUNCTION_NAMES: list[str] = re.findall(
    r"\b(?:X|GFL)\((C_\w+),", FAULT_HEADER.read_text(encoding="utf-8")
)


@dataclass
class Shim:
    so: Path
    real: Path
    lib: ThreadSafeLib
    control: FaultControl
    session: pkcs11.Session
    key: Any  # python-pkcs11's stubs type SecretKey without the encrypt/decrypt mixins


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    base = tmp_path_factory.mktemp("faultinject")
    so = build_fault_module(base / "build")
    real = base / "libsofthsm2-private.so"
    shutil.copy2(SOFTHSM, real)
    conf = init_token(TOKEN_LABEL, SO_PIN, USER_PIN, base)
    control = FaultControl(base / "fault-control")
    control.ok()
    env = {"SOFTHSM2_CONF": str(conf), ENV_REAL_MODULE: str(real), ENV_CONTROL: str(control.path)}

    with ExitStack() as stack:
        restore_environment_at_exit(stack, env)
        os.environ.update(env)
        # ThreadSafeLib is what xksproxy.hsm.pkcs11_lib.load_library() returns (initialised with
        # CKF_OS_LOCKING_OK), made here directly so that it is not kept in load_library's
        # process-wide cache: an instance that survives until interpreter shutdown makes
        # python-pkcs11's lib.__dealloc__ fail there (AttributeError: 'ThreadSafeLib' object has
        # no attribute 'unload', printed as "Error in sys.excepthook").
        lib = ThreadSafeLib(str(so))
        stack.callback(lib.finalize_module)
        token = lib.get_token(token_label=TOKEN_LABEL)
        session = token.open(rw=True, user_pin=USER_PIN)
        stack.callback(session.close)
        stack.callback(control.ok)  # runs first: close and finalise with no fault active
        key = session.generate_key(KeyType.AES, 256, label="fault-test")
        yield Shim(so=so, real=real, lib=lib, control=control, session=session, key=key)


@pytest.fixture(autouse=True)
def _reset_to_ok(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts in, and leaves the module in, mode "ok" (releasing any hang)."""
    if "shim" not in request.fixturenames:
        yield
        return
    control: FaultControl = request.getfixturevalue("shim").control
    control.ok()
    yield
    control.ok()


def gcm(iv: bytes, aad: bytes = b"xks-aad") -> GCMParams:
    return GCMParams(iv, aad, 128)


def encrypt(shim: Shim, plaintext: bytes, iv: bytes) -> bytes:
    ciphertext: bytes = shim.key.encrypt(
        plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm(iv)
    )
    return ciphertext


def decrypt(shim: Shim, ciphertext: bytes, iv: bytes) -> bytes:
    plaintext: bytes = shim.key.decrypt(
        ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm(iv)
    )
    return plaintext


def test_ok_forwards_aes_gcm_round_trip(shim: Shim) -> None:
    iv = os.urandom(12)
    plaintext = b"forwarded to SoftHSM through the shim"
    ciphertext = encrypt(shim, plaintext, iv)
    assert len(ciphertext) == len(plaintext) + 16  # GCM appends a 128-bit tag
    assert ciphertext[: len(plaintext)] != plaintext
    assert decrypt(shim, ciphertext, iv) == plaintext


def test_error_device_error_raises_device_error(shim: Shim) -> None:
    shim.control.error("CKR_DEVICE_ERROR")
    with pytest.raises(DeviceError):
        encrypt(shim, b"x", os.urandom(12))


def test_error_general_error_raises_general_error(shim: Shim) -> None:
    shim.control.error("CKR_GENERAL_ERROR")
    with pytest.raises(GeneralError):
        encrypt(shim, b"x", os.urandom(12))


def test_error_accepts_hex_code(shim: Shim) -> None:
    shim.control.error("0x30")  # CKR_DEVICE_ERROR
    with pytest.raises(DeviceError):
        encrypt(shim, b"x", os.urandom(12))


def test_ok_after_error_forwards_again(shim: Shim) -> None:
    shim.control.error("CKR_DEVICE_ERROR")
    with pytest.raises(DeviceError):
        encrypt(shim, b"x", os.urandom(12))
    shim.control.ok()
    iv = os.urandom(12)
    assert decrypt(shim, encrypt(shim, b"recovered", iv), iv) == b"recovered"


def test_slow_delays_encrypt(shim: Shim) -> None:
    shim.control.slow(200)
    start = time.monotonic()
    encrypt(shim, b"slow", os.urandom(12))
    assert time.monotonic() - start >= 0.2


def test_hang_blocks_until_mode_changes(shim: Shim) -> None:
    iv = os.urandom(12)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(encrypt(shim, b"after the hang", iv))
        except BaseException as exc:
            errors.append(exc)

    shim.control.hang()
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive(), "encrypt finished while the module was in mode 'hang'"

    shim.control.ok()
    thread.join(30)
    assert not thread.is_alive(), "encrypt still blocked after mode 'ok'"
    assert errors == []
    assert decrypt(shim, results[0], iv) == b"after the hang"


def test_slot_and_token_queries_are_not_faulted(shim: Shim) -> None:
    shim.control.error("CKR_DEVICE_ERROR")
    slots = shim.lib.get_slots(token_present=True)  # C_GetSlotList, C_GetSlotInfo
    labels = [slot.get_token().label for slot in slots]  # C_GetTokenInfo
    assert TOKEN_LABEL in labels
    token = shim.lib.get_token(token_label=TOKEN_LABEL)  # also C_GetMechanismList
    with pytest.raises(DeviceError):  # while session functions are faulted
        token.open()


def test_unparseable_control_line_forwards_and_warns(
    shim: Shim, capfd: pytest.CaptureFixture[str]
) -> None:
    shim.control.path.write_text("explode now\n")
    iv = os.urandom(12)
    assert decrypt(shim, encrypt(shim, b"still ok", iv), iv) == b"still ok"
    assert "cannot parse control line" in capfd.readouterr().err


def _function_list(path: Path) -> tuple[ctypes.CDLL, list[int]]:
    dll = ctypes.CDLL(str(path))
    get_list = dll.C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    pointer = ctypes.POINTER(ctypes.c_void_p)()
    assert get_list(ctypes.byref(pointer)) == 0
    # CK_FUNCTION_LIST: a 2-byte CK_VERSION, padded to pointer alignment, then the pointers.
    entries = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_void_p * (1 + len(FUNCTION_NAMES))))
    return dll, [value or 0 for value in entries.contents[1:]]


def _symbol(dll: ctypes.CDLL, name: str) -> int:
    address = ctypes.cast(getattr(dll, name), ctypes.c_void_p).value
    assert address is not None
    return address


def test_function_list_layout_matches_softhsm(shim: Shim) -> None:
    assert len(FUNCTION_NAMES) == 68
    # SoftHSM builds its list from the official headers: its i-th entry is its C_<name>.
    real, real_entries = _function_list(shim.real)
    assert real_entries == [_symbol(real, name) for name in FUNCTION_NAMES]
    # The shim's i-th entry is its exported wrapper of the same name.
    dll, entries = _function_list(shim.so)
    assert entries == [_symbol(dll, name) for name in FUNCTION_NAMES]


def test_shim_does_not_export_c_getinterface(shim: Shim) -> None:
    dll = ctypes.CDLL(str(shim.so))
    assert not hasattr(dll, "C_GetInterface")
    assert not hasattr(dll, "C_GetInterfaceList")
    assert shim.lib.cryptoki_version == (2, 40)  # python-pkcs11 loaded it without them


def test_module_compiles_warning_free(tmp_path: Path) -> None:
    out = tmp_path / "libxksfault.so"
    proc = subprocess.run(
        ["gcc", *CFLAGS, "-Werror", "-o", str(out), str(FAULT_SOURCE), *LDLIBS],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# --- function filters ---------------------------------------------------------------------


def test_error_for_named_functions_only(shim: Shim) -> None:
    iv = os.urandom(12)
    ciphertext = encrypt(shim, b"only decrypt fails", iv)
    # C_DecryptInit, not C_Decrypt: a failed init leaves no operation active in SoftHSM.
    shim.control.error("CKR_DEVICE_ERROR", ["C_DecryptInit"])
    assert shim.control.read() == "error CKR_DEVICE_ERROR C_DecryptInit"
    encrypt(shim, b"encrypt still works", os.urandom(12))
    with pytest.raises(DeviceError):
        decrypt(shim, ciphertext, iv)
    shim.control.ok()
    assert decrypt(shim, ciphertext, iv) == b"only decrypt fails"


def test_slow_for_named_functions_only(shim: Shim) -> None:
    shim.control.slow(300, ["C_GenerateRandom"])
    start = time.monotonic()
    encrypt(shim, b"fast", os.urandom(12))
    assert time.monotonic() - start < 0.3
    start = time.monotonic()
    shim.session.generate_random(16)
    assert time.monotonic() - start >= 0.3


def test_a_function_that_is_never_faulted_makes_the_line_invalid(
    shim: Shim, capfd: pytest.CaptureFixture[str]
) -> None:
    shim.control.path.write_text("error CKR_DEVICE_ERROR C_Initialize\n")
    iv = os.urandom(12)
    assert decrypt(shim, encrypt(shim, b"still ok", iv), iv) == b"still ok"
    assert "never faulted" in capfd.readouterr().err


# --- per-copy configuration (xksfault.conf beside the .so) --------------------------------


@dataclass
class Copy:
    so: Path
    control: FaultControl
    lib: ThreadSafeLib
    key: Any


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Copy]]:
    """Two copies of the shim in this process, each over its own SoftHSM copy and token.

    The environment names neither copy's real module nor its control file (it names a missing
    module and a control file that says "error"): each copy must follow its own xksfault.conf.
    """
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    base = tmp_path_factory.mktemp("fault-copies")
    built = build_fault_module(base / "build")
    decoy = FaultControl(base / "env-control")
    decoy.error("CKR_GENERAL_ERROR")
    out: list[Copy] = []
    with ExitStack() as stack:
        restore_environment_at_exit(stack, ("SOFTHSM2_CONF", ENV_REAL_MODULE, ENV_CONTROL))
        os.environ[ENV_REAL_MODULE] = str(base / "no-such-module.so")
        os.environ[ENV_CONTROL] = str(decoy.path)
        for name in ("a", "b"):
            so, conf, control = softhsm_copy(
                built, base / name, base / f"control-{name}", (TOKEN_LABEL, SO_PIN, USER_PIN)
            )
            os.environ["SOFTHSM2_CONF"] = str(conf)  # read by this SoftHSM copy when initialised
            lib = ThreadSafeLib(str(so))
            stack.callback(lib.finalize_module)
            session = lib.get_token(token_label=TOKEN_LABEL).open(rw=True, user_pin=USER_PIN)
            stack.callback(session.close)
            stack.callback(control.ok)  # runs first: close and finalise with no fault active
            key = session.generate_key(KeyType.AES, 256, label=f"copy-{name}")
            out.append(Copy(so=so, control=control, lib=lib, key=key))
        yield out


@pytest.fixture
def pair(copies: list[Copy]) -> Iterator[list[Copy]]:
    for c in copies:
        c.control.ok()
    yield copies
    for c in copies:
        c.control.ok()


def round_trip(copy: Copy) -> bytes:
    iv = os.urandom(12)
    ciphertext = copy.key.encrypt(b"hello", mechanism=Mechanism.AES_GCM, mechanism_param=gcm(iv))
    plaintext: bytes = copy.key.decrypt(
        ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm(iv)
    )
    return plaintext


def test_each_copy_forwards_to_its_own_module(pair: list[Copy]) -> None:
    a, b = pair
    assert a.so.parent != b.so.parent
    assert (a.so.parent / CONF_NAME).exists()
    serial_a = a.lib.get_token(token_label=TOKEN_LABEL).serial
    serial_b = b.lib.get_token(token_label=TOKEN_LABEL).serial
    assert serial_a != serial_b  # two SoftHSM instances, each with its own token directory
    assert round_trip(a) == round_trip(b) == b"hello"  # the env's "error" file is not obeyed


@pytest.mark.parametrize("faulty", [0, 1])
def test_copies_fault_independently(pair: list[Copy], faulty: int) -> None:
    pair[faulty].control.error("CKR_DEVICE_ERROR")
    with pytest.raises(DeviceError):
        round_trip(pair[faulty])
    assert round_trip(pair[1 - faulty]) == b"hello"
    pair[faulty].control.ok()
    assert round_trip(pair[faulty]) == b"hello"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ("control = /nowhere\n", "no 'real_module = <path>' line"),
        ("real_module = /no/such/module.so\n", "cannot load the real module /no/such/module.so"),
        ("real_module = libsofthsm2.so\ncolour = blue\n", "unknown setting 'colour'"),
        ("just some words\n", "expected 'name = value'"),
    ],
    ids=["no-real-module", "missing-real-module", "unknown-setting", "not-name-value"],
)
def test_an_unusable_conf_file_loads_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], conf: str, message: str
) -> None:
    # The environment is ignored as soon as the file exists, even if it names a usable module.
    so = install_copy(
        build_fault_module(tmp_path / "build"),
        tmp_path / "copy",
        real_module=SOFTHSM,
        control=None,
    )
    (so.parent / CONF_NAME).write_text(conf)
    with pytest.raises(PKCS11Error):
        ThreadSafeLib(str(so))
    assert message in capfd.readouterr().err
