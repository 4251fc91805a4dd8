"""The stages before the fit, written once for both executors.

Both :class:`diffkernel.MakeKernelTask` (in memory) and
:func:`diffkernel.pipeline.dask.driver.run_pair` (Dask over Zarr) run
:func:`prepare_fit`, which takes a pair from its inputs to the plan of the cells:

1. *alignment*: the template is warped onto the science grid when their WCS differ
   (``warpingConfig.doAlign``); grids that differ otherwise are refused; the pixels
   are validated;
2. *backgrounds* (``useAfwBackground``): mesh backgrounds are removed from both images;
3. *sources*: the given candidates, or a coarse detection on the template or the
   science image (``detectionConfig.detOnTemplate``), with the detected image's
   saturation level from its header keywords;
4. *PSF widths*: each image's PSF model, else measured on the stars (in id order,
   so that the widths do not depend on the list order); a preconvolved science
   image has an effective PSF wider by :math:`\\sqrt{2}`;
5. *direction*: ``convolveTemplate``, ``convolveScience`` or, for ``auto``, the image
   with the narrower PSF is convolved; for ``convolveScience`` the roles swap (the
   kernel then matches the science image to the template);
6. *basis and plan*: the kernel basis sized by the widths, the run-wide constants of
   the cells and every source placed in its cell.

Fields whose rules only the inputs can check are refused on the way, as ``validate()``
refuses the others: mask plane names neither standard nor declared by an input, a
background mesh cell larger than the image, a candidate core larger than the stamp.

What differs between the executors is only how the pixel work is done: on arrays
in this process, or as Dask tasks reading Zarr in the workers. That is a
:class:`PixelWork`, whose methods the stages call in the order above; the order,
the metadata and the errors are therefore the same in both, and so are their
results (tested bit-identical).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.table import Table

from ..config import MakeKernelConfig
from ..errors import ConfigError, InputError, NoCandidatesError
from ..image import DEFAULT_MASK_PLANES, MaskedImage
from ..io.fits import SATURATION_KEYS
from ..kernel.basis import KernelBasis, basis_from_config, regularization_for
from ..prep.psf import exposure_fwhm
from ..prep.selection import source_positions
from .cells import CellPlan, SourcePlacement

log = logging.getLogger("diffkernel")

#: Directions of the convolution.
MODES = ("convolveTemplate", "convolveScience", "auto")

__all__ = [
    "MODES",
    "PixelWork",
    "PreparedFit",
    "prepare_fit",
    "check_mode",
    "check_image_size",
    "check_plane_names",
    "check_bin_size",
    "refuse_field",
    "PLANE_FIELDS",
    "needs_alignment",
    "exempt_planes",
    "detect_kernel_sources",
    "saturation_level",
    "require_fwhms",
    "choose_mode",
    "basis_metadata",
    "make_cell_plan",
]


class PixelWork(ABC):
    """How an executor does the pixel work of the stages before the fit.

    :func:`prepare_fit` decides what is done and in which order; an implementation
    says how: :class:`diffkernel.pipeline.serial.InMemoryWork` on arrays,
    :class:`diffkernel.pipeline.dask.prefit.ClusterWork` as Dask tasks.

    Attributes
    ----------
    template, science : Exposure or ZarrImage
        The pair as the stages see it (``shape``, ``wcs``, ``meta``, ``mask_planes``);
        ``template`` is the warped one once :meth:`align` ran.
    """

    template: Any
    science: Any

    @abstractmethod
    def refuse_grids(self) -> None:
        """Raise :class:`InputError`: the grids differ and cannot be aligned."""

    @abstractmethod
    def align(self) -> None:
        """Warp the template onto the science grid (``template`` becomes the warped one)."""

    @abstractmethod
    def check(self) -> None:
        """Validate the pixels of both images, or start to.

        An executor that validates alongside the stages makes each later step that
        reads pixels wait for the outcome first.
        """

    @abstractmethod
    def remove_backgrounds(self) -> None:
        """Subtract each image's mesh background (``afwBackgroundConfig``) from now on."""

    @abstractmethod
    def detect(self, on_template: bool, saturation: float | None) -> Table:
        """Candidate stars found by :func:`detect_kernel_sources` on one of the images."""

    @abstractmethod
    def measure_fwhms(
        self, x: np.ndarray, y: np.ndarray, which: tuple[bool, bool]
    ) -> tuple[float | None, float | None]:
        """PSF FWHMs measured on the stars at ``(x, y)`` for the images ``which`` asks.

        The template's and the science image's, each None when not asked for or too
        few stars gave a width (:func:`diffkernel.prep.psf.measure_pair_fwhm`).
        """

    @abstractmethod
    def swap_roles(self) -> None:
        """Read the science image as the one convolved and the template as the reference."""

    def psf_images(self) -> tuple[Any, Any]:
        """The template and science images whose ``psf_fwhm`` is their PSF model."""
        return self.template, self.science


