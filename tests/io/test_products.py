"""The FITS difference of ``subtract --fits-out``: float32, the science's cards, provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from diffkernel import __version__
from diffkernel.cli import main
from diffkernel.image import Exposure, MaskedImage
from diffkernel.io.fits import write_exposure
from diffkernel.io.products import config_digest
from diffkernel.io.zarr.results import open_result
from diffkernel.simulate import make_pair

SCIENCE_CARDS = {
    "FILTER": "r",
    "EXPTIME": 90.0,
    "GAIN": 2.0,
    "MJD-OBS": 60123.25,
    "DATE-OBS": "2023-07-01T06:00:00",
    "OBJECT": "field-7",
    "AIRMASS": 1.23,
    "TELESCOP": "sim",
}


@pytest.fixture(scope="module")
def subtracted(tmp_path_factory):
    """One ``subtract --fits-out`` of plain FITS inputs with a full science header."""
    tmp = tmp_path_factory.mktemp("products")
    pair = make_pair((256, 256), seed=5, template_depth=4, wcs=True)
    science = Exposure(pair.science.masked_image, pair.science.wcs, meta=dict(SCIENCE_CARDS))
    paths = {"science": tmp / "sci.fits", "template": tmp / "tmpl.fits"}
    write_exposure(paths["science"], science)
    write_exposure(paths["template"], pair.template)
    out, fits_out = tmp / "diff.zarr", tmp / "diff.fits"
    args = ["subtract", str(paths["science"]), str(paths["template"]), "--out", str(out)]
    code = main([*args, "--fits-out", str(fits_out), "--score", "--workers", "1", "--quiet"])
    assert code == 0
    return paths, open_result(out), fits_out


def test_difference_is_float32_with_the_science_cards_and_wcs(subtracted):
    _, result, fits_out = subtracted
    with fits.open(fits_out) as hdul:
        header = hdul[0].header
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4")
        assert hdul["VARIANCE"].data.dtype == np.dtype(">f4")
        for key, value in SCIENCE_CARDS.items():
            assert header[key] == value, key
        assert header["CTYPE1"] == "RA---TAN" and hdul["IMAGE"].header["CTYPE1"] == "RA---TAN"
        assert "DKSOURCE" not in header  # replaced by DKSCI
        stored = result.difference.read(0, 256, 0, 256)
        np.testing.assert_array_equal(hdul["IMAGE"].data, stored.image.astype(np.float32))


def test_difference_carries_provenance_cards(subtracted):
    paths, result, fits_out = subtracted
    header = fits.getheader(fits_out)
    assert header["DKVERS"] == __version__
    assert header["DKSCI"] == str(paths["science"].resolve())
    assert header["DKTMPL"] == str(paths["template"].resolve())
    mode = result.metadata["mode"]
    assert header["CONVOL"] == {"convolveTemplate": "TEMPLATE", "convolveScience": "IMAGE"}[mode]
    # The simulated kernel's sum is 1 / the template's relative depth scale: about 1.
    assert header["KSUM"] == pytest.approx(result.quality["metrics"]["kernel_sum"]["mean"], 1e-6)
    assert header["DKCFGSHA"] == config_digest(result.config)
    assert header["DKVERDCT"] == result.quality["verdict"]


def test_provenance_names_the_users_files_not_the_ingested_stores(subtracted):
    paths, result, _ = subtracted
    for who in ("science", "template"):
        recorded = result.provenance["inputs"][who]
        assert recorded["path"] == str(paths[who].resolve())
        assert ".inputs-" in recorded["store"]  # the temporary store it was read from


def test_config_digest_depends_on_every_field():
    from diffkernel import MakeKernelConfig

    a = MakeKernelConfig.default_subtraction().to_dict()
    b = MakeKernelConfig.default_subtraction()
    b.kernel.active.spatialKernelOrder = 2
    assert config_digest(a) == config_digest(json.loads(json.dumps(a)))
    assert config_digest(a) != config_digest(b.to_dict())


def test_write_exposure_keeps_float32_values_float32(tmp_path):
    exact = MaskedImage.from_image(np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6), 1.0)
    write_exposure(tmp_path / "a.fits", exact)
    with fits.open(tmp_path / "a.fits") as hdul:
        assert hdul["IMAGE"].data.dtype.itemsize == 4
    rounded = MaskedImage.from_image(np.full((6, 6), 1.0 + 1e-12), 1.0)
    write_exposure(tmp_path / "b.fits", rounded, dtype="float32")
    with fits.open(tmp_path / "b.fits") as hdul:
        assert hdul["IMAGE"].data.dtype.itemsize == 4 and hdul["IMAGE"].data[0, 0] == 1.0


def test_score_image_carries_the_same_cards(subtracted):
    paths, _, fits_out = subtracted
    header = fits.getheader(fits_out.with_name("diff.score.fits"))
    assert header["DKSCI"] == str(paths["science"].resolve())
    assert header["FILTER"] == "r" and header["CTYPE1"] == "RA---TAN"
    assert "KSUM" in header and "DKVERDCT" in header
    assert header["BUNIT"] == "S/N"
