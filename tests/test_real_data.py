"""The whole front end on real pairs, and on a simulated pair given as misaligned Exposures.

Real data (``shared/data/real``, see the README in each folder): DECam i-band cutouts,
2018 frames as science against the sharper 2016 frames as template, frame by frame
(plain FITS with GAIN and saturation keywords, one pixel grid), and two consecutive
ESO 085-030 frames (uint16, no WCS, no variance, no gain: a null pair). Each goes in
as FITS files with no source list: variance model, masks, detection, selection, FWHM
measurement, fit and subtraction. The difference's sky pixels, in units of their own
propagated sigma, must have a robust standard deviation in [0.7, 1.3] and a median
within 0.2 of zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.image import Exposure
from diffkernel.io.fits import read_exposure
from diffkernel.simulate import make_pair


def _real_data() -> Path | None:
    candidates = [
        os.environ.get("DIFFKERNEL_REAL_DATA"),
        Path(__file__).resolve().parents[2] / "shared" / "data" / "real",
        "/work/shared/data/real",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


REAL = _real_data()
needs_real = pytest.mark.skipif(REAL is None, reason="shared/data/real not available")


def sky_stats(diff) -> tuple[float, float]:
    """Median and MAD-based standard deviation of difference / sigma on clean pixels."""
    z = diff.image / np.sqrt(diff.variance)
    clean = np.isfinite(z) & (diff.mask == 0)
    median = float(np.median(z[clean]))
    return median, float(1.4826 * np.median(np.abs(z[clean] - median)))


def small_field_config() -> MakeKernelConfig:
    """A 256x256 cutout holds a handful of stars: a constant kernel and background."""
    cfg = MakeKernelConfig()
    kcfg = cfg.kernel.active
    kcfg.spatialKernelOrder = 0
    kcfg.spatialBgOrder = 0
    kcfg.fitForBackground = True
    return cfg


@needs_real
@pytest.mark.parametrize("frame", ["a", "b", "c"])
def test_decam_frame_pairs(frame):
    """DECam 2018 frame minus 2016 frame, from FITS files, sources detected."""
    folder = REAL / "decam-sfft-mini"
    science = read_exposure(folder / f"DEC-OBS04{frame}.mini.fits")
    template = read_exposure(folder / f"DEC-OBS18{frame}.mini.fits")
    result = MakeKernelTask(small_field_config()).run(template, science, mode="auto")
    assert result.metadata["detected_sources"] >= 3
    assert result.metadata["n_good"] >= 3
    # The 2016 epoch is sharper (header FWHM 3.6-4.2 px against 4.1-5.9 px).
    assert result.metadata["template_fwhm"] < result.metadata["science_fwhm"]
    assert result.mode == "convolveTemplate"
    assert 0.9 < result.psfMatchingKernel.sum_at(128, 128) < 1.1
    median, robust_std = sky_stats(subtract_images(template, science, result))
    assert abs(median) < 0.2
    assert 0.7 < robust_std < 1.3
    # A constant kernel leaves the brightest stars of frames b and c at 1.3-3.5 sigma
    # (robust std on their cores), which the footprint check rightly warns of; the
    # subtraction defaults (a kernel of order 1) pass on every frame (below).
    assert result.quality["verdict"] != "fail", result.quality["reasons"]


@needs_real
def test_eso_null_pair():
    """Two consecutive 60 s frames (uint16, no gain, no WCS): pure noise, kernel sum ~ 1."""
    folder = REAL / "properimage-eso085"
    template = read_exposure(folder / "aligned_eso085-030-004.fit")
    science = read_exposure(folder / "aligned_eso085-030-005.fit")
    assert template.wcs is None
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    cfg.kernel.active.spatialKernelOrder = 1
    result = MakeKernelTask(cfg).run(template, science)
    assert result.metadata["n_good"] >= 20
    assert result.psfMatchingKernel.sum_at(512, 341) == pytest.approx(1.0, abs=0.03)
    median, robust_std = sky_stats(subtract_images(template, science, result))
    assert abs(median) < 0.2
    assert 0.7 < robust_std < 1.3
    assert result.quality["verdict"] == "pass", result.quality["reasons"]


@needs_real
@pytest.mark.parametrize("frame", ["a", "b", "c", "d", "e"])
def test_decam_pairs_pass_with_the_subtraction_defaults(frame):
    """What ``diffkernel subtract`` does with no config: no false alarm on real pairs.

    The frames hold their sky (~1.1e4 ADU), and the stars' own flux ratio agrees with
    the fitted kernel sum to 3%.
    """
    folder = REAL / "decam-sfft-mini"
    science = read_exposure(folder / f"DEC-OBS04{frame}.mini.fits")
    template = read_exposure(folder / f"DEC-OBS18{frame}.mini.fits")
    result = MakeKernelTask(MakeKernelConfig.default_subtraction()).run(
        template, science, mode="auto"
    )
    subtract_images(template, science, result)
    assert result.quality["verdict"] == "pass", result.quality["reasons"]
    assert abs(result.quality["metrics"]["photometric_scale"]["kernel_sum_offset"]) < 0.03


@needs_real
def test_eso_pair_with_the_subtraction_defaults():
    folder = REAL / "properimage-eso085"
    template = read_exposure(folder / "aligned_eso085-030-004.fit")
    science = read_exposure(folder / "aligned_eso085-030-005.fit")
    result = MakeKernelTask(MakeKernelConfig.default_subtraction()).run(template, science)
    subtract_images(template, science, result)
    assert result.quality["verdict"] == "pass", result.quality["reasons"]
    assert result.psfMatchingKernel.sum_at(512, 341) == pytest.approx(1.0, abs=0.01)


def test_misaligned_exposures_without_sources():
    """A template on a grid shifted by a few pixels and rotated 0.5 degree, no source
    list: warped, detected, fitted and subtracted to the engine's statistical thresholds."""
    from diffkernel.config import WarpingConfig
    from diffkernel.prep.align import warp_exposure

    sim = make_pair((512, 512), seed=29, template_depth=4, wcs=True)
    science = sim.science
    # The template as a camera on another pointing would have recorded it: resampled
    # onto a grid shifted by (3.4, -2.7) pixels and rotated by 0.5 degree. The science
    # image keeps its honest noise; the deep template's noise is a small part of the
    # difference's, so resampling it twice (here and in the task) matters little.
    moved_wcs = sim.template.wcs.deepcopy()
    theta = np.deg2rad(0.5)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved_wcs.wcs.pc = rot @ moved_wcs.wcs.get_pc()
    moved_wcs.wcs.crpix = moved_wcs.wcs.crpix + np.array([3.4, -2.7])
    config = WarpingConfig()
    config.warpingKernelName = "bicubic"
    moved = warp_exposure(sim.template, Exposure(sim.template.masked_image, moved_wcs), config)
    template = Exposure(moved.masked_image, moved_wcs, sim.template.psf_fwhm)
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    cfg.kernel.active.spatialKernelOrder = 1
    cfg.kernel.active.warpingConfig.warpingKernelName = "bicubic"
    result = MakeKernelTask(cfg).run(template, science)
    assert result.metadata["aligned"]
    assert result.metadata["n_good"] >= 10
    # The same pair given aligned, with the same front end: the misalignment must cost
    # little (~20 stars at this size set the precision of both, ~2%).
    aligned = MakeKernelTask(cfg).run(sim.template, science)
    assert not aligned.metadata["aligned"]
    assert result.psfMatchingKernel.sum_at(256, 256) == pytest.approx(
        aligned.psfMatchingKernel.sum_at(256, 256), abs=0.01
    )
    assert result.psfMatchingKernel.sum_at(256, 256) == pytest.approx(
        sim.truth.kernel_sum_at(256, 256), abs=0.03
    )
    for fitted, tmpl in ((result, template), (aligned, sim.template)):
        median, robust_std = sky_stats(subtract_images(tmpl, science, fitted))
        print(median, robust_std, fitted.psfMatchingKernel.sum_at(256, 256))
        assert abs(median) < 0.1
        assert 0.9 < robust_std < 1.1
