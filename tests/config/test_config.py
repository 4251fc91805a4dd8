"""Tests of diffkernel.config: defaults, typing, validation, conversion and files."""

from __future__ import annotations

import json
import math
import pickle
import re
import tomllib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkernel.config import (
    AfwBackgroundConfig,
    Config,
    DetectionConfig,
    KernelChoice,
    MakeKernelConfig,
    PsfMatchConfig,
    PsfMatchConfigAL,
    PsfMatchConfigDF,
    SelectDetectionConfig,
    SelectMeasurementConfig,
    WarpingConfig,
)
from diffkernel.errors import ConfigError

ALL_CLASSES = [
    DetectionConfig,
    WarpingConfig,
    AfwBackgroundConfig,
    PsfMatchConfig,
    PsfMatchConfigAL,
    PsfMatchConfigDF,
    KernelChoice,
    SelectDetectionConfig,
    SelectMeasurementConfig,
    MakeKernelConfig,
]

SHARED_DEFAULTS = {
    "useAfwBackground": False,
    "fitForBackground": False,
    "kernelSize": 21,
    "scaleByFwhm": True,
    "kernelSizeFwhmScaling": 6.0,
    "kernelSizeMin": 21,
    "kernelSizeMax": 35,
    "spatialModelType": "chebyshev1",
    "spatialKernelOrder": 2,
    "spatialBgOrder": 1,
    "sizeCellX": 128,
    "sizeCellY": 128,
    "nStarPerCell": 5,
    "maxSpatialIterations": 3,
    "usePcaForSpatialKernel": False,
    "subtractMeanForPca": True,
    "numPrincipalComponents": 5,
    "singleKernelClipping": True,
    "kernelSumClipping": True,
    "spatialKernelClipping": True,
    "checkConditionNumber": False,
    "badMaskPlanes": ("NO_DATA", "EDGE", "SAT"),
    "candidateResidualMeanMax": 0.25,
    "candidateResidualStdMax": 1.50,
    "useCoreStats": False,
    "candidateCoreRadius": 3,
    "maxKsumSigma": 3.0,
    "maxConditionNumber": 5.0e7,
    "conditionNumberType": "EIGENVALUE",
    "maxSpatialConditionNumber": 1.0e10,
    "iterateSingleKernel": False,
    "constantVarianceWeighting": True,
    "correctConvolvedNoise": False,
    "calculateKernelUncertainty": False,
    "useBicForKernelBasis": False,
    "fwhmExposureGrid": 10,
    "fwhmExposureBuffer": 0.05,
}

AL_DEFAULTS = {
    **SHARED_DEFAULTS,
    "kernelBasisSet": "alard-lupton",
    "alardNGauss": 3,
    "alardSigGauss": (0.7, 1.5, 3.0),
    "alardDegGauss": (4, 2, 2),
    "alardMinSig": 0.7,
    "alardGaussBeta": 2.0,
    "alardNGaussDeconv": 3,
    "alardDegGaussDeconv": 3,
    "alardMinSigDeconv": 0.4,
    "alardRegularization": 0.0,
}

DF_DEFAULTS = {
    **SHARED_DEFAULTS,
    "kernelBasisSet": "delta-function",
    "maxConditionNumber": 5.0e6,
    "usePcaForSpatialKernel": True,
    "subtractMeanForPca": True,
    "numPrincipalComponents": 5,
    "useRegularization": True,
    "regularizationType": "centralDifference",
    "centralRegularizationStencil": 9,
    "forwardRegularizationOrders": (1, 2),
    "regularizationBorderPenalty": 3.0,
    "lambdaType": "absolute",
    "lambdaValue": 0.2,
    "lambdaScaling": 1e-4,
    "lambdaStepType": "log",
    "lambdaMin": -1.0,
    "lambdaMax": 2.0,
    "lambdaStep": 0.1,
}

DETECTION_DEFAULTS = {
    "detThreshold": 10.0,
    "detThresholdType": "pixel_stdev",
    "detOnTemplate": True,
    "badMaskPlanes": ("NO_DATA", "EDGE", "SAT"),
    "fpNpixMin": 5,
    "fpNpixMax": 500,
    "fpGrowKernelScaling": 1.0,
    "fpGrowPix": 30,
    "fpGrowMin": 20,
    "fpGrowMax": 40,
}

WARPING_DEFAULTS = {
    "warpingKernelName": "bilinear",
    "maskWarpingKernelName": "nearest-neighbor",
    "growFullMask": ("NO_DATA",),
    "doAlign": True,
}

BACKGROUND_DEFAULTS = {
    "binSize": 128,
    "filterSize": 3,
    "statistic": "MEANCLIP",
    "ignoredPixelMask": ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA", "SAT"),
}

SELECT_DETECTION_DEFAULTS = {
    "thresholdValue": 5.0,
    "minArea": 5,
    "deblendNThresh": 32,
    "deblendContrast": 0.005,
    "maxSources": 2000,
}

SELECT_MEASUREMENT_DEFAULTS = {
    "apertureRadius": 5.0,
    "minSnr": 10.0,
    "maxEllipticity": 0.3,
    "isolationRadius": 0.0,
    "saturationFraction": 0.9,
}


