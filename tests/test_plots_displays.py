"""The debug displays: what each figure draws, that no text hides another, and no pyplot.

One 256^2 simulated pair, fitted in memory and stored as a result store with its
inputs, serves every test. Figures are drawn (not written) and inspected: marker
colours by status, every coefficient's panel, the candidates' refits against the run's
own numbers, the mask overlay, and the boxes of every text after a draw.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import _pylab_helpers
from matplotlib.colors import to_rgba

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.io.zarr import ZarrImage, write_image
from diffkernel.io.zarr.results import ResultStore
from diffkernel.plots import (
    figure_makers,
    fit_candidates,
    plot_candidate_stamps,
    plot_candidates,
    plot_images,
    plot_kernel_mosaic,
    plot_spatial_coefficients,
)
from diffkernel.plots.render import (
    STATUS_COLOURS,
    block_mean,
    block_or,
    sky_norm,
    texts_overlap,
    tick_labels,
)
from diffkernel.simulate import make_pair

RED, GREEN, BLUE = (to_rgba(STATUS_COLOURS[s]) for s in ("BAD", "GOOD", "UNUSED"))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(result store, template, science) of a fitted 256^2 pair."""
    work = tmp_path_factory.mktemp("plots")
    # Bright stars, two saturated (SAT pixels to overlay), two variable (a kernel sum
    # outlier): GOOD candidates, and BAD ones rejected at vetting and in the fit.
    pair = make_pair((256, 256), seed=2, n_stars=60, flux_scale=0.9, flux_range=(3000.0, 2e5),
                     background=(400.0, 2.0, -3.0), saturation=60000.0, n_saturated=2,
                     n_variable=2)  # fmt: skip
    config = MakeKernelConfig.default_subtraction()
    config.kernel.active.sizeCellX = config.kernel.active.sizeCellY = 64
    fitted = MakeKernelTask(config).run(pair.template, pair.science)
    difference = subtract_images(pair.template, pair.science, fitted)
    write_image(work / "result.zarr", difference, group="difference")
    write_image(work / "pair.zarr", pair.template, group="template")
    write_image(work / "pair.zarr", pair.science, group="science")
    store = ResultStore(
        path=work / "result.zarr",
        difference=ZarrImage.open(work / "result.zarr", "difference"),
        solution=fitted.spatialSolution,
        candidates=fitted.candidates,
        config=fitted.config.to_dict(),
        quality=fitted.quality,
        z_histograms=fitted.differenceHistograms,
        metadata=dict(fitted.metadata),
    )
    status = np.asarray(store.candidates["status"]).astype(str)
    fit_rejected = (status == "BAD") & np.isfinite(np.asarray(store.candidates["kernel_sum"]))
    assert (status == "GOOD").sum() >= 5 and fit_rejected.any()
    return store, ZarrImage.open(work / "pair.zarr", "template"), ZarrImage.open(
        work / "pair.zarr", "science"
    )


@pytest.fixture(scope="module")
def fits(stored):
    return fit_candidates(*stored)


def _close(fig):
    fig.clear()


def test_the_refits_are_the_runs_own_fits(stored, fits):
    """Each candidate's refit gives the kernel sum and background the run recorded."""
    store, _, _ = stored
    assert fits is not None and len(fits.table) == fits.n_fitted
    assert fits.coeffs.shape == (len(fits.table), store.solution.basis.size)
    np.testing.assert_allclose(
        fits.coeffs @ store.solution.basis.sums, fits.table["kernel_sum"], rtol=1e-6
    )
    np.testing.assert_allclose(fits.background, fits.table["background"], rtol=1e-5, atol=1e-6)
    # Residuals in sigma: a GOOD candidate's own kernel leaves noise.
    good = np.asarray(fits.table["status"]) == "GOOD"
    rms = np.sqrt(np.nanmean(fits.own_residual[good] ** 2, axis=(1, 2)))
    assert np.all((rms > 0.7) & (rms < 1.5))


def test_refits_follow_the_direction_of_convolution(stored, tmp_path):
    """convolveScience: the science is convolved; the refits are still the run's fits, and
    the own-kernel residual has the difference's sign."""
    store, template, science = stored
    # The sharp image as the science: it is the one convolved.
    sharp, broad = template.to_exposure(), science.to_exposure()
    config = MakeKernelConfig.default_subtraction()
    config.kernel.active.sizeCellX = config.kernel.active.sizeCellY = 64
    fitted = MakeKernelTask(config).run(broad, sharp, mode="convolveScience")
    difference = subtract_images(broad, sharp, fitted)
    write_image(tmp_path / "r.zarr", difference, group="difference")
    swapped = ResultStore(
        path=tmp_path / "r.zarr",
        difference=ZarrImage.open(tmp_path / "r.zarr", "difference"),
        solution=fitted.spatialSolution,
        candidates=fitted.candidates,
        config=fitted.config.to_dict(),
        metadata=dict(fitted.metadata),
    )
    assert swapped.metadata["mode"] == "convolveScience"
    fits = fit_candidates(swapped, science, template)  # template = broad, science = sharp
    assert (fits.convolved_name, fits.target_name) == ("science", "template")
    np.testing.assert_allclose(
        fits.coeffs @ fitted.spatialSolution.basis.sums, fits.table["kernel_sum"], rtol=1e-6
    )
    good = np.asarray(fits.table["status"]) == "GOOD"
    # Own kernel and spatial model leave residuals of one sign convention: they correlate.
    own, spatial = fits.own_residual[good].ravel(), fits.spatial_residual[good].ravel()
    ok = np.isfinite(own) & np.isfinite(spatial)
    assert np.corrcoef(own[ok], spatial[ok])[0, 1] > 0.3


