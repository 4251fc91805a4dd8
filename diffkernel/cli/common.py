"""What every command shares: exit statuses, the config, logging, input and cluster options.

:func:`run_command` runs a parsed command the way the README promises: an error of
the user's making (:class:`~diffkernel.errors.DiffkernelError`) is one line and exit
status 2; a file-system error (a read-only or full disk) is one line and exit 2 too;
SIGINT and SIGTERM (what cron and systemd send) stop it the same way, exit 130; any
other exception is a bug, reported in one line with exit status 1, and its traceback
is shown only when asked for: ``-v`` (where the command has it) or
``DIFFKERNEL_DEBUG=1`` in the environment. :func:`check_command_outputs` checks a
command's outputs before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import tomllib
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_QUALITY_FAIL",
    "score_fits_path",
    "write_result_fits",
    "add_input_options",
    "add_logging_options",
    "add_scheduler_options",
    "gain_notes",
    "load_config",
    "parse_set",
    "read_options",
    "scheduler_address",
    "setup_logging",
    "EXIT_INTERRUPTED",
    "check_command_outputs",
    "debug_wanted",
    "positive",
    "run_command",
    "sigterm_as_interrupt",
]

#: Exit status of a run whose result was written but judged ``fail``.
EXIT_QUALITY_FAIL = 3
#: Exit status of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report).
EXIT_INTERRUPTED = 130
#: Environment variable that turns the one-line report of an unexpected error into
#: the full traceback.
DEBUG_ENV = "DIFFKERNEL_DEBUG"

log = logging.getLogger("diffkernel")


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as dotted keys; values read as in a TOML config file.

    A value that is not a TOML value (``DF``, ``convolveTemplate``) is taken as a string, so
    ``--set kernel.name=DF`` and ``--set 'kernel.name="DF"'`` mean the same.
    """
    from ..errors import ConfigError

    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}: expected FIELD=VALUE, e.g. kernel.AL.spatialKernelOrder=2"
            )
        try:
            values[key] = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            values[key] = text.strip()
    return values


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and the repeatable ``--set FIELD=VALUE`` applied after it."""
    parser.add_argument("--config", help="TOML or JSON file setting any config field")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a config field after --config, as in the file (repeatable), e.g. "
        "--set kernel.AL.spatialKernelOrder=2; `diffkernel config --defaults` lists them",
    )


def load_config(path: str | None, overrides: Sequence[str] = ()):
    """The subtraction defaults (a fitted background), updated by the file, then ``--set``."""
    from ..config import MakeKernelConfig
    from ..errors import ConfigError

    base = MakeKernelConfig.default_subtraction()
    cfg = base if path is None else MakeKernelConfig.from_file(path, base=base)
    if overrides:
        try:
            cfg.update(parse_set(overrides))
        except ConfigError as exc:
            raise ConfigError(f"--set: {exc}") from None
    cfg.validate()
    if path is not None:
        # A field another one overrides would otherwise be silently ignored.
        from ..config.tomlfile import overridden_fields

        for note in overridden_fields(cfg, base):
            print(f"diffkernel: note: {path}: {note}", file=sys.stderr)
    return cfg


# --------------------------------------------------------------------------- logging


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet``."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more messages (-vv: debug)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars"
    )


class _DropCancelledFeeds(logging.Filter):
    """Drops the scheduler's report of a cancelled coroutine: the progress bar's feed,
    cancelled as the cluster closes after a failed run, is logged as an ERROR with a
    traceback, though nothing went wrong but the run's own (already reported) error."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not when it was made.

    (``main`` may run many times in one process, e.g. under a test runner that swaps
    ``sys.stderr``; a handler holding an old stream would write into a closed file.)
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Send the ``diffkernel`` logger's records to stderr, one line each.

    Default level INFO (a status line per phase), ``-q`` WARNING, ``-v`` DEBUG. Dask's own
    shutdown chatter (nanny warnings about workers killed at close) is kept to errors
    unless ``-v``.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("diffkernel: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    for name in ("distributed.nanny", "distributed.core", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    scheduler = logging.getLogger("distributed.scheduler")
    if not verbose and not any(isinstance(f, _DropCancelledFeeds) for f in scheduler.filters):
        scheduler.addFilter(_DropCancelledFeeds())


@contextlib.contextmanager
def gain_notes(name: str, where: str) -> Iterator[None]:
    """Turn the variance model's "no gain" warning into one note naming ``--gain``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = str(warning.message)
        if "no gain is known" in text:
            log.warning(
                "note: %s %s has no GAIN card and no sky pedestal: its variance is the sky's "
                "alone, too small on bright stars; pass --gain E_PER_ADU",
                name,
                where,
            )
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )


# --------------------------------------------------------------------------- inputs


def add_input_options(parser: argparse.ArgumentParser, pair: bool = True) -> None:
    """``--gain``, ``--saturation`` and the HOTPANTS-style noise and mask files.

    For a pair ``--science-noise``, ``--science-mask``, ``--template-noise`` and
    ``--template-mask``; for one image ``--noise`` and ``--mask``.
    """
    both = " (one value for both, or science,template)" if pair else ""
    parser.add_argument(
        "--gain",
        metavar="G[,G_TEMPLATE]" if pair else "G",
        help=f"gain in e-/ADU of plain FITS inputs, replacing their GAIN card{both}",
    )
    parser.add_argument(
        "--saturation",
        metavar="S[,S_TEMPLATE]" if pair else "S",
        help=f"saturation level in ADU of FITS inputs, replacing their cards{both}",
    )
    for who, flag in (("science", "i"), ("template", "t")) if pair else (("", "i"),):
        prefix = f"--{who}-" if who else "--"
        parser.add_argument(
            f"{prefix}noise",
            metavar="FITS",
            help=f"{who or 'the'} 1-sigma noise image in the image's units (HOTPANTS -{flag}ni); "
            "the variance is its square (for a variance image, give its square root)",
        )
        parser.add_argument(
            f"{prefix}mask",
            metavar="FITS",
            help=f"{who or 'the'} bad-pixel image: non-zero pixels are masked BAD "
            f"(HOTPANTS -{flag}mi)",
        )


def _pair_of_numbers(text: str | None, option: str) -> tuple[float | None, float | None]:
    from ..errors import InputError

    if text is None:
        return None, None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected a number or two, science,template") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise InputError(f"{option} {text!r}: expected a number or two, science,template")


def read_options(args: argparse.Namespace, who: str) -> dict[str, Any]:
    """The :func:`~diffkernel.io.fits.read_exposure` options of the science or template."""
    index = 0 if who == "science" else 1
    options = {
        "gain": _pair_of_numbers(getattr(args, "gain", None), "--gain")[index],
        "saturation": _pair_of_numbers(getattr(args, "saturation", None), "--saturation")[index],
        "noise": getattr(args, f"{who}_noise", getattr(args, "noise", None)),
        "mask": getattr(args, f"{who}_mask", getattr(args, "mask", None)),
    }
    return {k: v for k, v in options.items() if v is not None}


# --------------------------------------------------------------------------- cluster


def add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    """``--scheduler ADDRESS`` and ``--scheduler-file JSON``."""
    parser.add_argument("--scheduler", help="address of a running Dask scheduler")
    parser.add_argument(
        "--scheduler-file",
        metavar="JSON",
        help="Dask scheduler file (as `dask scheduler --scheduler-file` and the cluster/ "
        "recipes write it): connect to the address it holds",
    )


def scheduler_address(args: argparse.Namespace) -> str | None:
    """The scheduler's address: ``--scheduler``, or the one ``--scheduler-file`` holds."""
    from ..errors import InputError

    path = getattr(args, "scheduler_file", None)
    if path is None:
        return getattr(args, "scheduler", None)
    if getattr(args, "scheduler", None):
        raise InputError("give --scheduler or --scheduler-file, not both")
    try:
        info = json.loads(Path(path).read_text())
        address = info["address"]
    except FileNotFoundError:
        raise InputError(
            f"scheduler file {path!r} does not exist: is the scheduler running?"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"scheduler file {path!r} is not a Dask scheduler file with an address ({exc})"
        ) from None
    if not isinstance(address, str) or not address:
        raise InputError(f"scheduler file {path!r} holds no scheduler address")
    return address


# --------------------------------------------------------------------------- outputs


def score_fits_path(fits_out) -> str:
    """Where ``--fits-out F`` puts the score image: ``F`` with ``.score`` before ``.fits``."""
    path = Path(fits_out)
    stem = path.name[: -len(".fits")] if path.name.endswith(".fits") else path.name
    return str(path.with_name(f"{stem}.score.fits"))


def write_result_fits(result, fits_out, overwrite: bool, cards=None) -> list[str]:
    """The difference as FITS at ``fits_out``, and its score image beside it when it has one.

    Both carry the science's cards and WCS, the provenance and the verdict
    (:func:`diffkernel.io.products.write_difference`), as float32.
    """
    from ..io.products import write_difference

    written = []
    for image, path in ((result.difference, str(fits_out)), (result.score, None)):
        if image is None:
            continue
        path = path or score_fits_path(fits_out)
        log.info("writing %s", path)
        write_difference(path, result, image=image, overwrite=overwrite, extra_header=cards)
        written.append(path)
    return written


# --------------------------------------------------------------------------- errors


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
