"""Configuration of kernel building: every field of ip_diffim's MakeKernelTask config.

The classes mirror LSST ``ip_diffim``'s ``psfMatch`` / ``makeKernel`` configs so that users
who know those field names can use them unchanged:

* :class:`PsfMatchConfigAL` and :class:`PsfMatchConfigDF` hold the Alard-Lupton and the
  delta-function kernel settings, both built on the shared :class:`PsfMatchConfig`, with the
  sub-configs :class:`WarpingConfig`, :class:`DetectionConfig` and
  :class:`AfwBackgroundConfig`;
* :class:`KernelChoice` holds both and selects one (``kernel.name``, ``kernel.active``);
* :class:`MakeKernelConfig` is the top level, adding the coarse source detection and
  measurement used when no sources are supplied.

Every field is typed and documented. Assignment checks the type (and the allowed choices) at
once; range and consistency rules are checked by ``validate()``. Misspelt field names are
refused with a suggestion. Configs convert to and from nested or dotted-key dicts, TOML and
JSON files.

Examples
--------
>>> config = MakeKernelConfig()
>>> config.kernel.name = "DF"
>>> config.set("kernel.active.kernelSize", 25)
>>> config.kernel.DF.kernelSize
25
>>> config.validate()
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

from .errors import ConfigError

__all__ = [
    "Field",
    "Config",
    "DetectionConfig",
    "WarpingConfig",
    "AfwBackgroundConfig",
    "PsfMatchConfig",
    "PsfMatchConfigAL",
    "PsfMatchConfigDF",
    "KernelChoice",
    "SelectDetectionConfig",
    "SelectMeasurementConfig",
    "MakeKernelConfig",
]

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
            text = _toml_dumps(self.to_dict())
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


def _toml_dumps(data: Mapping[str, Any]) -> str:
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


# ---------------------------------------------------------------------------------------
# Sub-configs of PsfMatchConfig
# ---------------------------------------------------------------------------------------


class DetectionConfig(Config):
    """Detection of footprints that become kernel candidates, and the size of their stamps."""

    detThreshold = Field(
        float, 10.0, "Footprint detection threshold, in the units set by detThresholdType."
    )
    detThresholdType = Field(
        str,
        "pixel_stdev",
        "How detThreshold is interpreted.",
        choices={
            "value": "as a pixel value",
            "stdev": "in units of the standard deviation of the image plane",
            "variance": "in units of the variance of the image plane",
            "pixel_stdev": "in units of each pixel's own sigma, from the variance plane",
        },
    )
    detOnTemplate = Field(
        bool,
        True,
        "Detect on the template (the image that is convolved) when True, on the science "
        "image when False.",
    )
    badMaskPlanes = Field(
        tuple,
        ("NO_DATA", "EDGE", "SAT"),
        "A footprint touching any of these mask planes is not used. Usual names: NO_DATA "
        "EDGE SAT BAD CR INTRP.",
        item_type=str,
    )
    fpNpixMin = Field(int, 5, "Fewest pixels a footprint may have to be accepted.")
    fpNpixMax = Field(
        int,
        500,
        "Most pixels a footprint may have to be accepted; larger ones make the stamp "
        "convolutions slow.",
    )
    fpGrowKernelScaling = Field(
        float,
        1.0,
        "When > 0, the stamp half-width is this multiple of the final kernel size, clipped "
        "to [fpGrowMin, fpGrowMax]: with 1.0, one kernel width of pixels remains after the "
        "template stamp is convolved with the basis. When 0, fpGrowPix is used.",
    )
    fpGrowPix = Field(
        int,
        30,
        "Fixed stamp half-width in pixels, used when fpGrowKernelScaling is 0. Smaller is "
        "faster, but a stamp hardly larger than the kernel leaves the kernel sum poorly "
        "constrained.",
    )
    fpGrowMin = Field(int, 20, "Smallest stamp half-width (pixels) derived from the kernel size.")
    fpGrowMax = Field(int, 40, "Largest stamp half-width (pixels) derived from the kernel size.")

    def stamp_half_width(self, kernel_size: int) -> int:
        """Return the half-width in pixels of the stamp cut around each candidate.

        Parameters
        ----------
        kernel_size : int
            Final kernel size (pixels on a side).

        Returns
        -------
        int
            ``clip(round(fpGrowKernelScaling * kernel_size), fpGrowMin, fpGrowMax)`` when
            ``fpGrowKernelScaling > 0``, else ``fpGrowPix``.
        """
        if self.fpGrowKernelScaling > 0:
            grown = int(round(self.fpGrowKernelScaling * kernel_size))
            return int(min(max(grown, self.fpGrowMin), self.fpGrowMax))
        return self.fpGrowPix

    def _check(self, prefix: str) -> None:
        self._require(self.detThreshold > 0, prefix, "detThreshold", "must be > 0")
        self._require(self.fpNpixMin >= 1, prefix, "fpNpixMin", "must be >= 1")
        self._require(
            self.fpNpixMax >= self.fpNpixMin,
            prefix,
            "fpNpixMax",
            f"must be >= fpNpixMin ({self.fpNpixMin})",
        )
        self._require(
            self.fpGrowKernelScaling >= 0,
            prefix,
            "fpGrowKernelScaling",
            "must be >= 0 (0: use fpGrowPix)",
        )
        self._require(self.fpGrowPix >= 1, prefix, "fpGrowPix", "must be >= 1")
        self._require(self.fpGrowMin >= 1, prefix, "fpGrowMin", "must be >= 1")
        self._require(
            self.fpGrowMax >= self.fpGrowMin,
            prefix,
            "fpGrowMax",
            f"must be >= fpGrowMin ({self.fpGrowMin})",
        )


_INTERPOLATIONS = {
    "nearest-neighbor": "nearest pixel (interpolation order 0)",
    "bilinear": "bilinear (order 1)",
    "biquadratic": "biquadratic (order 2)",
    "bicubic": "bicubic (order 3)",
}


class WarpingConfig(Config):
    """Resampling of an Exposure template onto the science image's pixel grid."""

    warpingKernelName = Field(
        str,
        "bilinear",
        "Interpolation of the image and variance planes (the orders that "
        "reproject.reproject_interp supports).",
        choices=_INTERPOLATIONS,
    )
    maskWarpingKernelName = Field(
        str,
        "nearest-neighbor",
        "Interpolation of the mask planes; nearest-neighbor keeps each bit where it was.",
        choices=_INTERPOLATIONS,
    )
    growFullMask = Field(
        tuple,
        ("NO_DATA",),
        "Mask planes set on every output pixel whose interpolation draws on a pixel that has "
        "them, so these planes grow to the full warped footprint.",
        item_type=str,
    )
    doAlign = Field(
        bool,
        True,
        "Warp an Exposure template onto the science WCS before fitting; when False the two "
        "Exposures are taken as already aligned.",
    )