def test_refits_in_batches_are_the_same(stored, fits, monkeypatch):
    """A delta-function basis is refitted a few candidates at a time: same numbers."""
    from diffkernel.plots import stamps

    monkeypatch.setattr(stamps, "_BATCH_BYTES", 1.0)  # one candidate per batch
    again = fit_candidates(*stored)
    np.testing.assert_allclose(again.coeffs, fits.coeffs, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(again.own_residual, fits.own_residual, rtol=1e-9, atol=1e-9)


def test_a_delta_function_basis_draws_a_page_of_coefficients(stored):
    store, template, science = stored
    config = MakeKernelConfig.from_dict(
        {"kernel.name": "DF", "kernel.active.kernelSize": 11, "kernel.active.scaleByFwhm": False,
         "kernel.active.usePcaForSpatialKernel": False, "kernel.active.spatialKernelOrder": 0,
         "kernel.active.sizeCellX": 64, "kernel.active.sizeCellY": 64}
    )  # fmt: skip
    pair_t, pair_s = template.to_exposure(), science.to_exposure()
    fitted = MakeKernelTask(config).run(pair_t, pair_s)
    assert fitted.spatialSolution.basis.size == 121
    fig = plot_spatial_coefficients(fitted.spatialSolution, (256, 256))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum(t.startswith("coefficient ") for t in texts) == 63
    assert any("63 of 121" in t for t in texts)
    fig.canvas.draw()
    assert texts_overlap(fig) == []
    _close(fig)


@pytest.mark.parametrize(
    "name",
    ["candidates", "candidate_stamps", "basis", "kernel_mosaic", "spatial_coefficients",
     "cells", "quality", "images"],
)  # fmt: skip
def test_no_text_overlaps_another(stored, name):
    """Tick labels, titles, colour-bar labels, legends and captions stay apart."""
    makers = figure_makers(*stored)
    assert name in makers
    fig = makers[name]()
    fig.canvas.draw()
    assert texts_overlap(fig) == []
    _close(fig)


def test_the_overlap_check_sees_overlaps():
    from diffkernel.plots.backend import new_figure

    fig = new_figure(3, 3)
    fig.text(0.5, 0.5, "one label")
    fig.text(0.52, 0.5, "another label")
    fig.canvas.draw()
    assert len(texts_overlap(fig)) == 1


def test_figures_are_made_without_pyplot(stored):
    before = _pylab_helpers.Gcf.get_num_fig_managers()
    fig = figure_makers(*stored)["kernel_mosaic"]()
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"
    assert _pylab_helpers.Gcf.get_num_fig_managers() == before


def _scatter_colours(ax):
    """Label of each scatter of ``ax`` -> its edge (or face) colours."""
    out = {}
    for coll in ax.collections:
        colours = coll.get_edgecolors() if len(coll.get_edgecolors()) else coll.get_facecolors()
        out[coll.get_label()] = [tuple(c) for c in colours]
    return out


def test_candidates_are_coloured_by_status_over_the_science(stored):
    """GOOD green, every BAD reason red (low S/N included), UNUSED blue; the stars shown."""
    store, _, science = stored
    table = store.candidates.copy()
    table["status"] = table["status"].astype("U6")
    table["status"][:3] = "BAD"
    table["reason"][:3] = ["low S/N", "edge", "kernel sum outlier"]
    table["status"][3] = "UNUSED"
    image = science.read(0, 256, 0, 256).image
    fig = plot_candidates(table, (256, 256), image, backdrop="science image")
    ax = fig.axes[0]
    colours = _scatter_colours(ax)
    assert any(k.startswith("BAD: low S/N") for k in colours)
    for label, found in colours.items():
        want = {"GOOD": GREEN, "BAD": RED, "UNUSED": BLUE}[label.split()[0].rstrip(":")]
        assert found and all(c[:3] == want[:3] for c in found), label
    backdrop = ax.images[0]
    # The science image on a stretch where the sky is dark and the stars light.
    assert "science" in ax.get_title()
    norm = backdrop.norm
    assert norm(np.median(image)) < 0.5 < norm(np.percentile(image, 99.95))
    _close(fig)


def test_every_coefficient_has_a_panel_with_the_candidates_values(stored, fits):
    store, _, _ = stored
    solution = store.solution
    fig = plot_spatial_coefficients(solution, (256, 256), fits=fits)
    ax = fig.axes[0]
    titles = [t.get_text() for t in ax.texts]
    for j in range(solution.basis.size):
        assert any(t.startswith(f"coefficient {j}") for t in titles if t.split()[1:2] == [str(j)])
    assert "background" in titles
    n_panels = solution.basis.size + 1
    # One point per candidate refit and panel.
    points = sum(len(c.get_offsets()) for c in ax.collections if c.get_offsets().size > 2)
    assert points == n_panels * len(fits.table)
    _close(fig)


def test_a_constant_coefficient_gets_a_readable_scale():
    """Coefficient 0 (the conserved kernel sum) is one value: its colour bar still reads."""
    assert tick_labels([1.018, 1.019, 1.02, 1.021]) == ["1.018", "1.019", "1.020", "1.021"]
    assert tick_labels([10000.0, 10290.0]) == ["10000", "10290"]
    assert tick_labels([0.9, 1.05, 1.2]) == ["0.90", "1.05", "1.20"]
    assert tick_labels([-0.025, 0.0, 0.025]) == ["-0.025", "0.000", "0.025"]
    from diffkernel.plots.coefficients import _range

    lo, hi = _range(np.full((4, 4), 0.9666), None)
    assert lo < 0.9666 < hi


def test_the_kernel_mosaic_keeps_negative_lobes_and_has_a_colour_bar(stored):
    store, _, _ = stored
    fig = plot_kernel_mosaic(store.solution, (256, 256))
    image = fig.axes[0].images[0]
    assert image.norm.vmin == -image.norm.vmax
    assert image.colorbar is not None
    assert np.nanmin(image.get_array()) < 0  # negative lobes drawn, not clipped
    assert image.norm(np.nanmin(image.get_array())) < 0.5
    _close(fig)


def test_candidate_stamps_are_framed_by_status(stored, fits):
    from matplotlib.patches import Rectangle

    fig = plot_candidate_stamps(fits)
    ax = fig.axes[0]
    frames = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(frames) == min(len(fits.table), 30)
    status = sorted(np.asarray(fits.table["status"]).astype(str), key=lambda s: s != "BAD")
    for frame, s in zip(frames, status, strict=False):
        assert frame.get_edgecolor()[:3] == to_rgba(STATUS_COLOURS[s])[:3]
    captions = [t.get_text() for t in ax.texts]
    assert all(any(f"{i} " in c for c in captions) for i in fits.table["id"][:30])
    _close(fig)


@pytest.mark.parametrize("transparency", [0.0, 60.0, 100.0])
def test_masks_are_overlaid_with_their_transparency(transparency):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (64, 64))
    mask = np.zeros((64, 64), dtype=np.int32)
    mask[10:14, 20:30] = 1 << 1  # SAT in DEFAULT_MASK_PLANES
    fig = plot_images(image, image, image - 100, np.full((64, 64), 25.0),
                      masks=(None, mask, mask), mask_transparency=transparency)  # fmt: skip
    science_ax = fig.axes[2]
    overlay = science_ax.images[1].get_array()
    alpha = overlay[..., 3]
    assert np.allclose(alpha[mask != 0], 1 - transparency / 100)
    assert np.all(alpha[mask == 0] == 0)
    legend = science_ax.get_legend()
    assert legend is not None and legend.get_texts()[0].get_text().startswith("SAT")
    _close(fig)


