"""MakeKernelTask: solve for the PSF-matching kernel and background of two images.

``MakeKernelTask(config).run(template, science, kernelSources=None, preconvolved=False)``
follows ip_diffim's MakeKernelTask: check and (if needed) align the inputs, find
kernel candidates, vet them, fit them, clip them in three stages, and fit the
spatially varying kernel and differential background. The result can then be
passed to :func:`diffkernel.subtract_images`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.table import Table
from threadpoolctl import threadpool_limits

from ..config import MakeKernelConfig
from ..errors import ConfigError, InputError, NoCandidatesError
from ..image import Exposure, MaskedImage, as_exposure
from ..io.fits import SATURATION_KEYS
from ..kernel.basis import KernelBasis, basis_from_config, regularization_for
from ..kernel.cells import CellPlan, InMemoryPair, SourcePlacement, fit_cell, reduce_cells
from ..kernel.spatial import SpatialSolution
from ..prep.psf import exposure_fwhm, measure_pair_fwhm
from ..prep.selection import source_positions
from ..quality import assess

#: Directions of the convolution.
MODES = ("convolveTemplate", "convolveScience", "auto")

__all__ = [
    "MODES",
    "choose_mode",
    "require_fwhms",
    "MakeKernelTask",
    "MakeKernelResult",
    "SpatialKernel",
    "BackgroundModel",
    "make_cell_plan",
]


class SpatialKernel:
    """The spatially varying PSF-matching kernel.

    Parameters
    ----------
    solution : SpatialSolution
        Fitted spatial model.
    """

    def __init__(self, solution: SpatialSolution) -> None:
        self.solution = solution

    @property
    def kernel_size(self) -> int:
        """Side of the kernel image in pixels."""
        return self.solution.basis.kernel_size

    @property
    def basis_images(self) -> np.ndarray:
        """``(n_basis, K, K)`` basis kernels."""
        return self.solution.basis.images

    def coefficients_at(self, x: float, y: float) -> np.ndarray:
        """Basis coefficients at pixel ``(x, y)``."""
        return self.solution.coefficients_at(x, y)

    def image_at(self, x: float, y: float) -> np.ndarray:
        """Kernel image ``(K, K)`` at pixel ``(x, y)`` (0-based), centred at ``[K//2, K//2]``."""
        return self.solution.basis.kernel_image(self.solution.coefficients_at(x, y))

    def sum_at(self, x: float, y: float) -> float:
        """Kernel sum (photometric scale from template to science) at ``(x, y)``."""
        return float(self.solution.coefficients_at(x, y) @ self.solution.basis.sums)

    def __repr__(self) -> str:
        s = self.solution
        return (
            f"SpatialKernel({s.basis.kind}, {s.basis.size} basis kernels of "
            f"{self.kernel_size}x{self.kernel_size}, {s.kernel_functions.model_type} order "
            f"{s.kernel_functions.order})"
        )


class BackgroundModel:
    """Differential background ``b(x, y)`` such that ``science ≈ K ⊛ template + b``.

    When mesh backgrounds were removed first (``useAfwBackground``), they are part of
    the model: ``b = fit + bg_science - kernel_sum * bg_template`` (exact where the
    template background is locally flat over the kernel).
    """

    def __init__(
        self,
        solution: SpatialSolution,
        science_background: np.ndarray | None = None,
        template_background: np.ndarray | None = None,
    ) -> None:
        self.solution = solution
        self.science_background = science_background
        self.template_background = template_background

    def __call__(self, x, y) -> np.ndarray:
        """Background at pixel positions (arrays broadcast)."""
        value = self.solution.background_at(x, y)
        if self.science_background is None:
            return value
        xi = np.clip(np.rint(x).astype(int), 0, self.science_background.shape[1] - 1)
        yi = np.clip(np.rint(y).astype(int), 0, self.science_background.shape[0] - 1)
        ksum = self.solution.coefficients_at(x, y) @ self.solution.basis.sums
        return value + self.science_background[yi, xi] - ksum * self.template_background[yi, xi]


@dataclass
class MakeKernelResult:
    """What :meth:`MakeKernelTask.run` returns.

    Attributes
    ----------
    psfMatchingKernel : SpatialKernel
        The kernel, evaluable anywhere on the image.
    backgroundModel : BackgroundModel
        The differential background, callable as ``(x, y)``.
    candidates : astropy.table.Table
        One row per input source: id, x, y, cell, status (GOOD, BAD, UNUSED),
        reason for rejection, kernel sum, residual mean and std (single-kernel and
        spatial), and more.
    spatialSolution : SpatialSolution
        The raw spatial model (coefficients, basis, functions).
    metadata : dict
        Counts per clipping stage, rounds, condition numbers, basis choices, notes.
    alignedTemplate : MaskedImage or None
        The template warped onto the science grid, when alignment was done.
    scienceBackground, templateBackground : numpy.ndarray or None
        Mesh backgrounds removed before fitting (``useAfwBackground``).
    mode : str
        ``"convolveTemplate"`` (the kernel matches the template to the science
        image) or ``"convolveScience"`` (it matches the science image to the
        template; the roles of the two images in the kernel, background and
        candidate statistics are swapped).
    quality : dict
        The verdict (``"pass"``, ``"warn"`` or ``"fail"``), its reasons, each check
        and the metrics behind them (:func:`diffkernel.quality.assess`). After the
        fit it judges the fit alone; :func:`diffkernel.subtract_images` adds the
        difference image's statistics to it.
    config : MakeKernelConfig or None
        The configuration of the fit.
    differenceHistograms : numpy.ndarray or None
        ``(2, n_bins)`` counts of difference / sigma on the sky and on the candidates'
        footprints (:func:`diffkernel.quality.difference_histograms`), set by
        :func:`diffkernel.subtract_images`.
    """

    psfMatchingKernel: SpatialKernel
    backgroundModel: BackgroundModel
    candidates: Table
    spatialSolution: SpatialSolution
    metadata: dict = field(default_factory=dict)
    alignedTemplate: MaskedImage | None = None
    scienceBackground: np.ndarray | None = None
    templateBackground: np.ndarray | None = None
    mode: str = "convolveTemplate"
    quality: dict = field(default_factory=dict)
    config: MakeKernelConfig | None = None
    differenceHistograms: np.ndarray | None = None


def _check_pair(template: Exposure, science: Exposure, bad_planes: tuple[str, ...]) -> None:
    if template.shape != science.shape:
        raise InputError(
            f"template shape {template.shape} differs from science shape {science.shape}; "
            "warp the template onto the science grid (Exposures with WCS are aligned "
            "automatically when warpingConfig.doAlign is True)"
        )
    exempt = tuple(dict.fromkeys(("NO_DATA",) + tuple(bad_planes)))
    template.masked_image.validate("template", exempt)
    science.masked_image.validate("science", exempt)


def _needs_alignment(template: Exposure, science: Exposure, cfg) -> bool:
    if not cfg.warpingConfig.doAlign or template.wcs is None or science.wcs is None:
        return False
    if template.shape != science.shape:
        return True
    ny, nx = science.shape
    xs = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2])
    ys = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
    world = science.wcs.pixel_to_world_values(xs, ys)
    xt, yt = template.wcs.world_to_pixel_values(*world)
    return bool(np.max(np.hypot(np.asarray(xt) - xs, np.asarray(yt) - ys)) > 1e-3)


