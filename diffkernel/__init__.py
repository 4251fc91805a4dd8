"""diffkernel: PSF-matching kernels and image subtraction.

An open implementation of the Alard & Lupton (1998) / Alard (2000) image subtraction
method with the behaviour of LSST ip_diffim's MakeKernelTask.

The public API, importable from here:

* in memory: :class:`MakeKernelTask` (its config :class:`MakeKernelConfig`, result
  :class:`MakeKernelResult`), :func:`subtract_images`, :func:`assess_quality`;
* on a Dask cluster over Zarr: :func:`run_pair`, :func:`connect`, :func:`run_batch`,
  :func:`apply_result`;
* data: :class:`MaskedImage`, :class:`Exposure`, :func:`read_exposure`,
  :func:`write_exposure`, :func:`ingest`, :func:`open_input`, :class:`ZarrImage`,
  :func:`write_image`, :func:`open_result`, :func:`result_status`;
* the errors, all :class:`DiffkernelError`.

The Dask and Zarr parts are loaded on first use, so ``import diffkernel`` stays quick.
The README's "Code map" says where each layer lives.
"""

import importlib
from typing import Any

from .config import MakeKernelConfig, PsfMatchConfigAL, PsfMatchConfigDF
from .errors import (
    ConfigError,
    DiffkernelError,
    InputError,
    NoCandidatesError,
    SpatialFitError,
    StoreError,
)
from .image import DEFAULT_MASK_PLANES, Exposure, MaskedImage
from .pipeline.serial import MakeKernelResult, MakeKernelTask, subtract_images

__version__ = "0.1.0"

#: Public names loaded on first use, and the module that defines each.
_LAZY = {
    "run_pair": "pipeline.dask.driver",
    "PairRun": "pipeline.dask.driver",
    "apply_result": "pipeline.dask.apply",
    "connect": "pipeline.dask.cluster",
    "run_batch": "batch",
    "assess_quality": "quality",
    "read_exposure": "io.fits",
    "write_exposure": "io.fits",
    "ingest": "io.inputs",
    "open_input": "io.inputs",
    "ZarrImage": "io.zarr.image",
    "write_image": "io.zarr.write",
    "open_result": "io.zarr.results",
    "result_status": "io.zarr.results",
}

__all__ = [
    *sorted(_LAZY),
    "ConfigError",
    "DEFAULT_MASK_PLANES",
    "DiffkernelError",
    "Exposure",
    "InputError",
    "MakeKernelConfig",
    "MakeKernelResult",
    "MakeKernelTask",
    "MaskedImage",
    "NoCandidatesError",
    "SpatialFitError",
    "PsfMatchConfigAL",
    "PsfMatchConfigDF",
    "StoreError",
    "subtract_images",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    attribute = "assess" if name == "assess_quality" else name
    value = getattr(importlib.import_module(f"{__name__}.{home}"), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