def test_reductions_keep_masked_pixels_and_skip_nans():
    mask = np.zeros((10, 10), dtype=np.int32)
    mask[9, 9] = 4
    assert block_or(mask, 4)[2, 2] == 4 and block_or(mask, 4).sum() == 4
    image = np.ones((4, 4))
    image[0, 0] = np.nan
    assert np.all(block_mean(image, 2) == 1)


def test_the_stretch_shows_faint_stars_beside_saturated_ones():
    """One percent of the pixels in saturated stars must not push a 10-sigma star into the
    dark (a percentile stretch did, on a simulated pair with two saturated stars)."""
    rng = np.random.default_rng(1)
    image = rng.normal(1000.0, 10.0, (200, 200))
    image[:20, :20] = 1e6
    norm = sky_norm(image)
    assert norm(1000.0) < 0.15
    assert norm(1100.0) > 0.25
    assert norm(1e6) == 1.0


def test_stores_without_integer_centres_are_refitted(stored, fits):
    """Older stores have no x_center / y_center: the rounded positions serve."""
    import dataclasses

    store, template, science = stored
    table = store.candidates.copy()
    table.remove_columns(["x_center", "y_center"])
    older = fit_candidates(dataclasses.replace(store, candidates=table), template, science)
    assert len(older.table) == len(fits.table)
    assert np.all(np.isfinite(older.coeffs))