class AfwBackgroundConfig(Config):
    """Mesh background estimate, subtracted first when ``useAfwBackground`` is True."""

    binSize = Field(
        int, 128, "Side in pixels of the mesh cells in which the background is measured."
    )
    filterSize = Field(
        int,
        3,
        "Size of the median filter run over the mesh of cell values (odd; 1: no filtering).",
    )
    statistic = Field(
        str,
        "MEANCLIP",
        "Statistic of the unmasked pixels of a cell.",
        choices={"MEANCLIP": "sigma-clipped mean", "MEDIAN": "median", "MEAN": "plain mean"},
    )
    ignoredPixelMask = Field(
        tuple,
        ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA", "SAT"),
        "Pixels with any of these mask planes are left out of the background estimate.",
        item_type=str,
    )

    def _check(self, prefix: str) -> None:
        self._require(self.binSize >= 1, prefix, "binSize", "must be >= 1")
        self._require(
            self.filterSize >= 1 and self.filterSize % 2 == 1,
            prefix,
            "filterSize",
            "must be odd and >= 1",
        )


# ---------------------------------------------------------------------------------------
# Kernel configs
# ---------------------------------------------------------------------------------------

_ALARD_LUPTON = "alard-lupton"
_DELTA_FUNCTION = "delta-function"
_MAX_SPATIAL_ORDER = 6


