"""Simulated template/science pairs with an exactly known matching kernel.

:func:`make_pair` draws a star field, renders it as a *template* with a Gaussian PSF and
as a *science* image made by convolving the same scene with a spatially varying matching
kernel and adding a differential background. Everything the fit should recover is
returned in a :class:`PairTruth`, so tests can compare a fitted kernel and background to
the truth, not to another estimate.

Truth model
-----------
Let ``h = kernel_size // 2`` and ``(ny, nx) = shape``. Pixel ``(x, y)`` is column ``x``,
row ``y`` (0-based) and the normalized coordinates are ``xn = 2 x / (nx - 1) - 1``,
``yn = 2 y / (ny - 1) - 1``.

* The true template scene ``T0`` is the sky ``template_sky`` plus stars whose circular
  Gaussian PSF (FWHM ``template_fwhm``) is integrated over each pixel. It is rendered on
  a canvas padded by ``h`` on every side, so the science image has no edge effects.
* The matching kernel at output pixel ``(x, y)`` is
  ``K_xy = flux_scale * (w(x, y) G_a + (1 - w(x, y)) G_b)``, where ``G_a`` and ``G_b``
  are circular Gaussians of widths ``kernel_sigmas`` *sampled* at the integer offsets of
  a ``kernel_size`` square grid centred on ``[h, h]`` and each normalized to sum 1 on
  it, and ``w`` is a polynomial in ``(xn, yn)`` with coefficients ``kernel_weight``.
  The kernel sum is ``flux_scale`` everywhere.
* The science model is
  ``S[y, x] = sum_{j, i} K_xy[j, i] T[y - (j - h), x - (i - h)] + b(x, y)``
  (ordinary convolution, kernel evaluated at the output pixel), where ``T`` is ``T0``
  plus the extra science-only flux of variable and saturating stars, and ``b`` is the
  differential background polynomial with coefficients ``background``.
* Polynomials take 1, 3 or 6 coefficients, for the terms
  ``1, xn, yn, xn**2, xn*yn, yn**2`` in that order.
* Noise is Poisson in electrons (``image * gain``) plus Gaussian read noise, drawn
  independently for each image; the variance plane is the honest variance of the
  noise-free model, ``model / gain + (read_noise / gain)**2``.
"""

from .pair import PairTruth, SimulatedPair, make_pair
from .render import sampled_gaussian

__all__ = ["PairTruth", "SimulatedPair", "make_pair", "sampled_gaussian"]
