"""Batch reruns decide from file metadata which pairs are current, before any cluster."""

from __future__ import annotations

import json
import os

import pytest

from diffkernel.batch import run_batch
from diffkernel.batch_state import STAMP_FILE
from diffkernel.io.fits import write_exposure
from diffkernel.io.stamps import StampBook, job_stamps, stamp
from diffkernel.simulate import make_pair

pytest.importorskip("distributed")

N_PAIRS = 2


def test_stamp_follows_writes_not_reads(tmp_path):
    """A rewrite of the same size changes the stamp; reading does not; missing is None."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    first = stamp([path], "cfg")
    assert path.read_bytes() and stamp([path], "cfg") == first
    assert stamp([path], "other cfg") != first
    st = path.stat()
    path.write_bytes(b"y" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime back
    assert stamp([path], "cfg") != first  # (the status-change time moved)
    assert stamp([tmp_path / "missing"]) is None
    folder = tmp_path / "store.zarr"
    (folder / "g").mkdir(parents=True)
    (folder / "g" / "c").write_bytes(b"1")
    before = job_stamps([f"{folder}#g", None], path)
    (folder / "g" / "d").write_bytes(b"2")
    after = job_stamps([f"{folder}#g", None], path)
    assert after["inputs"] != before["inputs"] and after["output"] == before["output"]
    assert job_stamps([f"{folder}#h", None], path)["inputs"] != after["inputs"]


def test_book_answers_only_under_the_same_stamps(tmp_path):
    book = StampBook(tmp_path / "book.json")
    book.record("k", {"inputs": "a", "output": "b"}, fingerprint="f")
    book.save()
    again = StampBook(tmp_path / "book.json")
    assert again.lookup("k", {"inputs": "a", "output": "b"}) == {"fingerprint": "f"}
    assert again.lookup("k", {"inputs": "a", "output": "c"}) is None
    assert again.lookup("k", {"inputs": None, "output": "b"}) is None
    (tmp_path / "book.json").write_text("not json")
    assert StampBook(tmp_path / "book.json").lookup("k", {"inputs": "a", "output": "b"}) is None


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("stamped")
    lines = ["science,template,output,sources"]
    for i in range(N_PAIRS):
        pair = make_pair((192, 192), seed=300 + i, template_depth=4)
        write_exposure(root / f"sci{i}.fits", pair.science)
        write_exposure(root / f"tmpl{i}.fits", pair.template)
        pair.truth.sources.write(root / f"src{i}.ecsv")
        lines.append(f"sci{i}.fits,tmpl{i}.fits,pair{i}.zarr,src{i}.ecsv")
    path = root / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def no_cluster(*args, **kwargs):
    raise AssertionError("a cluster was started")


def test_rerun_of_current_pairs_reads_nothing_and_starts_no_cluster(
    manifest, client, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    first = run_batch(manifest, out, client=client)
    assert [s.state for s in first] == ["done"] * N_PAIRS
    assert len(json.loads((out / STAMP_FILE).read_text())) == N_PAIRS

    import diffkernel.batch as batch
    import diffkernel.pipeline.dask.cluster as cluster

    monkeypatch.setattr(cluster, "connect", no_cluster)
    monkeypatch.setattr(batch, "fingerprint", no_cluster)  # no input byte is read
    again = run_batch(manifest, out)
    assert [s.state for s in again] == ["skipped"] * N_PAIRS
    assert [s.fingerprint for s in again] == [s.fingerprint for s in first]
    assert [s.quality for s in again] == [s.quality for s in first]
    monkeypatch.undo()

    # A touched input (same bytes) is hashed again, found current and recorded anew;
    # the pair is skipped either way.
    os.utime(manifest.parent / "sci0.fits")
    touched = run_batch(manifest, out, client=client)
    assert [s.state for s in touched] == ["skipped"] * N_PAIRS
    monkeypatch.setattr(cluster, "connect", no_cluster)
    assert [s.state for s in run_batch(manifest, out)] == ["skipped"] * N_PAIRS
    monkeypatch.undo()

    # A removed output is redone, and so is one whose store changed since.
    import shutil

    shutil.rmtree(out / "pair1.zarr")
    (out / "pair0.zarr" / "extra").write_text("changed")
    redone = run_batch(manifest, out, client=client)
    assert [s.state for s in redone] == ["skipped", "done"]
