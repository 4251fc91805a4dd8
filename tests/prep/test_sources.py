"""Tests of diffkernel.prep.sources: detection of kernel candidates with sep."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from diffkernel.config import SelectDetectionConfig, SelectMeasurementConfig
from diffkernel.errors import NoCandidatesError
from diffkernel.image import MaskedImage
from diffkernel.prep.sources import detect_sources
from diffkernel.simulate import make_pair

ISOLATION = 15.0


@pytest.fixture(scope="module")
def pair():
    return make_pair((256, 256), seed=8, n_stars=30, flux_range=(3e3, 2e5))


def detect(mi, **det):
    return detect_sources(
        mi, SelectDetectionConfig(**det), SelectMeasurementConfig(), ("SAT", "NO_DATA"), ISOLATION
    )


def test_detect_sources_finds_bright_isolated_stars(pair):
    """Most bright, isolated stars are found, at their true positions, brightest first."""
    table = detect(pair.template.masked_image)
    assert table.colnames == ["id", "x", "y", "flux"]
    np.testing.assert_array_equal(table["id"], np.arange(len(table)))
    assert np.all(np.diff(table["flux"]) <= 0)
    src = pair.truth.sources
    truth_xy = np.column_stack([src["x"], src["y"]])
    # Every detection is a real star (within half a pixel).
    dist, _ = cKDTree(truth_xy).query(np.column_stack([table["x"], table["y"]]))
    assert dist.max() < 0.5
    # Bright stars without a neighbour inside the isolation radius are found.
    tree = cKDTree(truth_xy)
    isolated = np.array([len(tree.query_ball_point(p, ISOLATION)) == 1 for p in truth_xy])
    wanted = isolated & (np.asarray(src["flux_template"]) > 1e4)
    assert wanted.sum() >= 5
    found, _ = cKDTree(np.column_stack([table["x"], table["y"]])).query(truth_xy[wanted])
    assert np.mean(found < 0.5) >= 0.9


def test_detect_sources_max_sources(pair):
    """maxSources keeps only the brightest detections."""
    full = detect(pair.template.masked_image)
    top = detect(pair.template.masked_image, maxSources=3)
    assert len(top) == 3
    np.testing.assert_allclose(top["flux"], full["flux"][:3])


def test_detect_sources_blank_image_raises():
    """Pure noise has nothing above 5 sigma: NoCandidatesError with a hint."""
    rng = np.random.default_rng(80)
    blank = MaskedImage.from_image(1000.0 + rng.normal(0.0, 5.0, (128, 128)), variance=25.0)
    with pytest.raises(NoCandidatesError, match="no sources found above 5.0 sigma"):
        detect(blank)


def test_detect_sources_close_pair_is_dropped():
    """Two comparable stars closer than the isolation radius are both dropped."""
    rng = np.random.default_rng(81)
    yy, xx = np.mgrid[0:96, 0:96]
    image = 100.0 + rng.normal(0.0, 1.0, (96, 96))
    for x0, y0 in ((30.0, 30.0), (38.0, 30.0), (70.0, 70.0)):
        image += 2000.0 * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 1.3**2)
    table = detect(MaskedImage.from_image(image, variance=1.0))
    assert len(table) == 1
    assert table["x"][0] == pytest.approx(70.0, abs=0.1)
    assert table["y"][0] == pytest.approx(70.0, abs=0.1)


def test_footprint_rules_of_detection_config(pair):
    """detThreshold (each type) and fpNpixMin/Max remove sources; saturationFraction drops
    stars near a known saturation level."""
    from diffkernel.config import DetectionConfig

    mi = pair.template.masked_image
    base = detect(mi)
    loose = DetectionConfig(detThreshold=1.0, detThresholdType="pixel_stdev")
    found = detect_sources(
        mi, SelectDetectionConfig(), SelectMeasurementConfig(), ("SAT", "NO_DATA"), ISOLATION, loose
    )
    assert len(found) == len(base)
    for kind, value in (
        ("value", 500.0),
        ("stdev", 25.0),
        ("variance", 1.0),
        ("pixel_stdev", 15.0),
    ):
        strict = DetectionConfig(detThreshold=value, detThresholdType=kind)
        kept = detect_sources(
            mi,
            SelectDetectionConfig(),
            SelectMeasurementConfig(),
            ("SAT", "NO_DATA"),
            ISOLATION,
            strict,
        )
        assert 0 < len(kept) < len(base), kind
        assert kept["flux"].min() >= np.median(base["flux"]) * 0.1
    tiny = DetectionConfig(fpNpixMax=6)
    with pytest.raises(NoCandidatesError):
        detect_sources(
            mi,
            SelectDetectionConfig(),
            SelectMeasurementConfig(),
            ("SAT", "NO_DATA"),
            ISOLATION,
            tiny,
        )
    peaks = mi.image[np.rint(base["y"]).astype(int), np.rint(base["x"]).astype(int)]
    level = float(np.median(peaks)) / 0.9  # saturationFraction 0.9: about half are too bright
    capped = detect_sources(
        mi,
        SelectDetectionConfig(),
        SelectMeasurementConfig(),
        ("SAT", "NO_DATA"),
        ISOLATION,
        None,
        saturation=level,
    )
    assert len(capped) < len(base)
