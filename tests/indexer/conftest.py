"""Shared fixtures of the indexer tests: tolerances and random surrogate problems in float64.

A surrogate problem (DESIGN.md 1.1) is a feature matrix ``phi`` (n x k), likelihood weights ``beta``, gradient
terms ``grad_term``, a prior precision ``tau`` and a few query features. The random problems mix ordinary
examples (beta in (0, 0.25]) with saturated ones (beta ~ 1e-12) and one zero-feature row, so that every
closed form is exercised where DESIGN.md 1.5 says it must stay finite. The weights are small enough that no
leverage reaches the clamp floor of ``s_i`` (checked by the tests), so the closed forms are exact.

The helpers live in fixtures rather than in an importable module: ``tests/indexer`` has no ``__init__.py``
(it would shadow the ``indexer`` package), so a plain module here could clash with one in ``tests/service``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from indexer.data import Dataset
from indexer.enums import BlockProjection
from indexer.features.models import ModelSpec, build_model
from indexer.features.projection import DenseProjection, KroneckerProjection, LayerBlock, seeded_matrix
from indexer.gp.surrogate import Surrogate, fit_surrogate

RTOL = 1e-8
"""Relative tolerance of every closed form against its brute-force refit (DESIGN.md 1.6)."""

ATOL_LOG_RATIO = 1e-12
"""Absolute tolerance, in nats, for a brute-force score computed as ``log(var_a / var_b)`` from two separate
solves: each variance carries a relative rounding error of about cond(A) * eps (~1e-14 here), so a log-ratio
near 0 (a saturated example) cannot be resolved below this. Tests that need full relative precision on those
examples use the cancellation-free brute forms instead."""

PROBLEM_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class SurrogateProblem:
    """A random surrogate problem and its fit.

    Attributes:
        seed: the generator seed.
        phi: `(n, k)` float64 features; row ``zero_row`` is exactly 0.
        beta: `(n,)` float64 likelihood weights; rows ``saturated`` are ~1e-12, the rest in (0, 0.25].
        grad_term: `(n,)` float64 beta_i r_i (random, both signs).
        tau: the prior precision the surrogate was fitted with.
        queries: `(n_queries, k)` float64 random query features.
        surrogate: ``fit_surrogate(phi, beta, grad_term, prior_precision=tau or default)``.
        saturated: positions of the saturated examples.
        zero_row: position of the zero-feature example.
    """

    seed: int
    phi: np.ndarray
    beta: np.ndarray
    grad_term: np.ndarray
    tau: float
    queries: np.ndarray
    surrogate: Surrogate
    saturated: np.ndarray
    zero_row: int

    @property
    def n(self) -> int:
        return int(self.phi.shape[0])

    @property
    def k(self) -> int:
        return int(self.phi.shape[1])


def make_problem(seed: int, n_queries: int = 3) -> SurrogateProblem:
    """A random float64 surrogate problem (n in [30, 60], k in [6, 12]).

    Even seeds use the default prior precision (mean eigenvalue), odd seeds an explicit tau that is a random
    multiple of it, so that both paths of :func:`fit_surrogate` are covered.
    """
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 61))
    k = int(rng.integers(6, 13))
    # rows of different scales, so that |phi_i| varies as real tangent features do
    phi = rng.standard_normal((n, k)) * np.exp(rng.uniform(-1.0, 1.0, size=(n, 1)))
    beta = rng.uniform(0.01, 0.25, size=n)
    order = rng.permutation(n)
    saturated = np.sort(order[:3])
    zero_row = int(order[3])
    beta[saturated] = 10.0 ** rng.uniform(-12.5, -11.5, size=3)
    phi[zero_row] = 0.0
    grad_term = rng.normal(0.0, 1.0, size=n)
    queries = rng.standard_normal((n_queries, k)) * np.exp(rng.uniform(-1.0, 1.0, size=(n_queries, 1)))
    tau = None if seed % 2 == 0 else float(np.einsum("n,nk,nk->", beta, phi, phi) / k * rng.uniform(0.3, 3.0))
    surrogate = fit_surrogate(phi, beta, grad_term, prior_precision=tau)
    return SurrogateProblem(
        seed=seed,
        phi=phi,
        beta=beta,
        grad_term=grad_term,
        tau=surrogate.prior_precision,
        queries=queries,
        surrogate=surrogate,
        saturated=saturated,
        zero_row=zero_row,
    )


@pytest.fixture(params=PROBLEM_SEEDS, ids=lambda s: f"seed{s}")
def problem(request: pytest.FixtureRequest) -> SurrogateProblem:
    """A random surrogate problem, one per seed of :data:`PROBLEM_SEEDS`."""
    return make_problem(request.param)


@pytest.fixture
def problem_factory() -> Callable[..., SurrogateProblem]:
    """:func:`make_problem`, for tests that build their own problems."""
    return make_problem


@pytest.fixture
def rtol() -> float:
    """:data:`RTOL`."""
    return RTOL


@pytest.fixture
def atol_log_ratio() -> float:
    """:data:`ATOL_LOG_RATIO`."""
    return ATOL_LOG_RATIO


def _gradient_matrix(block: LayerBlock, grads: dict[str, torch.Tensor]) -> np.ndarray:
    """G `(rows, cols)` float64 of one block in its own coordinates (DESIGN.md 1.7), from one example's
    parameter gradients: an embedding's weight; a Conv1D's `(d_in, d_out)` weight with the bias as one more
    row; any other layer's weight flattened to `(out, in * kernel)` with the bias as one more column."""
    w = grads[block.params[0]].detach().double()
    bias = grads[block.params[1]].detach().double() if len(block.params) > 1 else None
    if block.layer == "embedding":
        g = w
    elif block.layer == "gpt2_conv1d":
        g = torch.cat([w, bias[None]], 0) if bias is not None else w
    else:
        w2 = w.reshape(w.shape[0], -1)
        g = torch.cat([w2, bias[:, None]], 1) if bias is not None else w2
    assert g.shape == (block.rows, block.cols)
    return g.numpy()


