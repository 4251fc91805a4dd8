"""What every command shares: the exit status of a failed verdict and the config loader."""

from __future__ import annotations

__all__ = ["EXIT_QUALITY_FAIL", "load_config"]

#: Exit status of a run whose result was written but judged ``fail``.
EXIT_QUALITY_FAIL = 3


def load_config(path: str | None):
    """The subtraction defaults (a fitted background), updated by the config file."""
    from ..config import MakeKernelConfig

    base = MakeKernelConfig.default_subtraction()
    cfg = base if path is None else MakeKernelConfig.from_file(path, base=base)
    cfg.validate()
    return cfg
