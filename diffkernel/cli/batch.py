"""Process the pairs of a manifest, resumably: ``diffkernel batch``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    EXIT_INTERRUPTED,
    EXIT_QUALITY_FAIL,
    add_config_options,
    add_scheduler_options,
    load_config,
    positive,
    scheduler_address,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``batch`` command to the subparsers ``sub``."""
    batch = sub.add_parser(
        "batch",
        help="process the pairs of a manifest, resumably",
        description="Process every pair of MANIFEST (CSV: science, template, output, "
        "optionally sources) on one Dask cluster, several pairs at a time. A pair whose "
        "output is complete and whose input bytes and config are unchanged is skipped, so "
        "an interrupted batch is resumed by running it again. Per-pair states and errors "
        "go to OUT/batch-status.json with each result's quality verdict; a failing pair "
        "does not stop the others. Outputs are paths relative to OUT and stay inside it; "
        "an existing output is replaced only if a batch wrote it. A line per finished "
        "pair goes to stderr. One batch at a time runs on an OUT; a rerun removes what "
        "a killed one left. Exit status 2 if the batch cannot run or record its work "
        "(a bad manifest, OUT not writable), 1 if any pair failed, else 3 if any "
        "result's quality verdict is fail; 130 if stopped by SIGINT or SIGTERM.",
    )
    batch.add_argument("manifest", help="CSV manifest")
    batch.add_argument("--out", required=True, help="folder of the outputs and status file")
    add_config_options(batch)
    add_scheduler_options(batch)
    batch.add_argument("--workers", type=int, help="LocalCluster workers (default: cores)")
    batch.add_argument("--concurrent", type=int, default=2, help="pairs in flight at once")
    batch.add_argument("--chunks", type=int, default=512, help="chunk side for FITS inputs")
    batch.add_argument(
        "--timeout", type=float, help="seconds a pair may run on the cluster before it fails"
    )
    batch.add_argument(
        "--no-decorrelate", action="store_true", help="keep the difference's correlated noise"
    )
    batch.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..batch import STATUS_FILE, run_batch

    cfg = load_config(args.config, args.set)
    scheduler = scheduler_address(args)
    positive("--workers", args.workers)
    positive("--concurrent", args.concurrent)
    if args.timeout is not None and not args.timeout > 0:
        from ..errors import InputError

        raise InputError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        statuses = run_batch(
            args.manifest,
            args.out,
            config=cfg,
            scheduler=scheduler,
            n_workers=args.workers,
            concurrent=args.concurrent,
            chunks=args.chunks,
            timeout=args.timeout,
            decorrelate=not args.no_decorrelate,
        )
    except KeyboardInterrupt:
        print(f"diffkernel batch: stopped; see {Path(args.out) / STATUS_FILE}", file=sys.stderr)
        return EXIT_INTERRUPTED
    for s in statuses:
        line = f"{s.state:8s} {s.output}"
        if s.quality:
            line += f"  quality {s.quality}"
        if s.error:
            line += f"  ({s.error})"
        print(line)
    counts = {state: sum(s.state == state for s in statuses) for state in ("done", "skipped")}
    failed = sum(s.state == "failed" for s in statuses)
    bad = sum(s.quality == "fail" for s in statuses)
    print(
        f"{counts['done']} done, {counts['skipped']} skipped, {failed} failed, {bad} failed quality"
    )
    if failed:
        return 1
    return EXIT_QUALITY_FAIL if bad else 0
