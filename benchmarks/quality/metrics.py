"""Attribution-quality metrics beyond the LDS: counterfactual removal, retrieval, detection, diversity, cost.

* **Counterfactual removal** (:func:`counterfactual_summary`): retrain without the training examples a
  method blames for a query and measure how much the query's margin drops, how often its prediction
  flips and how its predictive entropy changes, paired by retrain seed.
* **Retrieval of planted examples** (:func:`retrieval_ranks`, :func:`recall_at`,
  :func:`mean_reciprocal_rank`): where the training example planted for a query lands in the ranking.
* **Detection** (:func:`roc_auc`, :func:`found_in_top`): how well a per-example score separates
  flagged examples (e.g. mislabelled ones) from the rest.
* **Diversity of a returned set** (:func:`k_center_greedy`, :func:`near_duplicate_rate`,
  :func:`mean_near_duplicate_rate`): a farthest-first baseline and the share of near-duplicate pairs.
* **Cost** (:func:`measure_cost`): wall-clock time and peak resident memory of a block of code.

Margins follow DESIGN.md 1.1: ``z_y - logsumexp_{c != y} z_c``. Entropies are in nats.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax, logsumexp
from scipy.stats import rankdata

__all__ = [
    "predictive_entropy",
    "margins",
    "CounterfactualSummary",
    "counterfactual_summary",
    "retrieval_ranks",
    "recall_at",
    "mean_reciprocal_rank",
    "roc_auc",
    "found_in_top",
    "k_center_greedy",
    "near_duplicate_rate",
    "mean_near_duplicate_rate",
    "Cost",
    "measure_cost",
]

_STATM = "/proc/self/statm"
_SAMPLE_INTERVAL_S = 0.002
# Rows per block in k_center_greedy: bounds the (block, d) temporary independently of n.
_KCENTER_BLOCK = 4096


# ---- input checks ------------------------------------------------------------------------------


def _real_array(name: str, x: object, min_ndim: int = 0) -> np.ndarray:
    """``x`` as a finite float64 array with at least ``min_ndim`` dims, else a ValueError naming ``name``."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s); got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; found {int((~np.isfinite(arr)).sum())} NaN/inf entries")
    return arr


