"""Tests of diffkernel.io.zarr: image groups, the chunk cache, digests, ingest and result stores."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS

from diffkernel.errors import InputError, StoreError
from diffkernel.image import Exposure, MaskedImage
from diffkernel.io.fits import read_exposure, write_exposure
from diffkernel.io.inputs import ingest, open_input
from diffkernel.io.nddata import from_nddata, to_nddata
from diffkernel.io.zarr import cache as chunk_caches
from diffkernel.io.zarr import write as image_writing
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.io.zarr.layout import ATTR_KEY, json_safe
from diffkernel.io.zarr.results import ResultWriter, open_result, result_status
from diffkernel.io.zarr.write import create_image_arrays, write_image, write_tile
from diffkernel.kernel.basis import alard_lupton_basis, delta_function_basis
from diffkernel.kernel.spatial import SpatialFunctions, SpatialSolution

SHAPE = (100, 130)
CHUNKS = 32


def _wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [20.0, 16.0]
    wcs.wcs.cd = [[-5.0e-5, 1.0e-6], [1.0e-6, 5.0e-5]]
    return wcs


def _exposure(float32_valued: bool, seed: int = 1) -> Exposure:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, size=SHAPE)
    variance = rng.uniform(20.0, 30.0, size=SHAPE)
    if float32_valued:
        image, variance = image.astype(np.float32), variance.astype(np.float32)
    image[3, 4] = np.nan
    mi = MaskedImage(image, variance)
    mi.set_plane("SAT", mi.image > 108)
    mi.set_plane("MY_VERY_LONG_PLANE", mi.image < 92)
    meta = {
        "OBJECT": "field-1",
        "EXPTIME": np.float64(30.0),
        "NCOMBINE": 3,
        "FLAG": True,
        "BAD_NAN": float("nan"),
        "A_LIST": [1, 2],
    }
    return Exposure(mi, wcs=_wcs(), psf_fwhm=3.25, meta=meta)


@pytest.fixture
def exposure() -> Exposure:
    return _exposure(float32_valued=True)


@pytest.fixture
def image(tmp_path: Path, exposure: Exposure) -> ZarrImage:
    return write_image(tmp_path / "image.zarr", exposure, chunks=CHUNKS)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(chunk_caches.CACHE_ENV_VAR, raising=False)
    chunk_caches.clear_chunk_cache()
    yield
    chunk_caches.clear_chunk_cache()


def _assert_same_pixels(a: MaskedImage, b: MaskedImage) -> None:
    for name in ("image", "variance", "mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bit-identical, NaNs included
    assert a.mask_planes == b.mask_planes


def _assert_same_wcs(a: WCS, b: WCS) -> None:
    y, x = np.mgrid[0 : SHAPE[0] : 9, 0 : SHAPE[1] : 9]
    np.testing.assert_array_equal(
        np.array(a.pixel_to_world_values(x, y)), np.array(b.pixel_to_world_values(x, y))
    )


def _siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# ---------------------------------------------------------------- image round trips


@pytest.mark.parametrize("float32_valued, dtype", [(True, np.float32), (False, np.float64)])
def test_round_trip_keeps_dtype_and_values(tmp_path: Path, float32_valued: bool, dtype) -> None:
    """Stored losslessly: float32 when exact, else float64; everything else survives."""
    exp = _exposure(float32_valued)
    img = write_image(tmp_path / "a.zarr", exp, chunks=CHUNKS, origin=(10, 20))
    assert img.dtype == dtype
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert root["variance"].dtype == dtype and root["mask"].dtype == np.int32
    back = ZarrImage.open(tmp_path / "a.zarr").to_exposure()
    _assert_same_pixels(back.masked_image, exp.masked_image)
    _assert_same_wcs(back.wcs, exp.wcs)
    assert back.psf_fwhm == 3.25
    assert back.meta == {"OBJECT": "field-1", "EXPTIME": 30.0, "NCOMBINE": 3, "FLAG": True}
    assert img.shape == SHAPE and img.chunks == (CHUNKS, CHUNKS)
    assert img.origin == (10, 20) and img.group is None
    assert img.mask_planes == exp.masked_image.mask_planes
    assert len(img.uid) == 32 and img.path == (tmp_path / "a.zarr").absolute()


def test_dtype_chosen_per_array(tmp_path: Path) -> None:
    """A float32-valued image with a float64-valued variance keeps both exact."""
    exp = _exposure(float32_valued=True)
    exp.masked_image.variance += 1e-9
    img = write_image(tmp_path / "a.zarr", exp, chunks=CHUNKS)
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert root["image"].dtype == np.float32 and root["variance"].dtype == np.float64
    _assert_same_pixels(img.to_exposure().masked_image, exp.masked_image)


def test_layout_on_disk(image: ZarrImage) -> None:
    """Arrays, codecs and attributes as documented (layout 1)."""
    root = zarr.open_group(str(image.path), mode="r")
    for name in ("image", "variance"):
        (codec,) = root[name].compressors
        assert isinstance(codec, zarr.codecs.BloscCodec)
        assert codec.cname.value == "lz4" and codec.clevel == 5
        assert codec.shuffle.value == "shuffle"
    (codec,) = root["mask"].compressors
    assert isinstance(codec, zarr.codecs.ZstdCodec) and codec.level == 1
    info = root.attrs[ATTR_KEY]
    assert info["layout"] == 1 and info["kind"] == "image"
    assert info["shape"] == list(SHAPE) and info["chunks"] == [CHUNKS, CHUNKS]
    assert info["origin"] == [0, 0] and info["psf_fwhm"] == 3.25
    assert info["wcs"]["CTYPE1"] == "RA---TAN"
    assert info["created"].endswith("+00:00")
    json.dumps(info, allow_nan=False)


def test_masked_image_callable_psf_and_chunk_clipping(tmp_path: Path, exposure: Exposure) -> None:
    """A MaskedImage has no WCS; a callable PSF is dropped; tiles are clipped to the shape."""
    img = write_image(tmp_path / "mi.zarr", exposure.masked_image)
    assert img.chunks == SHAPE and img.wcs is None and img.psf_fwhm is None and img.meta == {}
    exposure.psf_fwhm = lambda x, y: 3.0
    img = write_image(tmp_path / "callable.zarr", exposure, chunks=(16, 64))
    assert img.psf_fwhm is None and img.chunks == (16, 64)


def test_each_write_gets_a_new_uid(tmp_path: Path, exposure: Exposure) -> None:
    a = write_image(tmp_path / "a.zarr", exposure)
    b = write_image(tmp_path / "a.zarr", exposure, overwrite=True)
    assert a.uid != b.uid


def test_ingest_fits_and_nddata(tmp_path: Path, exposure: Exposure) -> None:
    """FITS files and NDData are stored as their readers return them."""
    exposure.meta = {"OBJECT": "field-1"}
    write_exposure(tmp_path / "in.fits", exposure)
    expected = read_exposure(tmp_path / "in.fits")
    for source, name in ((tmp_path / "in.fits", "fits"), (str(tmp_path / "in.fits"), "str")):
        back = ingest(source, tmp_path / f"{name}.zarr", chunks=CHUNKS).to_exposure()
        _assert_same_pixels(back.masked_image, expected.masked_image)
        _assert_same_wcs(back.wcs, exposure.wcs)
        assert back.psf_fwhm == 3.25 and back.meta["OBJECT"] == "field-1"
    back = ingest(to_nddata(exposure), tmp_path / "nd.zarr", chunks=CHUNKS).to_exposure()
    # (from_nddata flags NaN pixels in the NDData's own arrays, so convert afresh.)
    _assert_same_pixels(back.masked_image, from_nddata(to_nddata(exposure)).masked_image)
    _assert_same_wcs(back.wcs, exposure.wcs)
    assert back.psf_fwhm == 3.25
    back = ingest(exposure.masked_image, tmp_path / "mi.zarr").to_exposure()
    _assert_same_pixels(back.masked_image, exposure.masked_image)


def test_ingest_refuses_other_types(tmp_path: Path) -> None:
    # (An array is a plain image now, as (array, WCS) is: tests/pipeline/test_api.py.)
    with pytest.raises(InputError, match="an image must be .* got list"):
        ingest([[0.0] * 4] * 4, tmp_path / "x.zarr")
    with pytest.raises(InputError, match="data must be a diffkernel Exposure"):
        write_image(tmp_path / "x.zarr", np.zeros((4, 4)))
    with pytest.raises(StoreError, match="does not exist"):
        ingest(tmp_path / "missing.fits", tmp_path / "x.zarr")
    assert _siblings(tmp_path) == []


def test_open_input_takes_every_kind(tmp_path: Path, exposure: Exposure) -> None:
    """Zarr groups open in place; FITS files and in-memory images are stored in ``work``."""
    work = tmp_path / "work"
    exposure.meta = {"OBJECT": "field-1"}
    write_exposure(tmp_path / "in.fits", exposure)
    stored = write_image(tmp_path / "pair.zarr", exposure, group="science", chunks=CHUNKS)
    opened = open_input(f"{tmp_path / 'pair.zarr'}#science", work, "unused")
    assert (opened.path, opened.group, opened.uid) == (stored.path, "science", stored.uid)
    assert open_input(opened, work, "unused") is opened
    sources = {"fits": tmp_path / "in.fits", "nd": to_nddata(exposure), "exp": exposure}
    for name, source in sources.items():
        image = open_input(source, work, name, chunks=CHUNKS)
        assert image.path == work / f"{name}.zarr" and image.chunks == (CHUNKS, CHUNKS)
    assert sorted(p.name for p in work.iterdir()) == ["exp.zarr", "fits.zarr", "nd.zarr"]
    with pytest.raises(InputError, match="an image must be .* got list"):
        open_input([[0.0] * 4] * 4, work, "bad")


# ---------------------------------------------------------------- reading regions


REGIONS = [
    (0, 100, 0, 130),  # everything
    (5, 20, 7, 9),  # inside one tile
    (30, 70, 20, 100),  # across tile boundaries
    (31, 33, 63, 65),  # a 2x2 box on a tile corner
    (90, 100, 120, 130),  # bottom-right edge, partial tile
    (96, 100, 0, 130),  # last rows
    (0, 1, 129, 130),  # one pixel at the edge
    (40, 40, 10, 50),  # empty
]


@pytest.mark.parametrize("region", REGIONS)
def test_read_equals_slicing_and_cached_equals_uncached(
    image: ZarrImage, exposure: Exposure, region: tuple[int, int, int, int]
) -> None:
    y0, y1, x0, x1 = region
    mi = exposure.masked_image
    expected = MaskedImage(
        mi.image[y0:y1, x0:x1], mi.variance[y0:y1, x0:x1], mi.mask[y0:y1, x0:x1], mi.mask_planes
    )
    direct = image.read(*region)
    _assert_same_pixels(direct, expected)
    assert direct.image.dtype == np.float64 and direct.mask.dtype == np.int32
    for _ in range(2):  # cold, then warm cache
        _assert_same_pixels(image.read(*region, cached=True), direct)


@pytest.mark.parametrize(
    "region", [(-1, 10, 0, 10), (0, 101, 0, 10), (0, 10, 5, 131), (10, 5, 0, 10), (0, 1.5, 0, 1)]
)
def test_read_outside_the_image_raises(image: ZarrImage, region) -> None:
    with pytest.raises(InputError, match="outside the image|must be an integer"):
        image.read(*region)
    with pytest.raises(InputError):
        image.read(*region, cached=True)


def test_chunk_cache_is_bounded(image: ZarrImage, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget of three float64 tiles, reads stay correct and the cache small."""
    budget_mb = 3 * CHUNKS * CHUNKS * 8 / 2**20
    monkeypatch.setenv(chunk_caches.CACHE_ENV_VAR, str(budget_mb))
    chunk_caches.clear_chunk_cache()
    whole = image.read(0, 100, 0, 130)
    for region in REGIONS:
        _assert_same_pixels(image.read(*region, cached=True), image.read(*region))
    cache = chunk_caches.chunk_cache()
    assert 0 < cache.nbytes <= cache.max_bytes == int(budget_mb * 2**20)
    monkeypatch.setenv(chunk_caches.CACHE_ENV_VAR, "0")
    chunk_caches.clear_chunk_cache()
    _assert_same_pixels(image.read(0, 100, 0, 130, cached=True), whole)
    assert len(chunk_caches.chunk_cache()) == 0
    monkeypatch.setenv(chunk_caches.CACHE_ENV_VAR, "lots")
    chunk_caches.clear_chunk_cache()
    with pytest.raises(InputError, match="DIFFKERNEL_CHUNK_CACHE_MB .* got 'lots'"):
        image.read(0, 1, 0, 1, cached=True)