def _assert_values(config: Config, expected: dict) -> None:
    for name, value in expected.items():
        got = getattr(config, name)
        assert got == value, f"{type(config).__name__}.{name}: {got!r} != {value!r}"
        assert type(got) is type(value), f"{name}: {type(got)} is not {type(value)}"


# ---------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (PsfMatchConfigAL, AL_DEFAULTS),
        (PsfMatchConfigDF, DF_DEFAULTS),
        (DetectionConfig, DETECTION_DEFAULTS),
        (WarpingConfig, WARPING_DEFAULTS),
        (AfwBackgroundConfig, BACKGROUND_DEFAULTS),
        (SelectDetectionConfig, SELECT_DETECTION_DEFAULTS),
        (SelectMeasurementConfig, SELECT_MEASUREMENT_DEFAULTS),
    ],
)
def test_defaults(cls: type[Config], expected: dict) -> None:
    config = cls()
    _assert_values(config, expected)
    # No field is left out of the expectations.
    assert set(config.to_dict()) - set(expected) <= {
        "warpingConfig",
        "detectionConfig",
        "afwBackgroundConfig",
    }


def test_df_overrides_differ_from_al() -> None:
    al, df = PsfMatchConfigAL(), PsfMatchConfigDF()
    assert al.maxConditionNumber == 5.0e7
    assert df.maxConditionNumber == 5.0e6
    assert al.usePcaForSpatialKernel is False
    assert df.usePcaForSpatialKernel is True
    # The override must not leak into the base class.
    assert PsfMatchConfig().maxConditionNumber == 5.0e7


def test_make_kernel_config_defaults() -> None:
    config = MakeKernelConfig()
    assert config.kernel.name == "AL"
    assert isinstance(config.kernel.AL, PsfMatchConfigAL)
    assert isinstance(config.kernel.DF, PsfMatchConfigDF)
    assert config.kernel.active is config.kernel.AL
    _assert_values(config.kernel.AL.detectionConfig, DETECTION_DEFAULTS)
    _assert_values(config.kernel.DF.warpingConfig, WARPING_DEFAULTS)
    _assert_values(config.kernel.DF.afwBackgroundConfig, BACKGROUND_DEFAULTS)
    _assert_values(config.selectDetection, SELECT_DETECTION_DEFAULTS)
    _assert_values(config.selectMeasurement, SELECT_MEASUREMENT_DEFAULTS)
    config.validate()


def test_sub_configs_are_not_shared_between_instances() -> None:
    a, b = MakeKernelConfig(), MakeKernelConfig()
    a.kernel.AL.detectionConfig.fpGrowPix = 11
    assert b.kernel.AL.detectionConfig.fpGrowPix == 30
    assert a.kernel.DF.detectionConfig.fpGrowPix == 30


def test_kernel_choice_active_follows_name() -> None:
    choice = KernelChoice()
    choice.name = "DF"
    assert choice.active is choice.DF
    choice.name = "AL"
    assert choice.active is choice.AL
    with pytest.raises(ConfigError, match=r"must be one of 'AL', 'DF'; got 'XX'"):
        choice.name = "XX"
    with pytest.raises(ConfigError, match="'active' of KernelChoice is derived"):
        choice.active = PsfMatchConfigAL()  # type: ignore[misc]


def test_default_subtraction() -> None:
    config = MakeKernelConfig.default_subtraction()
    assert config.kernel.name == "AL"
    assert config.kernel.active.fitForBackground is True
    assert config.kernel.active.spatialKernelOrder == 1
    assert config.kernel.active.spatialBgOrder == 2
    assert config != MakeKernelConfig()
    config.validate()


def test_stamp_half_width() -> None:
    det = DetectionConfig()
    assert det.stamp_half_width(21) == 21
    assert det.stamp_half_width(11) == 20  # clipped to fpGrowMin
    assert det.stamp_half_width(51) == 40  # clipped to fpGrowMax
    det.fpGrowKernelScaling = 1.5
    assert det.stamp_half_width(23) == 34  # round(34.5) -> 34
    assert det.stamp_half_width(25) == 38  # round(37.5) -> 38
    det.fpGrowKernelScaling = 0.0
    assert det.stamp_half_width(21) == 30
    det.fpGrowPix = 12
    assert det.stamp_half_width(99) == 12


def test_every_field_has_a_doc() -> None:
    for cls in ALL_CLASSES:
        for name, field in cls.fields().items():
            assert len(field.doc) > 10, f"{cls.__name__}.{name} has no doc"


