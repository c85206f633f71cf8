"""The attribution engine of one index: queries in, typed results out (DESIGN.md 1.3, 1.4, 2.2).

It composes the :class:`~service.engine.query.QueryFeaturizer` (a query from an id, a feature or a raw
input), the :class:`~service.engine.retrieval.Retriever` (FAISS + exact rerank) and the index's
:class:`~indexer.gp.surrogate.Surrogate` (subsets, coresets), and returns dataclasses that carry everything
a response needs: scores, labels, predictions, metadata, the query's entropies and timings. The HTTP layer
only translates them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexer.enums import Direction, Objective, Score
from indexer.exceptions import InvalidQueryError, NotStoredError
from indexer.features.language import LanguageModelMargin
from indexer.features.tasks import gaussian_entropy
from indexer.store.layout import (
    KEY_LABEL,
    KEY_OUTPUT,
    KEY_PREDICTION,
    KEY_PROBABILITIES,
    SPLIT_QUERY,
    SPLIT_TRAIN,
)
from indexer.store.reader import IndexData
from indexer.store.search import RankRequest, search_params
from service.core.settings import DEFAULT_PROJECTION_CACHE_BYTES
from service.engine.query import Query, QueryFeaturizer, to_python
from service.engine.results import (
    Attribution,
    Coreset,
    CoresetMember,
    ExampleRecord,
    QueryDescription,
    RankedExample,
    SubsetAttribution,
    SubsetMember,
    Timings,
)
from service.engine.retrieval import Ranked, Retriever, SearchKnobs
from service.render import render_png

__all__ = ["AttributionEngine"]


def _scores_at(scores: dict[Score, np.ndarray], i: int) -> dict[Score, float]:
    return {score: float(values[i]) for score, values in scores.items()}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _without_label(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in meta.items() if key != "label"}


def _shown(meta: dict[int, dict[str, Any]]) -> dict[int, tuple[Any, dict[str, Any]]]:
    """id -> (label, metadata without the label): once per id, however many results of a batch show it."""
    return {i: (m.get("label"), _without_label(m)) for i, m in meta.items()}


class AttributionEngine:
    """Answers attribution queries against one loaded index.

    Thread-safe: FAISS search and numpy are re-entrant, the model is only read, and the projection cache is
    filled at construction, before any request.

    Args:
        data: the loaded index.
        projection_cache_bytes: see :class:`~service.engine.query.QueryFeaturizer`.
        checkpoint: weights for raw queries instead of the index's copy (same sha256 required).
        trusted_factories: import-path model factories a manifest may name.
        use_gpu: search FAISS on the GPUs; None: when FAISS sees one.

    Raises:
        ValueError: the output function is unknown, or ``use_gpu`` without a GPU. A model that cannot be
            rebuilt is not an error: raw inputs are then refused with the reason (:attr:`model_error`).
    """

    def __init__(
        self,
        data: IndexData,
        projection_cache_bytes: int = DEFAULT_PROJECTION_CACHE_BYTES,
        checkpoint: Path | None = None,
        trusted_factories: frozenset[str] = frozenset(),
        use_gpu: bool | None = None,
    ) -> None:
        self.data = data
        self.queries = QueryFeaturizer(data, projection_cache_bytes, checkpoint, trusted_factories)
        self.retriever = Retriever(data, use_gpu)

    @property
    def name(self) -> str:
        """The index's name (its folder's)."""
        return self.data.name

    @property
    def exact(self) -> bool:
        """Whether results are provably the brute-force top-k (flat FAISS index)."""
        return self.retriever.exact

    @property
    def raw_inputs(self) -> bool:
        """Whether raw-input queries can be featurized; :attr:`model_error` says why not."""
        return self.queries.model is not None

    @property
    def model_error(self) -> str | None:
        """Why raw inputs are refused, or None."""
        return self.queries.model_error

    def _metadata(self, split: str, ids: list[int]) -> dict[int, dict[str, Any]]:
        """The stored metadata of ``ids``; for an index with a tokenizer and stored token ids, a row without
        ``text`` gets its tokens decoded as ``text`` (padding left out), so results carry the passage."""
        meta = self.data.metadata.get(split, [int(i) for i in ids])
        tokenizer = self.queries.tokenizer
        inputs = self.data.inputs if split == SPLIT_TRAIN else self.data.query_inputs
        if tokenizer is None or inputs is None or inputs.ndim != 2:
            return meta
        pad = self.queries.pad_id
        for i in ids:
            row = meta.setdefault(int(i), {})
            if "text" not in row:
                row["text"] = tokenizer.decode([int(t) for t in inputs[int(i)] if t != pad])
        return meta

    def describe(self, query: Query) -> QueryDescription:
        """The query's prediction, posterior variance and entropies (nats), and a stored query's metadata."""
        v = query.terms.posterior_variance
        predictive = None
        fn = self.queries.output_fn
        if (
            query.model_output is not None
            and isinstance(fn, LanguageModelMargin)
            and isinstance(query.target, list)
        ):
            # the explained tokens' positions only (a text query's continuation, a stored passage's tokens)
            targets = np.array([query.target])
            predictive = float(fn.predictive_entropy(query.model_output[None], np.array([v]), targets)[0])
        elif query.model_output is not None:
            predictive = float(fn.predictive_entropy(query.model_output[None], np.array([v]))[0])
        metadata = None
        if query.id is not None:
            metadata = _without_label(self._metadata(SPLIT_QUERY, [query.id]).get(query.id, {}))
        return QueryDescription(
            kind=query.kind,
            id=query.id,
            label=query.label,
            target=query.target,
            prediction=query.prediction,
            probabilities=query.probabilities,
            output=query.output,
            posterior_variance=v,
            output_entropy=_finite_or_none(float(gaussian_entropy(v))),
            predictive_entropy=predictive,
            metadata=metadata,
            text=query.text,
            continuation=query.continuation,
            continuation_source=query.continuation_source,
        )

    def rank(
        self,
        query: Query,
        score: Score,
        direction: Direction,
        top_k: int,
        candidates: int,
        knobs: SearchKnobs | None = None,
    ) -> Ranked:
        """Top-k training example ids with every score (see :class:`~service.engine.retrieval.Retriever`)."""
        return self.retriever.rank(query.terms, score, direction, top_k, candidates, knobs)

    def check_knobs(self, knobs: SearchKnobs) -> None:
        """Refuse search knobs this index does not take.

        Raises:
            InvalidQueryError: a knob on the exact scan, ``nprobe`` on a non-IVF or ``ef_search`` on a
                non-HNSW index (the message says which the index takes).
        """
        if knobs.nprobe is None and knobs.ef_search is None:
            return
        index = self.retriever.searcher.cpu_index
        if index is None:
            raise InvalidQueryError(
                "nprobe and ef_search tune an approximate index; this index is searched exactly (its factory "
                "is 'Flat'): leave them out"
            )
        try:
            search_params(index, knobs)
        except ValueError as exc:
            raise InvalidQueryError(f"{exc} (its factory is {self.data.manifest.faiss.factory!r})") from exc

    def attribute(
        self,
        query: Query,
        score: Score,
        direction: Direction,
        top_k: int,
        candidates: int,
        knobs: SearchKnobs | None = None,
    ) -> Attribution:
        """Training examples ranked by ``score`` for ``query``, with labels, predictions and metadata.

        Args:
            query: a featurized query.
            score: the ranking score; direction: proponents, opponents or both (by magnitude).
            top_k: results wanted; candidates: initial retrieval depth (deepened when the index is exact).
            knobs: search knobs of an approximate index (see :meth:`check_knobs`).

        Returns:
            :class:`Attribution`.
        """
        ranked = self.rank(query, score, direction, top_k, candidates, knobs)
        return self._attribution(query, ranked, score, direction, top_k)

    def attribute_many(
        self, requests: Sequence[tuple[Query, Score, Direction, int, int]], knobs: SearchKnobs | None = None
    ) -> list[Attribution]:
        """:meth:`attribute` for several queries in one pass: one scan (one matrix product) or one FAISS
        search for all of them (:meth:`~indexer.store.search.Searcher.rank_many`), then each reranked
        exactly; each result has the examples, ranks and scores :meth:`attribute` gives.

        Args:
            requests: ``(query, score, direction, top_k, candidates)`` per query.
            knobs: search knobs of an approximate index, the same for all.

        Returns:
            One :class:`Attribution` per request, in order.
        """
        wanted = [RankRequest(q.terms, score, direction, k, c) for q, score, direction, k, c in requests]
        ranked = self.retriever.searcher.rank_many(wanted, knobs)
        # one metadata read for every result
        shown = _shown(self._metadata(SPLIT_TRAIN, sorted({int(i) for found in ranked for i in found.ids})))
        return [
            self._attribution(query, found, score, direction, top_k, shown)
            for (query, score, direction, top_k, _), found in zip(requests, ranked, strict=True)
        ]

    def _attribution(
        self,
        query: Query,
        ranked: Ranked,
        score: Score,
        direction: Direction,
        top_k: int,
        shown: dict[int, tuple[Any, dict[str, Any]]] | None = None,
    ) -> Attribution:
        ids = [int(i) for i in ranked.ids]
        shown = _shown(self._metadata(SPLIT_TRAIN, ids)) if shown is None else shown
        stored = self.data.examples.get(KEY_PREDICTION)  # absent from an index built from features alone
        predictions = stored[ranked.ids] if stored is not None else [None] * len(ids)
        # Python floats, at once; each example's scores one dict(zip) (a dict comprehension per example was
        # an eighth of an attribution batch)
        keys = list(ranked.scores)
        rows = zip(*(values.tolist() for values in ranked.scores.values()), strict=True)
        per_example = [dict(zip(keys, row, strict=True)) for row in rows]
        signed = ranked.signed.tolist()
        examples = [
            RankedExample(
                rank=r + 1,
                id=i,
                label=shown[i][0] if i in shown else None,
                prediction=to_python(predictions[r]),
                sign=(signed[r] > 0) - (signed[r] < 0),
                signed_score=signed[r],
                scores=per_example[r] if per_example else {},
                metadata=shown[i][1] if i in shown else {},
            )
            for r, i in enumerate(ids)
        ]
        return Attribution(
            score=score,
            direction=direction,
            top_k=top_k,
            depth=ranked.depth,
            exact=ranked.exact,
            recall_at_10=None if ranked.exact else (self.retriever.recall_at_10 or {}).get(score.value),
            query=self.describe(query),
            examples=examples,
            timings=Timings(query.featurize_ms, ranked.retrieve_ms, ranked.rerank_ms),
        )

    def subset(self, query: Query, objective: Objective, size: int, candidates: int) -> SubsetAttribution:
        """Greedy subset over the top ``candidates`` examples by the objective's single-example score.

        Args:
            query: a featurized query.
            objective: the joint score to maximise (DESIGN.md 1.4).
            size: m; candidates: the pool (at least ``size``).

        Returns:
            :class:`SubsetAttribution`, with the joint score of the top-m single-example set for comparison.
        """
        pool_size = max(candidates, size)
        pool = self.rank(query, Score(objective.value), Direction.BOTH, pool_size, pool_size)
        surrogate = self.data.surrogate
        greedy = surrogate.greedy_subset(objective, query.terms, pool.ids, size)
        top_single_joint = surrogate.joint_score(objective, query.terms, pool.ids[:size])
        ids = [int(i) for i in pool.ids[greedy.indices]]
        meta = self._metadata(SPLIT_TRAIN, ids)
        members = [
            SubsetMember(
                step=step + 1,
                id=i,
                label=meta.get(i, {}).get("label"),
                marginal_gain=float(greedy.marginal_gains[step]),
                joint=float(greedy.joint[step]),
                scores=_scores_at(pool.scores, int(greedy.indices[step])),
                metadata=_without_label(meta.get(i, {})),
            )
            for step, i in enumerate(ids)
        ]
        return SubsetAttribution(
            objective=objective,
            size=size,
            candidates=len(pool.ids),
            query=self.describe(query),
            members=members,
            joint=float(greedy.joint[-1]),
            top_single_joint=float(top_single_joint),
            timings=Timings(query.featurize_ms, pool.retrieve_ms, pool.rerank_ms),
        )

    def coreset(self, size: int, query_ids: list[int] | None) -> Coreset:
        """Greedy coreset maximising the summed information gain over stored queries (DESIGN.md 1.4).

        Args:
            size: m.
            query_ids: stored queries forming the query set; None for all.

        Raises:
            UnknownExampleError: an unknown query id, or an index without stored queries.
        """
        ids = list(range(self.data.n_query)) if query_ids is None else query_ids
        self.data.check_ids(SPLIT_QUERY, ids)
        result = self.data.surrogate.coreset(self.data.query_phi[ids], size)
        rows = [int(i) for i in result.indices]
        meta = self._metadata(SPLIT_TRAIN, rows)
        members = [
            CoresetMember(
                step=step + 1,
                id=i,
                label=meta.get(i, {}).get("label"),
                marginal_gain=float(result.marginal_gains[step]),
                objective=float(result.objective[step]),
            )
            for step, i in enumerate(rows)
        ]
        return Coreset(size=size, n_queries=len(ids), members=members, objective=float(result.objective[-1]))

    def example(self, split: str, example_id: int) -> ExampleRecord:
        """A training example (``split="train"``) or stored query (``"query"``) as the index holds it.

        Raises:
            UnknownExampleError: no such id in ``split``.
        """
        self.data.check_ids(split, [example_id])
        stats = self.data.examples if split == SPLIT_TRAIN else self.data.queries
        meta = self._metadata(split, [example_id]).get(example_id, {})
        probabilities = stats.get(KEY_PROBABILITIES)
        # the surrogate's h: exact (computed on demand where an add kept the stored values as bounds)
        h = self.data.surrogate.h if split == SPLIT_TRAIN else None
        info = self.data.manifest.model
        return ExampleRecord(
            split=split,
            id=example_id,
            label=to_python(stats[KEY_LABEL][example_id]),
            prediction=to_python(stats[KEY_PREDICTION][example_id]) if KEY_PREDICTION in stats else None,
            probabilities=None if probabilities is None else probabilities[example_id].tolist(),
            output=float(stats[KEY_OUTPUT][example_id]),
            posterior_variance=None if h is None else float(h[example_id]),
            metadata=_without_label(meta),
            input_shape=info.input_shape,
            image_shape=info.image_shape,
        )

    def render(self, split: str, example_id: int, scale: int) -> tuple[bytes, str]:
        """The stored input of a training example or stored query as a grayscale PNG.

        Args:
            split: ``"train"`` or ``"query"``; example_id: its row; scale: nearest-neighbour upscaling factor.

        Returns:
            ``(png, scaling)``: the PNG bytes and ``"unit"`` or ``"minmax"`` (:mod:`service.render`).

        Raises:
            NotStoredError: the index has no ``image_shape`` (checked before the id).
            UnknownExampleError: no such id in ``split``.
        """
        image_shape = self.data.manifest.model.image_shape
        if image_shape is None:
            raise NotStoredError(
                f"index {self.name!r} has no image_shape in its manifest, so its inputs are not images and "
                "have no rendering; GET the example without /image.png (include_input=true for the raw input)"
            )
        return render_png(self.example_input(split, example_id), image_shape, scale)

    def example_input(self, split: str, example_id: int) -> np.ndarray:
        """`(*input_shape)` the stored input of a training example or stored query (memory-mapped).

        Raises:
            UnknownExampleError: no such id in ``split``.
            NotStoredError: the index holds no inputs.
        """
        self.data.check_ids(split, [example_id])
        inputs = self.data.inputs if split == SPLIT_TRAIN else self.data.query_inputs
        if inputs is None:
            raise NotStoredError(f"index {self.name!r} was built without its inputs (store_inputs=False)")
        return np.asarray(inputs[example_id])
