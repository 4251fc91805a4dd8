"""The kernel configs (ip_diffim's psfMatch) and MakeKernelConfig, the top level."""

from __future__ import annotations

import math
from typing import ClassVar

from .base import Config, Field
from .parts import (
    AfwBackgroundConfig,
    DetectionConfig,
    SelectDetectionConfig,
    SelectMeasurementConfig,
    WarpingConfig,
    require_plane_names,
)

__all__ = [
    "PsfMatchConfig",
    "PsfMatchConfigAL",
    "PsfMatchConfigDF",
    "KernelChoice",
    "MakeKernelConfig",
]

# ---------------------------------------------------------------------------------------
# Kernel configs
# ---------------------------------------------------------------------------------------

_ALARD_LUPTON = "alard-lupton"
_DELTA_FUNCTION = "delta-function"
_MAX_SPATIAL_ORDER = 6
#: Largest kernel side accepted (pixels): 10x the usual 21-35, far past any seeing.
MAX_KERNEL_SIZE = 255  # a typo (10001) would fill the memory: it grows as its square
_SIZE_FROM_FWHM = (
    "the size comes from the PSF widths (kernelSizeFwhmScaling, within "
    "kernelSizeMin..kernelSizeMax); set scaleByFwhm = false to fix it"
)


class PsfMatchConfig(Config):
    """Settings shared by both kernel bases: size, spatial model, candidate rejection."""

    #: The basis a subclass stands for; ``None`` for the base class.
    _basis: ClassVar[str | None] = None
    #: kernelSize set under scaleByFwhm is ignored: the config says so (tomlfile.py).
    OVERRIDDEN_BY = {"kernelSize": ("scaleByFwhm", True, _SIZE_FROM_FWHM)}

    warpingConfig = Field(WarpingConfig, doc="Alignment of Exposures onto a common pixel grid.")
    detectionConfig = Field(
        DetectionConfig, doc="Detection of candidate sources and the size of their stamps."
    )
    afwBackgroundConfig = Field(
        AfwBackgroundConfig, doc="Mesh background fit, used when useAfwBackground is True."
    )
    useAfwBackground = Field(
        bool,
        False,
        "Subtract a mesh background from each image before fitting, instead of fitting the "
        "differential background with the kernel.",
    )
    fitForBackground = Field(
        bool,
        False,
        "Fit a differential background (with its cross terms against the kernel) along with "
        "the kernel.",
    )
    kernelBasisSet = Field(
        str,
        _ALARD_LUPTON,
        "Kind of kernel basis; must match the config class (AL or DF).",
        choices={
            _ALARD_LUPTON: "Gaussians times polynomials; the first term does not vary "
            "spatially, so the kernel sum is conserved; PCA is usually not wanted.",
            _DELTA_FUNCTION: "one basis function per kernel pixel; consider regularization, "
            "and PCA (usePcaForSpatialKernel) which also conserves the kernel sum.",
        },
        aliases={"alardlupton": _ALARD_LUPTON, "deltafunction": _DELTA_FUNCTION},
    )
    kernelSize = Field(
        int,
        21,
        "Side of the kernel in pixels (odd). When scaleByFwhm is True it is recomputed from "
        "the PSF widths with kernelSizeFwhmScaling.",
    )
    scaleByFwhm = Field(
        bool, True, "Derive kernelSize and the Alard-Lupton Gaussian widths from the PSF FWHM."
    )
    kernelSizeFwhmScaling = Field(
        float,
        6.0,
        "With scaleByFwhm, the kernel size is this multiple of the widest Alard-Lupton sigma.",
    )
    kernelSizeMin = Field(int, 21, "Smallest kernel size (pixels, odd) that scaling may give.")
    kernelSizeMax = Field(int, 35, "Largest kernel size (pixels, odd) that scaling may give.")
    spatialModelType = Field(
        str,
        "chebyshev1",
        "Functions of (x, y) used for the spatial variation of kernel and background.",
        choices={
            "chebyshev1": "Chebyshev polynomials of the first kind",
            "polynomial": "ordinary x, y polynomials",
        },
    )
    spatialKernelOrder = Field(
        int, 2, "Polynomial order of the kernel's variation across the image."
    )
    spatialBgOrder = Field(
        int, 1, "Polynomial order of the differential background's variation across the image."
    )
    sizeCellX = Field(int, 128, "Width in pixels of the spatial cells that spread candidates.")
    sizeCellY = Field(int, 128, "Height in pixels of the spatial cells that spread candidates.")
    nStarPerCell = Field(
        int, 5, "Candidates per spatial cell used in the spatial fit (-1: all of them)."
    )
    maxSpatialIterations = Field(
        int,
        3,
        "Most rounds of rejecting bad candidates and refitting the spatial model (1 to 5).",
    )
    usePcaForSpatialKernel = Field(
        bool,
        False,
        "Replace the basis by the principal components of the per-candidate kernels before "
        "the spatial fit. Mostly for delta-function kernels; the first component then does "
        "not vary spatially and the kernel sum is conserved.",
    )
    subtractMeanForPca = Field(
        bool, True, "Subtract the mean kernel before the principal component analysis."
    )
    numPrincipalComponents = Field(
        int, 5, "Principal components kept for the basis, the mean kernel included if used."
    )
    singleKernelClipping = Field(
        bool, True, "Reject candidates whose own kernel fit leaves poor residuals."
    )
    kernelSumClipping = Field(
        bool, True, "Reject candidates whose kernel sum is an outlier of the ensemble."
    )
    spatialKernelClipping = Field(
        bool, True, "Reject candidates poorly fit by the spatial model, then refit."
    )
    checkConditionNumber = Field(
        bool,
        False,
        "Mark a candidate bad when its normal matrix's condition number exceeds "
        "maxConditionNumber (also bounds the inverse in the biased-risk estimate). Turn off, "
        "or raise the limit, when deconvolving.",
    )
    badMaskPlanes = Field(
        tuple,
        ("NO_DATA", "EDGE", "SAT"),
        "Mask planes whose pixels are left out of difference-image statistics. Usual names: "
        "NO_DATA EDGE SAT BAD CR INTRP; each must be a standard plane or one an input "
        "declares.",
        item_type=str,
    )
    candidateResidualMeanMax = Field(
        float,
        0.25,
        "Reject a candidate when the mean of its residuals divided by their sigma exceeds "
        "this (per-candidate and spatial fits).",
    )
    candidateResidualStdMax = Field(
        float,
        1.50,
        "Reject a candidate when the standard deviation of its residuals divided by their "
        "sigma exceeds this (per-candidate and spatial fits).",
    )
    useCoreStats = Field(
        bool,
        False,
        "Compute residual statistics on the stamp core (candidateCoreRadius) only, not the "
        "whole stamp; probably wrong when deconvolving.",
    )
    candidateCoreRadius = Field(
        int,
        3,
        "Half-width of the stamp core, (2*radius)**2 pixels, used for the core statistics "
        "(useCoreStats) and to rank candidates by the mean S/N per pixel of the science "
        "image in this core (local sky subtracted), as ip_diffim does; at most the stamp's "
        "half-width.",
    )
    maxKsumSigma = Field(
        float,
        3.0,
        "Kernel sums further than this many standard deviations from the ensemble mean are "
        "rejected (variable or saturated sources).",
    )
    maxConditionNumber = Field(
        float, 5.0e7, "Largest condition number of a well-conditioned candidate matrix."
    )
    conditionNumberType = Field(
        str,
        "EIGENVALUE",
        "How condition numbers are computed.",
        choices={"EIGENVALUE": "from eigenvalues (faster)", "SVD": "from singular values"},
    )
    maxSpatialConditionNumber = Field(
        float, 1.0e10, "Largest condition number of a well-conditioned spatial matrix."
    )
    iterateSingleKernel = Field(
        bool,
        False,
        "Refit each candidate with a variance estimated from the first fit; mostly useful "
        "when convolving a single-epoch image.",
    )
    constantVarianceWeighting = Field(
        bool,
        True,
        "Weight the per-candidate fit by a constant variance (often better for bright "
        "stars) rather than by the variance plane.",
    )
    correctConvolvedNoise = Field(
        bool,
        False,
        "Take out of each normal matrix what the convolved image's noise adds on average "
        "(errors in variables shrink the kernel: sums ~1% low otherwise). Not in ip_diffim; "
        "on for AL in default_subtraction() (with delta functions it overshot: 3-4% high).",
    )
    calculateKernelUncertainty = Field(
        bool,
        False,
        "Compute kernel and background uncertainties of each candidate from the inverse "
        "normal matrix (unreliable with regularization), and the covariance of the spatial "
        "solution's parameters.",
    )
    useBicForKernelBasis = Field(
        bool,
        False,
        "Keep only the leading basis functions that minimize the Bayesian Information "
        "Criterion of the candidates' fits (whole Gaussians of an AL basis; principal "
        "components with usePcaForSpatialKernel).",
    )
    fwhmExposureGrid = Field(
        int, 10, "Grid size (per axis) on which the PSF FWHM is averaged over an exposure."
    )
    fwhmExposureBuffer = Field(
        float,
        0.05,
        "Fraction of the image left out on every side of that grid (0 <= buffer < 0.5).",
    )

    def _check(self, prefix: str) -> None:
        req = self._require
        if self._basis is not None and self.kernelBasisSet != self._basis:
            other = "DF" if self._basis == _ALARD_LUPTON else "AL"
            raise self._invalid(
                prefix,
                "kernelBasisSet",
                f"{type(self).__name__} is the {self._basis!r} kernel config; "
                f"select kernel.name = {other!r} for the other basis",
            )
        for name in ("kernelSize", "kernelSizeMin", "kernelSizeMax"):
            value = getattr(self, name)
            req(value >= 3 and value % 2 == 1, prefix, name, "must be odd and >= 3")
            req(
                value <= MAX_KERNEL_SIZE,
                prefix,
                name,
                f"must be <= {MAX_KERNEL_SIZE} (memory grows as its square)",
            )
        req(
            self.kernelSizeMin <= self.kernelSizeMax,
            prefix,
            "kernelSizeMin",
            f"must be <= kernelSizeMax ({self.kernelSizeMax})",
        )
        req(self.kernelSizeFwhmScaling > 0, prefix, "kernelSizeFwhmScaling", "must be > 0")
        for name in ("spatialKernelOrder", "spatialBgOrder"):
            req(
                0 <= getattr(self, name) <= _MAX_SPATIAL_ORDER,
                prefix,
                name,
                f"must be in 0..{_MAX_SPATIAL_ORDER}",
            )
        for name in ("sizeCellX", "sizeCellY"):
            req(getattr(self, name) >= 8, prefix, name, "must be >= 8 pixels")
        req(
            self.nStarPerCell == -1 or self.nStarPerCell >= 1,
            prefix,
            "nStarPerCell",
            "must be -1 (all candidates) or >= 1",
        )
        req(
            1 <= self.maxSpatialIterations <= 5,
            prefix,
            "maxSpatialIterations",
            "must be in 1..5",
        )
        req(self.numPrincipalComponents >= 1, prefix, "numPrincipalComponents", "must be >= 1")
        for name in ("candidateResidualMeanMax", "candidateResidualStdMax", "maxKsumSigma"):
            req(getattr(self, name) > 0, prefix, name, "must be > 0")
        req(self.candidateCoreRadius >= 1, prefix, "candidateCoreRadius", "must be >= 1")
        for name in ("maxConditionNumber", "maxSpatialConditionNumber"):
            # inf is no limit at all: checkConditionNumber = False says that plainly.
            req(
                1 < getattr(self, name) < math.inf,
                prefix,
                name,
                "must be finite and > 1 (for no limit, set checkConditionNumber = False)",
            )
        require_plane_names(self, prefix, "badMaskPlanes")
        req(self.fwhmExposureGrid >= 1, prefix, "fwhmExposureGrid", "must be >= 1")
        req(
            0 <= self.fwhmExposureBuffer < 0.5,
            prefix,
            "fwhmExposureBuffer",
            "must satisfy 0 <= buffer < 0.5",
        )
        if (
            self.kernelBasisSet == _DELTA_FUNCTION
            and self.useBicForKernelBasis
            and not self.usePcaForSpatialKernel
        ):
            raise self._invalid(
                prefix,
                "useBicForKernelBasis",
                "with the delta-function basis, BIC selects among principal components, so "
                "it requires usePcaForSpatialKernel = True",
            )


