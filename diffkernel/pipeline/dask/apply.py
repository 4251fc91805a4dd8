"""Recreate a difference from a published result's stored solution, without refitting.

:func:`apply_result` reads the kernel and background solution, the filters
(decorrelation, score) and the run's settings (direction, tile size, FFT precision)
from a result store, checks that the inputs are the very ones the result was made
from (the SHA-256 of every plane, as its provenance records them), and runs only the
tile stage of :func:`~diffkernel.pipeline.dask.driver.run_pair` on them (after the
warp and the mesh backgrounds, when the result had them). The same tasks on the same
pixels with the same solution give the stored difference bit for bit (with the same
package version). The fit, candidate table, quality verdict and z histograms are
copied from the result they recreate.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ...config import MakeKernelConfig
from ...errors import InputError
from ...io.zarr.filters import create_score, write_filters
from ...io.zarr.results import ResultWriter, open_result
from ...io.zarr.workspace import ZarrWorkspace
from ...kernel.subtract import SubtractionKernels, merged_mask_planes
from .cluster import connect
from .driver import PairRun, open_image
from .prefit import ClusterWork
from .provenance import provenance as run_provenance
from .runner import TaskRunner
from .tasks import device_ready, tile_task

__all__ = ["apply_result", "check_inputs"]


def check_inputs(stored_provenance: dict, checksums: dict, shapes: dict, where: str) -> None:
    """Refuse inputs whose shape or plane checksums differ from a result's provenance.

    Parameters
    ----------
    stored_provenance : dict
        The result's provenance (``inputs`` → ``science``/``template`` → ``sha256``).
    checksums : dict
        SHA-256 by ``(image, plane)`` of the inputs given.
    shapes : dict
        Shape by image name of the inputs given.
    where : str
        The result, for messages.

    Raises
    ------
    InputError
        Naming the first input (and plane) that differs.
    """
    inputs = stored_provenance.get("inputs") or {}
    for who in ("science", "template"):
        record = inputs.get(who)
        if not record or "sha256" not in record:
            raise InputError(
                f"{where} records no checksums of its {who} image; it cannot be recreated "
                "safely (rerun subtract)"
            )
        if list(record.get("shape", [])) != list(shapes[who]):
            raise InputError(
                f"the {who} image has shape {tuple(shapes[who])}, but {where} was made from "
                f"one of shape {tuple(record['shape'])}: give the same {who} image"
            )
        for plane in ("image", "variance", "mask"):
            if record["sha256"].get(plane) != checksums[(who, plane)]:
                raise InputError(
                    f"the {who} image's {plane} plane differs from the one {where} was made "
                    f"from (SHA-256 mismatch): give the same {who} image"
                )


def apply_result(
    result,
    science,
    template,
    out: str | os.PathLike,
    *,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> PairRun:
    """Recreate the difference (and score image) of ``result`` on its inputs, into ``out``.

    Parameters
    ----------
    result : path
        A complete result store (:func:`~diffkernel.pipeline.dask.driver.run_pair`,
        ``diffkernel subtract``).
    science, template : ZarrImage, path or (path, group)
        The inputs the result was made from, as stored (their checksums must match).
    out : path
        Result store to write: the recreated difference, and the result's solution,
        candidates, filters, metadata and verdict.
    client, scheduler, n_workers
        Where to run (see :func:`diffkernel.pipeline.dask.cluster.connect`).
    overwrite : bool
        Replace an existing ``out``.
    progress : bool
        Show dask's progress bars.

    Returns
    -------
    PairRun
        The recreated result, read back, and the timings.

    Raises
    ------
    InputError
        If an input differs from the one the result was made from.
    StoreError
        If ``result`` is not a complete result store, or ``out`` exists.
    """
    started = time.perf_counter()
    stored = open_result(result)
    where = f"result {str(stored.path)!r}"
    meta = dict(stored.metadata)
    cfg = MakeKernelConfig.from_dict(stored.config)
    sci = open_image(science, "science")
    tmpl = open_image(template, "template")
    tile = int(meta.get("tile_size") or 1024)
    precision = meta.get("fft_precision", "single")
    device = meta.get("device", "cpu")
    mode = meta.get("mode", "convolveTemplate")
    filters = stored.filters
    writer = ResultWriter(out, overwrite=overwrite)
    try:
        with connect(client, scheduler, n_workers, progress) as cl:
            if device != "cpu":
                cl.run(device_ready, device)
            runner = TaskRunner(cl, progress)
            workspace = ZarrWorkspace(str(writer.partial_path))
            work = ClusterWork(runner, cfg, tmpl, sci, workspace)
            checksums = work.validated()
            shapes = {"science": sci.shape, "template": tmpl.shape}
            check_inputs(stored.provenance, checksums, shapes, where)
            if meta.get("aligned"):
                work.align()
            if cfg.kernel.active.useAfwBackground:
                work.remove_backgrounds()
            if mode == "convolveScience":
                work.swap_roles()
            reader = work.reader
            planes = merged_mask_planes(reader.science.mask_planes, reader.template.mask_planes)
            diff = writer.create_difference(
                sci.shape, stored.difference.chunks, planes, sci.wcs, sci.origin, sci.meta
            )
            if filters is not None and filters.score:
                create_score(writer.partial_path, diff)
            t0 = time.perf_counter()
            kernels = runner.scatter(SubtractionKernels(stored.solution, precision, device))
            scattered = runner.scatter(filters) if filters is not None else None
            tile_reader = runner.scatter(reader.reading(cached=False))
            sign = -1.0 if mode == "convolveScience" else 1.0
            ny, nx = sci.shape
            futures = [
                runner.submit(
                    tile_task,
                    kernels,
                    tile_reader,
                    planes,
                    workspace,
                    y0,
                    min(y0 + tile, ny),
                    x0,
                    min(x0 + tile, nx),
                    sign,
                    None,
                    scattered,
                    name=f"apply-tile-{y0}-{x0}",
                )
                for y0 in range(0, ny, tile)
                for x0 in range(0, nx, tile)
            ]
            runner.wait(futures, "tiles", t0, gather=False)
            writer.write_fit(stored.solution, stored.candidates)
            if filters is not None:
                write_filters(writer.partial_path, filters.attributes(), filters.arrays())
            timings = dict(runner.timings)
            timings["total"] = time.perf_counter() - started
            record: dict[str, Any] = run_provenance(sci, tmpl, checksums)
            record["recreated_from"] = {
                "path": str(stored.path),
                "provenance": stored.provenance,
            }
            meta["recreated"] = {"from": str(stored.path), "timings": timings}
            path = writer.finalize(
                None,
                None,
                meta,
                stored.config,
                record,
                quality=stored.quality,
                z_histograms=stored.z_histograms,
            )
    except BaseException:
        writer.abort()
        raise
    return PairRun(open_result(Path(path)), timings, {"recreated_from": str(stored.path)})
