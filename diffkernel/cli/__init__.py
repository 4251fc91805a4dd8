"""Command-line interface: ``diffkernel ingest | subtract | batch | inspect | demo | apply |
config``.

Each command has ``--help`` and lives in a module of its own, which exports
``add_parser`` and ``run``; a command imports what it needs only when it runs, so
``diffkernel --help`` stays quick. Errors of the user's making (bad input, config or
store) print one line naming the problem and exit with status 2; an incomplete result
store makes ``inspect`` exit with status 1. Anything else is one line too (exit 2 for a
file-system error, 1 for a bug; ``DIFFKERNEL_DEBUG=1`` shows its traceback), and
SIGTERM stops a command as SIGINT does (exit 130). A result whose quality verdict is ``fail``
(:mod:`diffkernel.quality`) is written all the same, and ``subtract`` (and ``batch``,
when no pair crashed) exit with status 3.
"""

from __future__ import annotations

import argparse
import gc
import sys

from .. import __version__
from . import apply, batch, config, demo, ingest, inspect, subtract
from .common import EXIT_QUALITY_FAIL, run_command, setup_logging

__all__ = ["main", "EXIT_QUALITY_FAIL"]

#: The commands, in the order ``--help`` lists them.
COMMANDS = (demo, ingest, subtract, inspect, batch, apply, config)


def build_parser() -> argparse.ArgumentParser:
    """The ``diffkernel`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="diffkernel", description="PSF-matching kernels and image subtraction."
    )
    parser.add_argument("--version", action="version", version=f"diffkernel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffkernel`` command.

    Called without ``argv`` (by the console script or ``python -m``), the process exits
    right after: its objects are then frozen out of the garbage collections of the
    interpreter's finalization, which take a second or more once astropy, scipy and
    zarr are loaded (see :func:`diffkernel.pipeline.dask.taskproc.dask_teardown`).
    """
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        return run_command(args)  # one line and an exit status for every error
    finally:
        if argv is None:
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
