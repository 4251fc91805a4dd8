"""Typed configuration: fields that check their values, configs that nest them.

A :class:`Field` declares a typed, documented value with a default (and optional
choices); a :class:`Config` subclass is a set of fields. Assignment checks the type and
choices at once, :meth:`Config.validate` the ranges and consistency rules; misspelt names
are refused with a suggestion; configs convert to and from nested or dotted-key dicts,
TOML and JSON files. The ip_diffim schema built on it is in :mod:`.parts` and
:mod:`.psfmatch`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import textwrap
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Self, TypeVar, overload

import numpy as np

from ..errors import ConfigError
from .tomlfile import MAX_NESTING, nesting_depth, toml_dumps

__all__ = ["Field", "Config"]

T = TypeVar("T")

#: Path segments that name a derived member rather than a stored field
#: (``kernel.active`` is whichever of ``kernel.AL`` / ``kernel.DF`` is selected).
_DERIVED_SEGMENTS = frozenset({"active"})


# ---------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------


def _type_name(tp: type) -> str:
    return tp.__name__


def _coerce_scalar(value: Any, dtype: type, where: str) -> Any:
    """Check ``value`` against a scalar type and return it in canonical Python form."""
    is_bool = isinstance(value, bool | np.bool_)
    if dtype is bool:
        if is_bool:
            return bool(value)
    elif dtype is int:
        # bool is an int subclass; accepting it would hide swapped arguments.
        if isinstance(value, int | np.integer) and not is_bool:
            return int(value)
    elif dtype is float:
        if isinstance(value, int | float | np.integer | np.floating) and not is_bool:
            number = float(value)
            if math.isnan(number):
                raise ConfigError(f"{where} must be a number, got nan")
            return number
    elif dtype is str:
        if isinstance(value, str):
            return str(value)
    else:  # pragma: no cover - guarded by Field.__init__
        raise TypeError(f"unsupported field type {dtype!r}")
    raise ConfigError(
        f"{where} expects {_type_name(dtype)}, got {value!r} ({type(value).__name__})"
    )


class Field(Generic[T]):
    """A typed, documented configuration field, used as a descriptor on a :class:`Config`.

    Parameters
    ----------
    dtype : type
        ``bool``, ``int``, ``float`` or ``str`` for a scalar; ``tuple`` for a list field
        (give ``item_type``); a :class:`Config` subclass for a nested config.
    default : object, optional
        Default value (ignored for nested configs, which default to a fresh instance).
    doc : str
        What the field means; printed by :meth:`Config.describe`.
    item_type : type, optional
        Type of the items of a list field.
    choices : mapping, optional
        Allowed values, each with a short description.
    aliases : mapping of str to str, optional
        Alternative spellings accepted on assignment and replaced by the canonical value.
    """

    _SCALARS: ClassVar[tuple[type, ...]] = (bool, int, float, str)

    def __init__(
        self,
        dtype: type[T],
        default: Any = None,
        doc: str = "",
        *,
        item_type: type | None = None,
        choices: Mapping[Any, str] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if dtype is tuple:
            if item_type not in self._SCALARS:
                raise TypeError("a list field needs item_type bool, int, float or str")
        elif dtype not in self._SCALARS and not (
            isinstance(dtype, type) and issubclass(dtype, Config)
        ):
            raise TypeError(f"unsupported field type {dtype!r}")
        self.dtype: type[T] = dtype
        self.default = default
        self.doc = " ".join(doc.split())
        self.item_type = item_type
        self.choices: dict[Any, str] | None = dict(choices) if choices is not None else None
        self.aliases: dict[str, str] = dict(aliases or {})
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        if not self.is_config:
            # Fails at import time if a default contradicts its own field.
            self.default = self.coerce(self.default, owner.__name__)

    @property
    def is_config(self) -> bool:
        """True when the field holds a nested :class:`Config`."""
        return isinstance(self.dtype, type) and issubclass(self.dtype, Config)

    def with_default(self, default: Any) -> Field[T]:
        """Return a copy of this field with another default (for subclass overrides)."""
        return Field(
            self.dtype,
            default,
            self.doc,
            item_type=self.item_type,
            choices=self.choices,
            aliases=self.aliases,
        )

    def make_default(self) -> Any:
        """Return the default value of a new instance (a fresh object for nested configs)."""
        if self.is_config:
            return self.dtype()
        return self.default

    def type_label(self) -> str:
        """Human-readable type, e.g. ``float``, ``list[int]`` or ``DetectionConfig``."""
        if self.dtype is tuple:
            return f"list[{_type_name(self.item_type)}]"  # type: ignore[arg-type]
        return _type_name(self.dtype)

    def coerce(self, value: Any, owner: str) -> Any:
        """Check ``value`` for this field and return it in stored form.

        Parameters
        ----------
        value : object
            Candidate value.
        owner : str
            Name of the config class, for the error message.

        Returns
        -------
        object
            The value as stored: builtin scalars, tuples for list fields, aliases replaced.

        Raises
        ------
        ConfigError
            If the type is wrong or the value is not one of the choices.
        """
        where = f"config field {self.name!r} of {owner}"
        if self.is_config:
            if not isinstance(value, self.dtype):
                raise ConfigError(
                    f"{where} expects a {_type_name(self.dtype)} instance, "
                    f"got {value!r} ({type(value).__name__})"
                )
            return value
        if self.dtype is tuple:
            if isinstance(value, np.ndarray) and value.ndim == 1:
                value = value.tolist()
            if not isinstance(value, list | tuple):
                raise ConfigError(
                    f"{where} expects {self.type_label()} (a list or tuple), "
                    f"got {value!r} ({type(value).__name__})"
                )
            assert self.item_type is not None
            return tuple(
                _coerce_scalar(item, self.item_type, f"{where}, item {i},")
                for i, item in enumerate(value)
            )
        value = _coerce_scalar(value, self.dtype, where)
        if isinstance(value, str):
            value = self.aliases.get(value, value)
        self.check_choice(value, where)
        return value

    def check_choice(self, value: Any, where: str) -> None:
        """Raise :class:`ConfigError` if the field has choices and ``value`` is not one."""
        if self.choices is None or value in self.choices:
            return
        allowed = ", ".join(repr(c) for c in self.choices)
        message = f"{where} must be one of {allowed}; got {value!r}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        raise ConfigError(message)

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Field[T]: ...

    @overload
    def __get__(self, instance: Config, owner: type | None = None) -> T: ...

    def __get__(self, instance: Config | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__[self.name]

    def __set__(self, instance: Config, value: Any) -> None:
        instance.__dict__[self.name] = self.coerce(value, type(instance).__name__)

    def __repr__(self) -> str:
        return f"Field({self.type_label()}, default={self.default!r}, name={self.name!r})"


# ---------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted_key, value)`` for every leaf of a nested mapping."""
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r} under {prefix!r}")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _prepare(
    values: Mapping[str, Any] | None, dotted: Mapping[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """Merge nested and dotted keys into ordered ``(dotted_key, value)`` assignments."""
    merged: dict[str, Any] = {}
    if values is not None:
        if not isinstance(values, Mapping):
            raise ConfigError(f"config values must be a mapping, got {type(values).__name__}")
        merged.update(values)
    merged.update(dotted or {})
    items = list(_flatten(merged))
    # Derived paths (kernel.active) depend on selectors such as kernel.name: apply them last.
    items.sort(key=lambda kv: any(s in _DERIVED_SEGMENTS for s in kv[0].split(".")))
    return items


def _wrap(text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, width=96, initial_indent=indent, subsequent_indent=indent)


class Config:
    """Base of every config class: typed fields, validation, conversion and description.

    Subclasses declare their fields as class attributes holding :class:`Field` objects.
    Keyword arguments of the constructor set fields (or dotted paths) after the defaults.

    Raises
    ------
    ConfigError
        On an unknown field name or a value of the wrong type.
    """

    _fields: ClassVar[Mapping[str, Field[Any]]] = MappingProxyType({})
    #: Fields that another field's value makes ignored, ``{field: (other, value, why)}``:
    #: setting one then gets a note (:func:`~.tomlfile.overridden_fields`), not silence.
    OVERRIDDEN_BY: ClassVar[Mapping[str, tuple[str, Any, str]]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: dict[str, Field[Any]] = {}
        # Walk from the base down so an override keeps the base's position in the order.
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                if isinstance(attr, Field):
                    fields[name] = attr
        cls._fields = MappingProxyType(fields)

    def __init__(self, **values: Any) -> None:
        for name, field in self._fields.items():
            self.__dict__[name] = field.make_default()
        if values:
            self._assign(_prepare(values))

    # -- attribute access -----------------------------------------------------------------

    @classmethod
    def fields(cls) -> Mapping[str, Field[Any]]:
        """Read-only mapping of field name to :class:`Field`, in declaration order."""
        return cls._fields

    @classmethod
    def _unknown(cls, name: str) -> str:
        message = f"unknown config field {name!r} in {cls.__name__}"
        close = difflib.get_close_matches(name, list(cls._fields), n=1)
        if not close:
            lowered = {n.lower(): n for n in cls._fields}
            close = [lowered[name.lower()]] if name.lower() in lowered else []
        if close:
            return message + f"; did you mean {close[0]!r}?"
        return message + f"; known fields: {', '.join(cls._fields)}"

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields:
            if isinstance(getattr(type(self), name, None), property):
                raise ConfigError(
                    f"{name!r} of {type(self).__name__} is derived; set it via "
                    f"the fields it is derived from"
                )
            raise ConfigError(self._unknown(name))
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise ConfigError(f"config fields cannot be deleted ({name!r} of {type(self).__name__})")

    def _member(self, segment: str) -> str:
        """Map a path segment to a stored field name (hook for derived members)."""
        return segment

    def _resolve(self, path: str) -> tuple[Config, str]:
        """Return the config holding the last field of a dotted path, and that field's name."""
        if not isinstance(path, str) or not path:
            raise ConfigError(f"config key must be a non-empty dotted string, got {path!r}")
        parts = path.split(".")
        node: Config = self
        for i, part in enumerate(parts):
            name = node._member(part)
            if name not in node._fields:
                raise ConfigError(f"config key {path!r}: {node._unknown(part)}")
            if i == len(parts) - 1:
                return node, name
            if not node._fields[name].is_config:
                raise ConfigError(
                    f"config key {path!r}: {'.'.join(parts[: i + 1])!r} is a field of type "
                    f"{node._fields[name].type_label()}, not a sub-config"
                )
            node = getattr(node, name)
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, path: str) -> Any:
        """Return the value at a dotted path, e.g. ``"kernel.active.kernelSize"``."""
        node, name = self._resolve(path)
        return getattr(node, name)

    def _assign(self, items: list[tuple[str, Any]]) -> None:
        for path, value in items:
            node, name = self._resolve(path)
            field = node._fields[name]
            if field.is_config and isinstance(value, Mapping):
                continue  # an empty table: nothing to change (non-empty ones were flattened)
            try:
                setattr(node, name, value)
            except ConfigError as exc:
                raise ConfigError(f"config key {path!r}: {exc}") from None

    def update(self, values: Mapping[str, Any] | None = None, /, **dotted: Any) -> None:
        """Set several fields at once from nested mappings and/or dotted keys.

        Parameters
        ----------
        values : mapping, optional
            Nested mapping (``{"kernel": {"name": "DF"}}``) or dotted keys
            (``{"kernel.active.kernelSize": 25}``), or a mix of both.
        **dotted
            More keys; dotted ones can be given with ``**{"a.b": 1}``.

        Notes
        -----
        A path through ``kernel.active`` refers to the selected kernel config *after* any
        ``kernel.name`` in the same call is applied, whatever the order of the keys. The
        update is all-or-nothing: on error the config is left unchanged.

        Raises
        ------
        ConfigError
            Naming the key path of an unknown field or a badly typed value.
        """
        items = _prepare(values, dotted)
        self.copy()._assign(items)  # dry run, so that a failure leaves self untouched
        self._assign(items)

    def set(self, path: str, value: Any) -> None:
        """Set one field by dotted path; a mapping value updates a sub-config in place."""
        self.update({path: value})

    # -- validation -----------------------------------------------------------------------

    def validate(self) -> None:
        """Check ranges and consistency of every field (nested configs included).

        Raises
        ------
        ConfigError
            Naming the first offending field path, its value and the rule.
        """
        self._validate("")

    def _validate(self, prefix: str) -> None:
        for name, field in self._fields.items():
            value = getattr(self, name)
            if field.is_config:
                value._validate(f"{prefix}{name}.")
            else:
                field.check_choice(value, f"config field {prefix}{name!s}")
        self._check(prefix)

    def _check(self, prefix: str) -> None:
        """Range and consistency rules of this class (hook for subclasses)."""

    def _invalid(self, prefix: str, name: str, rule: str) -> ConfigError:
        return ConfigError(f"invalid config {prefix}{name} = {getattr(self, name)!r}: {rule}")

    def _require(self, ok: bool, prefix: str, name: str, rule: str) -> None:
        if not ok:
            raise self._invalid(prefix, name, rule)

    # -- conversion -----------------------------------------------------------------------

    def to_dict(self, flat: bool = False) -> dict[str, Any]:
        """Return every field as plain Python data.

        Parameters
        ----------
        flat : bool, optional
            Return dotted keys (``{"kernel.AL.kernelSize": 21, ...}``) instead of nested dicts.

        Returns
        -------
        dict
            Nested dicts of builtin scalars, with list fields as lists.
        """
        out: dict[str, Any] = {}
        for name, field in self._fields.items():
            value = getattr(self, name)
            if field.is_config:
                out[name] = value.to_dict()
            elif isinstance(value, tuple):
                out[name] = list(value)
            else:
                out[name] = value
        return dict(_flatten(out)) if flat else out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Self | None = None) -> Self:
        """Build a config from defaults updated by a nested or dotted-key mapping.

        Parameters
        ----------
        data : mapping
            Nested tables or dotted keys of the fields to set.
        base : Config, optional
            The values the fields not in ``data`` keep (a copy is updated); default:
            the class's defaults.

        Raises
        ------
        ConfigError
            Naming the key path of an unknown field or a badly typed value.
        """
        config = cls() if base is None else base.copy()
        config._assign(_prepare(data))
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], base: Self | None = None) -> Self:
        """Read a config from a ``.toml`` or ``.json`` file (fields not given keep defaults).

        ``base`` gives the values of the fields the file does not set (default: the
        class's defaults). The result is not validated; call :meth:`validate`.

        Raises
        ------
        ConfigError
            If the file cannot be read or parsed, or names an unknown key or a badly typed
            value; the message names the file and the key.
        """
        file = Path(path)
        suffix = file.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise ConfigError(
                f"config file {str(file)!r}: unknown format {suffix!r}; use .toml or .json"
            )
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(file)!r}: {exc}") from exc
        try:
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            kind = suffix[1:].upper()
            raise ConfigError(f"config file {str(file)!r} is not valid {kind}: {exc}") from exc
        except RecursionError:
            data = None  # nested past what the parser can hold: refused just below
        depth = nesting_depth(data)
        if data is None or depth > MAX_NESTING:
            raise ConfigError(
                f"config file {str(file)!r} nests tables {'too' if data is None else depth} "
                f"deep; a config is at most {MAX_NESTING} tables deep"
            )
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(file)!r} must hold a table of fields, got {type(data).__name__}"
            )
        try:
            return cls.from_dict(data, base)
        except ConfigError as exc:
            raise ConfigError(f"config file {str(file)!r}: {exc}") from None

    def to_file(self, path: str | os.PathLike[str]) -> None:
        """Write every field to a ``.json`` or ``.toml`` file (chosen by the extension).

        Raises
        ------
        ConfigError
            If the extension is neither ``.json`` nor ``.toml``.
        """
        file = Path(path)
        suffix = file.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif suffix == ".toml":
            text = toml_dumps(self.to_dict())
        else:
            raise ConfigError(
                f"config file {str(file)!r}: unknown format {suffix!r}; use .toml or .json"
            )
        file.write_text(text, encoding="utf-8")

    def describe(self, prefix: str = "") -> str:
        """Return every field path with its type, value, doc string and choices.

        Parameters
        ----------
        prefix : str, optional
            Prepended to every path (used for nested configs).
        """
        lines: list[str] = []
        for name, field in self._fields.items():
            path = f"{prefix}{name}"
            value = getattr(self, name)
            if field.is_config:
                lines.append(f"{path}: {field.type_label()}")
                lines.extend(_wrap(field.doc))
                lines.append(value.describe(prefix=path + "."))
                continue
            lines.append(f"{path} = {value!r}  [{field.type_label()}]")
            lines.extend(_wrap(field.doc))
            for choice, meaning in (field.choices or {}).items():
                lines.extend(_wrap(f"{choice!r}: {meaning}", indent="      - ")[:1])
                lines.extend(_wrap(f"{choice!r}: {meaning}", indent="        ")[1:])
        return "\n".join(lines)

    # -- value semantics ------------------------------------------------------------------

    def copy(self) -> Self:
        """Return an independent deep copy."""
        new = type(self)()
        new._assign(list(_flatten(self.to_dict())))
        return new

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        default = type(self)()
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name in self._fields
            if getattr(self, name) != getattr(default, name)
        ]
        return f"{type(self).__name__}({', '.join(changed)})"
