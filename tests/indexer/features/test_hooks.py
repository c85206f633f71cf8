"""The per-layer Kronecker projection from hooks (DESIGN.md 1.7) against explicit matrices.

For every supported layer kind, each block of the features equals ``(R_row (x) R_col)^T vec(G)`` with the
Kronecker product built explicitly from the block's two seeded matrices and G taken from a per-example
autograd loop (one backward per example), to 1e-5 relative in float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from indexer.enums import BlockProjection, Distribution, Uncovered
from indexer.features.hooks import HookFeaturizer
from indexer.features.plan import plan_kronecker
from indexer.features.projection import DenseProjection, KroneckerProjection, LayerBlock
from indexer.features.tasks import ClassificationMargin, OutputFunction

MARGIN = ClassificationMargin()

# the three kinds of block: every layer two-sided; these small layers whole by a count sketch (the default)
# or by a Gaussian matrix (what indexes built before count sketches have)
BLOCK_KINDS = {
    "kronecker": {"small_params": 0},
    "count_sketch": {},
    "dense": {"small_projection": BlockProjection.DENSE},
}


class Flatten(nn.Module):
    """Flatten all but the batch dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class SequenceClassifier(nn.Module):
    """Token embedding (padding index 0) -> position-wise Linear -> masked sum over positions -> logits."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))  # (B, T, 5): a Linear with T > 1 positions
        return self.head((h * mask[..., None]).sum(1))


def per_example_param_grads(
    model: nn.Module, output_fn: OutputFunction, inputs, targets: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """The reference: one forward and one backward per example, plain autograd."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    out = []
    for i in range(len(targets)):
        one = {k: v[i : i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i : i + 1]
        raw = (model(**one) if isinstance(one, dict) else model(one)).reshape(-1)
        grads = torch.autograd.grad(output_fn.output(raw, targets[i]), params, allow_unused=True)
        out.append(
            {
                n: (g if g is not None else torch.zeros_like(p))
                for n, g, p in zip(names, grads, params, strict=True)
            }
        )
    return out


@pytest.fixture
def check_against_explicit(explicit_kronecker):
    """``(model, inputs, targets, k=40, **plan_kw)``: the hooks' blocks equal the explicit reference."""
    return lambda *args, **kwargs: _check_against_explicit(explicit_kronecker, *args, **kwargs)


def _check_against_explicit(
    explicit_kronecker, model: nn.Module, inputs, targets: torch.Tensor, k: int = 40, **plan_kw
) -> None:
    model.eval()
    # every layer two-sided, then (these layers being small) every layer not named by dims whole
    for kind, kind_kw in BLOCK_KINDS.items():
        plan = plan_kronecker(model, k, seed=3, **kind_kw, **plan_kw)
        assert plan.blocks, "the model should have supported layers"
        if kind == "kronecker":
            assert not any(b.whole for b in plan.blocks)
        elif not plan_kw.get("dims"):
            assert all(
                b.projection.value == kind and b.k_col == 1 and b.k <= b.rows * b.cols for b in plan.blocks
            )
        with HookFeaturizer(model, plan) as featurizer:
            got = featurizer.featurize(MARGIN, inputs, targets)
        grads = per_example_param_grads(model, MARGIN, inputs, targets)
        want = explicit_kronecker(plan, grads, with_rest=False)
        k_blocks = sum(b.k for b in plan.blocks)
        assert got.phi.shape == (len(targets), plan.k) and got.phi.dtype == np.float32
        scale = np.abs(want).max()
        np.testing.assert_allclose(got.phi[:, :k_blocks], want, rtol=1e-5, atol=1e-5 * scale)
        logits = (model(**inputs) if isinstance(inputs, dict) else model(inputs)).reshape(len(targets), -1)
        np.testing.assert_allclose(got.model_outputs, logits.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias: bool, check_against_explicit) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6, bias=bias), nn.ReLU(inplace=True), nn.Linear(6, 4, bias=bias))
    check_against_explicit(model, torch.randn(9, 7), torch.randint(0, 4, (9,)))


