"""What every command shares: the exit status of a failed verdict and the config loader."""

from __future__ import annotations

__all__ = ["EXIT_QUALITY_FAIL", "load_config", "write_result_fits", "score_fits_path"]

#: Exit status of a run whose result was written but judged ``fail``.
EXIT_QUALITY_FAIL = 3


def load_config(path: str | None):
    """The subtraction defaults (a fitted background), updated by the config file."""
    from ..config import MakeKernelConfig

    base = MakeKernelConfig.default_subtraction()
    cfg = base if path is None else MakeKernelConfig.from_file(path, base=base)
    cfg.validate()
    return cfg


def score_fits_path(fits_out) -> str:
    """Where ``--fits-out F`` puts the score image: ``F`` with ``.score`` before ``.fits``."""
    from pathlib import Path

    path = Path(fits_out)
    stem = path.name[: -len(".fits")] if path.name.endswith(".fits") else path.name
    return str(path.with_name(f"{stem}.score.fits"))


def write_result_fits(result, fits_out, overwrite: bool, cards=None) -> list[str]:
    """The difference as FITS at ``fits_out``, and its score image beside it when it has one."""
    from ..image import Exposure
    from ..io.fits import write_exposure

    written = []
    for image, path in ((result.difference, str(fits_out)), (result.score, None)):
        if image is None:
            continue
        path = path or score_fits_path(fits_out)
        ny, nx = image.shape
        write_exposure(
            path, Exposure(image.read(0, ny, 0, nx), wcs=image.wcs), overwrite=overwrite,
            extra_header=cards,
        )  # fmt: skip
        written.append(path)
    return written
