"""Throwaway certificates for TLS tests, made with the `openssl` command line tool.

A CA, and a server certificate it signed for ``localhost`` and ``127.0.0.1``, valid for one day.
The same commands, with longer lifetimes, are in docs/security.md for a real deployment.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

VALID_DAYS = "1"
# serverAuth and both SAN kinds: Python checks a hostname against DNS names and an IP address
# against IP names, and the tests connect to 127.0.0.1.
SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Certs:
    """PEM files of one throwaway CA and the server certificate it signed."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def openssl_available() -> bool:
    """True if the `openssl` command is installed."""
    return shutil.which("openssl") is not None


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA; returns (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", VALID_DAYS, "-subj", f"/CN=distill-swarm test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


CLIENT_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def _signed(
    directory: Path, name: str, subject: str, ca: Path, ca_key: Path, extensions: str
) -> tuple[Path, Path]:
    """A key and a certificate for ``subject`` signed by ``ca``; returns (certificate, key)."""
    key, csr, cert = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", subject,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", VALID_DAYS, "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


def make_client_cert(directory: Path, ca: Path, ca_key: Path, name: str) -> tuple[Path, Path]:
    """A client certificate (CN=name) signed by ``ca``; returns (certificate, key)."""
    return _signed(directory, name, f"/CN={name}", ca, ca_key, CLIENT_EXTENSIONS)


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for localhost/127.0.0.1 in ``directory``."""
    ca, ca_key = make_ca(directory)
    cert, key = _signed(directory, "server", "/CN=localhost", ca, ca_key, SERVER_EXTENSIONS)
    return Certs(ca=ca, ca_key=ca_key, server_cert=cert, server_key=key)
