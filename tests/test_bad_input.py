"""A catalogue of bad inputs: each is refused with a diffkernel error that names the problem.

Every test asserts the exception class (from :mod:`diffkernel.errors`) and a ``match`` on
the message, so a user never sees a raw numpy/zarr/astropy traceback or, worse, a silent
wrong answer. The kinds covered: images (shapes, dtypes, NaN/inf, variance, masks, PSF
widths), alignment (WCS), FITS and Zarr files, configuration (values, types, names, files),
kernel sources, candidate selection and fitting, output paths, the Dask service's
arguments and the subtraction's arguments.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import zarr
from astropy.table import Table

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.cli import main
from diffkernel.config import WarpingConfig
from diffkernel.errors import (
    ConfigError,
    DiffkernelError,
    InputError,
    NoCandidatesError,
    SpatialFitError,
    StoreError,
)
from diffkernel.image import Exposure, MaskedImage
from diffkernel.io.fits import read_exposure, write_exposure
from diffkernel.io.inputs import ingest
from diffkernel.io.nddata import from_nddata
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.io.zarr.results import ResultWriter, result_status
from diffkernel.io.zarr.write import write_image
from diffkernel.pipeline.dask.driver import run_pair
from diffkernel.prep.align import warp_exposure
from diffkernel.simulate import make_pair

SHAPE = (192, 192)


@pytest.fixture(scope="module")
def pair():
    """A small simulated pair with its source list (kernel sources are given, not detected)."""
    return make_pair(SHAPE, seed=5)


@pytest.fixture(scope="module")
def wcs_pair():
    """A small pair whose exposures carry a celestial WCS."""
    return make_pair((96, 96), seed=5, wcs=True)


def replaced(exposure: Exposure, **planes) -> MaskedImage:
    """The exposure's masked image with some planes replaced."""
    mi = exposure.masked_image
    values = {"image": mi.image, "variance": mi.variance, "mask": mi.mask, **planes}
    return MaskedImage(values["image"], values["variance"], values["mask"], mi.mask_planes)


def run(pair, template=None, science=None, sources=None, config=None):
    """MakeKernelTask.run on the pair, with some of its inputs replaced."""
    return MakeKernelTask(config).run(
        pair.template if template is None else template,
        pair.science if science is None else science,
        pair.truth.sources if sources is None else sources,
    )


