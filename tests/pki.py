"""Throwaway certificates for TLS tests, made with the openssl command line.

``make_pki(dir)`` writes, in ``dir``:

- ``ca.pem`` / ``ca.key``: a CA;
- ``server.pem`` / ``server.key``: a server certificate signed by it, for ``IP:127.0.0.1``
  and ``DNS:localhost`` (the key PKCS#8, unencrypted: what Kafka's PEM keystore reads);
- ``client.pem`` / ``client.key``: a client certificate signed by it, the key encrypted
  with the password in ``client.key.password``;
- ``rogue-ca.pem``: another CA, that signed nothing here.

EC P-256 keys: generated in milliseconds, unlike RSA.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_KEY_PASSWORD = "client-key-secret"  # a test fixture's throwaway key


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def rogue_ca(self) -> Path:
        return self.dir / "rogue-ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    @property
    def client_key_password(self) -> Path:
        return self.dir / "client.key.password"


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{out.stderr}")


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2"),
        *("-subj", f"/CN=processor test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=cwd,
    )


def _leaf(name: str, ca: str, extensions: str, cwd: Path, *key_args: str) -> None:
    _openssl(
        *("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"),
        *key_args,
        *("-out", f"{name}.key"),
        cwd=cwd,
    )
    passin = ["-passin", "file:client.key.password"] if key_args else []
    _openssl(
        *("req", "-new", "-key", f"{name}.key", *passin, "-out", f"{name}.csr"),
        *("-subj", f"/CN=processor test {name}"),
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n" + extensions
    )
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem"),
        cwd=cwd,
    )


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", directory)
    _ca("rogue-ca", directory)
    _leaf(
        "server",
        "ca",
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        directory,
    )
    (directory / "client.key.password").write_text(CLIENT_KEY_PASSWORD + "\n")
    _leaf(
        "client",
        "ca",
        "extendedKeyUsage=clientAuth\n",
        directory,
        *("-aes-256-cbc", "-pass", "file:client.key.password"),
    )
    return Pki(directory)
