"""Peer adapters: shapes, the proponent-positive sign, and brute-force references from torch.func.

A tiny MLP (sklearn's 8 x 8 digits, 64 inputs, 8 hidden units, 610 parameters) is trained for 300
Adam steps on 150 digits plus exact copies of 5 query digits with their labels. References are computed
in float64 from per-example margin gradients ``g = d m / d theta`` and ``p = sigmoid(m)``.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from benchmarks.quality.peers import (
    CaptumTracInCP,
    DattriGradDot,
    DattriInfluenceCG,
    PeerMethod,
    missing_peers,
    peer_methods,
)
from benchmarks.quality.retrain import margins
from indexer.data import Dataset
from indexer.demo.train import train_classifier
from indexer.features.models import mlp

if missing_peers():
    pytest.skip(f"peer packages not importable: {', '.join(missing_peers())}", allow_module_level=True)

N_BASE, N_COPY, N_OTHER = 150, 5, 7
N_TRAIN, N_QUERY = N_BASE + N_COPY, N_COPY + N_OTHER
K = 256  # projection dimension of the projected peers (the model has 610 parameters)
KEYS = ["traker_trak", "dattri_tracin", "dattri_if_cg", "dattri_trak", "captum_tracincp"]
# a damping that keeps each method well posed on the tiny MLP, in the package's own units: the TRAKs
# invert a 256 x 256 Phi^T Phi from 155 examples (singular without damping); the MLP's Hessian is
# indefinite (most negative eigenvalue about -0.15), and below that CG returns noise of either sign
DAMPING = {"traker_trak": 1e-2, "dattri_tracin": None, "dattri_if_cg": 0.3, "dattri_trak": 1e-3}
GRAD_DOT = ("dattri_tracin", "captum_tracincp")


def _digits() -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.from_numpy((x[order] / 16.0).astype(np.float32))
    y = torch.from_numpy(y[order].astype(np.int64))
    queries = Dataset(x[N_BASE : N_BASE + N_QUERY], y[N_BASE : N_BASE + N_QUERY])
    # the first N_COPY queries also sit, verbatim and with their labels, at the end of the training set
    train = Dataset(
        torch.cat([x[:N_BASE], queries.inputs[:N_COPY]]), torch.cat([y[:N_BASE], queries.targets[:N_COPY]])
    )
    return train, queries


def _train(hidden: list[int], epochs: int, train: Dataset) -> nn.Module:
    torch.manual_seed(0)
    return train_classifier(mlp(64, hidden, 10), train, epochs=epochs, seed=0, progress=False)


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset]:
    return _digits()


@pytest.fixture(scope="module")
def model(data: tuple[Dataset, Dataset]) -> nn.Module:
    return _train([8], 100, data[0])  # training accuracy about 0.66: labels neither ignored nor saturated


@pytest.fixture(scope="module")
def fitted(model: nn.Module, data: tuple[Dataset, Dataset]) -> Iterator[dict[str, PeerMethod]]:
    train, _ = data
    methods = {}
    for method in peer_methods(K, seed=0):
        method.fit(model, train.inputs, train.targets)
        methods[method.key] = method
    yield methods
    for method in methods.values():
        method.close()


@pytest.fixture(scope="module")
def results(fitted: dict[str, PeerMethod], data: tuple[Dataset, Dataset]) -> dict[str, tuple]:
    """``key -> (scores (N_QUERY, N_TRAIN), self_scores (N_TRAIN,))`` at each method's test damping."""
    _, queries = data
    return {
        key: (
            method.scores(queries.inputs, queries.targets, DAMPING.get(key)),
            method.self_scores(DAMPING.get(key)),
        )
        for key, method in fitted.items()
    }