# ---------------------------------------------------------------------------------------
# Types and names
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("kernelSize", 21.5, "int"),
        ("kernelSize", 21.0, "int"),
        ("kernelSize", True, "int"),
        ("kernelSize", "21", "int"),
        ("maxKsumSigma", True, "float"),
        ("maxKsumSigma", "3.0", "float"),
        ("maxKsumSigma", None, "float"),
        ("fitForBackground", 1, "bool"),
        ("fitForBackground", "yes", "bool"),
        ("spatialModelType", 3, "str"),
        ("alardSigGauss", "0.7", "list[float]"),
        ("alardSigGauss", 0.7, "list[float]"),
        ("badMaskPlanes", "EDGE", "list[str]"),
        ("warpingConfig", {"doAlign": False}, "WarpingConfig"),
        ("detectionConfig", WarpingConfig(), "DetectionConfig"),
    ],
)
def test_type_errors_name_field_value_and_type(name: str, value: object, expected: str) -> None:
    config = PsfMatchConfigAL()
    before = getattr(config, name)
    with pytest.raises(ConfigError) as info:
        setattr(config, name, value)
    message = str(info.value)
    assert f"'{name}'" in message
    assert "PsfMatchConfigAL" in message
    assert repr(value) in message
    assert expected in message
    assert getattr(config, name) == before  # unchanged


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("alardSigGauss", [0.7, None, 3.0], "item 1, expects float, got None"),
        ("alardDegGauss", [4, 2.0, 2], "item 1, expects int, got 2.0 (float)"),
        ("alardDegGauss", [4, False, 2], "item 1, expects int, got False (bool)"),
        ("badMaskPlanes", ["EDGE", 3], "item 1, expects str, got 3 (int)"),
    ],
)
def test_list_item_type_errors(name: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        setattr(PsfMatchConfigAL(), name, value)


def test_nan_is_refused() -> None:
    with pytest.raises(ConfigError, match="'maxKsumSigma' of PsfMatchConfigAL must be a number"):
        PsfMatchConfigAL().maxKsumSigma = float("nan")


def test_int_accepted_for_float_and_numpy_scalars_normalized() -> None:
    config = PsfMatchConfigAL()
    config.maxKsumSigma = 4
    assert config.maxKsumSigma == 4.0 and type(config.maxKsumSigma) is float
    config.alardSigGauss = [1, 2, 4]
    assert config.alardSigGauss == (1.0, 2.0, 4.0)
    assert all(type(s) is float for s in config.alardSigGauss)
    config.kernelSize = np.int64(25)
    assert config.kernelSize == 25 and type(config.kernelSize) is int
    config.maxConditionNumber = np.float32(1e6)
    assert type(config.maxConditionNumber) is float
    config.alardDegGauss = np.array([3, 2, 1])
    assert config.alardDegGauss == (3, 2, 1)
    config.singleKernelClipping = np.bool_(False)
    assert config.singleKernelClipping is False


def test_list_fields_are_stored_as_tuples() -> None:
    config = PsfMatchConfigAL()
    planes = ["BAD", "CR"]
    config.badMaskPlanes = planes
    planes.append("EDGE")  # later edits of the caller's list do not leak in
    assert config.badMaskPlanes == ("BAD", "CR")


def test_choice_fields_refuse_other_values_with_suggestion() -> None:
    config = PsfMatchConfigDF()
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "config field 'spatialModelType' of PsfMatchConfigDF must be one of 'chebyshev1', "
            "'polynomial'; got 'chebychev1'; did you mean 'chebyshev1'?"
        ),
    ):
        config.spatialModelType = "chebychev1"
    with pytest.raises(ConfigError, match=r"must be one of 5, 9; got 7"):
        config.centralRegularizationStencil = 7
    with pytest.raises(ConfigError, match="lambdaType"):
        config.lambdaType = "minimizeRisk"
    with pytest.raises(ConfigError, match="warpingKernelName"):
        config.warpingConfig.warpingKernelName = "lanczos3"
    with pytest.raises(ConfigError, match="statistic"):
        config.afwBackgroundConfig.statistic = "MODE"
    with pytest.raises(ConfigError, match="detThresholdType"):
        config.detectionConfig.detThresholdType = "sigma"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alard-lupton", "alard-lupton"),
        ("alardlupton", "alard-lupton"),
        ("delta-function", "delta-function"),
        ("deltafunction", "delta-function"),
    ],
)
def test_kernel_basis_set_spellings(value: str, expected: str) -> None:
    config = PsfMatchConfig()
    config.kernelBasisSet = value
    assert config.kernelBasisSet == expected


def test_unknown_field_with_suggestion() -> None:
    config = PsfMatchConfigAL()
    with pytest.raises(ConfigError) as info:
        config.kernelSze = 3  # type: ignore[attr-defined]
    assert str(info.value) == (
        "unknown config field 'kernelSze' in PsfMatchConfigAL; did you mean 'kernelSize'?"
    )
    with pytest.raises(ConfigError, match=r"did you mean 'alardSigGauss'\?"):
        config.alardSigGaus = (1.0,)  # type: ignore[attr-defined]
    assert not hasattr(config, "kernelSze")


def test_unknown_field_without_close_match_lists_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown config field 'zzz' in WarpingConfig; known"):
        WarpingConfig().zzz = 1  # type: ignore[attr-defined]


def test_constructor_keywords() -> None:
    config = PsfMatchConfigAL(kernelSize=25, alardSigGauss=[1, 2, 3])
    assert config.kernelSize == 25 and config.alardSigGauss == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match="did you mean 'kernelSize'"):
        PsfMatchConfigAL(kernelsize=25)
    with pytest.raises(ConfigError, match="'kernelSize'.*expects int"):
        PsfMatchConfigAL(kernelSize="25")