def test_every_error_is_a_diffkernel_error_and_a_builtin():
    """Each error class derives from DiffkernelError and from the builtin callers expect."""
    assert issubclass(InputError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(NoCandidatesError, RuntimeError)
    assert issubclass(SpatialFitError, RuntimeError)
    assert issubclass(StoreError, OSError)
    for cls in (InputError, ConfigError, NoCandidatesError, SpatialFitError, StoreError):
        assert issubclass(cls, DiffkernelError)


# --- image planes ------------------------------------------------------------------------


def test_template_and_science_shapes_differ(pair):
    """Pixel grids of different shapes (no WCS to align them) are refused, naming both shapes."""
    small = MaskedImage.from_image(np.ones((120, 192)), 1.0)
    with pytest.raises(InputError, match=r"template shape \(120, 192\) differs from science"):
        run(pair, template=small, science=pair.science.masked_image)


@pytest.mark.parametrize(
    "values, dtype",
    [
        (np.ones((8, 8)) + 1j, "complex128"),
        (np.full((8, 8), "1.0"), "<U3"),
        (np.full((8, 8), 1.0, dtype=object), "object"),
        (np.ones((8, 8), dtype=bool), "bool"),
    ],
    ids=["complex", "strings", "object", "bool"],
)
@pytest.mark.parametrize("plane", ["image", "variance"])
def test_plane_dtype_not_real(values, dtype, plane):
    """A complex, string, object or boolean image or variance is refused, naming the dtype."""
    planes = {"image": np.ones((8, 8)), "variance": np.ones((8, 8)), plane: values}
    with pytest.raises(InputError, match=rf"{plane} must hold real numbers, got dtype {dtype}"):
        MaskedImage(planes["image"], planes["variance"])


def test_from_image_does_not_drop_imaginary_part():
    """MaskedImage.from_image refuses a complex image instead of keeping its real part."""
    with pytest.raises(InputError, match="image must hold real numbers, got dtype complex"):
        MaskedImage.from_image(np.ones((8, 8)) + 1j, 1.0)


def test_image_not_two_dimensional():
    """A 1-D or 3-D image is refused with its shape."""
    with pytest.raises(InputError, match=r"image must be 2-D, got an array of shape \(4,\)"):
        MaskedImage(np.ones(4), np.ones(4))
    with pytest.raises(InputError, match=r"image must be 2-D.*\(2, 4, 4\)"):
        MaskedImage.from_image(np.ones((2, 4, 4)), 1.0)


@pytest.mark.parametrize("which", ["template", "science"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_unmasked_pixel(pair, which, value):
    """A NaN or infinite pixel that is not masked NO_DATA is refused, naming the image."""
    exposure = getattr(pair, which)
    image = exposure.masked_image.image.copy()
    image[40, 50] = value
    bad = replaced(exposure, image=image)
    with pytest.raises(InputError, match=rf"{which}: 1 pixel\(s\) are NaN or infinite but not"):
        run(pair, **{which: bad})


@pytest.mark.parametrize("value", [0.0, -4.0])
def test_zero_or_negative_variance(pair, value):
    """A zero or negative variance at an unmasked pixel is refused."""
    variance = pair.science.masked_image.variance.copy()
    variance[10:12, 10] = value
    with pytest.raises(
        InputError, match=r"science: variance is zero or negative at 2 unmasked pixel"
    ):
        run(pair, science=replaced(pair.science, variance=variance))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_variance(pair, value):
    """A NaN or infinite variance at an unmasked pixel is refused."""
    variance = pair.template.masked_image.variance.copy()
    variance[5, 7] = value
    with pytest.raises(InputError, match=r"template: variance is NaN or infinite at 1 unmasked"):
        run(pair, template=replaced(pair.template, variance=variance))


def test_non_finite_pixels_masked_no_data_are_accepted(pair):
    """The same bad pixels are fine once masked NO_DATA (the documented way to mark them)."""
    mi = pair.template.masked_image.copy()
    mi.image[40, 50] = np.nan
    mi.variance[5, 7] = -1.0
    mi.set_plane("NO_DATA", ~np.isfinite(mi.image) | (mi.variance <= 0))
    mi.validate("template")


def test_every_pixel_masked(pair):
    """An image whose every pixel is in a bad mask plane is refused as such."""
    bit = pair.science.masked_image.mask_planes["NO_DATA"]
    mask = np.full(SHAPE, 1 << bit, dtype=np.int32)
    with pytest.raises(InputError, match="science: every pixel is masked"):
        run(pair, science=replaced(pair.science, mask=mask))


@pytest.mark.parametrize("which", ["template", "science"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_variance_not_positive_anywhere(pair, which, value):
    """A variance plane zero or negative everywhere is refused as such, not as a few pixels."""
    bad = replaced(getattr(pair, which), variance=np.full(SHAPE, value))
    with pytest.raises(
        InputError,
        match=rf"{which}: variance is zero or negative at every unmasked pixel \(36864 pixels\)",
    ):
        run(pair, **{which: bad})


def all_bad(exposure: Exposure, other: str | None = None) -> MaskedImage:
    """The exposure's masked image flagged BAD everywhere; ``other`` on its first 20 columns."""
    mi = exposure.masked_image.copy()
    mi.set_plane("BAD", np.ones(SHAPE, dtype=bool))
    if other is not None:
        mi.set_plane(other, np.arange(SHAPE[1]) < 20)
    return mi


@pytest.mark.parametrize("which", ["template", "science"])
@pytest.mark.parametrize(
    "other, planes", [(None, "BAD"), ("NO_DATA", "BAD or NO_DATA"), ("SAT", "BAD or SAT")]
)
def test_every_pixel_bad(pair, which, other, planes):
    """An image with no pixel outside BAD and the bad planes is refused, naming its planes.

    BAD pixels are used unless badMaskPlanes says otherwise, but an image that is BAD
    everywhere leaves nothing to subtract (its difference was published, all BAD).
    """
    with pytest.raises(
        InputError, match=rf"^{which}: every pixel is masked {planes}: nothing to subtract; "
    ):
        run(pair, **{which: all_bad(getattr(pair, which), other)})
    # One row left unflagged is enough to go on.
    mi = all_bad(getattr(pair, which), other)
    mi.mask[100] = 0
    mi.validate(which, ("NO_DATA", "EDGE", "SAT"))


def test_variance_shape_differs(pair):
    """A variance plane of another shape is refused, with both shapes."""
    with pytest.raises(
        InputError, match=r"variance shape \(191, 192\) differs from image shape \(192, 192\)"
    ):
        replaced(pair.science, variance=np.ones((191, 192)))
    with pytest.raises(InputError, match=r"variance of shape \(3, 4\) does not match image"):
        MaskedImage.from_image(np.ones((4, 4)), np.ones((3, 4)))


def test_variance_required():
    """from_image without a variance is refused rather than guessed."""
    with pytest.raises(InputError, match="variance is required"):
        MaskedImage.from_image(np.ones((4, 4)))


@pytest.mark.parametrize("mask", [np.zeros((8, 8)), np.zeros((8, 8), dtype=bool)])
def test_mask_not_integer(mask):
    """A float or boolean mask is refused: it must be an integer bit mask."""
    with pytest.raises(InputError, match=r"mask must be an integer bit mask, got dtype"):
        MaskedImage(np.ones((8, 8)), np.ones((8, 8)), mask)


def test_mask_shape_differs():
    """A mask of another shape is refused."""
    with pytest.raises(InputError, match=r"mask shape \(8, 7\) differs from image shape"):
        MaskedImage(np.ones((8, 8)), np.ones((8, 8)), np.zeros((8, 7), dtype=np.int32))


@pytest.mark.parametrize("value", [2**40, -1])
def test_mask_values_beyond_31_bits(value):
    """A wide-integer mask with bits int32 cannot hold is refused, not silently truncated."""
    mask = np.zeros((8, 8), dtype=np.int64)
    mask[2, 3] = value
    with pytest.raises(InputError, match=r"mask values must be bits 0\.\.30"):
        MaskedImage(np.ones((8, 8)), np.ones((8, 8)), mask)


def test_mask_plane_bit_out_of_range():
    """A mask plane numbered beyond bit 30 is refused."""
    with pytest.raises(InputError, match="mask plane 'CUSTOM' has bit 40"):
        MaskedImage(np.ones((4, 4)), np.ones((4, 4)), mask_planes={"CUSTOM": 40})


def test_input_not_an_image(pair):
    """What is no image (a list of rows) is refused, naming the input and what is accepted.

    (A bare array is a plain image since the API takes what the command line takes:
    ``tests/pipeline/test_api.py``.)
    """
    rows = pair.template.masked_image.image.tolist()
    with pytest.raises(InputError, match=r"template: an image must be .*\(array, WCS"):
        run(pair, template=rows)


@pytest.mark.parametrize("fwhm", [-3.0, 0.0, np.nan, np.inf])
def test_psf_fwhm_not_positive_finite(pair, fwhm):
    """A PSF FWHM that is not a positive finite number is refused (it was silently ignored)."""
    template = Exposure(pair.template.masked_image, psf_fwhm=fwhm)
    with pytest.raises(InputError, match="PSF FWHM of an exposure is .* positive, finite"):
        run(pair, template=template)


# --- alignment ---------------------------------------------------------------------------


def test_no_wcs_overlap(wcs_pair):
    """Exposures whose WCS do not overlap on the sky cannot be aligned."""
    far = wcs_pair.template.wcs.deepcopy()
    far.wcs.crval = far.wcs.crval + np.array([40.0, 10.0])
    template = Exposure(wcs_pair.template.masked_image, far)
    with pytest.raises(InputError, match=r"do not overlap on the sky \(no WCS overlap\)"):
        run(wcs_pair, template=template)


def test_alignment_with_a_wcs_missing(wcs_pair):
    """Grids that need aligning but lack a WCS: the message names the exposure without one."""
    mi = wcs_pair.template.masked_image
    cut = MaskedImage(mi.image[:90], mi.variance[:90], mi.mask[:90], mi.mask_planes)
    with pytest.raises(InputError, match="needs a WCS on both exposures; the template has none"):
        run(wcs_pair, template=Exposure(cut))
    with pytest.raises(InputError, match="needs a WCS on both exposures; the science has none"):
        warp_exposure(wcs_pair.template, Exposure(wcs_pair.science.masked_image), WarpingConfig())


# --- FITS files --------------------------------------------------------------------------


def test_fits_random_bytes(tmp_path):
    """A file of random bytes is not a readable FITS file."""
    path = tmp_path / "noise.fits"
    path.write_bytes(np.random.default_rng(0).bytes(8000))
    with pytest.raises(InputError, match="is not a readable FITS file"):
        read_exposure(path)


def test_fits_truncated(tmp_path, pair):
    """A FITS file written by write_exposure and cut in half is reported as truncated."""
    path = tmp_path / "science.fits"
    write_exposure(path, pair.science)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="is truncated or corrupt"):
        read_exposure(path)


def test_fits_missing(tmp_path):
    """A FITS path that does not exist is a StoreError naming it."""
    with pytest.raises(StoreError, match=r"missing\.fits' does not exist"):
        read_exposure(tmp_path / "missing.fits")


@pytest.mark.parametrize("value", [-1.0, np.nan])
def test_fits_variance_unusable_everywhere(tmp_path, pair, value):
    """A stored exposure whose variance is unusable at every pixel is refused on reading.

    A few such pixels are flagged NO_DATA; all of them were too, and the image was then
    refused as "every pixel is masked", which hid the variance.
    """
    variance = pair.science.masked_image.variance.copy()
    variance[3:5, 7] = value
    path = tmp_path / "science.fits"
    write_exposure(path, Exposure(replaced(pair.science, variance=variance)))
    assert read_exposure(path).masked_image.plane("NO_DATA").sum() == 2
    write_exposure(
        path, Exposure(replaced(pair.science, variance=np.full(SHAPE, value))), overwrite=True
    )
    kind = "negative" if value < 0 else "NaN or infinite"
    message = (
        rf"science\.fits': variance is {kind} at every pixel with data \(36864 pixels\); "
        "its VARIANCE extension must hold strictly positive variances$"
    )
    with pytest.raises(InputError, match=message):
        read_exposure(path)
    with pytest.raises(InputError, match=message):
        ingest(path, tmp_path / "science.zarr")
    assert not list(tmp_path.glob("science.zarr*"))


def test_nddata_variance_negative_everywhere(pair):
    """An NDData whose uncertainty gives no positive variance anywhere is refused as such."""
    from astropy.nddata import NDData, VarianceUncertainty

    nd = NDData(pair.science.masked_image.image, uncertainty=VarianceUncertainty(-np.ones(SHAPE)))
    with pytest.raises(
        InputError, match=r"NDData: variance is negative at every pixel with data \(36864 pixels\)"
    ):
        from_nddata(nd)


# --- Zarr image groups -------------------------------------------------------------------


@pytest.fixture
def zarr_image(tmp_path):
    """A valid 64x64 image group in 32-px chunks, open for editing."""
    path = tmp_path / "image.zarr"
    write_image(path, MaskedImage.from_image(np.ones((64, 64)), 1.0), chunks=32)
    return path, zarr.open_group(str(path), mode="r+")


def test_zarr_group_missing_an_array(zarr_image):
    """An image group without its variance array is refused, naming the array."""
    path, group = zarr_image
    del group["variance"]
    with pytest.raises(StoreError, match="array 'variance' is missing"):
        ZarrImage.open(path)


@pytest.mark.parametrize(
    "name, dtype, message",
    [
        ("mask", "float32", "array 'mask' has dtype float32; it must be an integer dtype"),
        ("image", "int32", "array 'image' has dtype int32; it must be a floating dtype"),
    ],
)
def test_zarr_array_wrong_dtype(zarr_image, name, dtype, message):
    """A float mask or an integer image array is refused with its dtype."""
    path, group = zarr_image
    del group[name]
    group.create_array(name, shape=(64, 64), chunks=(32, 32), dtype=dtype)
    with pytest.raises(StoreError, match=message):
        ZarrImage.open(path)


def test_zarr_array_wrong_shape(zarr_image):
    """An array whose shape differs from the group's is refused."""
    path, group = zarr_image
    del group["variance"]
    group.create_array("variance", shape=(64, 60), chunks=(32, 32), dtype="float32")
    with pytest.raises(StoreError, match=r"'variance' has shape \(64, 60\), but the group's"):
        ZarrImage.open(path)


def test_zarr_mismatched_chunks(zarr_image):
    """An array chunked differently from the group's tiles is refused."""
    path, group = zarr_image
    del group["mask"]
    group.create_array("mask", shape=(64, 64), chunks=(16, 16), dtype="int32")
    with pytest.raises(StoreError, match=r"mismatched tile grid: array 'mask' has chunks"):
        ZarrImage.open(path)


@pytest.mark.parametrize("kind", ["directory", "file", "empty directory"])
def test_path_not_a_zarr_store(tmp_path, kind):
    """A directory or file that is not a Zarr store is refused as such."""
    path = tmp_path / "thing.zarr"
    if kind == "file":
        path.write_text("not zarr")
    else:
        path.mkdir()
        if kind == "directory":
            (path / "notes.txt").write_text("not zarr")
    with pytest.raises(StoreError, match="is not a Zarr v3 store"):
        ZarrImage.open(path)


def test_zarr_store_missing(tmp_path):
    """A store path that does not exist is refused."""
    with pytest.raises(StoreError, match=r"nothing\.zarr' does not exist"):
        ZarrImage.open(tmp_path / "nothing.zarr")


def test_zarr_group_not_written_by_diffkernel(tmp_path):
    """A Zarr group without the diffkernel attribute is refused as foreign."""
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="has no 'diffkernel' attribute"):
        ZarrImage.open(tmp_path / "foreign.zarr")


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("kernel.active.kernelSize", 20, r"kernel\.AL\.kernelSize = 20: must be odd and >= 3"),
        ("kernel.active.maxSpatialIterations", 0, r"maxSpatialIterations = 0: must be in 1\.\.5"),
        ("kernel.active.spatialKernelOrder", 99, r"spatialKernelOrder = 99: must be in 0\.\.6"),
        ("selectMeasurement.minSnr", -1.0, r"selectMeasurement\.minSnr = -1\.0: must be >= 0"),
    ],
)
def test_config_field_out_of_range(pair, key, value, message):
    """Out-of-range values are refused by validate() and by run(), naming the field path."""
    config = MakeKernelConfig()
    config.set(key, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()
    with pytest.raises(ConfigError, match=message):
        run(pair, config=config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "kernel.active.kernelSize",
            "21",
            r"'kernelSize' of PsfMatchConfigAL expects int, got '21'",
        ),
        ("kernel.active.kernelSize", 21.0, r"expects int, got 21\.0 \(float\)"),
        ("kernel.active.fitForBackground", 1, r"expects bool, got 1 \(int\)"),
        ("kernel.AL.alardSigGauss", "0.7", r"expects list\[float\] \(a list or tuple\)"),
        ("kernel.name", "Al", r"must be one of 'AL', 'DF'; got 'Al'"),
        ("selectMeasurement.minSnr", float("nan"), "must be a number, got nan"),
    ],
)
def test_config_field_wrong_type(key, value, message):
    """A value of the wrong type (or not among the choices) is refused on assignment."""
    config = MakeKernelConfig()
    with pytest.raises(ConfigError, match=message):
        config.set(key, value)


