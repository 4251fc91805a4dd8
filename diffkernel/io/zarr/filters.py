"""The difference's filters and score image in a result store.

A result whose difference was decorrelated, or that has a score image, records the
filters in the group ``filters``: its attribute ``filters`` holds the scalars
(:meth:`diffkernel.kernel.decorrelate.DifferenceFilters.attributes`) and its arrays the
per-block decorrelation kernels, noise levels, variance factors and score PSFs. The
score image is the image group ``score`` beside ``difference``: the score in ``image``,
1 in ``variance`` (it is in units of sigma; NaN where it is undefined) and the
difference's mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .image import ZarrImage
from .layout import PathLike, json_safe
from .write import create_image_arrays

__all__ = ["write_filters", "read_filters", "create_score", "open_score", "SCORE_GROUP"]

#: The score image's group in a result store.
SCORE_GROUP = "score"
_FILTERS_GROUP = "filters"


def write_filters(path: PathLike, attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]):
    """Write the group ``filters`` into the (partial) store at ``path``."""
    root = zarr.open_group(str(path), mode="r+")
    node = root.create_group(_FILTERS_GROUP)
    for name, values in arrays.items():
        values = np.asarray(values, dtype=np.float64)
        chunks = tuple(max(1, n) for n in values.shape)
        array = node.create_array(name, shape=values.shape, chunks=chunks, dtype=values.dtype)
        array[...] = values
    node.attrs["filters"] = json_safe(dict(attrs))


def read_filters(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The filters' attributes and arrays of a store; None when it has none."""
    root = zarr.open_group(str(Path(path)), mode="r")
    if _FILTERS_GROUP not in root:
        return None
    node = root[_FILTERS_GROUP]
    arrays = {name: np.asarray(array[...]) for name, array in node.arrays()}
    return dict(node.attrs["filters"]), arrays


def create_score(path: PathLike, like: ZarrImage) -> None:
    """Create the empty float32 image group ``score`` on the grid of ``like`` (the difference)."""
    root = zarr.open_group(str(path), mode="r+")
    create_image_arrays(
        root,
        SCORE_GROUP,
        like.shape,
        like.chunks,
        like.mask_planes,
        like.wcs,
        like.origin,
        np.float32,
        {"BUNIT": "S/N", "COMMENT": "difference cross-correlated with its PSF, in sigma"},
    )


def open_score(path: PathLike) -> ZarrImage | None:
    """The score image group of a store; None when it has none."""
    root = zarr.open_group(str(Path(path)), mode="r")
    return ZarrImage.open(path, SCORE_GROUP) if SCORE_GROUP in root else None
