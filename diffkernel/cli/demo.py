"""Simulate a pair with a known kernel and run the service on it: ``diffkernel demo``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import add_logging_options, add_scheduler_options, scheduler_address

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command to the subparsers ``sub``."""
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
    demo.add_argument(
        "--out",
        default=None,
        help="output directory (default: a new folder in the system's temporary directory, "
        "printed at the end; the outputs of a 1024-px demo take ~30 MB)",
    )
    demo.add_argument(
        "--workers", type=int, default=None, help="LocalCluster worker processes (default: cores)"
    )
    add_scheduler_options(demo)
    add_logging_options(demo)
    demo.add_argument(
        "--no-decorrelate", action="store_true", help="keep the difference's correlated noise"
    )
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np

    from ..io.products import write_difference
    from ..io.zarr.write import write_image
    from ..pipeline.dask.driver import run_pair
    from ..simulate import make_pair

    # Not the current folder by default: a demo should not leave tens of MB behind.
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="diffkernel-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pair = make_pair((args.size, args.size), seed=args.seed, template_depth=4, n_variable=5)
    inputs = out / "pair.zarr"
    # The demo owns its directory: a rerun replaces what an earlier one wrote.
    write_image(inputs, pair.template.astype(np.float32), group="template", overwrite=True)
    write_image(inputs, pair.science.astype(np.float32), group="science", overwrite=True)
    t1 = time.perf_counter()
    run = run_pair(
        (inputs, "science"),
        (inputs, "template"),
        out / "result.zarr",
        scheduler=scheduler_address(args),
        n_workers=args.workers,
        overwrite=True,
        progress=not args.quiet,
        decorrelate=not args.no_decorrelate,
    )
    t2 = time.perf_counter()
    result = run.result
    write_difference(out / "difference.fits", result, overwrite=True)
    result.candidates.write(out / "candidates.ecsv", overwrite=True)
    from ..io.zarr.image import ZarrImage
    from ..plots import write_plots

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
    from ..quality import describe

    print(describe(run.quality))
    print(
        f"wrote {out / 'result.zarr'}, {out / 'difference.fits'}, "
        f"{out / 'candidates.ecsv'}, {out / 'summary.json'} and {len(plots)} plots in "
        f"{out / 'plots'}"
    )
    return 0