@pytest.mark.parametrize(
    ("dims", "conv"),
    [
        (1, {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1}),
        (1, {"kernel_size": 2, "stride": 1, "padding": 0, "dilation": 2, "padding_mode": "reflect"}),
        (2, {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 1}),
        (2, {"kernel_size": (2, 3), "stride": (2, 1), "padding": (0, 2), "dilation": (1, 2), "bias": False}),
        (2, {"kernel_size": 3, "padding": "same", "padding_mode": "circular"}),
        (1, {"kernel_size": 4, "padding": "same"}),  # an even kernel: asymmetric zero padding
        (2, {"kernel_size": (2, 4), "padding": "same", "dilation": (1, 2)}),
        (2, {"kernel_size": 3, "padding": "valid", "stride": 2}),
        (3, {"kernel_size": 2, "stride": 1, "padding": 1, "dilation": 1}),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
def test_convolutions(dims: int, conv: dict, check_against_explicit) -> None:
    torch.manual_seed(dims)
    layer = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 3, **conv)
    shape = {1: (2, 12), 2: (2, 8, 7), 3: (2, 5, 4, 6)}[dims]
    x = torch.randn(6, *shape)
    width = layer(x).reshape(6, -1).shape[1]
    model = nn.Sequential(layer, nn.Tanh(), Flatten(), nn.Linear(width, 3))
    check_against_explicit(model, x, torch.randint(0, 3, (6,)))


def test_embedding_with_padding_and_a_sequence_linear_with_a_mask(check_against_explicit) -> None:
    torch.manual_seed(4)
    model = SequenceClassifier()
    ids = torch.randint(1, 11, (7, 5))
    mask = torch.ones(7, 5)
    ids[:3, 3:] = 0  # padded tails: the padding index, masked out
    mask[:3, 3:] = 0
    inputs = {"ids": ids, "mask": mask}
    check_against_explicit(model, inputs, torch.randint(0, 3, (7,)))
    plan = plan_kronecker(model.eval(), 40, seed=3)
    assert [b.layer for b in plan.blocks] == ["embedding", "linear", "linear"]
    # the padding row of the embedding never gets a contribution
    with HookFeaturizer(model, plan) as featurizer:
        padded = featurizer.featurize(MARGIN, inputs, torch.zeros(7, dtype=torch.long)).phi
        alone = featurizer.featurize(
            MARGIN, {"ids": ids[:1, :3], "mask": mask[:1, :3]}, torch.zeros(1, dtype=torch.long)
        )
    np.testing.assert_allclose(padded[0], alone.phi[0], rtol=1e-5, atol=1e-6)


def test_transformers_conv1d(check_against_explicit) -> None:
    transformers_pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(5)
    model = nn.Sequential(transformers_pytorch_utils.Conv1D(6, 7), nn.GELU(), nn.Linear(6, 3))
    check_against_explicit(model, torch.randn(5, 4, 7).mean(1), torch.randint(0, 3, (5,)))


def test_tied_weights_are_one_block_whose_uses_add_up(check_against_explicit) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(9, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(ids)).mean(1))

    torch.manual_seed(6)
    model = Tied()
    plan = plan_kronecker(model, 30, seed=3)
    assert len(plan.blocks) == 1 and plan.blocks[0].params == ("embed.weight",)
    check_against_explicit(model, torch.randint(0, 9, (5, 3)), torch.randint(0, 9, (5,)), k=30)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_features_do_not_depend_on_batch_size_or_seed_reuse(kind: str) -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    plan = plan_kronecker(model, 24, seed=11, **BLOCK_KINDS[kind])
    with HookFeaturizer(model, plan) as f:
        whole = f.featurize(MARGIN, x, y).phi
        ones = np.concatenate([f.featurize(MARGIN, x[i : i + 1], y[i : i + 1]).phi for i in range(64)])
    np.testing.assert_allclose(ones, whole, rtol=1e-5, atol=1e-6)
    again = plan_kronecker(model, 24, seed=11, **BLOCK_KINDS[kind])
    assert again == plan
    with HookFeaturizer(model, again) as f:
        np.testing.assert_array_equal(f.featurize(MARGIN, x, y).phi, whole)
    with HookFeaturizer(model, plan_kronecker(model, 24, seed=12, **BLOCK_KINDS[kind])) as f:
        assert not np.allclose(f.featurize(MARGIN, x, y).phi, whole)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_inner_products_are_preserved_in_expectation(kind: str) -> None:
    """E[<phi_a, phi_b>] = <g_a, g_b> over seeds (DESIGN.md 1.7): the mean over 300 seeds lies within 4
    standard errors of the exact inner product of the whole gradients (every kind of block)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x, y = torch.randn(2, 6), torch.tensor([0, 2])
    g = per_example_param_grads(model, MARGIN, x, y)
    exact = sum(float((g[0][n] * g[1][n]).sum()) for n in g[0])
    products = []
    for seed in range(300):
        with HookFeaturizer(model, plan_kronecker(model, 8, seed=seed, **BLOCK_KINDS[kind])) as f:
            phi = f.featurize(MARGIN, x, y).phi.astype(np.float64)
        products.append(phi[0] @ phi[1])
    mean, se = np.mean(products), np.std(products) / np.sqrt(len(products))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_coverage_names_every_parameter_and_the_rest_block() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    plan = plan_kronecker(model, 64, seed=1)
    record = plan.coverage_json()
    named = dict(model.named_parameters())
    in_blocks = [p for b in record["blocks"] for p in b["params"]]
    in_rest = [p["name"] for p in record["rest"]["params"]]
    assert sorted(in_blocks + in_rest) == sorted(named)  # every parameter, once
    assert in_rest == ["1.weight", "1.bias", "3.weight", "3.bias"]  # batch norm, grouped conv
    assert record["rest"]["treatment"] == "dense" and plan.rest.k >= 1
    assert record["covered_fraction"] == 1.0
    # the rest block is the dense projection of the rest's own per-example gradients
    with HookFeaturizer(model, plan) as f:
        phi = f.featurize(MARGIN, x, y).phi
    grads = per_example_param_grads(model, MARGIN, x, y)
    rest = np.stack([np.concatenate([g[n].reshape(-1).numpy() for n in plan.rest.params]) for g in grads])
    want = DenseProjection(plan.rest.n_params, plan.rest.k, plan.seed, plan.distribution).project(rest)
    np.testing.assert_allclose(phi[:, -plan.rest.k :], want, rtol=1e-4, atol=1e-6)
    omitted = plan_kronecker(model, 64, seed=1, uncovered=Uncovered.OMIT)
    assert omitted.rest.k == 0 and omitted.coverage_json()["rest"]["treatment"] == "omit"
    assert omitted.coverage_json()["covered_fraction"] == pytest.approx(
        1 - plan.rest.n_params / plan.n_params
    )


def test_norm_scales_come_from_their_own_hooks_exactly() -> None:
    """A LayerNorm on a sequence and a BatchNorm1d: the rest block, from the norms' own hooks (no vmap
    pass), is the dense projection of their exact per-example gradients."""
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), Flatten(), nn.Linear(18, 4), nn.BatchNorm1d(4)
    ).eval()
    model[5].running_mean.normal_()
    model[5].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(7, 3, 5), torch.randint(0, 4, (7,))
    plan = plan_kronecker(model, 40, seed=2)
    assert plan.rest.params == ("1.weight", "1.bias", "5.weight", "5.bias")
    with HookFeaturizer(model, plan) as f:
        phi = f.featurize(MARGIN, x, y).phi
        assert f._norm_params == set(plan.rest.params)  # nothing is left for a vmap pass
    grads = per_example_param_grads(model, MARGIN, x, y)
    rest = np.stack([np.concatenate([g[n].reshape(-1).numpy() for n in plan.rest.params]) for g in grads])
    want = DenseProjection(plan.rest.n_params, plan.rest.k, plan.seed, plan.distribution).project(rest)
    np.testing.assert_allclose(phi[:, -plan.rest.k :], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_outputs_modified_in_place_after_their_hook_give_the_gradient_before_the_change(kind: str) -> None:
    """The hooks read d m / d output at the layer's output itself; when a later ``ReLU(inplace=True)``
    overwrites it (a convolution's, a batch norm's, a Linear's), the batch is featurized again with a zero
    added there instead: the features equal those of the same network with out-of-place ReLUs, on the first
    batch and on later ones."""

    def network(inplace: bool) -> nn.Module:
        torch.manual_seed(21)
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(inplace=inplace),
            Flatten(),
            nn.Linear(3 * 4 * 4, 5),
            nn.ReLU(inplace=inplace),
            nn.Linear(5, 3),
        ).eval()
        net[1].running_mean.uniform_(-1.0, 1.0)
        net[1].running_var.uniform_(0.5, 2.0)
        return net

    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))
    plain, overwritten = network(False), network(True)
    plan = plan_kronecker(plain, 40, seed=5, **BLOCK_KINDS[kind])
    assert plan.rest.params == ("1.weight", "1.bias")
    with HookFeaturizer(plain, plan) as f:
        want = f.featurize(MARGIN, x, y).phi
    with HookFeaturizer(overwritten, plan) as f:
        first, again = f.featurize(MARGIN, x, y).phi, f.featurize(MARGIN, x, y).phi
    np.testing.assert_allclose(first, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
    np.testing.assert_array_equal(again, first)


class NoGradBaseline(nn.Module):
    """A Linear and a LayerNorm each also called under ``torch.no_grad`` inside the forward (a baseline
    subtracted): those calls carry no gradient and must contribute nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.c = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            base = self.norm(self.a(x))
        return self.c(torch.tanh(self.norm(self.a(x))) - base)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_calls_under_no_grad_inside_the_forward_contribute_nothing(kind: str, explicit_kronecker) -> None:
    torch.manual_seed(22)
    model = NoGradBaseline().eval()
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    plan = plan_kronecker(model, 40, seed=6, **BLOCK_KINDS[kind])
    with HookFeaturizer(model, plan) as f:
        got = f.featurize(MARGIN, x, y).phi
    want = explicit_kronecker(plan, per_example_param_grads(model, MARGIN, x, y))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_batch_norm_far_from_zero_mean_keeps_its_precision() -> None:
    """A BatchNorm on a raw feature such as a year (running mean 2000, standard deviation 2): its scale's
    per-example gradient is ``sum_t delta_t (x_t - mean) / sigma``, computed with the difference first (as
    ``x / sigma - mean / sigma`` it loses three digits to cancellation)."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    model[0].running_mean.fill_(2000.0)
    model[0].running_var.fill_(4.0)
    x, y = 2000.0 + 2.0 * torch.randn(6, 4), torch.randint(0, 3, (6,))
    plan = plan_kronecker(model, 20, seed=7)
    assert plan.rest.params == ("0.weight", "0.bias")
    with HookFeaturizer(model, plan) as f:
        phi = f.featurize(MARGIN, x, y).phi
    grads = per_example_param_grads(model, MARGIN, x, y)
    rest = np.stack([np.concatenate([g[n].reshape(-1).numpy() for n in plan.rest.params]) for g in grads])
    want = DenseProjection(plan.rest.n_params, plan.rest.k, plan.seed, plan.distribution).project(rest)
    np.testing.assert_allclose(phi[:, -plan.rest.k :], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_a_layer_whose_forward_is_bypassed_gets_no_block() -> None:
    """MultiheadAttention calls its out_proj's weight directly: a probe shows the hook never fires."""
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    fired = {"x"}  # the probe saw only some other module run
    plan = plan_kronecker(attention, 16, fired=fired)
    assert plan.blocks == () and "out_proj.weight" in plan.rest.params


def test_train_mode_and_batch_dimension_are_checked() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    plan = plan_kronecker(model, 4)
    with HookFeaturizer(model, plan) as f, pytest.raises(ValueError, match="train mode"):
        f.featurize(MARGIN, torch.randn(2, 3), torch.tensor([0, 1]))
    wrong = nn.Sequential(nn.Linear(3, 2)).eval()

    class TimeFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = wrong

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.transpose(0, 1)).mean(0)

    model2 = TimeFirst().eval()
    with (
        HookFeaturizer(model2, plan_kronecker(model2, 4)) as f,
        pytest.raises(ValueError, match="batch-first"),
    ):
        f.featurize(MARGIN, torch.randn(2, 5, 3), torch.tensor([0, 1]))


