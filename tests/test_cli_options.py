"""Command-line options: --set, --gain, --scheduler-file, `config --defaults`, -v/-q, the demo's
default output folder."""

from __future__ import annotations

import json
import logging
import tomllib
import warnings

import numpy as np
import pytest
from astropy.io import fits

from diffkernel import MakeKernelConfig
from diffkernel.cli import main
from diffkernel.cli.common import parse_set
from diffkernel.errors import ConfigError
from diffkernel.io.fits import write_exposure
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.io.zarr.results import open_result
from diffkernel.simulate import make_pair


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures the diffkernel logger; leave it as found for other tests."""
    logger = logging.getLogger("diffkernel")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def test_config_defaults_is_toml_usable_with_config(tmp_path, capsys):
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    data = tomllib.loads(text)
    assert data["kernel"]["AL"]["fitForBackground"] is True
    path = tmp_path / "c.toml"
    path.write_text(text)
    default = MakeKernelConfig.default_subtraction()
    assert MakeKernelConfig.from_file(path).to_dict() == default.to_dict()
    assert main(["config", "--config", str(path), "--set", "kernel.AL.spatialKernelOrder=2"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["kernel"]["AL"]["spatialKernelOrder"] == 2


def test_set_parses_values_as_the_config_file_does():
    values = parse_set(
        ["kernel.name=DF", "kernel.AL.spatialKernelOrder=2", "kernel.AL.fitForBackground=false",
         'kernel.AL.badMaskPlanes=["SAT", "BAD"]', "kernel.AL.maxKsumSigma=2.5"]
    )  # fmt: skip
    assert values == {
        "kernel.name": "DF",
        "kernel.AL.spatialKernelOrder": 2,
        "kernel.AL.fitForBackground": False,
        "kernel.AL.badMaskPlanes": ["SAT", "BAD"],
        "kernel.AL.maxKsumSigma": 2.5,
    }
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_set(["kernel.name"])


def test_set_errors_are_one_line_exit_2(capsys):
    assert main(["config", "--set", "kernel.AL.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set" in err[0] and "nope" in err[0]


def _plain_without_gain(path, sky_subtracted=True):
    pair = make_pair((128, 128), seed=3, n_stars=10)
    image = pair.science.masked_image.image.astype(np.float32)
    if sky_subtracted:
        image = image - np.float32(np.median(image))
    fits.PrimaryHDU(image).writeto(path)


def test_missing_gain_is_a_note_naming_the_option_not_a_warning(tmp_path, capsys):
    source = tmp_path / "plain.fits"
    _plain_without_gain(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw UserWarning would fail here
        assert main(["ingest", str(source), str(tmp_path / "a.zarr")]) == 0
    err = capsys.readouterr().err
    assert "--gain" in err and "UserWarning" not in err
    assert len([line for line in err.splitlines() if "--gain" in line]) == 1
    assert main(["ingest", str(source), str(tmp_path / "b.zarr"), "--gain", "2.5"]) == 0
    assert "--gain" not in capsys.readouterr().err
    meta = ZarrImage.open(tmp_path / "b.zarr").meta
    assert meta["variance_gain"] == pytest.approx(2.5, rel=0.5)
    assert meta["variance_model"] != "sky_noise_only"


def test_scheduler_file_set_and_status_lines(tmp_path, capsys):
    from distributed import LocalCluster

    pair = make_pair((256, 256), seed=12, template_depth=4)
    science, template = tmp_path / "s.fits", tmp_path / "t.fits"
    write_exposure(science, pair.science)
    write_exposure(template, pair.template)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        scheduler_file = tmp_path / "scheduler.json"
        scheduler_file.write_text(
            json.dumps({"type": "Scheduler", "address": cluster.scheduler_address})
        )
        out = tmp_path / "d.zarr"
        args = [
            "subtract", str(science), str(template), "--out", str(out),
            "--scheduler-file", str(scheduler_file),
            "--set", "kernel.AL.spatialKernelOrder=0", "--set", "kernel.AL.spatialBgOrder=1",
        ]  # fmt: skip
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "diffkernel: reading the science" in err and "fitting the kernel" in err
        assert cluster.scheduler_address in err  # the scheduler it reached, and its dashboard
        result = open_result(out)
        assert result.config["kernel"]["AL"]["spatialKernelOrder"] == 0
        assert result.config["kernel"]["AL"]["spatialBgOrder"] == 1
        assert main([*args[:5], "--overwrite", *args[5:], "-q"]) == 0
        assert "diffkernel:" not in capsys.readouterr().err.replace("quality", "")


def test_scheduler_file_missing_is_one_line_exit_2(tmp_path, capsys):
    args = ["subtract", "a.fits", "b.fits", "--out", str(tmp_path / "d.zarr")]
    assert main([*args, "--scheduler-file", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.json" in err[0] and "does not exist" in err[0]


def test_demo_does_not_write_into_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert main(["demo", "--size", "256", "--workers", "1", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    (written,) = (tmp_path / "tmp").glob("diffkernel-demo-*")
    assert (written / "difference.fits").exists()
    assert str(written) in capsys.readouterr().out
