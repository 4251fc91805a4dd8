"""The fit as Dask tasks: the cells in groups, then one reduction.

The cells are grouped by the block of the image they start in (a worker's chunk
cache then stays warm) and the largest groups go first; none of that changes the
result, since every cell is fitted on its own and the reduction puts candidates
back in cell order (:func:`diffkernel.pipeline.cells.reduce_cells`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import NoCandidatesError
from ...io.zarr.image import ZarrImage
from ...kernel.spatial import SpatialSolution
from ..cells import SourcePlacement
from ..stages import PreparedFit
from .runner import TaskRunner
from .tasks import ZarrPair, cells_task, reduce_task, solution_of

__all__ = ["CellTasks", "Reduction", "submit_cells", "cell_order", "cell_groups"]

Cell = tuple[int, np.ndarray]


@dataclass
class CellTasks:
    """The cells' tasks of a run.

    Attributes
    ----------
    plan : Future
        The scattered :class:`~diffkernel.pipeline.cells.CellPlan`.
    futures : list
        One task per group of cells.
    started : float
        ``time.perf_counter()`` when the cells were ordered.
    n_cells, n_tasks : int
        Cells with candidates, and the tasks they were grouped into.
    """

    plan: Any
    futures: list
    started: float
    n_cells: int
    n_tasks: int


def submit_cells(
    runner: TaskRunner,
    prepared: PreparedFit,
    reader: ZarrPair,
    science: ZarrImage,
    tile: int,
    cells_per_task: int | None,
) -> CellTasks:
    """Submit the cells' fits, grouped (:func:`cell_groups`), largest groups first.

    Raises
    ------
    NoCandidatesError
        When no source has its stamp inside the image.
    """
    placement = prepared.placement
    kcfg = prepared.plan.kernel_config
    plan = runner.scatter(prepared.plan)
    cell_reader = runner.scatter(reader.reading(stored=True))
    t0 = time.perf_counter()
    cells = cell_order(placement.cells(), kcfg, science.shape, science.chunks)
    t_submit = time.perf_counter()
    groups = cell_groups(cells, kcfg, science.shape, (tile, tile), cells_per_task)
    # Largest groups first (by sources to measure), so that no worker is left with
    # a big one at the end while the others wait; the reduction restores cell order.
    sizes = [sum(len(idx) for _, idx in group) for group in groups]
    groups = [groups[i] for i in sorted(range(len(groups)), key=lambda i: -sizes[i])]
    futures = [
        runner.submit(
            cells_task,
            plan,
            [(cell, idx, placement.xc[idx], placement.yc[idx]) for cell, idx in group],
            cell_reader,
            name=f"cell-{group[0][0]}",
        )
        for group in groups
    ]
    runner.timings["cells_submit"] = time.perf_counter() - t_submit
    if not futures:
        raise NoCandidatesError(
            f"none of the {len(placement.x)} sources has its stamp inside the image; "
            "no kernel candidates"
        )
    return CellTasks(plan, futures, t0, len(cells), len(groups))


def chunk_of(cell: int, kcfg, shape: tuple[int, int], chunks) -> tuple[int, int]:
    """The chunk ``(row, column)`` of the image (of side ``chunks``) a cell starts in."""
    n_cells_x = -(-shape[1] // int(kcfg.sizeCellX))
    cy, cx = divmod(cell, n_cells_x)
    return cy * int(kcfg.sizeCellY) // chunks[0], cx * int(kcfg.sizeCellX) // chunks[1]


def cell_order(cells: list[Cell], kcfg, shape: tuple[int, int], chunks) -> list[Cell]:
    """Cells sorted by the chunk they start in, so a worker's cache stays warm."""
    return sorted(cells, key=lambda item: (chunk_of(item[0], kcfg, shape, chunks), item[0]))


def cell_groups(
    cells: list[Cell], kcfg, shape: tuple[int, int], block, cells_per_task: int | None
) -> list[list[Cell]]:
    """Cells per task: ``cells_per_task`` of them, or (default) those of one block."""
    if cells_per_task is not None:
        n = cells_per_task
        return [cells[i : i + n] for i in range(0, len(cells), n)]
    groups: dict[tuple[int, int], list] = {}
    for item in cells:
        groups.setdefault(chunk_of(item[0], kcfg, shape, block), []).append(item)
    return list(groups.values())


class Reduction:
    """The reduction task of a run, made again when its result is lost.

    Only the kernels come back before the tiles start (kilobytes, :meth:`solution`);
    the candidate table follows while the tiles run (:meth:`outcome`).
    """

    def __init__(self, runner: TaskRunner, cells: CellTasks, placement: SourcePlacement) -> None:
        self.runner = runner
        self.args = (cells.plan, placement, *cells.futures)
        self.futures = [runner.submit(reduce_task, *self.args, name="reduce")]

    def again(self, attempt: int):
        """A new reduction future (the last one was cancelled)."""
        self.futures.append(
            self.runner.submit(reduce_task, *self.args, name=f"reduce-again{attempt}")
        )
        return self.futures[-1]

    def solution(self) -> SpatialSolution:
        """The kernel and background model."""
        submit = self.runner.submit

        def again(attempt: int):
            return submit(solution_of, self.again(attempt), name=f"solution-again{attempt}")

        return self.runner.gather_redoing(
            submit(solution_of, self.futures[-1], name="solution"), again
        )

    def outcome(self):
        """``(outcome, candidates, metadata)``: :func:`~diffkernel.pipeline.cells.reduce_cells`."""
        result = self.runner.gather_redoing(self.futures[-1], self.again)
        self.futures, self.args = [], ()  # the cells' results can go now
        return result