def test_rademacher_entries_and_explicit_dims(check_against_explicit) -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    plan = plan_kronecker(model, 30, distribution=Distribution.RADEMACHER, dims={"0": (3, 4)})
    assert (plan.blocks[0].k_row, plan.blocks[0].k_col) == (3, 4)
    r_row, _ = plan.blocks[0].matrices(plan.seed, plan.distribution)
    np.testing.assert_allclose(np.abs(r_row), 1 / np.sqrt(3), rtol=1e-6)
    check_against_explicit(model, torch.randn(4, 8), torch.randint(0, 3, (4,)), k=30, dims={"0": (3, 4)})
    with pytest.raises(ValueError, match=r"must lie within the gradient shape \(6, 9\)"):
        plan_kronecker(model, 30, dims={"0": (7, 2)})


# bf16 keeps 8 bits of mantissa (0.4% per rounding; the weights themselves are rounded), fp16 keeps 11;
# measured: bf16 3% (two-sided) and 8% (whole blocks) of the largest feature, fp16 0.04%
@pytest.mark.parametrize("kind", BLOCK_KINDS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.1), (torch.float16, 4e-3)])
def test_low_precision_models_accumulate_in_float32(dtype: torch.dtype, tolerance: float, kind: str) -> None:
    """A bf16 or fp16 model: the projected blocks are float32 and close to the float32 model's."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    plan = plan_kronecker(model, 64, **BLOCK_KINDS[kind])
    with HookFeaturizer(model, plan) as f:
        want = f.featurize(MARGIN, x, y).phi
    low = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(dtype)
    with HookFeaturizer(low, plan) as f:
        got = f.featurize(MARGIN, x.to(dtype), y)
    assert got.phi.dtype == np.float32 and got.model_outputs.dtype == np.float32
    assert np.abs(got.phi - want).max() <= tolerance * np.abs(want).max()


@pytest.mark.gpu
def test_features_on_the_gpu_equal_the_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    plan = plan_kronecker(model, 48)
    with HookFeaturizer(model, plan) as f:
        cpu = f.featurize(MARGIN, x, y).phi
    model.cuda()
    with HookFeaturizer(model, plan) as f:
        gpu = f.featurize(MARGIN, x, y).phi  # inputs moved to the model's device by the featurizer
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5 * np.abs(cpu).max())


class TiedByMatmul(nn.Module):
    """A tied head written by hand, ``h @ embedding.weight.T``: a gradient path that no hook sees."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.embed(ids).mean(1))) @ self.embed.weight.T


