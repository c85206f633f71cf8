"""The interface every peer adapter implements, with the output function, loss and checks they share.

Sign convention of every :meth:`PeerMethod.scores`: positive = proponent, i.e. training on example i
raises the query's margin (lowers its loss). The package overview is :mod:`benchmarks.quality.peers`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.quality.retrain import margins

__all__ = [
    "BATCH",
    "PEER_PACKAGES",
    "MarginCrossEntropy",
    "MarginOutput",
    "PeerMethod",
    "ProjectedPeerMethod",
    "as_scores",
    "batch_margins",
    "check_pairs",
    "missing_peers",
    "package_version",
]


PEER_PACKAGES: dict[str, str] = {"traker": "trak", "dattri": "dattri", "captum": "captum.influence"}
"""Distribution name -> the module the adapters import from it."""

BATCH = 1000
"""Training examples per per-example-gradient batch: 1,000 x 50,890 float32 gradients are 204 MB."""


def missing_peers() -> list[str]:
    """Distribution names of the peer packages that cannot be imported.

    Returns:
        e.g. ``["captum"]``; empty when all three import.
    """
    missing = []
    for dist, module in PEER_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def package_version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


# ---- output function and loss -------------------------------------------------------------------


def batch_margins(model: nn.Module, params: Any, x: torch.Tensor, y: torch.Tensor, shape) -> torch.Tensor:
    """Margins of a batch, or of ONE example passed without (or with a size-1) batch axis.

    dattri calls per-example functions under ``vmap`` with ``x`` `(*shape)` or `(1, *shape)`; reshaping
    to `(-1, *shape)` serves both and full batches alike.

    Returns:
        `(n,)` margins.
    """
    logits = functional_call(model, params, (x.reshape(-1, *shape),))
    return margins(logits, y.reshape(-1))


class MarginOutput(nn.Module):
    """Captum-style "loss" that is the summed margin of a batch: ``forward(logits, labels)`` -> `()`."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margins(logits, labels).sum()