class Reference:
    """Float64 margin gradients `(n, P)` and label probabilities `(n,)` of a model, via torch.func."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = theta[start : start + size].reshape(shape)
            start += size
        return out

    def _margin(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margins(functional_call(self.model, self.params(theta), (x[None],)), y[None])[0]

    def grads(self, data: Dataset) -> torch.Tensor:
        return vmap(grad(self._margin), in_dims=(None, 0, 0))(self.theta, data.inputs, data.targets).double()

    def probs(self, data: Dataset) -> torch.Tensor:
        m = vmap(self._margin, in_dims=(None, 0, 0))(self.theta, data.inputs, data.targets)
        return torch.sigmoid(m.double())

    def hessian(self, data: Dataset) -> torch.Tensor:
        """Hessian `(P, P)` of the mean cross-entropy softplus(-m) over ``data``."""

        def loss(theta: torch.Tensor) -> torch.Tensor:
            logits = functional_call(self.model, self.params(theta), (data.inputs,))
            return nn.functional.softplus(-margins(logits, data.targets)).mean()

        return hessian(loss)(self.theta).double()


def _mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([spearmanr(a[q], b[q]).statistic for q in range(len(a))]))


# ---- interface ----------------------------------------------------------------------------------


def test_peer_methods_lists_the_five_peers_in_a_fixed_order() -> None:
    methods = peer_methods(K, seed=0)
    assert [m.key for m in methods] == KEYS
    assert len({m.name for m in methods}) == len(methods)
    for method in methods:
        dist = method.package.split()[0]
        assert method.package == f"{dist} {importlib.metadata.version(dist)}"
    assert [m.damping_param for m in methods] == [
        "lambda_reg",
        None,
        "regularization",
        "regularization",
        None,
    ]
    with pytest.raises(ValueError):
        peer_methods(0)


def test_missing_peers_is_empty_here() -> None:
    assert missing_peers() == []


@pytest.mark.parametrize("key", KEYS)
def test_shapes_dtypes_and_finite(key: str, results: dict[str, tuple]) -> None:
    scores, self_scores = results[key]
    assert scores.shape == (N_QUERY, N_TRAIN) and scores.dtype == np.float64
    assert self_scores.shape == (N_TRAIN,) and self_scores.dtype == np.float64
    assert np.isfinite(scores).all() and np.isfinite(self_scores).all()
    assert (self_scores >= 0).mean() > 0.9  # self-influence is (nearly always) non-negative


@pytest.mark.parametrize("key", KEYS)
def test_copy_of_a_query_is_its_top_proponent(key: str, results: dict[str, tuple]) -> None:
    """Sign: an exact copy of the query (same label) is a strong proponent, so its score is positive.

    TRAK and the influence function rank it first. Grad-Dot need not: ``(1 - p_i) g_i . g_q`` lets a
    poorly fit example with a large gradient outscore the copy (the brute-force Grad-Dot does too, see
    the next test), so for Grad-Dot the copy has to be in the top 10 of 155.
    """
    scores, _ = results[key]
    copies = N_BASE + np.arange(N_COPY)
    copy_scores = scores[np.arange(N_COPY), copies]
    ranks = (scores[:N_COPY] > copy_scores[:, None]).sum(axis=1)  # 0 = top
    assert (copy_scores > 0).sum() >= N_COPY - 1, f"copy scores {copy_scores}"
    allowed = 10 if key in GRAD_DOT else 1
    assert (ranks < allowed).sum() >= N_COPY - 1, f"ranks of the copies {ranks}"


def test_brute_force_grad_dot_ranks_copies_high_but_not_always_first(model: nn.Module, data) -> None:
    train, queries = data
    ref = Reference(model)
    exact = (ref.grads(queries) @ ref.grads(train).T * (1 - ref.probs(train))[None, :]).numpy()
    copy_scores = exact[np.arange(N_COPY), N_BASE + np.arange(N_COPY)]
    ranks = (exact[:N_COPY] > copy_scores[:, None]).sum(axis=1)
    assert (copy_scores > 0).all() and (ranks < 10).all() and (ranks > 0).any()


# ---- brute-force references ---------------------------------------------------------------------


def test_captum_tracincp_equals_grad_dot(model: nn.Module, data, results) -> None:
    train, queries = data
    ref = Reference(model)
    g, gq, p = ref.grads(train), ref.grads(queries), ref.probs(train)
    expected = (gq @ g.T * (1 - p)[None, :]).numpy()  # (1 - p_i) grad m_q . grad m_i
    scores, self_scores = results["captum_tracincp"]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    expected_self = ((1 - p) ** 2 * (g**2).sum(1)).numpy()  # |grad CE_i|^2
    np.testing.assert_allclose(self_scores, expected_self, rtol=1e-4, atol=1e-6 * expected_self.max())


def test_dattri_grad_dot_is_projected_grad_dot(model: nn.Module, data, results) -> None:
    train, queries = data
    ref = Reference(model)
    g, gq, p = ref.grads(train), ref.grads(queries), ref.probs(train)
    scores, self_scores = results["dattri_tracin"]
    assert _mean_spearman(scores, (gq @ g.T * (1 - p)[None, :]).numpy()) > 0.9
    assert spearmanr(self_scores, ((1 - p) ** 2 * (g**2).sum(1)).numpy()).statistic > 0.9


def test_dattri_grad_dot_unprojected_scale(model: nn.Module, data) -> None:
    """Projecting to k >> P keeps inner products to a few percent: checks the scale, not just ranks."""
    train, queries = data
    ref = Reference(model)
    expected = (ref.grads(queries) @ ref.grads(train).T * (1 - ref.probs(train))[None, :]).numpy()
    method = DattriGradDot(projection_dim=8192, seed=0)
    method.fit(model, train.inputs, train.targets)
    scores = method.scores(queries.inputs, queries.targets)
    assert np.abs(scores - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("key", ["traker_trak", "dattri_trak"])
def test_trak_with_dominant_damping_is_grad_dot(key: str, fitted, model: nn.Module, data) -> None:
    """(Phi^T Phi + lambda I)^-1 -> I / lambda, so TRAK turns into (1 - p_i) phi_q . phi_i."""
    train, queries = data
    ref = Reference(model)
    g, gq, p = ref.grads(train), ref.grads(queries), ref.probs(train)
    damping = 100.0 * float((g**2).sum())  # far above trace(Phi^T Phi) for either package's scaling
    scores = fitted[key].scores(queries.inputs, queries.targets, damping)
    assert _mean_spearman(scores, (gq @ g.T * (1 - p)[None, :]).numpy()) > 0.9


def test_influence_cg_matches_the_explicit_inverse_hessian(data) -> None:
    """Logistic regression (convex): dattri's CG reaches (1 - p_i) g_i^T (H + lambda I)^-1 g_q."""
    train, queries = data
    model = _train([], 30, train)
    ref = Reference(model)
    g, gq, p = ref.grads(train), ref.grads(queries), ref.probs(train)
    damping = 0.1
    inverse = torch.linalg.inv(ref.hessian(train) + damping * torch.eye(len(ref.theta), dtype=torch.float64))
    expected = ((1 - p)[:, None] * (g @ inverse @ gq.T)).T.numpy()
    expected_self = ((1 - p) * torch.einsum("ip,pq,iq->i", g, inverse, g)).numpy()
    method = DattriInfluenceCG(max_iter=20)
    method.self_chunk = 64  # three chunks of the 155 training examples
    method.fit(model, train.inputs, train.targets)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(
        method.scores(queries.inputs, queries.targets, damping), expected, atol=1e-3 * scale
    )
    np.testing.assert_allclose(method.self_scores(damping), expected_self, atol=1e-3 * expected_self.max())


