"""diffkernel: PSF-matching kernels and image subtraction.

An open implementation of the Alard & Lupton (1998) / Alard (2000) image subtraction
method with the behaviour of LSST ip_diffim's MakeKernelTask.
"""

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
from .kernel.subtract import subtract_images
from .pipeline.serial import MakeKernelResult, MakeKernelTask

__version__ = "0.1.0"

__all__ = [
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
