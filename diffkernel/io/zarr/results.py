"""Result stores: a published subtraction, written atomically and read back.

A result store is a Zarr v3 store whose root attribute ``"diffkernel"`` has ``kind``
``"result"`` and ``complete``, plus root attributes ``metadata``, ``config`` and
``provenance``. It holds the image group ``difference`` (see :mod:`diffkernel.io.zarr.layout`),
the group ``solution`` (the arrays of a :class:`~diffkernel.kernel.spatial.SpatialSolution`
and its basis, the rest in attributes) and the group ``candidates`` (one array per
table column). :class:`ResultWriter` writes it in ``<path>.partial-<uuid>``, sets
``complete`` last and renames the directory onto ``path``, so ``path`` never holds
half a result.
"""

from __future__ import annotations

import glob
import os
import re
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from astropy import units as u
from astropy.table import Column, MaskedColumn, Table
from zarr.errors import UnstableSpecificationWarning

from ...errors import InputError, StoreError
from ...kernel.basis import KernelBasis
from ...kernel.spatial import SpatialFunctions, SpatialSolution
from ..atomic import check_parent, publish, remove, sibling
from .image import ZarrImage
from .layout import (
    ATTR_KEY,
    LAYOUT_VERSION,
    STORE_ERRORS,
    Chunks,
    PathLike,
    decode_float,
    encode_float,
    group_info,
    json_safe,
    member_array,
    open_root,
    require_attr,
    sub_group,
    utc_now,
)
from .write import create_image_arrays

__all__ = ["ResultStore", "ResultWriter", "open_result", "result_status"]

#: Candidate-table column names that can be Zarr array names.
_COLUMN_NAME = re.compile(r"^(?!__)(?!\.{1,2}$)[^/]+$")
#: Suffix of the array holding a masked column's mask.
_MASK_SUFFIX = ".mask"


# --------------------------------------------------------------------------- result writing


def result_status(path: PathLike) -> str:
    """What is at ``path``: ``"missing"``, ``"complete"``, ``"incomplete"`` or ``"foreign"``.

    ``"foreign"`` is anything that exists but is not a diffkernel result store.
    """
    location = Path(path)
    if not os.path.lexists(location):
        return "missing"
    info = _root_info_or_none(location)
    if info is None or info.get("kind") != "result":
        return "foreign"
    return "complete" if info.get("complete") is True else "incomplete"


def _root_info_or_none(location: Path) -> dict[str, Any] | None:
    if not location.is_dir():
        return None
    try:
        root = zarr.open_group(store=str(location), mode="r", zarr_format=3)
        info = root.attrs.asdict().get(ATTR_KEY)
    except STORE_ERRORS:
        return None
    return info if isinstance(info, dict) else None


