"""Zarr storage of images and results (layout version 1).

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
``Exposure.meta``) and ``created`` (ISO UTC time).

Result stores (the published outputs) are in :mod:`diffkernel.io.zarr.results`; they use the
image groups and the helpers here.

JSON attributes cannot hold NaN or infinities: :func:`json_safe` stores them as null,
except the solution's condition number and bounding boxes, which are stored exactly
(``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as Zarr v3 stores fill values).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import operator
import os
import shutil
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from astropy.io import fits
from astropy.nddata import NDData
from astropy.wcs import WCS, FITSFixedWarning
from zarr.codecs import BloscCodec, ZstdCodec

from ...errors import InputError, StoreError
from ...image import Exposure, MaskedImage, as_exposure
from ..fits import read_exposure
from ..header import wcs_header
from ..nddata import from_nddata
from .chunkio import DirectChunks, chunk_pieces, direct_chunks, whole_chunks

__all__ = [
    "ATTR_KEY",
    "CACHE_ENV_VAR",
    "DEFAULT_CHUNKS",
    "LAYOUT_VERSION",
    "ZarrImage",
    "clear_chunk_cache",
    "create_image_arrays",
    "ingest",
    "open_input",
    "json_safe",
    "write_image",
    "write_tile",
]

#: Default side of the square tiles (Zarr chunks) of an image group, in pixels.
DEFAULT_CHUNKS = 512
#: Name of the attribute holding diffkernel's description of a group.
ATTR_KEY = "diffkernel"
#: Version of the on-disk layout this module writes and reads.
LAYOUT_VERSION = 1
#: Environment variable overriding the chunk-cache budget, in megabytes.
CACHE_ENV_VAR = "DIFFKERNEL_CHUNK_CACHE_MB"

PathLike = str | os.PathLike
Chunks = int | Sequence[int]

IMAGE_ARRAYS = ("image", "variance", "mask")
_DEFAULT_CACHE_MB = 256.0
_FLOAT_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
_MASK_ZSTD_LEVEL = 1
_STORE_ERRORS = (OSError, ValueError, KeyError, TypeError)


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


def _encode_float(value: float) -> float | str:
    """A float as JSON, exactly: non-finite values as Zarr v3 spells them."""
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _decode_float(value: float | str) -> float:
    """Inverse of :func:`_encode_float` (``float`` reads ``"NaN"`` and ``"Infinity"``)."""
    return float(value)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _meta_subset(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The str/int/float/bool entries of ``meta`` (finite floats only), with str keys."""
    out: dict[str, Any] = {}
    for key, value in (meta or {}).items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, str | int | float | bool):
            out[str(key)] = value
    return out


# --------------------------------------------------------------------------- checks


def _where(path: Path, group: str | None) -> str:
    """How messages name an image group."""
    if group is None:
        return f"store {str(path)!r}"
    return f"group {group!r} of store {str(path)!r}"


def _check_group_name(group: str) -> str:
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


def _check_pair(value: Any, name: str, *, positive: bool) -> tuple[int, int]:
    try:
        first, second = value
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a pair of integers, got {value!r}") from None
    pair = (_check_int(first, name), _check_int(second, name))
    if positive and min(pair) < 1:
        raise InputError(f"{name} must be positive, got {value!r}")
    return pair


def _tile_shape(shape: tuple[int, int], chunks: Chunks) -> tuple[int, int]:
    """Chunk shape: square ``chunks`` (or a ``(cy, cx)`` pair), clipped to the shape."""
    if isinstance(chunks, Sequence):
        cy, cx = _check_pair(chunks, "chunks", positive=True)
    else:
        cy = cx = _check_int(chunks, "chunks")
        if cy < 1:
            raise InputError(f"chunks must be positive, got {chunks!r}")
    return max(1, min(cy, shape[0])), max(1, min(cx, shape[1]))


