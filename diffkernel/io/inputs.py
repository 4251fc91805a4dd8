"""Inputs of every kind as Zarr image groups: the one place that dispatches on input kinds.

The pipeline reads its images from Zarr image groups (:mod:`diffkernel.io.zarr`), so
every input is turned into one here:

========================================  ===============================================
input                                     becomes
========================================  ===============================================
a FITS file (path)                        read by :func:`diffkernel.io.fits.read_exposure`
                                          (which estimates the variance of a plain image),
                                          then stored
a Zarr image store, ``store.zarr#group``  opened as it is (:class:`~.zarr.image.ZarrImage`)
an astropy NDData / CCDData               converted by
                                          :func:`diffkernel.io.nddata.from_nddata`, stored
an Exposure or MaskedImage                stored
========================================  ===============================================

:func:`ingest` stores one input as a new store; :func:`open_input` is what the command
line and the batch runner call: a Zarr input is opened in place, anything else is stored
in a work folder first.
"""

from __future__ import annotations

import os
from pathlib import Path

from astropy.nddata import NDData

from ..errors import InputError
from ..image import Exposure, MaskedImage
from .fits import read_exposure
from .nddata import from_nddata
from .paths import check_chunks, check_fits_memory, overlaps
from .zarr.image import ZarrImage
from .zarr.layout import DEFAULT_CHUNKS, Chunks, PathLike
from .zarr.write import write_image

__all__ = ["ingest", "open_input", "read_sources"]

#: What :func:`ingest` stores.
Source = PathLike | Exposure | MaskedImage | NDData


def ingest(
    source: Source,
    path: PathLike,
    *,
    chunks: Chunks = DEFAULT_CHUNKS,
    overwrite: bool = False,
) -> ZarrImage:
    """Store an image from a FITS file or an in-memory object as an image-group store.

    Parameters
    ----------
    source : str, os.PathLike, Exposure, MaskedImage or astropy.nddata.NDData
        A FITS file (read with :func:`diffkernel.io.fits.read_exposure`, which estimates
        the variance of a plain image), an exposure, or an NDData/CCDData (converted with
        :func:`diffkernel.io.nddata.from_nddata`).
    path : str or os.PathLike
        Store directory, written atomically by
        :func:`~diffkernel.io.zarr.write.write_image`.
    chunks : int or (int, int), optional
        Tile side in pixels.
    overwrite : bool, optional
        Replace an existing store.

    Returns
    -------
    ZarrImage
        The stored image.

    Raises
    ------
    InputError
        If ``source`` is of another type, or unreadable as an image (a FITS file or NDData
        whose variance is unusable at every pixel with data included), larger than this
        machine's memory, or ``path`` itself (even with ``overwrite``); or if ``chunks``
        is outside :data:`~diffkernel.io.paths.MIN_CHUNK`..:data:`~diffkernel.io.paths.MAX_CHUNK`.
    StoreError
        If the FITS file is missing or the store cannot be written.
    """
    check_chunks(chunks)
    if isinstance(source, str | os.PathLike) and overlaps(source, path):
        raise InputError(f"cannot ingest {str(source)!r} onto itself: give another output path")
    return write_image(path, _in_memory(source), chunks=chunks, overwrite=overwrite)


def open_input(
    spec: Source | ZarrImage, work: PathLike, name: str, chunks: Chunks = DEFAULT_CHUNKS
) -> ZarrImage:
    """An input image as a Zarr image group; what is not one yet is stored in ``work``.

    Parameters
    ----------
    spec : str, os.PathLike, ZarrImage, Exposure, MaskedImage or astropy.nddata.NDData
        A Zarr image store, or a group of one as ``store.zarr#group`` (opened in place);
        an opened :class:`~diffkernel.io.zarr.image.ZarrImage` (returned as it is); a FITS
        file or an in-memory image (stored with :func:`ingest`).
    work : str or os.PathLike
        Folder for stored inputs (created when needed).
    name : str
        Name of a stored input (``work/<name>.zarr``).
    chunks : int or (int, int), optional
        Tile side of a stored input.

    Returns
    -------
    ZarrImage

    Raises
    ------
    InputError
        If ``spec`` is of another type or unreadable as an image.
    StoreError
        If a Zarr input is not a diffkernel image group, or ``work/<name>.zarr`` exists.
    """
    if isinstance(spec, ZarrImage):
        return spec
    if isinstance(spec, str | os.PathLike):
        location, _, group = os.fspath(spec).partition("#")
        source = Path(location)
        if not source.is_file():
            return ZarrImage.open(source, group or None)
        spec = source
    check_chunks(chunks)
    data = _in_memory(spec)
    Path(work).mkdir(parents=True, exist_ok=True)
    return write_image(Path(work) / f"{name}.zarr", data, chunks=chunks)


def _in_memory(source: Source) -> Exposure | MaskedImage:
    """The image of a FITS path, an NDData or an exposure, in memory."""
    if isinstance(source, str | os.PathLike):
        check_fits_memory(source)  # refused, not killed by the OOM killer
        return read_exposure(source)
    if isinstance(source, Exposure | MaskedImage):
        return source
    if isinstance(source, NDData):
        return from_nddata(source)
    raise InputError(
        f"source must be a FITS path, an Exposure, a MaskedImage or an astropy NDData, "
        f"got {type(source).__name__}"
    )


def read_sources(path: str | os.PathLike):
    """A table of kernel candidates (``x, y`` or ``ra, dec``) from a file astropy reads.

    Raises
    ------
    InputError
        If the file is missing or not a table astropy can read, naming the file.
    """
    from astropy.table import Table

    if Path(path).is_dir():
        raise InputError(f"sources file {str(path)!r} is a folder, not a table file")
    if not Path(path).is_file():
        raise InputError(f"sources file {str(path)!r} does not exist")
    try:
        return Table.read(path)
    except Exception as exc:  # astropy raises many kinds for a file it cannot parse
        raise InputError(
            f"sources file {str(path)!r} is not a table astropy can read "
            f"(ECSV, FITS, VOTable...): {type(exc).__name__}: {exc}"
        ) from exc
