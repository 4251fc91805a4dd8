"""The check stage: validate both inputs and hash their planes, tile by tile.

One task per :data:`CHECK_TILE`-px tile reads it once, in its stored dtype, counts
what the validation needs (NaN, variance, usable pixels) and hashes each plane.
:class:`InputCheck` submits them and combines their outcome: the counts into the
same refusal :meth:`diffkernel.image.MaskedImage.validate` gives in memory, the
digests into one SHA-256 per plane for the result's provenance.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

import numpy as np

from ...errors import StoreError
from ...image import pixel_validation_counts, plane_bits, report_validation, unusable_planes
from ...io.zarr.image import ZarrImage
from .runner import TaskRunner

__all__ = [
    "CHECK_TILE",
    "InputCheck",
    "check_tile",
    "check_named_tiles",
    "plane_digest",
    "combine_digests",
]

#: Tile side of the check stage (fixed: the checksums must not depend on tiling).
CHECK_TILE = 1024

Box = tuple[int, int, int, int]


def check_tile(
    image: ZarrImage, y0: int, y1: int, x0: int, x1: int, exempt
) -> tuple[dict[str, int], dict[str, str]]:
    """Validation counts of one tile, and the SHA-256 of each of its planes.

    The planes are checked and hashed in their stored dtype: no float64 copy, and the
    digest covers the bytes of the store's values (with their dtype).
    """
    planes = image.read_planes(y0, y1, x0, x1)
    digests = {}
    for name, values in planes.items():
        values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        if values.dtype.kind in "iu" and not values.any():  # an empty mask tile: the usual case
            digests[name] = _zeros_digest(values.dtype.str, values.shape)
        else:
            digests[name] = plane_digest(values)
    counts = pixel_validation_counts(
        planes["image"],
        planes["variance"],
        planes["mask"],
        plane_bits(image.mask_planes, exempt),
        unusable_planes(image.mask_planes, exempt),
    )
    if counts["nan_image"] or counts["nonfinite_variance"]:
        # A chunk file gone reads as NaN: name it, not "N pixels are NaN".
        box = (y0, y1, x0, x1)
        missing = [p for n in ("image", "variance") for p in image.missing_chunks(n, *box)]
        if missing:
            raise StoreError(
                f"{image.path}: {len(missing)} chunk file(s) missing, e.g. {missing[0]!r}; the "
                "store is incomplete or damaged: write it again (diffkernel ingest)"
            )
    return counts, digests


def plane_digest(values: np.ndarray) -> str:
    """SHA-256 of a contiguous little-endian tile: its dtype string, then its bytes."""
    sha = hashlib.sha256(values.dtype.str.encode())
    sha.update(memoryview(values).cast("B"))
    return sha.hexdigest()


@functools.lru_cache(maxsize=8)
def _zeros_digest(dtype: str, shape: tuple[int, int]) -> str:
    """:func:`plane_digest` of integer zeros (computed once per dtype and shape)."""
    return plane_digest(np.zeros(shape, dtype=np.dtype(dtype)))


def check_named_tiles(
    images: dict[str, ZarrImage], names: list[str], y0: int, y1: int, x0: int, x1: int, exempt
) -> list[tuple[dict[str, int], dict[str, str]]]:
    """:func:`check_tile` of the same tile of the images ``names``, in one task.

    ``images`` is a scattered dict, so each worker keeps their arrays open.
    """
    return [check_tile(images[name], y0, y1, x0, x1, exempt) for name in names]


def combine_digests(image: ZarrImage, name: str, tiles: list[dict[str, str]]) -> str:
    """SHA-256 over the shape and the tiles' digests in row-major tile order."""
    digest = hashlib.sha256(f"{name} {image.shape} tiles {CHECK_TILE}".encode())
    for tile in tiles:
        digest.update(tile[name].encode())
    return digest.hexdigest()


def check_grid(shape: tuple[int, int]) -> list[Box]:
    """The check tiles ``(y0, y1, x0, x1)`` of an image, in row-major order."""
    return [
        (y0, min(y0 + CHECK_TILE, shape[0]), x0, min(x0 + CHECK_TILE, shape[1]))
        for y0 in range(0, shape[0], CHECK_TILE)
        for x0 in range(0, shape[1], CHECK_TILE)
    ]


class InputCheck:
    """The check of a run's inputs: submitted at once, waited for when first needed.

    Parameters
    ----------
    runner : TaskRunner
        The run's tasks; the check's wall time goes into its ``timings["check"]``.
    images : dict
        ``{"template": ZarrImage, "science": ZarrImage}``, the inputs as stored.
    exempt : tuple of str
        Mask planes the validation does not count as data
        (:func:`diffkernel.pipeline.stages.exempt_planes`).

    Attributes
    ----------
    futures : dict
        The check task of each tile, by tile.
    """

    def __init__(self, runner: TaskRunner, images: dict[str, ZarrImage], exempt) -> None:
        self.runner = runner
        self.images = images
        self.exempt = exempt
        self.started = time.perf_counter()
        self.grids = {who: check_grid(image.shape) for who, image in images.items()}
        # One task per tile checks it in both images when they share the grid.
        self.owners: dict[Box, list[str]] = {}
        for who, boxes in self.grids.items():
            for box in boxes:
                self.owners.setdefault(box, []).append(who)
        # The images go to every worker once, so each keeps its arrays open. (In a list:
        # a scattered dict would name its futures by its keys, shared by concurrent runs.)
        self.scattered = runner.scatter([images])[0]
        self.futures = {box: self._submit(box) for box in self.owners}
        self.checksums: dict[tuple[str, str], str] | None = None

    def _submit(self, box: Box, attempt: int = 0):
        suffix = f"-again{attempt}" if attempt else ""
        return self.runner.submit(
            check_named_tiles,
            self.scattered,
            self.owners[box],
            *box,
            self.exempt,
            name=f"check-{box[0]}-{box[2]}{suffix}",
        )

    def validated(self) -> dict[tuple[str, str], str]:
        """Wait for the check (once): raise on invalid inputs, else their checksums.

        The checksums are by ``(image, plane)``: ``("science", "image")`` and so on.
        """
        if self.checksums is not None:
            return self.checksums
        done = self._gather()
        checksums = {}
        for who, image in self.images.items():
            results = [done[box][self.owners[box].index(who)] for box in self.grids[who]]
            counts = [r[0] for r in results]
            total = {k: sum(c[k] for c in counts) for k in counts[0]}
            report_validation(who, total, self.exempt)
            for name in ("image", "variance", "mask"):
                checksums[(who, name)] = combine_digests(image, name, [r[1] for r in results])
        self.runner.timings["check"] = time.perf_counter() - self.started
        self.checksums = checksums
        return checksums

    def _gather(self) -> dict[Box, Any]:
        """The check tasks' results by tile.

        The cells run meanwhile, so a worker may be lost while a check result is
        being fetched from it; distributed can then cancel that future ("already
        forgotten") instead of computing it again. Such a tile is checked again
        (:meth:`TaskRunner.gather_redoing`).
        """
        return {
            box: self.runner.gather_redoing(
                future, lambda attempt, box=box: self._submit(box, attempt)
            )
            for box, future in self.futures.items()
        }
