"""Decorrelation and score on the cluster, and recreating a difference from a stored result."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.errors import InputError
from diffkernel.io.zarr.write import write_image
from diffkernel.kernel.decorrelate import autocorrelation
from diffkernel.pipeline.dask.apply import apply_result
from diffkernel.pipeline.dask.driver import run_pair
from diffkernel.simulate.swapped import make_swapped_pair

distributed = pytest.importorskip("distributed")

SHAPE = (288, 288)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A deep template with the worse seeing: the science image is convolved."""
    sim = make_swapped_pair(SHAPE, seed=3, template_depth=10)
    store = tmp_path_factory.mktemp("pair") / "pair.zarr"
    write_image(store, sim.template, group="template", chunks=64)
    write_image(store, sim.science, group="science", chunks=64)
    return {"sim": sim, "store": store}


def config() -> MakeKernelConfig:
    cfg = MakeKernelConfig.default_subtraction()
    cfg.kernel.active.spatialKernelOrder = 1
    cfg.kernel.active.sizeCellX = cfg.kernel.active.sizeCellY = 64
    return cfg


def run(pair, out, client, **kwargs):
    store = pair["store"]
    return run_pair(
        (store, "science"),
        (store, "template"),
        out,
        config=config(),
        client=client,
        sources=pair["sim"].truth.sources,
        mode="auto",
        **kwargs,
    )


def read_all(image):
    return image.read(0, SHAPE[0], 0, SHAPE[1])


def test_run_pair_decorrelates_by_default(pair, client, tmp_path):
    """White noise by default, the filters recorded, the score beside the difference and
    equal to the serial one; with decorrelate=False the correlation is what it was."""
    out = run(pair, tmp_path / "out.zarr", client, tile_size=128, score=True)
    result = out.result
    assert result.metadata["mode"] == "convolveScience"
    diff = read_all(result.difference)
    white = autocorrelation(diff.image, diff.variance, diff.mask)
    assert max(abs(white[k]) for k in ("x1", "y1", "x2", "y2")) <= 0.05, white
    assert 0.9 < white["robust_std"] < 1.1
    assert out.quality["verdict"] == "pass", out.quality["reasons"]
    record = result.metadata["decorrelation"]
    assert record["decorrelated"] and record["score"] and record["n_blocks"] == 1
    filters = result.filters
    assert filters.kernels.shape == (1, 1, 21, 21) and filters.decorrelate
    assert filters.kernels[0, 0].sum() == pytest.approx(1.0)
    # The same as the serial path (single-precision FFTs, float32 storage).
    sim = pair["sim"]
    serial = MakeKernelTask(config()).run(sim.template, sim.science, sim.truth.sources, mode="auto")
    mem = subtract_images(sim.template, sim.science, serial, decorrelate=True, score=True)
    finite = np.isfinite(mem.image)
    assert (np.isfinite(diff.image) == finite).all()
    np.testing.assert_array_equal(diff.mask, mem.mask)
    sigma = np.sqrt(mem.variance[finite])
    # The cluster reads float32 pixels, the serial path float64: the fits differ by what
    # that rounding moves; the subtraction defaults' regularized, noise-corrected AL fit
    # carries it 1.3 times as far as the plain fit did (1.1e-4 against 0.83e-4 sigma).
    assert np.max(np.abs(diff.image[finite] - mem.image[finite]) / sigma) < 2e-4
    score = read_all(result.score).image
    assert (np.isfinite(score) == np.isfinite(serial.scoreImage)).all()
    assert np.nanmax(np.abs(score - serial.scoreImage)) < 1e-3

    plain = run(pair, tmp_path / "plain.zarr", client, decorrelate=False)
    raw = read_all(plain.result.difference)
    correlated = autocorrelation(raw.image, raw.variance, raw.mask)
    assert correlated["x1"] > 0.1 and correlated["y1"] > 0.1, correlated
    assert plain.result.filters is None and plain.result.score is None
    assert plain.result.metadata["decorrelation"] == {"decorrelated": False, "score": False}


def test_apply_recreates_the_difference_bit_for_bit(pair, client, tmp_path):
    """apply on the same inputs gives the identical image, variance, mask and score, with
    the result's solution and verdict; a changed input is refused, naming it."""
    first = run(pair, tmp_path / "first.zarr", client, tile_size=128, score=True).result
    again = apply_result(
        first.path,
        (pair["store"], "science"),
        (pair["store"], "template"),
        tmp_path / "again.zarr",
        client=client,
    ).result
    a, b = read_all(first.difference), read_all(again.difference)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(a, plane), getattr(b, plane), err_msg=plane)
    np.testing.assert_array_equal(read_all(first.score).image, read_all(again.score).image)
    np.testing.assert_array_equal(first.solution.kernel_coeffs, again.solution.kernel_coeffs)
    assert again.quality == first.quality
    assert again.metadata["recreated"]["from"] == str(first.path)

    changed = pair["sim"].science.masked_image.image.copy()
    changed[100, 100] += 1.0
    from diffkernel.image import Exposure, MaskedImage

    mi = pair["sim"].science.masked_image
    other = tmp_path / "other.zarr"
    write_image(other, Exposure(MaskedImage(changed, mi.variance, mi.mask)), chunks=64)
    with pytest.raises(InputError, match="science image's image plane differs"):
        apply_result(
            first.path, other, (pair["store"], "template"), tmp_path / "x.zarr", client=client
        )
    assert not (tmp_path / "x.zarr").exists()


def test_apply_redoes_the_warp_and_mesh_backgrounds(client, tmp_path):
    """A result whose template was warped and whose mesh backgrounds were removed is
    recreated bit for bit: apply runs those stages again before the tiles."""
    from diffkernel.image import Exposure
    from diffkernel.simulate import make_pair

    sim = make_pair((256, 256), seed=4, template_depth=4, wcs=True)
    wcs = sim.template.wcs.deepcopy()
    wcs.wcs.crpix = [wcs.wcs.crpix[0] + 0.4, wcs.wcs.crpix[1] - 0.3]
    template = Exposure(sim.template.masked_image, wcs, sim.template.psf_fwhm)
    store = tmp_path / "in.zarr"
    write_image(store, template, group="template", chunks=64)
    write_image(store, sim.science, group="science", chunks=64)
    cfg = config()
    cfg.kernel.active.useAfwBackground = True
    cfg.kernel.active.afwBackgroundConfig.binSize = 64
    inputs = ((store, "science"), (store, "template"))
    first = run_pair(*inputs, tmp_path / "o.zarr", config=cfg, client=client, score=True).result
    assert first.metadata["aligned"]
    again = apply_result(first.path, *inputs, tmp_path / "a.zarr", client=client).result
    a, b = first.difference.read(0, 256, 0, 256), again.difference.read(0, 256, 0, 256)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(a, plane), getattr(b, plane), err_msg=plane)
    score_a, score_b = first.score.read(0, 256, 0, 256), again.score.read(0, 256, 0, 256)
    np.testing.assert_array_equal(score_a.image, score_b.image)
