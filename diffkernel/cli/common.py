"""What every command shares: exit statuses, the config loader, output checks, error handling.

:func:`run_command` runs a parsed command the way the README promises: an error of
the user's making (:class:`~diffkernel.errors.DiffkernelError`) is one line and exit
status 2; a file-system error (a read-only or full disk) is one line and exit 2 too;
SIGINT and SIGTERM (what cron and systemd send) stop it the same way, exit 130; any
other exception is a bug, reported in one line with exit status 1, and its traceback
is shown only when asked for: ``DIFFKERNEL_DEBUG=1`` in the environment (or a
``-v``/``--verbose`` flag where the command has one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

__all__ = [
    "EXIT_QUALITY_FAIL",
    "EXIT_INTERRUPTED",
    "check_command_outputs",
    "debug_wanted",
    "load_config",
    "positive",
    "run_command",
    "score_fits_path",
    "sigterm_as_interrupt",
    "write_result_fits",
]

#: Exit status of a run whose result was written but judged ``fail``.
EXIT_QUALITY_FAIL = 3
#: Exit status of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report).
EXIT_INTERRUPTED = 130
#: Environment variable that turns the one-line report of an unexpected error into
#: the full traceback.
DEBUG_ENV = "DIFFKERNEL_DEBUG"


def load_config(path: str | None):
    """The subtraction defaults (a fitted background), updated by the config file.

    Fields the file sets that another field overrides (``kernelSize`` under
    ``scaleByFwhm``) are named on stderr: they would otherwise be silently ignored.
    """
    from ..config import MakeKernelConfig
    from ..config.tomlfile import overridden_fields

    base = MakeKernelConfig.default_subtraction()
    cfg = base if path is None else MakeKernelConfig.from_file(path, base=base)
    cfg.validate()
    if path is not None:
        for note in overridden_fields(cfg, base):
            print(f"diffkernel: note: {path}: {note}", file=sys.stderr)
    return cfg


def score_fits_path(fits_out) -> str:
    """Where ``--fits-out F`` puts the score image: ``F`` with ``.score`` before ``.fits``."""
    from pathlib import Path

    path = Path(fits_out)
    stem = path.name[: -len(".fits")] if path.name.endswith(".fits") else path.name
    return str(path.with_name(f"{stem}.score.fits"))


def write_result_fits(result, fits_out, overwrite: bool, cards=None) -> list[str]:
    """The difference as FITS at ``fits_out``, and its score image beside it when it has one."""
    from ..image import Exposure
    from ..io.fits import write_exposure

    written = []
    for image, path in ((result.difference, str(fits_out)), (result.score, None)):
        if image is None:
            continue
        path = path or score_fits_path(fits_out)
        ny, nx = image.shape
        write_exposure(
            path, Exposure(image.read(0, ny, 0, nx), wcs=image.wcs), overwrite=overwrite,
            extra_header=cards,
        )  # fmt: skip
        written.append(path)
    return written


def positive(option: str, value: int | None, minimum: int = 1) -> None:
    """Refuse an integer option below ``minimum`` (None passes: the default is used)."""
    from ..errors import InputError

    if value is not None and value < minimum:
        raise InputError(f"{option} must be at least {minimum}, got {value}")


def check_command_outputs(args: argparse.Namespace, inputs: dict) -> None:
    """Check a command's ``--out``, ``--fits-out`` and ``--plots`` before any work.

    Parameters
    ----------
    args : argparse.Namespace
        The command's arguments (``out``, ``overwrite``; ``fits_out``, ``plots`` and
        ``score`` where it has them).
    inputs : dict
        What it reads, by name (``{"science": ..., "template": ...}``).

    Raises
    ------
    InputError, StoreError
        See :func:`diffkernel.io.paths.check_outputs`.
    """
    from ..io.paths import Output, check_outputs

    outputs = [Output("--out", args.out, "store")]
    fits_out = getattr(args, "fits_out", None)
    if fits_out:
        outputs.append(Output("--fits-out", fits_out, "file"))
        if getattr(args, "score", False):
            outputs.append(Output("--fits-out's score", score_fits_path(fits_out), "file"))
    if getattr(args, "plots", None):
        outputs.append(Output("--plots", args.plots, "folder"))
    check_outputs(outputs, inputs, args.overwrite)


def debug_wanted(args: argparse.Namespace | None = None) -> bool:
    """Whether tracebacks are wanted: ``DIFFKERNEL_DEBUG=1`` or a ``-v`` flag."""
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        return True
    return bool(getattr(args, "verbose", 0) or getattr(args, "debug", False))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM raises KeyboardInterrupt in the main thread, as SIGINT does.

    So a batch stopped by cron or systemd stops as one stopped by Ctrl-C: no new work,
    in-flight outputs finished or their partial folders removed, work folders deleted.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; every error becomes one line and an exit status."""
    from ..errors import DiffkernelError

    name = f"diffkernel {args.command}"
    try:
        with sigterm_as_interrupt():
            return int(args.func(args))
    except DiffkernelError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, MemoryError) as err:
        # A full or read-only disk, a vanished file: the environment, not a bug.
        if debug_wanted(args):
            traceback.print_exc()
        print(f"{name}: error: {_describe(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug_wanted(args):
            traceback.print_exc()
        print(
            f"{name}: unexpected error: {_describe(err)} (a bug: please report it; "
            f"{DEBUG_ENV}=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else '(no message)'}"
