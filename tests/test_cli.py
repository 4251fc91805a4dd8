"""The README's main command: ``diffkernel demo`` end to end on a LocalCluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffkernel.cli import main
from diffkernel.results import open_result


def test_demo_writes_a_zarr_result_and_summary(tmp_path, capsys):
    """A small demo runs on a 2-worker LocalCluster and writes an honest difference."""
    out = tmp_path / "demo"
    assert main(["demo", "--size", "384", "--out", str(out), "--workers", "2", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_good"] >= 5
    assert 0.9 < summary["residuals"]["robust_std"] < 1.1
    result = open_result(out / "result.zarr")
    assert len(result.candidates) == summary["n_sources"]
    diff = result.difference.read(0, 384, 0, 384)
    assert np.isfinite(diff.image[50:-50, 50:-50]).all()
    assert (out / "difference.fits").exists() and (out / "candidates.ecsv").exists()
    assert "result.zarr" in capsys.readouterr().out
    # A rerun replaces the earlier output.
    assert main(["demo", "--size", "384", "--out", str(out), "--workers", "1", "--quiet"]) == 0


def _fits_pair(tmp_path):
    from diffkernel.fitsio import write_exposure
    from diffkernel.simulate import make_pair

    pair = make_pair((256, 256), seed=12, template_depth=4, wcs=True)
    science, template = tmp_path / "science.fits", tmp_path / "template.fits"
    write_exposure(science, pair.science)
    write_exposure(template, pair.template)
    sources = tmp_path / "sources.ecsv"
    pair.truth.sources.write(sources)
    return science, template, sources


def test_ingest_subtract_inspect(tmp_path, capsys):
    """FITS and Zarr inputs, a config file, FITS output, and the inspect summary."""
    from diffkernel.fitsio import read_exposure

    science, template, sources = _fits_pair(tmp_path)
    assert main(["ingest", str(template), str(tmp_path / "t.zarr"), "--chunks", "64"]) == 0
    assert "64x64 chunks" in capsys.readouterr().out
    config = tmp_path / "config.toml"
    config.write_text("[kernel.AL]\nfitForBackground = true\nspatialKernelOrder = 1\n")
    out = tmp_path / "out.zarr"
    args = [
        "subtract", str(science), str(tmp_path / "t.zarr"), "--out", str(out),
        "--fits-out", str(tmp_path / "diff.fits"), "--config", str(config),
        "--sources", str(sources), "--workers", "2", "--chunks", "64", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_good"] >= 5
    result = open_result(out)
    assert result.config["kernel"]["AL"]["fitForBackground"] is True
    assert result.solution.kernel_functions.order == 1
    diff = read_exposure(tmp_path / "diff.fits")
    stored = result.difference.read(0, 256, 0, 256)
    np.testing.assert_array_equal(diff.masked_image.mask, stored.mask)
    assert diff.wcs is not None
    assert not list(tmp_path.glob(".out.zarr.inputs-*")), "ingested inputs left behind"
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "complete" and report["candidates"]["good"] == printed["n_good"]
    assert report["residuals"]["robust_std"] == pytest.approx(1.0, abs=0.1)
    # The same output again is refused without --overwrite, with one clear line.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_inspect_reports_an_incomplete_store(tmp_path, capsys):
    """A store whose run never finished is reported INCOMPLETE with exit status 1."""
    import shutil

    from diffkernel.results import ResultWriter

    writer = ResultWriter(tmp_path / "out.zarr")
    shutil.move(writer.partial_path, tmp_path / "out.zarr")  # as a crash mid-rename would
    assert main(["inspect", str(tmp_path / "out.zarr")]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "none.zarr"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "missing"


def test_bad_config_file_is_one_clear_line(tmp_path, capsys):
    """An unknown field in --config stops before any work, naming the field."""
    science, template, _ = _fits_pair(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text("[kernel.AL]\nkernelSise = 21\n")
    code = main(
        ["subtract", str(science), str(template), "--out", str(tmp_path / "o.zarr"),
         "--config", str(config), "--quiet"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "kernelSise" in err and err.count("\n") == 1
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("cupy") is not None, reason="CuPy is installed"
)
def test_gpu_device_without_cupy_is_one_clear_line(tmp_path, capsys):
    """--device gpu where there is no CuPy or GPU stops with one line and no output."""
    science, template, sources = _fits_pair(tmp_path)
    code = main(
        ["subtract", str(science), str(template), "--out", str(tmp_path / "o.zarr"),
         "--sources", str(sources), "--workers", "1", "--device", "gpu", "--quiet"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "CuPy is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "o.zarr").exists()


def test_plots_of_a_result(tmp_path):
    """write_plots draws every debug display of a demo result as a non-empty PNG."""
    from diffkernel.plots import write_plots
    from diffkernel.store import ZarrImage

    out = tmp_path / "demo"
    assert main(["demo", "--size", "320", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    names = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert names == sorted(
        f"{n}.png"
        for n in ("candidates", "basis", "kernel_mosaic", "spatial_coefficients", "cells", "images")
    )
    again = write_plots(
        open_result(out / "result.zarr"),
        tmp_path / "again",
        template=ZarrImage.open(out / "pair.zarr", "template"),
        science=ZarrImage.open(out / "pair.zarr", "science"),
        max_side=64,
    )
    assert all(p.stat().st_size > 5000 for p in again)
