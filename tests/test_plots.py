"""The quality page: four panels, the verdict in its title, and old stores still plot.

A 384^2 raw pair (the frames keep different skies) fitted in memory: the subtraction
defaults warn (right, but too few stars to verify the kernel sum), the specification's
defaults (no fitted background) fail. Seed 1 gives both verdicts with GOOD and BAD
candidates, so that every panel has data.
"""

from __future__ import annotations

import dataclasses

import matplotlib
import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.io.zarr import ZarrImage, write_image
from diffkernel.io.zarr.results import ResultStore
from diffkernel.plots import plot_quality, write_plots
from diffkernel.simulate import make_pair

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIGS = {"warn": MakeKernelConfig.default_subtraction, "fail": MakeKernelConfig}


@pytest.fixture(scope="module")
def pair():
    return make_pair(
        (384, 384), seed=1, flux_scale=0.9, background=(400.0, 2.0, -3.0), template_depth=4
    )


def _fit(pair, verdict):
    """(verdict, MakeKernelResult after subtraction, difference) of the config giving it."""
    result = MakeKernelTask(CONFIGS[verdict]()).run(pair.template, pair.science)
    difference = subtract_images(pair.template, pair.science, result)
    assert result.quality["verdict"] == verdict
    return verdict, result, difference


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fitted(request, pair):
    return _fit(pair, request.param)


@pytest.fixture(scope="module")
def failed(pair):
    return _fit(pair, "fail")


def _page(result, shape):
    kcfg = result.config.kernel.active
    return plot_quality(
        result.quality,
        result.candidates,
        result.spatialSolution,
        shape,
        z_histograms=result.differenceHistograms,
        cell_size=(kcfg.sizeCellX, kcfg.sizeCellY),
    )


def _panels(fig):
    """The figure's axes other than colour bars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts) + " ".join(
        t.get_text() for t in fig.texts
    )


def test_quality_page_has_four_panels_and_the_verdict(fitted):
    verdict, result, difference = fitted
    fig = _page(result, difference.image.shape)
    try:
        panels = _panels(fig)
        assert len(panels) == 4
        assert all(ax.has_data() for ax in panels)
        assert verdict.upper() in fig._suptitle.get_text()
        # A failed verdict names its cause on the page, not only in the store.
        words = " ".join(_texts(fig).split())  # the reasons are wrapped
        for reason in result.quality["reasons"]:
            assert " ".join(reason.split()) in words
        if verdict == "fail":
            assert "fitForBackground" in _texts(fig)
        assert not any("no difference statistics" in t for t in _texts(fig).split("\n"))
    finally:
        plt.close(fig)


def test_write_plots_writes_the_quality_page_also_for_old_stores(failed, tmp_path):
    """quality.png for a store with a verdict and histograms, and for one with neither.

    One verdict only: write_plots draws every debug display (seconds each time).
    """
    verdict, result, difference = failed
    path = tmp_path / "result.zarr"
    write_image(path, difference, group="difference")
    store = ResultStore(
        path=path,
        difference=ZarrImage.open(path, "difference"),
        solution=result.spatialSolution,
        candidates=result.candidates,
        config=result.config.to_dict(),
        quality=result.quality,
        z_histograms=result.differenceHistograms,
    )
    old = dataclasses.replace(store, quality={}, z_histograms=None)
    for name, which in (("new", store), ("old", old)):
        written = write_plots(which, tmp_path / name, max_side=64)
        quality_png = tmp_path / name / "quality.png"
        assert quality_png in written
        assert quality_png.stat().st_size > 20000  # four panels, not a blank page

    fig = plot_quality({}, old.candidates, old.solution, difference.image.shape)
    try:
        assert "NOT ASSESSED" in fig._suptitle.get_text()
        assert len(_panels(fig)) == 4
        assert "no difference statistics" in _texts(fig)
        # The fit's panels are drawn from the table and the solution alone.
        assert sum(ax.has_data() for ax in _panels(fig)) == 3
    finally:
        plt.close(fig)


def test_empty_panels_say_why(failed):
    """No GOOD candidate and no rejection: those panels say so instead of staying blank."""
    verdict, result, difference = failed
    table = result.candidates.copy()
    table["status"] = np.full(len(table), "UNUSED")
    table["reason"] = np.full(len(table), "")
    fig = plot_quality(result.quality, table, result.spatialSolution, difference.image.shape)
    try:
        text = _texts(fig)
        assert "no GOOD candidate" in text and "no candidate was rejected" in text
    finally:
        plt.close(fig)
