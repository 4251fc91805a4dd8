"""The sub-configs: detection of candidates and their stamps, warping, mesh backgrounds,
and the coarse detection and measurement used when no sources are given."""

from __future__ import annotations

from .base import Config, Field

__all__ = [
    "DetectionConfig",
    "WarpingConfig",
    "AfwBackgroundConfig",
    "SelectDetectionConfig",
    "SelectMeasurementConfig",
]

# ---------------------------------------------------------------------------------------
# Sub-configs of PsfMatchConfig
# ---------------------------------------------------------------------------------------


def require_plane_names(config: Config, prefix: str, name: str) -> None:
    """Refuse a list of mask plane names holding one that no mask can have.

    Whether a name is a plane of the inputs is known only when they are
    (:func:`diffkernel.pipeline.stages.check_plane_names`); an empty name or one with
    blanks (``"SAT "``) is wrong whatever the inputs.
    """
    for plane in getattr(config, name):
        if not plane or plane != plane.strip() or any(c.isspace() for c in plane):
            raise config._invalid(
                prefix, name, f"{plane!r} is not a mask plane name (empty or with blanks)"
            )


class DetectionConfig(Config):
    """Detection of footprints that become kernel candidates, and the size of their stamps."""

    detThreshold = Field(
        float, 10.0, "Footprint detection threshold, in the units set by detThresholdType."
    )
    detThresholdType = Field(
        str,
        "pixel_stdev",
        "How detThreshold is interpreted.",
        choices={
            "value": "as a pixel value",
            "stdev": "in units of the standard deviation of the image plane",
            "variance": "in units of the variance of the image plane",
            "pixel_stdev": "in units of each pixel's own sigma, from the variance plane",
        },
    )
    detOnTemplate = Field(
        bool,
        True,
        "Detect on the template (the image that is convolved) when True, on the science "
        "image when False.",
    )
    badMaskPlanes = Field(
        tuple,
        ("NO_DATA", "EDGE", "SAT"),
        "A footprint touching any of these mask planes is not used. Usual names: NO_DATA "
        "EDGE SAT BAD CR INTRP; each must be a standard plane or one an input declares.",
        item_type=str,
    )
    fpNpixMin = Field(int, 5, "Fewest pixels a footprint may have to be accepted.")
    fpNpixMax = Field(
        int,
        500,
        "Most pixels a footprint may have to be accepted; larger ones make the stamp "
        "convolutions slow.",
    )
    fpGrowKernelScaling = Field(
        float,
        1.0,
        "When > 0, the stamp half-width is this multiple of the final kernel size, clipped "
        "to [fpGrowMin, fpGrowMax]: with 1.0, one kernel width of pixels remains after the "
        "template stamp is convolved with the basis. When 0, fpGrowPix is used.",
    )
    fpGrowPix = Field(
        int,
        30,
        "Fixed stamp half-width in pixels, used when fpGrowKernelScaling is 0. Smaller is "
        "faster, but a stamp hardly larger than the kernel leaves the kernel sum poorly "
        "constrained.",
    )
    fpGrowMin = Field(int, 20, "Smallest stamp half-width (pixels) derived from the kernel size.")
    fpGrowMax = Field(int, 40, "Largest stamp half-width (pixels) derived from the kernel size.")

    def stamp_half_width(self, kernel_size: int) -> int:
        """Return the half-width in pixels of the stamp cut around each candidate.

        Parameters
        ----------
        kernel_size : int
            Final kernel size (pixels on a side).

        Returns
        -------
        int
            ``clip(round(fpGrowKernelScaling * kernel_size), fpGrowMin, fpGrowMax)`` when
            ``fpGrowKernelScaling > 0``, else ``fpGrowPix``.
        """
        if self.fpGrowKernelScaling > 0:
            grown = int(round(self.fpGrowKernelScaling * kernel_size))
            return int(min(max(grown, self.fpGrowMin), self.fpGrowMax))
        return self.fpGrowPix

    def _check(self, prefix: str) -> None:
        require_plane_names(self, prefix, "badMaskPlanes")
        self._require(self.detThreshold > 0, prefix, "detThreshold", "must be > 0")
        self._require(self.fpNpixMin >= 1, prefix, "fpNpixMin", "must be >= 1")
        self._require(
            self.fpNpixMax >= self.fpNpixMin,
            prefix,
            "fpNpixMax",
            f"must be >= fpNpixMin ({self.fpNpixMin})",
        )
        self._require(
            self.fpGrowKernelScaling >= 0,
            prefix,
            "fpGrowKernelScaling",
            "must be >= 0 (0: use fpGrowPix)",
        )
        self._require(self.fpGrowPix >= 1, prefix, "fpGrowPix", "must be >= 1")
        self._require(self.fpGrowMin >= 1, prefix, "fpGrowMin", "must be >= 1")
        self._require(
            self.fpGrowMax >= self.fpGrowMin,
            prefix,
            "fpGrowMax",
            f"must be >= fpGrowMin ({self.fpGrowMin})",
        )


