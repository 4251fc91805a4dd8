"""Pairs whose template is the blurrier image: the science image is the one convolved.

:func:`make_swapped_pair` renders the two noise-free images of :func:`make_pair` and
lets the sharp one be the science image and the blurred one the template, each with its
own noise: a deep (coadded) template with the worse seeing, the case where convolving
the shallow science image correlates most of the difference's noise.
"""

from __future__ import annotations

import numpy as np

from ..image import DEFAULT_MASK_PLANES, Exposure, MaskedImage
from .pair import SimulatedPair, make_pair
from .render import noisy

__all__ = ["make_swapped_pair", "add_point_source", "optimal_snr"]


def make_swapped_pair(
    shape: tuple[int, int] = (512, 512), *, seed: int = 0, template_depth: float = 10.0, **kwargs
) -> SimulatedPair:
    """A pair whose science image is the sharp one (one exposure) and template the blurred.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    seed : int
        Seed of the scene (as :func:`make_pair`) and of the noise.
    template_depth : float
        Exposures in the (blurred) template: its variance is divided by it.
    **kwargs
        More :func:`make_pair` parameters (``gain``, ``read_noise``, ``kernel_sigmas``...).

    Returns
    -------
    SimulatedPair
        ``template`` (blurred, deep), ``science`` (sharp) and the truth of
        :func:`make_pair`, whose kernel matches the *science* image to the template.
    """
    sim = make_pair(shape, seed=seed, noise=False, **kwargs)
    truth = sim.truth
    rng_t, rng_s = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    gain, rn = truth.gain, truth.read_noise

    def exposure(model, rng, depth, fwhm):
        g, r = gain * depth, rn * np.sqrt(depth)
        variance = np.maximum(model, 0.0) / g + (r / g) ** 2
        masked = MaskedImage(noisy(rng, model, g, r), variance, None, dict(DEFAULT_MASK_PLANES))
        return Exposure(masked, None, fwhm, dict(sim.science.meta))

    template = exposure(truth.science_model, rng_t, template_depth, sim.science.psf_fwhm)
    science = exposure(truth.template_model, rng_s, 1.0, sim.template.psf_fwhm)
    return SimulatedPair(template, science, truth)


def add_point_source(image: np.ndarray, x: float, y: float, flux: float, psf: np.ndarray) -> None:
    """Add ``flux`` times a unit-sum odd ``psf`` stamp centred on pixel ``(x, y)``, in place."""
    h = psf.shape[0] // 2
    xi, yi = int(round(x)), int(round(y))
    image[yi - h : yi + h + 1, xi - h : xi + h + 1] += flux * psf / psf.sum()


def optimal_snr(
    psf: np.ndarray, kernel: np.ndarray, var_c: float, var_r: float, science_convolved: bool
) -> float:
    """S/N of a unit-flux point source of profile ``psf`` in the science image, measured
    optimally on the difference whose noise power is ``var_r + var_c |K|^2`` (the truth
    that injected transients and the score image are checked against)."""
    n = 128
    f_p, f_k = np.fft.fft2(psf, (n, n)), np.fft.fft2(kernel, (n, n))
    if science_convolved:
        f_p = f_p * f_k
    power = var_r + var_c * np.abs(f_k) ** 2
    return float(np.sqrt(np.sum(np.abs(f_p) ** 2 / power) / n**2))