def _lossless_float_dtype(values: np.ndarray) -> np.dtype:
    """float32 when it holds every value exactly, else float64."""
    if np.array_equal(values.astype(np.float32), values, equal_nan=True):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _check_box(box: tuple[Any, Any, Any, Any], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = (_check_int(v, n) for v, n in zip(box, ("y0", "y1", "x0", "x1"), strict=True))
    ny, nx = shape
    if not (0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx):
        raise InputError(
            f"region [{y0}:{y1}, {x0}:{x1}] is outside the image of shape ({ny}, {nx}); "
            "it needs 0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx"
        )
    return y0, y1, x0, x1


# --------------------------------------------------------------------------- files


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise StoreError(
            f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist"
        )


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.name}.{tag}-{uuid.uuid4().hex}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _publish(partial: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished directory ``partial`` onto ``target``.

    With ``overwrite`` an existing ``target`` is first renamed aside, then deleted once the
    new one is in place (and put back if the rename fails).
    """
    old = None
    if os.path.lexists(target):
        if not overwrite:
            raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
        old = _sibling(target, "old")
        try:
            os.rename(target, old)
        except OSError as exc:
            raise StoreError(f"could not move {str(target)!r} aside: {exc}") from exc
    try:
        os.rename(partial, target)
    except OSError as exc:
        if old is not None:
            os.rename(old, target)
        raise StoreError(f"could not move {str(partial)!r} to {str(target)!r}: {exc}") from exc
    if old is not None:
        _remove(old)


def _open_root(path: Path, mode: str = "r") -> zarr.Group:
    """Open the root group of the Zarr v3 store at ``path``."""
    if not os.path.lexists(path):
        raise StoreError(f"{str(path)!r} does not exist")
    try:
        return zarr.open_group(store=str(path), mode=mode, zarr_format=3)
    except _STORE_ERRORS as exc:
        raise StoreError(f"{str(path)!r} is not a Zarr v3 store: {exc}") from exc


def _sub_group(root: zarr.Group, group: str | None, path: Path) -> zarr.Group:
    if group is None:
        return root
    try:
        node = root[group]
    except KeyError:
        raise StoreError(f"no group {group!r} in store {str(path)!r}") from None
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{group!r} in store {str(path)!r} is an array, not a group")
    return node


def _member_array(node: zarr.Group, name: str, where: str) -> zarr.Array:
    try:
        array = node[name]
    except KeyError:
        raise StoreError(f"{where}: array {name!r} is missing") from None
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{where}: {name!r} is a group, not an array")
    return array


def _group_info(node: zarr.Group, where: str, kind: str) -> dict[str, Any]:
    """The ``diffkernel`` attribute of a group, checked for layout version and kind."""
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


def _require(info: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in info:
        raise StoreError(f"{where}: attribute {ATTR_KEY}.{key} is missing")
    return info[key]


# --------------------------------------------------------------------------- WCS


def _wcs_cards(wcs: Any) -> dict[str, Any] | None:
    """A WCS, a FITS header or a mapping of cards as a JSON-safe dict of cards."""
    if wcs is None:
        return None
    header = wcs if isinstance(wcs, fits.Header | Mapping) else wcs_header(wcs)
    cards = {}
    for key, value in header.items():
        if key and key.upper() not in ("COMMENT", "HISTORY"):
            cards[str(key)] = json_safe(value)
    return cards


def _wcs_from_cards(cards: Mapping[str, Any] | None, where: str) -> WCS | None:
    if cards is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(fits.Header(list(cards.items())))
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for a bad header
        raise StoreError(f"{where}: attribute {ATTR_KEY}.wcs is not a valid WCS: {exc}") from exc


# --------------------------------------------------------------------------- image writing


def _image_attrs(
    shape: tuple[int, int],
    tile: tuple[int, int],
    mask_planes: Mapping[str, int],
    wcs_cards: dict[str, Any] | None,
    origin: tuple[int, int],
    psf_fwhm: Any,
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    fwhm = None
    if isinstance(psf_fwhm, int | float | np.number) and not isinstance(psf_fwhm, bool):
        fwhm = json_safe(float(psf_fwhm))
    return {
        "layout": LAYOUT_VERSION,
        "kind": "image",
        "uid": uuid.uuid4().hex,
        "shape": list(shape),
        "chunks": list(tile),
        "mask_planes": {str(name): int(bit) for name, bit in mask_planes.items()},
        "wcs": wcs_cards,
        "origin": list(origin),
        "psf_fwhm": fwhm,
        "meta": _meta_subset(meta),
        "created": _now(),
    }


def _create_planes(
    node: zarr.Group,
    shape: tuple[int, int],
    tile: tuple[int, int],
    dtypes: Mapping[str, np.dtype],
) -> dict[str, zarr.Array]:
    """Create the three arrays of an image group (empty: NaN image/variance, zero mask)."""
    arrays = {}
    for name in ("image", "variance"):
        arrays[name] = node.create_array(
            name,
            shape=shape,
            chunks=tile,
            dtype=dtypes[name],
            compressors=BloscCodec(**_FLOAT_CODEC),
            fill_value=np.nan,
        )
    arrays["mask"] = node.create_array(
        "mask",
        shape=shape,
        chunks=tile,
        dtype=np.int32,
        compressors=ZstdCodec(level=_MASK_ZSTD_LEVEL),
        fill_value=0,
    )
    return arrays


def _fill_image_group(
    node: zarr.Group, exposure: Exposure, chunks: Chunks, origin: tuple[int, int]
) -> None:
    """Write an exposure's planes into ``node``; the attributes come last."""
    mi = exposure.masked_image
    shape = mi.shape
    tile = _tile_shape(shape, chunks)
    planes = {"image": mi.image, "variance": mi.variance, "mask": mi.mask}
    dtypes = {name: _lossless_float_dtype(planes[name]) for name in ("image", "variance")}
    arrays = _create_planes(node, shape, tile, dtypes)
    for name, values in planes.items():
        arrays[name][...] = values.astype(arrays[name].dtype, copy=False)
    wcs_cards = _wcs_cards(exposure.wcs)
    node.attrs[ATTR_KEY] = _image_attrs(
        shape, tile, mi.mask_planes, wcs_cards, origin, exposure.psf_fwhm, exposure.meta
    )


def write_image(
    path: PathLike,
    data: Exposure | MaskedImage,
    *,
    group: str | None = None,
    chunks: Chunks = DEFAULT_CHUNKS,
    overwrite: bool = False,
    origin: tuple[int, int] = (0, 0),
) -> ZarrImage:
    """Write an exposure as an image group.

    Parameters
    ----------
    path : str or os.PathLike
        Store directory.
    data : Exposure or MaskedImage
        What to write. Image and variance are stored as float32 when that is lossless,
        else float64; a callable ``psf_fwhm`` is not stored, nor are ``meta`` entries
        other than str, int, finite float and bool.
    group : str, optional
        Sub-group of the store to write (e.g. ``"science"``). By default the whole store
        is the image group, written atomically: into ``<path>.partial-<uuid>``, then
        renamed onto ``path``. A sub-group is written in place (the store is created if
        needed); making that atomic is the caller's job.
    chunks : int or (int, int), optional
        Side of the square tiles in pixels (or a ``(cy, cx)`` pair), clipped to the shape.
    overwrite : bool, optional
        Replace an existing store (or, with ``group``, an existing sub-group).
    origin : (int, int), optional
        LSST-style pixel origin ``(x0, y0)`` of the image's first pixel.

    Returns
    -------
    ZarrImage
        The written image group.

    Raises
    ------
    StoreError
        If the target exists and ``overwrite`` is False, its directory does not exist,
        ``path`` exists but is not a Zarr store (with ``group``), or the write fails.
    InputError
        If ``data`` is neither an Exposure nor a MaskedImage, or an argument is invalid.
    """
    exposure = as_exposure(data, "data")
    origin = _check_pair(origin, "origin", positive=False)
    _tile_shape(exposure.shape, chunks)  # check before anything is written
    target = Path(path).absolute()
    if group is None:
        _write_store(target, exposure, chunks, overwrite, origin)
        return ZarrImage.open(target)
    group = _check_group_name(group)
    _write_group(target, group, exposure, chunks, overwrite, origin)
    return ZarrImage.open(target, group)


def _write_store(
    target: Path, exposure: Exposure, chunks: Chunks, overwrite: bool, origin: tuple[int, int]
) -> None:
    _check_parent(target)
    if os.path.lexists(target) and not overwrite:
        raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
    partial = _sibling(target, "partial")
    try:
        root = zarr.open_group(store=str(partial), mode="w-", zarr_format=3)
        _fill_image_group(root, exposure, chunks, origin)
        _publish(partial, target, overwrite)
    except OSError as exc:
        _remove(partial)
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"failed to write {str(target)!r}: {exc}") from exc
    except BaseException:
        _remove(partial)
        raise


