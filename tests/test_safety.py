"""Issue 20 on the command line: inputs never destroyed, outputs checked first, one line.

Every case here is refused before any work starts (no cluster), with one line on
stderr and exit status 2, and leaves the inputs as they were.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading

import numpy as np
import pytest

from diffkernel import MakeKernelConfig
from diffkernel.cli import main
from diffkernel.cli.common import sigterm_as_interrupt
from diffkernel.errors import ConfigError, InputError, StoreError
from diffkernel.io.fits import write_exposure
from diffkernel.io.inputs import ingest, open_input
from diffkernel.io.paths import Output, check_outputs
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.simulate import make_pair


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    pair = make_pair((64, 64), seed=3, template_depth=4)
    write_exposure(root / "science.fits", pair.science)
    write_exposure(root / "template.fits", pair.template)
    pair.truth.sources.write(root / "sources.ecsv")
    ingest(root / "science.fits", root / "science.zarr", chunks=32)
    return root


def digest(path):
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return sorted((str(p.relative_to(path)), digest(p)) for p in path.rglob("*") if p.is_file())


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def subtract(files, tmp_path, *extra):
    return main(
        ["subtract", str(files / "science.fits"), str(files / "template.fits"),
         "--quiet", *extra]
    )  # fmt: skip


def test_overwrite_never_touches_an_input(files, tmp_path, capsys):
    """--out, --fits-out or an ingest output equal to an input: refused even with
    --overwrite, the input unchanged."""
    store, fits_in = files / "science.zarr", files / "science.fits"
    before = digest(store), digest(fits_in)
    args = ["subtract", str(store), str(files / "template.fits"), "--out", str(store),
            "--overwrite", "--quiet"]  # fmt: skip
    assert main(args) == 2
    one_line_error(capsys, "science input", "destroy")
    out = tmp_path / "d.zarr"
    assert subtract(files, tmp_path, "--out", str(out), "--fits-out", str(fits_in),
                    "--overwrite") == 2  # fmt: skip
    one_line_error(capsys, "--fits-out", "science input")
    assert main(["ingest", str(fits_in), str(fits_in), "--overwrite"]) == 2
    one_line_error(capsys, "onto itself")
    # Spelled differently: through "..", and as the store's folder holding it.
    odd = files / "x" / ".." / "science.zarr"
    assert main(["subtract", str(store), str(files / "template.fits"), "--out", str(odd),
                 "--overwrite", "--quiet"]) == 2  # fmt: skip
    capsys.readouterr()
    assert (digest(store), digest(fits_in)) == before
    assert not out.exists()
    with pytest.raises(InputError, match="science input"):
        from diffkernel.pipeline.dask.driver import run_pair

        run_pair(ZarrImage.open(store), ZarrImage.open(store), store, overwrite=True)
    assert (digest(store), digest(fits_in)) == before


@pytest.mark.parametrize(
    "option, make, message",
    [
        ("--fits-out", lambda d: (d / "diff.fits").write_text("old") and d / "diff.fits",
         "already exists"),
        ("--fits-out", lambda d: d / "missing" / "diff.fits", "does not exist"),
        ("--plots", lambda d: (d / "plots").write_text("a file") and d / "plots",
         "not a folder"),
    ],
)  # fmt: skip
def test_every_output_is_checked_before_any_work(files, tmp_path, capsys, option, make, message):
    """An existing --fits-out, a missing folder, a --plots that is a file: refused before
    the Zarr result is written (a rerun would otherwise say "already exists")."""
    out = tmp_path / "d.zarr"
    assert subtract(files, tmp_path, "--out", str(out), option, str(make(tmp_path))) == 2
    one_line_error(capsys, option, message)
    assert not out.exists()
    assert not list(tmp_path.glob(".d.zarr.inputs-*"))


def test_check_outputs_allows_plots_beside_the_result(tmp_path):
    """A plots folder may hold the result store (it is written into, not replaced)."""
    check_outputs(
        [Output("--out", tmp_path / "d.zarr"), Output("--plots", tmp_path, "folder")],
        {"science": tmp_path / "s.fits"},
        overwrite=False,
    )
    with pytest.raises(InputError, match="same path"):
        check_outputs(
            [Output("--out", tmp_path / "d.zarr"), Output("--plots", tmp_path / "d.zarr/p",
                                                        "folder")],
            {},
            overwrite=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--sources", "nope.ecsv"], ["sources file", "does not exist"]),
        (["--sources", "GARBAGE"], ["sources file", "not a table"]),
        (["--workers", "-2"], ["--workers must be at least 1"]),
        (["--scheduler", "not a:scheduler:addr"], ["not a Dask address"]),
        (["--chunks", "1"], ["chunks 1 is out of range"]),
        (["--chunks", "100000"], ["out of range"]),
    ],
)
def test_user_errors_are_one_line(files, tmp_path, capsys, extra, words):
    """Each was a raw traceback; now one line naming the cause, exit 2."""
    garbage = tmp_path / "garbage.ecsv"
    garbage.write_bytes(b"\x00\x01garbage\n,,,\n")
    extra = [str(garbage) if e == "GARBAGE" else e for e in extra]
    extra = [str(tmp_path / e) if e == "nope.ecsv" else e for e in extra]
    assert subtract(files, tmp_path, "--out", str(tmp_path / "d.zarr"), *extra) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "d.zarr").exists()


def test_a_non_dask_service_as_scheduler_is_one_line(files, tmp_path, capsys):
    """A service that answers in another protocol (HTTP here): one line, not a 3 EiB
    allocation error."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        code = subtract(files, tmp_path, "--out", str(tmp_path / "d.zarr"),
                        "--scheduler", f"tcp://127.0.0.1:{port}")  # fmt: skip
    finally:
        stop.set()
        server.close()
    assert code == 2
    one_line_error(capsys, f"127.0.0.1:{port}", "Dask")


