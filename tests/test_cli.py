"""The README's main command: ``diffkernel demo`` end to end on a LocalCluster."""

from __future__ import annotations

import json

import numpy as np

from diffkernel.cli import main
from diffkernel.store import open_result


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
