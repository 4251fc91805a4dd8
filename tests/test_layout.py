"""The package's shape, as the README's code map promises it.

Small modules (600 lines at most), no module importing another's private names, the
pipeline reaching storage only through its interface (no ``zarr`` in
``diffkernel.pipeline``), and the public API importable from the top level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffkernel

PACKAGE = Path(diffkernel.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 600


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def _imports(path: Path):
    return [
        node
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_private_names_imported_from_another_module(path):
    private = [
        f"{node.module}.{alias.name}"
        for node in _imports(path)
        if isinstance(node, ast.ImportFrom)
        and (node.level > 0 or (node.module or "").startswith("diffkernel"))
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert not private


@pytest.mark.parametrize("path", [p for p in MODULES if "pipeline" in p.parts], ids=_name)
def test_pipeline_reaches_storage_only_through_its_interface(path):
    for node in _imports(path):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not any(
            n and n.split(".")[0] == "zarr" and node.__dict__.get("level", 0) == 0 for n in names
        ), ast.dump(node)


def test_public_api_from_the_top_level():
    from diffkernel import (  # noqa: F401
        MakeKernelConfig,
        MakeKernelTask,
        ingest,
        open_result,
        read_exposure,
        run_pair,
        subtract_images,
        write_exposure,
    )

    for name in diffkernel.__all__:
        assert getattr(diffkernel, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        diffkernel.nothing  # noqa: B018


def test_zarr_workspace_round_trip(tmp_path):
    """The storage interface's Zarr implementation: an image group, tiles, a plane."""
    import pickle

    import numpy as np

    from diffkernel.io.zarr.workspace import ZarrWorkspace
    from diffkernel.io.zarr.write import write_image
    from diffkernel.simulate import make_pair

    pair = make_pair((64, 64), seed=1)
    write_image(tmp_path / "in.zarr", pair.science, chunks=32)
    like = diffkernel.ZarrImage.open(tmp_path / "in.zarr")
    store = tmp_path / "work.zarr"
    import zarr

    zarr.open_group(store, mode="w")
    work = pickle.loads(pickle.dumps(ZarrWorkspace(str(store))))
    work.create_image("warped", like, (32, 32), {"NO_DATA": 0, "EDGE": 1})
    ones = np.ones((32, 64))
    work.write_image_tile("warped", 32, 0, 2 * ones, ones, np.ones((32, 64), dtype=np.int32))
    image = work.open_image("warped").read(0, 64, 0, 64)
    assert image.shape == (64, 64) and np.all(image.image[32:] == 2)
    assert np.all(image.mask[32:] == 1) and work.open_image("warped").wcs is None
    plane = pickle.loads(
        pickle.dumps(work.write_plane("bg/x", np.arange(64.0 * 64).reshape(64, 64), (32, 32)))
    )
    np.testing.assert_array_equal(
        plane.read(1, 3, 2, 5), np.arange(64.0 * 64).reshape(64, 64)[1:3, 2:5]
    )


#: The layers, lowest first: a module imports from its own layer and the ones before.
LAYERS = [
    {"errors", "image", "quality"},
    {"config"},
    {"kernel"},
    {"prep"},
    {"io"},
    {"pipeline"},
    {"plots", "simulate", "batch", "batch_state", "cli", "__init__"},
]


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imported_tops(path: Path) -> set[str]:
    """The top-level names under diffkernel that a module imports from."""
    package = _name(path).split(".")[:-1]
    if path.name == "__init__.py":
        package = _name(path).split(".")[:-1]
    tops = set()
    for node in _imports(path):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - node.level + 1]
            parts = base + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffkernel"):
            parts = node.module.split(".")
        else:
            continue
        if len(parts) > 1:
            tops.add(parts[1])
    return tops


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_layers_import_only_downwards(path):
    parts = _name(path).split(".")
    own = _layer(parts[1] if len(parts) > 1 else "__init__")
    above = {top for top in _imported_tops(path) if _layer(top) > own}
    assert not above, f"{_name(path)} imports from a higher layer: {sorted(above)}"