def test_unexpected_errors_are_one_line_unless_debug(files, monkeypatch, capsys):
    """A bug is one line, exit 1, and its traceback with DIFFKERNEL_DEBUG=1; a full disk
    (OSError) is one line, exit 2."""
    from diffkernel.cli import inspect

    def boom(args):
        raise KeyError("graph._submit_check")

    monkeypatch.setattr(inspect, "run", boom)
    assert main(["inspect", "x.zarr"]) == 1
    one_line_error(capsys, "unexpected error", "KeyError", "DIFFKERNEL_DEBUG=1")
    monkeypatch.setenv("DIFFKERNEL_DEBUG", "1")
    assert main(["inspect", "x.zarr"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("DIFFKERNEL_DEBUG")

    def full(args):
        raise OSError(28, "No space left on device", "out.zarr/difference/image/c/0/0")

    monkeypatch.setattr(inspect, "run", full)
    assert main(["inspect", "x.zarr"]) == 2
    one_line_error(capsys, "No space left on device")


def test_sigterm_stops_like_sigint():
    """Within a command, SIGTERM (cron, systemd) raises KeyboardInterrupt as SIGINT does."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) is previous


def test_non_numeric_psf_fwhm_attribute_is_one_line(files, tmp_path, capsys):
    """An image group whose psf_fwhm attribute is not a number: one line naming it."""
    import zarr

    ingest(files / "science.fits", tmp_path / "p.zarr", chunks=32)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r+")
    info = dict(group.attrs["diffkernel"])
    info["psf_fwhm"] = "wide"
    group.attrs["diffkernel"] = info
    with pytest.raises(StoreError, match="psf_fwhm must be a positive number"):
        ZarrImage.open(tmp_path / "p.zarr")
    code = main(["subtract", str(tmp_path / "p.zarr"), str(files / "template.fits"),
                 "--out", str(tmp_path / "d.zarr"), "--quiet"])  # fmt: skip
    assert code == 2
    one_line_error(capsys, "psf_fwhm")


def test_config_limits_and_ignored_fields(tmp_path, capsys):
    """A huge kernel, a config nested 100,000 deep: refused; a field another overrides:
    said so."""
    cfg = MakeKernelConfig()
    cfg.kernel.active.scaleByFwhm = False
    cfg.kernel.active.kernelSize = 10001
    with pytest.raises(ConfigError, match=r"kernelSize = 10001: must be <= 255"):
        cfg.validate()
    cfg.kernel.active.kernelSize = 21
    cfg.kernel.active.kernelSizeMax = 1001
    with pytest.raises(ConfigError, match="kernelSizeMax"):
        cfg.validate()
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 100000 + "1" + "}" * 100000)
    with pytest.raises(ConfigError, match="deep"):
        MakeKernelConfig.from_file(deep)
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("x = " + "{a = " * 20 + "1" + "}" * 20 + "\n")
    with pytest.raises(ConfigError, match="21 deep"):
        MakeKernelConfig.from_file(deep_toml)
    ignored = tmp_path / "ignored.toml"
    ignored.write_text("[kernel.active]\nkernelSize = 41\n")
    from diffkernel.cli.common import load_config

    load_config(str(ignored))
    err = capsys.readouterr().err
    assert "kernelSize = 41 is ignored because" in err and "scaleByFwhm = true" in err
    fixed = tmp_path / "fixed.toml"
    fixed.write_text("[kernel.active]\nkernelSize = 41\nscaleByFwhm = false\n")
    assert load_config(str(fixed)).kernel.active.kernelSize == 41
    assert capsys.readouterr().err == ""


def test_chunk_limits(files, tmp_path):
    """A chunk side of 1 made 150k files from 3 MB; refused up front, as is a huge one."""
    for chunks in (1, 15, 8193):
        with pytest.raises(InputError, match="out of range"):
            ingest(files / "science.fits", tmp_path / "c.zarr", chunks=chunks)
        with pytest.raises(InputError, match="out of range"):
            open_input(str(files / "science.fits"), tmp_path / "work", "science", chunks)
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "work").exists()
    assert ingest(files / "science.fits", tmp_path / "c.zarr", chunks=16).chunks == (16, 16)


def test_local_cluster_listens_on_this_machine_only(monkeypatch):
    """The built-in LocalCluster (scheduler and dashboard) binds to 127.0.0.1, not all
    interfaces, and a negative worker count is one clear error."""
    pytest.importorskip("distributed")
    import logging

    from diffkernel.pipeline.dask.cluster import connect

    logged = []

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    logger = logging.getLogger("diffkernel")
    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it clears the cache)
    with connect(n_workers=1) as client:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert "127.0.0.1" in client.dashboard_link
        assert all(w.startswith("tcp://127.0.0.1:") for w in info["workers"])
        http = client.cluster.scheduler.http_server
        bound = {s.getsockname()[0] for s in http._sockets.values()}
        assert bound == {"127.0.0.1"}
    # The dashboard's address is logged (stderr on the command line).
    logger.removeHandler(handler)
    logger.setLevel(level)
    assert any("LocalCluster of 1 workers, dashboard http://127.0.0.1:" in m for m in logged)
    with pytest.raises(InputError, match="at least 1"):
        with connect(n_workers=-2):
            pass


def test_the_loser_of_two_runs_on_one_out_is_told_the_truth(tmp_path):
    """Two runs on one --out: the second to finish was told its result "is left at"
    a partial folder that had just been deleted; now it is told it was discarded."""
    from diffkernel.io.zarr.results import ResultWriter, open_result
    from diffkernel.kernel.basis import delta_function_basis
    from diffkernel.kernel.spatial import SpatialFunctions, SpatialSolution

    basis = delta_function_basis(3)
    functions = SpatialFunctions("chebyshev1", 0, (0.0, 0.0, 31.0, 31.0))
    solution = SpatialSolution(
        basis, functions, np.ones((basis.size, 1)), None, np.zeros(0), 1.0, None, []
    )
    from astropy.table import Table

    table = Table({"x": [1.0], "status": ["GOOD"]})
    path = tmp_path / "same.zarr"
    writers = [ResultWriter(path), ResultWriter(path)]
    for writer in writers:
        writer.create_difference((32, 32), 32, {})
    writers[0].finalize(solution, table, {}, {}, {"run": "first"})
    with pytest.raises(StoreError, match="this run's result was discarded") as info:
        writers[1].finalize(solution, table, {}, {}, {"run": "second"})
    assert "left at" not in str(info.value)
    assert not writers[1].partial_path.exists()
    assert open_result(path).provenance == {"run": "first"}


def test_messages_name_the_real_cause(files, tmp_path, capsys):
    """A 1x1 image and an image smaller than the kernel were "no 2-D image" and "no
    sources found"; now each names the size."""
    from astropy.io import fits

    fits.PrimaryHDU(np.ones((1, 1), np.float32)).writeto(tmp_path / "one.fits")
    code = main(["subtract", str(tmp_path / "one.fits"), str(files / "template.fits"),
                 "--out", str(tmp_path / "a.zarr"), "--quiet"])  # fmt: skip
    assert code == 2
    one_line_error(capsys, "at least 2x2 pixels", "0:1x1")
    for name in ("science", "template"):
        with fits.open(files / f"{name}.fits") as hdul:
            small = [fits.PrimaryHDU()] + [
                fits.ImageHDU(h.data[:15, :15], h.header, name=h.name) for h in hdul[1:]
            ]
            fits.HDUList(small).writeto(tmp_path / f"{name}-small.fits")
    code = main(["subtract", str(tmp_path / "science-small.fits"),
                 str(tmp_path / "template-small.fits"), "--out", str(tmp_path / "b.zarr"),
                 "--workers", "1", "--quiet"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "15x15 pixels, no larger than the kernel (21 px, kernelSizeMin)" in err, err


def test_an_interrupted_ingest_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while zarr still writes chunks: the partial store was left
    behind, raced by zarr's IO thread. The interrupt is sent when the first chunk is
    written (an event, not a sleep), so writes are in flight when it lands."""
    from zarr.storage import LocalStore

    from diffkernel.image import MaskedImage

    rng = np.random.default_rng(5)
    image = rng.normal(100.0, 10.0, (1024, 1024)).astype(np.float32)
    masked = MaskedImage(image, np.full_like(image, 100.0), np.zeros(image.shape, np.int32))
    first_write = threading.Event()
    real_set = LocalStore.set

    async def watched_set(self, key, value, *args, **kwargs):
        if "/c/" in key:
            first_write.set()
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", watched_set)
    # Whole planes are written by diffkernel's own chunk writer where it can (not by
    # zarr): its first chunk is watched the same way.
    from diffkernel.io.zarr import chunkio

    real_write = chunkio.DirectChunks.write_region

    def watched_write(self, *args, **kwargs):
        first_write.set()
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(chunkio.DirectChunks, "write_region", watched_write)

    def interrupt():
        first_write.wait(timeout=300)
        # A real SIGINT at the main thread: it wakes the thread from its wait on zarr.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        ingest(masked, tmp_path / "big.zarr", chunks=32)
        for _ in range(10**7):  # if the write won the race, the interrupt lands here
            pass
    thread.join()
    assert first_write.is_set()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_missing_chunk_file_is_named(files, tmp_path):
    """A chunk file deleted from an input store read as NaN: "16384 pixels are NaN";
    now the check names the missing file."""
    import shutil

    from diffkernel.pipeline.dask.checks import check_tile

    shutil.copytree(files / "science.zarr", tmp_path / "s.zarr")
    image = ZarrImage.open(tmp_path / "s.zarr")
    assert check_tile(image, 0, 64, 0, 64, ())[0]["nan_image"] == 0
    (tmp_path / "s.zarr" / "image" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match=r"1 chunk file\(s\) missing, e.g. .*image/c/1/0"):
        check_tile(ZarrImage.open(tmp_path / "s.zarr"), 0, 64, 0, 64, ())


def test_an_image_larger_than_memory_is_refused(files, tmp_path, monkeypatch):
    """A FITS image that would not fit in memory is refused from its header (it was read
    until the OOM killer ended the process)."""
    import diffkernel.io.paths as paths

    monkeypatch.setattr(paths, "physical_memory", lambda: 64 * 64 * paths.BYTES_PER_PIXEL - 1)
    with pytest.raises(InputError, match="4,096-pixel image needs about .* more than"):
        ingest(files / "science.fits", tmp_path / "s.zarr", chunks=32)
    monkeypatch.setattr(paths, "physical_memory", lambda: 64 * 64 * paths.BYTES_PER_PIXEL)
    assert ingest(files / "science.fits", tmp_path / "s.zarr", chunks=32).shape == (64, 64)


def test_a_task_failing_on_a_worker_prints_no_traceback(tmp_path):
    """A blank pair fails in the detection task, on a worker process: the user gets the
    driver's one line, not the worker's "Compute Failed" traceback nor the scheduler's
    report of the progress feed cancelled as the cluster closes."""
    import subprocess
    import sys

    from diffkernel.image import Exposure, MaskedImage

    rng = np.random.default_rng(0)
    paths = []
    for name in ("science", "template"):
        image = rng.normal(100, 10, (128, 128)).astype(np.float32)
        exposure = Exposure(MaskedImage.from_image(image, variance=np.full_like(image, 100)))
        paths.append(str(tmp_path / f"{name}.fits"))
        write_exposure(paths[-1], exposure)
    args = ["subtract", *paths, "--out", str(tmp_path / "out.zarr"), "--workers", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "diffkernel.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: no sources found" in proc.stderr
    assert "Compute Failed" not in proc.stderr and "Traceback" not in proc.stderr


def test_workers_are_quiet_unless_verbose():
    import logging

    from diffkernel.pipeline.dask.cluster import QUIET_WORKERS_ENV, worker_environ

    logger = logging.getLogger("diffkernel")
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert worker_environ()[QUIET_WORKERS_ENV] == "1"
        logger.setLevel(logging.DEBUG)  # -v
        assert QUIET_WORKERS_ENV not in worker_environ()
    finally:
        logger.setLevel(level)
