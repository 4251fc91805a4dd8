"""HOTPANTS as a reference, for the benchmarks: its inputs, its command and its residuals.

HOTPANTS (single-threaded C) gets the same pixels, the same noise (``-tni`` / ``-ini``:
sigma images from diffkernel's variance planes), the same bad pixels (``-tmi`` /
``-imi``), the same kernel half-width (10 px: 21x21), spatial kernel order 2 and
background order 1; its Gaussians default to diffkernel's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

__all__ = [
    "hotpants_command",
    "hotpants_residual_std",
    "hotpants_run",
    "robust_std",
    "write_hotpants_inputs",
]


def robust_std(values: np.ndarray) -> float:
    """1.4826 times the median absolute deviation."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def write_hotpants_inputs(exposures: dict, tmp: Path) -> dict[str, Path]:
    """HOTPANTS' input files (image, noise, mask of ``science`` and ``template``) in ``tmp``."""
    from astropy.io import fits

    from diffkernel import MakeKernelConfig

    bad = tuple(MakeKernelConfig().kernel.active.badMaskPlanes)
    paths: dict[str, Path] = {}
    for name, exp in exposures.items():
        mi = exp.masked_image
        for plane, values in (
            ("image", mi.image.astype(np.float32)),
            ("noise", np.sqrt(mi.variance).astype(np.float32)),
            ("mask", ((mi.mask & mi.bitmask(bad)) != 0).astype(np.int16)),
        ):
            paths[f"{name}-{plane}"] = tmp / f"hp-{name}-{plane}.fits"
            fits.writeto(paths[f"{name}-{plane}"], values, overwrite=True)
    return paths


def hotpants_command(exe: str, paths: dict[str, Path], out: Path) -> list[str]:
    """The HOTPANTS command line; it writes ``out/hp-diff.fits`` and ``out/hp-zdiff.fits``."""
    return [
        exe,
        "-inim", str(paths["science-image"]), "-tmplim", str(paths["template-image"]),
        "-ini", str(paths["science-noise"]), "-tni", str(paths["template-noise"]),
        "-imi", str(paths["science-mask"]), "-tmi", str(paths["template-mask"]),
        "-outim", str(out / "hp-diff.fits"), "-ond", str(out / "hp-zdiff.fits"),
        "-n", "i", "-c", "t", "-r", "10", "-ko", "2", "-bgo", "1",
        "-tu", "1e30", "-iu", "1e30", "-tl", "-1e30", "-il", "-1e30",
    ]  # fmt: skip


def hotpants_residual_std(out: Path) -> float:
    """Robust std of HOTPANTS' difference / sigma written in ``out``."""
    from astropy.io import fits

    z = fits.getdata(out / "hp-zdiff.fits").astype(np.float64)
    valid = np.isfinite(z) & (np.abs(z) > 1e-20)  # HOTPANTS fills bad pixels with 1e-30
    return robust_std(z[valid])


def hotpants_run(exposures: dict, tmp: Path) -> tuple[float, float] | str:
    """Wall time of HOTPANTS on a pair and the robust std of its difference / sigma.

    Returns why it was skipped when no ``hotpants`` executable is on PATH.
    """
    exe = shutil.which("hotpants")
    if exe is None:
        return "skipped (no hotpants executable on PATH)"
    paths = write_hotpants_inputs(exposures, tmp)
    command = hotpants_command(exe, paths, tmp)
    t0 = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    seconds = time.perf_counter() - t0
    return seconds, hotpants_residual_std(tmp)
