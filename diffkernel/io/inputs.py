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
FITS HDUs, an array, (array, WCS or       read as a plain FITS image
header)                                   (:func:`diffkernel.io.fits.exposure_from_hdus`)
========================================  ===============================================

:func:`read_input` is the same dispatch in memory: what ``MakeKernelTask.run`` and
``diffkernel.subtract_images`` accept.

:func:`ingest` stores one input as a new store; :func:`open_input` is what the command
line and the batch runner call: a Zarr input is opened in place, anything else is stored
in a work folder first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.nddata import NDData
from astropy.wcs import WCS

from ..errors import InputError
from ..image import Exposure, MaskedImage
from .fits import exposure_from_hdus, read_exposure
from .header import SOURCE_KEY, wcs_header
from .nddata import from_nddata
from .paths import check_chunks, check_fits_memory, overlaps
from .zarr.image import ZarrImage
from .zarr.layout import DEFAULT_CHUNKS, Chunks, PathLike
from .zarr.write import write_image

__all__ = ["ingest", "open_input", "read_input", "read_sources"]

#: What :func:`ingest` stores.
Source = PathLike | Exposure | MaskedImage | NDData


def ingest(
    source: Source,
    path: PathLike,
    *,
    chunks: Chunks = DEFAULT_CHUNKS,
    overwrite: bool = False,
    read_options: Mapping[str, Any] | None = None,
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
    read_options : mapping, optional
        Keyword arguments of :func:`~diffkernel.io.fits.read_exposure` for a FITS file
        (``gain``, ``saturation``, ``noise``, ``mask``, ``hdu``, ...).

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
    data = _in_memory(source, read_options)
    return write_image(path, data, chunks=chunks, overwrite=overwrite)


def open_input(
    spec: Source | ZarrImage,
    work: PathLike,
    name: str,
    chunks: Chunks = DEFAULT_CHUNKS,
    read_options: Mapping[str, Any] | None = None,
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
    read_options : mapping, optional
        Keyword arguments of :func:`~diffkernel.io.fits.read_exposure` for a FITS file;
        refused for other inputs, which have their planes already.

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
    options = {k: v for k, v in (read_options or {}).items() if v is not None}
    if isinstance(spec, str | os.PathLike):
        location, _, group = os.fspath(spec).partition("#")
        source = Path(location)
        if not source.is_file():
            _refuse_options(options, source, name)
            return ZarrImage.open(source, group or None)
        spec = source
    if isinstance(spec, ZarrImage):
        _refuse_options(options, spec.path, name)
        return spec
    check_chunks(chunks)
    data = _in_memory(spec, options)
    Path(work).mkdir(parents=True, exist_ok=True)
    return write_image(Path(work) / f"{name}.zarr", data, chunks=chunks)


def _refuse_options(options: Mapping[str, Any], where: Any, name: str) -> None:
    if options:
        raise InputError(
            f"{', '.join(sorted(options))} given for the {name} {str(where)!r}, which is not a "
            "FITS file: a Zarr image group has its planes already"
        )


def _in_memory(
    source: Source, read_options: Mapping[str, Any] | None = None
) -> Exposure | MaskedImage:
    """The image of a FITS path, an NDData, HDUs, (array, WCS) or an exposure, in memory."""
    options = {k: v for k, v in (read_options or {}).items() if v is not None}
    if isinstance(source, str | os.PathLike):
        check_fits_memory(source)  # refused, not killed by the OOM killer
        exposure = read_exposure(source, **options)
        # The store records the file it came from: results name it, not the store.
        exposure.meta[SOURCE_KEY] = str(Path(source).resolve())
        return exposure
    if isinstance(source, Exposure | MaskedImage | NDData):
        _refuse_options(options, type(source).__name__, "input")
        return source if not isinstance(source, NDData) else from_nddata(source)
    hdus = _as_hdus(source)
    if hdus is not None:
        files = {k: v for k, v in options.items() if k in ("noise", "mask")}
        _refuse_options(files, "HDUs", "input")
        plain = {k: v for k, v in options.items() if k not in files}
        return exposure_from_hdus(hdus, name=type(source).__name__, **plain)
    raise InputError(
        "an image must be a FITS path, a Zarr store, an Exposure, a MaskedImage, an astropy "
        "NDData/CCDData, FITS HDUs, an array or (array, WCS or header); "
        f"got {type(source).__name__}"
    )


def _as_hdus(source: Any) -> Any:
    """FITS HDUs for HDUs, an array, or (array, WCS or header) as reproject takes them."""
    if isinstance(source, fits.HDUList | fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        return source
    if isinstance(source, np.ndarray):
        return fits.PrimaryHDU(source)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        array, coords = source
        if isinstance(coords, WCS):
            header = wcs_header(coords)
        elif isinstance(coords, fits.Header):
            header = coords.copy()
        else:
            raise InputError(
                f"(array, ...) takes an astropy WCS or a FITS header second, "
                f"got {type(coords).__name__}"
            )
        return fits.PrimaryHDU(array, header=header)
    return None


def read_input(
    source: Source | ZarrImage, *, name: str = "image", **read_options: Any
) -> Exposure | MaskedImage:
    """Any image the command line or the Python API takes, in memory.

    The one dispatch on input kinds, as reproject's ``parse_input_data``: a FITS file
    (any layout :func:`~diffkernel.io.fits.read_exposure` reads), a Zarr image store
    (``store.zarr`` or ``store.zarr#group``) or an opened
    :class:`~diffkernel.io.zarr.image.ZarrImage`, an :class:`Exposure` or
    :class:`MaskedImage` (as it is), an astropy ``NDData``/``CCDData``
    (:func:`~diffkernel.io.nddata.from_nddata`), FITS HDUs, a 2-D array, or
    ``(array, WCS)`` / ``(array, header)``. Arrays and HDUs are plain images: their
    variance is estimated from the gain and the sky, as for a plain FITS file.

    Parameters
    ----------
    source : see above
        The image.
    name : str, optional
        What to call it in errors (``"science"``, ``"template"``).
    **read_options
        Options of :func:`~diffkernel.io.fits.read_exposure` (``gain``, ``saturation``,
        ``noise``, ``mask``, ``hdu``, ...) for FITS files, HDUs and arrays.

    Returns
    -------
    Exposure or MaskedImage

    Raises
    ------
    InputError
        If ``source`` is of another kind or unreadable, naming ``name``.
    """
    if isinstance(source, ZarrImage):
        return source.to_exposure()
    if isinstance(source, str | os.PathLike):
        location, _, group = os.fspath(source).partition("#")
        if Path(location).is_dir():
            given = {k: v for k, v in read_options.items() if v is not None}
            _refuse_options(given, location, name)
            return ZarrImage.open(location, group or None).to_exposure()
    try:
        return _in_memory(source, read_options)
    except InputError as exc:
        if isinstance(source, str | os.PathLike):
            raise
        raise InputError(f"{name}: {exc}") from None


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
