"""The provenance a Dask run records: software versions, host, time and the inputs' checksums."""

from __future__ import annotations

import platform
import time
from importlib.metadata import version
from typing import Any

import numpy as np

from ... import __version__
from ...io.header import SOURCE_KEY
from ...io.zarr.image import ZarrImage

__all__ = ["provenance"]


def provenance(science: ZarrImage, template: ZarrImage, checksums: dict) -> dict[str, Any]:
    """Where the result comes from.

    Parameters
    ----------
    science, template : ZarrImage
        The inputs as stored.
    checksums : dict
        SHA-256 by ``(image, plane)``, e.g. ``("science", "image")``
        (:meth:`diffkernel.pipeline.dask.checks.InputCheck.validated`).

    Returns
    -------
    dict
        Versions of diffkernel and the libraries that computed it, the host, the UTC
        time, and each input's path (the file it was ingested from, when it was: the
        user's file, not a temporary store), store and group read, uid, shape and
        plane checksums.
    """
    import dask
    import distributed
    import scipy

    def describe(who: str, image: ZarrImage) -> dict[str, Any]:
        return {
            "path": str(image.meta.get(SOURCE_KEY) or image.path),
            "store": str(image.path),
            "group": image.group,
            "uid": image.uid,
            "shape": list(image.shape),
            "sha256": {name: checksums[(who, name)] for name in ("image", "variance", "mask")},
        }

    return {
        "diffkernel": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": version("zarr"),
        "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            "science": describe("science", science),
            "template": describe("template", template),
        },
    }
