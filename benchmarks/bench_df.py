"""Benchmark of the delta-function (DF) kernel against Alard-Lupton (AL), and of the lambda scans.

Usage::

    python benchmarks/bench_df.py                        # 768 and 1024, this tree only
    python benchmarks/bench_df.py --baseline 34e3fff     # and the code of a git revision
    python benchmarks/bench_df.py 768 --repeats 3 --baseline-steps 20

Table 1, for each size: a simulated pair (``make_pair((n, n), seed=1, template_depth=4)``,
the true source list given) fitted by ``MakeKernelTask`` with AL and DF, alternately,
``--repeats`` times in one process per code tree and configuration (the specification's,
``MakeKernelConfig()``, and ``default_subtraction()``), one BLAS thread; the best wall
and CPU time of each and the DF/AL ratios of the best times (CPU time is the steadier
on a shared machine). The trees run one after the
other, in a fresh process each, so compare their ratios rather than their seconds.

Table 2: the DF single-kernel fits of the 768 pair's candidates, timed on the same
statistics as the cell stage makes them (cell by cell, one BLAS thread; best of
``--repeats``): with the
absolute strength (no scan, for reference), with a scan of the default log grid (31
values) for both risk estimates, and with a linear grid of 1000 values (0.1 to 100 by
0.1). The baseline's linear scan is timed on its first ``--baseline-steps`` values and
scaled up (marked ``*``): it inverts one matrix per candidate and value. "same lambda"
compares the strengths each tree chooses.

Machines are shared and noisy: compare ratios measured in the same run. With
``--keep-freed-memory`` the measured processes keep the memory they free (glibc
settings), which takes out the cost of touching pages again on virtual machines that
hand free pages back to the host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TASK = r"""
import json, sys, time
from threadpoolctl import threadpool_limits
from diffkernel import MakeKernelConfig, MakeKernelTask
from diffkernel.simulate import make_pair
n, repeats, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pair = make_pair((n, n), seed=1, template_depth=4)
times = {"AL": [], "DF": []}
cpu = {"AL": [], "DF": []}
info = {}
with threadpool_limits(1, user_api="blas"):
    for _ in range(repeats):
        for name in ("AL", "DF"):
            if which == "subtraction":
                cfg = MakeKernelConfig.default_subtraction()
            else:
                cfg = MakeKernelConfig()
            cfg.kernel.name = name
            t0, c0 = time.perf_counter(), time.process_time()
            result = MakeKernelTask(cfg).run(pair.template, pair.science, pair.truth.sources)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            info[name] = [int(result.metadata["n_good"]), int(result.metadata["n_candidates"])]
print(json.dumps({"times": times, "cpu": cpu, "info": info}))
"""

SCAN = r"""
import importlib.util, json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
import diffkernel.pipeline.cells as cells
from diffkernel import MakeKernelConfig, MakeKernelTask
from diffkernel.config import PsfMatchConfigDF
from diffkernel.kernel import fit as current
from diffkernel.simulate import make_pair

baseline_path, baseline_steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
trees = {"current": current}
if baseline_path:
    spec = importlib.util.spec_from_file_location("diffkernel.kernel.fit_baseline", baseline_path)
    trees["baseline"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trees["baseline"])

# The DF candidates' statistics, as the cells make them.
captured = []
original = cells.candidate_stats
def capture(stamps, basis, kcfg, regularization):
    stats, single = original(stamps, basis, kcfg, regularization)
    captured.append((stats, regularization))
    return stats, single
cells.candidate_stats = capture
pair = make_pair((768, 768), seed=1, template_depth=4)
cfg = MakeKernelConfig()
cfg.kernel.name = "DF"
MakeKernelTask(cfg).run(pair.template, pair.science, pair.truth.sources)
batches = [c[0] for c in captured]
h = captured[0][1]
n_cand = sum(len(batch) for batch in batches)


def fit_cells(module, cfg):
    # The single-kernel fits of every cell's batch, as the cells make them.
    with threadpool_limits(1, user_api="blas"):
        return np.concatenate([module.fit_single_kernels(st, cfg, h).lam for st in batches])

