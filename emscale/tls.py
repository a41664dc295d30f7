"""TLS between the scheduler, the workers and emscale (distributed's ``Security``).

A cluster file's ``tls`` names a directory with ``ca.pem`` (the certificate authority),
``cert.pem`` and ``key.pem`` (the certificate every process of the cluster presents, signed by
that authority); the processes accept only peers whose certificate that authority signed, and
every connection is encrypted. ``emscale tls DIR`` makes such a directory for one cluster (a new
authority each time: certificates of one cluster are not accepted by another). ``tls: auto`` on
a local cluster makes temporary ones in memory.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from emscale.errors import ConfigError

FILES = ("ca.pem", "cert.pem", "key.pem")


def make_certificates(directory: str | os.PathLike, days: int = 365) -> Path:
    """A certificate authority and one certificate signed by it, for every process of one
    cluster, written to ``directory`` (the key readable by its owner only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    until = now + _dt.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("emscale cluster CA"))
          .issuer_name(name("emscale cluster CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("emscale cluster"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem))
    key_file = directory / "key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return directory


def security(tls: str | None):
    """distributed's ``Security`` for a cluster file's ``tls`` (None: no TLS)."""
    if tls is None:
        return None
    from distributed.security import Security

    if tls == "auto":
        return Security.temporary()
    directory = Path(tls)
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise ConfigError(f"tls: {directory} lacks {', '.join(missing)} (make them with "
                          "'emscale tls DIR')")
    ca, cert, key = (str(directory / f) for f in FILES)
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert,
                    tls_worker_key=key, require_encryption=True)


def worker_options(tls: str | os.PathLike) -> list[str]:
    """``dask worker`` / ``dask scheduler`` options for the certificates in ``tls``."""
    ca, cert, key = (str(Path(tls) / f) for f in FILES)
    return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
