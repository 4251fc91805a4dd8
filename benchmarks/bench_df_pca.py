"""Accuracy of delta-function (DF) kernels with and without the PCA spatial basis.

Usage::

    python benchmarks/bench_df_pca.py                  # 768 (detected stars) and 1024 (given)
    python benchmarks/bench_df_pca.py --seeds 1 2 3 4

Simulated pairs (``make_pair(..., template_depth=4)``) have a known spatially varying
kernel. Each is fitted with ``MakeKernelConfig.default_subtraction()`` and, for the DF
rows, ``kernel.name = "DF"`` with the settings of the row: "spec lambda" rows use the
specification's absolute strength 0.2, the others the subtraction default (relative,
``lambdaScaling`` 1e-3) unless they say otherwise; AL is the reference.
What a subtraction sees of a kernel error is that error convolved with the template PSF,
so the error of a fit at a pixel is ``max |(K_fit - K_true) * PSF| / max(K_true * PSF)``:

- ``grid``: the RMS of that error over a 5 x 5 grid of pixels spanning the image (40 px
  from the edges), the spatial model included;
- ``stars``: its median at the positions of the candidates the fit used;
- ``ksum``: the kernel sum at the image centre minus the true sum (1), in percent.

Each number is the mean over the seeds; the fit time is the mean in seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.signal import convolve2d

from diffkernel import MakeKernelConfig, MakeKernelTask
from diffkernel.simulate import make_pair, sampled_gaussian

SPEC_LAMBDA = {"lambdaType": "absolute", "lambdaValue": 0.2}
ROWS = {
    "AL": ("AL", {}),
    "spec lambda, no PCA": ("DF", {**SPEC_LAMBDA, "usePcaForSpatialKernel": False}),
    "spec lambda, PCA 5": ("DF", {**SPEC_LAMBDA, "numPrincipalComponents": 5}),
    "no PCA": ("DF", {"usePcaForSpatialKernel": False}),
    "PCA 3": ("DF", {"numPrincipalComponents": 3}),
    "PCA 5": ("DF", {"numPrincipalComponents": 5}),
    "PCA 8": ("DF", {"numPrincipalComponents": 8}),
    "PCA 12": ("DF", {"numPrincipalComponents": 12}),
    "unbiased risk, PCA 5": ("DF", {"lambdaType": "minimizeUnbiasedRisk"}),
}


def _embed(kernel: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size))
    o = (size - kernel.shape[0]) // 2
    out[o : o + kernel.shape[0], o : o + kernel.shape[1]] = kernel
    return out


def kernel_error(result, truth, x: float, y: float) -> float:
    """Peak of the kernel error seen through the template PSF, relative to the true peak."""
    psf = sampled_gaussian(21, truth.template_fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))))
    fitted, true = result.psfMatchingKernel.image_at(x, y), truth.kernel_at(x, y)
    size = max(fitted.shape[0], true.shape[0])
    reference = convolve2d(_embed(true, size), psf)
    error = convolve2d(_embed(fitted, size) - _embed(true, size), psf)
    return float(np.abs(error).max() / reference.max())


def measure(size: int, seed: int, given: bool, name: str, fields: dict) -> dict:
    pair = make_pair((size, size), seed=seed, template_depth=4)
    cfg = MakeKernelConfig.default_subtraction()
    cfg.kernel.name = name
    for key, value in fields.items():
        setattr(cfg.kernel.active, key, value)
    t0 = time.perf_counter()
    try:
        result = MakeKernelTask(cfg).run(
            pair.template, pair.science, pair.truth.sources if given else None
        )
    except Exception as err:  # a fit that fails is a result of this benchmark
        return {"error": type(err).__name__}
    seconds = time.perf_counter() - t0
    ny, nx = pair.truth.shape
    grid = [
        kernel_error(result, pair.truth, x, y)
        for y in np.linspace(40, ny - 41, 5)
        for x in np.linspace(40, nx - 41, 5)
    ]
    cand = result.candidates
    good = np.asarray(cand["status"]).astype(str) == "GOOD"
    stars = [
        kernel_error(result, pair.truth, x, y)
        for x, y in zip(np.asarray(cand["x"])[good], np.asarray(cand["y"])[good], strict=True)
    ]
    return {
        "grid": float(np.sqrt(np.mean(np.square(grid)))),
        "stars": float(np.median(stars)),
        "ksum": 100.0 * (result.psfMatchingKernel.sum_at(nx / 2, ny / 2) - 1.0),
        "good": int(good.sum()),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    cases = [(768, False), (1024, True)]
    header = (
        f"{'pair':>15} {'DF fit':>22} {'grid':>7} {'stars':>7} {'ksum %':>7} "
        f"{'good':>5} {'fit s':>6}"
    )
    print(header)
    print("-" * len(header))
    for size, given in cases:
        label = f"{size} {'given' if given else 'detected'}"
        for row, (name, fields) in ROWS.items():
            runs = [measure(size, seed, given, name, fields) for seed in args.seeds]
            failed = [r["error"] for r in runs if "error" in r]
            ok = [r for r in runs if "error" not in r]
            if not ok:
                print(f"{label:>15} {row:>22}   failed: {', '.join(failed)}")
                continue

            def mean(key, runs=ok):
                return float(np.mean([r[key] for r in runs]))

            note = f"  ({len(failed)} failed: {failed[0]})" if failed else ""
            print(
                f"{label:>15} {row:>22} {mean('grid'):>7.3f} {mean('stars'):>7.3f} "
                f"{mean('ksum'):>+7.2f} {mean('good'):>5.0f} {mean('seconds'):>6.1f}{note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
