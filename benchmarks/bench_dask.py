"""Benchmark of the Dask service: one pair in Zarr, 1 and 2 worker processes.

Usage::

    python benchmarks/bench_dask.py                 # 1024, 2048 and 4096 square
    python benchmarks/bench_dask.py 4096            # chosen sizes
    python benchmarks/bench_dask.py --repeats 5 4096

Every time is the median of ``--repeats`` runs (default 3), the limit's included,
with the spread (min-max of the total) printed beside it: this machine is shared,
and single runs differ by 15% or more.

For each size, besides the two runs, the same pair is measured with references in the
same run: the "limit" (in a warmed-up process: read both images from Zarr, convolve
the whole template with one 21x21 kernel by FFT, write the difference to Zarr: the
least work any subtraction must do; measured twice, with zarr's own ``array[:]`` reads
and writes and with the whole-chunk I/O of :mod:`diffkernel.io.zarr.chunkio` that diffkernel's
tasks use, which is the stricter reference), HOTPANTS when a ``hotpants`` executable
is on PATH, and SFFT when the ``sfft`` package is installed (each skipped with a note
otherwise).

A simulated pair (coadd-depth template, float32 pixels, sources given) is written
to a Zarr store once; then :func:`diffkernel.pipeline.dask.driver.run_pair` processes it on a
LocalCluster of one worker process and on one of two, each single-threaded. The
table gives the wall time of each stage (workers already started and warmed up
with the package imported; the check runs alongside the cells, so its column is the
time until its last task was gathered and overlaps the cells'), the peak resident
memory of each worker,
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
from hotpants_helper import hotpants_run  # benchmarks/ is the script's folder


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
    from diffkernel.io.zarr.write import write_image
    from diffkernel.simulate import make_pair

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
store, out, rounds, io = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if io == "direct":  # the chunk I/O diffkernel itself uses
    from diffkernel.io.zarr.chunkio import direct_chunks
k = np.exp(-0.5 * (np.arange(-10, 11) / 2.0) ** 2)
kernel = np.outer(k, k) / np.outer(k, k).sum()


def read(name):
    array = zarr.open_array(store, path=name, mode="r")
    if io == "direct":
        return direct_chunks(array).region(0, array.shape[0], 0, array.shape[1])
    return array[:]


for i in range(rounds + 1):  # the first round warms the process up, untimed
    t0 = time.perf_counter()
    template = np.asarray(read("template/image"), np.float64)
    science = np.asarray(read("science/image"), np.float64)
    diff = (science - fftconvolve(template, kernel, mode="same")).astype(np.float32)
    array = zarr.create_array(
        out, shape=diff.shape, chunks=(512, 512), dtype=np.float32, overwrite=True
    )
    if io == "direct":
        direct_chunks(array).write_region(0, 0, diff)
    else:
        array[:] = diff
    if i:
        print(time.perf_counter() - t0)
"""

#: The limit's two ways of reading and writing Zarr: zarr's own, and diffkernel's.
LIMIT_IO = ("zarr", "direct")


