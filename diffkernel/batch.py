"""Survey reprocessing: many pairs from a manifest, on one cluster, resumable.

A manifest is a CSV file with columns ``science``, ``template`` and ``output`` (and
optionally ``sources``): inputs are FITS files or Zarr image groups
(``store.zarr#group``), relative paths are taken from the manifest's folder. Outputs
are confined to the batch's output folder: each is a relative path inside it, never
an input, never the status file, and never the same as another row's output however
spelled (``a.zarr``, ``x/../a.zarr``); an existing output is replaced only if it is a
result a batch wrote, so no manifest can make a batch delete anything else.

Each pair gets a *fingerprint*: SHA-256 over the bytes of its input files, the
configuration and the package version. A pair whose output is a complete result
with the same fingerprint is skipped; any other is (re)done, its output published
atomically, so an interrupted batch simply runs again. A rerun first skips, without
reading their inputs, the pairs whose files have not changed since they were found
current (:mod:`diffkernel.batch_state`), and starts no cluster when that is all of
them. Pairs run concurrently on
one Dask client; a failing pair is recorded with its error and does not stop the
others, and every exception of a pair reaches its status and the exit status.
``batch-status.json`` in the output folder records every pair's state (rewritten
atomically after each pair); a batch that cannot write it stops before any work. One
batch at a time writes an output folder (a lock held while it runs), so a rerun can
remove what a killed run left (partial results, work folders).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .batch_state import STAMP_FILE, CurrentPairs
from .config import MakeKernelConfig
from .errors import DiffkernelError, InputError, StoreError
from .io.paths import (
    check_chunks,
    clean_leftovers,
    confined_name,
    exclusive,
    overlaps,
    replace_refusal,
)

__all__ = [
    "PairSpec",
    "read_manifest",
    "fingerprint",
    "run_batch",
    "STATUS_FILE",
    "LOCK_FILE",
]

#: Name of the status file in the batch's output folder.
STATUS_FILE = "batch-status.json"
#: Lock file in the output folder, held while a batch runs there.
LOCK_FILE = ".diffkernel-batch.lock"
#: Provenance key of a batch's results: its pair's fingerprint. A batch replaces no
#: existing output without it.
BATCH_MARK = "batch_fingerprint"


@dataclass(frozen=True)
class PairSpec:
    """One row of a manifest, with resolved paths."""

    row: int
    science: str
    template: str
    output: Path
    sources: str | None = None
    #: The output as the manifest gives it, normalized (relative to the output folder).
    name: str = ""


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
    """Rows of a manifest, checked: columns present, input files existing, outputs safe.

    Outputs must be relative paths that stay inside ``out_dir`` once normalized (no
    absolute path, no ``..`` escape, not ``out_dir`` itself, no symlinked folder
    leading out), must not be the status or lock file, must not be, hold or lie in any
    row's input or the manifest, and must differ from each other (after
    normalization, and neither holding another).

    Raises
    ------
    InputError
        Naming the line and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} does not exist")
    base, out_dir = path.parent, Path(out_dir)
    try:
        # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of "science".
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"manifest {str(path)!r} is not UTF-8 CSV text: {exc}") from exc
    missing = {"science", "template", "output"} - columns
    if missing:
        raise InputError(
            f"manifest {str(path)!r} lacks column(s) {sorted(missing)}; it needs "
            "science, template, output (and optionally sources); it has "
            f"{sorted(columns)}"
        )
    if not rows:
        raise InputError(f"manifest {str(path)!r} has no rows")
    specs: list[PairSpec] = []
    seen: dict[str, int] = {}
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
        name = confined_name(
            values["output"],
            out_dir,
            f"manifest line {number}: output {values['output']!r}",
            (STATUS_FILE, LOCK_FILE, STAMP_FILE),
        )
        for other, line in seen.items():
            if other == name or other.startswith(name + "/") or name.startswith(other + "/"):
                same = "is also" if other == name else "overlaps the output"
                raise InputError(
                    f"manifest line {number}: output {values['output']!r} {same} written by "
                    f"line {line} ({other!r}); give every pair its own output"
                )
        seen[name] = number
        specs.append(PairSpec(number, science, template, out_dir / name, sources, name))
    _refuse_outputs_on_inputs(specs, path)
    return specs


