"""Which pairs of a batch are current, decided from file metadata before any cluster starts.

A batch pair is current when its output is a complete result whose fingerprint (a
digest of every input byte, the configuration and the version; see
:func:`diffkernel.batch.fingerprint`) is the pair's. Hashing every input again on
each rerun costs minutes for a survey; instead, each pair done or found current is
recorded in ``.batch-stamps.json`` in the output folder with the stamps
(:mod:`diffkernel.io.stamps`: sizes, times and inodes of its input files, with the
configuration and version, and of its output's files) under which that was true. A
rerun skips a pair whose stamps are unchanged without reading a byte of it, and
starts no cluster when every pair is skipped; any other pair goes through the full
check as before (and is recorded again if found current).

The input stamps are taken before the pair is fingerprinted, so an input changed
while the batch runs leaves a stale stamp behind: the next run looks again.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .config import MakeKernelConfig
from .io.stamps import StampBook, job_stamps, stamp

__all__ = ["STAMP_FILE", "CurrentPairs"]

#: Name of the stamp book in the batch's output folder.
STAMP_FILE = ".batch-stamps.json"


class CurrentPairs:
    """The stamp book of one batch run; a context manager that records on exit.

    Parameters
    ----------
    out_dir : path
        The batch's output folder (holds :data:`STAMP_FILE`).
    config : MakeKernelConfig
        The batch's configuration (part of every input stamp).
    options : str
        The other options that change a result, as text (part of every input stamp).
    """

    def __init__(self, out_dir, config: MakeKernelConfig, options: str = "") -> None:
        self.book = StampBook(Path(out_dir) / STAMP_FILE)
        self.extra = (
            json.dumps(config.to_dict(), sort_keys=True, default=str) + __version__ + options
        )
        self.input_stamps: dict[str, str | None] = {}
        self.statuses: list = []

    def stamps(self, spec) -> dict[str, str | None]:
        """The stamps of a pair now: inputs (with the configuration) and output."""
        return job_stamps((spec.science, spec.template, spec.sources), spec.output, self.extra)

    def skip_known(self, specs, statuses, status_book) -> list:
        """Mark the pairs recorded as current ``skipped``; the others, as (spec, status).

        ``status_book.update(status, **changes)`` records a pair's new state.
        """
        self.statuses = list(zip(specs, statuses, strict=True))
        due = []
        for spec, status in self.statuses:
            now = self.stamps(spec)
            self.input_stamps[str(spec.output)] = now["inputs"]
            known = self.book.lookup(str(spec.output), now)
            if known is None or not known.get("fingerprint"):
                due.append((spec, status))
                continue
            status_book.update(
                status,
                state="skipped",
                fingerprint=known["fingerprint"],
                seconds=0.0,
                quality=known.get("quality"),
            )
        return due

    def __enter__(self) -> CurrentPairs:
        return self

    def __exit__(self, *exc) -> None:
        """Record the pairs done or found current (even after an interruption)."""
        for spec, status in self.statuses:
            key = str(spec.output)
            if status.state in ("done", "skipped") and status.fingerprint:
                stamps = {"inputs": self.input_stamps.get(key), "output": stamp([spec.output])}
                self.book.record(
                    key, stamps, fingerprint=status.fingerprint, quality=status.quality
                )
            elif status.state != "pending":
                self.book.forget(key)
        try:
            self.book.save()
        except OSError:
            pass  # the book is a cache: without it the next run checks every pair in full