class PsfMatchConfigAL(PsfMatchConfig):
    """Kernel settings for the Alard-Lupton basis: Gaussians times polynomials."""

    _basis: ClassVar[str | None] = _ALARD_LUPTON

    kernelBasisSet = PsfMatchConfig.kernelBasisSet.with_default(_ALARD_LUPTON)

    alardNGauss = Field(int, 3, "Number of Gaussians in the basis.")
    alardSigGauss = Field(
        tuple,
        (0.7, 1.5, 3.0),
        "Sigma of each Gaussian in pixels (FWHM = 2.35 sigma); alardNGauss values.",
        item_type=float,
    )
    alardDegGauss = Field(
        tuple,
        (4, 2, 2),
        "Degree of the polynomial multiplying each Gaussian; alardNGauss values.",
        item_type=int,
    )
    alardMinSig = Field(
        float, 0.7, "Smallest Gaussian sigma (pixels) when the widths are scaled by FWHM."
    )
    alardGaussBeta = Field(
        float, 2.0, "Ratio of successive Gaussian sigmas when the widths are scaled by FWHM."
    )
    alardNGaussDeconv = Field(int, 3, "Number of Gaussians when the fit must deconvolve.")
    alardDegGaussDeconv = Field(
        int, 3, "Polynomial degree of every Gaussian when the fit must deconvolve."
    )
    alardMinSigDeconv = Field(
        float,
        0.4,
        "Smallest Gaussian sigma (pixels) when deconvolving; below alardMinSig because it "
        "enters only indirectly.",
    )

    alardRegularization = Field(
        float,
        0.0,
        "Roughness penalty on AL kernels (0: none, as ip_diffim): the summed squared 9-point "
        "Laplacian of the kernel image, in chi² units, in the single and spatial fits. It "
        "holds down the modes the template's PSF hides, which deeper templates otherwise "
        "fit to noise. default_subtraction() sets 60 (benchmarks/bench_depth.py).",
    )

    def _check(self, prefix: str) -> None:
        super()._check(prefix)
        req = self._require
        req(self.alardNGauss >= 1, prefix, "alardNGauss", "must be >= 1")
        ok = math.isfinite(self.alardRegularization) and self.alardRegularization >= 0
        req(ok, prefix, "alardRegularization", "must be finite and >= 0")
        for name in ("alardSigGauss", "alardDegGauss"):
            req(
                len(getattr(self, name)) == self.alardNGauss,
                prefix,
                name,
                f"must have alardNGauss ({self.alardNGauss}) values",
            )
        req(all(s > 0 for s in self.alardSigGauss), prefix, "alardSigGauss", "sigmas must be > 0")
        req(
            all(d >= 0 for d in self.alardDegGauss),
            prefix,
            "alardDegGauss",
            "degrees must be >= 0",
        )
        req(
            len(set(self.alardSigGauss)) == len(self.alardSigGauss),
            prefix,
            "alardSigGauss",
            "sigmas must differ (identical Gaussians give the same basis functions twice)",
        )
        for name in ("alardMinSig", "alardMinSigDeconv"):
            req(getattr(self, name) > 0, prefix, name, "must be > 0")
        req(
            self.alardGaussBeta > 1,
            prefix,
            "alardGaussBeta",
            "must be > 1 (the ratio of successive sigmas; 1 makes the Gaussians identical)",
        )
        req(self.alardNGaussDeconv >= 1, prefix, "alardNGaussDeconv", "must be >= 1")
        req(self.alardDegGaussDeconv >= 0, prefix, "alardDegGaussDeconv", "must be >= 0")


