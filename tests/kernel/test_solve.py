"""Tests of diffkernel.kernel.solve and spatial_model: the steps of the reduction."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask
from diffkernel.kernel.solve import (
    BAD,
    GOOD,
    UNUSED,
    SolveState,
    clip_kernel_sums,
    select_per_cell,
)
from diffkernel.kernel.spatial_model import SpatialModel, spatial_orders
from diffkernel.simulate import make_pair


def _kernel_config(**values):
    cfg = MakeKernelConfig().kernel.active
    for name, value in values.items():
        setattr(cfg, name, value)
    return cfg


def test_select_per_cell_takes_the_brightest_of_each_cell():
    """The first ``per_cell`` of each cell in the given order, returned ascending."""
    cell = np.array([0, 0, 0, 1, 1, 2])
    order = np.array([2, 0, 1, 4, 3, 5])  # brightest first
    status = np.full(6, UNUSED, dtype=object)
    np.testing.assert_array_equal(select_per_cell(status, cell, order, 1), [2, 4, 5])
    np.testing.assert_array_equal(select_per_cell(status, cell, order, 2), [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(select_per_cell(status, cell, order, -1), np.arange(6))


def test_select_per_cell_promotes_the_next_candidate_of_a_cell():
    """A rejected candidate's place goes to the next of its cell, not of another cell."""
    cell = np.array([0, 0, 0, 1, 1])
    order = np.array([0, 1, 2, 3, 4])
    status = np.full(5, UNUSED, dtype=object)
    status[0] = BAD
    np.testing.assert_array_equal(select_per_cell(status, cell, order, 1), [1, 3])
    status[[1, 2]] = BAD
    np.testing.assert_array_equal(select_per_cell(status, cell, order, 1), [3])
    status[:] = BAD
    chosen = select_per_cell(status, cell, order, 1)
    assert chosen.dtype == np.intp and chosen.size == 0


def test_reject_keeps_the_first_reason_and_round():
    state = SolveState.start(4)
    state.reject(np.array([0, 1]), "singular fit", 0)
    state.reject(np.array([1, 2]), "kernel sum outlier", 2)
    assert list(state.status) == [BAD, BAD, BAD, UNUSED]
    assert list(state.reason) == ["singular fit", "singular fit", "kernel sum outlier", ""]
    np.testing.assert_array_equal(state.rejected_round, [0, 0, 2, -1])


def test_record_spatial_fit_keeps_a_repeated_note_once():
    state = SolveState.start(3)
    model = SpatialModel(None, None, None, 4, 1, None, "orders lowered")
    state.record_spatial_fit(model)
    state.record_spatial_fit(model)
    assert state.notes == ["orders lowered"]
    assert list(state.metadata) == [
        "notes",
        "bic_basis_size",
        "spatial_kernel_order_used",
        "spatial_bg_order_used",
    ]
    assert state.metadata["spatial_bg_order_used"] is None


@pytest.mark.parametrize(
    "n_used, has_bg, expected",
    [
        (10, True, (2, 1)),
        (6, True, (2, 1)),
        (5, True, (1, 1)),
        (2, True, (0, 0)),
        (1, False, (0, 1)),
    ],
)
def test_spatial_orders_lowered_for_few_candidates(n_used, has_bg, expected):
    """An order is lowered while its polynomial has more terms than candidates."""
    cfg = _kernel_config(spatialKernelOrder=2, spatialBgOrder=1)
    k_order, bg_order, note = spatial_orders(cfg, n_used, has_bg)
    assert (k_order, bg_order) == expected
    if (k_order, bg_order if has_bg else 1) == (2, 1):
        assert note is None
    else:
        background = bg_order if has_bg else "-"
        assert note == (
            f"only {n_used} good candidate(s): spatial orders lowered to kernel {k_order}, "
            f"background {background} (asked 2, 1)"
        )


def test_clip_kernel_sums_needs_an_ensemble():
    """Off, or with two candidates or fewer, nothing is clipped nor recorded."""
    ksum = np.array([1.0, 1.0, 5.0])
    state = SolveState.start(3)
    assert not clip_kernel_sums(ksum, np.array([0, 2]), _kernel_config(), 1, state)
    off = _kernel_config(kernelSumClipping=False)
    assert not clip_kernel_sums(ksum, np.arange(3), off, 1, state)
    assert "kernel_sum_stats" not in state.metadata
    assert (state.status == UNUSED).all()


def test_clip_kernel_sums_rejects_the_outlier():
    ksum = np.array([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 3.0])
    state = SolveState.start(len(ksum))
    used = np.arange(len(ksum))
    assert clip_kernel_sums(ksum, used, _kernel_config(), 2, state)
    assert list(np.flatnonzero(state.status == BAD)) == [6]
    assert state.reason[6] == "kernel sum outlier" and state.rejected_round[6] == 2
    assert state.counts["kernel_sum"] == 1
    (stats,) = state.metadata["kernel_sum_stats"]
    assert stats["round"] == 2 and stats["mean"] == pytest.approx(1.0, abs=0.01)


@pytest.fixture(scope="module")
def pair():
    return make_pair((384, 384), seed=1, template_depth=4, n_variable=3)


@pytest.mark.parametrize("rounds", [1, 5])
def test_rounds_reject_by_spatial_residuals_and_refit(pair, rounds):
    """A tight residual mean rejects by the spatial model; rounds are consistent.

    With one round the candidates still rejected get a last fit and a note.
    """
    cfg = MakeKernelConfig.default_subtraction()
    cfg.kernel.active.candidateResidualMeanMax = 0.015
    cfg.kernel.active.maxSpatialIterations = rounds
    result = MakeKernelTask(cfg).run(pair.template, pair.science, pair.truth.sources)
    meta = result.metadata
    assert meta["rejected"]["spatial"] > 0
    assert 1 <= meta["rounds"] <= rounds
    still = [n for n in meta["notes"] if n.startswith("candidates were still rejected")]
    assert bool(still) == (rounds == 1)
    assert result.spatialSolution.notes[-len(meta["notes"]) :] == meta["notes"]
    table = result.candidates
    status = np.asarray(table["status"]).astype(str)
    assert (status == GOOD).sum() == meta["n_good"] > 0
    spatial = np.asarray(table["reason"]).astype(str) == "spatial residuals"
    assert spatial.sum() == meta["rejected"]["spatial"]
    assert (status[spatial] == BAD).all()
