"""Foundations of the attribution-quality harness: LDS, noise ceiling and batched subset retraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.quality import retrain
from benchmarks.quality.lds import lds, noise_ceiling, per_query_spearman, random_subsets
from benchmarks.quality.retrain import (
    RetrainConfig,
    margins,
    retrain_margins,
    stacked_margins,
    train_alone,
    train_stacked,
)
from indexer.data import Dataset
from indexer.demo.mnist import load_mnist_sample
from indexer.features.tasks import ClassificationMargin

N_TRAIN, N_QUERY = 200, 16
CONFIG = RetrainConfig(epochs=2)


@pytest.fixture(scope="module")
def tiny() -> tuple[Dataset, Dataset]:
    train, test = load_mnist_sample(n_train=4000, seed=0)
    return (
        Dataset(train.inputs[:N_TRAIN], train.targets[:N_TRAIN]),
        Dataset(test.inputs[:N_QUERY], test.targets[:N_QUERY]),
    )


# ---- LDS ---------------------------------------------------------------------------------------


def test_random_subsets_shape_size_and_seed() -> None:
    masks = random_subsets(100, 7, 0.3, seed=1)
    assert masks.shape == (7, 100) and masks.dtype == np.bool_
    assert (masks.sum(1) == 30).all()
    assert np.array_equal(masks, random_subsets(100, 7, 0.3, seed=1))
    assert not np.array_equal(masks, random_subsets(100, 7, 0.3, seed=2))
    with pytest.raises(ValueError):
        random_subsets(100, 3, 0.0, seed=0)


def test_lds_of_a_perfect_linear_predictor_is_one() -> None:
    rng = np.random.default_rng(0)
    masks = random_subsets(300, 40, 0.5, seed=0)
    w = rng.normal(size=(12, 300))  # (n_query, n_train)
    outputs = masks @ w.T  # (M, n_query): exactly the summed scores
    result = lds(w, masks, outputs)
    assert result.n_excluded == 0
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    # any strictly increasing transform of the outputs keeps the rank correlation at 1
    assert lds(w, masks, np.exp(outputs / 10)).mean == pytest.approx(1.0, abs=1e-12)


def test_lds_of_random_scores_is_about_zero() -> None:
    rng = np.random.default_rng(1)
    m, n_query = 50, 200
    masks = random_subsets(300, m, 0.5, seed=1)
    outputs = masks @ rng.normal(size=(300, n_query))
    result = lds(rng.normal(size=(n_query, 300)), masks, outputs)
    # each per-query Spearman under independence has sd ~ 1/sqrt(M - 1); the mean of n_query of them
    # has sd ~ 1/sqrt((M - 1) n_query) = 0.0101 here; allow 4 sd
    tolerance = 4 / math.sqrt((m - 1) * n_query)
    assert abs(result.mean) < tolerance
    assert result.per_query.std() == pytest.approx(1 / math.sqrt(m - 1), rel=0.25)


def test_constant_columns_are_excluded_and_counted() -> None:
    rng = np.random.default_rng(2)
    masks = random_subsets(50, 20, 0.5, seed=2)
    scores = rng.normal(size=(3, 50))
    outputs = masks @ scores.T
    outputs[:, 1] = 7.0  # constant output
    scores[2] = 1.0  # every subset has the same size, so summed scores are constant
    result = lds(scores, masks, outputs)
    assert result.n_excluded == 2
    assert np.isnan(result.per_query[1]) and np.isnan(result.per_query[2])
    assert result.mean == pytest.approx(1.0)


def test_spearman_matches_scipy() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 5))
    b = a + rng.normal(size=(30, 5))
    b[:4, 0] = b[4, 0]  # ties
    ours = per_query_spearman(a, b).per_query
    ref = [spearmanr(a[:, q], b[:, q]).statistic for q in range(5)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_noise_ceiling_of_identical_and_independent_seeds() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(40, 10))
    assert noise_ceiling(a, a).mean == pytest.approx(1.0)
    assert abs(noise_ceiling(a, rng.normal(size=(40, 10))).mean) < 4 / math.sqrt(39 * 10)


# ---- retraining --------------------------------------------------------------------------------


def test_margin_matches_classification_margin() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 25, 10) * 5
    labels = torch.randint(0, 10, (25,))
    # ClassificationMargin.output broadcasts over leading axes: a batch of labels is (n,)
    ref = torch.stack([ClassificationMargin().output(logits[i], labels) for i in range(3)])
    torch.testing.assert_close(margins(logits, labels), ref)
    # sigmoid(margin) is the softmax probability of the label
    p = torch.softmax(logits, -1)[:, torch.arange(25), labels]
    torch.testing.assert_close(torch.sigmoid(margins(logits, labels)), p, atol=1e-6, rtol=1e-5)


def test_batched_retraining_equals_training_each_model_alone(tiny: tuple[Dataset, Dataset]) -> None:
    train, query = tiny
    masks = random_subsets(N_TRAIN, 3, 0.5, seed=0)
    masks[1, :60] = True  # a larger subset: takes more steps per epoch than the others
    masks[2] = False
    masks[2, :20] = True  # a partial single batch
    seeds = np.array([5, 6, 7])
    base, params = train_stacked(train.inputs, train.targets, masks, seeds, CONFIG)
    batched = stacked_margins(base, params, query.inputs, query.targets)
    assert batched.shape == (3, N_QUERY)
    for m in range(3):
        model = train_alone(train, masks[m], int(seeds[m]), CONFIG)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(params[name][m], value, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            alone = ClassificationMargin().output(model(query.inputs), query.targets)
        torch.testing.assert_close(batched[m], alone, atol=1e-4, rtol=1e-4)


CNN_CONFIG = RetrainConfig(epochs=2, batch_size=16, hidden=(8,), channels=(2, 4))
PRE_BATCH_NORM = {"1.bias", "5.bias", "2.running_mean", "6.running_mean"}
"""A convolution's bias before BatchNorm has a zero gradient up to rounding, which Adam scales up to steps
of size lr; it and the running means that absorb it are seed-noise, not the stack's doing."""


