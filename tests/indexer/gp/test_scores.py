"""Single-example scores (DESIGN.md 1.3) against brute-force refits of the surrogate (DESIGN.md 1.6).

Every brute-force value here is computed from the raw ``phi``, ``beta``, ``grad_term`` and ``tau`` with
explicit inverses of the (refitted) precision matrix; none reuses the library's Cholesky factor, whitened
vectors, ``h`` or ``s``.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.enums import Score
from indexer.exceptions import InvalidQueryError
from indexer.gp.scores import query_vector, score_from_inner, signed_score
from indexer.gp.surrogate import S_FLOOR, Surrogate, default_prior_precision, fit_surrogate

# ---------------------------------------------------------------------------------------------- helpers


def precision(phi: np.ndarray, beta: np.ndarray, tau: float) -> np.ndarray:
    """A = tau I + Phi^T B Phi, built from scratch."""
    return tau * np.eye(phi.shape[1]) + phi.T @ np.diag(beta) @ phi


def without(a: np.ndarray, phi_i: np.ndarray, beta_i: float) -> np.ndarray:
    """A_{-i} = A - beta_i phi_i phi_i^T: the precision refitted without example i."""
    return a - beta_i * np.outer(phi_i, phi_i)


def scores_of(sur: Surrogate, phi: np.ndarray, phi_q: np.ndarray) -> dict[Score, np.ndarray]:
    terms = sur.query_terms(phi_q)
    return sur.scores(terms)


def brute_information_loss(phi: np.ndarray, beta: np.ndarray, tau: float, phi_q: np.ndarray) -> np.ndarray:
    """0.5 log(v_q^(-i) / v_q) with v = phi_q^T A^-1 phi_q, each A inverted explicitly."""
    a = precision(phi, beta, tau)
    v_q = phi_q @ np.linalg.inv(a) @ phi_q
    out = np.empty(len(beta))
    for i in range(len(beta)):
        v_minus = phi_q @ np.linalg.inv(without(a, phi[i], beta[i])) @ phi_q
        out[i] = 0.5 * np.log(v_minus / v_q)
    return out


def brute_information_gain(phi: np.ndarray, beta: np.ndarray, tau: float, phi_q: np.ndarray) -> np.ndarray:
    """0.5 log(prior var / posterior var of f_q after observing example i alone)."""
    k = phi.shape[1]
    prior_var = phi_q @ phi_q / tau
    out = np.empty(len(beta))
    for i in range(len(beta)):
        post_var = phi_q @ np.linalg.solve(tau * np.eye(k) + beta[i] * np.outer(phi[i], phi[i]), phi_q)
        out[i] = 0.5 * np.log(prior_var / post_var)
    return out


def brute_influence(
    phi: np.ndarray, beta: np.ndarray, grad_term: np.ndarray, tau: float, phi_q: np.ndarray
) -> np.ndarray:
    """grad_term_i * phi_q^T A_{-i}^-1 phi_i."""
    a = precision(phi, beta, tau)
    return np.array(
        [
            grad_term[i] * phi_q @ np.linalg.solve(without(a, phi[i], beta[i]), phi[i])
            for i in range(len(beta))
        ]
    )


# ----------------------------------------------------------------------------- the surrogate's caches


def test_no_clamping_in_random_problems(problem):
    """The random problems keep every leverage well below 1, so the closed forms are unclamped."""
    sur = problem.surrogate
    assert sur.n_clamped == 0
    assert sur.s_floor == S_FLOOR
    assert np.all(1.0 - sur.beta * sur.h > 10 * S_FLOOR)


def test_h_and_s_against_explicit_inverse(problem, rtol):
    """h_i = phi_i^T A^-1 phi_i, s_i = 1 - beta_i h_i = 1 / (1 + beta_i phi_i^T A_{-i}^-1 phi_i)."""
    sur = problem.surrogate
    a = precision(problem.phi, problem.beta, problem.tau)
    a_inv = np.linalg.inv(a)
    h = np.einsum("nk,kl,nl->n", problem.phi, a_inv, problem.phi)
    np.testing.assert_allclose(sur.h, h, rtol=rtol)
    loo = np.array(
        [
            1.0 / (1.0 + b * p @ np.linalg.solve(without(a, p, b), p))
            for p, b in zip(problem.phi, problem.beta, strict=True)
        ]
    )
    np.testing.assert_allclose(sur.s, loo, rtol=rtol)
    np.testing.assert_allclose(sur.cholesky @ sur.cholesky.T, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())


# ----------------------------------------------------------------------- closed forms vs brute force


def test_information_loss_matches_refit(problem, rtol, atol_log_ratio):
    sur = problem.surrogate
    for phi_q in problem.queries:
        got = scores_of(sur, problem.phi, phi_q)[Score.INFORMATION_LOSS]
        want = brute_information_loss(problem.phi, problem.beta, problem.tau, phi_q)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_log_ratio)
        assert got.max() > 1e-3  # the comparison is not between two vectors of zeros


def test_information_loss_full_precision_on_saturated_examples(problem, rtol):
    """Cancellation-free refit: v^(-i) - v = phi_q^T (A_{-i}^-1 - A^-1) phi_q
    = beta_i (phi_q^T A_{-i}^-1 phi_i)(phi_i^T A^-1 phi_q) (resolvent identity, explicit inverses), so
    the score 0.5 log1p((v^(-i) - v) / v) keeps full relative precision even for beta_i ~ 1e-12."""
    sur = problem.surrogate
    a = precision(problem.phi, problem.beta, problem.tau)
    a_inv = np.linalg.inv(a)
    for phi_q in problem.queries:
        v_q = phi_q @ a_inv @ phi_q
        want = np.array(
            [
                0.5 * np.log1p(b * (phi_q @ np.linalg.inv(without(a, p, b)) @ p) * (p @ a_inv @ phi_q) / v_q)
                for p, b in zip(problem.phi, problem.beta, strict=True)
            ]
        )
        got = scores_of(sur, problem.phi, phi_q)[Score.INFORMATION_LOSS]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
        assert np.all(got[problem.saturated] > 0)
        assert np.all(got[problem.saturated] < 1e-9)


def test_information_gain_matches_prior_only_refit(problem, rtol, atol_log_ratio):
    sur = problem.surrogate
    for phi_q in problem.queries:
        got = scores_of(sur, problem.phi, phi_q)[Score.INFORMATION_GAIN]
        want = brute_information_gain(problem.phi, problem.beta, problem.tau, phi_q)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_log_ratio)
        assert got.max() > 1e-3


def test_information_gain_full_precision_on_saturated_examples(problem, rtol):
    """prior var - posterior var = phi_q^T (I/tau - P^-1) phi_q
    = (beta_i / tau)(phi_q.phi_i)(phi_i^T P^-1 phi_q) with P = tau I + beta_i phi_i phi_i^T,
    so IG = -0.5 log1p(-(that) / prior var) without cancellation."""
    sur = problem.surrogate
    tau, k = problem.tau, problem.k
    for phi_q in problem.queries:
        prior_var = phi_q @ phi_q / tau
        want = []
        for p, b in zip(problem.phi, problem.beta, strict=True):
            p_inv = np.linalg.inv(tau * np.eye(k) + b * np.outer(p, p))
            want.append(-0.5 * np.log1p(-(b / tau) * (phi_q @ p) * (p @ p_inv @ phi_q) / prior_var))
        got = scores_of(sur, problem.phi, phi_q)[Score.INFORMATION_GAIN]
        np.testing.assert_allclose(got, np.array(want), rtol=rtol, atol=0)
        assert np.all(got[problem.saturated] > 0)


def test_influence_matches_refit(problem, rtol):
    sur = problem.surrogate
    for phi_q in problem.queries:
        got = scores_of(sur, problem.phi, phi_q)[Score.INFLUENCE]
        want = brute_influence(problem.phi, problem.beta, problem.grad_term, problem.tau, phi_q)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-14 * np.abs(want).max())
        assert got[problem.zero_row] == 0.0


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_influence_is_exact_leave_one_out_of_the_posterior_mean(seed, problem_factory, rtol):
    """Regression: grad_term_i = beta_i (y_i - mu_i) with mu = A^-1 Phi^T B y the exact posterior mean; then
    influence_i = mu_q(full data) - mu_q(without i), each mean obtained by an explicit solve."""
    base = problem_factory(seed)
    phi, beta, tau = base.phi, base.beta, base.tau
    rng = np.random.default_rng(seed + 100)
    y = rng.normal(0.0, 2.0, size=len(beta))
    a = precision(phi, beta, tau)
    rhs = phi.T @ (beta * y)
    mu = np.linalg.solve(a, rhs)
    grad_term = beta * (y - phi @ mu)
    sur = fit_surrogate(phi, beta, grad_term, prior_precision=tau)
    for phi_q in base.queries:
        mean_full = phi_q @ mu
        want = np.array(
            [
                mean_full
                - phi_q @ np.linalg.solve(without(a, phi[i], beta[i]), rhs - beta[i] * y[i] * phi[i])
                for i in range(len(beta))
            ]
        )
        got = scores_of(sur, phi, phi_q)[Score.INFLUENCE]
        # the saturated examples move the mean by ~1e-12: the brute-force difference of two solves resolves
        # them only to its own rounding, hence the small absolute floor
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-12 * np.abs(mean_full))
        assert np.abs(got).max() > 1e-3


def test_baselines_match_numpy(problem, rtol):
    sur = problem.surrogate
    for phi_q in problem.queries:
        scores = scores_of(sur, problem.phi, phi_q)
        inner = np.array([float(np.dot(phi_q, p)) for p in problem.phi])
        norms = np.sqrt((problem.phi**2).sum(axis=1))
        cosine = np.array(
            [
                0.0 if nrm == 0 else d / (np.sqrt(phi_q @ phi_q) * nrm)
                for d, nrm in zip(inner, norms, strict=True)
            ]
        )
        np.testing.assert_allclose(scores[Score.INNER_PRODUCT], inner, rtol=rtol, atol=1e-14)
        np.testing.assert_allclose(scores[Score.COSINE], cosine, rtol=rtol, atol=1e-14)
        assert np.all(np.abs(scores[Score.COSINE]) <= 1.0)


def test_query_terms_against_explicit_inverse(problem, rtol):
    sur = problem.surrogate
    a_inv = np.linalg.inv(precision(problem.phi, problem.beta, problem.tau))
    for phi_q in problem.queries:
        terms = sur.query_terms(phi_q)
        assert terms.posterior_variance == pytest.approx(phi_q @ a_inv @ phi_q, rel=rtol)
        assert terms.phi_norm == pytest.approx(np.sqrt(phi_q @ phi_q), rel=rtol)
        # u_q . u_i is the posterior covariance phi_q^T A^-1 phi_i
        np.testing.assert_allclose(
            sur.whiten() @ terms.whitened, problem.phi @ a_inv @ phi_q, rtol=rtol, atol=1e-14
        )


# ------------------------------------------------------------------------------------------ clamping


def test_clamping_is_counted():
    """One example with a huge beta has leverage ~1: its s_i is raised to the floor and counted."""
    rng = np.random.default_rng(7)
    n, k = 40, 8
    phi = rng.standard_normal((n, k))
    beta = rng.uniform(0.01, 0.25, size=n)
    beta[5] = 1e12
    sur = fit_surrogate(phi, beta, rng.normal(size=n), prior_precision=1.0)
    assert sur.n_clamped == 1
    assert sur.s[5] == S_FLOOR
    others = np.arange(n) != 5
    np.testing.assert_array_equal(sur.s[others], 1.0 - sur.beta[others] * sur.h[others])
    assert np.all(sur.s[others] > S_FLOOR)
    # the clamped value keeps every score finite
    scores = scores_of(sur, phi, rng.standard_normal(k))
    assert all(np.all(np.isfinite(v)) for v in scores.values())


def test_clamping_respects_a_custom_floor():
    rng = np.random.default_rng(8)
    n, k = 30, 6
    phi = rng.standard_normal((n, k))
    beta = np.full(n, 0.1)
    beta[:2] = 1e9
    sur = fit_surrogate(phi, beta, np.zeros(n), prior_precision=1.0, s_floor=1e-3)
    assert sur.n_clamped == 2
    assert sur.s_floor == 1e-3
    np.testing.assert_array_equal(sur.s[:2], [1e-3, 1e-3])
    assert np.all(sur.s[2:] > 1e-3)


# ------------------------------------------------------------------------------ vector-database form


@pytest.mark.parametrize("score", list(Score), ids=lambda s: s.value)
def test_score_from_inner_of_score_vectors_equals_example_scores(problem, score, rtol):
    sur = problem.surrogate
    z = sur.score_vectors(score)
    assert z.shape == (problem.n, problem.k)
    assert z.dtype == np.float64
    for phi_q in problem.queries:
        terms = sur.query_terms(phi_q)
        from_inner = score_from_inner(score, z @ query_vector(score, terms), terms)
        want = scores_of(sur, problem.phi, phi_q)[score]
        np.testing.assert_allclose(from_inner, want, rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("score", list(Score), ids=lambda s: s.value)
def test_ranking_by_inner_product_equals_ranking_by_score(problem, score):
    """Exact top-k is maximum-inner-product search: unsigned scores rank as |<a_q, z_i>|, signed ones as
    <a_q, z_i>."""
    sur = problem.surrogate
    z = sur.score_vectors(score)
    for phi_q in problem.queries:
        terms = sur.query_terms(phi_q)
        inner = z @ query_vector(score, terms)
        key = inner if score.signed else np.abs(inner)
        values = scores_of(sur, problem.phi, phi_q)[score]
        by_key = np.argsort(-key, kind="stable")
        assert np.all(np.diff(values[by_key]) <= 0)  # monotone: a larger key never gives a smaller score
        np.testing.assert_array_equal(by_key, np.argsort(-values, kind="stable"))


def test_unsigned_scores_are_even_in_the_inner_product(problem):
    terms = problem.surrogate.query_terms(problem.queries[0])
    # |<phi_q, z_i>| < |phi_q| for information gain (Cauchy-Schwarz, |z_i| < 1): stay inside that range
    x = np.linspace(-0.99, 0.99, 13) * terms.phi_norm
    for score in (Score.INFORMATION_LOSS, Score.INFORMATION_GAIN):
        np.testing.assert_array_equal(score_from_inner(score, x, terms), score_from_inner(score, -x, terms))
        assert np.all(np.diff(score_from_inner(score, x[6:], terms)) > 0)


# ------------------------------------------------------------------------------- numerics (DESIGN 1.5)


def test_saturated_and_zero_examples_give_finite_scores(rtol):
    """beta = 1e-300 and beta = 0, zero feature rows and a zero query: every score finite, 0 where the
    formula says so, never NaN, and no invalid operation or division by zero on the way."""
    rng = np.random.default_rng(3)
    n, k = 20, 7
    phi = rng.standard_normal((n, k))
    beta = rng.uniform(0.05, 0.25, size=n)
    beta[0] = 1e-300
    beta[1] = 0.0
    phi[2] = 0.0
    phi[3] = 0.0
    beta[3] = 0.0  # zero row and zero weight at once
    grad_term = rng.normal(size=n)
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        sur = fit_surrogate(phi, beta, grad_term)
        assert sur.n_clamped == 0
        for phi_q in (rng.standard_normal(k), np.zeros(k)):
            terms = sur.query_terms(phi_q)
            scores = sur.scores(terms)
            for score, values in scores.items():
                assert np.all(np.isfinite(values)), score
                z = sur.score_vectors(score)
                a_q = query_vector(score, terms)
                assert np.all(np.isfinite(z)) and np.all(np.isfinite(a_q)), score
                np.testing.assert_allclose(score_from_inner(score, z @ a_q, terms), values, rtol=rtol, atol=0)
            for score in (Score.INFORMATION_LOSS, Score.INFORMATION_GAIN):
                assert scores[score][1] == 0.0  # beta = 0: the example carries no information
                assert 0.0 <= scores[score][0] < 1e-290  # beta = 1e-300: nothing measurable
            for row in (2, 3):  # zero feature: every score is exactly 0
                for score, values in scores.items():
                    assert values[row] == 0.0, (score, row)
            if not np.any(phi_q):  # a zero query: nothing to explain, every score 0
                assert terms.posterior_variance == 0.0 and terms.phi_norm == 0.0
                for score, values in scores.items():
                    np.testing.assert_array_equal(values, np.zeros(n), err_msg=score.value)
            else:
                # beta = 0 but a nonzero gradient term: influence keeps its closed form c_qi grad_i / s_i
                c = sur.whiten() @ terms.whitened
                assert scores[Score.INFLUENCE][1] == pytest.approx(c[1] * grad_term[1] / sur.s[1], rel=rtol)
                assert scores[Score.INFORMATION_LOSS][4:].min() > 0


def test_zero_vectors_of_saturated_examples(rtol):
    """The stored vectors themselves: zero for beta = 0 (information scores) and for phi = 0 (all)."""
    rng = np.random.default_rng(4)
    phi = rng.standard_normal((6, 5))
    phi[2] = 0.0
    beta = np.array([0.2, 0.0, 0.1, 1e-300, 0.2, 0.1])
    sur = fit_surrogate(phi, beta, rng.normal(size=6), prior_precision=2.0)
    for score in Score:
        z = sur.score_vectors(score)
        np.testing.assert_array_equal(z[2], np.zeros(5), err_msg=score.value)
        if score in (Score.INFORMATION_LOSS, Score.INFORMATION_GAIN):
            np.testing.assert_array_equal(z[1], np.zeros(5), err_msg=score.value)
            assert np.abs(z[3]).max() < 1e-140
    ig = sur.score_vectors(Score.INFORMATION_GAIN)
    # |z_i|^2 = beta |phi|^2 / (beta |phi|^2 + tau) < 1: the variance correction of DESIGN.md 1.3
    norm2 = beta * (phi**2).sum(axis=1)
    np.testing.assert_allclose((ig**2).sum(axis=1), norm2 / (norm2 + 2.0), rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------- signs and prior


def test_signed_score_carries_the_sign_of_influence(problem):
    sur = problem.surrogate
    scores = scores_of(sur, problem.phi, problem.queries[0])
    sign = np.sign(scores[Score.INFLUENCE])
    assert np.any(sign > 0) and np.any(sign < 0)
    for score in Score:
        got = signed_score(score, scores)
        if score.signed:
            np.testing.assert_array_equal(got, scores[score])
        else:
            np.testing.assert_array_equal(got, sign * scores[score])
            np.testing.assert_array_equal(np.abs(got), scores[score])
    # flipping every gradient term flips influence, hence the direction of the information scores
    flipped = fit_surrogate(problem.phi, problem.beta, -problem.grad_term, prior_precision=problem.tau)
    flipped_scores = scores_of(flipped, problem.phi, problem.queries[0])
    for score in (Score.INFORMATION_LOSS, Score.INFORMATION_GAIN):
        np.testing.assert_allclose(
            signed_score(score, flipped_scores), -signed_score(score, scores), rtol=1e-12
        )


def test_default_tau_is_the_mean_eigenvalue(problem, rtol):
    data_term = problem.phi.T @ np.diag(problem.beta) @ problem.phi
    want = np.trace(data_term) / problem.k
    assert want == pytest.approx(np.linalg.eigvalsh(data_term).mean(), rel=1e-10)
    assert default_prior_precision(problem.phi, problem.beta) == pytest.approx(want, rel=rtol)
    sur = fit_surrogate(problem.phi, problem.beta, problem.grad_term)
    assert sur.prior_precision == pytest.approx(want, rel=rtol)
    explicit = fit_surrogate(problem.phi, problem.beta, problem.grad_term, prior_precision=0.37)
    assert explicit.prior_precision == 0.37


def test_default_tau_refuses_an_empty_data_term():
    phi = np.ones((5, 3))
    with pytest.raises(ValueError, match="prior precision"):
        fit_surrogate(phi, np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError):
        fit_surrogate(np.zeros((5, 3)), np.ones(5), np.zeros(5))


@pytest.mark.parametrize(
    ("phi", "beta", "grad", "tau"),
    [
        (np.ones((4, 3)), np.ones(3), np.zeros(4), 1.0),  # beta of the wrong length
        (np.ones((4, 3)), -np.ones(4), np.zeros(4), 1.0),  # negative beta
        (np.full((4, 3), np.nan), np.ones(4), np.zeros(4), 1.0),  # NaN features
        (np.ones((4, 3)), np.ones(4), np.zeros(4), 0.0),  # tau = 0
        (np.ones(4), np.ones(4), np.zeros(4), 1.0),  # phi not a matrix
    ],
)
def test_fit_surrogate_rejects_bad_input(phi, beta, grad, tau):
    with pytest.raises(ValueError):
        fit_surrogate(phi, beta, grad, prior_precision=tau)


def test_query_terms_rejects_bad_queries(problem):
    sur = problem.surrogate
    with pytest.raises(InvalidQueryError, match="shape"):
        sur.query_terms(np.ones(problem.k + 1))
    bad = np.ones(problem.k)
    bad[0] = np.nan
    with pytest.raises(InvalidQueryError, match="finite"):
        sur.query_terms(bad)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_an_examples_scores_do_not_depend_on_the_rows_scored_with_it(dtype: type) -> None:
    """Every score of a row has the same bits whether it is scored alone, in any subset, or with all rows
    (a deepening or a batch reranks other row sets than a single query: their answers must agree)."""
    rng = np.random.default_rng(3)
    n, k = 3000, 506
    phi = rng.standard_normal((n, k)).astype(dtype)
    sur = fit_surrogate(phi, rng.uniform(0.05, 0.25, n), rng.normal(size=n), prior_precision=2.0)
    terms = sur.query_terms(rng.standard_normal(k))
    every = sur.scores(terms)
    for m in (1, 2, 3, 17, 250, 1001):
        rows = np.sort(rng.choice(n, size=m, replace=False))
        some = sur.scores(terms, rows)
        for score in Score:
            assert np.array_equal(some[score], every[score][rows]), (m, score)
