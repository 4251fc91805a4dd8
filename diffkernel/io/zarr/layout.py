"""The on-disk layout of diffkernel's Zarr stores (version 1), and the checks that read it.

Image group
-----------
An *image group* is a Zarr v3 group (the root of a store directory, or a sub-group such
as ``pair.zarr/science``) holding three 2-D arrays of one shape on one tile grid (square
chunks of ``chunks`` pixels, clipped to the shape):

``image``, ``variance``
    float32 when every value is exactly representable in float32, else float64, so that
    storing is lossless; Blosc/LZ4 with byte shuffle.
``mask``
    int32 bit mask; Zstandard level 1.

Its attribute ``"diffkernel"`` holds ``layout`` (1), ``kind`` (``"image"``), ``uid`` (a new
UUID on every write: it keys the chunk cache), ``shape``, ``chunks``, ``mask_planes``,
``wcs`` (the cards of ``wcs.to_header(relax=True)``, or null), ``origin`` (LSST-style
``[x0, y0]``), ``psf_fwhm`` (a constant, or null), ``meta`` (the str/int/float/bool entries of
``Exposure.meta``) and ``created`` (ISO UTC time). Image groups are written by
:mod:`diffkernel.io.zarr.write` and read by :class:`diffkernel.io.zarr.image.ZarrImage`;
result stores (:mod:`diffkernel.io.zarr.results`) hold one and groups of other kinds.

Attributes
----------
Every group diffkernel writes carries the attribute :data:`ATTR_KEY` with at least
``layout`` (:data:`LAYOUT_VERSION`) and ``kind``; :func:`group_info` checks both before
anything else is read. JSON attributes cannot hold NaN or infinities: :func:`json_safe`
stores them as null, except where a value must survive exactly (the solution's condition
number and bounding boxes), which :func:`encode_float` writes as Zarr v3 writes fill values
(``"NaN"``, ``"Infinity"``, ``"-Infinity"``).
"""

from __future__ import annotations

import datetime
import math
import operator
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ...errors import InputError, StoreError
from ..header import wcs_header

__all__ = [
    "ATTR_KEY",
    "DEFAULT_CHUNKS",
    "IMAGE_ARRAYS",
    "LAYOUT_VERSION",
    "STORE_ERRORS",
    "Chunks",
    "PathLike",
    "check_box",
    "check_group_name",
    "check_pair",
    "decode_float",
    "encode_float",
    "group_info",
    "group_label",
    "json_safe",
    "member_array",
    "open_root",
    "require_attr",
    "sub_group",
    "tile_shape",
    "utc_now",
    "wcs_cards",
    "wcs_from_cards",
]

#: Default side of the square tiles (Zarr chunks) of an image group, in pixels.
DEFAULT_CHUNKS = 512
#: Name of the attribute holding diffkernel's description of a group.
ATTR_KEY = "diffkernel"
#: Version of the on-disk layout written and read here.
LAYOUT_VERSION = 1
#: The arrays of an image group, in the order they are read and written.
IMAGE_ARRAYS = ("image", "variance", "mask")
#: What zarr raises for a path that is not a readable Zarr v3 store or array.
STORE_ERRORS = (OSError, ValueError, KeyError, TypeError)

#: A path argument.
PathLike = str | os.PathLike
#: A tile side, or a ``(cy, cx)`` pair.
Chunks = int | Sequence[int]


# --------------------------------------------------------------------------- JSON