def test_fields_cannot_be_deleted() -> None:
    with pytest.raises(ConfigError, match="cannot be deleted"):
        del PsfMatchConfigAL().kernelSize


# ---------------------------------------------------------------------------------------
# validate()
# ---------------------------------------------------------------------------------------

INVALID = [
    # (kernel name, dotted path, value, message fragment)
    ("AL", "kernel.AL.kernelSize", 20, "kernel.AL.kernelSize = 20: must be odd and >= 3"),
    ("AL", "kernel.AL.kernelSize", 1, "kernel.AL.kernelSize = 1: must be odd and >= 3"),
    ("DF", "kernel.DF.kernelSize", -3, "kernel.DF.kernelSize = -3: must be odd"),
    ("AL", "kernel.AL.kernelSizeMin", 22, "kernelSizeMin = 22: must be odd"),
    ("AL", "kernel.AL.kernelSizeMax", 36, "kernelSizeMax = 36: must be odd"),
    ("AL", "kernel.AL.kernelSizeMin", 37, "kernelSizeMin = 37: must be <= kernelSizeMax (35)"),
    ("AL", "kernel.AL.kernelSizeFwhmScaling", 0.0, "kernelSizeFwhmScaling = 0.0: must be > 0"),
    ("AL", "kernel.AL.spatialKernelOrder", -1, "spatialKernelOrder = -1: must be in 0..6"),
    ("AL", "kernel.AL.spatialKernelOrder", 7, "spatialKernelOrder = 7: must be in 0..6"),
    ("DF", "kernel.DF.spatialBgOrder", 7, "kernel.DF.spatialBgOrder = 7: must be in 0..6"),
    ("AL", "kernel.AL.sizeCellX", 7, "sizeCellX = 7: must be >= 8"),
    ("AL", "kernel.AL.sizeCellY", 4, "sizeCellY = 4: must be >= 8"),
    ("AL", "kernel.AL.nStarPerCell", 0, "nStarPerCell = 0: must be -1 (all candidates) or >= 1"),
    ("AL", "kernel.AL.nStarPerCell", -2, "nStarPerCell = -2"),
    ("AL", "kernel.AL.maxSpatialIterations", 0, "maxSpatialIterations = 0: must be in 1..5"),
    ("AL", "kernel.AL.maxSpatialIterations", 6, "maxSpatialIterations = 6: must be in 1..5"),
    ("DF", "kernel.DF.numPrincipalComponents", 0, "numPrincipalComponents = 0: must be >= 1"),
    ("AL", "kernel.AL.alardNGauss", 2, "alardSigGauss = (0.7, 1.5, 3.0): must have alardNGauss"),
    ("AL", "kernel.AL.alardNGauss", 0, "alardNGauss = 0: must be >= 1"),
    ("AL", "kernel.AL.alardSigGauss", [0.7, 1.5], "alardSigGauss = (0.7, 1.5): must have"),
    ("AL", "kernel.AL.alardDegGauss", [4, 2], "alardDegGauss = (4, 2): must have alardNGauss"),
    ("AL", "kernel.AL.alardSigGauss", [0.7, 0, 3], "alardSigGauss = (0.7, 0.0, 3.0): sigmas"),
    ("AL", "kernel.AL.alardDegGauss", [4, -1, 2], "alardDegGauss = (4, -1, 2): degrees must"),
    ("AL", "kernel.AL.alardMinSig", 0.0, "alardMinSig = 0.0: must be > 0"),
    ("AL", "kernel.AL.alardNGaussDeconv", 0, "alardNGaussDeconv = 0: must be >= 1"),
    ("AL", "kernel.AL.alardDegGaussDeconv", -1, "alardDegGaussDeconv = -1: must be >= 0"),
    ("AL", "kernel.AL.candidateCoreRadius", 0, "candidateCoreRadius = 0: must be >= 1"),
    ("AL", "kernel.AL.candidateResidualMeanMax", 0, "candidateResidualMeanMax = 0.0: must be"),
    ("AL", "kernel.AL.candidateResidualStdMax", -1, "candidateResidualStdMax = -1.0: must be"),
    ("AL", "kernel.AL.maxKsumSigma", 0, "maxKsumSigma = 0.0: must be > 0"),
    ("AL", "kernel.AL.maxConditionNumber", 1, "maxConditionNumber = 1.0: must be finite and > 1"),
    ("AL", "kernel.AL.maxConditionNumber", -5, "maxConditionNumber = -5.0: must be finite"),
    ("AL", "kernel.AL.maxConditionNumber", math.inf, "maxConditionNumber = inf: must be finite"),
    ("DF", "kernel.DF.maxConditionNumber", math.inf, "set checkConditionNumber = False"),
    ("AL", "kernel.AL.maxSpatialConditionNumber", math.inf, "maxSpatialConditionNumber = inf"),
    ("AL", "kernel.AL.alardGaussBeta", 1.0, "alardGaussBeta = 1.0: must be > 1"),
    ("AL", "kernel.AL.alardGaussBeta", 0.5, "alardGaussBeta = 0.5: must be > 1"),
    ("AL", "kernel.AL.alardSigGauss", [1.5, 0.7, 1.5], "alardSigGauss = (1.5, 0.7, 1.5): sigmas"),
    ("AL", "kernel.AL.badMaskPlanes", ["SAT", "SAT "], "badMaskPlanes = ('SAT', 'SAT '): 'SAT '"),
    ("DF", "kernel.DF.badMaskPlanes", ["NO_DATA", ""], "'' is not a mask plane name"),
    ("AL", "kernel.AL.detectionConfig.badMaskPlanes", ["NO DATA"], "'NO DATA' is not a mask"),
    ("AL", "kernel.AL.warpingConfig.growFullMask", [" EDGE"], "warpingConfig.growFullMask = "),
    ("AL", "kernel.AL.afwBackgroundConfig.ignoredPixelMask", [""], "ignoredPixelMask = ('',)"),
    ("DF", "kernel.DF.maxSpatialConditionNumber", 0.5, "maxSpatialConditionNumber = 0.5"),
    ("AL", "kernel.AL.fwhmExposureGrid", 0, "fwhmExposureGrid = 0: must be >= 1"),
    ("AL", "kernel.AL.fwhmExposureBuffer", 0.5, "fwhmExposureBuffer = 0.5: must satisfy"),
    ("AL", "kernel.AL.fwhmExposureBuffer", -0.1, "fwhmExposureBuffer = -0.1"),
    ("AL", "kernel.AL.kernelBasisSet", "delta-function", "kernel.AL.kernelBasisSet = 'delta-"),
    ("DF", "kernel.DF.kernelBasisSet", "alardlupton", "kernel.DF.kernelBasisSet = 'alard-"),
    ("DF", "kernel.DF.lambdaMin", 2.0, "lambdaMin = 2.0: must be < lambdaMax (2.0)"),
    ("DF", "kernel.DF.lambdaStep", 0, "lambdaStep = 0.0: must be > 0"),
    ("DF", "kernel.DF.lambdaScaling", 0, "lambdaScaling = 0.0: must be > 0"),
    ("DF", "kernel.DF.lambdaValue", -0.1, "lambdaValue = -0.1: must be >= 0"),
    ("DF", "kernel.DF.forwardRegularizationOrders", [], "forwardRegularizationOrders = ()"),
    ("DF", "kernel.DF.forwardRegularizationOrders", [1, 4], "orders must be in 0..3"),
    ("DF", "kernel.DF.forwardRegularizationOrders", [-1], "orders must be in 0..3"),
    ("DF", "kernel.DF.forwardRegularizationOrders", [2, 2], "orders must not repeat"),
    ("DF", "kernel.DF.regularizationBorderPenalty", -1, "regularizationBorderPenalty = -1.0"),
    ("AL", "kernel.AL.detectionConfig.detThreshold", 0, "detectionConfig.detThreshold = 0.0"),
    ("AL", "kernel.AL.detectionConfig.fpGrowMax", 10, "fpGrowMax = 10: must be >= fpGrowMin"),
    ("AL", "kernel.AL.detectionConfig.fpNpixMax", 4, "fpNpixMax = 4: must be >= fpNpixMin"),
    ("AL", "kernel.AL.detectionConfig.fpGrowKernelScaling", -1, "fpGrowKernelScaling = -1.0"),
    ("DF", "kernel.DF.afwBackgroundConfig.filterSize", 4, "filterSize = 4: must be odd"),
    ("DF", "kernel.DF.afwBackgroundConfig.binSize", 0, "binSize = 0: must be >= 1"),
    ("AL", "selectDetection.thresholdValue", 0, "selectDetection.thresholdValue = 0.0"),
    ("AL", "selectDetection.maxSources", 0, "selectDetection.maxSources = 0: must be > 0"),
    ("AL", "selectDetection.minArea", 0, "selectDetection.minArea = 0"),
    ("AL", "selectDetection.deblendContrast", 1.5, "deblendContrast = 1.5: must be in [0, 1]"),
    ("AL", "selectMeasurement.maxEllipticity", 1.2, "maxEllipticity = 1.2: must be in [0, 1]"),
    ("AL", "selectMeasurement.apertureRadius", 0, "apertureRadius = 0.0: must be > 0"),
    ("AL", "selectMeasurement.minSnr", -1, "minSnr = -1.0: must be >= 0"),
    ("AL", "selectMeasurement.isolationRadius", -1, "isolationRadius = -1.0: must be >= 0"),
    ("AL", "selectMeasurement.saturationFraction", 0, "saturationFraction = 0.0"),
]