_INTERPOLATIONS = {
    "nearest-neighbor": "nearest pixel (interpolation order 0)",
    "bilinear": "bilinear (order 1)",
    "biquadratic": "biquadratic (order 2)",
    "bicubic": "bicubic (order 3)",
}


class WarpingConfig(Config):
    """Resampling of an Exposure template onto the science image's pixel grid."""

    warpingKernelName = Field(
        str,
        "bilinear",
        "Interpolation of the image and variance planes (the orders that "
        "reproject.reproject_interp supports).",
        choices=_INTERPOLATIONS,
    )
    maskWarpingKernelName = Field(
        str,
        "nearest-neighbor",
        "Interpolation of the mask planes; nearest-neighbor keeps each bit where it was.",
        choices=_INTERPOLATIONS,
    )
    growFullMask = Field(
        tuple,
        ("NO_DATA",),
        "Mask planes set on every output pixel whose image interpolation "
        "(warpingKernelName) draws on a template pixel that has them, whatever "
        "maskWarpingKernelName is: they grow to the full width of the image kernel.",
        item_type=str,
    )
    doAlign = Field(
        bool,
        True,
        "Warp an Exposure template onto the science WCS before fitting; when False the two "
        "Exposures are taken as already aligned.",
    )

    def _check(self, prefix: str) -> None:
        require_plane_names(self, prefix, "growFullMask")


class AfwBackgroundConfig(Config):
    """Mesh background estimate, subtracted first when ``useAfwBackground`` is True."""

    binSize = Field(
        int,
        128,
        "Side in pixels of the mesh cells in which the background is measured (at most the "
        "image's shorter side).",
    )
    filterSize = Field(
        int,
        3,
        "Size of the median filter run over the mesh of cell values (odd; 1: no filtering).",
    )
    statistic = Field(
        str,
        "MEANCLIP",
        "Statistic of the unmasked pixels of a cell.",
        choices={"MEANCLIP": "sigma-clipped mean", "MEDIAN": "median", "MEAN": "plain mean"},
    )
    ignoredPixelMask = Field(
        tuple,
        ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA", "SAT"),
        "Pixels with any of these mask planes are left out of the background estimate.",
        item_type=str,
    )

    def _check(self, prefix: str) -> None:
        require_plane_names(self, prefix, "ignoredPixelMask")
        self._require(self.binSize >= 1, prefix, "binSize", "must be >= 1")
        self._require(
            self.filterSize >= 1 and self.filterSize % 2 == 1,
            prefix,
            "filterSize",
            "must be odd and >= 1",
        )


# ---------------------------------------------------------------------------------------
# Candidate selection and the top level
# ---------------------------------------------------------------------------------------


class SelectDetectionConfig(Config):
    """Coarse source detection, run when no kernel sources are supplied."""

    thresholdValue = Field(
        float, 5.0, "Detection threshold: signal-to-noise per pixel above the background rms."
    )
    minArea = Field(int, 5, "Fewest connected pixels above threshold that make a source.")
    deblendNThresh = Field(int, 32, "Number of deblending thresholds.")
    deblendContrast = Field(
        float, 0.005, "Smallest flux fraction a branch needs to be deblended (0..1)."
    )
    maxSources = Field(int, 2000, "Most detections kept, brightest first (> 0).")

    def _check(self, prefix: str) -> None:
        req = self._require
        req(self.thresholdValue > 0, prefix, "thresholdValue", "must be > 0")
        req(self.minArea >= 1, prefix, "minArea", "must be >= 1")
        req(self.deblendNThresh >= 1, prefix, "deblendNThresh", "must be >= 1")
        req(0 <= self.deblendContrast <= 1, prefix, "deblendContrast", "must be in [0, 1]")
        req(self.maxSources > 0, prefix, "maxSources", "must be > 0")


class SelectMeasurementConfig(Config):
    """Measurement and vetting of detected sources before they become kernel candidates."""

    apertureRadius = Field(
        float, 5.0, "Aperture radius in pixels of the S/N that minSnr cuts on."
    )
    minSnr = Field(float, 10.0, "Reject a source whose aperture S/N is below this in either image.")
    maxEllipticity = Field(
        float, 0.3, "Reject a source more elongated than this ellipticity (0..1)."
    )
    isolationRadius = Field(
        float,
        0.0,
        "Reject a source with a neighbour closer than this many pixels (0: derived from the "
        "stamp size).",
    )
    saturationFraction = Field(
        float,
        0.9,
        "Reject a source whose peak exceeds this fraction of a known saturation level.",
    )

    def _check(self, prefix: str) -> None:
        req = self._require
        req(self.apertureRadius > 0, prefix, "apertureRadius", "must be > 0")
        req(self.minSnr >= 0, prefix, "minSnr", "must be >= 0")
        req(0 <= self.maxEllipticity <= 1, prefix, "maxEllipticity", "must be in [0, 1]")
        req(self.isolationRadius >= 0, prefix, "isolationRadius", "must be >= 0")
        req(
            0 < self.saturationFraction <= 1,
            prefix,
            "saturationFraction",
            "must be in (0, 1]",
        )
