"""The filters of the difference on a cluster: the blocks' noise as tasks, then the filters.

The decorrelation filter and the score PSF of each block
(:mod:`diffkernel.kernel.decorrelate`) need the noise level of both images over the
block: one small task per block reads it (alongside the cells, once the inputs are
checked), and the driver builds the filters from the solution as soon as the
reduction is back, before the tiles start. The tiles then get the filters, kilobytes.
"""

from __future__ import annotations

import time
from typing import Any

from ...kernel.decorrelate import DifferenceFilters, block_boxes
from ...kernel.subtract import filters_from_noise
from .runner import TaskRunner
from .tasks import ZarrPair, noise_task

__all__ = ["FilterStage", "filters_summary"]


class FilterStage:
    """The noise tasks of a run, submitted at once; :meth:`filters` waits for them.

    Parameters
    ----------
    runner : TaskRunner
        The run's tasks.
    reader : ZarrPair
        The pair as convolved (``template`` the convolved image).
    shape : tuple of int
        ``(ny, nx)``.
    decorrelate, score : bool
        What the filters are for; no task when neither.
    """

    def __init__(
        self, runner: TaskRunner, reader: ZarrPair, shape, decorrelate: bool, score: bool
    ) -> None:
        self.runner = runner
        self.shape = tuple(shape)
        self.decorrelate = bool(decorrelate)
        self.score = bool(score)
        self.started = time.perf_counter()
        self.futures = []
        if self.decorrelate or self.score:
            self.futures = [
                runner.submit(noise_task, reader, *box, name=f"noise-{box[0]}-{box[2]}")
                for box in block_boxes(self.shape)
            ]

    def filters(self, solution, mode: str, science_fwhm: float | None) -> DifferenceFilters | None:
        """The filters of ``solution`` (None when neither decorrelation nor score)."""
        if not self.futures:
            return None
        noise = self.runner.wait(self.futures, "noise", self.started)
        return filters_from_noise(
            solution, self.shape, noise, mode, self.decorrelate, self.score, science_fwhm
        )


def filters_summary(filters: DifferenceFilters | None) -> dict[str, Any]:
    """What the metadata says of the filters (the arrays are in the group ``filters``)."""
    if filters is None:
        return {"decorrelated": False, "score": False}
    scale = filters.variance_scale
    return {
        "decorrelated": filters.decorrelate,
        "score": filters.score,
        "block": filters.block,
        "n_blocks": int(scale.size),
        "kernel_size": int(filters.kernels.shape[-1]),
        "mask_half": int(filters.mask_half),
        "variance_scale": [float(scale.min()), float(scale.max())],
    }
