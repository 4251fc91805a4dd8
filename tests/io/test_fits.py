"""Tests of diffkernel.io.fits, .nddata and prep.variance: FITS round trips, atomic writes,
errors, NDData, the variance of plain images, real files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.nddata import (
    CCDData,
    InverseVariance,
    NDData,
    StdDevUncertainty,
    UnknownUncertainty,
    VarianceUncertainty,
)
from astropy.wcs import WCS
from scipy import ndimage

from diffkernel.errors import InputError, StoreError
from diffkernel.image import DEFAULT_MASK_PLANES, Exposure, MaskedImage
from diffkernel.io.fits import read_exposure, read_masked_image, write_exposure
from diffkernel.io.nddata import from_nddata, to_nddata
from diffkernel.prep.variance import estimate_variance

REAL = Path("/work/shared/data/real")
DECAM = REAL / "decam-sfft-mini" / "DEC-OBS04a.mini.fits"
DECAM_B = REAL / "decam-sfft-mini" / "DEC-OBS04b.mini.fits"
ESO_4 = REAL / "properimage-eso085" / "aligned_eso085-030-004.fit"
ESO_5 = REAL / "properimage-eso085" / "aligned_eso085-030-005.fit"

needs_decam = pytest.mark.skipif(not DECAM.exists(), reason="real DECam data not available")
needs_eso = pytest.mark.skipif(not ESO_4.exists(), reason="real ProperImage data not available")


def _wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [20.0, 16.0]
    wcs.wcs.cd = [[-5.0e-5, 1.0e-6], [1.0e-6, 5.0e-5]]
    return wcs


@pytest.fixture
def exposure() -> Exposure:
    rng = np.random.default_rng(42)
    image = rng.normal(100.0, 5.0, size=(32, 40))
    variance = rng.uniform(20.0, 30.0, size=image.shape)
    mi = MaskedImage(image, variance)
    mi.set_plane("SAT", image > 108)
    mi.set_plane("DETECTED", image > 104)
    mi.set_plane("MY_VERY_LONG_PLANE", image < 92)
    meta = {"OBJECT": "field-1", "EXPTIME": 30.0, "NCOMBINE": 3, "FLAG": True}
    return Exposure(mi, wcs=_wcs(), psf_fwhm=3.25, meta=meta)


def _assert_same(a: Exposure, b: Exposure) -> None:
    np.testing.assert_array_equal(a.masked_image.image, b.masked_image.image)
    np.testing.assert_array_equal(a.masked_image.variance, b.masked_image.variance)
    np.testing.assert_array_equal(a.masked_image.mask, b.masked_image.mask)
    assert a.masked_image.mask_planes == b.masked_image.mask_planes


def _assert_same_wcs(a: WCS, b: WCS, shape: tuple[int, int]) -> None:
    y, x = np.mgrid[0 : shape[0] : 7, 0 : shape[1] : 7]
    np.testing.assert_allclose(
        np.array(a.pixel_to_world_values(x, y)), np.array(b.pixel_to_world_values(x, y)), atol=1e-10
    )


# ---------------------------------------------------------------- write / read round trip


def test_round_trip(tmp_path: Path, exposure: Exposure) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(path, exposure)
    back = read_exposure(path)
    _assert_same(exposure, back)
    assert back.masked_image.image.dtype == np.float64
    assert back.psf_fwhm == pytest.approx(3.25)
    _assert_same_wcs(exposure.wcs, back.wcs, exposure.shape)
    for key, value in exposure.meta.items():
        assert back.meta[key] == value
    assert "PSFFWHM" not in back.meta


def test_layout_on_disk(tmp_path: Path, exposure: Exposure) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(path, exposure)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdul[0].data is None
        assert hdul[0].header["PSFFWHM"] == pytest.approx(3.25)
        assert hdul["IMAGE"].data.dtype.kind == "f" and hdul["IMAGE"].data.itemsize == 8
        assert hdul["MASK"].data.dtype.kind == "i" and hdul["MASK"].data.itemsize == 4
        assert hdul["VARIANCE"].data.dtype.itemsize == 8
        mask_header = hdul["MASK"].header
        for name, bit in exposure.masked_image.mask_planes.items():
            assert mask_header[f"MP_{name}"] == bit
        for h in hdul[1:]:
            assert h.header["CTYPE1"] == "RA---TAN"


def test_masked_image_without_wcs(tmp_path: Path) -> None:
    mi = MaskedImage.from_image(np.arange(20.0).reshape(4, 5), 2.0)
    path = tmp_path / "mi.fits"
    write_exposure(path, mi)
    back = read_exposure(path)
    _assert_same(Exposure(mi), back)
    assert back.wcs is None and back.psf_fwhm is None
    np.testing.assert_array_equal(read_masked_image(path).image, mi.image)


def test_float32_image_is_kept_float64(tmp_path: Path) -> None:
    image = np.full((6, 6), 1.0 + 1e-12)
    path = tmp_path / "f.fits"
    write_exposure(path, MaskedImage.from_image(image, 1.0))
    assert read_masked_image(path).image[0, 0] == 1.0 + 1e-12


def test_read_lsst_layout_without_mp_cards(tmp_path: Path) -> None:
    image = np.ones((8, 9), dtype=np.float32)
    mask = np.zeros((8, 9), dtype=np.int32)
    mask[2, 3] = 1 << DEFAULT_MASK_PLANES["SAT"]
    var = np.full((8, 9), 4.0, dtype=np.float32)
    var[0, 0] = np.nan
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(image, name="IMAGE"),
            fits.ImageHDU(mask, name="MASK"),
            fits.ImageHDU(var, name="VARIANCE"),
        ]
    )
    path = tmp_path / "lsst.fits"
    hdul.writeto(path)
    mi = read_masked_image(path)
    assert mi.mask_planes == DEFAULT_MASK_PLANES
    assert mi.plane("SAT")[2, 3] and mi.plane("SAT").sum() == 1
    assert mi.plane("NO_DATA")[0, 0] and mi.variance[0, 0] == 1.0
    mi.validate()


def test_incomplete_stored_exposure(tmp_path: Path) -> None:
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(np.ones((4, 4)), name="IMAGE"),
            fits.ImageHDU(np.zeros((4, 4), np.int32), name="MASK"),
        ]
    )
    path = tmp_path / "partial.fits"
    hdul.writeto(path)
    with pytest.raises(InputError, match="VARIANCE"):
        read_exposure(path)


def test_meta_invalid_cards_skipped_with_warning(tmp_path: Path, exposure: Exposure) -> None:
    exposure.meta["ARRAY"] = np.zeros(3)
    exposure.meta["NAN"] = float("nan")
    path = tmp_path / "meta.fits"
    with pytest.warns(UserWarning, match="ARRAY"):
        write_exposure(path, exposure)
    back = read_exposure(path)
    assert "ARRAY" not in back.meta and "NAN" not in back.meta
    assert back.meta["OBJECT"] == "field-1"


def test_extra_header(tmp_path: Path, exposure: Exposure) -> None:
    path = tmp_path / "extra.fits"
    write_exposure(path, exposure, extra_header={"ORIGIN": "diffkernel", "EXPTIME": 60.0})
    back = read_exposure(path)
    assert back.meta["ORIGIN"] == "diffkernel" and back.meta["EXPTIME"] == 60.0
    with pytest.raises(InputError, match="BAD"):
        write_exposure(tmp_path / "x.fits", exposure, extra_header={"BAD": object()})


def test_callable_psf_is_not_written(tmp_path: Path, exposure: Exposure) -> None:
    exposure.psf_fwhm = lambda x, y: 3.0
    path = tmp_path / "psf.fits"
    write_exposure(path, exposure)
    assert read_exposure(path).psf_fwhm is None


# ---------------------------------------------------------------- overwrite and atomicity


def test_overwrite_refused(tmp_path: Path, exposure: Exposure) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(path, exposure)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=str(path)):
        write_exposure(path, exposure)
    assert path.read_bytes() == before
    exposure.masked_image.image += 1
    write_exposure(path, exposure, overwrite=True)
    np.testing.assert_array_equal(read_masked_image(path).image, exposure.masked_image.image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.fits"]


def test_missing_directory(tmp_path: Path, exposure: Exposure) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        write_exposure(tmp_path / "nope" / "exp.fits", exposure)


def test_wrong_type_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Exposure or MaskedImage"):
        write_exposure(tmp_path / "x.fits", np.zeros((3, 3)))


def _failing_writeto(self: fits.HDUList, fileobj, *args, **kwargs) -> None:
    fileobj.write(b"SIMPLE  =                    T" + b" " * 50)
    raise OSError("disk full (simulated)")


def test_failed_write_leaves_nothing(
    tmp_path: Path, exposure: Exposure, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fits.HDUList, "writeto", _failing_writeto)
    path = tmp_path / "exp.fits"
    with pytest.raises(StoreError, match="disk full"):
        write_exposure(path, exposure)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_file(
    tmp_path: Path, exposure: Exposure, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(path, exposure)
    before = path.read_bytes()
    monkeypatch.setattr(fits.HDUList, "writeto", _failing_writeto)
    with pytest.raises(StoreError, match=str(path)):
        write_exposure(path, exposure, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["exp.fits"]


# ---------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.fits"
    with pytest.raises(StoreError, match=str(path)):
        read_exposure(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.fits"
    path.write_bytes(b"this is not FITS at all\n" * 200)
    with pytest.raises(InputError, match=str(path)) as info:
        read_exposure(path)
    assert "SIMPLE" in str(info.value)  # what astropy said


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=str(path)):
        read_exposure(path)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_truncated_file(tmp_path: Path, exposure: Exposure, fraction: float) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(path, exposure)
    raw = path.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(InputError, match=str(cut)):
        read_exposure(cut)


def test_truncated_inside_header(tmp_path: Path, exposure: Exposure) -> None:
    path = tmp_path / "exp.fits"
    write_exposure(path, exposure)
    cut = tmp_path / "cut.fits"
    first_block_end = len(fits.getheader(path, 0).tostring())
    cut.write_bytes(path.read_bytes()[: first_block_end + 100])
    with pytest.raises(InputError, match=str(cut)):
        read_exposure(cut)


def test_no_image(tmp_path: Path) -> None:
    path = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=[1.0, 2.0])])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(InputError, match="no 2-D image"):
        read_exposure(path)


def test_unknown_hdu(tmp_path: Path) -> None:
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.ones((20, 20))).writeto(path)
    with pytest.raises(InputError, match="no HDU 'SCI'"):
        read_exposure(path, hdu="SCI")


# ---------------------------------------------------------------- plain images


def _plain(tmp_path: Path, data: np.ndarray, **cards) -> Path:
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key] = value
    path = tmp_path / "plain.fits"
    hdu.writeto(path, overwrite=True)
    return path


def test_plain_poisson_with_gain(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gain, sky = 2.0, 1000.0
    image = rng.poisson(sky * gain, size=(200, 200)) / gain
    exp = read_exposure(_plain(tmp_path, image, GAIN=gain, RDNOISE=0.0))
    assert exp.meta["variance_model"] == "poisson"
    assert exp.meta["variance_gain"] == gain
    z = (exp.masked_image.image - sky) / np.sqrt(exp.masked_image.variance)
    assert 0.95 < np.std(z) < 1.05


def test_plain_gain_argument_and_read_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    gain, sky, rn = 1.5, 500.0, 8.0
    image = (rng.poisson(sky * gain, size=(200, 200)) + rng.normal(0, rn, (200, 200))) / gain
    exp = read_exposure(_plain(tmp_path, image), gain=gain, read_noise=rn)
    assert exp.meta["variance_model"] == "poisson"
    expected = sky / gain + (rn / gain) ** 2
    assert np.median(exp.masked_image.variance) == pytest.approx(expected, rel=0.02)


def test_plain_sky_subtracted_with_gain(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 10.0, size=(200, 200))
    image[100, 100] = 1000.0
    exp = read_exposure(_plain(tmp_path, image, GAIN=4.0))
    meta = exp.meta
    assert meta["variance_model"] == "sky_noise+poisson_sources"
    assert meta["sky_noise"] == pytest.approx(10.0, rel=0.03)
    var = exp.masked_image.variance
    assert np.median(var) == pytest.approx(100.0, rel=0.06)
    assert var[100, 100] == pytest.approx(meta["sky_noise"] ** 2 + 1000.0 / 4.0, rel=0.02)


def test_plain_effective_gain(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    gain, sky = 1.7, 3000.0
    image = rng.poisson(sky * gain, size=(256, 256)) / gain
    exp = read_exposure(_plain(tmp_path, image))
    assert exp.meta["variance_model"] == "poisson_effective_gain"
    assert exp.meta["variance_gain"] == pytest.approx(gain, rel=0.05)


def test_plain_sky_noise_only_warns(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = _plain(tmp_path, rng.normal(0.0, 3.0, size=(100, 100)))
    with pytest.warns(UserWarning, match="gain"):
        exp = read_exposure(path)
    assert exp.meta["variance_model"] == "sky_noise_only"
    np.testing.assert_allclose(exp.masked_image.variance, exp.meta["sky_noise"] ** 2)


def test_plain_gradient_does_not_inflate_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    y, x = np.mgrid[0:300, 0:300]
    image = 1000.0 + 0.5 * x + rng.normal(0.0, 10.0, size=x.shape)
    exp = read_exposure(_plain(tmp_path, image), gain=10.0)
    assert exp.meta["sky_noise"] == pytest.approx(10.0, rel=0.05)


def test_plain_nan_and_saturation(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 5.0, size=(64, 64))
    image[3, 4] = np.nan
    image[10, 10] = 5000.0
    exp = read_exposure(_plain(tmp_path, image, SATURATE=4000.0), gain=1.0)
    mi = exp.masked_image
    assert mi.plane("NO_DATA")[3, 4] and mi.plane("NO_DATA").sum() == 1
    assert mi.image[3, 4] == 0.0 and mi.variance[3, 4] == 1.0
    assert mi.plane("SAT")[10, 10] and mi.plane("SAT").sum() == 1
    mi.validate()
    exp = read_exposure(_plain(tmp_path, image, SATURATE=4000.0), gain=1.0, saturation=120.0)
    assert exp.masked_image.plane("SAT").sum() == (np.nan_to_num(image) >= 120.0).sum()


def test_plain_uint16_saturation(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    image = rng.poisson(1000, size=(64, 64)).astype(np.uint16)
    image[5, 5] = 65535
    path = _plain(tmp_path, image)
    assert fits.getheader(path)["BZERO"] == 32768
    mi = read_masked_image(path)
    assert mi.plane("SAT")[5, 5] and mi.plane("SAT").sum() == 1


def test_plain_extension_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    image = rng.normal(500.0, np.sqrt(500.0), size=(50, 60))
    primary = fits.PrimaryHDU()
    primary.header["GAIN"] = 1.0
    sci = fits.ImageHDU(image, name="SCI")
    sci.header["FWHM"] = 2.5
    path = tmp_path / "ext.fits"
    fits.HDUList([primary, sci]).writeto(path)
    exp = read_exposure(path)
    assert exp.shape == (50, 60)
    assert exp.psf_fwhm == 2.5 and exp.meta["variance_gain"] == 1.0
    assert read_exposure(path, hdu="SCI").shape == (50, 60)
    with pytest.raises(InputError, match="no 2-D image"):
        read_exposure(path, hdu=0)


def test_estimate_variance_refuses_constant_image() -> None:
    with pytest.raises(InputError, match="sky noise"):
        estimate_variance(np.full((50, 50), 7.0), gain=1.0)


def test_invalid_arguments(tmp_path: Path) -> None:
    path = _plain(tmp_path, np.ones((10, 10)))
    with pytest.raises(InputError, match="gain"):
        read_exposure(path, gain=-1.0)
    with pytest.raises(InputError, match="saturation"):
        read_exposure(path, saturation=float("nan"))


# ---------------------------------------------------------------- NDData


def test_to_nddata(exposure: Exposure) -> None:
    nd = to_nddata(exposure)
    mi = exposure.masked_image
    assert isinstance(nd, CCDData)
    assert nd.unit == u.adu
    assert isinstance(nd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(nd.data, mi.image)
    np.testing.assert_array_equal(nd.uncertainty.array, mi.variance)
    np.testing.assert_array_equal(nd.flags, mi.mask)
    # DETECTED annotates, it does not condemn.
    np.testing.assert_array_equal(nd.mask, mi.plane("SAT") | mi.plane("MY_VERY_LONG_PLANE"))
    assert nd.meta["MP_SAT"] == 1 and nd.meta["PSFFWHM"] == 3.25
    assert nd.wcs is exposure.wcs
    nd.data[0, 0] = -1
    assert mi.image[0, 0] != -1  # arrays were copied


def test_nddata_round_trip(exposure: Exposure) -> None:
    back = from_nddata(to_nddata(exposure))
    _assert_same(exposure, back)
    assert back.psf_fwhm == 3.25 and back.meta == exposure.meta
    assert back.wcs is exposure.wcs


def test_ccddata_file_round_trip(tmp_path: Path, exposure: Exposure) -> None:
    nd = to_nddata(exposure)
    path = tmp_path / "ccd.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.write(path)
        ccd = CCDData.read(path)
    back = from_nddata(ccd)
    np.testing.assert_array_equal(back.masked_image.image, exposure.masked_image.image)
    np.testing.assert_allclose(back.masked_image.variance, exposure.masked_image.variance)
    # CCDData files keep only the boolean mask; it comes back as BAD.
    np.testing.assert_array_equal(back.masked_image.plane("BAD"), nd.mask)
    assert back.psf_fwhm == 3.25


@pytest.mark.parametrize(
    ("uncertainty", "expected"),
    [
        (VarianceUncertainty(np.full((4, 5), 4.0)), 4.0),
        (StdDevUncertainty(np.full((4, 5), 2.0)), 4.0),
        (InverseVariance(np.full((4, 5), 0.25)), 4.0),
    ],
)
def test_from_nddata_uncertainty_types(uncertainty, expected: float) -> None:
    nd = NDData(np.ones((4, 5)), uncertainty=uncertainty)
    exp = from_nddata(nd)
    np.testing.assert_allclose(exp.masked_image.variance, expected)
    assert exp.masked_image.mask_planes == DEFAULT_MASK_PLANES


def test_from_nddata_units() -> None:
    std = StdDevUncertainty(np.full((3, 3), 300.0), unit="uJy")
    nd = NDData(np.ones((3, 3)), unit="mJy", uncertainty=std)
    np.testing.assert_allclose(from_nddata(nd).masked_image.variance, 0.3**2)
    ivar = InverseVariance(np.full((3, 3), 4.0), unit="1 / uJy2")
    nd = NDData(np.ones((3, 3)), unit="mJy", uncertainty=ivar)
    np.testing.assert_allclose(from_nddata(nd).masked_image.variance, 0.25e-6)


def test_from_nddata_zero_inverse_variance() -> None:
    ivar = np.full((3, 3), 0.5)
    ivar[1, 1] = 0.0
    exp = from_nddata(NDData(np.ones((3, 3)), uncertainty=InverseVariance(ivar)))
    mi = exp.masked_image
    assert mi.plane("NO_DATA")[1, 1] and mi.plane("NO_DATA").sum() == 1
    assert mi.variance[1, 1] == 1.0
    mi.validate()


def test_from_nddata_bool_mask() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 1] = True
    nd = NDData(np.ones((4, 4)), uncertainty=VarianceUncertainty(np.ones((4, 4))), mask=mask)
    mi = from_nddata(nd).masked_image
    np.testing.assert_array_equal(mi.plane("BAD"), mask)
    assert mi.mask.sum() == 1


def test_from_nddata_int_mask() -> None:
    mask = np.zeros((4, 4), dtype=np.int16)
    mask[2, 2] = 1 << 1 | 1 << 3
    nd = NDData(np.ones((4, 4)), uncertainty=VarianceUncertainty(np.ones((4, 4))), mask=mask)
    mi = from_nddata(nd).masked_image
    assert mi.plane("SAT")[2, 2] and mi.plane("CR")[2, 2] and mi.mask.sum() == mask.sum()
    mi = from_nddata(nd, mask_planes={"EDGE": 1, "GHOST": 3}).masked_image
    assert mi.plane("GHOST")[2, 2] and mi.mask_planes == {"EDGE": 1, "GHOST": 3}


def test_from_nddata_requires_variance() -> None:
    with pytest.raises(InputError, match="variance is required"):
        from_nddata(NDData(np.ones((3, 3))))
    nd = NDData(np.ones((3, 3)), uncertainty=UnknownUncertainty(np.ones((3, 3))))
    with pytest.raises(InputError, match="variance is required"):
        from_nddata(nd)
    with pytest.raises(InputError, match="NDData"):
        from_nddata(np.ones((3, 3)))


# ---------------------------------------------------------------- real data


def _mad_sigma(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


@needs_decam
def test_real_decam() -> None:
    exp = read_exposure(DECAM)
    mi = exp.masked_image
    header = fits.getheader(DECAM)
    assert exp.psf_fwhm == pytest.approx(header["FWHM"])
    assert isinstance(exp.wcs, WCS) and exp.wcs.has_celestial
    assert np.all(mi.variance > 0) and np.all(np.isfinite(mi.variance))
    mi.validate()
    saturation = header["ESATUR"]
    np.testing.assert_array_equal(mi.plane("SAT"), mi.image >= saturation)
    # Sky was subtracted before resampling: the variance comes from the measured sky noise.
    assert exp.meta["variance_model"] == "sky_noise+poisson_sources"
    assert exp.meta["sky_noise"] == pytest.approx(32.8, abs=0.5)
    # A low saturation argument flags the bright star cores.
    low = read_masked_image(DECAM, saturation=5000.0)
    assert low.plane("SAT").sum() == (mi.image >= 5000.0).sum() > 0


@needs_eso
def test_real_properimage_uint16() -> None:
    exp = read_exposure(ESO_4)
    mi = exp.masked_image
    raw = fits.getdata(ESO_4)
    assert raw.dtype == np.uint16
    assert exp.wcs is None and exp.psf_fwhm is None
    np.testing.assert_array_equal(mi.plane("SAT"), raw == 65535)
    assert mi.plane("SAT").sum() > 0
    assert exp.meta["variance_model"] == "poisson_effective_gain"
    assert 1.2 < exp.meta["variance_gain"] < 1.8
    mi.validate()


def _sky_z(mi: MaskedImage, background: np.ndarray | float) -> np.ndarray:
    """(image - background) / sqrt(variance) over unflagged pixels away from sources."""
    z = (mi.image - background) / np.sqrt(mi.variance)
    good = mi.mask == 0
    sigma = _mad_sigma(z[good])
    sources = np.abs(z - np.median(z[good])) > 3 * sigma
    sources = ndimage.binary_dilation(sources, iterations=3)
    return z[good & ~sources]


@pytest.mark.parametrize("path", [DECAM, ESO_4])
def test_real_variance_is_honest(path: Path) -> None:
    if not path.exists():
        pytest.skip("real data not available")
    mi = read_masked_image(path)
    # As asked: against one global sky median. The ProperImage frame has a sky gradient of
    # ~280 ADU peak to peak, which this measure counts as noise.
    z = _sky_z(mi, float(np.median(mi.image[mi.mask == 0])))
    assert 0.8 < _mad_sigma(z) < 1.25
    # Against a local background, the sky scatter must match the variance closely.
    z = _sky_z(mi, ndimage.median_filter(mi.image, size=31))
    assert 0.9 < _mad_sigma(z) < 1.1


@pytest.mark.parametrize(("first", "second"), [(DECAM, DECAM_B), (ESO_4, ESO_5)])
def test_real_pair_difference_is_honest(first: Path, second: Path) -> None:
    """Two aligned exposures of one field: their sky difference must match both variances."""
    if not (first.exists() and second.exists()):
        pytest.skip("real data not available")
    a, b = read_masked_image(first), read_masked_image(second)
    diff = a.image - b.image
    z = (diff - np.median(diff)) / np.sqrt(a.variance + b.variance)
    good = (a.mask == 0) & (b.mask == 0)
    assert 0.9 < _mad_sigma(z[good]) < 1.1


@needs_decam
def test_real_decam_write_read_round_trip(tmp_path: Path) -> None:
    exp = read_exposure(DECAM)
    path = tmp_path / "decam.fits"
    write_exposure(path, exp)
    back = read_exposure(path)
    _assert_same(exp, back)
    _assert_same_wcs(exp.wcs, back.wcs, exp.shape)
    assert back.psf_fwhm == exp.psf_fwhm
    assert back.meta["variance_model"] == exp.meta["variance_model"]
    assert back.meta["EXP_BN"] == exp.meta["EXP_BN"]
    assert (path.stat().st_mode & 0o777) != 0o600  # not left private by mkstemp
