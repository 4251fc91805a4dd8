"""Zarr storage: image groups and result stores.

Modules
-------
:mod:`~diffkernel.io.zarr.layout`
    The on-disk layout: attribute keys and version, JSON and float codecs for attributes,
    argument and group checks, WCS cards.
:mod:`~diffkernel.io.zarr.image`
    :class:`ZarrImage`, an image group read region by region.
:mod:`~diffkernel.io.zarr.write`
    Writing image groups: :func:`write_image`, :func:`create_image_arrays`,
    :func:`write_tile`.
:mod:`~diffkernel.io.zarr.cache`
    The per-process LRU chunk cache and opened-array cache.
:mod:`~diffkernel.io.zarr.chunkio`
    Whole-chunk reads and writes straight from the chunk files.
:mod:`~diffkernel.io.zarr.results`
    Result stores: :class:`ResultWriter`, :func:`open_result`, :func:`result_status`.

The main functions are importable from here.
"""

from .cache import clear_chunk_cache
from .image import ZarrImage
from .results import ResultStore, ResultWriter, open_result, result_status
from .write import create_image_arrays, write_image, write_tile

__all__ = [
    "ResultStore",
    "ResultWriter",
    "ZarrImage",
    "clear_chunk_cache",
    "create_image_arrays",
    "open_result",
    "result_status",
    "write_image",
    "write_tile",
]
