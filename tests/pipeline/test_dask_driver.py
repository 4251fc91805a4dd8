"""The Dask service on a real cluster: distributed equals serial, whatever the tiling.

A LocalCluster with two worker processes is shared by the module; one test starts
``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 and submits to the
address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.errors import ConfigError, InputError, NoCandidatesError, StoreError
from diffkernel.image import Exposure, MaskedImage
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.io.zarr.layout import json_safe
from diffkernel.io.zarr.results import result_status
from diffkernel.io.zarr.write import write_image
from diffkernel.pipeline.dask.driver import run_pair
from diffkernel.simulate import make_pair

distributed = pytest.importorskip("distributed")

SHAPE = (320, 352)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    sim = make_pair(SHAPE, seed=31, template_depth=4, wcs=True)
    template, science = sim.template.astype(np.float32), sim.science.astype(np.float32)
    store = tmp_path_factory.mktemp("pair") / "pair.zarr"
    write_image(store, template, group="template", chunks=64)
    write_image(store, science, group="science", chunks=64)
    return {"sim": sim, "template": template, "science": science, "store": store}


def config(**kernel) -> MakeKernelConfig:
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    cfg.kernel.active.spatialKernelOrder = 1
    cfg.kernel.active.sizeCellX = cfg.kernel.active.sizeCellY = 64
    for name, value in kernel.items():
        setattr(cfg.kernel.active, name, value)
    return cfg


def assert_tables_equal(a, b, rtol=0.0):
    """Same rows and columns; text and integers identical, floats to ``rtol``.

    Floats are compared relative to the column's largest value: residual means are
    differences of nearly equal numbers, zero to within rounding.
    """
    assert a.colnames == b.colnames
    assert len(a) == len(b)
    for name in a.colnames:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype.kind == "f":
            scale = np.nanmax(np.abs(x)) if np.isfinite(x).any() else 0.0
            np.testing.assert_allclose(
                x, y, rtol=rtol, atol=rtol * scale, equal_nan=True, err_msg=name
            )
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def assert_same_solution(serial, stored, rtol=0.0):
    a = serial.spatialSolution.kernel_coeffs
    b = stored.solution.kernel_coeffs
    assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(a)), np.max(np.abs(a - b))
    np.testing.assert_allclose(
        serial.spatialSolution.background_coeffs,
        stored.solution.background_coeffs,
        rtol=rtol,
        atol=rtol * np.max(np.abs(serial.spatialSolution.background_coeffs)),
    )


def run(pair, out, cfg, client, **kwargs):
    store = pair["store"]
    return run_pair(
        (store, "science"), (store, "template"), out, config=cfg, client=client, **kwargs
    )


def test_distributed_equals_serial(pair, client, tmp_path):
    """Kernel to 1e-10, candidate table identical, difference equal to float32 precision."""
    cfg = config()
    sources = pair["sim"].truth.sources
    out = run(pair, tmp_path / "out.zarr", cfg, client, sources=sources, tile_size=128)
    serial = MakeKernelTask(cfg).run(pair["template"], pair["science"], sources)
    assert_same_solution(serial, out.result)
    assert_tables_equal(serial.candidates, out.result.candidates)
    # run_pair decorrelates by default; subtract_images when asked.
    diff = subtract_images(pair["template"], pair["science"], serial, decorrelate=True)
    stored = out.result.difference.read(0, SHAPE[0], 0, SHAPE[1])
    np.testing.assert_array_equal(stored.mask, diff.mask)
    finite = np.isfinite(diff.image)
    assert (np.isfinite(stored.image) == finite).all()
    # Single-precision FFTs on other tile sizes, and float32 storage: equal to far
    # below the noise (1e-4 sigma).
    sigma = np.sqrt(diff.variance[finite])
    assert np.max(np.abs(stored.image[finite] - diff.image[finite]) / sigma) < 1e-4
    np.testing.assert_allclose(stored.variance[finite], diff.variance[finite], rtol=1e-5)
    # The residuals are what the engine promises.
    res = out.summary["residuals"]
    assert abs(res["median"]) < 0.05 and 0.9 < res["robust_std"] < 1.1
    assert out.result.metadata["n_tiles"] == 9
    # One verdict: the fit's metrics are identical; the difference's pixels agree to
    # 1e-4 sigma (see above), so their histograms' statistics to a bin or so.
    assert out.quality["verdict"] == serial.quality["verdict"] == "pass", out.quality["reasons"]
    stored_metrics = dict(out.quality["metrics"])
    serial_metrics = json_safe(serial.quality["metrics"])
    stored_diff, serial_diff = stored_metrics.pop("difference"), serial_metrics.pop("difference")
    assert stored_metrics == serial_metrics
    for where in ("sky", "footprints"):
        for name, value in serial_diff[where].items():
            assert stored_diff[where][name] == pytest.approx(value, rel=1e-3, abs=1e-4), name
    assert out.summary["quality"]["verdict"] == "pass"
    assert set(out.timings) >= {"check", "cells", "reduce", "tiles", "total"}
    prov = out.result.provenance
    assert len(prov["inputs"]["science"]["sha256"]["image"]) == 64
    assert result_status(tmp_path / "out.zarr") == "complete"


def _task_process_state() -> tuple[bool, str | None]:
    from diffkernel.pipeline.dask import taskproc

    return taskproc._PREPARED, os.environ.get("MALLOC_TRIM_THRESHOLD_")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tasks_run_in_prepared_processes(pair, client, tmp_path):
    """Workers started with Dask's environment reuse freed arrays once they ran a task."""
    from test_taskproc import reused_allocation_faults

    run(pair, tmp_path / "out.zarr", config(), client, sources=pair["sim"].truth.sources)
    states = client.run(_task_process_state)
    # The fixture's workers carry Dask's MALLOC_TRIM_THRESHOLD_: the case that matters.
    assert {trim for _, trim in states.values()} == {"65536"}
    ran = [address for address, (prepared, _) in states.items() if prepared]
    assert ran
    for address, (faults, pages) in client.run(reused_allocation_faults, workers=ran).items():
        assert faults < 3 * pages, (address, faults)


