"""YAML parsing that refuses what PyYAML silently accepts: a key given twice in one mapping.

PyYAML keeps the last of two equal keys, so a config with two `train:` sections trains with
half of what the user wrote. Here the document is composed first (nodes keep their line
numbers), every mapping is checked for repeated keys, and only then is it constructed.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    def __init__(self, key: str, first_line: int, second_line: int):
        super().__init__(f"key {key} appears twice (lines {first_line} and {second_line})")
        self.key, self.first_line, self.second_line = key, first_line, second_line


def safe_load_strict(text: str) -> Any:
    """`yaml.safe_load(text)`, but a repeated mapping key raises DuplicateKeyError.

    Deeply nested input raises RecursionError (PyYAML's composer is recursive): callers turn
    it into their own message.
    """
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        _check_mappings(node, prefix="", seen=set())
    return yaml.safe_load(text)


def _check_mappings(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias shares its anchor's node: checked once
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                dotted = f"{prefix}{key}"
                line = key_node.start_mark.line + 1
                if dotted in lines:
                    raise DuplicateKeyError(dotted, lines[dotted], line)
                lines[dotted] = line
            _check_mappings(value_node, f"{prefix}{key}." if key is not None else prefix, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_mappings(item, f"{prefix.rstrip('.')}[{index}].", seen)