@dataclass
class PreparedFit:
    """What :func:`prepare_fit` hands to the fit.

    Attributes
    ----------
    metadata : dict
        ``aligned``, ``preconvolved``, ``detected_sources`` (when detected),
        ``template_fwhm``, ``science_fwhm``, ``mode`` and ``basis``, in that order.
    mode : str
        ``"convolveTemplate"`` or ``"convolveScience"``.
    basis : KernelBasis
        The kernel basis.
    plan : CellPlan
        The run-wide constants of the cells.
    placement : SourcePlacement
        Every source placed on the grid and in its cell.
    """

    metadata: dict[str, Any]
    mode: str
    basis: KernelBasis
    plan: CellPlan
    placement: SourcePlacement


def prepare_fit(
    work: PixelWork,
    cfg: MakeKernelConfig,
    sources: Table | None,
    preconvolved: bool,
    mode: str,
) -> PreparedFit:
    """Run the stages before the fit (see the module docstring), in their order.

    Parameters
    ----------
    work : PixelWork
        The executor's pixel work; its reader gives the pair as the kernel convolves
        it afterwards.
    cfg : MakeKernelConfig
        A validated configuration.
    sources : astropy.table.Table or None
        Kernel candidates; detected when None.
    preconvolved : bool
        The science image was already convolved with its PSF.
    mode : {"convolveTemplate", "convolveScience", "auto"}
        The direction of the convolution asked for.

    Returns
    -------
    PreparedFit
    """
    kcfg = cfg.kernel.active
    check_plane_names(cfg, work.template.mask_planes, work.science.mask_planes)
    check_image_size(work.science.shape, kcfg)
    meta: dict[str, Any] = {"aligned": align_pair(work, kcfg)}
    meta["preconvolved"] = bool(preconvolved)
    if kcfg.useAfwBackground:
        check_bin_size(cfg, work.science.shape)
        work.remove_backgrounds()
    sources = kernel_sources(work, cfg, sources, meta)
    x, y = source_positions(sources, work.science)
    ids = source_ids(sources)
    fwhm_t, fwhm_s = psf_fwhms(work, kcfg, x, y, ids, preconvolved)
    meta["template_fwhm"], meta["science_fwhm"] = fwhm_t, fwhm_s
    require_fwhms(kcfg, fwhm_t, fwhm_s)
    mode = choose_mode(mode, fwhm_t, fwhm_s)
    meta["mode"] = mode
    if mode == "convolveScience":
        # The kernel now matches the science image to the template.
        work.swap_roles()
        fwhm_t, fwhm_s = fwhm_s, fwhm_t
    basis = basis_from_config(kcfg, fwhm_t, fwhm_s)
    meta["basis"] = basis_metadata(basis)
    plan = make_cell_plan(cfg, basis, work.science.shape)
    placement = SourcePlacement.from_positions(ids, x, y, plan)
    return PreparedFit(meta, mode, basis, plan, placement)


def refuse_field(cfg: MakeKernelConfig, field: str, rule: str) -> ConfigError:
    """The one-line error ``validate()`` gives, for a rule on a field of the active kernel
    config (``field`` dotted below it) that only the inputs can check."""
    value = cfg.kernel.active.get(field)
    return ConfigError(f"invalid config kernel.{cfg.kernel.name}.{field} = {value!r}: {rule}")


#: The fields of the active kernel config that name mask planes.
PLANE_FIELDS = (
    "badMaskPlanes",
    "detectionConfig.badMaskPlanes",
    "warpingConfig.growFullMask",
    "afwBackgroundConfig.ignoredPixelMask",
)


