"""Retrieval: FAISS top candidates for a query, reranked exactly in float64 (DESIGN.md 1.3, 2.2).

Every score is monotone in x = <a_q, z_i> (signed scores) or in |x| (the information scores). FAISS returns
the top ``depth`` inner products for +a_q and/or -a_q; the candidates are rescored exactly in float64 from
the stored features by the surrogate. With an exact (flat) index the depth is doubled until no unseen
example can beat the k-th result, so the answer equals the brute-force top-k over all N examples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.enums import Direction, Score
from indexer.gp.scores import QueryTerms, query_vector, score_from_inner, signed_score
from indexer.gp.surrogate import Surrogate
from indexer.store.faiss_index import gpu_count, max_norm, to_gpus

__all__ = ["Ranked", "Retriever"]

_RELATIVE_SLACK = 1e-4  # float32 FAISS inner products vs the float64 rerank


@dataclass(frozen=True)
class Ranked:
    """The ranked result of a retrieval.

    Attributes:
        ids: `(m,)` training example ids, best first (m <= top_k).
        scores: score -> `(m,)` float64 values of every score.
        signed: `(m,)` the chosen score with its direction.
        depth: the retrieval depth finally used (examples per FAISS search).
        retrieve_ms, rerank_ms: time in FAISS and in the float64 rerank, milliseconds.
    """

    ids: np.ndarray
    scores: dict[Score, np.ndarray]
    signed: np.ndarray
    depth: int
    retrieve_ms: float
    rerank_ms: float


class Retriever:
    """FAISS search over one index's score vectors plus the exact rerank.

    Thread-safe: FAISS search and numpy are re-entrant and nothing is written after construction.

    Args:
        surrogate: the index's surrogate (the rerank's scores).
        faiss_indexes: score -> FAISS index over the vectors z_i of that score, on the CPU.
        exact: whether the indexes are flat (exhaustive), so results can be deepened to provably exact.
        use_gpu: search on the GPUs (faiss-gpu); None: when FAISS sees one.

    Attributes:
        on_gpu: whether the search runs on GPUs.
        faiss_indexes: the indexes searched (GPU copies when ``on_gpu``).

    Raises:
        ValueError: ``use_gpu`` is true but FAISS sees no GPU.
    """

    def __init__(
        self,
        surrogate: Surrogate,
        faiss_indexes: dict[Score, faiss.Index],
        exact: bool,
        use_gpu: bool | None = None,
    ) -> None:
        self.surrogate = surrogate
        self.exact = exact
        # largest |z_i| per score, for the float32 slack of the exactness bound (only the exact flat index is
        # deepened); read back from the vectors the flat index holds rather than recomputed
        self._z_norm_max = {score: max_norm(index) for score, index in faiss_indexes.items()} if exact else {}
        if use_gpu and gpu_count() == 0:
            raise ValueError(
                "INFOTRACE_USE_GPU=true but FAISS sees no GPU (faiss-cpu, or no device): install the gpu "
                "extra on a GPU machine, or unset it"
            )
        self.on_gpu = use_gpu if use_gpu is not None else gpu_count() > 0
        self.faiss_indexes = {
            score: (to_gpus(index) if self.on_gpu else index) for score, index in faiss_indexes.items()
        }

    def rank(
        self, query: QueryTerms, score: Score, direction: Direction, top_k: int, candidates: int
    ) -> Ranked:
        """Top-k training examples for ``score`` and ``direction``.

        Args:
            query: the query's terms.
            score: the ranking score.
            direction: proponents (signed score > 0, largest first), opponents (< 0, most negative first)
                or both (by magnitude).
            top_k: results wanted (fewer come back when fewer examples have the requested sign).
            candidates: initial retrieval depth per FAISS search.

        Returns:
            :class:`Ranked`.
        """
        n = self.surrogate.n_train
        index = self.faiss_indexes[score]
        a = query_vector(score, query)
        signs = []
        if not score.signed or direction is not Direction.OPPONENTS:
            signs.append(1.0)
        if not score.signed or direction is not Direction.PROPONENTS:
            signs.append(-1.0)
        norm = float(np.linalg.norm(a))
        slack = 1e-5 * norm * self._z_norm_max.get(score, 0.0)
        # FAISS searches in float32: a query of large norm (a feature near float32's limit) would overflow
        # its inner products to inf and return no ids. Every score's search ranks by <a, z_i>, which a
        # positive scale does not reorder, so the search vector is a / |a| and its values are scaled back.
        scale = norm if np.isfinite(norm) and norm > 0 else 1.0
        depth = min(max(candidates, top_k), n)
        retrieve_ms = rerank_ms = 0.0
        while True:
            t0 = time.perf_counter()
            queries = np.stack([sign * a / scale for sign in signs]).astype(np.float32)
            found_values, found_ids = index.search(queries, depth)
            found_values = found_values * scale  # float64 from here
            t1 = time.perf_counter()
            ids = np.unique(found_ids[found_ids >= 0])
            scores = self.surrogate.scores(query, ids)
            signed = signed_score(score, scores)
            if direction is Direction.PROPONENTS:
                key, eligible = signed, signed > 0
            elif direction is Direction.OPPONENTS:
                key, eligible = -signed, signed < 0
            else:
                key, eligible = np.abs(signed), np.ones(len(ids), dtype=bool)
            order = np.lexsort((ids, -key))
            order = order[eligible[order]][:top_k]
            retrieve_ms += (t1 - t0) * 1e3
            rerank_ms += (time.perf_counter() - t1) * 1e3
            if depth >= n or not self.exact:
                break
            last = max(float(v[-1]) for v in found_values)  # unseen examples have x (or -x) below this
            bound_x = max(last, 0.0) * (1 + _RELATIVE_SLACK) + slack
            bound = float(score_from_inner(score, np.array([bound_x]), query)[0])
            if len(order) == top_k and key[order[-1]] > bound:
                break
            depth = min(2 * depth, n)
        return Ranked(
            ids=ids[order],
            scores={s: v[order] for s, v in scores.items()},
            signed=signed[order],
            depth=depth,
            retrieve_ms=retrieve_ms,
            rerank_ms=rerank_ms,
        )