class ResultWriter:
    """Write a result store atomically: into a partial directory, renamed when finalized.

    Parameters
    ----------
    path : str or os.PathLike
        Result store directory to produce.
    overwrite : bool, optional
        Replace what is at ``path`` (the old store is removed only once the new one is in
        place). Default False.

    Raises
    ------
    StoreError
        If ``path`` exists and ``overwrite`` is False, or its directory does not exist.

    Notes
    -----
    Use it as a context manager to remove the partial directory when the run fails::

        with ResultWriter(path) as writer:
            difference = writer.create_difference(shape, chunks, planes)
            ...  # write_tile(writer.partial_path, "difference", ...)
            writer.finalize(solution, candidates, metadata, config, provenance)
    """

    def __init__(self, path: PathLike, *, overwrite: bool = False) -> None:
        self._path = Path(path).absolute()
        self._overwrite = bool(overwrite)
        _check_result_target(self._path, self._overwrite)
        check_parent(self._path)
        self._partial = sibling(self._path, "partial")
        root = zarr.open_group(store=str(self._partial), mode="w-", zarr_format=3)
        root.attrs[ATTR_KEY] = {
            "layout": LAYOUT_VERSION,
            "kind": "result",
            "complete": False,
            "uid": uuid.uuid4().hex,
            "created": utc_now(),
        }
        self._state = "open"

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._state == "open":
            self.abort()

    @property
    def path(self) -> Path:
        """Final path of the result store."""
        return self._path

    @property
    def partial_path(self) -> Path:
        """Directory being written (``<path>.partial-<uuid>``) until :meth:`finalize`."""
        return self._partial

    def _root(self, action: str) -> zarr.Group:
        if self._state != "open":
            raise StoreError(
                f"cannot {action}: the writer of {str(self._path)!r} was already {self._state}"
            )
        return open_root(self._partial, mode="r+")

    def create_difference(
        self,
        shape: tuple[int, int],
        chunks: Chunks,
        mask_planes: Mapping[str, int],
        wcs_header: Any = None,
        origin: tuple[int, int] = (0, 0),
        meta: Mapping[str, Any] | None = None,
    ) -> ZarrImage:
        """Create the empty float32 image group ``difference``.

        Its tiles are then written with :func:`write_tile` on :attr:`partial_path`, group
        ``"difference"``. See :func:`create_image_arrays` for the parameters.

        Returns
        -------
        ZarrImage
            The group in the partial directory (its path is invalid after finalize).
        """
        root = self._root("create the difference image")
        create_image_arrays(
            root, "difference", shape, chunks, mask_planes, wcs_header, origin, np.float32, meta
        )
        return ZarrImage.open(self._partial, "difference")

    def write_fit(self, solution: SpatialSolution, candidates: Table) -> None:
        """Write the groups ``solution`` and ``candidates`` ahead of :meth:`finalize`.

        For a driver that has the fit while the difference tiles are still being
        written; :meth:`finalize` is then called without them.

        Raises
        ------
        StoreError
            If they were already written, or the writer was finalized or aborted.
        InputError
            If ``candidates`` is not a Table or has a column name Zarr cannot hold.
        """
        root = self._root("write the fit")
        if "solution" in root or "candidates" in root:
            raise StoreError(f"the fit of {str(self._path)!r} was already written")
        _write_solution(root.create_group("solution"), solution)
        _write_candidates(root.create_group("candidates"), candidates)

    def finalize(
        self,
        solution: SpatialSolution | None,
        candidates: Table | None,
        metadata: Mapping[str, Any],
        config: Mapping[str, Any],
        provenance: Mapping[str, Any],
        quality: Mapping[str, Any] | None = None,
        z_histograms: np.ndarray | None = None,
    ) -> Path:
        """Write the solution, candidates and attributes, mark complete and publish.

        Parameters
        ----------
        solution : SpatialSolution or None
            Fitted kernel and background; None when :meth:`write_fit` wrote them.
        candidates : astropy.table.Table or None
            Candidate table (string columns are stored as fixed-width unicode); None
            when :meth:`write_fit` wrote it.
        metadata, config, provenance : mapping
            Root attributes, made JSON-safe with :func:`json_safe`.
        quality : mapping, optional
            The quality verdict (:func:`diffkernel.quality.assess`), root attribute
            ``quality``.
        z_histograms : numpy.ndarray, optional
            ``(2, n_bins)`` counts of difference / sigma on the sky and on the
            candidates' footprints (:func:`diffkernel.quality.difference_histograms`),
            the array ``z_histograms``.

        Returns
        -------
        pathlib.Path
            The final path.

        Raises
        ------
        StoreError
            If no difference image was created, the fit is missing or given twice, the
            writer was finalized or aborted, or ``path`` appeared meanwhile and
            ``overwrite`` is False (this run's store is then removed).
        InputError
            If ``candidates`` is not a Table or has a column name Zarr cannot hold.
        """
        root = self._root("finalize")
        if "difference" not in root:
            raise StoreError(
                f"{str(self._partial)!r} has no difference image: call create_difference "
                "before finalize"
            )
        written = "solution" in root
        given = solution is not None or candidates is not None
        if written == given or (given and (solution is None or candidates is None)):
            raise StoreError(
                f"finalize of {str(self._path)!r} needs the solution and candidates either "
                "given here or written before with write_fit (once)"
            )
        if given:
            self.write_fit(solution, candidates)
        if z_histograms is not None:
            _write_small_array(root, "z_histograms", np.asarray(z_histograms, dtype=np.int64))
        root.attrs.update(
            {
                "metadata": json_safe(metadata),
                "config": json_safe(config),
                "provenance": json_safe(provenance),
                "quality": json_safe(dict(quality or {})),
            }
        )
        info = dict(root.attrs[ATTR_KEY])
        info.update(complete=True, finished=utc_now())
        root.attrs[ATTR_KEY] = info  # the last write: the store is complete from here on
        try:
            publish(self._partial, self._path, self._overwrite)
        except StoreError as exc:
            # Another run published the same path meanwhile (or the rename failed):
            # this run's copy is removed, and the message says so instead of pointing
            # at a folder the caller's cleanup deletes.
            self.abort()
            raise StoreError(
                f"{exc} (another run wrote it meanwhile?); this run's result was discarded"
            ) from exc
        self._state = "finalized"
        return self._path

    def abort(self) -> None:
        """Remove the partial directory; the writer can no longer be used."""
        if self._state == "open":
            self._state = "aborted"
        remove(self._partial)


def _check_result_target(path: Path, overwrite: bool) -> None:
    status = result_status(path)
    if status == "missing" or overwrite:
        return
    if status == "foreign":
        raise StoreError(
            f"{str(path)!r} exists and is not a diffkernel result; it will not be overwritten "
            "unless overwrite=True (--overwrite)"
        )
    raise StoreError(
        f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it"
    )