def limit_seconds(store: Path, tmp: Path, rounds: int, io: str = "zarr") -> list[float]:
    """The least work of any subtraction, ``rounds`` times in one warmed-up process.

    Like the benchmark's workers, the process has its imports done and has run the
    work once: a fresh process's first big allocations wait for the kernel to find
    (huge) pages, which on this machine makes a cold run vary from 0.9 to 2.5 s.
    ``io`` is ``"zarr"`` (``array[:]`` both ways) or ``"direct"`` (the whole-chunk I/O
    of :mod:`diffkernel.io.zarr.chunkio`, which diffkernel's own tasks use).
    """
    proc = subprocess.run(
        [sys.executable, "-c", LIMIT, str(store), str(tmp / "limit.zarr"), str(rounds), io],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    shutil.rmtree(tmp / "limit.zarr", ignore_errors=True)
    return [float(line) for line in proc.stdout.split()]


def sfft_note() -> str:
    if importlib.util.find_spec("sfft") is None:
        return "skipped (the sfft package is not installed)"
    return "installed, but not run: its CPU backend needs ~11 GB at 2048^2 (see issue 7)"


def _warm_up() -> None:
    import diffkernel.pipeline.dask.driver  # noqa: F401


def measure(path: Path, tmp: Path, sources, repeats: int, device: str = "cpu") -> dict:
    """Rounds of (limit, 1 worker, 2 workers), interleaved so drifts hit all alike.

    Returns, per key (``"limit"``, 1, 2), the walls of every round; for 1 and 2 also
    the run with the median wall and the workers' peak memory.
    """
    from diffkernel import MakeKernelConfig
    from diffkernel.io.zarr.cache import clear_chunk_cache
    from diffkernel.pipeline.dask.cluster import connect
    from diffkernel.pipeline.dask.driver import run_pair

    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    walls: dict = {**{f"limit-{io}": [] for io in LIMIT_IO}, 1: [], 2: []}
    runs: dict = {1: [], 2: []}
    with connect(n_workers=1) as one, connect(n_workers=2) as two:
        clients = {1: one, 2: two}
        for client in clients.values():
            # Long-lived workers have their imports done; fresh ones pay ~1 s for them.
            client.run(_warm_up)
        for _ in range(repeats):
            for io in LIMIT_IO:
                walls[f"limit-{io}"].extend(limit_seconds(path, tmp, 2, io))
            for workers, client in clients.items():
                client.run(clear_chunk_cache)  # no run reads chunks a previous one cached
                t0 = time.perf_counter()
                result = run_pair(
                    (path, "science"),
                    (path, "template"),
                    tmp / f"out{workers}.zarr",
                    config=cfg,
                    sources=sources,
                    client=client,
                    overwrite=True,
                    device=device,
                )
                walls[workers].append(time.perf_counter() - t0)
                runs[workers].append(result)
        memory = {w: sorted(c.run(peak_rss_gb).values()) for w, c in clients.items()}
    out = {"walls": walls, "memory": memory, "median_run": {}}
    for workers in (1, 2):
        order = np.argsort(walls[workers])
        out["median_run"][workers] = runs[workers][order[len(order) // 2]]
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main(sizes: list[int], repeats: int, device: str = "cpu") -> None:
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
            hotpants = hotpants_run(exposures, Path(tmp))
            hotpants_note = (
                hotpants
                if isinstance(hotpants, str)
                else f"{hotpants[0]:.2f} s, robust std of difference/sigma {hotpants[1]:.3f}"
            )
            measured = measure(store, Path(tmp), sources, repeats, device)
            limit = {io: float(np.median(measured["walls"][f"limit-{io}"])) for io in LIMIT_IO}
            described = "; ".join(
                f"limit with {io} I/O {limit[io]:.2f} s (median of "
                f"{len(measured['walls'][f'limit-{io}'])} warm runs, spread "
                f"{spread(measured['walls'][f'limit-{io}'])})"
                for io in LIMIT_IO
            )
            print(
                f"# {n}x{n}: ingest (both images to Zarr) {ingest:.2f} s; {described}; "
                f"HOTPANTS {hotpants_note}; SFFT {sfft_note()}"
            )
            print(header)
            print("-" * len(header))
            runs, walls = {}, {}
            for workers in (1, 2):
                res = measured["median_run"][workers]
                all_walls = measured["walls"][workers]
                memory = measured["memory"][workers]
                wall = float(np.median(all_walls))
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
            if not isinstance(hotpants, str):
                print(
                    f"HOTPANTS / diffkernel (2 workers) = {hotpants[0] / walls[2]:.2f}; "
                    f"robust std: diffkernel {runs[2].summary['residuals']['robust_std']:.3f}, "
                    f"HOTPANTS {hotpants[1]:.3f}"
                )
            print(
                f"speed-up 1 -> 2 workers: cells {one['cells'] / two['cells']:.2f}x, "
                f"tiles {one['tiles'] / two['tiles']:.2f}x, "
                f"cells+tiles {both:.2f}x, "
                f"total {one['total'] / two['total']:.2f}x; identical kernels: {same}; "
                + ", ".join(
                    f"2 workers / limit ({io} I/O) = {walls[2] / t:.2f}" for io, t in limit.items()
                )
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
    parser.add_argument(
        "--device", choices=["cpu", "gpu"], default="cpu", help="where the tiles' FFTs run"
    )
    args = parser.parse_args()
    main(args.sizes, max(1, args.repeats), args.device)
