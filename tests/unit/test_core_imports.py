"""The pure core imports neither trio nor any I/O shell module (ARCHITECTURE.md "Two layers").

Two checks per core module: at run time, importing it in a fresh interpreter leaves `trio` and
every shell module out of `sys.modules` (this catches indirect imports through other modules);
statically, no import statement in its source, at any depth (lazy imports inside functions
included), names trio or a shell module.
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

# Core modules named by the architecture; a module is checked once its file exists, and every
# submodule of a core package (balancing/) is core too.
CORE_CANDIDATES = (
    "wsproxy.config",
    "wsproxy.defaults",
    "wsproxy.handshake",
    "wsproxy.relay",
    "wsproxy.relay_inspect",
    "wsproxy.routing",
    "wsproxy.snapshot",
    "wsproxy.balancing",
    "wsproxy.frames",
    "wsproxy.relay_passthrough",
    "wsproxy.heartbeat",
    "wsproxy.health",
    "wsproxy.limits",
    "wsproxy.lru",
    "wsproxy.origin",
    "wsproxy.ratelimit",
    "wsproxy.admission",
    "wsproxy.proxy_protocol",
    "wsproxy.reload_plan",
    "wsproxy.metrics",
    "wsproxy.session_log",
    "wsproxy.status",
)
# The I/O shell (and anything else built on trio): no core module may import these.
SHELL_MODULES = frozenset(
    f"wsproxy.{name}"
    for name in (
        "server",
        "session",
        "upstream",
        "supervisor",
        "cli",
        "demo",
        "__main__",
        "admin",
        "timers",
        "auth",
        "gate",
        "reactor",
        "link",
        "streams",
        "health_check",
    )
)


def module_file(name: str) -> Path | None:
    rel = Path(*name.split(".")[1:])
    for candidate in (PACKAGE_DIR / rel.with_suffix(".py"), PACKAGE_DIR / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def core_modules() -> list[str]:
    found: list[str] = []
    for name in CORE_CANDIDATES:
        path = module_file(name)
        if path is None:
            continue
        found.append(name)
        if path.name == "__init__.py":
            found += sorted(f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py")
    return found


CORE = core_modules()


def forbidden(module: str) -> bool:
    return (
        module == "trio"
        or module.startswith("trio.")
        or any(module == shell or module.startswith(shell + ".") for shell in SHELL_MODULES)
    )


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
            names += [f"{target}.{alias.name}" for alias in node.names]  # `from wsproxy import server`
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def test_core_module_list_is_not_empty_and_includes_the_named_ones() -> None:
    for required in ("wsproxy.config", "wsproxy.handshake", "wsproxy.relay", "wsproxy.routing", "wsproxy.balancing"):
        assert required in CORE
    assert any(name.startswith("wsproxy.balancing.") for name in CORE)


@pytest.mark.parametrize(
    ("source", "module", "bad"),
    [
        ("import trio", "wsproxy.config", True),
        ("import trio.lowlevel as ll", "wsproxy.config", True),
        ("from trio import sleep", "wsproxy.config", True),
        ("from wsproxy import server", "wsproxy.config", True),
        ("from wsproxy.session import Session", "wsproxy.config", True),
        ("from . import upstream", "wsproxy.config", True),
        ("from .. import cli", "wsproxy.balancing.base", True),
        ("from ..demo import x", "wsproxy.balancing.base", True),
        ("def f():\n    import trio\n", "wsproxy.config", True),
        ("import importlib\nimportlib.import_module('trio')", "wsproxy.config", True),
        ("import trustme, h11\nfrom wsproxy import defaults\nfrom .base import Pool", "wsproxy.balancing.x", False),
        ("from wsproxy.relay import GOING_AWAY", "wsproxy.relay_inspect", False),
    ],
)
def test_import_checker_finds_what_it_should(source: str, module: str, bad: bool) -> None:
    names = imported_names(source, module, is_package=False)
    assert any(forbidden(n) for n in names) is bad, names


@pytest.mark.parametrize("module", CORE)
def test_core_module_source_imports_no_trio_or_shell_module(module: str) -> None:
    path = module_file(module)
    assert path is not None
    names = imported_names(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")
    bad = sorted({n for n in names if forbidden(n)})
    assert bad == [], f"{module} ({path.name}) imports {bad}"


PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", CORE)
def test_importing_core_module_loads_no_trio_or_shell_module(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=60, cwd=PACKAGE_DIR.parent
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert module in loaded
    bad = [name for name in loaded if forbidden(name)]
    assert bad == [], f"importing {module} loaded {bad}"
