"""Survey reprocessing: many pairs from a manifest, on one cluster, resumable.

A manifest is a CSV file with columns ``science``, ``template`` and ``output`` (and
optionally ``sources``): inputs are FITS files or Zarr image groups
(``store.zarr#group``), relative paths are taken from the manifest's folder, and
outputs from the batch's output folder.

Each pair gets a *fingerprint*: SHA-256 over the bytes of its input files, the
configuration and the package version. A pair whose output is a complete result
with the same fingerprint is skipped; any other is (re)done, its output published
atomically, so an interrupted batch simply runs again. A rerun first skips, without
reading their inputs, the pairs whose files have not changed since they were found
current (:mod:`diffkernel.batch_state`), and starts no cluster when that is all of
them. Pairs run concurrently on
one Dask client; a failing pair is recorded with its error and does not stop the
others. ``batch-status.json`` in the output folder records every pair's state
(rewritten atomically after each pair).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .batch_state import CurrentPairs
from .config import MakeKernelConfig
from .errors import InputError

__all__ = ["PairSpec", "read_manifest", "fingerprint", "run_batch", "STATUS_FILE"]

#: Name of the status file in the batch's output folder.
STATUS_FILE = "batch-status.json"


@dataclass(frozen=True)
class PairSpec:
    """One row of a manifest, with resolved paths."""

    row: int
    science: str
    template: str
    output: Path
    sources: str | None = None


@dataclass
class PairStatus:
    """What happened to one pair."""

    row: int
    output: str
    state: str = "pending"  # pending, running, done, skipped, failed
    error: str | None = None
    seconds: float | None = None
    fingerprint: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    quality: str | None = None  # the result's verdict: pass, warn or fail


def _resolve(value: str, base: Path) -> str:
    location, sep, group = value.partition("#")
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = base / path
    return f"{path}{sep}{group}"


def read_manifest(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[PairSpec]:
    """Rows of a manifest, checked: columns present, input files existing, outputs unique.

    Raises
    ------
    InputError
        Naming the row and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} does not exist")
    base, out_dir = path.parent, Path(out_dir)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        missing = {"science", "template", "output"} - columns
        if missing:
            raise InputError(
                f"manifest {str(path)!r} lacks column(s) {sorted(missing)}; it needs "
                "science, template, output (and optionally sources)"
            )
        rows = list(reader)
    if not rows:
        raise InputError(f"manifest {str(path)!r} has no rows")
    specs: list[PairSpec] = []
    seen: dict[Path, int] = {}
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        values = {k: (row.get(k) or "").strip() for k in ("science", "template", "output")}
        empty = [k for k, v in values.items() if not v]
        if empty:
            raise InputError(f"manifest line {number}: empty {', '.join(empty)}")
        science = _resolve(values["science"], base)
        template = _resolve(values["template"], base)
        sources = (row.get("sources") or "").strip() or None
        if sources is not None:
            sources = _resolve(sources, base)
        for name, value in (("science", science), ("template", template), ("sources", sources)):
            if value is not None and not Path(value.partition("#")[0]).exists():
                raise InputError(f"manifest line {number}: {name} file {value!r} does not exist")
        output = Path(values["output"])
        output = output if output.is_absolute() else out_dir / output
        if output in seen:
            raise InputError(
                f"manifest line {number}: output {str(output)!r} is also written by line "
                f"{seen[output]}"
            )
        seen[output] = number
        specs.append(PairSpec(number, science, template, output, sources))
    return specs


def _hash_path(digest, path: Path) -> None:
    """Feed a file's bytes, or every file of a directory in sorted order, to ``digest``."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)


def fingerprint(spec: PairSpec, config: MakeKernelConfig, decorrelate: bool = True) -> str:
    """SHA-256 of the pair's input bytes, its configuration and the package version."""
    digest = hashlib.sha256()
    for value in (spec.science, spec.template, spec.sources):
        if value is None:
            digest.update(b"-")
            continue
        location, _, group = value.partition("#")
        digest.update(group.encode())
        _hash_path(digest, Path(location))
    digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(__version__.encode())
    if not decorrelate:  # (so fingerprints of decorrelated results stay as they were)
        digest.update(b"no-decorrelate")
    return digest.hexdigest()


def _is_current(output: Path, print_: str) -> bool:
    from .io.zarr.results import open_result, result_status

    if result_status(output) != "complete":
        return False
    try:
        stored = open_result(output).provenance.get("batch_fingerprint")
    except Exception:  # an unreadable store is redone, not trusted
        return False
    return stored == print_


