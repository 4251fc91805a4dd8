"""Fit the kernel of one pair and write its difference: ``diffkernel subtract``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .common import (
    EXIT_QUALITY_FAIL,
    add_config_options,
    add_input_options,
    add_logging_options,
    add_scheduler_options,
    check_command_outputs,
    gain_notes,
    load_config,
    positive,
    read_options,
    scheduler_address,
    write_result_fits,
)

log = logging.getLogger("diffkernel")

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``subtract`` command to the subparsers ``sub``."""
    subtract = sub.add_parser(
        "subtract",
        help="fit the PSF-matching kernel of a pair and write the difference image",
        description="Fit the spatially varying kernel matching TEMPLATE to SCIENCE on a "
        "Dask cluster and write the result store OUT.zarr (difference image, kernel "
        "solution, candidate table, provenance). Inputs are FITS files or Zarr image "
        "groups (store.zarr or store.zarr#group), FITS files being LSST-style "
        "(IMAGE/MASK/VARIANCE), space-telescope (SCI/ERR/DQ) or plain images (variance "
        "from GAIN and the sky, or from --science-noise/--template-noise sigma images); "
        "a template with another WCS is "
        "warped onto the science grid. The default configuration is ip_diffim's "
        "subtraction task's (a fitted differential background); --config changes it. "
        "Every result gets a quality verdict (pass, warn or fail, with reasons) in the "
        "store, the summary and the FITS header; a fail exits with status 3.",
    )
    subtract.add_argument("science", help="science image: FITS or Zarr")
    subtract.add_argument("template", help="template image: FITS or Zarr")
    subtract.add_argument("--out", required=True, help="result store to write (.zarr)")
    subtract.add_argument(
        "--fits-out",
        help="also write the difference as FITS (float32 IMAGE, MASK, VARIANCE; the science "
        "header, WCS, provenance and verdict cards)",
    )
    add_config_options(subtract)
    add_input_options(subtract)
    subtract.add_argument(
        "--plots", help="folder for the debug displays and the quality page (quality.png) as PNGs"
    )
    subtract.add_argument("--sources", help="table of kernel candidates (x, y or ra, dec)")
    add_scheduler_options(subtract)
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
    subtract.add_argument(
        "--no-decorrelate", action="store_true", help="keep the difference's correlated noise"
    )
    subtract.add_argument(
        "--score",
        action="store_true",
        help="also write the score image (S/N of a point source; FITS: <fits-out>.score.fits)",
    )
    subtract.add_argument(
        "--timeout", type=float, help="seconds the run may take on the cluster before it stops"
    )
    subtract.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_logging_options(subtract)
    subtract.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    started_unix = time.time()  # for benchmarks: the interpreter and imports come before
    import shutil
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    # Only Dask here: the cluster starts first, and the rest (astropy, zarr, the
    # pipeline) is imported by the thread that reads the inputs, meanwhile.
    from ..pipeline.dask.cluster import connect

    cfg = load_config(args.config, args.set)
    scheduler = scheduler_address(args)
    positive("--workers", args.workers)
    inputs = {"science": args.science, "template": args.template, "sources": args.sources}
    check_command_outputs(args, inputs)  # before any work: a bad output path costs nothing
    out = Path(args.out)
    work = out.parent / f".{out.name}.inputs-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    if not all(Path(spec.partition("#")[0]).exists() for spec in (args.science, args.template)):
        read_inputs(args, work, timings)  # its error names the missing input, no cluster
    try:
        # The inputs are read (FITS ingested) while the cluster starts: each takes
        # seconds, and neither needs the other.
        with ThreadPoolExecutor(1, thread_name_prefix="diffkernel-inputs") as pool:
            reading = pool.submit(read_inputs, args, work, timings)
            t0 = time.perf_counter()
            with connect(None, scheduler, args.workers, not args.quiet) as client:
                timings["cluster_start"] = time.perf_counter() - t0
                science, template, sources = reading.result()
                from ..pipeline.dask.driver import run_pair

                log.info("fitting the kernel and subtracting")
                run = run_pair(
                    science,
                    template,
                    out,
                    config=cfg,
                    sources=sources,
                    client=client,
                    tile_size=args.tile_size,
                    mode=args.mode,
                    precision=args.fft_precision,
                    device=args.device,
                    preconvolved=args.preconvolved,
                    overwrite=args.overwrite,
                    progress=not args.quiet,
                    decorrelate=not args.no_decorrelate,
                    score=args.score,
                    timeout=args.timeout,
                )
                if args.plots:
                    from ..plots import write_plots

                    log.info("drawing the debug displays in %s", args.plots)
                    write_plots(run.result, args.plots, template=template, science=science)
                t0 = time.perf_counter()
            timings["shutdown"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from ..quality import describe

    t0 = time.perf_counter()
    if args.fits_out:
        write_result_fits(run.result, args.fits_out, args.overwrite)
    timings["outputs"] = time.perf_counter() - t0
    timing = {**timings, **run.timings, "started_unix": started_unix, "finished_unix": time.time()}
    summary = {**run.summary, "timing_s": timing, "output": str(run.result.path)}
    print(json.dumps(summary, indent=2, default=str))
    print(describe(run.quality), file=sys.stderr)
    return EXIT_QUALITY_FAIL if run.quality.get("verdict") == "fail" else 0


def read_inputs(args: argparse.Namespace, work: Path, timings: dict[str, float]):
    """The science and template images as Zarr image groups (FITS files are stored in
    ``work``) and the source table or None; the run's modules imported on the way."""
    import time

    t0 = time.perf_counter()
    from ..io.inputs import open_input, read_sources
    from ..pipeline.dask import driver  # noqa: F401  (imported here, off the main thread's way)

    timings["imports"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = {}
    for who, spec in (("science", args.science), ("template", args.template)):
        log.info("reading the %s %s", who, spec)
        with gain_notes(who, spec):
            images[who] = open_input(spec, work, who, args.chunks, read_options(args, who))
    sources = read_sources(args.sources) if args.sources else None
    timings["inputs"] = time.perf_counter() - t0
    return images["science"], images["template"], sources
