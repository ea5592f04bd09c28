"""The import parameters KMS offers for its own keys (GetParametersForImport), by name: plain
data, so that the command line can offer them without loading the PKCS#11 and crypto code of
:mod:`xksproxy.keys.wrapping`, which builds on the same names."""

from __future__ import annotations

WRAPPING_ALGORITHMS = (
    "RSAES_OAEP_SHA_256",
    "RSAES_OAEP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1",
)
WRAPPING_KEY_SPECS = {"RSA_3072": 3072, "RSA_4096": 4096}
