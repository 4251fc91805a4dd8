"""Tests of diffkernel.kernel.moments: the statistics made block by block, and lazily."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.config import PsfMatchConfigDF
from diffkernel.kernel import moments
from diffkernel.kernel.basis import alard_lupton_basis, delta_function_basis
from diffkernel.kernel.candidate import (
    ShiftedTemplates,
    StampBatch,
    basis_columns,
    convolve_basis,
    noise_corrected,
)
from diffkernel.kernel.fit import CONDITION_ALWAYS, fit_single_kernels
from diffkernel.kernel.moments import compute_stats, fit_moments

K = 7
S = 11
H = S + K - 1
AL_SMALL = alard_lupton_basis(3, (0.6, 1.2), (1, 1))


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


@pytest.mark.parametrize("make_basis", [lambda: delta_function_basis(3), lambda: AL_SMALL])
@pytest.mark.parametrize("constant", [True, False])
def test_noise_correction_is_the_expected_noise_gram(make_basis, constant):
    """What is taken out is E[Cₙᵀ W Cₙ], the convolved noise's normal matrix, exactly.

    ``C_i = A_i t`` with ``A_i`` the matrix of the valid convolution with basis kernel
    ``i``; for noise of covariance ``diag(V)`` the expectation is ``tr(W A_i V A_jᵀ)``.
    """
    basis = make_basis()
    k, s = 3, 5
    h = s + k - 1
    rng = np.random.default_rng(21)
    tvar = rng.uniform(1.0, 4.0, size=(2, h, h))
    svar = rng.uniform(1.0, 4.0, size=(2, s, s))
    template = rng.normal(size=(2, h, h))
    science = rng.normal(size=(2, s, s))
    stamps = StampBatch(template, tvar, science, svar)
    conv = convolve_basis(basis, template)
    kwargs = dict(background_order=None, constant_variance_weighting=constant)
    moments = fit_moments(conv, science, svar, **kwargs)
    got = noise_corrected(moments, stamps, basis, svar, constant_variance_weighting=constant)
    for c in range(2):
        # A_i column by column: the convolution of each unit template pixel.
        units = np.eye(h * h).reshape(h * h, h, h)
        a = convolve_basis(basis, units).reshape(h * h, basis.size, s * s).transpose(1, 2, 0)
        w = np.full(s * s, 1.0 / svar[c].mean()) if constant else 1.0 / svar[c].ravel()
        expected = np.einsum("p,ipq,q,jpq->ij", w, a, tvar[c].ravel(), a)
        np.testing.assert_allclose(moments.m_fit[c] - got.m_fit[c], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got.b_fit, moments.b_fit)
    same = noise_corrected(
        moments, stamps, basis, svar, constant_variance_weighting=constant, correct=False
    )
    assert same is moments
