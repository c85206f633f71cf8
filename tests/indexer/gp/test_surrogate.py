"""The surrogate's fit: the data term summed over chunks equals the one-shot product."""

from __future__ import annotations

import numpy as np
import pytest

import indexer.gp.surrogate as surrogate_module
from indexer.gp.surrogate import fit_surrogate


@pytest.mark.parametrize("tau", [None, 0.3])
def test_chunked_fit_equals_the_whole_product(monkeypatch: pytest.MonkeyPatch, tau: float | None) -> None:
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((50, 6)).astype(np.float32)
    beta, grad_term = rng.uniform(0.01, 0.25, 50), rng.normal(size=50)
    phi64 = phi.astype(np.float64)
    want_tau = float((beta * (phi64**2).sum(1)).sum() / 6) if tau is None else tau
    want = np.linalg.cholesky(want_tau * np.eye(6) + (phi64 * beta[:, None]).T @ phi64)
    monkeypatch.setattr(surrogate_module, "FIT_CHUNK_ROWS", 7)  # 8 chunks, the last of 1 row
    sur = fit_surrogate(phi, beta, grad_term, prior_precision=tau)
    assert sur.prior_precision == pytest.approx(want_tau, rel=1e-12)
    np.testing.assert_allclose(sur.cholesky, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sur.whiten(), np.linalg.solve(want, phi64.T).T, rtol=1e-10, atol=1e-12)
    assert sur.phi is phi or np.shares_memory(sur.phi, phi)  # the stored features are kept, not copied


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_query_terms_solve_as_scipy_does(order: str, k: int) -> None:
    """The direct LAPACK solve of query_terms gives scipy.linalg.solve_triangular's bits, in either memory
    order of L, for queries from 1e-30 to 1e30."""
    from dataclasses import replace

    from scipy.linalg import solve_triangular

    rng = np.random.default_rng(k)
    phi = rng.standard_normal((3 * k, k))
    sur = fit_surrogate(phi, np.full(3 * k, 0.2), rng.normal(size=3 * k), prior_precision=0.5)
    sur = replace(sur, cholesky=np.array(sur.cholesky, order=order))
    for scale in (1e-30, 1.0, 1e30):
        phi_q = rng.standard_normal(k) * scale
        terms = sur.query_terms(phi_q)
        u = solve_triangular(sur.cholesky, phi_q, lower=True)
        assert np.array_equal(terms.whitened, u)
        assert np.array_equal(terms.precision_phi, solve_triangular(sur.cholesky, u, lower=True, trans="T"))
        np.testing.assert_allclose(
            terms.precision_phi, np.linalg.solve(sur.cholesky @ sur.cholesky.T, phi_q), rtol=1e-9
        )