def test_config_unknown_field_in_code():
    """Misspelt field names are refused with a suggestion, however they are set."""
    config = MakeKernelConfig()
    with pytest.raises(ConfigError, match="unknown config field 'kernal'.*did you mean 'kernel'"):
        config.kernal = 1
    with pytest.raises(ConfigError, match="'kernelsize' in PsfMatchConfigAL; did you mean"):
        config.kernel.active.kernelsize = 21
    with pytest.raises(ConfigError, match=r"config key 'kernel\.active\.kernalSize': unknown"):
        config.set("kernel.active.kernalSize", 21)
    with pytest.raises(ConfigError, match="unknown config field 'foo' in MakeKernelConfig"):
        MakeKernelConfig(foo=1)


@pytest.mark.parametrize(
    "name, text",
    [
        ("config.toml", "[kernel.active]\nkernalSize = 21\n"),
        ("config.json", json.dumps({"kernel": {"active": {"kernalSize": 21}}})),
        ("dotted.json", json.dumps({"kernel.active.kernalSize": 21})),
    ],
)
def test_config_unknown_field_in_file(tmp_path, name, text):
    """An unknown key in a TOML/JSON config file is refused, naming the file and the key."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(
        ConfigError,
        match=rf"config file '.*{name}': config key 'kernel\.active\.kernalSize': unknown",
    ):
        MakeKernelConfig.from_file(path)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("types.json", '{"kernel": {"AL": {"kernelSize": "big"}}}', "expects int, got 'big'"),
        ("syntax.toml", "kernel = [1, 2", "is not valid TOML"),
        ("syntax.json", '{"kernel": ', "is not valid JSON"),
        ("list.json", "[1, 2]", "must hold a table of fields, got list"),
        ("config.yaml", "kernel: {}", r"unknown format '\.yaml'; use \.toml or \.json"),
    ],
)
def test_config_file_bad(tmp_path, name, text, message):
    """Badly typed values, syntax errors, non-table content and unknown formats are refused."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        MakeKernelConfig.from_file(path)


