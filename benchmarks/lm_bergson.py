"""bergson's side of :mod:`benchmarks.lm`, run in bergson's interpreter (``var/bergson-venv``).

Featurizes the first ``--n`` training passages of an index (its stored token ids and targets; with
``--features``, all of them and the stored queries too) with bergson's ``InMemoryCollector`` on the index's
own model: per-module two-sided projection (``projection_dim`` p per Linear module, ``n_modules * p^2``
closest to ``--k``), the gradient of the summed language-model margins (the same m as infotrace's). Writes
``--out``: examples/s and tokens/s of the median batch after the first, and optionally the features.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.featurize_methods import bergson_side
from indexer.features.language import IGNORE_INDEX
from indexer.store.reader import load_index
from service.engine import AttributionEngine


class _Model(nn.Module):
    """The index's model with the ``device`` attribute bergson reads."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


def _featurize(collector, model, output_fn, ids, targets, batch_size, offset):  # type: ignore[no-untyped-def]
    """Seconds per batch and `(n, k)` float32 features of ``ids`` (rows ``offset ..`` of the collector)."""
    seconds, features = [], []
    for start in range(0, len(ids), batch_size):
        x, y = ids[start : start + batch_size], targets[start : start + batch_size]
        rows = list(range(offset + start, offset + start + len(x)))
        began = time.perf_counter()
        logits = model(x).reshape(len(x), -1)
        m = torch.func.vmap(output_fn.output)(logits, y)
        m.sum().backward()
        collector.process_batch(rows, losses=m.detach())
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - began)
        features.append(np.asarray(collector.builder.grad_buffer[rows], dtype=np.float32))
    return seconds, np.concatenate(features)


def main() -> int:
    """Featurize with bergson as the module docstring says; write ``--out`` (and ``--features``).

    Returns:
        0. Raises whatever bergson raises (the caller, :mod:`benchmarks.lm`, reports it as not run).
    """
    parser = argparse.ArgumentParser(prog="benchmarks.lm_bergson")
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--features", type=Path)
    args = parser.parse_args()

    from bergson import GradientProcessor, IndexConfig, InMemoryCollector
    from datasets import Dataset as HFDataset

    warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
    index = load_index(args.index)
    engine = AttributionEngine(index)
    assert engine.queries.model is not None and index.inputs is not None and index.query_inputs is not None
    model = _Model(engine.queries.model).eval()
    n_modules = sum(isinstance(m, nn.Linear) for m in model.modules())
    p = bergson_side(args.k, n_modules)
    options = {"projection_dim": p, "projection_type": "normal", "include_bias": True, "projection_seed": 0}
    ids = torch.from_numpy(np.array(index.inputs[: args.n]))
    targets = torch.from_numpy(np.array(index.examples["label"][: args.n]))
    n_rows = len(ids) + (index.n_query if args.features else 0)
    run_path = tempfile.mkdtemp(prefix="bench-lm-bergson-")
    try:
        collector = InMemoryCollector(
            model=model,
            data=HFDataset.from_dict({"row": list(range(n_rows))}),
            cfg=IndexConfig(run_path=run_path, **options),
            processor=GradientProcessor(**options),
        )
        with collector:
            seconds, train = _featurize(
                collector, model, engine.queries.output_fn, ids, targets, args.batch_size, 0
            )
            if args.features:
                q_ids = torch.from_numpy(np.array(index.query_inputs))
                q_targets = torch.from_numpy(np.array(index.queries["label"]))
                _, query = _featurize(
                    collector, model, engine.queries.output_fn, q_ids, q_targets, args.batch_size, len(ids)
                )
                np.savez(args.features, train=train, query=query)
            k = sum(math.prod(s) for s in collector.shapes().values())
    finally:
        shutil.rmtree(run_path, ignore_errors=True)
    timed = seconds[1:] or seconds
    sizes = [min(args.batch_size, len(ids) - s) for s in range(0, len(ids), args.batch_size)][
        len(seconds) - len(timed) :
    ]
    per_example = statistics.median(t / b for t, b in zip(timed, sizes, strict=True))
    tokens = (int((targets != IGNORE_INDEX).sum()) + len(targets)) / len(targets)
    import bergson

    result = {"examples_per_s": 1.0 / per_example, "tokens_per_s": tokens / per_example}
    result |= {"batches_timed": len(timed), "k": k, "projection_dim": p, "modules": n_modules}
    args.out.write_text(json.dumps(result | {"package": f"bergson {bergson.__version__}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
