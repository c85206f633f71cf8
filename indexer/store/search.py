"""Retrieval over the stored features: the exact scan and the approximate FAISS index (DESIGN.md 1.3, 2.1).

Every score of DESIGN.md 1.3 is monotone in ``x_i = w_i <b_q, phi_i>`` (signed scores) or in ``|x_i|`` (the
information scores), with a per-score query vector b_q (phi_q, phi_q / |phi_q| or A^-1 phi_q) and
per-example weights w_i (:func:`~indexer.gp.scores.scan_weights`). So:

- **exact**: one scan of the stored features gives every x_i (``torch.mv`` over the memory-mapped
  float16 or float32 array, or, where this CPU's float16 ``torch.mv`` is the slower of the two, float16
  blocks converted into an L2-sized float32 buffer and multiplied there: no copy of the array). Each is an
  estimate with a known error bound (float16 output rounding and the rounding of b_q, float32
  accumulation); the examples whose upper bound can reach the top are reranked exactly in float64 from the
  stored features, and the depth is doubled until no unseen example can beat the k-th result. The answer
  equals the brute-force top-k over all N examples.
- **approximate**: a FAISS index over the information-gain vectors (posterior-independent, so appending
  examples never touches the others) returns candidates for ``+phi_q`` and ``-phi_q``; they are reranked
  exactly for the requested score. Its recall@10 against the exact answer is measured at build
  (:func:`measure_recall`) and recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from indexer.enums import Direction, Score
from indexer.gp.scores import (
    QueryTerms,
    query_vector,
    scan_query_vector,
    scan_weights,
    score_from_inner,
    signed_score,
)
from indexer.gp.surrogate import Surrogate
from indexer.segments import RowSegments
from indexer.store.faiss_index import shards_of

__all__ = [
    "RankRequest",
    "Ranked",
    "SearchKnobs",
    "FeatureScan",
    "SegmentedScan",
    "faster_half_kernel",
    "Searcher",
    "search_params",
    "knob_support",
    "information_gain_vectors",
    "make_approximate_index",
    "trained_approximate_index",
    "fill_approximate_index",
    "vector_scale",
    "measure_recall",
    "recall_queries",
]

_CHUNK_ROWS = 65536
_RECALL_BATCH = 16
"""Queries ranked together while measuring recall: the batched scan's `(16, n)` products and bounds stay a
few hundred MB at N = 10^6."""
_UPCAST_BYTES = 2**19
"""float32 bytes of one block of the ``"upcast"`` scan: its buffer stays in L2 from conversion to product."""
_kernel_for_k: dict[int, str] = {}


@dataclass(frozen=True)
class Ranked:
    """The ranked result of a retrieval.

    Attributes:
        ids: `(m,)` training example ids, best first (m <= top_k).
        scores: score -> `(m,)` float64 values of every score.
        signed: `(m,)` the chosen score with its direction.
        depth: the retrieval depth finally used (candidates reranked).
        retrieve_ms, rerank_ms: time in the scan (or FAISS) and in the float64 rerank, milliseconds.
        exact: whether the result is provably the brute-force top-k.
    """

    ids: np.ndarray
    scores: dict[Score, np.ndarray]
    signed: np.ndarray
    depth: int
    retrieve_ms: float
    rerank_ms: float
    exact: bool = True


@dataclass(frozen=True)
class SearchKnobs:
    """Per-request search knobs of an approximate index (None: the index's recorded default).

    Attributes:
        nprobe: IVF lists visited (IVF indexes only).
        ef_search: HNSW candidate-list depth (HNSW indexes only).
    """

    nprobe: int | None = None
    ef_search: int | None = None


@dataclass(frozen=True)
class RankRequest:
    """One query of :meth:`Searcher.rank_many`: the arguments of :meth:`Searcher.rank` but the knobs."""

    query: QueryTerms
    score: Score
    direction: Direction
    top_k: int
    candidates: int


_Scanned = dict[Score, tuple[torch.Tensor, torch.Tensor, float]]
"""score -> (x, err, |b_q|): one query's columns of a batched scan (:meth:`FeatureScan.inner_many`)."""


class FeatureScan:
    """x = Phi b for a query vector b, over the stored features without copying them.

    float16 features are multiplied either by ``torch.mv`` in half precision (``"half"``: float32
    accumulation on the CPUs we checked) or a block at a time converted exactly to float32 in a buffer that
    stays in L2 (``"upcast"``), whichever :func:`faster_half_kernel` measured faster on this CPU (on the
    Intel Xeon with AVX-512 FP16 we checked, the half kernel runs at 3.5x the memory-bandwidth floor and the
    upcast at 2.1x; on the AMD EPYC the half kernel ran at 1.6x). :meth:`inner` returns the products with a
    per-example error bound. The half kernel's bound is verified against float64 on a sample of rows at
    construction; if this machine's kernel breaks it (a half precision accumulator), the scan upcasts.

    Args:
        phi: `(n, k)` float16 or float32 stored features (a read-only memory map is fine).
        phi_norm: `(n,)` float64 |phi_i| of the stored values.

    Attributes:
        mode: ``"half"`` (float16 kernel), ``"float32"`` (float32 features) or ``"upcast"`` (float16
            features converted per block).
    """

    def __init__(self, phi: np.ndarray, phi_norm: np.ndarray) -> None:
        self.n, self.k = phi.shape
        with warnings.catch_warnings():  # a read-only memory map: torch warns, the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            self.phi = torch.from_numpy(phi) if len(phi) else torch.zeros((0, self.k), dtype=torch.float32)
        self.phi_norm = torch.from_numpy(np.asarray(phi_norm, dtype=np.float32))
        self.max_norm = float(np.max(phi_norm, initial=0.0))
        self.mode = {torch.float32: "float32", torch.float16: "half"}.get(self.phi.dtype, "float64")
        if self.mode == "float64":  # features held in another float dtype (library use): exact float64
            self.phi = self.phi.double()
        # relative error of an output and error per unit of |b| |phi_i| (rounding of b, accumulation)
        unit = {"half": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}[self.mode]
        self.relative = 2 * unit
        self.absolute = 2 * unit + self.k * (2.0**-52 if self.mode == "float64" else 2.0**-23)
        if self.mode == "half" and self.n:
            if faster_half_kernel(self.k) == "upcast" or not self._kernel_within_bound():
                self.mode = "upcast"
                self.relative, self.absolute = 2.0**-23, self.k * 2.0**-23 + 2.0**-11

    def _kernel_within_bound(self) -> bool:
        rows = torch.from_numpy(
            np.sort(np.random.default_rng(0).choice(self.n, size=min(self.n, 512), replace=False))
        )
        sample = self.phi[rows]
        b = np.asarray(np.random.default_rng(1).standard_normal(self.k))
        x, err = self._half(sample, b, self.phi_norm[rows])
        exact = sample.double().numpy() @ b
        return bool(np.all(np.abs(x.double().numpy() - exact) <= 0.25 * err.double().numpy() + 1e-30))

    def _half(
        self, phi: torch.Tensor, b: np.ndarray, norms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # scale so that |x_i| <= |b| max|phi_i| lands at 2^14: no float16 overflow, far above subnormals
        # and so that no entry of b overflows float16 itself
        b_norm, b_max = float(np.linalg.norm(b)), float(np.max(np.abs(b), initial=0.0))
        scale = (
            min(2.0**14 / (b_norm * self.max_norm), 2.0**14 / b_max)
            if b_norm > 0 and self.max_norm > 0
            else 1.0
        )
        x = torch.mv(phi, torch.from_numpy((b * scale).astype(np.float16))).float() / scale
        err = self.relative * x.abs() + self.absolute * b_norm * norms + 2.0**-24 / scale
        return x, err

    def inner(self, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x_i = <b, phi_i> for every stored row, with a bound on its error.

        Args:
            b: `(k,)` float64 query vector.

        Returns:
            ``(x, err)``: `(n,)` float32 tensors; |x_i - <b, phi_i>| <= err_i (<b, phi_i> in exact arithmetic
            on the stored values).
        """
        if self.mode == "half":
            return self._half(self.phi, b, self.phi_norm)
        if self.mode == "float64":
            x = torch.mv(self.phi, torch.from_numpy(np.asarray(b, dtype=np.float64)))
            err = self.relative * x.abs() + self.absolute * float(np.linalg.norm(b)) * self.phi_norm.double()
            return x, err + 1e-300
        b32 = torch.from_numpy(np.asarray(b, dtype=np.float32))
        if self.mode == "float32":
            x = torch.mv(self.phi, b32)
        else:
            x = _upcast_mv(self.phi, b32)
        b_norm = float(np.linalg.norm(b))
        err = self.relative * x.abs() + self.absolute * b_norm * self.phi_norm + 1e-30
        return x, err

    def inner_many(self, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x_ji = <b_j, phi_i> for several query vectors at once: one float32 matrix product per chunk of
        stored rows (float16 rows converted exactly to float32 first), with a bound on each error.

        Args:
            b: `(m, k)` float64 query vectors, each of norm <= 1 (the callers scale them so).

        Returns:
            ``(x, err)``: `(m, n)` tensors (float32; float64 for float64 features), one contiguous row per
            query (a strided column made every later step of a query's rank a cache miss per example);
            |x_ji - <b_j, phi_i>| <= err_ji in exact arithmetic on the stored values.
        """
        if self.mode == "float64":
            x = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)) @ self.phi.T
            norms = torch.from_numpy(np.linalg.norm(b, axis=1))
            err = self.relative * x.abs() + self.absolute * norms[:, None] * self.phi_norm.double()[None]
            return x.contiguous(), err + 1e-300
        bt = torch.from_numpy(np.ascontiguousarray(b.T, dtype=np.float32))
        product = torch.empty((self.n, len(b)))
        for start in range(0, self.n, _CHUNK_ROWS):
            chunk = self.phi[start : start + _CHUNK_ROWS]
            torch.mm(
                chunk.float() if chunk.dtype != torch.float32 else chunk,
                bt,
                out=product[start : start + _CHUNK_ROWS],
            )
        x = product.T.contiguous()
        # float32 products of exact float32 inputs: b's own rounding and the accumulation (as "upcast")
        norms = torch.from_numpy(np.linalg.norm(b, axis=1).astype(np.float32))
        err = 2.0**-23 * x.abs() + (self.k * 2.0**-23 + 2.0**-23) * norms[:, None] * self.phi_norm[None]
        return x, err + 1e-30


def _upcast_mv(phi: torch.Tensor, b32: torch.Tensor) -> torch.Tensor:
    """phi b for `(n, k)` float16 ``phi`` and `(k,)` float32 ``b32``: each block of rows converted exactly to
    float32 in one reused L2-sized buffer, then ``torch.mv`` on it; `(n,)` float32 (DESIGN.md 2.1)."""
    n, k = phi.shape
    rows = max(16, _UPCAST_BYTES // (4 * k))
    buffer = torch.empty((rows, k))
    x = torch.empty(n)
    for start in range(0, n, rows):
        block = phi[start : start + rows]
        part = buffer[: len(block)]
        part.copy_(block)
        torch.mv(part, b32, out=x[start : start + len(block)])
    return x


def faster_half_kernel(k: int) -> str:
    """Which float16 scan kernel is faster on this CPU for rows of k features: ``"half"`` (``torch.mv`` in
    float16) or ``"upcast"`` (:func:`_upcast_mv`). Measured once per process and k, at the torch thread
    count of the first call, on 32 MiB of seeded float16 rows (the best of three runs of each, alternated);
    a few tens of milliseconds. Both kernels give bounded, verified estimates (the ranking is exact either
    way), so the choice changes speed only (DESIGN.md 2.1). Raises nothing."""
    if k not in _kernel_for_k:
        rows = max(1, 2**24 // k)
        phi = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, k)).astype(np.float16))
        b = torch.from_numpy(np.random.default_rng(1).standard_normal(k).astype(np.float16))
        best = {"half": math.inf, "upcast": math.inf}
        for _ in range(3):
            for kernel in best:
                start = time.perf_counter()
                torch.mv(phi, b) if kernel == "half" else _upcast_mv(phi, b.float())
                best[kernel] = min(best[kernel], time.perf_counter() - start)
        _kernel_for_k[k] = min(best, key=best.__getitem__)
    return _kernel_for_k[k]


