"""The difference image as a self-describing FITS file: ``--fits-out`` and the demo.

:func:`write_difference` writes a result store's difference with
:func:`diffkernel.io.fits.write_exposure`, as float32 like the store itself, with a primary
header that tells where it comes from:

* the science image's own cards (``FILTER``, ``EXPTIME``, ``GAIN``, ``MJD-OBS``,
  ``DATE-OBS``, ``OBJECT``, ``AIRMASS``, ...: every card that is not structural) and its
  WCS, since the difference is on the science grid;
* the provenance (:func:`provenance_cards`): ``DKVERS`` (diffkernel's version),
  ``DKSCI`` and ``DKTMPL`` (the input files as the user named them), ``CONVOL``
  (``TEMPLATE`` or ``IMAGE``: which one was convolved, as HOTPANTS writes it), ``KSUM``
  (the kernel sum at the image centre, as HOTPANTS's ``KSUM00``), ``DKCFGSHA`` (a digest of
  every config field, equal for equal configurations);
* the quality verdict's ``DK*`` cards (:func:`diffkernel.quality.fits_cards`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from .. import __version__
from ..image import Exposure
from ..quality import fits_cards
from .fits import write_exposure
from .header import SOURCE_KEY
from .zarr.image import ZarrImage
from .zarr.results import ResultStore

__all__ = ["config_digest", "provenance_cards", "write_difference"]

#: What ``CONVOL`` says for each convolution mode (HOTPANTS calls the science "IMAGE").
_CONVOL = {"convolveTemplate": "TEMPLATE", "convolveScience": "IMAGE"}


def config_digest(config: Mapping[str, Any]) -> str:
    """A short SHA-256 of every config field: equal configurations, equal digests.

    Parameters
    ----------
    config : mapping
        ``MakeKernelConfig.to_dict()`` (or a result store's ``config``).

    Returns
    -------
    str
        The first 16 hex digits.
    """
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance_cards(result: ResultStore) -> dict[str, tuple[Any, str]]:
    """Where a difference comes from, as FITS cards ``{key: (value, comment)}``.

    Parameters
    ----------
    result : ResultStore
        A finished result store.

    Returns
    -------
    dict
        ``DKVERS``, ``DKSCI``, ``DKTMPL``, ``CONVOL``, ``KSUM``, ``DKCFGSHA`` (see the
        module documentation); an entry the store does not record is left out.
    """
    cards: dict[str, tuple[Any, str]] = {
        "DKVERS": (__version__, "diffkernel version"),
    }
    inputs = result.provenance.get("inputs", {})
    for key, who in (("DKSCI", "science"), ("DKTMPL", "template")):
        path = inputs.get(who, {}).get("path")
        if path:
            cards[key] = (str(path), f"{who} input")
    mode = result.metadata.get("mode")
    if mode in _CONVOL:
        cards["CONVOL"] = (_CONVOL[mode], "image convolved: TEMPLATE or IMAGE (science)")
    ny, nx = result.difference.shape
    solution = result.solution
    coefficients = solution.coefficients_at((nx - 1) / 2, (ny - 1) / 2)
    cards["KSUM"] = (float(coefficients @ solution.basis.sums), "kernel sum at the image centre")
    if result.config:
        cards["DKCFGSHA"] = (config_digest(result.config), "SHA-256 of the config, 16 digits")
    return cards


def write_difference(
    path: str | os.PathLike,
    result: ResultStore,
    *,
    image: ZarrImage | None = None,
    overwrite: bool = False,
    extra_header: Mapping[str, Any] | None = None,
) -> None:
    """Write a result's difference as a FITS file (float32) that says where it comes from.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (IMAGE, MASK and VARIANCE extensions, as
        :func:`diffkernel.io.fits.write_exposure` writes them).
    result : ResultStore
        A finished result store (:func:`diffkernel.io.zarr.results.open_result`).
    image : ZarrImage, optional
        Another image of the result on the science grid to write with the same cards
        (its score image); default ``result.difference``.
    overwrite : bool, optional
        Replace an existing file.
    extra_header : mapping, optional
        Further cards, overriding these.

    Raises
    ------
    StoreError
        If ``path`` exists and ``overwrite`` is False, or cannot be written.
    """
    exposure = (result.difference if image is None else image).to_exposure()
    # The science's cards (the difference is on its grid), then the image's own: a score
    # image says BUNIT = S/N.
    meta = {**result.difference.meta, **exposure.meta} if image is not None else exposure.meta
    meta = {k: v for k, v in meta.items() if k != SOURCE_KEY}
    exposure = Exposure(exposure.masked_image, exposure.wcs, exposure.psf_fwhm, meta)
    extra = {**provenance_cards(result), **fits_cards(result.quality), **(extra_header or {})}
    write_exposure(path, exposure, overwrite=overwrite, extra_header=extra, dtype="float32")
