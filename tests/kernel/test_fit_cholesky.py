"""Single-kernel solves of large (delta-function) bases by Cholesky factors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from diffkernel.kernel.fit import CONDITION_ALWAYS, fit_single_kernels
from diffkernel.kernel.moments import FitMoments


def test_large_basis_solves_match_the_general_solve_and_survive_indefinite_members():
    n_par, n = CONDITION_ALWAYS + 20, 3
    rng = np.random.default_rng(7)
    a = rng.normal(size=(n, 2 * n_par, n_par)) * rng.uniform(0.5, 50.0, size=n_par)
    m = np.matmul(np.swapaxes(a, 1, 2), a)
    # The last member indefinite but invertible: no Cholesky factor, a general solution.
    m[2] = m[2] - 2.0 * np.diag(np.diag(m[2]))
    b = rng.normal(size=(n, n_par))
    cfg = SimpleNamespace(checkConditionNumber=False, conditionNumberType="EIGENVALUE")
    fit = fit_single_kernels(FitMoments(m, b, None, 0), cfg)
    expected = np.linalg.solve(m, b[..., None])[..., 0]
    np.testing.assert_allclose(fit.coeffs, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