def test_config_file_out_of_range_is_caught_by_validate(tmp_path):
    """A config file with an out-of-range value loads, and validate() names the field."""
    path = tmp_path / "config.toml"
    path.write_text('kernel.name = "DF"\n[kernel.DF]\nkernelSize = 4\n')
    config = MakeKernelConfig.from_file(path)
    with pytest.raises(ConfigError, match=r"kernel\.DF\.kernelSize = 4: must be odd"):
        config.validate()


def test_task_config_not_a_config():
    """MakeKernelTask refuses a config that is not a MakeKernelConfig."""
    with pytest.raises(ConfigError, match="config must be a MakeKernelConfig, got dict"):
        MakeKernelTask({"kernel.name": "DF"})


@pytest.mark.parametrize(
    "field",
    [
        "badMaskPlanes",
        "detectionConfig.badMaskPlanes",
        "warpingConfig.growFullMask",
        "afwBackgroundConfig.ignoredPixelMask",
    ],
)
def test_config_mask_plane_unknown(pair, field):
    """A plane name that is not standard and that neither input declares (a typo such as
    SATT would let saturated stars through) is refused, naming the field and the planes."""
    config = MakeKernelConfig()
    config.set(f"kernel.active.{field}", ("NO_DATA", "SATT"))
    config.validate()  # a well-formed name: only the inputs tell it is no plane
    message = (
        rf"invalid config kernel\.AL\.{re.escape(field)} = \('NO_DATA', 'SATT'\): "
        r"no mask plane 'SATT' \(standard planes: BAD, SAT, .*\); correct the name or remove it"
    )
    with pytest.raises(ConfigError, match=message):
        run(pair, config=config)