class PsfMatchConfig(Config):
    """Settings shared by both kernel bases: size, spatial model, candidate rejection."""

    #: The basis a subclass stands for; ``None`` for the base class.
    _basis: ClassVar[str | None] = None

    warpingConfig = Field(WarpingConfig, doc="Alignment of Exposures onto a common pixel grid.")
    detectionConfig = Field(
        DetectionConfig, doc="Detection of candidate sources and the size of their stamps."
    )
    afwBackgroundConfig = Field(
        AfwBackgroundConfig, doc="Mesh background fit, used when useAfwBackground is True."
    )
    useAfwBackground = Field(
        bool,
        False,
        "Subtract a mesh background from each image before fitting, instead of fitting the "
        "differential background with the kernel.",
    )
    fitForBackground = Field(
        bool,
        False,
        "Fit a differential background (with its cross terms against the kernel) along with "
        "the kernel.",
    )
    kernelBasisSet = Field(
        str,
        _ALARD_LUPTON,
        "Kind of kernel basis; must match the config class (AL or DF).",
        choices={
            _ALARD_LUPTON: "Gaussians times polynomials; the first term does not vary "
            "spatially, so the kernel sum is conserved; PCA is usually not wanted.",
            _DELTA_FUNCTION: "one basis function per kernel pixel; consider regularization, "
            "and PCA (usePcaForSpatialKernel) which also conserves the kernel sum.",
        },
        aliases={"alardlupton": _ALARD_LUPTON, "deltafunction": _DELTA_FUNCTION},
    )
    kernelSize = Field(
        int,
        21,
        "Side of the kernel in pixels (odd). When scaleByFwhm is True it is recomputed from "
        "the PSF widths with kernelSizeFwhmScaling.",
    )
    scaleByFwhm = Field(
        bool, True, "Derive kernelSize and the Alard-Lupton Gaussian widths from the PSF FWHM."
    )
    kernelSizeFwhmScaling = Field(
        float,
        6.0,
        "With scaleByFwhm, the kernel size is this multiple of the widest Alard-Lupton sigma.",
    )
    kernelSizeMin = Field(int, 21, "Smallest kernel size (pixels, odd) that scaling may give.")
    kernelSizeMax = Field(int, 35, "Largest kernel size (pixels, odd) that scaling may give.")
    spatialModelType = Field(
        str,
        "chebyshev1",
        "Functions of (x, y) used for the spatial variation of kernel and background.",
        choices={
            "chebyshev1": "Chebyshev polynomials of the first kind",
            "polynomial": "ordinary x, y polynomials",
        },
    )
    spatialKernelOrder = Field(
        int, 2, "Polynomial order of the kernel's variation across the image."
    )
    spatialBgOrder = Field(
        int, 1, "Polynomial order of the differential background's variation across the image."
    )
    sizeCellX = Field(int, 128, "Width in pixels of the spatial cells that spread candidates.")
    sizeCellY = Field(int, 128, "Height in pixels of the spatial cells that spread candidates.")
    nStarPerCell = Field(
        int, 5, "Candidates per spatial cell used in the spatial fit (-1: all of them)."
    )
    maxSpatialIterations = Field(
        int,
        3,
        "Most rounds of rejecting bad candidates and refitting the spatial model (1 to 5).",
    )
    usePcaForSpatialKernel = Field(
        bool,
        False,
        "Replace the basis by the principal components of the per-candidate kernels before "
        "the spatial fit. Mostly for delta-function kernels; the first component then does "
        "not vary spatially and the kernel sum is conserved.",
    )
    subtractMeanForPca = Field(
        bool, True, "Subtract the mean kernel before the principal component analysis."
    )
    numPrincipalComponents = Field(
        int, 5, "Principal components kept for the basis, the mean kernel included if used."
    )
    singleKernelClipping = Field(
        bool, True, "Reject candidates whose own kernel fit leaves poor residuals."
    )
    kernelSumClipping = Field(
        bool, True, "Reject candidates whose kernel sum is an outlier of the ensemble."
    )
    spatialKernelClipping = Field(
        bool, True, "Reject candidates poorly fit by the spatial model, then refit."
    )
    checkConditionNumber = Field(
        bool,
        False,
        "Mark a candidate bad when its normal matrix's condition number exceeds "
        "maxConditionNumber (also bounds the inverse in the biased-risk estimate). Turn off, "
        "or raise the limit, when deconvolving.",
    )
    badMaskPlanes = Field(
        tuple,
        ("NO_DATA", "EDGE", "SAT"),
        "Mask planes whose pixels are left out of difference-image statistics. Usual names: "
        "NO_DATA EDGE SAT BAD CR INTRP; any plane name is allowed.",
        item_type=str,
    )
    candidateResidualMeanMax = Field(
        float,
        0.25,
        "Reject a candidate when the mean of its residuals divided by their sigma exceeds "
        "this (per-candidate and spatial fits).",
    )
    candidateResidualStdMax = Field(
        float,
        1.50,
        "Reject a candidate when the standard deviation of its residuals divided by their "
        "sigma exceeds this (per-candidate and spatial fits).",
    )
    useCoreStats = Field(
        bool,
        False,
        "Compute residual statistics on the stamp core (candidateCoreRadius) only, not the "
        "whole stamp; probably wrong when deconvolving.",
    )
    candidateCoreRadius = Field(
        int,
        3,
        "Half-width of the stamp core, (2*radius)**2 pixels, used for core statistics and "
        "for ranking candidates by their core flux.",
    )
    maxKsumSigma = Field(
        float,
        3.0,
        "Kernel sums further than this many standard deviations from the ensemble mean are "
        "rejected (variable or saturated sources).",
    )
    maxConditionNumber = Field(
        float, 5.0e7, "Largest condition number of a well-conditioned candidate matrix."
    )
    conditionNumberType = Field(
        str,
        "EIGENVALUE",
        "How condition numbers are computed.",
        choices={"EIGENVALUE": "from eigenvalues (faster)", "SVD": "from singular values"},
    )
    maxSpatialConditionNumber = Field(
        float, 1.0e10, "Largest condition number of a well-conditioned spatial matrix."
    )
    iterateSingleKernel = Field(
        bool,
        False,
        "Refit each candidate with a variance estimated from the first fit; mostly useful "
        "when convolving a single-epoch image.",
    )
    constantVarianceWeighting = Field(
        bool,
        True,
        "Weight the per-candidate fit by a constant variance (often better for bright "
        "stars) rather than by the variance plane.",
    )
    calculateKernelUncertainty = Field(
        bool,
        False,
        "Compute kernel and background uncertainties of each candidate from the inverse "
        "normal matrix (unreliable with regularization).",
    )
    useBicForKernelBasis = Field(
        bool,
        False,
        "Choose how many basis functions to keep by the Bayesian Information Criterion.",
    )
    fwhmExposureGrid = Field(
        int, 10, "Grid size (per axis) on which the PSF FWHM is averaged over an exposure."
    )
    fwhmExposureBuffer = Field(
        float,
        0.05,
        "Fraction of the image left out on every side of that grid (0 <= buffer < 0.5).",
    )

    def _check(self, prefix: str) -> None:
        req = self._require
        if self._basis is not None and self.kernelBasisSet != self._basis:
            other = "DF" if self._basis == _ALARD_LUPTON else "AL"
            raise self._invalid(
                prefix,
                "kernelBasisSet",
                f"{type(self).__name__} is the {self._basis!r} kernel config; "
                f"select kernel.name = {other!r} for the other basis",
            )
        req(
            self.kernelSize >= 3 and self.kernelSize % 2 == 1,
            prefix,
            "kernelSize",
            "must be odd and >= 3",
        )
        for name in ("kernelSizeMin", "kernelSizeMax"):
            value = getattr(self, name)
            req(value >= 3 and value % 2 == 1, prefix, name, "must be odd and >= 3")
        req(
            self.kernelSizeMin <= self.kernelSizeMax,
            prefix,
            "kernelSizeMin",
            f"must be <= kernelSizeMax ({self.kernelSizeMax})",
        )
        req(self.kernelSizeFwhmScaling > 0, prefix, "kernelSizeFwhmScaling", "must be > 0")
        for name in ("spatialKernelOrder", "spatialBgOrder"):
            req(
                0 <= getattr(self, name) <= _MAX_SPATIAL_ORDER,
                prefix,
                name,
                f"must be in 0..{_MAX_SPATIAL_ORDER}",
            )
        for name in ("sizeCellX", "sizeCellY"):
            req(getattr(self, name) >= 8, prefix, name, "must be >= 8 pixels")
        req(
            self.nStarPerCell == -1 or self.nStarPerCell >= 1,
            prefix,
            "nStarPerCell",
            "must be -1 (all candidates) or >= 1",
        )
        req(
            1 <= self.maxSpatialIterations <= 5,
            prefix,
            "maxSpatialIterations",
            "must be in 1..5",
        )
        req(self.numPrincipalComponents >= 1, prefix, "numPrincipalComponents", "must be >= 1")
        for name in ("candidateResidualMeanMax", "candidateResidualStdMax", "maxKsumSigma"):
            req(getattr(self, name) > 0, prefix, name, "must be > 0")
        req(self.candidateCoreRadius >= 1, prefix, "candidateCoreRadius", "must be >= 1")
        for name in ("maxConditionNumber", "maxSpatialConditionNumber"):
            req(getattr(self, name) > 1, prefix, name, "must be > 1")
        req(self.fwhmExposureGrid >= 1, prefix, "fwhmExposureGrid", "must be >= 1")
        req(
            0 <= self.fwhmExposureBuffer < 0.5,
            prefix,
            "fwhmExposureBuffer",
            "must satisfy 0 <= buffer < 0.5",
        )
        if (
            self.kernelBasisSet == _DELTA_FUNCTION
            and self.useBicForKernelBasis
            and not self.usePcaForSpatialKernel
        ):
            raise self._invalid(
                prefix,
                "useBicForKernelBasis",
                "with the delta-function basis, BIC selects among principal components, so "
                "it requires usePcaForSpatialKernel = True",
            )


