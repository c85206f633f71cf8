"""Joint subset scores and greedy selection (DESIGN.md 1.4) against brute-force refits (DESIGN.md 1.6).

The brute-force joint information loss refits the surrogate without the whole subset S (an explicit solve with
``A - Phi_S^T B_S Phi_S``); the brute-force joint information gain fits the prior plus S alone
(``tau I + Phi_S^T B_S Phi_S``). The naive greedy below recomputes that brute force from scratch for every
candidate at every step; the library's greedy, which grows a Cholesky factor, must make the same choices.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.enums import Objective, Score
from indexer.gp.subset import joint_information_gain, joint_information_loss
from indexer.gp.surrogate import Surrogate, fit_surrogate

OBJECTIVES = (Objective.INFORMATION_LOSS, Objective.INFORMATION_GAIN)


def brute_joint(
    objective: Objective, phi: np.ndarray, beta: np.ndarray, tau: float, phi_q: np.ndarray, subset: list[int]
) -> float:
    """Joint score of ``subset`` (positions into phi/beta) by an explicit refit, in nats."""
    k = phi.shape[1]
    idx = np.asarray(subset, dtype=int)
    data_s = phi[idx].T @ np.diag(beta[idx]) @ phi[idx]
    if objective is Objective.INFORMATION_LOSS:
        a = tau * np.eye(k) + phi.T @ np.diag(beta) @ phi
        v_q = phi_q @ np.linalg.solve(a, phi_q)
        v_without = phi_q @ np.linalg.solve(a - data_s, phi_q)
        return float(0.5 * np.log(v_without / v_q))
    prior_var = phi_q @ phi_q / tau
    post_var = phi_q @ np.linalg.solve(tau * np.eye(k) + data_s, phi_q)
    return float(0.5 * np.log(prior_var / post_var))


def library_joint(objective: Objective, sur: Surrogate, phi: np.ndarray, phi_q: np.ndarray, subset) -> float:
    idx = np.asarray(subset, dtype=int)
    terms = sur.query_terms(phi_q)
    if objective is Objective.INFORMATION_LOSS:
        return joint_information_loss(terms, sur.whiten(idx), sur.beta[idx])
    return joint_information_gain(terms, phi[idx], sur.beta[idx], sur.prior_precision)


def naive_greedy(
    objective: Objective,
    phi: np.ndarray,
    beta: np.ndarray,
    tau: float,
    phi_q: np.ndarray,
    size: int,
    pool: np.ndarray | None = None,
) -> tuple[list[int], list[float], list[float]]:
    """Greedy by brute force: every candidate's joint score refitted from scratch at every step.

    ``phi`` and ``beta`` are the whole training set (the surrogate is always fitted on all of it); ``pool``
    holds the candidates' training positions (default: everyone). Returns positions in the pool.
    """
    pool = np.arange(len(beta)) if pool is None else np.asarray(pool)
    chosen: list[int] = []
    gains: list[float] = []
    joints: list[float] = []
    current = 0.0
    for _ in range(size):
        best, best_value = -1, -np.inf
        for j in range(len(pool)):
            if j in chosen:
                continue
            value = brute_joint(objective, phi, beta, tau, phi_q, list(pool[[*chosen, j]]))
            if value > best_value:  # strict: ties go to the lowest position, as in the library
                best, best_value = j, value
        chosen.append(best)
        gains.append(best_value - current)
        joints.append(best_value)
        current = best_value
    return chosen, gains, joints


# ----------------------------------------------------------------------------------- joint scores


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.value)
def test_joint_scores_match_brute_force_refit(problem, objective, rtol, atol_log_ratio):
    rng = np.random.default_rng(problem.seed + 1000)
    sur = problem.surrogate
    largest = 0.0
    for phi_q in problem.queries:
        for size in range(1, 7):
            for _ in range(4):
                subset = list(rng.choice(problem.n, size=size, replace=False))
                want = brute_joint(objective, problem.phi, problem.beta, problem.tau, phi_q, subset)
                got = library_joint(objective, sur, problem.phi, phi_q, subset)
                assert got == pytest.approx(want, rel=rtol, abs=atol_log_ratio), (size, subset)
                largest = max(largest, got)
    assert largest > 0.02  # the subsets do move the query


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.value)
def test_joint_score_dispatches_to_the_named_objective(problem, objective, rtol):
    sur = problem.surrogate
    terms = sur.query_terms(problem.queries[0])
    idx = np.array([0, 3, 5, 8])
    want = library_joint(objective, sur, problem.phi, problem.queries[0], idx)
    for name in (objective, objective.value):
        got = sur.joint_score(name, terms, idx)
        assert got == pytest.approx(want, rel=rtol)
    empty = sur.joint_score(objective, terms, np.arange(0))
    assert empty == 0.0


def test_joint_score_rejects_an_unknown_objective(problem):
    sur = problem.surrogate
    terms = sur.query_terms(problem.queries[0])
    with pytest.raises(ValueError, match="information_loss"):
        sur.joint_score("entropy", terms, np.arange(2))


def test_size_one_joint_equals_single_example_score(problem, rtol):
    sur = problem.surrogate
    for phi_q in problem.queries:
        terms = sur.query_terms(phi_q)
        single = sur.scores(terms)
        for i in range(problem.n):
            il = joint_information_loss(terms, sur.whiten(slice(i, i + 1)), sur.beta[i : i + 1])
            ig = joint_information_gain(
                terms, problem.phi[i : i + 1], sur.beta[i : i + 1], sur.prior_precision
            )
            assert il == pytest.approx(single[Score.INFORMATION_LOSS][i], rel=rtol, abs=1e-300), i
            assert ig == pytest.approx(single[Score.INFORMATION_GAIN][i], rel=rtol, abs=1e-300), i


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.value)
def test_zero_query_has_zero_joint_scores(problem, objective):
    sur = problem.surrogate
    terms = sur.query_terms(np.zeros(problem.k))
    idx = np.arange(5)
    got = sur.joint_score(objective, terms, idx)
    assert got == 0.0
    result = sur.greedy_subset(objective, terms, np.arange(len(sur.beta)), 3)
    np.testing.assert_array_equal(result.joint, np.zeros(3))
    assert np.all(np.isfinite(result.marginal_gains))


# ----------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.value)
def test_greedy_matches_naive_brute_force_greedy(problem, objective, rtol, atol_log_ratio):
    sur = problem.surrogate
    size = 6
    for phi_q in problem.queries[:2]:
        terms = sur.query_terms(phi_q)
        result = sur.greedy_subset(objective, terms, np.arange(len(sur.beta)), size)
        picks, gains, joints = naive_greedy(objective, problem.phi, problem.beta, problem.tau, phi_q, size)
        assert result.indices.dtype == np.int64
        assert result.indices.shape == result.marginal_gains.shape == result.joint.shape == (size,)
        np.testing.assert_array_equal(result.indices, picks)
        np.testing.assert_allclose(result.marginal_gains, gains, rtol=rtol, atol=atol_log_ratio)
        np.testing.assert_allclose(result.joint, joints, rtol=rtol, atol=atol_log_ratio)
        np.testing.assert_allclose(result.joint, np.cumsum(result.marginal_gains), rtol=1e-12, atol=1e-15)
        assert len(set(result.indices.tolist())) == size
        assert np.all(result.marginal_gains > 0)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.value)
def test_greedy_on_a_candidate_pool(problem, objective, rtol, atol_log_ratio):
    """A retrieval pool (a subset of the training set, in arbitrary order): indices are pool positions and
    the whole pool may be chosen."""
    rng = np.random.default_rng(problem.seed + 2000)
    pool = rng.permutation(problem.n)[:12]
    sur = problem.surrogate
    phi_q = problem.queries[2]
    terms = sur.query_terms(phi_q)
    result = sur.greedy_subset(objective, terms, pool, len(pool))
    picks, gains, _ = naive_greedy(objective, problem.phi, problem.beta, problem.tau, phi_q, len(pool), pool)
    np.testing.assert_array_equal(result.indices, picks)
    np.testing.assert_allclose(result.marginal_gains, gains, rtol=rtol, atol=atol_log_ratio)
    np.testing.assert_array_equal(np.sort(result.indices), np.arange(len(pool)))
    want_all = brute_joint(objective, problem.phi, problem.beta, problem.tau, phi_q, list(pool))
    assert result.joint[-1] == pytest.approx(want_all, rel=rtol, abs=atol_log_ratio)


@pytest.mark.parametrize("size", [0, -1, 13])
def test_greedy_size_out_of_range_raises(problem, size):
    sur = problem.surrogate
    terms = sur.query_terms(problem.queries[0])
    pool = np.arange(12)
    with pytest.raises(ValueError, match="size"):
        sur.greedy_subset(Objective.INFORMATION_GAIN, terms, pool, size)


def test_greedy_rejects_an_unknown_objective(problem):
    sur = problem.surrogate
    terms = sur.query_terms(problem.queries[0])
    with pytest.raises(ValueError, match="Objective"):
        sur.greedy_subset("influence", terms, np.arange(len(sur.beta)), 2)


# ------------------------------------------------------------------------------ diversity (DESIGN 1.4)


def _pool_with_copies(n_copies: int, seed: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """A pool in k = 8 where the query direction e1 is explained by ``n_copies`` identical examples.

    Rows 0..n_copies-1: phi = 3 e1, beta = 0.25 (the copies). Row n_copies: phi = e2, beta = 0.25 (a distinct
    example, along the query's secondary direction). The rest: random features in e3..e8 plus a small e1
    component, so they are not orthogonal to the query either.
    """
    rng = np.random.default_rng(seed)
    k, n_rest = 8, 20
    copies = np.zeros((n_copies, k))
    copies[:, 0] = 3.0
    distinct = np.zeros((1, k))
    distinct[0, 1] = 1.0
    rest = np.zeros((n_rest, k))
    rest[:, 2:] = rng.standard_normal((n_rest, k - 2))
    rest[:, 0] = rng.uniform(-0.05, 0.05, size=n_rest)
    phi = np.concatenate([copies, distinct, rest])
    beta = np.concatenate([np.full(n_copies, 0.25), [0.25], rng.uniform(0.05, 0.25, size=n_rest)])
    phi_q = np.zeros(k)
    phi_q[0] = 1.0
    phi_q[1] = 0.5
    return phi, beta, 0.05, phi_q


@pytest.mark.parametrize("n_copies", [2, 3])
def test_greedy_information_gain_prefers_a_distinct_example_to_a_second_copy(n_copies):
    """IG's marginal gain of a second identical copy shrinks, so greedy takes a distinct example first even
    though that example's single score is lower than the copy's: the greedy set is diverse, while a top-k by
    single score would return the copies."""
    phi, beta, tau, phi_q = _pool_with_copies(n_copies, seed=n_copies)
    distinct = n_copies
    sur = fit_surrogate(phi, beta, np.ones(len(beta)), prior_precision=tau)
    terms = sur.query_terms(phi_q)
    single = sur.scores(terms)[Score.INFORMATION_GAIN]
    np.testing.assert_array_equal(single[:n_copies], np.full(n_copies, single[0]))
    assert single[distinct] < single[1]  # meaningful: by single score, the second copy beats the distinct one
    assert np.argsort(-single, kind="stable")[:2].tolist() == [0, 1]

    result = sur.greedy_subset(Objective.INFORMATION_GAIN, terms, np.arange(len(sur.beta)), n_copies + 1)
    order = result.indices.tolist()
    assert order[0] == 0
    assert order[1] == distinct
    later_copies = [order.index(c) for c in range(1, n_copies) if c in order]
    assert all(position > order.index(distinct) for position in later_copies)
    # the copy's marginal gain after its twin is far below its single score
    with_twin = brute_joint(Objective.INFORMATION_GAIN, phi, beta, tau, phi_q, [0, 1])
    assert with_twin - single[0] < 0.25 * single[1]
    assert result.marginal_gains[1] > with_twin - single[0]


@pytest.mark.parametrize("n_copies", [2, 3])
def test_greedy_information_loss_finds_a_group_of_copies(n_copies, rtol, atol_log_ratio):
    """The query is explained only by a feature shared by identical copies: removing one copy costs little
    (its twins cover for it) but removing all of them costs much. Greedy IL's marginal gains grow as it takes
    the copies one after another, and it returns the whole group."""
    rng = np.random.default_rng(40 + n_copies)
    k, n_rest = 8, 25
    phi = np.zeros((n_copies + n_rest, k))
    phi[:n_copies, 0] = 4.0  # the copies: the only examples with a large e1 component
    phi[n_copies:, 1:] = rng.standard_normal((n_rest, k - 1))
    phi[n_copies:, 0] = rng.uniform(-0.05, 0.05, size=n_rest)
    beta = np.concatenate([np.full(n_copies, 0.25), rng.uniform(0.1, 0.25, size=n_rest)])
    tau = 0.05
    phi_q = np.zeros(k)
    phi_q[0] = 1.0
    sur = fit_surrogate(phi, beta, np.ones(len(beta)), prior_precision=tau)
    terms = sur.query_terms(phi_q)
    single = sur.scores(terms)[Score.INFORMATION_LOSS]
    group = list(range(n_copies))
    group_joint = brute_joint(Objective.INFORMATION_LOSS, phi, beta, tau, phi_q, group)
    # each copy alone: small; the group: large, far more than the sum of its members' single scores
    assert np.all(single[:n_copies] < 0.4)
    assert group_joint > 2.5
    assert group_joint > 3 * single[:n_copies].sum()

    result = sur.greedy_subset(Objective.INFORMATION_LOSS, terms, np.arange(len(sur.beta)), n_copies)
    assert sorted(result.indices.tolist()) == group
    assert result.joint[-1] == pytest.approx(group_joint, rel=rtol, abs=atol_log_ratio)
    assert np.all(np.diff(result.marginal_gains) > 0)  # the copies cover for each other
    assert result.marginal_gains[-1] > 2 * single[:n_copies].max()
    # no other subset of this size comes close
    for _ in range(50):
        other = list(rng.choice(len(beta), size=n_copies, replace=False))
        if sorted(other) != group:
            assert brute_joint(Objective.INFORMATION_LOSS, phi, beta, tau, phi_q, other) < 0.5 * group_joint
