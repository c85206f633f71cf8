"""Helpers of the quality harness's stages: removal sets, the random floor, the model context."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.quality.setting import quick_config, split_queries
from benchmarks.quality.stages import RANDOM, HarnessError, StageContext
from benchmarks.quality.stages.base import Retrains, accuracy
from benchmarks.quality.stages.removal import removal_masks, top_k, top_k_masks, with_random_floor

CONFIG = dataclasses.replace(quick_config(), n_train=200, k=32, epochs=1)


def test_top_k_masks_remove_each_rows_highest_scores() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, 2.0, 1.0]])
    masks = top_k_masks(scores, 2, 4)
    np.testing.assert_array_equal(masks, [[True, False, True, False], [False, True, False, True]])


def test_top_k_orders_by_score_and_breaks_ties_by_column() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, 2.0, 1.0]])
    np.testing.assert_array_equal(top_k(scores, 3), [[1, 3, 2], [0, 2, 3]])


def test_removal_masks_drop_exactly_each_sets_members() -> None:
    masks = removal_masks([np.array([0, 2]), np.array([], dtype=np.int64), np.array([3])], 4)
    np.testing.assert_array_equal(
        masks, [[False, True, False, True], [True, True, True, True], [True, True, True, False]]
    )


def test_random_floor_comes_last_and_repeats(tmp_path) -> None:
    train, queries = split_queries(CONFIG)
    ctx = StageContext("mlp", CONFIG, train, queries, tmp_path, chunk=4)
    signed = {"a": np.zeros((CONFIG.n_counterfactual, CONFIG.n_train))}
    first, second = with_random_floor(ctx, signed), with_random_floor(ctx, signed)
    assert list(first) == ["a", RANDOM]
    assert first[RANDOM].shape == (CONFIG.n_counterfactual, CONFIG.n_train)
    np.testing.assert_array_equal(first[RANDOM], second[RANDOM])
    assert len(ctx.evaluation) == len(queries.eval_rows) and len(ctx.validation) == len(
        queries.validation_rows
    )
    np.testing.assert_array_equal(ctx.labels, queries.test.targets.numpy())


def test_retrains_refuse_masks_without_a_seed_each(tmp_path) -> None:
    train, queries = split_queries(CONFIG)
    jobs = StageContext("mlp", CONFIG, train, queries, tmp_path, chunk=4).retrains()
    assert isinstance(jobs, Retrains)
    assert jobs.add(np.ones((2, CONFIG.n_train), dtype=bool), 0) == slice(0, 2)
    with pytest.raises(HarnessError, match="different number of seeds"):
        jobs.add(np.ones((2, CONFIG.n_train), dtype=bool), [1, 2, 3])


def test_accuracy_is_the_share_of_correct_argmax() -> None:
    logits = np.array([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])  # (1, 3, 2)
    np.testing.assert_allclose(accuracy(logits, np.array([1, 1, 1])), [2 / 3])
