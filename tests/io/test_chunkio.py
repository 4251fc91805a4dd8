"""Direct chunk decoding and encoding (diffkernel.io.zarr.chunkio) against zarr's own."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec, TransposeCodec, ZstdCodec

from diffkernel.errors import StoreError
from diffkernel.io.zarr.cache import clear_chunk_cache
from diffkernel.io.zarr.chunkio import direct_chunks


def _array(tmp_path, values, name="a", chunks=(16, 16), fill_value=0, **kwargs):
    array = zarr.create_array(
        str(tmp_path / "store.zarr"),
        name=name,
        shape=values.shape,
        chunks=chunks,
        dtype=values.dtype,
        fill_value=fill_value,
        **kwargs,
    )
    array[:] = values
    return array


@pytest.mark.parametrize(
    "dtype, compressors",
    [
        (np.float32, BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
        (np.float64, BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")),
        (np.int32, ZstdCodec(level=1)),
        (np.uint16, ZstdCodec(level=3, checksum=True)),
        (np.uint8, None),
        (np.float32, None),
    ],
)
def test_matches_zarr(tmp_path, dtype, compressors):
    """Whole chunks (edge chunks trimmed) and regions equal zarr's reads, dtype included."""
    rng = np.random.default_rng(1)
    values = (rng.normal(0, 50, (45, 38)) + 100).astype(dtype)
    array = _array(tmp_path, values, compressors=compressors)
    reader = direct_chunks(array)
    assert reader is not None
    assert reader.chunk(2, 2).shape == (13, 6)  # the corner chunk, trimmed
    for iy in range(3):
        for ix in range(3):
            expected = array[iy * 16 : (iy + 1) * 16, ix * 16 : (ix + 1) * 16]
            got = reader.chunk(iy, ix)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    for box in [(0, 45, 0, 38), (3, 40, 5, 17), (16, 32, 16, 32), (44, 45, 0, 1), (7, 7, 2, 9)]:
        y0, y1, x0, x1 = box
        got = reader.region(*box)
        assert got.dtype == values.dtype
        np.testing.assert_array_equal(got, values[y0:y1, x0:x1])


@pytest.mark.parametrize(
    "dtype, compressors",
    [
        (np.float32, BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
        (np.float64, BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", blocksize=4096)),
        (np.int32, ZstdCodec(level=1)),
        (np.uint16, ZstdCodec(level=3, checksum=True)),
        (np.float32, None),
    ],
)
def test_written_chunks_read_back_through_zarr(tmp_path, dtype, compressors):
    """Regions written directly, edge chunks included, are what zarr then reads."""
    rng = np.random.default_rng(4)
    array = zarr.create_array(
        str(tmp_path / "w.zarr"),
        shape=(45, 38),
        chunks=(16, 16),
        dtype=dtype,
        fill_value=0,
        compressors=compressors,
    )
    direct = direct_chunks(array)
    expected = np.zeros((45, 38), dtype=dtype)
    for y0, x0, shape in [(0, 0, (16, 32)), (16, 32, (29, 6)), (32, 0, (13, 16))]:
        values = (rng.normal(0, 50, shape) + 100).astype(np.float64)  # cast on writing
        direct.write_region(y0, x0, values)
        expected[y0 : y0 + shape[0], x0 : x0 + shape[1]] = values.astype(dtype)
    np.testing.assert_array_equal(array[:], expected)
    assert array[:].dtype == np.dtype(dtype)


def test_all_fill_chunks_are_not_stored(tmp_path):
    array = zarr.create_array(
        str(tmp_path / "f.zarr"), shape=(32, 32), chunks=(16, 16), dtype="f4", fill_value=np.nan
    )
    direct = direct_chunks(array)
    direct.write_region(0, 0, np.ones((16, 32), dtype="f4"))
    chunk = tmp_path / "f.zarr" / "c" / "0" / "1"
    assert chunk.is_file()
    direct.write_region(0, 16, np.full((16, 16), np.nan, dtype="f4"))
    assert not chunk.exists()  # the old chunk is removed: the fill value is read back
    assert np.isnan(array[0:16, 16:32]).all() and (array[0:16, 0:16] == 1).all()


@pytest.mark.parametrize("y0, x0, shape", [(8, 0, (16, 16)), (0, 0, (10, 16)), (32, 0, (16, 16))])
def test_write_needs_whole_chunks_inside(tmp_path, y0, x0, shape):
    array = zarr.create_array(str(tmp_path / "m.zarr"), shape=(40, 40), chunks=(16, 16), dtype="f4")
    with pytest.raises(ValueError, match="is not made of whole 16x16 chunks"):
        direct_chunks(array).write_region(y0, x0, np.zeros(shape, dtype="f4"))


def test_dot_separated_chunk_keys(tmp_path):
    """The default encoding with '.' separators (c.0.1 files) reads and writes too."""
    values = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    array = _array(tmp_path, values, chunk_key_encoding={"name": "default", "separator": "."})
    direct = direct_chunks(array)
    assert direct is not None
    np.testing.assert_array_equal(direct.region(3, 37, 5, 40), values[3:37, 5:40])
    direct.write_region(16, 0, -values[16:32, :])
    assert (tmp_path / "store.zarr" / "a" / "c.1.0").is_file()
    np.testing.assert_array_equal(array[16:32, :], -values[16:32, :])


def test_unwritten_chunks_are_the_fill_value(tmp_path):
    array = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=(40, 40), chunks=(16, 16), dtype="f4", fill_value=np.nan
    )
    array[20:30, 20:30] = 1.0  # writes only the chunks (1, 1) and beyond
    reader = direct_chunks(array)
    np.testing.assert_array_equal(reader.region(0, 40, 0, 40), array[:])
    assert np.isnan(reader.chunk(0, 0)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compressors": GzipCodec()},
        {"serializer": BytesCodec(endian="big")},
        {"filters": [TransposeCodec(order=(1, 0))]},
        {"serializer": ShardingCodec(chunk_shape=(8, 8))},
        {"chunk_key_encoding": {"name": "v2", "separator": "."}},
    ],
    ids=["gzip", "big-endian", "transpose-filter", "sharded", "v2-keys"],
)
@pytest.mark.filterwarnings("ignore:Combining a `sharding_indexed` codec")
def test_other_layouts_are_left_to_zarr(tmp_path, kwargs):
    values = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    array = _array(tmp_path, values, **kwargs)
    assert direct_chunks(array) is None


