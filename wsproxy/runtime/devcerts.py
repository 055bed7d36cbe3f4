"""Development certificates made with trustme: a throwaway CA and a cert for localhost.

Nothing here is for production. They live in a per-user directory (`default_certs_dir`) or one the
user names, never inside the installed package; the private key is written next to the cert and
must never be committed (certs/*.pem is git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import trustme


def default_certs_dir() -> Path:
    """$XDG_CACHE_HOME/wsproxy/certs, or ~/.cache/wsproxy/certs: the user's, not the package's."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "wsproxy" / "certs"


def make_dev_certs(directory: Path, prefix: str = "demo") -> tuple[Path, Path, Path]:
    """Write PREFIX-ca.pem, PREFIX-cert.pem (chain) and PREFIX-key.pem; return their paths."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    ca, cert, key = (directory / f"{prefix}-{n}.pem" for n in ("ca", "cert", "key"))
    if ca.is_file() and cert.is_file() and key.is_file():
        return ca, cert, key
    return make_dev_certs(directory, prefix)
