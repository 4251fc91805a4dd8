"""Survey batches: resumable after SIGINT, failures isolated, outputs as a clean run's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffkernel import MakeKernelConfig
from diffkernel.batch import STATUS_FILE, read_manifest, run_batch
from diffkernel.errors import InputError
from diffkernel.io.fits import write_exposure
from diffkernel.io.zarr.results import open_result, result_status
from diffkernel.simulate import make_pair

distributed = pytest.importorskip("distributed")

N_PAIRS = 6


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six FITS pairs with source lists, and a manifest of relative paths."""
    root = tmp_path_factory.mktemp("survey")
    lines = ["science,template,output,sources"]
    for i in range(N_PAIRS):
        pair = make_pair((256, 256), seed=100 + i, template_depth=4)
        write_exposure(root / f"sci{i}.fits", pair.science)
        write_exposure(root / f"tmpl{i}.fits", pair.template)
        pair.truth.sources.write(root / f"src{i}.ecsv")
        lines.append(f"sci{i}.fits,tmpl{i}.fits,pair{i}.zarr,src{i}.ecsv")
    path = root / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def clean(manifest, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    statuses = run_batch(manifest, out, client=client)
    assert [s.state for s in statuses] == ["done"] * N_PAIRS
    return out


def assert_same_output(a, b):
    ra, rb = open_result(a), open_result(b)
    np.testing.assert_array_equal(ra.solution.kernel_coeffs, rb.solution.kernel_coeffs)
    for name in ra.candidates.colnames:
        np.testing.assert_array_equal(
            np.asarray(ra.candidates[name]), np.asarray(rb.candidates[name])
        )
    ny, nx = ra.difference.shape
    np.testing.assert_array_equal(
        ra.difference.read(0, ny, 0, nx).image, rb.difference.read(0, ny, 0, nx).image
    )


def states(out):
    return [p["state"] for p in json.loads((out / STATUS_FILE).read_text())["pairs"]]


def test_sigint_then_rerun_finishes_the_rest(manifest, clean, client, tmp_path):
    """SIGINT mid-batch; the rerun skips finished pairs, does the rest, equals a clean run."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "diffkernel.cli", "batch", str(manifest), "--out", str(out),
            "--workers", "1", "--concurrent", "1",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (out / STATUS_FILE).exists() and states(out).count("done") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    first = states(out)
    n_done = first.count("done")
    assert 2 <= n_done < N_PAIRS, first
    for i, state in enumerate(first):
        status = result_status(out / f"pair{i}.zarr")
        assert status == ("complete" if state == "done" else "missing"), (i, state, status)

    statuses = run_batch(manifest, out, client=client)
    again = [s.state for s in statuses]
    assert again == ["skipped" if s == "done" else "done" for s in first]
    for i in range(N_PAIRS):
        assert_same_output(out / f"pair{i}.zarr", clean / f"pair{i}.zarr")
    # Unchanged inputs and config: everything is skipped now.
    assert [s.state for s in run_batch(manifest, out, client=client)] == ["skipped"] * N_PAIRS


def test_changed_config_or_input_is_redone(manifest, clean, client, tmp_path):
    """A pair is redone when its config or its input bytes change."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(clean, out)
    cfg = MakeKernelConfig()
    cfg.kernel.active.spatialKernelOrder = 1
    statuses = run_batch(manifest, out, client=client, config=cfg)
    assert [s.state for s in statuses] == ["done"] * N_PAIRS
    assert open_result(out / "pair0.zarr").solution.kernel_functions.order == 1


def test_a_failing_pair_does_not_stop_the_others(manifest, client, tmp_path):
    """A corrupt input fails its pair, with the reason recorded; the others complete."""
    root = manifest.parent
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"SIMPLE  = this is not a FITS file" * 40)
    rows = [
        "science,template,output,sources",
        f"{root / 'sci0.fits'},{root / 'tmpl0.fits'},pair0.zarr,{root / 'src0.ecsv'}",
        f"{bad},{root / 'tmpl1.fits'},pair1.zarr,{root / 'src1.ecsv'}",
        f"{root / 'sci2.fits'},{root / 'tmpl2.fits'},pair2.zarr,{root / 'src2.ecsv'}",
    ]
    local = tmp_path / "manifest.csv"
    local.write_text("\n".join(rows) + "\n")
    statuses = run_batch(local, tmp_path / "out", client=client)
    assert [s.state for s in statuses] == ["done", "failed", "done"]
    assert "FITS" in statuses[1].error or "fits" in statuses[1].error
    assert result_status(tmp_path / "out" / "pair1.zarr") == "missing"
    recorded = json.loads((tmp_path / "out" / STATUS_FILE).read_text())["pairs"]
    assert recorded[1]["state"] == "failed" and recorded[1]["error"]


def test_manifest_errors_name_the_line(tmp_path, manifest):
    """A missing file, a missing column and a duplicated output are refused up front."""
    text = manifest.read_text().splitlines()
    broken = tmp_path / "m.csv"
    broken.write_text(text[0] + "\n" + text[1].replace("sci0.fits", str(tmp_path / "gone.fits")))
    with pytest.raises(InputError, match=r"line 2: science file .*gone\.fits.* does not exist"):
        read_manifest(broken, tmp_path)
    broken.write_text("science,template\na.fits,b.fits\n")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['output'\]"):
        read_manifest(broken, tmp_path)
    dup = [text[0]] + [
        ",".join(str(manifest.parent / p) if p.endswith((".fits", ".ecsv")) else p
                 for p in line.split(","))
        for line in (text[1], text[1])
    ]  # fmt: skip
    broken.write_text("\n".join(dup) + "\n")
    with pytest.raises(InputError, match="line 3: output .* is also written by line 2"):
        read_manifest(broken, tmp_path)


def test_batch_takes_set_and_a_scheduler_file(manifest, client, tmp_path):
    """``--set`` reaches every pair's config; ``--scheduler-file`` names the cluster."""
    from diffkernel.cli import main

    one = tmp_path / "one.csv"
    lines = manifest.read_text().splitlines()[:2]
    root = manifest.parent
    header, row = lines[0], lines[1].split(",")
    one.write_text(header + "\n" + ",".join(str(root / f) for f in row[:2]) + ",pair0.zarr,"
                   + str(root / row[3]) + "\n")  # fmt: skip
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": client.scheduler.address}))
    out = tmp_path / "out"
    args = ["batch", str(one), "--out", str(out), "--scheduler-file", str(scheduler_file)]
    assert main([*args, "--set", "kernel.AL.spatialKernelOrder=0"]) in (0, 3)
    assert open_result(out / "pair0.zarr").solution.kernel_functions.order == 0
    assert main([*args, "--set", "kernel.AL.noSuchField=1"]) == 2
    missing = ["batch", str(one), "--out", str(out), "--scheduler-file", str(tmp_path / "no")]
    assert main(missing) == 2