@pytest.mark.parametrize(("kernel", "path", "value", "fragment"), INVALID)
def test_validate_rules(kernel: str, path: str, value: object, fragment: str) -> None:
    config = MakeKernelConfig()
    config.kernel.name = kernel
    config.validate()  # the defaults pass
    config.set(path, value)  # assignment accepts a well-typed value
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        config.validate()
    assert str(info.value).startswith("invalid config ")
    assert path.rsplit(".", 1)[-1] in str(info.value)


def test_use_bic_with_delta_function_requires_pca() -> None:
    config = MakeKernelConfig()
    config.kernel.name = "DF"
    config.kernel.DF.useBicForKernelBasis = True
    config.validate()  # PCA is on by default for DF
    config.kernel.DF.usePcaForSpatialKernel = False
    with pytest.raises(ConfigError, match="requires usePcaForSpatialKernel = True"):
        config.validate()
    # The Alard-Lupton basis has no such requirement.
    config.kernel.name = "AL"
    config.kernel.AL.useBicForKernelBasis = True
    config.kernel.AL.usePcaForSpatialKernel = False
    config.validate()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("kernel.active.nStarPerCell", -1),
        ("kernel.active.spatialKernelOrder", 0),
        ("kernel.active.spatialKernelOrder", 6),
        ("kernel.active.fwhmExposureBuffer", 0.0),
        ("kernel.active.maxSpatialIterations", 5),
        ("kernel.active.kernelSize", 3),
        ("kernel.DF.forwardRegularizationOrders", [0, 3]),
        ("kernel.active.detectionConfig.fpGrowKernelScaling", 0.0),
        ("selectMeasurement.maxEllipticity", 1.0),
    ],
)
def test_validate_accepts_edge_values(path: str, value: object) -> None:
    config = MakeKernelConfig()
    config.set(path, value)
    config.validate()
    config.kernel.name = "DF"
    config.set(path, value)
    config.validate()


