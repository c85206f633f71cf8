"""The language-model margin (DESIGN.md 1.8) against per-token references.

The reference loops over examples and over their target tokens, takes each token's margin with the plain
formula ``z_y - logsumexp(z without y)``, sums them and differentiates the sum with ``torch.autograd.grad``
(float64); beta and beta r are computed from their definitions with Python floats. With one target token
the output function is the classification margin exactly (bitwise: output, gradient, beta, beta r).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from indexer.enums import OutputKind
from indexer.exceptions import InvalidTargetsError
from indexer.features.featurize import per_example_gradients
from indexer.features.hooks import HookFeaturizer
from indexer.features.language import IGNORE_INDEX, LanguageModelMargin, causal_lm_targets, shift_labels
from indexer.features.plan import plan_kronecker
from indexer.features.tasks import ClassificationMargin, output_function_from_spec

VOCAB = 13
LM = LanguageModelMargin(VOCAB)


def lm_batch(seed: int = 0, n: int = 6, length: int = 7) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids with right padding (rows 1 and 3), prompts of different lengths, aligned causal targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    prompt = torch.tensor([0, 2, 3, 1, 4, 0][:n])
    return {"input_ids": ids, "attention_mask": mask}, causal_lm_targets(ids, mask, prompt)


def reference(
    model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per example and per target token with plain autograd: `(n, P)` gradients of m, `(n,)` m, beta and
    beta r from their definitions."""
    params = [p for _, p in model.named_parameters()]
    grads, outputs, betas, residuals = [], [], [], []
    for i in range(len(targets)):
        logits = model(**{k: v[i : i + 1] for k, v in inputs.items()})[0]  # (T, vocab)
        m = torch.zeros((), dtype=logits.dtype)
        probabilities = []
        for t in range(targets.shape[1]):
            y = int(targets[i, t])
            if y == IGNORE_INDEX:
                continue
            z = logits[t]
            m_t = z[y] - torch.logsumexp(torch.cat([z[:y], z[y + 1 :]]), 0)
            probabilities.append(1 / (1 + math.exp(-float(m_t.detach()))))
            m = m + m_t
        count = len(probabilities)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(m, params)]).double().numpy())
        outputs.append(float(m.detach()))
        betas.append(sum(p * (1 - p) for p in probabilities) / count**2)
        residuals.append(sum(1 - p for p in probabilities) / count)
    return np.stack(grads), np.array(outputs), np.array(betas), np.array(residuals)


