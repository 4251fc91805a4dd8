"""Exceptions raised by diffkernel.

Every error names the input at fault and, where there is one, the fix. They derive
from the built-in exception a caller would expect (``ValueError`` for bad data or
configuration) so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "DiffkernelError",
    "InputError",
    "ConfigError",
    "NoCandidatesError",
    "SpatialFitError",
    "StoreError",
    "ClusterError",
]


class DiffkernelError(Exception):
    """Base class of every error raised on purpose by diffkernel."""


class InputError(DiffkernelError, ValueError):
    """An input image, table or file is unusable (shape, dtype, NaN, variance, WCS...)."""


class ConfigError(DiffkernelError, ValueError):
    """A configuration field is unknown, of the wrong type or out of its allowed range."""


class NoCandidatesError(DiffkernelError, RuntimeError):
    """No kernel candidate survived selection or clipping, so no kernel can be fit."""


class SpatialFitError(DiffkernelError, RuntimeError):
    """The spatial kernel fit could not be solved (too few candidates, ill-conditioned)."""


class StoreError(DiffkernelError, OSError):
    """A Zarr store or output path is missing, unreadable, incomplete or not ours."""


class ClusterError(DiffkernelError, RuntimeError):
    """The Dask cluster failed the run: workers lost for good, or the run's time ran out."""