def test_validate_checks_only_the_active_kernel() -> None:
    config = MakeKernelConfig()
    config.kernel.DF.lambdaStep = 0.0
    config.kernel.DF.kernelSize = 4
    config.validate()  # AL is active: the DF settings are not used
    config.kernel.name = "DF"
    with pytest.raises(ConfigError, match=r"kernel\.DF\.kernelSize = 4"):
        config.validate()
    config.kernel.AL.kernelSize = 4
    config.kernel.DF.kernelSize = 21
    with pytest.raises(ConfigError, match=r"kernel\.DF\.lambdaStep = 0\.0"):
        config.validate()


def test_validate_rechecks_choices() -> None:
    config = MakeKernelConfig()
    # Bypass assignment checks, as a buggy caller writing the instance dict would.
    config.kernel.AL.__dict__["spatialModelType"] = "legendre"
    with pytest.raises(ConfigError, match=r"kernel\.AL\.spatialModelType must be one of"):
        config.validate()


def test_validate_on_a_single_kernel_config() -> None:
    config = PsfMatchConfigAL(kernelSize=20)
    with pytest.raises(ConfigError, match=r"^invalid config kernelSize = 20"):
        config.validate()


# ---------------------------------------------------------------------------------------
# Conversion, dotted paths
# ---------------------------------------------------------------------------------------


def _modified() -> MakeKernelConfig:
    config = MakeKernelConfig()
    config.kernel.name = "DF"
    config.kernel.AL.alardSigGauss = (0.8, 1.6, 3.2)
    config.kernel.AL.spatialKernelOrder = 1
    config.kernel.DF.lambdaType = "minimizeBiasedRisk"
    config.kernel.DF.forwardRegularizationOrders = (1, 2, 3)
    config.kernel.DF.warpingConfig.growFullMask = ()
    config.kernel.DF.detectionConfig.fpGrowPix = 17
    config.selectMeasurement.minSnr = 20
    return config


def test_to_dict_is_nested_plain_data() -> None:
    data = MakeKernelConfig().to_dict()
    assert set(data) == {"kernel", "selectDetection", "selectMeasurement"}
    assert set(data["kernel"]) == {"name", "AL", "DF"}
    assert data["kernel"]["name"] == "AL"
    assert data["kernel"]["AL"]["alardSigGauss"] == [0.7, 1.5, 3.0]
    assert data["kernel"]["DF"]["maxConditionNumber"] == 5.0e6
    assert data["kernel"]["DF"]["detectionConfig"]["badMaskPlanes"] == ["NO_DATA", "EDGE", "SAT"]
    assert "alardSigGauss" not in data["kernel"]["DF"]
    assert "lambdaType" not in data["kernel"]["AL"]
    assert json.loads(json.dumps(data)) == data  # nothing but plain JSON types


def test_to_dict_flat() -> None:
    flat = MakeKernelConfig().to_dict(flat=True)
    assert flat["kernel.name"] == "AL"
    assert flat["kernel.AL.kernelSize"] == 21
    assert flat["kernel.DF.warpingConfig.doAlign"] is True
    assert flat["selectDetection.maxSources"] == 2000
    assert not any(isinstance(v, dict) for v in flat.values())


def test_round_trip_nested_and_flat() -> None:
    config = _modified()
    assert MakeKernelConfig.from_dict(config.to_dict()) == config
    assert MakeKernelConfig.from_dict(config.to_dict(flat=True)) == config
    assert MakeKernelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PsfMatchConfigDF.from_dict(config.kernel.DF.to_dict()) == config.kernel.DF