class SegmentedScan:
    """:class:`FeatureScan` over features stored as several row segments
    (:class:`~indexer.segments.RowSegments`, after adds): one scan per segment, the results concatenated.

    Args:
        phi: the segmented `(n, k)` stored features; phi_norm: `(n,)` float64 |phi_i|.

    Attributes:
        parts: one :class:`FeatureScan` per segment.
        mode: the first segment's scan mode (every segment is checked on its own).
    """

    def __init__(self, phi: RowSegments, phi_norm: np.ndarray) -> None:
        self.n, self.k = phi.shape
        starts = phi.starts
        self.parts = [
            FeatureScan(part, np.asarray(phi_norm[starts[j] : starts[j + 1]]))
            for j, part in enumerate(phi.parts)
        ]
        self.mode = self.parts[0].mode

    def inner(self, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`FeatureScan.inner` over every segment."""
        done = [part.inner(b) for part in self.parts]
        return torch.cat([x for x, _ in done]), torch.cat([err for _, err in done])

    def inner_many(self, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`FeatureScan.inner_many` over every segment (`(m, n)` results)."""
        done = [part.inner_many(b) for part in self.parts]
        return torch.cat([x for x, _ in done], dim=1), torch.cat([err for _, err in done], dim=1)


def knob_support(index: faiss.Index) -> tuple[bool, bool]:
    """Whether ``index`` (or the index inside its pre-transforms) takes ``nprobe`` (IVF) and ``efSearch``
    (HNSW)."""
    inner = shards_of(index)[0]  # every shard has the same structure
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return isinstance(inner, faiss.IndexIVF), isinstance(inner, faiss.IndexHNSW)


def search_params(index: faiss.Index, knobs: SearchKnobs) -> faiss.SearchParameters | None:
    """FAISS search parameters for ``knobs`` (None when no knob is set).

    Raises:
        ValueError: a knob the index does not take (``nprobe`` on a non-IVF index, ``ef_search`` on a
            non-HNSW one).
    """
    if knobs.nprobe is None and knobs.ef_search is None:
        return None
    ivf, hnsw = knob_support(index)
    if knobs.nprobe is not None and not ivf:
        raise ValueError("nprobe applies to IVF indexes only; this index is not one")
    if knobs.ef_search is not None and not hnsw:
        raise ValueError("ef_search applies to HNSW indexes only; this index is not one")
    params: Any
    if knobs.nprobe is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(knobs.nprobe)
    else:
        params = getattr(faiss, "SearchParametersHNSW")()  # noqa: B009  # absent from faiss's type stubs
        params.efSearch = int(knobs.ef_search or 0)
    inner = shards_of(index)[0]  # IndexShards hands the parameters to each shard as they are
    while isinstance(inner, faiss.IndexPreTransform):
        wrapper = faiss.SearchParametersPreTransform()
        wrapper.index_params = params
        params, inner = wrapper, faiss.downcast_index(inner.index)
    return params


def _ordered(
    score: Score, direction: Direction, ids: np.ndarray, scores: dict[Score, np.ndarray], top_k: int
) -> tuple[np.ndarray, dict[Score, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(ids, scores, signed, key, order of the eligible top ``top_k``: key descending, ties by id)."""
    signed = signed_score(score, scores)
    if direction is Direction.PROPONENTS:
        key, eligible = signed, signed > 0
    elif direction is Direction.OPPONENTS:
        key, eligible = -signed, signed < 0
    else:
        key, eligible = np.abs(signed), np.ones(len(ids), dtype=bool)
    order = np.lexsort((ids, -key))
    return ids, scores, signed, key, order[eligible[order]][:top_k]


class Searcher:
    """Top-k training examples of any score: the exact scan, or an approximate FAISS index, then the exact
    float64 rerank (module docstring).

    Thread-safe: the scan, FAISS search and numpy only read what was built at construction (the per-score
    weights are computed on first use under the GIL and only ever replaced by equal values).

    Args:
        surrogate: the index's surrogate (its stored features, scalars and Cholesky factor).
        phi_norm: `(n_train,)` float64 |phi_i|.
        faiss_index: the approximate index over the information-gain vectors, or None for the exact scan.
        default_knobs: the knobs used when a request sets none (the manifest's).
        cpu_index: the CPU index ``faiss_index`` was copied from when that is a GPU copy: search knobs are
            checked and built against it (a GPU index is neither an ``IndexIVF`` nor an ``IndexHNSW``).
        max_depth: the most results one FAISS search may return (GPU FAISS: 2048), or None.
    """

    def __init__(
        self,
        surrogate: Surrogate,
        phi_norm: np.ndarray,
        faiss_index: faiss.Index | None = None,
        default_knobs: SearchKnobs = SearchKnobs(),
        cpu_index: faiss.Index | None = None,
        max_depth: int | None = None,
    ) -> None:
        self.surrogate = surrogate
        self.phi_norm = phi_norm
        self.faiss_index = faiss_index
        self.default_knobs = default_knobs
        self.cpu_index = cpu_index if cpu_index is not None else faiss_index
        self.max_depth = max_depth
        self._scan: FeatureScan | SegmentedScan | None = None
        self._weights: dict[Score, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def exact(self) -> bool:
        """Whether retrieval is the exact scan."""
        return self.faiss_index is None

    @property
    def scan(self) -> FeatureScan | SegmentedScan:
        """The exact scan (made on first use: an approximate index never touches the features otherwise)."""
        if self._scan is None:
            phi = self.surrogate.phi
            self._scan = (
                SegmentedScan(phi, self.phi_norm)
                if isinstance(phi, RowSegments)
                else FeatureScan(phi, self.phi_norm)
            )
        return self._scan

    def _score_weights(self, score: Score) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, |w|) as float32 tensors for ``score`` (DESIGN.md 2.1)."""
        if score not in self._weights:
            sur = self.surrogate
            w = scan_weights(
                score,
                beta=np.asarray(sur.beta),
                grad_term=np.asarray(sur.grad_term),
                s=sur.s_lower_bound,  # exact, or (after an add) from below: weights from above
                phi_norm=np.asarray(self.phi_norm),
                prior_precision=sur.prior_precision,
            )
            w32 = torch.from_numpy(w.astype(np.float32))
            self._weights[score] = (w32, w32.abs())
        return self._weights[score]

    def _query_vector(self, score: Score, query: QueryTerms) -> tuple[np.ndarray, float]:
        """b_q / |b_q| for ``score`` and |b_q| (float64): the scan takes the unit vector, so that neither a
        tiny nor a huge query leaves the float range."""
        b = scan_query_vector(score, query)
        top = float(np.max(np.abs(b), initial=0.0))
        b_norm = top * float(np.linalg.norm(b / top)) if top > 0 else 0.0
        return (b / b_norm if b_norm > 0 else b), b_norm

    def _keyed(
        self, score: Score, query: QueryTerms, scanned: _Scanned | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Signed keys x_i = w_i <b_q, phi_i> in units of |b_q|, their error bounds, and |b_q| (float64);
        ``scanned`` holds the scan of this score's unit vector when a batch computed it already."""
        if scanned is not None and score in scanned:
            x, err, b_norm = scanned[score]
        else:
            unit, b_norm = self._query_vector(score, query)
            x, err = self.scan.inner(unit)
        w, w_abs = self._score_weights(score)
        if x.dtype != w.dtype:
            w, w_abs = w.to(x.dtype), w_abs.to(x.dtype)
        # the product's own float32 rounding is far inside the relative term
        return x * w, err * w_abs * (1 + 2.0**-20), b_norm

    def _upper_bounds(
        self, score: Score, direction: Direction, query: QueryTerms, scanned: _Scanned | None = None
    ) -> tuple[torch.Tensor, float]:
        """`(n,)` upper bounds on each example's ranking key for ``direction``, in units of the returned
        |b_q| (-inf where the example certainly has the wrong sign)."""
        key, err, b_norm = self._keyed(score, query, scanned)
        if direction is Direction.BOTH:
            return key.abs() + err, b_norm
        if score is Score.INFORMATION_GAIN:  # magnitude from phi_q, sign from the influence (A^-1 phi_q)
            sign_key, sign_err, _ = self._keyed(Score.INFLUENCE, query, scanned)
            wrong = (
                sign_key + sign_err <= 0 if direction is Direction.PROPONENTS else sign_key - sign_err >= 0
            )
            return torch.where(wrong, torch.tensor(-float("inf"), dtype=key.dtype), key.abs() + err), b_norm
        side = key if direction is Direction.PROPONENTS else -key
        if not self.surrogate.leverage_exact and score in (Score.INFORMATION_LOSS, Score.INFLUENCE):
            # weights from s bounded from below are too large in magnitude (same sign): a key of the
            # requested sign is bounded from above, one of the other sign only by 0, never wrongly eligible
            return (side + err).clamp(min=0.0), b_norm
        return side + err, b_norm

    @staticmethod
    def _scan_scores(score: Score, direction: Direction) -> list[Score]:
        """The scores whose scan :meth:`_upper_bounds` reads for ``score`` and ``direction``."""
        if score is Score.INFORMATION_GAIN and direction is not Direction.BOTH:
            return [score, Score.INFLUENCE]
        return [score]

    def _rerank(
        self, query: QueryTerms, score: Score, direction: Direction, ids: np.ndarray, top_k: int
    ) -> tuple[np.ndarray, dict[Score, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """Exact float64 scores of ``ids``; returns (ids, scores, signed, key, order of the eligible top)."""
        ids = np.unique(ids)
        return _ordered(score, direction, ids, self.surrogate.scores(query, ids), top_k)

    def rank(
        self,
        query: QueryTerms,
        score: Score,
        direction: Direction,
        top_k: int,
        candidates: int,
        knobs: SearchKnobs | None = None,
    ) -> Ranked:
        """Top-k training examples for ``score`` and ``direction``.

        Args:
            query: the query's terms.
            score: the ranking score.
            direction: proponents (signed score > 0, largest first), opponents (< 0, most negative first)
                or both (by magnitude); ties by id.
            top_k: results wanted (fewer come back when fewer examples have the requested sign).
            candidates: initial retrieval depth (the exact scan deepens it as needed).
            knobs: search knobs of an approximate index (ignored by the exact scan).

        Returns:
            :class:`Ranked`.

        Raises:
            ValueError: a knob the approximate index does not take.
        """
        if self.faiss_index is not None:
            return self._approximate(query, score, direction, top_k, candidates, knobs or SearchKnobs())
        return self._exact(query, score, direction, top_k, candidates)

    def rank_many(self, requests: Sequence[RankRequest], knobs: SearchKnobs | None = None) -> list[Ranked]:
        """:meth:`rank` for several queries in one pass: the exact scan of every query vector is one
        matrix product over the stored features (:meth:`FeatureScan.inner_many`), an approximate index is
        searched once for all of them; each query is then reranked exactly as :meth:`rank` does, so each
        result is the one :meth:`rank` returns.

        Args:
            requests: the queries with their score, direction, top_k and depth.
            knobs: search knobs of an approximate index (the same for all).

        Returns:
            One :class:`Ranked` per request, in order.

        Raises:
            ValueError: a knob the approximate index does not take.
        """
        if not requests:
            return []
        if self.faiss_index is not None:
            return self._approximate_many(requests, knobs or SearchKnobs())
        columns: list[np.ndarray] = []
        slots: list[dict[Score, tuple[int, float]]] = []
        for r in requests:
            slot: dict[Score, tuple[int, float]] = {}
            if np.any(r.query.phi):
                for score in self._scan_scores(r.score, r.direction):
                    unit, b_norm = self._query_vector(score, r.query)
                    slot[score] = (len(columns), b_norm)
                    columns.append(unit)
            slots.append(slot)
        t0 = time.perf_counter()
        x, err = self.scan.inner_many(np.stack(columns)) if columns else (torch.zeros(0), torch.zeros(0))
        shared_ms = (time.perf_counter() - t0) * 1e3 / len(requests)  # the product's time, split evenly
        ranked = []
        for r, slot in zip(requests, slots, strict=True):
            scanned = {s: (x[j], err[j], b_norm) for s, (j, b_norm) in slot.items()} if slot else None
            one = self._exact(r.query, r.score, r.direction, r.top_k, r.candidates, scanned)
            ranked.append(dataclasses.replace(one, retrieve_ms=one.retrieve_ms + shared_ms))
        return ranked

    def _exact(
        self,
        query: QueryTerms,
        score: Score,
        direction: Direction,
        top_k: int,
        candidates: int,
        scanned: _Scanned | None = None,
    ) -> Ranked:
        n = self.surrogate.n_train
        depth = min(max(candidates, top_k), n)
        if not np.any(query.phi):  # a zero query: every score of every example is 0 (DESIGN.md 1.5)
            ids, scores, signed, _, order = self._rerank(query, score, direction, np.arange(depth), top_k)
            return Ranked(
                ids[order], {s: v[order] for s, v in scores.items()}, signed[order], depth, 0.0, 0.0
            )
        t0 = time.perf_counter()
        bounds, b_norm = self._upper_bounds(score, direction, query, scanned)
        retrieve_ms = (time.perf_counter() - t0) * 1e3
        rerank_ms = 0.0
        ids = np.zeros(0, dtype=np.int64)
        scores = {s: np.zeros(0) for s in Score}
        while True:
            t0 = time.perf_counter()
            values, found = torch.topk(bounds, min(depth + 1, n), sorted=True)
            t1 = time.perf_counter()
            new = np.setdiff1d(found[:depth].numpy(), ids)  # a deepening reranks only what it adds
            more = self.surrogate.scores(query, new)
            ids = np.concatenate([ids, new])
            scores = {s: np.concatenate([scores[s], more[s]]) for s in Score}
            ids, scores, signed, key, order = _ordered(score, direction, ids, scores, top_k)
            retrieve_ms += (t1 - t0) * 1e3
            rerank_ms += (time.perf_counter() - t1) * 1e3
            if depth >= n:
                break
            bound_x = float(values[depth]) * b_norm  # no unseen example's key exceeds this (units of x)
            if direction is not Direction.BOTH and bound_x <= 0:
                break  # no unseen example has the requested sign: every eligible one is in
            if score.signed:
                bound = bound_x
            else:
                bound = float(score_from_inner(score, np.array([max(bound_x, 0.0)]), query)[0])
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
            exact=True,
        )

    def _approximate(
        self,
        query: QueryTerms,
        score: Score,
        direction: Direction,
        top_k: int,
        candidates: int,
        knobs: SearchKnobs,
    ) -> Ranked:
        return self._approximate_many([RankRequest(query, score, direction, top_k, candidates)], knobs)[0]

    def _approximate_many(self, requests: Sequence[RankRequest], knobs: SearchKnobs) -> list[Ranked]:
        """One FAISS search for every request (+phi_q and -phi_q each, at the deepest depth asked), then
        each request's candidates (its own depth) reranked exactly."""
        assert self.faiss_index is not None
        index = self.faiss_index
        n = self.surrogate.n_train
        chosen = SearchKnobs(
            nprobe=knobs.nprobe if knobs.nprobe is not None else self.default_knobs.nprobe,
            ef_search=knobs.ef_search if knobs.ef_search is not None else self.default_knobs.ef_search,
        )
        params = search_params(self.cpu_index or index, chosen)
        depths = [min(max(r.candidates, r.top_k), n, self.max_depth or n) for r in requests]
        t0 = time.perf_counter()
        units = []
        for r in requests:
            a = query_vector(Score.INFORMATION_GAIN, r.query)  # the information-gain vectors' query side
            norm = float(np.linalg.norm(a))
            unit = a / norm if norm > 0 else a  # scale-free: FAISS searches in float32
            units += [unit, -unit]
        queries = np.stack(units).astype(np.float32)
        found = np.full((len(queries), max(depths)), -1, dtype=np.int64)
        for depth in sorted(set(depths)):  # one search per depth: an HNSW search depends on its k
            rows = np.repeat([2 * j for j, d in enumerate(depths) if d == depth], 2)
            rows[1::2] += 1
            args = (queries[rows], depth)
            found[rows, :depth] = index.search(*args, params=params)[1] if params else index.search(*args)[1]
        search_ms = (time.perf_counter() - t0) * 1e3 / len(requests)
        ranked = []
        for j, (r, depth) in enumerate(zip(requests, depths, strict=True)):
            t1 = time.perf_counter()
            # FAISS returns neighbours best first: the first ``depth`` of a deeper search are this depth's
            mine = found[2 * j : 2 * j + 2, :depth]
            ids, scores, signed, _, order = self._rerank(
                r.query, r.score, r.direction, mine[mine >= 0], r.top_k
            )
            ranked.append(
                Ranked(
                    ids=ids[order],
                    scores={s: v[order] for s, v in scores.items()},
                    signed=signed[order],
                    depth=depth,
                    retrieve_ms=search_ms,
                    rerank_ms=(time.perf_counter() - t1) * 1e3,
                    exact=False,
                )
            )
        return ranked


def information_gain_vectors(
    surrogate: Surrogate, rows: slice | np.ndarray, scale: float = 1.0
) -> np.ndarray:
    """`(m, k)` float32 information-gain vectors z_i = sqrt(beta_i) phi_i / sqrt(beta_i |phi_i|^2 + tau) of
    ``rows`` (DESIGN.md 1.3, 1.5), times ``scale`` (:func:`vector_scale`): posterior-independent, so they
    never change when examples are added."""
    return (surrogate.score_vectors(Score.INFORMATION_GAIN, rows) * scale).astype(np.float32)


def vector_scale(surrogate: Surrogate, sample_rows: int = 65536, seed: int = 0) -> float:
    """The power of two nearest 1 / the median norm of the information-gain vectors (on a seeded sample of at
    most ``sample_rows``), 1.0 when they are all zero: FAISS gets the vectors at norm ~1.

    Why: |z_i| = sqrt(beta_i |phi_i|^2 / (beta_i |phi_i|^2 + tau)) lies in [0, 1) and is small when tau
    dominates; measured on the scale benchmark's features (N = 1,000,000, k = 512, median |z| 0.023), an
    IVF1024,PQ64 index trained on the raw vectors ranked its candidates as if at random (its top-50
    estimates all equal; recall@10 0.05 at 1,000 candidates), the same index on vectors scaled by 50 had
    recall 1.0 on a 200,000 subset. A scale common to all vectors changes no inner-product ranking; a power
    of two changes no float32 mantissa. Recorded as the manifest's ``faiss.vector_scale`` (DESIGN.md 2.1).

    Args:
        surrogate: the fitted surrogate; sample_rows: vectors whose norms are looked at; seed: the sample's.

    Returns:
        A positive float (dimensionless), 2^j for an integer j.
    """
    n = surrogate.n_train
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample_rows), replace=False))
    norms = np.linalg.norm(surrogate.score_vectors(Score.INFORMATION_GAIN, rows), axis=1)
    median = float(np.median(norms)) if len(norms) else 0.0
    if not (median > 0 and math.isfinite(median)):
        return 1.0
    return float(2.0 ** round(-math.log2(median)))


def trained_approximate_index(
    surrogate: Surrogate, factory: str, train_rows: int = 262144, seed: int = 0, scale: float = 1.0
) -> faiss.Index:
    """An approximate FAISS inner-product index for the information-gain vectors, trained and empty.

    Trained on a seeded sample of at most ``train_rows`` vectors (DESIGN.md 2.1). Saved beside the filled
    index (:data:`~indexer.store.layout.FAISS_TRAINED_FILE`) so that an add fills a shard of its own.

    Args:
        surrogate: the fitted surrogate; factory: ``faiss.index_factory`` string (not ``"Flat"``);
        train_rows: training sample size; seed: the sample's seed; scale: the vectors' common factor
        (:func:`vector_scale`, recorded as the manifest's ``faiss.vector_scale``).

    Returns:
        The trained index, holding no vectors.

    Raises:
        ValueError: FAISS rejects the string, or the training set is too small for it (e.g. fewer vectors
            than IVF lists).
    """
    n, k = surrogate.n_train, surrogate.k
    try:
        index = faiss.index_factory(k, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS rejects the factory string {factory!r}: {exc}") from exc
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        # PQ: polysemous codes serve Hamming filtering, unused here; training them took 56 of 58 s
        inner.do_polysemous_training = False
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, train_rows), replace=False))
        sample = information_gain_vectors(surrogate, rows, scale)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"FAISS cannot train {factory!r} on {len(sample)} vectors: {exc}") from exc
    return index


