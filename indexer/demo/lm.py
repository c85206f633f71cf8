"""The text demo: a small GPT-style language model trained on the standard library's docstrings, indexed.

Everything is local and seeded: the passages come from the running interpreter's standard library
(:func:`~indexer.demo.text.stdlib_passages`), the byte-level BPE tokenizer is trained on the training
passages, the model (the built-in ``gpt`` factory) is trained with
:func:`~indexer.demo.train.train_language_model`. Tokenizer and weights are cached under
``<index_root>/../cache/``, so only the first build trains (a few minutes on 2 cores).

Each training passage is one example: its first :data:`MAX_LEN` tokens, every next token a target
(:func:`~indexer.features.language.causal_lm_targets`), explained with ``lm_margin`` (DESIGN.md 1.8). The
index stores the tokenizer (``tokenizer.json``) and, as each example's metadata ``text``, the passage as the
model read it (decoded from its tokens), so the service answers text queries with training text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.text import encode_passages, stdlib_passages, train_tokenizer
from indexer.demo.train import built_with, train_language_model
from indexer.features.language import LanguageModelMargin, causal_lm_targets, load_tokenizer
from indexer.features.models import ModelSpec, build_model, load_checkpoint, save_checkpoint

__all__ = [
    "MAX_LEN",
    "N_QUERY",
    "PAD_ID",
    "TEXT_DEMO_NAME",
    "TEXT_DEMO_SPEC",
    "VOCAB_SIZE",
    "build_text_demo_index",
    "text_demo_data",
]

TEXT_DEMO_NAME = "stdlib-lm"
"""Index name of the text demo."""

VOCAB_SIZE = 1024
"""Tokenizer vocabulary and logit width."""

MAX_LEN = 64
"""Tokens per example (the model's context)."""

PAD_ID = 0
"""Token id of ``<pad>`` (:func:`~indexer.demo.text.train_tokenizer`)."""

N_QUERY = 200
"""Held-out passages stored as queries."""

TEXT_DEMO_SPEC = ModelSpec(
    "gpt", {"vocab_size": VOCAB_SIZE, "max_len": MAX_LEN, "d_model": 128, "n_layer": 2}
)
"""The demo's model: 667,136 parameters."""


def text_demo_data(tokenizer: object, passages: list[str], seed: int = 0) -> tuple[Dataset, Dataset]:
    """The demo's training examples and stored queries: passages shuffled by ``seed``, the first
    :data:`N_QUERY` held out.

    Returns:
        ``(train, queries)``: inputs `(n, MAX_LEN)` int64 token ids (right-padded with ``<pad>``, id 0),
        targets `(n, MAX_LEN)` int64 next tokens (-100 at padding and the last position), metadata
        ``{"text": the passage as the model reads it, "passage": its row in the shuffled corpus}``.
    """
    order = np.random.default_rng(seed).permutation(len(passages))

    def part(rows: np.ndarray) -> Dataset:
        texts = [passages[r] for r in rows]
        ids, mask = encode_passages(tokenizer, texts, MAX_LEN)
        read = tokenizer.decode_batch(  # type: ignore[attr-defined]
            [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
        )
        return Dataset(
            inputs=ids,
            targets=causal_lm_targets(ids, mask),
            metadata=[{"text": text, "passage": int(r)} for text, r in zip(read, rows, strict=True)],
        )

    return part(order[N_QUERY:]), part(order[:N_QUERY])


def build_text_demo_index(
    index_root: Path,
    k: int = IndexConfig.k,
    seed: int = 0,
    steps: int = 800,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or load from the cache) the text demo's tokenizer and language model; index the passages.

    An existing, readable index with the same settings (the Python version included: the passages are its
    standard library's) is kept unless ``force``.

    Args:
        index_root: folder of indexes; the index goes to ``<index_root>/stdlib-lm``.
        k: projected dimension; seed: split, tokenizer, training and projection seed; steps: optimiser
            steps of 32 passages.
        force: rebuild even if a matching index exists.
        progress: show progress bars.

    Returns:
        The index folder.
    """
    index_root = Path(index_root)
    out_dir = index_root / TEXT_DEMO_NAME
    config = IndexConfig(k=k, seed=seed)
    settings = {
        "k": k,
        "seed": seed,
        "steps": steps,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "projection": config.projection.value,
        "small_layer_params": config.small_layer_params,
    }
    if not force and built_with(out_dir, settings):
        return out_dir
    passages = stdlib_passages()
    cache = index_root.parent / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{TEXT_DEMO_NAME}-py{settings['python']}-seed{seed}"
    tokenizer_file = cache / f"{stem}-tokenizer.json"
    order = np.random.default_rng(seed).permutation(len(passages))
    if not tokenizer_file.is_file():
        trained = train_tokenizer([passages[r] for r in order[N_QUERY:]], VOCAB_SIZE)
        trained.save(str(tokenizer_file))  # type: ignore[attr-defined]
    tokenizer = load_tokenizer(tokenizer_file, VOCAB_SIZE)
    train, queries = text_demo_data(tokenizer, passages, seed)
    checkpoint = cache / f"{stem}-steps{steps}.safetensors"
    torch.manual_seed(seed)
    model = build_model(TEXT_DEMO_SPEC)
    if checkpoint.is_file():
        load_checkpoint(model, checkpoint)
    else:
        real = (train.inputs != PAD_ID).long()  # <pad> is a special token: text never encodes to it
        train_language_model(model, train.inputs, real, steps=steps, seed=seed, progress=progress)
        save_checkpoint(model, checkpoint)
    return build_index(
        model.eval(),
        LanguageModelMargin(VOCAB_SIZE),
        train,
        out_dir,
        checkpoint=checkpoint,
        queries=queries,
        model_spec=TEXT_DEMO_SPEC,
        config=config,
        name=TEXT_DEMO_NAME,
        extra_manifest={
            "demo": settings,
            "dataset": f"docstring passages of the Python {settings['python']} standard library",
        },
        tokenizer=tokenizer_file,
        progress=progress,
    )