def test_from_dict_dotted_keys_and_active() -> None:
    # "kernel.active" must resolve after "kernel.name", whatever the key order.
    config = MakeKernelConfig.from_dict(
        {
            "kernel.active.kernelSize": 25,
            "kernel.name": "DF",
            "kernel.AL.spatialKernelOrder": 1,
        }
    )
    assert config.kernel.name == "DF"
    assert config.kernel.DF.kernelSize == 25
    assert config.kernel.AL.kernelSize == 21
    assert config.kernel.AL.spatialKernelOrder == 1


def test_from_dict_mixed_nesting() -> None:
    config = MakeKernelConfig.from_dict(
        {
            "kernel": {"active": {"detectionConfig.fpGrowPix": 12}, "name": "DF"},
            "selectDetection": {"maxSources": 50},
            "kernel.DF.lambdaValue": 0.5,
        }
    )
    assert config.kernel.DF.detectionConfig.fpGrowPix == 12
    assert config.kernel.AL.detectionConfig.fpGrowPix == 30
    assert config.selectDetection.maxSources == 50
    assert config.kernel.DF.lambdaValue == 0.5


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (
            {"kernel": {"AL": {"kernelSze": 3}}},
            ["config key 'kernel.AL.kernelSze'", "did you mean 'kernelSize'?"],
        ),
        ({"kernel.DF.lambdaTyp": "absolute"}, ["'kernel.DF.lambdaTyp'", "'lambdaType'"]),
        ({"kernal": {"name": "DF"}}, ["config key 'kernal.name'", "did you mean 'kernel'?"]),
        ({"kernel.active.alardNGaus": 3}, ["'kernel.active.alardNGaus'", "'alardNGauss'"]),
        ({"kernel.AL.kernelSize.value": 3}, ["'kernel.AL.kernelSize' is a field of type int"]),
        ({"kernel.AL.kernelSize": "21"}, ["config key 'kernel.AL.kernelSize'", "expects int"]),
        ({"kernel": {"name": "XY"}}, ["config key 'kernel.name'", "must be one of 'AL', 'DF'"]),
        ({"kernel": {"AL": 5}}, ["config key 'kernel.AL'", "PsfMatchConfigAL instance"]),
    ],
)
def test_from_dict_errors_name_the_key(data: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        MakeKernelConfig.from_dict(data)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_from_dict_needs_a_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        MakeKernelConfig.from_dict([("kernel.name", "DF")])  # type: ignore[arg-type]


def test_set_get_update() -> None:
    config = MakeKernelConfig()
    config.set("kernel.active.kernelSize", 23)
    assert config.kernel.AL.kernelSize == 23
    assert config.get("kernel.active.kernelSize") == 23
    assert config.get("kernel.active") is config.kernel.AL
    config.update(**{"kernel.name": "DF", "kernel.active.kernelSize": 27})
    assert config.kernel.DF.kernelSize == 27
    config.update({"selectMeasurement": {"minSnr": 5}}, selectDetection={"minArea": 9})
    assert config.selectMeasurement.minSnr == 5.0
    assert config.selectDetection.minArea == 9
    # A mapping updates a sub-config in place rather than replacing it.
    det = config.kernel.DF.detectionConfig
    config.set("kernel.active.detectionConfig", {"fpGrowPix": 12})
    assert config.kernel.DF.detectionConfig is det
    assert det.fpGrowPix == 12 and det.fpGrowMin == 20
    # A config instance replaces the sub-config.
    new = DetectionConfig(fpGrowPix=15)
    config.set("kernel.AL.detectionConfig", new)
    assert config.kernel.AL.detectionConfig is new


def test_update_is_all_or_nothing() -> None:
    config = MakeKernelConfig()
    before = config.copy()
    with pytest.raises(ConfigError, match="kernel.AL.kernelSze"):
        config.update(
            {"kernel.name": "DF", "kernel.AL.spatialBgOrder": 2, "kernel.AL.kernelSze": 3}
        )
    assert config == before


def test_equality_copy_repr_pickle() -> None:
    config = _modified()
    clone = config.copy()
    assert clone == config and clone is not config
    assert clone.kernel.DF is not config.kernel.DF
    clone.kernel.DF.detectionConfig.fpGrowPix = 18
    assert config.kernel.DF.detectionConfig.fpGrowPix == 17
    assert clone != config
    assert MakeKernelConfig() == MakeKernelConfig()
    assert PsfMatchConfigAL() != PsfMatchConfigDF()
    assert MakeKernelConfig() != {"kernel": {}}
    with pytest.raises(TypeError):
        hash(config)
    assert pickle.loads(pickle.dumps(config)) == config
    assert repr(PsfMatchConfigAL(kernelSize=25)) == "PsfMatchConfigAL(kernelSize=25)"
    assert repr(MakeKernelConfig()) == "MakeKernelConfig()"
    assert "name='DF'" in repr(config)


@settings(deadline=None)  # no timing: a loaded machine must not fail it
@given(
    kernel_size=st.integers(min_value=-(10**6), max_value=10**6),
    sigmas=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5),
    name=st.sampled_from(["AL", "DF"]),
)
def test_round_trip_property(kernel_size: int, sigmas: list[float], name: str) -> None:
    config = MakeKernelConfig()
    config.update(
        {
            "kernel.name": name,
            "kernel.active.kernelSize": kernel_size,
            "kernel.AL.alardSigGauss": sigmas,
        }
    )
    back = MakeKernelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert back.kernel.active.kernelSize == kernel_size


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

