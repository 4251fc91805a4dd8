"""Cheap change detection: stamps of files from their metadata, and a book of them.

A *stamp* is a SHA-256 over each file's relative name, size, modification time,
status-change time and inode (for a directory, over every file below it): reading
it costs one ``stat`` per file, where a digest of the contents reads every byte.
Any write to a file changes its modification and status-change times (the latter
cannot be set back by a program, unlike the former), and replacing a file changes
its inode, so an unchanged stamp means unchanged files in all but contrived cases;
a changed stamp does not mean changed contents (a ``touch``, a copy) and is only a
reason to look at the contents again.

A :class:`StampBook` is a small JSON file recording, per key, the stamps under which
some expensive answer (a content digest, a verdict) was last found true, so that the
next run can reuse the answer while the stamps are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["StampBook", "job_stamps", "stamp"]

PathLike = str | os.PathLike


def stamp(paths: Iterable[PathLike | None], extra: str = "") -> str | None:
    """The stamp of files and directory trees, with ``extra`` text; None if one is missing.

    Parameters
    ----------
    paths : iterable of path or None
        Files or directories, in a meaningful order (None counts as an absent entry).
    extra : str
        Further text the stamp depends on (a configuration, a version).

    Returns
    -------
    str or None
        A hex SHA-256, or None when a path does not exist.
    """
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"\0-\0")
            continue
        path = Path(path)
        try:
            top = path.stat()
        except OSError:
            return None
        files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*"))
        digest.update(f"\0{path}\0{top.st_ino}\0".encode())
        for file in files:
            try:
                st = file.stat()
            except OSError:
                return None
            name = "." if file == path else str(file.relative_to(path))
            digest.update(
                f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode()
            )
    digest.update(extra.encode())
    return digest.hexdigest()


def job_stamps(inputs: Iterable[str | None], output: PathLike, extra: str = "") -> dict:
    """The stamps of a job: its inputs (with ``extra``) and its output.

    ``inputs`` may name a group inside a store as ``path#group``: the whole store is
    stamped, and the group's name is part of the stamp.
    """
    locations, groups = [], []
    for value in inputs:
        location, _, group = (None, "", "") if value is None else str(value).partition("#")
        locations.append(location)
        groups.append(group)
    return {
        "inputs": stamp(locations, "\0".join(groups) + "\0" + extra),
        "output": stamp([output]),
    }


class StampBook:
    """Answers recorded under stamps, in a JSON file rewritten atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The book's file; a missing or unreadable one is an empty book (every lookup
        misses, which only costs the expensive check again).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        try:
            records = json.loads(self.path.read_text())
        except (OSError, ValueError):
            records = {}
        self.records: dict[str, dict[str, Any]] = records if isinstance(records, dict) else {}

    def lookup(self, key: str, stamps: dict[str, str | None]) -> dict[str, Any] | None:
        """The values recorded for ``key`` when every stamp is the same now, else None."""
        record = self.records.get(key)
        if not isinstance(record, dict) or None in stamps.values():
            return None
        if record.get("stamps") != stamps:
            return None
        values = record.get("values")
        return values if isinstance(values, dict) else None

    def record(self, key: str, stamps: dict[str, str | None], **values: Any) -> None:
        """Record ``values`` for ``key`` under ``stamps`` (forgotten if one is None)."""
        with self.lock:
            if None in stamps.values():
                self.records.pop(key, None)
            else:
                self.records[key] = {"stamps": dict(stamps), "values": values}

    def forget(self, key: str) -> None:
        """Drop what is recorded for ``key``."""
        with self.lock:
            self.records.pop(key, None)

    def save(self) -> None:
        """Write the book (atomically: a partial file renamed onto it)."""
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.records, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
