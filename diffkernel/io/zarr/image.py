"""Reading image groups: :class:`ZarrImage`, an image group read region by region.

The layout read is described in :mod:`diffkernel.io.zarr.layout`; :meth:`ZarrImage.open`
checks it all (attribute, arrays, dtypes, shapes, tile grid) before any pixel is read, so a
wrong store fails at once with a message naming what is wrong. Regions are read straight
from the chunk files where :mod:`diffkernel.io.zarr.chunkio` can (else through zarr), or,
with ``cached=True``, through the per-process chunk cache of
:mod:`diffkernel.io.zarr.cache`. Image groups are written by :mod:`diffkernel.io.zarr.write`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from astropy.wcs import WCS

from ...errors import InputError, StoreError
from ...image import Exposure, MaskedImage
from .cache import chunk_cache, opened_arrays
from .chunkio import DirectChunks, chunk_pieces, direct_chunks
from .layout import (
    ATTR_KEY,
    IMAGE_ARRAYS,
    STORE_ERRORS,
    PathLike,
    check_box,
    check_group_name,
    group_info,
    group_label,
    member_array,
    open_root,
    require_attr,
    sub_group,
    wcs_from_cards,
)

__all__ = ["ZarrImage"]


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
        group = None if group is None else check_group_name(group)
        where = group_label(location, group)
        node = sub_group(open_root(location), group, location)
        info = group_info(node, where, "image")
        _check_image_info(info, where)
        arrays = {name: member_array(node, name, where) for name in IMAGE_ARRAYS}
        _check_arrays(arrays, info, where)
        return cls(location, group, info, arrays["image"].dtype, arrays)

    def _array(self, name: str) -> zarr.Array:
        array = self._arrays.get(name)
        if array is None:
            # Opened arrays are kept per process, keyed by the group's uid (new on every
            # write of the group): a worker reopens nothing from one run to the next.
            key = (str(self._path), self._group, name, self.uid)
            array = opened_arrays().get(key)
            if array is None:
                node_path = name if self._group is None else f"{self._group}/{name}"
                try:
                    array = zarr.open_array(
                        store=str(self._path), path=node_path, mode="r", zarr_format=3
                    )
                except STORE_ERRORS as exc:
                    raise StoreError(
                        f"{group_label(self._path, self._group)}: cannot open array {name!r}: {exc}"
                    ) from exc
                opened_arrays().put(key, array)
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
        return wcs_from_cards(self._info.get("wcs"), group_label(self._path, self._group))

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
        box = check_box((y0, y1, x0, x1), self.shape)
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
            box = check_box((y0, y1, x0, x1), self.shape)
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
        box = check_box((y0, y1, x0, x1), self.shape)
        return {name: self._read_direct(name, box) for name in IMAGE_ARRAYS}

    def missing_chunks(self, name: str, y0: int, y1: int, x0: int, x1: int) -> list[str]:
        """Chunk files of plane ``name`` over the region that are absent from the store.

        Zarr reads an absent chunk as the fill value (NaN for the float planes) and
        leaves out chunks that hold only it, so an absent image or variance chunk
        whose pixels are not masked NO_DATA is a damaged store. Empty when the store
        is not a local one this package reads directly (then it cannot tell).
        """
        reader = self._reader(name)
        if reader is None:
            return []
        box = check_box((y0, y1, x0, x1), self.shape)
        return [
            str(reader.directory / reader.key((iy, ix)))
            for iy, ix, _ in chunk_pieces(box, self.chunks)
            if not (reader.directory / reader.key((iy, ix))).exists()
        ]

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
        cache = chunk_cache()
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
        require_attr(info, key, where)
    for key in ("shape", "chunks"):
        value = info[key]
        ok = isinstance(value, list) and len(value) == 2
        if not ok or not all(type(v) is int and v > 0 for v in value):
            raise StoreError(f"{where}: attribute {ATTR_KEY}.{key} must be two positive integers")
    if not isinstance(info["mask_planes"], dict):
        raise StoreError(f"{where}: attribute {ATTR_KEY}.mask_planes must be a mapping")
    fwhm = info.get("psf_fwhm")
    if fwhm is not None and (type(fwhm) not in (int, float) or not np.isfinite(fwhm) or fwhm <= 0):
        raise StoreError(
            f"{where}: attribute {ATTR_KEY}.psf_fwhm must be a positive number of pixels "
            f"(or absent), got {fwhm!r}"
        )


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