@pytest.mark.parametrize("case", ["matmul_tie", "scale_grad_by_freq"])
def test_weights_with_gradient_paths_the_hooks_miss_go_to_the_rest_block(
    case: str, tmp_path, explicit_kronecker
) -> None:
    """The build checks every block on a probe example against plain autograd; a mismatch moves the
    weight to the rest block (dense, exact) instead of giving silently wrong features."""
    from indexer.build import build_index
    from indexer.config import IndexConfig
    from indexer.data import Dataset
    from indexer.store.reader import load_index

    torch.manual_seed(14)
    if case == "matmul_tie":
        model, n_classes = TiedByMatmul(), 9
    else:
        model = nn.Sequential(nn.Embedding(9, 4, scale_grad_by_freq=True), Flatten(), nn.Linear(12, 3))
        n_classes = 3
    ids, y = torch.randint(0, 9, (10, 3)), torch.randint(0, n_classes, (10,))
    out = build_index(
        model, MARGIN, Dataset(ids, y), tmp_path / "x", config=IndexConfig(k=24), progress=False
    )
    coverage = load_index(out).manifest.projection.coverage or {}
    assert "embed.weight" in [p["name"] for p in coverage["rest"]["params"]] or "0.weight" in [
        p["name"] for p in coverage["rest"]["params"]
    ]
    plan = KroneckerProjection.from_coverage_json(0, "gaussian", coverage)
    with HookFeaturizer(model.eval(), plan) as f:
        phi = f.featurize(MARGIN, ids, y).phi
    grads = per_example_param_grads(model, MARGIN, ids, y)
    want_blocks = explicit_kronecker(plan, grads, with_rest=False)
    k_blocks = sum(b.k for b in plan.blocks)
    np.testing.assert_allclose(
        phi[:, :k_blocks], want_blocks, rtol=1e-5, atol=1e-6 * np.abs(want_blocks).max()
    )
    rest = np.stack([np.concatenate([g[n].reshape(-1).numpy() for n in plan.rest.params]) for g in grads])
    want_rest = DenseProjection(plan.rest.n_params, plan.rest.k, plan.seed, plan.distribution).project(rest)
    np.testing.assert_allclose(phi[:, k_blocks:], want_rest, rtol=1e-4, atol=1e-6 * np.abs(want_rest).max())


