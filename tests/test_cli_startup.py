"""What the command line costs before it does any work: ``--help`` imports no heavy library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffkernel.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

#: Libraries that take a second or more to import between them; ``--help`` needs none.
HEAVY = ("numpy", "scipy", "astropy", "dask", "distributed", "zarr", "matplotlib")


def _python(code: str | None = None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("command", [None, *(c.__name__.rsplit(".", 1)[-1] for c in COMMANDS)])
def test_help_imports_no_heavy_library(command):
    """Every command's ``--help`` prints without importing numpy, astropy, Dask..."""
    argv = ["--help"] if command is None else [command, "--help"]
    code = (
        "import sys\n"
        "from diffkernel.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert "usage: diffkernel" in proc.stdout


def test_import_diffkernel_is_light_and_names_load_on_use():
    """``import diffkernel`` loads nothing heavy; a public name loads its module on use."""
    code = (
        "import sys, diffkernel\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(diffkernel.MakeKernelConfig.__name__, 'numpy' in sys.modules)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "MakeKernelConfig True"]


def test_python_dash_m_runs_the_command():
    """``python -m diffkernel.cli`` is the ``diffkernel`` command."""
    proc = _python(None, "-m", "diffkernel.cli", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("diffkernel ")


def test_subtract_names_a_missing_input_before_any_cluster(tmp_path, monkeypatch, capsys):
    """The cluster starts alongside the reading of the inputs, but not for a missing one."""
    import diffkernel.pipeline.dask.cluster as cluster
    from diffkernel.cli import main

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(cluster, "connect", no_cluster)
    out = tmp_path / "out.zarr"
    assert main(["subtract", str(tmp_path / "nope.fits"), "t.fits", "--out", str(out)]) == 2
    assert "nope.fits' does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