def _explicit_kronecker(
    plan: KroneckerProjection, grads: Sequence[dict[str, torch.Tensor]], with_rest: bool = True
) -> np.ndarray:
    """`(n, k)` (or `(n, k_blocks)` without the rest block): per block ``(R_row (x) R_col)^T vec(G)`` with the
    Kronecker product formed explicitly (a whole block: ``R^T vec(G)``, R drawn here from its name by the
    documented recipe: a count sketch or a Gaussian matrix), then the rest block's parameters
    dense-projected, for one gradient dict per example."""
    rows = []
    for g in grads:
        parts = []
        for block in plan.blocks:
            vec_g = _gradient_matrix(block, g).reshape(-1)
            if block.projection is BlockProjection.DENSE:  # one seeded (rows * cols, k) Gaussian matrix
                r = seeded_matrix(plan.seed, f"{block.name}/dense", block.rows * block.cols, block.k)
                parts.append(r.astype(np.float64).T @ vec_g)
                continue
            if block.projection is BlockProjection.COUNT_SKETCH:  # entry i, with its sign, to one column
                words = np.frombuffer(
                    hashlib.sha256(f"{block.name}/count_sketch".encode()).digest()[:16], np.uint32
                )
                rng = np.random.default_rng([plan.seed, *map(int, words)])
                columns = rng.integers(0, block.k, size=len(vec_g), dtype=np.int64)
                signs = rng.integers(0, 2, size=len(vec_g), dtype=np.int8).astype(np.float64) * 2 - 1
                r = np.zeros((len(vec_g), block.k))
                r[np.arange(len(vec_g)), columns] = signs
                parts.append(r.T @ vec_g)
                continue
            r_row, r_col = block.matrices(plan.seed, plan.distribution)
            kron = np.kron(r_row.astype(np.float64), r_col.astype(np.float64))  # (rows * cols, k_row * k_col)
            parts.append(kron.T @ vec_g)
        if with_rest and plan.rest.k:
            rest = np.concatenate([g[n].detach().double().reshape(-1).numpy() for n in plan.rest.params])
            dense = DenseProjection(plan.rest.n_params, plan.rest.k, plan.seed, plan.distribution)
            parts.append(dense.project(rest[None])[0])
        rows.append(np.concatenate(parts))
    return np.stack(rows)


@pytest.fixture
def explicit_kronecker() -> Callable[..., np.ndarray]:
    """The brute-force reference of the Kronecker features: ``(plan, grads, with_rest=True) -> (n, k)``."""
    return _explicit_kronecker


@pytest.fixture
def tiny_problem() -> tuple[torch.nn.Module, Dataset]:
    """A seeded MLP 6-5-3 (random weights) and 40 random inputs with class targets: for build tests."""
    torch.manual_seed(1)
    model = build_model(ModelSpec("mlp", {"in_features": 6, "hidden": [5], "out_features": 3}))
    data = Dataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    return model, data


class TinyCausalLM(torch.nn.Module):
    """Token embedding -> causal running mean -> tanh(Linear) -> Linear head: `(B, T)` ids -> `(B, T, vocab)`.

    Position t sees the tokens 0..t only (a causal language model in miniature); padding positions
    (``attention_mask`` 0) contribute nothing to the running mean. ``tied``: the head is the embedding.
    """

    def __init__(self, vocab: int, dim: int, tied: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(input_ids)
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        e = e * real[..., None].to(e.dtype)
        seen = torch.cumsum(real, 1).clamp(min=1)[..., None].to(e.dtype)
        return self.head(torch.tanh(self.mix(torch.cumsum(e, 1) / seen)))


def make_tiny_lm(
    vocab: int = 13, dim: int = 6, tied: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TinyCausalLM:
    """A seeded :class:`TinyCausalLM` in eval mode."""
    torch.manual_seed(seed)
    return TinyCausalLM(vocab, dim, tied).to(dtype).eval()


@pytest.fixture
def tiny_lm() -> Callable[..., TinyCausalLM]:
    """:func:`make_tiny_lm`, for tests of language-model output functions and builds."""
    return make_tiny_lm
