"""Throwaway certificates for tests and demos (``henge certs dev``).

Production certificates come from the operator's PKI; this makes a private CA, a server
certificate for the gateway's names, and one client certificate per device whose CN is the
device id (what mutual TLS checks). Needs the ``cryptography`` package (the ``certs`` extra).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Any

from .errors import SettingsError


def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise SettingsError("henge certs needs the cryptography package: pip install 'henge-mqtt[certs]'") from exc
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_dev_certs(out: Path, hosts: list[str], devices: list[str], days: int = 30,
                   ca_name: str = "henge dev CA") -> dict[str, Path]:
    """Write ca.pem, server.pem/server.key and DEVICE.pem/DEVICE.key into ``out`` (``ca_name``: the
    CA's CN; a claim CA needs a name of its own)."""
    x509, hashes, serialization, ec, name_oid, eku = _crypto()
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key_pem(key: Any) -> bytes:
        return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(name_oid.COMMON_NAME, cn),
                          x509.NameAttribute(name_oid.ORGANIZATION_NAME, "henge-mqtt dev")])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, usage: Any, sans: list[Any] | None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    sans: list[Any] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    written = {"ca": out / "ca.pem"}
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca.key", key_pem(ca_key), private=True)
    cert, key = issue(hosts[0], eku.SERVER_AUTH, sans)
    _write(out / "server.pem", cert, private=False)
    _write(out / "server.key", key, private=True)
    written["server"] = out / "server.pem"
    for device in devices:
        cert, key = issue(device, eku.CLIENT_AUTH, None)
        _write(out / f"{device}.pem", cert, private=False)
        _write(out / f"{device}.key", key, private=True)
        written[device] = out / f"{device}.pem"
    return written
