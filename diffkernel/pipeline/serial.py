"""MakeKernelTask: solve for the PSF-matching kernel and background of two images.

``MakeKernelTask(config).run(template, science, kernelSources=None, preconvolved=False)``
follows ip_diffim's MakeKernelTask: check and (if needed) align the inputs, find
kernel candidates, vet them, fit them, clip them in three stages, and fit the
spatially varying kernel and differential background. The result can then be
passed to :func:`diffkernel.subtract_images`.

The stages before the fit are :func:`diffkernel.pipeline.stages.prepare_fit`, shared
with the Dask executor; :class:`InMemoryWork` does their pixel work on arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from threadpoolctl import threadpool_limits

from ..config import MakeKernelConfig
from ..errors import ConfigError, InputError
from ..image import Exposure, MaskedImage, as_exposure
from ..kernel.spatial import SpatialSolution
from ..prep.psf import measure_pair_fwhm
from ..quality import assess
from .cells import CellPlan, InMemoryPair, SourcePlacement, fit_cell, reduce_cells
from .stages import PixelWork, check_mode, detect_kernel_sources, exempt_planes, prepare_fit

__all__ = [
    "MakeKernelTask",
    "MakeKernelResult",
    "SpatialKernel",
    "BackgroundModel",
    "InMemoryWork",
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


class InMemoryWork(PixelWork):
    """The pixel work of the stages before the fit, on exposures in memory.

    Parameters
    ----------
    template, science : Exposure
        The pair as given.
    config : MakeKernelConfig
        A validated configuration.

    Attributes
    ----------
    reader : InMemoryPair
        The pair as the kernel convolves it (backgrounds removed, roles swapped for
        ``convolveScience``); set by :meth:`check`.
    aligned : MaskedImage or None
        The warped template, when :meth:`align` ran.
    template_background, science_background : numpy.ndarray or None
        The mesh backgrounds removed (``useAfwBackground``).
    """

    def __init__(self, template: Exposure, science: Exposure, config: MakeKernelConfig) -> None:
        self.template = template
        self.science = science
        self.config = config
        self.kcfg = config.kernel.active
        self.reader: InMemoryPair | None = None
        self.aligned: MaskedImage | None = None
        self.template_background: np.ndarray | None = None
        self.science_background: np.ndarray | None = None

    def refuse_grids(self) -> None:
        tmpl, sci = self.template, self.science
        if self.kcfg.warpingConfig.doAlign and (tmpl.wcs is None) != (sci.wcs is None):
            which = "template" if tmpl.wcs is None else "science"
            raise InputError(
                f"template shape {tmpl.shape} differs from science shape {sci.shape} and "
                f"aligning them needs a WCS on both exposures; the {which} has none"
            )
        raise InputError(
            f"template shape {tmpl.shape} differs from science shape {sci.shape}; "
            "warp the template onto the science grid (Exposures with WCS are aligned "
            "automatically when warpingConfig.doAlign is True)"
        )

    def align(self) -> None:
        from ..prep.align import warp_exposure

        self.template = warp_exposure(self.template, self.science, self.kcfg.warpingConfig)
        self.aligned = self.template.masked_image

    def check(self) -> None:
        exempt = exempt_planes(self.kcfg)
        self.template.masked_image.validate("template", exempt)
        self.science.masked_image.validate("science", exempt)
        self.reader = InMemoryPair(self.template.masked_image, self.science.masked_image)

    def remove_backgrounds(self) -> None:
        from ..prep.background import mesh_background

        t_mi, s_mi = self.reader.template, self.reader.science
        bg_t = mesh_background(t_mi, self.kcfg.afwBackgroundConfig)
        bg_s = mesh_background(s_mi, self.kcfg.afwBackgroundConfig)
        self.reader = InMemoryPair(
            MaskedImage(t_mi.image - bg_t, t_mi.variance, t_mi.mask, t_mi.mask_planes),
            MaskedImage(s_mi.image - bg_s, s_mi.variance, s_mi.mask, s_mi.mask_planes),
        )
        self.template_background, self.science_background = bg_t, bg_s

    def detect(self, on_template: bool, saturation: float | None) -> Table:
        image = self.reader.template if on_template else self.reader.science
        return detect_kernel_sources(image, self.config, saturation)

    def measure_fwhms(
        self, x: np.ndarray, y: np.ndarray, which: tuple[bool, bool]
    ) -> tuple[float | None, float | None]:
        return measure_pair_fwhm(
            self.reader,
            x,
            y,
            self.reader.science.shape,
            tuple(self.kcfg.badMaskPlanes),
            which,
        )

    def swap_roles(self) -> None:
        self.reader = InMemoryPair(self.reader.science, self.reader.template)


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
        check_mode(mode)
        cfg = self.config
        cfg.validate()
        work = InMemoryWork(as_exposure(template, "template"), as_exposure(science, "science"), cfg)
        prepared = prepare_fit(work, cfg, kernelSources, preconvolved, mode)
        meta, mode = prepared.metadata, prepared.mode
        outcome, table, solve_meta = _fit_cells(prepared.plan, prepared.placement, work.reader)
        meta.update(solve_meta)
        quality = assess(table, meta, outcome.solution, cfg.kernel.active)
        bg_t, bg_s = work.template_background, work.science_background
        return MakeKernelResult(
            SpatialKernel(outcome.solution),
            BackgroundModel(
                outcome.solution,
                *((bg_s, bg_t) if mode == "convolveTemplate" else (bg_t, bg_s)),
            ),
            table,
            outcome.solution,
            meta,
            work.aligned,
            bg_s,
            bg_t,
            mode,
            quality,
            cfg.copy(),
        )


def _fit_cells(plan: CellPlan, placement: SourcePlacement, read: InMemoryPair):
    """Fit every cell in turn and reduce them: ``(outcome, candidates, metadata)``."""
    # Single-threaded BLAS, as in the Dask workers: bit-identical results.
    with threadpool_limits(1, user_api="blas"):
        results = [
            fit_cell(plan, cell, idx, placement.xc[idx], placement.yc[idx], read)
            for cell, idx in placement.cells()
        ]
        return reduce_cells(plan, placement, results)