def check_plane_names(cfg: MakeKernelConfig, *declared: Mapping[str, int]) -> None:
    """Refuse a mask plane name that is neither a standard plane nor declared by an input.

    A plane that no image has can never be set, so a misspelt name (``SATT``) would
    silently let every pixel it was meant to exclude through. Only here are the inputs'
    own planes (``MP_*`` cards, Zarr attributes) known.

    Parameters
    ----------
    cfg : MakeKernelConfig
        The configuration.
    *declared : mapping of str to int
        The mask planes of each input.

    Raises
    ------
    ConfigError
        Naming the field, the unknown plane and the planes that are known.
    """
    known = set(DEFAULT_MASK_PLANES).union(*declared)
    for field in PLANE_FIELDS:
        unknown = [name for name in cfg.kernel.active.get(field) if name not in known]
        if unknown:
            extra = sorted(known - set(DEFAULT_MASK_PLANES))
            inputs = f"; the inputs also declare {', '.join(extra)}" if extra else ""
            raise refuse_field(
                cfg,
                field,
                f"no mask plane {unknown[0]!r} (standard planes: "
                f"{', '.join(DEFAULT_MASK_PLANES)}{inputs}); correct the name or remove it",
            )


def check_bin_size(cfg: MakeKernelConfig, shape: tuple[int, int]) -> None:
    """Refuse a background mesh cell larger than the image (``afwBackgroundConfig.binSize``).

    The mesh would be one cell clipped to the image along that axis: not the mesh asked
    for, and a background flat along it.
    """
    bin_size = cfg.kernel.active.afwBackgroundConfig.binSize
    if bin_size > min(shape):
        raise refuse_field(
            cfg,
            "afwBackgroundConfig.binSize",
            f"larger than the {shape[0]} x {shape[1]} image (a mesh cell must fit in it); "
            f"use at most {min(shape)}",
        )


def check_image_size(shape: tuple[int, int], kcfg) -> None:
    """Refuse an image no larger than the smallest kernel it could get: no stamp fits.

    Without it such an image ended in "no sources found" or "no usable candidates",
    which names the wrong cause.
    """
    size = kcfg.kernelSizeMin if kcfg.scaleByFwhm else kcfg.kernelSize
    if min(shape) <= size:
        which = "kernelSizeMin" if kcfg.scaleByFwhm else "kernelSize"
        raise InputError(
            f"the science image is {shape[1]}x{shape[0]} pixels, no larger than the kernel "
            f"({size} px, {which}): no star's stamp fits in it; use a larger image or a "
            "smaller kernel"
        )


def check_mode(mode: str) -> None:
    """Refuse a direction of the convolution that is not one of :data:`MODES`."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")


def align_pair(work: PixelWork, kcfg) -> bool:
    """Put the template on the science grid and validate the pair; whether it was warped."""
    aligned = needs_alignment(work.template, work.science, kcfg)
    if aligned:
        work.align()
    elif work.template.shape != work.science.shape:
        work.refuse_grids()
    elif not kcfg.warpingConfig.doAlign:
        offset = grid_offset(work.template, work.science)
        if offset is not None and offset > MISALIGNED_PX:
            # Taken as aligned, as documented; but a result from misaligned grids (another
            # pixel scale, a shift) is wrong, so say what the WCSs show.
            log.warning(
                "warpingConfig.doAlign is false, but the WCSs put the template's grid up to "
                "%.3g px from the science's (another pixel scale, rotation or shift?); the "
                "pair is taken as aligned: set doAlign = true to warp the template",
                offset,
            )
    work.check()
    return aligned


def needs_alignment(template, science, kcfg) -> bool:
    """Whether the template must be warped onto the science grid.

    Only with ``warpingConfig.doAlign`` and a WCS on both: when the shapes differ,
    or when a corner or the centre of the science grid lands more than 1e-3 px
    away from the same pixel of the template.
    """
    if not kcfg.warpingConfig.doAlign or template.wcs is None or science.wcs is None:
        return False
    if template.shape != science.shape:
        return True
    return bool(grid_offset(template, science) > 1e-3)


#: Offset in pixels between the grids, by their WCSs, past which a pair that
#: ``doAlign = false`` takes as aligned gets a warning.
MISALIGNED_PX = 0.5


def grid_offset(template, science) -> float | None:
    """How far, in pixels, the template's WCS puts the science grid's corners and centre
    from the same pixels of its own grid; None without a WCS on both."""
    if template.wcs is None or science.wcs is None:
        return None
    ny, nx = science.shape
    xs = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2])
    ys = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
    world = science.wcs.pixel_to_world_values(xs, ys)
    xt, yt = template.wcs.world_to_pixel_values(*world)
    return float(np.max(np.hypot(np.asarray(xt) - xs, np.asarray(yt) - ys)))


def exempt_planes(kcfg) -> tuple[str, ...]:
    """Mask planes whose pixels the validation does not count as usable data."""
    return tuple(dict.fromkeys(("NO_DATA",) + tuple(kcfg.badMaskPlanes)))


def kernel_sources(
    work: PixelWork, cfg: MakeKernelConfig, sources: Table | None, meta: dict[str, Any]
) -> Table:
    """The candidates given, or those detected (counted in ``meta``); never empty."""
    kcfg = cfg.kernel.active
    if sources is None:
        on_template = bool(kcfg.detectionConfig.detOnTemplate)
        detected_on = work.template if on_template else work.science
        sources = work.detect(on_template, saturation_level(detected_on.meta))
        meta["detected_sources"] = len(sources)
    elif not isinstance(sources, Table):
        raise InputError(f"kernelSources must be an astropy Table, got {type(sources).__name__}")
    if len(sources) == 0:
        raise NoCandidatesError("kernelSources is empty: no stars to fit a kernel on")
    return sources


def saturation_level(meta: dict[str, Any]) -> float | None:
    """The saturation level from an image's header keywords (``SATURATION_KEYS``), or None."""
    return next((float(meta[k]) for k in SATURATION_KEYS if k in meta), None)


