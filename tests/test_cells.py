"""Tests of diffkernel.cells: merging cell results does not change the reduction."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from diffkernel import MakeKernelConfig
from diffkernel.basis import basis_from_config
from diffkernel.cells import CellResult, InMemoryPair, SourcePlacement, fit_cell, reduce_cells
from diffkernel.simulate import make_pair
from diffkernel.task import make_cell_plan


def test_reduction_does_not_depend_on_how_cells_are_merged():
    """Cells merged in any groups, in any order, reduce to the same outcome bit for bit."""
    pair = make_pair((256, 256), seed=7, template_depth=4)
    cfg = MakeKernelConfig()
    cfg.kernel.active.sizeCellX = cfg.kernel.active.sizeCellY = 64
    cfg.kernel.active.spatialKernelOrder = 1
    kcfg = cfg.kernel.active
    basis = basis_from_config(kcfg, pair.template.psf_fwhm, pair.science.psf_fwhm)
    t, s = pair.template.masked_image, pair.science.masked_image
    plan = make_cell_plan(cfg, basis, s.shape)
    sources = pair.truth.sources
    placement = SourcePlacement.from_positions(
        np.asarray(sources["id"]), np.asarray(sources["x"]), np.asarray(sources["y"]), plan
    )
    read = InMemoryPair(t, s)
    with threadpool_limits(1, user_api="blas"):
        per_cell = [
            fit_cell(plan, cell, idx, placement.xc[idx], placement.yc[idx], read)
            for cell, idx in placement.cells()
        ]
        assert len(per_cell) >= 8
        reference, table, _ = reduce_cells(plan, placement, per_cell)
        rng = np.random.default_rng(3)
        shuffled = [per_cell[i] for i in rng.permutation(len(per_cell))]
        groups = [CellResult.merge(shuffled[i : i + 3]) for i in range(0, len(shuffled), 3)]
        merged, merged_table, _ = reduce_cells(plan, placement, groups[::-1])
    np.testing.assert_array_equal(merged.solution.kernel_coeffs, reference.solution.kernel_coeffs)
    np.testing.assert_array_equal(
        merged.solution.background_coeffs, reference.solution.background_coeffs
    )
    for name in ("id", "status", "reason", "kernel_sum", "resid_std", "snr_template"):
        np.testing.assert_array_equal(np.asarray(merged_table[name]), np.asarray(table[name]))