def test_batched_cnn_retraining_equals_training_each_model_alone(tiny: tuple[Dataset, Dataset]) -> None:
    train, query = tiny
    masks = random_subsets(N_TRAIN, 3, 0.3, seed=1)  # 60 rows each: 3 full batches and one of 12
    seeds = np.array([2, 3, 4])
    base, state = train_stacked(train.inputs, train.targets, masks, seeds, CNN_CONFIG)
    assert {"2.running_var", "6.num_batches_tracked"} <= set(state)
    batched = retrain.stacked_logits(base, state, query.inputs)  # eval mode: the running statistics
    for m in range(3):
        model = train_alone(train, masks[m], int(seeds[m]), CNN_CONFIG)
        alone_state = model.state_dict()
        assert int(state["2.num_batches_tracked"][m]) == int(alone_state["2.num_batches_tracked"]) == 8
        for name, value in alone_state.items():
            if name not in PRE_BATCH_NORM:
                torch.testing.assert_close(state[name][m], value, atol=2e-5, rtol=1e-4)
        stacked_model = CNN_CONFIG.build()
        stacked_model.load_state_dict({name: value[m] for name, value in state.items()})
        with torch.no_grad():
            eval_stacked, eval_alone = stacked_model.eval()(query.inputs), model.eval()(query.inputs)
            # in training mode a batch's own statistics cancel the pre-BatchNorm bias: the stacked model
            # and the one trained alone compute the same function there (this forward updates their
            # running statistics, so it comes after the eval-mode ones)
            torch.testing.assert_close(
                stacked_model.train()(query.inputs), model.train()(query.inputs), atol=1e-4, rtol=1e-4
            )
        torch.testing.assert_close(batched[m], eval_stacked, atol=1e-5, rtol=1e-5)
        # in eval mode the bias noise (about lr per step) stays
        torch.testing.assert_close(batched[m], eval_alone, atol=2e-2, rtol=0)