# ---------------------------------------------------------------- digest and pickling


def test_digest_independent_of_chunking(tmp_path: Path, exposure: Exposure) -> None:
    a = write_image(tmp_path / "a.zarr", exposure, chunks=32)
    b = write_image(tmp_path / "b.zarr", exposure, chunks=(17, 50))
    for name in ("image", "variance", "mask"):
        assert a.digest(name) == b.digest(name)
    # The definition: dtype, shape, then the little-endian row-major bytes.
    values = exposure.masked_image.image.astype("<f4")
    expected = hashlib.sha256(b"<f4|(100, 130)|" + values.tobytes()).hexdigest()
    assert a.digest("image") == expected


def test_digest_changes_with_one_pixel(tmp_path: Path, exposure: Exposure) -> None:
    a = write_image(tmp_path / "a.zarr", exposure, chunks=CHUNKS)
    exposure.masked_image.image[77, 101] += 1.0
    exposure.masked_image.mask[5, 5] ^= 1
    b = write_image(tmp_path / "b.zarr", exposure, chunks=CHUNKS)
    assert a.digest("image") != b.digest("image")
    assert a.digest("mask") != b.digest("mask")
    assert a.digest("variance") == b.digest("variance")
    with pytest.raises(InputError, match="got 'weights'"):
        a.digest("weights")


