"""YAML as the config loader reads it: PyYAML's safe loader, minus the silent last-key-wins.

In `{address: a, weight: 2, address: b}` YAML keeps `b` and drops `a` without a word, so a
pasted block can quietly override a setting. `StrictLoader` refuses a key given twice in one
mapping and names both lines. Merge keys (`<<: *defaults`) still override as YAML means them to.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that raises ConstructorError for a key repeated in one mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConstructorError(
                    None,
                    None,
                    f"key {key_node.value!r} is given twice in one mapping, on line {first_line[key]} and line "
                    f"{line} (YAML would silently keep the last)",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)