def _write_small_array(node: zarr.Group, name: str, values: np.ndarray) -> None:
    """Write a whole array as a single chunk, in its own dtype."""
    values = np.asarray(values)
    chunks = tuple(max(1, n) for n in values.shape) or None
    with warnings.catch_warnings():
        # Fixed-width strings have no Zarr v3 specification yet; zarr-python reads them.
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        array = node.create_array(name, shape=values.shape, chunks=chunks, dtype=values.dtype)
    array[...] = values


def _functions_attrs(functions: SpatialFunctions | None) -> dict[str, Any] | None:
    if functions is None:
        return None
    return {
        "model_type": functions.model_type,
        "order": int(functions.order),
        "bbox": [encode_float(v) for v in functions.bbox],
    }


def _write_solution(node: zarr.Group, solution: SpatialSolution) -> None:
    basis = solution.basis
    arrays = {
        "native_images": basis.native_images,
        "transform": basis.transform,
        "kernel_coeffs": solution.kernel_coeffs,
        "background_coeffs": solution.background_coeffs,
    }
    if basis.separable is not None:
        arrays["separable_x"], arrays["separable_y"] = basis.separable
    if solution.covariance is not None:
        arrays["covariance"] = solution.covariance
    for name, values in arrays.items():
        _write_small_array(node, name, values)
    node.attrs[ATTR_KEY] = {
        "layout": LAYOUT_VERSION,
        "kind": "solution",
        "basis": {
            "kind": basis.kind,
            "kernel_size": int(basis.kernel_size),
            "conserves_sum": bool(basis.conserves_sum),
            "groups": [int(g) for g in basis.groups],
            "description": json_safe(basis.description),
        },
        "kernel_functions": _functions_attrs(solution.kernel_functions),
        "background_functions": _functions_attrs(solution.background_functions),
        "condition": encode_float(solution.condition),
        "notes": [str(note) for note in solution.notes],
    }


def _column_values(column: Column, name: str) -> np.ndarray:
    values = np.asarray(column.filled() if isinstance(column, MaskedColumn) else column)
    if values.dtype.kind == "O":
        try:
            values = values.astype(str)
        except (TypeError, ValueError) as exc:
            raise InputError(f"candidates column {name!r} cannot be stored: {exc}") from exc
    return values


def _write_candidates(node: zarr.Group, table: Table) -> None:
    if not isinstance(table, Table):
        raise InputError(f"candidates must be an astropy Table, got {type(table).__name__}")
    names = set(table.colnames)
    specs = []
    for name in table.colnames:
        masked = isinstance(table[name], MaskedColumn)
        if not _COLUMN_NAME.match(name) or (masked and name + _MASK_SUFFIX in names):
            raise InputError(f"candidates column name {name!r} cannot be stored as a Zarr array")
        column = table[name]
        _write_small_array(node, name, _column_values(column, name))
        if masked:
            _write_small_array(node, name + _MASK_SUFFIX, np.asarray(column.mask, dtype=bool))
        unit = getattr(column, "unit", None)
        specs.append(
            {
                "name": name,
                "masked": masked,
                "unit": None if unit is None else unit.to_string(),
                "description": column.info.description,
            }
        )
    node.attrs[ATTR_KEY] = {
        "layout": LAYOUT_VERSION,
        "kind": "candidates",
        "columns": specs,
        "meta": json_safe(table.meta),
    }


# --------------------------------------------------------------------------- result reading


@dataclass
class ResultStore:
    """A finished result store, read back.

    Attributes
    ----------
    path : pathlib.Path
        The store directory.
    difference : ZarrImage
        The difference image group.
    solution : SpatialSolution
        The fitted kernel and background, rebuilt exactly.
    candidates : astropy.table.Table
        The candidate table.
    metadata, config, provenance : dict
        The root attributes of those names.
    quality : dict
        The quality verdict (``verdict``, ``reasons``, ``checks``, ``metrics``); empty
        for stores written before verdicts existed.
    z_histograms : numpy.ndarray or None
        ``(2, n_bins)`` counts of difference / sigma on the sky and on the candidates'
        footprints in :data:`diffkernel.quality.Z_BINS`; None in older stores.
    """

    path: Path
    difference: ZarrImage
    solution: SpatialSolution
    candidates: Table
    metadata: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    z_histograms: np.ndarray | None = None

    @property
    def score(self) -> ZarrImage | None:
        """The score image group (S/N of a point source); None when none was made."""
        from .filters import open_score

        return open_score(self.path)

    @property
    def filters(self):
        """The difference's :class:`~diffkernel.kernel.decorrelate.DifferenceFilters`, or None."""
        from ...kernel.decorrelate import DifferenceFilters
        from .filters import read_filters

        stored = read_filters(self.path)
        return None if stored is None else DifferenceFilters.from_stored(*stored)