def test_a_block_whose_layer_never_runs_is_an_error() -> None:
    attention = nn.MultiheadAttention(4, 2, batch_first=True).eval()

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attention(x, x, x)[0].mean(1))

    model = SelfAttention().eval()
    unprobed = plan_kronecker(model, 32)  # without a probe, out_proj (bypassed by its parent) gets a block
    with (
        HookFeaturizer(model, unprobed) as f,
        pytest.raises(ValueError, match="out_proj.weight' did not run"),
    ):
        f.featurize(MARGIN, torch.randn(2, 5, 4), torch.tensor([0, 1]))


def test_tuple_and_dict_outputs_give_their_logits() -> None:
    class Pair(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.layer, self.as_dict = nn.Linear(3, 2), as_dict

        def forward(self, x: torch.Tensor):
            logits = self.layer(x)
            return {"logits": logits} if self.as_dict else (logits, x)

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    for as_dict in (False, True):
        model = Pair(as_dict).eval()
        with HookFeaturizer(model, plan_kronecker(model, 6)) as f:
            got = f.featurize(MARGIN, x, y)
        np.testing.assert_allclose(got.model_outputs, model.layer(x).detach().numpy(), rtol=1e-6)


def test_threads_featurizing_through_a_vmap_rest_block_get_the_single_thread_answer() -> None:
    """A grouped convolution is in the rest block (a vmap pass, which swaps the module's parameters):
    concurrent batches are featurized one at a time and give the single-thread features."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.ReLU(), Flatten(), nn.Linear(4 * 6, 3)).eval()
    xs = [torch.randn(3, 2, 8) for _ in range(12)]
    y = torch.tensor([0, 1, 2])
    with HookFeaturizer(model, plan_kronecker(model, 24)) as f:
        want = [f.featurize(MARGIN, x, y).phi for x in xs]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda x: f.featurize(MARGIN, x, y).phi, xs))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_layer_on_an_input_shared_by_the_batch_gets_per_example_gradients(check_against_explicit) -> None:
    """A position embedding called once on `(1, T)` position ids, its output broadcast over the batch (as in
    GPT-2): each example's block is still its own gradient's projection."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(9, 4)
            self.positions = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            where = torch.arange(ids.shape[1])[None]  # (1, T): one call for the whole batch
            return self.head(torch.tanh(self.tokens(ids) + self.positions(where)).mean(1))

    torch.manual_seed(16)
    check_against_explicit(Positions(), torch.randint(0, 9, (6, 5)), torch.randint(0, 3, (6,)), k=30)


def test_small_layers_are_projected_whole_and_large_ones_stay_two_sided(explicit_kronecker) -> None:
    """The plan's threshold: a gradient of at most ``small_params`` entries (both sides at most 4096) is one
    whole block of its share (at most rows x cols features; a count sketch, or a Gaussian R on request), a
    larger one two-sided; ``dims`` forces two-sided; the manifest's record says which, and a record from
    before whole blocks reads as two-sided."""
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10), nn.ReLU(), nn.Linear(10, 2))
    plan = plan_kronecker(model, 512, small_params=10_000)
    big, mid, small = plan.blocks  # 200 x 301 = 60,200; 10 x 201 = 2,010; 2 x 11 = 22 entries
    assert not big.whole and big.k_row * big.k_col == big.k and big.k_row < 200
    assert mid.whole and (mid.k_row, mid.k_col) == (mid.k, 1) and mid.k <= 2010
    assert small.whole and small.k == 22  # its whole gradient: no more features than entries
    assert plan.k <= 512 and plan.k >= 500
    records = [b["projection"] for b in plan.coverage_json()["blocks"]]
    assert records == ["kronecker", "count_sketch", "count_sketch"]
    assert LayerBlock.from_json(mid.to_json()) == mid
    legacy = {key: value for key, value in big.to_json().items() if key != "projection"}
    assert LayerBlock.from_json(legacy) == big
    with pytest.raises(ValueError, match="'kronecker', 'count_sketch', 'dense'"):
        LayerBlock.from_json({**legacy, "projection": "sparse"})
    gaussian = plan_kronecker(model, 512, small_params=10_000, small_projection="dense")
    assert [b.projection for b in gaussian.blocks] == [
        BlockProjection.KRONECKER,
        *[BlockProjection.DENSE] * 2,
    ]
    assert LayerBlock.from_json(gaussian.blocks[1].to_json()) == gaussian.blocks[1]
    forced = plan_kronecker(model, 512, small_params=10_000, dims={"2": (5, 20)})
    assert not forced.blocks[1].whole and (forced.blocks[1].k_row, forced.blocks[1].k_col) == (5, 20)
    assert not any(b.whole for b in plan_kronecker(model, 512, small_params=0).blocks)
    wide = nn.Sequential(nn.Linear(5000, 1))  # 5,001 entries, but a side above 4096
    assert not plan_kronecker(wide, 64, small_params=10_000).blocks[0].whole
    with pytest.raises(ValueError, match="small_params must be 0 or more"):
        plan_kronecker(model, 64, small_params=-1)
    with pytest.raises(ValueError, match="small_projection is count_sketch or dense"):
        plan_kronecker(model, 64, small_projection="kronecker")
    # the hooks give R^T vec(G) for the whole blocks and the two-sided product for the big one
    x, y = torch.randn(6, 300), torch.randint(0, 2, (6,))
    for p in (plan, gaussian):
        with HookFeaturizer(model.eval(), p) as f:
            got = f.featurize(MARGIN, x, y).phi
        want = explicit_kronecker(p, per_example_param_grads(model, MARGIN, x, y))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(got).max())