def _write_group(
    target: Path,
    group: str,
    exposure: Exposure,
    chunks: Chunks,
    overwrite: bool,
    origin: tuple[int, int],
) -> None:
    if os.path.lexists(target):
        root = _open_root(target, mode="r+")
    else:
        _check_parent(target)
        root = zarr.open_group(store=str(target), mode="w-", zarr_format=3)
    if group in root:
        if not overwrite:
            raise StoreError(
                f"group {group!r} already exists in store {str(target)!r}; "
                "pass overwrite=True to replace it"
            )
        del root[group]
    _fill_image_group(root.create_group(group), exposure, chunks, origin)


def ingest(
    source: PathLike | Exposure | MaskedImage | NDData,
    path: PathLike,
    *,
    chunks: Chunks = DEFAULT_CHUNKS,
    overwrite: bool = False,
) -> ZarrImage:
    """Store an image from a FITS file or an in-memory object as an image-group store.

    Parameters
    ----------
    source : str, os.PathLike, Exposure, MaskedImage or astropy.nddata.NDData
        A FITS file (read with :func:`diffkernel.io.fits.read_exposure`, which estimates
        the variance of a plain image), an exposure, or an NDData/CCDData (converted with
        :func:`diffkernel.io.nddata.from_nddata`).
    path : str or os.PathLike
        Store directory, written atomically by :func:`write_image`.
    chunks : int or (int, int), optional
        Tile side in pixels.
    overwrite : bool, optional
        Replace an existing store.

    Returns
    -------
    ZarrImage
        The stored image.

    Raises
    ------
    InputError
        If ``source`` is of another type, or unreadable as an image (a FITS file or NDData
        whose variance is unusable at every pixel with data included).
    StoreError
        If the FITS file is missing or the store cannot be written.
    """
    if isinstance(source, str | os.PathLike):
        data: Exposure | MaskedImage = read_exposure(source)
    elif isinstance(source, Exposure | MaskedImage):
        data = source
    elif isinstance(source, NDData):
        data = from_nddata(source)
    else:
        raise InputError(
            f"source must be a FITS path, an Exposure, a MaskedImage or an astropy NDData, "
            f"got {type(source).__name__}"
        )
    return write_image(path, data, chunks=chunks, overwrite=overwrite)