def test_a_batch_norm_model_stacks_only_subsets_of_one_size(tiny: tuple[Dataset, Dataset]) -> None:
    train, _ = tiny
    masks = random_subsets(N_TRAIN, 2, 0.3, seed=1)
    masks[1, :100] = True
    with pytest.raises(ValueError, match="one size"):
        train_stacked(train.inputs, train.targets, masks, np.array([0, 1]), CNN_CONFIG)
    order = [("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 4)]
    sizes = np.array([10, 10, 20, 20, 20])
    assert retrain._chunks(order, sizes, 2, one_size=True) == [order[:2], order[2:4], order[4:]]
    assert retrain._chunks(order, sizes, 3, one_size=False) == [order[:3], order[3:]]


def test_cnn_retrains_through_the_cache_match_the_stack(tiny: tuple[Dataset, Dataset], tmp_path) -> None:
    train, query = tiny
    masks = np.concatenate([random_subsets(N_TRAIN, 2, 0.3, seed=1), random_subsets(N_TRAIN, 1, 0.4, seed=2)])
    seeds = np.array([2, 3, 4])
    logits = retrain.retrain_logits(train, query.inputs, masks, seeds, CNN_CONFIG, tmp_path, chunk_size=8)
    for m in (0, 2):  # two sizes: trained in two chunks
        base, state = train_stacked(
            train.inputs, train.targets, masks[m : m + 1], seeds[m : m + 1], CNN_CONFIG
        )
        alone = retrain.stacked_logits(base, state, query.inputs)[0]
        # 2e-2: the pre-BatchNorm bias noise (see PRE_BATCH_NORM) differs between stacks of 2 and of 1
        np.testing.assert_allclose(logits[m], alone, atol=2e-2)
    assert np.abs(logits[0] - logits[2]).max() > 0.1  # another subset is far outside that tolerance
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_seed_changes_the_model_and_repeats_exactly(tiny: tuple[Dataset, Dataset]) -> None:
    train, query = tiny
    masks = np.repeat(random_subsets(N_TRAIN, 1, 0.5, seed=3), 3, axis=0)
    out = retrain_margins(train, query, masks, np.array([0, 0, 1]), CONFIG)
    assert np.array_equal(out[0], out[1])
    assert not np.allclose(out[0], out[2])


def test_cache_reuses_finished_retrains(tiny: tuple[Dataset, Dataset], tmp_path, monkeypatch) -> None:
    train, query = tiny
    masks = random_subsets(N_TRAIN, 3, 0.5, seed=1)
    seeds = np.arange(3)
    first = retrain_margins(train, query, masks, seeds, CONFIG, cache_dir=tmp_path, chunk_size=2)
    assert len(list(tmp_path.glob("*.npz"))) == 3  # one file per retrained model
    with np.load(next(tmp_path.glob("*.npz")), allow_pickle=False) as cached:
        assert cached["logits"].dtype == np.float32 and cached["logits"].shape == (N_QUERY, 10)
    # a subset of the same (mask, seed) pairs, in another order and with a duplicate, is all cache hits
    monkeypatch.setattr(retrain, "_train_chunk", lambda *a, **k: (_ for _ in ()).throw(AssertionError("x")))
    again = retrain_margins(train, query, masks[[2, 0, 2]], seeds[[2, 0, 2]], CONFIG, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first[[2, 0, 2]])
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise AssertionError("retrained although the result was cached")

    monkeypatch.setattr(retrain, "_train_chunk", fail)
    second = retrain_margins(train, query, masks, seeds, CONFIG, cache_dir=tmp_path, chunk_size=2)
    np.testing.assert_array_equal(first, second)
    # a different seed, epoch count or data is a different key, so it would retrain
    with pytest.raises(AssertionError, match="retrained"):
        retrain_margins(train, query, masks, seeds + 1, CONFIG, cache_dir=tmp_path, chunk_size=2)
    with pytest.raises(AssertionError, match="retrained"):
        retrain_margins(train, query, masks, seeds, RetrainConfig(epochs=3), cache_dir=tmp_path, chunk_size=2)
    other_query = Dataset(query.inputs + 0.5, query.targets)  # the cache holds logits at these inputs
    with pytest.raises(AssertionError, match="retrained"):
        retrain_margins(train, other_query, masks, seeds, CONFIG, cache_dir=tmp_path, chunk_size=2)


def test_duplicate_rows_are_trained_once_and_a_corrupt_cache_file_is_retrained(
    tiny: tuple[Dataset, Dataset], tmp_path, monkeypatch
) -> None:
    train, query = tiny
    masks = np.repeat(random_subsets(N_TRAIN, 1, 0.5, seed=4), 2, axis=0)
    calls = []
    real = retrain._train_chunk
    monkeypatch.setattr(retrain, "_train_chunk", lambda *a: calls.append(len(a[2])) or real(*a))
    out = retrain_margins(train, query, masks, np.array([3, 3]), CONFIG, cache_dir=tmp_path)
    assert calls == [1] and np.array_equal(out[0], out[1])
    (cached,) = tmp_path.glob("*.npz")
    cached.write_bytes(b"not an npz")
    again = retrain_margins(train, query, masks[:1], np.array([3]), CONFIG, cache_dir=tmp_path)
    assert calls == [1, 1]
    np.testing.assert_array_equal(again[0], out[0])


def test_bad_masks_are_rejected(tiny: tuple[Dataset, Dataset]) -> None:
    train, query = tiny
    with pytest.raises(ValueError, match="bool"):
        retrain_margins(train, query, np.ones((2, N_TRAIN), dtype=int), np.arange(2), CONFIG)
    with pytest.raises(ValueError, match="at least one"):
        retrain_margins(train, query, np.zeros((2, N_TRAIN), dtype=bool), np.arange(2), CONFIG)
