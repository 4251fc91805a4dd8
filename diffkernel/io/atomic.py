"""Atomic publishing of files and directories: a path holds the whole new output or nothing.

Every whole output of diffkernel (a FITS file, a Zarr image store, a result store) is
written under a *partial* name beside its target, ``<name>.partial-<uuid>``, and renamed
onto the target only once complete, so an interrupted run never leaves half an output
under the name a reader looks for. The partial lives in the target's directory because a
rename is atomic only within one file system. (A sub-group written into an existing store
is written in place; see :func:`diffkernel.io.zarr.write.write_image`.)

Publishing differs by kind, since POSIX renames a file onto an existing file atomically
but never a directory onto a non-empty one:

* a **file** replaces its target in one :func:`os.replace`; without ``overwrite`` it is
  hard-linked to the target, which fails if the target exists, so no other writer can
  slip in between a check and the move;
* a **directory** moves an existing target aside first (``<name>.old-<uuid>``), is renamed
  into place, and only then is the old one deleted (it is put back if the rename fails).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import DiffkernelError, StoreError

__all__ = ["check_parent", "publish", "remove", "sibling", "write_file"]


def check_parent(path: Path) -> None:
    """Refuse to write ``path`` when its directory does not exist.

    Parameters
    ----------
    path : pathlib.Path
        Output about to be written.

    Raises
    ------
    StoreError
        If ``path.parent`` is not a directory.
    """
    if not path.parent.is_dir():
        raise StoreError(
            f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist"
        )


def sibling(path: Path, tag: str) -> Path:
    """A new, unique path beside ``path``: ``<name>.<tag>-<uuid>``.

    Parameters
    ----------
    path : pathlib.Path
        The target.
    tag : str
        What the sibling is for, e.g. ``"partial"`` (being written) or ``"old"``.

    Returns
    -------
    pathlib.Path
    """
    return path.with_name(f"{path.name}.{tag}-{uuid.uuid4().hex}")


def remove(path: Path) -> None:
    """Delete a file, a link or a directory tree at ``path``; nothing if there is none.

    Parameters
    ----------
    path : pathlib.Path
        What to delete. A link is removed, never followed.
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def publish(partial: Path, target: Path, overwrite: bool) -> None:
    """Move the finished file or directory ``partial`` onto ``target``.

    Parameters
    ----------
    partial : pathlib.Path
        The complete output, in the directory of ``target`` (see :func:`sibling`).
    target : pathlib.Path
        Where readers look for it.
    overwrite : bool
        Replace an existing ``target``. A file is replaced in one rename; an existing
        directory is moved aside, deleted once the new one is in place, and put back if
        the move fails.

    Raises
    ------
    StoreError
        If ``target`` exists and ``overwrite`` is False, or a rename fails; ``partial``
        is then left where it is.
    """
    if partial.is_dir() and not partial.is_symlink():
        _publish_directory(partial, target, overwrite)
    elif overwrite:
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise StoreError(f"could not move {str(partial)!r} to {str(target)!r}: {exc}") from exc
    else:
        _link_exclusive(partial, target)


def write_file(target: Path, write: Callable[[BinaryIO], None], overwrite: bool) -> None:
    """Write a file atomically: ``write`` fills a partial sibling, which is then published.

    The data are flushed to disk before the rename, so a crash leaves either the old file
    or the complete new one. The file gets the permissions a plain ``open()`` gives.

    Parameters
    ----------
    target : pathlib.Path
        File to produce; its directory must exist.
    write : callable
        Called with the partial file open for binary writing.
    overwrite : bool
        Replace an existing ``target``.

    Raises
    ------
    StoreError
        If ``target`` exists and ``overwrite`` is False, or writing or moving fails (the
        partial file is removed).
    """
    partial = sibling(target, "partial")
    try:
        # Created exclusively, with the mode a plain open() gives; opened as "wb", the
        # mode astropy's writers accept.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        publish(partial, target, overwrite)
    except DiffkernelError:
        raise
    except Exception as exc:
        raise StoreError(f"failed to write {str(target)!r}: {exc}") from exc
    finally:
        remove(partial)


def _publish_directory(partial: Path, target: Path, overwrite: bool) -> None:
    old = None
    if os.path.lexists(target):
        if not overwrite:
            raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
        old = sibling(target, "old")
        try:
            os.rename(target, old)
        except OSError as exc:
            raise StoreError(f"could not move {str(target)!r} aside: {exc}") from exc
    try:
        os.rename(partial, target)
    except OSError as exc:
        if old is not None:
            os.rename(old, target)
        raise StoreError(f"could not move {str(partial)!r} to {str(target)!r}: {exc}") from exc
    if old is not None:
        remove(old)


def _link_exclusive(partial: Path, target: Path) -> None:
    """Give the file ``partial`` the name ``target`` unless that exists, without a race."""
    try:
        os.link(partial, target)
    except FileExistsError:
        raise StoreError(
            f"{str(target)!r} already exists; pass overwrite=True to replace it"
        ) from None
    except OSError:
        # Hard links unsupported on this file system: fall back to a checked replace.
        if target.exists():
            raise StoreError(
                f"{str(target)!r} already exists; pass overwrite=True to replace it"
            ) from None
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise StoreError(f"could not move {str(partial)!r} to {str(target)!r}: {exc}") from exc
        return
    partial.unlink()