def test_pickle_reopens_arrays(image: ZarrImage) -> None:
    image.read(0, 10, 0, 10)  # opens and keeps the array handles
    payload = pickle.dumps(image)
    assert b"zarr.core" not in payload and len(payload) < 4000
    clone = pickle.loads(payload)
    assert clone._arrays == {}
    assert (clone.path, clone.group, clone.shape, clone.uid) == (
        image.path,
        image.group,
        image.shape,
        image.uid,
    )
    assert clone.dtype == image.dtype and clone.mask_planes == image.mask_planes
    _assert_same_pixels(clone.read(20, 50, 30, 90, cached=True), image.read(20, 50, 30, 90))


# ---------------------------------------------------------------- validation


def _replace(path: Path, name: str, shape=SHAPE, chunks=(CHUNKS, CHUNKS), dtype="f4") -> None:
    root = zarr.open_group(str(path), mode="r+")
    del root[name]
    root.create_array(name, shape=shape, chunks=chunks, dtype=dtype)


def test_missing_array(image: ZarrImage) -> None:
    del zarr.open_group(str(image.path), mode="r+")["variance"]
    with pytest.raises(StoreError, match="array 'variance' is missing"):
        ZarrImage.open(image.path)


@pytest.mark.parametrize(
    "name, dtype, message",
    [
        ("mask", "f4", "array 'mask' has dtype float32; it must be an integer"),
        ("image", "i4", "array 'image' has dtype int32; it must be a floating"),
        ("variance", "bool", "array 'variance' has dtype bool"),
    ],
)
def test_wrong_dtype(image: ZarrImage, name: str, dtype: str, message: str) -> None:
    _replace(image.path, name, dtype=dtype)
    with pytest.raises(StoreError, match=message):
        ZarrImage.open(image.path)