def detect_kernel_sources(
    image: MaskedImage, cfg: MakeKernelConfig, saturation: float | None
) -> Table:
    """Coarse detection of isolated stars for the kernel, as the configuration asks.

    The pixel function behind :meth:`PixelWork.detect` of every executor.
    """
    from ..prep.sources import detect_sources

    kcfg = cfg.kernel.active
    return detect_sources(
        image,
        cfg.selectDetection,
        cfg.selectMeasurement,
        tuple(kcfg.badMaskPlanes),
        kcfg.detectionConfig.stamp_half_width(kcfg.kernelSize),
        kcfg.detectionConfig,
        saturation,
    )


def source_ids(sources: Table) -> np.ndarray:
    """The ``id`` column, or the row numbers."""
    return np.asarray(sources["id"]) if "id" in sources.colnames else np.arange(len(sources))


def psf_fwhms(
    work: PixelWork, kcfg, x: np.ndarray, y: np.ndarray, ids: np.ndarray, preconvolved: bool
) -> tuple[float | None, float | None]:
    """PSF FWHMs: from the images' PSF models, else measured on the sources."""
    psf_t, psf_s = work.psf_images()
    fwhm_t = exposure_fwhm(psf_t, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
    fwhm_s = exposure_fwhm(psf_s, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
    if kcfg.scaleByFwhm and (fwhm_t is None or fwhm_s is None):
        # Stars are measured in id order, so the FWHM does not depend on the list order.
        by_id = np.argsort(ids, kind="stable")
        mt, ms = work.measure_fwhms(x[by_id], y[by_id], (fwhm_t is None, fwhm_s is None))
        fwhm_t, fwhm_s = (mt if fwhm_t is None else fwhm_t), (ms if fwhm_s is None else fwhm_s)
    if preconvolved and fwhm_s is not None:
        fwhm_s *= np.sqrt(2.0)
    return fwhm_t, fwhm_s


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


def basis_metadata(basis: KernelBasis) -> dict[str, Any]:
    """The basis as the result's metadata records it."""
    return {
        "kind": basis.kind,
        "size": basis.size,
        "kernel_size": basis.kernel_size,
        **basis.description,
    }


def make_cell_plan(cfg: MakeKernelConfig, basis: KernelBasis, shape: tuple[int, int]) -> CellPlan:
    """Run-wide constants of the candidate stage, checked against the basis."""
    kcfg = cfg.kernel.active
    half_s = kcfg.detectionConfig.stamp_half_width(basis.kernel_size)
    if 2 * half_s + 1 < basis.kernel_size:
        raise ConfigError(
            f"stamp of {2 * half_s + 1} px is smaller than the {basis.kernel_size} px kernel; "
            "raise detectionConfig.fpGrowPix/fpGrowMin or lower kernelSize"
        )
    if kcfg.candidateCoreRadius > half_s:
        # The core would be cut at the stamp's edge: neither the core statistics nor the
        # ratings would be over the core asked for.
        raise refuse_field(
            cfg,
            "candidateCoreRadius",
            f"its {2 * kcfg.candidateCoreRadius} px core does not fit in the "
            f"{2 * half_s + 1} px candidate stamp; use at most {half_s}, or enlarge the "
            "stamp (detectionConfig.fpGrowKernelScaling, fpGrowMin, fpGrowPix)",
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
