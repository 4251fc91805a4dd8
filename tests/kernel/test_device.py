"""The device choice of the convolutions: CPU, or GPU through CuPy.

No CUDA device is present where these tests run, so the GPU path is exercised
through a stand-in for CuPy: arrays of a numpy subclass that, like CuPy's, refuse
to be mixed with host arrays, with numpy's FFTs behind CuPy's FFT signatures. It
checks the plumbing (what goes to the device, what comes back, which FFTs run);
a test against the real CuPy runs where one is installed with a GPU.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.errors import ConfigError
from diffkernel.kernel.basis import alard_lupton_basis
from diffkernel.kernel.convolve import convolve_region, window
from diffkernel.kernel.device import array_backend
from diffkernel.kernel.spatial import SpatialFunctions, SpatialSolution
from diffkernel.simulate import make_pair


class DeviceArray(np.ndarray):
    """A stand-in for a CuPy array: arithmetic with a host (numpy) array is refused."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.pop("out", ())
        for value in inputs + tuple(out):
            if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
                if value.ndim:
                    raise TypeError("a host array was mixed with a device array")
        host_inputs = [v.view(np.ndarray) if isinstance(v, DeviceArray) else v for v in inputs]
        if out:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in out)
        result = getattr(ufunc, method)(*host_inputs, **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return result.view(DeviceArray) if isinstance(result, np.ndarray) else result


def _device(values):
    return np.asarray(values).view(DeviceArray)


def _host_only(values):
    if not isinstance(values, DeviceArray):
        raise TypeError("a host array was passed where a device array is needed")
    return values.view(np.ndarray)


def fake_cupy(device_count: int = 1) -> types.ModuleType:
    """A module with the part of CuPy's interface diffkernel.kernel.device uses."""
    module = types.ModuleType("cupy")
    module.asarray = lambda values: _device(np.array(values))
    module.asnumpy = lambda values: np.array(_host_only(values))
    module.zeros = lambda shape, dtype=float: _device(np.zeros(shape, dtype))
    module.empty = lambda shape, dtype=float: _device(np.empty(shape, dtype))
    module.fft = types.SimpleNamespace(
        rfft2=lambda a, s=None: _device(np.fft.rfft2(_host_only(a), s=s)),
        ifft=lambda a, axis=-1: _device(np.fft.ifft(_host_only(a), axis=axis)),
        irfft=lambda a, n=None, axis=-1: _device(np.fft.irfft(_host_only(a), n, axis=axis)),
    )
    module.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: device_count)
    )
    return module


def varying_solution():
    basis = alard_lupton_basis(7, (1.0, 2.5), (2, 1))
    rng = np.random.default_rng(61)
    theta = rng.normal(size=(basis.size, 6)) * 0.05
    theta[:, 0] = rng.normal(size=basis.size) * 0.2
    theta[0] = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    functions = SpatialFunctions("chebyshev1", 2, (0.0, 0.0, 99.0, 79.0))
    return SpatialSolution(basis, functions, theta, None, np.zeros(0), 1.0)


def test_cpu_backend_and_unknown_device():
    """The CPU backend is numpy; an unknown device is refused by name."""
    assert array_backend("cpu").xp is np
    with pytest.raises(ConfigError, match="device must be one of cpu, gpu; got 'tpu'"):
        array_backend("tpu")


def test_gpu_without_cupy_is_a_clear_error(monkeypatch):
    """Asking for the GPU without CuPy says what is missing; no silent CPU fallback."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes 'import cupy' fail
    with pytest.raises(ConfigError, match="needs CuPy and a CUDA GPU, but CuPy is not installed"):
        array_backend("gpu")


@pytest.mark.parametrize("count", [0, "raises"])
def test_gpu_without_a_device_is_a_clear_error(monkeypatch, count):
    """CuPy without a visible CUDA device (or without a driver) is refused."""
    module = fake_cupy()
    if count == "raises":

        def no_driver():
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

        module.cuda.runtime.getDeviceCount = no_driver
    else:
        module.cuda.runtime.getDeviceCount = lambda: count
    monkeypatch.setitem(sys.modules, "cupy", module)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        array_backend("gpu")


@pytest.mark.parametrize("precision", ["single", "double"])
def test_gpu_path_matches_the_cpu_path(monkeypatch, precision):
    """The same convolution through the device interface agrees with the CPU to 1e-6."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    sol = varying_solution()
    rng = np.random.default_rng(62)
    image = rng.normal(1000.0, 30.0, size=(80, 100))
    variance = rng.uniform(900.0, 1100.0, size=image.shape)
    mask = np.zeros(image.shape, np.int32)
    mask[30, 40] = 1 << 2
    h = sol.basis.kernel_size // 2
    args = (-h, 80 + h, -h, 100 + h)
    padded = (window(image, *args, 0.0), window(variance, *args, 0.0), window(mask, *args, 0))
    cpu = convolve_region(*padded, sol, 0, 0, precision=precision, device="cpu")
    gpu = convolve_region(*padded, sol, 0, 0, precision=precision, device="gpu")
    for a, b in zip(cpu, gpu, strict=True):
        assert type(b) is np.ndarray  # results come back to host memory
        assert b.dtype == a.dtype
        scale = np.abs(a).max() or 1.0
        assert np.abs(a.astype(float) - b.astype(float)).max() <= 1e-6 * scale