def test_wrong_shape(image: ZarrImage) -> None:
    _replace(image.path, "variance", shape=(100, 129))
    with pytest.raises(StoreError, match=r"array 'variance' has shape \(100, 129\)"):
        ZarrImage.open(image.path)


def test_mismatched_chunks(image: ZarrImage) -> None:
    _replace(image.path, "mask", chunks=(32, 16), dtype="i4")
    with pytest.raises(StoreError, match="mismatched tile grid: array 'mask'"):
        ZarrImage.open(image.path)


def test_missing_group_attrs_and_layout(tmp_path: Path, image: ZarrImage) -> None:
    with pytest.raises(StoreError, match="no group 'science' in store"):
        ZarrImage.open(image.path, "science")
    root = zarr.open_group(str(image.path), mode="r+")
    info = root.attrs[ATTR_KEY]
    root.attrs[ATTR_KEY] = {**info, "layout": 2}
    with pytest.raises(StoreError, match="layout version 2 is unknown"):
        ZarrImage.open(image.path)
    root.attrs[ATTR_KEY] = {k: v for k, v in info.items() if k != "chunks"}
    with pytest.raises(StoreError, match="attribute diffkernel.chunks is missing"):
        ZarrImage.open(image.path)
    del root.attrs[ATTR_KEY]
    with pytest.raises(StoreError, match="has no 'diffkernel' attribute"):
        ZarrImage.open(image.path)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ZarrImage.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="'.*plain' is not a Zarr v3 store"):
        ZarrImage.open(tmp_path / "plain")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(StoreError, match="file.txt' is not a Zarr v3 store"):
        ZarrImage.open(tmp_path / "file.txt")