class _StatusBook:
    """The status file, rewritten atomically whenever a pair changes state."""

    def __init__(self, path: Path, statuses: list[PairStatus]) -> None:
        self.path = path
        self.statuses = statuses
        self.lock = threading.Lock()

    def update(self, status: PairStatus, **changes) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(status, key, value)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            payload = {
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pairs": [asdict(s) for s in self.statuses],
            }
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            os.replace(tmp, self.path)


def _run_one(
    spec: PairSpec,
    status: PairStatus,
    book: _StatusBook,
    client,
    config: MakeKernelConfig,
    chunks: int,
    stop: threading.Event,
    decorrelate: bool = True,
) -> None:
    import shutil
    import uuid

    from astropy.table import Table

    from .io.inputs import open_input
    from .pipeline.dask.driver import run_pair

    if stop.is_set():
        return
    started = time.perf_counter()
    print_ = fingerprint(spec, config, decorrelate)
    if _is_current(spec.output, print_):
        from .io.zarr.results import open_result

        verdict = open_result(spec.output).quality.get("verdict")
        book.update(status, state="skipped", fingerprint=print_, seconds=0.0, quality=verdict)
        return
    book.update(status, state="running", fingerprint=print_)
    work = spec.output.parent / f".{spec.output.name}.inputs-{uuid.uuid4().hex[:8]}"
    try:
        images = [
            open_input(value, work, name, chunks)
            for name, value in (("science", spec.science), ("template", spec.template))
        ]
        sources = Table.read(spec.sources) if spec.sources else None
        spec.output.parent.mkdir(parents=True, exist_ok=True)
        run = run_pair(
            images[0],
            images[1],
            spec.output,
            config=config,
            sources=sources,
            client=client,
            overwrite=True,
            provenance={"batch_fingerprint": print_},
            decorrelate=decorrelate,
        )
        book.update(
            status,
            state="done",
            seconds=time.perf_counter() - started,
            summary={
                k: run.summary[k] for k in ("n_good", "residuals", "quality") if k in run.summary
            },
            quality=run.quality.get("verdict"),
        )
    except Exception as err:
        book.update(
            status,
            state="failed",
            seconds=time.perf_counter() - started,
            error=f"{type(err).__name__}: {err}",
        )
        if not getattr(err, "__module__", "").startswith("diffkernel"):
            traceback.print_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_batch(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: MakeKernelConfig | None = None,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    concurrent: int = 2,
    chunks: int = 512,
    decorrelate: bool = True,
) -> list[PairStatus]:
    """Process every pair of a manifest; skip those already done with the same inputs.

    Parameters
    ----------
    manifest : path
        CSV with columns ``science``, ``template``, ``output`` (``sources`` optional).
    out_dir : path
        Folder of relative outputs and of ``batch-status.json``.
    config : MakeKernelConfig, optional
        One configuration for every pair; default
        :meth:`~diffkernel.config.MakeKernelConfig.default_subtraction`.
    client, scheduler, n_workers
        Where to run (see :func:`diffkernel.pipeline.dask.cluster.connect`).
    concurrent : int
        Pairs in flight at once (their tasks share the cluster).
    chunks : int
        Chunk side used when ingesting FITS inputs.
    decorrelate : bool
        Decorrelate the differences (:func:`~diffkernel.pipeline.dask.driver.run_pair`).

    Returns
    -------
    list of PairStatus
        One per manifest row. Failed pairs carry their error; the batch goes on.
    """
    cfg = MakeKernelConfig.default_subtraction() if config is None else config
    cfg.validate()
    if concurrent < 1:
        raise InputError(f"concurrent must be at least 1, got {concurrent}")
    out_dir = Path(out_dir)
    specs = read_manifest(manifest, out_dir)
    statuses = [PairStatus(s.row, str(s.output)) for s in specs]
    book = _StatusBook(out_dir / STATUS_FILE, statuses)
    stop = threading.Event()
    # (its stamps, as the fingerprint, depend on the options that change the result)
    current = CurrentPairs(out_dir, cfg, "" if decorrelate else "no-decorrelate")
    due = current.skip_known(specs, statuses, book)
    if not due:  # nothing to do: no cluster started
        return statuses
    from .pipeline.dask.cluster import connect

    with (
        current,
        connect(client, scheduler, n_workers) as cl,
        ThreadPoolExecutor(concurrent) as pool,
    ):
        pending = {
            pool.submit(_run_one, spec, status, book, cl, cfg, chunks, stop, decorrelate)
            for spec, status in due
        }
        try:
            while pending:
                _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            # Start nothing new and let the pairs in flight finish (their outputs are
            # complete or never published); a rerun does the rest.
            running = sum(s.state == "running" for s in statuses)
            print(f"diffkernel batch: interrupted; finishing {running} pair(s) in flight")
            stop.set()
            for future in pending:
                future.cancel()
            raise
    return statuses