def open_input(
    spec: str | os.PathLike, work: PathLike, name: str, chunks: Chunks = DEFAULT_CHUNKS
) -> ZarrImage:
    """An input image as a Zarr image group: a FITS file is ingested into ``work``.

    Parameters
    ----------
    spec : str or path
        A FITS file, a Zarr image store, or a group of one as ``store.zarr#group``.
    work : path
        Folder for ingested FITS inputs (created when needed).
    name : str
        Name of the ingested store (``work/<name>.zarr``).
    chunks : int
        Chunk side of an ingested store.
    """
    location, _, group = os.fspath(spec).partition("#")
    source = Path(location)
    if source.is_file():
        Path(work).mkdir(parents=True, exist_ok=True)
        return ingest(source, Path(work) / f"{name}.zarr", chunks=chunks)
    return ZarrImage.open(source, group or None)


def create_image_arrays(
    root_group: zarr.Group,
    name: str,
    shape: tuple[int, int],
    chunks: Chunks,
    mask_planes: Mapping[str, int],
    wcs_header: Any = None,
    origin: tuple[int, int] = (0, 0),
    dtype: Any = np.float32,
    meta: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create an empty image group whose tiles are written later, e.g. by many tasks.

    Parameters
    ----------
    root_group : zarr.Group
        Writable group to create it in.
    name : str
        Name of the new group; it must not exist.
    shape : (int, int)
        ``(ny, nx)``.
    chunks : int or (int, int)
        Tile side in pixels (or ``(cy, cx)``), clipped to the shape.
    mask_planes : mapping of str to int
        Mask plane name to bit.
    wcs_header : astropy.io.fits.Header, mapping, astropy.wcs.WCS or None, optional
        WCS cards of the pixel grid.
    origin : (int, int), optional
        LSST-style pixel origin ``(x0, y0)``.
    dtype : numpy dtype, optional
        Floating dtype of ``image`` and ``variance``. Default float32.
    meta : mapping, optional
        Metadata; its str/int/float/bool entries are stored.

    Returns
    -------
    zarr.Group
        The new group; unwritten tiles read as NaN (image, variance) and 0 (mask).

    Raises
    ------
    StoreError
        If ``name`` exists in ``root_group``.
    InputError
        If an argument is invalid.
    """
    shape = _check_pair(shape, "shape", positive=True)
    tile = _tile_shape(shape, chunks)
    origin = _check_pair(origin, "origin", positive=False)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"dtype of image and variance must be floating, got {dtype}")
    name = _check_group_name(name)
    if name in root_group:
        raise StoreError(f"{name!r} already exists in group {root_group.path or '/'!r}")
    node = root_group.create_group(name)
    _create_planes(node, shape, tile, {"image": dtype, "variance": dtype})
    node.attrs[ATTR_KEY] = _image_attrs(
        shape, tile, mask_planes, _wcs_cards(wcs_header), origin, None, meta
    )
    return node


def write_tile(
    path: PathLike,
    group: str | None,
    y0: int,
    x0: int,
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    *,
    check_alignment: bool = True,
) -> None:
    """Write one region into the three arrays of an existing image group.

    The group is opened by path, so this works in any worker process. Tasks writing
    concurrently must write disjoint regions made of whole tiles: a tile written by two
    tasks at once loses one of the writes. ``check_alignment`` enforces that.

    Parameters
    ----------
    path : str or os.PathLike
        Store directory.
    group : str or None
        Image group inside the store (None: the root).
    y0, x0 : int
        Array indices of the region's first pixel.
    image, variance, mask : numpy.ndarray
        2-D planes of one shape; cast to the arrays' dtypes.
    check_alignment : bool, optional
        Refuse regions that do not start on a tile boundary or end on one (or on the
        image edge). Default True.

    Raises
    ------
    StoreError
        If the group is missing or not an image group.
    InputError
        If the planes differ in shape, the region is outside the image, or (with
        ``check_alignment``) not aligned to the tile grid.
    """
    location = Path(path).absolute()
    group = None if group is None else _check_group_name(group)
    where = _where(location, group)
    node = _sub_group(_open_root(location, mode="r+"), group, location)
    info = _group_info(node, where, "image")
    planes = _tile_planes(image, variance, mask)
    shape = tuple(_require(info, "shape", where))
    box = _check_box((y0, y0 + planes[0].shape[0], x0, x0 + planes[0].shape[1]), shape)
    tile = tuple(_require(info, "chunks", where))
    if check_alignment:
        _check_aligned(box, shape, tile, where)
    for name, values in zip(IMAGE_ARRAYS, planes, strict=True):
        array = _member_array(node, name, where)
        values = values.astype(array.dtype, copy=False)
        direct = direct_chunks(array) if whole_chunks(box, shape, array.chunks) else None
        if direct is not None:
            direct.write_region(box[0], box[2], values)
        else:
            array[box[0] : box[1], box[2] : box[3]] = values
        _chunk_cache().discard(info.get("uid"), name, box, tile)


def _tile_planes(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    planes = tuple(np.asarray(p) for p in (image, variance, mask))
    if planes[0].ndim != 2:
        raise InputError(f"tile image must be 2-D, got shape {planes[0].shape}")
    for name, plane in zip(IMAGE_ARRAYS[1:], planes[1:], strict=True):
        if plane.shape != planes[0].shape:
            raise InputError(
                f"tile {name} shape {plane.shape} differs from tile image shape {planes[0].shape}"
            )
    if not np.issubdtype(planes[2].dtype, np.integer):
        raise InputError(f"tile mask must be an integer bit mask, got dtype {planes[2].dtype}")
    return planes  # type: ignore[return-value]


def _check_aligned(
    box: tuple[int, int, int, int], shape: tuple[int, ...], tile: tuple[int, ...], where: str
) -> None:
    y0, y1, x0, x1 = box
    cy, cx = tile
    if not whole_chunks(box, shape, tile):
        raise InputError(
            f"{where}: region [{y0}:{y1}, {x0}:{x1}] is not aligned to the tile grid "
            f"{(cy, cx)}; concurrent writes to a shared tile lose data. Write whole tiles, "
            "or pass check_alignment=False when nothing else writes at the same time"
        )


# --------------------------------------------------------------------------- chunk cache


class _LockedLRU:
    """Thread-safe least-recently-used mapping; subclasses say what to evict."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> Any:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value


class _ChunkCache(_LockedLRU):
    """Thread-safe LRU cache of decoded chunks, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.nbytes = 0

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        value.setflags(write=False)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def discard(
        self, uid: Any, name: str, box: tuple[int, int, int, int], tile: tuple[int, ...]
    ) -> None:
        """Forget the chunks of array ``name`` that the region ``box`` touches."""
        with self._lock:
            for iy, ix, _ in chunk_pieces(box, tile):
                value = self._items.pop((uid, name, (iy, ix)), None)
                if value is not None:
                    self.nbytes -= value.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


_CACHE: _ChunkCache | None = None
_CACHE_LOCK = threading.Lock()


class _OpenedArrays(_LockedLRU):
    """Thread-safe LRU of opened (read-only) zarr arrays, by ``(path, group, name, uid)``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: tuple, array: zarr.Array) -> None:
        with self._lock:
            self._items[key] = array
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_OPENED = _OpenedArrays(96)


