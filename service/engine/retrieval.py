"""Retrieval for the service: the index's :class:`~indexer.store.search.Searcher` (the exact scan of the
stored features, or the approximate FAISS index with the exact float64 rerank; DESIGN.md 1.3, 2.1, 2.2),
with the approximate index placed on the GPUs when FAISS sees them.
"""

from __future__ import annotations

from indexer.enums import Direction, Score
from indexer.gp.scores import QueryTerms
from indexer.store.faiss_index import gpu_count, to_gpus
from indexer.store.layout import KEY_PHI_NORM
from indexer.store.reader import IndexData
from indexer.store.search import Ranked, Searcher, SearchKnobs

__all__ = ["GPU_MAX_DEPTH", "Ranked", "Retriever", "SearchKnobs"]

GPU_MAX_DEPTH = 2048
"""GPU FAISS returns at most this many neighbours per search: deeper requests are served at this depth."""


class Retriever:
    """Top-k search over one loaded index.

    Thread-safe (see :class:`~indexer.store.search.Searcher`).

    Args:
        data: the loaded index.
        use_gpu: search an approximate FAISS index on the GPUs (faiss-gpu); None: when FAISS sees one. The
            exact scan runs on the CPU over the memory-mapped features.

    Attributes:
        on_gpu: whether the approximate index is searched on GPUs.
        searcher: the :class:`~indexer.store.search.Searcher`.
        recall_at_10: score -> recall@10 recorded at build (None for the exact scan).

    Raises:
        ValueError: ``use_gpu`` is true but FAISS sees no GPU.
    """

    def __init__(self, data: IndexData, use_gpu: bool | None = None) -> None:
        if use_gpu and gpu_count() == 0:
            raise ValueError(
                "INFOTRACE_USE_GPU=true but FAISS sees no GPU (faiss-cpu, or no device): install the gpu "
                "extra on a GPU machine, or unset it"
            )
        info = data.manifest.faiss
        self.on_gpu = bool(
            data.faiss_index is not None and (use_gpu if use_gpu is not None else gpu_count() > 0)
        )
        index = data.faiss_index
        if index is not None and self.on_gpu:
            index = to_gpus(index)
        self.searcher = Searcher(
            data.surrogate,
            data.examples[KEY_PHI_NORM],
            index,
            SearchKnobs(nprobe=info.nprobe, ef_search=info.ef_search),
            cpu_index=data.faiss_index,
            max_depth=GPU_MAX_DEPTH if self.on_gpu else None,
        )
        self.recall_at_10 = info.recall_at_10

    @property
    def exact(self) -> bool:
        """Whether results are the brute-force top-k (the exact scan)."""
        return self.searcher.exact

    def rank(
        self,
        query: QueryTerms,
        score: Score,
        direction: Direction,
        top_k: int,
        candidates: int,
        knobs: SearchKnobs | None = None,
    ) -> Ranked:
        """Top-k training examples (see :meth:`~indexer.store.search.Searcher.rank`)."""
        return self.searcher.rank(query, score, direction, top_k, candidates, knobs)