# ---------------------------------------------------------------- atomic writes and groups


def test_atomic_write_refuses_overwrite(tmp_path: Path, exposure: Exposure) -> None:
    target = tmp_path / "a.zarr"
    first = write_image(target, exposure, chunks=CHUNKS)
    assert _siblings(tmp_path) == ["a.zarr"]
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        write_image(target, _exposure(False, seed=2), chunks=CHUNKS)
    assert ZarrImage.open(target).uid == first.uid
    second = write_image(target, _exposure(False, seed=2), chunks=CHUNKS, overwrite=True)
    assert second.uid != first.uid and second.dtype == np.float64
    assert _siblings(tmp_path) == ["a.zarr"]
    with pytest.raises(StoreError, match="directory .* does not exist"):
        write_image(tmp_path / "no" / "a.zarr", exposure)


def test_failed_write_leaves_nothing(
    tmp_path: Path, exposure: Exposure, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(image_writing, "_fill_image_group", boom)
    with pytest.raises(StoreError, match="failed to write .*disk full"):
        write_image(tmp_path / "a.zarr", exposure)
    assert _siblings(tmp_path) == []


def test_sub_groups(tmp_path: Path, exposure: Exposure) -> None:
    pair = tmp_path / "pair.zarr"
    sci = write_image(pair, exposure, group="science", chunks=CHUNKS)
    tpl = write_image(pair, _exposure(False, seed=3), group="template", chunks=CHUNKS)
    assert sci.group == "science" and tpl.dtype == np.float64
    _assert_same_pixels(ZarrImage.open(pair, "science").read(0, 100, 0, 130), exposure.masked_image)
    with pytest.raises(StoreError, match="group 'science' already exists in store"):
        write_image(pair, exposure, group="science")
    again = write_image(pair, exposure, group="science", overwrite=True, chunks=16)
    assert again.chunks == (16, 16) and ZarrImage.open(pair, "template").uid == tpl.uid
    with pytest.raises(StoreError, match="store '.*pair.zarr' has no 'diffkernel' attribute"):
        ZarrImage.open(pair)
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is not a Zarr v3 store"):
        write_image(tmp_path / "plain", exposure, group="science")
    with pytest.raises(InputError, match="not a valid group name"):
        write_image(pair, exposure, group="a/../b")


# ---------------------------------------------------------------- lazily written groups


def test_create_image_arrays_and_write_tile(tmp_path: Path) -> None:
    path = tmp_path / "diff.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    node = create_image_arrays(
        root, "difference", SHAPE, CHUNKS, {"BAD": 0, "EDGE": 4}, _wcs(), (5, 6), meta={"A": 1}
    )
    assert node.attrs[ATTR_KEY]["kind"] == "image"
    img = ZarrImage.open(path, "difference")
    assert img.dtype == np.float32 and img.origin == (5, 6) and img.meta == {"A": 1}
    _assert_same_wcs(img.wcs, _wcs())
    empty = img.read(0, 100, 0, 130, cached=True)
    assert np.isnan(empty.image).all() and np.isnan(empty.variance).all()
    assert not empty.mask.any()

    rng = np.random.default_rng(0)
    tile = rng.normal(size=(32, 64))
    write_tile(path, "difference", 32, 64, tile, tile**2, np.full((32, 64), 16))
    edge = rng.normal(size=(4, 34))  # the bottom-right corner, ending on the image edge
    write_tile(path, "difference", 96, 96, edge, edge**2, np.ones((4, 34), dtype=np.int64))
    for cached in (True, False):  # the cached read sees the new tiles
        back = img.read(0, 100, 0, 130, cached=cached)
        np.testing.assert_array_equal(back.image[32:64, 64:128], tile.astype(np.float32))
        np.testing.assert_array_equal(back.variance[96:, 96:], (edge**2).astype(np.float32))
        assert (back.mask[32:64, 64:128] == 16).all() and (back.mask[96:, 96:] == 1).all()
        assert np.isnan(back.image[:32]).all()
    with pytest.raises(StoreError, match="'difference' already exists"):
        create_image_arrays(root, "difference", SHAPE, CHUNKS, {})


