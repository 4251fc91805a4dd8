"""Writing configs as TOML (the standard library reads TOML but does not write it)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["toml_dumps"]


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