def by_parameter(model: nn.Module, gradients: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """`(n, P)` whole gradients in ``named_parameters()`` order -> one name -> gradient dict per example."""
    named = [(name, p.shape) for name, p in model.named_parameters()]
    offsets = np.cumsum([0] + [math.prod(shape) for _, shape in named])
    return [
        {
            name: torch.from_numpy(g[offsets[j] : offsets[j + 1]].reshape(shape))
            for j, (name, shape) in enumerate(named)
        }
        for g in gradients
    ]


def test_output_gradient_and_terms_equal_a_per_token_loop(tiny_lm) -> None:
    """vmap per-example gradients (the dense featurizer's path) equal the loop's in float64."""
    model = tiny_lm(vocab=VOCAB, dtype=torch.float64)
    inputs, targets = lm_batch()
    grads, outputs, raw = per_example_gradients(model, LM, inputs, targets)
    want_grads, want_outputs, want_beta, want_residual = reference(model, inputs, targets)
    assert grads.shape == want_grads.shape and raw.shape == (6, 7 * VOCAB)
    np.testing.assert_allclose(grads.numpy(), want_grads, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(outputs.numpy(), want_outputs, rtol=1e-12)
    beta, residual = LM.likelihood_terms(raw, targets, outputs)
    assert beta.shape == (6,) and beta.dtype == np.float64 and residual.dtype == np.float64
    np.testing.assert_allclose(beta, want_beta, rtol=1e-12)
    np.testing.assert_allclose(residual, want_residual, rtol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_kronecker_hooks_equal_the_projected_per_example_gradient(
    tiny_lm, explicit_kronecker, tied: bool
) -> None:
    """One forward and one backward through the hooks of an embedding + linear LM give, per example, the
    explicit Kronecker projection of the autograd gradient (a tied head: one block whose uses add up),
    and the loop's beta and beta r."""
    model = tiny_lm(vocab=VOCAB, tied=tied, dtype=torch.float64)
    inputs, targets = lm_batch(seed=1)
    plan = plan_kronecker(model, 40, seed=5)
    kinds = [(b.name, b.layer) for b in plan.blocks]
    if tied:
        assert kinds == [("embed.weight", "embedding"), ("mix.weight", "linear")]
    else:
        assert kinds == [("embed.weight", "embedding"), ("mix.weight", "linear"), ("head.weight", "linear")]
    with HookFeaturizer(model, plan) as featurizer:
        got = featurizer.featurize(LM, inputs, targets)
    want_grads, want_outputs, want_beta, want_residual = reference(model, inputs, targets)
    want = explicit_kronecker(plan, by_parameter(model, want_grads))
    assert got.phi.shape == (6, plan.k) and got.phi.dtype == np.float32
    np.testing.assert_allclose(got.phi, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(got.outputs, want_outputs, rtol=1e-12)
    np.testing.assert_allclose(got.beta, want_beta, rtol=1e-12)
    np.testing.assert_allclose(got.grad_term, want_residual, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_target_token_is_the_classification_margin_exactly(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    n, length = 9, 5
    logits = (torch.randn(n, length, VOCAB, generator=g) * 4).to(dtype)
    position = torch.randint(0, length, (n,), generator=g)
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    targets = torch.full((n, length), IGNORE_INDEX)
    targets[torch.arange(n), position] = labels
    chosen = logits[torch.arange(n), position]  # (n, vocab): the one scored position of each example
    margin = ClassificationMargin()

    flat = logits.reshape(n, -1).requires_grad_()
    m = torch.vmap(LM.output)(flat, targets)
    (grad_lm,) = torch.autograd.grad(m.sum(), flat)
    chosen_leaf = chosen.detach().requires_grad_()
    m_cm = torch.vmap(margin.output)(chosen_leaf, labels)
    (grad_cm,) = torch.autograd.grad(m_cm.sum(), chosen_leaf)
    assert torch.equal(m, m_cm)
    grad_lm = grad_lm.reshape(n, length, VOCAB)
    assert torch.equal(grad_lm[torch.arange(n), position], grad_cm)
    assert int((grad_lm != 0).sum()) == int((grad_cm != 0).sum())  # nothing at the other positions
    for got, want in zip(
        LM.likelihood_terms(flat.detach(), targets, m.detach()),
        margin.likelihood_terms(chosen, labels, m_cm.detach()),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_positions_that_are_not_targets_contribute_nothing(tiny_lm) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, VOCAB, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (4, 6), generator=g)
    targets[:, ::2] = IGNORE_INDEX
    changed = logits.clone()
    changed[:, ::2] = 1e3 * torch.randn(4, 3, VOCAB, generator=g, dtype=torch.float64)
    flat = logits.reshape(4, -1).requires_grad_()
    other = changed.reshape(4, -1).requires_grad_()
    m, m_changed = torch.vmap(LM.output)(flat, targets), torch.vmap(LM.output)(other, targets)
    assert torch.equal(m, m_changed)
    (grad,) = torch.autograd.grad(m.sum(), flat)
    assert not bool(grad.reshape(4, 6, VOCAB)[:, ::2].any())
    for a, b in zip(
        LM.likelihood_terms(flat, targets, m), LM.likelihood_terms(other, targets, m), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # the model honours its padding mask: a padded example has the features of its unpadded self
    model = tiny_lm(vocab=VOCAB)
    inputs, targets = lm_batch(seed=4)  # row 3 has 4 real tokens, then padding
    with HookFeaturizer(model, plan_kronecker(model, 30)) as featurizer:
        padded = featurizer.featurize(LM, inputs, targets)
        alone = featurizer.featurize(LM, {k: v[3:4, :4] for k, v in inputs.items()}, targets[3:4, :4])
    np.testing.assert_allclose(padded.phi[3], alone.phi[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded.beta[3], alone.beta[0], rtol=1e-6)


def test_check_targets_names_the_rule_and_the_rows() -> None:
    ok = torch.tensor([[3, IGNORE_INDEX], [IGNORE_INDEX, 12]])
    LM.check_targets(ok, 2 * VOCAB)
    with pytest.raises(ValueError, match=r"must be \(n, T\) token ids"):
        LM.check_targets(torch.tensor([1, 2]), 2 * VOCAB)
    with pytest.raises(ValueError, match="must be integer token ids; got dtype torch.float32"):
        LM.check_targets(ok.float(), 2 * VOCAB)
    with pytest.raises(
        ValueError,
        match=r"gives 20 outputs per example; targets of 2 positions need logits of shape \(2, 13\)",
    ):
        LM.check_targets(ok, 20)
    with pytest.raises(
        InvalidTargetsError, match=r"token ids must lie in 0\.\.12 .* got values from 13 to 13"
    ) as bad:
        LM.check_targets(torch.tensor([[3, 4], [13, 1]]), 2 * VOCAB)
    assert bad.value.rows == (1,)
    with pytest.raises(InvalidTargetsError, match=r"rows \[0, 2\] of the batch: no target tokens") as empty:
        LM.check_targets(torch.tensor([[IGNORE_INDEX] * 2, [1, 2], [IGNORE_INDEX] * 2]), 2 * VOCAB)
    assert empty.value.rows == (0, 2)
    with pytest.raises(InvalidTargetsError, match="no target tokens"):
        LM.likelihood_terms(torch.zeros(1, 2 * VOCAB), torch.full((1, 2), IGNORE_INDEX), torch.zeros(1))
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 2"):
        LanguageModelMargin(1)
    with pytest.raises(NotImplementedError, match="needs the per-token margins"):
        LM.likelihood_weight(np.zeros(2), ok.numpy())


def test_causal_targets_and_shifted_labels() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    x = IGNORE_INDEX
    assert causal_lm_targets(ids).tolist() == [[6, 7, 8, 9, x], [6, 7, 0, 0, x], [0, 5, 6, 7, x]]
    assert causal_lm_targets(ids, mask).tolist() == [[6, 7, 8, 9, x], [6, 7, x, x, x], [x, x, 6, 7, x]]
    # the prompt: positions before prompt_length are not scored (left padding counts as positions)
    assert causal_lm_targets(ids, mask, torch.tensor([3, 1, 4])).tolist() == [
        [x, x, 8, 9, x],
        [6, 7, x, x, x],
        [x, x, x, 7, x],
    ]
    assert causal_lm_targets(ids, prompt_length=1).tolist() == causal_lm_targets(ids).tolist()
    assert causal_lm_targets(ids).dtype == torch.int64
    labels = torch.tensor([[5, 6, 7, x], [x, x, 7, 8]])  # transformers' labels: unshifted
    assert shift_labels(labels).tolist() == [[6, 7, x, x], [x, 7, 8, x]]
    with pytest.raises(ValueError, match=r"input_ids must be an \(n, T\) integer tensor"):
        causal_lm_targets(ids.float())
    with pytest.raises(ValueError, match="prompt_length has 2 entries for 3 rows"):
        causal_lm_targets(ids, prompt_length=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must not be negative"):
        causal_lm_targets(ids, prompt_length=-1)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        causal_lm_targets(ids, mask[:, :3])


def test_summaries_predictions_default_targets_and_entropy() -> None:
    """An index keeps (n, 2 T) summaries of the (n, T * vocab) logits: the greedy tokens and the entropies."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, VOCAB, generator=g, dtype=torch.float64)
    summaries = LM.summarize(logits.reshape(3, -1)).numpy()
    assert summaries.shape == (3, 8) and summaries.dtype == np.float32
    np.testing.assert_array_equal(LM.summarize(logits).numpy(), summaries)  # (n, T, vocab) too
    tokens, probabilities = LM.predict(summaries)
    assert probabilities is None and tokens.shape == (3, 4) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, logits.numpy().argmax(2))
    np.testing.assert_array_equal(LM.default_target(summaries), tokens)
    z = logits.numpy()
    p = np.exp(z) / np.exp(z).sum(2, keepdims=True)
    want = -(p * np.log(p)).sum((1, 2))
    got = LM.predictive_entropy(summaries, np.zeros(3))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 summaries
    with pytest.raises(ValueError, match=r"must be \(n, T \* 13\)"):
        LM.summarize(torch.zeros((2, 20)))
    with pytest.raises(ValueError, match=r"summaries must be \(n, 2 T\)"):
        LM.predict(np.zeros((2, 7)))


def test_every_output_kind_is_registered() -> None:
    params = {OutputKind.LM_MARGIN: {"vocab_size": 7}, OutputKind.REGRESSION: {"sigma": 2.0}}
    for kind in OutputKind:
        made = output_function_from_spec(kind.value, params.get(kind, {}))
        assert made.name == kind.value and made.params() == params.get(kind, {})
    with pytest.raises(ValueError, match="bad parameters"):
        output_function_from_spec("lm_margin", {})