class MarginCrossEntropy(nn.Module):
    """Summed cross-entropy of a batch written as ``softplus(-m)`` (exactly ``-log softmax_y``)."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(-margins(logits, labels)).sum()


# ---- interface ----------------------------------------------------------------------------------


class PeerMethod(ABC):
    """A peer attribution method, run through its package on a fitted classifier.

    Attributes:
        key: short id, e.g. ``"traker_trak"``.
        name: row label for reports, e.g. ``"TRAK (traker)"``.
        distribution: the peer package's distribution name, e.g. ``"traker"``.
        package: distribution and installed version, e.g. ``"traker 0.3.2"``.
        damping_param: the package argument that :meth:`scores`' ``damping`` feeds, in the package's own
            units; None when the method has no damping.
    """

    key: str
    name: str
    distribution: str
    package: str
    damping_param: str | None

    def __init__(self) -> None:
        self.package = package_version(self.distribution)
        self._model: nn.Module | None = None
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None

    @abstractmethod
    def fit(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        """Featurize or cache the training set with the package (the expensive step that can be reused).

        The adapter keeps its own copy of ``model``; the caller's module is left untouched.

        Args:
            model: trained classifier mapping `(n, *input_shape)` float32 to `(n, C)` logits.
            train_inputs: `(n_train, *input_shape)` float32.
            train_targets: `(n_train,)` int64 labels in ``0..C-1``.

        Raises:
            ValueError: the inputs and targets disagree in length, or the targets are not int64 `(n,)`.
        """

    @abstractmethod
    def scores(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None = None
    ) -> np.ndarray:
        """Attribution scores of every training example for every query's margin.

        Args:
            query_inputs: `(n_query, *input_shape)` float32.
            query_targets: `(n_query,)` int64, the label whose margin each query asks about.
            damping: value of :attr:`damping_param` (None: the package default, 0); must be None for a
                method without damping.

        Returns:
            `(n_query, n_train)` float64; positive = proponent (training on i raises the query's margin).

        Raises:
            RuntimeError: :meth:`fit` has not been called.
            ValueError: bad query shapes or dtypes, or a damping the method cannot take.
        """

    @abstractmethod
    def self_scores(self, damping: float | None = None) -> np.ndarray:
        """Self-influence of every training example, larger = more self-influential.

        Computed with the package's own self-influence routine where it has one (its definition, which
        may use the loss on both sides), else as the example's score for itself as a query with its
        own label.

        Args:
            damping: as in :meth:`scores`.

        Returns:
            `(n_train,)` float64.

        Raises:
            RuntimeError: :meth:`fit` has not been called.
            ValueError: a damping the method cannot take.
        """

    def close(self) -> None:
        """Drop what :meth:`fit` kept (model copy, training tensors, files); fit again to reuse."""
        self._model = None
        self._train = None

    # -- shared checks and helpers --

    def _set_fitted(self, model: nn.Module, train_inputs: torch.Tensor, train_targets: torch.Tensor) -> None:
        check_pairs(train_inputs, train_targets, "train")
        self._model = copy.deepcopy(model).eval()
        self._train = (train_inputs.detach().float().contiguous(), train_targets.detach().contiguous())

    def _fitted(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        if self._model is None or self._train is None:
            raise RuntimeError(f"{self.name}: call fit(model, train_inputs, train_targets) first")
        return self._model, *self._train

    def _check_query(self, query_inputs: torch.Tensor, query_targets: torch.Tensor) -> None:
        _, train_inputs, _ = self._fitted()
        check_pairs(query_inputs, query_targets, "query")
        if query_inputs.shape[1:] != train_inputs.shape[1:]:
            raise ValueError(
                f"query inputs must have shape (n, {', '.join(map(str, train_inputs.shape[1:]))}) like "
                f"the training inputs; got {tuple(query_inputs.shape)}"
            )

    def _check_damping(self, damping: float | None) -> float:
        if self.damping_param is None:
            if damping is not None:
                raise ValueError(f"{self.name} has no damping; pass damping=None (got {damping!r})")
            return 0.0
        if damping is None:
            return 0.0
        ok = isinstance(damping, int | float) and not isinstance(damping, bool)
        if not (ok and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping ({self.damping_param}) must be a finite number >= 0; got {damping!r}")
        return float(damping)

    def _checked_query(
        self, query_inputs: torch.Tensor, query_targets: torch.Tensor, damping: float | None
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The checks of every :meth:`scores` call: the damping, then the queries against the fit.

        Returns:
            ``(damping, train_inputs, train_targets)``: the damping as the package's float (0 for None)
            and the fitted training set.

        Raises:
            RuntimeError: :meth:`fit` has not been called.
            ValueError: a damping the method cannot take, or bad query shapes or dtypes.
        """
        value = self._check_damping(damping)
        self._check_query(query_inputs, query_targets)
        _, train_inputs, train_targets = self._fitted()
        return value, train_inputs, train_targets

    def _checked_self(self, damping: float | None) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The checks of a :meth:`self_scores` call; returns what :meth:`_checked_query` does."""
        value = self._check_damping(damping)
        _, train_inputs, train_targets = self._fitted()
        return value, train_inputs, train_targets

    @property
    def _shape(self) -> tuple[int, ...]:
        return tuple(self._fitted()[1].shape[1:])

    def _loader(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = BATCH) -> DataLoader:
        dataset = TensorDataset(inputs.detach().float().contiguous(), targets.detach().contiguous())
        return DataLoader(dataset, batch_size=max(1, min(batch_size, len(dataset))), shuffle=False)

    def _per_example_margin(self) -> Callable:
        """``f(params, (x, y))`` -> summed margin: the margin of one example under dattri's vmap."""
        model, shape = self._fitted()[0], self._shape

        def margin(params, data):
            x, y = data
            return batch_margins(model, params, x, y, shape).sum()

        return margin

    def _mean_cross_entropy(self) -> Callable:
        """``f(params, (x, y))`` -> mean ``softplus(-m)`` over the batch (one example under vmap)."""
        model, shape = self._fitted()[0], self._shape

        def cross_entropy(params, data):
            x, y = data
            return nn.functional.softplus(-batch_margins(model, params, x, y, shape)).mean()

        return cross_entropy

    def _checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._fitted()[0].state_dict().items()}


class ProjectedPeerMethod(PeerMethod):
    """A peer whose gradients its package projects to ``projection_dim`` with a seeded Gaussian matrix.

    Args:
        projection_dim: the package's projection dimension k.
        seed: the package's projection seed.
    """

    def __init__(self, projection_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)


def check_pairs(inputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError(f"{what} inputs and targets must be torch tensors")
    if targets.ndim != 1 or targets.dtype != torch.int64:
        raise ValueError(
            f"{what} targets must be int64 of shape (n,); got {targets.dtype} {tuple(targets.shape)}"
        )
    if inputs.ndim < 2 or len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"{what} inputs must be (n, ...) with n = len(targets) = {len(targets)} > 0; "
            f"got {tuple(inputs.shape)}"
        )


def as_scores(matrix: torch.Tensor | np.ndarray, n_query: int, n_train: int, sign: float) -> np.ndarray:
    """A package's `(n_train, n_query)` matrix as our `(n_query, n_train)` float64, times ``sign``."""
    out = np.asarray(matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix)
    out = sign * out.astype(np.float64).T
    if out.shape != (n_query, n_train):
        raise RuntimeError(f"package returned scores of shape {out.T.shape}, expected {(n_train, n_query)}")
    return np.ascontiguousarray(out)