def test_config_mask_plane_declared_by_an_input(pair):
    """A plane only one input declares is known: it is named in other errors' lists and
    is usable in badMaskPlanes."""
    mi = pair.science.masked_image
    planes = {**mi.mask_planes, "STREAK": 12}
    science = Exposure(MaskedImage(mi.image, mi.variance, mi.mask, planes), psf_fwhm=3.0)
    config = MakeKernelConfig()
    config.kernel.active.badMaskPlanes = ("NO_DATA", "SAT", "STREAK")
    assert run(pair, science=science, config=config).psfMatchingKernel is not None
    config.kernel.active.badMaskPlanes = ("NO_DATA", "SATT")
    with pytest.raises(ConfigError, match=r"'SATT' .*; the inputs also declare STREAK\)"):
        run(pair, science=science, config=config)


def test_config_core_radius_larger_than_the_stamp(pair):
    """A candidate core that does not fit in the stamp is refused with the largest radius."""
    config = MakeKernelConfig()
    config.kernel.active.candidateCoreRadius = 25
    message = (
        r"invalid config kernel\.AL\.candidateCoreRadius = 25: its 50 px core does not fit "
        r"in the 43 px candidate stamp; use at most 21, or enlarge the stamp"
    )
    with pytest.raises(ConfigError, match=message):
        run(pair, config=config)
    config.kernel.active.candidateCoreRadius = 21
    assert run(pair, config=config).psfMatchingKernel is not None


