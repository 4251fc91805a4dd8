"""Per-process caches of Zarr image groups: decoded chunks, and opened arrays.

The Dask tasks read overlapping regions of the same tiles many times over (a cell's
stamps, a tile's margins). :func:`chunk_cache` keeps decoded chunks in a least-recently
used cache bounded in bytes (``DIFFKERNEL_CHUNK_CACHE_MB``, default 256 MB), keyed by the
group's ``uid``, which is new on every write of the group, so a rewritten group is never
served from stale chunks. :func:`opened_arrays` keeps the opened ``zarr.Array`` objects,
since opening one reads and parses its metadata: a worker reopens nothing from one task to
the next. Both are shared by the threads of a process and guarded by locks.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import zarr

from ...errors import InputError
from .chunkio import chunk_pieces

__all__ = [
    "CACHE_ENV_VAR",
    "ChunkCache",
    "LockedLRU",
    "OpenedArrays",
    "chunk_cache",
    "clear_chunk_cache",
    "opened_arrays",
]

#: Environment variable overriding the chunk-cache budget, in megabytes.
CACHE_ENV_VAR = "DIFFKERNEL_CHUNK_CACHE_MB"

_DEFAULT_CACHE_MB = 256.0
#: Opened arrays kept per process (an image group has three).
_OPENED_ARRAYS = 96


class LockedLRU:
    """Thread-safe least-recently-used mapping; subclasses say what to evict."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> Any:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value


class ChunkCache(LockedLRU):
    """Thread-safe LRU cache of decoded chunks, bounded in bytes.

    Parameters
    ----------
    max_bytes : int
        Budget; a chunk larger than it is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.nbytes = 0

    def put(self, key: tuple, value: np.ndarray) -> None:
        """Keep ``value`` (made read-only) under ``key``, evicting the least recently used."""
        if value.nbytes > self.max_bytes:
            return
        value.setflags(write=False)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def discard(
        self, uid: Any, name: str, box: tuple[int, int, int, int], tile: tuple[int, ...]
    ) -> None:
        """Forget the chunks of array ``name`` that the region ``box`` touches."""
        with self._lock:
            for iy, ix, _ in chunk_pieces(box, tile):
                value = self._items.pop((uid, name, (iy, ix)), None)
                if value is not None:
                    self.nbytes -= value.nbytes

    def clear(self) -> None:
        """Forget every chunk."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0


class OpenedArrays(LockedLRU):
    """Thread-safe LRU of opened (read-only) zarr arrays, by ``(path, group, name, uid)``.

    Parameters
    ----------
    size : int
        Number of arrays kept.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: tuple, array: zarr.Array) -> None:
        """Keep ``array`` under ``key``, evicting the least recently used."""
        with self._lock:
            self._items[key] = array
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_CACHE: ChunkCache | None = None
_CACHE_LOCK = threading.Lock()
_OPENED = OpenedArrays(_OPENED_ARRAYS)


def _cache_budget() -> int:
    raw = os.environ.get(CACHE_ENV_VAR)
    if raw is None or not raw.strip():
        return int(_DEFAULT_CACHE_MB * 2**20)
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = -1.0
    if not (math.isfinite(megabytes) and megabytes >= 0):
        raise InputError(f"{CACHE_ENV_VAR} must be a number of megabytes >= 0, got {raw!r}")
    return int(megabytes * 2**20)


def chunk_cache() -> ChunkCache:
    """The per-process chunk cache, sized from ``DIFFKERNEL_CHUNK_CACHE_MB`` on first use.

    Returns
    -------
    ChunkCache

    Raises
    ------
    InputError
        If the environment variable is not a number of megabytes >= 0.
    """
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            _CACHE = ChunkCache(_cache_budget())
        return _CACHE


def clear_chunk_cache() -> None:
    """Empty this process's chunk cache; the next cached read re-reads its budget."""
    global _CACHE
    with _CACHE_LOCK:
        _CACHE = None


def opened_arrays() -> OpenedArrays:
    """The per-process cache of opened zarr arrays.

    Returns
    -------
    OpenedArrays
    """
    return _OPENED
