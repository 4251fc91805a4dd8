"""Benchmark of the Dask service: one pair in Zarr, 1 and 2 worker processes.

Usage::

    python benchmarks/bench_dask.py                 # 1024, 2048 and 4096 square
    python benchmarks/bench_dask.py 4096            # chosen sizes
    python benchmarks/bench_dask.py --repeats 5 4096

Every time is the median of ``--repeats`` runs (default 3), the limit's included,
with the spread (min-max of the total) printed beside it: this machine is shared,
and single runs differ by 15% or more.

For each size, besides the two runs, the same pair is measured with references in the
same run: the "limit" (in a fresh process: read both images from Zarr, convolve the
whole template with one 21x21 kernel by FFT, write the difference to Zarr: the least
work any subtraction must do), HOTPANTS when a ``hotpants`` executable is on PATH, and
SFFT when the ``sfft`` package is installed (each skipped with a note otherwise).

A simulated pair (coadd-depth template, float32 pixels, sources given) is written
to a Zarr store once; then :func:`diffkernel.graph.run_pair` processes it on a
LocalCluster of one worker process and on one of two, each single-threaded. The
table gives the wall time of each stage (workers already started and warmed up
with the package imported), the peak resident memory of each worker,
and the residual statistics of the difference; the last lines give the speed-up of
the cell and tile stages and check that both runs found the same kernel. Compare
ratios within one run: machines are shared and noisy.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB.

    Linux's ``VmHWM`` is the high-water mark of this process's own address space;
    ``getrusage``'s ``ru_maxrss`` survives ``exec`` and would report a spawned
    worker's parent (here holding the simulated pair) instead.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_store(n: int, path: Path):
    from diffkernel.image import Exposure, MaskedImage
    from diffkernel.simulate import make_pair
    from diffkernel.store import write_image

    pair = make_pair((n, n), seed=42, template_depth=4)
    exposures = {}
    for name, exp in (("template", pair.template), ("science", pair.science)):
        mi = exp.masked_image
        f32 = MaskedImage(
            mi.image.astype(np.float32), mi.variance.astype(np.float32), mi.mask, mi.mask_planes
        )
        exposures[name] = Exposure(f32, exp.wcs, exp.psf_fwhm)
    t0 = time.perf_counter()
    for name, exp in exposures.items():
        write_image(path, exp, group=name, chunks=512)
    ingest = time.perf_counter() - t0
    return pair.truth.sources, ingest, exposures


LIMIT = r"""
import sys, time, numpy as np, zarr
from scipy.signal import fftconvolve
store, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
template = np.asarray(zarr.open_array(store, path="template/image", mode="r")[:], np.float64)
science = np.asarray(zarr.open_array(store, path="science/image", mode="r")[:], np.float64)
k = np.exp(-0.5 * (np.arange(-10, 11) / 2.0) ** 2)
kernel = np.outer(k, k) / np.outer(k, k).sum()
diff = (science - fftconvolve(template, kernel, mode="same")).astype(np.float32)
zarr.create_array(out, shape=diff.shape, chunks=(512, 512), dtype=np.float32)[:] = diff
print(time.perf_counter() - t0)
"""


def limit_seconds(store: Path, tmp: Path, repeats: int) -> list[float]:
    """The least work of any subtraction, each time in a fresh process."""
    times = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-c", LIMIT, str(store), str(tmp / "limit.zarr")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        times.append(float(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(tmp / "limit.zarr", ignore_errors=True)
    return times


def hotpants_seconds(exposures: dict, tmp: Path) -> str:
    """Wall time of HOTPANTS on the same pair, or why it was skipped."""
    exe = shutil.which("hotpants")
    if exe is None:
        return "skipped (no hotpants executable on PATH)"
    from astropy.io import fits

    paths = {}
    for name, exp in exposures.items():
        paths[name] = tmp / f"{name}.fits"
        fits.writeto(paths[name], exp.masked_image.image.astype(np.float32), overwrite=True)
    t0 = time.perf_counter()
    subprocess.run(
        [exe, "-inim", str(paths["science"]), "-tmplim", str(paths["template"]),
         "-outim", str(tmp / "hp_diff.fits"), "-n", "i", "-c", "t"],
        capture_output=True, check=True,
    )  # fmt: skip
    return f"{time.perf_counter() - t0:.2f} s"


def sfft_note() -> str:
    if importlib.util.find_spec("sfft") is None:
        return "skipped (the sfft package is not installed)"
    return "installed, but not run: its CPU backend needs ~11 GB at 2048^2 (see issue 7)"


def _warm_up() -> None:
    import diffkernel.graph  # noqa: F401


def run(path: Path, out: Path, sources, workers: int, repeats: int):
    """``repeats`` runs on one cluster of ``workers``; the median run, walls, memory."""
    from diffkernel import MakeKernelConfig
    from diffkernel.graph import connect, run_pair
    from diffkernel.store import clear_chunk_cache

    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    runs = []
    with connect(n_workers=workers) as client:  # the LocalCluster run_pair would start
        # Long-lived workers have their imports done; fresh ones pay ~1 s for them.
        client.run(_warm_up)
        for _ in range(repeats):
            client.run(clear_chunk_cache)  # no run reads chunks a previous one cached
            t0 = time.perf_counter()
            result = run_pair(
                (path, "science"),
                (path, "template"),
                out,
                config=cfg,
                sources=sources,
                client=client,
                overwrite=True,
            )
            runs.append((time.perf_counter() - t0, result))
        memory = client.run(peak_rss_gb)
    walls = [wall for wall, _ in runs]
    median = sorted(runs, key=lambda item: item[0])[len(runs) // 2]
    return median[1], median[0], walls, sorted(memory.values())


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main(sizes: list[int], repeats: int) -> None:
    header = (
        f"{'size':>6} {'workers':>7} {'check':>6} {'cells':>6} {'reduce':>6} {'tiles':>6} "
        f"{'wall s':>7} {'spread':>11} {'worker GB':>12} {'good/cand':>10} {'mean z':>7} "
        f"{'rstd z':>7}"
    )
    totals: dict[int, float] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "pair.zarr"
            sources, ingest, exposures = make_store(n, store)
            limits = limit_seconds(store, Path(tmp), repeats)
            limit = float(np.median(limits))
            print(
                f"# {n}x{n}: ingest (both images to Zarr) {ingest:.2f} s; limit {limit:.2f} s "
                f"(median of {repeats}, spread {spread(limits)}); "
                f"HOTPANTS {hotpants_seconds(exposures, Path(tmp))}; SFFT {sfft_note()}"
            )
            print(header)
            print("-" * len(header))
            runs, walls = {}, {}
            for workers in (1, 2):
                res, wall, all_walls, memory = run(
                    store, Path(tmp) / f"out{workers}.zarr", sources, workers, repeats
                )
                runs[workers], walls[workers] = res, wall
                t = res.timings
                meta = res.result.metadata
                r = res.summary["residuals"]
                print(
                    f"{n:>6} {workers:>7} {t['check']:>6.2f} {t['cells']:>6.2f} "
                    f"{t['reduce']:>6.2f} {t['tiles']:>6.2f} {wall:>7.2f} {spread(all_walls):>11} "
                    f"{'/'.join(f'{m:.2f}' for m in memory):>12} "
                    f"{meta['n_good']:>4}/{meta['n_candidates']:<5} {r['mean']:>7.3f} "
                    f"{r['robust_std']:>7.3f}"
                )
            one, two = runs[1].timings, runs[2].timings
            both = (one["cells"] + one["tiles"]) / (two["cells"] + two["tiles"])
            same = np.array_equal(
                runs[1].result.solution.kernel_coeffs, runs[2].result.solution.kernel_coeffs
            )
            print(
                f"speed-up 1 -> 2 workers: cells {one['cells'] / two['cells']:.2f}x, "
                f"tiles {one['tiles'] / two['tiles']:.2f}x, "
                f"cells+tiles {both:.2f}x, "
                f"total {one['total'] / two['total']:.2f}x; identical kernels: {same}; "
                f"2 workers / limit = {walls[2] / limit:.2f}"
            )
            totals[n] = walls[2]
    if 2048 in totals and 4096 in totals:
        print(f"time(4096) / time(2048) with 2 workers = {totals[4096] / totals[2048]:.2f}")
    print(json.dumps({"walls_2_workers": totals}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    args = parser.parse_args()
    main(args.sizes, max(1, args.repeats))
