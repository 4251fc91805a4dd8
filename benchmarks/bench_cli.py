"""Time to result: ``diffkernel subtract`` from FITS files, as a user runs it, against HOTPANTS.

Usage::

    python benchmarks/bench_cli.py                      # 1024, 2048 and 4096 square
    python benchmarks/bench_cli.py 2048 --rounds 5
    python benchmarks/bench_cli.py --tree before=/tmp/old-checkout --tree after=.

Each measurement is a whole process, timed from launch to exit: the interpreter, the
imports, the cluster's start and stop, reading the FITS inputs, the run, writing the
outputs. The pairs are simulated (a coadd-depth template, sky in both images, float32
pixels) and written once as diffkernel's multi-extension FITS (``IMAGE``, ``MASK``,
``VARIANCE``) and as HOTPANTS' image, noise and mask files; then every round runs,
in turn, ``diffkernel subtract SCIENCE TEMPLATE --out OUT --workers 2`` with the
default config and no source list (once per ``--tree``, a source tree put first on
``PYTHONPATH``: compare two versions of the package in one interleaved run) and
HOTPANTS when a ``hotpants`` executable is on PATH. Rounds are interleaved so that the
drifts of a shared machine hit every command alike; the table gives the median wall
and its spread (min-max).

Each process tree is polled every 50 ms for the high-water mark of its processes'
resident memory (``VmHWM`` in ``/proc/<pid>/status``: a peak between two polls is
not lost, only one in a process that starts and ends between them); "main" is the
command's own process (the scheduler lives there), "worker" the largest of the
others.

The phase table splits the median diffkernel run of each tree: "python+imports" is
the time from launch to the command's first line of work (the summary's
``timing_s.started_unix``; "imports" is the heavy imports after it, done alongside the
cluster's start), "exit" from its last line to the process's end; the other
phases are the run's own ``timing_s`` (stages that overlap, such as the check and the
cells, or the cluster's start and the reading of the inputs, are each timed alone, so
they do not sum to the wall).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hotpants_helper import (  # benchmarks/ is the script's folder
    hotpants_command,
    hotpants_residual_std,
    write_hotpants_inputs,
)

#: What runs the CLI in a fresh interpreter: the same as the ``diffkernel`` console script.
CLI = "import sys; from diffkernel.cli import main; sys.exit(main())"

#: Phases shown, in order, from a run's ``timing_s`` (absent ones are left blank).
PHASES = (
    "imports",
    "inputs",
    "cluster_start",
    "check",
    "detect",
    "fwhm",
    "prepare",
    "cells",
    "reduce",
    "tiles",
    "total",
    "outputs",
    "shutdown",
)


def make_pair_files(n: int, folder: Path, seed: int) -> dict[str, Path]:
    """Simulate an ``n`` x ``n`` pair; write it for diffkernel and for HOTPANTS."""
    from diffkernel.image import Exposure, MaskedImage
    from diffkernel.io.fits import write_exposure
    from diffkernel.simulate import make_pair

    folder.mkdir(parents=True, exist_ok=True)
    pair = make_pair((n, n), seed=seed, template_depth=4)
    exposures = {}
    files: dict[str, Path] = {}
    for name, exp in (("template", pair.template), ("science", pair.science)):
        mi = exp.masked_image
        f32 = MaskedImage(
            mi.image.astype(np.float32), mi.variance.astype(np.float32), mi.mask, mi.mask_planes
        )
        exposures[name] = Exposure(f32, exp.wcs)
        files[name] = folder / f"{name}.fits"
        write_exposure(files[name], exposures[name], overwrite=True)
    files.update(write_hotpants_inputs(exposures, folder))
    return files


def tree_hwm_gb(root: int, peaks: dict[int, float]) -> None:
    """Record in ``peaks`` the resident-memory high-water mark of ``root`` and its descendants."""
    pids = [root]
    seen = set()
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks[pid] = max(peaks.get(pid, 0.0), int(line.split()[1]) / 1024**2)
            # A thread's children are listed under that thread: a cluster's event
            # loop runs in a thread of its own.
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pids.extend(int(c) for c in children.read().split())
        except (OSError, ValueError):
            continue


def run_process(command: list[str], env: dict | None = None, ok=(0, 3)) -> dict:
    """Run ``command`` to its end; its wall, launch time, output and peak memories.

    An exit status not in ``ok`` raises (3: a result judged ``fail``, still written).
    """
    peaks: dict[int, float] = {}
    launched = time.time()
    t0 = time.perf_counter()
    # Run from a neutral folder: ``python -c`` puts the working directory first on
    # sys.path, so from a checkout it would import that checkout's package.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    ) as proc:
        # Poll in a helper thread; communicate() drains the pipes meanwhile.
        import threading

        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                tree_hwm_gb(proc.pid, peaks)
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
    if proc.returncode not in ok:
        raise RuntimeError(f"{command[:4]} exited {proc.returncode}:\n{err[-3000:]}")
    main_peak = peaks.pop(proc.pid, 0.0)
    return {
        "wall": wall,
        "launched": launched,
        "ended": launched + wall,
        "stdout": out,
        "stderr": err,
        "main_gb": main_peak,
        "worker_gb": max(peaks.values(), default=0.0),
        "n_children": len(peaks),
    }


def diffkernel_round(files: dict[str, Path], out: Path, tree: Path, workers: int) -> dict:
    """One ``diffkernel subtract`` from the FITS files, with ``tree`` first on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [
        sys.executable, "-c", CLI, "subtract",
        str(files["science"]), str(files["template"]),
        "--out", str(out), "--workers", str(workers), "--overwrite", "--quiet",
    ]  # fmt: skip
    result = run_process(command, env)
    text = result["stdout"]
    summary = json.loads(text[text.index("{") :])
    timing = summary.get("timing_s", {})
    result["timing"] = timing
    result["rstd"] = summary["residuals"]["robust_std"]
    result["warnings"] = sum(1 for line in result["stderr"].splitlines() if "warn" in line.lower())
    started, finished = timing.get("started_unix"), timing.get("finished_unix")
    if started is not None:
        result["timing"]["python+imports"] = started - result["launched"]
    if finished is not None:
        result["timing"]["exit"] = result["ended"] - finished
    shutil.rmtree(out, ignore_errors=True)
    return result


