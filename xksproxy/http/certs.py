"""Certificates made on the spot: for the mutual-TLS self-test, the tests and the load tests.

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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Validity = tuple[datetime.datetime, datetime.datetime]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def validity(days: float = 1.0) -> Validity:
    """From five minutes ago (clock skew) to *days* from now."""
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def _new_key(use_rsa: bool = False) -> PrivateKey:
    return (
        rsa.generate_private_key(65537, 2048)
        if use_rsa
        else ec.generate_private_key(ec.SECP256R1())
    )


def _builder(
    subject: str, issuer: x509.Name | None, key: PrivateKey, valid: Validity, ca: bool
) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def _with_names(
    builder: x509.CertificateBuilder, dns_names: list[str], ip_addresses: tuple[str, ...]
) -> x509.CertificateBuilder:
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    return builder.add_extension(x509.SubjectAlternativeName(alt), False) if alt else builder


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: PrivateKey
) -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@dataclass(frozen=True)
class Authority:
    """A self-signed certificate and its key: a CA, or (``ca=False``) a self-signed leaf whose
    names are *name* and *ip_addresses*."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(
        cls,
        name: str,
        *,
        ca: bool = True,
        days: float = 1.0,
        use_rsa: bool = False,
        ip_addresses: tuple[str, ...] = (),
    ) -> Authority:
        key = _new_key(use_rsa)
        builder = _builder(name, None, key, validity(days), ca)
        if not ca:
            builder = _with_names(builder, [name], ip_addresses)
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
        key = _new_key()
        usage = [ExtendedKeyUsageOID.SERVER_AUTH]
        if not server_only:
            usage.insert(0, ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = _builder(name, self.cert.subject, key, valid or validity(), False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        builder = _with_names(builder, [name] if dns_names is None else dns_names, ip_addresses)
        return _write(directory, stem, builder.sign(self.key, hashes.SHA256()), key)