def test_write_tile_refusals(tmp_path: Path) -> None:
    path = tmp_path / "diff.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    create_image_arrays(root, "difference", SHAPE, CHUNKS, {})
    ones, mask = np.ones((10, 10)), np.zeros((10, 10), dtype=np.int32)
    with pytest.raises(InputError, match="not aligned to the tile grid"):
        write_tile(path, "difference", 5, 0, ones, ones, mask)
    write_tile(path, "difference", 5, 0, ones, ones, mask, check_alignment=False)
    assert ZarrImage.open(path, "difference").read(5, 15, 0, 10).image.sum() == 100
    with pytest.raises(InputError, match="outside the image"):
        write_tile(path, "difference", 96, 0, ones, ones, mask)
    with pytest.raises(InputError, match="tile variance shape"):
        write_tile(path, "difference", 0, 0, ones, ones[:5], mask)
    with pytest.raises(InputError, match="tile mask must be an integer"):
        write_tile(path, "difference", 0, 0, ones, ones, ones)
    with pytest.raises(StoreError, match="no group 'science'"):
        write_tile(path, "science", 0, 0, ones, ones, mask)
    with pytest.raises(InputError, match="must be floating"):
        create_image_arrays(root, "other", SHAPE, CHUNKS, {}, dtype=np.int32)


# ---------------------------------------------------------------- result stores


def _solution(with_background: bool = True) -> SpatialSolution:
    rng = np.random.default_rng(7)
    bbox = (0.0, 0.0, 129.0, 99.0)
    if with_background:
        basis = alard_lupton_basis(7, (1.0, 2.0), (2, 1))
        bg_functions = SpatialFunctions("polynomial", 1, bbox)
        bg_coeffs = rng.normal(size=bg_functions.size)
    else:
        basis = delta_function_basis(3)
        bg_functions, bg_coeffs = None, np.zeros(0)
    functions = SpatialFunctions("chebyshev1", 2, bbox)
    coeffs = rng.normal(size=(basis.size, functions.size))
    n_free = coeffs.size + bg_coeffs.size
    covariance = np.cov(rng.normal(size=(n_free, n_free + 3))) if with_background else None
    condition = 1234.5678 if with_background else float("inf")
    notes = ["spatial order lowered to 1"] if with_background else []
    return SpatialSolution(
        basis, functions, coeffs, bg_functions, bg_coeffs, condition, covariance, notes
    )


def _candidates() -> Table:
    table = Table(
        {
            "id": np.arange(5, dtype=np.int64),
            "x": np.linspace(10.0, 90.0, 5),
            "flux": np.array([1.5, 2.5, 3.5, np.nan, 5.5], dtype=np.float32),
            "status": np.array(["GOOD", "BAD", "GOOD", "", "rejected"]),
            "reason": np.array(["", "snr", "", "edge", "ksum"], dtype=object),
            "cell": np.array([0, 1, 1, 2, 3], dtype=np.int16),
            "used": np.array([True, False, True, False, False]),
        },
        meta={"source": "sep"},
    )
    table["x"].unit = "pix"
    table["x"].description = "column of the centre"
    table["snr"] = MaskedColumn([1.0, 2.0, 3.0, 4.0, 5.0], mask=[0, 0, 1, 0, 0])
    return table