class PsfMatchConfigDF(PsfMatchConfig):
    """Kernel settings for the delta-function basis: one basis function per kernel pixel."""

    _basis: ClassVar[str | None] = _DELTA_FUNCTION

    kernelBasisSet = PsfMatchConfig.kernelBasisSet.with_default(_DELTA_FUNCTION)
    maxConditionNumber = PsfMatchConfig.maxConditionNumber.with_default(5.0e6)
    usePcaForSpatialKernel = PsfMatchConfig.usePcaForSpatialKernel.with_default(True)
    subtractMeanForPca = PsfMatchConfig.subtractMeanForPca.with_default(True)
    numPrincipalComponents = PsfMatchConfig.numPrincipalComponents.with_default(5)

    useRegularization = Field(
        bool, True, "Penalize roughness of the delta-function kernel (Tikhonov regularization)."
    )
    regularizationType = Field(
        str,
        "centralDifference",
        "Form of the roughness penalty.",
        choices={
            "centralDifference": "second derivative from a 2-D central-difference stencil",
            "forwardDifference": "derivatives of the orders in forwardRegularizationOrders, "
            "from forward differences",
        },
    )
    centralRegularizationStencil = Field(
        int,
        9,
        "Stencil of the central-difference penalty (centralDifference only).",
        choices={5: "the 4 nearest neighbours in x and y", 9: "all 8 neighbours, diagonals too"},
    )
    forwardRegularizationOrders = Field(
        tuple,
        (1, 2),
        "Derivative orders penalized by forwardDifference (each 0..3, no repeats).",
        item_type=int,
    )
    regularizationBorderPenalty = Field(
        float, 3.0, "Extra penalty on the kernel's border pixels (>= 0)."
    )
    lambdaType = Field(
        str,
        "absolute",
        "How the regularization strength lambda is chosen.",
        choices={
            "absolute": "lambda = lambdaValue",
            "relative": "lambda = lambdaScaling times the default strength tr(M)/tr(H), the "
            "trace ratio of the normal and penalty matrices (Numerical Recipes 18.5.8)",
            "minimizeBiasedRisk": "scan lambda, keep the minimum of the biased risk estimate",
            "minimizeUnbiasedRisk": "scan lambda, keep the minimum of the unbiased risk estimate",
        },
    )
    lambdaValue = Field(
        float, 0.2, "Regularization strength for lambdaType 'absolute' (unused by the others)."
    )
    lambdaScaling = Field(
        float,
        1e-4,
        "For lambdaType 'relative': the fraction of the default strength tr(M)/tr(H) "
        "(Numerical Recipes 18.5.8) used; 1e-4 or 1e-5 are typical.",
    )
    lambdaStepType = Field(
        str,
        "log",
        "Spacing of the lambda scan of the risk-minimizing lambdaTypes.",
        choices={
            "log": "lambdaMin/Max/Step are log10 values, e.g. -1.0, 2.0, 0.1",
            "linear": "lambdaMin/Max/Step are lambda values, e.g. 0.1, 100, 0.1",
        },
    )
    lambdaMin = Field(float, -1.0, "Start of the lambda scan (log10 for log steps).")
    lambdaMax = Field(float, 2.0, "End of the lambda scan (log10 for log steps).")
    lambdaStep = Field(float, 0.1, "Step of the lambda scan (in log10 for log steps).")

    def _check(self, prefix: str) -> None:
        super()._check(prefix)
        req = self._require
        orders = self.forwardRegularizationOrders
        req(len(orders) > 0, prefix, "forwardRegularizationOrders", "must not be empty")
        req(
            all(0 <= o <= 3 for o in orders),
            prefix,
            "forwardRegularizationOrders",
            "orders must be in 0..3",
        )
        req(
            len(set(orders)) == len(orders),
            prefix,
            "forwardRegularizationOrders",
            "orders must not repeat",
        )
        req(
            self.regularizationBorderPenalty >= 0,
            prefix,
            "regularizationBorderPenalty",
            "must be >= 0",
        )
        req(self.lambdaValue >= 0, prefix, "lambdaValue", "must be >= 0")
        req(self.lambdaScaling > 0, prefix, "lambdaScaling", "must be > 0")
        req(
            self.lambdaMin < self.lambdaMax,
            prefix,
            "lambdaMin",
            f"must be < lambdaMax ({self.lambdaMax})",
        )
        req(self.lambdaStep > 0, prefix, "lambdaStep", "must be > 0")
        if self.lambdaType.startswith("minimize") and self.lambdaStepType == "linear":
            req(
                self.lambdaMin > 0,
                prefix,
                "lambdaMin",
                "must be > 0 with linear steps (it is a lambda, not its log10)",
            )


