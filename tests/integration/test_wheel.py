"""A wheel install works as an editable one does: build the wheel, install it into a fresh venv
(no system site-packages, the dependencies from the package index), then run `wsproxy demo` from a
directory outside the checkout with nothing of the checkout on the path. The demo must find its
config as package data and make its certificates in the user's cache directory, not in the venv.

It needs the package index (pip's cache makes a second run quick), as `.ci/run` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import wsproxy
from tests.support import watch_proxy_output

ROOT = Path(wsproxy.__file__).resolve().parent.parent
# What the build reads (pyproject.toml names README.md as the long description): copied, so the
# build writes its build/ and *.egg-info into tmp_path, never into the checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "wsproxy")


def run(cmd: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_in_a_fresh_venv_runs_the_demo_from_anywhere(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # nothing of the checkout or the test venv may leak in: no PYTHONPATH; a cache directory of its own
    # (where the demo's certificates must go), pip's own cache kept so a second run downloads nothing
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PIP_CACHE_DIR=pip_cache_dir())

    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src], cwd=tmp_path, env=env, timeout=120)
    [wheel] = dist.glob("wsproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wsproxy/data/demo.yaml" in names
    assert not [n for n in names if n.endswith(".pem")]

    venv = tmp_path / "venv"  # without pip of its own (ensurepip is slow): this pip installs into it
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env, timeout=60)
    pip_into_venv = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q"]
    run([*pip_into_venv, wheel], cwd=tmp_path, env=env, timeout=180)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(
        [venv / "bin" / "python", "-c", "import wsproxy; print(wsproxy.__file__)"], cwd=elsewhere, env=env, timeout=30
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel's copy, not the checkout

    demo = run(
        [venv / "bin" / "wsproxy", "demo", "--self-check-only", "--free-ports"], cwd=elsewhere, env=env, timeout=60
    )
    watch_proxy_output(lambda: demo.stderr)
    assert "self-check passed" in demo.stdout, demo.stdout
    assert demo.stdout.count(" OK") == 4  # ws:// and wss://, both backends
    certs = tmp_path / "cache" / "wsproxy" / "certs"
    assert f"TLS clients trust {certs / 'demo-ca.pem'}" in demo.stdout
    assert not list(venv.rglob("demo-*.pem")), "the demo wrote certificates into the venv"
    assert not list(elsewhere.iterdir()), "the demo wrote into the directory it ran in"

    same = run([venv / "bin" / "python", "-m", "wsproxy.cli", "--version"], cwd=elsewhere, env=env, timeout=30)
    assert same.stdout == f"wsproxy {wsproxy.__version__}\n"


def pip_cache_dir() -> str:
    """The user's pip cache (XDG_CACHE_HOME is replaced above, which would move it)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, timeout=30, check=False
    )
    return (
        result.stdout.strip()
        if result.returncode == 0 and result.stdout.strip()
        else str(Path.home() / ".cache" / "pip")
    )


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().rstrip("\n").splitlines()
    command = ci[-1]
    assert f"```sh\n{command}\n```" in readme
    assert ".venv/bin/mypy" in command and ".venv/bin/ruff check ." in command