def hotpants_round(files: dict[str, Path], folder: Path, exe: str) -> dict:
    result = run_process(hotpants_command(exe, files, folder))
    result["rstd"] = hotpants_residual_std(folder)
    return result


def batch_rerun(trees: dict[str, Path], n_pairs: int, folder: Path, workers: int) -> None:
    """Time ``diffkernel batch`` run again over ``n_pairs`` current pairs, per tree."""
    from diffkernel.io.fits import write_exposure
    from diffkernel.simulate import make_pair

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["science,template,output"]
    for i in range(n_pairs):
        if not (folder / f"tmpl{i}.fits").is_file():
            pair = make_pair((384, 384), seed=500 + i, template_depth=4)
            write_exposure(folder / f"sci{i}.fits", pair.science, overwrite=True)
            write_exposure(folder / f"tmpl{i}.fits", pair.template, overwrite=True)
        lines.append(f"sci{i}.fits,tmpl{i}.fits,pair{i}.zarr")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    print(f"# batch rerun: {n_pairs} current 384x384 pairs, --workers {workers}")
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=str(tree))
        out = folder / f"out-{name}"
        command = [sys.executable, "-c", CLI, "batch", str(manifest), "--out", str(out)]
        command += ["--workers", str(workers)]
        # The first run does every pair (a pair that fails, status 1, is done again).
        first = run_process(command, env, ok=(0, 1, 3))
        reruns = [run_process(command, env, ok=(0, 1, 3)) for _ in range(3)]
        walls = [r["wall"] for r in reruns]
        print(
            f"{name:<22} first run {first['wall']:.2f} s; rerun {np.median(walls):.2f} s "
            f"(spread {spread(walls)}), peak main {max(r['main_gb'] for r in reruns):.2f} GB, "
            f"{max(r['n_children'] for r in reruns)} child processes; "
            f"{reruns[-1]['stdout'].strip().splitlines()[-1]}"
        )


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]