class KernelChoice(Config):
    """Both kernel configs and the selection between them (``kernel.active``)."""

    name = Field(
        str,
        "AL",
        "Which kernel config is used; kernel.active refers to it.",
        choices={"AL": "Alard-Lupton basis (kernel.AL)", "DF": "delta-function basis (kernel.DF)"},
    )
    AL = Field(PsfMatchConfigAL, doc="Settings used when name is 'AL'.")
    DF = Field(PsfMatchConfigDF, doc="Settings used when name is 'DF'.")

    @property
    def active(self) -> PsfMatchConfigAL | PsfMatchConfigDF:
        """The selected kernel config (``AL`` or ``DF``, following :attr:`name`)."""
        return self.AL if self.name == "AL" else self.DF

    def _member(self, segment: str) -> str:
        return self.name if segment == "active" else segment

    def _validate(self, prefix: str) -> None:
        # Only the selected config has to make sense: the other one is never used.
        self._fields["name"].check_choice(self.name, f"config field {prefix}name")
        self.active._validate(f"{prefix}{self.name}.")


class MakeKernelConfig(Config):
    """Configuration of MakeKernelTask: the kernel choice and candidate selection.

    Examples
    --------
    >>> config = MakeKernelConfig.from_dict({"kernel.name": "DF", "kernel.active.kernelSize": 25})
    >>> config.kernel.active.kernelSize
    25
    """

    kernel = Field(KernelChoice, doc="Kernel basis choice and the settings of each basis.")
    selectDetection = Field(
        SelectDetectionConfig,
        doc="Initial detection of stars to fit the kernel on, when no sources are given.",
    )
    selectMeasurement = Field(
        SelectMeasurementConfig,
        doc="Measurement and vetting of those detections before they become candidates.",
    )

    @classmethod
    def default_subtraction(cls) -> MakeKernelConfig:
        """Return the config that ip_diffim's Alard-Lupton subtraction task uses.

        That is the Alard-Lupton basis with a fitted differential background of spatial
        order 2 and a kernel of spatial order 1. It is the default of every subtraction
        (``diffkernel subtract``, ``batch``, ``demo``,
        :func:`diffkernel.pipeline.dask.driver.run_pair`),
        since their inputs may hold their sky; :class:`MakeKernelTask` keeps the
        specification's defaults (no background fitted). The delta-function settings
        get the same background (fitted, order 2), so that choosing ``kernel.name =
        "DF"`` in a config file does not silently drop it, and a regularization
        strength relative to the data (``lambdaType = "relative"``, ``lambdaScaling =
        1e-3``) instead of the specification's absolute 0.2, which is negligible next
        to the normal matrices of bright stars: their unregularized kernels are noise,
        and a PCA basis made of them (``usePcaForSpatialKernel``, on by default for DF)
        gave kernel sums 1.5-3% low (up to 8%) and kernel errors 1.3-1.8 times larger
        (``benchmarks/bench_df_pca.py``; README, "How it works"). AL kernels get a
        roughness penalty (``alardRegularization = 60``; deeper templates gave worse
        kernels without it) and ``correctConvolvedNoise`` (sums ~1% low without it where
        the convolved image is the noisier; ``benchmarks/bench_depth.py``).
        """
        config = cls()
        config.kernel.name = "AL"
        config.kernel.AL.spatialKernelOrder = 1
        for kernel in (config.kernel.AL, config.kernel.DF):
            kernel.fitForBackground = True
            kernel.spatialBgOrder = 2
        config.kernel.DF.lambdaType = "relative"
        config.kernel.DF.lambdaScaling = 1e-3
        config.kernel.AL.alardRegularization = 60.0
        config.kernel.AL.correctConvolvedNoise = True
        return config
