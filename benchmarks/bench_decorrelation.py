"""Decorrelation and score image: noise autocorrelation before/after, and score S/N.

Prints two tables.

1. Lag-1 and lag-2 autocorrelations (x and y) and the robust standard deviation of
   difference / sigma on unmasked sky, without and with decorrelation, for:

   * the demo pair (``diffkernel demo``'s simulation: ``make_pair(template_depth=4,
     n_variable=5)``, smaller), convolveTemplate;
   * simulated pairs in both directions: a shallow sharp template (convolveTemplate,
     depth 1), and a deep template with the worse seeing (the science image is
     convolved; depths 4 and 10);
   * DECam pairs from ``shared/data/real/decam-sfft-mini``: 2018 frame a as science
     against the sharper 2016 frame a (convolveTemplate), the same with frames b, and
     the 2016 frame a as science against the mean of the five 2018 frames (a deeper
     template with the worse seeing: convolveScience).
     Those frames were resampled (SWarp, LANCZOS3), which correlates their noise before
     any subtraction; the table gives the inputs' own lag-1 too.

2. The score image's peak against the injected S/N: point sources injected into the
   science image at S/N 5, 10 and 20 (the optimal S/N on the difference's true noise),
   in both directions; mean and scatter of the peak score over 25 sources, and the
   score's robust std on the sky.

Serial path (``MakeKernelTask`` + ``subtract_images``); the cluster path gives the same
pixels (tests/pipeline/test_apply.py). Run: ``python benchmarks/bench_decorrelation.py
[--size 512] [--real PATH]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.image import Exposure, MaskedImage
from diffkernel.kernel.decorrelate import autocorrelation
from diffkernel.simulate import make_pair, sampled_gaussian
from diffkernel.simulate.swapped import add_point_source, make_swapped_pair, optimal_snr


def config(order: int = 1) -> MakeKernelConfig:
    cfg = MakeKernelConfig.default_subtraction()
    cfg.kernel.active.spatialKernelOrder = order
    if order == 0:
        cfg.kernel.active.spatialBgOrder = 0
    return cfg


def lags(diff) -> dict[str, float]:
    return autocorrelation(diff.image, diff.variance, diff.mask)


def input_lag1(exposure) -> str:
    """Lag-1 in x and y of an input's own noise: (image - median-filtered) / sigma."""
    from scipy.ndimage import median_filter

    mi = exposure.masked_image
    image = np.asarray(mi.image, dtype=float)
    resid = image - median_filter(image, size=15)
    stats = autocorrelation(resid, np.asarray(mi.variance, float), mi.mask)
    return f"{stats['x1']:.3f}/{stats['y1']:.3f}"


def mean_stack(exposures):
    """The mean of pixel-aligned exposures: a deeper template (variance / N)."""
    n = len(exposures)
    planes = [e.masked_image for e in exposures]
    image = sum(np.asarray(p.image, float) for p in planes) / n
    variance = sum(np.asarray(p.variance, float) for p in planes) / n**2
    mask = np.bitwise_or.reduce([p.mask for p in planes])
    fwhm = float(np.mean([e.psf_fwhm for e in exposures if e.psf_fwhm] or [0])) or None
    masked = MaskedImage(image, variance, mask, planes[0].mask_planes)
    return Exposure(masked, exposures[0].wcs, fwhm, dict(exposures[0].meta))


def row(name, template, science, sources=None, mode="auto", order=1):
    t0 = time.perf_counter()
    result = MakeKernelTask(config(order)).run(template, science, sources, mode=mode)
    before = lags(subtract_images(template, science, result))
    verdicts = [result.quality["verdict"]]
    after = lags(subtract_images(template, science, result, decorrelate=True))
    verdicts.append(result.quality["verdict"])
    verdict = dict(zip(("before", "after"), verdicts, strict=True))
    seconds = time.perf_counter() - t0
    return name, result.mode, before, after, verdict, seconds


def print_lag_table(rows) -> None:
    head = (
        f"{'pair':44s} {'mode':16s} {'':6s} {'lag1 x':>7s} {'lag1 y':>7s} {'lag2 x':>7s} "
        f"{'lag2 y':>7s} {'rstd':>6s} verdict"
    )
    print(head)
    print("-" * len(head))
    for name, mode, before, after, verdict, _ in rows:
        for label, s in (("before", before), ("after", after)):
            print(
                f"{name if label == 'before' else '':44s} {mode if label == 'before' else '':16s} "
                f"{label:6s} {s['x1']:7.3f} {s['y1']:7.3f} {s['x2']:7.3f} {s['y2']:7.3f} "
                f"{s['robust_std']:6.3f} {verdict[label]}"
            )