def _refuse_outputs_on_inputs(specs: list[PairSpec], manifest: Path) -> None:
    inputs = [(0, "manifest", str(manifest))]
    for spec in specs:
        for what in ("science", "template", "sources"):
            value = getattr(spec, what)
            if value is not None:
                inputs.append((spec.row, what, value.partition("#")[0]))
    for spec in specs:
        for line, what, value in inputs:
            if overlaps(spec.output, value):
                of = "the manifest" if what == "manifest" else f"the {what} of line {line}"
                raise InputError(
                    f"manifest line {spec.row}: output {spec.name!r} is {of} ({value!r}), or "
                    "holds it or lies in it; writing it would destroy an input"
                )


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
        stored = open_result(output).provenance.get(BATCH_MARK)
    except Exception:  # an unreadable store is redone, not trusted
        return False
    return stored == print_


class _StatusBook:
    """The status file, rewritten atomically whenever a pair changes state.

    A failed write is remembered (:attr:`error`), not raised: the pairs go on, and the
    batch reports it at the end.
    """

    def __init__(self, path: Path, statuses: list[PairStatus]) -> None:
        self.path = path
        self.statuses = statuses
        self.lock = threading.Lock()
        self.error: str | None = None
        self.started = time.perf_counter()
        self.finished = 0

    def write(self) -> None:
        """Write the file now; raise OSError if it cannot be written."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        payload = {
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pairs": [asdict(s) for s in self.statuses],
        }
        try:
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def update(self, status: PairStatus, **changes) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(status, key, value)
            try:
                self.write()
            except OSError as err:
                self.error = self.error or f"{type(err).__name__}: {err}"
            if status.state in ("done", "skipped", "failed"):
                self.finished += 1
                self.report(status)

    def report(self, status: PairStatus) -> None:
        """One progress line on stderr for a pair that has just finished."""
        line = (
            f"diffkernel batch: [{self.finished}/{len(self.statuses)}] {status.output} "
            f"{status.state}"
        )
        if status.seconds:
            line += f" in {status.seconds:.1f} s"
        if status.quality:
            line += f", quality {status.quality}"
        if status.error:
            line += f": {status.error}"
        line += f" (elapsed {time.perf_counter() - self.started:.0f} s)"
        print(line, file=sys.stderr, flush=True)


def _run_one(
    spec: PairSpec,
    status: PairStatus,
    book: _StatusBook,
    client,
    config: MakeKernelConfig,
    chunks: int,
    stop: threading.Event,
    timeout: float | None = None,
    decorrelate: bool = True,
) -> None:
    """Run one pair; whatever it raises is recorded in its status, never lost."""
    if stop.is_set() or status.state == "failed":
        return
    started = time.perf_counter()
    try:
        _process(spec, status, book, client, config, chunks, timeout, decorrelate, started)
    except Exception as err:
        if not isinstance(err, DiffkernelError) and _debug():
            traceback.print_exc()
        book.update(
            status,
            state="failed",
            seconds=time.perf_counter() - started,
            error=_one_line(err),
        )


def _process(spec, status, book, client, config, chunks, timeout, decorrelate, started) -> None:
    import shutil
    import uuid

    from .io.inputs import open_input, read_sources
    from .pipeline.dask.driver import run_pair

    refusal = replace_refusal(spec.output, BATCH_MARK)
    if refusal is not None:
        raise StoreError(f"output {refusal}")
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
        sources = read_sources(spec.sources) if spec.sources else None
        spec.output.parent.mkdir(parents=True, exist_ok=True)
        run = run_pair(
            images[0],
            images[1],
            spec.output,
            config=config,
            sources=sources,
            client=client,
            overwrite=True,
            provenance={BATCH_MARK: print_},
            timeout=timeout,
            decorrelate=decorrelate,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    book.update(
        status,
        state="done",
        seconds=time.perf_counter() - started,
        summary={k: run.summary[k] for k in ("n_good", "residuals", "quality") if k in run.summary},
        quality=run.quality.get("verdict"),
    )


def _debug() -> bool:
    return os.environ.get("DIFFKERNEL_DEBUG", "").strip() not in ("", "0")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else '(no message)'}"


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
    timeout: float | None = None,
    decorrelate: bool = True,
) -> list[PairStatus]:
    """Process every pair of a manifest; skip those already done with the same inputs.

    Parameters
    ----------
    manifest : path
        CSV with columns ``science``, ``template``, ``output`` (``sources`` optional).
    out_dir : path
        Folder of the outputs (relative paths inside it) and of ``batch-status.json``;
        created if missing.
    config : MakeKernelConfig, optional
        One configuration for every pair; default
        :meth:`~diffkernel.config.MakeKernelConfig.default_subtraction`.
    client, scheduler, n_workers
        Where to run (see :func:`diffkernel.pipeline.dask.cluster.connect`).
    concurrent : int
        Pairs in flight at once (their tasks share the cluster).
    chunks : int
        Chunk side used when ingesting FITS inputs.
    timeout : float, optional
        Seconds each pair may take on the cluster before it fails (none by default).
    decorrelate : bool
        Decorrelate the differences (:func:`~diffkernel.pipeline.dask.driver.run_pair`).

    Returns
    -------
    list of PairStatus
        One per manifest row. Failed pairs carry their error; the batch goes on. A
        progress line per finished pair goes to stderr.

    Raises
    ------
    InputError
        If the manifest is invalid (naming its line) or an option out of range.
    StoreError
        If ``out_dir`` cannot be created or written, another batch is running there,
        or the status file could not be written during the run (the pairs ran).
    """
    cfg = MakeKernelConfig.default_subtraction() if config is None else config
    cfg.validate()
    if concurrent < 1:
        raise InputError(f"concurrent must be at least 1, got {concurrent}")
    check_chunks(chunks, "chunks")
    out_dir = Path(out_dir)
    specs = read_manifest(manifest, out_dir)
    statuses = [PairStatus(s.row, str(s.output)) for s in specs]
    book = _StatusBook(out_dir / STATUS_FILE, statuses)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create the output folder {str(out_dir)!r}: {err}") from err
    with exclusive(out_dir, LOCK_FILE, "diffkernel batch"):
        clean_leftovers(s.output for s in specs)  # what killed runs left: ours alone now
        for spec, status in zip(specs, statuses, strict=True):
            refusal = replace_refusal(spec.output, BATCH_MARK)  # before any work starts
            if refusal is not None:
                status.state, status.error = "failed", f"StoreError: output {refusal}"
        try:
            book.write()  # a batch that cannot record its work does none
        except OSError as err:
            raise StoreError(
                f"cannot write the batch status file {str(book.path)!r}: {err}"
            ) from err
        for status in statuses:
            if status.state == "failed":
                book.update(status)
        # Pairs whose files are unchanged since they were found current are skipped
        # without reading them (the stamps, as the fingerprint, depend on the options).
        current = CurrentPairs(out_dir, cfg, "" if decorrelate else "no-decorrelate")
        left = [(sp, st) for sp, st in zip(specs, statuses, strict=True) if st.state != "failed"]
        due = current.skip_known([sp for sp, _ in left], [st for _, st in left], book)
        if due:  # else nothing to do: no cluster started
            options = (cfg, chunks, timeout, decorrelate)
            with current:
                _run_all(due, statuses, book, options, concurrent, client, scheduler, n_workers)
    if book.error:
        raise StoreError(
            f"the batch ran, but its status file {str(book.path)!r} could not be written: "
            f"{book.error}"
        )
    return statuses


def _run_all(due, statuses, book, options, concurrent, client, scheduler, n_workers) -> None:
    """The pairs due on one client, ``concurrent`` at a time; every outcome recorded."""
    from .pipeline.dask.cluster import connect

    cfg, chunks, timeout, decorrelate = options
    stop = threading.Event()
    with (
        connect(client, scheduler, n_workers) as cl,  # logs the dashboard's address
        ThreadPoolExecutor(concurrent) as pool,
    ):
        futures = {
            pool.submit(
                _run_one, spec, status, book, cl, cfg, chunks, stop, timeout, decorrelate
            ): status
            for spec, status in due
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    _collect(future, futures[future], book)
        except KeyboardInterrupt:
            # Start nothing new and let the pairs in flight finish (their outputs are
            # complete or never published); a rerun does the rest.
            running = sum(s.state == "running" for s in statuses)
            print(
                f"diffkernel batch: interrupted; finishing {running} pair(s) in flight",
                file=sys.stderr,
            )
            stop.set()
            for future in pending:
                future.cancel()
            raise


def _collect(future, status: PairStatus, book: _StatusBook) -> None:
    """Read a finished pair's future: an exception it raised is its failure, not lost."""
    try:
        future.result()
    except Exception as err:  # _run_one records its own; this is a last resort
        book.update(status, state="failed", error=_one_line(err))
    if status.state in ("pending", "running"):
        book.update(status, state="failed", error="the pair ended without an outcome")