def open_result(path: PathLike) -> ResultStore:
    """Open a complete result store.

    Parameters
    ----------
    path : str or os.PathLike
        Result store directory.

    Returns
    -------
    ResultStore

    Raises
    ------
    StoreError
        If ``path`` does not exist, is not a diffkernel result store, is incomplete, or a
        part of it is missing or unreadable.
    """
    location = Path(path).absolute()
    status = result_status(location)
    if status == "missing":
        raise StoreError(f"{str(location)!r} does not exist{_partial_hint(location)}")
    if status == "foreign":
        raise StoreError(f"{str(location)!r} is not a diffkernel result store")
    if status == "incomplete":
        raise StoreError(f"{str(location)!r} is incomplete: the run that wrote it did not finish")
    root = open_root(location)
    group_info(root, f"result store {str(location)!r}", "result")
    attrs = root.attrs.asdict()
    for name in ("metadata", "config", "provenance", "quality"):
        if not isinstance(attrs.get(name) or {}, dict):
            raise StoreError(
                f"result store {str(location)!r}: attribute {name!r} is not a table (it holds "
                f"a {type(attrs[name]).__name__}); the store was altered: write it again"
            )
    return ResultStore(
        path=location,
        difference=ZarrImage.open(location, "difference"),
        solution=_read_solution(sub_group(root, "solution", location), location),
        candidates=_read_candidates(sub_group(root, "candidates", location), location),
        metadata=attrs.get("metadata") or {},
        config=attrs.get("config") or {},
        provenance=attrs.get("provenance") or {},
        quality=attrs.get("quality") or {},
        z_histograms=np.asarray(root["z_histograms"][...]) if "z_histograms" in root else None,
    )


def _partial_hint(location: Path) -> str:
    partials = sorted(location.parent.glob(f"{glob.escape(location.name)}.partial-*"))
    if not partials:
        return ""
    return f" (a run that did not finish left {str(partials[-1])!r})"


def _functions_from_attrs(attrs: Mapping[str, Any] | None, where: str) -> SpatialFunctions | None:
    if attrs is None:
        return None
    try:
        bbox = tuple(decode_float(v) for v in attrs["bbox"])
        return SpatialFunctions(str(attrs["model_type"]), int(attrs["order"]), bbox)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{where}: spatial functions {attrs!r} are invalid: {exc}") from exc


def _read_solution(node: zarr.Group, location: Path) -> SpatialSolution:
    where = f"group 'solution' of store {str(location)!r}"
    info = group_info(node, where, "solution")

    def array(name: str, optional: bool = False) -> np.ndarray | None:
        if optional and name not in node:
            return None
        return member_array(node, name, where)[...]

    basis_info = require_attr(info, "basis", where)
    separable = None
    if "separable_x" in node or "separable_y" in node:
        separable = (array("separable_x"), array("separable_y"))
    basis = KernelBasis(
        kind=str(basis_info["kind"]),
        kernel_size=int(basis_info["kernel_size"]),
        native_images=array("native_images"),
        transform=array("transform"),
        conserves_sum=bool(basis_info["conserves_sum"]),
        separable=separable,
        groups=tuple(int(g) for g in basis_info["groups"]),
        description=dict(basis_info.get("description") or {}),
    )
    kernel_functions = _functions_from_attrs(require_attr(info, "kernel_functions", where), where)
    if kernel_functions is None:
        raise StoreError(f"{where}: attribute {ATTR_KEY}.kernel_functions is null")
    return SpatialSolution(
        basis=basis,
        kernel_functions=kernel_functions,
        kernel_coeffs=array("kernel_coeffs"),
        background_functions=_functions_from_attrs(info.get("background_functions"), where),
        background_coeffs=array("background_coeffs"),
        condition=decode_float(require_attr(info, "condition", where)),
        covariance=array("covariance", optional=True),
        notes=[str(note) for note in info.get("notes", [])],
    )


def _read_candidates(node: zarr.Group, location: Path) -> Table:
    where = f"group 'candidates' of store {str(location)!r}"
    info = group_info(node, where, "candidates")
    columns = []
    for spec in require_attr(info, "columns", where):
        name = spec["name"]
        values = member_array(node, name, where)[...]
        unit = None if spec.get("unit") is None else u.Unit(spec["unit"], parse_strict="silent")
        kwargs = {"name": name, "unit": unit, "description": spec.get("description")}
        if spec.get("masked"):
            mask = member_array(node, name + _MASK_SUFFIX, where)[...]
            columns.append(MaskedColumn(values, mask=mask, **kwargs))
        else:
            columns.append(Column(values, **kwargs))
    return Table(columns, meta=info.get("meta") or {})
