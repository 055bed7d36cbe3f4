"""The walker the loader uses: collects every problem with its key path instead of stopping at the
first one, checks mappings for unknown keys, and resolves file paths against the config's folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# the walker: collects problems with key paths instead of stopping at the first one


class Checker:
    def __init__(self, base_dir: Path) -> None:
        self.problems: list[tuple[str, str]] = []
        self.base_dir = base_dir

    def fail(self, path: str, msg: str) -> None:
        self.problems.append((path, msg))

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                hint = f"; known keys: {', '.join(allowed)}" if allowed else ""
                self.fail(join(path, str(key)), f"unknown key{hint}")
        return value

    def get(self, mapping: dict[str, Any], key: str, path: str, parse: Callable[[Any], Any], default: Any) -> Any:
        if key not in mapping:
            return default
        try:
            return parse(mapping[key])
        except ValueError as exc:
            self.fail(join(path, key), str(exc))
            return default

    def sequence(self, value: Any, path: str) -> Iterator[tuple[int, Any]]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {type(value).__name__}")
            return
        yield from enumerate(value)

    def path_to_file(self, value: Any, *, missing_hint: str = "") -> Path:
        """The file `value` names (relative: in the config's folder); it must exist. `missing_hint`
        is added to the error when it does not, to say where such a file comes from."""
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a file path, got {value!r}")
        p = Path(value)
        if not p.is_absolute():
            p = self.base_dir / p
        try:
            exists = p.is_file()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot use {value!r} as a file path: {exc}") from None
        if not exists:
            raise ValueError(f"no such file: {p}" + (f"; {missing_hint}" if missing_hint else ""))
        return p


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
