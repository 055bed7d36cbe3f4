"""A backend TLS context built late (for a session of an older snapshot, after a reload changed the
pool's TLS settings) whose files no longer load is a failed attempt on that backend (UpstreamError:
a 502 and a failed check), never an exception that ends the session or the health checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsproxy.config import BackendConfig, PoolConfig, parse_address
from wsproxy.config.model import BackendTLS
from wsproxy.runtime.backend_tls import BackendContexts
from wsproxy.runtime.upstream import UpstreamError


def test_a_context_whose_ca_file_does_not_load_is_an_upstream_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    backend = BackendConfig(parse_address("127.0.0.1:9"))
    pool = PoolConfig(name="p", backends=(backend,), tls=BackendTLS(ca=bad))
    with pytest.raises(UpstreamError, match=r"TLS settings for 127\.0\.0\.1:9 cannot be loaded"):
        BackendContexts().target(pool, backend)


def test_plain_backends_need_no_context() -> None:
    backend = BackendConfig(parse_address("127.0.0.1:9"))
    assert BackendContexts().target(PoolConfig(name="p", backends=(backend,)), backend) is None