def _assert_same_solution(a: SpatialSolution, b: SpatialSolution) -> None:
    for name in ("kernel_coeffs", "background_coeffs", "covariance"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    for name in ("native_images", "transform"):
        x, y = getattr(a.basis, name), getattr(b.basis, name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    if a.basis.separable is None:
        assert b.basis.separable is None
    else:
        for x, y in zip(a.basis.separable, b.basis.separable, strict=True):
            assert x.tobytes() == y.tobytes()
    for name in ("kind", "kernel_size", "conserves_sum", "groups", "description"):
        assert getattr(a.basis, name) == getattr(b.basis, name), name
    assert a.kernel_functions == b.kernel_functions
    assert a.background_functions == b.background_functions
    assert a.condition == b.condition and a.notes == b.notes


def _write_result(path: Path, solution: SpatialSolution, **kwargs) -> Path:
    writer = ResultWriter(path, **kwargs)
    diff = writer.create_difference(SHAPE, CHUNKS, {"BAD": 0, "NO_DATA": 8}, _wcs())
    ones = np.ones((32, 32))
    write_tile(writer.partial_path, "difference", 0, 0, ones, ones, np.zeros((32, 32), int))
    assert diff.path == writer.partial_path
    metadata = {"rounds": np.int64(3), "ksum": np.float32(0.5), "bad": float("nan")}
    config = {"kernel": {"name": "AL", "sigmas": (0.7, 1.5), "kernelSize": 21}}
    provenance = {"version": "0.1.0", "inputs": [Path("/data/sci.fits")]}
    return writer.finalize(solution, _candidates(), metadata, config, provenance)


@pytest.mark.parametrize("with_background", [True, False])
def test_result_round_trip(tmp_path: Path, with_background: bool) -> None:
    path = tmp_path / "run.zarr"
    solution = _solution(with_background)
    assert _write_result(path, solution) == path.absolute()
    assert _siblings(tmp_path) == ["run.zarr"] and result_status(path) == "complete"
    result = open_result(path)
    _assert_same_solution(result.solution, solution)
    expected = _candidates()
    got = result.candidates
    assert got.colnames == expected.colnames and got.meta == {"source": "sep"}
    for name in expected.colnames:
        want = expected[name] if name != "reason" else expected[name].astype(str)
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want)
    assert got["x"].unit == "pix" and got["x"].description == "column of the centre"
    assert list(got["snr"].mask) == [False, False, True, False, False]
    assert result.metadata == {"rounds": 3, "ksum": 0.5, "bad": None}
    assert result.config == {"kernel": {"name": "AL", "sigmas": [0.7, 1.5], "kernelSize": 21}}
    assert result.provenance == {"version": "0.1.0", "inputs": ["/data/sci.fits"]}
    diff = result.difference
    assert diff.path == path.absolute() and diff.group == "difference"
    assert diff.read(0, 32, 0, 32).image.sum() == 32 * 32
    assert np.isnan(diff.read(40, 50, 40, 50).image).all()
    with pytest.raises(StoreError, match="holds a diffkernel 'result'.*open it with open_result"):
        ZarrImage.open(path)


def test_unfinished_writer_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    writer = ResultWriter(path)
    writer.create_difference(SHAPE, CHUNKS, {})
    assert not path.exists() and writer.partial_path.is_dir()
    assert writer.partial_path.name.startswith("run.zarr.partial-")
    assert result_status(path) == "missing"
    with pytest.raises(StoreError, match="does not exist .*did not finish left"):
        open_result(path)
    writer.abort()
    assert _siblings(tmp_path) == []
    with pytest.raises(StoreError, match="writer .* was already aborted"):
        writer.create_difference(SHAPE, CHUNKS, {})


def test_context_manager_aborts_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="crash"):
        with ResultWriter(tmp_path / "run.zarr") as writer:
            writer.create_difference(SHAPE, CHUNKS, {})
            raise RuntimeError("crash")
    assert _siblings(tmp_path) == []


def test_finalize_needs_a_difference_image(tmp_path: Path) -> None:
    with ResultWriter(tmp_path / "run.zarr") as writer:
        with pytest.raises(StoreError, match="no difference image: call create_difference"):
            writer.finalize(_solution(), _candidates(), {}, {}, {})