def _cache_budget() -> int:
    raw = os.environ.get(CACHE_ENV_VAR)
    if raw is None or not raw.strip():
        return int(_DEFAULT_CACHE_MB * 2**20)
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = -1.0
    if not (math.isfinite(megabytes) and megabytes >= 0):
        raise InputError(f"{CACHE_ENV_VAR} must be a number of megabytes >= 0, got {raw!r}")
    return int(megabytes * 2**20)


def _chunk_cache() -> _ChunkCache:
    """The per-process chunk cache, sized from ``DIFFKERNEL_CHUNK_CACHE_MB`` on first use."""
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            _CACHE = _ChunkCache(_cache_budget())
        return _CACHE


def clear_chunk_cache() -> None:
    """Empty this process's chunk cache; the next cached read re-reads its budget."""
    global _CACHE
    with _CACHE_LOCK:
        _CACHE = None


# --------------------------------------------------------------------------- ZarrImage


class ZarrImage:
    """An image group of a Zarr store, read region by region.

    Build it with :meth:`open` (or get it from :func:`write_image`). Arrays are opened
    on first use and kept; pickling keeps only the path, group and validated
    attributes, so the object can be shipped to Dask workers.
    """

    def __init__(
        self,
        path: Path,
        group: str | None,
        info: dict[str, Any],
        dtype: np.dtype,
        arrays: Mapping[str, zarr.Array] | None = None,
    ) -> None:
        self._path = path
        self._group = group
        self._info = info
        self._dtype = np.dtype(dtype)
        self._arrays: dict[str, zarr.Array] = dict(arrays or {})
        self._direct: dict[str, DirectChunks | None] = {}

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: PathLike, group: str | None = None) -> ZarrImage:
        """Open and validate an image group.

        Parameters
        ----------
        path : str or os.PathLike
            Store directory.
        group : str, optional
            Sub-group holding the image (default: the store's root).

        Returns
        -------
        ZarrImage

        Raises
        ------
        StoreError
            If the path does not exist or is not a Zarr v3 store, the group is missing,
            its ``diffkernel`` attribute is missing or of an unknown layout, or an array
            is missing, of the wrong dtype, shape or tile grid (the message names it).
        """
        location = Path(path).absolute()
        group = None if group is None else _check_group_name(group)
        where = _where(location, group)
        node = _sub_group(_open_root(location), group, location)
        info = _group_info(node, where, "image")
        _check_image_info(info, where)
        arrays = {name: _member_array(node, name, where) for name in IMAGE_ARRAYS}
        _check_arrays(arrays, info, where)
        return cls(location, group, info, arrays["image"].dtype, arrays)

    def _array(self, name: str) -> zarr.Array:
        array = self._arrays.get(name)
        if array is None:
            # Opened arrays are kept per process, keyed by the group's uid (new on every
            # write of the group): a worker reopens nothing from one run to the next.
            key = (str(self._path), self._group, name, self.uid)
            array = _OPENED.get(key)
            if array is None:
                node_path = name if self._group is None else f"{self._group}/{name}"
                try:
                    array = zarr.open_array(
                        store=str(self._path), path=node_path, mode="r", zarr_format=3
                    )
                except _STORE_ERRORS as exc:
                    raise StoreError(
                        f"{_where(self._path, self._group)}: cannot open array {name!r}: {exc}"
                    ) from exc
                _OPENED.put(key, array)
            self._arrays[name] = array
        return array

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": str(self._path),
            "group": self._group,
            "info": self._info,
            "dtype": self._dtype.str,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Path(state["path"]), state["group"], state["info"], np.dtype(state["dtype"]))

    def __repr__(self) -> str:
        return (
            f"ZarrImage({str(self._path)!r}, group={self._group!r}, shape={self.shape}, "
            f"chunks={self.chunks}, dtype={self._dtype})"
        )

    # ---------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        """Absolute path of the store directory."""
        return self._path

    @property
    def group(self) -> str | None:
        """Sub-group of the image group, or None for the store's root."""
        return self._group

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        ny, nx = self._info["shape"]
        return int(ny), int(nx)

    @property
    def chunks(self) -> tuple[int, int]:
        """Tile (chunk) shape ``(cy, cx)``."""
        cy, cx = self._info["chunks"]
        return int(cy), int(cx)

    @property
    def dtype(self) -> np.dtype:
        """Stored dtype of the ``image`` array."""
        return self._dtype

    @property
    def mask_planes(self) -> dict[str, int]:
        """Mask plane name to bit."""
        return dict(self._info["mask_planes"])

    @property
    def wcs(self) -> WCS | None:
        """WCS rebuilt from the stored cards (a new object on each access), or None."""
        return _wcs_from_cards(self._info.get("wcs"), _where(self._path, self._group))

    @property
    def origin(self) -> tuple[int, int]:
        """LSST-style pixel origin ``(x0, y0)``."""
        x0, y0 = self._info.get("origin", (0, 0))
        return int(x0), int(y0)

    @property
    def psf_fwhm(self) -> float | None:
        """Constant PSF FWHM in pixels, or None."""
        fwhm = self._info.get("psf_fwhm")
        return None if fwhm is None else float(fwhm)

    @property
    def meta(self) -> dict[str, Any]:
        """Stored metadata (a copy)."""
        return dict(self._info.get("meta") or {})

    @property
    def uid(self) -> str:
        """Identifier of this write of the group."""
        return str(self._info["uid"])

    # ---------------------------------------------------------------- reading

    def read(self, y0: int, y1: int, x0: int, x1: int, *, cached: bool = False) -> MaskedImage:
        """Read the region ``[y0:y1, x0:x1]`` (array indices).

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Region bounds, ``0 <= y0 <= y1 <= ny`` and ``0 <= x0 <= x1 <= nx``.
        cached : bool, optional
            Read whole chunks through the per-process LRU chunk cache (budget
            ``DIFFKERNEL_CHUNK_CACHE_MB``, default 256) and assemble the region from
            them: faster when many small regions are read. The values are identical,
            provided the group is not written meanwhile by another process
            (:func:`write_tile` forgets the chunks it writes from this process's cache only).

        Returns
        -------
        MaskedImage
            Float64 image and variance, int32 mask, with the group's mask planes.

        Raises
        ------
        InputError
            If the region is not inside the image.
        """
        box = _check_box((y0, y1, x0, x1), self.shape)
        if cached:
            # Assembled straight into float64: MaskedImage then makes no second copy.
            image = self._read_cached("image", box, np.float64)
            variance = self._read_cached("variance", box, np.float64)
            mask = self._read_cached("mask", box)
        else:
            image, variance, mask = (self._read_direct(name, box) for name in IMAGE_ARRAYS)
        return MaskedImage(image, variance, mask, self.mask_planes)

    def read_stored(
        self, y0: int, y1: int, x0: int, x1: int, *, cached: bool = False
    ) -> MaskedImage:
        """The region as stored (float32 stays float32), for inputs checked elsewhere.

        Like :meth:`read` without the float64 conversion and the pixel checks of
        :class:`~diffkernel.image.MaskedImage` (see
        :meth:`~diffkernel.image.MaskedImage.from_validated`); ``cached`` as there.
        """
        if cached:
            box = _check_box((y0, y1, x0, x1), self.shape)
            planes = {name: self._read_cached(name, box) for name in IMAGE_ARRAYS}
        else:
            planes = self.read_planes(y0, y1, x0, x1)
        return MaskedImage.from_validated(
            planes["image"], planes["variance"], planes["mask"], self.mask_planes
        )

    def read_planes(self, y0: int, y1: int, x0: int, x1: int) -> dict[str, np.ndarray]:
        """The region's ``image``, ``variance`` and ``mask`` as stored (no conversion).

        For pixels that are only checked, hashed or already validated: no float64
        copy is made.
        """
        box = _check_box((y0, y1, x0, x1), self.shape)
        return {name: self._read_direct(name, box) for name in IMAGE_ARRAYS}

    def _reader(self, name: str) -> DirectChunks | None:
        """The direct chunk access of an array, or None where zarr must read it."""
        if name not in self._direct:
            self._direct[name] = direct_chunks(self._array(name))
        return self._direct[name]

    def _read_direct(self, name: str, box: tuple[int, int, int, int]) -> np.ndarray:
        y0, y1, x0, x1 = box
        reader = self._reader(name)
        if reader is not None:
            return reader.region(y0, y1, x0, x1)
        return self._array(name)[y0:y1, x0:x1]

    def _read_cached(self, name: str, box: tuple[int, int, int, int], dtype=None) -> np.ndarray:
        y0, y1, x0, x1 = box
        cy, cx = self.chunks
        out = np.empty((y1 - y0, x1 - x0), dtype=dtype or self._array(name).dtype)
        for iy, ix, (ty0, ty1, tx0, tx1) in chunk_pieces(box, self.chunks):
            chunk = self._chunk(name, iy, ix)
            out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = chunk[
                ty0 - iy * cy : ty1 - iy * cy, tx0 - ix * cx : tx1 - ix * cx
            ]
        return out

    def _chunk(self, name: str, iy: int, ix: int) -> np.ndarray:
        cache = _chunk_cache()
        key = (self.uid, name, (iy, ix))
        chunk = cache.get(key)
        if chunk is None:
            reader = self._reader(name)
            if reader is not None:
                chunk = reader.chunk(iy, ix)
            else:
                cy, cx = self.chunks
                chunk = self._array(name)[iy * cy : (iy + 1) * cy, ix * cx : (ix + 1) * cx]
            cache.put(key, chunk)
        return chunk

    def to_exposure(self) -> Exposure:
        """The whole image as an Exposure, with its WCS, PSF FWHM and metadata."""
        ny, nx = self.shape
        mi = self.read(0, ny, 0, nx)
        return Exposure(mi, wcs=self.wcs, psf_fwhm=self.psf_fwhm, meta=self.meta)

    def digest(self, name: str) -> str:
        """SHA-256 of an array's decoded values, dtype and shape.

        The array is read one row of tiles at a time. The hash covers the dtype (little
        endian), the shape and the little-endian bytes of the values in row-major order,
        so it does not depend on the chunking.

        Parameters
        ----------
        name : {"image", "variance", "mask"}
            Array to hash.

        Returns
        -------
        str
            Hexadecimal digest.
        """
        if name not in IMAGE_ARRAYS:
            raise InputError(f"name must be one of {', '.join(IMAGE_ARRAYS)}; got {name!r}")
        array = self._array(name)
        dtype = np.dtype(array.dtype).newbyteorder("<")
        ny = self.shape[0]
        step = self.chunks[0]
        sha = hashlib.sha256(f"{dtype.str}|{tuple(array.shape)}|".encode())
        for r0 in range(0, ny, step):
            block = np.ascontiguousarray(array[r0 : r0 + step, :], dtype=dtype)
            sha.update(memoryview(block).cast("B"))
        return sha.hexdigest()