def test_subtraction_on_the_gpu_matches_the_cpu(monkeypatch):
    """subtract_images(device='gpu') gives the CPU's difference, variance and mask.

    In double precision, so that FFT rounding (numpy's against scipy's) stays far
    below 1e-6 of the difference itself; single precision is compared on the
    convolution above.
    """
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    pair = make_pair((256, 256), seed=63, template_depth=4)
    cfg = MakeKernelConfig()
    cfg.kernel.active.spatialKernelOrder = 1
    cfg.kernel.active.sizeCellX = cfg.kernel.active.sizeCellY = 64
    result = MakeKernelTask(cfg).run(pair.template, pair.science, pair.truth.sources)
    kwargs = dict(tile_size=128, precision="double")
    cpu = subtract_images(pair.template, pair.science, result, **kwargs)
    gpu = subtract_images(pair.template, pair.science, result, device="gpu", **kwargs)
    np.testing.assert_array_equal(gpu.mask, cpu.mask)
    good = np.isfinite(cpu.image)
    np.testing.assert_array_equal(np.isfinite(gpu.image), good)
    scale = np.abs(cpu.image[good]).max()
    assert np.abs(gpu.image[good] - cpu.image[good]).max() <= 1e-6 * scale
    assert np.abs(gpu.variance[good] / cpu.variance[good] - 1).max() <= 1e-6


def test_subtract_on_a_missing_gpu_fails_before_any_work(monkeypatch):
    """subtract_images refuses device='gpu' up front when there is no GPU."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    pair = make_pair((64, 64), seed=64)
    with pytest.raises(ConfigError, match="CuPy is not installed"):
        subtract_images(pair.template, pair.science, object(), device="gpu")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")
def test_real_cupy_matches_the_cpu():  # pragma: no cover - needs a CUDA GPU
    """On a machine with CuPy and a GPU: the real device path against the CPU."""
    try:
        array_backend("gpu")
    except ConfigError as err:
        pytest.skip(str(err))
    sol = varying_solution()
    rng = np.random.default_rng(65)
    image = rng.normal(1000.0, 30.0, size=(300, 260))
    variance = np.full(image.shape, 1000.0)
    mask = np.zeros(image.shape, np.int32)
    h = sol.basis.kernel_size // 2
    args = (-h, 300 + h, -h, 260 + h)
    padded = (window(image, *args, 0.0), window(variance, *args, 0.0), window(mask, *args, 0))
    cpu = convolve_region(*padded, sol, 0, 0, precision="single", device="cpu")
    gpu = convolve_region(*padded, sol, 0, 0, precision="single", device="gpu")
    for a, b in zip(cpu[:2], gpu[:2], strict=True):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_run_pair_on_a_missing_gpu_fails_before_any_output(tmp_path, client):
    """run_pair(device='gpu') asks every worker first and writes nothing without a GPU."""
    from diffkernel.io.zarr.write import write_image
    from diffkernel.pipeline.dask.driver import run_pair

    pair = make_pair((128, 128), seed=66)
    store = tmp_path / "pair.zarr"
    write_image(store, pair.science, group="science", chunks=64)
    write_image(store, pair.template, group="template", chunks=64)
    out = tmp_path / "out.zarr"
    with pytest.raises(ConfigError, match="CuPy is not installed"):
        run_pair(
            (store, "science"),
            (store, "template"),
            out,
            sources=pair.truth.sources,
            client=client,
            device="gpu",
        )
    assert not out.exists()
    assert not list(tmp_path.glob("out.zarr.partial*"))
    with pytest.raises(ConfigError, match="device must be one of cpu, gpu; got 'cuda'"):
        run_pair((store, "science"), (store, "template"), out, client=client, device="cuda")