def json_safe(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types for a Zarr attribute.

    Numpy scalars and arrays become Python numbers and (nested) lists, tuples and sets
    become lists, mapping keys become strings, paths and dates become strings; NaN and
    infinities become None, since JSON has no such numbers. Anything else is stored as its
    ``str()``.

    Parameters
    ----------
    obj : object
        Value to convert.

    Returns
    -------
    object
        None, bool, int, float, str, list or dict, recursively.
    """
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(key): json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    if isinstance(obj, set | frozenset):
        return [json_safe(value) for value in sorted(obj, key=repr)]
    if type(obj) is np.ndarray:
        return json_safe(obj.tolist())
    if isinstance(obj, datetime.date | datetime.time):
        return obj.isoformat()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def encode_float(value: float) -> float | str:
    """A float as JSON, exactly: non-finite values as Zarr v3 spells them.

    Parameters
    ----------
    value : float
        Any float, NaN and infinities included.

    Returns
    -------
    float or str
        ``value`` when finite, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.
    """
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def decode_float(value: float | str) -> float:
    """Inverse of :func:`encode_float` (``float`` reads ``"NaN"`` and ``"Infinity"``).

    Parameters
    ----------
    value : float or str
        As written by :func:`encode_float`.

    Returns
    -------
    float
    """
    return float(value)


def utc_now() -> str:
    """The current UTC time in ISO format, to the second, for ``created`` attributes.

    Returns
    -------
    str
    """
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- arguments


def group_label(path: Path, group: str | None) -> str:
    """How messages name an image group: ``store '<path>'`` or ``group 'g' of store ...``.

    Parameters
    ----------
    path : pathlib.Path
        Store directory.
    group : str or None
        Sub-group, or None for the store's root.

    Returns
    -------
    str
    """
    if group is None:
        return f"store {str(path)!r}"
    return f"group {group!r} of store {str(path)!r}"


def check_group_name(group: str) -> str:
    """A sub-group name, normalized (no leading, trailing or doubled ``/``).

    Parameters
    ----------
    group : str
        E.g. ``"science"`` or ``"pair/science"``.

    Returns
    -------
    str

    Raises
    ------
    InputError
        If ``group`` is not a string, is empty or has an empty, ``.`` or ``..`` part.
    """
    if not isinstance(group, str):
        raise InputError(f"group must be a string such as 'science', got {type(group).__name__}")
    parts = group.strip("/").split("/")
    if not group.strip("/") or any(part in ("", ".", "..") for part in parts):
        raise InputError(f"group {group!r} is not a valid group name (e.g. 'science')")
    return "/".join(parts)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def check_pair(value: Any, name: str, *, positive: bool) -> tuple[int, int]:
    """Two integers, such as a shape or an origin.

    Parameters
    ----------
    value : object
        What the caller passed.
    name : str
        The argument's name, for messages.
    positive : bool
        Require both to be at least 1.

    Returns
    -------
    (int, int)

    Raises
    ------
    InputError
        If ``value`` is not a pair of integers (bools refused), or not positive when
        required.
    """
    try:
        first, second = value
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a pair of integers, got {value!r}") from None
    pair = (_check_int(first, name), _check_int(second, name))
    if positive and min(pair) < 1:
        raise InputError(f"{name} must be positive, got {value!r}")
    return pair


def tile_shape(shape: tuple[int, int], chunks: Chunks) -> tuple[int, int]:
    """Chunk shape: square ``chunks`` (or a ``(cy, cx)`` pair), clipped to the shape.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny, nx)``.
    chunks : int or (int, int)
        Requested tile side(s) in pixels.

    Returns
    -------
    (int, int)

    Raises
    ------
    InputError
        If ``chunks`` is not a positive integer or a pair of them.
    """
    if isinstance(chunks, Sequence):
        cy, cx = check_pair(chunks, "chunks", positive=True)
    else:
        cy = cx = _check_int(chunks, "chunks")
        if cy < 1:
            raise InputError(f"chunks must be positive, got {chunks!r}")
    return max(1, min(cy, shape[0])), max(1, min(cx, shape[1]))


def check_box(box: tuple[Any, Any, Any, Any], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A region ``(y0, y1, x0, x1)`` of array indices, checked to lie inside ``shape``.

    Parameters
    ----------
    box : (int, int, int, int)
        ``y0, y1, x0, x1``, the region ``[y0:y1, x0:x1]``.
    shape : (int, int)
        Image shape ``(ny, nx)``.

    Returns
    -------
    (int, int, int, int)

    Raises
    ------
    InputError
        If a bound is not an integer, or the region is not inside the image.
    """
    y0, y1, x0, x1 = (_check_int(v, n) for v, n in zip(box, ("y0", "y1", "x0", "x1"), strict=True))
    ny, nx = shape
    if not (0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx):
        raise InputError(
            f"region [{y0}:{y1}, {x0}:{x1}] is outside the image of shape ({ny}, {nx}); "
            "it needs 0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx"
        )
    return y0, y1, x0, x1


# --------------------------------------------------------------------------- groups


def open_root(path: Path, mode: str = "r") -> zarr.Group:
    """Open the root group of the Zarr v3 store at ``path``.

    Parameters
    ----------
    path : pathlib.Path
        Store directory.
    mode : str, optional
        zarr's open mode; ``"r"`` (default) or ``"r+"``.

    Returns
    -------
    zarr.Group

    Raises
    ------
    StoreError
        If ``path`` does not exist or is not a Zarr v3 store.
    """
    if not os.path.lexists(path):
        raise StoreError(f"{str(path)!r} does not exist")
    try:
        return zarr.open_group(store=str(path), mode=mode, zarr_format=3)
    except STORE_ERRORS as exc:
        raise StoreError(f"{str(path)!r} is not a Zarr v3 store: {exc}") from exc