class PsfMatchConfigAL(PsfMatchConfig):
    """Kernel settings for the Alard-Lupton basis: Gaussians times polynomials."""

    _basis: ClassVar[str | None] = _ALARD_LUPTON

    kernelBasisSet = PsfMatchConfig.kernelBasisSet.with_default(_ALARD_LUPTON)

    alardNGauss = Field(int, 3, "Number of Gaussians in the basis.")
    alardSigGauss = Field(
        tuple,
        (0.7, 1.5, 3.0),
        "Sigma of each Gaussian in pixels (FWHM = 2.35 sigma); alardNGauss values.",
        item_type=float,
    )
    alardDegGauss = Field(
        tuple,
        (4, 2, 2),
        "Degree of the polynomial multiplying each Gaussian; alardNGauss values.",
        item_type=int,
    )
    alardMinSig = Field(
        float, 0.7, "Smallest Gaussian sigma (pixels) when the widths are scaled by FWHM."
    )
    alardGaussBeta = Field(
        float, 2.0, "Ratio of successive Gaussian sigmas when the widths are scaled by FWHM."
    )
    alardNGaussDeconv = Field(int, 3, "Number of Gaussians when the fit must deconvolve.")
    alardDegGaussDeconv = Field(
        int, 3, "Polynomial degree of every Gaussian when the fit must deconvolve."
    )
    alardMinSigDeconv = Field(
        float,
        0.4,
        "Smallest Gaussian sigma (pixels) when deconvolving; below alardMinSig because it "
        "enters only indirectly.",
    )

    def _check(self, prefix: str) -> None:
        super()._check(prefix)
        req = self._require
        req(self.alardNGauss >= 1, prefix, "alardNGauss", "must be >= 1")
        for name in ("alardSigGauss", "alardDegGauss"):
            req(
                len(getattr(self, name)) == self.alardNGauss,
                prefix,
                name,
                f"must have alardNGauss ({self.alardNGauss}) values",
            )
        req(all(s > 0 for s in self.alardSigGauss), prefix, "alardSigGauss", "sigmas must be > 0")
        req(
            all(d >= 0 for d in self.alardDegGauss),
            prefix,
            "alardDegGauss",
            "degrees must be >= 0",
        )
        for name in ("alardMinSig", "alardGaussBeta", "alardMinSigDeconv"):
            req(getattr(self, name) > 0, prefix, name, "must be > 0")
        req(self.alardNGaussDeconv >= 1, prefix, "alardNGaussDeconv", "must be >= 1")
        req(self.alardDegGaussDeconv >= 0, prefix, "alardDegGaussDeconv", "must be >= 0")


