"""Difference images: convolve the template with the fitted kernel and subtract.

``D = S - K(x, y) ⊛ T - b(x, y)``, computed tile by tile with a kernel-sized halo so
memory stays bounded; the variance is ``V_S + K² ⊛ V_T`` and the mask the science
mask OR the template mask spread over the kernel footprint. Pixels within half a
kernel of the image border, where the convolution saw no data, are set to NaN and
flagged ``NO_DATA`` and ``EDGE``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, InputError
from ..image import Exposure, MaskedImage, as_exposure, with_mask_planes
from ..quality import Z_NBINS, assess, difference_histograms, footprint_centres, footprint_radius
from .convolve import (
    PRECISIONS,
    KernelSpectra,
    convolve_region,
    spatial_term_kernels,
    variance_model,
    window,
)
from .decorrelate import DifferenceFilters, block_boxes, block_noise, filter_region, make_filters
from .device import array_backend, check_device

__all__ = [
    "subtract_images",
    "difference_tile",
    "difference_box",
    "subtraction_filters",
    "prepare_inputs",
    "merged_mask_planes",
    "prepare_template",
    "prepare_science",
    "padded_template",
    "SubtractionKernels",
    "check_fft_options",
]


def check_fft_options(precision: str, device: str) -> None:
    """Refuse an unknown FFT ``precision`` or ``device``, naming the choices.

    Raises
    ------
    ConfigError
        If either is not one of :data:`~diffkernel.kernel.convolve.PRECISIONS` or
        :data:`~diffkernel.kernel.device.DEVICES`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    check_device(device)


class SubtractionKernels:
    """The solution with the kernel images every tile convolves with, computed once.

    Parameters
    ----------
    solution : SpatialSolution
        The kernel and background model.
    precision : {"single", "double"}
        Precision of the tiles' FFTs (see :func:`diffkernel.kernel.convolve.convolve_region`).
    device : {"cpu", "gpu"}
        Where the tiles' FFTs run (see :mod:`diffkernel.kernel.device`). Only the name is
        kept (and pickled): the GPU is looked for where the tiles are convolved.
    """

    def __init__(self, solution, precision: str = "single", device: str = "cpu") -> None:
        check_fft_options(precision, device)
        self.solution = solution
        self.precision = precision
        self.device = device
        self.terms = KernelSpectra(spatial_term_kernels(solution))
        model = variance_model(solution)
        model.shapes = KernelSpectra(model.shapes)
        self.variance = model

    @property
    def half(self) -> int:
        """Half-width of the kernel."""
        return self.solution.basis.kernel_size // 2


def merged_mask_planes(science_planes: dict, template_planes: dict) -> dict[str, int]:
    """The science's mask planes plus any template plane it lacks, and NO_DATA and EDGE."""
    return with_mask_planes(science_planes, [*template_planes, "NO_DATA", "EDGE"])


def prepare_template(
    template: MaskedImage, planes: dict[str, int], background: np.ndarray | None = None
) -> MaskedImage:
    """Template pixels as the convolution needs them (pixel by pixel, so per region).

    Mask bits are renamed onto ``planes``; a mesh ``background`` is removed; pixels
    that are not finite (masked NO_DATA) become zero with zero variance so they
    cannot spread NaN (their mask bits still spread).
    """
    if all(planes[name] == bit for name, bit in template.mask_planes.items()):
        t_mask = template.mask.astype(np.int32, copy=False)  # the bits keep their places
    else:
        t_mask = np.zeros(template.mask.shape, dtype=np.int32)
        for name, bit in template.mask_planes.items():
            t_mask |= ((template.mask >> bit) & 1).astype(np.int32) << planes[name]
    t_img = template.image
    if background is not None:
        t_img = t_img - background
    t_var = template.variance
    bad = ~np.isfinite(t_img) | ~np.isfinite(t_var)
    if bad.any():
        t_img = np.where(bad, 0.0, t_img)
        t_var = np.where(bad, 0.0, t_var)
    # The input was validated; zero-filled pixels are masked. Keep its precision.
    return MaskedImage.from_validated(t_img, t_var, t_mask, planes)


