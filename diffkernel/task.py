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

from .basis import KernelBasis, basis_from_config, regularization_for
from .candidate import (
    CandidateStats,
    StampBatch,
    compute_stats,
    convolve_stamps,
    core_selector,
    cut_stamps,
)
from .config import MakeKernelConfig
from .errors import ConfigError, InputError, NoCandidatesError
from .fit import fit_single_kernels
from .fitsio import SATURATION_KEYS
from .image import Exposure, MaskedImage, as_exposure
from .psf import exposure_fwhm, measure_fwhm
from .selection import assign_cells, core_flux_snr, source_positions, vet_positions
from .solve import CandidateSet, SolveOutcome, solve
from .spatial import SpatialSolution

__all__ = ["MakeKernelTask", "MakeKernelResult", "SpatialKernel", "BackgroundModel"]


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
    """

    psfMatchingKernel: SpatialKernel
    backgroundModel: BackgroundModel
    candidates: Table
    spatialSolution: SpatialSolution
    metadata: dict = field(default_factory=dict)
    alignedTemplate: MaskedImage | None = None
    scienceBackground: np.ndarray | None = None
    templateBackground: np.ndarray | None = None


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

        Returns
        -------
        MakeKernelResult
        """
        cfg = self.config
        cfg.validate()
        kcfg = cfg.kernel.active
        tmpl = as_exposure(template, "template")
        sci = as_exposure(science, "science")
        bad_planes = tuple(kcfg.badMaskPlanes)
        aligned = None
        if _needs_alignment(tmpl, sci, kcfg):
            from .align import warp_exposure

            tmpl = warp_exposure(tmpl, sci, kcfg.warpingConfig)
            aligned = tmpl.masked_image
        _check_pair(tmpl, sci, bad_planes)
        t_mi, s_mi = tmpl.masked_image, sci.masked_image
        meta: dict[str, Any] = {"aligned": aligned is not None, "preconvolved": bool(preconvolved)}

        bg_t = bg_s = None
        if kcfg.useAfwBackground:
            from .background import mesh_background

            bg_t = mesh_background(t_mi, kcfg.afwBackgroundConfig)
            bg_s = mesh_background(s_mi, kcfg.afwBackgroundConfig)
            t_mi = MaskedImage(t_mi.image - bg_t, t_mi.variance, t_mi.mask, t_mi.mask_planes)
            s_mi = MaskedImage(s_mi.image - bg_s, s_mi.variance, s_mi.mask, s_mi.mask_planes)

        if kernelSources is None:
            from .sources import detect_sources

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

        fwhm_t, fwhm_s = self._fwhms(tmpl, sci, t_mi, s_mi, x, y, bad_planes, kcfg)
        if preconvolved and fwhm_s is not None:
            fwhm_s *= np.sqrt(2.0)
        meta["template_fwhm"], meta["science_fwhm"] = fwhm_t, fwhm_s
        basis = basis_from_config(kcfg, fwhm_t, fwhm_s)
        meta["basis"] = {
            "kind": basis.kind,
            "size": basis.size,
            "kernel_size": basis.kernel_size,
            **basis.description,
        }

        half_k = basis.kernel_size // 2
        half_s = kcfg.detectionConfig.stamp_half_width(basis.kernel_size)
        if 2 * half_s + 1 < basis.kernel_size:
            raise ConfigError(
                f"stamp of {2 * half_s + 1} px is smaller than the {basis.kernel_size} px kernel; "
                "raise detectionConfig.fpGrowPix/fpGrowMin or lower kernelSize"
            )
        xc, yc, reason = vet_positions(t_mi, s_mi, x, y, half_s, half_k, bad_planes)
        usable = np.flatnonzero(reason == "")
        n_src = len(x)
        snr_t = np.full(n_src, np.nan)
        snr_s = np.full(n_src, np.nan)
        rating = np.full(n_src, np.nan)
        stats_parts: list[CandidateStats] = []
        kept: list[np.ndarray] = []
        batch = 8 if basis.kind == "delta-function" else 64
        # S/N and ranking on small cutouts first: most sources of a deep field are
        # faint, and only the survivors need full stamps.
        radius = cfg.selectMeasurement.apertureRadius
        half_snr = int(min(half_s, max(np.ceil(2.5 * radius), 8)))
        for start in range(0, len(usable), 4096):
            idx = usable[start : start + 4096]
            small = cut_stamps(t_mi, s_mi, xc[idx], yc[idx], half_snr, 0)
            ft, st = core_flux_snr(small.template, small.template_variance, radius)
            fs, ss = core_flux_snr(small.science, small.science_variance, radius)
            snr_t[idx], snr_s[idx], rating[idx] = st, ss, ft + fs
        min_snr = cfg.selectMeasurement.minSnr
        low = (reason == "") & ~((snr_t >= min_snr) & (snr_s >= min_snr))
        reason[low] = "low S/N"
        usable = np.flatnonzero(reason == "")
        for start in range(0, len(usable), batch):
            idx = usable[start : start + batch]
            stamps = cut_stamps(t_mi, s_mi, xc[idx], yc[idx], half_s, half_k)
            stats_parts.append(self._candidate_stats(stamps, basis, kcfg))
            kept.append(idx)
        if not kept:
            counts = {r: int((reason == r).sum()) for r in sorted(set(reason)) if r}
            raise NoCandidatesError(
                f"none of the {n_src} sources is a usable kernel candidate ({counts}); "
                "sources need their whole stamp inside the image, no "
                f"{'/'.join(bad_planes)} pixels and S/N >= {cfg.selectMeasurement.minSnr}"
            )
        cidx = np.concatenate(kept)
        stats = CandidateStats.concatenate(stats_parts)
        cell = assign_cells(xc, yc, s_mi.shape, kcfg.sizeCellX, kcfg.sizeCellY)
        cset = CandidateSet(
            ids[cidx],
            xc[cidx].astype(float),
            yc[cidx].astype(float),
            cell[cidx],
            rating[cidx],
            stats,
        )
        outcome = solve(cset, basis, kcfg, s_mi.shape)
        meta.update(outcome.metadata)
        meta["vetting_rejected"] = {r: int((reason == r).sum()) for r in sorted(set(reason)) if r}
        table = self._candidate_table(
            ids, x, y, xc, yc, cell, reason, snr_t, snr_s, rating, cidx, outcome
        )
        return MakeKernelResult(
            SpatialKernel(outcome.solution),
            BackgroundModel(outcome.solution, bg_s, bg_t),
            table,
            outcome.solution,
            meta,
            aligned,
            bg_s,
            bg_t,
        )

    @staticmethod
    def _fwhms(tmpl, sci, t_mi, s_mi, x, y, bad_planes, kcfg) -> tuple[float | None, float | None]:
        """PSF FWHMs: from the exposures' PSF models, else measured on the sources."""
        fwhm_t = exposure_fwhm(tmpl, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
        fwhm_s = exposure_fwhm(sci, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
        if not kcfg.scaleByFwhm or (fwhm_t is not None and fwhm_s is not None):
            return fwhm_t, fwhm_s
        half = 15
        xc, yc, reason = vet_positions(t_mi, s_mi, x, y, half, 0, bad_planes)
        good = np.flatnonzero(reason == "")[:200]
        if good.size == 0:
            return fwhm_t, fwhm_s
        stamps = cut_stamps(t_mi, s_mi, xc[good], yc[good], half, 0)
        if fwhm_t is None:
            values = measure_fwhm(stamps.template)
            if np.isfinite(values).sum() >= 3:
                fwhm_t = float(np.nanmedian(values))
        if fwhm_s is None:
            values = measure_fwhm(stamps.science)
            if np.isfinite(values).sum() >= 3:
                fwhm_s = float(np.nanmedian(values))
        return fwhm_t, fwhm_s

    @staticmethod
    def _candidate_stats(stamps: StampBatch, basis: KernelBasis, kcfg) -> CandidateStats:
        """Sufficient statistics of a batch, with the optional second variance pass."""
        native = convolve_stamps(basis, stamps.template)
        conv = np.einsum("nrys,rj->njys", native, basis.transform, optimize=True)
        del native
        selector = (
            core_selector(stamps.stamp_size, kcfg.candidateCoreRadius)
            if kcfg.useCoreStats
            else None
        )
        _, tvar_center = stamps.template_center()
        variance = stamps.science_variance + tvar_center
        kwargs = dict(
            background_order=int(kcfg.spatialBgOrder) if kcfg.fitForBackground else None,
            constant_variance_weighting=bool(kcfg.constantVarianceWeighting),
            stats_selector=selector,
            with_uncertainty=bool(kcfg.calculateKernelUncertainty),
        )
        stats = compute_stats(conv, stamps.science, variance, **kwargs)
        if kcfg.iterateSingleKernel:
            reg = regularization_for(basis, kcfg)
            first = fit_single_kernels(stats, kcfg, reg)
            kernels = basis.kernel_image(first.coeffs[:, : basis.size])
            # Better variance: science variance plus the template variance seen
            # through the fitted kernel squared.
            from numpy.lib.stride_tricks import sliding_window_view

            s = stamps.stamp_size
            win = sliding_window_view(stamps.template_variance, (s, s), axis=(1, 2))
            tvar_conv = np.einsum("nji,njixy->nxy", kernels[:, ::-1, ::-1] ** 2, win)
            variance = stamps.science_variance + tvar_conv
            stats = compute_stats(conv, stamps.science, variance, **kwargs)
        return stats

    @staticmethod
    def _candidate_table(
        ids, x, y, xc, yc, cell, reason, snr_t, snr_s, rating, cidx, outcome: SolveOutcome
    ) -> Table:
        n = len(x)
        status = np.full(n, "BAD", dtype=object)
        why = reason.copy()

        def full(values, fill=np.nan):
            out = np.full(n, fill, dtype=np.asarray(values).dtype if fill is None else float)
            out[cidx] = values
            return out

        status[cidx] = outcome.status
        why[cidx] = np.where(outcome.reason == "", why[cidx], outcome.reason)
        rounds = np.full(n, -1)
        rounds[cidx] = outcome.rejected_in_round
        return Table(
            {
                "id": ids,
                "x": x,
                "y": y,
                "x_center": xc,
                "y_center": yc,
                "cell": cell,
                "status": status.astype(str),
                "reason": why.astype(str),
                "rating": rating,
                "snr_template": snr_t,
                "snr_science": snr_s,
                "kernel_sum": full(outcome.kernel_sum),
                "kernel_sum_err": full(outcome.kernel_sum_err),
                "background": full(outcome.background),
                "background_err": full(outcome.background_err),
                "resid_mean": full(outcome.single_mean),
                "resid_std": full(outcome.single_std),
                "spatial_resid_mean": full(outcome.spatial_mean),
                "spatial_resid_std": full(outcome.spatial_std),
                "condition": full(outcome.condition),
                "rejected_round": rounds,
            }
        )