class MakeKernelTask:
    """Build a PSF-matching kernel for two images.

    Parameters
    ----------
    config : MakeKernelConfig, optional
        Configuration; the default has the Alard-Lupton kernel.

    Examples
    --------
    >>> from diffkernel import MakeKernelTask, subtract_images
    >>> from diffkernel.simulate import make_pair
    >>> pair = make_pair((256, 256), seed=1)
    >>> result = MakeKernelTask().run(pair.template, pair.science, pair.truth.sources)
    >>> diff = subtract_images(pair.template, pair.science, result)
    """

    def __init__(self, config: MakeKernelConfig | None = None) -> None:
        self.config = MakeKernelConfig() if config is None else config
        if not isinstance(self.config, MakeKernelConfig):
            raise ConfigError(
                f"config must be a MakeKernelConfig, got {type(self.config).__name__}"
            )

    def run(
        self,
        template: MaskedImage | Exposure,
        science: MaskedImage | Exposure,
        kernelSources: Table | None = None,
        preconvolved: bool = False,
        mode: str = "convolveTemplate",
    ) -> MakeKernelResult:
        """Solve for the kernel and background that match ``template`` to ``science``.

        Parameters
        ----------
        template, science : MaskedImage or Exposure
            MaskedImages must be aligned; Exposures with WCS are warped onto the
            science grid unless ``warpingConfig.doAlign`` is False.
        kernelSources : astropy.table.Table, optional
            Candidate positions (``x``, ``y`` or ``ra``, ``dec``); if None, a coarse
            detection finds them.
        preconvolved : bool
            The science image was already convolved with its PSF (as for a
            likelihood image); its effective PSF is then wider by sqrt(2), which sizes
            the basis.
        mode : {"convolveTemplate", "convolveScience", "auto"}
            Which image the kernel convolves. Matching a wider template to a sharper
            science image would need a deconvolution, so ``"convolveScience"`` fits
            the kernel that matches the science image to the template instead, and
            ``"auto"`` picks the image with the narrower PSF (by FWHM) to convolve.
            The choice is ``result.mode`` (and ``metadata["mode"]``);
            :func:`diffkernel.subtract_images` follows it.

        Returns
        -------
        MakeKernelResult
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        cfg = self.config
        cfg.validate()
        kcfg = cfg.kernel.active
        tmpl = as_exposure(template, "template")
        sci = as_exposure(science, "science")
        bad_planes = tuple(kcfg.badMaskPlanes)
        aligned = None
        if _needs_alignment(tmpl, sci, kcfg):
            from ..prep.align import warp_exposure

            tmpl = warp_exposure(tmpl, sci, kcfg.warpingConfig)
            aligned = tmpl.masked_image
        elif (
            tmpl.shape != sci.shape
            and kcfg.warpingConfig.doAlign
            and (tmpl.wcs is None) != (sci.wcs is None)
        ):
            which = "template" if tmpl.wcs is None else "science"
            raise InputError(
                f"template shape {tmpl.shape} differs from science shape {sci.shape} and "
                f"aligning them needs a WCS on both exposures; the {which} has none"
            )
        _check_pair(tmpl, sci, bad_planes)
        t_mi, s_mi = tmpl.masked_image, sci.masked_image
        meta: dict[str, Any] = {"aligned": aligned is not None, "preconvolved": bool(preconvolved)}

        bg_t = bg_s = None
        if kcfg.useAfwBackground:
            from ..prep.background import mesh_background

            bg_t = mesh_background(t_mi, kcfg.afwBackgroundConfig)
            bg_s = mesh_background(s_mi, kcfg.afwBackgroundConfig)
            t_mi = MaskedImage(t_mi.image - bg_t, t_mi.variance, t_mi.mask, t_mi.mask_planes)
            s_mi = MaskedImage(s_mi.image - bg_s, s_mi.variance, s_mi.mask, s_mi.mask_planes)

        if kernelSources is None:
            from ..prep.sources import detect_sources

            det_on = t_mi if kcfg.detectionConfig.detOnTemplate else s_mi
            guess_half = kcfg.detectionConfig.stamp_half_width(kcfg.kernelSize)
            det_exp = tmpl if kcfg.detectionConfig.detOnTemplate else sci
            saturation = next(
                (float(det_exp.meta[k]) for k in SATURATION_KEYS if k in det_exp.meta),
                None,
            )
            kernelSources = detect_sources(
                det_on,
                cfg.selectDetection,
                cfg.selectMeasurement,
                bad_planes,
                guess_half,
                kcfg.detectionConfig,
                saturation,
            )
            meta["detected_sources"] = len(kernelSources)
        elif not isinstance(kernelSources, Table):
            raise InputError(
                f"kernelSources must be an astropy Table, got {type(kernelSources).__name__}"
            )
        if len(kernelSources) == 0:
            raise NoCandidatesError("kernelSources is empty: no stars to fit a kernel on")
        x, y = source_positions(kernelSources, sci)
        ids = (
            np.asarray(kernelSources["id"])
            if "id" in kernelSources.colnames
            else np.arange(len(kernelSources))
        )

        # Stars are measured in id order, so the FWHM does not depend on the list order.
        by_id = np.argsort(ids, kind="stable")
        fwhm_t, fwhm_s = self._fwhms(tmpl, sci, t_mi, s_mi, x[by_id], y[by_id], bad_planes, kcfg)
        if preconvolved and fwhm_s is not None:
            fwhm_s *= np.sqrt(2.0)
        meta["template_fwhm"], meta["science_fwhm"] = fwhm_t, fwhm_s
        require_fwhms(kcfg, fwhm_t, fwhm_s)
        mode = choose_mode(mode, fwhm_t, fwhm_s)
        meta["mode"] = mode
        if mode == "convolveScience":
            # The kernel now matches the science image to the template.
            t_mi, s_mi = s_mi, t_mi
            fwhm_t, fwhm_s = fwhm_s, fwhm_t
        basis = basis_from_config(kcfg, fwhm_t, fwhm_s)
        meta["basis"] = {
            "kind": basis.kind,
            "size": basis.size,
            "kernel_size": basis.kernel_size,
            **basis.description,
        }

        plan = make_cell_plan(cfg, basis, s_mi.shape)
        placement = SourcePlacement.from_positions(ids, x, y, plan)
        read = InMemoryPair(t_mi, s_mi)
        # Single-threaded BLAS, as in the Dask workers: bit-identical results.
        with threadpool_limits(1, user_api="blas"):
            results = [
                fit_cell(plan, cell, idx, placement.xc[idx], placement.yc[idx], read)
                for cell, idx in placement.cells()
            ]
            outcome, table, solve_meta = reduce_cells(plan, placement, results)
        meta.update(solve_meta)
        quality = assess(table, meta, outcome.solution, kcfg)
        return MakeKernelResult(
            SpatialKernel(outcome.solution),
            BackgroundModel(
                outcome.solution,
                *((bg_s, bg_t) if mode == "convolveTemplate" else (bg_t, bg_s)),
            ),
            table,
            outcome.solution,
            meta,
            aligned,
            bg_s,
            bg_t,
            mode,
            quality,
            cfg.copy(),
        )

    @staticmethod
    def _fwhms(tmpl, sci, t_mi, s_mi, x, y, bad_planes, kcfg) -> tuple[float | None, float | None]:
        """PSF FWHMs: from the exposures' PSF models, else measured on the sources."""
        fwhm_t = exposure_fwhm(tmpl, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
        fwhm_s = exposure_fwhm(sci, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
        if not kcfg.scaleByFwhm or (fwhm_t is not None and fwhm_s is not None):
            return fwhm_t, fwhm_s
        mt, ms = measure_pair_fwhm(
            InMemoryPair(t_mi, s_mi),
            x,
            y,
            s_mi.shape,
            bad_planes,
            (fwhm_t is None, fwhm_s is None),
        )
        return (mt if fwhm_t is None else fwhm_t), (ms if fwhm_s is None else fwhm_s)


def make_cell_plan(cfg: MakeKernelConfig, basis: KernelBasis, shape: tuple[int, int]) -> CellPlan:
    """Run-wide constants of the candidate stage, checked against the basis."""
    kcfg = cfg.kernel.active
    half_s = kcfg.detectionConfig.stamp_half_width(basis.kernel_size)
    if 2 * half_s + 1 < basis.kernel_size:
        raise ConfigError(
            f"stamp of {2 * half_s + 1} px is smaller than the {basis.kernel_size} px kernel; "
            "raise detectionConfig.fpGrowPix/fpGrowMin or lower kernelSize"
        )
    return CellPlan(
        basis,
        kcfg,
        tuple(shape),
        int(half_s),
        basis.kernel_size // 2,
        float(cfg.selectMeasurement.apertureRadius),
        float(cfg.selectMeasurement.minSnr),
        regularization_for(basis, kcfg),
    )


def require_fwhms(kcfg, fwhm_template: float | None, fwhm_science: float | None) -> None:
    """Refuse to size the basis by FWHM (``scaleByFwhm``) without both FWHMs.

    Raises
    ------
    InputError
        Naming the image whose FWHM has no PSF model and could not be measured.
    """
    if not kcfg.scaleByFwhm or (fwhm_template is not None and fwhm_science is not None):
        return
    which = "template" if fwhm_template is None else "science"
    raise InputError(
        f"the {which} PSF FWHM could not be measured (no PSF model, and fewer than 3 "
        "stars gave a width); give the exposure a psf_fwhm, provide kernelSources with "
        "isolated stars, or set scaleByFwhm=False to use the configured basis as is"
    )


def choose_mode(mode: str, fwhm_template: float | None, fwhm_science: float | None) -> str:
    """The direction of the convolution: ``mode`` itself, or for ``"auto"`` by FWHM.

    ``"auto"`` convolves the template unless its PSF is wider than the science
    image's, when matching it would need a deconvolution.

    Raises
    ------
    InputError
        In ``"auto"`` mode when either FWHM is unknown.
    """
    if mode != "auto":
        return mode
    if fwhm_template is None or fwhm_science is None:
        which = "template" if fwhm_template is None else "science"
        raise InputError(
            f"mode='auto' needs both PSF widths, but the {which} FWHM could not be "
            "measured (no PSF model and too few usable stars); give the exposures a "
            "psf_fwhm or choose mode='convolveTemplate' or 'convolveScience'"
        )
    return "convolveScience" if fwhm_template > fwhm_science else "convolveTemplate"