def _check_image_info(info: Mapping[str, Any], where: str) -> None:
    for key in ("uid", "shape", "chunks", "mask_planes"):
        _require(info, key, where)
    for key in ("shape", "chunks"):
        value = info[key]
        ok = isinstance(value, list) and len(value) == 2
        if not ok or not all(type(v) is int and v > 0 for v in value):
            raise StoreError(f"{where}: attribute {ATTR_KEY}.{key} must be two positive integers")
    if not isinstance(info["mask_planes"], dict):
        raise StoreError(f"{where}: attribute {ATTR_KEY}.mask_planes must be a mapping")


def _check_arrays(arrays: Mapping[str, zarr.Array], info: Mapping[str, Any], where: str) -> None:
    shape, tile = tuple(info["shape"]), tuple(info["chunks"])
    for name, array in arrays.items():
        kind = np.integer if name == "mask" else np.floating
        if not np.issubdtype(array.dtype, kind):
            wanted = "an integer" if name == "mask" else "a floating"
            raise StoreError(
                f"{where}: array {name!r} has dtype {array.dtype}; it must be {wanted} dtype"
            )
        if tuple(array.shape) != shape:
            raise StoreError(
                f"{where}: array {name!r} has shape {tuple(array.shape)}, but the group's shape "
                f"is {shape}"
            )
        if tuple(array.chunks) != tile:
            raise StoreError(
                f"{where}: mismatched tile grid: array {name!r} has chunks "
                f"{tuple(array.chunks)}, but the group's tiles are {tile}"
            )
