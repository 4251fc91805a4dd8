"""Writing image groups: a whole exposure at once, or an empty group filled tile by tile.

The layout written is described in :mod:`diffkernel.io.zarr.layout`. :func:`write_image`
stores an exposure; a whole store is written under a partial name and published
atomically (:mod:`diffkernel.io.atomic`). :func:`create_image_arrays` makes an empty group
that many tasks then fill with :func:`write_tile`, each writing whole tiles of its own, as
the Dask driver writes the difference image. The attributes of a group are written last,
so a group whose write did not finish has none and is refused on reading.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from ...errors import InputError, StoreError
from ...image import Exposure, MaskedImage, as_exposure
from ..atomic import check_parent, publish, remove, sibling
from .cache import chunk_cache
from .chunkio import direct_chunks, whole_chunks
from .image import ZarrImage
from .layout import (
    ATTR_KEY,
    DEFAULT_CHUNKS,
    IMAGE_ARRAYS,
    LAYOUT_VERSION,
    Chunks,
    PathLike,
    check_box,
    check_group_name,
    check_pair,
    group_info,
    group_label,
    json_safe,
    member_array,
    open_root,
    require_attr,
    sub_group,
    tile_shape,
    utc_now,
    wcs_cards,
)

__all__ = ["create_image_arrays", "write_image", "write_tile"]

_FLOAT_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
_MASK_ZSTD_LEVEL = 1


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


def _lossless_float_dtype(values: np.ndarray) -> np.dtype:
    """float32 when it holds every value exactly, else float64."""
    if values.dtype == np.float32:
        return np.dtype(np.float32)
    # Strip by strip: the whole plane at once made two plane-sized temporaries (seconds
    # of page faults at 4096^2), and a float64 plane is mostly known from its first rows.
    flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
    rows = max(1, (1 << 18) // max(1, flat.shape[1]))
    for y in range(0, flat.shape[0], rows):
        block = flat[y : y + rows]
        if not np.array_equal(block.astype(np.float32), block, equal_nan=True):
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def _image_attrs(
    shape: tuple[int, int],
    tile: tuple[int, int],
    mask_planes: Mapping[str, int],
    cards: dict[str, Any] | None,
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
        "wcs": cards,
        "origin": list(origin),
        "psf_fwhm": fwhm,
        "meta": _meta_subset(meta),
        "created": utc_now(),
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
    tile = tile_shape(shape, chunks)
    planes = {"image": mi.image, "variance": mi.variance, "mask": mi.mask}
    dtypes = {name: _lossless_float_dtype(planes[name]) for name in ("image", "variance")}
    arrays = _create_planes(node, shape, tile, dtypes)
    for name, values in planes.items():
        arrays[name][...] = values.astype(arrays[name].dtype, copy=False)
    cards = wcs_cards(exposure.wcs)
    node.attrs[ATTR_KEY] = _image_attrs(
        shape, tile, mi.mask_planes, cards, origin, exposure.psf_fwhm, exposure.meta
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
    origin = check_pair(origin, "origin", positive=False)
    tile_shape(exposure.shape, chunks)  # check before anything is written
    target = Path(path).absolute()
    if group is None:
        _write_store(target, exposure, chunks, overwrite, origin)
        return ZarrImage.open(target)
    group = check_group_name(group)
    _write_group(target, group, exposure, chunks, overwrite, origin)
    return ZarrImage.open(target, group)


def settle_zarr_io(timeout: float = 60.0) -> None:
    """Wait (at most ``timeout`` s) for the writes zarr's IO thread still has in flight.

    After a KeyboardInterrupt in the thread that called zarr, the coroutines it had
    started keep running on zarr's event loop; this waits for them, so what they write
    can then be removed for good. A second interrupt stops the wait.
    """
    import asyncio

    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            await asyncio.wait(others)

    future = asyncio.run_coroutine_threadsafe(drain(), loop)
    try:
        future.result(timeout)
    except Exception:  # a timeout or a failed write: nothing more to wait for
        future.cancel()


def _write_store(
    target: Path, exposure: Exposure, chunks: Chunks, overwrite: bool, origin: tuple[int, int]
) -> None:
    check_parent(target)
    if os.path.lexists(target) and not overwrite:
        raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
    partial = sibling(target, "partial")
    try:
        root = zarr.open_group(store=str(partial), mode="w-", zarr_format=3)
        _fill_image_group(root, exposure, chunks, origin)
        publish(partial, target, overwrite)
    except OSError as exc:
        remove(partial)
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"failed to write {str(target)!r}: {exc}") from exc
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): zarr's IO thread is still writing this
        # plane's chunks into the partial store; removing it now would race with
        # them and leave it behind (with "Task was destroyed" noise at exit).
        settle_zarr_io()
        remove(partial)
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
        root = open_root(target, mode="r+")
    else:
        check_parent(target)
        root = zarr.open_group(store=str(target), mode="w-", zarr_format=3)
    if group in root:
        if not overwrite:
            raise StoreError(
                f"group {group!r} already exists in store {str(target)!r}; "
                "pass overwrite=True to replace it"
            )
        del root[group]
    _fill_image_group(root.create_group(group), exposure, chunks, origin)


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
    shape = check_pair(shape, "shape", positive=True)
    tile = tile_shape(shape, chunks)
    origin = check_pair(origin, "origin", positive=False)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"dtype of image and variance must be floating, got {dtype}")
    name = check_group_name(name)
    if name in root_group:
        raise StoreError(f"{name!r} already exists in group {root_group.path or '/'!r}")
    node = root_group.create_group(name)
    _create_planes(node, shape, tile, {"image": dtype, "variance": dtype})
    node.attrs[ATTR_KEY] = _image_attrs(
        shape, tile, mask_planes, wcs_cards(wcs_header), origin, None, meta
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
    group = None if group is None else check_group_name(group)
    where = group_label(location, group)
    node = sub_group(open_root(location, mode="r+"), group, location)
    info = group_info(node, where, "image")
    planes = _tile_planes(image, variance, mask)
    shape = tuple(require_attr(info, "shape", where))
    box = check_box((y0, y0 + planes[0].shape[0], x0, x0 + planes[0].shape[1]), shape)
    tile = tuple(require_attr(info, "chunks", where))
    if check_alignment:
        _check_aligned(box, shape, tile, where)
    for name, values in zip(IMAGE_ARRAYS, planes, strict=True):
        array = member_array(node, name, where)
        values = values.astype(array.dtype, copy=False)
        direct = direct_chunks(array) if whole_chunks(box, shape, array.chunks) else None
        if direct is not None:
            direct.write_region(box[0], box[2], values)
        else:
            array[box[0] : box[1], box[2] : box[3]] = values
        chunk_cache().discard(info.get("uid"), name, box, tile)


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
