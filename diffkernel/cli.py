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


def _robust_stats(diff) -> dict:
    z = diff.image / np.sqrt(diff.variance)
    good = np.isfinite(z) & (diff.mask == 0)
    v = z[good]
    med = float(np.median(v))
    return {
        "pixels": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": med,
        "robust_std": float(1.4826 * np.median(np.abs(v - med))),
    }


def summarize(result, diff) -> dict:
    """A JSON-able summary of a kernel solution and its difference image."""
    table = result.candidates
    good = table[table["status"] == "GOOD"]
    meta = result.metadata
    return {
        "candidates": {
            "sources": len(table),
            "good": len(good),
            "rejected_at_vetting": meta.get("vetting_rejected", {}),
            "rejected_by_stage": meta.get("rejected", {}),
            "spatial_rounds": meta.get("rounds"),
        },
        "kernel": {
            "basis": meta.get("basis_kind"),
            "basis_size": meta.get("basis_size"),
            "kernel_size": result.psfMatchingKernel.kernel_size,
            "kernel_sum_range_good": [
                float(np.min(good["kernel_sum"])),
                float(np.max(good["kernel_sum"])),
            ]
            if len(good)
            else None,
            "spatial_condition": meta.get("spatial_condition"),
        },
        "difference_over_sigma": _robust_stats(diff),
        "notes": meta.get("notes", []),
    }


def _demo(args: argparse.Namespace) -> int:
    from .fitsio import write_exposure
    from .image import Exposure
    from .simulate import make_pair
    from .subtract import subtract_images
    from .task import MakeKernelTask

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pair = make_pair((args.size, args.size), seed=args.seed, template_depth=4, n_variable=5)
    t1 = time.perf_counter()
    result = MakeKernelTask().run(pair.template, pair.science)
    t2 = time.perf_counter()
    diff = subtract_images(pair.template, pair.science, result)
    t3 = time.perf_counter()
    summary = summarize(result, diff)
    summary["timing_s"] = {"simulate": t1 - t0, "fit": t2 - t1, "subtract": t3 - t2}
    write_exposure(out / "difference.fits", Exposure(diff, wcs=pair.science.wcs), overwrite=True)
    result.candidates.write(out / "candidates.ecsv", overwrite=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out / 'difference.fits'}, {out / 'candidates.ecsv'}, {out / 'summary.json'}")
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
        "kernel, detect stars, fit the kernel with the default configuration, subtract, "
        "and write the difference image, candidate table and a summary.",
    )
    demo.add_argument("--size", type=int, default=1024, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    demo.add_argument("--out", default="diffkernel-demo", help="output directory")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
