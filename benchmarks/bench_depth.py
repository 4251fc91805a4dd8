"""Kernel accuracy against template depth: AL, DF and DF with a PCA basis.

Usage::

    python benchmarks/bench_depth.py                    # 768 pair, seeds 1 2 3
    python benchmarks/bench_depth.py --size 512 --seeds 1 --depths 1 16

Simulated pairs (``make_pair((n, n), seed, template_depth=d)``: the template is the
mean of ``d`` exposures, so its noise variance is ``1/d`` of an exposure's) have a
known spatially varying kernel. Each is fitted with ``MakeKernelConfig.default_subtraction()``
(true source list given; "AL" with ``alardRegularization = 60`` and
``correctConvolvedNoise``, "AL plain" without) and the kernel the result stores is
compared with the truth:

- ``raw``: ``max |K_fit - K_true| / max K_true``, the worst kernel pixel relative to the
  true peak;
- ``psf``: the same error convolved with the template PSF, relative to the peak of
  ``K_true * PSF``: what a subtraction of the template's stars sees;

each as the RMS over a 5 x 5 grid of pixels spanning the image (40 px from the edges),
and ``ksum`` the kernel sum's error at the centre in percent. Numbers are means over the
seeds. A kernel fitted from a deeper template should be no worse.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.signal import convolve2d

from diffkernel import MakeKernelConfig, MakeKernelTask
from diffkernel.simulate import make_pair, sampled_gaussian

FITS = {
    "AL plain": ("AL", {}),
    "AL": ("AL", {"alardRegularization": 60.0, "correctConvolvedNoise": True}),
    "DF": ("DF", {"usePcaForSpatialKernel": False}),
    "DF+PCA": ("DF", {"usePcaForSpatialKernel": True}),
}


def _embed(kernel: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size))
    o = (size - kernel.shape[0]) // 2
    out[o : o + kernel.shape[0], o : o + kernel.shape[1]] = kernel
    return out


def kernel_errors(result, truth, x: float, y: float) -> tuple[float, float]:
    """``(raw, psf)`` errors of the fitted kernel at pixel ``(x, y)`` (see the module doc)."""
    psf = sampled_gaussian(21, truth.template_fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))))
    fitted, true = result.psfMatchingKernel.image_at(x, y), truth.kernel_at(x, y)
    size = max(fitted.shape[0], true.shape[0])
    fitted, true = _embed(fitted, size), _embed(true, size)
    raw = np.abs(fitted - true).max() / true.max()
    seen = np.abs(convolve2d(fitted - true, psf)).max() / convolve2d(true, psf).max()
    return float(raw), float(seen)


def measure(size: int, seed: int, depth: float, name: str, fields: dict) -> dict:
    """Errors of one fit of one pair."""
    pair = make_pair((size, size), seed=seed, template_depth=depth)
    cfg = MakeKernelConfig.default_subtraction()
    cfg.kernel.name = name
    for key, value in fields.items():
        setattr(cfg.kernel.active, key, value)
    result = MakeKernelTask(cfg).run(pair.template, pair.science, pair.truth.sources)
    ny, nx = pair.truth.shape
    errs = np.array(
        [
            kernel_errors(result, pair.truth, x, y)
            for y in np.linspace(40, ny - 41, 5)
            for x in np.linspace(40, nx - 41, 5)
        ]
    )
    rms = np.sqrt(np.mean(errs**2, axis=0))
    centre = (nx / 2, ny / 2)
    ksum = result.psfMatchingKernel.sum_at(*centre) - pair.truth.kernel_sum_at(*centre)
    return {"raw": rms[0], "psf": rms[1], "ksum": 100.0 * ksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--depths", nargs="*", type=float, default=[1.0, 4.0, 16.0])
    args = parser.parse_args()
    header = f"{'fit':>8} {'depth':>6} {'raw':>7} {'psf':>7} {'ksum %':>7}"
    print(f"{args.size}^2 pairs, seeds {args.seeds}, default_subtraction(), sources given")
    print(header)
    print("-" * len(header))
    for label, (name, fields) in FITS.items():
        for depth in args.depths:
            runs = [measure(args.size, s, depth, name, fields) for s in args.seeds]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            print(
                f"{label:>8} {depth:>6g} {mean['raw']:>7.3f} {mean['psf']:>7.3f} "
                f"{mean['ksum']:>+7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