class PsfMatchConfigDF(PsfMatchConfig):
    """Kernel settings for the delta-function basis: one basis function per kernel pixel."""

    _basis: ClassVar[str | None] = _DELTA_FUNCTION

    kernelBasisSet = PsfMatchConfig.kernelBasisSet.with_default(_DELTA_FUNCTION)
    maxConditionNumber = PsfMatchConfig.maxConditionNumber.with_default(5.0e6)
    usePcaForSpatialKernel = PsfMatchConfig.usePcaForSpatialKernel.with_default(True)
    subtractMeanForPca = PsfMatchConfig.subtractMeanForPca.with_default(True)
    numPrincipalComponents = PsfMatchConfig.numPrincipalComponents.with_default(5)

    useRegularization = Field(
        bool, True, "Penalize roughness of the delta-function kernel (Tikhonov regularization)."
    )
    regularizationType = Field(
        str,
        "centralDifference",
        "Form of the roughness penalty.",
        choices={
            "centralDifference": "second derivative from a 2-D central-difference stencil",
            "forwardDifference": "derivatives of the orders in forwardRegularizationOrders, "
            "from forward differences",
        },
    )
    centralRegularizationStencil = Field(
        int,
        9,
        "Stencil of the central-difference penalty (centralDifference only).",
        choices={5: "the 4 nearest neighbours in x and y", 9: "all 8 neighbours, diagonals too"},
    )
    forwardRegularizationOrders = Field(
        tuple,
        (1, 2),
        "Derivative orders penalized by forwardDifference (each 0..3, no repeats).",
        item_type=int,
    )
    regularizationBorderPenalty = Field(
        float, 3.0, "Extra penalty on the kernel's border pixels (>= 0)."
    )
    lambdaType = Field(
        str,
        "absolute",
        "How the regularization strength lambda is chosen.",
        choices={
            "absolute": "lambda = lambdaValue",
            "relative": "lambda = lambdaValue times the default strength (trace ratio, "
            "Numerical Recipes 18.5.8)",
            "minimizeBiasedRisk": "scan lambda, keep the minimum of the biased risk estimate",
            "minimizeUnbiasedRisk": "scan lambda, keep the minimum of the unbiased risk estimate",
        },
    )
    lambdaValue = Field(float, 0.2, "Regularization strength for lambdaType 'absolute'.")
    lambdaScaling = Field(
        float,
        1e-4,
        "Fraction of the default strength (Numerical Recipes 18.5.8) used; 1e-4 or 1e-5 are "
        "typical.",
    )
    lambdaStepType = Field(
        str,
        "log",
        "Spacing of the lambda scan of the risk-minimizing lambdaTypes.",
        choices={
            "log": "lambdaMin/Max/Step are log10 values, e.g. -1.0, 2.0, 0.1",
            "linear": "lambdaMin/Max/Step are lambda values, e.g. 0.1, 100, 0.1",
        },
    )
    lambdaMin = Field(float, -1.0, "Start of the lambda scan (log10 for log steps).")
    lambdaMax = Field(float, 2.0, "End of the lambda scan (log10 for log steps).")
    lambdaStep = Field(float, 0.1, "Step of the lambda scan (in log10 for log steps).")

    def _check(self, prefix: str) -> None:
        super()._check(prefix)
        req = self._require
        orders = self.forwardRegularizationOrders
        req(len(orders) > 0, prefix, "forwardRegularizationOrders", "must not be empty")
        req(
            all(0 <= o <= 3 for o in orders),
            prefix,
            "forwardRegularizationOrders",
            "orders must be in 0..3",
        )
        req(
            len(set(orders)) == len(orders),
            prefix,
            "forwardRegularizationOrders",
            "orders must not repeat",
        )
        req(
            self.regularizationBorderPenalty >= 0,
            prefix,
            "regularizationBorderPenalty",
            "must be >= 0",
        )
        req(self.lambdaValue >= 0, prefix, "lambdaValue", "must be >= 0")
        req(self.lambdaScaling > 0, prefix, "lambdaScaling", "must be > 0")
        req(
            self.lambdaMin < self.lambdaMax,
            prefix,
            "lambdaMin",
            f"must be < lambdaMax ({self.lambdaMax})",
        )
        req(self.lambdaStep > 0, prefix, "lambdaStep", "must be > 0")
        if self.lambdaType.startswith("minimize") and self.lambdaStepType == "linear":
            req(
                self.lambdaMin > 0,
                prefix,
                "lambdaMin",
                "must be > 0 with linear steps (it is a lambda, not its log10)",
            )