def test_config_background_bin_larger_than_the_image(pair):
    """A background mesh cell larger than the image is refused, naming the image size."""
    config = MakeKernelConfig()
    config.kernel.active.useAfwBackground = True
    config.kernel.active.afwBackgroundConfig.binSize = 256
    message = (
        r"invalid config kernel\.AL\.afwBackgroundConfig\.binSize = 256: larger than the "
        r"192 x 192 image \(a mesh cell must fit in it\); use at most 192"
    )
    with pytest.raises(ConfigError, match=message):
        run(pair, config=config)


# --- kernel sources and candidates -------------------------------------------------------


@pytest.mark.parametrize("sources", [[(10.0, 20.0)], {"x": [10.0], "y": [20.0]}, np.ones((3, 2))])
def test_sources_not_a_table(pair, sources):
    """kernelSources must be an astropy Table."""
    with pytest.raises(InputError, match="kernelSources must be an astropy Table, got"):
        run(pair, sources=sources)


@pytest.mark.parametrize("columns", [{"a": [1.0]}, {"x": [1.0], "dec": [2.0]}, {"ra": [1.0]}])
def test_sources_lack_position_columns(pair, columns):
    """A table without x, y or ra, dec columns is refused, listing its columns."""
    with pytest.raises(InputError, match="kernelSources needs columns x, y or ra, dec; it has"):
        run(pair, sources=Table(columns))


@pytest.mark.parametrize(
    "columns",
    [{"x": ["a"], "y": ["b"]}, {"x": [[1.0, 2.0]], "y": [[3.0, 4.0]]}],
    ids=["strings", "2-D"],
)
def test_sources_position_columns_not_numbers(pair, columns):
    """Position columns must hold one real number per source."""
    with pytest.raises(InputError, match="kernelSources column 'x' must hold one real number"):
        run(pair, sources=Table(columns))


def test_sources_radec_without_science_wcs(pair):
    """ra/dec sources cannot be placed on a science exposure without a WCS."""
    sources = Table({"ra": [150.0], "dec": [2.0]})
    with pytest.raises(InputError, match="gives ra/dec but the science exposure has no WCS"):
        run(pair, sources=sources)


def test_sources_empty(pair):
    """An empty source list leaves no star to fit on."""
    with pytest.raises(NoCandidatesError, match="kernelSources is empty"):
        run(pair, sources=pair.truth.sources[:0])


def test_no_usable_candidate_min_snr(pair):
    """With minSnr out of reach no source qualifies; the message counts each rejection."""
    config = MakeKernelConfig()
    config.selectMeasurement.minSnr = 1e9
    with pytest.raises(
        NoCandidatesError, match=r"none of the \d+ sources is a usable kernel candidate.*low S/N"
    ):
        run(pair, config=config)


def test_no_usable_candidate_all_outside(pair):
    """Sources off the image (or not finite) are no candidates."""
    sources = Table({"x": [-50.0, 10.0, np.nan], "y": [5.0, 500.0, 3.0]})
    with pytest.raises(NoCandidatesError, match=r"none of the 3 sources.*'edge': 2.*not finite"):
        run(pair, sources=sources)


def test_every_candidate_clipped(pair):
    """When clipping rejects every candidate, the error says why and which limits to relax."""
    config = MakeKernelConfig()
    config.kernel.active.candidateResidualStdMax = 1e-6
    with pytest.raises(NoCandidatesError, match=r"all \d+ kernel candidates were rejected"):
        run(pair, config=config)


def test_spatial_fit_ill_conditioned(pair):
    """A spatial system beyond maxSpatialConditionNumber is a SpatialFitError."""
    config = MakeKernelConfig()
    config.kernel.active.checkConditionNumber = True
    config.kernel.active.maxConditionNumber = 1e30
    config.kernel.active.maxSpatialConditionNumber = 1.001
    with pytest.raises(SpatialFitError, match="exceeds maxSpatialConditionNumber"):
        run(pair, config=config)


# --- outputs -----------------------------------------------------------------------------


