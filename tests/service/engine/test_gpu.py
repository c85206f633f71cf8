"""FAISS on the GPU (faiss-gpu, the ``gpu`` extra): the same answers as on the CPU. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.enums import Direction, Score
from indexer.store.faiss_index import gpu_count
from indexer.store.reader import load_index
from service.engine import AttributionEngine


def test_cpu_build_searches_on_the_cpu(index_root: Path) -> None:
    engine = AttributionEngine(load_index(index_root / "digits"))
    assert engine.retriever.on_gpu is (gpu_count() > 0)
    if gpu_count() == 0:
        assert engine.retriever.faiss_indexes[Score.INFLUENCE] is engine.data.faiss_indexes[Score.INFLUENCE]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no GPU visible to FAISS (faiss-cpu or no device)")
def test_gpu_search_equals_cpu_search(index_root: Path) -> None:
    data = load_index(index_root / "digits")
    cpu = AttributionEngine(data, use_gpu=False)
    gpu = AttributionEngine(data, use_gpu=True)
    for query_id in range(10):
        terms = cpu.stored_query(query_id).terms
        for score in Score:
            a = cpu.rank(terms, score, Direction.BOTH, 10, 20)
            b = gpu.rank(terms, score, Direction.BOTH, 10, 20)
            assert a.ids.tolist() == b.ids.tolist()
            np.testing.assert_allclose(a.signed, b.signed, rtol=1e-12)
