"""The seeded, blockwise random projection R of DESIGN.md 1.1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexer.enums import Distribution
from indexer.features.projection import PROJECTION_BLOCK_ROWS, DenseProjection

KINDS = (Distribution.GAUSSIAN, Distribution.RADEMACHER)
N_PARAMS = 10_000  # not a multiple of the block size: 2 full blocks of 4096 and a partial one


def _gradients(n: int, n_params: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n_params)).astype(np.float32)


def test_block_layout():
    assert PROJECTION_BLOCK_ROWS == 4096
    proj = DenseProjection(N_PARAMS, 16, seed=1)
    assert proj.n_blocks == 3
    slices = [rows for rows, _ in proj.blocks()]
    assert slices == [slice(0, 4096), slice(4096, 8192), slice(8192, N_PARAMS)]
    shapes = [block.shape for _, block in proj.blocks()]
    assert shapes == [(16, 4096), (16, 4096), (16, N_PARAMS - 8192)]
    assert all(block.dtype == np.float32 for _, block in proj.blocks())
    assert proj.matrix().shape == (N_PARAMS, 16)
    assert proj.matrix().dtype == np.float32


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_same_seed_gives_identical_features(kind):
    g = _gradients(5, N_PARAMS)
    a = DenseProjection(N_PARAMS, 32, seed=7, distribution=kind).project(g)
    b = DenseProjection(N_PARAMS, 32, seed=7, distribution=kind.value).project(g)
    assert a.dtype == np.float32 and a.shape == (5, 32)
    np.testing.assert_array_equal(a, b)  # bitwise
    np.testing.assert_array_equal(
        DenseProjection(N_PARAMS, 32, seed=7, distribution=kind).matrix(),
        DenseProjection(N_PARAMS, 32, seed=7, distribution=kind).matrix(),
    )


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_different_seed_gives_different_features(kind):
    g = _gradients(5, N_PARAMS)
    a = DenseProjection(N_PARAMS, 32, seed=7, distribution=kind).project(g)
    b = DenseProjection(N_PARAMS, 32, seed=8, distribution=kind).project(g)
    assert not np.allclose(a, b, rtol=0.1)
    # and every block differs, not just the first one
    for (_, block_a), (_, block_b) in zip(
        DenseProjection(N_PARAMS, 8, seed=7, distribution=kind).blocks(),
        DenseProjection(N_PARAMS, 8, seed=8, distribution=kind).blocks(),
        strict=True,
    ):
        assert np.mean(block_a == block_b) < 0.6


def test_blocks_are_not_copies_of_each_other():
    proj = DenseProjection(3 * PROJECTION_BLOCK_ROWS, 8, seed=3)
    b0, b1, b2 = (proj.block(b) for b in range(3))
    assert not np.array_equal(b0, b1) and not np.array_equal(b1, b2)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_blockwise_project_equals_full_matrix_product(kind):
    g = _gradients(6, N_PARAMS, seed=1)
    proj = DenseProjection(N_PARAMS, 24, seed=11, distribution=kind)
    got = proj.project(g)
    r = proj.matrix()
    full32 = g @ r
    exact = g.astype(np.float64) @ r.astype(np.float64)
    # float32 accumulation over 10_000 terms of size ~1/sqrt(k): error ~ sqrt(P) * eps32 * |terms|
    scale = np.sqrt((g.astype(np.float64) ** 2) @ (r.astype(np.float64) ** 2))
    tol = 1e-5 * scale + 1e-6
    assert np.all(np.abs(got - exact) <= tol)
    assert np.all(np.abs(full32 - exact) <= tol)
    np.testing.assert_allclose(got, full32, rtol=1e-4, atol=float(1e-5 * scale.max()))
    # other float dtypes are cast
    np.testing.assert_array_equal(proj.project(g.astype(np.float64)), got)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_cache_does_not_change_the_features(kind):
    g = _gradients(4, N_PARAMS, seed=2)
    uncached = DenseProjection(N_PARAMS, 16, seed=5, distribution=kind, cache_bytes=0)
    cached = DenseProjection(N_PARAMS, 16, seed=5, distribution=kind, cache_bytes=10**9)
    first = cached.project(g)
    second = cached.project(g)  # served from the cache
    np.testing.assert_array_equal(first, uncached.project(g))
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(cached.matrix(), uncached.matrix())
    # a budget below the whole matrix disables the cache; the features are the same anyway
    small = DenseProjection(N_PARAMS, 16, seed=5, distribution=kind, cache_bytes=N_PARAMS * 16 * 4 - 1)
    np.testing.assert_array_equal(small.project(g), first)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_entries_have_mean_zero_and_variance_one_over_k(kind):
    k = 64
    entries = DenseProjection(N_PARAMS, k, seed=21, distribution=kind).matrix().astype(np.float64).ravel()
    count = entries.size
    sd = 1.0 / math.sqrt(k)
    assert abs(entries.mean()) < 4 * sd / math.sqrt(count)
    # standard error of the sample variance: sqrt((mu4 - sigma^4) / N), mu4 = 3 sigma^4 (Gaussian)
    assert abs(entries.var() - 1.0 / k) < 4 * math.sqrt(2.0 / count) / k
    if kind is Distribution.RADEMACHER:
        value = np.float32(1.0 / math.sqrt(k))
        assert set(np.unique(entries).tolist()) == {-float(value), float(value)}
        assert entries.var() == pytest.approx(1.0 / k, rel=1e-3)
    else:
        # Gaussian: a continuous distribution, with the fourth moment of a normal
        assert np.unique(entries).size > 0.99 * count
        assert (entries**4).mean() == pytest.approx(3.0 / k**2, rel=0.05)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_inner_products_are_preserved_in_expectation(kind):
    """E[(R^T g1).(R^T g2)] = g1.g2 with variance (|g1|^2 |g2|^2 + (g1.g2)^2) / k for Gaussian R (Rademacher:
    at most that). The average over 200 seeds must lie within 4 standard errors of g1.g2."""
    n_params, k, n_seeds = 2000, 256, 200
    rng = np.random.default_rng(99)
    g1 = rng.standard_normal(n_params)
    g2 = 0.6 * g1 + 0.8 * rng.standard_normal(n_params)  # correlated, so g1.g2 is far from 0
    target = float(g1 @ g2)
    variance = (float(g1 @ g1) * float(g2 @ g2) + target**2) / k
    tolerance = 4.0 * math.sqrt(variance / n_seeds)
    estimates = []
    for seed in range(n_seeds):
        # R^T g in float64 from the generated matrix (project() equals this product, tested above); a
        # tiny float32 product per seed is slow on a busy multi-threaded BLAS
        r = DenseProjection(n_params, k, seed=seed, distribution=kind).matrix().astype(np.float64)
        estimates.append(float((g1 @ r) @ (g2 @ r)))
    estimates = np.array(estimates)
    assert tolerance < 0.1 * abs(target)  # the check is sharp enough to catch a wrong scale
    assert abs(estimates.mean() - target) < tolerance
    # the spread of single estimates matches the variance formula (within 25%; 200 samples)
    assert estimates.var(ddof=1) < 1.25 * variance
    if kind is Distribution.GAUSSIAN:
        assert estimates.var(ddof=1) > 0.75 * variance


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_params": 0, "k": 8},
        {"n_params": -5, "k": 8},
        {"n_params": 100, "k": 0},
        {"n_params": 100, "k": -1},
        {"n_params": 100, "k": 8, "seed": -1},
        {"n_params": 100, "k": 8, "distribution": "uniform"},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DenseProjection(**kwargs)


def test_project_rejects_wrong_shapes():
    proj = DenseProjection(100, 8)
    with pytest.raises(ValueError, match="100"):
        proj.project(np.zeros((3, 99), dtype=np.float32))
    with pytest.raises(ValueError):
        proj.project(np.zeros(100, dtype=np.float32))