def score_rows(size: int) -> list:
    shape = (size, size)
    spots = [
        (x, y)
        for y in np.linspace(60, size - 60, 5).astype(int)
        for x in np.linspace(60, size - 60, 5).astype(int)
    ]
    out = []
    for name, sim, mode in (
        ("sim convolveTemplate, depth 4", make_pair(shape, seed=6, template_depth=4), "ct"),
        ("sim convolveScience, deep template", make_swapped_pair(shape, seed=3), "cs"),
    ):
        swapped = mode == "cs"
        truth = sim.truth
        result = MakeKernelTask(config()).run(
            sim.template,
            sim.science,
            truth.sources,
            mode="convolveScience" if swapped else "convolveTemplate",
        )
        var_s = float(np.median(sim.science.masked_image.variance))
        var_t = float(np.median(sim.template.masked_image.variance))
        for snr in (5.0, 10.0, 20.0):
            mi = sim.science.masked_image
            image = mi.image.copy()
            for x, y in spots:
                psf = sampled_gaussian(21, truth.template_fwhm / 2.3548)
                if not swapped:
                    psf = fftconvolve(psf, truth.kernel_at(x, y) / truth.flux_scale, mode="same")
                    psf /= psf.sum()
                var_c, var_r = (var_s, var_t) if swapped else (var_t, var_s)
                k = truth.kernel_at(x, y)
                flux = snr / optimal_snr(psf, k, var_c, var_r, swapped)
                add_point_source(image, x, y, flux, psf)
            science = Exposure(MaskedImage(image, mi.variance, mi.mask, mi.mask_planes), None,
                               sim.science.psf_fwhm)  # fmt: skip
            for decorrelate in (True, False):
                diff = subtract_images(
                    sim.template, science, result, decorrelate=decorrelate, score=True
                )
                score = result.scoreImage
                peaks = np.array([score[y - 1 : y + 2, x - 1 : x + 2].max() for x, y in spots])
                sky = np.isfinite(score) & (diff.mask == 0)
                for x, y in spots:
                    sky[y - 12 : y + 13, x - 12 : x + 13] = False
                z = score[sky]
                rstd = 1.4826 * np.median(np.abs(z - np.median(z)))
                out.append((name, decorrelate, snr, peaks.mean(), peaks.std(), rstd))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="side of the simulated pairs")
    parser.add_argument("--real", default="/work/shared/data/real/decam-sfft-mini")
    args = parser.parse_args()
    shape = (args.size, args.size)
    rows = []
    demo = make_pair(shape, seed=0, template_depth=4, n_variable=5)
    rows.append(row("demo pair (depth 4, detected sources)", demo.template, demo.science))
    for depth in (1,):
        sim = make_pair(shape, seed=11, template_depth=depth)
        rows.append(row(f"sim sharp template, depth {depth}", sim.template, sim.science,
                        sim.truth.sources, "convolveTemplate"))  # fmt: skip
    for depth in (4, 10):
        sim = make_swapped_pair(shape, seed=12, template_depth=depth)
        rows.append(row(f"sim blurry template, depth {depth} (sci conv.)", sim.template,
                        sim.science, sim.truth.sources, "convolveScience"))  # fmt: skip
    real = Path(args.real)
    if real.is_dir():
        from diffkernel.io.fits import read_exposure

        a04 = read_exposure(real / "DEC-OBS04a.mini.fits")
        a18 = read_exposure(real / "DEC-OBS18a.mini.fits")
        rows.append(row("DECam sci 04a, tmpl 18a (sharper)", a18, a04, order=0))
        b04 = read_exposure(real / "DEC-OBS04b.mini.fits")
        b18 = read_exposure(real / "DEC-OBS18b.mini.fits")
        rows.append(row("DECam sci 04b, tmpl 18b (sharper)", b18, b04, order=0))
        stack = mean_stack([read_exposure(real / f"DEC-OBS04{f}.mini.fits") for f in "abcde"])
        rows.append(row("DECam sci 18a, tmpl mean 04a-e (deep, blurrier)", stack, a18, order=0))
        inputs = {"04a": a04, "04b": b04, "18a": a18, "18b": b18, "mean 04a-e": stack}
        own = ", ".join(f"{k} {input_lag1(v)}" for k, v in inputs.items())
        print(f"DECam inputs' own lag-1 x/y (SWarp resampling correlates them): {own}\n")
    print_lag_table(rows)
    print()
    print(
        f"{'pair':36s} {'decorr':6s} {'S/N in':>6s} {'peak':>6s} {'scatter':>7s} {'sky rstd':>8s}"
    )
    for name, decorrelate, snr, mean, std, rstd in score_rows(min(args.size, 384)):
        print(f"{name:36s} {str(decorrelate):6s} {snr:6.1f} {mean:6.2f} {std:7.2f} {rstd:8.3f}")


if __name__ == "__main__":
    main()
