"""Output paths checked before any work: never an input, never a surprise at the end.

A run's outputs are checked together, before anything is read or computed, so a
mistake costs nothing: an output that is (or holds, or lies inside) one of the
inputs is refused even with ``overwrite`` (replacing it would destroy the input),
an existing output is refused without ``overwrite``, a folder that would hold an
output must exist and be writable, and a path that must be a folder (the plots) may
not be a file. :func:`check_chunks` bounds the chunk side of stored images: too
small a chunk turns an image into millions of files.

For a writer of many outputs in one folder (a batch): :func:`confined_name` keeps a
requested name inside the folder, :func:`replace_refusal` says whether an existing
output may be replaced (only a result that writer made), :func:`exclusive` makes it
the folder's only writer, and :func:`clean_leftovers` then removes what killed runs
left there.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ..errors import InputError, StoreError

__all__ = [
    "MIN_CHUNK",
    "MAX_CHUNK",
    "Output",
    "check_chunks",
    "check_fits_memory",
    "check_outputs",
    "clean_leftovers",
    "confined_name",
    "exclusive",
    "leftovers",
    "location",
    "overlaps",
    "physical_memory",
    "replace_refusal",
]

#: Smallest chunk side accepted for stored images: a 4096² image then makes 16k
#: chunks per plane, already more files than a file system likes.
MIN_CHUNK = 16
#: Largest chunk side: one 8192² float32 chunk is 256 MB, read whole by every task.
MAX_CHUNK = 8192


def location(spec: str | os.PathLike) -> Path:
    """The file or store of an input: ``store.zarr#group`` -> ``store.zarr``."""
    return Path(os.fspath(spec).partition("#")[0]).expanduser()


