"""Shared fixtures: TLS files from trustme, websockets backends that stop after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backend, BackendTLSFiles, TLSFiles, make_backend_tls, make_tls_files


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path)


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    """Append started backends here (tests.support.start_backend); all are stopped afterwards."""
    started: list[Backend] = []
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def backend_tls(tmp_path: Path) -> BackendTLSFiles:
    """A CA for TLS backends, written where the proxy's `pools.NAME.tls.ca` can name it."""
    return make_backend_tls(tmp_path / "backend-tls")
