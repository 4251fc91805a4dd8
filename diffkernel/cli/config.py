"""Print the subtraction configuration: ``diffkernel config --defaults``."""

from __future__ import annotations

import argparse
import sys

from .common import add_config_options

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``config`` command to the subparsers ``sub``."""
    config = sub.add_parser(
        "config",
        help="print the subtraction configuration as TOML (a starting point for --config)",
        description="Print every field of the configuration `subtract`, `batch` and `demo` "
        "use as TOML: with --defaults the subtraction defaults "
        "(MakeKernelConfig.default_subtraction(), a fitted differential background); "
        "with --config FILE and --set FIELD=VALUE, the result of applying them. The output "
        "is a valid --config file; --describe adds each field's documentation instead.",
    )
    config.add_argument(
        "--defaults", action="store_true", help="the defaults, ignoring --config and --set"
    )
    add_config_options(config)
    config.add_argument(
        "--describe", action="store_true", help="list every field with its type and doc"
    )
    config.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config.tomlfile import toml_dumps
    from .common import load_config

    cfg = load_config(None) if args.defaults else load_config(args.config, args.set)
    if args.describe:
        sys.stdout.write(cfg.describe() + "\n")
    else:
        sys.stdout.write(toml_dumps(cfg.to_dict()))
    return 0
