"""Where the tile convolutions run: on the CPU (numpy, scipy.fft) or a CUDA GPU (CuPy).

The convolution of a tile is a handful of large FFTs and elementwise products, the
part of the pipeline a GPU speeds up most; it is written once against the small
interface of :class:`ArrayBackend`. The fit (small dense matrices, float64) stays on
the CPU. CuPy is an optional dependency (``pip install "diffkernel[gpu]"``): asking
for ``device="gpu"`` without it, or without a CUDA device, is an error that says so,
never a silent fall back to the CPU.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from scipy import fft as scipy_fft

from ..errors import ConfigError

__all__ = ["DEVICES", "ArrayBackend", "array_backend", "check_device"]

#: Devices the convolutions can run on.
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class ArrayBackend:
    """An array module and its FFTs, with transfers to and from host memory.

    Attributes
    ----------
    device : str
        ``"cpu"`` or ``"gpu"``.
    xp : module
        ``numpy``, or ``cupy``.
    """

    device: str
    xp: ModuleType

    @property
    def on_host(self) -> bool:
        """Whether arrays live in host memory (no transfers needed)."""
        return self.device == "cpu"

    def to_device(self, values: np.ndarray) -> Any:
        """``values`` as an array of this backend (no copy on the CPU)."""
        return np.asarray(values) if self.on_host else self.xp.asarray(values)

    def to_host(self, values: Any) -> np.ndarray:
        """``values`` as a numpy array in host memory."""
        return np.asarray(values) if self.on_host else self.xp.asnumpy(values)

    def rfft2(self, values: Any, shape: tuple[int, int], workers: int | None = None) -> Any:
        """2-D real FFT zero-padded to ``shape`` over the last two axes."""
        if self.on_host:
            return scipy_fft.rfft2(values, shape, workers=workers)
        return self.xp.fft.rfft2(values, s=shape)

    def ifft(self, values: Any, axis: int, workers: int | None = None) -> Any:
        """Inverse complex FFT along ``axis``; ``values`` may be overwritten."""
        if self.on_host:
            return scipy_fft.ifft(values, axis=axis, workers=workers, overwrite_x=True)
        return self.xp.fft.ifft(values, axis=axis)

    def irfft(self, values: Any, n: int, axis: int, workers: int | None = None) -> Any:
        """Inverse real FFT of length ``n`` along ``axis``; ``values`` may be overwritten."""
        if self.on_host:
            return scipy_fft.irfft(values, n, axis=axis, workers=workers, overwrite_x=True)
        return self.xp.fft.irfft(values, n, axis=axis)


_CPU = ArrayBackend("cpu", np)


def check_device(device: str) -> None:
    """Refuse a device name that is not one of :data:`DEVICES` (ConfigError)."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")


def array_backend(device: str = "cpu") -> ArrayBackend:
    """The :class:`ArrayBackend` of ``device``.

    Raises
    ------
    ConfigError
        For an unknown device, or ``"gpu"`` without CuPy or without a CUDA device.
    """
    check_device(device)
    if device == "cpu":
        return _CPU
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as err:
        raise ConfigError(
            "device='gpu' needs CuPy and a CUDA GPU, but CuPy is not installed "
            f"({err}); install it with pip install 'diffkernel[gpu]' (or the cupy wheel "
            "for your CUDA version), or use device='cpu'"
        ) from err
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as err:  # CuPy raises its own CUDA errors when no driver is present
        raise ConfigError(
            f"device='gpu' needs a CUDA GPU, but CUDA reports none usable ({err}); use device='cpu'"
        ) from err
    if count < 1:
        raise ConfigError("device='gpu' needs a CUDA GPU, but none is visible; use device='cpu'")
    return ArrayBackend("gpu", cupy)
