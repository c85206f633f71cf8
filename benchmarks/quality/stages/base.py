"""What the harness's stages share: the model's context, the retrain job list, scores, small records.

:class:`StageContext` carries one benchmark model's setting through the stages; :class:`Retrains`
collects (mask, seed) retrains and runs them as one cached batch; :func:`signed_scores` and
:func:`raw_scores` call a method the way the signed metrics and the others need.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.quality.infotrace_method import InfotraceFeatures, InfotraceMethod, infotrace_methods
from benchmarks.quality.retrain import retrain_logits
from benchmarks.quality.setting import QualityConfig, Queries
from indexer.data import Dataset
from indexer.enums import ProjectionKind

__all__ = [
    "RANDOM",
    "HarnessError",
    "Retrains",
    "StageContext",
    "accuracy",
    "cost_record",
    "harness_methods",
    "infotrace_features",
    "log",
    "random_scores",
    "raw_scores",
    "signed_scores",
]

RANDOM = "random"
"""Name of the random floor: as many random training examples as a method's set."""


class HarnessError(AssertionError):
    """The harness's own bookkeeping is inconsistent (a bug in the harness, not a method's result)."""


def log(message: str) -> None:
    """A time-stamped status line on stderr that does not break the progress bars."""
    tqdm.write(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr)


def signed_scores(method: Any, data: Dataset, damping: float | None) -> np.ndarray:
    """Signed scores `(n_query, n_train)`: infotrace's information scores get the sign of influence."""
    if isinstance(method, InfotraceMethod):
        return method.signed_scores(data.inputs, data.targets, damping)
    return np.asarray(method.scores(data.inputs, data.targets, damping), dtype=np.float64)


def raw_scores(method: Any, data: Dataset, damping: float | None) -> np.ndarray:
    """Scores `(n_query, n_train)` as each method defines them (unsigned information scores stay unsigned)."""
    return np.asarray(method.scores(data.inputs, data.targets, damping), dtype=np.float64)


def harness_methods(config: QualityConfig) -> list[Any]:
    """Unfitted methods in report order: the infotrace scores, then the peers (less ``excluded_methods``).

    Raises:
        SystemExit: a peer package is not installed (the ``bench`` extra).
    """
    from benchmarks.quality.peers import missing_peers, peer_methods

    missing = missing_peers()
    if missing:
        raise SystemExit(
            f"peer packages missing: {', '.join(missing)}; install them with pip install -e '.[bench]'"
        )
    peers = peer_methods(
        config.k, config.seed, cg_max_iter=config.cg_max_iter, cg_hessian_examples=config.cg_hessian_examples
    )
    projections = (
        (ProjectionKind.DENSE, ProjectionKind.KRONECKER) if config.kronecker else (ProjectionKind.DENSE,)
    )
    excluded = set(config.excluded_methods)
    return [
        *infotrace_methods(config.k, config.seed, projections),
        *(p for p in peers if p.key not in excluded),
    ]


def infotrace_features(methods: Sequence[Any]) -> InfotraceFeatures:
    """The features the infotrace methods of ``methods`` share (fitted with them)."""
    return next(m for m in methods if isinstance(m, InfotraceMethod)).features


def cost_record(cost: Any) -> dict[str, float]:
    """A measured cost as ``{"wall_s": seconds, "peak_rss_bytes": bytes}`` (``measure_cost``'s result)."""
    return {"wall_s": round(float(cost.wall_s), 3), "peak_rss_bytes": int(cost.peak_rss_bytes)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Share of correct argmax predictions of `(..., n, C)` logits against `(n,)` labels, `(...)`."""
    return (logits.argmax(-1) == labels).mean(-1)


def random_scores(config: QualityConfig, n_train: int) -> np.ndarray:
    """`(n_counterfactual, n_train)` seeded noise whose top-k is the random floor's removal set."""
    return np.random.default_rng(config.seed + 20).standard_normal((config.n_counterfactual, n_train))


class Retrains:
    """Collects (mask, seed) retrain jobs and runs them in one cached, deduplicated batch.

    Args:
        train: the full training set; inputs: `(n_test, 784)` inputs the retrained models are run on;
        config: the retrain settings; cache_dir: the retrain cache; chunk: models retrained at once.
    """

    def __init__(
        self, train: Dataset, inputs: torch.Tensor, config: Any, cache_dir: Path, chunk: int
    ) -> None:
        self.train, self.inputs, self.config, self.cache_dir, self.chunk = (
            train,
            inputs,
            config,
            cache_dir,
            chunk,
        )
        self.masks: list[np.ndarray] = []
        self.seeds: list[int] = []

    def add(self, masks: np.ndarray, seeds: int | Sequence[int]) -> slice:
        """Queue `(n, n_train)` masks with one seed for all or one seed each; returns their rows."""
        start = len(self.masks)
        self.masks.extend(masks)
        self.seeds.extend([int(seeds)] * len(masks) if isinstance(seeds, int) else [int(s) for s in seeds])
        if len(self.seeds) != len(self.masks):
            raise HarnessError(f"{len(masks)} masks were queued with a different number of seeds")
        return slice(start, len(self.masks))

    def run(self, desc: str) -> np.ndarray:
        """Retrain every queued job (cached ones are read back), with ``desc`` on the progress bar.

        Returns:
            `(n_jobs, n_test, C)` float32 logits, in the order the jobs were queued.
        """
        if not self.masks:
            return np.zeros((0, len(self.inputs), 0), np.float32)
        return retrain_logits(
            self.train,
            self.inputs,
            np.stack(self.masks),
            np.array(self.seeds),
            self.config,
            self.cache_dir,
            chunk_size=self.chunk,
            progress=desc,
        )


@dataclass(frozen=True)
class StageContext:
    """One benchmark model's setting, as every stage needs it.

    Attributes:
        model_name: a key of :data:`~benchmarks.quality.setting.MODELS` (``mlp``, ``logreg``).
        config: sizes and seeds; train: the training split; queries: the test split and its roles.
        cache: this model's retrain cache folder; chunk: models retrained at once.
    """

    model_name: str
    config: QualityConfig
    train: Dataset
    queries: Queries
    cache: Path
    chunk: int

    @property
    def n_train(self) -> int:
        """Training examples."""
        return len(self.train)

    @property
    def labels(self) -> np.ndarray:
        """`(n_test,)` int64 labels of the test split."""
        return self.queries.test.targets.numpy()

    @cached_property
    def evaluation(self) -> Dataset:
        """The evaluation queries (``queries.eval_rows``)."""
        return self.queries.subset(self.queries.eval_rows)

    @cached_property
    def validation(self) -> Dataset:
        """The validation queries (``queries.validation_rows``), on which the damping is tuned."""
        return self.queries.subset(self.queries.validation_rows)

    def retrains(self, epochs: int | None = None) -> Retrains:
        """An empty job list of this model, run on the test inputs (``epochs``: None for the default)."""
        return Retrains(
            self.train,
            self.queries.test.inputs,
            self.config.retrain_config(self.model_name, epochs=epochs),
            self.cache,
            self.chunk,
        )
