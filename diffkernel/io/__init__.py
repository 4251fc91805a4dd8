"""Reading and writing: FITS and NDData inputs, Zarr image groups and result stores.

Modules
-------
:mod:`~diffkernel.io.fits`
    FITS files: multi-extension exposures (``IMAGE``/``MASK``/``VARIANCE``) and plain
    images, read and written.
:mod:`~diffkernel.io.header`
    FITS header cards: metadata, mask-plane and PSF cards, the WCS.
:mod:`~diffkernel.io.nddata`
    Conversion to and from astropy NDData/CCDData.
:mod:`~diffkernel.io.inputs`
    The one dispatch on input kinds (FITS path, Zarr group, NDData, Exposure,
    MaskedImage) to an image group: :func:`ingest`, :func:`open_input`.
:mod:`~diffkernel.io.atomic`
    Atomic publishing of files and directories, used by every writer.
:mod:`diffkernel.io.zarr`
    Zarr image groups and result stores.

The main functions are importable from here: :func:`read_exposure`,
:func:`write_exposure`, :func:`to_nddata`, :func:`from_nddata`, :func:`ingest`,
:func:`open_input`, :class:`ZarrImage`, :func:`write_image`, :func:`open_result` and
:func:`result_status`. They are loaded on first use, so that importing the FITS reader
(as ``import diffkernel`` does) does not import zarr.
"""

import importlib
from typing import Any

#: Public name to the module that defines it.
_HOMES = {
    "read_exposure": "fits",
    "write_exposure": "fits",
    "to_nddata": "nddata",
    "from_nddata": "nddata",
    "ingest": "inputs",
    "open_input": "inputs",
    "ZarrImage": "zarr.image",
    "write_image": "zarr.write",
    "open_result": "zarr.results",
    "result_status": "zarr.results",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