grids = {
    "absolute (no scan)": dict(lambdaType="absolute"),
    "log unbiased": dict(lambdaType="minimizeUnbiasedRisk"),
    "log biased": dict(lambdaType="minimizeBiasedRisk"),
    "linear 1000 unbiased": dict(lambdaType="minimizeUnbiasedRisk", lambdaStepType="linear",
                                 lambdaMin=0.1, lambdaMax=100.0, lambdaStep=0.1),
}
rows = []
for label, fields in grids.items():
    row = {"scan": label, "n": n_cand}
    lams = {}
    for tree, module in trees.items():
        c, scale = PsfMatchConfigDF(**fields), 1.0
        if tree == "baseline" and label.startswith("linear"):
            c = PsfMatchConfigDF(**{**fields, "lambdaMax": 0.1 * baseline_steps})
            scale = 1000.0 / baseline_steps
        grid = current.lambda_grid(c.lambdaMin, c.lambdaMax, c.lambdaStep, c.lambdaStepType)
        best = float("inf")
        for _ in range(repeats if tree == "current" else 1):
            t0 = time.perf_counter()
            lams[tree] = fit_cells(module, c)
            best = min(best, time.perf_counter() - t0)
        row[tree] = best * scale
        row[tree + "_scaled"] = scale != 1.0
        row["steps_" + tree] = len(grid) if label.startswith(("log", "linear")) else 0
    if "baseline" in lams:
        n_common = min(len(lams["current"]), len(lams["baseline"]))
        if label.startswith("linear"):
            # The baseline saw the first values only: compare on that grid.
            c = PsfMatchConfigDF(**{**fields, "lambdaMax": 0.1 * baseline_steps})
            lams["current"] = fit_cells(current, c)
        row["same_lambda"] = bool(np.array_equal(lams["current"][:n_common],
                                                 lams["baseline"][:n_common]))
    rows.append(row)
print(json.dumps(rows))
"""


#: Extra environment of the measured processes (``--keep-freed-memory`` fills it).
CHILD_ENV: dict[str, str] = {}


def run(code: str, *args: str, path: Path) -> dict | list:
    """Run ``code`` in a fresh interpreter that imports diffkernel from ``path``."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **CHILD_ENV, "PYTHONPATH": str(path)},
        cwd=path,  # `python -c` puts the working directory first on sys.path
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export(rev: str, dest: Path) -> Path:
    """The package of git revision ``rev`` unpacked under ``dest``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "diffkernel"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def task_table(sizes: list[int], trees: dict[str, Path], repeats: int) -> None:
    header = (
        f"{'size':>6} {'config':>11} {'code':>9} {'AL s':>6} {'DF s':>6} {'DF/AL':>6} "
        f"{'AL cpu':>7} {'DF cpu':>7} {'DF/AL':>6} {'AL good/cand':>13} {'DF good/cand':>13}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        for which in ("spec", "subtraction"):
            for tree, path in trees.items():
                out = run(TASK, str(n), str(repeats), which, path=path)
                al, df = min(out["times"]["AL"]), min(out["times"]["DF"])
                al_c, df_c = min(out["cpu"]["AL"]), min(out["cpu"]["DF"])
                ia, idf = out["info"]["AL"], out["info"]["DF"]
                print(
                    f"{n:>6} {which:>11} {tree:>9} {al:>6.2f} {df:>6.2f} {df / al:>6.1f} "
                    f"{al_c:>7.2f} {df_c:>7.2f} {df_c / al_c:>6.1f} "
                    f"{ia[0]:>6}/{ia[1]:<6} {idf[0]:>6}/{idf[1]:<6}",
                    flush=True,
                )


def scan_table(baseline_fit: str, baseline_steps: int, repeats: int) -> None:
    rows = run(SCAN, baseline_fit, str(baseline_steps), str(repeats), path=REPO)
    header = (
        f"{'scan (768 pair)':>22} {'cands':>6} {'steps':>6} {'current s':>10} "
        f"{'baseline s':>11} {'speed-up':>9} {'same lambda':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base = r.get("baseline")
        mark = "*" if r.get("baseline_scaled") else " "
        print(
            f"{r['scan']:>22} {r['n']:>6} {r['steps_current'] or '-':>6} {r['current']:>10.2f} "
            + (
                f"{base:>10.1f}{mark} {base / r['current']:>9.0f} {str(r['same_lambda']):>12}"
                if base is not None
                else f"{'-':>11} {'-':>9} {'-':>12}"
            )
        )
    if any(r.get("baseline_scaled") for r in rows):
        print(f"* timed on the first {baseline_steps} values, scaled to 1000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[768, 1024])
    parser.add_argument("--baseline", help="git revision to compare with (e.g. 34e3fff)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-steps", type=int, default=50)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory in the process (MALLOC_MMAP_MAX_=0, no trimming): "
        "on virtual machines that hand free pages back to the host, touching them again "
        "costs more than the arithmetic of a DF fit",
    )
    args = parser.parse_args()
    if args.keep_freed_memory:
        CHILD_ENV.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)})
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"current": REPO}
        baseline_fit = ""
        if args.baseline:
            trees["baseline"] = export(args.baseline, Path(tmp))
            baseline_fit = str(Path(tmp) / "diffkernel" / "kernel" / "fit.py")
        task_table(args.sizes, trees, args.repeats)
        print()
        scan_table(baseline_fit, args.baseline_steps, args.repeats)


if __name__ == "__main__":
    main()
