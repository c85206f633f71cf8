"""FAISS on the GPU (faiss-gpu, the ``gpu`` extra): an approximate index searched there gives the same answers
as on the CPU. The exact scan runs on the CPU over the memory-mapped features either way. Skipped without a
GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.config import IndexConfig
from indexer.enums import Direction, Score
from indexer.store.faiss_index import gpu_count
from indexer.store.reader import load_index
from service.engine import AttributionEngine


def test_the_exact_scan_places_nothing_on_a_gpu(index_root: Path) -> None:
    engine = AttributionEngine(load_index(index_root / "digits"))
    assert engine.exact and engine.retriever.searcher.faiss_index is None and not engine.retriever.on_gpu


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no GPU visible to FAISS (faiss-cpu or no device)")
def test_gpu_search_equals_cpu_search(tmp_path: Path, digits_builder) -> None:
    config = IndexConfig(k=64, faiss_factory="IVF8,Flat", nprobe=8)
    data = load_index(digits_builder(tmp_path, "ivf", config))
    cpu = AttributionEngine(data, use_gpu=False)
    gpu = AttributionEngine(data, use_gpu=True)
    assert gpu.retriever.on_gpu and not cpu.retriever.on_gpu
    for query_id in range(10):
        query = cpu.queries.stored(query_id)
        for score in Score:
            a = cpu.rank(query, score, Direction.BOTH, 10, 20)
            b = gpu.rank(query, score, Direction.BOTH, 10, 20)
            assert a.ids.tolist() == b.ids.tolist()
            np.testing.assert_allclose(a.signed, b.signed, rtol=1e-12)
