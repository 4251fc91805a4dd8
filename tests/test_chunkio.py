"""Direct chunk decoding (diffkernel.chunkio) against zarr's own reading."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec, TransposeCodec, ZstdCodec

from diffkernel.chunkio import chunk_reader
from diffkernel.errors import StoreError
from diffkernel.store import clear_chunk_cache


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
    reader = chunk_reader(array)
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


def test_unwritten_chunks_are_the_fill_value(tmp_path):
    array = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=(40, 40), chunks=(16, 16), dtype="f4", fill_value=np.nan
    )
    array[20:30, 20:30] = 1.0  # writes only the chunks (1, 1) and beyond
    reader = chunk_reader(array)
    np.testing.assert_array_equal(reader.region(0, 40, 0, 40), array[:])
    assert np.isnan(reader.chunk(0, 0)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compressors": GzipCodec()},
        {"serializer": BytesCodec(endian="big")},
        {"filters": [TransposeCodec(order=(1, 0))]},
        {"serializer": ShardingCodec(chunk_shape=(8, 8))},
    ],
    ids=["gzip", "big-endian", "transpose-filter", "sharded"],
)
@pytest.mark.filterwarnings("ignore:Combining a `sharding_indexed` codec")
def test_other_layouts_are_left_to_zarr(tmp_path, kwargs):
    values = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    array = _array(tmp_path, values, **kwargs)
    assert chunk_reader(array) is None


def test_memory_store_and_v2_are_left_to_zarr(tmp_path):
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), dtype="f4")
    assert chunk_reader(in_memory) is None
    v2 = zarr.create_array(
        str(tmp_path / "v2.zarr"), shape=(8, 8), chunks=(4, 4), dtype="f4", zarr_format=2
    )
    assert chunk_reader(v2) is None
    three_d = zarr.create_array(str(tmp_path / "3d.zarr"), shape=(2, 8, 8), dtype="f4")
    assert chunk_reader(three_d) is None


@pytest.mark.parametrize(
    "damage",
    [lambda raw: raw[: len(raw) // 2], lambda raw: b"not a chunk at all" * 3, lambda raw: b""],
    ids=["truncated", "garbage", "empty"],
)
@pytest.mark.parametrize("compressors", [BloscCodec(), ZstdCodec(), None], ids=str)
def test_damaged_chunk_is_an_error_naming_it(tmp_path, damage, compressors):
    values = np.random.default_rng(2).normal(size=(32, 32)).astype(np.float32)
    array = _array(tmp_path, values, compressors=compressors)
    path = tmp_path / "store.zarr" / "a" / "c" / "1" / "0"
    path.write_bytes(damage(path.read_bytes()))
    reader = chunk_reader(array)
    np.testing.assert_array_equal(reader.chunk(0, 0), values[:16, :16])  # others still read
    with pytest.raises(StoreError, match=r"cannot decode chunk .*a/c/1/0"):
        reader.region(0, 32, 0, 32)


def test_zarr_image_reads_through_it(tmp_path):
    """ZarrImage's direct and cached reads use the chunk reader and equal zarr's values."""
    from diffkernel.simulate import make_pair
    from diffkernel.store import write_image

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
