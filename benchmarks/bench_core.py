"""Benchmark of the single-process engine: wall time, peak memory and residual quality.

Usage::

    python benchmarks/bench_core.py            # 2048 and 4096
    python benchmarks/bench_core.py 1024 2048  # chosen sizes

For each size a simulated pair (coadd-depth template, default AL configuration with a
fitted background, sources given) is written to a temporary directory by one process
and processed by a fresh one, so that the peak memory reported is that of reading the
pair, fitting and subtracting. The "limit" row is the least work any subtraction must
do on the same pair: one FFT convolution of the whole template with one 21x21 kernel
and a subtraction. Compare ratios within one run: machines are shared and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
import numpy as np
from astropy.table import Table
path, mode = sys.argv[1], sys.argv[2]
data = np.load(path + "/pair.npz")
from diffkernel import MaskedImage, MakeKernelConfig, MakeKernelTask, subtract_images
t0 = time.perf_counter()
tmpl = MaskedImage(data["t_img"], data["t_var"], data["t_mask"])
sci = MaskedImage(data["s_img"], data["s_var"], data["s_mask"])
out = {}
if mode == "limit":
    from scipy.signal import fftconvolve
    k = np.exp(-0.5 * (np.arange(-10, 11) / 2.0) ** 2)
    kernel = np.outer(k, k) / np.outer(k, k).sum()
    t1 = time.perf_counter()
    diff = sci.image - fftconvolve(tmpl.image, kernel, mode="same")
    out["convolve_s"] = time.perf_counter() - t1
else:
    sources = Table.read(path + "/sources.ecsv")
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    t1 = time.perf_counter()
    result = MakeKernelTask(cfg).run(tmpl, sci, sources)
    t2 = time.perf_counter()
    diff = subtract_images(tmpl, sci, result)
    t3 = time.perf_counter()
    z = diff.image / np.sqrt(diff.variance)
    good = np.isfinite(z) & (diff.mask == 0)
    v = z[good]
    med = float(np.median(v))
    out.update(fit_s=t2 - t1, subtract_s=t3 - t2, n_good=result.metadata["n_good"],
               n_cand=result.metadata["n_candidates"], mean=float(v.mean()),
               robust_std=float(1.4826 * np.median(np.abs(v - med))))
out["total_s"] = time.perf_counter() - t0
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
print(json.dumps(out))
"""

MAKE = r"""
import sys, numpy as np
from diffkernel.simulate import make_pair
n, path = int(sys.argv[1]), sys.argv[2]
pair = make_pair((n, n), seed=42, template_depth=4)
t, s = pair.template.masked_image, pair.science.masked_image
np.savez(path + "/pair.npz", t_img=t.image, t_var=t.variance, t_mask=t.mask,
         s_img=s.image, s_var=s.variance, s_mask=s.mask)
pair.truth.sources.write(path + "/sources.ecsv", overwrite=True)
"""


def run(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def main(sizes: list[int]) -> None:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            run(MAKE, str(n), tmp)
            limit = json.loads(run(CHILD, tmp, "limit"))
            full = json.loads(run(CHILD, tmp, "full"))
        rows.append((n, limit, full))
    header = (
        f"{'size':>6} {'fit s':>7} {'sub s':>7} {'total s':>8} {'limit s':>8} {'ratio':>6} "
        f"{'peak GB':>8} {'lim GB':>7} {'good/cand':>10} {'mean z':>7} {'rstd z':>7}"
    )
    print(header)
    print("-" * len(header))
    for n, lim, f in rows:
        print(
            f"{n:>6} {f['fit_s']:>7.2f} {f['subtract_s']:>7.2f} {f['total_s']:>8.2f} "
            f"{lim['total_s']:>8.2f} {f['total_s'] / lim['total_s']:>6.1f} "
            f"{f['peak_rss_gb']:>8.2f} {lim['peak_rss_gb']:>7.2f} "
            f"{f['n_good']:>4}/{f['n_cand']:<5} {f['mean']:>7.3f} {f['robust_std']:>7.3f}"
        )
    if len(rows) >= 2:
        print(
            f"time({rows[-1][0]}) / time({rows[-2][0]}) = "
            f"{rows[-1][2]['total_s'] / rows[-2][2]['total_s']:.2f}"
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2048, 4096])
