"""A throwaway test CA, a loopback server certificate, and the identity provider's signing key."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def ensure_certificates(folder: Path) -> dict[str, Path]:
    """Create (once) the CA, a server certificate for localhost/127.0.0.1 and a CA bundle of system CAs + ours.

    Files are reused while they are valid for at least another day, so a restarted stack keeps trusting clients'
    stored settings.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": folder / "ca.pem",
        "ca_key": folder / "ca-key.pem",
        "cert": folder / "server.pem",
        "key": folder / "server-key.pem",
        "bundle": folder / "ca-bundle.pem",
    }
    if all(p.exists() for p in paths.values()) and _still_valid(paths["cert"]):
        return paths
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mail collector local test CA"))
        .issuer_name(_name("mail collector local test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths["ca_key"], ca_key)
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], key)
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    system = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    system_pem = system.read_bytes() if system.exists() else b""
    paths["bundle"].write_bytes(system_pem + b"\n" + paths["ca"].read_bytes())
    return paths


def _still_valid(cert_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=1)


def ensure_signing_key(folder: Path) -> tuple[Path, Path, str]:
    """The identity provider's RSA signing key (private PEM, public PEM) and its key id (RFC 7638 thumbprint)."""
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / "idp-signing.pem", folder / "idp-signing.pub.pem"
    if not private_path.exists():
        _write_key(private_path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    numbers = public.public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    canonical = json.dumps({"e": b64(numbers.e), "kty": "RSA", "n": b64(numbers.n)}, separators=(",", ":"))
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    return private_path, public_path, kid


def ensure_client_certificate(folder: Path) -> tuple[Path, Path, str]:
    """The app registration's certificate credential: private key PEM, self-signed certificate PEM, and the
    certificate's SHA-1 thumbprint in hex (what MSAL's ``thumbprint`` and the portal show). Made once, renewed when
    it expires within a day."""
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / "app-credential.key.pem", folder / "app-credential.pem"
    if not key_path.exists() or not cert_path.exists() or not _still_valid(cert_path):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(key_path, key)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("mail collector app credential"))
            .issuer_name(_name("mail collector app credential"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .sign(key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return key_path, cert_path, cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - x5t is defined as SHA-1
