"""Configuration of kernel building: every field of ip_diffim's MakeKernelTask config.

The classes mirror LSST ``ip_diffim``'s ``psfMatch`` / ``makeKernel`` configs so that users
who know those field names can use them unchanged:

* :class:`PsfMatchConfigAL` and :class:`PsfMatchConfigDF` hold the Alard-Lupton and the
  delta-function kernel settings, both built on the shared :class:`PsfMatchConfig`, with the
  sub-configs :class:`WarpingConfig`, :class:`DetectionConfig` and
  :class:`AfwBackgroundConfig`;
* :class:`KernelChoice` holds both and selects one (``kernel.name``, ``kernel.active``);
* :class:`MakeKernelConfig` is the top level, adding the coarse source detection and
  measurement used when no sources are supplied.

Every field is typed and documented. Assignment checks the type (and the allowed choices) at
once; range and consistency rules are checked by ``validate()``. Misspelt field names are
refused with a suggestion. Configs convert to and from nested or dotted-key dicts, TOML and
JSON files.

Examples
--------
>>> config = MakeKernelConfig()
>>> config.kernel.name = "DF"
>>> config.set("kernel.active.kernelSize", 25)
>>> config.kernel.DF.kernelSize
25
>>> config.validate()
"""

from .base import Config, Field
from .parts import (
    AfwBackgroundConfig,
    DetectionConfig,
    SelectDetectionConfig,
    SelectMeasurementConfig,
    WarpingConfig,
)
from .psfmatch import (
    KernelChoice,
    MakeKernelConfig,
    PsfMatchConfig,
    PsfMatchConfigAL,
    PsfMatchConfigDF,
)

__all__ = [
    "Field",
    "Config",
    "DetectionConfig",
    "WarpingConfig",
    "AfwBackgroundConfig",
    "PsfMatchConfig",
    "PsfMatchConfigAL",
    "PsfMatchConfigDF",
    "KernelChoice",
    "SelectDetectionConfig",
    "SelectMeasurementConfig",
    "MakeKernelConfig",
]
