"""The README's main command: ``diffkernel demo`` end to end on a LocalCluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffkernel.cli import main
from diffkernel.io.zarr.results import open_result


def assert_right_but_maybe_unverified(quality):
    """Every check passes but, on a small field, the kernel sum's check of the stars'
    flux ratio, which may say that it is too uncertain to verify the kernel sum."""
    assert quality["verdict"] in ("pass", "warn"), quality["reasons"]
    for check in quality["checks"]:
        if check["level"] != "pass":
            assert check["name"] == "kernel_sum", check
            assert "cannot be checked" in check["message"]


def test_demo_writes_a_zarr_result_and_summary(tmp_path, capsys):
    """A small demo runs on a 2-worker LocalCluster and writes an honest difference."""
    out = tmp_path / "demo"
    assert main(["demo", "--size", "384", "--out", str(out), "--workers", "2", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_good"] >= 5
    assert 0.9 < summary["residuals"]["robust_std"] < 1.1
    assert summary["quality"] == {"verdict": "pass", "reasons": []}
    result = open_result(out / "result.zarr")
    assert result.quality["verdict"] == "pass"
    # The subtraction defaults: a fitted differential background.
    assert result.config["kernel"]["AL"]["fitForBackground"] is True
    assert len(result.candidates) == summary["n_sources"]
    diff = result.difference.read(0, 384, 0, 384)
    assert np.isfinite(diff.image[50:-50, 50:-50]).all()
    assert (out / "difference.fits").exists() and (out / "candidates.ecsv").exists()
    printed = capsys.readouterr().out
    assert "result.zarr" in printed and "quality: PASS" in printed
    # A rerun replaces the earlier output.
    assert main(["demo", "--size", "384", "--out", str(out), "--workers", "1", "--quiet"]) == 0


def _fits_pair(tmp_path):
    from diffkernel.io.fits import write_exposure
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
    from diffkernel.io.fits import read_exposure

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
    assert diff.meta["DKVERDCT"] == result.quality["verdict"]
    assert_right_but_maybe_unverified(result.quality)
    stored = result.difference.read(0, 256, 0, 256)
    np.testing.assert_array_equal(diff.masked_image.mask, stored.mask)
    assert diff.wcs is not None
    assert not list(tmp_path.glob(".out.zarr.inputs-*")), "ingested inputs left behind"
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "complete" and report["candidates"]["good"] == printed["n_good"]
    assert report["residuals"]["robust_std"] == pytest.approx(1.0, abs=0.1)
    assert_right_but_maybe_unverified(report["quality"])
    assert main(["inspect", str(out)]) == 0
    assert f"quality: {result.quality['verdict'].upper()}" in capsys.readouterr().out
    # The same output again is refused without --overwrite, with one clear line.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_inspect_reports_an_incomplete_store(tmp_path, capsys):
    """A store whose run never finished is reported INCOMPLETE with exit status 1."""
    import shutil

    from diffkernel.io.zarr.results import ResultWriter

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
    from diffkernel.io.zarr.image import ZarrImage
    from diffkernel.plots import write_plots

    out = tmp_path / "demo"
    assert main(["demo", "--size", "320", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    names = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert names == sorted(
        f"{n}.png"
        for n in (
            "candidates", "candidate_stamps", "basis", "kernel_mosaic", "spatial_coefficients",
            "cells", "quality", "images",
        )
    )  # fmt: skip
    again = write_plots(
        open_result(out / "result.zarr"),
        tmp_path / "again",
        template=ZarrImage.open(out / "pair.zarr", "template"),
        science=ZarrImage.open(out / "pair.zarr", "science"),
        max_side=64,
    )
    assert all(p.stat().st_size > 5000 for p in again)


def _raw_sky_fits_pair(tmp_path):
    """FITS files of a pair whose frames hold different skies (1000 and 1300 ADU)."""
    from diffkernel.io.fits import write_exposure
    from diffkernel.simulate import make_pair

    pair = make_pair(
        (512, 512), seed=3, flux_scale=0.9, background=(400.0, 2.0, -3.0), template_depth=4
    )
    science, template = tmp_path / "science.fits", tmp_path / "template.fits"
    write_exposure(science, pair.science)
    write_exposure(template, pair.template)
    return science, template


def test_subtract_defaults_are_right_and_a_failed_verdict_exits_3(tmp_path, capsys):
    """No config: a fitted background and a pass. fitForBackground off: exit 3, the
    result still written and marked fail, in the store and the FITS header."""
    from diffkernel.io.fits import read_exposure

    science, template = _raw_sky_fits_pair(tmp_path)
    common = ["--workers", "1", "--quiet"]
    out = tmp_path / "good.zarr"
    assert main(["subtract", str(science), str(template), "--out", str(out), *common]) == 0
    captured = capsys.readouterr()
    quality = json.loads(captured.out)["quality"]
    # Ten faint stars on a bright sky: the kernel is right, but the stars give the
    # flux ratio to only +-4%, and the verdict says so.
    assert quality["verdict"] == "warn"
    assert quality["reasons"] and all("cannot be checked" in r for r in quality["reasons"])
    assert "quality: WARN" in captured.err
    assert open_result(out).solution.kernel_functions.order == 1
    config = tmp_path / "config.toml"
    config.write_text("[kernel.AL]\nfitForBackground = false\n")
    bad, fits_out = tmp_path / "bad.zarr", tmp_path / "bad.fits"
    args = ["subtract", str(science), str(template), "--out", str(bad), "--config", str(config)]
    assert main([*args, "--fits-out", str(fits_out), *common]) == 3
    err = capsys.readouterr().err
    assert "quality: FAIL" in err and "fitForBackground" in err
    result = open_result(bad)
    assert result.quality["verdict"] == "fail"
    # The file's other fields keep the subtraction defaults.
    assert result.config["kernel"]["AL"]["spatialBgOrder"] == 2
    header = read_exposure(fits_out).meta
    assert header["DKVERDCT"] == "fail" and "fitForBackground" in header["DKREAS1"]


def test_batch_counts_failed_quality_apart_from_crashes(tmp_path, capsys):
    science, template = _raw_sky_fits_pair(tmp_path)
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(
        "science,template,output\n"
        f"{science},{template},a.zarr\n"
        f"{science},{tmp_path / 'missing.fits'},b.zarr\n"
    )
    config = tmp_path / "config.toml"
    config.write_text("[kernel.AL]\nfitForBackground = false\n")
    args = ["batch", str(manifest), "--out", str(tmp_path / "out"), "--workers", "1"]
    # A missing input is refused when the manifest is read: one clear line.
    assert main(args) == 2
    capsys.readouterr()
    manifest.write_text(f"science,template,output\n{science},{template},a.zarr\n")
    assert main([*args, "--config", str(config)]) == 3
    printed = capsys.readouterr().out
    assert "quality fail" in printed and "0 failed, 1 failed quality" in printed
    status = json.loads((tmp_path / "out" / "batch-status.json").read_text())
    assert status["pairs"][0]["quality"] == "fail"
    # Rerun: skipped, and its verdict still counted.
    assert main([*args, "--config", str(config)]) == 3
    assert "1 skipped, 0 failed, 1 failed quality" in capsys.readouterr().out
    assert main(args) == 0  # the defaults: redone (another config), and a pass
    assert "1 done, 0 skipped, 0 failed, 0 failed quality" in capsys.readouterr().out
