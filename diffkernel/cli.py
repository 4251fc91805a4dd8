"""Command-line interface: ``diffkernel ingest | subtract | batch | inspect | demo``.

Each command has ``--help``. Errors of the user's making (bad input, config or store)
print one line naming the problem and exit with status 2; an incomplete result store
makes ``inspect`` exit with status 1. A result whose quality verdict is ``fail``
(:mod:`diffkernel.quality`) is written all the same, and ``subtract`` (and ``batch``,
when no pair crashed) exit with status 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .errors import DiffkernelError

__all__ = ["main", "EXIT_QUALITY_FAIL"]

#: Exit status of a run whose result was written but judged ``fail``.
EXIT_QUALITY_FAIL = 3


def _float32(exposure):
    """The exposure with float32 pixel values, as cameras deliver them."""
    from .image import Exposure, MaskedImage

    mi = exposure.masked_image
    return Exposure(
        MaskedImage(
            mi.image.astype(np.float32), mi.variance.astype(np.float32), mi.mask, mi.mask_planes
        ),
        exposure.wcs,
        exposure.psf_fwhm,
        dict(exposure.meta),
    )


def _demo(args: argparse.Namespace) -> int:
    from .image import Exposure
    from .io.fits import write_exposure
    from .io.zarr.write import write_image
    from .pipeline.dask.driver import run_pair
    from .simulate import make_pair

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pair = make_pair((args.size, args.size), seed=args.seed, template_depth=4, n_variable=5)
    inputs = out / "pair.zarr"
    # The demo owns its directory: a rerun replaces what an earlier one wrote.
    write_image(inputs, _float32(pair.template), group="template", overwrite=True)
    write_image(inputs, _float32(pair.science), group="science", overwrite=True)
    t1 = time.perf_counter()
    run = run_pair(
        (inputs, "science"),
        (inputs, "template"),
        out / "result.zarr",
        scheduler=args.scheduler,
        n_workers=args.workers,
        overwrite=True,
        progress=not args.quiet,
    )
    t2 = time.perf_counter()
    result = run.result
    diff = result.difference.read(0, args.size, 0, args.size)
    write_exposure(
        out / "difference.fits", Exposure(diff, wcs=result.difference.wcs), overwrite=True
    )
    result.candidates.write(out / "candidates.ecsv", overwrite=True)
    from .io.zarr.image import ZarrImage
    from .plots import write_plots

    plots = write_plots(
        result,
        out / "plots",
        template=ZarrImage.open(inputs, "template"),
        science=ZarrImage.open(inputs, "science"),
    )
    summary = {
        **run.summary,
        "kernel": result.metadata.get("basis"),
        "notes": result.metadata.get("notes", []),
        "timing_s": {"simulate_and_store": t1 - t0, "run": t2 - t1, **run.timings},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    from .quality import describe

    print(describe(run.quality))
    print(
        f"wrote {out / 'result.zarr'}, {out / 'difference.fits'}, "
        f"{out / 'candidates.ecsv'}, {out / 'summary.json'} and {len(plots)} plots in "
        f"{out / 'plots'}"
    )
    return 0


def _load_config(path: str | None):
    """The subtraction defaults (a fitted background), updated by the config file."""
    from .config import MakeKernelConfig

    base = MakeKernelConfig.default_subtraction()
    cfg = base if path is None else MakeKernelConfig.from_file(path, base=base)
    cfg.validate()
    return cfg


def _ingest(args: argparse.Namespace) -> int:
    from .io.inputs import ingest

    image = ingest(args.input, args.output, chunks=args.chunks, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: {image.shape[1]}x{image.shape[0]} {image.dtype} in "
        f"{image.chunks[1]}x{image.chunks[0]} chunks, mask planes {sorted(image.mask_planes)}"
    )
    return 0


def _subtract(args: argparse.Namespace) -> int:
    import shutil
    import uuid

    from astropy.table import Table

    from .image import Exposure
    from .io.fits import write_exposure
    from .io.inputs import open_input
    from .pipeline.dask.driver import run_pair

    cfg = _load_config(args.config)
    out = Path(args.out)
    sources = Table.read(args.sources) if args.sources else None
    work = out.parent / f".{out.name}.inputs-{uuid.uuid4().hex[:8]}"
    try:
        science = open_input(args.science, work, "science", args.chunks)
        template = open_input(args.template, work, "template", args.chunks)
        run = run_pair(
            science,
            template,
            out,
            config=cfg,
            sources=sources,
            scheduler=args.scheduler,
            n_workers=args.workers,
            tile_size=args.tile_size,
            mode=args.mode,
            precision=args.fft_precision,
            device=args.device,
            preconvolved=args.preconvolved,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        if args.plots:
            from .plots import write_plots

            write_plots(run.result, args.plots, template=template, science=science)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from .quality import describe, fits_cards

    if args.fits_out:
        diff = run.result.difference
        ny, nx = diff.shape
        write_exposure(
            args.fits_out,
            Exposure(diff.read(0, ny, 0, nx), wcs=diff.wcs),
            overwrite=args.overwrite,
            extra_header=fits_cards(run.quality),
        )
    summary = {**run.summary, "timing_s": run.timings, "output": str(run.result.path)}
    print(json.dumps(summary, indent=2, default=str))
    print(describe(run.quality), file=sys.stderr)
    return EXIT_QUALITY_FAIL if run.quality.get("verdict") == "fail" else 0


def _inspect(args: argparse.Namespace) -> int:
    from .io.zarr.results import open_result, result_status

    status = result_status(args.store)
    if status != "complete":
        report = {"path": str(args.store), "status": status}
        if args.json:
            print(json.dumps(report))
        else:
            why = {
                "missing": "does not exist",
                "incomplete": "is INCOMPLETE: the run that wrote it did not finish",
                "foreign": "is not a diffkernel result store",
            }[status]
            print(f"{args.store} {why}")
        return 1
    result = open_result(args.store)
    meta = result.metadata
    table = result.candidates
    status_col = np.asarray(table["status"])
    good = status_col == "GOOD"
    ksum = np.asarray(table["kernel_sum"])[good]
    report = {
        "path": str(args.store),
        "status": "complete",
        "shape": list(result.difference.shape),
        "candidates": {
            "sources": len(table),
            "good": int(good.sum()),
            "status": {str(k): int((status_col == k).sum()) for k in sorted(set(status_col))},
            "rejected_at_vetting": meta.get("vetting_rejected", {}),
            "rejected_by_stage": meta.get("rejected", {}),
            "spatial_rounds": meta.get("rounds"),
        },
        "kernel": {
            **(meta.get("basis") or {}),
            "spatial_model": result.solution.kernel_functions.model_type,
            "spatial_order": result.solution.kernel_functions.order,
            "kernel_sum_range_good": [float(ksum.min()), float(ksum.max())] if ksum.size else None,
            "spatial_condition": result.solution.condition,
        },
        "residuals": meta.get("residuals"),
        "quality": result.quality,
        "notes": meta.get("notes", []),
        "timings_s": meta.get("timings"),
        "provenance": {
            k: result.provenance.get(k) for k in ("diffkernel", "created", "host", "inputs")
        },
    }
    if args.json:
        print(json.dumps(report, default=str))
    else:
        from .quality import describe

        print(json.dumps(report, indent=2, default=str))
        print(describe(result.quality))
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .batch import STATUS_FILE, run_batch

    cfg = _load_config(args.config)
    try:
        statuses = run_batch(
            args.manifest,
            args.out,
            config=cfg,
            scheduler=args.scheduler,
            n_workers=args.workers,
            concurrent=args.concurrent,
            chunks=args.chunks,
        )
    except KeyboardInterrupt:
        print(f"diffkernel batch: stopped; see {Path(args.out) / STATUS_FILE}", file=sys.stderr)
        return 130
    for s in statuses:
        line = f"{s.state:8s} {s.output}"
        if s.quality:
            line += f"  quality {s.quality}"
        if s.error:
            line += f"  ({s.error})"
        print(line)
    counts = {state: sum(s.state == state for s in statuses) for state in ("done", "skipped")}
    failed = sum(s.state == "failed" for s in statuses)
    bad = sum(s.quality == "fail" for s in statuses)
    print(
        f"{counts['done']} done, {counts['skipped']} skipped, {failed} failed, {bad} failed quality"
    )
    if failed:
        return 1
    return EXIT_QUALITY_FAIL if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffkernel`` command."""
    parser = argparse.ArgumentParser(
        prog="diffkernel", description="PSF-matching kernels and image subtraction."
    )
    parser.add_argument("--version", action="version", version=f"diffkernel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="simulate a pair, fit the kernel (detection included) and subtract",
        description="Simulate a template/science pair with a known spatially varying "
        "kernel, store it in Zarr, and run the Dask service on it (a LocalCluster unless "
        "--scheduler is given): detect stars, fit the kernel with the default "
        "configuration, subtract, and write the Zarr result, the difference image as "
        "FITS, the candidate table, a summary and the debug displays as PNGs.",
    )
    demo.add_argument("--size", type=int, default=1024, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    demo.add_argument("--out", default="diffkernel-demo", help="output directory")
    demo.add_argument(
        "--workers", type=int, default=None, help="LocalCluster worker processes (default: cores)"
    )
    demo.add_argument(
        "--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:port)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    ingest = sub.add_parser(
        "ingest",
        help="convert a FITS image to a Zarr image group",
        description="Read a FITS image (LSST-style IMAGE/MASK/VARIANCE extensions, or a "
        "plain image whose variance is modelled from GAIN and the sky) and write it as a "
        "Zarr image group (image, variance, mask in square chunks; WCS and mask planes "
        "in attributes). The write is atomic.",
    )
    ingest.add_argument("input", help="FITS file")
    ingest.add_argument("output", help="Zarr store to write")
    ingest.add_argument("--chunks", type=int, default=512, help="chunk side in pixels")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ingest.set_defaults(func=_ingest)

    subtract = sub.add_parser(
        "subtract",
        help="fit the PSF-matching kernel of a pair and write the difference image",
        description="Fit the spatially varying kernel matching TEMPLATE to SCIENCE on a "
        "Dask cluster and write the result store OUT.zarr (difference image, kernel "
        "solution, candidate table, provenance). Inputs are FITS files or Zarr image "
        "groups (store.zarr or store.zarr#group); a template with another WCS is "
        "warped onto the science grid. The default configuration is ip_diffim's "
        "subtraction task's (a fitted differential background); --config changes it. "
        "Every result gets a quality verdict (pass, warn or fail, with reasons) in the "
        "store, the summary and the FITS header; a fail exits with status 3.",
    )
    subtract.add_argument("science", help="science image: FITS or Zarr")
    subtract.add_argument("template", help="template image: FITS or Zarr")
    subtract.add_argument("--out", required=True, help="result store to write (.zarr)")
    subtract.add_argument(
        "--fits-out", help="also write the difference as FITS (IMAGE, MASK, VARIANCE)"
    )
    subtract.add_argument("--config", help="TOML or JSON file setting any config field")
    subtract.add_argument(
        "--plots", help="folder for the debug displays and the quality page (quality.png) as PNGs"
    )
    subtract.add_argument("--sources", help="table of kernel candidates (x, y or ra, dec)")
    subtract.add_argument("--scheduler", help="address of a running Dask scheduler")
    subtract.add_argument("--workers", type=int, help="LocalCluster workers (default: cores)")
    subtract.add_argument("--tile-size", type=int, help="subtraction tile side (chunk multiple)")
    subtract.add_argument(
        "--chunks", type=int, default=512, help="chunk side when ingesting FITS inputs"
    )
    subtract.add_argument(
        "--mode",
        choices=["convolveTemplate", "convolveScience", "auto"],
        default="auto",
        help="which image to convolve (auto: the one with the narrower PSF)",
    )
    subtract.add_argument(
        "--fft-precision",
        choices=["single", "double"],
        default="single",
        help="precision of the convolution FFTs (the fit is always double)",
    )
    subtract.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where the convolution FFTs run (gpu: needs CuPy and a CUDA device on every worker)",
    )
    subtract.add_argument(
        "--preconvolved", action="store_true", help="the science was convolved with its PSF"
    )
    subtract.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    subtract.add_argument("--quiet", action="store_true", help="no progress bars")
    subtract.set_defaults(func=_subtract)

    inspect = sub.add_parser(
        "inspect",
        help="summarize a result store",
        description="Print a result store's summary: candidates per clipping stage, "
        "kernel sum range, residual statistics, timings and provenance. An incomplete "
        "store (an interrupted run) is reported as such, with exit status 1.",
    )
    inspect.add_argument("store", help="result store (.zarr)")
    inspect.add_argument("--json", action="store_true", help="one line of JSON")
    inspect.set_defaults(func=_inspect)

    batch = sub.add_parser(
        "batch",
        help="process the pairs of a manifest, resumably",
        description="Process every pair of MANIFEST (CSV: science, template, output, "
        "optionally sources) on one Dask cluster, several pairs at a time. A pair whose "
        "output is complete and whose input bytes and config are unchanged is skipped, so "
        "an interrupted batch is resumed by running it again. Per-pair states and errors "
        "go to OUT/batch-status.json with each result's quality verdict; a failing pair "
        "does not stop the others. Exit status 1 if any pair failed to run, else 3 if any "
        "result's quality verdict is fail.",
    )
    batch.add_argument("manifest", help="CSV manifest")
    batch.add_argument("--out", required=True, help="folder of the outputs and status file")
    batch.add_argument("--config", help="TOML or JSON file setting any config field")
    batch.add_argument("--scheduler", help="address of a running Dask scheduler")
    batch.add_argument("--workers", type=int, help="LocalCluster workers (default: cores)")
    batch.add_argument("--concurrent", type=int, default=2, help="pairs in flight at once")
    batch.add_argument("--chunks", type=int, default=512, help="chunk side for FITS inputs")
    batch.set_defaults(func=_batch)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DiffkernelError as err:
        print(f"diffkernel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