TOML_TEXT = """
[kernel]
name = "DF"

[kernel.DF]
kernelSize = 25
lambdaType = "relative"
forwardRegularizationOrders = [1, 3]

[kernel.DF.detectionConfig]
fpGrowPix = 15

[kernel.AL]
alardSigGauss = [1, 2, 4]

[selectMeasurement]
minSnr = 15
"""


def test_from_file_toml(tmp_path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(TOML_TEXT)
    config = MakeKernelConfig.from_file(path)
    assert config.kernel.name == "DF"
    assert config.kernel.active.kernelSize == 25
    assert config.kernel.DF.lambdaType == "relative"
    assert config.kernel.DF.forwardRegularizationOrders == (1, 3)
    assert config.kernel.DF.detectionConfig.fpGrowPix == 15
    assert config.kernel.AL.alardSigGauss == (1.0, 2.0, 4.0)
    assert config.selectMeasurement.minSnr == 15.0
    assert config.kernel.DF.spatialKernelOrder == 2  # untouched fields keep defaults
    config.validate()


def test_from_file_json_with_dotted_keys(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kernel.name": "DF", "kernel.active.kernelSize": 25}))
    config = MakeKernelConfig.from_file(str(path))
    assert config.kernel.DF.kernelSize == 25


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        (
            "bad.toml",
            "[kernel.AL]\nkernelSze = 25\n",
            ["bad.toml", "'kernel.AL.kernelSze'", "did you mean 'kernelSize'?"],
        ),
        (
            "bad.toml",
            '[kernel.AL]\nkernelSize = "25"\n',
            ["bad.toml", "'kernel.AL.kernelSize'", "expects int, got '25' (str)"],
        ),
        (
            "bad.json",
            '{"kernel": {"DF": {"useRegularization": 1}}}',
            ["bad.json", "'kernel.DF.useRegularization'", "expects bool, got 1 (int)"],
        ),
        (
            "bad.json",
            '{"selectDetection": {"maxSource": 10}}',
            ["bad.json", "'selectDetection.maxSource'", "did you mean 'maxSources'?"],
        ),
        ("bad.json", "{not json", ["bad.json", "is not valid JSON"]),
        ("bad.toml", "[kernel\n", ["bad.toml", "is not valid TOML"]),
        ("bad.json", "[1, 2]", ["bad.json", "must hold a table of fields, got list"]),
        ("bad.yaml", "kernel: {}", ["bad.yaml", "unknown format '.yaml'"]),
    ],
)
def test_from_file_errors(tmp_path, name: str, text: str, fragments: list[str]) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        MakeKernelConfig.from_file(path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_from_file_missing(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        MakeKernelConfig.from_file(tmp_path / "absent.toml")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_to_file_round_trip(tmp_path, suffix: str) -> None:
    config = _modified()
    config.kernel.AL.maxSpatialConditionNumber = float("inf")
    config.kernel.DF.lambdaScaling = 1e-05
    path = tmp_path / f"out{suffix}"
    config.to_file(path)
    if suffix == ".toml":
        data = tomllib.loads(path.read_text())
    else:
        data = json.loads(path.read_text())
    assert data["kernel"]["name"] == "DF"
    assert MakeKernelConfig.from_file(path) == config


def test_to_file_unknown_extension(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown format '.ini'"):
        MakeKernelConfig().to_file(tmp_path / "out.ini")


# ---------------------------------------------------------------------------------------
# describe()
# ---------------------------------------------------------------------------------------


def test_describe_lists_every_field_with_value_and_doc() -> None:
    config = _modified()
    text = config.describe()
    for path, value in config.to_dict(flat=True).items():
        shown = repr(tuple(value)) if isinstance(value, list) else repr(value)
        assert f"{path} = {shown}  [" in text, path
    # Sub-config headers and doc strings are there too.
    assert "kernel.DF.detectionConfig: DetectionConfig" in text
    assert "kernel.DF.maxConditionNumber = 5000000.0  [float]" in text
    assert "kernel.name = 'DF'  [str]" in text
    for cls in (PsfMatchConfigAL, PsfMatchConfigDF, SelectMeasurementConfig):
        for field in cls.fields().values():
            first_words = " ".join(field.doc.split()[:4])
            assert first_words in " ".join(text.split()), first_words
    # Choices are listed with their meaning.
    assert "'minimizeUnbiasedRisk':" in text
    assert "'chebyshev1': Chebyshev polynomials of the first kind" in text


def test_describe_of_a_sub_config_has_no_prefix() -> None:
    text = DetectionConfig().describe()
    assert text.startswith("detThreshold = 10.0  [float]")