class KernelChoice(Config):
    """Both kernel configs and the selection between them (``kernel.active``)."""

    name = Field(
        str,
        "AL",
        "Which kernel config is used; kernel.active refers to it.",
        choices={"AL": "Alard-Lupton basis (kernel.AL)", "DF": "delta-function basis (kernel.DF)"},
    )
    AL = Field(PsfMatchConfigAL, doc="Settings used when name is 'AL'.")
    DF = Field(PsfMatchConfigDF, doc="Settings used when name is 'DF'.")

    @property
    def active(self) -> PsfMatchConfigAL | PsfMatchConfigDF:
        """The selected kernel config (``AL`` or ``DF``, following :attr:`name`)."""
        return self.AL if self.name == "AL" else self.DF

    def _member(self, segment: str) -> str:
        return self.name if segment == "active" else segment

    def _validate(self, prefix: str) -> None:
        # Only the selected config has to make sense: the other one is never used.
        self._fields["name"].check_choice(self.name, f"config field {prefix}name")
        self.active._validate(f"{prefix}{self.name}.")


# ---------------------------------------------------------------------------------------
# Candidate selection and the top level
# ---------------------------------------------------------------------------------------


class SelectDetectionConfig(Config):
    """Coarse source detection, run when no kernel sources are supplied."""

    thresholdValue = Field(
        float, 5.0, "Detection threshold: signal-to-noise per pixel above the background rms."
    )
    minArea = Field(int, 5, "Fewest connected pixels above threshold that make a source.")
    deblendNThresh = Field(int, 32, "Number of deblending thresholds.")
    deblendContrast = Field(
        float, 0.005, "Smallest flux fraction a branch needs to be deblended (0..1)."
    )
    maxSources = Field(int, 2000, "Most detections kept, brightest first (> 0).")

    def _check(self, prefix: str) -> None:
        req = self._require
        req(self.thresholdValue > 0, prefix, "thresholdValue", "must be > 0")
        req(self.minArea >= 1, prefix, "minArea", "must be >= 1")
        req(self.deblendNThresh >= 1, prefix, "deblendNThresh", "must be >= 1")
        req(0 <= self.deblendContrast <= 1, prefix, "deblendContrast", "must be in [0, 1]")
        req(self.maxSources > 0, prefix, "maxSources", "must be > 0")