def test_memory_store_and_v2_are_left_to_zarr(tmp_path):
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), dtype="f4")
    assert direct_chunks(in_memory) is None
    v2 = zarr.create_array(
        str(tmp_path / "v2.zarr"), shape=(8, 8), chunks=(4, 4), dtype="f4", zarr_format=2
    )
    assert direct_chunks(v2) is None
    three_d = zarr.create_array(str(tmp_path / "3d.zarr"), shape=(2, 8, 8), dtype="f4")
    assert direct_chunks(three_d) is None


@pytest.mark.parametrize(
    "damage",
    [lambda raw: raw[: len(raw) // 2], lambda raw: b"not a chunk at all" * 3, lambda raw: b""],
    ids=["truncated", "garbage", "empty"],
)
@pytest.mark.parametrize(
    "compressors", [BloscCodec(), ZstdCodec(), None], ids=["blosc", "zstd", "raw"]
)
def test_damaged_chunk_is_an_error_naming_it(tmp_path, damage, compressors):
    values = np.random.default_rng(2).normal(size=(32, 32)).astype(np.float32)
    array = _array(tmp_path, values, compressors=compressors)
    path = tmp_path / "store.zarr" / "a" / "c" / "1" / "0"
    path.write_bytes(damage(path.read_bytes()))
    reader = direct_chunks(array)
    np.testing.assert_array_equal(reader.chunk(0, 0), values[:16, :16])  # others still read
    with pytest.raises(StoreError, match=r"cannot decode chunk .*a/c/1/0"):
        reader.region(0, 32, 0, 32)


def test_zarr_image_reads_through_it(tmp_path):
    """ZarrImage's direct and cached reads use the chunk reader and equal zarr's values."""
    from diffkernel.io.zarr.write import write_image
    from diffkernel.simulate import make_pair

    pair = make_pair((70, 90), seed=3, n_stars=5)
    image = write_image(tmp_path / "img.zarr", pair.science, chunks=32)
    assert all(image._reader(name) is not None for name in ("image", "variance", "mask"))
    clear_chunk_cache()
    for cached in (False, True):
        region = image.read(5, 66, 3, 88, cached=cached)
        for name in ("image", "variance", "mask"):
            expected = image._array(name)[5:66, 3:88]
            np.testing.assert_array_equal(getattr(region, name), expected)
    stored = image.read_stored(0, 70, 0, 90)
    assert stored.image.dtype == image._array("image").dtype


def test_rewritten_group_is_read_afresh(tmp_path):
    """Opened arrays are kept per process by the group's uid: a rewrite is not read stale."""
    import pickle

    from diffkernel.io.zarr.image import ZarrImage
    from diffkernel.io.zarr.write import write_image
    from diffkernel.simulate import make_pair

    first = make_pair((64, 64), seed=1, n_stars=3).science
    second = make_pair((48, 80), seed=2, n_stars=3).science
    write_image(tmp_path / "img.zarr", first, chunks=32)
    old = ZarrImage.open(tmp_path / "img.zarr")
    shipped = pickle.loads(pickle.dumps(old))  # as a worker gets it: no arrays open
    np.testing.assert_array_equal(shipped.read(0, 64, 0, 64).image, first.masked_image.image)
    write_image(tmp_path / "img.zarr", second, chunks=16, overwrite=True)
    new = pickle.loads(pickle.dumps(ZarrImage.open(tmp_path / "img.zarr")))
    assert new.uid != old.uid and new.shape == (48, 80)
    for cached in (False, True):
        np.testing.assert_array_equal(
            new.read(0, 48, 0, 80, cached=cached).image, second.masked_image.image
        )