def report(n: int, runs: dict[str, list[dict]]) -> dict[str, float]:
    """Print one size's tables; the median walls."""
    header = (
        f"{'size':>6} {'command':<22} {'wall s':>7} {'spread':>11} {'main GB':>8} "
        f"{'worker GB':>9} {'rstd z':>7} {'warn':>4}"
    )
    print(header)
    print("-" * len(header))
    medians = {}
    for name, rs in runs.items():
        walls = [r["wall"] for r in rs]
        medians[name] = float(np.median(walls))
        print(
            f"{n:>6} {name:<22} {medians[name]:>7.2f} {spread(walls):>11} "
            f"{max(r['main_gb'] for r in rs):>8.2f} {max(r['worker_gb'] for r in rs):>9.2f} "
            f"{np.median([r['rstd'] for r in rs]):>7.3f} "
            f"{max(r.get('warnings', 0) for r in rs):>4}"
        )
    names = list(runs)
    if len(names) > 1:
        # Ratios per round (interleaved), then their median: drifts cancel.
        base = names[0]
        for other in names[1:]:
            ratios = [a["wall"] / b["wall"] for a, b in zip(runs[other], runs[base], strict=False)]
            print(
                f"{n:>6} {other} / {base}: median of per-round ratios "
                f"{np.median(ratios):.2f} (spread {spread(ratios)})"
            )
    phases = ("python+imports", *PHASES, "exit")
    trees = [name for name in names if name != "hotpants"]
    print(f"phases of the median run (s): {'phase':<15}" + "".join(f"{t:>12}" for t in trees))
    for phase in phases:
        values = [median_run(runs[t])["timing"].get(phase) for t in trees]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{v:>12.2f}" if v is not None else f"{'':>12}" for v in values)
        print(f"{'':30}{phase:<15}{cells}")
    return medians


def main(sizes: list[int], rounds: int, trees: dict[str, Path], workers: int, data: Path | None):
    exe = shutil.which("hotpants")
    print(
        f"# diffkernel subtract --workers {workers}, default config, no source list, "
        f"{rounds} interleaved rounds; HOTPANTS: {exe or 'skipped (not on PATH)'}"
    )
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = (data or Path(tmp)) / f"pair-{n}"
            t0 = time.perf_counter()
            if (
                not (folder / "science.fits").is_file()
                or not (folder / "hp-science-mask.fits").is_file()
            ):
                make_pair_files(n, folder, seed=1000 + n)
            files = {
                p.stem.removeprefix("hp-") if p.stem.startswith("hp-") else p.stem: p
                for p in folder.glob("*.fits")
                if "diff" not in p.stem
            }
            print(f"# {n}x{n}: pair ready in {time.perf_counter() - t0:.1f} s ({folder})")
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            if exe:
                runs["hotpants"] = []
            for _ in range(rounds):
                for name, tree in trees.items():
                    runs[name].append(
                        diffkernel_round(files, Path(tmp) / f"out-{n}.zarr", tree, workers)
                    )
                if exe:
                    runs["hotpants"].append(hotpants_round(files, Path(tmp), exe))
            results[n] = report(n, runs)
            if exe:
                for name in trees:
                    ratios = [
                        h["wall"] / d["wall"]
                        for h, d in zip(runs["hotpants"], runs[name], strict=False)
                    ]
                    print(
                        f"{n:>6} HOTPANTS / {name}: median of per-round ratios "
                        f"{np.median(ratios):.2f} (spread {spread(ratios)}); "
                        f"rstd z diffkernel {np.median([r['rstd'] for r in runs[name]]):.3f}, "
                        f"HOTPANTS {np.median([r['rstd'] for r in runs['hotpants']]):.3f}"
                    )
            print()
    print(json.dumps({"median_walls": results}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sizes",
        nargs="*",
        type=int,
        help="image sides (default 1024 2048 4096; none with --batch-pairs)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a diffkernel source tree to time (repeatable; default: this checkout)",
    )
    parser.add_argument(
        "--data", type=Path, help="folder keeping the simulated FITS pairs between runs"
    )
    parser.add_argument(
        "--batch-pairs",
        type=int,
        default=0,
        help="also time a batch rerun over this many current pairs (in --data)",
    )
    args = parser.parse_args()
    chosen = dict(t.split("=", 1) for t in args.tree) or {
        "diffkernel": str(Path(__file__).resolve().parents[1])
    }
    if args.batch_pairs:
        with tempfile.TemporaryDirectory() as tmp:
            batch_rerun(
                {k: Path(v).resolve() for k, v in chosen.items()},
                args.batch_pairs,
                (args.data or Path(tmp)) / "batch",
                args.workers,
            )
        if not args.sizes:
            sys.exit(0)
    main(
        args.sizes or [1024, 2048, 4096],
        max(1, args.rounds),
        {k: Path(v).resolve() for k, v in chosen.items()},
        args.workers,
        args.data,
    )