def test_tile_size_and_workers_do_not_change_the_result(pair, client, tmp_path):
    """64-px tiles and one 384-px tile give the same kernel, table and difference."""
    cfg = config()
    sources = pair["sim"].truth.sources
    a = run(pair, tmp_path / "a.zarr", cfg, client, sources=sources, tile_size=64)
    b = run(pair, tmp_path / "b.zarr", cfg, client, sources=sources, tile_size=384)
    np.testing.assert_array_equal(a.result.solution.kernel_coeffs, b.result.solution.kernel_coeffs)
    assert_tables_equal(a.result.candidates, b.result.candidates, rtol=0)
    da = a.result.difference.read(0, SHAPE[0], 0, SHAPE[1])
    db = b.result.difference.read(0, SHAPE[0], 0, SHAPE[1])
    finite = np.isfinite(da.image)
    sigma = np.sqrt(da.variance[finite])
    assert np.max(np.abs(da.image[finite] - db.image[finite]) / sigma) < 1e-4
    np.testing.assert_array_equal(da.mask, db.mask)


def test_front_end_in_the_workers_equals_serial(pair, client, tmp_path):
    """Detection, mesh backgrounds and FWHM measurement on the cluster match the task."""
    cfg = config(useAfwBackground=True)
    cfg.kernel.active.afwBackgroundConfig.binSize = 64
    template = Exposure(pair["template"].masked_image, pair["template"].wcs)
    science = Exposure(pair["science"].masked_image, pair["science"].wcs)
    store = tmp_path / "nofwhm.zarr"
    write_image(store, template, group="template", chunks=64)
    write_image(store, science, group="science", chunks=64)
    out = run_pair(
        (store, "science"), (store, "template"), tmp_path / "o.zarr", config=cfg, client=client
    )
    serial = MakeKernelTask(cfg).run(template, science)
    assert out.result.metadata["detected_sources"] == serial.metadata["detected_sources"]
    assert out.result.metadata["template_fwhm"] == pytest.approx(
        serial.metadata["template_fwhm"], rel=1e-12
    )
    assert_same_solution(serial, out.result)
    assert_tables_equal(serial.candidates, out.result.candidates)


def test_alignment_in_the_workers_equals_serial(pair, client, tmp_path):
    """A template on a shifted grid is warped tile by tile in the workers as in the task."""
    sim = pair["sim"]
    template = pair["template"]
    dx, dy = 5, -3
    mi = template.masked_image
    moved_mi = MaskedImage(
        np.roll(mi.image, (dy, dx), axis=(0, 1)),
        np.roll(mi.variance, (dy, dx), axis=(0, 1)),
        np.roll(mi.mask, (dy, dx), axis=(0, 1)),
        mi.mask_planes,
    )
    wcs = template.wcs.deepcopy()
    wcs.wcs.crpix = wcs.wcs.crpix + np.array([dx, dy])
    moved = Exposure(moved_mi, wcs, template.psf_fwhm)
    store = tmp_path / "moved.zarr"
    write_image(store, moved, group="template", chunks=64)
    write_image(store, pair["science"], group="science", chunks=64)
    cfg = config()
    out = run_pair(
        (store, "science"),
        (store, "template"),
        tmp_path / "o.zarr",
        config=cfg,
        client=client,
        sources=sim.truth.sources,
    )
    # The serial run gets the inputs as stored: a WCS goes through FITS header cards,
    # which keep 14 significant digits, and the warp sees that WCS.
    moved = ZarrImage.open(store, "template").to_exposure()
    science = ZarrImage.open(store, "science").to_exposure()
    serial = MakeKernelTask(cfg).run(moved, science, sim.truth.sources)
    assert out.result.metadata["aligned"] and serial.metadata["aligned"]
    assert_same_solution(serial, out.result)
    assert_tables_equal(serial.candidates, out.result.candidates)