def _index_array(name: str, x: object, shape: tuple[int, ...], upper: int) -> np.ndarray:
    """``x`` as an int64 array of exactly ``shape`` with values in ``[0, upper)``."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer indices; got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= upper):
        raise ValueError(f"{name} must lie in [0, {upper}); got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def _bool_array(name: str, x: object, n: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.bool_ or arr.shape != (n,):
        raise ValueError(f"{name} must be a bool array of shape ({n},); got {arr.dtype} {arr.shape}")
    return arr


# ---- entropy and margins -----------------------------------------------------------------------


def predictive_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of the softmax of ``logits``, ``H = -sum_c p_c log p_c``, in nats.

    Computed from the log-softmax, so large logits neither overflow nor turn ``0 * log 0`` into NaN.

    Args:
        logits: `(..., C)` finite real logits, C >= 1.

    Returns:
        `(...)` float64 entropies in nats, each in ``[0, log C]``.

    Raises:
        ValueError: non-numeric or non-finite logits, no class axis, or C = 0.
    """
    z = _real_array("logits", logits, min_ndim=1)
    if z.shape[-1] < 1:
        raise ValueError(f"logits need at least one class on the last axis; got shape {z.shape}")
    log_p = log_softmax(z, axis=-1)
    # exp(log_p) underflows to exactly 0 only where log_p is very negative but finite: the product is 0.
    return -(np.exp(log_p) * log_p).sum(-1)


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Classification margin ``z_y - logsumexp_{c != y} z_c`` (DESIGN.md 1.1), numpy float64.

    Args:
        logits: `(..., n, C)` finite real logits, C >= 2.
        labels: `(n,)` integer class indices in ``[0, C)``, broadcast over the leading dims.

    Returns:
        `(..., n)` float64 margins (positive where the label class wins).

    Raises:
        ValueError: wrong shapes or dtypes, C < 2, non-finite logits or out-of-range labels.
    """
    z = _real_array("logits", logits, min_ndim=2)
    n, n_classes = z.shape[-2:]
    if n_classes < 2:
        raise ValueError(f"margins need C >= 2 classes on the last axis; got shape {z.shape}")
    y = _index_array("labels", labels, (n,), n_classes)
    is_label = np.arange(n_classes) == y[:, None]  # (n, C)
    z_y = np.take_along_axis(z, np.broadcast_to(y[:, None], z.shape[:-1] + (1,)), axis=-1)[..., 0]
    others = np.where(is_label, -np.inf, z)
    return z_y - logsumexp(others, axis=-1)


# ---- counterfactual removal --------------------------------------------------------------------


@dataclass(frozen=True)
class CounterfactualSummary:
    """Effect of retraining without a query-specific set of training examples, paired by seed.

    Attributes:
        margin_drop: mean over (seed, query) of ``margin(base) - margin(removed)``; positive means the
            query lost support when its set was removed (logit units).
        margin_drop_se: standard error over queries of the per-query mean drop (NaN if n < 2).
        flip_fraction: share of (seed, query) pairs whose argmax class changed, in [0, 1].
        entropy_change: mean over (seed, query) of ``H(removed) - H(base)``, in nats.
        entropy_change_se: standard error over queries of the per-query mean change (NaN if n < 2).
        n: number of queries, the sample size behind both standard errors.
    """

    margin_drop: float
    margin_drop_se: float
    flip_fraction: float
    entropy_change: float
    entropy_change_se: float
    n: int


def _mean_and_se_over_queries(delta: np.ndarray) -> tuple[float, float]:
    """Mean of `(S, n_q)` ``delta`` and the SE over queries of its per-query (over-seed) means."""
    per_query = delta.mean(0)  # (n_q,)
    n_q = per_query.shape[0]
    se = float(per_query.std(ddof=1) / math.sqrt(n_q)) if n_q >= 2 else float("nan")
    # Every query has the same S seeds, so the mean over (s, q) equals the mean of per-query means.
    return float(per_query.mean()), se


def counterfactual_summary(
    base_logits: np.ndarray, removed_logits: np.ndarray, labels: np.ndarray
) -> CounterfactualSummary:
    """Summarise the margin drop, prediction flips and entropy change caused by removal.

    Seeds are paired: ``base_logits[s]`` and ``removed_logits[s]`` come from models trained with the
    same seed s, so seed noise common to both cancels in each difference. Standard errors treat
    queries as the independent units (the seeds of one query share its removed set).

    Args:
        base_logits: `(S, n_q, C)` logits of models trained on the full training set with seeds
            s = 0..S-1, evaluated on the queries.
        removed_logits: `(S, n_q, C)` logits of models trained with the same seeds without a
            query-specific set: row q comes from the model retrained without query q's set,
            evaluated on query q.
        labels: `(n_q,)` integer true classes of the queries, in ``[0, C)``.

    Returns:
        A :class:`CounterfactualSummary`.

    Raises:
        ValueError: the two logit arrays are not both `(S, n_q, C)` with S, n_q >= 1 and C >= 2,
            are non-finite, or ``labels`` is not `(n_q,)` integers in range.
    """
    base = _real_array("base_logits", base_logits)
    removed = _real_array("removed_logits", removed_logits)
    if base.ndim != 3 or base.shape != removed.shape:
        raise ValueError(
            "base_logits and removed_logits must both be (S, n_q, C) of one shape; "
            f"got {base.shape} and {removed.shape}"
        )
    n_seeds, n_q, _ = base.shape
    if n_seeds < 1 or n_q < 1:
        raise ValueError(f"need at least one seed and one query; got (S, n_q, C) = {base.shape}")
    drop = margins(base, labels) - margins(removed, labels)  # (S, n_q)
    d_entropy = predictive_entropy(removed) - predictive_entropy(base)  # (S, n_q)
    flips = base.argmax(-1) != removed.argmax(-1)  # (S, n_q)
    margin_drop, margin_drop_se = _mean_and_se_over_queries(drop)
    entropy_change, entropy_change_se = _mean_and_se_over_queries(d_entropy)
    return CounterfactualSummary(
        margin_drop=margin_drop,
        margin_drop_se=margin_drop_se,
        flip_fraction=float(flips.mean()),
        entropy_change=entropy_change,
        entropy_change_se=entropy_change_se,
        n=n_q,
    )


# ---- retrieval of planted examples -------------------------------------------------------------


def retrieval_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each query's planted training example when ranked by descending score.

    Ties count against the target (pessimistic): its rank is 1 + the number of *other* training
    examples whose score is >= the target's. NaN scores rank last: a NaN never beats a number, and a
    NaN target is ranked behind every other example (rank ``n_train``).

    Args:
        scores: `(n_q, n_train)` real scores (NaN allowed) of every training example for each query.
        targets: `(n_q,)` integer index in ``[0, n_train)`` of the planted example for each query.

    Returns:
        `(n_q,)` int64 ranks in ``[1, n_train]``.

    Raises:
        ValueError: ``scores`` not 2-D real with n_train >= 1, or ``targets`` not `(n_q,)` in range.
    """
    s = np.asarray(scores)
    if s.dtype == np.bool_ or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scores must be a real numeric array; got dtype {s.dtype}")
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"scores must be (n_q, n_train) with n_train >= 1; got shape {s.shape}")
    t = _index_array("targets", targets, (s.shape[0],), s.shape[1])
    s = s.astype(np.float64, copy=False)
    target_score = s[np.arange(s.shape[0]), t]  # (n_q,)
    # NaN >= x is False, so NaN competitors never count; the target itself always counts (the "1 +").
    at_least = s >= target_score[:, None]  # (n_q, n_train)
    at_least[np.isnan(target_score)] = True
    return at_least.sum(1).astype(np.int64)


