"""``diffkernel subtract --score`` then ``diffkernel apply`` on FITS inputs."""

from __future__ import annotations

import json

import numpy as np

from diffkernel.cli import main


def test_subtract_score_then_apply_gives_identical_fits(tmp_path, capsys):
    """apply recreates the FITS difference and score of subtract exactly; a changed input
    is refused with one line naming it (exit 2)."""
    from diffkernel.io.fits import read_exposure, write_exposure
    from diffkernel.simulate.swapped import make_swapped_pair

    pair = make_swapped_pair((256, 256), seed=3, template_depth=10)
    science, template = tmp_path / "science.fits", tmp_path / "template.fits"
    write_exposure(science, pair.science)
    write_exposure(template, pair.template)
    sources = tmp_path / "sources.ecsv"
    pair.truth.sources.write(sources)
    common = ["--workers", "1", "--chunks", "64", "--quiet"]
    out, fits = tmp_path / "out.zarr", tmp_path / "diff.fits"
    args = ["subtract", str(science), str(template), "--out", str(out), "--fits-out", str(fits)]
    assert main([*args, "--sources", str(sources), "--score", *common]) == 0
    capsys.readouterr()
    again, fits2 = tmp_path / "again.zarr", tmp_path / "again.fits"
    args = ["apply", str(out), str(science), str(template), "--out", str(again)]
    assert main([*args, "--fits-out", str(fits2), *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fits"] == [str(fits2), str(tmp_path / "again.score.fits")]
    for a, b in ((fits, fits2), (tmp_path / "diff.score.fits", tmp_path / "again.score.fits")):
        x, y = read_exposure(a).masked_image, read_exposure(b).masked_image
        for plane in ("image", "variance", "mask"):
            np.testing.assert_array_equal(getattr(x, plane), getattr(y, plane), err_msg=plane)
    stored = read_exposure(tmp_path / "diff.score.fits").masked_image
    score = stored.image
    sky = np.isfinite(score) & (stored.mask == 0)
    assert 0.9 < 1.4826 * np.median(np.abs(score[sky] - np.median(score[sky]))) < 1.1

    changed = pair.template.masked_image
    changed.variance[10, 10] *= 2
    write_exposure(tmp_path / "changed.fits", pair.template)
    args = ["apply", str(out), str(science), str(tmp_path / "changed.fits")]
    assert main([*args, "--out", str(tmp_path / "x.zarr"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "template image's variance plane differs" in err[0], err
