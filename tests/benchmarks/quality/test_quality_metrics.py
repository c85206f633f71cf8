"""Quality metrics beyond the LDS, each checked against a brute-force reference or hand-built values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.quality.metrics import (
    Cost,
    CounterfactualSummary,
    counterfactual_summary,
    found_in_top,
    k_center_greedy,
    margins,
    mean_near_duplicate_rate,
    mean_reciprocal_rank,
    measure_cost,
    near_duplicate_rate,
    predictive_entropy,
    recall_at,
    retrieval_ranks,
    roc_auc,
)

RTOL, ATOL = 1e-10, 1e-12  # float64 against a float64 reference


# ---- entropy and margins -----------------------------------------------------------------------


def test_entropy_uniform_is_log_c_and_one_hot_is_zero() -> None:
    h = predictive_entropy(np.full((3, 4, 7), 2.5))
    assert h.shape == (3, 4) and h.dtype == np.float64
    np.testing.assert_allclose(h, math.log(7), rtol=RTOL, atol=ATOL)
    one_hot = np.array([[1000.0, 0.0, 0.0, 0.0], [0.0, 0.0, -5.0, 800.0]])
    np.testing.assert_allclose(predictive_entropy(one_hot), 0.0, atol=1e-12)


def test_entropy_matches_direct_formula_and_is_shift_invariant() -> None:
    z = np.random.default_rng(0).normal(size=(5, 6))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(predictive_entropy(z), -(p * np.log(p)).sum(-1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(predictive_entropy(z + 1e4), predictive_entropy(z), rtol=1e-8)


def test_margins_match_a_loop() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5, 4)) * 3
    labels = rng.integers(0, 4, size=5)
    got = margins(logits, labels)
    assert got.shape == (2, 3, 5) and got.dtype == np.float64
    want = np.empty((2, 3, 5))
    for a in range(2):
        for b in range(3):
            for i in range(5):
                row, y = logits[a, b, i], labels[i]
                others = [row[c] for c in range(4) if c != y]
                want[a, b, i] = row[y] - math.log(sum(math.exp(v) for v in others))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_margins_two_classes_is_logit_difference() -> None:
    z = np.array([[3.0, 1.0], [0.5, 2.0]])
    np.testing.assert_allclose(margins(z, np.array([0, 0])), [2.0, -1.5], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 1)), np.zeros(3, dtype=int), "C >= 2"),
        (np.zeros((3, 4)), np.zeros(2, dtype=int), r"labels must have shape \(3,\)"),
        (np.zeros((3, 4)), np.array([0, 1, 4]), r"labels must lie in \[0, 4\)"),
        (np.zeros((3, 4)), np.zeros(3), "integer"),
        (np.array([[np.nan, 0.0]]), np.zeros(1, dtype=int), "finite"),
        (np.zeros(4), np.zeros(1, dtype=int), "at least 2 dimension"),
    ],
)
def test_margins_reject_bad_input(logits: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        margins(logits, labels)


def test_entropy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 1 dimension"):
        predictive_entropy(np.array(1.0))
    with pytest.raises(ValueError, match="real numeric"):
        predictive_entropy(np.array(["a", "b"]))


# ---- counterfactual removal --------------------------------------------------------------------


def test_counterfactual_summary_on_hand_built_logits() -> None:
    # Two seeds, two queries, two classes: margin = z_y - z_other, entropy of softmax([a, 0]).
    labels = np.array([0, 1])
    base = np.array(
        [
            [[2.0, 0.0], [0.0, 3.0]],  # seed 0: margins 2, 3
            [[4.0, 0.0], [0.0, 1.0]],  # seed 1: margins 4, 1
        ]
    )
    removed = np.array(
        [
            [[0.0, 1.0], [0.0, 3.0]],  # margins -1 (flip), 3 (no change)
            [[1.0, 0.0], [0.0, 0.0]],  # margins 1, 0 (tie: argmax 0, so a flip from class 1)
        ]
    )
    got = counterfactual_summary(base, removed, labels)
    assert isinstance(got, CounterfactualSummary) and got.n == 2
    drops = np.array([[3.0, 0.0], [3.0, 1.0]])  # (S, n_q)
    per_query = drops.mean(0)  # [3, 0.5]
    assert got.margin_drop == pytest.approx(drops.mean())
    assert got.margin_drop_se == pytest.approx(np.std(per_query, ddof=1) / math.sqrt(2))
    assert got.margin_drop_se == pytest.approx(1.25)
    assert got.flip_fraction == pytest.approx(0.5)

    def h2(a: float) -> float:  # entropy of softmax([a, 0]) in nats
        p = 1 / (1 + math.exp(-a))
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    d_h = np.array([[h2(1) - h2(2), 0.0], [h2(1) - h2(4), h2(0) - h2(1)]])
    assert got.entropy_change == pytest.approx(d_h.mean())
    assert got.entropy_change_se == pytest.approx(np.std(d_h.mean(0), ddof=1) / math.sqrt(2))


def test_counterfactual_summary_identical_models_and_one_query() -> None:
    base = np.random.default_rng(2).normal(size=(3, 1, 5))
    got = counterfactual_summary(base, base.copy(), np.array([2]))
    assert got.margin_drop == 0.0 and got.flip_fraction == 0.0 and got.entropy_change == 0.0
    assert math.isnan(got.margin_drop_se) and math.isnan(got.entropy_change_se) and got.n == 1


def test_counterfactual_summary_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(S, n_q, C\) of one shape"):
        counterfactual_summary(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"\(S, n_q, C\) of one shape"):
        counterfactual_summary(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros(3, dtype=int))


# ---- retrieval ---------------------------------------------------------------------------------


def _ranks_by_loop(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    out = np.empty(len(targets), dtype=np.int64)
    for q, t in enumerate(targets):
        st = scores[q, t]
        if np.isnan(st):
            out[q] = scores.shape[1]
            continue
        out[q] = 1 + sum(1 for j in range(scores.shape[1]) if j != t and scores[q, j] >= st)
    return out


def test_retrieval_ranks_match_a_loop_with_ties_and_nans() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(40, 30)).astype(np.float64)  # many ties
    scores[rng.random(scores.shape) < 0.1] = np.nan
    targets = rng.integers(0, 30, size=40)
    got = retrieval_ranks(scores, targets)
    assert got.shape == (40,) and got.dtype == np.int64
    np.testing.assert_array_equal(got, _ranks_by_loop(scores, targets))
    assert np.isnan(scores[np.arange(40), targets]).any()  # the NaN-target branch is exercised


def test_retrieval_ranks_small_cases() -> None:
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [np.nan, 2.0, 1.0], [np.nan, 0.0, 0.0]])
    np.testing.assert_array_equal(retrieval_ranks(scores, np.array([1, 0, 1, 0])), [1, 3, 1, 3])
    np.testing.assert_array_equal(retrieval_ranks(np.array([[5, 7]]), np.array([0])), [2])  # int scores


def test_retrieval_ranks_reject_bad_targets() -> None:
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        retrieval_ranks(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        retrieval_ranks(np.zeros((2, 3)), np.array([0]))


def test_recall_and_mrr_on_known_ranks() -> None:
    ranks = np.array([1, 2, 5, 10, 1], dtype=np.int64)
    assert recall_at(ranks, 1) == pytest.approx(0.4)
    assert recall_at(ranks, 5) == pytest.approx(0.8)
    assert recall_at(ranks, 10) == 1.0
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 0.5 + 0.2 + 0.1 + 1) / 5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        recall_at(ranks, 0)
    with pytest.raises(ValueError, match="1-based"):
        mean_reciprocal_rank(np.array([0, 1]))
    with pytest.raises(ValueError, match="non-empty"):
        mean_reciprocal_rank(np.array([], dtype=np.int64))


# ---- detection ---------------------------------------------------------------------------------


def _auc_by_pairs(scores: np.ndarray, positives: np.ndarray) -> float:
    pos, neg = scores[positives], scores[~positives]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positives = rng.random(60) < 0.3
    scores = rng.integers(0, 6, size=60) + positives * rng.integers(0, 3, size=60)  # int scores: ties
    assert roc_auc(scores, positives) == pytest.approx(_auc_by_pairs(scores, positives), abs=1e-12)


def test_roc_auc_perfect_constant_and_errors() -> None:
    positives = np.array([True, False, True, False, False])
    assert roc_auc(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), positives) == 1.0
    assert roc_auc(np.array([0.0, 1.0, 0.0, 2.0, 3.0]), positives) == 0.0
    assert roc_auc(np.full(5, 7.0), positives) == 0.5
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        roc_auc(np.arange(3.0), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        roc_auc(np.arange(3.0), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="bool array"):
        roc_auc(np.arange(3.0), np.array([1, 0, 1]))


def test_found_in_top_is_recall_of_the_top_fraction() -> None:
    scores = np.arange(30.0)[::-1]  # example i has the (i+1)-th highest score
    positives = np.zeros(30, dtype=bool)
    positives[[0, 2, 10, 29]] = True
    # 0.1 * 30 = 3.0000000000000004 in floating point: must inspect 3 examples, not 4.
    assert found_in_top(scores, positives, fraction=0.1) == pytest.approx(2 / 4)
    assert found_in_top(scores, positives, fraction=0.35) == pytest.approx(3 / 4)  # ceil(10.5) = 11
    assert found_in_top(scores, positives, fraction=1.0) == 1.0


def test_found_in_top_breaks_ties_by_index_and_puts_nan_last() -> None:
    scores = np.array([1.0, 1.0, 1.0, 1.0, np.nan])
    positives = np.array([False, True, False, False, True])
    assert found_in_top(scores, positives, fraction=0.4) == pytest.approx(0.5)  # top 2 = indices 0, 1
    assert found_in_top(scores, positives, fraction=0.2) == 0.0  # top 1 = index 0
    assert found_in_top(np.array([np.nan, 0.0]), np.array([True, False]), fraction=0.5) == 0.0
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        found_in_top(scores, positives, fraction=0.0)
    with pytest.raises(ValueError, match="at least one positive"):
        found_in_top(scores, np.zeros(5, dtype=bool))


# ---- diversity ---------------------------------------------------------------------------------


def _k_center_brute(features: np.ndarray, m: int, seed: int) -> list[int]:
    d = np.linalg.norm(features[:, None, :] - features[None, :, :], axis=-1)  # (n, n)
    picks = [int(np.random.default_rng(seed).integers(len(features)))]
    while len(picks) < m:
        nearest = d[:, picks].min(1)
        nearest[picks] = -1.0
        picks.append(int(np.argmax(nearest)))
    return picks


@pytest.mark.parametrize(("n", "d", "m", "seed"), [(50, 3, 10, 0), (200, 8, 40, 7), (30, 2, 30, 3)])
def test_k_center_greedy_matches_brute_force(n: int, d: int, m: int, seed: int) -> None:
    x = np.random.default_rng(seed + 100).normal(size=(n, d)).astype(np.float32)
    got = k_center_greedy(x, m, seed=seed)
    assert got.shape == (m,) and got.dtype == np.int64
    assert len(set(got.tolist())) == m
    assert got.tolist() == _k_center_brute(x.astype(np.float64), m, seed)


def test_k_center_greedy_spans_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.quality.metrics as metrics

    monkeypatch.setattr(metrics, "_KCENTER_BLOCK", 7)  # several blocks, last one partial
    x = np.random.default_rng(5).normal(size=(45, 4))
    assert k_center_greedy(x, 12, seed=1).tolist() == _k_center_brute(x, 12, 1)


def test_k_center_greedy_picks_the_three_clusters_first() -> None:
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    labels = np.repeat(np.arange(3), 20)
    x = centres[labels] + rng.normal(scale=0.5, size=(60, 2))
    got = k_center_greedy(x, 3, seed=0)
    assert sorted(labels[got].tolist()) == [0, 1, 2]


def test_k_center_greedy_with_duplicates_stays_distinct_and_checks_m() -> None:
    x = np.zeros((5, 2))
    got = k_center_greedy(x, 5, seed=0)
    assert sorted(got.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"m must be an integer in \[1, 5\]"):
        k_center_greedy(x, 6)
    with pytest.raises(ValueError, match=r"features must be \(n, d\)"):
        k_center_greedy(np.zeros(5), 1)


def test_near_duplicate_rate_on_constructed_vectors() -> None:
    features = np.array(
        [
            [1.0, 0.0, 0.0],
            [2.0, 0.01, 0.0],  # near duplicate of 0 (cosine ~ 1)
            [0.0, 1.0, 0.0],  # orthogonal to 0
            [0.0, 0.0, 0.0],  # zero vector: cosine 0 with everything, itself included
            [0.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0],
        ]
    )
    assert near_duplicate_rate(features, np.array([0, 1])) == 1.0
    assert near_duplicate_rate(features, np.array([0, 1, 2])) == pytest.approx(1 / 3)
    assert near_duplicate_rate(features, np.array([0, 1, 2, 5])) == pytest.approx(1 / 6)
    assert near_duplicate_rate(features, np.array([3, 4])) == 0.0
    assert near_duplicate_rate(features, np.array([0, 5]), threshold=-1.5) == 1.0
    assert math.isnan(near_duplicate_rate(features, np.array([2])))
    assert math.isnan(near_duplicate_rate(features, np.array([], dtype=np.int64)))
    with pytest.raises(ValueError, match="distinct"):
        near_duplicate_rate(features, np.array([0, 0]))
    with pytest.raises(ValueError, match=r"members must lie in \[0, 6\)"):
        near_duplicate_rate(features, np.array([0, 6]))


def test_near_duplicate_rate_matches_a_loop() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, 3))
    members = rng.choice(20, size=9, replace=False)
    pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
    cos = [x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b]) for a, b in pairs]
    want = np.mean([c > 0.3 for c in cos])
    assert near_duplicate_rate(x, members, threshold=0.3) == pytest.approx(want)


def test_mean_near_duplicate_rate_skips_small_sets() -> None:
    features = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.0, 2.0]])
    sets = [np.array([0, 1]), np.array([0, 2]), np.array([3]), np.array([1, 2, 3])]
    want = np.mean([1.0, 0.0, 1 / 3])
    assert mean_near_duplicate_rate(features, sets, threshold=0.95) == pytest.approx(want)
    assert math.isnan(mean_near_duplicate_rate(features, [np.array([0])], threshold=0.95))


# ---- cost --------------------------------------------------------------------------------------


def test_measure_cost_sees_a_200_mb_allocation() -> None:
    with measure_cost() as cost:
        assert isinstance(cost, Cost) and cost.wall_s == 0.0
        block = np.ones(25_000_000)  # 200 MB of float64, every page written
        block.sum()
    del block
    assert cost.wall_s > 0
    assert cost.peak_rss_bytes >= 150e6


def test_measure_cost_stops_its_sampler_when_the_body_raises() -> None:
    import threading

    def samplers() -> int:
        return sum(t.name == "measure_cost-rss" for t in threading.enumerate())

    before = samplers()
    with pytest.raises(RuntimeError, match="boom"), measure_cost() as cost:
        raise RuntimeError("boom")
    assert cost.wall_s > 0 and cost.peak_rss_bytes >= 0
    assert samplers() == before


def test_measure_cost_falls_back_to_getrusage_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.quality.metrics as metrics

    monkeypatch.setattr(metrics, "_STATM", "/nonexistent/statm")
    with measure_cost() as cost:
        np.ones(1_000_000).sum()
    # ru_maxrss is a lifetime high-water mark, so the growth it reports may be 0 here.
    assert cost.wall_s > 0 and cost.peak_rss_bytes >= 0
