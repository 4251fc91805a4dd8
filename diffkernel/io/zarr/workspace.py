"""A run's working store: what the Dask executor writes and reads beside its result.

The executor's tasks write the warped template, the mesh backgrounds and the tiles of
the difference into the run's partial result store, and read them back, always through
a :class:`ZarrWorkspace` (for the store) or a :class:`StoredPlane` (for one 2-D plane
in it). Both are small and picklable, so they travel to the workers, and the pipeline
never opens Zarr itself: another backend (an object store, FITS memory maps) is a class
with the same methods (:class:`diffkernel.pipeline.dask.storage.Workspace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .image import ZarrImage
from .write import create_image_arrays, write_tile

__all__ = ["StoredPlane", "ZarrWorkspace"]


@dataclass(frozen=True)
class StoredPlane:
    """A 2-D float plane of a store, read region by region (any worker).

    Attributes
    ----------
    path : str
        The store.
    name : str
        The array's path in the store.
    """

    path: str
    name: str

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``[y0:y1, x0:x1]`` as float64."""
        import zarr

        array = zarr.open_array(self.path, path=self.name, mode="r")
        return np.asarray(array[y0:y1, x0:x1], dtype=np.float64)


@dataclass(frozen=True)
class ZarrWorkspace:
    """The partial result store of one run, as the executor's tasks use it.

    Attributes
    ----------
    path : str
        The partial store (:attr:`diffkernel.io.zarr.results.ResultWriter.partial_path`).
    """

    path: str

    def create_image(
        self,
        name: str,
        like: ZarrImage,
        chunks: tuple[int, int],
        mask_planes: dict[str, int],
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Empty float64 image group ``name`` on the grid (shape, WCS, origin) of ``like``."""
        import zarr

        create_image_arrays(
            zarr.open_group(self.path, mode="r+"),
            name,
            like.shape,
            chunks,
            mask_planes,
            wcs_header=like.wcs,
            origin=like.origin,
            dtype=np.float64,
            meta=meta,
        )

    def open_image(self, name: str) -> ZarrImage:
        """The image group ``name``, for reading."""
        return ZarrImage.open(self.path, name)

    def write_image_tile(
        self,
        name: str,
        y0: int,
        x0: int,
        image: np.ndarray,
        variance: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """One region of whole chunks of image group ``name`` (see :func:`write_tile`)."""
        write_tile(self.path, name, y0, x0, image, variance, mask)

    def write_plane(self, name: str, values: np.ndarray, chunks: tuple[int, int]) -> StoredPlane:
        """Write a whole 2-D float64 plane as array ``name``; a reference to read it."""
        import zarr

        root = zarr.open_group(self.path, mode="r+")
        array = root.create_array(name, shape=values.shape, chunks=chunks, dtype=np.float64)
        array[:] = values
        return StoredPlane(self.path, name)