def test_output_exists_and_is_not_a_result(tmp_path):
    """ResultWriter refuses a foreign path unless overwrite=True, and never touches it early."""
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="exists and is not a diffkernel result"):
        ResultWriter(out)
    writer = ResultWriter(out, overwrite=True)
    writer.abort()
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"]


def test_output_directory_missing(tmp_path):
    """An output whose parent directory does not exist is refused."""
    with pytest.raises(StoreError, match="directory '.*missing' does not exist"):
        ResultWriter(tmp_path / "missing" / "out.zarr")


# --- the Dask service's arguments --------------------------------------------------------


class NoCluster:
    """A client stand-in that fails the test if run_pair tries to use it."""

    def __getattr__(self, name):
        raise AssertionError(f"run_pair contacted the cluster ({name}) before refusing")


@pytest.fixture
def stores(tmp_path, pair):
    """Science and template image stores in 32-px chunks."""
    science = tmp_path / "science.zarr"
    template = tmp_path / "template.zarr"
    write_image(science, pair.science, chunks=32)
    write_image(template, pair.template, chunks=32)
    return science, template


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile_size": 48}, r"tile_size 48 must be a positive multiple of the science chunks"),
        ({"tile_size": 0}, r"tile_size 0 must be a positive multiple"),
        ({"cells_per_task": 0}, "cells_per_task must be at least 1, got 0"),
    ],
)
def test_run_pair_bad_tiling(tmp_path, stores, kwargs, message):
    """Bad tile_size / cells_per_task are refused before any cluster is contacted."""
    science, template = stores
    out = tmp_path / "diff.zarr"
    with pytest.raises(ConfigError, match=message):
        run_pair(science, template, out, client=NoCluster(), **kwargs)
    assert not out.exists()


def test_run_pair_bad_sources_and_config(tmp_path, stores):
    """run_pair refuses a non-Table source list and a non-config before any cluster."""
    science, template = stores
    out = tmp_path / "diff.zarr"
    with pytest.raises(InputError, match="sources must be an astropy Table, got list"):
        run_pair(science, template, out, sources=[(1, 2)], client=NoCluster())
    with pytest.raises(ConfigError, match="config must be a MakeKernelConfig, got dict"):
        run_pair(science, template, out, config={"kernel.name": "DF"}, client=NoCluster())
    config = MakeKernelConfig.default_subtraction()
    config.kernel.active.badMaskPlanes = ("NO_DATA", "SATT")
    with pytest.raises(ConfigError, match=r"badMaskPlanes = .*: no mask plane 'SATT'"):
        run_pair(science, template, out, config=config, client=NoCluster())


def test_run_pair_output_foreign(tmp_path, stores):
    """run_pair refuses to write over something that is not a diffkernel result."""
    science, template = stores
    out = tmp_path / "diff.zarr"
    out.mkdir()
    with pytest.raises(StoreError, match="exists and is not a diffkernel result"):
        run_pair(science, template, out, client=NoCluster())


def test_run_pair_input_not_a_store(tmp_path, stores):
    """run_pair refuses an input path that is not an image store."""
    science, _ = stores
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is not a Zarr v3 store"):
        run_pair(science, tmp_path / "plain", tmp_path / "diff.zarr", client=NoCluster())


# --- bad pixels through the Dask service and the command line -------------------------


def spoiled(pair, which: str, spoil: str) -> Exposure:
    """The pair's ``which`` exposure with variance -1 everywhere, or every pixel BAD."""
    exposure = getattr(pair, which)
    if spoil == "negative variance":
        return Exposure(replaced(exposure, variance=np.full(SHAPE, -1.0)))
    return Exposure(all_bad(exposure, "NO_DATA"))


@pytest.mark.parametrize("which", ["template", "science"])
@pytest.mark.parametrize(
    "spoil, message",
    [
        ("negative variance", "variance is zero or negative at every unmasked pixel "),
        ("every pixel BAD", "every pixel is masked BAD or NO_DATA: nothing to subtract; "),
    ],
    ids=["negative-variance", "every-pixel-bad"],
)
def test_run_pair_refuses_bad_pixels_everywhere(
    tmp_path, monkeypatch, pair, client, which, spoil, message
):
    """The check stage, adding up the counts of its tiles, refuses what MakeKernelTask does."""
    # Nine check tiles per image (the driver draws the grid), NO_DATA in only three of them.
    monkeypatch.setattr("diffkernel.pipeline.dask.checks.CHECK_TILE", 64)
    inputs = {"template": pair.template, "science": pair.science}
    inputs[which] = spoiled(pair, which, spoil)
    for name, exposure in inputs.items():
        write_image(tmp_path / "pair.zarr", exposure, group=name, chunks=64)
    out = tmp_path / "diff.zarr"
    with pytest.raises(InputError, match=f"^{which}: {message}"):
        run_pair(
            (tmp_path / "pair.zarr", "science"),
            (tmp_path / "pair.zarr", "template"),
            out,
            client=client,
            sources=pair.truth.sources,
        )
    assert result_status(out) == "missing"


