"""`wsproxy check` refuses what `run` would refuse, and startup and reload errors say where (issue 17).

Certificates and keys are loaded by `check` the way `run` loads them (runtime/listen.py), so a file
that is not PEM or a key that does not belong to its certificate is exit 2 naming the listener and
both paths; a port in use names the listener and the address instead of `[Errno 98]`.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trustme

from tests.integration.test_cli import run_cli
from tests.support import TLSFiles, proxy_yaml, start_proxy
from wsproxy.runtime.supervisor import reload_from_file


def _tls_config(path: Path, cert: Path, key: Path, port: int = 0) -> Path:
    text = proxy_yaml([9], tls=(cert, key)).replace("127.0.0.1:0", f"127.0.0.1:{port}")
    path.write_text("listeners:\n  - address: 127.0.0.1:0\n    pool: p\n" + text.removeprefix("listeners:\n"))
    return path


def _other_key(tmp_path: Path) -> Path:
    key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(key))
    return key


def _not_pem(tmp_path: Path) -> Path:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"this is not a PEM file\n")
    return junk


@pytest.mark.parametrize("broken", ["cert_not_pem", "key_not_pem", "key_mismatch"])
def test_check_loads_tls_files_as_run_does_and_names_listener_and_both_paths(
    tmp_path: Path, tls_files: TLSFiles, broken: str
) -> None:
    cert, key = tls_files.cert, tls_files.key
    if broken == "cert_not_pem":
        cert = _not_pem(tmp_path)
    elif broken == "key_not_pem":
        key = _not_pem(tmp_path)
    else:
        key = _other_key(tmp_path)
    path = _tls_config(tmp_path / "tls.yaml", cert, key)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert "listeners[1].tls" in result.stderr and str(cert) in result.stderr and str(key) in result.stderr
    why = {
        "cert_not_pem": f"{cert} holds no PEM certificate",
        "key_not_pem": "holds no PEM private key",
        "key_mismatch": "the key does not belong to the certificate",
    }[broken]
    assert why in result.stderr
    assert "Traceback" not in result.stderr and "_ssl.c" not in result.stderr


def test_check_passes_good_tls_files(tmp_path: Path, tls_files: TLSFiles) -> None:
    path = _tls_config(tmp_path / "tls.yaml", tls_files.cert, tls_files.key)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr


@pytest.mark.expect_errors(r"cannot start: .*the key does not belong to the certificate")
def test_run_with_a_key_that_does_not_match_names_listener_address_and_files(
    tmp_path: Path, tls_files: TLSFiles
) -> None:
    key = _other_key(tmp_path)
    path = _tls_config(tmp_path / "tls.yaml", tls_files.cert, key)
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    line = next(ln for ln in result.stderr.splitlines() if "cannot start" in ln)
    assert str(path) in line and "listeners[1] 127.0.0.1:0" in line
    assert str(tls_files.cert) in line and str(key) in line and "does not belong" in line


@pytest.mark.expect_errors(r"cannot start: .*in use by another program")
def test_run_on_a_port_in_use_names_the_file_listener_and_address(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "busy.yaml"
        path.write_text(proxy_yaml([9]).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    assert f"cannot start: {path}: listeners[0] 127.0.0.1:{port}: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr and "Errno" not in result.stderr


@pytest.mark.expect_errors(r"reload rejected, keeping the running config: .*the key does not belong")
async def test_reload_with_a_bad_key_names_the_listener_and_both_files(
    nursery, tmp_path: Path, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "live.yaml"
    path.write_text(proxy_yaml([9]))
    proxy = await start_proxy(nursery, path.read_text())
    key = _other_key(tmp_path)
    _tls_config(path, tls_files.cert, key)
    with caplog.at_level(logging.ERROR, logger="wsproxy"):
        assert await reload_from_file(proxy.server, path) is False
    (line,) = [r.getMessage() for r in caplog.records if "reload rejected" in r.getMessage()]
    assert "listeners[1] 127.0.0.1:0" in line and str(tls_files.cert) in line and str(key) in line