def sub_group(root: zarr.Group, group: str | None, path: Path) -> zarr.Group:
    """The sub-group ``group`` of ``root`` (``root`` itself for None).

    Parameters
    ----------
    root : zarr.Group
        Root group of the store at ``path``.
    group : str or None
        Sub-group name.
    path : pathlib.Path
        Store directory, for messages.

    Returns
    -------
    zarr.Group

    Raises
    ------
    StoreError
        If there is no such node, or it is an array.
    """
    if group is None:
        return root
    try:
        node = root[group]
    except KeyError:
        raise StoreError(f"no group {group!r} in store {str(path)!r}") from None
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{group!r} in store {str(path)!r} is an array, not a group")
    return node


def member_array(node: zarr.Group, name: str, where: str) -> zarr.Array:
    """The array ``name`` of group ``node``.

    Parameters
    ----------
    node : zarr.Group
        Group holding it.
    name : str
        Array name.
    where : str
        The group as messages name it (:func:`group_label`).

    Returns
    -------
    zarr.Array

    Raises
    ------
    StoreError
        If it is missing or is a group.
    """
    try:
        array = node[name]
    except KeyError:
        raise StoreError(f"{where}: array {name!r} is missing") from None
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{where}: {name!r} is a group, not an array")
    return array


def group_info(node: zarr.Group, where: str, kind: str) -> dict[str, Any]:
    """The ``diffkernel`` attribute of a group, checked for layout version and kind.

    Parameters
    ----------
    node : zarr.Group
        Group to describe.
    where : str
        The group as messages name it.
    kind : str
        Expected kind: ``"image"``, ``"result"``, ``"solution"`` or ``"candidates"``.

    Returns
    -------
    dict
        The attribute.

    Raises
    ------
    StoreError
        If the attribute is missing (not written by diffkernel, or unfinished), of another
        layout version, or of another kind.
    """
    info = node.attrs.asdict().get(ATTR_KEY)
    if not isinstance(info, dict):
        raise StoreError(
            f"{where} has no {ATTR_KEY!r} attribute: it was not written by diffkernel, "
            "or its write did not finish"
        )
    layout = info.get("layout")
    if type(layout) is not int or layout != LAYOUT_VERSION:
        raise StoreError(
            f"{where}: layout version {layout!r} is unknown; this diffkernel reads "
            f"layout {LAYOUT_VERSION}"
        )
    if info.get("kind") != kind:
        hint = "; open it with open_result" if info.get("kind") == "result" else ""
        raise StoreError(
            f"{where} holds a diffkernel {info.get('kind')!r}, expected {kind!r}{hint}"
        )
    return info


def require_attr(info: Mapping[str, Any], key: str, where: str) -> Any:
    """The entry ``key`` of a group's ``diffkernel`` attribute.

    Parameters
    ----------
    info : mapping
        The attribute (:func:`group_info`).
    key : str
        Entry wanted.
    where : str
        The group as messages name it.

    Returns
    -------
    object

    Raises
    ------
    StoreError
        If the entry is missing.
    """
    if key not in info:
        raise StoreError(f"{where}: attribute {ATTR_KEY}.{key} is missing")
    return info[key]


# --------------------------------------------------------------------------- WCS


def wcs_cards(wcs: Any) -> dict[str, Any] | None:
    """A WCS, a FITS header or a mapping of cards as a JSON-safe dict of cards.

    Parameters
    ----------
    wcs : astropy.wcs.WCS, astropy.io.fits.Header, mapping or None
        The pixel grid's WCS, or its cards.

    Returns
    -------
    dict or None
        Card name to JSON-safe value (``COMMENT`` and ``HISTORY`` left out); None for None.
    """
    if wcs is None:
        return None
    header = wcs if isinstance(wcs, fits.Header | Mapping) else wcs_header(wcs)
    cards = {}
    for key, value in header.items():
        if key and key.upper() not in ("COMMENT", "HISTORY"):
            cards[str(key)] = json_safe(value)
    return cards


def wcs_from_cards(cards: Mapping[str, Any] | None, where: str) -> WCS | None:
    """The WCS stored by :func:`wcs_cards`.

    Parameters
    ----------
    cards : mapping or None
        Stored cards.
    where : str
        The group as messages name it.

    Returns
    -------
    astropy.wcs.WCS or None

    Raises
    ------
    StoreError
        If the cards are not a valid WCS.
    """
    if cards is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(fits.Header(list(cards.items())))
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for a bad header
        raise StoreError(f"{where}: attribute {ATTR_KEY}.wcs is not a valid WCS: {exc}") from exc