def _check_ranks(ranks: np.ndarray) -> np.ndarray:
    r = np.asarray(ranks)
    if not np.issubdtype(r.dtype, np.integer) or r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D integer array; got {r.dtype} {r.shape}")
    if r.min() < 1:
        raise ValueError(f"ranks are 1-based and must be >= 1; got minimum {r.min()}")
    return r


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Share of queries whose target ranks in the top ``k``.

    Args:
        ranks: `(n_q,)` integer 1-based ranks, e.g. from :func:`retrieval_ranks`.
        k: cut-off, an integer >= 1.

    Returns:
        Recall@k in [0, 1].

    Raises:
        ValueError: empty or non-integer ranks, a rank < 1, or k < 1.
    """
    r = _check_ranks(ranks)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    return float((r <= k).mean())


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    """Mean over queries of ``1 / rank``.

    Args:
        ranks: `(n_q,)` integer 1-based ranks, e.g. from :func:`retrieval_ranks`.

    Returns:
        MRR in (0, 1].

    Raises:
        ValueError: empty or non-integer ranks, or a rank < 1.
    """
    r = _check_ranks(ranks)
    return float((1.0 / r.astype(np.float64)).mean())


# ---- detection ---------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for separating ``positives`` from the rest.

    Mann-Whitney form: ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the
    sum of the positives' average ranks, i.e. the probability that a random positive outscores a
    random negative, with a tie counting 1/2.

    Args:
        scores: `(n,)` finite real scores, higher meaning "more likely positive".
        positives: `(n,)` bool labels.

    Returns:
        AUC in [0, 1]: 1 for perfect separation, 0.5 for constant scores.

    Raises:
        ValueError: wrong shapes or dtypes, non-finite scores, or no positives or no negatives.
    """
    s = _real_array("scores", scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (n,); got shape {s.shape}")
    pos = _bool_array("positives", positives, s.shape[0])
    n_pos = int(pos.sum())
    n_neg = pos.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs at least one positive and one negative; got {n_pos} and {n_neg}")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def found_in_top(scores: np.ndarray, positives: np.ndarray, fraction: float = 0.1) -> float:
    """Share of all positives that appear among the top ``ceil(fraction * n)`` examples by score.

    This is the recall of inspecting the highest-scored ``fraction`` of the data (e.g. the share of
    mislabelled examples found by checking the top 10%). Examples are sorted by descending score
    with ties broken by index order (a stable sort); NaN scores sort last.

    Args:
        scores: `(n,)` real scores (NaN allowed), n >= 1.
        positives: `(n,)` bool labels.
        fraction: share of the data inspected, in (0, 1].

    Returns:
        Share in [0, 1] of the positives found in the top ``ceil(fraction * n)``.

    Raises:
        ValueError: wrong shapes or dtypes, fraction outside (0, 1], or no positives.
    """
    s = np.asarray(scores)
    if s.dtype == np.bool_ or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scores must be a real numeric array; got dtype {s.dtype}")
    if s.ndim != 1 or s.shape[0] < 1:
        raise ValueError(f"scores must be 1-D (n,) with n >= 1; got shape {s.shape}")
    pos = _bool_array("positives", positives, s.shape[0])
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("found_in_top needs at least one positive")
    n = s.shape[0]
    # Round first so that e.g. 0.1 * 30 = 3.0000000000000004 inspects 3 examples, not 4.
    k = min(n, max(1, math.ceil(round(fraction * n, 9))))
    # Negating keeps NaN as NaN, which argsort places last; "stable" keeps index order within ties.
    order = np.argsort(-s.astype(np.float64), kind="stable")
    return float(pos[order[:k]].sum() / n_pos)


# ---- diversity ---------------------------------------------------------------------------------


def k_center_greedy(features: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center (farthest-first traversal) under Euclidean distance.

    The first centre is ``np.random.default_rng(seed).integers(n)``; each next centre is the point
    farthest from all centres chosen so far (lowest index on ties). A running `(n,)` vector of
    squared distances to the nearest chosen centre is updated block by block, so memory beyond the
    input is O(n) plus a fixed-size block, never `(n, n)`. Squared distances are formed from explicit
    differences, not ``|x|^2 - 2 x.c + |c|^2``, whose cancellation could reorder near ties.

    Args:
        features: `(n, d)` finite real features, n >= 1.
        m: number of centres, ``1 <= m <= n``.
        seed: seed for the first centre.

    Returns:
        `(m,)` int64 distinct indices into ``features`` in selection order.

    Raises:
        ValueError: ``features`` not 2-D finite real, or m outside [1, n].
    """
    x = np.asarray(features)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"features must be a real numeric array; got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"features must be (n, d) with n >= 1; got shape {x.shape}")
    n = x.shape[0]
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or not 1 <= m <= n:
        raise ValueError(f"m must be an integer in [1, {n}]; got {m!r}")
    if not all(np.isfinite(x[i : i + _KCENTER_BLOCK]).all() for i in range(0, n, _KCENTER_BLOCK)):
        raise ValueError("features must be finite")
    chosen = np.empty(m, dtype=np.int64)
    min_sq = np.full(n, np.inf)  # (n,) squared distance to the nearest chosen centre
    nxt = int(np.random.default_rng(seed).integers(n))
    for j in range(m):
        chosen[j] = nxt
        centre = x[nxt].astype(np.float64)
        for i in range(0, n, _KCENTER_BLOCK):
            diff = x[i : i + _KCENTER_BLOCK].astype(np.float64) - centre
            block = min_sq[i : i + _KCENTER_BLOCK]  # a view: updated in place
            np.minimum(block, np.einsum("nd,nd->n", diff, diff), out=block)
        # -1 keeps chosen points out even when every remaining point duplicates a centre (distance 0).
        min_sq[chosen[: j + 1]] = -1.0
        nxt = int(np.argmax(min_sq))
    return chosen


def near_duplicate_rate(features: np.ndarray, members: np.ndarray, threshold: float = 0.95) -> float:
    """Share of unordered pairs of distinct members whose cosine similarity exceeds ``threshold``.

    Args:
        features: `(n, d)` finite real features.
        members: `(m,)` distinct integer indices into ``features`` (a returned set).
        threshold: cosine-similarity cut-off; a pair counts when its cosine is strictly greater.
            A zero vector has cosine 0 with everything.

    Returns:
        Share in [0, 1] of the ``m (m - 1) / 2`` pairs that are near duplicates; NaN if m < 2.

    Raises:
        ValueError: ``features`` not 2-D finite real, ``members`` not 1-D distinct in-range integers,
            or a non-finite threshold.
    """
    x = _real_array("features", features)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d); got shape {x.shape}")
    idx = np.asarray(members)
    if idx.ndim != 1:
        raise ValueError(f"members must be 1-D (m,); got shape {idx.shape}")
    if idx.size == 0:
        idx = idx.astype(np.int64)  # an empty list arrives as float64
    idx = _index_array("members", idx, idx.shape, x.shape[0])
    if np.unique(idx).size != idx.size:
        raise ValueError("members must be distinct indices")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold}")
    m = idx.shape[0]
    if m < 2:
        return float("nan")
    v = x[idx]  # (m, d)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)  # zero rows stay zero: cosine 0
    cos = unit @ unit.T  # (m, m)
    upper = np.triu_indices(m, k=1)
    return float((cos[upper] > threshold).mean())


def mean_near_duplicate_rate(
    features: np.ndarray, sets: Sequence[np.ndarray], threshold: float = 0.95
) -> float:
    """Mean of :func:`near_duplicate_rate` over the sets with at least two members.

    Args:
        features: `(n, d)` finite real features.
        sets: sequence of `(m_i,)` distinct integer index arrays.
        threshold: as in :func:`near_duplicate_rate`.

    Returns:
        Mean rate in [0, 1] over the sets with m_i >= 2; NaN if there are none.

    Raises:
        ValueError: as :func:`near_duplicate_rate`, for any set.
    """
    rates = [near_duplicate_rate(features, members, threshold) for members in sets]
    kept = [r for r in rates if not math.isnan(r)]
    return float(np.mean(kept)) if kept else float("nan")


# ---- cost --------------------------------------------------------------------------------------


@dataclass
class Cost:
    """Cost of a block of code, filled in by :func:`measure_cost` when the block exits.

    Attributes:
        wall_s: elapsed wall-clock time in seconds (``time.perf_counter``).
        peak_rss_bytes: peak resident-set size during the block minus the RSS at entry, in bytes
            (>= 0).
    """

    wall_s: float = 0.0
    peak_rss_bytes: int = 0


def _read_rss_bytes(page_size: int) -> int:
    with open(_STATM, "rb") as f:
        return int(f.read().split()[1]) * page_size  # field 2: resident pages


def _maxrss_bytes() -> int:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


@contextmanager
def measure_cost() -> Iterator[Cost]:
    """Measure wall time and peak resident memory above the entry level of the ``with`` body.

    A daemon thread samples ``/proc/self/statm`` (resident pages x page size) about every 2 ms, and
    once more at exit, so a short-lived allocation is caught if it lives for a sample or until exit.
    Without ``/proc`` it falls back to ``getrusage``'s lifetime ``ru_maxrss``, which only sees a
    peak that exceeds the process's previous high-water mark. The sampler stops even if the body
    raises.

    Yields:
        A :class:`Cost` whose fields are filled in when the block exits (they read 0 inside it).

    Example:
        >>> with measure_cost() as cost:
        ...     _ = sum(range(1000))
        >>> cost.wall_s > 0
        True
    """
    cost = Cost()
    if not os.path.exists(_STATM):
        start_maxrss = _maxrss_bytes()
        start = time.perf_counter()
        try:
            yield cost
        finally:
            cost.wall_s = time.perf_counter() - start
            cost.peak_rss_bytes = max(0, _maxrss_bytes() - start_maxrss)
        return

    page_size = os.sysconf("SC_PAGE_SIZE")
    entry_rss = _read_rss_bytes(page_size)
    peak = [entry_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(_SAMPLE_INTERVAL_S):
            peak[0] = max(peak[0], _read_rss_bytes(page_size))

    sampler = threading.Thread(target=sample, name="measure_cost-rss", daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        yield cost
    finally:
        cost.wall_s = time.perf_counter() - start
        final_rss = _read_rss_bytes(page_size)
        stop.set()
        sampler.join()
        cost.peak_rss_bytes = max(0, max(peak[0], final_rss) - entry_rss)