def prepare_science(
    science: MaskedImage, planes: dict[str, int], background: np.ndarray | None = None
) -> MaskedImage:
    """Science pixels with a mesh ``background`` removed, on ``planes``."""
    s_img = science.image if background is None else science.image - background
    return MaskedImage.from_validated(s_img, science.variance, science.mask, planes)


def padded_template(
    template: MaskedImage,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    half: int,
    origin: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prepared template over ``[y0:y1, x0:x1]`` grown by ``half``, zero outside the image.

    ``template`` holds the full image's pixels from ``origin`` on.
    """
    args = (y0 - half, y1 + half, x0 - half, x1 + half)
    return (
        window(template.image, *args, 0.0, origin),
        window(template.variance, *args, 0.0, origin),
        window(template.mask, *args, 0, origin),
    )


def difference_tile(
    padded: tuple[np.ndarray, np.ndarray, np.ndarray],
    science: MaskedImage,
    kernels: SubtractionKernels,
    y0: int,
    x0: int,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Difference image, variance and mask of one tile.

    Parameters
    ----------
    padded : tuple of numpy.ndarray
        :func:`padded_template` of the tile.
    science : MaskedImage
        Prepared science pixels of the tile (see :func:`prepare_science`).
    kernels : SubtractionKernels
        The solution and its convolution kernels.
    y0, x0 : int
        Full-image coordinates of the tile's first pixel.
    shape : tuple of int
        ``(ny, nx)`` of the full image, to flag its border.
    """
    solution = kernels.solution
    conv, conv_var, conv_mask = convolve_region(
        *padded,
        solution,
        y0,
        x0,
        kernels.terms,
        kernel_squared=kernels.variance,
        precision=kernels.precision,
        device=kernels.device,
    )
    height, width = science.shape
    xs = np.arange(x0, x0 + width)
    ys = np.arange(y0, y0 + height)
    diff = science.image - conv
    if solution.background_functions is not None:
        diff -= solution.background_functions.grid_sum(solution.background_coeffs, xs, ys)
    var = science.variance + conv_var
    mask = science.mask | conv_mask
    h = kernels.half
    ny, nx = shape
    border = ((ys < h) | (ys >= ny - h))[:, None] | ((xs < h) | (xs >= nx - h))[None, :]
    if border.any():
        edge_bits = (1 << science.mask_planes["NO_DATA"]) | (1 << science.mask_planes["EDGE"])
        mask = np.where(border, mask | edge_bits, mask)
        diff = np.where(border, np.nan, diff)
        var = np.where(border, np.nan, var)
    return diff, var, mask


def difference_box(
    convolved: MaskedImage,
    convolved_origin: tuple[int, int],
    reference: MaskedImage,
    reference_origin: tuple[int, int],
    kernels: SubtractionKernels,
    box: tuple[int, int, int, int],
    shape: tuple[int, int],
    sign: float = 1.0,
    filters: DifferenceFilters | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Difference, variance, mask and score image of one box, filtered when asked.

    What the serial path and the Dask tile tasks both call.

    Parameters
    ----------
    convolved, reference : MaskedImage
        Prepared pixels (:func:`prepare_template`, :func:`prepare_science`) from their
        origins on: the convolved image over ``box`` grown by the filters' margin plus
        the kernel's half-width, the reference over ``box`` grown by the margin (each
        clipped to the image).
    convolved_origin, reference_origin : tuple of int
        Full-image ``(y, x)`` of their first pixels.
    kernels : SubtractionKernels
        The solution and its convolution kernels.
    box : tuple of int
        ``(y0, y1, x0, x1)`` to compute.
    shape : tuple of int
        ``(ny, nx)`` of the full image.
    sign : float
        -1 for ``convolveScience`` (``K ⊛ S + b - T``: science minus template).
    filters : DifferenceFilters, optional
        Decorrelation and score (:mod:`diffkernel.kernel.decorrelate`); none by default.

    Returns
    -------
    tuple
        Difference, variance, mask and the score image (None without one).
    """
    y0, y1, x0, x1 = box
    g = filters.margin if filters is not None else 0
    ext = (y0 - g, y1 + g, x0 - g, x1 + g)
    padded = padded_template(convolved, *ext, kernels.half, origin=convolved_origin)
    if reference.shape != (ext[1] - ext[0], ext[3] - ext[2]) or reference_origin != ext[::2]:
        planes = [
            window(a, *ext, fill, reference_origin)
            for a, fill in ((reference.image, 0.0), (reference.variance, 0.0), (reference.mask, 0))
        ]
        reference = MaskedImage.from_validated(*planes, reference.mask_planes)
    d, v, m = difference_tile(padded, reference, kernels, ext[0], ext[2], shape)
    if sign < 0:
        d = -d
    if filters is None:
        return d, v, m, None
    planes = reference.mask_planes
    edge_bits = (1 << planes["NO_DATA"]) | (1 << planes["EDGE"])
    return filter_region(d, v, m, (ext[0], ext[2]), box, filters, kernels.half, edge_bits)


def subtraction_filters(
    convolved: MaskedImage,
    reference: MaskedImage,
    solution,
    mode: str,
    decorrelate: bool,
    score: bool,
    science_fwhm: float | None,
) -> DifferenceFilters | None:
    """The decorrelation and score filters of whole prepared images; None for neither."""
    if not (decorrelate or score):
        return None
    shape = reference.shape
    boxes = block_boxes(shape)
    noise = np.array(
        [
            block_noise(_cut(convolved, box), _cut(reference, box))
            for box in boxes
        ]
    )
    return filters_from_noise(solution, shape, noise, mode, decorrelate, score, science_fwhm)


def filters_from_noise(solution, shape, noise, mode, decorrelate, score, science_fwhm):
    """:func:`~diffkernel.kernel.decorrelate.make_filters` from the blocks' noise, in order."""
    from .decorrelate import DECORRELATION_BLOCK

    b = DECORRELATION_BLOCK
    grid = np.asarray(noise, dtype=np.float64).reshape(-(-shape[0] // b), -(-shape[1] // b), 2)
    return make_filters(
        solution,
        shape,
        grid,
        decorrelate=decorrelate,
        score=score,
        mode=mode,
        science_fwhm=science_fwhm,
    )


def _cut(image: MaskedImage, box) -> MaskedImage:
    y0, y1, x0, x1 = box
    return MaskedImage.from_validated(
        image.image[y0:y1, x0:x1],
        image.variance[y0:y1, x0:x1],
        image.mask[y0:y1, x0:x1],
        image.mask_planes,
    )


def prepare_inputs(template, science, result) -> tuple[MaskedImage, MaskedImage]:
    """Whole template and science as the subtraction needs them.

    The template is the aligned one the kernel was fitted on; see
    :func:`prepare_template` and :func:`prepare_science`.
    """
    t = result.alignedTemplate
    if t is None:
        t = as_exposure(template, "template").masked_image
    s = as_exposure(science, "science").masked_image
    if t.shape != s.shape:
        raise InputError(f"template shape {t.shape} differs from science shape {s.shape}")
    if getattr(result, "mode", "convolveTemplate") == "convolveScience":
        # The kernel matches the science image to the template: the science image is
        # convolved and the template is the reference.
        planes = merged_mask_planes(t.mask_planes, s.mask_planes)
        return (
            prepare_template(s, planes, result.scienceBackground),
            prepare_science(t, planes, result.templateBackground),
        )
    planes = merged_mask_planes(s.mask_planes, t.mask_planes)
    return (
        prepare_template(t, planes, result.templateBackground),
        prepare_science(s, planes, result.scienceBackground),
    )


def subtract_images(
    template: MaskedImage | Exposure,
    science: MaskedImage | Exposure,
    result,
    tile_size: int = 1024,
    precision: str = "single",
    device: str = "cpu",
    *,
    decorrelate: bool = False,
    score: bool = False,
) -> MaskedImage:
    """Difference image of ``science`` minus the PSF-matched ``template``.

    When ``result.mode`` is ``"convolveScience"`` the science image is the one
    convolved: the difference is ``K ⊛ S + b - T``, still science minus template
    (a new source is positive) but in the template's photometric scale.

    Parameters
    ----------
    template, science : MaskedImage or Exposure
        The images ``result`` was fitted on (aligned; same shape).
    result : MakeKernelResult
        Output of :meth:`MakeKernelTask.run`.
    tile_size : int
        Side of the tiles processed at a time (memory bound).
    precision : {"single", "double"}
        Precision of the convolution's FFTs. Single (the default) is about three
        times faster and off by at most ~3e-5 of a pixel's noise sigma; the kernel
        fit itself is always double precision.
    device : {"cpu", "gpu"}
        Where the convolution's FFTs run; "gpu" needs CuPy and a CUDA device
        (:mod:`diffkernel.kernel.device`) and is an error without them.
    decorrelate : bool
        Filter the difference so that its noise is white again
        (:mod:`diffkernel.kernel.decorrelate`; what ``run_pair`` and the command line
        do by default). Off here by default: the specification's subtraction.
    score : bool
        Also make the score image (the difference cross-correlated with its PSF, in
        units of a point source's S/N): ``result.scoreImage``.

    Returns
    -------
    MaskedImage
        Difference image with propagated variance and mask (science mask planes).
        The filters used are ``result.differenceFilters`` (None when neither option).

    Notes
    -----
    ``result.quality`` is replaced by the verdict on the fit and on this difference
    image (:func:`diffkernel.quality.assess`): its sky and the candidates' footprints,
    whose histograms are ``result.differenceHistograms``.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int | np.integer) or tile_size < 1:
        raise InputError(f"tile_size must be a positive integer (pixels), got {tile_size!r}")
    array_backend(device)  # fail before any work when the device is missing
    if not hasattr(result, "spatialSolution"):
        raise InputError(
            f"result must be the MakeKernelResult of MakeKernelTask.run, got "
            f"{type(result).__name__}"
        )
    t, s = prepare_inputs(template, science, result)
    ny, nx = s.shape
    mode = getattr(result, "mode", "convolveTemplate")
    metadata = getattr(result, "metadata", None) or {}
    filters = subtraction_filters(
        t, s, result.spatialSolution, mode, decorrelate, score, metadata.get("science_fwhm")
    )
    diff = np.empty((ny, nx))
    var = np.empty((ny, nx))
    mask = np.empty((ny, nx), dtype=np.int32)
    score_image = np.empty((ny, nx)) if score else None
    kernels = SubtractionKernels(result.spatialSolution, precision, device)
    xc, yc = footprint_centres(result.candidates)
    radius = footprint_radius(kernels.solution.basis.kernel_size)
    histograms = np.zeros((2, Z_NBINS), dtype=np.int64)
    sign = -1.0 if mode == "convolveScience" else 1.0
    for y0 in range(0, ny, tile_size):
        for x0 in range(0, nx, tile_size):
            y1, x1 = min(y0 + tile_size, ny), min(x0 + tile_size, nx)
            box = (y0, y1, x0, x1)
            d, v, m, sc = difference_box(t, (0, 0), s, (0, 0), kernels, box, s.shape, sign, filters)
            diff[y0:y1, x0:x1], var[y0:y1, x0:x1], mask[y0:y1, x0:x1] = d, v, m
            if score_image is not None:
                score_image[y0:y1, x0:x1] = sc
            histograms += difference_histograms(d, v, m, (y0, x0), xc, yc, radius)
    result.differenceHistograms = histograms
    result.differenceFilters = filters
    result.scoreImage = score_image
    config = getattr(result, "config", None)
    if config is not None:
        result.quality = assess(
            result.candidates,
            result.metadata,
            result.spatialSolution,
            config.kernel.active,
            histograms,
        )
    return MaskedImage(diff, var, mask, dict(s.mask_planes))
