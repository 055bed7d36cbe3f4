"""Development certificates made with trustme: a throwaway CA and a cert for localhost.

Nothing here is for production; the private key is written next to the cert and must never
be committed (certs/*.pem is git-ignored).
"""

from __future__ import annotations

from pathlib import Path

import trustme


def make_dev_certs(directory: Path, prefix: str = "demo") -> tuple[Path, Path, Path]:
    """Write PREFIX-ca.pem, PREFIX-cert.pem (chain) and PREFIX-key.pem; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="wsproxy development CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ca_path = directory / f"{prefix}-ca.pem"
    cert_path = directory / f"{prefix}-cert.pem"
    key_path = directory / f"{prefix}-key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    leaf.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    with cert_path.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return ca_path, cert_path, key_path


def ensure_dev_certs(directory: Path, prefix: str = "demo") -> tuple[Path, Path, Path]:
    """Make the dev certs unless all three files already exist."""
    paths = tuple(directory / f"{prefix}-{n}.pem" for n in ("ca", "cert", "key"))
    if all(p.is_file() for p in paths):
        return paths  # type: ignore[return-value]
    return make_dev_certs(directory, prefix)
