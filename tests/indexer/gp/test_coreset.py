"""Coreset selection against a naive greedy that recomputes the summed joint information gain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.gp.coreset import coreset_information_gain, summed_information_gain
from indexer.gp.subset import joint_information_gain
from indexer.gp.surrogate import fit_surrogate
from indexer.store.reader import load_index


def problem(seed: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, k = 30, 6
    phi = rng.normal(size=(n, k))
    phi[3] = 0.0  # a zero feature
    beta = rng.uniform(0.01, 0.25, size=n)
    beta[5] = 1e-12  # a saturated example
    queries = rng.normal(size=(7, k))
    return phi, beta, float(rng.uniform(0.5, 3.0)), queries


@pytest.mark.parametrize("seed", range(4))
def test_summed_gain_equals_sum_of_joint_gains(seed: int) -> None:
    phi, beta, tau, queries = problem(seed)
    s = fit_surrogate(phi, beta, np.zeros(len(beta)), prior_precision=tau)
    subset = [0, 4, 9, 17]
    want = sum(joint_information_gain(s.query_terms(q), phi[subset], beta[subset], tau) for q in queries)
    got = summed_information_gain(phi[subset], beta[subset], tau, queries)
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_greedy_equals_naive_greedy(seed: int) -> None:
    phi, beta, tau, queries = problem(seed)
    size = 8
    chosen: list[int] = []
    naive_values = []
    for _ in range(size):
        best, best_value = -1, -np.inf
        for j in range(len(beta)):
            if j in chosen:
                continue
            value = summed_information_gain(phi[chosen + [j]], beta[chosen + [j]], tau, queries)
            if value > best_value + 1e-12:
                best, best_value = j, value
        chosen.append(best)
        naive_values.append(best_value)
    result = coreset_information_gain(phi, beta, tau, queries, size)
    assert result.indices.tolist() == chosen
    np.testing.assert_allclose(result.objective, naive_values, rtol=1e-9)
    np.testing.assert_allclose(np.cumsum(result.marginal_gains), result.objective, rtol=1e-12)
    assert np.all(result.marginal_gains >= -1e-12)


def test_duplicates_are_not_picked_twice_before_distinct_examples() -> None:
    """A copy of a chosen example adds little information: greedy prefers a distinct example."""
    phi = np.array([[3.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]])  # rows 0 and 1 are copies
    beta = np.full(4, 0.5)
    queries = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    result = coreset_information_gain(phi, beta, 1.0, queries, 3)
    # the copy would add 0.30 nats, the distinct row 2 adds 0.55 nats (computed by hand with tau = 1)
    assert result.indices.tolist()[:2] == [0, 2]
    assert result.marginal_gains[1] == pytest.approx(-0.5 * np.log(1 - 2 / 3), rel=1e-9)


def test_bad_arguments() -> None:
    phi, beta, tau, queries = problem(0)
    with pytest.raises(ValueError, match="size must be between 1"):
        coreset_information_gain(phi, beta, tau, queries, 0)
    with pytest.raises(ValueError, match="query_phi must be"):
        coreset_information_gain(phi, beta, tau, queries[:, :3], 2)


def test_cli_coreset_equals_the_library(index_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "coreset.json"
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    subprocess.run(
        [cli, "coreset", "--index", str(index_root / "digits"), "--size", "4", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    data = load_index(index_root / "digits")
    want = coreset_information_gain(
        data.phi, data.surrogate.beta, data.surrogate.prior_precision, data.query_phi, 4
    )
    assert report["ids"] == want.indices.tolist() and report["n_queries"] == 80
    np.testing.assert_allclose(report["objective_nats"], want.objective, rtol=1e-12)
