"""The local cluster recipe and the workflow scripts, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffkernel.io.fits import write_exposure
from diffkernel.io.zarr.results import open_result
from diffkernel.simulate import make_pair

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fits_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    pair = make_pair((256, 256), seed=77, template_depth=4)
    write_exposure(root / "sci.fits", pair.science)
    write_exposure(root / "tmpl.fits", pair.template)
    pair.truth.sources.write(root / "src.ecsv")
    return root


def test_local_cluster_recipe_runs_jobs_by_address(fits_pair, tmp_path):
    """cluster/local_cluster.py starts a cluster; single_pair.py and the CLI submit to it."""
    info = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cluster" / "local_cluster.py"), "--workers", "2",
         "--scheduler-file", str(info)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        out = tmp_path / "single.zarr"
        subprocess.run(
            [sys.executable, str(ROOT / "workflows" / "single_pair.py"),
             str(fits_pair / "sci.fits"), str(fits_pair / "tmpl.fits"), str(out),
             "--scheduler", address, "--set", "kernel.AL.spatialKernelOrder=1"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        result = open_result(out)
        assert result.solution.kernel_functions.order == 1
        assert 0.9 < result.metadata["residuals"]["robust_std"] < 1.1
        manifest = tmp_path / "manifest.csv"
        manifest.write_text(
            "science,template,output,sources\n"
            f"{fits_pair / 'sci.fits'},{fits_pair / 'tmpl.fits'},a.zarr,{fits_pair / 'src.ecsv'}\n"
        )
        done = subprocess.run(
            [sys.executable, str(ROOT / "workflows" / "survey_batch.py"), str(manifest),
             "--out", str(tmp_path / "batch"), "--scheduler", address],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "done" in done.stderr
        assert open_result(tmp_path / "batch" / "a.zarr").metadata["n_good"] >= 5
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not os.path.exists(tmp_path / "batch" / "a.zarr.partial")
