"""MakeKernelTask: solve for the PSF-matching kernel and background of two images.

``MakeKernelTask(config).run(template, science, kernelSources=None, preconvolved=False)``
(positional order as ip_diffim's; ``run(science=..., template=...)`` reads the same)
follows ip_diffim's MakeKernelTask: check and (if needed) align the inputs, find
kernel candidates, vet them, fit them, clip them in three stages, and fit the
spatially varying kernel and differential background. The result can then be
passed to :func:`subtract_images`, which returns a :class:`DifferenceImage` (a
MaskedImage with the science image's WCS). Both take the images in any form the
command line takes them (:func:`diffkernel.io.inputs.read_input`: FITS paths, Zarr
stores, NDData/CCDData, HDUs, arrays, ``(array, WCS)``).

The stages before the fit are :func:`diffkernel.pipeline.stages.prepare_fit`, shared
with the Dask executor; :class:`InMemoryWork` does their pixel work on arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.table import Table
from threadpoolctl import threadpool_limits

from ..config import MakeKernelConfig
from ..errors import ConfigError, InputError
from ..image import Exposure, MaskedImage, as_exposure
from ..kernel.spatial import SpatialSolution
from ..kernel.subtract import subtract_images as subtract_arrays
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
    "DifferenceImage",
    "subtract_images",
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

    def check_inside(self, x, y) -> None:
        """Refuse positions off the image the kernel was fitted on.

        The spatial model is a polynomial: beyond the image it extrapolates without
        bound, so a position there (a typo, or x and y swapped) is an error, not a value.
        Half a pixel beyond the outer pixel centres is still inside.

        Raises
        ------
        InputError
            Naming the position and the image's pixel range.
        """
        x0, y0, x1, y1 = self.solution.kernel_functions.bbox
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            inside = (xa >= x0 - 0.5) & (xa <= x1 + 0.5) & (ya >= y0 - 0.5) & (ya <= y1 + 0.5)
        if not np.all(inside):
            bad = np.broadcast_arrays(xa, ya)
            i = np.flatnonzero(~np.broadcast_to(inside, bad[0].shape))[0]
            px, py = bad[0].ravel()[i], bad[1].ravel()[i]
            raise InputError(
                f"(x, y) = ({px:g}, {py:g}) is outside the image the kernel was fitted on "
                f"(x in {x0:g}..{x1:g}, y in {y0:g}..{y1:g}, 0-based pixels)"
            )

    def coefficients_at(self, x: float, y: float) -> np.ndarray:
        """Basis coefficients at pixel ``(x, y)``; an error off the image."""
        self.check_inside(x, y)
        return self.solution.coefficients_at(x, y)

    def image_at(self, x: float, y: float) -> np.ndarray:
        """Kernel image ``(K, K)`` at pixel ``(x, y)`` (0-based), centred at ``[K//2, K//2]``.

        Raises
        ------
        InputError
            If ``(x, y)`` is off the image (:meth:`check_inside`).
        """
        return self.solution.basis.kernel_image(self.coefficients_at(x, y))

    def sum_at(self, x: float, y: float) -> float:
        """Kernel sum (photometric scale from template to science) at ``(x, y)``.

        Raises
        ------
        InputError
            If ``(x, y)`` is off the image (:meth:`check_inside`).
        """
        return float(self.coefficients_at(x, y) @ self.solution.basis.sums)

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
    >>> diff = subtract_images(science=pair.science, template=pair.template, result=result)
    """

    def __init__(self, config: MakeKernelConfig | None = None) -> None:
        self.config = MakeKernelConfig() if config is None else config
        if not isinstance(self.config, MakeKernelConfig):
            raise ConfigError(
                f"config must be a MakeKernelConfig, got {type(self.config).__name__}"
            )

    def run(
        self,
        template: Any,
        science: Any,
        kernelSources: Table | None = None,
        *,
        preconvolved: bool = False,
        mode: str = "convolveTemplate",
    ) -> MakeKernelResult:
        """Solve for the kernel and background that match ``template`` to ``science``.

        The positional order is ip_diffim's (template, science); the command line and
        :func:`~diffkernel.run_pair` take the science first. Name them to be explicit:
        ``run(science=sci, template=tmpl)``.

        Parameters
        ----------
        template, science : MaskedImage, Exposure, or any input of :func:`read_input`
            MaskedImages must be aligned; Exposures with WCS are warped onto the
            science grid unless ``warpingConfig.doAlign`` is False. A FITS path, a Zarr
            store, an NDData/CCDData, HDUs, an array or ``(array, WCS)`` is read first
            (:func:`diffkernel.io.inputs.read_input`).
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
        work = InMemoryWork(read_image(template, "template"), read_image(science, "science"), cfg)
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


def read_image(image: Any, name: str) -> Exposure:
    """An Exposure from any input :func:`diffkernel.io.inputs.read_input` takes."""
    if isinstance(image, Exposure | MaskedImage):
        return as_exposure(image, name)
    from ..io.inputs import read_input  # Zarr loads on first use, not on import

    return as_exposure(read_input(image, name=name), name)


@dataclass(eq=False)
class DifferenceImage(MaskedImage):
    """A difference image: a :class:`MaskedImage` that knows its grid's WCS.

    Attributes
    ----------
    wcs : astropy.wcs.WCS or None
        The science image's WCS (the difference is on the science grid).
    meta : dict
        The science image's metadata (header cards).
    """

    wcs: Any = None
    meta: dict = field(default_factory=dict)

    def to_exposure(self) -> Exposure:
        """An :class:`Exposure` of the difference, with its WCS and metadata."""
        mi = MaskedImage(self.image, self.variance, self.mask, dict(self.mask_planes))
        return Exposure(mi, wcs=self.wcs, meta=dict(self.meta))


def subtract_images(
    template: Any = None, science: Any = None, result: Any = None, **options: Any
) -> DifferenceImage:
    """Difference image of ``science`` minus the PSF-matched ``template``, with the WCS.

    The positional order follows :meth:`MakeKernelTask.run` (template, science, result);
    ``subtract_images(science=sci, template=tmpl, result=result)`` reads the same.

    Parameters
    ----------
    template, science : MaskedImage, Exposure, or any input of :func:`read_input`
        The images ``result`` was fitted on.
    result : MakeKernelResult
        Output of :meth:`MakeKernelTask.run`.
    **options
        ``tile_size``, ``precision``, ``device``, ... of
        :func:`diffkernel.kernel.subtract.subtract_images`.

    Returns
    -------
    DifferenceImage
        Image, propagated variance and mask, with the science image's WCS and metadata.
        ``result.quality`` then judges the difference too.

    Raises
    ------
    InputError
        If an image or the result is missing or unreadable.
    """
    for name, value in (("template", template), ("science", science)):
        if value is None:
            raise InputError(f"subtract_images needs {name}=")
    sci = read_image(science, "science")
    diff = subtract_arrays(read_image(template, "template"), sci, result, **options)
    return DifferenceImage(
        diff.image, diff.variance, diff.mask, dict(diff.mask_planes), sci.wcs, dict(sci.meta)
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
