"""Time each debug display of a result: reading, the candidates' refits, every figure.

Usage::

    python benchmarks/bench_plots.py                       # simulated 256^2 and 1024^2
    python benchmarks/bench_plots.py --sizes 512 2048
    python benchmarks/bench_plots.py --result R.zarr --template T --science S

A simulated pair is fitted in memory (MakeKernelTask) and stored as a result the way
the pipeline stores one; ``--result`` times a published store instead, with its inputs
given as FITS files or Zarr image groups (``store.zarr#group``). Each figure is drawn
and written ``--rounds`` times; the table gives the median and the range of each
step's wall seconds, and the median of its CPU seconds (this process's: on a busy
machine, a step's own cost), from :func:`diffkernel.plots.write_plots`'s ``timings``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def _simulated(size: int, work: Path):
    """(result store, template, science) of a simulated ``size``^2 pair."""
    from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
    from diffkernel.io.zarr import ZarrImage, write_image
    from diffkernel.io.zarr.results import ResultStore
    from diffkernel.simulate import make_pair

    pair = make_pair((size, size), seed=2, flux_scale=0.9, background=(400.0, 2.0, -3.0))
    fitted = MakeKernelTask(MakeKernelConfig.default_subtraction()).run(pair.template, pair.science)
    difference = subtract_images(pair.template, pair.science, fitted)
    path = work / f"result-{size}.zarr"
    write_image(path, difference, group="difference")
    inputs = work / f"pair-{size}.zarr"
    write_image(inputs, pair.template, group="template")
    write_image(inputs, pair.science, group="science")
    store = ResultStore(
        path=path,
        difference=ZarrImage.open(path, "difference"),
        solution=fitted.spatialSolution,
        candidates=fitted.candidates,
        config=fitted.config.to_dict(),
        quality=fitted.quality,
        z_histograms=fitted.differenceHistograms,
        metadata=dict(fitted.metadata, mode="convolveTemplate"),
    )
    return store, ZarrImage.open(inputs, "template"), ZarrImage.open(inputs, "science")


def _published(result: str, template: str, science: str, work: Path):
    from diffkernel.io.inputs import open_input
    from diffkernel.io.zarr.results import open_result

    return (
        open_result(result),
        open_input(template, work, "template", 256),
        open_input(science, work, "science", 256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--result", help="a published result store to plot instead")
    parser.add_argument("--template", help="its template (FITS or Zarr)")
    parser.add_argument("--science", help="its science image (FITS or Zarr)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from diffkernel.plots import write_plots

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {}
        if args.result:
            cases[Path(args.result).name] = _published(
                args.result, args.template, args.science, work
            )
        else:
            for size in args.sizes:
                cases[f"simulated {size}^2"] = _simulated(size, work)
        for label, (store, template, science) in cases.items():
            runs = []
            for r in range(args.rounds):
                timings = {}
                write_plots(store, work / f"plots-{r}", template, science, timings=timings)
                runs.append(timings)
            n = len(store.candidates)
            print(
                f"\n{label}: {n} candidates, basis of {store.solution.basis.size} kernels, "
                f"{args.rounds} rounds"
            )
            print("| step | wall median s | wall min-max s | CPU median s |")
            print("|---|---|---|---|")
            for step in runs[0]:
                wall = [run[step][0] for run in runs]
                cpu = [run[step][1] for run in runs]
                print(
                    f"| {step} | {statistics.median(wall):.3f} | "
                    f"{min(wall):.3f}-{max(wall):.3f} | {statistics.median(cpu):.3f} |"
                )
            wall = [sum(v[0] for v in run.values()) for run in runs]
            cpu = [sum(v[1] for v in run.values()) for run in runs]
            print(
                f"| all | {statistics.median(wall):.3f} | {min(wall):.3f}-{max(wall):.3f} | "
                f"{statistics.median(cpu):.3f} |"
            )


if __name__ == "__main__":
    main()
