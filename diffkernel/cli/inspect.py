"""Summarize a result store: ``diffkernel inspect``."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` command to the subparsers ``sub``."""
    inspect = sub.add_parser(
        "inspect",
        help="summarize a result store",
        description="Print a result store's summary: candidates per clipping stage, "
        "kernel sum range, residual statistics, timings and provenance. An incomplete "
        "store (an interrupted run) is reported as such, with exit status 1.",
    )
    inspect.add_argument("store", help="result store (.zarr)")
    inspect.add_argument("--json", action="store_true", help="one line of JSON")
    inspect.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io.zarr.results import open_result, result_status

    status = result_status(args.store)
    if status != "complete":
        report = {"path": str(args.store), "status": status}
        if args.json:
            print(json.dumps(report))
        else:
            why = {
                "missing": "does not exist",
                "incomplete": "is INCOMPLETE: the run that wrote it did not finish",
                "foreign": "is not a diffkernel result store",
            }[status]
            print(f"{args.store} {why}")
        return 1
    result = open_result(args.store)
    meta = result.metadata
    table = result.candidates
    status_col = np.asarray(table["status"])
    good = status_col == "GOOD"
    ksum = np.asarray(table["kernel_sum"])[good]
    report = {
        "path": str(args.store),
        "status": "complete",
        "shape": list(result.difference.shape),
        "candidates": {
            "sources": len(table),
            "good": int(good.sum()),
            "status": {str(k): int((status_col == k).sum()) for k in sorted(set(status_col))},
            "rejected_at_vetting": meta.get("vetting_rejected", {}),
            "rejected_by_stage": meta.get("rejected", {}),
            "spatial_rounds": meta.get("rounds"),
        },
        "kernel": {
            **(meta.get("basis") or {}),
            "spatial_model": result.solution.kernel_functions.model_type,
            "spatial_order": result.solution.kernel_functions.order,
            "kernel_sum_range_good": [float(ksum.min()), float(ksum.max())] if ksum.size else None,
            "spatial_condition": result.solution.condition,
        },
        "residuals": meta.get("residuals"),
        "quality": result.quality,
        "notes": meta.get("notes", []),
        "timings_s": meta.get("timings"),
        "provenance": {
            k: result.provenance.get(k) for k in ("diffkernel", "created", "host", "inputs")
        },
    }
    if args.json:
        print(json.dumps(report, default=str))
    else:
        from ..quality import describe

        print(json.dumps(report, indent=2, default=str))
        print(describe(result.quality))
    return 0
