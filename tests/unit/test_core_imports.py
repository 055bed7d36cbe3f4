"""The pure core stays pure, and the layers' arrows point down (ARCHITECTURE.md, "Layers").

The core is derived from the tree: every module under `wsproxy/config/`, `wsproxy/protocol/`,
`wsproxy/policy/` and `wsproxy/observe/`, so a new core module is checked without editing a list.
For each, three checks:

- statically, no import statement in its source (at any depth, lazy imports included) names
  trio, `socket`, `ssl`, `select`, `selectors`, `time`, the runtime shell or the top-level
  programs, nor a layer above its own (config < protocol < policy < observe);
- statically, it reads no clock (`time.*`, `datetime.now`/`utcnow`/`today`, `date.today`):
  time comes in as `now`;
- at run time, importing it in a fresh interpreter leaves trio, the I/O modules and every shell
  module out of `sys.modules` (this catches indirect imports through other modules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import wsproxy

PACKAGE_DIR = Path(wsproxy.__file__).resolve().parent
LAYERS = ("config", "protocol", "policy", "observe")  # in order: each may import those before it
SHELL_PACKAGES = ("wsproxy.runtime", "wsproxy.cli", "wsproxy.demo", "wsproxy.__main__")
IO_MODULES = ("trio", "socket", "ssl", "select", "selectors", "time", "asyncio", "anyio")
CLOCK_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today")}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> list[tuple[str, Path]]:
    found = []
    for layer in LAYERS:
        for path in sorted((PACKAGE_DIR / layer).rglob("*.py")):
            found.append((module_name(path), path))
    return found


CORE = core_modules()
CORE_NAMES = [name for name, _ in CORE]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "wsproxy" and parts[1] in LAYERS else None


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden(module: str, importer: str) -> bool:
    """May `importer` (a core module) import `module`?"""
    if any(_within(module, m) for m in IO_MODULES) or any(_within(module, s) for s in SHELL_PACKAGES):
        return True
    mine, theirs = layer_of(importer), layer_of(module)
    if mine is not None and theirs is not None:
        return LAYERS.index(theirs) > LAYERS.index(mine)
    return False


def imported_names(source: str, module: str, *, is_package: bool) -> list[str]:
    """Every module an import statement in `source` names (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append(target)
            if target == "wsproxy":  # `from wsproxy import runtime`: the names are modules
                names += [f"{target}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def clock_reads(source: str) -> list[str]:
    """Calls such as `datetime.now(...)` in `source` (imports of `time` are caught as imports)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if (owner_name, node.func.attr) in CLOCK_CALLS:
                found.append(f"line {node.lineno}: {owner_name}.{node.func.attr}()")
    return found


def test_core_is_derived_from_the_layer_folders() -> None:
    named = ("wsproxy.config", "wsproxy.protocol.handshake", "wsproxy.protocol.frames", "wsproxy.policy.routing")
    for required in named:
        assert required in CORE_NAMES
    assert any(name.startswith("wsproxy.policy.balancing.") for name in CORE_NAMES)
    assert not any(name.startswith("wsproxy.runtime") for name in CORE_NAMES)


@pytest.mark.parametrize(
    ("source", "module", "bad"),
    [
        ("import trio", "wsproxy.config.loader", True),
        ("import trio.lowlevel as ll", "wsproxy.config.loader", True),
        ("from trio import sleep", "wsproxy.protocol.frames", True),
        ("import socket", "wsproxy.protocol.frames", True),
        ("import ssl", "wsproxy.policy.health", True),
        ("import selectors", "wsproxy.policy.health", True),
        ("from time import monotonic", "wsproxy.observe.metrics", True),
        ("from wsproxy import runtime", "wsproxy.config.loader", True),
        ("from wsproxy.runtime.session import Session", "wsproxy.observe.status", True),
        ("from ..runtime import upstream", "wsproxy.protocol.frames", True),
        ("from ... import cli", "wsproxy.policy.balancing.base", True),
        ("def f():\n    import trio\n", "wsproxy.config.loader", True),
        ("import importlib\nimportlib.import_module('trio')", "wsproxy.config.loader", True),
        ("from wsproxy.policy.health import x", "wsproxy.protocol.relay", True),  # upward
        ("from wsproxy.observe import metrics", "wsproxy.policy.health", True),  # upward
        ("from wsproxy.protocol.relay import GOING_AWAY", "wsproxy.config.model", True),  # upward
        ("import h11\nfrom wsproxy.config import defaults\nfrom .base import P", "wsproxy.policy.balancing.x", False),
        ("from wsproxy.protocol.relay import GOING_AWAY", "wsproxy.protocol.relay_inspect", False),
        ("from wsproxy.policy.health import x", "wsproxy.observe.status", False),
    ],
)
def test_import_checker_finds_what_it_should(source: str, module: str, bad: bool) -> None:
    names = imported_names(source, module, is_package=False)
    assert any(forbidden(n, module) for n in names) is bad, names


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from datetime import datetime\nx = datetime.now()", True),
        ("import datetime\nx = datetime.datetime.utcnow()", True),
        ("from datetime import date\nx = date.today()", True),
        ("from datetime import UTC, datetime\nx = datetime.fromtimestamp(1.0, UTC)", False),
    ],
)
def test_clock_checker_finds_what_it_should(source: str, bad: bool) -> None:
    assert bool(clock_reads(source)) is bad


@pytest.mark.parametrize(("module", "path"), CORE, ids=CORE_NAMES)
def test_core_module_imports_nothing_below_or_above_its_layer(module: str, path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    names = imported_names(source, module, is_package=path.name == "__init__.py")
    bad = sorted({n for n in names if forbidden(n, module)})
    assert bad == [], f"{module} ({path.name}) imports {bad}"
    assert clock_reads(source) == [], f"{module} reads a clock: {clock_reads(source)}"


def test_importing_the_core_loads_no_io_or_shell_module() -> None:
    """One interpreter per layer (the layer's modules all imported): what they load, at any depth."""
    for layer in LAYERS:
        modules = [name for name in CORE_NAMES if layer_of(name) == layer]
        probe = "import importlib, json, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        probe += "print(json.dumps(sorted(sys.modules)))"
        result = subprocess.run(
            [sys.executable, "-c", probe, *modules], capture_output=True, text=True, timeout=60, cwd=PACKAGE_DIR.parent
        )
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout)
        # (stdlib I/O modules may come in through libraries, prometheus-client's server helpers say;
        # the static check above keeps the core's own code off them)
        bad = [n for n in loaded if _within(n, "trio") or any(_within(n, s) for s in SHELL_PACKAGES)]
        assert bad == [], f"importing the {layer} layer loaded {bad}"