# ---- damping, seeds, errors ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["traker_trak", "dattri_trak"])
def test_redamping_reuses_the_fit_and_comes_back(key: str, fitted, data) -> None:
    _, queries = data
    method = fitted[key]
    first = method.scores(queries.inputs, queries.targets, 1e-2)
    other = method.scores(queries.inputs, queries.targets, 1.0)
    again = method.scores(queries.inputs, queries.targets, 1e-2)
    assert not np.allclose(_unit_rows(first), _unit_rows(other), atol=1e-3)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-7 * np.abs(first).max())


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("index", [0, 1, 3])  # the projected peers
def test_projected_peers_are_deterministic_given_the_seed(index: int, model: nn.Module, data) -> None:
    train, queries = data
    runs = []
    for seed in (0, 0, 1):
        method = peer_methods(64, seed=seed)[index]
        method.fit(model, train.inputs, train.targets)
        damping = None if method.damping_param is None else 1e-2
        runs.append(method.scores(queries.inputs, queries.targets, damping))
        method.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_errors_say_what_was_wrong(model: nn.Module, data) -> None:
    train, queries = data
    method = CaptumTracInCP()
    with pytest.raises(RuntimeError, match="fit"):
        method.scores(queries.inputs, queries.targets)
    with pytest.raises(ValueError, match="int64"):
        method.fit(model, train.inputs, train.targets.int())
    method.fit(model, train.inputs, train.targets)
    with pytest.raises(ValueError, match="no damping"):
        method.scores(queries.inputs, queries.targets, 0.1)
    with pytest.raises(ValueError, match="shape"):
        method.scores(queries.inputs[:, :10], queries.targets)
    with pytest.raises(ValueError, match="damping"):
        peer_methods(K)[0].scores(queries.inputs, queries.targets, -1.0)


def test_the_callers_model_is_left_untouched(model: nn.Module, data) -> None:
    train, queries = data
    caller = copy.deepcopy(model)
    before = {k: v.clone() for k, v in caller.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in caller.parameters()]
    for method in peer_methods(K, seed=0):
        method.fit(caller, train.inputs, train.targets)
        method.scores(queries.inputs[:3], queries.targets[:3], DAMPING.get(method.key))
        method.close()
    for key, value in caller.state_dict().items():
        assert torch.equal(value, before[key])
    for p, g in zip(caller.parameters(), grads, strict=True):
        assert p.requires_grad and (p.grad is None if g is None else torch.equal(p.grad, g))
    assert not caller.training
