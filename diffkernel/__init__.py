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

Everything but the errors is loaded on first use, so ``import diffkernel`` (and with it
``diffkernel --help``) imports neither numpy nor astropy nor Dask.
The README's "Code map" says where each layer lives.
"""

import importlib
from typing import Any

from .errors import (
    ConfigError,
    DiffkernelError,
    InputError,
    NoCandidatesError,
    SpatialFitError,
    StoreError,
)

__version__ = "0.1.0"

#: Public names loaded on first use, and the module that defines each.
_LAZY = {
    "MakeKernelConfig": "config",
    "PsfMatchConfigAL": "config",
    "PsfMatchConfigDF": "config",
    "DEFAULT_MASK_PLANES": "image",
    "Exposure": "image",
    "MaskedImage": "image",
    "subtract_images": "pipeline.serial",
    "MakeKernelResult": "pipeline.serial",
    "MakeKernelTask": "pipeline.serial",
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
    "DiffkernelError",
    "InputError",
    "NoCandidatesError",
    "SpatialFitError",
    "StoreError",
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
