"""Tests of diffkernel.kernel.moments: the statistics made block by block, and lazily."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.config import PsfMatchConfigDF
from diffkernel.kernel import moments
from diffkernel.kernel.basis import alard_lupton_basis, delta_function_basis
from diffkernel.kernel.candidate import (
    ShiftedTemplates,
    basis_columns,
    compute_stats,
    convolve_basis,
    fit_moments,
)
from diffkernel.kernel.fit import CONDITION_ALWAYS, fit_single_kernels

K = 7
S = 11
H = S + K - 1


@pytest.fixture(scope="module")
def stamps():
    rng = np.random.default_rng(20)
    template = rng.normal(100.0, 10.0, size=(5, H, H))
    science = rng.normal(100.0, 10.0, size=(5, S, S))
    variance = rng.uniform(50.0, 150.0, size=(5, S, S))
    return template, science, variance


def all_fields(stats):
    return {k: v for k, v in vars(stats).items() if isinstance(v, np.ndarray)}


@pytest.mark.parametrize("constant", [True, False])
@pytest.mark.parametrize("selector", [None, "core"])
def test_shifted_templates_give_the_convolved_stamps_statistics(stamps, constant, selector):
    """The lazy delta-function columns give the statistics of the materialized ones."""
    template, science, variance = stamps
    basis = delta_function_basis(K)
    sel = None
    if selector:
        sel = np.zeros((S, S), dtype=bool)
        sel[3:8, 3:8] = True
    lazy = basis_columns(basis, template)
    assert isinstance(lazy, ShiftedTemplates) and lazy.shape == (5, K * K, S, S)
    kwargs = dict(background_order=1, constant_variance_weighting=constant, stats_selector=sel)
    got = compute_stats(lazy, science, variance, with_uncertainty=True, **kwargs)
    want = compute_stats(
        convolve_basis(basis, template), science, variance, with_uncertainty=True, **kwargs
    )
    for name, value in all_fields(want).items():
        np.testing.assert_allclose(all_fields(got)[name], value, rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("constant", [True, False])
def test_statistics_in_blocks_equal_one_block(stamps, constant, monkeypatch):
    """Making the moments a candidate at a time (bounded memory) changes nothing."""
    template, science, variance = stamps
    conv = convolve_basis(alard_lupton_basis(K, (0.8, 2.0), (2, 1)), template)
    kwargs = dict(background_order=2, constant_variance_weighting=constant)
    fit = fit_moments(conv, science, variance * 1.3, with_uncertainty=True, **kwargs)
    whole = compute_stats(conv, science, variance, fit=fit, **kwargs)
    monkeypatch.setattr(moments, "_BLOCK_BYTES", 8)  # one candidate per block
    fit_b = fit_moments(conv, science, variance * 1.3, with_uncertainty=True, **kwargs)
    blocks = compute_stats(conv, science, variance, fit=fit_b, **kwargs)
    for name, value in all_fields(whole).items():
        np.testing.assert_allclose(all_fields(blocks)[name], value, rtol=1e-12, err_msg=name)


def test_moments_leave_the_convolved_stamps_alone(stamps):
    """Weighting the design for the covariance moments does not write into the input."""
    template, science, variance = stamps
    conv = convolve_basis(alard_lupton_basis(K, (0.8, 2.0), (2, 1)), template)
    before = conv.copy()
    fit_moments(
        conv,
        science,
        variance,
        background_order=None,
        constant_variance_weighting=True,
        with_uncertainty=True,
    )
    np.testing.assert_array_equal(conv, before)


def test_delta_function_condition_numbers_only_when_checked(stamps):
    """A delta-function fit skips its eigendecompositions unless the condition is checked."""
    template, science, variance = stamps
    basis = delta_function_basis(K)
    conv = basis_columns(basis, template)
    st = compute_stats(
        conv, science, variance, background_order=None, constant_variance_weighting=True
    )
    # A basis larger than CONDITION_ALWAYS terms: repeat the kernel terms.
    wide = st.transformed(np.tile(np.eye(K * K), CONDITION_ALWAYS // (K * K) + 1))
    assert wide.n_params > CONDITION_ALWAYS
    reg = np.eye(wide.n_kernel)
    skipped = fit_single_kernels(wide, PsfMatchConfigDF(), reg)
    assert np.isnan(skipped.condition).all()
    checked = fit_single_kernels(wide, PsfMatchConfigDF(checkConditionNumber=True), reg)
    assert np.all(checked.condition >= 1.0)
    np.testing.assert_array_equal(checked.coeffs, skipped.coeffs)
    small = fit_single_kernels(st, PsfMatchConfigDF(), np.eye(K * K))
    assert np.all(np.isfinite(small.condition))
