"""An index of a transformers GPT-2 language model (the optional ``transformers`` extra; skipped without it).

A tiny ``GPT2LMHeadModel`` from a seeded ``GPT2Config`` (2 layers, 32 wide, 100 tokens; nothing downloaded),
padded dict batches with attention masks, the language-model margin: the build covers every Conv1D with a
Kronecker block, keeps the tied input embedding and head as one block, and its features equal the explicit
projection of per-example autograd gradients (float64) on every example.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import StreamedDataset
from indexer.features.language import LanguageModelMargin, causal_lm_targets
from indexer.features.projection import KroneckerProjection
from indexer.store.reader import load_index

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, N = 100, 10, 10


class Tokenized(torch.utils.data.Dataset):
    """Dict examples as a tokenizer and collator give them (``labels`` already aligned)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.mask, self.targets = ids, mask, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.targets[i]}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def reference_gradients(
    model: torch.nn.Module, data: Tokenized, lm: LanguageModelMargin
) -> list[dict[str, torch.Tensor]]:
    """One example at a time, plain autograd in float64: name -> gradient per example."""
    model = copy.deepcopy(model).double()
    named = dict(model.named_parameters())  # the tied head is not listed: its use adds to wte's gradient
    grads = []
    for i in range(len(data)):
        logits = model(input_ids=data.ids[i : i + 1], attention_mask=data.mask[i : i + 1]).logits
        values = torch.autograd.grad(lm.output(logits[0], data.targets[i]), list(named.values()))
        grads.append(dict(zip(named, values, strict=True)))
    return grads


def test_a_gpt2_index(tmp_path: Path, explicit_kronecker) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (N, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0  # right padding
    ids[mask == 0] = 0
    data = Tokenized(ids, mask, causal_lm_targets(ids, mask, prompt_length=3))
    model, lm = tiny_gpt2(), LanguageModelMargin(VOCAB)
    out = build_index(
        model,
        lm,
        StreamedDataset(data),
        tmp_path / "gpt2",
        config=IndexConfig(k=256, batch_size=4),  # batches of 4, 4, 2: position ids (1, T) shared by each
        progress=False,
    )
    index = load_index(out)
    coverage = index.manifest.projection.coverage or {}
    blocks = {b["name"]: b["layer"] for b in coverage["blocks"]}
    conv1d = [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert all(blocks[name] == "gpt2_conv1d" for name in conv1d)
    # the tied head (lm_head, an nn.Linear on wte's weight) passes the probe check: one block, both uses
    assert blocks["transformer.wte.weight"] == "embedding" and blocks["transformer.wpe.weight"] == "embedding"
    assert len(blocks) == len(conv1d) + 2
    rest = [p["name"] for p in coverage["rest"]["params"]]
    assert rest and all(".ln_" in name for name in rest)  # the layer norms, from their own hooks
    assert coverage["covered_fraction"] == 1.0
    info = index.manifest.model
    assert info.input_dtypes == {"input_ids": "int64", "attention_mask": "int64"}
    assert (info.n_outputs, info.target_shape) == (LENGTH * VOCAB, (LENGTH,))

    plan = KroneckerProjection.from_coverage_json(0, "gaussian", coverage)
    want = explicit_kronecker(plan, reference_gradients(model, data, lm))
    np.testing.assert_allclose(index.phi, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())  # float16
    with torch.no_grad():
        logits = model(input_ids=data.ids, attention_mask=data.mask).logits.reshape(N, -1)
    np.testing.assert_allclose(index.examples["model_output"], lm.summarize(logits), rtol=1e-5)
    beta, grad_term = lm.likelihood_terms(logits, data.targets, torch.zeros(N))
    np.testing.assert_allclose(index.surrogate.beta, beta, rtol=1e-12)
    np.testing.assert_allclose(index.surrogate.grad_term, grad_term, rtol=1e-12)
