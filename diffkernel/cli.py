"""Command-line interface: ``diffkernel demo`` and ``diffkernel --version``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__

__all__ = ["main"]


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
    from .fitsio import write_exposure
    from .graph import run_pair
    from .image import Exposure
    from .simulate import make_pair
    from .store import write_image

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
    summary = {
        **run.summary,
        "kernel": result.metadata.get("basis"),
        "notes": result.metadata.get("notes", []),
        "timing_s": {"simulate_and_store": t1 - t0, "run": t2 - t1, **run.timings},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(
        f"wrote {out / 'result.zarr'}, {out / 'difference.fits'}, "
        f"{out / 'candidates.ecsv'}, {out / 'summary.json'}"
    )
    return 0


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
        "FITS, the candidate table and a summary.",
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
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
