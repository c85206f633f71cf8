"""The ``gpt`` model factory: shapes, causality and full Kronecker coverage of its weight matrices."""

from __future__ import annotations

import pytest
import torch

from indexer.features.models import ModelSpec, build_model


def test_gpt_is_causal_and_batch_first() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("gpt", {"vocab_size": 50, "max_len": 8, "d_model": 16, "n_layer": 1}))
    ids = torch.randint(0, 50, (3, 8))
    logits = model(ids)
    assert logits.shape == (3, 8, 50)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 50
    # positions before the change see nothing of it (causal attention)
    torch.testing.assert_close(model(changed)[:, :5], logits[:, :5])
    assert not torch.allclose(model(changed)[:, 5:], logits[:, 5:])
    # each example alone gives its own logits (no interaction across the batch)
    torch.testing.assert_close(model(ids[1:2]), logits[1:2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sequences of 9 tokens exceed the model's 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="d_model 16 must be divisible by n_head 3"):
        build_model(ModelSpec("gpt", {"vocab_size": 50, "d_model": 16, "n_head": 3}))
