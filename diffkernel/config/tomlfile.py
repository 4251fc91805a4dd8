"""Config files: writing TOML (the standard library reads it but does not write it),
and what is checked in a file read: its nesting, and fields another field overrides."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_NESTING", "nesting_depth", "overridden_fields", "toml_dumps"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")  # pragma: no cover


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Write nested plain data as TOML tables (only what :meth:`Config.to_dict` produces)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], header: list[str]) -> None:
        leaves = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if header and (leaves or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(header) + "]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in leaves)
        for key, sub in tables:
            emit(sub, [*header, key])

    emit(data, [])
    return "\n".join(lines) + "\n"


#: Deepest nesting of tables a config file may have (the config tree is 3 deep).
MAX_NESTING = 8


def nesting_depth(data: Any) -> int:
    """How many mappings deep ``data`` nests (0 for a scalar); iterative, so any depth."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            deepest = max(deepest, depth)
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((value, depth) for value in node)
    return deepest


def overridden_fields(config, base=None) -> list[str]:
    """Notes on the fields of ``config`` set away from ``base`` that another field overrides.

    Such a field would be silently ignored (``kernelSize`` while ``scaleByFwhm`` is
    true); each note names the field, the one that wins and what to do. ``config``
    and ``base`` are :class:`~diffkernel.config.base.Config` objects of one class
    (``base`` defaults to the class's defaults); the rules are their classes'
    ``OVERRIDDEN_BY``.
    """
    base = type(config)() if base is None else base
    old = base.to_dict(flat=True)
    notes = []
    for key, value in config.to_dict(flat=True).items():
        if key in old and old[key] == value:
            continue
        node, name = config._resolve(key)
        rule = type(node).OVERRIDDEN_BY.get(name)
        if rule is not None and getattr(node, rule[0]) == rule[1]:
            prefix = key.rpartition(".")[0]
            winner = f"{prefix}.{rule[0]}" if prefix else rule[0]
            notes.append(
                f"{key} = {json.dumps(value)} is ignored because {winner} = "
                f"{json.dumps(rule[1])}: {rule[2]}"
            )
    return notes
