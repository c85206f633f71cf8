"""Per-example tangent features (DESIGN.md 1.1) against a plain autograd loop, and the output functions.

The reference takes ``torch.autograd.grad`` of the output function of one example at a time, flattened in
``named_parameters()`` order; the library uses ``vmap`` over ``grad`` and projects buffer by buffer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from indexer.data import Dataset
from indexer.features.featurize import (
    DenseFeaturizer,
    count_parameters,
    example_gradient,
    per_example_gradients,
)
from indexer.features.models import mlp
from indexer.features.projection import DenseProjection
from indexer.features.stream import tangent_features
from indexer.features.tasks import ClassificationMargin, OutputFunction, RegressionOutput

N_EXAMPLES = 11
N_CLASSES = 3


def _model(out_features: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(in_features=5, hidden=[7], out_features=out_features).to(dtype).eval()


def _data(kind: str, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(N_EXAMPLES, 5, generator=gen, dtype=dtype) * 2.0
    if kind == "classification":
        targets = torch.randint(0, N_CLASSES, (N_EXAMPLES,), generator=gen)
    else:
        targets = torch.randn(N_EXAMPLES, generator=gen, dtype=dtype)
    return inputs, targets


def _case(
    kind: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, OutputFunction, torch.Tensor, torch.Tensor]:
    if kind == "classification":
        return _model(N_CLASSES, dtype), ClassificationMargin(), *_data(kind, dtype)
    return _model(1, dtype), RegressionOutput(sigma=0.5), *_data(kind, dtype)


def reference_gradients(
    model: nn.Module, output_fn: OutputFunction, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """d m / d theta one example at a time with torch.autograd.grad; returns (gradients, outputs)."""
    params = [p for _, p in model.named_parameters()]
    grads, outputs = [], []
    for x, y in zip(inputs, targets, strict=True):
        out = output_fn.output(model(x.unsqueeze(0)).squeeze(0), y)
        assert out.shape == ()
        per_param = torch.autograd.grad(out, params)
        grads.append(torch.cat([g.reshape(-1) for g in per_param]).detach().double().numpy())
        outputs.append(float(out.detach()))
    return np.stack(grads), np.array(outputs)


def test_parameter_count():
    assert count_parameters(_model(N_CLASSES)) == 5 * 7 + 7 + 7 * N_CLASSES + N_CLASSES
    assert count_parameters(_model(1)) == 5 * 7 + 7 + 7 + 1


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_per_example_gradients_equal_an_autograd_loop(kind):
    """In float64 the vmap gradients equal the loop's to rounding."""
    model, output_fn, inputs, targets = _case(kind, torch.float64)
    grads, outputs, raw = per_example_gradients(model, output_fn, inputs, targets)
    want_grads, want_outputs = reference_gradients(model, output_fn, inputs, targets)
    n_params = count_parameters(model)
    assert grads.shape == (N_EXAMPLES, n_params)
    assert outputs.shape == (N_EXAMPLES,)
    assert raw.shape == (N_EXAMPLES, N_CLASSES if kind == "classification" else 1)
    np.testing.assert_allclose(grads.numpy(), want_grads, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(outputs.numpy(), want_outputs, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(raw.numpy(), model(inputs).numpy(), rtol=1e-12, atol=1e-12)
    assert np.abs(want_grads).max() > 0.1  # the gradients are not trivially zero
    # every example has its own gradient
    assert np.linalg.matrix_rank(want_grads) == min(N_EXAMPLES, n_params)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_single_example_gradient_equals_vmap(kind):
    """The service's one-query path (plain autograd) equals the indexer's vmap path."""
    model, output_fn, inputs, targets = _case(kind, torch.float64)
    grads, outputs, raw = per_example_gradients(model, output_fn, inputs, targets)
    for i in range(N_EXAMPLES):
        g, out, r = example_gradient(model, output_fn, inputs[i], targets[i])
        assert g.shape == (count_parameters(model),) and out.shape == () and r.shape == raw[i].shape
        np.testing.assert_allclose(g.numpy(), grads[i].numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(out), float(outputs[i]), rtol=1e-12)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_per_example_gradients_float32(kind):
    model, output_fn, inputs, targets = _case(kind)
    grads, outputs, _ = per_example_gradients(model, output_fn, inputs, targets)
    want_grads, want_outputs = reference_gradients(model, output_fn, inputs, targets)
    assert grads.dtype == torch.float32
    np.testing.assert_allclose(grads.numpy(), want_grads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs.numpy(), want_outputs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_tangent_features_equal_projected_autograd_loop(kind):
    model, output_fn, inputs, targets = _case(kind)
    n_params = count_parameters(model)
    projection = DenseProjection(n_params, 16, seed=3)
    features = tangent_features(DenseFeaturizer(model, projection), output_fn, Dataset(inputs, targets))
    want_grads, want_outputs = reference_gradients(model, output_fn, inputs, targets)
    want_phi = want_grads @ projection.matrix().astype(np.float64)
    n_outputs = N_CLASSES if kind == "classification" else 1
    # the documented shapes and dtypes
    assert features.phi.shape == (N_EXAMPLES, 16) and features.phi.dtype == np.float32
    assert features.outputs.shape == (N_EXAMPLES,) and features.outputs.dtype == np.float64
    assert features.model_outputs.shape == (N_EXAMPLES, n_outputs)
    assert features.model_outputs.dtype == np.float32
    assert features.targets.shape == (N_EXAMPLES,)
    np.testing.assert_array_equal(features.targets, targets.numpy())
    scale = np.abs(want_phi).max()
    np.testing.assert_allclose(features.phi, want_phi, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(features.outputs, want_outputs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(features.model_outputs, model(inputs).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_small_batches_and_buffers_equal_one_big_batch(kind):
    model, output_fn, inputs, targets = _case(kind)
    n_params = count_parameters(model)
    projection = DenseProjection(n_params, 16, seed=4)
    big = tangent_features(
        DenseFeaturizer(model, projection), output_fn, Dataset(inputs, targets), batch_size=64
    )
    # buffer_bytes holds 4 gradients of 2 examples' batches: buffers of 4, 4 and 3 examples
    small = tangent_features(
        DenseFeaturizer(model, projection),
        output_fn,
        Dataset(inputs, targets),
        batch_size=2,
        buffer_bytes=4 * 4 * n_params,
    )
    # a buffer smaller than one batch still works (it is raised to one batch)
    tiny = tangent_features(
        DenseFeaturizer(model, projection), output_fn, Dataset(inputs, targets), batch_size=3, buffer_bytes=1
    )
    for other in (small, tiny):
        np.testing.assert_allclose(other.phi, big.phi, rtol=1e-5, atol=1e-6 * np.abs(big.phi).max())
        np.testing.assert_allclose(other.outputs, big.outputs, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(other.model_outputs, big.model_outputs, rtol=1e-6, atol=1e-7)
        assert other.phi.shape == big.phi.shape and other.phi.dtype == np.float32


def test_small_buffers_are_used(monkeypatch):
    """The buffer size really does split the projection into several passes."""
    model, output_fn, inputs, targets = _case("classification")
    n_params = count_parameters(model)
    projection = DenseProjection(n_params, 8, seed=5)
    rows_per_call: list[int] = []
    original = DenseProjection.project

    def spy(self: DenseProjection, gradients: np.ndarray) -> np.ndarray:
        rows_per_call.append(len(gradients))
        return original(self, gradients)

    monkeypatch.setattr(DenseProjection, "project", spy)
    tangent_features(
        DenseFeaturizer(model, projection),
        output_fn,
        Dataset(inputs, targets),
        batch_size=2,
        buffer_bytes=4 * 4 * n_params,
    )
    assert rows_per_call == [4, 4, 3]


def test_tangent_features_reject_mismatches():
    model, output_fn, inputs, targets = _case("classification")
    n_params = count_parameters(model)
    with pytest.raises(ValueError, match="parameters"):
        tangent_features(
            DenseFeaturizer(model, DenseProjection(n_params + 1, 8)), output_fn, Dataset(inputs, targets)
        )
    with pytest.raises(ValueError, match="differ in length"):
        tangent_features(
            DenseFeaturizer(model, DenseProjection(n_params, 8)), output_fn, Dataset(inputs, targets[:-1])
        )


# -------------------------------------------------------------------------------- output functions


def test_margin_definition():
    """m = z_y - logsumexp_{c != y} z_c, so sigmoid(m) is the softmax probability of the label."""
    gen = torch.Generator().manual_seed(0)
    fn = ClassificationMargin()
    logits = torch.randn(50, 5, generator=gen, dtype=torch.float64) * 6.0
    labels = torch.randint(0, 5, (50,), generator=gen)
    for z, y in zip(logits, labels, strict=True):
        m = fn.output(z, y)
        others = torch.cat([z[:y], z[y + 1 :]])
        assert float(m) == pytest.approx(float(z[y] - torch.logsumexp(others, 0)), rel=1e-12, abs=1e-12)
        assert float(torch.sigmoid(m)) == pytest.approx(float(torch.softmax(z, 0)[y]), rel=1e-12, abs=1e-300)


def test_margin_of_the_model_gives_the_softmax_probability():
    model, output_fn, inputs, targets = _case("classification")
    features = tangent_features(
        DenseFeaturizer(model, DenseProjection(count_parameters(model), 4)),
        output_fn,
        Dataset(inputs, targets),
    )
    z = features.model_outputs.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p_label = p[np.arange(N_EXAMPLES), features.targets]
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-features.outputs)), p_label, rtol=1e-5)
    beta = output_fn.likelihood_weight(features.outputs, features.targets)
    np.testing.assert_allclose(beta, p_label * (1.0 - p_label), rtol=1e-4)
    np.testing.assert_allclose(
        output_fn.grad_term(features.outputs, features.targets), 1.0 - p_label, rtol=1e-4
    )


def test_margin_is_finite_for_extreme_logits():
    fn = ClassificationMargin()
    z = torch.tensor([800.0, 0.0, 0.0], dtype=torch.float64)
    assert float(fn.output(z, torch.tensor(0))) == pytest.approx(800.0 - math.log(2.0), rel=1e-12)
    assert float(fn.output(z, torch.tensor(1))) == pytest.approx(-800.0, rel=1e-12)
    z32 = torch.tensor([-800.0, 800.0], dtype=torch.float32)
    assert math.isfinite(float(fn.output(z32, torch.tensor(0))))


def _sigmoid_reference(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, 1 - p) without cancellation: the tail exp(-|m|) / (1 + exp(-|m|)) computed directly."""
    tail = np.exp(-np.abs(m)) / (1.0 + np.exp(-np.abs(m)))
    p = np.where(m >= 0, 1.0 - tail, 1.0 / (1.0 + np.exp(-np.abs(m))))
    one_minus_p = np.where(m >= 0, tail, 1.0 / (1.0 + np.exp(-np.abs(m))))
    return p, one_minus_p


def test_classification_likelihood_weight_and_grad_term():
    """beta = p (1 - p) and beta r = 1 - p, including the tails where 1 - sigmoid(m) would round to 0."""
    fn = ClassificationMargin()
    m = np.array([-700.0, -40.0, -5.0, -0.3, 0.0, 0.3, 5.0, 40.0, 700.0])
    targets = np.zeros(len(m), dtype=np.int64)
    _, one_minus_p = _sigmoid_reference(m)
    p_times_q = np.exp(-np.abs(m)) / (1.0 + np.exp(-np.abs(m))) ** 2
    beta = fn.likelihood_weight(m, targets)
    grad = fn.grad_term(m, targets)
    np.testing.assert_allclose(beta, p_times_q, rtol=1e-12)
    np.testing.assert_allclose(grad, one_minus_p, rtol=1e-12)
    assert beta[4] == 0.25 and grad[4] == 0.5
    assert np.all(beta > 0)  # still positive at |m| = 700 (exp(-700) ~ 1e-304)
    assert grad[7] > 0  # 1 - p at m = 40 is 4e-18, not the 0 of 1 - sigmoid(40)
    assert grad[0] == 1.0


def test_classification_weights_at_margins_of_800():
    """At |m| = 800 the exact p (1 - p) = exp(-800) ~ 4e-348 is below float64's smallest subnormal (5e-324),
    so the weight underflows to exactly 0: finite and non-negative, never NaN or negative."""
    fn = ClassificationMargin()
    m = np.array([-800.0, 800.0])
    targets = np.zeros(2, dtype=np.int64)
    with np.errstate(invalid="raise", divide="raise", over="raise"):
        beta = fn.likelihood_weight(m, targets)
        grad = fn.grad_term(m, targets)
    assert np.all(np.isfinite(beta)) and np.all(beta >= 0)
    assert np.all(beta <= 5e-324)
    assert grad[0] == 1.0  # hopelessly wrong: 1 - p = 1
    assert 0.0 <= grad[1] <= 5e-324  # confidently right: 1 - p = exp(-800)


def test_regression_weights():
    fn = RegressionOutput(sigma=0.5)
    outputs = np.array([0.0, 1.5, -2.0])
    targets = np.array([1.0, 1.0, 1.0])
    np.testing.assert_array_equal(fn.likelihood_weight(outputs, targets), [4.0, 4.0, 4.0])
    np.testing.assert_allclose(fn.grad_term(outputs, targets), [4.0, -2.0, 12.0], rtol=1e-15)
    assert float(fn.output(torch.tensor([2.5]), torch.tensor(0.0))) == 2.5
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma"):
            RegressionOutput(sigma=bad)
