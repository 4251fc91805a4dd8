"""Recreate a difference from a result's stored solution: ``diffkernel apply``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_scheduler_options

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``apply`` command to the subparsers ``sub``."""
    apply = sub.add_parser(
        "apply",
        help="recreate a difference (and score) from a result's stored solution",
        description="Recreate the difference image of RESULT (and its score image, when it "
        "has one) on SCIENCE and TEMPLATE from the stored kernel, background and filters, "
        "without refitting: only the tile stage runs (after the warp and mesh backgrounds "
        "when RESULT had them). The inputs must be the very ones RESULT was made from: "
        "their planes' SHA-256 are checked against RESULT's provenance, and a changed "
        "input is refused. With the same package version the new difference, variance "
        "and mask are identical to RESULT's.",
    )
    apply.add_argument("result", help="result store (.zarr) written by subtract, batch or demo")
    apply.add_argument("science", help="science image: FITS or Zarr")
    apply.add_argument("template", help="template image: FITS or Zarr")
    apply.add_argument("--out", required=True, help="result store to write (.zarr)")
    apply.add_argument(
        "--fits-out",
        help="also write the difference as FITS (and the score as <name>.score.fits)",
    )
    add_scheduler_options(apply)
    apply.add_argument("--workers", type=int, help="LocalCluster workers (default: cores)")
    apply.add_argument(
        "--chunks", type=int, default=512, help="chunk side when ingesting FITS inputs"
    )
    apply.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    apply.add_argument("--quiet", action="store_true", help="no progress bars")
    apply.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    import uuid

    from ..io.inputs import open_input
    from ..pipeline.dask.apply import apply_result
    from ..quality import fits_cards
    from .common import check_command_outputs, scheduler_address, write_result_fits

    inputs = {"result": args.result, "science": args.science, "template": args.template}
    check_command_outputs(args, inputs)  # --overwrite never touches an input
    out = Path(args.out)
    work = out.parent / f".{out.name}.inputs-{uuid.uuid4().hex[:8]}"
    try:
        science = open_input(args.science, work, "science", args.chunks)
        template = open_input(args.template, work, "template", args.chunks)
        run = apply_result(
            args.result,
            science,
            template,
            out,
            scheduler=scheduler_address(args),
            n_workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    written = []
    if args.fits_out:
        written = write_result_fits(
            run.result, args.fits_out, args.overwrite, fits_cards(run.quality)
        )
    summary = {"output": str(run.result.path), "fits": written, "timing_s": run.timings}
    print(json.dumps({**run.summary, **summary}, indent=2, default=str))
    from .common import EXIT_QUALITY_FAIL

    # The verdict is the recreated result's: a fail stays a fail.
    return EXIT_QUALITY_FAIL if run.quality.get("verdict") == "fail" else 0
