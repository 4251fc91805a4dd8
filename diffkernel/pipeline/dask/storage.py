"""The storage interface of the Dask executor: what its tasks write and read.

The executor publishes through :class:`~diffkernel.io.zarr.results.ResultWriter`
(create the difference, write the fit, finalize or abort) and hands the products of
its tasks to a :class:`Workspace`: the warped template, the mesh backgrounds (as
:class:`Plane` references that workers read region by region) and the difference's
tiles. :class:`diffkernel.io.zarr.workspace.ZarrWorkspace` implements it on the run's
partial Zarr store; another backend implements these methods, and nothing in
:mod:`diffkernel.pipeline` changes.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["Plane", "Workspace"]


class Plane(Protocol):
    """A stored 2-D float plane; picklable, read in any worker."""

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``[y0:y1, x0:x1]`` as float64."""
        ...


class Workspace(Protocol):
    """The run's working store; picklable, used in the driver and in the workers."""

    def create_image(
        self,
        name: str,
        like: Any,
        chunks: tuple[int, int],
        mask_planes: dict[str, int],
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Create an empty image group on the grid of ``like`` (an input image)."""
        ...

    def open_image(self, name: str) -> Any:
        """An image group for reading (``read``, ``read_stored``, ``shape``, ...)."""
        ...

    def write_image_tile(
        self,
        name: str,
        y0: int,
        x0: int,
        image: np.ndarray,
        variance: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """Write one region (whole chunks) of an image group's three planes."""
        ...

    def write_plane(self, name: str, values: np.ndarray, chunks: tuple[int, int]) -> Plane:
        """Write a whole 2-D plane; a reference to read it back."""
        ...