@pytest.mark.parametrize(
    "spoil, message",
    [
        ("negative variance", r"science\.fits': variance is negative at every pixel with data "),
        ("every pixel BAD", "science: every pixel is masked BAD or NO_DATA: nothing to subtract; "),
    ],
    ids=["negative-variance", "every-pixel-bad"],
)
def test_cli_subtract_refuses_bad_pixels_everywhere(tmp_path, pair, client, capsys, spoil, message):
    """``diffkernel subtract`` of such a FITS science image: one line, exit 2, no output."""
    science, template = tmp_path / "science.fits", tmp_path / "template.fits"
    write_exposure(science, spoiled(pair, "science", spoil))
    write_exposure(template, pair.template)
    pair.truth.sources.write(tmp_path / "sources.ecsv")
    out = tmp_path / "diff.zarr"
    args = [
        "subtract", str(science), str(template), "--out", str(out),
        "--sources", str(tmp_path / "sources.ecsv"), "--chunks", "64",
        "--scheduler", client.scheduler.address, "--quiet",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(f"^diffkernel subtract: error: .*{message}", err) and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".diff.zarr*"))


# --- the subtraction's arguments ---------------------------------------------------------


@pytest.fixture(scope="module")
def result(pair):
    return run(pair)


@pytest.mark.parametrize("tile_size", [0, -5, 2.5, "64", True])
def test_subtract_tile_size_invalid(pair, result, tile_size):
    """A tile size that is not a positive integer is refused (-5 gave uninitialized memory)."""
    with pytest.raises(InputError, match="tile_size must be a positive integer"):
        subtract_images(pair.template, pair.science, result, tile_size=tile_size)


def test_subtract_result_not_a_result(pair):
    """subtract_images needs the MakeKernelResult, not something else."""
    with pytest.raises(InputError, match="result must be the MakeKernelResult"):
        subtract_images(pair.template, pair.science, None)


def test_subtract_shapes_differ(pair, result):
    """Subtracting images of another shape than the science is refused."""
    small = MaskedImage.from_image(np.ones((120, 192)), 1.0)
    with pytest.raises(InputError, match=r"template shape \(120, 192\) differs from science"):
        subtract_images(small, pair.science, result)


def test_fits_path_is_a_directory(tmp_path):
    """A directory given as a FITS file is refused, naming the path as given."""
    with pytest.raises(StoreError, match=re.escape(f"{str(tmp_path)!r} is a directory")):
        read_exposure(tmp_path)


@pytest.mark.parametrize("with_exempt", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_validation_counts(with_exempt, dtype):
    """Counts of bad pixels outside exempt planes, with and without exempt pixels present."""
    from diffkernel.image import pixel_validation_counts

    rng = np.random.default_rng(11)
    image = rng.normal(size=(40, 50)).astype(dtype)
    variance = rng.uniform(0.5, 2.0, (40, 50)).astype(dtype)
    image[rng.random((40, 50)) < 0.05] = np.nan
    variance[rng.random((40, 50)) < 0.05] = np.inf
    variance[rng.random((40, 50)) < 0.05] = -1.0
    variance[rng.random((40, 50)) < 0.02] = 0.0
    mask = np.zeros((40, 50), dtype=np.int32)
    if with_exempt:
        mask[rng.random((40, 50)) < 0.3] = 1 << 3
    mask[rng.random((40, 50)) < 0.1] |= 1 << 1  # a bit that is not exempt
    mask[rng.random((40, 50)) < 0.2] |= 1 << 0  # unusable (BAD), though not exempt
    used = (mask & (1 << 3)) == 0
    expected = {
        "used": int(used.sum()),
        "nan_image": int((used & np.isnan(image)).sum()),
        "nonfinite_variance": int((used & ~np.isfinite(variance)).sum()),
        "nonpositive_variance": int((used & np.isfinite(variance) & (variance <= 0)).sum()),
        "usable": int((used & ((mask & 1) == 0)).sum()),
        "masked BAD": int((mask & 1).astype(bool).sum()),
        "masked NO_DATA": int((mask & 8).astype(bool).sum()),
    }
    unusable = {"BAD": 0, "NO_DATA": 3}
    assert pixel_validation_counts(image, variance, mask, 1 << 3, unusable) == expected
    assert all(expected[k] > 0 for k in expected if k != "masked NO_DATA" or with_exempt)
    # Counts of tiles add up to the image's (how the Dask check stage combines them).
    tiles = [
        pixel_validation_counts(
            image[y : y + 16, x : x + 16],
            variance[y : y + 16, x : x + 16],
            mask[y : y + 16, x : x + 16],
            1 << 3,
            unusable,
        )
        for y in range(0, 40, 16)
        for x in range(0, 50, 16)
    ]
    assert {k: sum(t[k] for t in tiles) for k in expected} == expected