def test_fit_written_ahead_of_finalize(tmp_path: Path) -> None:
    """write_fit then finalize(None, None, ...) gives the same store as finalize alone."""
    path = tmp_path / "run.zarr"
    solution = _solution()
    writer = ResultWriter(path)
    writer.create_difference(SHAPE, CHUNKS, {})
    writer.write_fit(solution, _candidates())
    with pytest.raises(StoreError, match="was already written"):
        writer.write_fit(solution, _candidates())
    with pytest.raises(StoreError, match="either given here or written before"):
        writer.finalize(solution, _candidates(), {}, {}, {})
    assert not path.exists()
    writer.finalize(None, None, {"rounds": 1}, {}, {})
    result = open_result(path)
    np.testing.assert_array_equal(result.solution.kernel_coeffs, solution.kernel_coeffs)
    assert len(result.candidates) == len(_candidates())
    assert result.metadata == {"rounds": 1}


@pytest.mark.parametrize("given", [(None, None), ("solution", None), (None, "candidates")])
def test_finalize_needs_the_fit_once(tmp_path: Path, given) -> None:
    with ResultWriter(tmp_path / "run.zarr") as writer:
        writer.create_difference(SHAPE, CHUNKS, {})
        solution = _solution() if given[0] else None
        candidates = _candidates() if given[1] else None
        with pytest.raises(StoreError, match="needs the solution and candidates"):
            writer.finalize(solution, candidates, {}, {}, {})


def test_incomplete_store(tmp_path: Path) -> None:
    """A store whose run crashed after being moved into place reads as incomplete."""
    path = tmp_path / "run.zarr"
    writer = ResultWriter(path)
    writer.create_difference(SHAPE, CHUNKS, {})
    writer.partial_path.rename(path)
    assert result_status(path) == "incomplete"
    with pytest.raises(StoreError, match="is incomplete: the run that wrote it did not finish"):
        open_result(path)
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        ResultWriter(path)


def test_existing_complete_result(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    _write_result(path, _solution())
    with pytest.raises(StoreError, match=r"already exists; pass overwrite=True \(--overwrite\)"):
        ResultWriter(path)
    _write_result(path, _solution(with_background=False), overwrite=True)
    assert open_result(path).solution.background_functions is None
    assert _siblings(tmp_path) == ["run.zarr"]


@pytest.mark.parametrize("kind", ["dir", "file", "image"])
def test_foreign_target(tmp_path: Path, exposure: Exposure, kind: str) -> None:
    path = tmp_path / "run.zarr"
    if kind == "dir":
        path.mkdir()
        (path / "notes.txt").write_text("precious")
    elif kind == "file":
        path.write_text("precious")
    else:
        write_image(path, exposure)
    assert result_status(path) == "foreign"
    with pytest.raises(StoreError, match="is not a diffkernel result; it will not be overwritten"):
        ResultWriter(path)
    with pytest.raises(StoreError, match="is not a diffkernel result store"):
        open_result(path)
    _write_result(path, _solution(), overwrite=True)
    assert result_status(path) == "complete"
    assert _siblings(tmp_path) == ["run.zarr"]


def test_result_status_missing_and_open_errors(tmp_path: Path) -> None:
    assert result_status(tmp_path / "nothing") == "missing"
    with pytest.raises(StoreError, match="nothing' does not exist$"):
        open_result(tmp_path / "nothing")
    with pytest.raises(StoreError, match="directory .* does not exist"):
        ResultWriter(tmp_path / "no" / "run.zarr")


def test_json_safe() -> None:
    value = {
        1: np.int32(2),
        "f": np.float32(0.25),
        "nan": np.nan,
        "inf": -np.inf,
        "t": (1, [np.bool_(True), None]),
        "a": np.arange(3).reshape(1, 3),
        "p": Path("/x/y"),
        "s": {3, 1},
        "o": object,
    }
    safe = json_safe(value)
    assert safe == {
        "1": 2,
        "f": 0.25,
        "nan": None,
        "inf": None,
        "t": [1, [True, None]],
        "a": [[0, 1, 2]],
        "p": "/x/y",
        "s": [1, 3],
        "o": "<class 'object'>",
    }
    assert type(safe["f"]) is float and type(safe["1"]) is int
    json.dumps(safe, allow_nan=False)