def test_failed_run_publishes_nothing(pair, client, tmp_path):
    """A run that fails leaves neither an output nor a partial directory."""
    cfg = config()
    cfg.selectMeasurement.minSnr = 1e9
    out = tmp_path / "never.zarr"
    with pytest.raises(NoCandidatesError, match="usable kernel candidate"):
        run(pair, out, cfg, client, sources=pair["sim"].truth.sources)
    assert result_status(out) == "missing"
    assert not list(tmp_path.glob("never.zarr*"))


def test_existing_output_is_refused_unless_overwrite(pair, client, tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    sources = pair["sim"].truth.sources
    with pytest.raises(StoreError, match="not a diffkernel result"):
        run(pair, out, config(), client, sources=sources)
    assert (out / "notes.txt").exists()
    run(pair, out, config(), client, sources=sources, overwrite=True)
    assert result_status(out) == "complete" and not (out / "notes.txt").exists()


def test_bad_inputs_are_named(pair, client, tmp_path):
    """A tile size off the chunk grid, a NaN pixel and a missing store are clear errors."""
    sources = pair["sim"].truth.sources
    with pytest.raises(ConfigError, match="multiple of the science chunks"):
        run(pair, tmp_path / "o.zarr", config(), client, sources=sources, tile_size=100)

    def refused(name: str, spoil, message: str) -> Path:
        science = pair["science"].astype(np.float32)
        spoil(science.masked_image)
        store = tmp_path / f"{name}.zarr"
        write_image(store, pair["template"], group="template", chunks=64)
        write_image(store, science, group="science", chunks=64)
        with pytest.raises(InputError, match=message):
            run_pair(
                (store, "science"),
                (store, "template"),
                tmp_path / "o.zarr",
                config=config(),
                client=client,
                sources=sources,
            )
        assert result_status(tmp_path / "o.zarr") == "missing"
        return store

    def one_nan(mi: MaskedImage) -> None:
        mi.image[100, 100] = np.nan

    def negative_variance(mi: MaskedImage) -> None:
        mi.variance[:] = -1.0

    store = refused("nan", one_nan, "science: 1 pixel")
    # Every candidate stamp broken too: the cells (which start alongside the check) see
    # the bad pixels, but the run still stops with the check's message, which counts
    # every pixel of the image (320 x 352).
    refused(
        "negative",
        negative_variance,
        r"science: variance is zero or negative at every unmasked pixel \(112640 pixels\)",
    )
    with pytest.raises(StoreError):
        run_pair(
            tmp_path / "nowhere.zarr", (store, "template"), tmp_path / "o.zarr", client=client
        )


def _start(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,
    )


def test_job_submitted_to_a_scheduler_address(pair, tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1 run a job by address."""
    pytest.importorskip("distributed.cli.dask_scheduler")
    info = tmp_path / "scheduler.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        _start(
            [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(info),
            ],
            env=env,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        for _ in range(2):
            procs.append(
                _start(
                    [
                        "distributed.cli.dask_worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--local-directory",
                        str(tmp_path),
                    ],
                    env=env,
                )
            )
        with distributed.Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        assert address.startswith("tcp://127.0.0.1:")
        cfg = config()
        out = run_pair(
            (pair["store"], "science"),
            (pair["store"], "template"),
            tmp_path / "out.zarr",
            config=cfg,
            sources=pair["sim"].truth.sources,
            scheduler=address,
        )
        serial = MakeKernelTask(cfg).run(
            pair["template"], pair["science"], pair["sim"].truth.sources
        )
        assert_same_solution(serial, out.result)
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    shutil.rmtree(tmp_path / "out.zarr", ignore_errors=True)


def test_unreachable_scheduler_is_a_clear_error(pair, tmp_path):
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        run_pair(
            (pair["store"], "science"),
            (pair["store"], "template"),
            tmp_path / "o.zarr",
            sources=pair["sim"].truth.sources,
            scheduler="tcp://127.0.0.1:9",
        )
    assert result_status(tmp_path / "o.zarr") == "missing"


def test_identical_runs_at_once_on_one_client(pair, client, tmp_path):
    """Two runs with the same inputs and config in flight together both complete alike.

    Scattered data used to get content-hashed keys shared by such runs; the first to
    finish released them under the second (a batch saw 'lost dependencies').
    """
    from concurrent.futures import ThreadPoolExecutor

    sources = pair["sim"].truth.sources
    with ThreadPoolExecutor(3) as pool:
        runs = list(
            pool.map(
                lambda i: run(pair, tmp_path / f"o{i}.zarr", config(), client, sources=sources),
                range(3),
            )
        )
    for other in runs[1:]:
        np.testing.assert_array_equal(
            other.result.solution.kernel_coeffs, runs[0].result.solution.kernel_coeffs
        )


def test_default_tile_size():
    """Chunk multiples up to 1024, smaller when the image would get fewer than 4 tiles."""
    from diffkernel.pipeline.dask.cluster import default_tile_size

    assert default_tile_size((512, 512)) == 1024
    assert default_tile_size((512, 512), (4096, 4096)) == 1024
    assert default_tile_size((512, 512), (1024, 1024)) == 512
    assert default_tile_size((128, 128), (600, 600)) == 512
    assert default_tile_size((128, 128), (400, 400)) == 384
    assert default_tile_size((300, 300), (300, 300)) == 300
    assert default_tile_size((64, 64), (320, 352)) == 256


def test_check_tile_digests_are_sha256_of_the_stored_values(tmp_path):
    """Each plane's tile digest is SHA-256 of its dtype string and bytes, an empty mask too."""
    import hashlib

    from diffkernel.pipeline.dask.checks import check_tile

    sim = make_pair((96, 80), seed=5, n_stars=4)
    exposure = sim.science.astype(np.float32)
    marked = exposure.masked_image.mask.copy()
    marked[10:12, 20:25] |= 1 << exposure.masked_image.mask_planes["BAD"]
    for mask in (np.zeros_like(marked), marked):
        mi = exposure.masked_image
        planes = MaskedImage(mi.image, mi.variance, mask, mi.mask_planes)
        image = Exposure(planes, exposure.wcs, exposure.psf_fwhm)
        store = write_image(tmp_path / f"m{int(mask.any())}.zarr", image, chunks=32)
        _, digests = check_tile(store, 0, 64, 16, 80, ("BAD",))
        for name, plane in (("image", mi.image), ("variance", mi.variance), ("mask", mask)):
            values = np.ascontiguousarray(plane[0:64, 16:80], dtype=store._array(name).dtype)
            expected = hashlib.sha256(values.dtype.str.encode() + values.tobytes()).hexdigest()
            assert digests[name] == expected, name


def test_check_result_lost_while_fetched_is_checked_again(pair, client):
    """A check future cancelled under the driver (a worker lost mid-gather) is run again."""
    from diffkernel.pipeline.dask.checks import InputCheck
    from diffkernel.pipeline.dask.runner import TaskRunner
    from diffkernel.pipeline.stages import exempt_planes

    science = ZarrImage.open(pair["store"], "science")
    template = ZarrImage.open(pair["store"], "template")
    exempt = exempt_planes(config().kernel.active)

    def checksums(cancel: bool):
        images = {"template": template, "science": science}
        check = InputCheck(TaskRunner(client), images, exempt)
        if cancel:
            first = next(iter(check.futures.values()))
            client.cancel(first)
            assert first.cancelled()
        return check.validated()

    assert checksums(cancel=True) == checksums(cancel=False)


def test_cancelled_result_is_made_again(client):
    """A future cancelled under the driver is made again, at most twice more."""
    from distributed.client import FutureCancelledError

    from diffkernel.pipeline.dask.runner import TaskRunner

    runner = TaskRunner(client)
    lost = client.submit(sum, [1, 2], pure=False)
    client.cancel(lost)
    redone = []

    def redo(attempt):
        redone.append(attempt)
        future = client.submit(sum, [1, 2, attempt], pure=False)
        if attempt == 1:
            client.cancel(future)  # lost again
        return future

    assert runner.gather_redoing(lost, redo) == 5
    assert redone == [1, 2]
    always_lost = client.submit(sum, [1], pure=False)
    client.cancel(always_lost)
    from diffkernel.errors import ClusterError

    with pytest.raises(ClusterError, match="lost a task's result 3 times") as info:
        runner.gather_redoing(always_lost, lambda attempt: always_lost)
    assert isinstance(info.value.__cause__, FutureCancelledError)


def test_own_cluster_keeps_broadcast_copies():
    """The LocalCluster diffkernel starts runs without the active memory manager, which
    would drop the broadcast copies of shared objects to one (lost with its worker)."""
    from diffkernel.pipeline.dask.cluster import connect

    def amm_running(dask_scheduler):
        amm = dask_scheduler.extensions.get("amm")
        return bool(amm and amm.running)

    with connect(n_workers=1) as client:
        assert client.run_on_scheduler(amm_running) is False
