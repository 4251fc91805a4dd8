"""One pair, FITS or Zarr in, a result store (and optionally FITS) out.

Usage::

    python workflows/single_pair.py SCIENCE TEMPLATE OUT.zarr [--fits DIFF.fits]
        [--scheduler tcp://host:8786] [--workers N] [--set kernel.AL.spatialKernelOrder=1 ...]

The Python form of ``diffkernel subtract``: copy it and change what your pipeline
needs (the configuration, where the sources come from, what happens to the result).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from diffkernel import MakeKernelConfig
from diffkernel.cli.common import parse_set
from diffkernel.io.inputs import open_input
from diffkernel.io.products import write_difference
from diffkernel.pipeline.dask.driver import run_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("science")
    parser.add_argument("template")
    parser.add_argument("out")
    parser.add_argument("--fits", help="also write the difference as FITS")
    parser.add_argument("--scheduler")
    parser.add_argument("--workers", type=int)
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="config override, e.g. kernel.AL.fitForBackground=true",
    )  # fmt: skip
    args = parser.parse_args()
    config = MakeKernelConfig.default_subtraction()  # a fitted background, as the CLI
    config.update(parse_set(args.set))  # values read as in a TOML config file, as the CLI
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as work:
        science = open_input(args.science, work, "science")
        template = open_input(args.template, work, "template")
        run = run_pair(
            science, template, args.out, config=config,
            scheduler=args.scheduler, n_workers=args.workers, progress=True,
        )  # fmt: skip
    if args.fits:  # float32, with the science's cards, provenance and verdict
        write_difference(args.fits, run.result)
    print(json.dumps({**run.summary, "timings_s": run.timings}, indent=2, default=str))


if __name__ == "__main__":
    main()
