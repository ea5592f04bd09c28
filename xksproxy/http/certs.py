"""Certificates made on the spot: for the mutual-TLS self-test, dev-setup rigs and the tests.

Never for production: a real deployment's server certificate comes from the customer's PKI and
its client CA is Amazon Trust Services' (docs/mtls.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Validity = tuple[datetime.datetime, datetime.datetime]


def validity(days: float = 1.0) -> Validity:
    """From five minutes ago (clock skew) to *days* from now."""
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(_key_pem(key))
    return cert_file, key_file


@dataclass(frozen=True)
class Authority:
    """A self-signed certificate and its key: a CA, or (``ca=False``) a self-signed leaf."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str, *, ca: bool = True, days: float = 1.0) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start, end = validity(days)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), False
            )
        return cls(key, builder.sign(key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """This certificate and its key as ``<stem>.crt`` and ``<stem>.key`` (mode 0600)."""
        return _write(directory, stem, self.cert, self.key)

    def issue(
        self,
        directory: Path,
        stem: str,
        name: str,
        *,
        dns_names: list[str] | None = None,
        ip_addresses: tuple[str, ...] = (),
        valid: Validity | None = None,
        server_only: bool = False,
    ) -> tuple[Path, Path]:
        """A leaf certificate for *name* (its common name; also its one DNS name unless
        *dns_names* says otherwise, ``[]`` for none), usable by TLS clients and servers (only
        servers with *server_only*), written as ``<stem>.crt`` and ``<stem>.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = valid or validity()
        alt: list[x509.GeneralName] = [
            x509.DNSName(n) for n in ([name] if dns_names is None else dns_names)
        ]
        alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH]
                    if server_only
                    else [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return _write(directory, stem, builder.sign(self.key, hashes.SHA256()), key)