class SelectMeasurementConfig(Config):
    """Measurement and vetting of detected sources before they become kernel candidates."""

    apertureRadius = Field(
        float, 5.0, "Aperture radius in pixels for the S/N and the flux used for ranking."
    )
    minSnr = Field(float, 10.0, "Reject a source whose aperture S/N is below this in either image.")
    maxEllipticity = Field(
        float, 0.3, "Reject a source more elongated than this ellipticity (0..1)."
    )
    isolationRadius = Field(
        float,
        0.0,
        "Reject a source with a neighbour closer than this many pixels (0: derived from the "
        "stamp size).",
    )
    saturationFraction = Field(
        float,
        0.9,
        "Reject a source whose peak exceeds this fraction of a known saturation level.",
    )

    def _check(self, prefix: str) -> None:
        req = self._require
        req(self.apertureRadius > 0, prefix, "apertureRadius", "must be > 0")
        req(self.minSnr >= 0, prefix, "minSnr", "must be >= 0")
        req(0 <= self.maxEllipticity <= 1, prefix, "maxEllipticity", "must be in [0, 1]")
        req(self.isolationRadius >= 0, prefix, "isolationRadius", "must be >= 0")
        req(
            0 < self.saturationFraction <= 1,
            prefix,
            "saturationFraction",
            "must be in (0, 1]",
        )