def fill_approximate_index(
    index: faiss.Index, surrogate: Surrogate, start: int = 0, scale: float = 1.0
) -> faiss.Index:
    """Add the information-gain vectors (DESIGN.md 1.3, 2.1; `(n_train - start, k)` float32, times
    ``scale``) of training examples ``start..n_train - 1`` to ``index`` (a trained index of dimension k,
    modified and returned), a chunk at a time: no N x k array is formed.

    Raises:
        RuntimeError: FAISS refuses the vectors (an untrained index, or another dimension).
    """
    n = surrogate.n_train
    for lo in range(start, n, _CHUNK_ROWS):
        index.add(information_gain_vectors(surrogate, slice(lo, min(lo + _CHUNK_ROWS, n)), scale))
    return index


def make_approximate_index(
    surrogate: Surrogate, factory: str, train_rows: int = 262144, seed: int = 0, scale: float = 1.0
) -> faiss.Index:
    """:func:`trained_approximate_index` filled with every training example's vector
    (:func:`fill_approximate_index`); same arguments and errors.

    Returns:
        The trained, filled index.
    """
    return fill_approximate_index(
        trained_approximate_index(surrogate, factory, train_rows, seed, scale), surrogate, 0, scale
    )


def recall_queries(surrogate: Surrogate, query_phi: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`(m, k)` float64 held-out query features for measuring recall: the stored queries first, then a seeded
    sample of training features (m = min(count, n_query + n_train))."""
    take = np.asarray(query_phi[:count], dtype=np.float64)
    more = count - len(take)
    if more > 0:
        rows = np.sort(
            np.random.default_rng(seed).choice(
                surrogate.n_train, size=min(more, surrogate.n_train), replace=False
            )
        )
        take = np.concatenate([take, np.asarray(surrogate.phi[rows], dtype=np.float64)])
    return take


def measure_recall(
    exact: Searcher, approximate: Searcher, queries: np.ndarray, candidates: int, top_k: int = 10
) -> dict[str, float]:
    """Mean recall@top_k of ``approximate`` against ``exact`` for every score (direction ``both``).

    Args:
        exact: the exact scan; approximate: the same surrogate with the FAISS index.
        queries: `(m, k)` query features; candidates: the approximate search depth.

    Returns:
        score value -> recall in [0, 1] (the fraction of the exact top-k found, averaged over queries).
    """
    terms = [exact.surrogate.query_terms(phi_q) for phi_q in queries]
    requests = [RankRequest(t, score, Direction.BOTH, top_k, candidates) for score in Score for t in terms]
    found: dict[Score, list[float]] = {score: [] for score in Score}
    # batched as the service batches (the same answers as one rank each): one pass over the features per
    # batch instead of one per query and score
    for start in range(0, len(requests), _RECALL_BATCH):
        batch = requests[start : start + _RECALL_BATCH]
        for r, want, got in zip(batch, exact.rank_many(batch), approximate.rank_many(batch), strict=True):
            found[r.score].append(len(np.intersect1d(want.ids, got.ids)) / max(len(want.ids), 1))
    return {score.value: round(float(np.mean(found[score])), 4) if found[score] else 1.0 for score in Score}