def test_a_count_sketch_is_one_signed_entry_per_gradient_entry() -> None:
    """The count sketch's R: each row (gradient entry) holds exactly one +-1, in a column within [0, k), the
    same for the same (seed, name) and independent across names and seeds; its columns are used evenly (a
    chi-square check: 2,010 entries over 100 columns)."""
    block = LayerBlock(
        "2.weight", "linear", ("2.weight", "2.bias"), 10, 201, 100, 1, BlockProjection.COUNT_SKETCH
    )
    columns, signs = block.count_sketch(4)
    r = block.whole_matrix(4, Distribution.GAUSSIAN)
    assert r is not None and r.shape == (2010, 100) and r.dtype == np.float32
    np.testing.assert_array_equal(np.abs(r).sum(1), np.ones(2010))
    np.testing.assert_array_equal(r[np.arange(2010), columns], signs)
    assert set(np.unique(signs)) == {-1.0, 1.0} and columns.min() >= 0 and columns.max() < 100
    again = block.count_sketch(4)
    np.testing.assert_array_equal(again[0], columns)
    np.testing.assert_array_equal(again[1], signs)
    other = dataclasses.replace(block, name="0.weight")
    assert (other.count_sketch(4)[0] != columns).mean() > 0.9
    assert (block.count_sketch(5)[0] != columns).mean() > 0.9
    counts = np.bincount(columns, minlength=100)
    chi2 = ((counts - 20.1) ** 2 / 20.1).sum()  # 99 degrees of freedom: 99 +- 14
    assert 40 < chi2 < 170, chi2
    with pytest.raises(ValueError, match="not count_sketch"):
        LayerBlock("w", "linear", ("w",), 2, 2, 2, 2).count_sketch(0)
    with pytest.raises(ValueError, match="two-sided"):
        LayerBlock("w", "linear", ("w",), 2, 2, 2, 2).whole_matrix(0, Distribution.GAUSSIAN)
    # the projection may be given by its value; an unknown one is refused with the allowed values
    named = LayerBlock("w", "linear", ("w",), 2, 2, 4, 1, "count_sketch")  # type: ignore[arg-type]
    assert named.projection is BlockProjection.COUNT_SKETCH and named.whole
    with pytest.raises(ValueError, match="'kronecker', 'count_sketch', 'dense'"):
        LayerBlock("w", "linear", ("w",), 2, 2, 4, 1, "sparse")
    # R^T vec(G) without forming R equals the product with the matrix
    g = np.random.default_rng(0).standard_normal(2010)
    np.testing.assert_allclose(block.project_whole(g, 4, Distribution.GAUSSIAN), g @ r.astype(np.float64))


def test_whole_blocks_hold_no_identity_matrices() -> None:
    """A whole Linear block's sides are never multiplied, so the featurizer holds no `(rows, rows)` or
    `(cols, cols)` identity for it (a Linear(4095, 16) would hold 64 MiB); a two-sided block holds its two
    seeded matrices."""
    model = nn.Sequential(nn.Linear(4095, 16), nn.Tanh(), nn.Linear(16, 5000)).eval()  # 5,000 rows: two-sided
    plan = plan_kronecker(model, 64, small_params=65_536)
    assert [b.whole for b in plan.blocks] == [True, False]
    with pytest.raises(ValueError, match="projected whole: it has no side matrices"):
        plan.blocks[0].matrices(plan.seed, plan.distribution)
    with HookFeaturizer(model, plan) as f:
        assert [m.numel() for m in f.matrices[0]] == [0, 0]
        assert [tuple(m.shape) for m in f.matrices[1]] == [
            (5000, plan.blocks[1].k_row), (17, plan.blocks[1].k_col)
        ]  # fmt: skip