class MakeKernelConfig(Config):
    """Configuration of MakeKernelTask: the kernel choice and candidate selection.

    Examples
    --------
    >>> config = MakeKernelConfig.from_dict({"kernel.name": "DF", "kernel.active.kernelSize": 25})
    >>> config.kernel.active.kernelSize
    25
    """

    kernel = Field(KernelChoice, doc="Kernel basis choice and the settings of each basis.")
    selectDetection = Field(
        SelectDetectionConfig,
        doc="Initial detection of stars to fit the kernel on, when no sources are given.",
    )
    selectMeasurement = Field(
        SelectMeasurementConfig,
        doc="Measurement and vetting of those detections before they become candidates.",
    )

    @classmethod
    def default_subtraction(cls) -> MakeKernelConfig:
        """Return the config that ip_diffim's Alard-Lupton subtraction task uses.

        That is the Alard-Lupton basis with a fitted differential background of spatial
        order 2 and a kernel of spatial order 1. It is the default of every subtraction
        (``diffkernel subtract``, ``batch``, ``demo``, :func:`diffkernel.graph.run_pair`),
        since their inputs may hold their sky; :class:`MakeKernelTask` keeps the
        specification's defaults (no background fitted). The delta-function settings
        get the same background (fitted, order 2), so that choosing ``kernel.name =
        "DF"`` in a config file does not silently drop it.
        """
        config = cls()
        config.kernel.name = "AL"
        config.kernel.AL.spatialKernelOrder = 1
        for kernel in (config.kernel.AL, config.kernel.DF):
            kernel.fitForBackground = True
            kernel.spatialBgOrder = 2
        return config