def _real(path: Path) -> Path:
    # realpath resolves the existing part (symlinks included) and keeps the rest.
    return Path(os.path.realpath(path))


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether the paths ``a`` and ``b`` are the same, or one lies inside the other.

    Both are resolved first (symlinks, ``..``), so differently spelled names of one
    file are caught.
    """
    ra, rb = _real(Path(a)), _real(Path(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


class Output:
    """One output of a run, as :func:`check_outputs` checks it.

    Parameters
    ----------
    option : str
        How the user named it (``"--out"``), for the messages.
    path : str or os.PathLike
        The output.
    kind : {"store", "file", "folder"}
        A result or image store (a directory replaced whole), a file, or a folder files
        are written into (it may exist; it must not be a file).
    """

    def __init__(self, option: str, path: str | os.PathLike, kind: str = "store") -> None:
        if kind not in ("store", "file", "folder"):
            raise ValueError(f"unknown output kind {kind!r}")
        self.option = option
        self.path = Path(path).expanduser()
        self.kind = kind


def check_outputs(
    outputs: Iterable[Output],
    inputs: Mapping[str, str | os.PathLike | None],
    overwrite: bool,
) -> None:
    """Refuse outputs that would destroy an input, clash, or fail only at the end.

    Parameters
    ----------
    outputs : iterable of Output
        What the run will write.
    inputs : mapping
        What it reads, by the name the user knows it by (``{"science": path, ...}``;
        ``store.zarr#group`` names its store; None entries are ignored).
    overwrite : bool
        Whether existing outputs may be replaced.

    Raises
    ------
    InputError
        If an output is, holds or lies inside an input, or two outputs overlap.
    StoreError
        If an output exists and ``overwrite`` is False, its folder is missing or not
        writable, or it exists as the wrong kind (a folder for a file, a file for a folder).
    """
    outputs = list(outputs)
    sources = {name: location(value) for name, value in inputs.items() if value is not None}
    for i, out in enumerate(outputs):
        for name, source in sources.items():
            if _clash(out.path, out.kind, source, "input"):
                raise InputError(
                    f"{out.option} {str(out.path)!r} is the {name} input {str(source)!r} "
                    "(or holds it, or lies in it); writing it would destroy the input: "
                    f"choose another {out.option}"
                )
        for other in outputs[:i]:
            if _clash(out.path, out.kind, other.path, other.kind):
                raise InputError(
                    f"{out.option} {str(out.path)!r} and {other.option} {str(other.path)!r} "
                    "are the same path (or one holds the other): give them different paths"
                )
        _check_one(out, overwrite)


def _clash(a: Path, a_kind: str, b: Path, b_kind: str) -> bool:
    """Whether writing one would destroy the other: the same path, or one in the other.

    A folder of files (the plots) may hold the other: it is written into, not replaced.
    """
    ra, rb = _real(a), _real(b)
    return (
        ra == rb
        or (ra in rb.parents and a_kind != "folder")
        or (rb in ra.parents and b_kind != "folder")
    )


def _check_one(out: Output, overwrite: bool) -> None:
    path = out.path
    exists = os.path.lexists(path)
    if out.kind == "folder":
        if exists and not path.is_dir():
            raise StoreError(
                f"{out.option} {str(path)!r} exists and is not a folder: give a folder path"
            )
        folder = path if path.is_dir() else _nearest_existing(path)
    else:
        if exists and not overwrite:
            raise StoreError(
                f"{out.option} {str(path)!r} already exists; pass --overwrite to replace it "
                "or choose another path"
            )
        if exists and out.kind == "file" and path.is_dir() and not path.is_symlink():
            raise StoreError(f"{out.option} {str(path)!r} is a folder; give a file path")
        folder = path.parent
        if not folder.is_dir():
            raise StoreError(
                f"cannot write {out.option} {str(path)!r}: folder {str(folder)!r} does not "
                "exist; create it first"
            )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(
            f"cannot write {out.option} {str(path)!r}: folder {str(folder)!r} is not "
            "writable (permissions or a read-only file system)"
        )


def _nearest_existing(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")  # pragma: no cover - "/" always exists


def check_chunks(chunks: int | tuple[int, int], option: str = "chunks") -> None:
    """Refuse a chunk side outside :data:`MIN_CHUNK`..:data:`MAX_CHUNK` pixels.

    Raises
    ------
    InputError
        Naming the value and the bounds.
    """
    sides = (chunks, chunks) if isinstance(chunks, int) else tuple(chunks)
    for side in sides:
        if not MIN_CHUNK <= int(side) <= MAX_CHUNK:
            raise InputError(
                f"{option} {side} is out of range: a chunk side must be {MIN_CHUNK}..{MAX_CHUNK} "
                "pixels (smaller chunks make millions of files, larger ones exhaust memory)"
            )


def confined_name(value: str, folder: Path, where: str, reserved: Iterable[str] = ()) -> str:
    """``value`` as a normalized path relative to ``folder`` that stays inside it.

    Parameters
    ----------
    value : str
        A relative path, as given.
    folder : pathlib.Path
        The folder it must stay in.
    where : str
        What names it, for the messages (``"manifest line 3: output 'a.zarr'"``).
    reserved : iterable of str
        Names in ``folder`` it may not be (or lie in).

    Returns
    -------
    str
        The normalized path (``x/../a.zarr`` -> ``a.zarr``).

    Raises
    ------
    InputError
        If ``value`` is absolute, escapes ``folder`` (``..``, or a symbolic link on
        the way), is ``folder`` itself, or is reserved.
    """
    if Path(value).is_absolute() or value.startswith("~"):
        raise InputError(f"{where} is an absolute path; give a path relative to {str(folder)!r}")
    name = os.path.normpath(value)
    if name in (".", "..") or name.startswith("../"):
        raise InputError(f"{where} is not inside {str(folder)!r}; give a path below it")
    if name.split("/")[0] in set(reserved):
        raise InputError(f"{where} is reserved ({name.split('/')[0]}); choose another name")
    # A symlinked folder on the way out would be followed by every write.
    real = _real(folder)
    parent = _real(folder / name).parent
    if parent != real and real not in parent.parents:
        raise InputError(f"{where} leads out of {str(folder)!r} through a symbolic link")
    return name


def replace_refusal(output: Path, marker: str) -> str | None:
    """None if ``output`` may be replaced by its writer; else why it must be left alone.

    Only a complete diffkernel result store whose provenance holds ``marker`` (what
    its writer stamps on its results, e.g. a batch's ``batch_fingerprint``) may be
    replaced, or a path where nothing is: a folder of the user's, a file, a result
    written by anything else is never deleted.
    """
    import zarr

    from .zarr.results import result_status

    status = result_status(output)
    if status == "missing":
        return None
    if status == "complete":
        try:  # the root's attributes only: cheap for a batch of many outputs
            provenance = zarr.open_group(str(output), mode="r").attrs.get("provenance")
        except Exception:  # an unreadable store is nobody's we can vouch for
            provenance = {}
        if isinstance(provenance, dict) and marker in provenance:
            return None
        kind = "a diffkernel result written by something else"
    else:
        kind = "not a diffkernel result"
    return (
        f"{str(output)!r} exists and is {kind}; it is left alone: remove it or choose another path"
    )


@contextlib.contextmanager
def exclusive(folder: Path, lock_name: str, what: str) -> Iterator[None]:
    """Hold the lock file ``folder/lock_name``: one writer at a time in ``folder``.

    The lock is released when the holder ends, killed or not (``flock``), so a killed
    run leaves no stale lock.

    Raises
    ------
    StoreError
        If another process holds it.
    """
    import fcntl

    path = folder / lock_name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another {what} is running on {str(folder)!r} (it holds {str(path)!r}); "
                "wait for it to finish or use another folder"
            ) from None
        yield
    finally:
        os.close(fd)


def leftovers(output: Path) -> list[Path]:
    """What killed runs left beside ``output``: partial and old copies, work folders.

    The names :func:`diffkernel.io.atomic.sibling` gives (``<name>.partial-<uuid>``,
    ``<name>.old-<uuid>``) and the commands' input work folders
    (``.<name>.inputs-<8 hex>``).
    """
    name = re.escape(output.name)
    pattern = re.compile(
        rf"^(?:{name}\.(?:partial|old)-[0-9a-f]{{32}}|\.{name}\.inputs-[0-9a-f]{{8}})$"
    )
    folder = output.parent
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.match(p.name))


def clean_leftovers(outputs: Iterable[Path]) -> list[Path]:
    """Remove :func:`leftovers` of ``outputs``; the paths removed.

    Only for a writer that holds the folder's lock (:func:`exclusive`): then no one else
    is writing them. An old copy that an interrupted publish had moved aside is put
    back when the output itself is missing (it is then the only copy).
    """
    from .atomic import remove

    removed = []
    for output in outputs:
        for path in leftovers(output):
            if ".old-" in path.name and not os.path.lexists(output):
                os.rename(path, output)
                continue
            remove(path)
            removed.append(path)
    return removed


#: Bytes per pixel an in-memory exposure takes while it is read and stored: float64
#: image and variance, int32 mask, and as much again in temporaries (conversions,
#: the variance model of a plain image).
BYTES_PER_PIXEL = 2 * (8 + 8 + 4)


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where it cannot be told."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(path: str | os.PathLike) -> None:
    """Refuse a FITS file whose largest image would not fit in this machine's memory.

    A FITS input is read whole before it is stored in chunks; one larger than the
    memory would be ended by the kernel's OOM killer (taking the machine's other work
    with it) instead of refused. Only the headers are read here.

    Raises
    ------
    InputError
        Naming the image size, the memory it needs and the machine's.
    """
    from astropy.io import fits

    memory = physical_memory()
    if memory is None:
        return
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            sizes = [
                int(h.header.get("ZNAXIS1", h.header.get("NAXIS1", 0)))
                * int(h.header.get("ZNAXIS2", h.header.get("NAXIS2", 0)))
                for h in hdul
                if int(h.header.get("ZNAXIS", h.header.get("NAXIS", 0))) >= 2
            ]
    except Exception:  # unreadable: the reader says why, with its own message
        return
    pixels = max(sizes, default=0)
    need = pixels * BYTES_PER_PIXEL
    if need > memory:
        raise InputError(
            f"{str(path)!r}: its {pixels:,}-pixel image needs about {need / 2**30:.1f} GiB of "
            f"memory to be read, more than this machine's {memory / 2**30:.1f} GiB; store it "
            "in pieces (several FITS files) or ingest it on a larger machine"
        )
