"""Inputs as they come: SCI/ERR/DQ products and HOTPANTS-style separate noise and mask files.

Each convention is built from a simulated pair (:func:`diffkernel.simulate.make_pair`),
read back, and subtracted through the command line: the difference over its own sigma
must have a robust standard deviation near 1 on the sky, which holds only if the
variance was read in the right units (ERR and noise images are sigmas).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from diffkernel.cli import main
from diffkernel.errors import InputError, StoreError
from diffkernel.image import Exposure
from diffkernel.io.fits import read_exposure
from diffkernel.io.header import wcs_header
from diffkernel.io.planes import HST_DQ, JWST_DQ, dq_to_mask
from diffkernel.io.zarr.results import open_result
from diffkernel.simulate import make_pair

#: ADU to MJy/sr of the JWST-style files (any factor: ERR scales with SCI).
MJY_PER_ADU = 3.7e-4


@pytest.fixture(scope="module")
def pair():
    return make_pair((256, 256), seed=21, template_depth=4, wcs=True)


def write_jwst(path: Path, exposure: Exposure, dq: np.ndarray | None = None) -> None:
    """A JWST-style ``_cal`` file: SCI and ERR in MJy/sr, DQ with JWST bits."""
    mi = exposure.masked_image
    cards = wcs_header(exposure.wcs)
    primary = fits.PrimaryHDU()
    primary.header.update({"TELESCOP": "JWST", "INSTRUME": "NIRCAM", "FILTER": "F200W"})
    sci = fits.ImageHDU((mi.image * MJY_PER_ADU).astype(np.float32), header=cards, name="SCI")
    sci.header["BUNIT"] = "MJy/sr"
    err = fits.ImageHDU(
        (np.sqrt(mi.variance) * MJY_PER_ADU).astype(np.float32), header=cards, name="ERR"
    )
    hdus = [primary, sci, err]
    if dq is not None:
        hdus.append(fits.ImageHDU(dq.astype(np.uint32), name="DQ"))
    fits.HDUList(hdus).writeto(path)


def write_hotpants_set(stem: Path, exposure: Exposure, bad: np.ndarray) -> dict[str, Path]:
    """A plain image (no GAIN card), a sigma image and a mask image, as HOTPANTS takes them."""
    mi = exposure.masked_image
    paths = {k: stem.with_name(f"{stem.name}.{k}.fits") for k in ("image", "noise", "mask")}
    header = wcs_header(exposure.wcs)
    fits.PrimaryHDU(mi.image.astype(np.float32), header=header).writeto(paths["image"])
    fits.PrimaryHDU(np.sqrt(mi.variance).astype(np.float32)).writeto(paths["noise"])
    fits.PrimaryHDU(bad.astype(np.int16)).writeto(paths["mask"])
    return paths


def sky_robust_std(fits_out: Path) -> tuple[float, float]:
    """Median and MAD-based std of difference / sigma on unmasked pixels."""
    with fits.open(fits_out) as hdul:
        image, var, mask = (hdul[n].data.astype(float) for n in ("IMAGE", "VARIANCE", "MASK"))
    z = image / np.sqrt(var)
    clean = np.isfinite(z) & (mask == 0)
    median = float(np.median(z[clean]))
    return median, float(1.4826 * np.median(np.abs(z[clean] - median)))


# ---------------------------------------------------------------- reading


def test_sci_err_dq_read_as_variance_err_squared_and_mask_planes(tmp_path, pair):
    dq = np.zeros((256, 256), dtype=np.uint32)
    dq[10, 20] = 1 | 2  # DO_NOT_USE | SATURATED
    dq[30, 40] = 4  # JUMP_DET
    dq[50, 60] = 1 << 12  # WARM
    path = tmp_path / "cal.fits"
    write_jwst(path, pair.science, dq)
    exposure = read_exposure(path)
    mi = exposure.masked_image
    expected = (np.sqrt(pair.science.masked_image.variance) * MJY_PER_ADU).astype(np.float32)
    np.testing.assert_allclose(mi.variance, expected.astype(np.float64) ** 2, rtol=1e-12)
    assert mi.plane("BAD")[10, 20] and mi.plane("SAT")[10, 20]
    assert mi.plane("CR")[30, 40] and mi.plane("SUSPECT")[50, 60]
    assert np.count_nonzero(mi.mask) == 3
    assert exposure.wcs is not None
    assert exposure.meta["BUNIT"] == "MJy/sr" and exposure.meta["FILTER"] == "F200W"
    assert exposure.meta["variance_model"] == "ERR**2"
    assert exposure.meta["dq_convention"] == "JWST"


def test_err_of_zero_and_nan_science_are_no_data(tmp_path, pair):
    path = tmp_path / "cal.fits"
    write_jwst(path, pair.science)
    with fits.open(path, mode="update") as hdul:
        hdul["ERR"].data[5, 6] = 0.0
        hdul["SCI"].data[7, 8] = np.nan
    mi = read_exposure(path).masked_image
    assert mi.plane("NO_DATA")[5, 6] and mi.plane("NO_DATA")[7, 8]
    assert np.isfinite(mi.image).all() and (mi.variance > 0).all()


def test_hst_dq_table_and_unknown_telescope():
    planes = {"BAD": 0, "SAT": 1, "CR": 3, "SUSPECT": 7, "NO_DATA": 8}
    dq = np.array([[256, 4096], [16, 0]], dtype=np.int16)
    mask = dq_to_mask(dq, HST_DQ, planes)
    assert mask.tolist() == [[1 << 1, 1 << 3], [1 << 0, 0]]
    assert dq_to_mask(dq, None, planes).tolist() == [[1, 1], [1, 0]]
    assert set(JWST_DQ.values()) <= set(planes)
    with pytest.raises(InputError, match="integer"):
        dq_to_mask(dq.astype(float), HST_DQ, planes)


def test_several_chips_need_a_choice(tmp_path, pair):
    mi = pair.science.masked_image
    hdus = [fits.PrimaryHDU()]
    for ver in (1, 2):
        hdus += [
            fits.ImageHDU(mi.image, name="SCI", ver=ver),
            fits.ImageHDU(np.sqrt(mi.variance) * ver, name="ERR", ver=ver),
        ]
    path = tmp_path / "flt.fits"
    fits.HDUList(hdus).writeto(path)
    with pytest.raises(InputError, match=r"2 SCI extensions.*hdu=\('SCI', n\)"):
        read_exposure(path)
    chip2 = read_exposure(path, hdu=("SCI", 2)).masked_image
    np.testing.assert_allclose(chip2.variance, 4 * mi.variance)


def test_separate_noise_and_mask_files(tmp_path, pair):
    bad = np.zeros((256, 256), dtype=bool)
    bad[100:103, 7] = True
    paths = write_hotpants_set(tmp_path / "sci", pair.science, bad)
    exposure = read_exposure(paths["image"], noise=paths["noise"], mask=paths["mask"])
    mi = exposure.masked_image
    sigma = np.sqrt(pair.science.masked_image.variance).astype(np.float32).astype(float)
    np.testing.assert_allclose(mi.variance, sigma**2, rtol=1e-12)
    np.testing.assert_array_equal(mi.plane("BAD"), bad)
    assert exposure.meta["variance_model"] == "given"


def test_separate_files_that_cannot_load_say_so(tmp_path, pair):
    paths = write_hotpants_set(tmp_path / "sci", pair.science, np.zeros((256, 256), bool))
    fits.PrimaryHDU(np.ones((10, 10))).writeto(tmp_path / "small.fits")
    with pytest.raises(InputError, match=r"is 10x10, the image 256x256"):
        read_exposure(paths["image"], noise=tmp_path / "small.fits")
    with pytest.raises(StoreError, match="mask .* does not exist"):
        read_exposure(paths["image"], mask=tmp_path / "nope.fits")
    (tmp_path / "junk.fits").write_text("not fits")
    with pytest.raises(InputError, match="not readable FITS"):
        read_exposure(paths["image"], noise=tmp_path / "junk.fits")


# ---------------------------------------------------------------- through the command line


def test_jwst_style_pair_subtracts_through_the_cli(tmp_path, pair, capsys):
    science, template = tmp_path / "sci_cal.fits", tmp_path / "tmpl_i2d.fits"
    write_jwst(science, pair.science, np.zeros((256, 256), np.uint32))
    write_jwst(template, pair.template)
    fits_out = tmp_path / "diff.fits"
    args = ["subtract", str(science), str(template), "--out", str(tmp_path / "d.zarr")]
    assert main([*args, "--fits-out", str(fits_out), "--workers", "1", "-q"]) == 0
    median, std = sky_robust_std(fits_out)
    print(f"JWST-style: median {median:.3f}, robust std {std:.3f}")
    assert abs(median) < 0.1 and 0.9 < std < 1.1
    assert fits.getheader(fits_out)["BUNIT"] == "MJy/sr"
    assert "GAIN" not in capsys.readouterr().err  # the variance was given: no gain note


def test_hotpants_style_files_subtract_through_the_cli(tmp_path, pair, capsys):
    bad = np.zeros((256, 256), dtype=bool)
    bad[40:44, 200] = True
    sci = write_hotpants_set(tmp_path / "sci", pair.science, bad)
    tmpl = write_hotpants_set(tmp_path / "tmpl", pair.template, np.zeros_like(bad))
    fits_out = tmp_path / "diff.fits"
    args = [
        "subtract", str(sci["image"]), str(tmpl["image"]), "--out", str(tmp_path / "d.zarr"),
        "--science-noise", str(sci["noise"]), "--science-mask", str(sci["mask"]),
        "--template-noise", str(tmpl["noise"]), "--template-mask", str(tmpl["mask"]),
        "--fits-out", str(fits_out), "--workers", "1", "-q",
    ]  # fmt: skip
    assert main(args) == 0
    median, std = sky_robust_std(fits_out)
    print(f"HOTPANTS-style: median {median:.3f}, robust std {std:.3f}")
    assert abs(median) < 0.1 and 0.9 < std < 1.1
    result = open_result(tmp_path / "d.zarr")
    bad_bit = 1 << result.difference.mask_planes["BAD"]
    assert (result.difference.read(0, 256, 0, 256).mask[40:44, 200] & bad_bit).all()


def test_cli_noise_file_of_the_wrong_shape_is_one_line_exit_2(tmp_path, pair, capsys):
    sci = write_hotpants_set(tmp_path / "sci", pair.science, np.zeros((256, 256), bool))
    fits.PrimaryHDU(np.ones((10, 10))).writeto(tmp_path / "small.fits")
    args = ["subtract", str(sci["image"]), str(sci["image"]), "--out", str(tmp_path / "d.zarr")]
    assert main([*args, "--template-noise", str(tmp_path / "small.fits"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10x10" in err[0] and "small.fits" in err[0]
